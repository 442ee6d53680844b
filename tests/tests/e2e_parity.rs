//! kube-proxy parity with real TCP traffic on the built-in network (seed topology plus two
//! client pods: `curl-cp` on the control plane, which has no endpoint, and `curl-w2` on
//! `service-demo-worker2`). One test per behaviour, each on its own cluster; every check
//! looks at which pods answered over many connections, which source address the backend
//! saw (`X-Client`), and refusal (RST within 1 s) versus silence (no answer in time).
//!
//! 1. externalTrafficPolicy: Local seen from inside: a pod on a node without a local
//!    endpoint reaches every endpoint through the LB IP and its node's NodePort with its
//!    own address; a node process (socket hooks) reaches every endpoint from a node
//!    address; from outside, that node's NodePort is silent, a node with local endpoints
//!    serves only those with the client's address.
//! 2. loadBalancerSourceRanges from pods and node processes.
//! 3. Reject vs drop under Local policies (internal from pods, external from outside).
//! 4. A ClusterIP reached from outside the node (routed to a node), and an address of a
//!    `ServiceCIDR` no Service holds: silent from outside and from a pod.
//! 5. Topology hints (`trafficDistribution: PreferClose`, zones from `kind: Node`).
//! 6. `--nodeport-addresses` with a CIDR that leaves out the nodes' primary addresses.
//! 7. `ipMode: Proxy` leaves the LB IP unprogrammed; `ipMode: VIP` programs it.
//! 8. The node health server on :10256 (`/healthz`, `/livez`), and a Node being deleted.
//! 9. Node processes (socket hooks) where kube-proxy drops in the output path (a TCP
//!    client sees silence, not EPERM) and where it rejects.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::*;

const CONTROL_PLANE: &str = "service-demo-control-plane";
const WORKER: &str = "service-demo-worker";
const WORKER2: &str = "service-demo-worker2";
/// Client pods (they run the pod server too, but are never endpoints).
const CURL_CP: &str = "curl-cp";
const CURL_W2: &str = "curl-w2";

const WEB_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 1);
const NP: u16 = 30500;
const HC: u16 = 32100;
const HEALTHZ_PORT: u16 = 10256;
/// Connections per spread check.
const N: usize = 40;
/// Timeout of a request expected to be served.
const SERVE_T: Duration = Duration::from_secs(3);
/// How long "no answer" must last to count as silence (a drop).
const SILENCE_T: Duration = Duration::from_secs(2);
/// A refusal must come within this.
const REFUSE_WITHIN: Duration = Duration::from_secs(1);
/// How long programming may take to show in the traffic.
const SETTLE: Duration = Duration::from_secs(15);

const READY: &str = "{ready: true, serving: true, terminating: false}";
const NOT_SERVING: &str = "{ready: false, serving: false, terminating: false}";

/// The seed topology plus the client pods.
fn spec() -> TopologySpec {
    let mut s = TopologySpec::seed();
    for n in &mut s.nodes {
        if n.name == CONTROL_PLANE {
            n.pods.push(CURL_CP.into());
        }
        if n.name == WORKER2 {
            n.pods.push(CURL_W2.into());
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// Manifests: multi-document YAML.

/// A Service `name` in `dev`, port 80 -> pods:80 (TCP), `extra` spec lines (each
/// `  key: value\n`), `status` (a whole `status: ...\n` line or empty).
fn svc(name: &str, cip: Ipv4Addr, node_port: Option<u16>, extra: &str, status: &str) -> String {
    let np = node_port
        .map(|p| format!(", nodePort: {p}"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: dev}}\nspec:\n  clusterIP: {cip}\n  ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP{np}}}]\n{extra}{status}"
    )
}

/// `status.loadBalancer.ingress` with one address and an optional ipMode.
fn lb_status(ip: Ipv4Addr, ip_mode: Option<&str>) -> String {
    let mode = ip_mode
        .map(|m| format!(", ipMode: {m}"))
        .unwrap_or_default();
    format!("status: {{loadBalancer: {{ingress: [{{ip: {ip}{mode}}}]}}}}\n")
}

/// One endpoint entry of an EndpointSlice.
fn ep(p: &Pod, conditions: &str, zone_hint: Option<&str>) -> String {
    let hints = zone_hint
        .map(|z| format!("  hints: {{forZones: [{{name: {z}}}]}}\n"))
        .unwrap_or_default();
    format!(
        "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {conditions}\n  targetRef: {{kind: Pod, namespace: dev, name: {}}}\n{hints}",
        p.addr, p.node, p.name
    )
}

/// The EndpointSlice of Service `svc` with the given endpoint entries.
fn slice(svc: &str, eps: &[String]) -> String {
    let eps = if eps.is_empty() {
        "endpoints: []\n".to_string()
    } else {
        format!("endpoints:\n{}", eps.concat())
    };
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {svc}-1, namespace: dev, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{name: http, port: 80, protocol: TCP}}]\n{eps}"
    )
}

