//! `lb-agent --source kube`: Services and EndpointSlices through the Kubernetes API.
//!
//! - The kube source itself (`KubeSource` with the real kube client) against the API server
//!   stand-in: complete snapshots only, debouncing, outages, filtering, the agent's own Node
//!   and the ServiceCIDRs (a 404/403 on those does not block), Events. Unprivileged.
//! - Real agents on the built-in network (`Cluster::up_kube`: every agent runs with `--source
//!   kube` and a kubeconfig pointing at the stand-in on the control plane's address, port
//!   6443): create/update/delete reach the maps and the traffic, endpoint churn, API server
//!   restart and 410 Gone relists, outages, Events for unsupported ports. Privileged.
//! - A real cluster (`KUBECONFIG` and `XLB_REAL_CLUSTER=1`): the kube source and the
//!   translation against a real API server, in a throwaway namespace.
//!
//! The stand-in (`lb_tests::ApiServer`) is the project's one test double; see its module
//! docs for why and what it leaves out.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_agent::{
    model::translate::{self, NodeContext, ServiceEvent},
    source::{kube::KubeSource, yaml::Objects},
    status::Status,
};
use lb_tests::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(3);
/// Enough for a reconnect after the watcher's backoff grew during an outage (0.8 s doubling,
/// jittered, 30 s at most).
const RECOVER: Duration = Duration::from_secs(60);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn local_client(srv: &ApiServer, rt: &tokio::runtime::Runtime) -> kube::Client {
    let cfg = kube::Config::new(srv.url().parse().unwrap());
    let _g = rt.enter();
    kube::Client::try_from(cfg).unwrap()
}

fn service(ns: &str, name: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": ns,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(2000)},
            "managedFields": [{"manager": "kubectl", "operation": "Apply"}],
        },
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.7.7", "ports": ports},
    })
}

fn slice(ns: &str, name: &str, svc: &str, addr_type: &str, addrs: &[&str]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": addr_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": addrs.iter().map(|a| json!({
            "addresses": [a], "conditions": {"ready": true}, "nodeName": "n1",
        })).collect::<Vec<_>>(),
    })
}

fn next_snapshot(
    rt: &tokio::runtime::Runtime,
    src: &mut KubeSource,
    within: Duration,
) -> Option<Arc<Objects>> {
    rt.block_on(async {
        tokio::time::timeout(within, src.next())
            .await
            .ok()
            .flatten()
    })
}

/// Snapshots until one satisfies `ok` (the two watchers reconnect independently, so an
/// intermediate snapshot may hold one side's news only, as with kube-proxy's informers).
fn snapshot_until(
    rt: &tokio::runtime::Runtime,
    src: &mut KubeSource,
    what: &str,
    ok: impl Fn(&Objects) -> bool,
) -> Arc<Objects> {
    let deadline = Instant::now() + RECOVER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let s = next_snapshot(rt, src, left).unwrap_or_else(|| panic!("timed out: {what}"));
        if ok(&s) {
            return s;
        }
    }
}

fn backends(objs: &Objects) -> BTreeSet<String> {
    let node = NodeContext {
        node_name: "n1".into(),
        node_addrs: vec![Ipv4Addr::new(172, 18, 0, 9)],
        ..Default::default()
    };
    translate::translate(objs, &node)
        .ports
        .iter()
        .flat_map(|p| p.backends.iter().map(|b| format!("{}:{}", b.addr, b.port)))
        .collect()
}

