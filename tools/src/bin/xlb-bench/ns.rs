//! North-south: a client outside the cluster (the kind network's `curl` container) reaching
//! a Service through a NodePort and through its LoadBalancer IP, on four configurations of
//! the same built-in network, each its own fresh network side by side:
//!
//! * `ours`: lb-agent on every node with its default flags, on kind-shaped nodes (no XDP
//!   program on the uplinks' host-side peers, offloads on): `--xdp-mode auto` picks tc
//!   ingress alone on these veth uplinks;
//! * `ours-native` (extra): `--xdp-mode native`, the harness's pass program on the peers;
//! * `iptables`: no agent; kube-proxy's iptables-mode rules (`iptables-restore`);
//! * `nftables`: no agent; kube-proxy's nftables-mode rules (`nft -f`);
//! * `ceiling`: no load balancer at all: the client connects to the pods directly (routes
//!   to the pod CIDRs via their nodes), the best any load balancer could do here.
//!
//! Workloads (each bounded): a fixed number of short TCP request/response connections
//! (rate and latency), and iperf3 throughput with 1 and 4 streams. Sizes: N services
//! programmed, the measured ones added last. Configurations are measured in alternating
//! rounds (forward, then reverse order), connection tracking of every configuration emptied
//! before each of its runs.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    sync::Barrier,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{CtEntry, FlowKey, MAP_CT, MAP_CT_NEW, MAP_REVNAT, RevNat};
use lb_tests::{Cluster, Network, Pod, SourceMode, TopologySpec, exec_ok};
use serde::{Deserialize, Serialize};

use crate::{
    Args,
    http::{self, Responders},
    rules::{self, SvcDef},
    util::{enter_netns, flush_conntrack, median, pct, sh, sysctl_in},
};

/// The measured request/response service: NodePort on the entry node, LB IP port.
const SVC_PORT: u16 = 8081;
const SVC_NODE_PORT: u16 = 30080;
const SVC_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 200, 1);
/// The iperf3 service: one endpoint (iperf3's data streams must reach the server that
/// holds the control connection).
const IPERF_PORT: u16 = 5201;
const IPERF_NODE_PORT: u16 = 30201;
const IPERF_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 200, 2);
const IPERF_POD: &str = "nginx-replicaset-4kq7x";
/// Dummy service i: ClusterIP `DUMMY_BASE + i`, port 80, the three pods.
const DUMMY_BASE: u32 = u32::from_be_bytes([10, 100, 0, 1]);
/// The node whose address the client uses for NodePorts and that receives the LB IP.
pub const ENTRY_NODE: &str = "service-demo-worker";
const IO_TIMEOUT: Duration = Duration::from_secs(1);
const TCP_SERVER_THREADS: usize = 2;
/// A run stops early after this many failed exchanges (a broken configuration must not
/// take count x timeout).
const MAX_ERRORS: u64 = 50;
/// Background pings between nodes (and to the client), seconds apart.
const CHATTER_INTERVAL: &str = "1";

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Config {
    Ours,
    #[serde(rename = "ours-native")]
    OursNative,
    Iptables,
    Nftables,
    Ceiling,
}

/// The default set; `ours-native` is measured when asked for (`--configs`).
pub const CONFIGS: [Config; 4] = [
    Config::Ours,
    Config::Iptables,
    Config::Nftables,
    Config::Ceiling,
];

impl Config {
    pub fn is_ours(self) -> bool {
        matches!(self, Config::Ours | Config::OursNative)
    }
    pub fn key(self) -> &'static str {
        match self {
            Config::Ours => "ours",
            Config::OursNative => "ours-native",
            Config::Iptables => "iptables",
            Config::Nftables => "nftables",
            Config::Ceiling => "ceiling",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Config::Ours => "xlb (default flags: auto)",
            Config::OursNative => "xlb (--xdp-mode native)",
            Config::Iptables => "kube-proxy iptables",
            Config::Nftables => "kube-proxy nftables",
            Config::Ceiling => "no LB (client -> pod)",
        }
    }
}

/// One measurement.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Sample {
    pub config: Config,
    pub services: u32,
    pub round: usize,
    /// "conn" (connections/s), "iperf1" / "iperf4" (Gbit/s, 1 or 4 streams).
    pub workload: String,
    /// "nodeport", "lbip" or "direct" (ceiling).
    pub path: String,
    pub value: f64,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Exchanges slower than 5 ms (conn runs): the tail behind p99.
    #[serde(default)]
    pub slow_5ms: u64,
    /// Answers per pod (conn runs).
    pub by_pod: std::collections::BTreeMap<String, u64>,
    /// Exchanges slower than 5 ms per pod (conn runs).
    #[serde(default)]
    pub slow_by_pod: std::collections::BTreeMap<String, u64>,
}

