//! Packet rate (`--only pps`): small UDP packets over many flows from the outside client to
//! a NodePort whose only endpoint is a pod on another node, so every packet is translated,
//! source-NATed and forwarded by the entry node (never delivered locally there). What
//! arrives at the pod, per second, and the CPU the machine spent per arrived packet.
//!
//! Configurations, each its own fresh copy of the built-in network, all up side by side and
//! measured in alternating order:
//!
//! * `ours`: lb-agent with its default flags, so `--xdp-mode auto`, on kind-shaped nodes
//!   (no XDP program on the uplink's host-side peer, offloads on): what it picks there
//!   (tc ingress alone on a veth) is recorded;
//! * `ours-generic`: the same nodes with `--xdp-mode generic` (generic XDP, tc behind it);
//! * `ours-native`: `--xdp-mode native` with the harness's pass program on the peers, as
//!   the test harness and the north-south part run it;
//! * `iptables` / `nftables`: no agent; kube-proxy-shaped rules (rules.rs) on the entry node;
//! * `routing`: no load balancer: the client sends to the pod's address, routed through
//!   the entry node (the same hops without NAT);
//! * `routing-xdp` (diagnostic): `routing` with the XDP pass program in native mode on both
//!   ends of every node's uplink, where ours-native has the load balancer and the harness's
//!   pass program: what native XDP on these veths costs by itself, without load balancing.
//!
//! The generator is `trafgen` (netsniff-ng): packets built in a PF_PACKET TX ring and sent
//! by the kernel in batches, pinned to one CPU in the client namespace. Veths hand packets
//! to the receiving side on the sending CPU, so the whole path (bridge, entry node, second
//! node, pod) runs on that CPU too: the rate is what one CPU does for generator + path.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::ValueEnum;
use lb_common::{CtEntry, MAP_CT, MAP_CT_NEW, MAP_REVNAT, RevNat};
use lb_tests::{Cluster, Network, Pod, SourceMode, TopologySpec, exec_ok, try_in_netns};
use serde::{Deserialize, Serialize};

use crate::{
    Args,
    ns::{ENTRY_NODE, NetnsProcess, clear_lru, tmp_file},
    rules::{self, SvcDef},
    util::{default_cluster, enter_netns, flush_conntrack, median, sh},
};

/// The UDP service: NodePort on the entry node, service and target port.
const NODE_PORT: u16 = 30300;
const PORT: u16 = 9000;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 200, 3);
/// Flows differ by the client's source port: `SRC_PORT_BASE ..`.
const SRC_PORT_BASE: u16 = 10_000;
/// UDP payload: 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 18 = 60 bytes, a 64-byte frame on a
/// wire with its FCS (how pktgen and NIC data sheets count).
const PAYLOAD: usize = 18;
const FRAME_BYTES: u32 = 64;
/// The CPU trafgen is pinned to.
const GEN_CPU: usize = 0;
/// trafgen runs this long before the measured window (flows created, ring and caches warm).
const WARM: Duration = Duration::from_millis(500);
/// Background pings between nodes, as in north-south (neighbour entries must not age out).
const CHATTER: bool = true;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, PartialOrd, Ord, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PpsConfig {
    Ours,
    OursGeneric,
    OursNative,
    Iptables,
    Nftables,
    Routing,
    RoutingXdp,
}

pub const PPS_CONFIGS: [PpsConfig; 7] = [
    PpsConfig::Ours,
    PpsConfig::OursGeneric,
    PpsConfig::OursNative,
    PpsConfig::Iptables,
    PpsConfig::Nftables,
    PpsConfig::Routing,
    PpsConfig::RoutingXdp,
];

impl PpsConfig {
    pub fn key(self) -> &'static str {
        match self {
            PpsConfig::Ours => "ours",
            PpsConfig::OursGeneric => "ours-generic",
            PpsConfig::OursNative => "ours-native",
            PpsConfig::Iptables => "iptables",
            PpsConfig::Nftables => "nftables",
            PpsConfig::Routing => "routing",
            PpsConfig::RoutingXdp => "routing-xdp",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            PpsConfig::Ours => "xlb (default flags: auto)",
            PpsConfig::OursGeneric => "xlb (--xdp-mode generic)",
            PpsConfig::OursNative => "xlb (--xdp-mode native, peer with XDP)",
            PpsConfig::Iptables => "kube-proxy iptables",
            PpsConfig::Nftables => "kube-proxy nftables",
            PpsConfig::Routing => "plain routing (no LB)",
            PpsConfig::RoutingXdp => "plain routing + XDP pass on uplinks (diagnostic)",
        }
    }
}

