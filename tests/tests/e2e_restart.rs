//! Restart without loss: the agent on the node that receives the traffic is restarted (as a
//! DaemonSet rolling update does) while a long TCP stream and a stream of short connections
//! run through its NodePort; not one connection may fail and the stream must survive. Then
//! `lb-agent cleanup` removes every pin and program of that node.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::*;

const T: Duration = Duration::from_secs(3);
/// The agent's log line once its first full sync is in the maps.
const READY: &str = "ready: the first full sync is in the maps";

#[test]
fn agent_restart_loses_no_connection_and_cleanup_removes_everything() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let opts = ManifestOpts {
        echo: true,
        ..Default::default()
    };
    let mut c = Cluster::up(&spec, |net| seed_manifests(net, &opts)).expect("cluster up");
    c.wait_for("services programmed", Duration::from_secs(20), |s| {
        s.services.iter().filter(|x| x.endpoints.len() == 3).count() >= 2
    })
    .unwrap();
    let worker = c.net.node("service-demo-worker").clone();
    let client_ns = c.net.client_netns().to_string();
    let stop = Arc::new(AtomicBool::new(false));

    // The long stream: one echo connection, a line every 20 ms.
    let echo = SocketAddrV4::new(worker.addr, ECHO_NODE_PORT);
    let conn =
        in_netns(&client_ns, || TcpStream::connect_timeout(&echo.into(), T)).expect("echo connect");
    conn.set_read_timeout(Some(T)).unwrap();
    let stream_lines = Arc::new(AtomicUsize::new(0));
    let stream = {
        let (stop, lines) = (stop.clone(), stream_lines.clone());
        std::thread::spawn(move || -> Result<String, String> {
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut pod = String::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                (&conn)
                    .write_all(format!("{i}\n").as_bytes())
                    .map_err(|e| format!("write {i}: {e}"))?;
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .map_err(|e| format!("read {i}: {e}"))?;
                let (p, n) = line
                    .trim()
                    .split_once(' ')
                    .ok_or(format!("bad line {line:?}"))?;
                if n != i.to_string() {
                    return Err(format!("echo {i} answered {line:?}"));
                }
                if pod.is_empty() {
                    pod = p.to_string();
                } else if pod != p {
                    return Err(format!("stream moved from {pod} to {p}"));
                }
                lines.fetch_add(1, Ordering::Relaxed);
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(pod)
        })
    };
    // The short connections: one HTTP request after the other.
    let np = SocketAddrV4::new(worker.addr, NGINX_NODE_PORT);
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let shorts = {
        let (stop, ok, failed, ns) = (stop.clone(), ok.clone(), failed.clone(), client_ns.clone());
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match http_get(&ns, np, T) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(format!("{e:#}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        })
    };

    std::thread::sleep(Duration::from_millis(500));
    for round in 0..2 {
        let before = ok.load(Ordering::Relaxed);
        // The agents' log is appended to across restarts: the new agent is ready when its
        // own "ready" line appears (the status file still holds the previous agent's).
        let readies = |c: &Cluster| c.agent(&worker.name).log_text().matches(READY).count();
        let ready_before = readies(&c);
        c.agent_mut(&worker.name).restart().expect("restart");
        let deadline = Instant::now() + Duration::from_secs(30);
        while readies(&c) == ready_before {
            assert!(
                Instant::now() < deadline,
                "round {round}: the restarted agent never became ready:\n{}",
                c.agent(&worker.name).log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c.wait_for("the restarted agent", Duration::from_secs(20), |s| {
            s.services.iter().filter(|x| x.endpoints.len() == 3).count() >= 2
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            ok.load(Ordering::Relaxed) > before,
            "round {round}: no connection succeeded after the restart"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let pod = stream
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the long stream broke: {e}"));
    let errors = shorts.join().unwrap();
    let log = c.agent(&worker.name).log_text();
    assert!(
        errors.is_empty(),
        "{} of {} short connections failed: {:?}\n{log}",
        errors.len(),
        ok.load(Ordering::Relaxed) + errors.len(),
        &errors[..errors.len().min(5)]
    );
    assert!(
        stream_lines.load(Ordering::Relaxed) > 50,
        "the stream barely ran"
    );
    assert!(!pod.is_empty());
    assert!(
        log.contains("adopted the previous run's state"),
        "the restarted agent did not adopt the pins:\n{log}"
    );
    // The uplink's hook (tc alone on these veths by default) kept its link: the new
    // program was swapped in, nothing was detached.
    assert!(
        log.contains(&format!(
            "{} on {UPLINK}: replaced the program in the pinned link",
            lb_common::PROG_TC_UPLINK
        )),
        "the uplink's link was not reused:\n{log}"
    );

    // cleanup: no pin, no program left for this node; its NodePort stops answering.
    let agent = c.agent_mut(&worker.name);
    let (pin_dir, run_dir) = (agent.pin_dir.clone(), agent.run_dir.clone());
    agent.stop_now();
    let out = std::process::Command::new(agent_bin().unwrap())
        .arg("cleanup")
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--run-dir")
        .arg(&run_dir)
        .output()
        .expect("lb-agent cleanup");
    assert!(
        out.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !pin_dir.exists(),
        "pins left behind in {}",
        pin_dir.display()
    );
    assert!(
        !run_dir.exists(),
        "run-time files left behind in {}",
        run_dir.display()
    );
    let link = exec_ok(&worker.netns, &["ip", "-d", "link", "show", &worker.uplink]).unwrap();
    assert!(
        !link.contains("prog/xdp"),
        "XDP still attached to {}:\n{link}",
        worker.uplink
    );
    assert!(
        http_get(&client_ns, np, Duration::from_secs(1)).is_err(),
        "NodePort still served after cleanup"
    );
}
