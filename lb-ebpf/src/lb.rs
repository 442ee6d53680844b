//! Backend choice: connection tracking first, the service's Maglev table on a miss.
use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns};
use lb_common::*;

use crate::{
    ct,
    maps::{AFFINITY, BACKENDS, CONFIG, CT, CT_NEW, MAGLEV, count},
    snat,
};

/// log2 of the period (ms) at which an established flow's reverse entry is checked.
const REV_CHECK_SHIFT: u32 = 6;

/// Where a flow goes, resolved for this packet.
pub struct Target {
    pub backend: Backend,
    /// SNAT source port (network order); 0 when the flow is not source-NATed.
    pub snat_port: u16,
    pub snat_addr: u32,
    pub new_flow: bool,
}

pub enum Choice {
    Go(Target),
    /// The service has no serving backend: reject, as kube-proxy does.
    Reject,
    /// No SNAT port, no local backend under a Local policy, or inconsistent maps: drop
    /// rather than mis-deliver.
    Drop,
}

/// How a new flow is translated, by where it entered and what it was addressed to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Path {
    /// Backends on other nodes are reached through SNAT to this node, so the reply comes
    /// back here (NodePort and external IPs, as kube-proxy masquerades them). ClusterIP
    /// traffic keeps the pod's address: the backend sees the real client.
    pub snat_remote: bool,
    /// The client is a pod on this node (the flow was seen by the tc hook). Its replies must
    /// be delivered into the pod's interface, which only tc can do from the uplink; and a
    /// pod reaching itself (hairpin) is source-NATed, or its reply would never leave it.
    pub from_pod: bool,
}

impl Path {
    pub const NORTH_SOUTH: Path = Path {
        snat_remote: true,
        from_pod: false,
    };
}

/// Picks the backend for the client flow `ct_key` (client -> frontend) of service `svc`.
/// `tcp_flags`: the segment's flags (0 for UDP).
#[inline(always)]
pub fn choose(ct_key: &FlowKey, tcp_flags: u8, svc_id: u32, svc: &Service, path: Path) -> Choice {
    let Some(cfg) = CONFIG.get(0) else {
        return Choice::Drop;
    };
    let now = ct::now_ms();
    let opens = ct_key.proto != PROTO_TCP || ct::opens(tcp_flags);
    let frontend_rev = RevNat {
        src_addr_be: ct_key.dst_addr_be,
        dst_addr_be: ct_key.src_addr_be,
        src_port_be: ct_key.dst_port_be,
        dst_port_be: ct_key.src_port_be,
        flags: if path.from_pod { REV_TO_LOCAL_POD } else { 0 },
    };
    let syn = ct_key.proto == PROTO_TCP && ct::opens(tcp_flags);
    // SAFETY (map reads below): values are plain data; a concurrent agent update replaces hash
    // values wholesale, and a stale read only means the previous consistent state.
    if let Some(live) = ct::lookup(ct_key, cfg, now) {
        let e = unsafe { *live.entry };
        // A SYN opens a new connection even when conntrack still holds an old one on the
        // same 5-tuple (client ports are reused): after the old one closed, or towards a
        // draining backend, it is balanced afresh, as the kernel's conntrack does for a SYN
        // on a TIME_WAIT entry. Otherwise the entry is kept, so a retransmitted SYN keeps
        // its backend and SNAT port.
        let be = unsafe { BACKENDS.get(e.backend_id) }
            .filter(|be| !(syn && (be.flags & BE_DRAINING != 0 || ct_closed(&e))));
        if let Some(be) = be {
            let be = *be;
            let mut target = Target {
                backend: be,
                snat_port: 0,
                snat_addr: 0,
                new_flow: false,
            };
            // The reverse entry is checked once per 64 ms window of the flow (the first
            // packet after a window boundary), not per packet: it only goes missing through
            // an LRU eviction, which this repairs within 64 ms, and a hash lookup per packet
            // was a measurable part of the forwarding cost (`xlb-bench --only pps`).
            let check = syn || (e.last_seen_ms >> REV_CHECK_SHIFT) != (now >> REV_CHECK_SHIFT);
            if e.flags & CT_SNAT != 0 {
                let port = if check {
                    let Some(port) = snat::keep(cfg, &be, ct_key, &e, &frontend_rev, now) else {
                        count(Counter::SnatExhausted);
                        return Choice::Drop;
                    };
                    // SAFETY: see `ct::lookup`.
                    unsafe { (*live.entry).snat_port_be = port };
                    port
                } else {
                    e.snat_port_be
                };
                target.snat_port = port;
                target.snat_addr = cfg.snat_addr_be;
            } else if check && !snat::keep_direct(&be, ct_key, &frontend_rev) {
                return Choice::Drop;
            }
            count(Counter::CtHit);
            ct::seen_forward(ct_key, &live, tcp_flags, now);
            return Choice::Go(target);
        }
        // The backend is gone for good (not just out of the Maglev table), or a new
        // connection reuses the tuple: re-balance.
        count(Counter::CtRebalance);
        ct::remove(ct_key, live.confirmed);
    } else {
        count(Counter::CtMiss);
    }
    if let Some(refused) = no_backend(svc) {
        return refused;
    }
    let hash = flow_hash(ct_key);
    let rst = ct_key.proto == PROTO_TCP && tcp_flags & ct::TCP_RST != 0;
    // A RST never creates state (it ends a flow we do not know): a local backend gets it
    // as it is, a remote one cannot (its flow was keyed by a SNAT port we no longer have).
    let Some((backend_id, be)) = pick(svc_id, svc, ct_key.src_addr_be, hash, !rst) else {
        return Choice::Drop;
    };
    let mut target = Target {
        backend: be,
        snat_port: 0,
        snat_addr: 0,
        new_flow: true,
    };
    let mut flags = 0u8;
    let hairpin = path.from_pod && be.addr_be == ct_key.src_addr_be;
    let snat = hairpin || (path.snat_remote && be.flags & BE_LOCAL == 0);
    if rst {
        count(Counter::RstNoState);
        if snat {
            return Choice::Drop;
        }
        target.new_flow = false;
        return Choice::Go(target);
    }
    if hairpin {
        count(Counter::Hairpin);
    }
    if !snat {
        // The backend answers the client directly; the reply is found by its own tuple (tc
        // hook of a local backend, or the uplink for a ClusterIP backend elsewhere).
        if !snat::claim_direct(cfg, &be, ct_key, &frontend_rev, now) {
            return Choice::Drop;
        }
    } else {
        let Some(port) = snat::alloc(cfg, &be, ct_key.proto, hash, &frontend_rev, now) else {
            count(Counter::SnatExhausted);
            return Choice::Drop;
        };
        target.snat_port = port;
        target.snat_addr = cfg.snat_addr_be;
        flags |= CT_SNAT;
    }
    if !opens {
        // Mid-stream: maybe a flow another node started. Forwarded, but it holds its state
        // only briefly unless both directions confirm it.
        flags |= CT_MIDSTREAM;
    }
    let entry = CtEntry {
        backend_id,
        svc_id,
        snat_port_be: target.snat_port,
        flags,
        proto: ct_key.proto,
        last_seen_ms: now,
    };
    if CT_NEW.insert(ct_key, &entry, BPF_ANY as u64).is_err() {
        return Choice::Drop;
    }
    // A flow confirmed under this tuple before (now re-balanced) must not shadow this one.
    let _ = CT.remove(ct_key);
    Choice::Go(target)
}

