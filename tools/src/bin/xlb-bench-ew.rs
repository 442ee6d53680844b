//! East-west benchmark, run by `cargo xtask bench` after `xlb-bench` with
//! `--only east-west --out-dir bench/east-west`: new connections per second and request
//! latency (p50/p99) from a pod to a ClusterIP, xlb's tc path vs kube-proxy-shaped iptables
//! rules on the same network, side by side in one run. (The XDP, Maglev and apply parts
//! of the first bench moved to `xlb-bench`; `--only` must name east-west.)
//!
//! Results go to stdout and, overwritten on every run, to `<out-dir>/RESULTS.md` and
//! `<out-dir>/results.json`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    sync::{Barrier, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use lb_common::*;
use lb_tests::{
    Cluster, ManifestOpts, NGINX_CLUSTER_IP, NGINX_NODE_PORT, Network, Pod, TopologySpec,
    agent_bin, exec_in, exec_ok, privileged_unavailable_reason, seed_manifests,
};
use serde::{Deserialize, Serialize};

/// xlb-bench's small helpers (conntrack flush and the like), shared rather than copied; this
/// binary uses only some of them.
#[path = "xlb-bench/util.rs"]
#[allow(dead_code)]
mod util;
use util::{command_line, cpu_model, enter_netns, flush_conntrack, median, sh, sysctl_in};

/// The same kube-proxy imitation as xlb-bench's north-south rules (chain names, the
/// iptables-restore skeleton), so both benches measure against the same rule set.
#[path = "xlb-bench/kube_proxy.rs"]
mod kube_proxy;
use kube_proxy::{IptService, ipt_service, iptables_restore_input};

/// The same HTTP exchange (responders and client) as xlb-bench's north-south part.
#[path = "xlb-bench/http.rs"]
mod http;
use http::Responders;

/// xlb-bench's XDP/Maglev result rows: this bench's results.json carries them over.
#[path = "xlb-bench/xdp_rows.rs"]
mod xdp_rows;
use xdp_rows::{ApplyRow, MaglevRow, PacketRow};

#[derive(Parser, Clone)]
#[command(
    name = "xlb-bench",
    about = "Per-packet cost of the xlb XDP datapath (BPF_PROG_TEST_RUN), Maglev builds, apply time, \
             east-west pod -> ClusterIP against kube-proxy-shaped iptables"
)]
struct Args {
    /// Run only these parts (comma separated); the other parts of bench/results.json are kept
    /// from the previous run. Default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Repeats of every measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Distinct flows per pass for the new/established figures (one test run per packet).
    #[arg(long, default_value_t = 20_000)]
    flows: u32,
    /// Repetitions of the in-kernel loop for the self-mapped established flow.
    #[arg(long, default_value_t = 100_000)]
    loop_repeat: u32,
    /// Numbers of services to program, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 1_000, 100_000])]
    services: Vec<u32>,
    /// Backends per service.
    #[arg(long, default_value_t = 3)]
    backends: u32,
    /// Where RESULTS.md and results.json are written.
    #[arg(long, default_value = "bench")]
    out_dir: String,
    /// East-west: seconds of load per repeat, per setup and protocol.
    #[arg(long, default_value_t = 3.0)]
    ew_seconds: f64,
    /// East-west: client threads in the client pod (at most 2: the machine has 2 cores).
    #[arg(long, default_value_t = 2)]
    ew_threads: usize,
    /// East-west: numbers of extra (dummy) ClusterIP services programmed next to the bench
    /// services, on both sides, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0, 1_000, 5_000])]
    ew_services: Vec<u32>,
    /// East-west: skip the UDP request/response measurement.
    #[arg(long)]
    ew_no_udp: bool,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    /// XDP per-packet cost and agent apply times.
    Xdp,
    /// Maglev table builds.
    Maglev,
    /// Pod -> ClusterIP connections: xlb's tc programs vs kube-proxy-shaped iptables.
    EastWest,
}

impl Args {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

// ---------------------------------------------------------------- results

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
struct Results {
    command: String,
    date: String,
    kernel: String,
    cpu: String,
    cpus: usize,
    /// Which run produced each part ("<command> @ <date>"): with `--only`, parts not run are
    /// carried over from the previous results.json.
    parts: BTreeMap<String, String>,
    repeats: usize,
    flows: u32,
    loop_repeat: u32,
    method: Vec<String>,
    packets: Vec<PacketRow>,
    apply: Vec<ApplyRow>,
    maglev: Vec<MaglevRow>,
    east_west: Option<EastWest>,
}

const METHOD: &[&str] = &[
    "All packet figures come from BPF_PROG_TEST_RUN; medians over the repeats.",
    "repeat=1 rows: one call per packet, each with a fresh copy; 'new' = first packet of each \
     distinct flow on an empty conntrack (miss -> Maglev -> CT insert), 'established' = the \
     same packets again (CT hit). The per-call figure includes the kernel's fixed timer \
     overhead, which the floor shows too: 'net' = ours - floor.",
    "The kernel's repeat loop reuses one buffer (run i+1 sees the output of run i), so a \
     translated packet stops matching after the first run; the loop row uses a self-mapped \
     local backend (backend address:port = frontend) so every repetition is a full \
     established-flow run on an unchanged packet.",
    "Every pass is checked against XLB_COUNTERS (ct_miss/ct_hit/fwd_local/fwd_remote) and the \
     return code.",
    "local = DNAT + XDP_PASS; remote = DNAT + SNAT + FIB lookup + XDP_TX (static neighbour in \
     a private netns).",
    "Per-packet cost does not depend on the Maglev table size M (one array lookup), so the \
     largest world uses a small M to fit the arena.",
];

// ---------------------------------------------------------------- main

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(reason) = privileged_unavailable_reason() {
        bail!("xlb-bench needs root (BPF programs, a network namespace): {reason}");
    }
    ensure!(args.repeats > 0, "--repeats must be at least 1");
    ensure!(args.flows > 0, "--flows must be at least 1");
    ensure!(args.backends > 0, "--backends must be at least 1");
    ensure!(
        (1..=2).contains(&args.ew_threads),
        "--ew-threads must be 1 or 2"
    );
    ensure!(args.ew_seconds > 0.0, "--ew-seconds must be positive");
    let started = Instant::now();
    // Before any thread exists: the agents of the east-west cluster get a larger Maglev
    // arena (through XLB_AGENT_BIN, see `agent_wrapper`) only if the default cannot hold
    // the largest world.
    let wrapper = if args.runs(Part::EastWest) {
        agent_wrapper(&args)?
    } else {
        None
    };

