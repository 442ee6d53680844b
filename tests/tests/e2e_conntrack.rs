//! Connection tracking and SNAT ports, end to end: a client on the "kind" network uses a
//! NodePort whose only endpoint is a pod on another node, so every flow is source-NATed by
//! the entry node to one of its SNAT ports (chosen by the agent: 1024-29999 on these nodes).
//!
//! - Sequential short connections, many more than there are SNAT ports: all succeed, and
//!   the ports go back when the connections are over (agent `/metrics` and the pinned maps).
//!   The client closes first (echo service), so the pod keeps no TIME_WAIT per SNAT port:
//!   when the server closes first, a SNAT port reused within the pod's TIME_WAIT (60 s)
//!   meets PAWS (Linux randomises timestamps per connection) and that connection's SYN is
//!   answered only on its retransmit, 1 s later — a separate matter from giving ports back.
//! - A bounded SYN flood from the client namespace (raw socket, random source ports) does
//!   not disturb an established connection through the same NodePort, and a new connection
//!   works after it.
//!
//! All traffic stays inside the harness's namespaces.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb_tests::*;

/// The node the client connects to; the endpoint is a pod on another node.
const ENTRY_NODE: &str = "service-demo-worker";
/// Per-connection budget: a SYN retransmit (1 s, then 3 s) is not a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Sequential connections (the figure; ports must come back after them).
const CONNECTIONS: usize = 20_000;
/// A broken datapath fails every connection from some point on: stop early.
const MAX_FAILURES: usize = 5;
/// How long the SNAT ports in use may take to go back down after the last connection, at
/// least (closed flows time out after 10 s; the agent's GC, which refreshes the metric,
/// sweeps every 10 s at first, then less often; see the drain loop).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait for the metric, however long the GC's interval has grown.
const DRAIN_MAX: Duration = Duration::from_secs(90);
/// "Back down": a small number, whatever the timing of the last sweep.
const DRAINED_BELOW: f64 = 100.0;
const SNAT_METRIC: &str = "xlb_snat_ports_in_use";
/// SYN flood: bounded count, paced over a few seconds.
const FLOOD_SYNS: usize = 100_000;
const FLOOD_BATCH: usize = 500;
const FLOOD_BATCH_GAP: Duration = Duration::from_millis(10);
/// Flood source ports: below the client's ephemeral range (32768-60999), so no real
/// connection of the test shares a 5-tuple with a flood SYN.
const FLOOD_PORTS: std::ops::Range<u16> = 1024..32768;
/// The long-lived connection's exchange interval.
const TICK: Duration = Duration::from_millis(50);

struct Setup {
    c: Cluster,
    entry: Node,
    remote: Pod,
}

/// The seed network; nginx-service (NodePort 31234) and the echo service (NodePort 30700)
/// with one endpoint, a pod on another node than [`ENTRY_NODE`].
fn setup() -> Setup {
    let spec = TopologySpec::seed();
    let remote_name = spec
        .nodes
        .iter()
        .filter(|n| n.name != ENTRY_NODE)
        .flat_map(|n| n.pods.iter())
        .next()
        .expect("a pod on another node")
        .clone();
    let opts = ManifestOpts {
        endpoints: Some(vec![remote_name.clone()]),
        echo: true,
        udp: false,
        nginx: true,
    };
    let mut c = Cluster::up(&spec, |net| seed_manifests(net, &opts)).expect("cluster up");
    c.wait_for("nginx and echo programmed", Duration::from_secs(30), |s| {
        ["dev/nginx-service", "dev/echo"].iter().all(|name| {
            s.services
                .iter()
                .any(|x| x.name.starts_with(name) && x.endpoints.len() == 1)
        })
    })
    .unwrap();
    let entry = c.net.node(ENTRY_NODE).clone();
    let remote = c.net.pod(&remote_name).clone();
    assert_ne!(remote.node, entry.name);
    Setup { c, entry, remote }
}

fn counters(c: &Cluster) -> BTreeMap<String, BTreeMap<String, u64>> {
    c.agents
        .iter()
        .map(|a| {
            let st = a
                .status()
                .unwrap_or_else(|e| panic!("status of {}: {e:#}", a.node));
            (a.node.clone(), st.counters)
        })
        .collect()
}

/// Non-zero counter increases per node, one line each.
fn counter_delta(
    before: &BTreeMap<String, BTreeMap<String, u64>>,
    after: &BTreeMap<String, BTreeMap<String, u64>>,
) -> String {
    let mut out = String::new();
    for (node, now) in after {
        let d: Vec<String> = now
            .iter()
            .filter_map(|(k, v)| {
                let was = before
                    .get(node)
                    .and_then(|b| b.get(k))
                    .copied()
                    .unwrap_or(0);
                (*v > was).then(|| format!("{k}=+{}", v - was))
            })
            .collect();
        out += &format!("\n  {node}: {}", d.join(" "));
    }
    out
}

