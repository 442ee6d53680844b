//! End to end through the XDP path with real TCP and UDP: a client on the "kind" network
//! reaches the seed's nginx-service through every node's NodePort and through the
//! LoadBalancer IP, and the agents follow changes of the manifest file.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use lb_tests::*;

const T: Duration = Duration::from_secs(3);

fn programmed(endpoints: usize) -> impl Fn(&lb_agent::status::Status) -> bool {
    move |s| {
        s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == endpoints)
    }
}

/// The agent's status reports an error naming all of `words`.
fn reported(words: &'static [&'static str]) -> impl Fn(&lb_agent::status::Status) -> bool {
    move |s| {
        s.agent
            .as_ref()
            .and_then(|a| a.last_error.as_deref())
            .is_some_and(|e| words.iter().all(|w| e.contains(w)))
    }
}

/// The agent's status reports no error.
fn no_error(s: &lb_agent::status::Status) -> bool {
    s.agent.as_ref().is_some_and(|a| a.last_error.is_none())
}

/// `n` HTTP requests from the client netns; returns how many each pod answered.
fn spread(c: &Cluster, addr: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let body = http_get(c.net.client_netns(), addr, T)
            .unwrap_or_else(|e| panic!("request {i} to {addr}: {e:#}"));
        *seen.entry(body.trim().to_string()).or_default() += 1;
    }
    seen
}

fn assert_even(what: &str, seen: &BTreeMap<String, usize>, pods: &[String], n: usize) {
    for p in pods {
        let got = seen.get(p).copied().unwrap_or(0);
        // Expected n/3 each; a pod under 60 % of its share means the hash or the table is off.
        assert!(
            got * pods.len() * 10 >= n * 6,
            "{what}: {p} answered {got} of {n}: {seen:?}"
        );
    }
    assert_eq!(
        seen.keys().filter(|k| !pods.contains(k)).count(),
        0,
        "{what}: unknown answers {seen:?}"
    );
}

#[test]
fn nodeport_and_lb_ip_spread_over_all_pods_and_follow_the_file() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let opts = ManifestOpts {
        echo: true,
        udp: true,
        ..Default::default()
    };
    let mut c = Cluster::up(&spec, |net| seed_manifests(net, &opts)).expect("cluster up");
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    c.wait_for(
        "nginx-service programmed",
        Duration::from_secs(20),
        programmed(pods.len()),
    )
    .unwrap();

    // NodePort on every node (including the control plane, which runs no pod: all remote).
    for node in c.net.nodes().to_vec() {
        let addr = SocketAddrV4::new(node.addr, NGINX_NODE_PORT);
        let seen = spread(&c, addr, 150);
        assert_even(&format!("NodePort on {}", node.name), &seen, &pods, 150);
    }
    // The EXTERNAL-IP.
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    let seen = spread(&c, lb, 300);
    assert_even("LoadBalancer IP", &seen, &pods, 300);

    // NodePort from another node (the seed's "from a node" check, across the kind network).
    let worker = c.net.node("service-demo-worker").clone();
    let worker2 = c.net.node("service-demo-worker2").clone();
    for _ in 0..20 {
        let body = http_get(
            &worker2.netns,
            SocketAddrV4::new(worker.addr, NGINX_NODE_PORT),
            T,
        )
        .unwrap();
        assert!(pods.contains(&body.trim().to_string()), "{body}");
    }

    // UDP through each node's NodePort: the reply comes back from the address asked.
    let mut udp_seen = BTreeMap::<String, usize>::new();
    for node in c.net.nodes() {
        for i in 0..30 {
            let r = udp_request(
                c.net.client_netns(),
                SocketAddrV4::new(node.addr, DNS_NODE_PORT),
                b"q",
                T,
            )
            .unwrap_or_else(|e| panic!("UDP {i} via {}: {e:#}", node.name));
            *udp_seen
                .entry(String::from_utf8_lossy(&r).trim().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(
        udp_seen.len(),
        pods.len(),
        "UDP reached every pod: {udp_seen:?}"
    );

    // A long-lived connection to the echo service, then its pod leaves the EndpointSlice.
    let echo_addr = SocketAddrV4::new(worker.addr, ECHO_NODE_PORT);
    let conn = in_netns(c.net.client_netns(), || {
        TcpStream::connect_timeout(&echo_addr.into(), T)
    })
    .unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    (&conn).write_all(b"one\n").unwrap();
    reader.read_line(&mut line).unwrap();
    let pinned_pod = line.split_whitespace().next().unwrap().to_string();
    assert!(pods.contains(&pinned_pod), "{line}");
    let rest: Vec<String> = pods.iter().filter(|p| **p != pinned_pod).cloned().collect();
    let without = ManifestOpts {
        echo: true,
        udp: true,
        endpoints: Some(rest.clone()),
        ..Default::default()
    };
    c.write_manifest(&seed_manifests(&c.net, &without)).unwrap();
    c.wait_for(
        "endpoint removed",
        Duration::from_secs(20),
        programmed(rest.len()),
    )
    .unwrap();
    let seen = spread(&c, lb, 120);
    assert!(
        !seen.contains_key(&pinned_pod),
        "removed pod {pinned_pod} got new connections: {seen:?}"
    );
    assert_eq!(seen.len(), rest.len(), "{seen:?}");
    // ... while the established connection still works, on the same pod.
    line.clear();
    (&conn).write_all(b"two\n").unwrap();
    reader
        .read_line(&mut line)
        .expect("established connection keeps working");
    assert_eq!(line.trim(), format!("{pinned_pod} two"));

    // The service deleted from the file stops answering.
    let gone = ManifestOpts {
        nginx: false,
        echo: true,
        udp: true,
        ..Default::default()
    };
    c.write_manifest(&seed_manifests(&c.net, &gone)).unwrap();
    c.wait_for("nginx-service removed", Duration::from_secs(20), |s| {
        !s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service"))
    })
    .unwrap();
    assert!(
        http_get(c.net.client_netns(), lb, Duration::from_secs(1)).is_err(),
        "deleted service still answers"
    );
    assert!(
        http_get(
            c.net.client_netns(),
            SocketAddrV4::new(worker.addr, NGINX_NODE_PORT),
            Duration::from_secs(1)
        )
        .is_err(),
        "deleted NodePort still answers"
    );
}

#[test]
fn invalid_manifest_is_reported_and_the_last_good_state_keeps_serving() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let mut c = Cluster::up(&spec, |net| seed_manifests(net, &ManifestOpts::default()))
        .expect("cluster up");
    let pods = c.net.pods().len();
    c.wait_for(
        "nginx-service programmed",
        Duration::from_secs(20),
        programmed(pods),
    )
    .unwrap();
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);

    // A port out of range in an otherwise valid file: the whole file is refused.
    let good = seed_manifests(&c.net, &ManifestOpts::default());
    let bad = good.replace("port: 80,", "port: 80000,");
    assert_ne!(
        good, bad,
        "the manifest shape changed; this test must break it another way"
    );
    c.write_manifest(&bad).unwrap();
    c.wait_for(
        "the error to be reported",
        Duration::from_secs(20),
        reported(&["Service dev/nginx-service", "spec.ports[0]"]),
    )
    .unwrap();
    for _ in 0..10 {
        http_get(c.net.client_netns(), lb, T).expect("last good state still serves");
    }

    // Broken YAML likewise; then a good file clears the error.
    c.write_manifest("items: [unclosed\n").unwrap();
    c.wait_for(
        "the YAML error to be reported",
        Duration::from_secs(20),
        reported(&["YAML"]),
    )
    .unwrap();
    http_get(c.net.client_netns(), lb, T).expect("still serving");
    c.write_manifest(&good).unwrap();
    c.wait_for("the error to clear", Duration::from_secs(20), no_error)
        .unwrap();
}

