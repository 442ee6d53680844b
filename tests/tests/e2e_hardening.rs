//! Issue 14's hardening, end to end on the built-in network:
//!
//! - the metrics/health server and a healthCheckNodePort keep answering probes (the
//!   kubelet's from the node, a cloud load balancer's from outside) while a pod holds 100
//!   idle connections open to each, re-opening every one the server closes;
//! - state changes (`PUT /loglevel`, `PUT /datapath-debug`) are refused from a pod, another
//!   node and browsers, and accepted from the node itself;
//! - the agent runs with only the capabilities the DaemonSet lists (read from the rendered
//!   manifest, given with `setpriv` as the bounding set) and serves NodePort, LoadBalancer
//!   and node-process ClusterIP traffic;
//! - maps pinned with other sizes than the flags ask for are refused, naming each map and
//!   both sizes, and left as they were.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb_agent::dataplane::datapath::{Datapath, Limits, Verify};
use lb_tests::*;

/// kubelet's probe timeout in the DaemonSet (timeoutSeconds: 2).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const WORKER: &str = "service-demo-worker";
const HC: u16 = 32100;
const LOCAL_NODE_PORT: u16 = 30500;
/// Connections the "attacker" pod holds open to each server.
const HELD: usize = 100;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The seed's services plus `web-local`: a LoadBalancer with `externalTrafficPolicy:
/// Local`, so every agent serves its healthCheckNodePort.
fn manifest(net: &Network) -> String {
    let mut y = seed_manifests(net, &ManifestOpts::default());
    let eps: String = net
        .pods()
        .iter()
        .map(|p| {
            format!(
                "  - addresses: [\"{}\"]\n    nodeName: {}\n    conditions: {{ready: true, serving: true, terminating: false}}\n",
                p.addr, p.node
            )
        })
        .collect();
    y.push_str(&format!(
        "- apiVersion: v1\n  kind: Service\n  metadata: {{name: web-local, namespace: dev}}\n  spec:\n    type: LoadBalancer\n    clusterIP: 10.96.50.1\n    externalTrafficPolicy: Local\n    healthCheckNodePort: {HC}\n    ports: [{{name: http, port: 8080, targetPort: 80, protocol: TCP, nodePort: {LOCAL_NODE_PORT}}}]\n\
- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {{name: web-local-1, namespace: dev, labels: {{kubernetes.io/service-name: web-local}}}}\n  addressType: IPv4\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n  endpoints:\n{eps}"
    ));
    y
}

/// One HTTP/1.0 request from inside `netns`; (status, body).
fn request(
    netns: &str,
    addr: SocketAddrV4,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String)> {
    try_in_netns(netns, || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr.into(), PROBE_TIMEOUT)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad response {raw:?}"))?;
        let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((status, body.to_string()))
    })?
    .with_context(|| format!("{method} http://{addr}{path} from {netns}"))
}

/// What a [`Holder`] did.
#[derive(Debug, Default)]
struct HoldStats {
    /// Connections opened (the first `HELD`, then one per connection the server closed).
    connects: usize,
    /// Connections the server closed (evicted, or idle past its timeout).
    closed_by_server: usize,
}

/// Holds `n` connections open to `addr` from inside `netns` until dropped: half of them
/// never send anything, the other half send one keep-alive request and then idle. Every
/// connection the server closes is opened again, as an attacker keeping the server full
/// would.
struct Holder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<HoldStats>>>,
}

