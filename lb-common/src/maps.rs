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
pub const MAP_CT_NEW: &str = "XLB_CT_NEW";
pub const MAP_REVNAT: &str = "XLB_REVNAT";
pub const MAP_CONFIG: &str = "XLB_CONFIG";
pub const MAP_COUNTERS: &str = "XLB_COUNTERS";
pub const MAP_SVC_STATS: &str = "XLB_SVC_STATS";
pub const MAP_SVC_META: &str = "XLB_SVC_META";
pub const MAP_CLUSTER_IPS: &str = "XLB_CLUSTER_IPS";
pub const MAP_SOCK_REVNAT: &str = "XLB_SOCK_REVNAT";
pub const MAP_AFFINITY: &str = "XLB_AFFINITY";
pub const MAP_SRC_RANGES: &str = "XLB_SRC_RANGES";
pub const MAP_SERVICE_CIDRS: &str = "XLB_SERVICE_CIDRS";
pub const MAP_ARP: &str = "XLB_ARP";
pub const MAP_ANNOUNCE_LEASE: &str = "XLB_ANNOUNCE_LEASE";
pub const MAP_FRAGS: &str = "XLB_FRAGS";
pub const MAP_REJECT_BUDGET: &str = "XLB_REJECT_BUDGET";

/// Capacity of `XLB_ARP`: LoadBalancer addresses this node announces.
pub const MAX_ANNOUNCED: u32 = 16_384;

/// Capacity of `XLB_FRAGS`: datagrams of translated flows whose later fragments are still
/// to come. Fragments of one datagram follow each other within microseconds, so this is
/// how many such datagrams may be in flight at once on a node; the least recently used
/// entry makes room (its datagram's later fragments then go to the kernel untranslated).
pub const MAX_FRAGS: u32 = 16_384;

/// Rejects (TCP RST, ICMP errors) the datapath sends per CPU and second, and how many it
/// may send at once after a quiet spell: the kernel's own ICMP limit is 1,000 per second
/// (`net.ipv4.icmp_msgs_per_sec`). A flood of SYNs to a service without endpoints, or with
/// spoofed sources, cannot turn the node into a reflector; a client refused now and then
/// never notices.
pub const REJECTS_PER_SEC: u32 = 1_000;
pub const REJECT_BURST: u32 = 1_000;

/// A CPU's reject budget (`XLB_REJECT_BUDGET`): a token bucket refilled as time passes.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct RejectBudget {
    pub tokens: u32,
    /// When it was last refilled (the datapath's millisecond clock).
    pub refilled_ms: u32,
}

