//! Map keys, values and names, defined once for both sides.
//!
//! Layout rules: every struct is `#[repr(C)]` with explicit padding so the kernel sees no
//! uninitialised bytes in hash keys; sizes are pinned by the tests at the bottom.

/// Pinned map names (the pin directory holds one file per map).
pub const MAP_FRONTENDS: &str = "XLB_FRONTENDS";
pub const MAP_SERVICES: &str = "XLB_SERVICES";
pub const MAP_BACKENDS: &str = "XLB_BACKENDS";
pub const MAP_MAGLEV: &str = "XLB_MAGLEV";
pub const MAP_CT: &str = "XLB_CT";
pub const MAP_REVNAT: &str = "XLB_REVNAT";
pub const MAP_CONFIG: &str = "XLB_CONFIG";
pub const MAP_COUNTERS: &str = "XLB_COUNTERS";
pub const MAP_SVC_STATS: &str = "XLB_SVC_STATS";
pub const MAP_SVC_META: &str = "XLB_SVC_META";
pub const MAP_CLUSTER_IPS: &str = "XLB_CLUSTER_IPS";
pub const MAP_SOCK_REVNAT: &str = "XLB_SOCK_REVNAT";
pub const MAP_AFFINITY: &str = "XLB_AFFINITY";
pub const MAP_SRC_RANGES: &str = "XLB_SRC_RANGES";

/// Program names in the eBPF object.
pub const PROG_XDP: &str = "xlb_xdp";
pub const PROG_TC_POD: &str = "xlb_tc_pod";
pub const PROG_TC_UPLINK: &str = "xlb_tc_uplink";
pub const PROG_XDP_PASS: &str = "xlb_xdp_pass";
pub const PROG_SOCK_CONNECT4: &str = "xlb_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "xlb_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "xlb_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "xlb_getpeername4";

/// Compile-time map sizes; the agent may raise the first three at load time.
pub const DEFAULT_MAX_SERVICES: u32 = 16_384;
pub const DEFAULT_MAX_FRONTENDS: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
/// Maglev arena: one array holding every service's two tables (see `Service`).
/// 4 Mi slots = 16 MiB, enough for ~2,000 services at M = 1021 double-buffered.
pub const DEFAULT_MAGLEV_ARENA: u32 = 1 << 22;
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;

/// Source ports used for SNAT towards backends on other nodes. Above Linux's default
/// `ip_local_port_range` (32768-60999) and the NodePort range, so they never collide with
/// sockets of the node itself.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 61_000;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 65_535;
/// How many SNAT ports the datapath probes for a new flow before giving up.
pub const SNAT_PROBES: u32 = 8;

/// Frontend: what a packet is addressed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The frontend is a NodePort on one of the node's addresses.
pub const FE_NODEPORT: u32 = 1 << 0;
/// The frontend is a LoadBalancer ingress IP or an external IP.
pub const FE_EXTERNAL: u32 = 1 << 1;
/// The frontend is a ClusterIP (tc path; XDP passes it on).
pub const FE_CLUSTER_IP: u32 = 1 << 2;
/// A NodePort on 127.0.0.1, reachable only from the node's own sockets (socket hooks).
pub const FE_LOCALHOST: u32 = 1 << 3;
/// Only sources in the service's `loadBalancerSourceRanges` (`XLB_SRC_RANGES`) may use it.
pub const FE_SOURCE_RANGES: u32 = 1 << 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Index of the service port in `XLB_SERVICES` and `XLB_SVC_STATS`.
    pub svc_id: u32,
    pub flags: u32,
}

/// One service port: its Maglev table lives at `XLB_MAGLEV[table_off .. table_off + table_m]`.
///
/// The agent keeps two tables per service and writes the inactive one, then replaces this
/// hash-map value (the kernel swaps hash values atomically), so a packet sees either the old
/// or the new table, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    pub table_off: u32,
    /// Prime table size M (0 when the service has no serving backend).
    pub table_m: u32,
    /// Backends in the table; 0 means "reject new connections".
    pub backend_count: u32,
    pub flags: u32,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 = no affinity.
    pub affinity_timeout: u32,
}

/// The service drops new flows when it has no backend instead of rejecting them (the
/// "Local" traffic policies: no local endpoint means drop, as kube-proxy does).
pub const SVC_DROP_IF_EMPTY: u32 = 1 << 0;

/// Backend on this node: packets are delivered through the node's own forwarding, and the
/// pod's replies are translated back by the tc program on the pod's interface.
pub const BE_LOCAL: u8 = 1 << 0;
/// Still resolvable for established flows but out of every Maglev table (terminating, not
/// ready, or removed and within its drain period): session affinity must not pick it.
pub const BE_DRAINING: u8 = 1 << 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub flags: u8,
    pub _pad: u8,
}

/// A unidirectional 5-tuple, as read from a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The flow was source-NATed (backend on another node).
pub const CT_SNAT: u16 = 1 << 0;

/// Connection-tracking entry, keyed by the client's original 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub backend_id: u32,
    pub svc_id: u32,
    /// SNAT source port (network order) when `CT_SNAT` is set.
    pub snat_port_be: u16,
    pub flags: u16,
}

/// Reverse translation for replies, keyed by the reply's 5-tuple as it arrives
/// (source = backend, destination = client or the node's SNAT address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// New source: the frontend address and port the client used.
    pub src_addr_be: u32,
    /// New destination: the client.
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub flags: u32,
}