#[test]
fn kube_source_publishes_only_complete_debounced_snapshots() {
    let mut srv = ApiServer::start_local().unwrap();
    let http = json!([{"name": "http", "port": 80, "targetPort": 8080}]);
    srv.create(&service("dev", "web", http.clone())).unwrap();
    srv.create(&slice("dev", "web-a", "web", "IPv4", &["10.244.1.2"]))
        .unwrap();
    srv.create(&slice("dev", "web-b", "web", "IPv4", &["10.244.2.2"]))
        .unwrap();
    srv.create(&slice("dev", "web-v6", "web", "IPv6", &["fd00::2"]))
        .unwrap();
    // EndpointSlices cannot be listed yet: Services alone must not be published.
    srv.set_unavailable("discovery.k8s.io/v1", "endpointslices", true);
    let rt = rt();
    let client = local_client(&srv, &rt);
    let mut src = {
        let _g = rt.enter();
        KubeSource::start(client, "n1")
    };
    assert!(
        next_snapshot(&rt, &mut src, Duration::from_secs(2)).is_none(),
        "a snapshot was published before both lists completed"
    );
    srv.set_unavailable("discovery.k8s.io/v1", "endpointslices", false);
    let first = next_snapshot(&rt, &mut src, RECOVER).expect("first snapshot");
    assert_eq!(first.services.len(), 1);
    // Many slices per service are merged; IPv6 slices are left out.
    assert_eq!(first.slices.len(), 2, "{:?}", first.slices);
    assert_eq!(
        backends(&first),
        BTreeSet::from(["10.244.1.2:8080".into(), "10.244.2.2:8080".into()])
    );
    // Stored objects are trimmed.
    let svc = &first.services[0];
    assert!(svc.metadata.annotations.is_none() && svc.metadata.managed_fields.is_none());

    // A burst of 100 changes becomes a few snapshots; the last one is the final state.
    let started = Instant::now();
    for i in 0..100 {
        let addr = format!("10.244.1.{}", 10 + i);
        srv.update(&slice("dev", "web-a", "web", "IPv4", &[&addr]))
            .unwrap();
    }
    let mut snaps = vec![];
    while let Some(s) = next_snapshot(&rt, &mut src, Duration::from_secs(1)) {
        snaps.push(s);
    }
    let last = snaps.last().expect("a snapshot after the burst");
    assert_eq!(
        backends(last),
        BTreeSet::from(["10.244.1.109:8080".into(), "10.244.2.2:8080".into()])
    );
    assert!(
        snaps.len() <= 2 + (started.elapsed().as_millis() / 150) as usize && snaps.len() < 20,
        "{} snapshots for one burst",
        snaps.len()
    );

    // Outage: nothing is published; what changed meanwhile arrives after the restart.
    srv.stop();
    srv.delete(&slice("dev", "web-b", "web", "IPv4", &[]))
        .unwrap();
    srv.create(&service("dev", "api", http)).unwrap();
    assert!(next_snapshot(&rt, &mut src, Duration::from_secs(2)).is_none());
    srv.start().unwrap();
    snapshot_until(&rt, &mut src, "changes made during the outage", |s| {
        s.services.len() == 2 && backends(s) == BTreeSet::from(["10.244.1.109:8080".into()])
    });

    // 410: compacted while the watches are dropped -> relist, same content, no stale entry.
    srv.delete(&service("dev", "api", json!([]))).unwrap();
    snapshot_until(&rt, &mut src, "delete", |s| s.services.len() == 1);
    srv.stop();
    srv.create(&slice("dev", "web-c", "web", "IPv4", &["10.244.3.3"]))
        .unwrap();
    srv.delete(&slice("dev", "web-a", "web", "IPv4", &[]))
        .unwrap();
    srv.compact();
    srv.start().unwrap();
    snapshot_until(&rt, &mut src, "relist after 410", |s| {
        backends(s) == BTreeSet::from(["10.244.3.3:8080".into()])
    });
    let lists = srv
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("GET /apis/discovery.k8s.io/v1/endpointslices?") && !r.contains("watch=")
        })
        .count();
    assert!(lists >= 2, "no relist after 410: {:?}", srv.requests());

    // Events name the Service (uid included).
    src.post_event(&ServiceEvent {
        namespace: "dev".into(),
        name: "web".into(),
        reason: "Unsupported".into(),
        message: "port x/SCTP skipped".into(),
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.events().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let evs = srv.events();
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["type"], "Warning");
    assert_eq!(evs[0]["reason"], "Unsupported");
    assert_eq!(evs[0]["regarding"]["kind"], "Service");
    assert_eq!(evs[0]["regarding"]["name"], "web");
    assert!(
        evs[0]["regarding"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );
    assert_eq!(evs[0]["reportingInstance"], "lb-agent-n1");
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
        },
        "spec": {"podCIDR": "10.244.1.0/24"},
    })
}

fn service_cidr(name: &str, cidrs: &[&str]) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": cidrs},
    })
}

fn zone(objs: &Objects) -> Option<String> {
    let n = objs.nodes.first()?;
    n.metadata
        .labels
        .as_ref()?
        .get("topology.kubernetes.io/zone")
        .cloned()
}

fn cidrs(objs: &Objects) -> BTreeSet<String> {
    objs.service_cidrs
        .iter()
        .flat_map(|c| {
            c.spec
                .iter()
                .flat_map(|s| s.cidrs.iter().flatten().cloned())
        })
        .collect()
}

