//! `cargo xtask kind up|load|down|bench`: the agent on the seed article's kind cluster
//! `service-demo` (1 control plane + 2 workers, no kube-proxy), with MetalLB and the
//! seed's objects from deploy/.
//!
//! Everything goes through the docker, kind and kubectl commands (std::process::Command);
//! every kubectl call names the cluster's context, so no other cluster is touched.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;

use crate::root;

pub const CLUSTER: &str = "service-demo";
const CONTEXT: &str = "kind-service-demo";
/// The image the DaemonSet in deploy/daemonset.yaml runs (checked by tests/tests/manifests.rs).
pub const IMAGE: &str = "xlb-agent:dev";
const CONTAINERFILE: &str = "deploy/Containerfile";
const KIND_CONFIG: &str = "deploy/kind/cluster.yaml";
const METALLB_MANIFEST: &str = "https://raw.githubusercontent.com/metallb/metallb/v0.13.12/config/manifests/metallb-native.yaml";
const METALLB_CONFIG: &str = "deploy/examples/metallb/metallb-config.yaml";
const BENCH_CLIENT: &str = "deploy/bench/client/iperf3-client-job.yaml";
/// The seed's nginx-service NodePort (fixed in deploy/examples/nginx-service-loadbalancer.yaml).
const NGINX_NODE_PORT: u16 = 31234;

#[derive(Subcommand)]
pub enum KindCmd {
    /// Create the seed's cluster without kube-proxy, build and load the agent image, deploy
    /// the agent, MetalLB and the seed's objects, wait until ready, print the seed's checks.
    Up,
    /// Rebuild the agent image, load it into the cluster and restart the DaemonSet.
    Load,
    /// Delete the cluster.
    Down,
    /// Deploy iperf3 servers behind NodePort and LoadBalancer Services, run the client Job
    /// and print its log.
    Bench,
}

pub fn run(cmd: KindCmd) -> Result<()> {
    match cmd {
        KindCmd::Up => up(),
        KindCmd::Load => {
            require(&[Tool::Docker, Tool::Kind, Tool::Kubectl])?;
            require_cluster()?;
            build_and_load()?;
            kubectl(&[
                "-n",
                "xlb-system",
                "rollout",
                "restart",
                "daemonset/xlb-agent",
            ])?;
            kubectl(&[
                "-n",
                "xlb-system",
                "rollout",
                "status",
                "daemonset/xlb-agent",
                "--timeout=300s",
            ])
        }
        KindCmd::Down => {
            require(&[Tool::Docker, Tool::Kind])?;
            visible(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))
        }
        KindCmd::Bench => bench(),
    }
}

fn up() -> Result<()> {
    require(&[Tool::Docker, Tool::Kind, Tool::Kubectl])?;
    if cluster_exists()? {
        println!("✔ kind cluster {CLUSTER} exists; reusing it");
    } else {
        step(&format!(
            "creating kind cluster {CLUSTER} (kube-proxy disabled)"
        ));
        visible(
            Command::new("kind")
                .args(["create", "cluster", "--name", CLUSTER, "--config"])
                .arg(root().join(KIND_CONFIG)),
        )?;
    }
    build_and_load()?;

    // Without kube-proxy the `kubernetes` Service is served by the agent itself: it has to
    // reach the API server at the control-plane node's own address.
    let apiserver = node_ip(&format!("{CLUSTER}-control-plane"))?;
    step(&format!(
        "deploying the agent (API server at {apiserver}:6443)"
    ));
    kubectl(&["apply", "-f", &path_arg("deploy/namespace.yaml")])?;
    let cm = kubectl_output(&[
        "-n",
        "xlb-system",
        "create",
        "configmap",
        "xlb-apiserver",
        &format!("--from-literal=KUBERNETES_SERVICE_HOST={apiserver}"),
        "--from-literal=KUBERNETES_SERVICE_PORT=6443",
        "--dry-run=client",
        "-o",
        "yaml",
    ])?;
    kubectl_apply_stdin(&cm)?;
    kubectl(&["apply", "-k", &path_arg("deploy")])?;
    kubectl(&[
        "-n",
        "xlb-system",
        "rollout",
        "status",
        "daemonset/xlb-agent",
        "--timeout=300s",
    ])?;

    step("installing MetalLB v0.13.12 (as the seed does)");
    kubectl(&["apply", "-f", METALLB_MANIFEST])?;
    kubectl(&[
        "wait",
        "--namespace",
        "metallb-system",
        "--for=condition=ready",
        "pod",
        "--selector=app=metallb",
        "--timeout=300s",
    ])?;
    let subnet = kind_subnet()?;
    let pool = pool_for(subnet);
    let config = std::fs::read_to_string(root().join(METALLB_CONFIG))
        .with_context(|| format!("reading {METALLB_CONFIG}"))?;
    let config = set_pool(&config, &pool)?;
    println!(
        "  address pool {pool} (kind network {}/{})",
        subnet.0, subnet.1
    );
    // MetalLB's webhook answers a little after its pods are ready.
    retry(Duration::from_secs(120), || kubectl_apply_stdin(&config))?;

    step("deploying the seed's objects (namespace dev)");
    kubectl(&["apply", "-k", &path_arg("deploy/examples")])?;
    kubectl(&[
        "-n",
        "dev",
        "wait",
        "--for=condition=ready",
        "pod",
        "--selector=app=nginx",
        "--timeout=300s",
    ])?;
    let cluster_ip = jsonpath("dev", "service/nginx-service", "{.spec.clusterIP}")?;
    let lb_ip = wait_lb_ip("dev", "nginx-service")?;
    println!("✔ ready");
    println!(
        "\nThe seed's checks (each answers the name of the nginx pod that served it):\n\n\
         # 1. ClusterIP, from a pod\n\
         kubectl --context {CONTEXT} run curl-test -n dev --rm -it --restart=Never \\\n  \
           --image=curlimages/curl:latest -- curl -s http://{cluster_ip}\n\n\
         # 2. NodePort, from a node\n\
         docker exec {CLUSTER}-worker curl -s http://localhost:{NGINX_NODE_PORT}\n\n\
         # 3. LoadBalancer, from the kind network\n\
         docker run --rm --network kind curlimages/curl:latest curl -s http://{lb_ip}\n\n\
         # and the ExternalName (a CNAME to example.com; not programmed by xlb)\n\
         kubectl --context {CONTEXT} -n dev run busybox-pod --restart=Never -it --rm \\\n  \
           --image=busybox:latest -- nslookup my-external-service\n\n\
         What the agents programmed:\n\
         kubectl --context {CONTEXT} -n xlb-system exec daemonset/xlb-agent -- lb-agent status\n"
    );
    Ok(())
}

