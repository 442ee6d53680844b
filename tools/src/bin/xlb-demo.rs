//! `cargo xtask demo`: the seed article's walk-through on the built-in network, with xlb in
//! place of kube-proxy. Brings up the kind-shaped network, runs one agent per node on the
//! seed's manifests, prints the `kubectl get svc` view and runs the seed's checks.
use std::{net::SocketAddrV4, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use lb_tests::*;

#[derive(Parser)]
#[command(
    name = "xlb-demo",
    about = "The seed article's Service checks, served by xlb"
)]
struct Args {
    /// Leave the network and the agents running (remove them later with --down).
    #[arg(long)]
    keep: bool,
    /// Tear down whatever a `--keep` run left behind, then exit.
    #[arg(long)]
    down: bool,
}

const T: Duration = Duration::from_secs(3);

fn main() -> Result<()> {
    let args = Args::parse();
    if args.down {
        return down();
    }
    println!("▶ bringing up the kind-shaped network (3 nodes, 3 nginx pods, a client)…");
    let spec = TopologySpec::seed();
    let mut c = Cluster::up(&spec, |net| seed_manifests(net, &ManifestOpts::default()))?;
    c.wait_for(
        "the agents to program nginx-service",
        Duration::from_secs(30),
        |s| {
            s.services
                .iter()
                .any(|x| x.name.starts_with("dev/nginx-service") && !x.endpoints.is_empty())
        },
    )?;
    for n in c.net.nodes() {
        println!("  node {:<28} {}  pod CIDR {}", n.name, n.addr, n.pod_cidr);
    }
    for p in c.net.pods() {
        println!("  pod  {:<28} {}  on {}", p.name, p.addr, p.node);
    }
    println!(
        "  client (docker run --network kind)  {}",
        c.net.client_addr()
    );
    println!("  manifests: {}", c.manifest.display());

    println!("\n$ kubectl get svc -n dev");
    let text = std::fs::read_to_string(&c.manifest)?;
    let objs = lb_agent::source::yaml::parse_objects(&text)?;
    let node = c.net.nodes()[0].clone();
    let desired = lb_agent::model::translate::translate(
        &objs,
        &lb_agent::model::translate::NodeContext {
            node_name: node.name.clone(),
            node_addrs: vec![node.addr],
            ..Default::default()
        },
    );
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]);
    for r in &desired.rows {
        t.add_row([
            &r.name,
            &r.svc_type.to_string(),
            &r.cluster_ip,
            &r.external_ip,
            &r.ports,
        ]);
    }
    println!("{t}");
    println!(
        "  (my-external-service is an ExternalName: a DNS alias for example.com, answered by the"
    );
    println!(
        "   cluster DNS; kube-proxy and xlb program nothing for it, so it has no CLUSTER-IP.)"
    );

    let worker = c.net.node("service-demo-worker").clone();
    let worker2 = c.net.node("service-demo-worker2").clone();
    let lb_ip = c.net.lb_ips()[0].0;
    let mut failed = 0usize;
    let check = |failed: &mut usize, title: &str, cmd: String, netns: &str, addr: SocketAddrV4| {
        println!("\n▶ {title}\n$ {cmd}");
        for _ in 0..3 {
            match http_get(netns, addr, T) {
                Ok(body) => println!("{}", body.trim()),
                Err(e) => {
                    println!("FAILED: {e:#}");
                    *failed += 1;
                }
            }
        }
    };
    // 1. ClusterIP from a pod: a curl-test pod created now, as `kubectl run` would.
    let curl = c.net.add_pod(&worker.name, "curl-test")?;
    println!("\n▶ 1. ClusterIP from a pod");
    println!(
        "$ kubectl run curl-test -n dev --rm -it --restart=Never --image=curlimages/curl -- curl -s http://{NGINX_CLUSTER_IP}"
    );
    let cip = SocketAddrV4::new(NGINX_CLUSTER_IP.parse()?, 80);
    // The new pod's interface is picked up by the agent within a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pod_http_get(&curl, cip, Duration::from_secs(1)).is_err()
        && std::time::Instant::now() < deadline
    {}
    for _ in 0..3 {
        match pod_http_get(&curl, cip, T) {
            Ok(r) => println!("{}", r.body.trim()),
            Err(e) => {
                println!("FAILED: {e:#}");
                failed += 1;
            }
        }
    }

    // 2. NodePort from a node, exactly the seed's command.
    println!("\n▶ 2. NodePort from a node");
    println!(
        "$ docker exec {} curl -s http://localhost:{NGINX_NODE_PORT}",
        worker.name
    );
    for _ in 0..3 {
        match node_http_get(&worker, "localhost", NGINX_NODE_PORT, T) {
            Ok(body) => println!("{}", body.trim()),
            Err(e) => {
                println!("FAILED: {e:#}");
                failed += 1;
            }
        }
    }
    check(
        &mut failed,
        "2b. NodePort of the worker from another node",
        format!(
            "docker exec {} curl -s http://{}:{NGINX_NODE_PORT}",
            worker2.name, worker.addr
        ),
        &worker2.netns,
        SocketAddrV4::new(worker.addr, NGINX_NODE_PORT),
    );
    for n in c.net.nodes().to_vec() {
        check(
            &mut failed,
            &format!("2c. NodePort of {} from the client", n.name),
            format!(
                "docker run --rm --network kind curl -s http://{}:{NGINX_NODE_PORT}",
                n.addr
            ),
            c.net.client_netns(),
            SocketAddrV4::new(n.addr, NGINX_NODE_PORT),
        );
    }
    check(
        &mut failed,
        "3. EXTERNAL-IP from outside the cluster",
        format!("docker run --rm --network kind curlimages/curl curl -s http://{lb_ip}"),
        c.net.client_netns(),
        SocketAddrV4::new(lb_ip, 80),
    );

    println!("\n$ lb-agent status --node-name {}", worker.name);
    println!(
        "{}",
        lb_agent::status::render(&c.agent(&worker.name).status()?)
    );

    if args.keep {
        println!("\nLeft running (--keep). Namespaces: ip netns list | grep xlb-");
        println!(
            "Status: lb-agent status --pin-dir {}",
            c.agent(&worker.name).pin_dir.display()
        );
        println!("Tear down: cargo xtask demo --down");
        c.keep()?;
    } else {
        println!("\n▶ tearing down");
        drop(c);
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    println!("✔ all checks answered by the pods");
    Ok(())
}

/// Removes every xlb namespace and pin directory, whoever made them.
fn down() -> Result<()> {
    for ns in list_netns()?
        .into_iter()
        .filter(|n| n.starts_with(NETNS_PREFIX))
    {
        delete_netns(&ns).with_context(|| format!("deleting {ns}"))?;
        println!("deleted namespace {ns}");
    }
    if let Ok(rd) = std::fs::read_dir(PIN_ROOT) {
        // Only harness pins (`<pid>x<n>-…`, `test-…`): never a real agent's `<node name>`.
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let tagged = name.strip_prefix("test-").unwrap_or(&name);
            let harness = tagged
                .split_once('x')
                .is_some_and(|(pid, _)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
            if !harness {
                continue;
            }
            let _ = std::fs::remove_dir_all(e.path());
            println!("removed pins {}", e.path().display());
        }
    }
    Ok(())
}