    let command = command_line();
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    let stamp = format!("{command} @ {date}");
    let out_dir = Path::new(&args.out_dir);
    let mut results = if args.only.is_empty() {
        Results::default()
    } else {
        previous_results(out_dir)
    };
    results.command = command;
    results.date = date;
    results.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    results.cpu = cpu_model();
    results.cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    results.method = METHOD.iter().map(|m| (*m).to_owned()).collect();

    // The XDP, Maglev and apply parts live in `xlb-bench`; this binary measures east-west.
    ensure!(
        !args.runs(Part::Xdp) && !args.runs(Part::Maglev),
        "xlb-bench-ew measures east-west only (run xlb-bench for the other parts)"
    );
    if args.runs(Part::EastWest) {
        let ew = east_west(&args);
        if let Some(wrapper) = &wrapper {
            let _ = std::fs::remove_file(wrapper);
        }
        results.east_west = Some(ew?);
        results.parts.insert("east-west".into(), stamp.clone());
    }

    print!("{}", render_text(&results));
    write_results(&results, out_dir)?;
    eprintln!(
        "✔ done in {:.1} s; results in {}/RESULTS.md and {}/results.json",
        started.elapsed().as_secs_f64(),
        args.out_dir,
        args.out_dir
    );
    Ok(())
}

/// The previous results.json, if it can be read (parts not run now are kept from it).
fn previous_results(dir: &Path) -> Results {
    std::fs::read_to_string(dir.join("results.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

fn addr(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v)
}

const EW_TCP_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 200, 1);
const EW_TCP_PORT: u16 = 8081;
const EW_UDP_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 200, 2);
const EW_UDP_PORT: u16 = 8082;
/// Dummy service i: ClusterIP `EW_DUMMY_BASE + i`, port 80, the same three pods (port 80).
const EW_DUMMY_BASE: u32 = u32::from_be_bytes([10, 100, 0, 1]);
const EW_NAMESPACE: &str = "bench";
/// The client pod, added on a worker that also runs backends (2 local, 1 remote).
const EW_CLIENT_POD: &str = "bench-client";
const EW_CLIENT_NODE: &str = "service-demo-worker";
/// kind's pod network (kube-proxy's --cluster-cidr).
const EW_CLUSTER_CIDR: &str = "10.244.0.0/16";
const EW_IO_TIMEOUT: Duration = Duration::from_secs(1);
/// Responder threads per pod for TCP (accept + read + write + close each).
const EW_TCP_SERVER_THREADS: usize = 2;
const EW_SETUP_OURS: &str = "xlb (tc on pod veths)";
const EW_SETUP_IPT: &str = "kube-proxy-shaped iptables";

#[derive(Serialize, Deserialize, Clone)]
struct EastWest {
    command: String,
    date: String,
    seconds_per_repeat: f64,
    client_threads: usize,
    repeats: usize,
    client: String,
    /// Backends of the bench services: (pod, node, local to the client?).
    backends: Vec<(String, String, bool)>,
    iptables: String,
    rows: Vec<EwRow>,
    ratios: Vec<EwRatio>,
    method: Vec<String>,
    /// Set when a setup failed functionally (connections failing through the ClusterIP).
    diagnostics: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone)]
struct EwRow {
    extra_services: u32,
    /// Rules in the nat table of the iptables setup (0 for ours).
    nat_rules: usize,
    proto: String,
    setup: String,
    /// Median over the repeats.
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
    /// Successful exchanges and failures, summed over the repeats.
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    /// Answers per pod, summed over the repeats.
    answered_by: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize, Clone)]
struct EwRatio {
    extra_services: u32,
    proto: String,
    /// ours / iptables.
    rate: f64,
    p50: f64,
    p99: f64,
}

