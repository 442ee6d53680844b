//! The agent's observability server, end to end: real agents in the node namespaces serve
//! `/metrics`, `/healthz`, `/readyz` and `/loglevel` on `<node address>:9464`
//! (`AgentProc::metrics_addr`), fetched from the client namespace over the "kind" network.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use lb_tests::*;
use prometheus_parse::{Scrape, Value};

const T: Duration = Duration::from_secs(3);

fn get(c: &Cluster, addr: SocketAddrV4, path: &str) -> HttpResponse {
    http_request(c.net.client_netns(), addr, path, T)
        .unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e:#}"))
}

/// One request with a body (`PUT`/`POST`) from the node whose address `addr` is (the agent
/// accepts state changes only from the node itself; see e2e_hardening); (status, body).
fn send(c: &Cluster, addr: SocketAddrV4, method: &str, path: &str, body: &str) -> (u16, String) {
    let netns = &c
        .net
        .nodes()
        .iter()
        .find(|n| n.addr == *addr.ip())
        .expect("a node's address")
        .netns;
    try_in_netns(netns, || -> anyhow::Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr.into(), T)?;
        s.set_read_timeout(Some(T))?;
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("bad response {raw:?}"))?;
        let body = raw.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Ok((status, body.to_string()))
    })
    .and_then(|r| r)
    .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e:#}"))
}

/// Checks the exposition line by line (every sample is `name{labels} value` of a family
/// declared by `# TYPE` before it, label values quoted), then parses it.
fn parse_strict(text: &str) -> Scrape {
    let mut families: Vec<(String, String)> = vec![];
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line");
            assert!(
                ["counter", "gauge", "histogram"].contains(&ty),
                "type {ty:?} in {line:?}"
            );
            families.push((name.to_string(), ty.to_string()));
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            name.starts_with("xlb_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            let inner = labels
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("labels in {line:?}"));
            for kv in inner.split(',') {
                let (k, v) = kv.split_once('=').unwrap_or_else(|| panic!("{line:?}"));
                assert!(
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "label name in {line:?}"
                );
                assert!(
                    v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                    "label value in {line:?}"
                );
            }
        }
        let (family, ty) = families
            .last()
            .unwrap_or_else(|| panic!("sample before any TYPE: {line:?}"));
        let ok = match ty.as_str() {
            "histogram" => ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name == format!("{family}{s}")),
            _ => name == family,
        };
        assert!(ok, "{line:?} is not of the family {family} ({ty})");
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parse")
}

fn scrape(c: &Cluster, addr: SocketAddrV4) -> Scrape {
    let r = get(c, addr, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        r.headers
    );
    parse_strict(&r.body)
}

fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric}: unexpected {other:?}"),
        })
}

const NGINX: [(&str, &str); 5] = [
    ("namespace", "dev"),
    ("name", "nginx-service"),
    ("port", "http"),
    ("protocol", "TCP"),
    ("scope", "cluster"),
];