fn bench() -> Result<()> {
    require(&[Tool::Kubectl])?;
    require_kubectl_context()?;
    step("deploying iperf3 servers (namespace xlb-bench)");
    kubectl(&["apply", "-k", &path_arg("deploy/bench")])?;
    kubectl(&[
        "-n",
        "xlb-bench",
        "rollout",
        "status",
        "deployment/iperf3-server",
        "--timeout=300s",
    ])?;
    let lb_ip = wait_lb_ip("xlb-bench", "iperf3-lb")?;
    let job = std::fs::read_to_string(root().join(BENCH_CLIENT))
        .with_context(|| format!("reading {BENCH_CLIENT}"))?;
    let job = set_env_value(&job, "LB_ADDR", &lb_ip.to_string())?;
    step(&format!(
        "running the iperf3 client Job (ClusterIP, NodePort, LoadBalancer {lb_ip})"
    ));
    kubectl(&[
        "-n",
        "xlb-bench",
        "delete",
        "job/iperf3-client",
        "--ignore-not-found",
        "--wait=true",
    ])?;
    kubectl_apply_stdin(&job)?;
    let done = kubectl(&[
        "-n",
        "xlb-bench",
        "wait",
        "--for=condition=complete",
        "job/iperf3-client",
        "--timeout=360s",
    ]);
    // The log is worth seeing whether the Job passed or not.
    let logs = kubectl(&["-n", "xlb-bench", "logs", "job/iperf3-client"]);
    done.context("the iperf3 client Job did not complete")?;
    logs
}

// ---------------------------------------------------------------------------------------
// Tools

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tool {
    Docker,
    Kind,
    Kubectl,
}

impl Tool {
    fn command(self) -> &'static str {
        match self {
            Tool::Docker => "docker",
            Tool::Kind => "kind",
            Tool::Kubectl => "kubectl",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Tool::Docker => {
                "install Docker Engine (https://docs.docker.com/engine/install/, or \
                 `apt-get install docker.io` on Debian) and start it"
            }
            Tool::Kind => {
                "install kind v0.20 or newer (https://kind.sigs.k8s.io/docs/user/quick-start/#installation, \
                 or `go install sigs.k8s.io/kind@latest`)"
            }
            Tool::Kubectl => {
                "install kubectl (https://kubernetes.io/docs/tasks/tools/, or \
                 `apt-get install kubectl` from the Kubernetes apt repository)"
            }
        }
    }
}