const EW_METHOD: &[&str] = &[
    "Both setups are the same built-in kind-shaped network (seed topology: 3 nodes, nginx pods \
     4kq7x + 9xjtm on service-demo-worker, r2d8c on service-demo-worker2) plus a client pod \
     bench-client on service-demo-worker, built twice side by side: one with lb-agent on every \
     node (ClusterIP DNAT by tc on the pod veths), one without agents where every node's netns \
     gets kube-proxy-shaped iptables rules. Repeats alternate between the two (ABBA order).",
    "Servers: a Rust responder in each nginx pod's netns (2 threads accepting on :8081, reading \
     the request, writing a ~60-byte HTTP/1.0 response naming the pod, closing; UDP :8082 \
     answers each datagram with the pod name). The python pod servers are not used.",
    "Client: threads in bench-client's netns; TCP: connect + write request + read until the \
     server closes + close, per connection; UDP: a fresh socket per request (new flow, like a \
     DNS lookup), send, wait for the reply from the ClusterIP (connected socket). Latency is \
     per exchange; conns/s = successful exchanges / wall time of the repeat. Client, servers \
     and softirq share the machine's CPUs, so rate is whole-system throughput.",
    "iptables shape (per node, iptables-restore of nat + filter): PREROUTING/OUTPUT -> \
     KUBE-SERVICES -> one `-d clusterIP -p proto --dport` rule per service port -> KUBE-SVC-* \
     (`! -s 10.244.0.0/16 -j KUBE-MARK-MASQ`, then `-m statistic --mode random --probability \
     1/n` per endpoint) -> KUBE-SEP-* (`-s pod -j KUBE-MARK-MASQ` for hairpin, `-j DNAT \
     --to-destination pod:port`); POSTROUTING -> KUBE-POSTROUTING (MASQUERADE marked packets); \
     the filter table's KUBE-FORWARD / KUBE-SERVICES / KUBE-PROXY-FIREWALL jumps. The bench \
     service sits in the middle of KUBE-SERVICES (half the dummy services are walked before \
     it). Node conntrack tables are flushed (ctnetlink) before every iptables repeat.",
    "Extra services: N dummy ClusterIP services with the same three endpoints, in the agents' \
     manifest for ours and as KUBE-SVC/KUBE-SEP chains for iptables. The agents run with their \
     default flags (the default Maglev arena holds 16,384 services at M=1021; only a larger N \
     gets --maglev-arena).",
    "answered_by counts which pod answered, to show both local and remote backends are used.",
];

/// When the largest east-west world (2 tables of M = 1021 per service) does not fit the
/// agent's default Maglev arena: a shell script that runs the real agent with one large
/// enough, handed to `Cluster::up` through `XLB_AGENT_BIN`. Must run before any other
/// thread exists (it sets an environment variable).
fn agent_wrapper(args: &Args) -> Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt as _;
    let max = u64::from(args.ew_services.iter().copied().max().unwrap_or(0)) + 16;
    let need = 2 * u64::from(lb_agent::dataplane::maglev::DEFAULT_MIN_M) * max;
    if need <= u64::from(DEFAULT_MAGLEV_ARENA) {
        return Ok(None);
    }
    let real = agent_bin()?;
    let slots = need.next_power_of_two();
    let path = std::env::temp_dir().join(format!("xlb-bench-{}-agent.sh", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec '{}' \"$@\" --maglev-arena {slots}\n",
            real.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    // SAFETY: called from main before any other thread is started.
    unsafe { std::env::set_var("XLB_AGENT_BIN", &path) };
    Ok(Some(path))
}

/// One service as both setups program it.
struct SvcDef {
    name: String,
    cluster_ip: Ipv4Addr,
    port: u16,
    proto: &'static str,
    target_port: u16,
    /// (pod name, pod address, node)
    endpoints: Vec<(String, Ipv4Addr, String)>,
    node_port: Option<u16>,
    lb_ip: Option<Ipv4Addr>,
}

fn ew_services(backends: &[Pod], extra: u32) -> (Vec<SvcDef>, usize) {
    let eps = |_: ()| -> Vec<(String, Ipv4Addr, String)> {
        backends
            .iter()
            .map(|p| (p.name.clone(), p.addr, p.node.clone()))
            .collect()
    };
    let svc = |name: String, ip: Ipv4Addr, port: u16, proto, target_port| SvcDef {
        name,
        cluster_ip: ip,
        port,
        proto,
        target_port,
        endpoints: eps(()),
        node_port: None,
        lb_ip: None,
    };
    let mut v: Vec<SvcDef> = (0..extra)
        .map(|i| {
            svc(
                format!("dummy-{i:05}"),
                addr(EW_DUMMY_BASE + i),
                80,
                "TCP",
                80,
            )
        })
        .collect();
    // The bench services in the middle of KUBE-SERVICES: an average service's walk.
    let mid = v.len() / 2;
    v.insert(
        mid,
        svc(
            "bench-udp".into(),
            EW_UDP_IP,
            EW_UDP_PORT,
            "UDP",
            EW_UDP_PORT,
        ),
    );
    v.insert(
        mid,
        svc(
            "bench-tcp".into(),
            EW_TCP_IP,
            EW_TCP_PORT,
            "TCP",
            EW_TCP_PORT,
        ),
    );
    (v, mid)
}

/// The agents' manifest: the seed's services (nginx-service, ExternalName) with the three
/// nginx pods as endpoints, plus the bench and dummy services.
fn ew_manifest(net: &Network, backends: &[Pod], extra: u32) -> String {
    use std::fmt::Write as _;
    let opts = ManifestOpts {
        endpoints: Some(backends.iter().map(|p| p.name.clone()).collect()),
        ..Default::default()
    };
    let mut y = seed_manifests(net, &opts);
    for s in ew_services(backends, extra).0 {
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: {n}, namespace: {EW_NAMESPACE}}}\n  spec:\n    type: ClusterIP\n    clusterIP: {ip}\n    ports:\n    - {{name: p, port: {port}, protocol: {proto}, targetPort: {tp}}}\n- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {n}-x1\n    namespace: {EW_NAMESPACE}\n    labels: {{kubernetes.io/service-name: {n}}}\n  addressType: IPv4\n  ports:\n  - {{name: p, port: {tp}, protocol: {proto}}}\n  endpoints:\n",
            n = s.name,
            ip = s.cluster_ip,
            port = s.port,
            proto = s.proto,
            tp = s.target_port,
        );
        for (pod, ip, node) in &s.endpoints {
            let _ = write!(
                y,
                "  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    conditions: {{ready: true, serving: true, terminating: false}}\n    targetRef: {{kind: Pod, namespace: dev, name: {pod}}}\n"
            );
        }
    }
    y
}