/// Polls `f` until it is true or `timeout` passes.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn metrics_health_and_log_level() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = Cluster::up(&TopologySpec::seed(), |net| {
        seed_manifests(net, &ManifestOpts::default())
    })
    .expect("cluster up");
    let pods = c.net.pods().len();
    c.wait_for("nginx-service programmed", Duration::from_secs(20), |s| {
        s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == pods)
    })
    .unwrap();
    let worker = c.net.node("service-demo-worker").clone();
    let m = c.agent(&worker.name).metrics_addr;

    // Probes of every agent.
    for a in &c.agents {
        let h = get(&c, a.metrics_addr, "/healthz");
        assert_eq!((h.status, h.body.trim()), (200, "ok"), "{}", a.node);
        let r = get(&c, a.metrics_addr, "/readyz");
        assert_eq!((r.status, r.body.trim()), (200, "ready"), "{}", a.node);
        // agent.json follows the maps by the time its write takes (run_files.rs).
        eventually("agent.json says ready", Duration::from_secs(5), || {
            a.status().unwrap().agent.is_some_and(|i| i.ready)
        });
        let st = a.status().unwrap();
        let shown = lb_agent::status::render(&st);
        assert!(shown.contains("ready: yes"), "{shown}");
        // The default on a veth uplink (see README "Which hook on which uplink").
        assert!(shown.contains("north-south by tc ingress alone"), "{shown}");
    }
    assert_eq!(get(&c, m, "/nope").status, 404);

    let before = scrape(&c, m);
    // Names and labels.
    assert_eq!(value(&before, "xlb_ready", &[]), Some(1.0));
    assert_eq!(value(&before, "xlb_programmed_services", &[]), Some(1.0));
    assert_eq!(
        value(&before, "xlb_programmed_service_ports", &[]),
        Some(1.0)
    );
    assert_eq!(
        value(&before, "xlb_programmed_backends", &[]),
        Some(pods as f64)
    );
    assert!(value(&before, "xlb_programmed_frontends", &[]).unwrap() >= 3.0);
    for kind in ["source", "parse", "capacity", "map_write", "other"] {
        assert_eq!(
            value(&before, "xlb_apply_errors_total", &[("kind", kind)]),
            Some(0.0),
            "{kind}"
        );
    }
    for reason in lb_common::COUNTER_NAMES {
        assert!(
            value(&before, "xlb_datapath_events_total", &[("reason", reason)]).is_some(),
            "{reason}"
        );
    }
    for (map, capacity) in [
        ("ct", lb_common::DEFAULT_CT_ENTRIES),
        ("ct_new", lb_common::DEFAULT_CT_NEW_ENTRIES),
        (
            "revnat",
            lb_common::DEFAULT_CT_ENTRIES + lb_common::DEFAULT_CT_NEW_ENTRIES,
        ),
    ] {
        assert_eq!(
            value(&before, "xlb_conntrack_capacity", &[("map", map)]),
            Some(capacity as f64),
            "{map}"
        );
    }
    let sync = before
        .samples
        .iter()
        .find(|s| s.metric == "xlb_sync_duration_seconds" && s.labels.get("source") == Some("file"))
        .expect("sync histogram");
    let Value::Histogram(buckets) = &sync.value else {
        panic!("{sync:?}")
    };
    assert!(
        buckets
            .iter()
            .any(|b| b.less_than.is_infinite() && b.count >= 1.0)
    );
    let packets0 = value(&before, "xlb_service_packets_total", &NGINX).expect("nginx packets");
    let flows0 = value(&before, "xlb_service_new_flows_total", &NGINX).unwrap();
    let bytes0 = value(&before, "xlb_service_bytes_total", &NGINX).unwrap();
    let fwd0: f64 = ["fwd_local", "fwd_remote"]
        .iter()
        .map(|r| value(&before, "xlb_datapath_events_total", &[("reason", *r)]).unwrap())
        .sum();

    // Traffic through the worker's NodePort shows in its per-service counters.
    let np = SocketAddrV4::new(worker.addr, NGINX_NODE_PORT);
    const N: usize = 20;
    for i in 0..N {
        http_get(c.net.client_netns(), np, T).unwrap_or_else(|e| panic!("request {i}: {e:#}"));
    }
    let after = scrape(&c, m);
    let packets = value(&after, "xlb_service_packets_total", &NGINX).unwrap();
    let flows = value(&after, "xlb_service_new_flows_total", &NGINX).unwrap();
    let bytes = value(&after, "xlb_service_bytes_total", &NGINX).unwrap();
    let fwd: f64 = ["fwd_local", "fwd_remote"]
        .iter()
        .map(|r| value(&after, "xlb_datapath_events_total", &[("reason", *r)]).unwrap())
        .sum();
    // At least SYN, ACK + request, FIN per connection.
    assert!(
        packets >= packets0 + 3.0 * N as f64,
        "{packets0} -> {packets}"
    );
    assert!(flows >= flows0 + N as f64, "{flows0} -> {flows}");
    assert!(bytes > bytes0, "{bytes0} -> {bytes}");
    assert!(fwd >= fwd0 + 3.0 * N as f64, "{fwd0} -> {fwd}");
    // The connections are in conntrack: a GC sweep (10 s after the start-up one, then at an
    // interval that grows while there is little to delete) counts them, or deletes them once
    // their close timeout has passed.
    eventually("conntrack entries counted", Duration::from_secs(60), || {
        let t = scrape(&c, m);
        let sum = |name: &str| -> f64 {
            ["ct", "ct_new"]
                .iter()
                .map(|map| value(&t, name, &[("map", map)]).unwrap_or(0.0))
                .sum()
        };
        sum("xlb_conntrack_entries") + sum("xlb_conntrack_gc_deleted_total") >= 1.0
    });

    // The log level, at run time.
    let level = get(&c, m, "/loglevel");
    assert_eq!((level.status, level.body.trim()), (200, "info"));
    assert_eq!(
        send(&c, m, "PUT", "/loglevel", "debug"),
        (200, "debug\n".into())
    );
    assert_eq!(get(&c, m, "/loglevel").body.trim(), "debug");
    let (status, body) = send(&c, m, "POST", "/loglevel", "loud");
    assert_eq!(status, 400, "{body}");
    assert_eq!(get(&c, m, "/loglevel").body.trim(), "debug");
    assert_eq!(
        send(&c, m, "POST", "/loglevel", "warn\n"),
        (200, "warn\n".into())
    );
    assert_eq!(send(&c, m, "DELETE", "/loglevel", "").0, 405);
    let log = c.agent(&worker.name).log_text();
    assert!(
        log.contains("log level changed from info to debug"),
        "{log}"
    );
    // Other agents keep their own level.
    let cp = c.control_plane().name.clone();
    assert_eq!(
        get(&c, c.agent(&cp).metrics_addr, "/loglevel").body.trim(),
        "info"
    );
    // Lines are key=value.
    assert!(
        log.lines()
            .any(|l| l.starts_with("ts=") && l.contains(" level=info ") && l.contains(" msg=")),
        "{log}"
    );
}