/// How long programming N services took on the entry node.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Programming {
    pub config: Config,
    pub services: u32,
    pub seconds: f64,
    /// Rules loaded (nat rules for iptables, `nft` lines for nftables).
    pub rules: usize,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct NorthSouth {
    pub sizes: Vec<u32>,
    pub rounds: usize,
    pub conns: u32,
    pub threads: usize,
    pub iperf_seconds: f64,
    /// The ceiling ran with the XDP pass program on the entry uplink (`--ceiling-xdp`).
    #[serde(default)]
    pub ceiling_xdp: bool,
    pub samples: Vec<Sample>,
    pub programming: Vec<Programming>,
    /// Functional failures (errors, a pod that never answered, iperf3 failing).
    pub failures: Vec<String>,
    /// Sizes a configuration could not be measured at, and why.
    pub skipped: Vec<String>,
    /// Ours: non-zero datapath counters of each agent after each size (evidence).
    #[serde(default)]
    pub ours_counters: Vec<String>,
    /// Ours: the lb-agent arguments beyond the harness's (node, interface, source, pins,
    /// metrics address, cgroup, XDP mode); empty = the agent's defaults.
    #[serde(default)]
    pub ours_agent_args: Vec<String>,
    pub method: Vec<String>,
}

pub const METHOD: &[&str] = &[
    "Topology: the built-in kind-shaped network (3 nodes on one bridge, pods 4kq7x + 9xjtm on \
     service-demo-worker, r2d8c on service-demo-worker2, the outside client 172.18.0.100). Each \
     configuration gets its own fresh copy of it, all up side by side; only one is loaded at a time.",
    "Client -> NodePort 172.18.0.3:30080 and -> LB IP 172.18.255.200:8081 (routed by the client \
     to service-demo-worker, as MetalLB L2 would). Endpoints: the three pods (2 local to the \
     entry node, 1 remote), a Rust responder on :8081 in each pod (accept, read the request, \
     write a ~60-byte HTTP/1.0 response naming the pod, close).",
    "ceiling: the client routes every pod CIDR via the entry node and connects to the pods \
     directly, rotating over the three: the same forward path as the load-balanced runs (entry \
     node, then the remote pod's node for r2d8c) without NAT or rules. Replies of r2d8c go \
     straight from its node to the client (no SNAT), one hop shorter than the NodePort path.",
    "conn: a fixed number of connections from 2 client threads (connect, request, read to EOF, \
     close), rate = connections / wall time, latency per connection (p50/p99; >5ms counts the \
     tail). A run fails functionally if more than 0.5% of the exchanges fail or a pod never \
     answers (single dropped SYNs happen on every NAT path: a SNAT port that lands on a \
     server TIME_WAIT entry within the same millisecond); error counts are in the JSON.",
    "iperf: iperf3 -J -t T with 1 and 4 streams to a one-endpoint service (iperf3 -s in pod \
     4kq7x, local to the entry node, started with ip netns exec), received throughput.",
    "N services: N-1 ClusterIP services (3 endpoints each, port 80) first, then the iperf3 \
     service, then the measured service: the measured one is the last added (kube-proxy's \
     iptables KUBE-SERVICES walks every ClusterIP rule before the NodePort jump).",
    "Every run starts from a clean slate: the pods' TIME_WAIT sockets are destroyed (ss -K). \
     Without this a run's connections meet the previous run's TIME_WAIT entries in the pods \
     (same 4-tuple after DNAT or masquerade) and 1.5-2.5% of them stall ~10 ms, in every \
     configuration, depending only on which run came first.",
    "Node chatter: every node pings every other node and the client once a second, in every \
     configuration (a real cluster's nodes talk all the time; the harness warms ARP caches \
     for the same reason). Without it ours' remote-backend path fails after about a minute: \
     the kernel ages out the neighbour entry of the other node (XDP_TX traffic never confirms \
     it; with more than gc_thresh1 = 128 entries the table's GC removes stale ones), \
     bpf_fib_lookup answers NO_NEIGH, the program passes the already SNATed packet to the \
     stack (counter fib_fail), and the stack never delivers it (reported).",
    "kube-proxy rules are loaded on the entry node only (the only node whose rules the measured \
     packets traverse: remote-backend flows are masqueraded there); iptables is \
     iptables-restore of nat + filter, nftables is nft -f of table ip kube-proxy.",
    "Before every run the configuration's connection tracking is emptied too: ctnetlink flush \
     on every node for iptables/nftables, XLB_CT + XLB_CT_NEW + XLB_REVNAT emptied for ours.",
    "ours runs on kind-shaped nodes: no XDP program on the host-side peer of any node's \
     uplink and TX checksum offload and TSO on at both ends, as docker leaves a kind node; \
     there --xdp-mode auto (the default) runs the north-south path in tc ingress alone. \
     ours-native (measured when --configs names it) is --xdp-mode native with the harness's \
     XDP pass program on the peers, which native XDP_TX on a veth needs.",
    "ours runs lb-agent with its default flags: SNAT ports chosen by the agent, 1024-29999 \
     on these nodes (28,976 per remote backend; a port no flow holds first, else one whose \
     flow closed at least 1 s ago: lb_common::SNAT_REUSE_CLOSED_MS), Maglev \
     M = 1021 for 3 endpoints, default conntrack sizes. The default Maglev arena holds \
     --max-services (16,384) service ports double-buffered at M = 1021, so every size here \
     fits; were a size not to fit, the agents would get --maglev-arena just large enough \
     (capacity only, as an operator with that many services must set). The arguments used \
     are recorded in the results (ours_agent_args).",
];