impl RejectBudget {
    /// Takes one token at `now_ms` if there is one, refilling first.
    #[inline(always)]
    pub fn take(&mut self, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.refilled_ms);
        // Whole tokens only: the clock moves on by what was turned into tokens.
        let new = (elapsed as u64 * REJECTS_PER_SEC as u64 / 1_000) as u32;
        if new > 0 {
            self.tokens = self.tokens.saturating_add(new).min(REJECT_BURST);
            self.refilled_ms = now_ms;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Capacity of `XLB_SERVICE_CIDRS` (a cluster has one or two service ranges; the
/// ServiceCIDR API lets it add a few).
pub const MAX_SERVICE_CIDRS: u32 = 256;

/// Program names in the eBPF object.
/// The XDP program for generic mode and BPF_PROG_TEST_RUN (single-buffer frames).
pub const PROG_XDP: &str = "xlb_xdp";
/// The same program taking multi-buffer frames, for native mode (see lb-ebpf's main.rs).
pub const PROG_XDP_MB: &str = "xlb_xdp_mb";
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
/// Maglev arena: one array holding every service's two tables (see `Service`). Sized so
/// that `DEFAULT_MAX_SERVICES` service ports each hold both buffers at the agent's default
/// smallest table (M = 1021): 16,384 x 2 x 1021 slots. The kernel stores array elements 8
/// bytes apart, so this is 255 MiB of kernel memory. The agent sizes the map at load time
/// (`--maglev-arena`); this is the object's compile-time size.
pub const DEFAULT_MAGLEV_ARENA: u32 = DEFAULT_MAX_SERVICES * 2 * 1021;
/// Maglev slots (backend ids, u32) per `XLB_MAGLEV` element. The kernel lays array
/// elements out 8 bytes apart, so one u32 per element would waste half the arena's memory;
/// two per u64 element make the value area a dense array of u32 slots (slot `s` is half
/// `s % 2`, little end first, of element `s / 2`), which is also how the agent writes it
/// through its memory mapping.
pub const MAGLEV_SLOTS_PER_ENTRY: u32 = 2;

/// `XLB_MAGLEV` elements holding `slots` slots.
pub const fn maglev_entries(slots: u32) -> u32 {
    slots.div_ceil(MAGLEV_SLOTS_PER_ENTRY)
}
/// Confirmed flows (`XLB_CT`); reverse-NAT entries get this plus `DEFAULT_CT_NEW_ENTRIES`.
pub const DEFAULT_CT_ENTRIES: u32 = 262_144;
/// Unconfirmed flows (`XLB_CT_NEW`): a SYN or a flood of them lands here and can only evict
/// other unconfirmed flows, never a confirmed one.
pub const DEFAULT_CT_NEW_ENTRIES: u32 = 65_536;

/// Source ports used for SNAT towards backends on other nodes, as the agent picks them on a
/// stock node: the largest range of 1024-65535 outside the NodePort range (30000-32767) and
/// Linux's default `ip_local_port_range` (32768-60999), so they never collide with the
/// node's own connections. (The agent computes the range from the node's settings.)
pub const DEFAULT_SNAT_PORT_MIN: u16 = 1_024;
pub const DEFAULT_SNAT_PORT_MAX: u16 = 29_999;
/// How many SNAT ports the datapath probes for a new flow before giving up.
pub const SNAT_PROBES: u32 = 16;
/// A SNAT port whose flow closed (FIN both ways, or RST) may be handed to a new flow this
/// many milliseconds after the flow's last packet, before the closed entry's own timeout:
/// long enough for the last ACK and a retransmitted FIN (TCP's minimum RTO is 200 ms) to
/// be translated, short enough that the default range of 4,536 ports sustains about 4,000
/// new connections per second to one backend.
pub const SNAT_REUSE_CLOSED_MS: u32 = 1_000;
/// Timeouts are capped here so that, in milliseconds, they stay comparable on the datapath's
/// wrapping 32-bit clock (23 days).
pub const CT_TIMEOUT_MAX_S: u32 = 2_000_000;

/// Conntrack timeouts (seconds), the agent's defaults; see `Config`.
pub const DEFAULT_CT_TCP_SYN_S: u32 = 60;
pub const DEFAULT_CT_TCP_ESTABLISHED_S: u32 = 8_000;
pub const DEFAULT_CT_TCP_CLOSE_S: u32 = 10;
pub const DEFAULT_CT_UDP_S: u32 = 60;

/// Frontend: what a packet is addressed to.
#[repr(C)]
#[derive(
    Clone,
    Copy,
    bytemuck::Pod,
    bytemuck::Zeroable,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub struct FrontendKey {
    pub addr_be: u32,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl FrontendKey {
    /// The one way to build a frontend key: address and port as they are in the packet.
    #[inline(always)]
    pub const fn new(addr_be: u32, port_be: u16, proto: u8) -> Self {
        Self {
            addr_be,
            port_be,
            proto,
            _pad: 0,
        }
    }
}

/// The frontend is a NodePort on one of the node's addresses.
pub const FE_NODEPORT: u32 = 1 << 0;
/// The frontend is a LoadBalancer ingress IP or an external IP.
pub const FE_EXTERNAL: u32 = 1 << 1;
/// The frontend is a ClusterIP (tc path; XDP passes it on).
pub const FE_CLUSTER_IP: u32 = 1 << 2;
/// A NodePort on 127.0.0.1, reachable only from the node's own sockets (socket hooks).
/// The datapath never reads it (the socket hooks treat every frontend alike; XDP and tc act
/// only on the kinds above): it labels the entry for readers of the map.
pub const FE_LOCALHOST: u32 = 1 << 3;
/// Only sources in the service's `loadBalancerSourceRanges` (`XLB_SRC_RANGES`) may use it.
pub const FE_SOURCE_RANGES: u32 = 1 << 4;
/// Traffic from inside the cluster goes to `inside_svc_id` with the pod's address kept, as
/// kube-proxy short-circuits in-cluster traffic to an externalTrafficPolicy Local service's
/// external addresses.
pub const FE_SHORT_CIRCUIT: u32 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    /// Index of the service port in `XLB_SERVICES` and `XLB_SVC_STATS`, for traffic from
    /// outside the cluster (XDP on the uplink).
    pub svc_id: u32,
    pub flags: u32,
    /// The service port for traffic from inside the cluster (pods: tc; the node's own
    /// processes: socket hooks). Equal to `svc_id` except under `externalTrafficPolicy:
    /// Local`, where it names the port with all endpoints (`FE_SHORT_CIRCUIT`).
    pub inside_svc_id: u32,
}

/// One service port: its Maglev table lives at `XLB_MAGLEV[table_off .. table_off + table_m]`.
///
/// The agent keeps two tables per service and writes the inactive one, then replaces this
/// hash-map value (the kernel swaps hash values atomically), so a packet sees either the old
/// or the new table, never a mix.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
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
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    pub flags: u8,
    pub _pad: u8,
}

/// A fragmented IPv4 datagram: what all its fragments share (RFC 791), as read from the
/// header: addresses in network order, the identification field in network order.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// The ports of a datagram's first fragment (network order): later fragments carry none,
/// and get the first fragment's translation through them.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub src_port_be: u16,
    pub dst_port_be: u16,
}

/// A unidirectional 5-tuple, as read from a packet.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src_addr_be: u32,
    pub dst_addr_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The one way to build a flow key: addresses and ports as they are in the packet.
    #[inline(always)]
    pub const fn new(
        src_addr_be: u32,
        dst_addr_be: u32,
        src_port_be: u16,
        dst_port_be: u16,
        proto: u8,
    ) -> Self {
        Self {
            src_addr_be,
            dst_addr_be,
            src_port_be,
            dst_port_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// The flow was source-NATed (backend on another node).
pub const CT_SNAT: u8 = 1 << 0;
/// A packet of the backend's direction (a reply) has been seen.
pub const CT_SEEN_REPLY: u8 = 1 << 1;
/// The client sent a FIN.
pub const CT_FIN_CLIENT: u8 = 1 << 2;
/// The backend sent a FIN.
pub const CT_FIN_BACKEND: u8 = 1 << 3;
/// A RST was seen in either direction.
pub const CT_RST: u8 = 1 << 4;
/// Created by a TCP segment that cannot start a connection (no SYN): the flow may be one
/// another node started, so it is forwarded, but it holds its state (and SNAT port) only
/// for the short close timeout until both directions confirm it.
pub const CT_MIDSTREAM: u8 = 1 << 5;

/// Connection-tracking entry, keyed by the client's original 5-tuple (client -> frontend).
///
/// One NAT mapping is two map entries created together: this one and the `RevNat` keyed by
/// the reply tuple. Each can find the other (the reply tuple is backend -> client, or
/// backend -> SNAT address:`snat_port_be`; the `RevNat` holds the client tuple), and a hit
/// on either is checked against the other, so a half left behind by an eviction is never
/// taken for a live flow.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub backend_id: u32,
    pub svc_id: u32,
    /// SNAT source port (network order) when `CT_SNAT` is set, else 0.
    pub snat_port_be: u16,
    /// `CT_*` bits.
    pub flags: u8,
    /// IP protocol (selects the timeouts).
    pub proto: u8,
    /// Monotonic clock (CLOCK_MONOTONIC, `bpf_ktime_get_coarse_ns`) in milliseconds,
    /// wrapping at 2^32, when a packet of the flow was last seen in either direction.
    pub last_seen_ms: u32,
}

/// The flow ended: RST, or FIN from both sides.
#[inline(always)]
pub fn ct_closed(e: &CtEntry) -> bool {
    e.flags & CT_RST != 0
        || e.flags & (CT_FIN_CLIENT | CT_FIN_BACKEND) == (CT_FIN_CLIENT | CT_FIN_BACKEND)
}

/// How long `e` lives after its last packet. `confirmed`: the entry is in `XLB_CT` (both
/// directions seen, then the client again), not in `XLB_CT_NEW`.
#[inline(always)]
pub fn ct_timeout_s(cfg: &Config, e: &CtEntry, confirmed: bool) -> u32 {
    if e.proto != crate::PROTO_TCP {
        return cfg.ct_udp_s;
    }
    if ct_closed(e) {
        cfg.ct_tcp_close_s
    } else if confirmed {
        cfg.ct_tcp_established_s
    } else if e.flags & CT_MIDSTREAM != 0 {
        cfg.ct_tcp_close_s
    } else {
        cfg.ct_tcp_syn_s
    }
}

/// Milliseconds since the entry's last packet at `now_ms` (negative: stamped after `now_ms`
/// was read).
#[inline(always)]
pub fn ct_idle_ms(e: &CtEntry, now_ms: u32) -> i32 {
    now_ms.wrapping_sub(e.last_seen_ms) as i32
}

/// The entry's flow is over at `now_ms` (the datapath treats it as absent, the agent's GC
/// deletes it).
#[inline(always)]
pub fn ct_expired(cfg: &Config, e: &CtEntry, confirmed: bool, now_ms: u32) -> bool {
    let timeout_s = ct_timeout_s(cfg, e, confirmed);
    let timeout_s = if timeout_s > CT_TIMEOUT_MAX_S {
        CT_TIMEOUT_MAX_S
    } else {
        timeout_s
    };
    ct_idle_ms(e, now_ms) > (timeout_s * 1000) as i32
}

/// The entry's SNAT port may be given to a new flow: expired, or closed long enough ago.
#[inline(always)]
pub fn ct_port_reusable(cfg: &Config, e: &CtEntry, confirmed: bool, now_ms: u32) -> bool {
    ct_expired(cfg, e, confirmed, now_ms)
        || (ct_closed(e) && ct_idle_ms(e, now_ms) >= SNAT_REUSE_CLOSED_MS as i32)
}

/// Reverse translation for replies, keyed by the reply's 5-tuple as it arrives
/// (source = backend, destination = client or the node's SNAT address and port).
///
/// Its owner, the flow's `CtEntry`, is keyed by (client = `dst`, frontend = `src`, ports
/// likewise, same protocol): see `RevNat::ct_key`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
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

impl RevNat {
    /// The conntrack key of the flow this reverse entry belongs to.
    #[inline(always)]
    pub fn ct_key(&self, proto: u8) -> FlowKey {
        FlowKey::new(
            self.dst_addr_be,
            self.src_addr_be,
            self.dst_port_be,
            self.src_port_be,
            proto,
        )
    }
}

/// Session affinity: which backend a client IP was last sent to for a service port.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub client_addr_be: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend_id: u32,
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the last new connection that used it.
    pub last_ns: u64,
}

/// `XLB_SRC_RANGES` LPM key data: service port id (big-endian, so it forms the leading 32
/// bits of every prefix) followed by the source address (network order).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct SrcRangeKey {
    pub svc_id_be: u32,
    pub addr_be: u32,
}

