//! A simulated kind cluster: the built-in network plus one real `lb-agent` process per node,
//! fed from a manifest file (as a user without an API server would run it) or, in kube
//! mode ([`Cluster::up_kube`]), through the Kubernetes API from the [`ApiServer`] stand-in
//! listening on the control plane node's address (port 6443, as kind's), and the pass
//! programs the veth peers need for native XDP. Shared by the end-to-end tests, the demo
//! and the benchmarks.
use std::{
    fmt::Write as _,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{Xdp, XdpMode};
use lb_agent::{
    dataplane::datapath::{Datapath, Limits},
    status::{self, Status},
};
use lb_common::PROG_XDP_PASS;

use crate::{
    ApiServer, Network, PinDir, TopologySpec,
    guards::PIN_ROOT,
    netns::try_in_netns,
    server::{POD_ECHO_PORT, POD_HTTP_PORT, POD_UDP_PORT},
};

/// NodePorts and addresses of the services in [`seed_manifests`].
pub const NGINX_NODE_PORT: u16 = 31234;
pub const NGINX_CLUSTER_IP: &str = "10.96.100.10";
pub const ECHO_PORT: u16 = 7000;
pub const ECHO_NODE_PORT: u16 = 30700;
pub const DNS_PORT: u16 = 53;
pub const DNS_NODE_PORT: u16 = 30053;

/// Which of the optional test services to include next to the seed's two.
#[derive(Clone, Debug)]
pub struct ManifestOpts {
    /// Pods that are endpoints (None = every pod of the network).
    pub endpoints: Option<Vec<String>>,
    /// Include the TCP line-echo service (long-lived connections).
    pub echo: bool,
    /// Include the UDP service.
    pub udp: bool,
    /// Include the seed's nginx-service.
    pub nginx: bool,
}

impl Default for ManifestOpts {
    fn default() -> Self {
        Self {
            endpoints: None,
            echo: false,
            udp: false,
            nginx: true,
        }
    }
}

/// The seed article's manifests as `kubectl get svc,endpointslices -A -o yaml` would show
/// them on a cluster shaped like `net`: the `nginx-service` LoadBalancer (its EXTERNAL-IP is
/// the network's first LB IP, as MetalLB would assign) with an EndpointSlice listing the
/// pods, and the ExternalName `my-external-service`. Optional extra services for tests.
pub fn seed_manifests(net: &Network, opts: &ManifestOpts) -> String {
    let pods: Vec<_> = net
        .pods()
        .iter()
        .filter(|p| opts.endpoints.as_ref().is_none_or(|e| e.contains(&p.name)))
        .collect();
    let lb_ip = net.lb_ips().first().map(|(ip, _)| ip.to_string());
    let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
    let endpoints = |port_name: &str, port: u16, proto: &str| {
        let mut s = format!(
            "  ports:\n  - {{name: {port_name}, port: {port}, protocol: {proto}}}\n  endpoints:\n"
        );
        for p in &pods {
            let _ = writeln!(
                s,
                "  - addresses: [\"{}\"]\n    nodeName: {}\n    conditions: {{ready: true, serving: true, terminating: false}}\n    targetRef: {{kind: Pod, namespace: dev, name: {}}}",
                p.addr, p.node, p.name
            );
        }
        if pods.is_empty() {
            s = format!(
                "  ports:\n  - {{name: {port_name}, port: {port}, protocol: {proto}}}\n  endpoints: []\n"
            );
        }
        s
    };
    let mut item = |svc: String, slice_name: &str, svc_name: &str, eps: String| {
        y.push_str(&svc);
        let _ = write!(
            y,
            "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {slice_name}\n    namespace: dev\n    labels: {{kubernetes.io/service-name: {svc_name}}}\n  addressType: IPv4\n{eps}"
        );
    };
    if opts.nginx {
        let status = match &lb_ip {
            Some(ip) => format!("  status:\n    loadBalancer:\n      ingress:\n      - ip: {ip}\n"),
            None => "  status:\n    loadBalancer: {}\n".into(),
        };
        item(
            format!(
                "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: nginx-service\n    namespace: dev\n    labels: {{app: nginx-service}}\n  spec:\n    type: LoadBalancer\n    clusterIP: {NGINX_CLUSTER_IP}\n    selector: {{app: nginx}}\n    ports:\n    - {{name: http, port: 80, protocol: TCP, targetPort: {POD_HTTP_PORT}, nodePort: {NGINX_NODE_PORT}}}\n{status}"
            ),
            "nginx-service-7xk2p",
            "nginx-service",
            endpoints("http", POD_HTTP_PORT, "TCP"),
        );
    }
    if opts.echo {
        item(
            format!(
                "- apiVersion: v1\n  kind: Service\n  metadata: {{name: echo, namespace: dev}}\n  spec:\n    type: NodePort\n    clusterIP: 10.96.100.11\n    ports:\n    - {{name: echo, port: {ECHO_PORT}, protocol: TCP, targetPort: echo, nodePort: {ECHO_NODE_PORT}}}\n"
            ),
            "echo-abcde",
            "echo",
            endpoints("echo", POD_ECHO_PORT, "TCP"),
        );
    }
    if opts.udp {
        item(
            format!(
                "- apiVersion: v1\n  kind: Service\n  metadata: {{name: dns, namespace: dev}}\n  spec:\n    type: NodePort\n    clusterIP: 10.96.100.12\n    ports:\n    - {{name: dns, port: {DNS_PORT}, protocol: UDP, targetPort: {POD_UDP_PORT}, nodePort: {DNS_NODE_PORT}}}\n"
            ),
            "dns-fghij",
            "dns",
            endpoints("dns", POD_UDP_PORT, "UDP"),
        );
    }
    y.push_str(
        "- apiVersion: v1\n  kind: Service\n  metadata: {name: my-external-service, namespace: dev}\n  spec:\n    type: ExternalName\n    externalName: example.com\n",
    );
    y
}

/// The agent binary next to the running executable (target/<profile>/lb-agent), or
/// `XLB_AGENT_BIN`.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("XLB_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let cand = dir.join("lb-agent");
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "lb-agent binary not found near {} (build it with `cargo build -p lb-agent` or set XLB_AGENT_BIN)",
        exe.display()
    )
}