/// `--source file:<DIR>`: the agents read a directory of manifests and follow it file by
/// file (inotify): a broken file is reported while the others keep serving, a removed
/// file takes its Services away, a new one brings them back.
#[test]
fn a_directory_of_manifests_is_followed_file_by_file() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let mut c = Cluster::up_with(
        &spec,
        |net| seed_manifests(net, &ManifestOpts::default()),
        SourceMode::Dir,
    )
    .expect("cluster up");
    let pods = c.net.pods().len();
    c.wait_for(
        "nginx-service programmed",
        Duration::from_secs(20),
        programmed(pods),
    )
    .unwrap();
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    http_get(c.net.client_netns(), lb, T).expect("served from the directory");

    c.write_manifest_file("broken.yaml", "items: [unclosed\n")
        .unwrap();
    c.wait_for(
        "the broken file reported",
        Duration::from_secs(20),
        reported(&["broken.yaml", "YAML"]),
    )
    .unwrap();
    http_get(c.net.client_netns(), lb, T).expect("the other file still serves");
    c.remove_manifest_file("broken.yaml").unwrap();

    // The seed's objects move to another file: all.yaml goes, seed.yaml comes.
    let seed = seed_manifests(&c.net, &ManifestOpts::default());
    c.remove_manifest_file("all.yaml").unwrap();
    c.wait_for("nginx-service gone", Duration::from_secs(20), |s| {
        !s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service"))
    })
    .unwrap();
    assert!(
        http_get(c.net.client_netns(), lb, Duration::from_millis(500)).is_err(),
        "a removed file's Service still answers"
    );
    c.write_manifest_file("seed.yaml", &seed).unwrap();
    c.wait_for(
        "nginx-service back",
        Duration::from_secs(20),
        programmed(pods),
    )
    .unwrap();
    c.wait_for("no error left", Duration::from_secs(20), no_error)
        .unwrap();
    http_get(c.net.client_netns(), lb, T).expect("served from the new file");
}