/// The client is a pod on this node (ClusterIP flow): a reply translated at the uplink is
/// handed to the kernel, which routes it to the pod's interface.
pub const REV_TO_LOCAL_POD: u32 = 1 << 0;

/// Session affinity: which backend a client IP was last sent to for a service port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client_addr_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last new connection that used it.
    pub last_ns: u64,
}

/// `XLB_SRC_RANGES` LPM key data: service port id (big-endian, so it forms the leading 32
/// bits of every prefix) followed by the source address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SrcRangeKey {
    pub svc_id_be: u32,
    pub addr_be: u32,
}

/// Socket-level translation (host-originated traffic), keyed by socket and backend, so that
/// `recvmsg`/`getpeername` can show the service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRev {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// `XLB_CONFIG[0]`: per-node settings written by the agent before it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Node address used as the source of SNATed flows (network order).
    pub snat_addr_be: u32,
    /// Inclusive SNAT port range, host order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
}

/// Per-service-port counters (`XLB_SVC_STATS[svc_id]`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rejects: u64,
}

/// `XLB_SVC_META[svc_id]`: the service port's name, written by the agent and read only by
/// `lb-agent status`, so that what is programmed can be shown from the pins alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvcMeta {
    /// `namespace/name:port-name`, NUL-padded UTF-8.
    pub name: [u8; 124],
    /// Service type code: see `SVC_TYPE_*`.
    pub svc_type: u32,
}

impl Default for SvcMeta {
    fn default() -> Self {
        Self {
            name: [0; 124],
            svc_type: 0,
        }
    }
}

pub const SVC_TYPE_CLUSTER_IP: u32 = 0;
pub const SVC_TYPE_NODE_PORT: u32 = 1;
pub const SVC_TYPE_LOAD_BALANCER: u32 = 2;

/// Global counters: index into the per-CPU array `XLB_COUNTERS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Packets = 0,
    PassNotIpv4,
    PassFragment,
    PassIpOptions,
    PassNotTcpUdp,
    PassNoMatch,
    Truncated,
    FwdLocal,
    FwdRemote,
    Reply,
    RejectRst,
    RejectIcmp,
    CtHit,
    CtMiss,
    CtRebalance,
    SnatExhausted,
    FibFail,
    TcReply,
    TcPass,
    TcClusterIp,
    RejectUnknownPort,
    DropNoLocal,
    SockLb,
    SockReject,
    Hairpin,
    PassToTc,
    DropSourceRange,
    AffinityHit,
    NeighResolve,
}

pub const COUNTER_NAMES: [&str; 29] = [
    "packets",
    "pass_not_ipv4",
    "pass_fragment",
    "pass_ip_options",
    "pass_not_tcp_udp",
    "pass_no_match",
    "truncated",
    "fwd_local",
    "fwd_remote",
    "reply",
    "reject_rst",
    "reject_icmp",
    "ct_hit",
    "ct_miss",
    "ct_rebalance",
    "snat_exhausted",
    "fib_fail",
    "tc_reply",
    "tc_pass",
    "tc_cluster_ip",
    "reject_unknown_port",
    "drop_no_local",
    "sock_lb",
    "sock_reject",
    "hairpin",
    "pass_to_tc",
    "drop_source_range",
    "affinity_hit",
    "neigh_resolve",
];
pub const COUNTER_COUNT: u32 = COUNTER_NAMES.len() as u32;

/// Hash of a flow used to index a Maglev table. Deterministic and seedless on purpose:
/// every node must pick the same slot for the same flow.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    // Murmur3-style finaliser over the four words of the tuple: cheap, no loops, and good
    // enough spread for a table index (tests check the spread end to end).
    let mut h: u32 = 0x9747_b28c;
    let words = [
        k.src_addr_be,
        k.dst_addr_be,
        ((k.src_port_be as u32) << 16) | k.dst_port_be as u32,
        k.proto as u32,
    ];
    let mut i = 0;
    while i < 4 {
        let mut w = words[i].wrapping_mul(0xcc9e_2d51);
        w = w.rotate_left(15).wrapping_mul(0x1b87_3593);
        h ^= w;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= 16;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for SvcStats {}
    unsafe impl aya::Pod for SvcMeta {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRev {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for Affinity {}
    unsafe impl aya::Pod for SrcRangeKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FrontendKey>(), 8);
        assert_eq!(size_of::<Frontend>(), 8);
        assert_eq!(size_of::<Service>(), 20);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<Affinity>(), 16);
        assert_eq!(size_of::<SrcRangeKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 12);
        assert_eq!(size_of::<RevNat>(), 16);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRev>(), 8);
        assert_eq!(size_of::<Config>(), 8);
        assert_eq!(size_of::<SvcStats>(), 32);
        assert_eq!(size_of::<SvcMeta>(), 128);
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = FlowKey {
            src_addr_be: 1,
            dst_addr_be: 2,
            src_port_be: 3,
            dst_port_be: 4,
            proto: 6,
            _pad: [0; 3],
        };
        let h = flow_hash(&base);
        for k in [
            FlowKey {
                src_addr_be: 9,
                ..base
            },
            FlowKey {
                dst_addr_be: 9,
                ..base
            },
            FlowKey {
                src_port_be: 9,
                ..base
            },
            FlowKey {
                dst_port_be: 9,
                ..base
            },
            FlowKey { proto: 17, ..base },
        ] {
            assert_ne!(flow_hash(&k), h, "{k:?}");
        }
    }
}