#[test]
fn readyz_turns_ready_after_the_first_sync() {
    let Some(_guard) = privileged() else {
        return;
    };
    // The agents start on an invalid file: nothing to program.
    let c = Cluster::up(&TopologySpec::seed(), |_| "items: [not: valid".to_string())
        .expect("cluster up");
    let addrs: Vec<SocketAddrV4> = c.agents.iter().map(|a| a.metrics_addr).collect();
    for &m in &addrs {
        eventually("the metrics server", Duration::from_secs(20), || {
            http_request(c.net.client_netns(), m, "/healthz", T).is_ok_and(|r| r.status == 200)
        });
        eventually("a parse error counted", Duration::from_secs(10), || {
            value(
                &scrape(&c, m),
                "xlb_apply_errors_total",
                &[("kind", "parse")],
            )
            .is_some_and(|v| v >= 1.0)
        });
        let r = get(&c, m, "/readyz");
        assert_eq!(r.status, 503, "{}", r.body);
        assert_eq!(value(&scrape(&c, m), "xlb_ready", &[]), Some(0.0));
    }
    for a in &c.agents {
        eventually("agent.json says not ready", Duration::from_secs(5), || {
            a.status().unwrap().agent.is_some_and(|i| !i.ready)
        });
        assert!(lb_agent::status::render(&a.status().unwrap()).contains("ready: no"));
    }

    // The file goes away: still not ready, counted as a source error.
    std::fs::remove_file(&c.manifest).unwrap();
    for &m in &addrs {
        eventually("a source error counted", Duration::from_secs(10), || {
            value(
                &scrape(&c, m),
                "xlb_apply_errors_total",
                &[("kind", "source")],
            )
            .is_some_and(|v| v >= 1.0)
        });
        assert_eq!(get(&c, m, "/readyz").status, 503);
        assert_eq!(get(&c, m, "/healthz").status, 200);
    }

    // A valid file: ready.
    c.write_manifest(&seed_manifests(&c.net, &ManifestOpts::default()))
        .unwrap();
    for &m in &addrs {
        eventually("ready", Duration::from_secs(20), || {
            get(&c, m, "/readyz").status == 200
        });
        let s = scrape(&c, m);
        assert_eq!(value(&s, "xlb_ready", &[]), Some(1.0));
        assert_eq!(value(&s, "xlb_programmed_services", &[]), Some(1.0));
        assert!(value(&s, "xlb_service_packets_total", &NGINX).is_some());
    }
    for a in &c.agents {
        eventually(
            "agent.json says ready again",
            Duration::from_secs(5),
            || a.status().unwrap().agent.is_some_and(|i| i.ready),
        );
    }
}

