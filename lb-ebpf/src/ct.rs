//! Connection tracking: where a flow's entry lives, its clock and its TCP state.
//!
//! Two maps (see `lb_common::CtEntry`): `XLB_CT_NEW` holds flows not yet confirmed, `XLB_CT`
//! flows seen in both directions and then from the client again. Both are LRU, so a flood
//! of SYNs or stray segments (which never get confirmed) can only evict other unconfirmed
//! flows. Entries past their timeout are treated as absent here; the agent's GC deletes
//! them in bulk.
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns};
use lb_common::*;

use crate::maps::{CT, CT_NEW, REVNAT, count};

/// TCP header flag bits (byte 13).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// A segment that may open a connection: SYN without ACK.
#[inline(always)]
pub fn opens(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// Monotonic milliseconds, wrapping at 2^32. The coarse clock is a plain load (no
/// clock-source read) with a tick's resolution, which is all the timeouts need; the agent
/// reads the same clock (CLOCK_MONOTONIC).
#[inline(always)]
pub fn now_ms() -> u32 {
    // SAFETY: helper without arguments.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000) as u32
}

/// A live entry: the pointer into its map value and whether it is in `XLB_CT`.
pub struct Live {
    pub entry: *mut CtEntry,
    pub confirmed: bool,
}

/// The flow's entry, if it is live. An expired one is deleted on the way.
///
/// Looks in `XLB_CT`, then `XLB_CT_NEW`, then `XLB_CT` again: another CPU may confirm the
/// flow between the first two looks (`seen_forward` inserts it into `XLB_CT`, then removes
/// it from `XLB_CT_NEW`; the ACK and the first data segment of a connection are often
/// handled at once on two CPUs). A flow found in neither map would be taken for a new one:
/// a mid-stream flow on a fresh SNAT port, which the backend answers with a RST, or a reply
/// dropped as stale. The third look sees the move's insert, made before the removal that
/// the second look missed the entry by.
#[inline(always)]
pub fn lookup(key: &FlowKey, cfg: &Config, now: u32) -> Option<Live> {
    if let Some(e) = CT.get_ptr_mut(key) {
        // SAFETY: map value pointer, valid while the program runs (RCU).
        if !ct_expired(cfg, unsafe { &*e }, true, now) {
            return Some(Live {
                entry: e,
                confirmed: true,
            });
        }
        count(Counter::CtExpired);
        let _ = CT.remove(key);
    }
    if let Some(e) = CT_NEW.get_ptr_mut(key) {
        if !ct_expired(cfg, unsafe { &*e }, false, now) {
            return Some(Live {
                entry: e,
                confirmed: false,
            });
        }
        // An expired entry is never confirmed (it counts as absent): no move to look for.
        count(Counter::CtExpired);
        let _ = CT_NEW.remove(key);
        return None;
    }
    let e = CT.get_ptr_mut(key)?;
    // SAFETY: see above.
    if ct_expired(cfg, unsafe { &*e }, true, now) {
        return None;
    }
    count(Counter::CtMoveRace);
    Some(Live {
        entry: e,
        confirmed: true,
    })
}

/// The flow's entry and whether it is confirmed, live or not, in the order of [`lookup`]
/// (`XLB_CT`, `XLB_CT_NEW`, `XLB_CT` again, for a flow being confirmed meanwhile).
#[inline(always)]
fn find(key: &FlowKey) -> Option<(*mut CtEntry, bool)> {
    if let Some(e) = CT.get_ptr_mut(key) {
        return Some((e, true));
    }
    if let Some(e) = CT_NEW.get_ptr_mut(key) {
        return Some((e, false));
    }
    CT.get_ptr_mut(key).map(|e| (e, true))
}

#[inline(always)]
pub fn remove(key: &FlowKey, confirmed: bool) {
    let _ = if confirmed {
        CT.remove(key)
    } else {
        CT_NEW.remove(key)
    };
}

/// Records a packet of the client's direction. A flow that has had its reply and now
/// hears from the client again (for TCP: not a SYN) is confirmed: it moves to `XLB_CT`.
#[inline(always)]
pub fn seen_forward(key: &FlowKey, live: &Live, tcp_flags: u8, now: u32) {
    // SAFETY: map value pointer (see `lookup`); a racing CPU can at worst lose one of two
    // concurrent flag updates, which the next packet repeats.
    let e = unsafe { &mut *live.entry };
    let mut flags = e.flags;
    if tcp_flags & TCP_FIN != 0 {
        flags |= CT_FIN_CLIENT;
    }
    if tcp_flags & TCP_RST != 0 {
        flags |= CT_RST;
    }
    // A RST is no confirmation: it is how a host without the connection (the source of a
    // spoofed SYN) answers the backend's SYN-ACK.
    if !live.confirmed
        && flags & CT_SEEN_REPLY != 0
        && !opens(tcp_flags)
        && tcp_flags & TCP_RST == 0
    {
        let mut moved = *e;
        moved.flags = flags & !CT_MIDSTREAM;
        moved.last_seen_ms = now;
        if CT.insert(key, &moved, BPF_ANY as u64).is_ok() {
            let _ = CT_NEW.remove(key);
            count(Counter::CtConfirm);
            return;
        }
    }
    if flags != e.flags {
        e.flags = flags;
    }
    // Only when the clock moved (a tick is several milliseconds): not a cache-line write
    // per packet.
    if e.last_seen_ms != now {
        e.last_seen_ms = now;
    }
}

/// A reply (backend -> client, or backend -> SNAT address:port) matched `rev` under the
/// key `rk`. Checks that the flow owning it is live and really uses this reverse entry,
/// and records the reply. `false`: the reverse entry is a leftover; the packet is not
/// translated.
#[inline(always)]
pub fn seen_reply(rk: &FlowKey, rev: &RevNat, tcp_flags: u8, cfg: &Config) -> bool {
    let now = now_ms();
    let key = rev.ct_key(rk.proto);
    let Some(live) = lookup(&key, cfg, now) else {
        count(Counter::ReplyStale);
        let _ = REVNAT.remove(rk);
        return false;
    };
    // SAFETY: see `lookup`.
    let e = unsafe { &mut *live.entry };
    // The reply's destination port is the SNAT port for a source-NATed flow, the client's
    // own port otherwise: anything else means the port now belongs to another flow.
    let port = if e.flags & CT_SNAT != 0 {
        e.snat_port_be
    } else {
        key.src_port_be
    };
    if rk.dst_port_be != port {
        count(Counter::ReplyStale);
        return false;
    }
    let mut flags = e.flags | CT_SEEN_REPLY;
    if tcp_flags & TCP_FIN != 0 {
        flags |= CT_FIN_BACKEND;
    }
    if tcp_flags & TCP_RST != 0 {
        flags |= CT_RST;
    }
    if flags != e.flags {
        e.flags = flags;
    }
    if e.last_seen_ms != now {
        e.last_seen_ms = now;
    }
    true
}

/// Takes SNAT port `port_be` away from the flow that owns its reverse entry if that flow is
/// over (gone, expired, holding another port, or closed long enough ago; see
/// `ct_port_reusable`): a closed or expired owner's entry goes with the port, so a NAT
/// mapping is never half reused. `false` while the port is in use.
#[inline(always)]
pub fn take_over(owner_key: &FlowKey, port_be: u16, cfg: &Config, now: u32) -> bool {
    let Some((e, confirmed)) = find(owner_key) else {
        // Orphan: its owner was evicted or collected.
        return true;
    };
    // SAFETY: see `lookup`.
    let e = unsafe { &*e };
    if e.flags & CT_SNAT == 0 || e.snat_port_be != port_be {
        return true;
    }
    if !ct_port_reusable(cfg, e, confirmed, now) {
        return false;
    }
    remove(owner_key, confirmed);
    true
}