/// Every backend pod (the seed's nginx pods) with `conditions`, no hints.
fn all_eps(net: &Network, conditions: &str) -> Vec<String> {
    backends(net)
        .iter()
        .map(|p| ep(p, conditions, None))
        .collect()
}

fn node_doc(name: &str, zone: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
    )
}

fn service_cidr_doc(cidr: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {{name: kubernetes}}\nspec: {{cidrs: [\"{cidr}\"]}}\n"
    )
}

// ---------------------------------------------------------------------------------------
// The network.

fn backends(net: &Network) -> Vec<&Pod> {
    net.pods()
        .iter()
        .filter(|p| p.name.starts_with("nginx-"))
        .collect()
}

fn backend_names(net: &Network) -> BTreeSet<String> {
    backends(net).iter().map(|p| p.name.clone()).collect()
}

fn backends_on(net: &Network, node: &str) -> BTreeSet<String> {
    backends(net)
        .iter()
        .filter(|p| p.node == node)
        .map(|p| p.name.clone())
        .collect()
}

fn node_addrs(net: &Network) -> BTreeSet<Ipv4Addr> {
    net.nodes().iter().map(|n| n.addr).collect()
}

fn lb_ip(net: &Network) -> Ipv4Addr {
    net.lb_ips()[0].0
}

fn up(manifest: impl FnOnce(&Network) -> String) -> Cluster {
    up_args(manifest, &[])
}

fn up_args(manifest: impl FnOnce(&Network) -> String, extra: &[String]) -> Cluster {
    Cluster::up_with_args(&spec(), manifest, SourceMode::File, extra).expect("cluster up")
}

/// Waits until every agent has a port of each Service in `names` (namespace dev) and,
/// when `local` is set, some node-local scope (a Local traffic policy).
fn wait_services(c: &mut Cluster, names: &[&str], local: bool) {
    let prefixes: Vec<String> = names.iter().map(|n| format!("dev/{n}:")).collect();
    c.wait_for("services programmed", Duration::from_secs(20), |s| {
        prefixes
            .iter()
            .all(|p| s.services.iter().any(|x| x.name.starts_with(p.as_str())))
            && (!local || s.services.iter().any(|x| x.name.ends_with("(local)")))
    })
    .unwrap();
}

// ---------------------------------------------------------------------------------------
// Traffic.

/// Where a connection starts.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// A thread in a namespace: the outside client, or a pod (tc on its veth).
    Ns(&'a str),
    /// A process of the node, in its cgroup (socket hooks).
    Node(&'a Node),
}

impl Src<'_> {
    fn name(&self) -> String {
        match self {
            Src::Ns(ns) => format!("netns {ns}"),
            Src::Node(n) => format!("node process on {}", n.name),
        }
    }
}

/// What one connection got.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// A pod answered; `client` is the source address it saw.
    Served { pod: String, client: Ipv4Addr },
    /// Connection refused, after this long.
    Refused(Duration),
    /// No answer within the timeout.
    Silent,
    /// The socket hook refused the connect with EPERM, after this long (a node process
    /// where kube-proxy drops: see the test below).
    Denied(Duration),
    /// Anything else (unreachable, EPERM, bad response ...).
    Failed(String),
}

impl Outcome {
    fn served(&self) -> bool {
        matches!(self, Outcome::Served { .. })
    }

    fn refused_fast(&self) -> bool {
        matches!(self, Outcome::Refused(d) if *d < REFUSE_WITHIN)
    }

    fn silent(&self) -> bool {
        *self == Outcome::Silent
    }

    fn denied_fast(&self) -> bool {
        matches!(self, Outcome::Denied(d) if *d < REFUSE_WITHIN)
    }
}

fn from_response(r: &HttpResponse) -> Outcome {
    let pod = r.header("X-Pod-Name").map(str::to_owned);
    let client = r
        .header("X-Client")
        .and_then(|c| c.parse::<SocketAddrV4>().ok())
        .map(|a| *a.ip());
    match (r.status, pod, client) {
        (200, Some(pod), Some(client)) => Outcome::Served { pod, client },
        _ => Outcome::Failed(format!("unexpected response {r:?}")),
    }
}

/// One `GET /` to `addr` from `src`, classified.
fn probe(src: Src, addr: SocketAddrV4, timeout: Duration) -> Outcome {
    let t0 = Instant::now();
    match src {
        Src::Ns(ns) => match http_request(ns, addr, "/", timeout) {
            Ok(r) => from_response(&r),
            Err(e) => {
                let elapsed = t0.elapsed();
                for cause in e.chain() {
                    if let Some(io) = cause.downcast_ref::<std::io::Error>() {
                        match io.kind() {
                            ErrorKind::ConnectionRefused => return Outcome::Refused(elapsed),
                            ErrorKind::TimedOut | ErrorKind::WouldBlock => return Outcome::Silent,
                            _ => {}
                        }
                    }
                }
                let msg = format!("{e:#}");
                if msg.ends_with("timed out") {
                    Outcome::Silent
                } else {
                    Outcome::Failed(msg)
                }
            }
        },
        Src::Node(node) => {
            match node_http_request(node, &addr.ip().to_string(), addr.port(), "/", timeout) {
                Ok(r) => from_response(&r.response),
                Err(e) => {
                    let elapsed = t0.elapsed();
                    let msg = format!("{e:#}");
                    if msg.contains("ConnectionRefusedError") {
                        Outcome::Refused(elapsed)
                    } else if msg.contains("Errno 1]") || msg.contains("Operation not permitted") {
                        Outcome::Denied(elapsed)
                    } else if msg.contains("TimeoutError") || msg.contains("killed after") {
                        Outcome::Silent
                    } else {
                        Outcome::Failed(msg)
                    }
                }
            }
        }
    }
}

fn timeout_for(want: &str) -> Duration {
    if want == "silence" {
        SILENCE_T
    } else {
        SERVE_T
    }
}

/// Probes until `ok` holds (programming settles), then once more, which must hold too:
/// `Ok` with that outcome, or `Err` with the last outcome seen when `ok` did not hold
/// within [`SETTLE`] or not twice in a row.
fn settle(
    src: Src,
    addr: SocketAddrV4,
    want: &str,
    ok: impl Fn(&Outcome) -> bool,
) -> Result<Outcome, Outcome> {
    let deadline = Instant::now() + SETTLE;
    let t = timeout_for(want);
    loop {
        let o = probe(src, addr, t);
        if ok(&o) {
            break;
        }
        if Instant::now() >= deadline {
            return Err(o);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = probe(src, addr, t);
    if ok(&o) { Ok(o) } else { Err(o) }
}

/// [`settle`], panicking with what was seen instead.
fn expect(src: Src, addr: SocketAddrV4, want: &str, ok: impl Fn(&Outcome) -> bool) -> Outcome {
    settle(src, addr, want, ok).unwrap_or_else(|o| {
        panic!(
            "{} -> {addr}: expected {want}, got {o:?} (settling for {SETTLE:?})",
            src.name()
        )
    })
}

/// Neither served nor refused: dropped, or an error from the network (ICMP unreachable).
fn not_served_nor_refused(o: &Outcome) -> bool {
    matches!(o, Outcome::Silent | Outcome::Failed(_))
}

fn expect_silent(src: Src, addr: SocketAddrV4) {
    expect(src, addr, "silence", Outcome::silent);
}

fn expect_refused_fast(src: Src, addr: SocketAddrV4) {
    expect(src, addr, "refused within 1 s", Outcome::refused_fast);
}

/// Waits until `addr` serves from `src`, then makes [`N`] connections, every one of which
/// must be served; returns pod -> the source addresses it saw.
fn spread(src: Src, addr: SocketAddrV4) -> BTreeMap<String, BTreeSet<Ipv4Addr>> {
    expect(src, addr, "served", Outcome::served);
    let mut seen: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for i in 0..N {
        match probe(src, addr, SERVE_T) {
            Outcome::Served { pod, client } => {
                seen.entry(pod).or_default().insert(client);
            }
            o => panic!("{} -> {addr}: connection {i} of {N}: {o:?}", src.name()),
        }
    }
    seen
}

fn pods_of(seen: &BTreeMap<String, BTreeSet<Ipv4Addr>>) -> BTreeSet<String> {
    seen.keys().cloned().collect()
}

fn clients_of(seen: &BTreeMap<String, BTreeSet<Ipv4Addr>>) -> BTreeSet<Ipv4Addr> {
    seen.values().flatten().copied().collect()
}

/// [`spread`] and the checks every test makes: exactly the pods `want_pods`, and every
/// backend saw exactly `want_client`.
fn assert_spread(
    src: Src,
    addr: SocketAddrV4,
    want_pods: &BTreeSet<String>,
    want_client: Ipv4Addr,
) {
    let seen = spread(src, addr);
    assert_eq!(
        &pods_of(&seen),
        want_pods,
        "{} -> {addr}: pods reached over {N} connections ({seen:?})",
        src.name()
    );
    assert_eq!(
        clients_of(&seen),
        BTreeSet::from([want_client]),
        "{} -> {addr}: source address the backends saw ({seen:?})",
        src.name()
    );
}

/// Backends on other nodes than `via` (the node the traffic entered) saw only node
/// addresses (masqueraded). What the backends on `via` saw is left to the caller.
fn assert_remote_backends_saw_a_node(
    net: &Network,
    seen: &BTreeMap<String, BTreeSet<Ipv4Addr>>,
    via: &str,
) {
    let nodes = node_addrs(net);
    for remote in backends(net).iter().filter(|p| p.node != via) {
        let saw = seen.get(&remote.name).cloned().unwrap_or_default();
        assert!(
            !saw.is_empty() && saw.is_subset(&nodes),
            "{} (on {}) must see a node address, saw {saw:?} ({seen:?})",
            remote.name,
            remote.node
        );
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

// ---------------------------------------------------------------------------------------
// 1. externalTrafficPolicy: Local seen from inside.

/// A pod and a process of a node without a local endpoint reach every endpoint through an
/// externalTrafficPolicy Local service's LB IP and NodePort (kube-proxy short-circuits
/// in-cluster traffic): the pod keeps its address, the node process comes from the node's.
/// From outside, that node's NodePort is silent, a node with endpoints serves only its own
/// with the client's address kept.
#[test]
fn external_policy_local_from_inside_reaches_every_endpoint() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = up(|net| {
        let extra = format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {HC}\n"
        );
        svc(
            "web",
            WEB_CIP,
            Some(NP),
            &extra,
            &lb_status(lb_ip(net), None),
        ) + &slice("web", &all_eps(net, READY))
    });
    wait_services(&mut c, &["web"], true);
    let net = &c.net;
    let all = backend_names(net);
    let cp = net.node(CONTROL_PLANE);
    let worker = net.node(WORKER);
    let pod = net.pod(CURL_CP);
    let lb = sa(lb_ip(net), 80);

    // A pod on the control plane (no local endpoint): every endpoint, its own address.
    assert_spread(Src::Ns(&pod.netns), lb, &all, pod.addr);
    assert_spread(Src::Ns(&pod.netns), sa(cp.addr, NP), &all, pod.addr);

    // A process of the control plane: every endpoint, from the node's address (no EPERM).
    for addr in [lb, sa(cp.addr, NP)] {
        let seen = spread(Src::Node(cp), addr);
        assert_eq!(pods_of(&seen), all, "node process -> {addr}: {seen:?}");
        assert_eq!(
            clients_of(&seen),
            BTreeSet::from([cp.addr]),
            "node process -> {addr}: backends must see the node's address: {seen:?}"
        );
    }

    // From outside: the node without local endpoints drops, the one with them serves only
    // its own, the client's address kept.
    let outside = Src::Ns(net.client_netns());
    expect_silent(outside, sa(cp.addr, NP));
    assert_spread(
        outside,
        sa(worker.addr, NP),
        &backends_on(net, WORKER),
        net.client_addr(),
    );
}

// ---------------------------------------------------------------------------------------
// 2. loadBalancerSourceRanges from pods and nodes.

fn ranges_manifest(net: &Network, ranges: &[&str]) -> String {
    let ranges: Vec<String> = ranges.iter().map(|r| format!("\"{r}\"")).collect();
    let extra = format!(
        "  type: LoadBalancer\n  loadBalancerSourceRanges: [{}]\n",
        ranges.join(", ")
    );
    svc(
        "web",
        WEB_CIP,
        Some(NP),
        &extra,
        &lb_status(lb_ip(net), None),
    ) + &slice("web", &all_eps(net, READY))
}

/// A pod outside the ranges gets silence on the LB IP, a node process outside them is not
/// served; ranges covering the pod CIDR and the node's address let both through (every
/// endpoint, masqueraded to the node's address as kube-proxy does for pods to external
/// addresses). The ClusterIP ignores the ranges.
#[test]
fn load_balancer_source_ranges_apply_to_pods_and_node_processes() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = up(|net| ranges_manifest(net, &["192.0.2.0/24"]));
    c.wait_for("source ranges", Duration::from_secs(20), |s| {
        s.services.iter().any(|x| x.source_ranges)
    })
    .unwrap();
    let net = &c.net;
    let all = backend_names(net);
    let cp = net.node(CONTROL_PLANE);
    let pod = net.pod(CURL_CP);
    let lb = sa(lb_ip(net), 80);

    // Programmed: the ClusterIP serves the pod (ranges do not apply there).
    assert_spread(Src::Ns(&pod.netns), sa(WEB_CIP, 80), &all, pod.addr);
    expect_silent(Src::Ns(&pod.netns), lb);
    let node_outcome = expect(Src::Node(cp), lb, "not served", |o| !o.served());
    eprintln!("node process outside the ranges -> LB IP: {node_outcome:?}");

    c.write_manifest(&ranges_manifest(
        &c.net,
        &["10.244.0.0/16", &format!("{}/32", cp.addr)],
    ))
    .unwrap();
    let net = &c.net;
    let pod = net.pod(CURL_CP);
    let cp = net.node(CONTROL_PLANE);
    assert_spread(Src::Ns(&pod.netns), lb, &all, cp.addr);
    assert_spread(Src::Node(cp), lb, &all, cp.addr);
}

/// Node processes (socket hooks) where kube-proxy drops in the output path: an LB IP
/// outside loadBalancerSourceRanges, a ClusterIP under internalTrafficPolicy Local with
/// endpoints only on other nodes, and an address of the service CIDR no Service holds
/// (nftables mode); and where it rejects: internalTrafficPolicy Local with no endpoint at
/// all. A known difference, listed in the README: kube-proxy's output-path drop leaves a TCP
/// connect to time out (an nftables drop there gives EPERM to UDP and ping only), while a
/// socket hook can only let the connect go or fail it, so the node process gets EPERM at
/// once — distinct from the ECONNREFUSED of a reject, and never a connection. Every case is
/// probed before anything is asserted, so a failure lists them all.
#[test]
fn node_processes_get_eperm_where_kube_proxy_drops_and_refusal_where_it_rejects() {
    let Some(_guard) = privileged() else {
        return;
    };
    const NONE: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 11);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 13);
    const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
    let local = "  internalTrafficPolicy: Local\n";
    let mut c = up(|net| {
        ranges_manifest(net, &["192.0.2.0/24"])
            + &svc("itp-none", NONE, None, local, "")
            + &slice("itp-none", &[])
            + &svc("itp-remote", REMOTE, None, local, "")
            + &slice("itp-remote", &all_eps(net, READY))
            + &service_cidr_doc("10.96.0.0/16")
    });
    wait_services(&mut c, &["web", "itp-none", "itp-remote"], true);
    let net = &c.net;
    let cp = net.node(CONTROL_PLANE);
    let node = Src::Node(cp);
    // Programmed: the ClusterIP of the ranged service serves the node (ranges do not
    // apply there), from the node's address.
    assert_spread(node, sa(WEB_CIP, 80), &backend_names(net), cp.addr);

    let cases = [
        (
            "LB IP outside loadBalancerSourceRanges",
            sa(lb_ip(net), 80),
            "EPERM within 1 s",
        ),
        (
            "iTP Local, endpoints only elsewhere",
            sa(REMOTE, 80),
            "EPERM within 1 s",
        ),
        (
            "unallocated service-CIDR address",
            sa(UNALLOCATED, 80),
            "EPERM within 1 s",
        ),
        (
            "iTP Local, no endpoint at all",
            sa(NONE, 80),
            "refused within 1 s",
        ),
    ];
    let mut report = vec![];
    let mut failed = false;
    for (what, addr, want) in cases {
        let r = if want.starts_with("EPERM") {
            settle(node, addr, want, Outcome::denied_fast)
        } else {
            settle(node, addr, want, Outcome::refused_fast)
        };
        failed |= r.is_err();
        report.push(format!(
            "{what} ({addr}): expected {want}, got {:?}{}",
            r.as_ref().unwrap_or_else(|o| o),
            if r.is_ok() { "" } else { "  <-- MISMATCH" }
        ));
    }
    let report = report.join("\n  ");
    eprintln!("node process on {CONTROL_PLANE}:\n  {report}");
    assert!(!failed, "node process on {CONTROL_PLANE}:\n  {report}");
}