/// The agent's own Node (only it: field selector) and the ServiceCIDRs are in the snapshots,
/// trimmed; their first lists gate the first snapshot as the Services' do; a label change on
/// the Node or a new ServiceCIDR produces a new snapshot.
#[test]
fn kube_source_follows_its_node_and_the_service_cidrs() {
    let srv = ApiServer::start_local().unwrap();
    let http = json!([{"name": "http", "port": 80, "targetPort": 8080}]);
    srv.create(&service("dev", "web", http)).unwrap();
    srv.create(&slice("dev", "web-a", "web", "IPv4", &["10.244.1.2"]))
        .unwrap();
    srv.create(&node("n1", "zone-a")).unwrap();
    srv.create(&node("n2", "zone-b")).unwrap();
    srv.create(&service_cidr(
        "kubernetes",
        &["10.96.0.0/12", "fd00:10:96::/112"],
    ))
    .unwrap();
    // Neither the Node nor the ServiceCIDRs can be listed yet (503: not a refusal).
    srv.set_unavailable("v1", "nodes", true);
    srv.set_unavailable("networking.k8s.io/v1", "servicecidrs", true);
    let rt = rt();
    let client = local_client(&srv, &rt);
    let mut src = {
        let _g = rt.enter();
        KubeSource::start(client, "n1")
    };
    assert!(
        next_snapshot(&rt, &mut src, Duration::from_secs(2)).is_none(),
        "a snapshot was published before the Node and ServiceCIDR lists completed"
    );
    srv.set_unavailable("v1", "nodes", false);
    assert!(
        next_snapshot(&rt, &mut src, Duration::from_secs(2)).is_none(),
        "a snapshot was published before the ServiceCIDR list completed"
    );
    srv.set_unavailable("networking.k8s.io/v1", "servicecidrs", false);
    let first = next_snapshot(&rt, &mut src, RECOVER).expect("first snapshot");
    assert_eq!(first.services.len(), 1);
    assert_eq!(first.slices.len(), 1);
    let names: Vec<_> = first
        .nodes
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["n1"], "only the agent's own Node");
    assert_eq!(zone(&first).as_deref(), Some("zone-a"));
    let n1 = &first.nodes[0];
    assert!(n1.metadata.annotations.is_none() && n1.metadata.managed_fields.is_none());
    assert_eq!(n1.metadata.namespace, None);
    assert_eq!(
        cidrs(&first),
        BTreeSet::from(["10.96.0.0/12".into(), "fd00:10:96::/112".into()])
    );
    assert!(
        srv.requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?")
                && r.contains("fieldSelector=metadata.name%3Dn1")),
        "{:?}",
        srv.requests()
    );

    // The Node's labels change: a new snapshot carries them. Another Node's do not matter.
    srv.update(&node("n1", "zone-c")).unwrap();
    snapshot_until(&rt, &mut src, "the Node's new zone", |s| {
        zone(s).as_deref() == Some("zone-c")
    });
    srv.update(&node("n2", "zone-d")).unwrap();
    assert!(
        next_snapshot(&rt, &mut src, Duration::from_secs(1)).is_none(),
        "another Node's change produced a snapshot"
    );
    // A second range, then the Node goes away.
    srv.create(&service_cidr("extra", &["10.100.0.0/16"]))
        .unwrap();
    snapshot_until(&rt, &mut src, "the new ServiceCIDR", |s| {
        cidrs(s).contains("10.100.0.0/16") && s.service_cidrs.len() == 2
    });
    srv.delete(&node("n1", "")).unwrap();
    let s = snapshot_until(&rt, &mut src, "the Node deleted", |s| s.nodes.is_empty());
    assert_eq!(s.services.len(), 1);
}