/// Checks that every tool is installed (and the docker engine answers); lists everything
/// missing at once, then fails.
fn require(tools: &[Tool]) -> Result<()> {
    let mut missing = Vec::new();
    for &t in tools {
        if which::which(t.command()).is_err() {
            missing.push(format!(
                "  ✘ {} not found: {}",
                t.command(),
                t.install_hint()
            ));
        } else if t == Tool::Docker && !docker_engine_running() {
            missing.push(
                "  ✘ docker is installed but its engine does not answer (`docker info` \
                 failed): start it (`systemctl start docker`) or check DOCKER_HOST and \
                 your permission on the socket"
                    .to_string(),
            );
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("cargo xtask kind needs:\n{}", missing.join("\n"));
    bail!("missing tools for cargo xtask kind (see above)")
}

fn docker_engine_running() -> bool {
    Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn cluster_exists() -> Result<bool> {
    let out = output(Command::new("kind").args(["get", "clusters"]))?;
    Ok(out.lines().any(|l| l.trim() == CLUSTER))
}

fn require_cluster() -> Result<()> {
    if !cluster_exists()? {
        bail!("no kind cluster {CLUSTER}: run `cargo xtask kind up` first");
    }
    Ok(())
}

fn require_kubectl_context() -> Result<()> {
    let ok = Command::new("kubectl")
        .args(["config", "get-contexts", CONTEXT])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("no kubectl context {CONTEXT}: run `cargo xtask kind up` first");
    }
    Ok(())
}

fn build_and_load() -> Result<()> {
    step(&format!(
        "building the agent image {IMAGE} ({CONTAINERFILE})"
    ));
    visible(
        Command::new("docker")
            .args(["build", "-f", CONTAINERFILE, "-t", IMAGE, "."])
            .current_dir(root()),
    )?;
    step(&format!("loading {IMAGE} into the cluster's nodes"));
    visible(Command::new("kind").args(["load", "docker-image", IMAGE, "--name", CLUSTER]))
}

/// A node container's address on the kind network.
fn node_ip(node: &str) -> Result<Ipv4Addr> {
    let out = output(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        node,
    ]))?;
    out.split_whitespace()
        .find_map(|s| s.parse().ok())
        .with_context(|| format!("no IPv4 address for node container {node} in {out:?}"))
}

/// The kind network's IPv4 subnet (address, prefix length).
fn kind_subnet() -> Result<(Ipv4Addr, u8)> {
    let out = output(Command::new("docker").args([
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
        "kind",
    ]))?;
    parse_subnet(&out).with_context(|| format!("no IPv4 subnet in the kind network ({out:?})"))
}

fn parse_subnet(s: &str) -> Option<(Ipv4Addr, u8)> {
    s.split_whitespace().find_map(|cidr| {
        let (ip, len) = cidr.split_once('/')?;
        Some((ip.parse().ok()?, len.parse().ok().filter(|l| *l <= 32)?))
    })
}

/// The seed's pool (172.18.255.200-172.18.255.250 in 172.18.0.0/16) moved to the same place
/// of the kind network's subnet: its last addresses, where docker does not allocate from
/// the start.
fn pool_for((net, len): (Ipv4Addr, u8)) -> String {
    let base = u32::from(net) & (u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0));
    let size = 1u64 << (32 - u32::from(len));
    let (first, last) = if size >= 512 {
        // As the seed: x.y.255.200-250 for a /16, the last /24's .200-.250 in general.
        let top = base + (size as u32 - 256);
        (top + 200, top + 250)
    } else {
        // Small subnets: the upper quarter, without the broadcast address.
        let q = (size / 4) as u32;
        (base + (size as u32) - q, base + (size as u32) - 2)
    };
    format!("{}-{}", Ipv4Addr::from(first), Ipv4Addr::from(last))
}

/// Replaces the address range of the IPAddressPool (the one list item of the form
/// `- A.B.C.D-E.F.G.H`) with `pool`.
fn set_pool(yaml: &str, pool: &str) -> Result<String> {
    let mut n = 0;
    let out: Vec<String> = yaml
        .lines()
        .map(|l| {
            let item = l.trim_start().strip_prefix("- ").map(str::trim);
            let is_range = item.and_then(|i| i.split_once('-')).is_some_and(|(a, b)| {
                a.parse::<Ipv4Addr>().is_ok() && b.trim().parse::<Ipv4Addr>().is_ok()
            });
            if is_range {
                n += 1;
                let indent = &l[..l.len() - l.trim_start().len()];
                format!("{indent}- {pool}")
            } else {
                l.to_string()
            }
        })
        .collect();
    if n != 1 {
        bail!("{METALLB_CONFIG}: expected one address range, found {n}");
    }
    Ok(out.join("\n") + "\n")
}