/// One measured window.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PpsSample {
    pub config: PpsConfig,
    pub repeat: usize,
    /// The measured window (after WARM).
    pub seconds: f64,
    /// Packets the client's interface sent in the window.
    pub sent: u64,
    /// Packets the pod's IP layer received in the window (IpInReceives of its namespace).
    pub delivered: u64,
    pub mpps: f64,
    pub sent_mpps: f64,
    /// system + irq + softirq time of all CPUs in the window, per delivered packet.
    pub cpu_ns_per_packet: f64,
    /// The softirq part alone (the path after the generator's send call).
    pub softirq_ns_per_packet: f64,
    /// system + irq + softirq CPU-seconds per second of the window (at most the CPUs).
    pub busy_cpus: f64,
    /// Share of that time spent on the generator's CPU (the path stays on it).
    pub gen_cpu_share: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(default)]
pub struct Pps {
    /// The command line of the run that measured this part.
    pub command: String,
    pub seconds: f64,
    pub repeats: usize,
    pub flows: u32,
    pub frame_bytes: u32,
    pub generator: String,
    pub gen_cpu: usize,
    /// Configuration -> the XDP mode its entry node's agent reports.
    pub xdp_modes: BTreeMap<String, String>,
    /// Configuration -> each agent's non-zero datapath counters after the last window
    /// (evidence of the path the packets took: fwd_remote, ct_hit, ...).
    pub agent_counters: BTreeMap<String, Vec<String>>,
    pub samples: Vec<PpsSample>,
    pub failures: Vec<String>,
    pub method: Vec<String>,
}

pub const METHOD: &[&str] = &[
    "Topology: the built-in kind-shaped network; the client 172.18.0.100 sends to NodePort \
     30300/udp of service-demo-worker, whose only endpoint is pod r2d8c on \
     service-demo-worker2: every packet is DNATed and SNATed on the entry node and forwarded \
     to the other node. routing: the client sends to r2d8c's address, routed via \
     service-demo-worker (same hops, no NAT). Each configuration has its own copy of the \
     network, all up side by side; one loaded at a time, in alternating order over repeats.",
    "Generator: trafgen (netsniff-ng; PF_PACKET TX ring, qdisc bypass), pinned with taskset to \
     one CPU in the client namespace, 64-byte frames (60 bytes + FCS: 18-byte UDP payload), \
     source ports cycling over the flows (dinc), checksums computed. It runs WARM = 0.5 s \
     (flows created: conntrack entries, agent CT/SNAT entries) before the measured window, \
     which spans two counter snapshots taken in-process.",
    "Delivered: IpInReceives of the pod's namespace (/proc/net/snmp there): IP packets that \
     reached the pod, counted by the pod's own stack (no XDP or tc program runs in pods). \
     The pod has a UDP socket bound on the port that is never read while measuring (its \
     receive buffer overflows: no ICMP port-unreachable traffic back). Sent: tx_packets of \
     the client's interface in the same window.",
    "CPU: system + irq + softirq ticks of all CPUs from /proc/stat over the window, per \
     delivered packet. All namespaces share one kernel, so this includes the generator's \
     send path and the bridge, identical in every configuration; differences between \
     configurations are the load balancer's. The softirq part alone is the path after the \
     generator's send call. Veths process a packet on the CPU that sent it, so the path runs \
     on the generator's CPU (gen_cpu_share in the JSON) and Mpps is what one CPU does; except \
     that a veth with native XDP receives through NAPI, and a NAPI poll that another CPU \
     started (a ping, the agent) may go on there, spreading the path over both CPUs for a \
     while (share well below 100%, some loss, a higher Mpps). CPU ns/packet is the figure \
     that does not depend on that.",
    "Before every window the configuration's connection tracking is emptied (ctnetlink flush \
     on every node for iptables/nftables; XLB_CT, XLB_CT_NEW and XLB_REVNAT for ours), so \
     every window starts with the same flows to create. A functional check first: one \
     datagram from a client socket must reach the pod's socket (translation and checksum).",
    "ours runs lb-agent with its default flags, which means --xdp-mode auto. ours and \
     ours-generic run on kind-shaped nodes: the harness's XDP pass program on each uplink's host-side peer is \
     detached and TX checksum offload and TSO are on at both ends, as on a kind node. The \
     mode each agent reports is recorded (xdp_modes). ours-native is --xdp-mode native \
     with the harness's pass program on the peers (which native XDP_TX on a veth needs).",
    "Node chatter (pings between nodes and to the client once a second) as in north-south.",
    "routing-xdp (diagnostic): routing with xlb_xdp_pass attached in native mode on both ends \
     of every node's uplink, the XDP layout of ours-native without the load balancing. \
     routing vs routing-xdp is the cost of native XDP on these veths (NAPI receive, skbs \
     copied for XDP headroom), which a physical NIC's driver does not have; ours-native vs \
     routing-xdp is what the load balancing itself costs.",
];