// ---------------------------------------------------------------------------------------
// 3. Reject vs drop under Local policies.

/// internalTrafficPolicy: Local: a pod's connection to the ClusterIP is refused at once
/// when the service has no endpoint at all (none listed, or only non-serving ones), and
/// silently dropped when it has endpoints only on other nodes. A pod on a node with an
/// endpoint reaches only that one, its address kept.
#[test]
fn internal_policy_local_rejects_without_endpoints_and_drops_with_remote_only() {
    let Some(_guard) = privileged() else {
        return;
    };
    const NONE: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 11);
    const DEAD: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 12);
    const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 96, 50, 13);
    let local = "  internalTrafficPolicy: Local\n";
    let mut c = up(|net| {
        svc("itp-none", NONE, None, local, "")
            + &slice("itp-none", &[])
            + &svc("itp-dead", DEAD, None, local, "")
            + &slice("itp-dead", &all_eps(net, NOT_SERVING))
            + &svc("itp-remote", REMOTE, None, local, "")
            + &slice("itp-remote", &all_eps(net, READY))
    });
    wait_services(&mut c, &["itp-none", "itp-dead", "itp-remote"], true);
    let net = &c.net;
    let cp_pod = net.pod(CURL_CP);
    let w2_pod = net.pod(CURL_W2);

    assert_spread(
        Src::Ns(&w2_pod.netns),
        sa(REMOTE, 80),
        &backends_on(net, WORKER2),
        w2_pod.addr,
    );
    expect_silent(Src::Ns(&cp_pod.netns), sa(REMOTE, 80));
    expect_refused_fast(Src::Ns(&cp_pod.netns), sa(NONE, 80));
    expect_refused_fast(Src::Ns(&cp_pod.netns), sa(DEAD, 80));
    // The worker has non-serving endpoints only, too.
    expect_refused_fast(Src::Ns(&w2_pod.netns), sa(DEAD, 80));
}

