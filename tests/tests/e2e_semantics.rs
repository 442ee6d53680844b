//! kube-proxy's Service semantics with real traffic on the built-in network: session
//! affinity, externalTrafficPolicy Local, loadBalancerSourceRanges, the terminating
//! fallback, and services changing type, port or protocol.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::*;

const T: Duration = Duration::from_secs(3);
const NP: u16 = 30500;
const NP2: u16 = 30501;
const HC: u16 = 32100;

/// One service `web` (80 -> pods:80) with `spec` lines spliced in, and one EndpointSlice
/// listing `pods` with the given conditions.
fn web(net: &Network, spec: &str, status: &str, pods: &[&Pod], conditions: &str) -> String {
    let eps: String = pods
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
const LB_STATUS: &str = "  status: {loadBalancer: {ingress: [{ip: LB}]}}\n";

fn get(c: &Cluster, addr: SocketAddrV4) -> anyhow::Result<HttpResponse> {
    http_request(c.net.client_netns(), addr, "/", T)
}

fn wait_programmed(c: &mut Cluster, what: &str, ok: impl Fn(&lb_agent::status::Status) -> bool) {
    c.wait_for(what, Duration::from_secs(20), ok).unwrap();
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

#[test]
fn kube_proxy_semantics_with_real_traffic() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let lb_spec = format!(
        "    type: LoadBalancer\n    sessionAffinity: ClientIP\n    sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 2}}}}\n    ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP, nodePort: {NP}}}]"
    );
    let mut c = Cluster::up(&spec, |net| {
        let pods: Vec<&Pod> = net.pods().iter().collect();
        web(net, &lb_spec, LB_STATUS, &pods, READY)
    })
    .expect("cluster up");
    wait_programmed(&mut c, "web programmed", |s| {
        s.services.iter().any(|x| x.endpoints.len() == 3)
    });
    let all: Vec<Pod> = c.net.pods().to_vec();
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    let cp = c.net.node("service-demo-control-plane").clone();
    let worker = c.net.node("service-demo-worker").clone();

    // --- sessionAffinity: ClientIP keeps one client on one pod, across the service's
    // addresses (LB IP and every NodePort of the node it arrives at), until the timeout.
    let first = get(&c, lb).unwrap().body;
    for i in 0..20 {
        assert_eq!(
            get(&c, lb).unwrap().body,
            first,
            "affinity broke at request {i}"
        );
    }
    let np_worker = SocketAddrV4::new(worker.addr, NP);
    assert_eq!(
        get(&c, np_worker).unwrap().body,
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

    // --- externalTrafficPolicy: Local: only local pods, client address preserved, and
    // a node without a local endpoint drops.
    let etp = format!(
        "    type: LoadBalancer\n    externalTrafficPolicy: Local\n    healthCheckNodePort: {HC}\n    ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP, nodePort: {NP}}}]"
    );
    let pods: Vec<&Pod> = all.iter().collect();
    c.write_manifest(&web(&c.net, &etp, LB_STATUS, &pods, READY))
        .unwrap();
    wait_programmed(&mut c, "Local policy", |s| {
        s.services.iter().any(|x| x.name.ends_with("(local)"))
    });
    let on_worker: BTreeSet<String> = c
        .net
        .pods_on(&worker.name)
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
        get(&c, SocketAddrV4::new(cp.addr, NP)).is_err(),
        "a node without local endpoints must drop under Local policy"
    );
    // The healthCheckNodePort answers as kube-proxy's: 200 with the local endpoint count
    // where there are local endpoints, 503 where there are none.
    let hc = |node: &Node| {
        http_request(
            c.net.client_netns(),
            SocketAddrV4::new(node.addr, HC),
            "/",
            T,
        )
    };
    let ok = hc(&worker).expect("health check on the worker");
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(
        ok.body.contains(r#""localEndpoints":2"#) && ok.body.contains(r#""name":"web""#),
        "{}",
        ok.body
    );
    assert_eq!(ok.header("Content-Type"), Some("application/json"));
    let none = hc(&cp);
    let status = match &none {
        Ok(r) => r.status,
        Err(e) => panic!("health check on the control plane: {e:#}"),
    };
    assert_eq!(status, 503, "no local endpoint must answer 503");

    // --- loadBalancerSourceRanges: the client's own /32 is allowed; another range drops it.
    let ranges = |cidr: &str| {
        format!(
            "    type: LoadBalancer\n    loadBalancerSourceRanges: [\"{cidr}\"]\n    ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP, nodePort: {NP}}}]"
        )
    };
    let me = format!("{}/32", c.net.client_addr());
    c.write_manifest(&web(&c.net, &ranges(&me), LB_STATUS, &pods, READY))
        .unwrap();
    wait_programmed(&mut c, "source ranges (allowed)", |s| {
        s.services.iter().any(|x| !x.name.ends_with("(local)"))
    });
    settle(&c, lb, true);
    for _ in 0..5 {
        get(&c, lb).expect("allowed source");
    }
    c.write_manifest(&web(
        &c.net,
        &ranges("192.0.2.0/24"),
        LB_STATUS,
        &pods,
        READY,
    ))
    .unwrap();
    settle(&c, lb, false);
    // The NodePort is not an LB address: source ranges do not apply there.
    get(&c, np_worker).expect("NodePort ignores loadBalancerSourceRanges");

    // --- Terminating fallback: no ready endpoint, but serving+terminating ones still take
    // traffic; non-serving terminating ones never do (rejected at once).
    let np_spec = format!(
        "    type: NodePort\n    ports: [{{name: http, port: 80, targetPort: 80, protocol: TCP, nodePort: {NP}}}]"
    );
    c.write_manifest(&web(
        &c.net,
        &np_spec,
        "",
        &pods,
        "{ready: false, serving: true, terminating: true}",
    ))
    .unwrap();
    wait_programmed(&mut c, "terminating fallback", |s| {
        s.services.iter().any(|x| x.endpoints.len() == 3)
    });
    for _ in 0..10 {
        get(&c, np_worker).expect("serving terminating endpoints still serve");
    }
    c.write_manifest(&web(
        &c.net,
        &np_spec,
        "",
        &pods,
        "{ready: false, serving: false, terminating: true}",
    ))
    .unwrap();
    wait_programmed(&mut c, "no serving endpoint", |s| {
        s.services.iter().any(|x| x.endpoints.is_empty())
    });
    let err = get(&c, np_worker).expect_err("no serving endpoint must reject");
    assert!(
        format!("{err:#}").to_lowercase().contains("refused"),
        "{err:#}"
    );

    // --- Type, port and protocol changes re-program with nothing stale left.
    c.write_manifest(&web(
        &c.net,
        &lb_spec.replace(&NP.to_string(), &NP2.to_string()),
        LB_STATUS,
        &pods,
        READY,
    ))
    .unwrap();
    settle(&c, SocketAddrV4::new(worker.addr, NP2), true);
    settle(&c, lb, true);
    assert!(get(&c, np_worker).is_err(), "old NodePort still answers");
    // LoadBalancer -> ClusterIP: the LB IP and the NodePort go away.
    c.write_manifest(&web(
        &c.net,
        "    type: ClusterIP\n    ports: [{name: http, port: 80, targetPort: 80, protocol: TCP}]",
        "",
        &pods,
        READY,
    ))
    .unwrap();
    settle(&c, lb, false);
    assert!(
        get(&c, SocketAddrV4::new(worker.addr, NP2)).is_err(),
        "NodePort left after type change"
    );
    // NodePort on the same port with another protocol (UDP to the pods' UDP port).
    let udp_spec = format!(
        "    type: NodePort\n    ports: [{{name: http, port: 80, targetPort: {POD_UDP_PORT}, protocol: UDP, nodePort: {NP}}}]"
    );
    let udp_slice = web(&c.net, &udp_spec, "", &pods, READY).replace(
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
    let _ = Ipv4Addr::LOCALHOST;
}
