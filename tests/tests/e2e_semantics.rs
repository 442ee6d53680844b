//! kube-proxy's Service semantics with real traffic on the built-in network: session
//! affinity, externalTrafficPolicy Local and its health check node port,
//! loadBalancerSourceRanges, the terminating fallback, and services changing type, port or
//! protocol. One test per behaviour, each on its own cluster with only the `web` service.
use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use lb_tests::*;

const T: Duration = Duration::from_secs(3);
const NP: u16 = 30500;
const NP2: u16 = 30501;
const HC: u16 = 32100;
const CONTROL_PLANE: &str = "service-demo-control-plane";
const WORKER: &str = "service-demo-worker";

/// One service `web` (80 -> pods:80) with `spec` lines spliced in, and one EndpointSlice
/// listing every pod with the given conditions.
fn web(net: &Network, spec: &str, status: &str, conditions: &str) -> String {
    let eps: String = net
        .pods()
        .iter()
        .map(|p| {
            format!(
                "  - addresses: [\"{}\"]\n    nodeName: {}\n    conditions: {conditions}\n",
                p.addr, p.node
            )
        })
        .collect();
    let eps = if eps.is_empty() {
        "  endpoints: []\n".to_string()
    } else {
        format!("  endpoints:\n{eps}")
    };
    let lb = net.lb_ips()[0].0;
    let status = status.replace("LB", &lb.to_string());
    format!(
        "apiVersion: v1\nkind: List\nitems:\n\
- apiVersion: v1\n  kind: Service\n  metadata: {{name: web, namespace: dev}}\n  spec:\n    clusterIP: 10.96.50.1\n{spec}\n{status}\
- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {{name: web-1, namespace: dev, labels: {{kubernetes.io/service-name: web}}}}\n  addressType: IPv4\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n{eps}"
    )
}

const READY: &str = "{ready: true, serving: true, terminating: false}";
const SERVING_TERMINATING: &str = "{ready: false, serving: true, terminating: true}";
const NOT_SERVING_TERMINATING: &str = "{ready: false, serving: false, terminating: true}";
const LB_STATUS: &str = "  status: {loadBalancer: {ingress: [{ip: LB}]}}\n";

/// The `ports:` line of a TCP service 80 -> pods:80 on NodePort `np`.
fn tcp_port(np: u16) -> String {
    format!("    ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP, nodePort: {np}}}]")
}

/// `type: LoadBalancer` with `extra` spec lines (each ending in a newline) on NodePort `np`.
fn lb_spec(extra: &str, np: u16) -> String {
    format!("    type: LoadBalancer\n{extra}{}", tcp_port(np))
}

/// `type: NodePort` on NodePort `np`.
fn np_spec(np: u16) -> String {
    format!("    type: NodePort\n{}", tcp_port(np))
}

/// `type: LoadBalancer`, `externalTrafficPolicy: Local` with the health check node port.
fn local_spec() -> String {
    lb_spec(
        &format!("    externalTrafficPolicy: Local\n    healthCheckNodePort: {HC}\n"),
        NP,
    )
}

/// `type: LoadBalancer` accepting only sources in `cidr`.
fn ranges_spec(cidr: &str) -> String {
    lb_spec(&format!("    loadBalancerSourceRanges: [\"{cidr}\"]\n"), NP)
}

/// A cluster on the seed topology whose only service is `web` with `spec` (given the
/// network, for specs that name its addresses), `status`, and every pod as an endpoint
/// with `conditions`.
fn up(spec: impl FnOnce(&Network) -> String, status: &str, conditions: &str) -> Cluster {
    Cluster::up(&TopologySpec::seed(), |net| {
        web(net, &spec(net), status, conditions)
    })
    .expect("cluster up")
}

/// Replaces `web` with `spec`, `status`, and every pod as an endpoint with `conditions`.
fn rewrite(c: &Cluster, spec: &str, status: &str, conditions: &str) {
    c.write_manifest(&web(&c.net, spec, status, conditions))
        .unwrap();
}

fn node(c: &Cluster, name: &str) -> Node {
    c.net.node(name).clone()
}

fn lb_addr(c: &Cluster) -> SocketAddrV4 {
    SocketAddrV4::new(c.net.lb_ips()[0].0, 80)
}

fn node_port(c: &Cluster, name: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(c.net.node(name).addr, port)
}

fn get(c: &Cluster, addr: SocketAddrV4) -> anyhow::Result<HttpResponse> {
    http_request(c.net.client_netns(), addr, "/", T)
}