/// externalTrafficPolicy: Local from outside through NodePorts: refused at once on every
/// node when the service has no endpoint at all (none, or only non-serving ones), silent
/// on a node without a local endpoint when others have them; a node with one serves only
/// it, the client's address kept.
#[test]
fn external_policy_local_rejects_without_endpoints_and_drops_with_remote_only() {
    let Some(_guard) = privileged() else {
        return;
    };
    const NP_NONE: u16 = 30511;
    const NP_DEAD: u16 = 30512;
    const NP_REMOTE: u16 = 30513;
    let local = "  type: NodePort\n  externalTrafficPolicy: Local\n";
    let mut c = up(|net| {
        svc(
            "etp-none",
            Ipv4Addr::new(10, 96, 50, 21),
            Some(NP_NONE),
            local,
            "",
        ) + &slice("etp-none", &[])
            + &svc(
                "etp-dead",
                Ipv4Addr::new(10, 96, 50, 22),
                Some(NP_DEAD),
                local,
                "",
            )
            + &slice("etp-dead", &all_eps(net, NOT_SERVING))
            + &svc(
                "etp-remote",
                Ipv4Addr::new(10, 96, 50, 23),
                Some(NP_REMOTE),
                local,
                "",
            )
            + &slice("etp-remote", &all_eps(net, READY))
    });
    wait_services(&mut c, &["etp-none", "etp-dead", "etp-remote"], true);
    let net = &c.net;
    let outside = Src::Ns(net.client_netns());
    let cp = net.node(CONTROL_PLANE);
    let worker2 = net.node(WORKER2);

    assert_spread(
        outside,
        sa(worker2.addr, NP_REMOTE),
        &backends_on(net, WORKER2),
        net.client_addr(),
    );
    expect_silent(outside, sa(cp.addr, NP_REMOTE));
    for node in [cp, worker2] {
        expect_refused_fast(outside, sa(node.addr, NP_NONE));
        expect_refused_fast(outside, sa(node.addr, NP_DEAD));
    }
}

