//! Fragments of translated datagrams. Only a datagram's first fragment carries the ports
//! that conntrack, reverse NAT and frontends are keyed by; the later ones are recognised by
//! what all fragments share (addresses, IP id, protocol; RFC 791) and get the first
//! fragment's ports, so every fragment takes the same decision and the same translation —
//! Cilium's approach. Nothing is reassembled: the receiver does that, as it would without
//! us. A later fragment that arrives before its first one (reordered) is not ours to
//! translate and goes to the kernel, as all fragments did before; senders emit fragments in
//! order, so this is rare.
//!
//! Only tc translates fragments (XDP hands them on): they are rare, and tc sees every
//! fragment whatever the uplink's XDP mode.
use aya_ebpf::bindings::BPF_ANY;
use lb_common::FragPorts;

use crate::{
    maps::FRAGS,
    parse::{FRAG_FIRST, FRAG_LATER, Tuple},
};

/// Gives a later fragment its datagram's ports. `false`: its first fragment was not
/// translated here (not ours, or not seen yet).
#[inline(always)]
pub fn fill_ports(t: &mut Tuple) -> bool {
    if t.frag != FRAG_LATER {
        return true;
    }
    // SAFETY: plain-data map value.
    let Some(p) = (unsafe { FRAGS.get(&t.frag_key()) }) else {
        return false;
    };
    t.sport = p.src_port_be;
    t.dport = p.dst_port_be;
    true
}

/// A first fragment is being translated: its later fragments will follow it. An entry of
/// an earlier datagram with the same identification is replaced.
#[inline(always)]
pub fn remember(t: &Tuple) {
    if t.frag == FRAG_FIRST {
        let ports = FragPorts {
            src_port_be: t.sport,
            dst_port_be: t.dport,
        };
        let _ = FRAGS.insert(&t.frag_key(), &ports, BPF_ANY as u64);
    }
}
