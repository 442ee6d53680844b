//! End to end for east-west and host traffic: pods reach ClusterIPs through the tc hook on
//! their interface, node processes reach ClusterIPs and NodePorts (also on localhost) through
//! the socket hooks on the node's cgroup — the seed article's first two checks.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::*;

const T: Duration = Duration::from_secs(3);
const LOCAL_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 20);
const EMPTY_CIP: Ipv4Addr = Ipv4Addr::new(10, 96, 100, 21);

/// The seed's services plus: a DNS-like UDP service, a service with
/// `internalTrafficPolicy: Local`, and one without endpoints.
fn manifests(net: &Network, endpoints: &[String]) -> String {
    let mut y = seed_manifests(
        net,
        &ManifestOpts {
            udp: true,
            endpoints: Some(endpoints.to_vec()),
            ..Default::default()
        },
    );
    let eps: String = net
        .pods()
        .iter()
        .filter(|p| endpoints.contains(&p.name))
        .map(|p| {
            format!(
                "  - addresses: [\"{}\"]\n    nodeName: {}\n",
                p.addr, p.node
            )
        })
        .collect();
    y.push_str(&format!(
        "- apiVersion: v1\n  kind: Service\n  metadata: {{name: local-only, namespace: dev}}\n  spec:\n    clusterIP: {LOCAL_CIP}\n    internalTrafficPolicy: Local\n    ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP}}]\n\
- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {{name: local-only-1, namespace: dev, labels: {{kubernetes.io/service-name: local-only}}}}\n  addressType: IPv4\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n  endpoints:\n{eps}\
- apiVersion: v1\n  kind: Service\n  metadata: {{name: nobody, namespace: dev}}\n  spec:\n    clusterIP: {EMPTY_CIP}\n    ports: [{{name: http, port: 80, protocol: TCP}}]\n"
    ));
    y
}

fn cluster_ip() -> Ipv4Addr {
    NGINX_CLUSTER_IP.parse().unwrap()
}

fn spread_from_pod(pod: &Pod, addr: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let r = pod_http_get(pod, addr, T)
            .unwrap_or_else(|e| panic!("request {i} from {} to {addr}: {e:#}", pod.name));
        // The backend saw the client pod's own address: ClusterIP keeps the source.
        let client = r.header("X-Client").unwrap_or_default().to_string();
        assert!(
            client.starts_with(&format!("{}:", pod.addr)),
            "backend saw {client}, expected {}",
            pod.addr
        );
        *seen.entry(r.body.trim().to_string()).or_default() += 1;
    }
    seen
}

fn refused_fast(pod: &Pod, addr: SocketAddrV4) {
    let t0 = Instant::now();
    let err = pod_http_get(pod, addr, T).expect_err("must be refused");
    let msg = format!("{err:#}");
    assert!(msg.to_lowercase().contains("refused"), "{addr}: {msg}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "{addr}: refusal took {:?}",
        t0.elapsed()
    );
}