/// An API server that does not serve ServiceCIDRs (404, before Kubernetes 1.33) or forbids
/// them (403, RBAC): snapshots come anyway, without ServiceCIDRs, and follow changes; once
/// they can be read they show up. A missing Node is an empty list too.
#[test]
fn kube_source_publishes_without_service_cidrs_when_refused() {
    for code in [404, 403] {
        let srv = ApiServer::start_local().unwrap();
        let http = json!([{"name": "http", "port": 80, "targetPort": 8080}]);
        srv.create(&service("dev", "web", http.clone())).unwrap();
        srv.create(&slice("dev", "web-a", "web", "IPv4", &["10.244.1.2"]))
            .unwrap();
        srv.create(&service_cidr("kubernetes", &["10.96.0.0/12"]))
            .unwrap();
        srv.set_refused("networking.k8s.io/v1", "servicecidrs", Some(code));
        let rt = rt();
        let client = local_client(&srv, &rt);
        let mut src = {
            let _g = rt.enter();
            // No Node of that name exists: an empty, complete list.
            KubeSource::start(client, "n1")
        };
        let first = next_snapshot(&rt, &mut src, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{code}: no snapshot"));
        assert_eq!(first.services.len(), 1, "{code}");
        assert!(first.service_cidrs.is_empty(), "{code}");
        assert!(first.nodes.is_empty(), "{code}");
        srv.create(&service("dev", "api", http)).unwrap();
        snapshot_until(&rt, &mut src, "a change after the refusal", |s| {
            s.services.len() == 2
        });
        // Readable again (upgrade, RBAC fixed): the watcher's retries pick them up.
        srv.set_refused("networking.k8s.io/v1", "servicecidrs", None);
        let s = snapshot_until(&rt, &mut src, "ServiceCIDRs after the refusal ended", |s| {
            !s.service_cidrs.is_empty()
        });
        assert_eq!(cidrs(&s), BTreeSet::from(["10.96.0.0/12".into()]), "{code}");
    }
}

// ---------------------------------------------------------------------------------------
// Real agents against the stand-in.

fn nginx(s: &Status) -> Option<&lb_agent::status::SvcStatus> {
    s.services
        .iter()
        .find(|x| x.name.starts_with("dev/nginx-service"))
}

fn endpoint_addrs(s: &Status) -> BTreeSet<Ipv4Addr> {
    nginx(s)
        .map(|x| {
            x.endpoints
                .iter()
                .filter_map(|e| e.split(':').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn with_endpoints(want: BTreeSet<Ipv4Addr>) -> impl Fn(&Status) -> bool {
    move |s| nginx(s).is_some() && endpoint_addrs(s) == want
}

fn pod_addrs(c: &Cluster, names: &[String]) -> BTreeSet<Ipv4Addr> {
    names.iter().map(|n| c.net.pod(n).addr).collect()
}

fn answers(c: &Cluster, addr: SocketAddrV4, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            http_get(c.net.client_netns(), addr, T)
                .unwrap_or_else(|e| panic!("request {i} to {addr}: {e:#}"))
                .trim()
                .to_string()
        })
        .collect()
}

fn opts(endpoints: Option<Vec<String>>) -> ManifestOpts {
    ManifestOpts {
        endpoints,
        echo: true,
        ..Default::default()
    }
}

fn kube_cluster() -> Cluster {
    let spec = TopologySpec::seed();
    let mut c =
        Cluster::up_kube(&spec, |net| seed_manifests(net, &opts(None))).expect("cluster up");
    let all = c.net.pods().iter().map(|p| p.addr).collect();
    c.wait_for(
        "nginx-service programmed from the API",
        Duration::from_secs(30),
        with_endpoints(all),
    )
    .unwrap();
    c
}

#[test]
fn api_objects_reach_the_maps_and_the_traffic() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = kube_cluster();
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    let worker = c.net.node("service-demo-worker").clone();
    let np = SocketAddrV4::new(worker.addr, NGINX_NODE_PORT);
    assert_eq!(answers(&c, lb, 60), pods.iter().cloned().collect());
    assert_eq!(answers(&c, np, 60), pods.iter().cloned().collect());
    for a in &c.agents {
        let log = a.log_text();
        assert!(log.contains("Services: initial list complete"), "{log}");
        assert!(
            log.contains("EndpointSlices: initial list complete"),
            "{log}"
        );
    }

    // Update: one pod leaves the EndpointSlice.
    let rest: Vec<String> = pods[1..].to_vec();
    c.write_manifest(&seed_manifests(&c.net, &opts(Some(rest.clone()))))
        .unwrap();
    c.wait_for(
        "endpoint removed",
        Duration::from_secs(20),
        with_endpoints(pod_addrs(&c, &rest)),
    )
    .unwrap();
    assert_eq!(answers(&c, lb, 60), rest.iter().cloned().collect());

    // Update of the Service itself: a new NodePort.
    let yaml = seed_manifests(&c.net, &opts(Some(rest.clone())))
        .replace(&format!("nodePort: {NGINX_NODE_PORT}"), "nodePort: 31999");
    c.write_manifest(&yaml).unwrap();
    c.wait_for("NodePort changed", Duration::from_secs(20), |s| {
        nginx(s).is_some_and(|x| x.node_port == Some(31999))
    })
    .unwrap();
    answers(&c, SocketAddrV4::new(worker.addr, 31999), 10);
    assert!(http_get(c.net.client_netns(), np, Duration::from_secs(1)).is_err());

    // Delete.
    let gone = ManifestOpts {
        nginx: false,
        echo: true,
        ..Default::default()
    };
    c.write_manifest(&seed_manifests(&c.net, &gone)).unwrap();
    c.wait_for("nginx-service removed", Duration::from_secs(20), |s| {
        nginx(s).is_none()
    })
    .unwrap();
    assert!(http_get(c.net.client_netns(), lb, Duration::from_secs(1)).is_err());
}

#[test]
fn endpoint_churn_settles_on_the_final_state() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = kube_cluster();
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    // 60 rewrites of the EndpointSlice as fast as they can be made (a rollout's churn).
    for i in 0..60 {
        let subset: Vec<String> = pods
            .iter()
            .enumerate()
            .filter(|(j, _)| (i + j) % 3 != 0)
            .map(|(_, p)| p.clone())
            .collect();
        c.write_manifest(&seed_manifests(&c.net, &opts(Some(subset))))
            .unwrap();
    }
    let last = vec![pods[0].clone()];
    c.write_manifest(&seed_manifests(&c.net, &opts(Some(last.clone()))))
        .unwrap();
    c.wait_for(
        "the final endpoint set",
        Duration::from_secs(20),
        with_endpoints(pod_addrs(&c, &last)),
    )
    .unwrap();
    // Stays there (no late stale snapshot).
    std::thread::sleep(Duration::from_secs(1));
    for a in &c.agents {
        assert_eq!(endpoint_addrs(&a.status().unwrap()), pod_addrs(&c, &last));
    }
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    assert_eq!(answers(&c, lb, 30), last.iter().cloned().collect());
    // Debounced: far fewer programming passes than changes.
    for a in &c.agents {
        let passes = a.log_text().matches("programmed ").count();
        assert!(passes < 40, "{}: {passes} programming passes", a.node);
    }
}

#[test]
fn restart_and_410_relist_leave_nothing_stale() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = kube_cluster();
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    let echo = |s: &Status| s.services.iter().any(|x| x.name.starts_with("dev/echo"));
    c.wait_for("echo programmed", Duration::from_secs(20), echo)
        .unwrap();

    // Compact + drop the watches: every agent gets 410 on its resumed watch and relists.
    c.api().compact();
    c.api().drop_watches();
    let deadline = Instant::now() + RECOVER;
    while c.agents.iter().any(|a| !a.log_text().contains("relisted")) {
        assert!(Instant::now() < deadline, "agents did not relist after 410");
        std::thread::sleep(Duration::from_millis(100));
    }
    let all: BTreeSet<Ipv4Addr> = c.net.pods().iter().map(|p| p.addr).collect();
    c.wait_for("same state after relist", T, with_endpoints(all))
        .unwrap();
    assert_eq!(answers(&c, lb, 30), pods.iter().cloned().collect());

    // Restart with changes the agents never saw as events (history compacted): the echo
    // service deleted, one endpoint gone.
    c.api_mut().stop();
    let rest: Vec<String> = pods[1..].to_vec();
    let no_echo = ManifestOpts {
        endpoints: Some(rest.clone()),
        ..Default::default()
    };
    c.write_manifest(&seed_manifests(&c.net, &no_echo)).unwrap();
    c.api().compact();
    c.api_mut().start().unwrap();
    let want = pod_addrs(&c, &rest);
    c.wait_for("state after restart", RECOVER, move |s| {
        !echo(s) && endpoint_addrs(s) == want
    })
    .unwrap();
    assert_eq!(answers(&c, lb, 60), rest.iter().cloned().collect());
    let worker = c.net.node("service-demo-worker").clone();
    assert!(
        http_get(
            c.net.client_netns(),
            SocketAddrV4::new(worker.addr, ECHO_NODE_PORT),
            Duration::from_secs(1)
        )
        .is_err(),
        "the echo service deleted during the restart still answers"
    );
}

