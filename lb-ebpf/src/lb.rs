//! Backend choice: connection tracking first, the service's Maglev table on a miss.
use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use lb_common::*;

use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::maps::{AFFINITY, BACKENDS, CONFIG, CT, MAGLEV, REVNAT, count};

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

#[inline(always)]
fn flow_key(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src_addr_be: src,
        dst_addr_be: dst,
        src_port_be: sport,
        dst_port_be: dport,
        proto,
        _pad: [0; 3],
    }
}

/// Picks the backend for the client flow `ct_key` (client -> frontend) of service `svc`.
#[inline(always)]
pub fn choose(ct_key: &FlowKey, new_conn: bool, svc_id: u32, svc: &Service, path: Path) -> Choice {
    // SAFETY (map reads below): values are plain data; a concurrent agent update replaces hash
    // values wholesale, and a stale read only means the previous consistent state.
    if let Some(ct) = unsafe { CT.get(ct_key) } {
        // A SYN opens a new connection even when conntrack still holds an old one on the
        // same 5-tuple (client ports are reused): towards a draining backend it must be
        // balanced afresh, as the kernel's conntrack does for a SYN on a TIME_WAIT entry.
        // Towards a live backend the entry is kept, so a retransmitted SYN keeps its
        // backend and SNAT port.
        let live = unsafe { BACKENDS.get(ct.backend_id) }
            .filter(|be| !(new_conn && be.flags & BE_DRAINING != 0));
        if let Some(be) = live {
            count(Counter::CtHit);
            let snat_addr = if ct.flags & CT_SNAT != 0 {
                CONFIG.get(0).map(|c| c.snat_addr_be).unwrap_or(0)
            } else {
                0
            };
            return Choice::Go(Target {
                backend: *be,
                snat_port: ct.snat_port_be,
                snat_addr,
                new_flow: false,
            });
        }
        // The backend is gone for good (not just out of the Maglev table): re-balance.
        count(Counter::CtRebalance);
    } else {
        count(Counter::CtMiss);
    }
    if svc.backend_count == 0 || svc.table_m == 0 {
        if svc.flags & SVC_DROP_IF_EMPTY != 0 {
            count(Counter::DropNoLocal);
            return Choice::Drop;
        }
        return Choice::Reject;
    }
    let hash = flow_hash(ct_key);
    let Some((backend_id, be)) = pick(svc_id, svc, ct_key.src_addr_be, hash) else {
        return Choice::Drop;
    };
    let frontend_rev = RevNat {
        src_addr_be: ct_key.dst_addr_be,
        dst_addr_be: ct_key.src_addr_be,
        src_port_be: ct_key.dst_port_be,
        dst_port_be: ct_key.src_port_be,
        flags: if path.from_pod { REV_TO_LOCAL_POD } else { 0 },
    };
    let mut target = Target {
        backend: be,
        snat_port: 0,
        snat_addr: 0,
        new_flow: true,
    };
    let mut flags = 0u16;
    let hairpin = path.from_pod && be.addr_be == ct_key.src_addr_be;
    if hairpin {
        count(Counter::Hairpin);
    }
    let snat = hairpin || (path.snat_remote && be.flags & BE_LOCAL == 0);
    if !snat {
        // The backend answers the client directly; the reply is found by its own tuple (tc
        // hook of a local backend, or the uplink for a ClusterIP backend elsewhere).
        let rk = flow_key(
            be.addr_be,
            ct_key.src_addr_be,
            be.port_be,
            ct_key.src_port_be,
            ct_key.proto,
        );
        if REVNAT.insert(&rk, &frontend_rev, BPF_ANY as u64).is_err() {
            return Choice::Drop;
        }
    } else {
        let Some(cfg) = CONFIG.get(0) else {
            return Choice::Drop;
        };
        let Some(port) = alloc_snat_port(cfg, &be, ct_key.proto, hash, &frontend_rev) else {
            count(Counter::SnatExhausted);
            return Choice::Drop;
        };
        target.snat_port = port;
        target.snat_addr = cfg.snat_addr_be;
        flags |= CT_SNAT;
    }
    let entry = CtEntry {
        backend_id,
        svc_id,
        snat_port_be: target.snat_port,
        flags,
    };
    if CT.insert(ct_key, &entry, BPF_ANY as u64).is_err() {
        return Choice::Drop;
    }
    Choice::Go(target)
}

/// The backend for a new connection: the client's affinity entry while it is fresh (and
/// refreshed by this connection), else the Maglev slot for `hash`.
#[inline(always)]
pub fn pick(svc_id: u32, svc: &Service, client_be: u32, hash: u32) -> Option<(u32, Backend)> {
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
    let backend_id = *MAGLEV.get(slot)?;
    let be = *unsafe { BACKENDS.get(backend_id) }?;
    if svc.affinity_timeout != 0 {
        let a = Affinity {
            backend_id,
            _pad: 0,
            last_ns: now,
        };
        let _ = AFFINITY.insert(&key, &a, BPF_ANY as u64);
    }
    Some((backend_id, be))
}

/// Claims a free SNAT port towards `be` by inserting the reply tuple with NOEXIST: the map
/// itself arbitrates between CPUs racing for the same port.
#[inline(always)]
fn alloc_snat_port(cfg: &Config, be: &Backend, proto: u8, hash: u32, rev: &RevNat) -> Option<u16> {
    let min = cfg.snat_port_min as u32;
    let max = cfg.snat_port_max as u32;
    if max < min {
        return None;
    }
    let range = max - min + 1;
    let mut i = 0u32;
    while i < SNAT_PROBES {
        let port = (min + (hash.wrapping_add(i.wrapping_mul(0x9e37_79b9)) % range)) as u16;
        let rk = flow_key(
            be.addr_be,
            cfg.snat_addr_be,
            be.port_be,
            port.to_be(),
            proto,
        );
        if REVNAT.insert(&rk, rev, BPF_NOEXIST as u64).is_ok() {
            return Some(port.to_be());
        }
        i += 1;
    }
    None
}

/// Reply lookup: the 5-tuple as it arrives from a backend.
#[inline(always)]
pub fn reply_key(src: u32, dst: u32, sport: u16, dport: u16, proto: u8) -> FlowKey {
    flow_key(src, dst, sport, dport, proto)
}