/// iptables-restore input shaped like kube-proxy's iptables mode for `svcs` (plus the
/// seed's nginx-service). Returns the text and the number of nat rules.
fn kube_proxy_rules(svcs: &[SvcDef], backends: &[Pod], lb_ip: Option<Ipv4Addr>) -> (String, usize) {
    let nginx = SvcDef {
        name: "nginx-service".into(),
        cluster_ip: NGINX_CLUSTER_IP.parse().expect("constant"),
        port: 80,
        proto: "TCP",
        target_port: lb_tests::POD_HTTP_PORT,
        endpoints: backends
            .iter()
            .map(|p| (p.name.clone(), p.addr, p.node.clone()))
            .collect(),
        node_port: Some(NGINX_NODE_PORT),
        lb_ip,
    };
    let mut chains = String::new();
    // One nat rule an entry; each service's KUBE-SERVICES entry points ahead of its own
    // chains' rules (the order within every chain is kube-proxy's).
    let (mut rules, mut nodeports) = (vec![], vec![]);
    for (ns, s) in [("dev", &nginx)]
        .into_iter()
        .chain(svcs.iter().map(|s| (EW_NAMESPACE, s)))
    {
        let svc = ipt_service(
            &IptService {
                port_name: &format!("{ns}/{}:p", s.name),
                proto: &s.proto.to_ascii_lowercase(),
                cluster_ip: s.cluster_ip,
                port: s.port,
                node_port: s.node_port,
                lb_ip: s.lb_ip,
                endpoints: s
                    .endpoints
                    .iter()
                    .map(|(_, ip, _)| (*ip, s.target_port))
                    .collect(),
            },
            EW_CLUSTER_CIDR,
        );
        chains += &svc.chains;
        rules.extend(svc.entry);
        rules.extend(svc.rules);
        nodeports.extend(svc.nodeports);
    }
    rules.push(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into(),
    );
    iptables_restore_input(&chains, nodeports.into_iter().chain(rules))
}

/// Loads `rules` into every node namespace of `net` (a full replace of nat and filter, as
/// kube-proxy's sync does) and checks the nat rule count on one node.
fn load_iptables(net: &Network, rules: &str, nat_rules: usize) -> Result<()> {
    let path = std::env::temp_dir().join(format!("xlb-bench-{}-iptables.rules", net.tag()));
    std::fs::write(&path, rules)?;
    let p = path.to_string_lossy().into_owned();
    for node in net.nodes() {
        exec_ok(&node.netns, &["iptables-restore", &p])
            .with_context(|| format!("iptables-restore in {}", node.netns))?;
    }
    let _ = std::fs::remove_file(&path);
    let node = net.node(EW_CLIENT_NODE);
    let saved = exec_ok(&node.netns, &["iptables-save", "-t", "nat"])?;
    let got = saved.lines().filter(|l| l.starts_with("-A ")).count();
    ensure!(
        got == nat_rules,
        "iptables-restore: {got} nat rules in {}, expected {nat_rules}",
        node.netns
    );
    Ok(())
}

fn start_responders(pods: &[Pod]) -> Result<Responders> {
    let mut r = Responders::new();
    for pod in pods {
        let (netns, name) = (pod.netns.clone(), pod.name.clone());
        let (tx, rx) = std::sync::mpsc::channel::<Result<(TcpListener, UdpSocket)>>();
        std::thread::Builder::new()
            .name(format!("bind:{name}"))
            .spawn(move || {
                let bound = (|| -> Result<(TcpListener, UdpSocket)> {
                    enter_netns(&netns)?;
                    let l =
                        TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, EW_TCP_PORT))?;
                    l.set_nonblocking(true)?;
                    let u = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, EW_UDP_PORT))?;
                    u.set_read_timeout(Some(Duration::from_millis(100)))?;
                    Ok((l, u))
                })();
                let _ = tx.send(bound);
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("bind thread panicked"))?;
        // Sockets keep the namespace they were created in: serving threads need no setns.
        let (listener, udp) = rx
            .recv()?
            .with_context(|| format!("responder in pod {name}"))?;
        r.serve_http(&listener, &name, EW_TCP_SERVER_THREADS, EW_IO_TIMEOUT)?;
        // The UDP answer is the TCP response's body: the pod's name.
        let (stop, reply) = (r.stop.clone(), format!("{name}\n").into_bytes());
        r.threads.push(
            std::thread::Builder::new()
                .name(format!("udp:{name}"))
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                            let _ = udp.send_to(&reply, peer);
                        }
                    }
                })?,
        );
    }
    Ok(r)
}