#[test]
fn pods_and_nodes_reach_cluster_ips_and_node_ports() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let mut endpoints = vec![];
    let mut c = Cluster::up(&spec, |net| {
        endpoints = net.pods().iter().map(|p| p.name.clone()).collect();
        manifests(net, &endpoints)
    })
    .expect("cluster up");
    c.wait_for("services programmed", Duration::from_secs(20), |s| {
        s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == 3)
    })
    .unwrap();
    let pods = endpoints.clone();

    // A client pod created after the agents started (the seed's `kubectl run curl-test`):
    // its interface must be picked up.
    let curl = c
        .net
        .add_pod("service-demo-worker", "curl-test")
        .expect("add pod");
    let cip = SocketAddrV4::new(cluster_ip(), 80);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pod_http_get(&curl, cip, Duration::from_secs(1)).is_err() {
        assert!(
            Instant::now() < deadline,
            "new pod's interface never got the ClusterIP hook"
        );
    }

    // 1. ClusterIP from a pod reaches pods on its own node and on the other, spread evenly.
    let n = 150;
    let seen = spread_from_pod(&curl, cip, n);
    for p in &pods {
        let got = seen.get(p).copied().unwrap_or(0);
        assert!(
            got * pods.len() * 10 >= n * 6,
            "{p} answered {got} of {n}: {seen:?}"
        );
    }

    // Hairpin: a backend reaching its own service, until it lands on itself.
    let me = c
        .net
        .pods()
        .iter()
        .find(|p| p.name == pods[0])
        .unwrap()
        .clone();
    let mut self_hits = 0;
    for i in 0..60 {
        let r = pod_http_get(&me, cip, T).unwrap_or_else(|e| panic!("hairpin request {i}: {e:#}"));
        if r.body.trim() == me.name {
            self_hits += 1;
        }
    }
    assert!(
        self_hits > 0,
        "{} never reached itself through its service",
        me.name
    );

    // UDP request/response through the ClusterIP; the reply comes from the ClusterIP.
    let dns = SocketAddrV4::new(cluster_ip_of_dns(), DNS_PORT);
    let mut udp_seen = BTreeMap::<String, usize>::new();
    for i in 0..60 {
        let r = pod_udp_request(&curl, dns, b"q", T).unwrap_or_else(|e| panic!("UDP {i}: {e:#}"));
        *udp_seen
            .entry(String::from_utf8_lossy(&r).trim().to_string())
            .or_default() += 1;
    }
    assert_eq!(udp_seen.len(), pods.len(), "UDP spread: {udp_seen:?}");

    // Unused port of a ClusterIP, and a service without endpoints: refused at once.
    refused_fast(&curl, SocketAddrV4::new(cluster_ip(), 81));
    refused_fast(&curl, SocketAddrV4::new(EMPTY_CIP, 80));

    // internalTrafficPolicy: Local keeps traffic on the client's node...
    let local = SocketAddrV4::new(LOCAL_CIP, 80);
    let on_worker: Vec<String> = c
        .net
        .pods_on("service-demo-worker")
        .iter()
        .map(|p| p.name.clone())
        .collect();
    for _ in 0..30 {
        let r = pod_http_get(&curl, local, T).expect("local-only from worker");
        assert!(
            on_worker.contains(&r.body.trim().to_string()),
            "{} is not on the worker",
            r.body.trim()
        );
    }
    // ... and a node without a local endpoint drops it.
    let cp_client = c
        .net
        .add_pod("service-demo-control-plane", "cp-client")
        .expect("add pod");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pod_http_get(&cp_client, cip, Duration::from_secs(1)).is_err() {
        assert!(
            Instant::now() < deadline,
            "control-plane pod never reached the ClusterIP"
        );
    }
    assert!(
        pod_http_get(&cp_client, local, Duration::from_secs(1)).is_err(),
        "no local endpoint must drop"
    );

    // 2. From the node itself: ClusterIP, <node IP>:NodePort and the seed's localhost:NodePort.
    let worker = c.net.node("service-demo-worker").clone();
    let mut host_seen = BTreeMap::<String, usize>::new();
    for (addr, port) in [
        (cluster_ip().to_string(), 80),
        (worker.addr.to_string(), NGINX_NODE_PORT),
        ("localhost".to_string(), NGINX_NODE_PORT),
    ] {
        for _ in 0..10 {
            let body = node_http_get(&worker, &addr, port, T)
                .unwrap_or_else(|e| panic!("node -> {addr}:{port}: {e:#}"));
            assert!(pods.contains(&body.trim().to_string()), "{body}");
            *host_seen.entry(body.trim().to_string()).or_default() += 1;
        }
    }
    assert!(
        host_seen.len() > 1,
        "host traffic always went to one pod: {host_seen:?}"
    );
    // getpeername shows the service address, not the backend.
    let r = node_http_request(&worker, &cluster_ip().to_string(), 80, "/", T).unwrap();
    assert_eq!(r.peer, SocketAddrV4::new(cluster_ip(), 80));
    // UDP from the node: unconnected socket, the reply appears to come from the service.
    let u = node_udp_request(&worker, &cluster_ip_of_dns().to_string(), DNS_PORT, b"q", T).unwrap();
    assert_eq!(u.from, dns);
    assert!(pods.contains(&String::from_utf8_lossy(&u.payload).trim().to_string()));
    // Refusals reach node processes too.
    let err = node_http_get(&worker, &cluster_ip().to_string(), 81, T).expect_err("unused port");
    assert!(
        format!("{err:#}").to_lowercase().contains("refused"),
        "{err:#}"
    );
}

fn cluster_ip_of_dns() -> Ipv4Addr {
    // seed_manifests gives the UDP test service this ClusterIP.
    Ipv4Addr::new(10, 96, 100, 12)
}
