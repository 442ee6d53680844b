//! Datapath debug events through aya-log: why a packet was passed, rejected or dropped, and
//! each new flow. The agent forwards them to its log (`lb-agent run --datapath-debug`, or
//! `PUT /datapath-debug` on its metrics address at run time). Off by default: an event then
//! costs one test of a config word the program has already loaded.
use aya_ebpf::EbpfContext;
use aya_log_ebpf::info;
use lb_common::{CFG_DEBUG_EVENTS, Config, DebugEvent};

use crate::parse::Tuple;

/// Logs `what` with the packet's addresses when debug events are on. The event goes as its
/// code (the agent writes its text, `lb_common::DebugEvent::text`): a string here was a
/// byte-copy loop the verifier walked at every call site. The message starts with
/// `lb_common::DEBUG_EVENT_PREFIX`.
#[inline(always)]
pub fn event<C: EbpfContext>(ctx: &C, cfg: &Config, t: &Tuple, what: DebugEvent) {
    if cfg.flags & CFG_DEBUG_EVENTS == 0 {
        return;
    }
    info!(
        ctx,
        "event {} proto {} {:i}:{} -> {:i}:{}",
        what as u8,
        t.proto,
        u32::from_be(t.src),
        u16::from_be(t.sport),
        u32::from_be(t.dst),
        u16::from_be(t.dport)
    );
}