/// What one load run saw.
#[derive(Default)]
struct LoadRun {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    lat_ns: Vec<u64>,
    by_pod: BTreeMap<String, u64>,
    wall: Duration,
}

impl LoadRun {
    fn merge(&mut self, o: LoadRun) {
        self.ok += o.ok;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.lat_ns.extend(o.lat_ns);
        for (k, v) in o.by_pod {
            *self.by_pod.entry(k).or_default() += v;
        }
        self.wall = self.wall.max(o.wall);
    }

    fn fail(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    fn rate(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Nearest-rank percentile in µs.
    fn pct_us(&self, sorted: &[u64], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank.min(sorted.len()) - 1] as f64 / 1e3
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto4 {
    Tcp,
    Udp,
}

/// `threads` client threads in `netns`, each doing exchanges back to back for `dur`.
fn load(netns: &str, proto: Proto4, threads: usize, dur: Duration, pods: &[String]) -> LoadRun {
    let barrier = Barrier::new(threads);
    let mut total = LoadRun::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut run = LoadRun::default();
                    if let Err(e) = enter_netns(netns) {
                        run.fail(format!("{e:#}"));
                        barrier.wait();
                        return run;
                    }
                    barrier.wait();
                    let t0 = Instant::now();
                    let deadline = t0 + dur;
                    let mut buf = [0u8; 512];
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let r = match proto {
                            Proto4::Tcp => tcp_exchange(&mut buf),
                            Proto4::Udp => udp_exchange(&mut buf),
                        };
                        let dt = t.elapsed();
                        match r {
                            Ok(n) => {
                                let body = match proto {
                                    Proto4::Tcp => buf[..n]
                                        .windows(4)
                                        .position(|w| w == b"\r\n\r\n")
                                        .map_or(&buf[..0], |i| &buf[i + 4..n]),
                                    Proto4::Udp => &buf[..n],
                                };
                                let body = body.strip_suffix(b"\n").unwrap_or(body);
                                match pods.iter().find(|p| p.as_bytes() == body) {
                                    Some(p) => {
                                        run.ok += 1;
                                        run.lat_ns.push(dt.as_nanos() as u64);
                                        *run.by_pod.entry(p.clone()).or_default() += 1;
                                    }
                                    None => run.fail(format!(
                                        "unexpected answer {:?}",
                                        String::from_utf8_lossy(&buf[..n])
                                    )),
                                }
                            }
                            Err(e) => run.fail(format!("{e}")),
                        }
                    }
                    run.wall = t0.elapsed();
                    run
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => total.merge(r),
                Err(_) => total.fail("client thread panicked".into()),
            }
        }
    });
    total
}

fn tcp_exchange(buf: &mut [u8]) -> std::io::Result<usize> {
    let to = SocketAddr::V4(SocketAddrV4::new(EW_TCP_IP, EW_TCP_PORT));
    let s = TcpStream::connect_timeout(&to, EW_IO_TIMEOUT)?;
    http::exchange(s, buf, EW_IO_TIMEOUT)
}

fn udp_exchange(buf: &mut [u8]) -> std::io::Result<usize> {
    let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    s.connect(SocketAddrV4::new(EW_UDP_IP, EW_UDP_PORT))?;
    s.set_read_timeout(Some(EW_IO_TIMEOUT))?;
    s.send(b"ping")?;
    s.recv(buf)
}

/// One side of the comparison.
struct EwSetup {
    label: &'static str,
    client: Pod,
    /// Per (extra services, proto): the repeats.
    runs: Vec<LoadRun>,
}

/// Medians over the repeats of one (setup, size, proto).
fn ew_row(extra: u32, nat_rules: usize, proto: Proto4, setup: &str, runs: &[LoadRun]) -> EwRow {
    let mut sum = LoadRun::default();
    let (mut rate, mut p50, mut p99) = (vec![], vec![], vec![]);
    for r in runs {
        let mut lat = r.lat_ns.clone();
        lat.sort_unstable();
        rate.push(r.rate());
        p50.push(r.pct_us(&lat, 50.0));
        p99.push(r.pct_us(&lat, 99.0));
        sum.ok += r.ok;
        sum.errors += r.errors;
        if sum.first_error.is_none() {
            sum.first_error = r.first_error.clone();
        }
        for (k, v) in &r.by_pod {
            *sum.by_pod.entry(k.clone()).or_default() += v;
        }
    }
    EwRow {
        extra_services: extra,
        nat_rules,
        proto: match proto {
            Proto4::Tcp => "tcp",
            Proto4::Udp => "udp",
        }
        .into(),
        setup: setup.into(),
        per_second: median(rate),
        p50_us: median(p50),
        p99_us: median(p99),
        ok: sum.ok,
        errors: sum.errors,
        first_error: sum.first_error,
        answered_by: sum.by_pod,
    }
}