/// Socket-level translation (host-originated traffic), keyed by socket and backend, so that
/// `recvmsg`/`getpeername` can show the service address the application asked for.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct SockRev {
    pub addr_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}

/// `XLB_CONFIG[0]`: per-node settings written by the agent before it attaches.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Node address used as the source of SNATed flows (network order).
    pub snat_addr_be: u32,
    /// Inclusive SNAT port range, host order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// Conntrack timeouts in seconds (see `ct_timeout_s`): a TCP flow not yet confirmed by
    /// both directions, a confirmed TCP flow, a TCP flow after RST or FIN both ways (also
    /// a mid-stream flow until confirmed), and UDP.
    pub ct_tcp_syn_s: u32,
    pub ct_tcp_established_s: u32,
    pub ct_tcp_close_s: u32,
    pub ct_udp_s: u32,
    /// `CFG_*` bits, switched at run time by the agent.
    pub flags: u32,
    /// The uplink's MAC address: the source of ARP replies for announced addresses.
    pub mac: [u8; 6],
    pub _pad: u16,
    pub _pad2: u32,
    /// The node's own network namespace (its cookie, `SO_NETNS_COOKIE`, as the agent sees
    /// it): the socket hooks translate NodePorts, `localhost:<NodePort>` and external
    /// addresses only for sockets in it. A pod in a hooked cgroup keeps its own
    /// `127.0.0.1:<port>` (and its NodePort traffic goes the packet path, tc on its
    /// interface). 0: unknown, every socket is taken for the node's.
    pub host_netns_cookie: u64,
}

