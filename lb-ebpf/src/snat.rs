//! Reverse-NAT entries and SNAT ports: created with their flow, checked on every packet,
//! given back when the flow is over.
//!
//! A SNAT port towards a backend is owned by whoever holds the reverse entry keyed by
//! (backend, SNAT address, backend port, SNAT port). A new flow claims a port with a
//! NOEXIST insert (the map arbitrates between CPUs), or takes over the port of a flow that
//! is over (closed, expired or gone); a live flow whose reverse entry vanished (LRU
//! eviction) writes it again, or moves to a new port if another flow has it meanwhile, so
//! two clients never share one (node, port) towards a backend.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_loop},
};
use lb_common::*;

use crate::{
    ct,
    maps::{CONFIG, REVNAT, count},
};

/// The reply key of a flow that is not source-NATed: backend -> client.
#[inline(always)]
pub fn direct_key(be: &Backend, ct_key: &FlowKey) -> FlowKey {
    FlowKey::new(
        be.addr_be,
        ct_key.src_addr_be,
        be.port_be,
        ct_key.src_port_be,
        ct_key.proto,
    )
}

/// The reply key of a source-NATed flow: backend -> SNAT address:port.
#[inline(always)]
fn snat_key(cfg: &Config, be: &Backend, port_be: u16, proto: u8) -> FlowKey {
    FlowKey::new(be.addr_be, cfg.snat_addr_be, be.port_be, port_be, proto)
}

/// The reverse entry of a flow that is not source-NATed is there (written again if an
/// eviction took it). `false` only if the map refuses the write.
#[inline(always)]
pub fn keep_direct(be: &Backend, ct_key: &FlowKey, rev: &RevNat) -> bool {
    let rk = direct_key(be, ct_key);
    // SAFETY: plain-data map value.
    if unsafe { REVNAT.get(&rk) }.is_some() {
        return true;
    }
    count(Counter::RevnatRecreated);
    REVNAT.insert(&rk, rev, BPF_ANY as u64).is_ok()
}

/// Writes the reverse entry of a new flow that is not source-NATed. The entry's key
/// (backend -> client address and port) may already belong to another flow through another
/// frontend of the same backend: while that flow is live and not closing it keeps its entry
/// and the new flow is refused (dropped, counted) — a packet with a guessed or spoofed client
/// tuple must not redirect a live flow's replies; a leftover of a flow that is over (or
/// closing: its client may reuse the port towards another address at once) is replaced.
#[inline(always)]
pub fn claim_direct(cfg: &Config, be: &Backend, ct_key: &FlowKey, rev: &RevNat, now: u32) -> bool {
    let rk = direct_key(be, ct_key);
    // SAFETY: plain-data map value.
    if let Some(r) = unsafe { REVNAT.get(&rk) }
        && (r.src_addr_be != rev.src_addr_be || r.src_port_be != rev.src_port_be)
    {
        // The other flow's client -> frontend key.
        let other = FlowKey::new(
            r.dst_addr_be,
            r.src_addr_be,
            r.dst_port_be,
            r.src_port_be,
            ct_key.proto,
        );
        // Live and not closing: a closed flow (FIN both ways, or RST) is over for this
        // purpose — its client may reuse the port towards another address at once.
        if let Some(live) = ct::lookup(&other, cfg, now)
            // SAFETY: map value pointer, valid while the program runs (RCU).
            && !ct_closed(unsafe { &*live.entry })
        {
            count(Counter::DropTupleInUse);
            return false;
        }
    }
    REVNAT.insert(&rk, rev, BPF_ANY as u64).is_ok()
}

/// The SNAT port a live source-NATed flow keeps using: its own while its reverse entry
/// still names this client, else (vanished and taken) a fresh one.
#[inline(always)]
pub fn keep(
    cfg: &Config,
    be: &Backend,
    ct_key: &FlowKey,
    e: &CtEntry,
    rev: &RevNat,
    now: u32,
) -> Option<u16> {
    let rk = snat_key(cfg, be, e.snat_port_be, ct_key.proto);
    // SAFETY: plain-data map value.
    match unsafe { REVNAT.get(&rk) } {
        Some(r)
            if r.dst_addr_be == rev.dst_addr_be
                && r.dst_port_be == rev.dst_port_be
                && r.src_addr_be == rev.src_addr_be
                && r.src_port_be == rev.src_port_be =>
        {
            return Some(e.snat_port_be);
        }
        Some(_) => {}
        None => {
            if REVNAT.insert(&rk, rev, BPF_NOEXIST as u64).is_ok() {
                count(Counter::RevnatRecreated);
                return Some(e.snat_port_be);
            }
        }
    }
    count(Counter::SnatReassigned);
    alloc(cfg, be, ct_key.proto, flow_hash(ct_key), rev, now)
}