// ---------------------------------------------------------------------------------------
// 4. A ClusterIP from outside the node; unallocated service-CIDR addresses.

/// With a route for the service CIDR via the worker in the client's namespace only, the
/// client reaches the ClusterIP: every endpoint, and a backend on another node sees a node
/// address. An address of the ServiceCIDR no Service holds gets silence, from outside and
/// from a pod.
#[test]
fn cluster_ip_from_outside_is_served_and_unallocated_service_cidr_is_silent() {
    let Some(_guard) = privileged() else {
        return;
    };
    const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
    let mut c = up(|net| {
        svc("web", WEB_CIP, None, "", "")
            + &slice("web", &all_eps(net, READY))
            + &service_cidr_doc("10.96.0.0/16")
    });
    wait_services(&mut c, &["web"], false);
    let net = &c.net;
    let worker = net.node(WORKER);
    exec_ok(
        net.client_netns(),
        &[
            "ip",
            "route",
            "add",
            "10.96.0.0/16",
            "via",
            &worker.addr.to_string(),
            "dev",
            UPLINK,
        ],
    )
    .unwrap();
    let outside = Src::Ns(net.client_netns());
    let seen = spread(outside, sa(WEB_CIP, 80));
    assert_eq!(
        pods_of(&seen),
        backend_names(net),
        "client -> ClusterIP via the worker: {seen:?}"
    );
    assert_remote_backends_saw_a_node(net, &seen, WORKER);
    eprintln!("client -> ClusterIP: sources the backends saw: {seen:?}");

    expect_silent(outside, sa(UNALLOCATED, 80));
    let pod = net.pod(CURL_CP);
    expect_silent(Src::Ns(&pod.netns), sa(UNALLOCATED, 80));
    // Control: outside the service CIDR the same pod gets an answer at once (the node has
    // no route: ICMP unreachable), so the silence above is the drop, not the network.
    let control = expect(
        Src::Ns(&pod.netns),
        sa(Ipv4Addr::new(10, 97, 0, 99), 80),
        "an immediate error",
        |o| matches!(o, Outcome::Failed(_) | Outcome::Refused(_)),
    );
    eprintln!("pod -> 10.97.0.99 (outside the service CIDR): {control:?}");
}