/// `XLB_ANNOUNCE_LEASE[0]`: ARP for `XLB_ARP`'s addresses is answered only while the
/// datapath clock (`bpf_ktime_get_coarse_ns` in ms, wrapping) is before this stamp. The
/// agent's announcer moves it forward while it runs (its own map, so no read-modify-write
/// of `XLB_CONFIG` races with it), so a node whose agent is gone stops answering after at
/// most this long and another node can take the addresses over.
pub const ANNOUNCE_LEASE_MS: u32 = 3_000;

/// The announce lease at `now_ms` is still running (wrapping comparison).
#[inline(always)]
pub fn lease_running(until_ms: u32, now_ms: u32) -> bool {
    (until_ms.wrapping_sub(now_ms) as i32) > 0
}

/// `Config::flags`: the programs log debug events (aya-log) — why a packet was passed,
/// rejected or dropped, and each new flow. Off by default; off, an event costs one test of
/// this word, which the programs have loaded anyway.
pub const CFG_DEBUG_EVENTS: u32 = 1 << 0;

impl Config {
    /// `addr_be:port_be` is one of the node's SNAT address and ports: a reply there belongs
    /// to a source-NATed flow (reverse NAT is looked up before any frontend).
    #[inline(always)]
    pub fn is_snat_endpoint(&self, addr_be: u32, port_be: u16) -> bool {
        let port = u16::from_be(port_be);
        self.snat_addr_be != 0
            && addr_be == self.snat_addr_be
            && port >= self.snat_port_min
            && port <= self.snat_port_max
    }

    /// The agent's defaults with no SNAT address.
    pub const DEFAULT: Config = Config {
        snat_addr_be: 0,
        snat_port_min: DEFAULT_SNAT_PORT_MIN,
        snat_port_max: DEFAULT_SNAT_PORT_MAX,
        ct_tcp_syn_s: DEFAULT_CT_TCP_SYN_S,
        ct_tcp_established_s: DEFAULT_CT_TCP_ESTABLISHED_S,
        ct_tcp_close_s: DEFAULT_CT_TCP_CLOSE_S,
        ct_udp_s: DEFAULT_CT_UDP_S,
        flags: 0,
        mac: [0; 6],
        _pad: 0,
        _pad2: 0,
        host_netns_cookie: 0,
    };
}

/// Per-service-port counters (`XLB_SVC_STATS[svc_id]`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rejects: u64,
}

/// `XLB_SVC_META[svc_id]`: who a service port is, written by the agent and read only by
/// user space (`lb-agent status`, the metrics, and the agent itself when it adopts the
/// pinned state after a restart), so that what is programmed can be named from the pins
/// alone. The datapath never reads it.
///
/// Structured, not a display string: each part of the identity has its own field. Every
/// field is a single byte, a byte string, or (`port`) host byte order. Strings are UTF-8,
/// NUL-padded to the array's length, and not NUL-terminated when they fill it; their sizes
/// are Kubernetes' own limits, so a valid object always fits (see [`SvcMeta::new`]).
///
/// An all-zero value (an id never initialised) has `version` 0; a value whose `version` is
/// not [`SVC_META_VERSION`] must not be taken for an identity.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, Debug, PartialEq, Eq)]
pub struct SvcMeta {
    /// Layout version, [`SVC_META_VERSION`] when written by this code (one byte).
    pub version: u8,
    /// [`ServiceType`] as its `u8` discriminant (one byte).
    pub svc_type: u8,
    /// IP protocol number, `PROTO_TCP` or `PROTO_UDP` (one byte).
    pub proto: u8,
    /// `SVC_SCOPE_CLUSTER` or `SVC_SCOPE_LOCAL` (one byte): which endpoints the port may
    /// use (a Local traffic policy makes a second, node-local unit of the same port).
    pub scope: u8,
    /// The Service's `port` (not a nodePort), host byte order.
    pub port: u16,
    /// `metadata.namespace` (a DNS label: at most 63 bytes), NUL-padded UTF-8.
    pub namespace: [u8; SVC_META_NAMESPACE_LEN],
    /// `metadata.name` (a DNS label: at most 63 bytes), NUL-padded UTF-8.
    pub name: [u8; SVC_META_NAME_LEN],
    /// The port's `name` (an IANA_SVC_NAME: at most 15 bytes), NUL-padded UTF-8; empty for
    /// the unnamed port of a single-port service.
    pub port_name: [u8; SVC_META_PORT_NAME_LEN],
    /// Explicit padding to the 2-byte alignment of `port`; always 0.
    pub _pad: u8,
}