/// A new flow to a service without a serving backend is refused: rejected, as kube-proxy
/// does, or dropped under the Local traffic policies (`SVC_DROP_IF_EMPTY`: no local
/// endpoint means drop). `None` while the service has a backend. Used by the packet paths
/// (`choose`) and the socket hooks alike.
#[inline(always)]
pub fn no_backend(svc: &Service) -> Option<Choice> {
    if svc.backend_count != 0 && svc.table_m != 0 {
        return None;
    }
    if svc.flags & SVC_DROP_IF_EMPTY != 0 {
        count(Counter::DropNoLocal);
        return Some(Choice::Drop);
    }
    Some(Choice::Reject)
}

/// The backend for a new connection: the client's affinity entry while it is fresh (and
/// refreshed by this connection), else the Maglev slot for `hash`.
#[inline(always)]
pub fn pick(
    svc_id: u32,
    svc: &Service,
    client_be: u32,
    hash: u32,
    remember: bool,
) -> Option<(u32, Backend)> {
    let key = AffinityKey {
        svc_id,
        client_addr_be: client_be,
    };
    let now = if svc.affinity_timeout != 0 {
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: plain-data map value, updated in place only for its timestamp.
        if let Some(a) = AFFINITY.get_ptr_mut(&key)
            && now.wrapping_sub(unsafe { (*a).last_ns })
                < svc.affinity_timeout as u64 * 1_000_000_000
            && let Some(be) = unsafe { BACKENDS.get(&(*a).backend_id) }
            && be.flags & BE_DRAINING == 0
        {
            unsafe { (*a).last_ns = now };
            count(Counter::AffinityHit);
            return Some((unsafe { (*a).backend_id }, *be));
        }
        now
    } else {
        0
    };
    // checked_rem: a division by zero would be a panic path, which the verifier rejects.
    let slot = svc.table_off.wrapping_add(hash.checked_rem(svc.table_m)?);
    // Two slots per element (see `lb_common::MAGLEV_SLOTS_PER_ENTRY`); bpfel: slot 2k is
    // the low half of element k.
    let pair = *MAGLEV.get(slot >> 1)?;
    let backend_id = if slot & 1 == 0 {
        pair as u32
    } else {
        (pair >> 32) as u32
    };
    let be = *unsafe { BACKENDS.get(backend_id) }?;
    if svc.affinity_timeout != 0 && remember {
        let a = Affinity {
            backend_id,
            _pad: 0,
            last_ns: now,
        };
        let _ = AFFINITY.insert(&key, &a, BPF_ANY as u64);
    }
    Some((backend_id, be))
}