#[test]
fn outage_keeps_serving_and_changes_apply_afterwards() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = kube_cluster();
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    c.api_mut().stop();
    // Long enough for the watchers to fail and back off a few times.
    // Every request is answered (answers() panics otherwise); over the whole outage every
    // pod answers (a single round of 15 can miss one by chance: (2/3)^15 per pod).
    let until = Instant::now() + Duration::from_secs(6);
    let mut seen = BTreeSet::new();
    while Instant::now() < until {
        seen.extend(answers(&c, lb, 15));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(seen, pods.iter().cloned().collect());
    let all: BTreeSet<Ipv4Addr> = c.net.pods().iter().map(|p| p.addr).collect();
    for a in &c.agents {
        assert_eq!(endpoint_addrs(&a.status().unwrap()), all, "{}", a.node);
        assert!(
            a.log_text().contains("the datapath keeps its last state"),
            "{}: the outage is not logged:\n{}",
            a.node,
            a.log_text()
        );
    }
    // Changed while the API server is down, applied when it is back.
    let rest: Vec<String> = pods[..pods.len() - 1].to_vec();
    c.write_manifest(&seed_manifests(&c.net, &opts(Some(rest.clone()))))
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    c.wait_for("nothing changes during the outage", T, with_endpoints(all))
        .unwrap();
    c.api_mut().start().unwrap();
    c.wait_for(
        "changes made during the outage",
        RECOVER,
        with_endpoints(pod_addrs(&c, &rest)),
    )
    .unwrap();
    assert_eq!(answers(&c, lb, 45), rest.iter().cloned().collect());
    for a in &c.agents {
        assert!(a.log_text().contains("watch restored"), "{}", a.log_text());
    }
}

#[test]
fn unsupported_sctp_port_is_posted_once_as_an_event() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = kube_cluster();
    // The seed's objects plus a Service with a TCP and an SCTP port.
    let with_mixed = |c: &Cluster, endpoints: Option<Vec<String>>| {
        seed_manifests(&c.net, &opts(endpoints))
            + &format!(
                "- apiVersion: v1\n  kind: Service\n  metadata: {{name: mixed, namespace: dev}}\n  spec:\n    clusterIP: 10.96.100.20\n    ports:\n    - {{name: a, port: 80, protocol: TCP, targetPort: {POD_HTTP_PORT}}}\n    - {{name: b, port: 9000, protocol: SCTP}}\n"
            )
    };
    c.write_manifest(&with_mixed(&c, None)).unwrap();
    c.wait_for("the TCP port of mixed", Duration::from_secs(20), |s| {
        s.services.iter().any(|x| x.name.starts_with("dev/mixed"))
    })
    .unwrap();
    let nodes = c.agents.len();
    let mine = |c: &Cluster| -> Vec<Value> {
        c.api()
            .events()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == "mixed")
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while mine(&c).len() < nodes {
        assert!(Instant::now() < deadline, "events: {:?}", c.api().events());
        std::thread::sleep(Duration::from_millis(100));
    }
    // More changes (reprogramming) and a relist do not post it again.
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    c.write_manifest(&with_mixed(&c, Some(pods[1..].to_vec())))
        .unwrap();
    c.wait_for(
        "endpoint removed",
        Duration::from_secs(20),
        with_endpoints(pod_addrs(&c, &pods[1..])),
    )
    .unwrap();
    c.api().compact();
    c.api().drop_watches();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        c.agents.iter().all(|a| a.log_text().contains("relisted")),
        "the agents did not relist"
    );
    for a in &c.agents {
        let s = a.status().unwrap();
        assert!(
            s.services.iter().any(|x| x.name.starts_with("dev/mixed")),
            "{}: mixed is gone",
            a.node
        );
    }
    let evs = mine(&c);
    assert_eq!(evs.len(), nodes, "one per agent: {evs:#?}");
    let instances: BTreeSet<String> = evs
        .iter()
        .map(|e| e["reportingInstance"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(instances.len(), nodes, "{evs:#?}");
    for e in &evs {
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["regarding"]["kind"], "Service");
        assert!(e["note"].as_str().unwrap_or("").contains("SCTP"), "{e}");
        assert!(
            e.get("series").is_none_or(Value::is_null),
            "posted twice: {e}"
        );
    }
    // Logged once per agent, too.
    for a in &c.agents {
        let log = a.log_text();
        let lines = log
            .lines()
            .filter(|l| {
                l.contains("dev/mixed") && l.contains("SCTP") && !l.contains("posted Event")
            })
            .count();
        assert_eq!(lines, 1, "{}:\n{log}", a.node);
    }
}