impl Holder {
    fn start(netns: &str, addr: SocketAddrV4, n: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let netns = netns.to_string();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            try_in_netns(&netns, || hold(addr, n, &flag)).and_then(|r| r)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> HoldStats {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("holder thread")
            .expect("holder")
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether the server closed `s` (reading and discarding whatever answer came).
fn closed_by_server(mut s: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

fn hold(addr: SocketAddrV4, n: usize, stop: &AtomicBool) -> Result<HoldStats> {
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut stats = HoldStats::default();
    while !stop.load(Ordering::Relaxed) {
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(closed_by_server) {
                *slot = None;
                stats.closed_by_server += 1;
            }
            if slot.is_none()
                && let Ok(s) = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500))
            {
                if i % 2 == 1 {
                    (&s).write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")?;
                }
                s.set_nonblocking(true)?;
                *slot = Some(s);
                stats.connects += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(stats)
}

/// Waits until `what` answers `want` from `netns`.
fn wait_status(netns: &str, addr: SocketAddrV4, path: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = request(netns, addr, "GET", path, "", &[]);
        if got.as_ref().is_ok_and(|(s, _)| *s == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "http://{addr}{path} never answered {want}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn probes_answer_while_a_pod_holds_100_idle_connections_to_each_server() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = Cluster::up(&TopologySpec::seed(), manifest).expect("cluster up");
    c.wait_for("ready", Duration::from_secs(30), |s| {
        s.agent.as_ref().is_some_and(|a| a.ready)
    })
    .unwrap();
    let worker = c.net.node(WORKER).clone();
    let pod = c.net.pods_on(WORKER)[0].clone();
    let metrics = SocketAddrV4::new(worker.addr, METRICS_PORT);
    let hc = SocketAddrV4::new(worker.addr, HC);
    wait_status(c.net.client_netns(), hc, "/", 200);

    let held_metrics = Holder::start(&pod.netns, metrics, HELD);
    let held_hc = Holder::start(&pod.netns, hc, HELD);
    std::thread::sleep(Duration::from_secs(1));
    // The kubelet (from the node) and a cloud load balancer (from outside) probe, for
    // longer than the idle timeout, while the pod keeps its connections open.
    let start = Instant::now();
    let mut probes = 0;
    while start.elapsed() < Duration::from_secs(8) {
        for path in ["/healthz", "/readyz"] {
            let t = Instant::now();
            let got = request(&worker.netns, metrics, "GET", path, "", &[]);
            assert!(
                matches!(got, Ok((200, _))),
                "kubelet probe {path} after {:?} of holding: {got:?}",
                start.elapsed()
            );
            assert!(t.elapsed() < PROBE_TIMEOUT, "{path} took {:?}", t.elapsed());
        }
        let t = Instant::now();
        let got = request(c.net.client_netns(), hc, "GET", "/", "", &[]);
        match &got {
            Ok((200, body)) => assert!(body.contains(r#""localEndpoints":"#), "{body}"),
            other => panic!(
                "load balancer probe after {:?} of holding: {other:?}",
                start.elapsed()
            ),
        }
        assert!(
            t.elapsed() < PROBE_TIMEOUT,
            "health check took {:?}",
            t.elapsed()
        );
        probes += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    let m = held_metrics.finish();
    let h = held_hc.finish();
    eprintln!("{probes} probe rounds; metrics server: {m:?}; health check port: {h:?}");
    // The pod really held the servers at their caps: they had to close its connections,
    // which it opened again.
    for (what, s) in [("metrics", &m), ("health check", &h)] {
        assert!(
            s.connects > HELD && s.closed_by_server > 0,
            "{what}: the held connections were never closed: {s:?}"
        );
    }
    assert!(
        c.agent_mut(WORKER).alive(),
        "{}",
        c.agent(WORKER).log_text()
    );
}

#[test]
fn state_changes_only_from_the_node_itself() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = Cluster::up(&TopologySpec::seed(), manifest).expect("cluster up");
    c.wait_for("ready", Duration::from_secs(30), |s| {
        s.agent.as_ref().is_some_and(|a| a.ready)
    })
    .unwrap();
    let worker = c.net.node(WORKER).clone();
    let pod = c.net.pods_on(WORKER)[0].clone();
    let other_node = c.control_plane().clone();
    let m = SocketAddrV4::new(worker.addr, METRICS_PORT);
    let send = |netns: &str, method: &str, path: &str, body: &str, headers: &[(&str, &str)]| {
        request(netns, m, method, path, body, headers)
            .unwrap_or_else(|e| panic!("{e:#}"))
            .0
    };

    // From a pod on the node, from another node and from outside: refused, and nothing
    // changes. Reading stays open.
    for (who, netns) in [
        ("pod", pod.netns.as_str()),
        ("other node", other_node.netns.as_str()),
        ("outside", c.net.client_netns()),
    ] {
        assert_eq!(send(netns, "PUT", "/loglevel", "trace", &[]), 403, "{who}");
        assert_eq!(send(netns, "POST", "/loglevel", "trace", &[]), 403, "{who}");
        assert_eq!(
            send(netns, "PUT", "/datapath-debug", "on", &[]),
            403,
            "{who}"
        );
        let (status, level) = request(netns, m, "GET", "/loglevel", "", &[]).unwrap();
        assert_eq!((status, level.trim()), (200, "info"), "{who}");
        let (status, dbg) = request(netns, m, "GET", "/datapath-debug", "", &[]).unwrap();
        assert_eq!((status, dbg.trim()), (200, "off"), "{who}");
    }
    // From the node: accepted, except from a browser (cross-site request forgery).
    let node = worker.netns.as_str();
    assert_eq!(
        send(
            node,
            "PUT",
            "/loglevel",
            "trace",
            &[("Origin", "http://evil.example")]
        ),
        403
    );
    assert_eq!(
        send(
            node,
            "POST",
            "/datapath-debug",
            "on",
            &[("Sec-Fetch-Site", "cross-site")]
        ),
        403
    );
    assert_eq!(send(node, "PUT", "/loglevel", "debug", &[]), 200);
    assert_eq!(
        request(node, m, "GET", "/loglevel", "", &[])
            .unwrap()
            .1
            .trim(),
        "debug"
    );
    assert_eq!(send(node, "PUT", "/datapath-debug", "on", &[]), 200);
    assert_eq!(
        request(&pod.netns, m, "GET", "/datapath-debug", "", &[])
            .unwrap()
            .1
            .trim(),
        "on"
    );
    assert_eq!(send(node, "PUT", "/datapath-debug", "off", &[]), 200);
    let log = c.agent(WORKER).log_text();
    assert!(
        log.contains(&format!("refused PUT /loglevel from {}", pod.addr)),
        "{log}"
    );
    assert!(
        log.contains("log level changed from info to debug"),
        "{log}"
    );
}

/// The capabilities the DaemonSet adds, read from the manifests `kubectl apply -k deploy`
/// applies (the resources deploy/kustomization.yaml lists).
fn daemonset_capabilities() -> Vec<String> {
    use serde::Deserialize as _;
    let deploy = root().join("deploy");
    let k: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(deploy.join("kustomization.yaml")).unwrap())
            .unwrap();
    for r in k["resources"].as_sequence().expect("resources") {
        let text = std::fs::read_to_string(deploy.join(r.as_str().unwrap())).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).unwrap();
            if v["kind"].as_str() != Some("DaemonSet") {
                continue;
            }
            let c = &v["spec"]["template"]["spec"]["containers"][0];
            assert_eq!(
                c["securityContext"]["privileged"].as_bool(),
                Some(false),
                "the DaemonSet's container must not be privileged"
            );
            return c["securityContext"]["capabilities"]["add"]
                .as_sequence()
                .expect("capabilities.add")
                .iter()
                .map(|c| c.as_str().expect("capability name").to_string())
                .collect();
        }
    }
    panic!("no DaemonSet in deploy/");
}

/// The kernel's number of a capability (include/uapi/linux/capability.h).
fn cap_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its number to this test"),
    }
}

/// `/proc/<pid>/status` of the agent whose command line holds `--pin-dir <pin_dir>`.
fn agent_proc_status(pin_dir: &Path) -> String {
    let needle = format!("--pin-dir\0{}\0", pin_dir.display());
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle)
            && let Ok(status) = std::fs::read_to_string(e.path().join("status"))
        {
            return status;
        }
    }
    panic!("no agent process with --pin-dir {}", pin_dir.display());
}