/// The services programmed at size `n` (see METHOD), measured ones last.
pub fn services(n: u32, pods: &[Pod], lb_ip: Ipv4Addr) -> Vec<SvcDef> {
    let eps = |port: u16| -> Vec<(Ipv4Addr, u16, String)> {
        pods.iter()
            .map(|p| (p.addr, port, p.node.clone()))
            .collect()
    };
    let mut v: Vec<SvcDef> = (0..n.saturating_sub(1))
        .map(|i| SvcDef {
            name: format!("dummy-{i:06}"),
            cluster_ip: Ipv4Addr::from(DUMMY_BASE + i),
            port: 80,
            endpoints: eps(80),
            node_port: None,
            lb_ip: None,
            udp: false,
        })
        .collect();
    let iperf = pods
        .iter()
        .find(|p| p.name == IPERF_POD)
        .expect("the seed's pod");
    v.push(SvcDef {
        name: "iperf".into(),
        cluster_ip: IPERF_CLUSTER_IP,
        port: IPERF_PORT,
        endpoints: vec![(iperf.addr, IPERF_PORT, iperf.node.clone())],
        node_port: Some(IPERF_NODE_PORT),
        lb_ip: Some(lb_ip),
        udp: false,
    });
    v.push(SvcDef {
        name: "measured".into(),
        cluster_ip: SVC_CLUSTER_IP,
        port: SVC_PORT,
        endpoints: eps(SVC_PORT),
        node_port: Some(SVC_NODE_PORT),
        lb_ip: Some(lb_ip),
        udp: false,
    });
    v
}

/// Arguments for ours' agents when `max_services` is the largest size measured: none (the
/// agent's defaults), except `--maglev-arena` when the default arena cannot hold that many
/// services' tables (see METHOD).
pub fn agent_args(max_services: u32) -> Vec<String> {
    // The measured service has the most endpoints (3); every service gets at most two
    // tables of that size, plus a margin for the iperf service and the free list.
    let m = lb_agent::dataplane::maglev::choose_m(3, lb_agent::dataplane::maglev::DEFAULT_MIN_M);
    let need = 2 * u64::from(m) * (u64::from(max_services) + 8);
    if need <= u64::from(lb_common::DEFAULT_MAGLEV_ARENA) {
        return vec![];
    }
    vec!["--maglev-arena".to_owned(), need.to_string()]
}

// ---------------------------------------------------------------- servers

pub fn start_responders(pods: &[Pod]) -> Result<Responders> {
    let mut r = Responders::new();
    for pod in pods {
        let netns = pod.netns.clone();
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            enter_netns(&netns)?;
            let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SVC_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("bind thread panicked"))?
        .with_context(|| format!("responder in pod {}", pod.name))?;
        r.serve_http(&listener, &pod.name, TCP_SERVER_THREADS, IO_TIMEOUT)?;
    }
    Ok(r)
}

/// A program started in a namespace with `ip netns exec`, its output discarded, for as long
/// as it lives; killed on drop. (`ip netns exec` execs the program: the child's pid is the
/// program's, so killing the child stops it.)
pub struct NetnsProcess(Child);

impl NetnsProcess {
    fn start(netns: &str, argv: &[&str], what: &str) -> Result<Self> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(Self(child))
    }

    /// `ping -i 1` from a namespace to a peer.
    pub fn pinger(netns: &str, peer: Ipv4Addr) -> Result<Self> {
        let peer = peer.to_string();
        Self::start(
            netns,
            &["ping", "-q", "-i", CHATTER_INTERVAL, &peer],
            "ping",
        )
    }

    /// `iperf3 -s` in a pod.
    pub fn iperf_server(pod_netns: &str) -> Result<Self> {
        let port = IPERF_PORT.to_string();
        Self::start(pod_netns, &["iperf3", "-s", "-p", &port], "iperf3 -s")
    }
}

impl Drop for NetnsProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------- clients

#[derive(Default)]
pub struct ConnRun {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub lat_us: Vec<f64>,
    pub by_pod: std::collections::BTreeMap<String, u64>,
    /// Exchanges slower than 5 ms, per answering pod.
    pub slow_by_pod: std::collections::BTreeMap<String, u64>,
    pub wall: Duration,
}