/// Sets `value:` of the container env var `name` (the line after `- name: <name>`).
fn set_env_value(yaml: &str, name: &str, value: &str) -> Result<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("- name: {name}"))
        .with_context(|| format!("no env var {name}"))?;
    let next = lines
        .get(at + 1)
        .filter(|l| l.trim_start().starts_with("value:"))
        .with_context(|| format!("env var {name}: no `value:` on the next line"))?;
    let indent = &next[..next.len() - next.trim_start().len()];
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    out[at + 1] = format!("{indent}value: \"{value}\"");
    Ok(out.join("\n") + "\n")
}

fn wait_lb_ip(ns: &str, svc: &str) -> Result<Ipv4Addr> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ip = jsonpath(
            ns,
            &format!("service/{svc}"),
            "{.status.loadBalancer.ingress[0].ip}",
        )?;
        if let Ok(ip) = ip.trim().parse() {
            return Ok(ip);
        }
        if Instant::now() > deadline {
            bail!(
                "{ns}/{svc} got no EXTERNAL-IP in 120 s: is MetalLB running \
                 (`kubectl --context {CONTEXT} -n metallb-system get pods`)?"
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn jsonpath(ns: &str, obj: &str, path: &str) -> Result<String> {
    kubectl_output(&["-n", ns, "get", obj, "-o", &format!("jsonpath={path}")])
}

fn retry(within: Duration, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                println!("  (retrying in 5 s: {e:#})");
                std::thread::sleep(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Running commands

fn path_arg(rel: &str) -> String {
    root().join(rel).to_string_lossy().into_owned()
}

fn step(what: &str) {
    println!("… {what}");
}

fn kubectl_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--context").arg(CONTEXT).args(args);
    cmd
}

fn kubectl(args: &[&str]) -> Result<()> {
    visible(&mut kubectl_cmd(args))
}

fn kubectl_output(args: &[&str]) -> Result<String> {
    output(&mut kubectl_cmd(args))
}

fn kubectl_apply_stdin(yaml: &str) -> Result<()> {
    let mut child = kubectl_cmd(&["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("starting kubectl apply")?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(yaml.as_bytes())
        .context("writing to kubectl apply")?;
    let status = child.wait()?;
    if !status.success() {
        bail!("kubectl apply -f - failed ({status})");
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs with the command's output shown.
fn visible(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let status = cmd.status().with_context(|| format!("starting `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs and returns stdout; stderr is shown when it fails.
fn output(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{what}`"))?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("`{what}` failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_follows_the_kind_subnet() {
        assert_eq!(
            pool_for(("172.18.0.0".parse().unwrap(), 16)),
            "172.18.255.200-172.18.255.250"
        );
        assert_eq!(
            pool_for(("172.19.0.0".parse().unwrap(), 16)),
            "172.19.255.200-172.19.255.250"
        );
        assert_eq!(
            pool_for(("10.89.0.0".parse().unwrap(), 24)),
            "10.89.0.192-10.89.0.254"
        );
        assert_eq!(
            parse_subnet("fc00:f853:ccd:e793::/64 172.18.0.0/16 "),
            Some(("172.18.0.0".parse().unwrap(), 16))
        );
    }

    #[test]
    fn the_files_kind_reads_exist_and_can_be_edited() {
        for f in [CONTAINERFILE, KIND_CONFIG, METALLB_CONFIG, BENCH_CLIENT] {
            assert!(root().join(f).is_file(), "{f} is missing");
        }
        for d in ["deploy", "deploy/examples", "deploy/bench"] {
            assert!(
                root().join(d).join("kustomization.yaml").is_file(),
                "{d}/kustomization.yaml is missing"
            );
        }
        let cfg = std::fs::read_to_string(root().join(METALLB_CONFIG)).unwrap();
        let moved = set_pool(&cfg, "172.19.255.200-172.19.255.250").unwrap();
        assert!(moved.contains("- 172.19.255.200-172.19.255.250"), "{moved}");
        assert!(!moved.contains("172.18."), "{moved}");
        assert_eq!(moved.lines().count(), cfg.lines().count());

        let job = std::fs::read_to_string(root().join(BENCH_CLIENT)).unwrap();
        let set = set_env_value(&job, "LB_ADDR", "172.18.255.201").unwrap();
        assert!(set.contains("value: \"172.18.255.201\""), "{set}");
        assert_eq!(set.lines().count(), job.lines().count());
        assert!(set_env_value(&job, "NO_SUCH_VAR", "x").is_err());
    }

    #[test]
    fn the_daemonset_runs_the_image_kind_loads() {
        let ds = std::fs::read_to_string(root().join("deploy/daemonset.yaml")).unwrap();
        assert!(
            ds.lines().any(|l| l.trim() == format!("image: {IMAGE}")),
            "deploy/daemonset.yaml does not run {IMAGE}"
        );
    }
}
