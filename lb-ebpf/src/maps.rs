//! Map definitions. Types and names come from lb-common; every map is pinned by name so the
//! agent can reopen them (status, restarts) from its pin directory.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::*;

/// The agent writes Maglev tables through a memory mapping (uapi BPF_F_MMAPABLE).
const BPF_F_MMAPABLE: u32 = 1 << 10;

#[map(name = "XLB_FRONTENDS")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::pinned(DEFAULT_MAX_FRONTENDS, 0);

/// Hash, not array: a hash update swaps the whole value atomically, which is what makes the
/// Maglev table flip safe (see `lb_common::Service`).
#[map(name = "XLB_SERVICES")]
pub static SERVICES: HashMap<u32, Service> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "XLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "XLB_MAGLEV")]
pub static MAGLEV: Array<u64> = Array::pinned(maglev_entries(DEFAULT_MAGLEV_ARENA), BPF_F_MMAPABLE);

/// Confirmed flows (see ct.rs).
#[map(name = "XLB_CT")]
pub static CT: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(DEFAULT_CT_ENTRIES, 0);

/// Flows not yet confirmed by both directions (see ct.rs).
#[map(name = "XLB_CT_NEW")]
pub static CT_NEW: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(DEFAULT_CT_NEW_ENTRIES, 0);

/// One reverse entry per flow of either conntrack map.
#[map(name = "XLB_REVNAT")]
pub static REVNAT: LruHashMap<FlowKey, RevNat> =
    LruHashMap::pinned(DEFAULT_CT_ENTRIES + DEFAULT_CT_NEW_ENTRIES, 0);

#[map(name = "XLB_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

#[map(name = "XLB_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

#[map(name = "XLB_SVC_STATS")]
pub static SVC_STATS: PerCpuArray<SvcStats> = PerCpuArray::pinned(DEFAULT_MAX_SERVICES, 0);

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *p += 1 };
    }
}

/// What became of a packet (or, in the socket hooks, a connect/sendmsg) addressed to a
/// service port, for its `XLB_SVC_STATS` entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent to a backend; `new_flow`: it started a flow.
    Forward { new_flow: bool },
    /// Refused (RST, ICMP port unreachable, ECONNREFUSED): the service has no serving
    /// backend.
    Reject,
}

/// The one place per-service statistics are kept, the same for XDP, tc and the socket
/// hooks: `packets` and `bytes` on every forward and reject, `new_flows` on a new flow,
/// `rejects` on a reject. Drops are not recorded here (their global counters tell why).
/// `bytes`: the frame's length (0 in the socket hooks, which see no packet).
#[inline(always)]
pub fn record(svc_id: u32, bytes: u64, outcome: Outcome) {
    let Some(p) = SVC_STATS.get_ptr_mut(svc_id) else {
        return;
    };
    // SAFETY: per-CPU slot, see `count`.
    let s = unsafe { &mut *p };
    s.packets += 1;
    s.bytes += bytes;
    match outcome {
        Outcome::Forward { new_flow } => {
            if new_flow {
                s.new_flows += 1;
            }
        }
        Outcome::Reject => s.rejects += 1,
    }
}

/// Names for `lb-agent status`; never read by the programs.
#[map(name = "XLB_SVC_META")]
pub static SVC_META: Array<SvcMeta> = Array::pinned(DEFAULT_MAX_SERVICES, 0);

/// ClusterIP addresses (value unused): a packet to one of them on a port no service uses is
/// rejected rather than routed towards a default route.
#[map(name = "XLB_CLUSTER_IPS")]
pub static CLUSTER_IPS: HashMap<u32, u32> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

/// Socket-level translations of the node's own sockets (see sock.rs).
#[map(name = "XLB_SOCK_REVNAT")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRev> = LruHashMap::pinned(DEFAULT_CT_ENTRIES, 0);

#[map(name = "XLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> = LruHashMap::pinned(DEFAULT_CT_ENTRIES, 0);

/// loadBalancerSourceRanges per service port. (aya adds the BPF_F_NO_PREALLOC LPM tries need.)
#[map(name = "XLB_SRC_RANGES")]
pub static SRC_RANGES: LpmTrie<SrcRangeKey, u8> = LpmTrie::pinned(DEFAULT_MAX_FRONTENDS, 0);

/// The service CIDRs (key: network-order address; value unused): an address inside them
/// that no frontend holds is dropped.
/// LoadBalancer addresses this node announces (key: network-order address; value unused):
/// ARP requests for them are answered by XDP (arp.rs) while `Config::announcing`.
#[map(name = "XLB_ARP")]
pub static ARP: HashMap<u32, u32> = HashMap::pinned(MAX_ANNOUNCED, 0);

/// `[0]`: the announcer's lease (see `lb_common::ANNOUNCE_LEASE_MS`).
#[map(name = "XLB_ANNOUNCE_LEASE")]
pub static ANNOUNCE_LEASE: Array<u32> = Array::pinned(1, 0);

#[map(name = "XLB_SERVICE_CIDRS")]
pub static SERVICE_CIDRS: LpmTrie<u32, u8> = LpmTrie::pinned(MAX_SERVICE_CIDRS, 0);

/// The ports of translated datagrams' first fragments, for their later fragments (frag.rs).
#[map(name = "XLB_FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(MAX_FRAGS, 0);

/// Each CPU's budget for rejects (see `lb_common::REJECTS_PER_SEC`).
#[map(name = "XLB_REJECT_BUDGET")]
pub static REJECT_BUDGET: PerCpuArray<RejectBudget> = PerCpuArray::pinned(1, 0);

/// Whether a reject (RST, ICMP error) may be sent to `src_be`: an address that can be
/// answered (RFC 1122, `reject::answerable`), within this CPU's budget. Counts why not.
#[inline(always)]
pub fn may_answer(src_be: u32) -> bool {
    if !crate::reject::answerable(src_be) {
        count(Counter::RejectSuppressed);
        return false;
    }
    let Some(b) = REJECT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, only this CPU touches it while the program runs.
    if unsafe { (*b).take(crate::ct::now_ms()) } {
        return true;
    }
    count(Counter::RejectRateLimited);
    false
}