// ---------------------------------------------------------------------------------------
// A real cluster.

/// Runs only with `KUBECONFIG` set and `XLB_REAL_CLUSTER=1`: the kube source and the
/// translation against a real API server, in a namespace it creates and deletes.
#[test]
fn real_cluster_source_follows_services_and_slices() {
    let kubeconfig = std::env::var_os("KUBECONFIG");
    if kubeconfig.is_none() || std::env::var("XLB_REAL_CLUSTER").as_deref() != Ok("1") {
        eprintln!(
            "SKIP real_cluster_source_follows_services_and_slices: needs KUBECONFIG and \
             XLB_REAL_CLUSTER=1 (it creates and deletes a namespace xlb-e2e-<pid> there)"
        );
        return;
    }
    use k8s_openapi::api::{
        core::v1::{Namespace, Service},
        discovery::v1::EndpointSlice,
        events::v1::Event,
    };
    use kube::api::{Api, DeleteParams, ListParams, PostParams};
    let rt = rt();
    let client = rt.block_on(kube::Client::try_default()).expect("client");
    let ns_name = format!("xlb-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name}})).unwrap();
    rt.block_on(namespaces.create(&PostParams::default(), &ns))
        .expect("creating the test namespace");
    struct Cleanup<'a>(&'a tokio::runtime::Runtime, Api<Namespace>, String);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self
                .0
                .block_on(self.1.delete(&self.2, &DeleteParams::default()));
        }
    }
    let _cleanup = Cleanup(&rt, namespaces, ns_name.clone());
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns_name);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns_name);
    let create_svc = |name: &str, ports: Value| -> Service {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns_name},
            "spec": {"type": "ClusterIP", "ports": ports},
        }))
        .unwrap();
        rt.block_on(svcs.create(&PostParams::default(), &s))
            .unwrap()
    };
    let put_slice = |name: &str, addrs: &[&str]| {
        let mut s: EndpointSlice =
            serde_json::from_value(slice(&ns_name, name, "web", "IPv4", addrs)).unwrap();
        match rt.block_on(slices.get_opt(name)).unwrap() {
            Some(old) => {
                s.metadata.resource_version = old.metadata.resource_version;
                rt.block_on(slices.replace(name, &PostParams::default(), &s))
                    .unwrap();
            }
            None => {
                rt.block_on(slices.create(&PostParams::default(), &s))
                    .unwrap();
            }
        }
    };
    create_svc(
        "web",
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
    );
    put_slice("web-a", &["10.244.1.2"]);

    let mut src = {
        let _g = rt.enter();
        KubeSource::start(client.clone(), "xlb-e2e")
    };
    let mine = |o: &Objects| -> BTreeSet<String> {
        let only = Objects {
            services: o
                .services
                .iter()
                .filter(|s| s.metadata.namespace.as_deref() == Some(ns_name.as_str()))
                .cloned()
                .collect(),
            slices: o
                .slices
                .iter()
                .filter(|s| s.namespace.as_deref() == Some(ns_name.as_str()))
                .cloned()
                .collect(),
            ..Default::default()
        };
        backends(&only)
    };
    let wait_for = |src: &mut KubeSource, want: BTreeSet<String>| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = next_snapshot(&rt, src, Duration::from_secs(60)).expect("snapshot");
            if mine(&s) == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "got {:?}, want {want:?}",
                mine(&s)
            );
        }
    };
    wait_for(&mut src, BTreeSet::from(["10.244.1.2:8080".into()]));
    put_slice("web-b", &["10.244.2.2"]);
    wait_for(
        &mut src,
        BTreeSet::from(["10.244.1.2:8080".into(), "10.244.2.2:8080".into()]),
    );
    put_slice("web-a", &["10.244.1.3"]);
    wait_for(
        &mut src,
        BTreeSet::from(["10.244.1.3:8080".into(), "10.244.2.2:8080".into()]),
    );
    rt.block_on(slices.delete("web-b", &DeleteParams::default()))
        .unwrap();
    wait_for(&mut src, BTreeSet::from(["10.244.1.3:8080".into()]));
    rt.block_on(svcs.delete("web", &DeleteParams::default()))
        .unwrap();
    wait_for(&mut src, BTreeSet::new());

    // An SCTP port: the event appears on the Service.
    create_svc(
        "mixed",
        json!([{"name": "a", "port": 80}, {"name": "b", "port": 9000, "protocol": "SCTP"}]),
    );
    let ev = loop {
        let s = next_snapshot(&rt, &mut src, Duration::from_secs(60)).expect("snapshot");
        let node = NodeContext::default();
        if let Some(ev) = translate::translate(&s, &node)
            .events
            .into_iter()
            .find(|e| e.namespace == ns_name && e.name == "mixed")
        {
            break ev;
        }
    };
    src.post_event(&ev);
    let events: Api<Event> = Api::namespaced(client, &ns_name);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = rt.block_on(events.list(&ListParams::default())).unwrap();
        if list.items.iter().any(|e| {
            e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("mixed")
                && e.type_.as_deref() == Some("Warning")
        }) {
            break;
        }
        assert!(Instant::now() < deadline, "no Event on Service mixed");
        std::thread::sleep(Duration::from_millis(500));
    }
}