impl ConnRun {
    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

fn tcp_exchange(src: Ipv4Addr, to: SocketAddrV4, buf: &mut [u8]) -> std::io::Result<usize> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    sock.connect_timeout(&SocketAddr::V4(to).into(), IO_TIMEOUT)?;
    http::exchange(TcpStream::from(sock), buf, IO_TIMEOUT)
}

/// `count` connections from `threads` threads in `netns`, rotating over `targets`.
pub fn conn_run(
    netns: &str,
    src: Ipv4Addr,
    targets: &[SocketAddrV4],
    threads: usize,
    count: u32,
    pods: &[String],
) -> ConnRun {
    let barrier = Barrier::new(threads);
    let per_thread = count.div_ceil(threads as u32);
    let mut total = ConnRun::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut run = ConnRun::default();
                    if let Err(e) = enter_netns(netns) {
                        run.fail(format!("{e:#}"));
                        barrier.wait();
                        return run;
                    }
                    run.lat_us.reserve(per_thread as usize);
                    barrier.wait();
                    let t0 = Instant::now();
                    let mut buf = [0u8; 512];
                    for i in 0..per_thread as usize {
                        let to = targets[(i + t) % targets.len()];
                        let t1 = Instant::now();
                        match tcp_exchange(src, to, &mut buf) {
                            Ok(n) => {
                                let dt = t1.elapsed();
                                let body = buf[..n]
                                    .windows(4)
                                    .position(|w| w == b"\r\n\r\n")
                                    .map_or(&buf[..0], |i| &buf[i + 4..n]);
                                let body = body.strip_suffix(b"\n").unwrap_or(body);
                                match pods.iter().find(|p| p.as_bytes() == body) {
                                    Some(p) => {
                                        run.ok += 1;
                                        run.lat_us.push(dt.as_secs_f64() * 1e6);
                                        *run.by_pod.entry(p.clone()).or_default() += 1;
                                        if dt > Duration::from_millis(5) {
                                            *run.slow_by_pod.entry(p.clone()).or_default() += 1;
                                        }
                                    }
                                    None => run.fail(format!(
                                        "unexpected answer {:?}",
                                        String::from_utf8_lossy(&buf[..n])
                                    )),
                                }
                            }
                            Err(e) => run.fail(format!("{to}: {e}")),
                        }
                        if run.errors >= MAX_ERRORS {
                            break;
                        }
                    }
                    run.wall = t0.elapsed();
                    run
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => {
                    total.ok += r.ok;
                    total.errors += r.errors;
                    if total.first_error.is_none() {
                        total.first_error = r.first_error;
                    }
                    total.lat_us.extend(r.lat_us);
                    for (k, v) in r.by_pod {
                        *total.by_pod.entry(k).or_default() += v;
                    }
                    for (k, v) in r.slow_by_pod {
                        *total.slow_by_pod.entry(k).or_default() += v;
                    }
                    total.wall = total.wall.max(r.wall);
                }
                Err(_) => total.fail("client thread panicked".into()),
            }
        }
    });
    total
}

/// One iperf3 client run: received Gbit/s.
pub fn iperf_run(netns: &str, to: SocketAddrV4, streams: u32, seconds: f64) -> Result<f64> {
    let out = Command::new("timeout")
        .arg(format!("{}", (seconds + 20.0).ceil()))
        .args(["ip", "netns", "exec", netns, "iperf3", "-J", "-c"])
        .arg(to.ip().to_string())
        .arg("-p")
        .arg(to.port().to_string())
        .arg("-t")
        .arg(format!("{seconds}"))
        .arg("-P")
        .arg(streams.to_string())
        .args(["--connect-timeout", "3000"])
        .stdin(Stdio::null())
        .output()
        .context("running iperf3 -c")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 to {to}: no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error") {
        bail!("iperf3 to {to}: {e}");
    }
    ensure!(out.status.success(), "iperf3 to {to}: {}", out.status);
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 to {to}: no end.sum_received"))?;
    ensure!(bps > 0.0, "iperf3 to {to}: zero throughput");
    Ok(bps / 1e9)
}

// ---------------------------------------------------------------- the configurations