// ---------------------------------------------------------------- counters

/// /proc/stat: (system + irq + softirq, softirq) ticks of all CPUs, and the first of them
/// on the generator's CPU.
#[derive(Clone, Copy, Default)]
struct CpuTicks {
    busy: u64,
    softirq: u64,
    gen_busy: u64,
}

fn cpu_ticks() -> Result<CpuTicks> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let mut t = CpuTicks::default();
    let gen_label = format!("cpu{GEN_CPU}");
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(label) = f.next() else { continue };
        if !label.starts_with("cpu") {
            break;
        }
        // user nice system idle iowait irq softirq steal ...
        let v: Vec<u64> = f.map(|x| x.parse().unwrap_or(0)).collect();
        ensure!(v.len() >= 7, "/proc/stat: short line {line:?}");
        let busy = v[2] + v[5] + v[6];
        if label == "cpu" {
            t.busy = busy;
            t.softirq = v[6];
        } else if label == gen_label {
            t.gen_busy = busy;
        }
    }
    Ok(t)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A counter of /proc/net/snmp (`Ip: ... InReceives ...`) in `netns`. /proc/thread-self
/// follows the reading thread's namespace (/proc/self/net would show the process's).
fn snmp(netns: &str, group: &str, field: &str) -> Result<u64> {
    let text = try_in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/snmp")
    })??;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {group} lines in /proc/net/snmp of {netns}");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == field)
        .with_context(|| format!("no {group} {field} in /proc/net/snmp"))?;
    values
        .split_whitespace()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{group} {field}: no value"))
}

/// tx_packets of `iface` in `netns` (/proc/net/dev).
fn tx_packets(netns: &str, iface: &str) -> Result<u64> {
    let text = try_in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/dev")
    })??;
    let line = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{iface}:")))
        .with_context(|| format!("{iface} not in /proc/net/dev of {netns}"))?;
    // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets ...
    line.split_whitespace()
        .nth(9)
        .and_then(|v| v.parse().ok())
        .context("/proc/net/dev: no tx_packets")
}

struct Snapshot {
    at: Instant,
    cpu: CpuTicks,
    delivered: u64,
    sent: u64,
}

// ---------------------------------------------------------------- the generator

/// `ip link` address of `iface` in `netns`.
fn mac(netns: &str, iface: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "link", "show", iface])
        .output()
        .context("ip link show")?;
    ensure!(
        out.status.success(),
        "ip -n {netns} link show {iface}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no address for {iface} in {netns}"))
}

/// trafgen's packet description: one UDP packet whose source port cycles over the flows.
fn trafgen_conf(dmac: &str, smac: &str, src: Ipv4Addr, dst: SocketAddrV4, flows: u32) -> String {
    let hi = u32::from(SRC_PORT_BASE) + flows - 1;
    format!(
        "/* xlb-bench pps: {FRAME_BYTES}-byte frames, {flows} flows */\n{{\n  \
         eth(da={dmac}, sa={smac}),\n  \
         ipv4(sa={src}, da={}, ttl=64),\n  \
         udp(sp=dinc({SRC_PORT_BASE}, {hi}), dp={}),\n  \
         fill(0x58, {PAYLOAD})\n}}\n",
        dst.ip(),
        dst.port()
    )
}

