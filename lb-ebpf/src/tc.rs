//! tc ingress on the host side of a local pod's veth (traffic leaving the pod).
//!
//! Why a tc hook: a pod chosen by the XDP path gets the client's packet with the client's
//! source address (no SNAT for local backends), so it answers the client directly and the
//! reply never passes the uplink's XDP ingress. Here, on its way out of the pod, the reply's
//! source is turned back into the frontend the client used. skbs here may carry
//! CHECKSUM_PARTIAL, so the kernel's checksum helpers (which know the skb's checksum state)
//! do the updates instead of the software arithmetic of the XDP path.
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use lb_common::*;

use crate::{
    lb,
    maps::{REVNAT, count},
    parse::{self, IP_OFF, L4_OFF},
};

/// Offsets inside the IPv4 header and the L4 headers.
const IP_CHECK: usize = IP_OFF + 10;
const IP_SRC: usize = IP_OFF + 12;
const TCP_CHECK: usize = L4_OFF + 16;
const UDP_CHECK: usize = L4_OFF + 6;
const L4_SPORT: usize = L4_OFF;

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    // Headers may sit in paged data; pull the part we read into the linear area.
    let _ = ctx.pull_data(L4_OFF as u32 + 8);
    let t = match parse::parse(ctx.data(), ctx.data_end()) {
        Ok(t) => t,
        Err(_) => {
            count(Counter::TcPass);
            return TC_ACT_OK as i32;
        }
    };
    let rk = lb::reply_key(t.src, t.dst, t.sport, t.dport, t.proto);
    // SAFETY: plain-data map value.
    let Some(rev) = (unsafe { REVNAT.get(&rk) }) else {
        count(Counter::TcPass);
        return TC_ACT_OK as i32;
    };
    let rev = *rev;
    if snat_source(ctx, &t, rev.src_addr_be, rev.src_port_be).is_err() {
        return TC_ACT_SHOT as i32;
    }
    count(Counter::TcReply);
    TC_ACT_OK as i32
}

#[inline(always)]
fn snat_source(ctx: &TcContext, t: &parse::Tuple, addr: u32, port: u16) -> Result<(), i64> {
    let l4_check = if t.proto == PROTO_TCP {
        TCP_CHECK
    } else {
        UDP_CHECK
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | 4;
    // UDP with checksum 0 has none to fix (BPF_F_MARK_MANGLED_0 keeps 0 meaning "none").
    let mangled0 = if t.proto == PROTO_UDP {
        aya_ebpf::bindings::BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    ctx.l4_csum_replace(l4_check, t.src as u64, addr as u64, pseudo | mangled0)?;
    ctx.l4_csum_replace(l4_check, t.sport as u64, port as u64, 2 | mangled0)?;
    ctx.l3_csum_replace(IP_CHECK, t.src as u64, addr as u64, 4)?;
    ctx.store(IP_SRC, &addr, 0)?;
    ctx.store(L4_SPORT, &port, 0)?;
    Ok(())
}