struct Setup {
    config: Config,
    // Drop order: servers, then XDP pass programs, then agents, then the network.
    _iperf: NetnsProcess,
    _responders: Responders,
    /// `--ceiling-xdp`: the pass program on both ends of the entry node's uplink.
    _pass: Option<(lb_agent::dataplane::datapath::Datapath, lb_tests::PinDir)>,
    cluster: Option<Cluster>,
    net: Option<Network>,
    client_ns: String,
    entry_ns: String,
    /// Every node namespace (conntrack flushes).
    node_ns: Vec<String>,
    pods: Vec<Pod>,
    conn_targets: Vec<(&'static str, Vec<SocketAddrV4>)>,
    client_addr: Ipv4Addr,
    _chatter: Vec<NetnsProcess>,
    iperf_targets: Vec<(&'static str, SocketAddrV4)>,
}

impl Setup {
    fn src(&self) -> Ipv4Addr {
        self.client_addr
    }

    fn net(&self) -> &Network {
        match &self.cluster {
            Some(c) => &c.net,
            None => self.net.as_ref().expect("network"),
        }
    }

    fn up(
        config: Config,
        spec: &TopologySpec,
        first: u32,
        agent_args: &[String],
        ceiling_xdp: bool,
    ) -> Result<Self> {
        let manifest = |net: &Network| {
            let (lb, _) = lb_and_entry(net);
            rules::manifest(&services(first, net.pods(), lb))
        };
        let (cluster, net) = match config {
            Config::Ours => {
                let c = crate::util::default_cluster(spec, manifest, agent_args)?;
                (Some(c), None)
            }
            Config::OursNative => {
                let mut args = agent_args.to_vec();
                args.extend(["--xdp-mode".to_owned(), "native".to_owned()]);
                let c = Cluster::up_with_args(spec, manifest, SourceMode::File, &args)?;
                (Some(c), None)
            }
            _ => (None, Some(Network::up(spec)?)),
        };
        let nw = cluster
            .as_ref()
            .map_or_else(|| net.as_ref().expect("network"), |c| &c.net);
        let pods = nw.pods().to_vec();
        let client_ns = nw.client_netns().to_owned();
        let entry = nw.node(ENTRY_NODE).clone();
        let (lb_ip, _) = lb_and_entry(nw);
        sysctl_in(&client_ns, "net/ipv4/ip_local_port_range", "1024 65535")?;
        let iperf_pod = pods
            .iter()
            .find(|p| p.name == IPERF_POD)
            .context("iperf pod")?
            .clone();
        let (conn_targets, iperf_targets) = if config == Config::Ceiling {
            // Through the entry node, like the load-balanced paths (which forward to the
            // remote pod's node from there).
            route_pods_via(nw, &client_ns, entry.addr)?;
            (
                vec![(
                    "direct",
                    pods.iter()
                        .map(|p| SocketAddrV4::new(p.addr, SVC_PORT))
                        .collect(),
                )],
                vec![("direct", SocketAddrV4::new(iperf_pod.addr, IPERF_PORT))],
            )
        } else {
            (
                vec![
                    (
                        "nodeport",
                        vec![SocketAddrV4::new(entry.addr, SVC_NODE_PORT)],
                    ),
                    ("lbip", vec![SocketAddrV4::new(lb_ip, SVC_PORT)]),
                ],
                vec![
                    ("nodeport", SocketAddrV4::new(entry.addr, IPERF_NODE_PORT)),
                    ("lbip", SocketAddrV4::new(lb_ip, IPERF_PORT)),
                ],
            )
        };
        // Nodes of a real cluster talk to each other and to their clients all the time;
        // idle namespaces would let neighbour entries age out (see METHOD).
        let mut chatter = Vec::new();
        for n in nw.nodes() {
            let peers = nw
                .nodes()
                .iter()
                .filter(|o| o.name != n.name)
                .map(|o| o.addr)
                .chain([nw.client_addr()]);
            for peer in peers {
                chatter.push(NetnsProcess::pinger(&n.netns, peer)?);
            }
        }
        let pass = if config == Config::Ceiling && ceiling_xdp {
            Some(attach_pass(nw, [&entry], "ceilxdp")?)
        } else {
            None
        };
        let responders = start_responders(&pods)?;
        let iperf = NetnsProcess::iperf_server(&iperf_pod.netns)?;
        let node_ns = nw.nodes().iter().map(|n| n.netns.clone()).collect();
        let client_addr = nw.client_addr();
        Ok(Self {
            config,
            _iperf: iperf,
            _responders: responders,
            _pass: pass,
            cluster,
            net,
            client_ns,
            entry_ns: entry.netns.clone(),
            node_ns,
            pods,
            conn_targets,
            client_addr,
            _chatter: chatter,
            iperf_targets,
        })
    }

    /// Programs `svcs`; returns (seconds, rules).
    fn program(&mut self, n: u32, svcs: &[SvcDef]) -> Result<(f64, usize)> {
        let t0 = Instant::now();
        match self.config {
            Config::Ours | Config::OursNative => {
                let c = self.cluster.as_mut().expect("cluster");
                c.write_manifest(&rules::manifest(svcs))?;
                let want = svcs.len();
                let local_ifaces: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|p| p.node == ENTRY_NODE)
                    .map(|p| p.host_iface.clone())
                    .collect();
                c.wait_for(&format!("{n} services"), Duration::from_secs(600), |s| {
                    let bench: Vec<_> = s
                        .services
                        .iter()
                        .filter(|x| x.name.starts_with(&format!("{}/", rules::NAMESPACE)))
                        .collect();
                    bench.len() == want
                        && bench.iter().all(|x| !x.endpoints.is_empty())
                        && s.agent.as_ref().is_some_and(|a| {
                            a.node_name != ENTRY_NODE
                                || local_ifaces.iter().all(|i| a.pod_ifaces.contains(i))
                        })
                })?;
                Ok((t0.elapsed().as_secs_f64(), 0))
            }
            Config::Iptables => {
                let (text, nat_rules) = rules::iptables_full(svcs);
                let path = tmp_file("iptables", &text)?;
                let t0 = Instant::now();
                exec_ok(&self.entry_ns, &["iptables-restore", &path])
                    .context("iptables-restore")?;
                let secs = t0.elapsed().as_secs_f64();
                let _ = std::fs::remove_file(&path);
                let saved = exec_ok(&self.entry_ns, &["iptables-save", "-t", "nat"])?;
                let got = saved.lines().filter(|l| l.starts_with("-A ")).count();
                ensure!(
                    got == nat_rules,
                    "iptables-restore: {got} nat rules, expected {nat_rules}"
                );
                Ok((secs, nat_rules))
            }
            Config::Nftables => {
                let text = rules::nft_full(svcs);
                let lines = text.lines().count();
                let path = tmp_file("nft", &text)?;
                let t0 = Instant::now();
                exec_ok(&self.entry_ns, &["nft", "-f", &path]).context("nft -f")?;
                let secs = t0.elapsed().as_secs_f64();
                let _ = std::fs::remove_file(&path);
                Ok((secs, lines))
            }
            Config::Ceiling => Ok((0.0, 0)),
        }
    }

    /// Empties the configuration's connection tracking and the pods' TIME_WAIT sockets.
    fn flush(&self) -> Result<()> {
        for p in &self.pods {
            exec_ok(&p.netns, &["ss", "-K", "-t", "state", "time-wait"])
                .with_context(|| format!("ss -K in {}", p.name))?;
        }
        match self.config {
            Config::Iptables | Config::Nftables => {
                for ns in &self.node_ns {
                    flush_conntrack(ns)?;
                }
            }
            Config::Ours | Config::OursNative => {
                for a in &self.cluster.as_ref().expect("cluster").agents {
                    clear_lru::<CtEntry>(&a.pin_dir, MAP_CT)?;
                    clear_lru::<CtEntry>(&a.pin_dir, MAP_CT_NEW)?;
                    clear_lru::<RevNat>(&a.pin_dir, MAP_REVNAT)?;
                }
            }
            Config::Ceiling => {}
        }
        Ok(())
    }
}

/// `xlb_xdp_pass` in native mode on both ends of the uplink of each of `nodes`, as ours has
/// (its load balancer on the node side, the pass program on the bridge side): the cost of
/// native XDP on a veth pair with no load balancing. Used by `--ceiling-xdp` (the entry
/// node) and the packet-rate part's routing-xdp diagnostic (every node).
pub fn attach_pass<'a>(
    net: &Network,
    nodes: impl IntoIterator<Item = &'a lb_tests::Node>,
    tag: &str,
) -> Result<(lb_agent::dataplane::datapath::Datapath, lb_tests::PinDir)> {
    use aya::programs::XdpMode;
    use lb_agent::dataplane::datapath::{Datapath, Limits};
    let pins = lb_tests::PinDir::new(tag)?;
    let mut dp = Datapath::load(
        pins.path(),
        &Limits {
            maglev_arena: 1,
            ct_entries: 1,
            ..Limits::default()
        },
    )?;
    let prog = dp.xdp(lb_common::PROG_XDP_PASS)?;
    for n in nodes {
        for (ns, iface) in [
            (net.kind_netns(), n.kind_side_iface.as_str()),
            (n.netns.as_str(), n.uplink.as_str()),
        ] {
            lb_tests::try_in_netns(ns, || prog.attach(iface, XdpMode::Driver))?
                .with_context(|| format!("attaching the pass program to {iface} in {ns}"))?;
        }
    }
    Ok((dp, pins))
}