/// A command that starts inside `netns` (network namespace only). Unlike `ip netns exec`,
/// it keeps the mount namespace: `ip netns exec` remounts /sys, which would hide the host's
/// bpffs at /sys/fs/bpf and leave the agent's pins invisible to everyone else — on a real
/// node the DaemonSet mounts the host's bpffs for the same reason.
pub fn netns_command(netns: &str, program: &Path) -> Result<Command> {
    use std::os::{fd::AsFd, unix::process::CommandExt};
    let file = File::open(Path::new("/run/netns").join(netns))
        .with_context(|| format!("opening netns {netns}"))?;
    let mut cmd = Command::new(program);
    // SAFETY: setns is async-signal-safe; the child is single-threaded after fork.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
    Ok(cmd)
}

/// One `lb-agent run` process inside a node's namespace.
pub struct AgentProc {
    pub node: String,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    /// `--metrics-addr`: the node's address, port [`METRICS_PORT`] (reachable from the
    /// client namespace: `/metrics`, `/healthz`, `/readyz`, `/loglevel`).
    pub metrics_addr: std::net::SocketAddrV4,
    child: Child,
    /// How it was started, for `restart`.
    netns: String,
    bin: PathBuf,
    args: Vec<std::ffi::OsString>,
    envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)>,
}

impl AgentProc {
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> Result<Status> {
        status::read(&self.pin_dir, &self.run_dir)
    }