/// Datapath state of the client's node and kernel counters, for a failing "ours" run.
fn ours_diagnostics(c: &Cluster, client: &Pod) -> String {
    let mut s = String::new();
    for a in &c.agents {
        match a.status() {
            Ok(st) => {
                let nz: Vec<String> = st
                    .counters
                    .iter()
                    .filter(|(_, v)| **v > 0)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                s += &format!(
                    "lb-agent status --pin-dir {}: counters {}\n",
                    a.pin_dir.display(),
                    nz.join(" ")
                );
                if let Some(info) = &st.agent {
                    s += &format!(
                        "  pod interfaces {:?}, last error {:?}\n",
                        info.pod_ifaces, info.last_error
                    );
                }
                for svc in st.services.iter().filter(|x| x.name.contains("bench-")) {
                    s += &format!(
                        "  {} {:?}:{:?}/{} endpoints {:?} packets {} flows {} rejects {}\n",
                        svc.name,
                        svc.cluster_ip,
                        svc.port,
                        svc.protocol,
                        svc.endpoints,
                        svc.packets,
                        svc.new_flows,
                        svc.rejects
                    );
                }
            }
            Err(e) => s += &format!("status of {}: {e:#}\n", a.node),
        }
        let log = a.log_text();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        s += &format!("  log tail: {:?}\n", tail.iter().rev().collect::<Vec<_>>());
    }
    for (what, ns) in [
        ("client pod", client.netns.as_str()),
        ("client node", c.net.node(&client.node).netns.as_str()),
    ] {
        if let Ok(out) = exec_in(ns, &["nstat", "-as"]) {
            let text = String::from_utf8_lossy(&out.stdout);
            let keep: Vec<&str> = text
                .lines()
                .filter(|l| {
                    [
                        "TcpActiveOpens",
                        "TcpAttemptFails",
                        "TcpRetransSegs",
                        "TcpOutRsts",
                        "TcpExtTCPTimeouts",
                        "IpInNoRoutes",
                        "IpInAddrErrors",
                        "IpOutNoRoutes",
                        "UdpNoPorts",
                        "UdpInErrors",
                        "IcmpInDestUnreachs",
                        "IpForwDatagrams",
                        "IpInDiscards",
                    ]
                    .iter()
                    .any(|k| l.starts_with(k))
                })
                .collect();
            s += &format!("nstat {what}: {}\n", keep.join(" | "));
        }
    }
    s
}