// ---------------------------------------------------------------------------------------
// 5. Topology hints.

fn topology_manifest(net: &Network, hint_worker2: bool) -> String {
    let eps: Vec<String> = backends(net)
        .iter()
        .map(|p| {
            let zone = if p.node == WORKER2 {
                "zone-b"
            } else {
                "zone-a"
            };
            let hint = (p.node != WORKER2 || hint_worker2).then_some(zone);
            ep(p, READY, hint)
        })
        .collect();
    svc(
        "web",
        WEB_CIP,
        None,
        "  trafficDistribution: PreferClose\n",
        "",
    ) + &slice("web", &eps)
        + &node_doc(CONTROL_PLANE, "zone-a")
        + &node_doc(WORKER, "zone-a")
        + &node_doc(WORKER2, "zone-b")
}

/// Zone hints (`trafficDistribution: PreferClose`), the agent's zone from its `kind:
/// Node`: a pod in zone A reaches only zone-A endpoints, one in zone B only zone B's; when
/// one endpoint has no hints, every endpoint.
#[test]
fn topology_hints_keep_traffic_in_the_zone() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = up(|net| topology_manifest(net, true));
    wait_services(&mut c, &["web"], false);
    let net = &c.net;
    let cp_pod = net.pod(CURL_CP);
    let w2_pod = net.pod(CURL_W2);
    let cip = sa(WEB_CIP, 80);
    assert_spread(
        Src::Ns(&cp_pod.netns),
        cip,
        &backends_on(net, WORKER),
        cp_pod.addr,
    );
    assert_spread(
        Src::Ns(&w2_pod.netns),
        cip,
        &backends_on(net, WORKER2),
        w2_pod.addr,
    );

    c.write_manifest(&topology_manifest(&c.net, false)).unwrap();
    let net = &c.net;
    let cp_pod = net.pod(CURL_CP);
    let target = backends_on(net, WORKER2);
    // Wait until the zone-b endpoint shows up from zone A, then count.
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Outcome::Served { pod, .. } = probe(Src::Ns(&cp_pod.netns), cip, SERVE_T)
            && target.contains(&pod)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hints removed from one endpoint, but zone A never reached {target:?}"
        );
    }
    assert_spread(
        Src::Ns(&cp_pod.netns),
        cip,
        &backend_names(net),
        cp_pod.addr,
    );
}