/// `SvcMeta::version` of the layout above.
pub const SVC_META_VERSION: u8 = 1;
/// Longest namespace and service name: a Kubernetes DNS label (RFC 1123), 63 bytes.
pub const SVC_META_NAMESPACE_LEN: usize = 63;
pub const SVC_META_NAME_LEN: usize = 63;
/// Longest port name: an IANA_SVC_NAME, 15 bytes.
pub const SVC_META_PORT_NAME_LEN: usize = 15;

/// `SvcMeta::scope`: every ready endpoint in the cluster.
pub const SVC_SCOPE_CLUSTER: u8 = 0;
/// `SvcMeta::scope`: only endpoints on this node (`internalTrafficPolicy` or
/// `externalTrafficPolicy` Local); shown as ` (local)`.
pub const SVC_SCOPE_LOCAL: u8 = 1;

/// A Service's `spec.type`, for the types the datapath serves (ExternalName never is).
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceType {
    #[default]
    ClusterIP = 0,
    NodePort = 1,
    LoadBalancer = 2,
}

impl ServiceType {
    /// As `kubectl get svc` prints it in the TYPE column (and as spelled in the API).
    pub const fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }

    /// From its discriminant (`SvcMeta::svc_type`); `None` for an unknown code.
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(ServiceType::ClusterIP),
            1 => Some(ServiceType::NodePort),
            2 => Some(ServiceType::LoadBalancer),
            _ => None,
        }
    }
}

impl core::fmt::Display for ServiceType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Default for SvcMeta {
    fn default() -> Self {
        bytemuck::Zeroable::zeroed()
    }
}

/// Copies `s` into a NUL-padded array; `None` if it does not fit.
fn fixed<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0; N];
    out.get_mut(..s.len())?.copy_from_slice(s.as_bytes());
    Some(out)
}