/// Builds both setups, then for every size measures TCP (and UDP) through each, alternating.
fn east_west(args: &Args) -> Result<EastWest> {
    let spec = TopologySpec::seed();
    let dur = Duration::from_secs_f64(args.ew_seconds);
    let mut sizes = args.ew_services.clone();
    sizes.sort_unstable();
    sizes.dedup();

    eprintln!("▶ east-west: bringing up the cluster with agents and the iptables twin…");
    // The backends: the seed's nginx pods (before the client pod exists).
    let mut backends: Vec<Pod> = Vec::new();
    let mut ours = Cluster::up(&spec, |net| {
        backends = net.pods().to_vec();
        ew_manifest(net, net.pods(), sizes[0])
    })?;
    let ours_client = ours.net.add_pod(EW_CLIENT_NODE, EW_CLIENT_POD)?;
    let mut ipt = Network::up(&spec)?;
    let ipt_client = ipt.add_pod(EW_CLIENT_NODE, EW_CLIENT_POD)?;
    let ipt_backends: Vec<Pod> = ipt
        .pods()
        .iter()
        .filter(|p| p.name != EW_CLIENT_POD)
        .cloned()
        .collect();
    let shape = |v: &[Pod]| -> Vec<(String, Ipv4Addr, String)> {
        v.iter()
            .map(|p| (p.name.clone(), p.addr, p.node.clone()))
            .collect()
    };
    ensure!(
        shape(&ipt_backends) == shape(&backends) && ipt_client.addr == ours_client.addr,
        "the two networks differ: {ipt_backends:?} vs {backends:?}"
    );
    let pod_names: Vec<String> = backends.iter().map(|p| p.name.clone()).collect();
    // Same client settings on both sides: a wide ephemeral range (tens of thousands of
    // connections per repeat).
    for c in [&ours_client, &ipt_client] {
        sysctl_in(&c.netns, "net/ipv4/ip_local_port_range", "1024 65535")?;
    }
    let _servers = (
        start_responders(&backends)?,
        start_responders(&ipt_backends)?,
    );
    let iptables_version = sh("iptables", &["--version"]);
    let lb_ip = ipt.lb_ips().first().map(|(ip, _)| *ip);
    let protos: Vec<Proto4> = if args.ew_no_udp {
        vec![Proto4::Tcp]
    } else {
        vec![Proto4::Tcp, Proto4::Udp]
    };

    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    let mut diagnostics = Vec::new();
    for &extra in &sizes {
        eprintln!("▶ east-west, {extra} extra services: programming both setups…");
        let t0 = Instant::now();
        ours.write_manifest(&ew_manifest(&ours.net, &backends, extra))?;
        let want = extra as usize + 2;
        let client_iface = ours_client.host_iface.clone();
        ours.wait_for("the bench services", Duration::from_secs(300), |s| {
            let bench: Vec<_> = s
                .services
                .iter()
                .filter(|x| x.name.starts_with(&format!("{EW_NAMESPACE}/")))
                .collect();
            bench.len() == want
                && bench.iter().all(|x| x.endpoints.len() == 3)
                && s.agent.as_ref().is_some_and(|a| {
                    a.node_name != EW_CLIENT_NODE || a.pod_ifaces.contains(&client_iface)
                })
        })?;
        let t_ours = t0.elapsed();
        let t0 = Instant::now();
        let (svcs, _) = ew_services(&ipt_backends, extra);
        let (rules, nat_rules) = kube_proxy_rules(&svcs, &ipt_backends, lb_ip);
        load_iptables(&ipt, &rules, nat_rules)?;
        eprintln!(
            "  agents programmed in {:.1} s; iptables-restore ({nat_rules} nat rules) on 3 nodes in {:.1} s",
            t_ours.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
        let ipt_nodes: Vec<String> = ipt.nodes().iter().map(|n| n.netns.clone()).collect();
        for &proto in &protos {
            let mut setups = [
                EwSetup {
                    label: EW_SETUP_OURS,
                    client: ours_client.clone(),
                    runs: vec![],
                },
                EwSetup {
                    label: EW_SETUP_IPT,
                    client: ipt_client.clone(),
                    runs: vec![],
                },
            ];
            // Warm-up (caches, neighbours, the pod interface attachments).
            for s in &setups {
                let _ = load(
                    &s.client.netns,
                    proto,
                    1,
                    Duration::from_millis(300),
                    &pod_names,
                );
            }
            for r in 0..args.repeats {
                let order: [usize; 2] = if r % 2 == 0 { [0, 1] } else { [1, 0] };
                for i in order {
                    let s = &mut setups[i];
                    if s.label == EW_SETUP_IPT {
                        for ns in &ipt_nodes {
                            flush_conntrack(ns)?;
                        }
                    }
                    let run = load(&s.client.netns, proto, args.ew_threads, dur, &pod_names);
                    let mut lat = run.lat_ns.clone();
                    lat.sort_unstable();
                    eprintln!(
                        "  {:>4} {:<28} repeat {}: {:>8.0}/s  p50 {:>7.1} µs  p99 {:>8.1} µs  errors {}  {:?}",
                        if proto == Proto4::Tcp { "tcp" } else { "udp" },
                        s.label,
                        r + 1,
                        run.rate(),
                        run.pct_us(&lat, 50.0),
                        run.pct_us(&lat, 99.0),
                        run.errors,
                        run.by_pod
                    );
                    s.runs.push(run);
                }
            }
            let row_ours = ew_row(extra, 0, proto, EW_SETUP_OURS, &setups[0].runs);
            let row_ipt = ew_row(extra, nat_rules, proto, EW_SETUP_IPT, &setups[1].runs);
            for row in [&row_ours, &row_ipt] {
                let missing: Vec<&String> = pod_names
                    .iter()
                    .filter(|p| !row.answered_by.contains_key(*p))
                    .collect();
                if row.errors > 0 || !missing.is_empty() {
                    let mut d = format!(
                        "{} {} with {extra} extra services: {} errors (first: {:?}), pods that never answered: {missing:?}",
                        row.setup, row.proto, row.errors, row.first_error
                    );
                    if row.setup == EW_SETUP_OURS {
                        d += "\n";
                        d += &ours_diagnostics(&ours, &ours_client);
                    }
                    eprintln!("  ✘ {d}");
                    diagnostics.push(d);
                }
            }
            ratios.push(EwRatio {
                extra_services: extra,
                proto: row_ours.proto.clone(),
                rate: row_ours.per_second / row_ipt.per_second,
                p50: row_ours.p50_us / row_ipt.p50_us,
                p99: row_ours.p99_us / row_ipt.p99_us,
            });
            rows.push(row_ours);
            rows.push(row_ipt);
        }
    }
    drop(_servers);
    Ok(EastWest {
        command: command_line(),
        date: sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
        seconds_per_repeat: args.ew_seconds,
        client_threads: args.ew_threads,
        repeats: args.repeats,
        client: format!("{EW_CLIENT_POD} ({}) on {EW_CLIENT_NODE}", ours_client.addr),
        backends: backends
            .iter()
            .map(|p| (p.name.clone(), p.node.clone(), p.node == EW_CLIENT_NODE))
            .collect(),
        iptables: iptables_version,
        rows,
        ratios,
        method: EW_METHOD.iter().map(|m| (*m).to_owned()).collect(),
        diagnostics,
    })
}

// ---------------------------------------------------------------- output

/// A table in the condensed preset (as printed; `markdown_table` re-presets it).
fn table(header: Vec<&str>, rows: impl IntoIterator<Item = Vec<String>>) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    for row in rows {
        t.add_row(row);
    }
    t
}

fn packet_table(r: &Results) -> Table {
    table(
        PacketRow::HEADER.to_vec(),
        r.packets.iter().map(PacketRow::cells),
    )
}

fn apply_table(r: &Results) -> Table {
    table(
        ApplyRow::HEADER.to_vec(),
        r.apply.iter().map(ApplyRow::cells),
    )
}

fn maglev_table(r: &Results) -> Table {
    table(
        vec!["M", "backends", "build ms"],
        r.maglev.iter().map(MaglevRow::cells),
    )
}

fn ew_table(e: &EastWest) -> Table {
    table(
        vec![
            "extra services",
            "proto",
            "setup",
            "nat rules",
            "conns/s",
            "p50 µs",
            "p99 µs",
            "errors",
            "answered by (local+local/remote)",
        ],
        e.rows.iter().map(|r| {
            let by: Vec<String> = e
                .backends
                .iter()
                .map(|(pod, _, _)| r.answered_by.get(pod).copied().unwrap_or(0).to_string())
                .collect();
            vec![
                r.extra_services.to_string(),
                r.proto.clone(),
                r.setup.clone(),
                if r.nat_rules > 0 {
                    r.nat_rules.to_string()
                } else {
                    "-".into()
                },
                format!("{:.0}", r.per_second),
                format!("{:.1}", r.p50_us),
                format!("{:.1}", r.p99_us),
                format!("{} / {}", r.errors, r.ok + r.errors),
                by.join(" / "),
            ]
        }),
    )
}