// ---------------------------------------------------------------------------------------
// 6. --nodeport-addresses.

/// Second addresses on every node's uplink, added before the agents start.
fn second_addr(node: &Node) -> Ipv4Addr {
    let o = node.addr.octets();
    Ipv4Addr::new(o[0], o[1], 1, o[3])
}

/// Agents started with `--nodeport-addresses 172.18.1.0/24`, which holds each node's
/// second address but not its primary one: the NodePort serves on the second address
/// only, not on the primary (nor on localhost); the ClusterIP still works.
#[test]
fn nodeport_addresses_limit_node_ports_to_the_chosen_addresses() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = up_args(
        |net| {
            for n in net.nodes() {
                exec_ok(
                    &n.netns,
                    &[
                        "ip",
                        "addr",
                        "add",
                        &format!("{}/16", second_addr(n)),
                        "dev",
                        UPLINK,
                    ],
                )
                .unwrap();
            }
            svc("web", WEB_CIP, Some(NP), "  type: NodePort\n", "")
                + &slice("web", &all_eps(net, READY))
        },
        &["--nodeport-addresses".into(), "172.18.1.0/24".into()],
    );
    wait_services(&mut c, &["web"], false);
    let net = &c.net;
    let worker = net.node(WORKER);
    let outside = Src::Ns(net.client_netns());
    let all = backend_names(net);

    let seen = spread(outside, sa(second_addr(worker), NP));
    assert_eq!(
        pods_of(&seen),
        all,
        "NodePort on the chosen address: {seen:?}"
    );
    assert_remote_backends_saw_a_node(net, &seen, WORKER);
    eprintln!("client -> second address:NodePort: sources the backends saw: {seen:?}");

    let primary = expect(outside, sa(worker.addr, NP), "not served", |o| !o.served());
    eprintln!("client -> primary address:NodePort: {primary:?}");
    let localhost = expect(
        Src::Node(worker),
        sa(Ipv4Addr::LOCALHOST, NP),
        "not served",
        |o| !o.served(),
    );
    eprintln!("node process -> localhost:NodePort: {localhost:?}");

    let pod = net.pod(CURL_CP);
    assert_spread(Src::Ns(&pod.netns), sa(WEB_CIP, 80), &all, pod.addr);
}

// ---------------------------------------------------------------------------------------
// 7. ipMode.