/// Copies the longest prefix of `s` that fits and ends on a character boundary.
fn fixed_truncated<const N: usize>(s: &str) -> [u8; N] {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = [0; N];
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

/// The UTF-8 text before the first NUL; its longest valid prefix if the bytes are not
/// UTF-8 (only a value not written by [`SvcMeta::new`] can be).
fn text(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match core::str::from_utf8(&bytes[..end]) {
        Ok(s) => s,
        // `valid_up_to` is a character boundary of valid UTF-8, so this cannot fail.
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

impl SvcMeta {
    /// The identity of one service port; `None` if a string is longer than its field
    /// (never for objects the API server accepted).
    pub fn new(
        namespace: &str,
        name: &str,
        port_name: &str,
        svc_type: ServiceType,
        proto: u8,
        scope: u8,
        port: u16,
    ) -> Option<Self> {
        Some(Self {
            version: SVC_META_VERSION,
            svc_type: svc_type as u8,
            proto,
            scope,
            port,
            namespace: fixed(namespace)?,
            name: fixed(name)?,
            port_name: fixed(port_name)?,
            _pad: 0,
        })
    }

    /// As [`SvcMeta::new`], cutting each string that is too long at the last character
    /// boundary that fits. The result no longer names the port exactly: compare it with
    /// [`SvcMeta::is_exact`] before relying on it.
    pub fn new_truncated(
        namespace: &str,
        name: &str,
        port_name: &str,
        svc_type: ServiceType,
        proto: u8,
        scope: u8,
        port: u16,
    ) -> Self {
        Self {
            version: SVC_META_VERSION,
            svc_type: svc_type as u8,
            proto,
            scope,
            port,
            namespace: fixed_truncated(namespace),
            name: fixed_truncated(name),
            port_name: fixed_truncated(port_name),
            _pad: 0,
        }
    }

    /// Written by this layout version (an uninitialised id is not).
    pub fn is_current(&self) -> bool {
        self.version == SVC_META_VERSION
    }

    /// Whether this names exactly the given parts (no part truncated, same layout version).
    pub fn is_exact(&self, namespace: &str, name: &str, port_name: &str) -> bool {
        self.is_current()
            && self.namespace() == namespace
            && self.name() == name
            && self.port_name() == port_name
    }

    pub fn namespace(&self) -> &str {
        text(&self.namespace)
    }

    pub fn name(&self) -> &str {
        text(&self.name)
    }

    /// Empty for an unnamed port.
    pub fn port_name(&self) -> &str {
        text(&self.port_name)
    }

    /// `None` for a code this version does not know.
    pub fn service_type(&self) -> Option<ServiceType> {
        ServiceType::from_u8(self.svc_type)
    }

    pub fn is_local(&self) -> bool {
        self.scope == SVC_SCOPE_LOCAL
    }

    /// `TCP`, `UDP`, or the protocol number.
    fn write_proto(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.proto {
            crate::PROTO_TCP => f.write_str("TCP"),
            crate::PROTO_UDP => f.write_str("UDP"),
            p => write!(f, "{p}"),
        }
    }
}

impl core::fmt::Display for SvcMeta {
    /// The agent's name for a service port: `ns/name:port_name/TCP`, or `ns/name/TCP` for
    /// an unnamed port, with ` (local)` appended for the node-local scope.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.namespace(), self.name())?;
        if !self.port_name().is_empty() {
            write!(f, ":{}", self.port_name())?;
        }
        f.write_str("/")?;
        self.write_proto(f)?;
        if self.is_local() {
            f.write_str(" (local)")?;
        }
        Ok(())
    }
}

/// Defines `Counter`, `COUNTER_NAMES` and `COUNTER_COUNT` from one list of
/// `Variant => "name"` pairs, so a counter's index and its name cannot drift apart.
macro_rules! counters {
    ($($(#[$attr:meta])* $variant:ident => $name:literal,)*) => {
        /// Global counters: index into the per-CPU array `XLB_COUNTERS`.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter {
            $($(#[$attr])* $variant,)*
        }

        /// `Counter` names in index order (`lb-agent status`, the metrics' `reason` label).
        pub const COUNTER_NAMES: [&str; [$($name),*].len()] = [$($name),*];
        pub const COUNTER_COUNT: u32 = COUNTER_NAMES.len() as u32;
    };
}

counters! {
    Packets => "packets",
    PassNotIpv4 => "pass_not_ipv4",
    /// A later fragment left to the kernel untranslated: tc did not translate its datagram's
    /// first fragment (not ours, or it has not come yet). XDP hands every fragment to tc.
    PassFragment => "pass_fragment",
    /// IPv4 with options seen by XDP, handed to tc (which removes them if it translates).
    PassIpOptions => "pass_ip_options",
    PassNotTcpUdp => "pass_not_tcp_udp",
    PassNoMatch => "pass_no_match",
    Truncated => "truncated",
    FwdLocal => "fwd_local",
    FwdRemote => "fwd_remote",
    Reply => "reply",
    RejectRst => "reject_rst",
    RejectIcmp => "reject_icmp",
    CtHit => "ct_hit",
    CtMiss => "ct_miss",
    CtRebalance => "ct_rebalance",
    SnatExhausted => "snat_exhausted",
    FibFail => "fib_fail",
    TcReply => "tc_reply",
    TcPass => "tc_pass",
    TcClusterIp => "tc_cluster_ip",
    RejectUnknownPort => "reject_unknown_port",
    DropNoLocal => "drop_no_local",
    SockLb => "sock_lb",
    SockReject => "sock_reject",
    Hairpin => "hairpin",
    /// Handed by XDP to the uplink's tc hook, which translates it there: a reply for a pod
    /// on this node, a fragment, or a packet whose next hop needs neighbour resolution.
    PassToTc => "pass_to_tc",
    DropSourceRange => "drop_source_range",
    AffinityHit => "affinity_hit",
    /// XDP found no neighbour entry for the next hop: the packet went to the uplink's tc
    /// untranslated, which sends it with the kernel's neighbour resolution.
    NeighResolve => "neigh_resolve",
    /// A flow confirmed by both directions moved from `XLB_CT_NEW` to `XLB_CT`.
    CtConfirm => "ct_confirm",
    /// A conntrack entry past its timeout was found (and replaced) by the datapath.
    CtExpired => "ct_expired",
    /// A reply whose flow is gone (its conntrack half missing, expired or another flow's).
    ReplyStale => "reply_stale",
    /// A SNAT port taken at the first probe / after more probes / from a closed, expired or
    /// orphaned flow.
    SnatFirst => "snat_first",
    SnatRetry => "snat_retry",
    SnatReuse => "snat_reuse",
    /// A flow's reverse entry had vanished and was written again with the same port.
    RevnatRecreated => "revnat_recreated",
    /// A flow's SNAT port had been given to another flow: the flow got a new port.
    SnatReassigned => "snat_reassigned",
    /// A TCP RST without state: forwarded to a local backend, dropped otherwise.
    RstNoState => "rst_no_state",
    /// To an address of the service CIDRs that no Service holds: dropped.
    DropServiceCidr => "drop_service_cidr",
    /// From a pod or the node to a LoadBalancer IP outside its loadBalancerSourceRanges.
    DropSourceRangeInside => "drop_source_range_inside",
    /// An ARP request for an address this node announces, answered.
    ArpReply => "arp_reply",
    /// An ARP request for an announced address while the agent's lease had run out.
    ArpLeaseExpired => "arp_lease_expired",
    /// IPv4 for another host's MAC address (flooded by a switch): left to the kernel.
    PassOtherHost => "pass_other_host",
    /// A reject not sent (the packet dropped instead): its source cannot be answered
    /// (0.0.0.0, loopback, multicast, broadcast or reserved), as RFC 1122 asks.
    RejectSuppressed => "reject_suppressed",
    /// Packets seen by the uplink's tc hook (all of them when the uplink runs tc alone, else
    /// what XDP handed on).
    TcUplinkPackets => "tc_uplink_packets",
    /// A TCP/UDP packet whose checksum field holds only the pseudo-header seed (the sender
    /// left the rest to offload, CHECKSUM_PARTIAL): XDP cannot tell, so it hands such
    /// packets to the uplink's tc hook, whose checksum helpers know the skb's state.
    PassCsumPartial => "pass_csum_partial",
    /// A new flow whose backend-side tuple belongs to a live flow through another frontend
    /// (same client address and port, same backend): dropped, the live flow keeps it.
    DropTupleInUse => "drop_tuple_in_use",
    /// A packet to forward whose TTL ran out: answered with ICMP time exceeded.
    TtlExceeded => "ttl_exceeded",
    /// A packet too large for its next hop with DF set: answered with "fragmentation
    /// needed" and the hop's MTU.
    FragNeeded => "frag_needed",
    /// An ICMP error about a source-NATed flow, translated back for its client.
    IcmpErrorTranslated => "icmp_error_translated",
    /// A later fragment (no ports) of a datagram whose first fragment was translated:
    /// translated the same way, with the first fragment's ports (`XLB_FRAGS`).
    FragTranslated => "frag_translated",
    /// A reject (RST or ICMP error) not sent, the packet dropped: this CPU's budget
    /// (`REJECTS_PER_SEC`) was spent.
    RejectRateLimited => "reject_rate_limited",
    /// A packet with IPv4 options to translate or answer: tc removed the options first.
    IpOptionsRemoved => "ip_options_removed",
    /// A flow found only at the third look (`XLB_CT` again, ebpf ct.rs `lookup`): another
    /// CPU confirmed it, moving it from `XLB_CT_NEW`, between the first two.
    CtMoveRace => "ct_move_race",
}

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

    /// aya's `Pod` is an unsafe promise of no padding and no invalid bit patterns, which is
    /// what bytemuck's derived `Pod` checks at compile time: each type must pass that check
    /// before it gets aya's. (aya's trait cannot be implemented for every `bytemuck::Pod` at
    /// once: both traits are foreign here.)
    macro_rules! aya_pod {
        ($($t:ty),* $(,)?) => {$(
            const _: () = {
                const fn checked<T: bytemuck::Pod>() {}
                checked::<$t>()
            };
            // SAFETY: `$t: bytemuck::Pod` (asserted above): repr(C), no padding, plain data.
            unsafe impl aya::Pod for $t {}
        )*};
    }

    aya_pod!(
        FrontendKey,
        Frontend,
        Service,
        Backend,
        FlowKey,
        CtEntry,
        RevNat,
        Config,
        SvcStats,
        SvcMeta,
        SockRevKey,
        SockRev,
        AffinityKey,
        Affinity,
        SrcRangeKey,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FrontendKey>(), 8);
        assert_eq!(size_of::<Frontend>(), 12);
        assert_eq!(size_of::<Service>(), 20);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<Affinity>(), 16);
        assert_eq!(size_of::<SrcRangeKey>(), 8);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragPorts>(), 4);
        assert_eq!(size_of::<RejectBudget>(), 8);
        assert_eq!(size_of::<CtEntry>(), 16);
        assert_eq!(size_of::<RevNat>(), 16);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRev>(), 8);
        assert_eq!(size_of::<SvcMeta>(), 148);
        assert_eq!(core::mem::offset_of!(SvcMeta, port), 4);
        assert_eq!(core::mem::offset_of!(SvcMeta, _pad), 147);
        assert_eq!(size_of::<Config>(), 48);
        assert_eq!(size_of::<SvcStats>(), 32);
    }

    #[test]
    fn counter_names_follow_the_enum() {
        assert_eq!(
            COUNTER_NAMES[Counter::NeighResolve as usize],
            "neigh_resolve"
        );
        assert_eq!(COUNTER_NAMES[Counter::RstNoState as usize], "rst_no_state");
        assert_eq!(Counter::CtMoveRace as u32 + 1, COUNTER_COUNT);
        assert_eq!(COUNTER_NAMES[Counter::TtlExceeded as usize], "ttl_exceeded");
    }

    #[test]
    fn key_constructors_fill_every_field() {
        assert_eq!(
            FrontendKey::new(1, 2, 6),
            FrontendKey {
                addr_be: 1,
                port_be: 2,
                proto: 6,
                _pad: 0,
            }
        );
        assert_eq!(
            FlowKey::new(1, 2, 3, 4, 17),
            FlowKey {
                src_addr_be: 1,
                dst_addr_be: 2,
                src_port_be: 3,
                dst_port_be: 4,
                proto: 17,
                _pad: [0; 3],
            }
        );
    }

    #[test]
    fn conntrack_timeouts_by_state() {
        let cfg = Config::DEFAULT;
        let syn = CtEntry {
            proto: crate::PROTO_TCP,
            last_seen_ms: 100_000,
            ..Default::default()
        };
        assert_eq!(ct_timeout_s(&cfg, &syn, false), 60);
        assert!(!ct_expired(&cfg, &syn, false, 160_000));
        assert!(ct_expired(&cfg, &syn, false, 160_001));
        assert_eq!(ct_timeout_s(&cfg, &syn, true), 8_000);
        let fin1 = CtEntry {
            flags: CT_FIN_CLIENT,
            ..syn
        };
        assert!(!ct_closed(&fin1));
        assert_eq!(ct_timeout_s(&cfg, &fin1, true), 8_000);
        let fin2 = CtEntry {
            flags: CT_FIN_CLIENT | CT_FIN_BACKEND,
            ..syn
        };
        let rst = CtEntry {
            flags: CT_RST,
            ..syn
        };
        for e in [fin2, rst] {
            assert!(ct_closed(&e));
            assert_eq!(ct_timeout_s(&cfg, &e, true), 10);
            assert!(!ct_port_reusable(&cfg, &e, true, 100_999));
            assert!(ct_port_reusable(&cfg, &e, true, 101_000));
        }
        let mid = CtEntry {
            flags: CT_MIDSTREAM,
            ..syn
        };
        assert_eq!(ct_timeout_s(&cfg, &mid, false), 10);
        let udp = CtEntry {
            proto: crate::PROTO_UDP,
            ..syn
        };
        assert_eq!(ct_timeout_s(&cfg, &udp, true), 60);
        // The clock wraps (u32 milliseconds, every 49.7 days): still ordered.
        let wrap = CtEntry {
            last_seen_ms: u32::MAX - 5_000,
            ..syn
        };
        assert!(!ct_expired(&cfg, &wrap, false, 10_000));
        assert!(ct_expired(&cfg, &wrap, false, 60_000));
        // A huge timeout is capped, never turned negative.
        let long = Config {
            ct_tcp_established_s: u32::MAX,
            ..cfg
        };
        assert!(!ct_expired(&long, &syn, true, 100_000 + 86_400_000));
    }

    #[test]
    fn flow_hash_depends_on_every_field() {
        let base = FlowKey::new(1, 2, 3, 4, 6);
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

    #[test]
    fn svc_meta_round_trips() {
        let m = SvcMeta::new(
            "dev",
            "nginx-service",
            "http",
            ServiceType::NodePort,
            crate::PROTO_TCP,
            SVC_SCOPE_CLUSTER,
            80,
        )
        .unwrap();
        assert!(m.is_current());
        assert_eq!(
            (m.namespace(), m.name(), m.port_name()),
            ("dev", "nginx-service", "http")
        );
        assert_eq!(m.service_type(), Some(ServiceType::NodePort));
        assert_eq!(
            (m.proto, m.port, m.is_local()),
            (crate::PROTO_TCP, 80, false)
        );
        assert!(m.is_exact("dev", "nginx-service", "http"));
        assert!(!m.is_exact("dev", "nginx-service", ""));
        // Through the bytes the map holds.
        let back: SvcMeta = bytemuck::pod_read_unaligned(bytemuck::bytes_of(&m));
        assert_eq!(back, m);
        assert_eq!(bytemuck::bytes_of(&m)[4..6], 80u16.to_ne_bytes());

        // Fields exactly as long as their arrays: no NUL, read back whole.
        let (ns, port) = (ascii::<63>(b'n'), ascii::<15>(b'p'));
        let m = SvcMeta::new(
            text(&ns),
            text(&ns),
            text(&port),
            ServiceType::LoadBalancer,
            crate::PROTO_UDP,
            SVC_SCOPE_LOCAL,
            65535,
        )
        .unwrap();
        let (ns, port) = (text(&ns), text(&port));
        assert_eq!((ns.len(), port.len()), (63, 15));
        assert_eq!((m.namespace(), m.name(), m.port_name()), (ns, ns, port));
        assert!(m.is_local());
        assert_eq!(m.port, 65535);
    }

    #[test]
    fn svc_meta_refuses_or_truncates_what_does_not_fit() {
        let long = ascii::<64>(b'x');
        let long = text(&long);
        let tcp = crate::PROTO_TCP;
        let ct = ServiceType::ClusterIP;
        assert_eq!(SvcMeta::new(long, "a", "", ct, tcp, 0, 1), None);
        assert_eq!(SvcMeta::new("a", long, "", ct, tcp, 0, 1), None);
        assert_eq!(
            SvcMeta::new("a", "b", text(&ascii::<16>(b'p')), ct, tcp, 0, 1),
            None
        );

        let m = SvcMeta::new_truncated(long, "b", "", ct, tcp, 0, 1);
        assert_eq!(m.namespace(), &long[..63]);
        assert!(!m.is_exact(long, "b", ""));
        // Cut on a character boundary: 62 ASCII bytes, then a 2-byte character.
        let s = alloc_free_concat();
        let m = SvcMeta::new_truncated(s, "b", "", ct, tcp, 0, 1);
        assert_eq!(m.namespace(), &s[..62]);
    }

    /// `N` copies of an ASCII byte (the crate has no `alloc` for `str::repeat`).
    fn ascii<const N: usize>(b: u8) -> [u8; N] {
        [b; N]
    }

    /// 62 ASCII bytes followed by `é` (2 bytes), without `alloc`.
    fn alloc_free_concat() -> &'static str {
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\u{e9}"
    }

    #[test]
    fn svc_meta_reads_garbage_safely() {
        let mut m = SvcMeta::default();
        assert!(!m.is_current());
        assert_eq!((m.namespace(), m.name(), m.port_name()), ("", "", ""));
        m.name[..3].copy_from_slice(&[b'a', 0xff, b'b']);
        assert_eq!(m.name(), "a");
        m.svc_type = 9;
        assert_eq!(m.service_type(), None);
    }

    #[test]
    fn service_type_codes() {
        for t in [
            ServiceType::ClusterIP,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
        ] {
            assert_eq!(ServiceType::from_u8(t as u8), Some(t));
        }
        assert_eq!(ServiceType::from_u8(3), None);
        assert_eq!(ServiceType::ClusterIP.as_str(), "ClusterIP");
        assert_eq!(ServiceType::NodePort.as_str(), "NodePort");
        assert_eq!(ServiceType::LoadBalancer.as_str(), "LoadBalancer");
    }

    #[test]
    fn the_reject_budget_refills_with_time_up_to_the_burst() {
        let mut b = RejectBudget::default();
        // Long quiet: a full burst, then nothing until time passes.
        let t0 = 1_000_000;
        assert!((0..REJECT_BURST).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        // 5 ms at 1,000 per second: 5 more.
        assert_eq!((0..20).filter(|_| b.take(t0 + 5)).count(), 5);
        // The clock wraps (32-bit milliseconds): still a refill.
        let mut w = RejectBudget {
            tokens: 0,
            refilled_ms: u32::MAX - 1,
        };
        assert!(w.take(2));
    }
}