fn delta_of(
    before: &BTreeMap<String, BTreeMap<String, u64>>,
    after: &BTreeMap<String, BTreeMap<String, u64>>,
    node: &str,
    counter: &str,
) -> u64 {
    let get = |m: &BTreeMap<String, BTreeMap<String, u64>>| {
        m.get(node)
            .and_then(|c| c.get(counter))
            .copied()
            .unwrap_or(0)
    };
    get(after).saturating_sub(get(before))
}

/// What the entry agent's `/metrics` says about SNAT ports.
#[derive(Clone, Copy, Debug, Default)]
struct MetricPorts {
    /// [`SNAT_METRIC`] summed over backends; None if the family is not exported at all.
    /// A declared family without samples (no backend holds a port) is 0.
    ports: Option<f64>,
    /// `xlb_conntrack_gc_interval_seconds`: the gauge is refreshed by the GC's sweeps.
    gc_interval_s: Option<f64>,
}

fn metric_ports(c: &Cluster, agent: &AgentProc) -> MetricPorts {
    match fetch_metrics(c.net.client_netns(), agent.metrics_addr) {
        Ok(text) => {
            let declared = text
                .lines()
                .any(|l| l.starts_with(&format!("# TYPE {SNAT_METRIC} ")));
            MetricPorts {
                ports: metric_sum(&text, SNAT_METRIC).or(declared.then_some(0.0)),
                gc_interval_s: metric_sum(&text, "xlb_conntrack_gc_interval_seconds"),
            }
        }
        Err(e) => {
            eprintln!("  (metrics of {}: {e:#})", agent.node);
            MetricPorts::default()
        }
    }
}