fn ew_ratio_table(e: &EastWest) -> Table {
    table(
        vec![
            "extra services",
            "proto",
            "conns/s ours/iptables",
            "p50 ours/iptables",
            "p99 ours/iptables",
        ],
        e.ratios.iter().map(|r| {
            vec![
                r.extra_services.to_string(),
                r.proto.clone(),
                format!("{:.2}x", r.rate),
                format!("{:.2}x", r.p50),
                format!("{:.2}x", r.p99),
            ]
        }),
    )
}

fn ew_header(e: &EastWest) -> Vec<String> {
    let backends: Vec<String> = e
        .backends
        .iter()
        .map(|(p, n, local)| format!("{p} on {n} ({})", if *local { "local" } else { "remote" }))
        .collect();
    vec![
        format!("command: `{}` ({})", e.command, e.date),
        format!(
            "{} repeats (medians) of {:.1} s per setup and protocol, {} client thread(s), setups alternating",
            e.repeats, e.seconds_per_repeat, e.client_threads
        ),
        format!("client: {}", e.client),
        format!("backends: {}", backends.join(", ")),
        format!("iptables: {}", e.iptables),
    ]
}

fn header_lines(r: &Results) -> Vec<String> {
    let mut v = vec![
        format!("command: {}", r.command),
        format!("date: {}", r.date),
        format!("kernel: {}", r.kernel),
        format!("cpu: {} ({} CPUs)", r.cpu, r.cpus),
    ];
    if !r.packets.is_empty() {
        v.push(format!(
            "XDP/apply: repeats: {} (medians), flows per pass: {}, loop repeat: {}",
            r.repeats, r.flows, r.loop_repeat
        ));
    }
    for (part, from) in &r.parts {
        v.push(format!("{part}: from `{from}`"));
    }
    v
}

fn render_text(r: &Results) -> String {
    let mut s = String::new();
    for l in header_lines(r) {
        s += &format!("{l}\n");
    }
    if !r.packets.is_empty() {
        s += &format!("\nXDP per-packet cost\n{}\n", packet_table(r));
        s += &format!("\nagent apply (first programming)\n{}\n", apply_table(r));
    }
    if !r.maglev.is_empty() {
        s += &format!("\nMaglev table build\n{}\n", maglev_table(r));
    }
    if let Some(e) = &r.east_west {
        s += "\neast-west: pod -> ClusterIP, xlb vs kube-proxy-shaped iptables\n";
        for l in ew_header(e) {
            s += &format!("{l}\n");
        }
        s += &format!("{}\n{}\n", ew_table(e), ew_ratio_table(e));
        for d in &e.diagnostics {
            s += &format!("FAILURE: {d}\n");
        }
    }
    s += "\nmethod:\n";
    if !r.packets.is_empty() {
        for m in &r.method {
            s += &format!("- {m}\n");
        }
    }
    if let Some(e) = &r.east_west {
        for m in &e.method {
            s += &format!("- east-west: {m}\n");
        }
    }
    s
}

fn markdown_table(t: &Table) -> String {
    // comfy-table's ASCII_MARKDOWN preset prints a GitHub table.
    let mut t = t.clone();
    t.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    t.to_string()
}

fn render_markdown(r: &Results) -> String {
    let mut s = String::from(
        "# xlb benchmark results\n\nWritten by `xlb-bench` (run by `cargo xtask bench`); overwritten on every run \
         (with `--only`, the parts not run are kept from the previous run).\n\n",
    );
    s += &format!("- command: `{}`\n", r.command);
    for l in header_lines(r).iter().skip(1) {
        s += &format!("- {l}\n");
    }
    if !r.packets.is_empty() {
        s += &format!(
            "\n## XDP per-packet cost\n\n{}\n",
            markdown_table(&packet_table(r))
        );
        s += &format!(
            "\n## Agent apply (first programming)\n\n{}\n",
            markdown_table(&apply_table(r))
        );
    }
    if !r.maglev.is_empty() {
        s += &format!(
            "\n## Maglev table build\n\n{}\n",
            markdown_table(&maglev_table(r))
        );
    }
    if let Some(e) = &r.east_west {
        s += "\n## East-west: pod -> ClusterIP, xlb vs kube-proxy-shaped iptables\n\n";
        for l in ew_header(e) {
            s += &format!("- {l}\n");
        }
        s += &format!(
            "\n{}\n\nRatios (ours / iptables; conns/s above 1 and latency below 1 favour xlb):\n\n{}\n",
            markdown_table(&ew_table(e)),
            markdown_table(&ew_ratio_table(e))
        );
        if !e.diagnostics.is_empty() {
            s += "\n### Failures\n\n";
            for d in &e.diagnostics {
                s += &format!("```\n{d}\n```\n");
            }
        }
        s += "\n### East-west method\n\n";
        for m in &e.method {
            s += &format!("- {m}\n");
        }
    }
    if !r.packets.is_empty() {
        s += "\n## Method (XDP)\n\n";
        for m in &r.method {
            s += &format!("- {m}\n");
        }
    }
    s
}

fn write_results(r: &Results, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let md = dir.join("RESULTS.md");
    std::fs::write(&md, render_markdown(r)).with_context(|| md.display().to_string())?;
    let json = dir.join("results.json");
    std::fs::write(&json, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| json.display().to_string())?;
    Ok(())
}