fn ip_mode_manifest(net: &Network, mode: &str) -> String {
    svc(
        "web",
        WEB_CIP,
        Some(NP),
        "  type: LoadBalancer\n",
        &lb_status(lb_ip(net), Some(mode)),
    ) + &slice("web", &all_eps(net, READY))
}

/// `ipMode: Proxy`: the LB IP is not programmed, so a pod's (or node process's, or
/// outside client's) connection to it is not short-circuited to the endpoints: nothing in
/// the test network serves it. Switched to `ipMode: VIP`, the same address is served.
#[test]
fn ip_mode_proxy_leaves_the_lb_ip_unprogrammed() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = up(|net| ip_mode_manifest(net, "Proxy"));
    wait_services(&mut c, &["web"], false);
    let net = &c.net;
    let all = backend_names(net);
    let pod = net.pod(CURL_CP);
    let cp = net.node(CONTROL_PLANE);
    let lb = sa(lb_ip(net), 80);

    // Programmed: the ClusterIP and NodePort serve.
    assert_spread(Src::Ns(&pod.netns), sa(WEB_CIP, 80), &all, pod.addr);
    for src in [
        Src::Ns(&pod.netns),
        Src::Node(cp),
        Src::Ns(net.client_netns()),
    ] {
        let o = expect(src, lb, "not served (nor refused)", not_served_nor_refused);
        eprintln!("ipMode Proxy: {} -> {lb}: {o:?}", src.name());
    }

    c.write_manifest(&ip_mode_manifest(&c.net, "VIP")).unwrap();
    let net = &c.net;
    let pod = net.pod(CURL_CP);
    let cp = net.node(CONTROL_PLANE);
    // eTP Cluster to an external address: masqueraded (all endpoints are remote).
    assert_spread(Src::Ns(&pod.netns), lb, &all, cp.addr);
    assert_spread(Src::Node(cp), lb, &all, cp.addr);
}

// ---------------------------------------------------------------------------------------
// 8. Node health.

fn health(c: &Cluster, node: &Node, path: &str) -> anyhow::Result<HttpResponse> {
    http_request(
        c.net.client_netns(),
        sa(node.addr, HEALTHZ_PORT),
        path,
        SERVE_T,
    )
}

/// Waits until `path` on `node`'s health server answers `status`; returns the response.
fn wait_health(c: &Cluster, node: &Node, path: &str, status: u16) -> HttpResponse {
    let deadline = Instant::now() + SETTLE;
    loop {
        let r = health(c, node, path);
        if let Ok(r) = &r
            && r.status == status
        {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{}:{HEALTHZ_PORT}{path} never answered {status}: last {r:?}",
            node.name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn health_manifest(net: &Network, deleting: Option<&str>) -> String {
    let node = deleting
        .map(|n| {
            format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {n}, deletionTimestamp: \"2026-01-01T00:00:00Z\", finalizers: [example.com/keep]}}\n"
            )
        })
        .unwrap_or_default();
    svc("web", WEB_CIP, None, "", "") + &slice("web", &all_eps(net, READY)) + &node
}

/// `GET :10256/healthz` and `/livez` from outside answer 200 once the agent is ready, the
/// healthz body carrying `nodeEligible`; a Node being deleted makes its `/healthz` 503
/// (`"nodeEligible": false`) while `/livez` stays 200 and other nodes stay healthy.
#[test]
fn node_health_server_answers_and_drains_a_deleted_node() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = up(|net| health_manifest(net, None));
    wait_services(&mut c, &["web"], false);
    let worker = c.net.node(WORKER).clone();
    let cp = c.net.node(CONTROL_PLANE).clone();

    for node in [&worker, &cp] {
        let r = wait_health(&c, node, "/healthz", 200);
        let body: serde_json::Value = serde_json::from_str(&r.body)
            .unwrap_or_else(|e| panic!("{}: healthz body {:?}: {e}", node.name, r.body));
        assert_eq!(
            body.get("nodeEligible"),
            Some(&serde_json::Value::Bool(true)),
            "{}: {}",
            node.name,
            r.body
        );
        wait_health(&c, node, "/livez", 200);
    }

    c.write_manifest(&health_manifest(&c.net, Some(WORKER)))
        .unwrap();
    let r = wait_health(&c, &worker, "/healthz", 503);
    let body: serde_json::Value =
        serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("healthz body {:?}: {e}", r.body));
    assert_eq!(
        body.get("nodeEligible"),
        Some(&serde_json::Value::Bool(false)),
        "{}",
        r.body
    );
    let live = health(&c, &worker, "/livez").expect("livez of the deleted node");
    assert_eq!(live.status, 200, "{}", live.body);
    let other = health(&c, &cp, "/healthz").expect("healthz of another node");
    assert_eq!(other.status, 200, "{}", other.body);
}