/// Claims a SNAT port towards `be` for a new flow whose reverse entry is `rev`: random
/// probes over the range. A port no flow holds is claimed at once (NOEXIST insert). Only if
/// every probe is held is a port whose flow is over taken over: a backend that closed first
/// keeps a TIME_WAIT for (node, port) for a minute, and a SYN landing on it may be refused
/// (PAWS) and stall a second, so rested ports come first.
#[inline(always)]
pub fn alloc(
    cfg: &Config,
    be: &Backend,
    proto: u8,
    hash: u32,
    rev: &RevNat,
    now: u32,
) -> Option<u16> {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if max < min {
        return None;
    }
    let range = max - min + 1;
    // Random start: two flows with the same hash (or a flood with a pattern) do not walk
    // the same sequence of ports.
    // SAFETY: helper without arguments.
    let start = hash ^ unsafe { bpf_get_prandom_u32() };
    // First a port no flow holds.
    let mut i = 0u32;
    while i < SNAT_PROBES {
        let port_be = port_at(start, min, range, i);
        if REVNAT
            .insert(&snat_key(cfg, be, port_be, proto), rev, BPF_NOEXIST as u64)
            .is_ok()
        {
            count(if i == 0 {
                Counter::SnatFirst
            } else {
                Counter::SnatRetry
            });
            return Some(port_be);
        }
        i += 1;
    }
    // Then, over the same probes, a port whose flow is over: in a `bpf_loop` callback,
    // which the verifier walks until its states converge (twice or so) instead of once per
    // probe. Unrolled, this pass (three conntrack lookups and the expiry rules per probe)
    // was 60% of the instructions the verifier walked for each program, verified anew at
    // every agent start.
    let mut probe = TakeOverProbe {
        rev: *rev,
        be_addr_be: be.addr_be,
        be_port_be: be.port_be,
        proto,
        found: 0,
        start,
        min,
        range,
        now,
        port_be: 0,
    };
    // SAFETY: `take_over_probe` is the callback bpf_loop expects, `probe` lives on this
    // stack frame for the whole call.
    unsafe {
        bpf_loop(
            SNAT_PROBES,
            take_over_probe as *mut c_void,
            (&mut probe as *mut TakeOverProbe).cast(),
            0,
        )
    };
    if probe.found != 0 {
        count(Counter::SnatReuse);
        return Some(probe.port_be);
    }
    None
}

/// The SNAT port `i` of a new flow's probe sequence (`start` random, `range` ports from
/// `min`).
#[inline(always)]
fn port_at(start: u32, min: u32, range: u32, i: u32) -> u16 {
    // `checked_rem`: the callback cannot know that `range` is not 0, and a panic path is
    // code the verifier refuses.
    let off = start
        .wrapping_add(i.wrapping_mul(0x9e37_79b9))
        .checked_rem(range)
        .unwrap_or(0);
    ((min + off) as u16).to_be()
}

/// The take-over pass of [`alloc`], as data for its `bpf_loop` callback (on the caller's
/// stack: scalars only, the callback looks the config up itself).
#[repr(C)]
struct TakeOverProbe {
    rev: RevNat,
    be_addr_be: u32,
    be_port_be: u16,
    proto: u8,
    /// Out: 1 when `port_be` was taken over.
    found: u8,
    start: u32,
    min: u32,
    range: u32,
    now: u32,
    port_be: u16,
}

/// One probe of the take-over pass: takes port `i` of the sequence if its flow is over.
/// 1 stops the loop (taken), 0 goes on.
extern "C" fn take_over_probe(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop hands over the `TakeOverProbe` `alloc` passed.
    let p = unsafe { &mut *ctx.cast::<TakeOverProbe>() };
    let Some(cfg) = CONFIG.get(0) else {
        return 1;
    };
    let port_be = port_at(p.start, p.min, p.range, i as u32);
    let rk = FlowKey::new(
        p.be_addr_be,
        cfg.snat_addr_be,
        p.be_port_be,
        port_be,
        p.proto,
    );
    // SAFETY: plain-data map value, copied out.
    let Some(old) = (unsafe { REVNAT.get(&rk) }) else {
        return 0;
    };
    let owner = old.ct_key(p.proto);
    if ct::take_over(&owner, port_be, cfg, p.now)
        && REVNAT.insert(&rk, &p.rev, BPF_ANY as u64).is_ok()
    {
        p.port_be = port_be;
        p.found = 1;
        return 1;
    }
    0
}