/// A running trafgen under `timeout` (which stops it by itself should this process not).
struct Trafgen(Option<Child>);

impl Trafgen {
    fn start(netns: &str, iface: &str, conf: &str, limit: Duration) -> Result<Self> {
        let child = Command::new("timeout")
            .args(["-s", "INT", "-k", "2"])
            .arg(format!("{}", limit.as_secs_f64().ceil()))
            .args(["ip", "netns", "exec", netns, "taskset", "-c"])
            .arg(GEN_CPU.to_string())
            .args(["trafgen", "--dev", iface, "--conf", conf, "--cpus", "1"])
            // Leave the machine's socket memory limits and IRQ affinities alone.
            .args(["--no-sock-mem", "--notouch-irq"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting trafgen (Debian package netsniff-ng; `cargo xtask setup`)")?;
        Ok(Self(Some(child)))
    }

    /// Fails if trafgen already exited (a bad config, no such device).
    fn running(&mut self) -> Result<()> {
        let child = self.0.as_mut().expect("running");
        if let Some(st) = child.try_wait()? {
            let out = self.0.take().expect("child").wait_with_output()?;
            bail!(
                "trafgen exited early ({st}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops trafgen and waits for it.
    fn stop(mut self) -> Result<()> {
        self.interrupt().map(|_| ())
    }

    /// SIGINT to `timeout`, which passes it on to trafgen (SIGKILL would stop `timeout`
    /// only); waits for both.
    fn interrupt(&mut self) -> Result<std::process::Output> {
        let child = self.0.take().context("trafgen already stopped")?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        Ok(child.wait_with_output()?)
    }
}

impl Drop for Trafgen {
    fn drop(&mut self) {
        if self.0.is_some() {
            let _ = self.interrupt();
        }
    }
}

pub fn version() -> String {
    // `trafgen -v` prints "trafgen 0.6.8 (Flutternozzle), Git id: (none)" on stdout.
    let v = sh("trafgen", &["-v"]);
    let line = v.lines().next().unwrap_or_default();
    line.split(" (").next().unwrap_or(line).to_owned()
}

// ---------------------------------------------------------------- the configurations

struct Setup {
    config: PpsConfig,
    // Drop order: sink and pings, then the agents, then the network.
    sink: UdpSocket,
    _chatter: Vec<NetnsProcess>,
    /// routing-xdp: the pass program on both ends of every node's uplink.
    _pass: Option<(lb_agent::dataplane::datapath::Datapath, lb_tests::PinDir)>,
    cluster: Option<Cluster>,
    _net: Option<Network>,
    client_ns: String,
    client_if: String,
    client_addr: Ipv4Addr,
    node_ns: Vec<String>,
    pod: Pod,
    /// Where the client sends: the NodePort, or the pod itself (routing).
    target: SocketAddrV4,
    conf: String,
    xdp_mode: Option<String>,
}

fn service(pod: &Pod) -> SvcDef {
    SvcDef {
        name: "pps".into(),
        cluster_ip: CLUSTER_IP,
        port: PORT,
        endpoints: vec![(pod.addr, PORT, pod.node.clone())],
        node_port: Some(NODE_PORT),
        lb_ip: None,
        udp: true,
    }
}

/// The endpoint: the first pod on another node than the entry node.
fn remote_pod(pods: &[Pod]) -> Result<Pod> {
    pods.iter()
        .find(|p| p.node != ENTRY_NODE)
        .cloned()
        .context("no pod off the entry node in the topology")
}

impl Setup {
    fn up(config: PpsConfig, spec: &TopologySpec, flows: u32) -> Result<Self> {
        let manifest = |net: &Network| {
            remote_pod(net.pods())
                .map_or_else(|_| String::new(), |p| rules::manifest(&[service(&p)]))
        };
        let (mut cluster, net) = match config {
            PpsConfig::Ours => (Some(default_cluster(spec, manifest, &[])?), None),
            PpsConfig::OursGeneric | PpsConfig::OursNative => {
                let mode = if config == PpsConfig::OursGeneric {
                    "generic"
                } else {
                    "native"
                };
                let args = ["--xdp-mode".to_owned(), mode.to_owned()];
                (
                    Some(Cluster::up_with_args(
                        spec,
                        manifest,
                        SourceMode::File,
                        &args,
                    )?),
                    None,
                )
            }
            _ => (None, Some(Network::up(spec)?)),
        };
        if config == PpsConfig::OursGeneric {
            cluster.as_mut().expect("cluster").kind_shaped()?;
        }
        let mut xdp_mode = None;
        if let Some(c) = cluster.as_mut() {
            c.wait_for("the UDP service", Duration::from_secs(60), |s| {
                s.services.iter().any(|x| {
                    x.name.starts_with(&format!("{}/", rules::NAMESPACE)) && !x.endpoints.is_empty()
                })
            })?;
            let st = c.agent(ENTRY_NODE).status()?;
            xdp_mode = st.agent.map(|a| a.xdp_mode);
        }
        let nw = cluster
            .as_ref()
            .map_or_else(|| net.as_ref().expect("network"), |c| &c.net);
        let pod = remote_pod(nw.pods())?;
        let entry = nw.node(ENTRY_NODE).clone();
        let client_ns = nw.client_netns().to_owned();
        let client_addr = nw.client_addr();
        let client_if = lb_tests::UPLINK.to_owned();
        let node_ns: Vec<String> = nw.nodes().iter().map(|n| n.netns.clone()).collect();
        let svc = service(&pod);
        let target = match config {
            PpsConfig::Routing | PpsConfig::RoutingXdp => {
                crate::ns::route_pods_via(nw, &client_ns, entry.addr)?;
                SocketAddrV4::new(pod.addr, PORT)
            }
            _ => SocketAddrV4::new(entry.addr, NODE_PORT),
        };
        match config {
            PpsConfig::Iptables => {
                let (text, _) = rules::iptables_full(std::slice::from_ref(&svc));
                let path = tmp_file("pps-iptables", &text)?;
                let r = exec_ok(&entry.netns, &["iptables-restore", &path]);
                let _ = std::fs::remove_file(&path);
                r.context("iptables-restore")?;
            }
            PpsConfig::Nftables => {
                let path = tmp_file("pps-nft", &rules::nft_full(std::slice::from_ref(&svc)))?;
                let r = exec_ok(&entry.netns, &["nft", "-f", &path]);
                let _ = std::fs::remove_file(&path);
                r.context("nft -f")?;
            }
            _ => {}
        }
        let mut chatter = Vec::new();
        if CHATTER {
            for n in nw.nodes() {
                let peers = nw
                    .nodes()
                    .iter()
                    .filter(|o| o.name != n.name)
                    .map(|o| o.addr)
                    .chain([client_addr]);
                for peer in peers {
                    chatter.push(NetnsProcess::pinger(&n.netns, peer)?);
                }
            }
        }
        let sink = {
            let netns = pod.netns.clone();
            std::thread::spawn(move || -> Result<UdpSocket> {
                enter_netns(&netns)?;
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
                // Small: while measuring nobody reads it, and overflowing costs little.
                s.set_recv_buffer_size(64 * 1024)?;
                s.bind(&std::net::SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)).into())?;
                Ok(s.into())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))??
        };
        let conf_text = trafgen_conf(
            &mac(nw.node(ENTRY_NODE).netns.as_str(), lb_tests::UPLINK)?,
            &mac(&client_ns, &client_if)?,
            client_addr,
            target,
            flows,
        );
        let conf = tmp_file(&format!("pps-{}-trafgen", config.key()), &conf_text)?;
        let pass = if config == PpsConfig::RoutingXdp {
            xdp_mode = Some("native (pass program)".to_owned());
            Some(crate::ns::attach_pass(nw, nw.nodes(), "ppsxdp")?)
        } else {
            None
        };
        Ok(Self {
            config,
            sink,
            _chatter: chatter,
            _pass: pass,
            cluster,
            _net: net,
            client_ns,
            client_if,
            client_addr,
            node_ns,
            pod,
            target,
            conf,
            xdp_mode,
        })
    }

    /// One datagram from a client socket must reach the pod's socket intact (translation,
    /// checksums); a few tries (the first may wait for neighbour resolution).
    fn check(&self) -> Result<()> {
        self.sink.set_nonblocking(true)?;
        let mut buf = [0u8; 2048];
        while self.sink.recv_from(&mut buf).is_ok() {}
        self.sink.set_nonblocking(false)?;
        self.sink
            .set_read_timeout(Some(Duration::from_millis(500)))?;
        let (src, to) = (self.client_addr, self.target);
        let client_ns = self.client_ns.clone();
        let client = std::thread::spawn(move || -> Result<UdpSocket> {
            enter_netns(&client_ns)?;
            Ok(UdpSocket::bind(SocketAddrV4::new(src, 0))?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        let msg = b"xlb-bench pps check";
        for _ in 0..5 {
            client.send_to(msg, to)?;
            if let Ok((n, _)) = self.sink.recv_from(&mut buf)
                && &buf[..n] == msg
            {
                return Ok(());
            }
        }
        bail!(
            "{}: a datagram to {to} never reached pod {}",
            self.config.key(),
            self.pod.name
        )
    }

    /// Empties the configuration's connection tracking.
    fn flush(&self) -> Result<()> {
        match self.config {
            PpsConfig::Iptables | PpsConfig::Nftables => {
                for ns in &self.node_ns {
                    flush_conntrack(ns)?;
                }
            }
            PpsConfig::Ours | PpsConfig::OursGeneric | PpsConfig::OursNative => {
                for a in &self.cluster.as_ref().expect("cluster").agents {
                    clear_lru::<CtEntry>(&a.pin_dir, MAP_CT)?;
                    clear_lru::<CtEntry>(&a.pin_dir, MAP_CT_NEW)?;
                    clear_lru::<RevNat>(&a.pin_dir, MAP_REVNAT)?;
                }
            }
            PpsConfig::Routing | PpsConfig::RoutingXdp => {}
        }
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot> {
        let at = Instant::now();
        Ok(Snapshot {
            at,
            cpu: cpu_ticks()?,
            delivered: snmp(&self.pod.netns, "Ip", "InReceives")?,
            sent: tx_packets(&self.client_ns, &self.client_if)?,
        })
    }

    /// One window of `secs` seconds.
    fn measure(&self, repeat: usize, secs: f64) -> Result<PpsSample> {
        self.flush()?;
        let window = Duration::from_secs_f64(secs);
        let mut trafgen = Trafgen::start(
            &self.client_ns,
            &self.client_if,
            &self.conf,
            WARM + window + Duration::from_secs(5),
        )?;
        std::thread::sleep(WARM);
        trafgen.running()?;
        let a = self.snapshot()?;
        std::thread::sleep(window);
        let b = self.snapshot()?;
        trafgen.running()?;
        trafgen.stop()?;
        let seconds = b.at.duration_since(a.at).as_secs_f64();
        let delivered = b.delivered.saturating_sub(a.delivered);
        let sent = b.sent.saturating_sub(a.sent);
        let ns_per_tick = 1e9 / clk_tck();
        let busy = b.cpu.busy.saturating_sub(a.cpu.busy) as f64;
        let per = |ticks: f64| {
            if delivered > 0 {
                ticks * ns_per_tick / delivered as f64
            } else {
                f64::NAN
            }
        };
        Ok(PpsSample {
            config: self.config,
            repeat,
            seconds,
            sent,
            delivered,
            mpps: delivered as f64 / seconds / 1e6,
            sent_mpps: sent as f64 / seconds / 1e6,
            cpu_ns_per_packet: per(busy),
            softirq_ns_per_packet: per(b.cpu.softirq.saturating_sub(a.cpu.softirq) as f64),
            busy_cpus: busy * ns_per_tick / 1e9 / seconds,
            gen_cpu_share: b.cpu.gen_busy.saturating_sub(a.cpu.gen_busy) as f64 / busy.max(1.0),
        })
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// The whole packet-rate comparison.
pub fn run(args: &Args, command: &str) -> Result<Pps> {
    let configs: Vec<PpsConfig> = if args.pps_configs.is_empty() {
        PPS_CONFIGS.to_vec()
    } else {
        args.pps_configs.clone()
    };
    let mut out = Pps {
        command: command.to_owned(),
        seconds: args.pps_seconds,
        repeats: args.pps_repeats,
        flows: args.pps_flows,
        frame_bytes: FRAME_BYTES,
        generator: format!("{} (taskset -c {GEN_CPU}, --cpus 1)", version()),
        gen_cpu: GEN_CPU,
        method: METHOD.iter().map(|m| (*m).to_owned()).collect(),
        ..Default::default()
    };
    ensure!(
        which("trafgen"),
        "trafgen not found (Debian package netsniff-ng; `cargo xtask setup` installs it)"
    );
    let spec = TopologySpec::seed();
    eprintln!(
        "▶ pps: {} flows of {FRAME_BYTES}-byte UDP frames, {} s x {} repeat(s); bringing up {}",
        args.pps_flows,
        args.pps_seconds,
        args.pps_repeats,
        configs
            .iter()
            .map(|c| c.key())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut setups = Vec::new();
    for &c in &configs {
        let t0 = Instant::now();
        let s = Setup::up(c, &spec, args.pps_flows)
            .with_context(|| format!("pps {} setup", c.key()))?;
        if let Some(m) = &s.xdp_mode {
            out.xdp_modes.insert(c.key().to_owned(), m.clone());
        }
        eprintln!(
            "  {} up in {:.1} s{}",
            c.key(),
            t0.elapsed().as_secs_f64(),
            s.xdp_mode
                .as_ref()
                .map(|m| format!(" (XDP {m})"))
                .unwrap_or_default()
        );
        match s.check() {
            Ok(()) => setups.push(s),
            Err(e) => {
                let f = format!("{e:#}");
                eprintln!("  ✘ {f}");
                out.failures.push(f);
            }
        }
    }
    for repeat in 0..args.pps_repeats {
        let order: Vec<&Setup> = if repeat % 2 == 0 {
            setups.iter().collect()
        } else {
            setups.iter().rev().collect()
        };
        for s in order {
            match s.measure(repeat, args.pps_seconds) {
                Ok(smp) => {
                    eprintln!(
                        "  r{repeat} {:<11} {:>6.3} Mpps delivered ({:.3} sent)  {:>6.0} ns/pkt CPU ({:.0} softirq)  {:.2} CPUs busy, {:.0}% on CPU {GEN_CPU}",
                        s.config.key(),
                        smp.mpps,
                        smp.sent_mpps,
                        smp.cpu_ns_per_packet,
                        smp.softirq_ns_per_packet,
                        smp.busy_cpus,
                        smp.gen_cpu_share * 100.0
                    );
                    if smp.delivered == 0 {
                        let f = format!(
                            "{} repeat {repeat}: nothing reached the pod",
                            s.config.key()
                        );
                        eprintln!("  ✘ {f}");
                        out.failures.push(f);
                    }
                    out.samples.push(smp);
                }
                Err(e) => {
                    let f = format!("{} repeat {repeat}: {e:#}", s.config.key());
                    eprintln!("  ✘ {f}");
                    out.failures.push(f);
                }
            }
        }
    }
    for s in &setups {
        let Some(c) = &s.cluster else { continue };
        let lines: Vec<String> = c
            .agents
            .iter()
            .filter_map(|a| {
                let st = a.status().ok()?;
                let nz: Vec<String> = st
                    .counters
                    .iter()
                    .filter(|(_, v)| **v > 0)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                Some(format!("{}: {}", a.node, nz.join(" ")))
            })
            .collect();
        for l in &lines {
            eprintln!("  {} counters, {l}", s.config.key());
        }
        out.agent_counters.insert(s.config.key().to_owned(), lines);
    }
    drop(setups);
    Ok(out)
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// Median over repeats of one configuration's `f`; None without samples.
pub fn med(p: &Pps, c: PpsConfig, f: impl Fn(&PpsSample) -> f64) -> Option<f64> {
    let v: Vec<f64> = p
        .samples
        .iter()
        .filter(|s| s.config == c && s.delivered > 0)
        .map(f)
        .filter(|v| v.is_finite())
        .collect();
    (!v.is_empty()).then(|| median(v))
}