fn wait_programmed(c: &mut Cluster, what: &str, ok: impl Fn(&lb_agent::status::Status) -> bool) {
    c.wait_for(what, Duration::from_secs(20), ok).unwrap();
}

/// Waits until every agent has `web` with all three pods.
fn wait_all_endpoints(c: &mut Cluster, what: &str) {
    wait_programmed(c, what, |s| {
        s.services.iter().any(|x| x.endpoints.len() == 3)
    });
}

/// Waits until every agent has `web` under the Local policy.
fn wait_local(c: &mut Cluster) {
    wait_programmed(c, "Local policy", |s| {
        s.services.iter().any(|x| x.name.ends_with("(local)"))
    });
}

fn settle(c: &Cluster, addr: SocketAddrV4, want_ok: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = http_request(c.net.client_netns(), addr, "/", Duration::from_millis(500)).is_ok();
        if ok == want_ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never became {}",
            if want_ok { "reachable" } else { "unreachable" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// sessionAffinity: ClientIP keeps one client on one pod, across the service's addresses
/// (LB IP and every NodePort of the node it arrives at), until the timeout.
#[test]
fn session_affinity_client_ip_sticks_across_addresses_until_timeout() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let affinity = lb_spec(
        "    sessionAffinity: ClientIP\n    sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n",
        NP,
    );
    let mut c = up(|_| affinity, LB_STATUS, READY);
    wait_all_endpoints(&mut c, "web programmed");
    let lb = lb_addr(&c);

    let first = get(&c, lb).unwrap().body;
    for i in 0..20 {
        assert_eq!(
            get(&c, lb).unwrap().body,
            first,
            "affinity broke at request {i}"
        );
    }
    assert_eq!(
        get(&c, node_port(&c, WORKER, NP)).unwrap().body,
        first,
        "affinity spans the service's addresses on a node"
    );
    // After the timeout (2 s idle), a new choice is made: over a few idle periods the
    // client must land elsewhere at least once (2 of 3 pods are elsewhere each time; eight
    // windows leave a (1/3)^7 chance of never moving).
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2300));
        let b = get(&c, lb).unwrap().body;
        // ... and sticks again right after.
        assert_eq!(get(&c, lb).unwrap().body, b);
        seen.insert(b);
    }
    assert!(seen.len() > 1, "affinity never expired: {seen:?}");
}

/// externalTrafficPolicy: Local: only local pods, client address preserved, and a node
/// without a local endpoint drops.
#[test]
fn external_traffic_policy_local_keeps_client_ip_and_drops_without_local_endpoint() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let mut c = up(|_| local_spec(), LB_STATUS, READY);
    wait_local(&mut c);
    let lb = lb_addr(&c);
    let on_worker: BTreeSet<String> = c
        .net
        .pods_on(WORKER)
        .iter()
        .map(|p| p.expected_reply())
        .collect();
    for _ in 0..20 {
        let r = get(&c, lb).unwrap();
        assert!(
            on_worker.contains(&r.body),
            "{} is not on the worker (LB IP is routed there)",
            r.body.trim()
        );
        let client = r.header("X-Client").unwrap_or_default().to_string();
        assert!(
            client.starts_with(&format!("{}:", c.net.client_addr())),
            "source not preserved: {client}"
        );
    }
    assert!(
        get(&c, node_port(&c, CONTROL_PLANE, NP)).is_err(),
        "a node without local endpoints must drop under Local policy"
    );
}

/// The healthCheckNodePort answers as kube-proxy's: 200 with the local endpoint count
/// where there are local endpoints, 503 where there are none.
#[test]
fn health_check_node_port_answers_200_with_local_endpoints_and_503_without() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let mut c = up(|_| local_spec(), LB_STATUS, READY);
    wait_local(&mut c);
    let hc = |node: &Node| {
        http_request(
            c.net.client_netns(),
            SocketAddrV4::new(node.addr, HC),
            "/",
            T,
        )
    };
    let ok = hc(&node(&c, WORKER)).expect("health check on the worker");
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(
        ok.body.contains(r#""localEndpoints":2"#) && ok.body.contains(r#""name":"web""#),
        "{}",
        ok.body
    );
    assert_eq!(ok.header("Content-Type"), Some("application/json"));
    let none = hc(&node(&c, CONTROL_PLANE));
    let status = match &none {
        Ok(r) => r.status,
        Err(e) => panic!("health check on the control plane: {e:#}"),
    };
    assert_eq!(status, 503, "no local endpoint must answer 503");
}