/// Routes from the client namespace to every node's pod CIDR through `entry` (the
/// no-load-balancer paths reach the pods through the entry node, as the load-balanced ones
/// do).
pub fn route_pods_via(net: &Network, client_ns: &str, entry: Ipv4Addr) -> Result<()> {
    for n in net.nodes() {
        exec_ok(
            client_ns,
            &[
                "ip",
                "route",
                "add",
                &n.pod_cidr.to_string(),
                "via",
                &entry.to_string(),
            ],
        )?;
    }
    Ok(())
}

fn lb_and_entry(net: &Network) -> (Ipv4Addr, Ipv4Addr) {
    let lb = net
        .lb_ips()
        .first()
        .map(|(ip, _)| *ip)
        .expect("the seed topology has an LB IP");
    (lb, net.node(ENTRY_NODE).addr)
}

pub fn tmp_file(what: &str, text: &str) -> Result<String> {
    let path = std::env::temp_dir().join(format!(
        "xlb-bench-{}-{what}-{}.rules",
        std::process::id(),
        text.len()
    ));
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

pub fn clear_lru<V: aya::Pod>(pin_dir: &Path, name: &str) -> Result<()> {
    let data = MapData::from_pin(pin_dir.join(name))
        .with_context(|| format!("opening {name} in {}", pin_dir.display()))?;
    let mut map: BpfHashMap<MapData, FlowKey, V> = BpfHashMap::try_from(Map::LruHashMap(data))?;
    let keys: Vec<FlowKey> = map.keys().filter_map(|k| k.ok()).collect();
    for k in keys {
        let _ = map.remove(&k);
    }
    Ok(())
}

/// The whole north-south comparison.
pub fn run(args: &Args, configs: &[Config]) -> Result<NorthSouth> {
    let spec = TopologySpec::seed();
    let mut sizes = args.ns_services.clone();
    sizes.sort_unstable();
    sizes.dedup();
    ensure!(sizes.iter().all(|&n| n >= 1), "--ns-services must be >= 1");
    let ours_agent_args = agent_args(sizes.last().copied().unwrap_or(1));
    let mut out = NorthSouth {
        ours_agent_args: ours_agent_args.clone(),
        sizes: sizes.clone(),
        rounds: args.rounds,
        conns: args.conns,
        threads: args.threads,
        iperf_seconds: args.iperf_seconds,
        ceiling_xdp: args.ceiling_xdp,
        method: METHOD.iter().map(|m| (*m).to_owned()).collect(),
        ..Default::default()
    };
    eprintln!(
        "▶ north-south: bringing up {} networks ({}); ours' lb-agent flags: {}",
        configs.len(),
        configs
            .iter()
            .map(|c| c.key())
            .collect::<Vec<_>>()
            .join(", "),
        if ours_agent_args.is_empty() {
            "defaults".to_owned()
        } else {
            ours_agent_args.join(" ")
        }
    );
    let mut setups = Vec::new();
    for &c in configs {
        let t0 = Instant::now();
        setups.push(
            Setup::up(c, &spec, sizes[0], &ours_agent_args, args.ceiling_xdp)
                .with_context(|| format!("{} setup", c.key()))?,
        );
        eprintln!("  {} up in {:.1} s", c.key(), t0.elapsed().as_secs_f64());
    }
    let pod_names: Vec<String> = setups[0].pods.iter().map(|p| p.name.clone()).collect();
    for &n in &sizes {
        eprintln!("▶ north-south, {n} services: programming…");
        let mut active = Vec::new();
        for (i, s) in setups.iter_mut().enumerate() {
            let net = s.net();
            let (lb, _) = lb_and_entry(net);
            let svcs = services(n, net.pods(), lb);
            if s.config.is_ours() && svcs.len() > lb_common::DEFAULT_MAX_SERVICES as usize {
                let why = format!(
                    "ours at {n} services: lb-agent caps service ports at {} (lb_common::DEFAULT_MAX_SERVICES; no flag raises it)",
                    lb_common::DEFAULT_MAX_SERVICES
                );
                eprintln!("  skip: {why}");
                out.skipped.push(why);
                continue;
            }
            match s.program(n, &svcs) {
                Ok((secs, rules)) => {
                    eprintln!(
                        "  {:<9} programmed in {secs:.2} s{}",
                        s.config.key(),
                        if rules > 0 {
                            format!(" ({rules} rules)")
                        } else {
                            String::new()
                        }
                    );
                    out.programming.push(Programming {
                        config: s.config,
                        services: n,
                        seconds: secs,
                        rules,
                    });
                    active.push(i);
                }
                Err(e) => {
                    let f = format!(
                        "{} at {n} services: programming failed: {e:#}",
                        s.config.key()
                    );
                    eprintln!("  ✘ {f}");
                    out.failures.push(f);
                }
            }
        }
        // Warm-up: neighbours, caches, attachments.
        for &i in &active {
            let s = &setups[i];
            for (_, t) in &s.conn_targets {
                let _ = conn_run(&s.client_ns, s.src(), t, 1, 30, &pod_names);
            }
        }
        for round in 0..args.rounds {
            let order: Vec<usize> = if round % 2 == 0 {
                active.clone()
            } else {
                active.iter().rev().copied().collect()
            };
            for i in order {
                let s = &setups[i];
                measure(s, n, round, args, &pod_names, &mut out)?;
            }
        }
        for s in setups.iter().filter(|s| s.config.is_ours()) {
            let d = format!("after {n} services:{}", diagnostics(s));
            eprintln!("  ours {d}");
            out.ours_counters.push(d);
        }
    }
    drop(setups);
    Ok(out)
}

fn measure(
    s: &Setup,
    n: u32,
    round: usize,
    args: &Args,
    pods: &[String],
    out: &mut NorthSouth,
) -> Result<()> {
    let base = |workload: &str, path: &str| Sample {
        config: s.config,
        services: n,
        round,
        workload: workload.into(),
        path: path.into(),
        value: f64::NAN,
        p50_us: None,
        p99_us: None,
        ok: 0,
        errors: 0,
        first_error: None,
        slow_5ms: 0,
        by_pod: Default::default(),
        slow_by_pod: Default::default(),
    };
    for (path, targets) in &s.conn_targets {
        s.flush()?;
        let r = conn_run(
            &s.client_ns,
            s.src(),
            targets,
            args.threads,
            args.conns,
            pods,
        );
        let mut lat = r.lat_us.clone();
        lat.sort_by(f64::total_cmp);
        let mut smp = base("conn", path);
        smp.value = r.ok as f64 / r.wall.as_secs_f64().max(1e-9);
        smp.p50_us = Some(pct(&lat, 50.0));
        smp.p99_us = Some(pct(&lat, 99.0));
        smp.ok = r.ok;
        smp.errors = r.errors;
        smp.first_error = r.first_error.clone();
        smp.by_pod = r.by_pod.clone();
        smp.slow_5ms = lat.iter().filter(|&&l| l > 5000.0).count() as u64;
        smp.slow_by_pod = r.slow_by_pod.clone();
        eprintln!(
            "  r{round} {:<9} conn  {:<8} {:>8.0}/s  p50 {:>7.1} µs  p99 {:>8.1} µs  >5ms {:>4}  errors {}",
            s.config.key(),
            path,
            smp.value,
            smp.p50_us.unwrap_or(f64::NAN),
            smp.p99_us.unwrap_or(f64::NAN),
            smp.slow_5ms,
            r.errors
        );
        if smp.slow_5ms > 0 {
            eprintln!("      >5ms by pod: {:?}", smp.slow_by_pod);
        }
        let missing: Vec<&String> = pods.iter().filter(|p| !r.by_pod.contains_key(*p)).collect();
        // A dropped SYN now and then is real behaviour (e.g. a SNAT port landing on a server
        // TIME_WAIT entry within the same millisecond); a broken path fails in bulk.
        if r.errors * 1000 > u64::from(args.conns) * 5 || !missing.is_empty() {
            let f = format!(
                "{} conn via {path} at {n} services, round {round}: {} errors (first: {:?}), pods that never answered: {missing:?}{}",
                s.config.key(),
                r.errors,
                r.first_error,
                diagnostics(s)
            );
            eprintln!("  ✘ {f}");
            out.failures.push(f);
        }
        out.samples.push(smp);
    }
    for (path, to) in &s.iperf_targets {
        for streams in [1u32, 4] {
            s.flush()?;
            let mut smp = base(&format!("iperf{streams}"), path);
            match iperf_run(&s.client_ns, *to, streams, args.iperf_seconds) {
                Ok(g) => {
                    smp.value = g;
                    smp.ok = 1;
                    eprintln!(
                        "  r{round} {:<9} iperf{streams} {:<8} {g:>8.2} Gbit/s",
                        s.config.key(),
                        path
                    );
                }
                Err(e) => {
                    smp.errors = 1;
                    smp.first_error = Some(format!("{e:#}"));
                    let f = format!(
                        "{} iperf3 -P {streams} via {path} at {n} services, round {round}: {e:#}",
                        s.config.key()
                    );
                    eprintln!("  ✘ {f}");
                    out.failures.push(f);
                }
            }
            out.samples.push(smp);
        }
    }
    Ok(())
}

/// Agent counters (ours) for a failure report.
fn diagnostics(s: &Setup) -> String {
    let Some(c) = &s.cluster else {
        return String::new();
    };
    let mut d = String::new();
    for a in &c.agents {
        if let Ok(st) = a.status() {
            let nz: Vec<String> = st
                .counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            d += &format!("\n  {} counters: {}", a.node, nz.join(" "));
        }
        if let Ok(ct) = lb_tests::ct_counts(&a.pin_dir) {
            d += &format!("\n  {} conntrack: {ct}", a.node);
        }
    }
    d
}

/// Versions of the tools the comparison uses.
pub fn versions() -> Vec<(String, String)> {
    vec![
        ("iptables".into(), sh("iptables", &["--version"])),
        ("nft".into(), sh("nft", &["--version"])),
        (
            "iperf3".into(),
            sh("iperf3", &["--version"])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
    ]
}

/// Median of the samples of (config, services, workload, path); None if there are none.
pub fn med(
    samples: &[Sample],
    c: Config,
    n: u32,
    workload: &str,
    path: &str,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Option<f64> {
    let path = if c == Config::Ceiling { "direct" } else { path };
    let v: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.config == c
                && s.services == n
                && s.workload == workload
                && s.path == path
                // Functionally passing runs (iperf: no error; conn: <= 0.5% failed).
                && s.errors * 200 <= s.ok + s.errors
                && s.ok > 0
        })
        .filter_map(&f)
        .filter(|v| v.is_finite())
        .collect();
    (!v.is_empty()).then(|| median(v))
}
