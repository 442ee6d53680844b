//! `cargo xtask demo`: the seed article's walk-through on the built-in network, with xlb in
//! place of kube-proxy. Brings up the kind-shaped network, runs one agent per node on the
//! seed's manifests, prints the `kubectl get svc` view and runs the seed's checks.
//!
//! The LoadBalancer address comes from the seed's MetalLB configuration (IPAddressPool
//! `example`, L2Advertisement `empty`, addresses of the kind network): the agents assign
//! it, one of them announces it, and the client, which has no route for it, finds it by ARP
//! on the kind bridge, as it would with MetalLB in L2 mode.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

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

/// The seed's MetalLB configuration, byte for byte. Its range (172.18.255.200-250) lies in
/// the built-in network's kind subnet (172.18.0.0/16), as in a kind cluster.
const METALLB_CONFIG: &str = include_str!("../../../deploy/examples/metallb/metallb-config.yaml");

/// The nginx-service's address from the pools, once every agent has it and one of them
/// announces it; `(address, announcing node)`.
fn lb_address(c: &mut Cluster) -> Result<(Ipv4Addr, String)> {
    let assigned = |s: &lb_agent::status::Status| {
        s.agent.as_ref().and_then(|a| {
            a.lb_addresses
                .iter()
                .find(|l| l.namespace == "dev" && l.name == "nginx-service")
                .cloned()
        })
    };
    c.wait_for(
        "the agents to assign nginx-service an address from the pool",
        Duration::from_secs(30),
        |s| assigned(s).is_some(),
    )?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut addr = None;
        let mut owners = vec![];
        for a in &c.agents {
            if let Some(l) = assigned(&a.status()?) {
                addr = Some(l.addr);
                if l.announced_here {
                    owners.push(a.node.clone());
                }
            }
        }
        if let (Some(addr), [owner]) = (addr, owners.as_slice()) {
            return Ok((addr, owner.clone()));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no single node announces the nginx-service address (announcing: {owners:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.down {
        return down();
    }
    println!("▶ bringing up the kind-shaped network (3 nodes, 3 nginx pods, a client)…");
    // No LB routes: the client reaches the pool's addresses by ARP only.
    let spec = TopologySpec::seed_l2();
    let mut c = Cluster::up(&spec, |net| {
        let mut y = seed_manifests(net, &ManifestOpts::default());
        y.push_str("---\n");
        y.push_str(METALLB_CONFIG);
        y
    })?;
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
    let (lb_ip, announcer) = lb_address(&mut c)?;
    let pool = METALLB_CONFIG
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- "))
        .find(|l| l.contains('-'))
        .unwrap_or("?")
        .trim();
    println!(
        "  MetalLB config (IPAddressPool example, L2Advertisement empty): {pool}, no route for it on the client"
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
        // The manifest has no status (MetalLB would write the assigned address there):
        // show the address the agents assign from the pool, as `kubectl get svc` would.
        let assigned = desired
            .lb_addresses
            .iter()
            .find(|l| l.namespace == "dev" && l.name == r.name)
            .map(|l| l.addr.to_string());
        let external_ip = match assigned {
            Some(a) if r.external_ip == "<pending>" => a,
            _ => r.external_ip.clone(),
        };
        t.add_row([
            &r.name,
            &r.svc_type.to_string(),
            &r.cluster_ip,
            &external_ip,
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
        "3. EXTERNAL-IP from outside the cluster (found by ARP on the kind network)",
        format!("docker run --rm --network kind curlimages/curl curl -s http://{lb_ip}"),
        c.net.client_netns(),
        SocketAddrV4::new(lb_ip, 80),
    );
    let announcer_node = c.net.node(&announcer).clone();
    let mac = exec_ok(
        &announcer_node.netns,
        &[
            "cat",
            &format!("/sys/class/net/{}/address", announcer_node.uplink),
        ],
    )?;
    let mac = mac.trim();
    let neigh = exec_ok(
        c.net.client_netns(),
        &["ip", "neigh", "show", &lb_ip.to_string()],
    )?;
    let neigh = neigh.trim();
    println!("$ docker run --rm --network kind --cap-add NET_ADMIN alpine ip neigh show {lb_ip}");
    println!("{neigh}");
    if neigh.contains(mac) {
        println!("  ({lb_ip} is at {mac}: {announcer}, which announces it)");
    } else {
        println!("FAILED: {lb_ip} is not at {mac} ({announcer}, which announces it)");
        failed += 1;
    }

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