fn conntrack_metrics(c: &Cluster, agent: &AgentProc) -> String {
    let Ok(text) = fetch_metrics(c.net.client_netns(), agent.metrics_addr) else {
        return "metrics unavailable".into();
    };
    text.lines()
        .filter(|l| {
            l.starts_with("xlb_conntrack_entries")
                || l.starts_with(SNAT_METRIC)
                || l.starts_with("xlb_snat")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One short exchange with the echo service: connect, send a line, read the answer, close
/// (the client closes first, as an HTTP/1.1 or RPC client ending its connection does).
fn echo_exchange(addr: SocketAddrV4, line: &str) -> std::io::Result<String> {
    let s = TcpStream::connect_timeout(&addr.into(), CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    (&s).write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    Ok(answer)
}

#[test]
fn sequential_connections_to_a_remote_endpoint_give_ports_back() {
    let Some(_guard) = privileged() else {
        return;
    };
    let t_test = Instant::now();
    let Setup { c, entry, remote } = setup();
    let addr = SocketAddrV4::new(entry.addr, ECHO_NODE_PORT);
    let agent = c.agent(ENTRY_NODE);
    eprintln!(
        "cluster up in {:.1} s; {CONNECTIONS} sequential connections to {addr} ({}), \
         endpoint {} on {}",
        t_test.elapsed().as_secs_f64(),
        entry.name,
        remote.addr,
        remote.node
    );
    let before = counters(&c);

    struct Run {
        ok: usize,
        lat_us: Vec<u32>,
        failures: Vec<String>,
        slow: usize,
        max: Duration,
        peak_in_use: usize,
        elapsed: Duration,
    }
    let pin_dir = agent.pin_dir.clone();
    let run = in_netns(c.net.client_netns(), || {
        let mut r = Run {
            ok: 0,
            lat_us: Vec::with_capacity(CONNECTIONS),
            failures: vec![],
            slow: 0,
            max: Duration::ZERO,
            peak_in_use: 0,
            elapsed: Duration::ZERO,
        };
        let t0 = Instant::now();
        for i in 0..CONNECTIONS {
            let t1 = Instant::now();
            let line = format!("hello {i}\n");
            match echo_exchange(addr, &line) {
                Ok(answer) if answer == format!("{} {line}", remote.name) => r.ok += 1,
                Ok(answer) => r
                    .failures
                    .push(format!("connection {i}: unexpected answer {answer:?}")),
                Err(e) => r.failures.push(format!(
                    "connection {i} after {:.2} s: {e} ({:?})",
                    t1.elapsed().as_secs_f64(),
                    e.kind()
                )),
            }
            let dt = t1.elapsed();
            r.lat_us
                .push(dt.as_micros().min(u128::from(u32::MAX)) as u32);
            r.max = r.max.max(dt);
            // A SYN retransmit costs 1 s: count them, they are not failures.
            if dt > Duration::from_millis(500) {
                r.slow += 1;
            }
            if r.failures.len() >= MAX_FAILURES {
                break;
            }
            if (i + 1) % 5_000 == 0 {
                let counts = ct_counts(&pin_dir);
                if let Ok(n) = &counts {
                    r.peak_in_use = r.peak_in_use.max(n.snat_in_use);
                }
                eprintln!(
                    "  {:>6} connections in {:5.1} s, {} failed, {} slow; {}",
                    i + 1,
                    t0.elapsed().as_secs_f64(),
                    r.failures.len(),
                    r.slow,
                    counts.map_or_else(|e| format!("maps: {e:#}"), |n| n.to_string())
                );
            }
        }
        r.elapsed = t0.elapsed();
        r
    });
    let after = counters(&c);
    let mut lat = run.lat_us.clone();
    lat.sort_unstable();
    let pct = |p: usize| {
        lat.get(lat.len().saturating_sub(1) * p / 100)
            .copied()
            .unwrap_or(0)
    };
    eprintln!(
        "{} of {CONNECTIONS} connections succeeded in {:.1} s ({:.0}/s; p50 {} µs, p99 {} µs), \
         {} slower than 500 ms (SYN retransmits), slowest {:.3} s; counters:{}",
        run.ok,
        run.elapsed.as_secs_f64(),
        run.ok as f64 / run.elapsed.as_secs_f64(),
        pct(50),
        pct(99),
        run.slow,
        run.max.as_secs_f64(),
        counter_delta(&before, &after)
    );
    assert!(
        run.failures.is_empty() && run.ok == CONNECTIONS,
        "{} of {CONNECTIONS} connections succeeded before the run stopped; failures: {:#?}\n\
         counters:{}\nconntrack: {}\n{}",
        run.ok,
        run.failures,
        counter_delta(&before, &after),
        ct_counts(&agent.pin_dir).map_or_else(|e| format!("{e:#}"), |n| n.to_string()),
        conntrack_metrics(&c, agent)
    );
    assert!(
        delta_of(&before, &after, ENTRY_NODE, "fwd_remote") >= CONNECTIONS as u64,
        "the flows did not take the remote (SNAT) path:{}",
        counter_delta(&before, &after)
    );

    // The ports go back once the connections are over: in the maps within the close
    // timeout (10 s), on /metrics at the GC's next sweep after that. The sweep interval
    // doubles after sweeps that delete little (10 s, 20 s, 40 s, ... up to 10 min), so the
    // wait allows two intervals past the close timeout, within [DRAIN_TIMEOUT, DRAIN_MAX].
    let t_end = Instant::now();
    let mut timeline = vec![];
    let mut seen_metric = false;
    let mut deadline = DRAIN_TIMEOUT;
    let (maps_now, metric_now) = loop {
        let counts = ct_counts(&agent.pin_dir).expect("reading the pinned conntrack maps");
        let m = metric_ports(&c, agent);
        // Once seen, a family that disappears (no backend holds a port) counts as 0.
        let metric = m.ports.or(seen_metric.then_some(0.0));
        seen_metric |= metric.is_some();
        if let Some(i) = m.gc_interval_s {
            deadline = deadline.max(Duration::from_secs_f64(15.0 + 2.0 * i).min(DRAIN_MAX));
        }
        let t = t_end.elapsed();
        let line = format!(
            "  +{:4.1} s: maps {counts}; /metrics {SNAT_METRIC} = {} (GC interval {} s)",
            t.as_secs_f64(),
            metric.map_or_else(|| "(not exported)".into(), |m| m.to_string()),
            m.gc_interval_s
                .map_or_else(|| "?".into(), |i| i.to_string())
        );
        eprintln!("{line}");
        timeline.push(line);
        let drained =
            (counts.snat_in_use as f64) < DRAINED_BELOW && metric.is_none_or(|m| m < DRAINED_BELOW);
        if drained || t > deadline {
            break (counts, metric);
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    eprintln!(
        "peak SNAT ports in use seen during the run: {}; {}; test took {:.1} s",
        run.peak_in_use,
        conntrack_metrics(&c, agent),
        t_test.elapsed().as_secs_f64()
    );
    assert!(
        (maps_now.snat_in_use as f64) < DRAINED_BELOW,
        "SNAT ports held by live flows in the pinned maps did not fall below {DRAINED_BELOW} \
         within {deadline:?}:\n{}",
        timeline.join("\n")
    );
    match metric_now {
        Some(m) => assert!(
            m < DRAINED_BELOW,
            "{SNAT_METRIC} on {} stayed at {m} for {deadline:?} while the maps show \
             {} ports in use:\n{}",
            agent.metrics_addr,
            maps_now.snat_in_use,
            timeline.join("\n")
        ),
        None => {
            eprintln!("note: the agent does not export {SNAT_METRIC}; checked the pinned maps only")
        }
    }
}

/// A tiny xorshift: random enough for ports and sequence numbers, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Sends `count` TCP SYNs from `src` (random source ports in [`FLOOD_PORTS`], random
/// sequence numbers) to `dst` through a raw socket created inside `netns`, paced in batches.
/// Returns (sent, send errors, first error).
fn syn_flood(
    netns: &str,
    src: Ipv4Addr,
    dst: SocketAddrV4,
    count: usize,
) -> (usize, usize, Option<String>) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    // IPPROTO_RAW: we write the IP header (IP_HDRINCL is implied).
    let sock = try_in_netns(netns, || {
        Socket::new(
            Domain::IPV4,
            Type::from(libc::SOCK_RAW),
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )
    })
    .expect("entering the client namespace")
    .expect("raw socket in the client namespace");
    let to = SockAddr::from(SocketAddrV4::new(*dst.ip(), 0));
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let span = u64::from(FLOOD_PORTS.end - FLOOD_PORTS.start);
    let (mut sent, mut errors, mut first) = (0, 0, None);
    let mut pkt = Vec::with_capacity(64);
    for i in 0..count {
        let r = rng.next();
        let sport = FLOOD_PORTS.start + (r % span) as u16;
        pkt.clear();
        etherparse::PacketBuilder::ipv4(src.octets(), dst.ip().octets(), 64)
            .tcp(sport, dst.port(), (r >> 32) as u32, 64_240)
            .syn()
            .write(&mut pkt, &[])
            .expect("building a SYN");
        match sock.send_to(&pkt, &to) {
            Ok(_) => sent += 1,
            Err(e) => {
                errors += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        }
        if (i + 1) % FLOOD_BATCH == 0 {
            std::thread::sleep(FLOOD_BATCH_GAP);
        }
    }
    (sent, errors, first)
}

/// What the long-lived connection saw.
#[derive(Default)]
struct Pings {
    /// Completion time and round trip of every exchange.
    done: Vec<(Instant, Duration)>,
    error: Option<String>,
}

/// Exchanges a line every [`TICK`] on `conn` (echo service: `<pod> <line>` comes back)
/// until `stop`; stops at the first error.
fn keep_exchanging(conn: &TcpStream, pod: &str, stop: &AtomicBool) -> Pings {
    let mut p = Pings::default();
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut n = 0u64;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let t = Instant::now();
        let msg = format!("ping {n}\n");
        let res = (|| -> std::io::Result<()> {
            (&*conn).write_all(msg.as_bytes())?;
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed"));
            }
            Ok(())
        })();
        match res {
            Ok(()) if line == format!("{pod} ping {n}\n") => {
                p.done.push((Instant::now(), t.elapsed()))
            }
            Ok(()) => {
                p.error = Some(format!("exchange {n}: unexpected answer {line:?}"));
                break;
            }
            Err(e) => {
                p.error = Some(format!(
                    "exchange {n} after {:.2} s: {e} ({:?})",
                    t.elapsed().as_secs_f64(),
                    e.kind()
                ));
                break;
            }
        }
        std::thread::sleep(TICK.saturating_sub(t.elapsed()));
    }
    p
}

#[test]
fn syn_flood_does_not_break_an_established_connection() {
    let Some(_guard) = privileged() else {
        return;
    };
    let t_test = Instant::now();
    let Setup { c, entry, remote } = setup();
    let echo = SocketAddrV4::new(entry.addr, ECHO_NODE_PORT);
    let agent = c.agent(ENTRY_NODE);
    let client_ns = c.net.client_netns().to_owned();
    let conn = in_netns(&client_ns, || {
        TcpStream::connect_timeout(&echo.into(), CONNECT_TIMEOUT)
    })
    .expect("long-lived connection");
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    conn.set_nodelay(true).unwrap();
    let local_port = conn.local_addr().unwrap().port();
    assert!(
        !FLOOD_PORTS.contains(&local_port),
        "the client's ephemeral port {local_port} is in the flood's range"
    );
    eprintln!(
        "cluster up in {:.1} s; long-lived connection {}:{local_port} -> {echo} (endpoint {} on {})",
        t_test.elapsed().as_secs_f64(),
        c.net.client_addr(),
        remote.addr,
        remote.node
    );
    let before = counters(&c);
    let stop = AtomicBool::new(false);
    let (pings, flood, flood_window, fresh) = std::thread::scope(|s| {
        let pinger = s.spawn(|| keep_exchanging(&conn, &remote.name, &stop));
        std::thread::sleep(Duration::from_secs(1));
        eprintln!(
            "before the flood: {}",
            ct_counts(&agent.pin_dir).map_or_else(|e| format!("{e:#}"), |n| n.to_string())
        );
        let f0 = Instant::now();
        let flood = syn_flood(&client_ns, c.net.client_addr(), echo, FLOOD_SYNS);
        let f1 = Instant::now();
        eprintln!(
            "flood: {} SYNs sent ({} send errors{}) in {:.2} s; {}",
            flood.0,
            flood.1,
            flood
                .2
                .as_deref()
                .map(|e| format!(", first: {e}"))
                .unwrap_or_default(),
            (f1 - f0).as_secs_f64(),
            ct_counts(&agent.pin_dir).map_or_else(|e| format!("{e:#}"), |n| n.to_string())
        );
        // Past SNAT_REUSE_CLOSED_MS: the flood's flows, reset by the client's kernel, give
        // their ports back.
        std::thread::sleep(Duration::from_secs(3));
        let t = Instant::now();
        let fresh = try_in_netns(&client_ns, || -> anyhow::Result<(Duration, Duration)> {
            let mut s = TcpStream::connect_timeout(&echo.into(), CONNECT_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            let connected = t.elapsed();
            s.write_all(b"fresh\n")?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            anyhow::ensure!(
                line == format!("{} fresh\n", remote.name),
                "unexpected answer {line:?}"
            );
            Ok((connected, t.elapsed()))
        })
        .and_then(|r| r);
        let http = http_get(
            &client_ns,
            SocketAddrV4::new(entry.addr, NGINX_NODE_PORT),
            CONNECT_TIMEOUT,
        );
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        let pings = pinger.join().expect("pinger thread");
        (pings, flood, (f0, f1), (fresh, http))
    });
    let after = counters(&c);
    let (f0, f1) = flood_window;
    let during: Vec<Duration> = pings
        .done
        .iter()
        .filter(|(t, _)| *t >= f0 && *t <= f1)
        .map(|(_, d)| *d)
        .collect();
    let after_flood = pings.done.iter().filter(|(t, _)| *t > f1).count();
    let max_rtt = pings.done.iter().map(|(_, d)| *d).max().unwrap_or_default();
    let max_during = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "long-lived connection: {} exchanges ({} during the {:.2} s flood, slowest then {:.1} ms; \
         {after_flood} after), slowest overall {:.1} ms, error: {:?}",
        pings.done.len(),
        during.len(),
        (f1 - f0).as_secs_f64(),
        max_during.as_secs_f64() * 1e3,
        max_rtt.as_secs_f64() * 1e3,
        pings.error
    );
    eprintln!(
        "new connection after the flood: {:?}; HTTP: {:?}",
        fresh.0.as_ref().map(|(c, t)| format!(
            "connected in {:.1} ms, answered in {:.1} ms",
            c.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3
        )),
        fresh
            .1
            .as_ref()
            .map(|b| b.trim().to_owned())
            .map_err(|e| format!("{e:#}"))
    );
    eprintln!(
        "counters:{}\nentry conntrack after: {}; {}\ntest took {:.1} s",
        counter_delta(&before, &after),
        ct_counts(&agent.pin_dir).map_or_else(|e| format!("{e:#}"), |n| n.to_string()),
        conntrack_metrics(&c, agent),
        t_test.elapsed().as_secs_f64()
    );
    assert!(
        flood.0 * 10 >= FLOOD_SYNS * 9,
        "only {} of {FLOOD_SYNS} SYNs could be sent ({:?})",
        flood.0,
        flood.2
    );
    assert_eq!(pings.error, None, "the established connection broke");
    // At one exchange per 50 ms, a flood of a few seconds leaves room for dozens; a stalled
    // connection (retransmits) gets a handful at most.
    let expected_during = ((f1 - f0).as_millis() / TICK.as_millis() / 4) as usize;
    assert!(
        during.len() >= expected_during.max(1),
        "the established connection stalled during the flood: {} exchanges in {:.2} s",
        during.len(),
        (f1 - f0).as_secs_f64()
    );
    assert!(
        after_flood >= 10,
        "the established connection did not keep exchanging after the flood: {after_flood}"
    );
    fresh.0.expect("a new connection after the flood");
    let body = fresh.1.expect("an HTTP request after the flood");
    assert_eq!(body, remote.expected_reply());
}