// ---------------------------------------------------------------------------------------
// MetalLB's pools through the API, and the LoadBalancer status written by one agent.

const METALLB: &str = "metallb.io/v1beta1";
/// The seed's pool (deploy/examples/metallb) and its first address.
const POOL_RANGE: &str = "172.18.255.200-172.18.255.250";
const POOL_FIRST: Ipv4Addr = Ipv4Addr::new(172, 18, 255, 200);

fn metallb_object(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": METALLB, "kind": kind,
        "metadata": {"name": name, "namespace": "metallb-system"},
        "spec": spec,
    })
}

fn lb_service(ns: &str, name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": "LoadBalancer", "clusterIP": cluster_ip,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        },
    })
}

/// The stored Service's `status.loadBalancer.ingress` (Null when unset).
fn stored_ingress(srv: &ApiServer, ns: &str, name: &str) -> Value {
    srv.list("v1", "services")
        .into_iter()
        .find(|s| s["metadata"]["namespace"] == ns && s["metadata"]["name"] == name)
        .map(|s| s["status"]["loadBalancer"]["ingress"].clone())
        .unwrap_or(Value::Null)
}

fn wait_until(what: &str, within: Duration, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// MetalLB's CRDs are optional: refused (404, not installed), snapshots come anyway without
/// pools; once served, the pools and advertisements are in the snapshots (a pool that
/// overlaps an older one is left out), the translation assigns the pool's first address,
/// and `write_lb_status` writes it into the Service's status once (PATCH of `/status`,
/// fieldManager `lb-agent-<node>`), not again when the status already says so.
#[test]
fn kube_source_follows_metallb_pools_and_writes_the_lb_status() {
    let srv = ApiServer::start_local().unwrap();
    srv.create(&lb_service("dev", "web", "10.96.100.20"))
        .unwrap();
    srv.create(&slice("dev", "web-a", "web", "IPv4", &["10.244.1.2"]))
        .unwrap();
    srv.set_refused(METALLB, "ipaddresspools", Some(404));
    srv.set_refused(METALLB, "l2advertisements", Some(404));
    let rt = rt();
    let client = local_client(&srv, &rt);
    let mut src = {
        let _g = rt.enter();
        KubeSource::start(client, "n1")
    };
    let first = next_snapshot(&rt, &mut src, Duration::from_secs(10))
        .expect("a snapshot while MetalLB's CRDs are not served");
    assert_eq!(first.services.len(), 1);
    assert!(first.ip_pools.is_empty() && first.l2_adverts.is_empty());

    // The CRDs installed, then the seed's pool and advertisement.
    srv.set_refused(METALLB, "ipaddresspools", None);
    srv.set_refused(METALLB, "l2advertisements", None);
    srv.create(&metallb_object(
        "IPAddressPool",
        "example",
        json!({"addresses": [POOL_RANGE]}),
    ))
    .unwrap();
    srv.create(&metallb_object("L2Advertisement", "empty", json!({})))
        .unwrap();
    let s = snapshot_until(&rt, &mut src, "the pool and the advertisement", |s| {
        s.ip_pools.len() == 1 && s.l2_adverts.len() == 1
    });
    let pool = &s.ip_pools[0];
    assert_eq!(pool.metadata.name.as_deref(), Some("example"));
    assert_eq!(pool.metadata.namespace.as_deref(), Some("metallb-system"));
    assert_eq!(pool.spec.addresses, [POOL_RANGE]);
    assert_eq!(s.l2_adverts[0].metadata.name.as_deref(), Some("empty"));
    let node = NodeContext {
        node_name: "n1".into(),
        node_addrs: vec![Ipv4Addr::new(172, 18, 0, 9)],
        uplink: "eth0".into(),
        ..Default::default()
    };
    let desired = translate::translate(&s, &node);
    let lb: Vec<(String, Ipv4Addr, bool)> = desired
        .lb_addresses
        .iter()
        .map(|a| (format!("{}/{}", a.namespace, a.name), a.addr, a.l2_here))
        .collect();
    assert_eq!(lb, [("dev/web".to_string(), POOL_FIRST, true)]);

    // A second pool overlapping the first: left out (MetalLB's webhook would refuse it).
    srv.create(&metallb_object(
        "IPAddressPool",
        "overlapping",
        json!({"addresses": ["172.18.255.250/32"]}),
    ))
    .unwrap();
    let s = next_snapshot(&rt, &mut src, T).expect("a snapshot after the second pool");
    let names: Vec<_> = s
        .ip_pools
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["example"]);

    // The status: written once.
    src.write_lb_status("dev", "web", &[POOL_FIRST]);
    wait_until("the status written", T, || {
        stored_ingress(&srv, "dev", "web") == json!([{"ip": "172.18.255.200", "ipMode": "VIP"}])
    });
    snapshot_until(&rt, &mut src, "the written status in a snapshot", |s| {
        s.services[0]
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .is_some_and(|lb| lb.ingress.is_some())
    });
    // Asked again (every agent loop does, after each snapshot): nothing more is written.
    src.write_lb_status("dev", "web", &[POOL_FIRST]);
    // A Service the source does not know: nothing.
    src.write_lb_status("dev", "missing", &[POOL_FIRST]);
    std::thread::sleep(Duration::from_millis(500));
    let patches = srv.status_patches();
    assert_eq!(patches.len(), 1, "{patches:#?}");
    assert_eq!(
        (
            patches[0].namespace.as_str(),
            patches[0].name.as_str(),
            patches[0].field_manager.as_deref()
        ),
        ("dev", "web", Some("lb-agent-n1"))
    );
    // Someone else changes it: the next ask writes it back.
    let mut svc = srv
        .list("v1", "services")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "web")
        .unwrap();
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "172.18.255.201"}]}});
    srv.update(&svc).unwrap();
    snapshot_until(&rt, &mut src, "the changed status", |s| {
        s.services[0]
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .is_some_and(|i| i[0].ip.as_deref() == Some("172.18.255.201"))
    });
    src.write_lb_status("dev", "web", &[POOL_FIRST]);
    wait_until("the status written back", T, || {
        stored_ingress(&srv, "dev", "web") == json!([{"ip": "172.18.255.200", "ipMode": "VIP"}])
    });
    assert_eq!(srv.status_patches().len(), 2);
}