    /// Stops the agent (SIGTERM) and starts it again with the same arguments, as a
    /// DaemonSet rolling update would. Its pins stay in between.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let mut cmd = netns_command(&self.netns, &self.bin)?;
        cmd.args(&self.args);
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        self.child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("restarting lb-agent")?;
        Ok(())
    }

    /// Stops the agent now (its pins stay until the AgentProc is dropped).
    pub fn stop_now(&mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Where the agents of a [`Cluster`] read Services and EndpointSlices from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceMode {
    /// `--source file:<manifest>`.
    File,
    /// `--source file:<directory>`: [`Cluster::write_manifest`] writes the directory's
    /// `all.yaml`, [`Cluster::write_manifest_file`] any file of it.
    Dir,
    /// `--source kube`, KUBECONFIG pointing at the [`ApiServer`] stand-in.
    Kube,
}

/// Port of each agent's metrics server, on its node's address (the agent's default port).
pub const METRICS_PORT: u16 = 9464;

/// Port of the API server stand-in in kube mode (kind's).
pub const API_SERVER_PORT: u16 = 6443;

pub struct Cluster {
    // Field order is drop order: agents stop before the network goes away.
    pub agents: Vec<AgentProc>,
    _pass: Option<(Datapath, PinDir, Vec<aya::programs::xdp::XdpLinkId>)>,
    /// The API server stand-in (kube mode only), listening in the control plane's netns.
    pub api: Option<ApiServer>,
    /// The agents' kubeconfig (kube mode only).
    pub kubeconfig: Option<PathBuf>,
    pub manifest: PathBuf,
    pub net: Network,
}

impl Cluster {
    /// Brings the network up, attaches the pass programs to the bridge side of every node's
    /// uplink (native XDP_TX frames need them), writes `manifest` and starts the agents.
    pub fn up(spec: &TopologySpec, manifest: impl FnOnce(&Network) -> String) -> Result<Self> {
        Self::up_with(spec, manifest, SourceMode::File)
    }

    /// Like [`up`](Self::up), but the agents run with `--source kube` against the
    /// [`ApiServer`] stand-in, which starts on `<control plane address>:6443` inside the
    /// control plane node's namespace with the objects of `manifest`.
    /// [`write_manifest`](Self::write_manifest) then changes the objects through it.
    pub fn up_kube(spec: &TopologySpec, manifest: impl FnOnce(&Network) -> String) -> Result<Self> {
        Self::up_with(spec, manifest, SourceMode::Kube)
    }

    pub fn up_with(
        spec: &TopologySpec,
        manifest: impl FnOnce(&Network) -> String,
        mode: SourceMode,
    ) -> Result<Self> {
        Self::up_with_args(spec, manifest, mode, &[])
    }

    /// Like [`up_with`](Self::up_with), with `extra` appended to every agent's `run`
    /// arguments (e.g. `--maglev-arena <slots>`); kept for [`AgentProc::restart`].
    pub fn up_with_args(
        spec: &TopologySpec,
        manifest: impl FnOnce(&Network) -> String,
        mode: SourceMode,
        extra: &[String],
    ) -> Result<Self> {
        crate::guards::sweep_stale_pins();
        let net = Network::up(spec)?;
        let pins = PinDir::new("pass")?;
        let mut dp = Datapath::load(
            pins.path(),
            &Limits {
                maglev_arena: 1,
                ct_entries: 1,
                ..Limits::default()
            },
        )?;
        let mut links = vec![];
        for node in net.nodes() {
            let iface = node.kind_side_iface.clone();
            let prog: &mut Xdp = dp.xdp(PROG_XDP_PASS)?;
            links.push(
                try_in_netns(net.kind_netns(), || prog.attach(&iface, XdpMode::Driver))?
                    .with_context(|| format!("attaching the pass program to {iface}"))?,
            );
        }
        let manifest_path = match mode {
            SourceMode::Dir => {
                let d = std::env::temp_dir().join(format!("xlb-{}-manifests", net.tag()));
                let _ = std::fs::remove_dir_all(&d);
                std::fs::create_dir_all(&d)?;
                d
            }
            _ => std::env::temp_dir().join(format!("xlb-{}-manifest.yaml", net.tag())),
        };
        let mut cluster = Cluster {
            agents: vec![],
            _pass: Some((dp, pins, links)),
            api: None,
            kubeconfig: None,
            manifest: manifest_path,
            net,
        };
        if mode == SourceMode::Kube {
            let cp = cluster.control_plane().clone();
            let api = ApiServer::start_in_netns(
                &cp.netns,
                std::net::SocketAddr::from((cp.addr, API_SERVER_PORT)),
            )?;
            let path = std::env::temp_dir().join(format!("xlb-{}-kubeconfig", cluster.net.tag()));
            std::fs::write(&path, api.kubeconfig())?;
            cluster.api = Some(api);
            cluster.kubeconfig = Some(path);
        }
        cluster.write_manifest(&manifest(&cluster.net))?;
        let bin = agent_bin()?;
        for node in cluster.net.nodes().to_vec() {
            let id = format!("{}-{}", cluster.net.tag(), node.name);
            let pin_dir = Path::new(PIN_ROOT).join(&id);
            let run_dir = Path::new("/run/xlb").join(&id);
            let log = std::env::temp_dir().join(format!("xlb-{id}-agent.log"));
            let mut cmd = netns_command(&node.netns, &bin)?;
            let metrics_addr = std::net::SocketAddrV4::new(node.addr, METRICS_PORT);
            cmd.args(["run", "--node-name", &node.name, "--iface", &node.uplink]);
            cmd.arg("--metrics-addr").arg(metrics_addr.to_string());
            match &cluster.kubeconfig {
                Some(kc) => {
                    cmd.args(["--source", "kube"])
                        .env("KUBECONFIG", kc)
                        // Never the in-cluster config of wherever the tests run.
                        .env_remove("KUBERNETES_SERVICE_HOST")
                        .env_remove("KUBERNETES_SERVICE_PORT");
                }
                None => {
                    cmd.arg("--source")
                        .arg(format!("file:{}", cluster.manifest.display()));
                }
            }
            cmd.arg("--pin-dir")
                .arg(&pin_dir)
                .arg("--run-dir")
                .arg(&run_dir)
                // Socket-level load balancing for the node's own processes.
                .arg("--cgroup")
                .arg(&node.cgroup)
                // The agent's own default XDP mode (auto: tc alone on these veth uplinks),
                // what a kind node gets; a test of another mode names it here. The pass
                // program on the far end of each uplink is what native mode needs.
                .args(extra);
            let args = cmd.get_args().map(|a| a.to_owned()).collect();
            let envs = cmd
                .get_envs()
                .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
                .collect();
            // One file, two handles sharing its offset: stdout and stderr interleave
            // instead of overwriting each other.
            let log_file = File::create(&log)?;
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file)
                .spawn()
                .context("starting lb-agent")?;
            cluster.agents.push(AgentProc {
                node: node.name.clone(),
                metrics_addr,
                pin_dir,
                run_dir,
                log,
                child,
                netns: node.netns.clone(),
                bin: bin.clone(),
                args,
                envs,
            });
        }
        Ok(cluster)
    }

    /// Replaces the manifest file atomically (write + rename), as `kubectl`-driven tooling
    /// or a ConfigMap update would, so an agent never reads half a file. In kube mode the
    /// API server's Services and EndpointSlices are made equal to it instead (only changed
    /// objects are written).
    pub fn write_manifest(&self, yaml: &str) -> Result<()> {
        if let Some(api) = &self.api {
            let objs = lb_agent::source::yaml::parse_objects(yaml)?;
            let slices = lb_agent::source::yaml::parse_api_slices(yaml)?;
            return api.sync_objects(&objs, &slices);
        }
        if self.manifest.is_dir() {
            return self.write_manifest_file("all.yaml", yaml);
        }
        let tmp = self.manifest.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.manifest)?;
        Ok(())
    }

    /// [`SourceMode::Dir`]: replaces (or creates) one file of the manifest directory
    /// atomically, through a hidden temporary file (which the agent skips).
    pub fn write_manifest_file(&self, name: &str, yaml: &str) -> Result<()> {
        anyhow::ensure!(
            self.manifest.is_dir(),
            "the cluster does not run in Dir mode"
        );
        let tmp = self.manifest.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.manifest.join(name))?;
        Ok(())
    }

    /// [`SourceMode::Dir`]: removes one file of the manifest directory.
    pub fn remove_manifest_file(&self, name: &str) -> Result<()> {
        anyhow::ensure!(
            self.manifest.is_dir(),
            "the cluster does not run in Dir mode"
        );
        std::fs::remove_file(self.manifest.join(name))?;
        Ok(())
    }

    /// The API server stand-in (kube mode).
    pub fn api(&self) -> &ApiServer {
        self.api.as_ref().expect("the cluster runs in kube mode")
    }

    pub fn api_mut(&mut self) -> &mut ApiServer {
        self.api.as_mut().expect("the cluster runs in kube mode")
    }

    /// The node that hosts the API server: the one named `*control-plane`, else the first.
    pub fn control_plane(&self) -> &crate::Node {
        let nodes = self.net.nodes();
        nodes
            .iter()
            .find(|n| n.name.ends_with("control-plane"))
            .unwrap_or(&nodes[0])
    }

    pub fn agent_mut(&mut self, node: &str) -> &mut AgentProc {
        self.agents
            .iter_mut()
            .find(|a| a.node == node)
            .expect("agent for node")
    }

    pub fn agent(&self, node: &str) -> &AgentProc {
        self.agents
            .iter()
            .find(|a| a.node == node)
            .expect("agent for node")
    }

    /// Waits until every agent's pinned state satisfies `ready`; fails early with the log of
    /// an agent that died.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&Status) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            let mut all = true;
            for a in &mut self.agents {
                if !a.alive() {
                    bail!("lb-agent on {} exited:\n{}", a.node, a.log_text());
                }
                match a.status() {
                    Ok(s) => {
                        let ok = ready(&s);
                        if !ok {
                            last = format!("{}: {}", a.node, status::render(&s));
                        }
                        all &= ok;
                    }
                    Err(e) => {
                        last = format!("{}: {e:#}", a.node);
                        all = false;
                    }
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .agents
                    .iter()
                    .map(|a| format!("--- {}\n{}", a.node, a.log_text()))
                    .collect();
                bail!(
                    "timed out waiting for {what}; last status {last}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes the nodes' uplinks what a kind node has: no XDP program on the host-side peer
    /// (the harness's pass program is detached) and TX checksum offload and TSO on at both
    /// ends, as docker leaves them. Native XDP_TX frames no longer arrive after this: for
    /// agents running `--xdp-mode auto`/`off`/`generic`.
    pub fn kind_shaped(&mut self) -> Result<()> {
        // Dropping the links and the datapath detaches the pass programs.
        self._pass = None;
        for node in self.net.nodes() {
            for (netns, iface) in [
                (node.netns.as_str(), node.uplink.as_str()),
                (self.net.kind_netns(), node.kind_side_iface.as_str()),
            ] {
                crate::exec_ok(netns, &["ethtool", "-K", iface, "tx", "on", "tso", "on"])
                    .with_context(|| format!("turning offloads on for {iface} in {netns}"))?;
            }
        }
        Ok(())
    }

    /// Leaves everything running after this process exits (demo `--keep`): the agents keep
    /// going in their namespaces, the pass programs stay attached through pinned links.
    /// `xlb-demo --down` (or the next run's sweep) removes it all.
    pub fn keep(mut self) -> Result<()> {
        if let Some((mut dp, pins, links)) = self._pass.take() {
            let prog: &mut Xdp = dp.xdp(PROG_XDP_PASS)?;
            for (i, id) in links.into_iter().enumerate() {
                let link = prog.take_link(id)?;
                let fd_link = aya::programs::links::FdLink::try_from(link)
                    .context("the pass program was attached without a bpf_link")?;
                fd_link.pin(pins.path().join(format!("link{i}")))?;
            }
            std::mem::forget(pins);
        }
        for a in self.agents.drain(..) {
            std::mem::forget(a);
        }
        let _ = std::fs::remove_file(self.manifest.with_extension("tmp"));
        // The namespaces and the manifest must outlive us: skip their destructors.
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.manifest.is_dir() {
            let _ = std::fs::remove_dir_all(&self.manifest);
        }
        let _ = std::fs::remove_file(&self.manifest);
        if let Some(kc) = &self.kubeconfig {
            let _ = std::fs::remove_file(kc);
        }
    }
}