#[test]
fn frontend_collisions_are_posted_once_as_events() {
    let Some(_guard) = privileged() else {
        return;
    };
    // A second Service wants nginx-service's NodePort: nginx-service (first in id order)
    // keeps it, zz-dup loses its NodePort frontends.
    let manifest = |net: &Network, endpoints: Option<Vec<String>>| {
        seed_manifests(
            net,
            &ManifestOpts {
                endpoints,
                ..Default::default()
            },
        ) + &format!(
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: zz-dup, namespace: dev}}\n  spec:\n    type: NodePort\n    clusterIP: 10.96.100.20\n    ports:\n    - {{port: 8080, protocol: TCP, targetPort: 80, nodePort: {NGINX_NODE_PORT}}}\n"
        )
    };
    let mut c =
        Cluster::up_kube(&TopologySpec::seed(), |net| manifest(net, None)).expect("cluster up");
    let pods: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    c.wait_for("both services programmed", Duration::from_secs(30), |s| {
        s.services.iter().any(|x| x.name.starts_with("dev/zz-dup"))
            && s.services
                .iter()
                .any(|x| x.name.starts_with("dev/nginx-service") && x.node_port.is_some())
    })
    .unwrap();
    let collisions = |c: &Cluster| -> Vec<serde_json::Value> {
        c.api()
            .events()
            .into_iter()
            .filter(|e| e["reason"] == "FrontendCollision")
            .collect()
    };
    let nodes = c.agents.len();
    eventually("collision events", Duration::from_secs(20), || {
        let instances: std::collections::BTreeSet<String> = collisions(&c)
            .iter()
            .map(|e| e["reportingInstance"].as_str().unwrap_or("").to_string())
            .collect();
        instances.len() == nodes
    });
    // Reprogramming (an endpoint leaves) posts nothing again.
    c.write_manifest(&manifest(&c.net, Some(pods[1..].to_vec())))
        .unwrap();
    let left = pods.len() - 1;
    c.wait_for("endpoint removed", Duration::from_secs(20), |s| {
        s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == left)
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let evs = collisions(&c);
    let mut seen = std::collections::BTreeSet::new();
    for e in &evs {
        assert_eq!(e["type"], "Warning", "{e}");
        assert_eq!(e["regarding"]["kind"], "Service", "{e}");
        assert_eq!(e["regarding"]["name"], "zz-dup", "{e}");
        let note = e["note"].as_str().unwrap_or("");
        assert!(
            note.starts_with("frontend ")
                && note.contains(&format!(
                    ":{NGINX_NODE_PORT}/TCP already used by dev/nginx-service"
                )),
            "{e}"
        );
        assert!(
            e.get("series").is_none_or(serde_json::Value::is_null),
            "posted twice: {e}"
        );
        let key = (
            e["reportingInstance"].as_str().unwrap_or("").to_string(),
            note.to_string(),
        );
        assert!(seen.insert(key), "posted twice: {evs:#?}");
    }
}