/// The seed's MetalLB configuration and a LoadBalancer Service `web` over every pod that
/// asks for nothing (so it gets the pool's first address); its status starts empty.
fn lb_status_manifest(net: &Network) -> String {
    let mut eps = String::new();
    for p in net.pods() {
        eps.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: true, serving: true, terminating: false}}\n",
            p.addr, p.node
        ));
    }
    format!(
        "apiVersion: {METALLB}\nkind: IPAddressPool\nmetadata: {{name: example, namespace: metallb-system}}\nspec:\n  addresses: [\"{POOL_RANGE}\"]\n---\napiVersion: {METALLB}\nkind: L2Advertisement\nmetadata: {{name: empty, namespace: metallb-system}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: dev}}\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.100.20\n  ports:\n  - {{name: http, port: 80, protocol: TCP, targetPort: {POD_HTTP_PORT}, nodePort: 31240}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abcde\n  namespace: dev\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: {POD_HTTP_PORT}, protocol: TCP}}\nendpoints:\n{eps}"
    )
}

/// Three agents with the kube source, the pool, an L2Advertisement and a LoadBalancer
/// Service in the API: the Service's status gets the pool's first address (`ipMode: VIP`),
/// written by exactly one agent (one PATCH of `/status` in all), the one that announces it.
#[test]
fn lb_status_is_written_once_by_the_announcing_agent() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = Cluster::up_kube(&TopologySpec::seed(), lb_status_manifest).expect("cluster up");
    c.wait_for(
        "web has the pool's first address on every agent",
        Duration::from_secs(30),
        |s| {
            s.agent.as_ref().is_some_and(|a| {
                a.lb_addresses
                    .iter()
                    .any(|l| l.name == "web" && l.addr == POOL_FIRST)
            })
        },
    )
    .unwrap();
    let want = json!([{"ip": "172.18.255.200", "ipMode": "VIP"}]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored_ingress(c.api(), "dev", "web") != want {
        assert!(
            Instant::now() < deadline,
            "status not written: {}; patches {:#?}",
            stored_ingress(c.api(), "dev", "web"),
            c.api().status_patches()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Who announces it (announced_here in agent.json: exactly one agent).
    let owners = || -> Vec<String> {
        c.agents
            .iter()
            .filter(|a| {
                a.status().ok().and_then(|s| s.agent).is_some_and(|i| {
                    i.lb_addresses
                        .iter()
                        .any(|l| l.addr == POOL_FIRST && l.announced_here)
                })
            })
            .map(|a| a.node.clone())
            .collect()
    };
    wait_until("one announcing agent", Duration::from_secs(10), || {
        owners().len() == 1
    });
    // Later snapshots (the write itself is one on every agent) and heartbeats change nothing.
    std::thread::sleep(Duration::from_secs(3));
    let owner = owners();
    assert_eq!(owner.len(), 1, "{owner:?}");
    let patches: Vec<_> = c
        .api()
        .status_patches()
        .into_iter()
        .filter(|p| p.resource == "services")
        .collect();
    assert_eq!(patches.len(), 1, "exactly one write: {patches:#?}");
    assert_eq!(
        (patches[0].namespace.as_str(), patches[0].name.as_str()),
        ("dev", "web")
    );
    assert_eq!(
        patches[0].field_manager.as_deref(),
        Some(format!("lb-agent-{}", owner[0]).as_str()),
        "written by the announcing agent"
    );
    assert_eq!(stored_ingress(c.api(), "dev", "web"), want);
    let log = c.agent(&owner[0]).log_text();
    assert!(
        log.contains("wrote status.loadBalancer of Service dev/web (172.18.255.200)"),
        "{log}"
    );
    for a in &c.agents {
        let log = a.log_text();
        assert!(
            log.contains("IPAddressPools: initial list complete"),
            "{log}"
        );
        assert!(
            log.contains("L2Advertisements: initial list complete"),
            "{log}"
        );
    }
}