fn status_hex(status: &str, field: &str) -> u64 {
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("{field} missing"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

#[test]
fn agent_runs_with_only_the_daemonsets_capabilities() {
    let Some(_guard) = privileged() else {
        return;
    };
    let caps = daemonset_capabilities();
    let setpriv = std::process::Command::new("setpriv")
        .arg("--version")
        .output();
    assert!(
        setpriv.is_ok_and(|o| o.status.success()),
        "setpriv (util-linux) is needed"
    );
    // The agent as the kubelet would start it: these capabilities only (bounding set;
    // uid 0 gets exactly those on exec), none inheritable, no privilege gain on exec
    // (allowPrivilegeEscalation: false).
    let bin = agent_bin().expect("lb-agent binary");
    let list: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    let wrapper = std::env::temp_dir().join(format!("xlb-{}-setpriv-agent", std::process::id()));
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --no-new-privs --inh-caps=-all --bounding-set=-all,{} -- {} \"$@\"\n",
            list.join(","),
            bin.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let old = std::env::var_os("XLB_AGENT_BIN");
    // SAFETY: the privileged guard serialises the tests of this binary, and nothing else
    // reads the environment while the cluster starts.
    unsafe { std::env::set_var("XLB_AGENT_BIN", &wrapper) };
    let cluster = Cluster::up(&TopologySpec::seed(), manifest);
    // SAFETY: as above.
    unsafe {
        match old {
            Some(v) => std::env::set_var("XLB_AGENT_BIN", v),
            None => std::env::remove_var("XLB_AGENT_BIN"),
        }
    }
    let mut c = cluster.expect("cluster up");
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    c.wait_for("nginx-service programmed", Duration::from_secs(30), |s| {
        s.agent
            .as_ref()
            .is_some_and(|a| a.ready && a.cgroup.is_some())
            && s.services
                .iter()
                .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == pods.len())
    })
    .unwrap();

    // Each agent runs with exactly the listed capabilities, and cannot gain more.
    let want: u64 = caps.iter().map(|c| 1u64 << cap_number(c)).sum();
    for a in &c.agents {
        let st = agent_proc_status(&a.pin_dir);
        assert_eq!(status_hex(&st, "CapEff:"), want, "{}: CapEff\n{st}", a.node);
        assert_eq!(status_hex(&st, "CapBnd:"), want, "{}: CapBnd", a.node);
        assert!(st.contains("NoNewPrivs:\t1"), "{}: NoNewPrivs", a.node);
    }

    // NodePort on every node, the LoadBalancer IP and a node process's ClusterIP (the
    // socket programs) all reach the pods.
    let t = Duration::from_secs(3);
    for node in c.net.nodes().to_vec() {
        let addr = SocketAddrV4::new(node.addr, NGINX_NODE_PORT);
        for _ in 0..5 {
            let body = http_get(c.net.client_netns(), addr, t)
                .unwrap_or_else(|e| panic!("NodePort on {}: {e:#}", node.name));
            assert!(pods.contains(&body.trim().to_string()), "{body}");
        }
    }
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    let body = http_get(c.net.client_netns(), lb, t).expect("LoadBalancer IP");
    assert!(pods.contains(&body.trim().to_string()), "{body}");
    let worker = c.net.node(WORKER).clone();
    let body = node_http_get(&worker, NGINX_CLUSTER_IP, 80, t).expect("ClusterIP from the node");
    assert!(pods.contains(&body.trim().to_string()), "{body}");
    for a in c.agents.iter_mut() {
        assert!(a.alive(), "{}", a.log_text());
    }
    drop(c);
    let _ = std::fs::remove_file(&wrapper);
}

/// Map sizes small enough for any test machine.
fn small_limits() -> Limits {
    Limits {
        max_services: 64,
        max_frontends: 256,
        max_backends: 256,
        maglev_arena: 4096,
        ct_entries: 1024,
        ct_new_entries: 256,
    }
}

/// The agent's load verifies what every node attaches and leaves the XDP programs to the
/// attach that picks one; asked for, an XDP program is verified then (and one the kernel
/// rejected would fail there, within the agent's start).
#[test]
fn xdp_programs_are_verified_when_first_used() {
    let Some(_guard) = privileged() else {
        return;
    };
    let pins = PinDir::new("verify").unwrap();
    let limits = small_limits();
    let mut dp = Datapath::load_with(pins.path(), &limits, Verify::NodeAttached).unwrap();
    let loaded = |dp: &Datapath, name: &str| dp.ebpf.program(name).unwrap().fd().is_ok();
    for name in [lb_common::PROG_TC_UPLINK, lb_common::PROG_TC_POD]
        .into_iter()
        .chain(lb_agent::dataplane::datapath::SOCK_PROGRAMS)
    {
        assert!(loaded(&dp, name), "{name} verified up front");
    }
    for name in [
        lb_common::PROG_XDP,
        lb_common::PROG_XDP_MB,
        lb_common::PROG_XDP_PASS,
    ] {
        assert!(!loaded(&dp, name), "{name} left for its first use");
    }
    dp.xdp(lb_common::PROG_XDP_MB).unwrap();
    assert!(loaded(&dp, lb_common::PROG_XDP_MB));
    assert!(!loaded(&dp, lb_common::PROG_XDP));
    drop(dp);
    // Every program, for the tests and tools that run any of them.
    let dp = Datapath::load(pins.path(), &limits).unwrap();
    for name in [
        lb_common::PROG_XDP,
        lb_common::PROG_XDP_MB,
        lb_common::PROG_XDP_PASS,
    ] {
        assert!(loaded(&dp, name), "{name} verified by load");
    }
}

/// The verifier walks each large program's paths at every agent start; the walk was
/// ~300,000 instructions (0.6 s of CPU) for the uplink's tc program before the SNAT
/// take-over pass became a `bpf_loop` and debug events sent codes instead of strings
/// (~80,000 after). A budget of 150,000 per program catches a change that brings the
/// explosion back (the kernel's own limit is 1,000,000).
#[test]
fn programs_stay_cheap_to_verify() {
    let Some(_guard) = privileged() else {
        return;
    };
    const BUDGET: u32 = 150_000;
    let pins = PinDir::new("vcost").unwrap();
    let dp = Datapath::load(pins.path(), &small_limits()).unwrap();
    for name in [
        lb_common::PROG_XDP,
        lb_common::PROG_XDP_MB,
        lb_common::PROG_TC_UPLINK,
        lb_common::PROG_TC_POD,
    ] {
        let prog = dp.ebpf.program(name).unwrap();
        let info = match prog {
            aya::programs::Program::Xdp(p) => p.info(),
            aya::programs::Program::SchedClassifier(p) => p.info(),
            other => panic!("{name}: unexpected type {:?}", other.prog_type()),
        }
        .unwrap();
        // In bpf_prog_info since Linux 5.16 (the programs need 5.17: bpf_loop).
        let walked = info
            .verified_instruction_count()
            .expect("the kernel reports verified instructions");
        eprintln!("{name}: the verifier walked {walked} instructions");
        assert!(
            walked <= BUDGET,
            "{name}: the verifier walked {walked} instructions (budget {BUDGET})"
        );
    }
}

#[test]
fn pinned_maps_of_other_sizes_are_refused_and_kept() {
    let Some(_guard) = privileged() else {
        return;
    };
    let pins = PinDir::new("sizes").unwrap();
    let small = small_limits();
    drop(Datapath::load(pins.path(), &small).expect("first load creates the maps"));
    // A larger --ct-entries later: refused, naming every map it sizes.
    let larger = Limits {
        ct_entries: 2048,
        ..small.clone()
    };
    let err = match Datapath::load(pins.path(), &larger) {
        Ok(_) => panic!("a larger --ct-entries reused the pinned maps"),
        Err(e) => format!("{e:#}"),
    };
    for needle in [
        "XLB_CT: pinned with 1024 entries, --ct-entries asks for 2048",
        "XLB_REVNAT: pinned with 1280 entries, --ct-entries + --ct-new-entries ask for 2304",
        "XLB_AFFINITY: pinned with 1024 entries",
        "(--ct-entries 1024, --ct-new-entries 256)",
        &format!("lb-agent cleanup --pin-dir {}", pins.path().display()),
    ] {
        assert!(err.contains(needle), "{needle:?} missing in:\n{err}");
    }
    // A smaller arena is refused too.
    let smaller = Limits {
        maglev_arena: 2048,
        ..small.clone()
    };
    let err = match Datapath::load(pins.path(), &smaller) {
        Ok(_) => panic!("a smaller --maglev-arena reused the pinned map"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("XLB_MAGLEV: pinned with 2048 entries, --maglev-arena asks for 1024"),
        "{err}"
    );
    // Nothing was touched: the pinned map keeps its size and the same flags load.
    let ct = aya::maps::MapData::from_pin(pins.path().join("XLB_CT"))
        .unwrap()
        .info()
        .unwrap()
        .max_entries();
    assert_eq!(ct, 1024);
    drop(Datapath::load(pins.path(), &small).expect("the same flags reuse the pins"));
}