/// loadBalancerSourceRanges: the client's own /32 is allowed; another range drops it at
/// the LB IP, but not at the NodePort.
#[test]
fn load_balancer_source_ranges_filter_the_lb_ip_but_not_node_ports() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let mut c = up(
        |net| ranges_spec(&format!("{}/32", net.client_addr())),
        LB_STATUS,
        READY,
    );
    wait_all_endpoints(&mut c, "source ranges (allowed)");
    let lb = lb_addr(&c);
    settle(&c, lb, true);
    for _ in 0..5 {
        get(&c, lb).expect("allowed source");
    }
    rewrite(&c, &ranges_spec("192.0.2.0/24"), LB_STATUS, READY);
    settle(&c, lb, false);
    // The NodePort is not an LB address: source ranges do not apply there.
    get(&c, node_port(&c, WORKER, NP)).expect("NodePort ignores loadBalancerSourceRanges");
}

/// Terminating fallback: no ready endpoint, but serving+terminating ones still take
/// traffic; non-serving terminating ones never do (rejected at once).
#[test]
fn terminating_endpoints_serve_only_while_serving() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let mut c = up(|_| np_spec(NP), "", SERVING_TERMINATING);
    wait_all_endpoints(&mut c, "terminating fallback");
    let np_worker = node_port(&c, WORKER, NP);
    for _ in 0..10 {
        get(&c, np_worker).expect("serving terminating endpoints still serve");
    }
    rewrite(&c, &np_spec(NP), "", NOT_SERVING_TERMINATING);
    wait_programmed(&mut c, "no serving endpoint", |s| {
        s.services.iter().any(|x| x.endpoints.is_empty())
    });
    let err = get(&c, np_worker).expect_err("no serving endpoint must reject");
    assert!(
        format!("{err:#}").to_lowercase().contains("refused"),
        "{err:#}"
    );
}

/// A NodePort change re-programs: the new port answers, the LB IP still does, the old port
/// is gone.
#[test]
fn node_port_change_leaves_no_stale_port() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let c = up(|_| lb_spec("", NP), LB_STATUS, READY);
    let np_worker = node_port(&c, WORKER, NP);
    settle(&c, np_worker, true);
    rewrite(&c, &lb_spec("", NP2), LB_STATUS, READY);
    settle(&c, node_port(&c, WORKER, NP2), true);
    settle(&c, lb_addr(&c), true);
    assert!(get(&c, np_worker).is_err(), "old NodePort still answers");
}

/// LoadBalancer -> ClusterIP: the LB IP and the NodePort go away.
#[test]
fn load_balancer_to_cluster_ip_removes_lb_ip_and_node_port() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let c = up(|_| lb_spec("", NP), LB_STATUS, READY);
    let lb = lb_addr(&c);
    let np_worker = node_port(&c, WORKER, NP);
    settle(&c, lb, true);
    settle(&c, np_worker, true);
    rewrite(
        &c,
        "    type: ClusterIP\n    ports: [{name: http, port: 80, targetPort: 80, protocol: TCP}]",
        "",
        READY,
    );
    settle(&c, lb, false);
    assert!(
        get(&c, np_worker).is_err(),
        "NodePort left after type change"
    );
}

/// NodePort on the same port with another protocol (TCP to pods:80, then UDP to the pods'
/// UDP port): the UDP port answers, the TCP one is gone.
#[test]
fn node_port_protocol_change_leaves_no_stale_tcp_port() {
    let Some(_guard) = lb_tests::privileged() else {
        return;
    };
    let c = up(|_| np_spec(NP), "", READY);
    let np_worker = node_port(&c, WORKER, NP);
    settle(&c, np_worker, true);
    let udp_spec = format!(
        "    type: NodePort\n    ports: [{{name: http, port: 80, targetPort: {POD_UDP_PORT}, protocol: UDP, nodePort: {NP}}}]"
    );
    let udp_slice = web(&c.net, &udp_spec, "", READY).replace(
        "ports: [{name: http, port: 80, protocol: TCP}]",
        &format!("ports: [{{name: http, port: {POD_UDP_PORT}, protocol: UDP}}]"),
    );
    c.write_manifest(&udp_slice).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if udp_request(
            c.net.client_netns(),
            np_worker,
            b"q",
            Duration::from_millis(500),
        )
        .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "UDP NodePort never answered");
    }
    assert!(
        get(&c, np_worker).is_err(),
        "the TCP NodePort must be gone after the protocol change"
    );
}
