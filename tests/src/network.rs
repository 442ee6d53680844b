//! Builds a [`TopologySpec`] out of network namespaces, veths and a bridge,
//! wired the way kind + kindnet wire a cluster, and tears it down on Drop.
//!
//! ```text
//!   client netns            kind netns (bridge "kind")          node netns            pod netns
//!   eth0 172.18.0.100 ─── k-client ┐                      ┌── k-worker ─── eth0 172.18.0.3
//!                                  ├── bridge ───────────┤                 vethXXXX 10.244.1.1/32 ─── eth0 10.244.1.2/32
//!                                  ...                    └── k-worker2 ── eth0 172.18.0.4 ...
//! ```

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::cgroup::{create_cgroup, delete_cgroup};
use crate::client::{http_get, tcp_reachable};
use crate::ipnet::Ipv4Net;
use crate::netns::{
    NETNS_PREFIX, create_netns, delete_netns, exec_ok, ip_in, server_log_path,
    sweep_stale_namespaces, try_in_netns,
};
use crate::server::{POD_ECHO_PORT, POD_HTTP_PORT, POD_SERVER_PY, POD_UDP_PORT};
use crate::topology::{TopologySpec, check_name};

/// The Linux bridge in the kind namespace (docker's network is named `kind`).
pub const BRIDGE_NAME: &str = "kind";
/// Name of the kind-subnet interface in node and client namespaces, and of
/// the interface in pod namespaces, as in real kind nodes and pods.
pub const UPLINK: &str = "eth0";
/// Bridge-side veth of the client.
pub const CLIENT_KIND_IFACE: &str = "k-client";

/// How long a freshly started pod server may take to listen.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout for each set-up probe; everything is on local veths, so a probe
/// that takes this long has failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A port nothing listens on (discard): probing it gets an RST, which is a
/// full round trip without needing a listener.
const WARM_PORT: u16 = 9;
/// Longest Linux interface name (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

static NEXT_TAG: AtomicU32 = AtomicU32::new(0);

/// A cluster node as built: a namespace with `eth0` on the kind subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Interface on the kind subnet inside `netns` (always `eth0`).
    pub uplink: String,
    pub pod_cidr: Ipv4Net,
    /// Peer of `uplink`, enslaved to the bridge in the kind namespace.
    pub kind_side_iface: String,
    /// The node's cgroup v2, `<cgroup2 mount>/xlb-<tag>-node-<name>` (same name as
    /// `netns`): the node's own processes ([`crate::node_command`]) run in it, and the
    /// agent attaches its socket-level programs to it (`--cgroup`).
    pub cgroup: PathBuf,
}

impl Node {
    /// The pods' default gateway: first address of the pod CIDR, set (/32)
    /// on every pod's host-side veth.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        self.pod_cidr
            .nth(1)
            .expect("validated pod CIDRs hold a gateway")
    }
}

/// A pod as built: its own namespace with `eth0`, plus a host-side veth in
/// its node's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Name of the node it runs on.
    pub node: String,
    /// Host-side veth (`veth<hex>`) in the node's namespace.
    pub host_iface: String,
}

impl Pod {
    pub fn http_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, POD_HTTP_PORT)
    }

    pub fn udp_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr, POD_UDP_PORT)
    }

    /// What the pod's server answers over HTTP and UDP.
    pub fn expected_reply(&self) -> String {
        format!("{}\n", self.name)
    }
}

struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    fn stop(mut self) {
        // The child is `ip netns exec`, which execs python3: same pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(2000);
        text.get(start..).unwrap_or_default().trim().to_owned()
    }
}

/// A running topology. Every namespace is named `xlb-<tag>-<role>` where the
/// tag is `<pid>x<counter>`; dropping the `Network` (also while unwinding
/// from a panic) kills the pod servers and deletes all of them.
pub struct Network {
    tag: String,
    spec: TopologySpec,
    kind_netns: String,
    client_netns: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    servers: HashMap<String, Server>,
    /// In creation order; torn down in reverse.
    namespaces: Vec<String>,
    /// Node cgroups, in creation order; removed (processes killed first) before the
    /// namespaces.
    cgroups: Vec<PathBuf>,
    /// Per node: index in the pod CIDR of the next pod address. Never
    /// reused, like kind's host-local IPAM, so a new pod does not inherit a
    /// removed pod's address (and stale conntrack/backend state).
    next_pod_index: HashMap<String, u32>,
}

/// A process-unique tag `<pid>x<n>`: namespaces and pins carry it so sweeps can tell
/// whether their creator is still alive.
pub(crate) fn next_tag() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        NEXT_TAG.fetch_add(1, Ordering::SeqCst)
    )
}

impl Network {
    /// Sweeps namespaces of dead harnesses, then builds `spec`: namespaces,
    /// bridge, veths, addresses, routes, pod servers (listening before this
    /// returns) and warm ARP caches. On error everything created so far is
    /// torn down.
    pub fn up(spec: &TopologySpec) -> Result<Network> {
        spec.validate()?;
        sweep_stale_namespaces().context("sweeping stale namespaces")?;
        let tag = next_tag();
        let mut net = Network {
            tag: tag.clone(),
            spec: spec.clone(),
            kind_netns: String::new(),
            client_netns: String::new(),
            nodes: Vec::new(),
            pods: Vec::new(),
            servers: HashMap::new(),
            namespaces: Vec::new(),
            cgroups: Vec::new(),
            next_pod_index: HashMap::new(),
        };
        // On error `net` drops here and removes whatever was built.
        net.build()
            .with_context(|| format!("bringing up network {tag}"))?;
        Ok(net)
    }

    fn build(&mut self) -> Result<()> {
        let spec = self.spec.clone();

        self.kind_netns = self.new_netns("kind", false)?;
        let kind = self.kind_netns.clone();
        // STP off and no forward delay: ports forward as soon as they are up,
        // as on docker's bridge.
        ip_in(
            &kind,
            &[
                "link",
                "add",
                BRIDGE_NAME,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        )?;
        ip_in(&kind, &["link", "set", BRIDGE_NAME, "up"])?;

        self.client_netns = self.new_netns("client", false)?;
        let client = self.client_netns.clone();
        self.attach_to_kind(&client, CLIENT_KIND_IFACE, spec.client_addr)?;

        let node_names: Vec<&str> = spec.nodes.iter().map(|n| n.name.as_str()).collect();
        let kind_ifaces = kind_iface_names(&node_names);
        for (node_spec, kind_iface) in spec.nodes.iter().zip(kind_ifaces) {
            let netns = self.new_netns(&format!("node-{}", node_spec.name), true)?;
            self.attach_to_kind(&netns, &kind_iface, node_spec.addr)?;
            let cgroup = create_cgroup(&netns)?;
            self.cgroups.push(cgroup.clone());
            self.nodes.push(Node {
                name: node_spec.name.clone(),
                netns,
                addr: node_spec.addr,
                uplink: UPLINK.to_owned(),
                pod_cidr: node_spec.pod_cidr,
                kind_side_iface: kind_iface,
                cgroup,
            });
        }

        // kindnet's job: every node routes the other nodes' pod CIDRs to
        // those nodes' addresses over the shared L2 network.
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                ip_in(
                    &node.netns,
                    &[
                        "route",
                        "add",
                        &other.pod_cidr.to_string(),
                        "via",
                        &other.addr.to_string(),
                        "dev",
                        UPLINK,
                    ],
                )?;
            }
        }

        // The LB in front of the cluster (MetalLB L2 / a cloud LB) delivers
        // each LoadBalancer IP to one node; the client sees that as a /32
        // route via the node. Nothing else is routable from the client.
        for (ip, node_name) in &spec.lb_ips {
            let node = self.node(node_name);
            ip_in(
                &client,
                &[
                    "route",
                    "add",
                    &format!("{ip}/32"),
                    "via",
                    &node.addr.to_string(),
                    "dev",
                    UPLINK,
                ],
            )?;
        }

        // Start every server first and only then wait, so python start-up
        // times overlap.
        let mut started = Vec::new();
        for node_spec in &spec.nodes {
            for pod in &node_spec.pods {
                started.push(self.wire_pod(&node_spec.name, pod)?);
            }
        }
        for pod in &started {
            self.wait_ready(pod)?;
        }

        self.warm_kind_neighbours()?;
        Ok(())
    }

    /// Creates `xlb-<tag>-<role>` with the harness's baseline sysctls and
    /// `lo` up, and records it for teardown.
    fn new_netns(&mut self, role: &str, forwarding: bool) -> Result<String> {
        let netns = format!("{NETNS_PREFIX}{}-{role}", self.tag);
        create_netns(&netns)?;
        self.namespaces.push(netns.clone());
        configure_sysctls(&netns, forwarding)
            .with_context(|| format!("configuring sysctls in {netns}"))?;
        ip_in(&netns, &["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// A veth from `netns` (as `eth0` with `addr` on the kind subnet) to the
    /// bridge (as `kind_iface`), like docker connecting a container.
    fn attach_to_kind(&self, netns: &str, kind_iface: &str, addr: Ipv4Addr) -> Result<()> {
        let kind = &self.kind_netns;
        ip_in(
            kind,
            &[
                "link", "add", kind_iface, "type", "veth", "peer", "name", UPLINK, "netns", netns,
            ],
        )?;
        ip_in(
            kind,
            &["link", "set", kind_iface, "master", BRIDGE_NAME, "up"],
        )?;
        let cidr = format!("{addr}/{}", self.spec.kind_subnet.prefix);
        ip_in(netns, &["addr", "add", &cidr, "dev", UPLINK])?;
        ip_in(netns, &["link", "set", UPLINK, "up"])?;
        tx_csum_off(kind, kind_iface)?;
        tx_csum_off(netns, UPLINK)?;
        Ok(())
    }

    /// Creates the pod's namespace and veth, addresses and routes it the
    /// kindnet (ptp) way, and starts its server. Does not wait for it.
    fn wire_pod(&mut self, node_name: &str, pod_name: &str) -> Result<Pod> {
        check_name("pod", pod_name)?;
        ensure!(
            self.pods.iter().all(|p| p.name != pod_name),
            "pod {pod_name} already exists"
        );
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == node_name)
            .with_context(|| format!("unknown node {node_name}"))?
            .clone();
        let index = self.next_pod_index.entry(node.name.clone()).or_insert(2);
        let addr = node
            .pod_cidr
            .nth(*index)
            .filter(|a| node.pod_cidr.is_host_addr(*a))
            .with_context(|| format!("pod CIDR {} of {node_name} is full", node.pod_cidr))?;
        *index += 1;
        let host_iface = self.host_iface_name(&node, pod_name, addr);
        let netns = self.new_netns(&format!("pod-{pod_name}"), false)?;
        let pod = Pod {
            name: pod_name.to_owned(),
            netns,
            addr,
            node: node.name.clone(),
            host_iface,
        };
        if let Err(e) = self.plumb_pod(&node, &pod) {
            self.discard_pod_netns(&pod);
            return Err(e.context(format!("wiring pod {pod_name} on {node_name}")));
        }
        self.pods.push(pod.clone());
        Ok(pod)
    }

    fn plumb_pod(&mut self, node: &Node, pod: &Pod) -> Result<()> {
        let gw = node.pod_gateway().to_string();
        let (node_ns, pod_ns, host) = (&node.netns, &pod.netns, &pod.host_iface);
        ip_in(
            node_ns,
            &[
                "link", "add", host, "type", "veth", "peer", "name", UPLINK, "netns", pod_ns,
            ],
        )?;
        // Pod side: a /32 and a gateway that is reachable only because of an
        // explicit on-link route, as kindnet configures pods.
        ip_in(
            pod_ns,
            &["addr", "add", &format!("{}/32", pod.addr), "dev", UPLINK],
        )?;
        ip_in(pod_ns, &["link", "set", UPLINK, "up"])?;
        ip_in(
            pod_ns,
            &["route", "add", &gw, "dev", UPLINK, "scope", "link"],
        )?;
        ip_in(
            pod_ns,
            &["route", "add", "default", "via", &gw, "dev", UPLINK],
        )?;
        // Node side: the gateway address on every pod veth (so the node
        // answers the pod's ARP for it) and a /32 route per pod.
        ip_in(node_ns, &["addr", "add", &format!("{gw}/32"), "dev", host])?;
        ip_in(node_ns, &["link", "set", host, "up"])?;
        ip_in(
            node_ns,
            &[
                "route",
                "add",
                &format!("{}/32", pod.addr),
                "dev",
                host,
                "scope",
                "link",
            ],
        )?;
        tx_csum_off(node_ns, host)?;
        tx_csum_off(pod_ns, UPLINK)?;

        let log = server_log_path(pod_ns);
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                pod_ns,
                "python3",
                "-c",
                POD_SERVER_PY,
                &pod.name,
            ])
            .args([
                POD_HTTP_PORT.to_string(),
                POD_UDP_PORT.to_string(),
                POD_ECHO_PORT.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting pod server (python3)")?;
        self.servers.insert(pod.name.clone(), Server { child, log });
        Ok(())
    }

    /// Waits until the pod's server answers inside the pod, then fetches it
    /// once from its node, which also fills the node↔pod neighbour entries
    /// a datapath's FIB lookup will need.
    fn wait_ready(&mut self, pod: &Pod) -> Result<()> {
        let expected = pod.expected_reply();
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            match http_get(&pod.netns, pod.http_addr(), PROBE_TIMEOUT) {
                Ok(body) if body == expected => break,
                Ok(body) => bail!("pod {} answered {body:?}, expected {expected:?}", pod.name),
                Err(e) => {
                    let server = self
                        .servers
                        .get_mut(&pod.name)
                        .context("pod server missing")?;
                    if let Some(status) = server.child.try_wait()? {
                        bail!(
                            "pod {} server exited ({status}): {}",
                            pod.name,
                            server.log_tail()
                        );
                    }
                    if Instant::now() >= deadline {
                        return Err(e.context(format!("pod {} server not ready", pod.name)));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let node_ns = &self.node(&pod.node).netns;
        let body = http_get(node_ns, pod.http_addr(), PROBE_TIMEOUT)
            .with_context(|| format!("pod {} not reachable from its node", pod.name))?;
        ensure!(
            body == expected,
            "pod {} answered {body:?} from its node",
            pod.name
        );
        Ok(())
    }

    /// Real kind nodes talk to each other (and get talked to) all the time,
    /// so their ARP caches are always warm. A fresh namespace's are empty,
    /// and an XDP program forwarding via `bpf_fib_lookup` gets
    /// `BPF_FIB_LKUP_RET_NO_NEIGH` for the first packet and has to punt or
    /// drop it. One TCP round trip between every pair of kind-subnet hosts
    /// (to a closed port: the RST is the answer) resolves both directions,
    /// and doubles as a check that the L2 network works.
    fn warm_kind_neighbours(&self) -> Result<()> {
        let mut hosts: Vec<(&str, Ipv4Addr)> = self
            .nodes
            .iter()
            .map(|n| (n.netns.as_str(), n.addr))
            .collect();
        hosts.push((&self.client_netns, self.spec.client_addr));
        for &(from, _) in &hosts {
            for &(to_ns, to) in &hosts {
                if to_ns != from {
                    tcp_reachable(from, SocketAddrV4::new(to, WARM_PORT), PROBE_TIMEOUT)?;
                }
            }
        }
        Ok(())
    }

    /// kindnet names host veths `veth<random hex>`; derive the hex from the
    /// pod so names are stable within a run but distinct between pods.
    fn host_iface_name(&self, node: &Node, pod: &str, addr: Ipv4Addr) -> String {
        let taken: HashSet<&str> = self
            .pods
            .iter()
            .filter(|p| p.node == node.name)
            .map(|p| p.host_iface.as_str())
            .collect();
        let mut hash = fnv1a(format!("{}/{}/{pod}/{addr}", self.tag, node.name).as_bytes());
        loop {
            let name = format!("veth{hash:08x}");
            if !taken.contains(name.as_str()) {
                return name;
            }
            hash = hash.wrapping_add(1);
        }
    }

    fn discard_pod_netns(&mut self, pod: &Pod) {
        if let Some(server) = self.servers.remove(&pod.name) {
            server.stop();
        }
        // Deleting the host veth removes both ends at once; namespace
        // deletion alone would free them later from the kernel's cleanup
        // work, racing a re-added pod that reuses the name.
        let node_ns = self.node(&pod.node).netns.clone();
        let _ = ip_in(&node_ns, &["link", "del", &pod.host_iface]);
        if let Err(e) = delete_netns(&pod.netns) {
            eprintln!("xlb network {}: removing pod {}: {e:#}", self.tag, pod.name);
        }
        self.namespaces.retain(|n| *n != pod.netns);
    }

    /// Wires and starts a new pod on `node` after start-up (address: the
    /// next unused one in the node's pod CIDR) and waits until it answers.
    pub fn add_pod(&mut self, node: &str, name: &str) -> Result<Pod> {
        let pod = self.wire_pod(node, name)?;
        if let Err(e) = self.wait_ready(&pod) {
            self.remove_pod(name);
            return Err(e);
        }
        Ok(pod)
    }

    /// Stops the pod's server and deletes its namespace and veth.
    /// Panics if there is no such pod (a bug in the calling test).
    pub fn remove_pod(&mut self, name: &str) {
        let idx = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("network {}: no pod named {name}", self.tag));
        let pod = self.pods.remove(idx);
        self.discard_pod_netns(&pod);
    }

    /// Takes a node's uplink (`eth0`) down or brings it back up, from inside the
    /// node's namespace, as a pulled cable or a failed NIC would. Taking the link down
    /// makes the kernel drop the routes through it, so bringing it up also restores
    /// the kindnet routes to the other nodes' pod CIDRs.
    pub fn set_uplink(&self, node: &str, up: bool) -> Result<()> {
        let node = self.node(node).clone();
        ip_in(
            &node.netns,
            &["link", "set", UPLINK, if up { "up" } else { "down" }],
        )?;
        if up {
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                ip_in(
                    &node.netns,
                    &[
                        "route",
                        "replace",
                        &other.pod_cidr.to_string(),
                        "via",
                        &other.addr.to_string(),
                        "dev",
                        UPLINK,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// `<pid>x<counter>`: every namespace of this network starts with
    /// `xlb-<tag>-`.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    pub fn spec(&self) -> &TopologySpec {
        &self.spec
    }

    /// The node cgroups of this network, in creation order.
    pub fn cgroups(&self) -> &[PathBuf] {
        &self.cgroups
    }

    /// All namespaces of this network, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The namespace holding the bridge (docker's side of the kind network).
    pub fn kind_netns(&self) -> &str {
        &self.kind_netns
    }

    /// The outside client (`docker run --network kind curl`).
    pub fn client_netns(&self) -> &str {
        &self.client_netns
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        self.spec.client_addr
    }

    /// `(LB IP, node name)` as in the spec.
    pub fn lb_ips(&self) -> &[(Ipv4Addr, String)] {
        &self.spec.lb_ips
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Panics if there is no such node (a bug in the calling test).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("network {}: no node named {name}", self.tag))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Panics if there is no such pod (a bug in the calling test).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("network {}: no pod named {name}", self.tag))
    }

    pub fn pods_on(&self, node: &str) -> Vec<&Pod> {
        self.pods.iter().filter(|p| p.node == node).collect()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for (_, server) in self.servers.drain() {
            server.stop();
        }
        // Node processes first: they may hold the namespaces.
        for cgroup in self.cgroups.drain(..).rev() {
            if let Err(e) = delete_cgroup(&cgroup) {
                eprintln!(
                    "xlb network {}: teardown of cgroup {}: {e:#}",
                    self.tag,
                    cgroup.display()
                );
            }
        }
        // Reverse creation order: pods, nodes, client, then the bridge.
        for netns in self.namespaces.drain(..).rev() {
            if let Err(e) = delete_netns(&netns) {
                eprintln!("xlb network {}: teardown of {netns}: {e:#}", self.tag);
            }
        }
    }
}

/// Baseline sysctls for a harness namespace, set explicitly because a new
/// namespace copies IPv4 settings from the root namespace (whatever this
/// machine has) rather than using kernel defaults.
fn configure_sysctls(netns: &str, forwarding: bool) -> Result<()> {
    try_in_netns(netns, || -> Result<()> {
        let write = |key: &str, value: &str| -> Result<()> {
            let path = Path::new("/proc/sys").join(key);
            std::fs::write(&path, value).with_context(|| format!("writing {}", path.display()))
        };
        write("net/ipv4/ip_forward", if forwarding { "1" } else { "0" })?;
        // Nodes receive LB-IP traffic they have no route back for and
        // forward for addresses of other subnets; reverse-path filtering
        // would drop exactly the packets under test.
        for conf in ["all", "default"] {
            write(&format!("net/ipv4/conf/{conf}/rp_filter"), "0")?;
        }
        // No IPv6: router solicitations, MLD and DAD would otherwise show up
        // in packet counts and captures of tests that send only IPv4.
        if Path::new("/proc/sys/net/ipv6").exists() {
            for conf in ["all", "default"] {
                write(&format!("net/ipv6/conf/{conf}/disable_ipv6"), "1")?;
            }
        }
        Ok(())
    })?
}

/// Turns off TX checksum offload on a veth end.
///
/// With offload on, the kernel hands veth a packet whose L4 checksum is only
/// the pseudo-header seed (CHECKSUM_PARTIAL), expecting "hardware" to finish
/// it; veth never does, and the stack on the peer trusts the skb metadata
/// instead. An XDP program on the peer sees the raw frame, and a frame it
/// sends back with XDP_TX (or redirects) has lost that metadata, so it
/// leaves with a wrong checksum and the receiver drops it. With offload off
/// every frame carries a full checksum that XDP can update incrementally.
fn tx_csum_off(netns: &str, iface: &str) -> Result<()> {
    exec_ok(netns, &["ethtool", "-K", iface, "tx", "off"])
        .with_context(|| format!("disabling TX checksum offload on {iface} in {netns}"))
        .map(drop)
}

/// Bridge-side veth names: `k-` plus the node name without the cluster
/// prefix kind gives every node (`service-demo-worker2` → `k-worker2`),
/// cut to the interface-name limit; `k-n<index>` if that is empty or taken.
fn kind_iface_names(node_names: &[&str]) -> Vec<String> {
    let prefix_len = if node_names.len() >= 2 {
        let first = node_names[0];
        let common = node_names[1..].iter().fold(first.len(), |len, name| {
            first
                .bytes()
                .zip(name.bytes())
                .take(len)
                .take_while(|(a, b)| a == b)
                .count()
        });
        // Only cut at a '-' so `worker` and `worker2` keep their full names.
        first[..common].rfind('-').map_or(0, |i| i + 1)
    } else {
        0
    };
    let mut used: HashSet<String> = HashSet::from([CLIENT_KIND_IFACE.to_owned()]);
    let mut names = Vec::new();
    for (i, name) in node_names.iter().enumerate() {
        let short: String = name[prefix_len..].chars().take(MAX_IFNAME - 2).collect();
        let mut candidate = format!("k-{short}");
        let mut n = i;
        while short.is_empty() || used.contains(&candidate) {
            candidate = format!("k-n{n}");
            if !used.contains(&candidate) {
                break;
            }
            n += node_names.len();
        }
        used.insert(candidate.clone());
        names.push(candidate);
    }
    names
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{http_request, udp_request};
    use crate::netns::{exec_in, list_netns};
    use crate::privileged::{net_lock, require_privileged};
    use crate::topology::NodeSpec;

    const T: Duration = Duration::from_secs(3);

    fn have_ping() -> bool {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("ping").is_file()))
    }

    fn tagged_namespaces(tag: &str) -> Vec<String> {
        let prefix = format!("{NETNS_PREFIX}{tag}-");
        list_netns()
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    #[test]
    fn kind_iface_names_follow_roles() {
        let names = kind_iface_names(&[
            "service-demo-control-plane",
            "service-demo-worker",
            "service-demo-worker2",
        ]);
        assert_eq!(names, ["k-control-plane", "k-worker", "k-worker2"]);
        assert!(names.iter().all(|n| n.len() <= MAX_IFNAME));
        let names = kind_iface_names(&["a-very-long-node-name-number-one", "client", "b"]);
        assert_eq!(names, ["k-a-very-long-n", "k-n1", "k-b"]);
        assert_eq!(kind_iface_names(&["solo"]), ["k-solo"]);
    }

    #[test]
    fn seed_network_end_to_end() {
        if !require_privileged() {
            return;
        }
        let _lock = net_lock();
        let net = Network::up(&TopologySpec::seed()).unwrap();
        let tag = net.tag().to_owned();

        let mut listed = tagged_namespaces(&tag);
        listed.sort();
        let mut ours = net.namespaces().to_vec();
        ours.sort();
        assert_eq!(listed, ours);
        assert_eq!(net.pods().len(), 3);

        // Client → every node over the bridge.
        for node in net.nodes() {
            tcp_reachable(net.client_netns(), SocketAddrV4::new(node.addr, 9), T).unwrap();
            if have_ping() {
                exec_ok(
                    net.client_netns(),
                    &["ping", "-c1", "-W1", &node.addr.to_string()],
                )
                .unwrap();
            }
        }

        // The client has only its connected route and the LB /32s.
        let routes = exec_ok(net.client_netns(), &["ip", "-4", "route", "show"]).unwrap();
        assert!(
            routes.contains("172.18.255.200 via 172.18.0.3 dev eth0"),
            "{routes}"
        );
        assert!(!routes.contains("default"), "{routes}");
        let pod = &net.pods()[0];
        assert!(tcp_reachable(net.client_netns(), pod.http_addr(), T).is_err());

        let control_plane = net.node("service-demo-control-plane");
        for pod in net.pods() {
            let node = net.node(&pod.node);
            assert!(node.pod_cidr.contains(pod.addr));
            assert_eq!(
                http_get(&node.netns, pod.http_addr(), T).unwrap(),
                pod.expected_reply()
            );
            let reply = udp_request(&node.netns, pod.udp_addr(), b"ping", T).unwrap();
            assert_eq!(reply, pod.expected_reply().as_bytes());
            // Across nodes via the kindnet routes, without any NAT: the pod
            // sees the other node's kind-subnet address.
            let resp = http_request(&control_plane.netns, pod.http_addr(), "/", T).unwrap();
            assert_eq!(resp.body, pod.expected_reply());
            let seen = resp.header("X-Client").unwrap();
            assert!(
                seen.starts_with(&format!("{}:", control_plane.addr)),
                "{seen}"
            );
        }
        let worker = net.node("service-demo-worker");
        assert_eq!(net.pods_on(&worker.name).len(), 2);
        assert_eq!(worker.pod_gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(
            net.pods_on(&worker.name)[0].addr,
            Ipv4Addr::new(10, 244, 1, 2)
        );

        // Sysctls and offloads really are per namespace.
        let cat = |ns: &str, key: &str| exec_ok(ns, &["cat", key]).unwrap().trim().to_owned();
        assert_eq!(cat(&worker.netns, "/proc/sys/net/ipv4/ip_forward"), "1");
        assert_eq!(
            cat(&worker.netns, "/proc/sys/net/ipv4/conf/all/rp_filter"),
            "0"
        );
        assert_eq!(
            cat(net.client_netns(), "/proc/sys/net/ipv4/ip_forward"),
            "0"
        );
        for (ns, iface) in [
            (net.client_netns(), UPLINK),
            (worker.netns.as_str(), UPLINK),
            (
                worker.netns.as_str(),
                net.pods_on(&worker.name)[0].host_iface.as_str(),
            ),
            (net.kind_netns(), worker.kind_side_iface.as_str()),
        ] {
            let features = exec_ok(ns, &["ethtool", "-k", iface]).unwrap();
            assert!(
                features.contains("tx-checksumming: off"),
                "{iface}: {features}"
            );
        }

        // Neighbours between nodes are already resolved.
        let neigh = exec_ok(&worker.netns, &["ip", "neigh", "show", "dev", UPLINK]).unwrap();
        assert!(neigh.contains(&control_plane.addr.to_string()), "{neigh}");

        drop(net);
        assert_eq!(tagged_namespaces(&tag), Vec::<String>::new());
    }

    #[test]
    fn pods_added_and_removed_after_start() {
        if !require_privileged() {
            return;
        }
        let _lock = net_lock();
        let mut net = Network::up(&TopologySpec::seed()).unwrap();
        let late = net.add_pod("service-demo-worker2", "nginx-late").unwrap();
        assert_eq!(late.addr, Ipv4Addr::new(10, 244, 2, 3));
        assert_eq!(net.pod("nginx-late"), &late);
        let worker2 = net.node("service-demo-worker2").netns.clone();
        let cp = net.node("service-demo-control-plane").netns.clone();
        assert_eq!(
            http_get(&worker2, late.http_addr(), T).unwrap(),
            "nginx-late\n"
        );
        assert_eq!(http_get(&cp, late.http_addr(), T).unwrap(), "nginx-late\n");

        // Removing one pod must not break its neighbours, which share the
        // gateway address: make the survivor re-ARP for it to prove it.
        let worker_pods: Vec<Pod> = net
            .pods_on("service-demo-worker")
            .into_iter()
            .cloned()
            .collect();
        let worker = net.node("service-demo-worker").netns.clone();
        net.remove_pod(&worker_pods[0].name);
        assert!(net.pods().iter().all(|p| p.name != worker_pods[0].name));
        let gone = exec_in(&worker, &["ip", "link", "show", &worker_pods[0].host_iface]).unwrap();
        assert!(!gone.status.success());
        exec_ok(&worker_pods[1].netns, &["ip", "neigh", "flush", "all"]).unwrap();
        assert_eq!(
            http_get(&worker, worker_pods[1].http_addr(), T).unwrap(),
            worker_pods[1].expected_reply()
        );

        // A re-added name gets a fresh address and answers.
        let again = net
            .add_pod("service-demo-worker", &worker_pods[0].name)
            .unwrap();
        assert_eq!(again.addr, Ipv4Addr::new(10, 244, 1, 4));
        assert_eq!(
            http_get(&cp, again.http_addr(), T).unwrap(),
            again.expected_reply()
        );

        assert!(net.add_pod("service-demo-worker", "nginx-late").is_err());
        assert!(net.add_pod("no-such-node", "x").is_err());
        let tag = net.tag().to_owned();
        drop(net);
        assert_eq!(tagged_namespaces(&tag), Vec::<String>::new());
    }

    #[test]
    fn custom_topology() {
        if !require_privileged() {
            return;
        }
        let _lock = net_lock();
        let spec = TopologySpec {
            kind_subnet: "192.168.77.0/24".parse().unwrap(),
            nodes: vec![
                NodeSpec {
                    name: "alpha".into(),
                    addr: Ipv4Addr::new(192, 168, 77, 10),
                    pod_cidr: "10.99.0.0/28".parse().unwrap(),
                    pods: vec!["web-a".into()],
                },
                NodeSpec {
                    name: "beta".into(),
                    addr: Ipv4Addr::new(192, 168, 77, 11),
                    pod_cidr: "10.99.1.0/28".parse().unwrap(),
                    pods: vec![],
                },
            ],
            client_addr: Ipv4Addr::new(192, 168, 77, 200),
            lb_ips: vec![
                (Ipv4Addr::new(10, 200, 0, 1), "alpha".into()),
                (Ipv4Addr::new(10, 200, 0, 2), "beta".into()),
            ],
        };
        let net = Network::up(&spec).unwrap();
        assert_eq!(net.node("alpha").kind_side_iface, "k-alpha");
        let pod = net.pod("web-a");
        assert_eq!(pod.addr, Ipv4Addr::new(10, 99, 0, 2));
        assert_eq!(
            http_get(&net.node("beta").netns, pod.http_addr(), T).unwrap(),
            "web-a\n"
        );
        let routes = exec_ok(net.client_netns(), &["ip", "-4", "route", "show"]).unwrap();
        assert!(routes.contains("10.200.0.2 via 192.168.77.11"), "{routes}");
    }

    /// Retries `f` until it succeeds or `T` has passed.
    fn eventually<R>(mut f: impl FnMut() -> Result<R>) -> R {
        let deadline = Instant::now() + T;
        loop {
            match f() {
                Ok(r) => return r,
                Err(e) if Instant::now() >= deadline => panic!("{e:#}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    #[test]
    fn node_cgroups_and_node_clients() {
        use std::os::unix::fs::MetadataExt;

        use crate::cgroup::{cgroup_pids, cgroup2_mount, list_cgroups};
        use crate::client::{node_command, node_http_get, node_http_request, node_udp_request};

        if !require_privileged() {
            return;
        }
        let _lock = net_lock();
        let net = Network::up(&TopologySpec::seed()).unwrap();
        let mount = cgroup2_mount().unwrap();
        let listed = list_cgroups().unwrap();
        for node in net.nodes() {
            assert_eq!(node.cgroup, mount.join(&node.netns));
            assert!(node.cgroup.join("cgroup.procs").is_file());
            assert!(listed.contains(&node.cgroup), "{listed:?}");
        }
        assert_eq!(net.cgroups().len(), net.nodes().len());

        // A node process reaches pods directly (no agent involved): on its own node over
        // the pod veth, on another node over the kindnet route.
        let worker = net.node("service-demo-worker").clone();
        let cp = net.node("service-demo-control-plane").clone();
        for pod in net.pods() {
            for node in [net.node(&pod.node), &cp] {
                let ip = pod.addr.to_string();
                assert_eq!(
                    node_http_get(node, &ip, POD_HTTP_PORT, T).unwrap(),
                    pod.expected_reply()
                );
                let r = node_http_request(node, &ip, POD_HTTP_PORT, "/x", T).unwrap();
                assert_eq!(r.response.header("X-Pod-Name"), Some(pod.name.as_str()));
                assert_eq!(r.peer, pod.http_addr());
                // Source: the pod gateway towards its own pods, the uplink otherwise.
                let src = if node.name == pod.node {
                    node.pod_gateway()
                } else {
                    node.addr
                };
                assert_eq!(*r.local.ip(), src);
                let reply = node_udp_request(node, &ip, POD_UDP_PORT, b"\x00ping\n", T).unwrap();
                assert_eq!(reply.payload, pod.expected_reply().as_bytes());
                assert_eq!(reply.from, pod.udp_addr());
                assert_ne!(reply.local.port(), 0);
            }
        }
        // Errors are reported, with the client's message.
        let err = node_http_get(&worker, "127.0.0.1", 1, T).unwrap_err();
        assert!(format!("{err:#}").contains("ConnectionRefused"), "{err:#}");
        let err = node_udp_request(&worker, "127.0.0.1", 1, b"x", Duration::from_millis(300))
            .unwrap_err();
        assert!(format!("{err:#}").contains("timed out"), "{err:#}");

        // `localhost` on the node itself, as `docker exec <node> curl http://localhost:..`,
        // against a server that is itself a node process.
        let mut server = node_command(
            &worker,
            "python3",
            ["-c", POD_SERVER_PY, "node-local", "8080", "5354", "7001"],
        )
        .unwrap()
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
        assert_eq!(
            eventually(|| node_http_get(&worker, "localhost", 8080, T)),
            "node-local\n"
        );
        let reply = node_udp_request(&worker, "localhost", 5354, b"hi", T).unwrap();
        assert_eq!(reply.from, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 5354));
        assert!(cgroup_pids(&worker.cgroup).unwrap().contains(&server.id()));
        assert!(cgroup_pids(&cp.cgroup).unwrap().is_empty());
        // ... and only in the worker's namespace.
        assert!(node_http_get(&cp, "localhost", 8080, T).is_err());

        // The child really is in the node's cgroup and network namespace.
        let out = node_command(
            &worker,
            "sh",
            ["-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net"],
        )
        .unwrap()
        .output()
        .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let rel = worker.cgroup.strip_prefix(&mount).unwrap();
        assert!(
            text.lines().any(|l| l == format!("0::/{}", rel.display())),
            "{text}"
        );
        let ino = std::fs::metadata(Path::new("/run/netns").join(&worker.netns))
            .unwrap()
            .ino();
        assert!(text.contains(&format!("net:[{ino}]")), "{text}");

        // Teardown kills node processes and removes the cgroups with the namespaces.
        let tag = net.tag().to_owned();
        let cgroups = net.cgroups().to_vec();
        drop(net);
        assert!(!server.wait().unwrap().success());
        for cgroup in &cgroups {
            assert!(!cgroup.exists(), "{}", cgroup.display());
        }
        assert_eq!(tagged_namespaces(&tag), Vec::<String>::new());
    }

    #[test]
    fn sweeps_cgroups_of_dead_harnesses() {
        use std::os::unix::process::CommandExt;

        use crate::cgroup::{CgroupJoin, cgroup_pids, create_cgroup};
        use crate::netns::sweep_stale_cgroups;

        if !require_privileged() {
            return;
        }
        let _lock = net_lock();
        let mut gone = Command::new("true").spawn().unwrap();
        let dead_pid = gone.id();
        gone.wait().unwrap();
        let stale = create_cgroup(&format!("{NETNS_PREFIX}{dead_pid}x0-node-stale")).unwrap();
        let join = CgroupJoin::open(&stale).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        // SAFETY: join_self only writes to an already open descriptor.
        unsafe {
            cmd.pre_exec(move || join.join_self());
        }
        let mut orphan = cmd.spawn().unwrap();
        assert_eq!(cgroup_pids(&stale).unwrap(), vec![orphan.id()]);
        let swept = sweep_stale_cgroups().unwrap();
        assert!(swept.contains(&stale), "{swept:?}");
        assert!(!stale.exists());
        assert!(!orphan.wait().unwrap().success());
    }

    #[test]
    fn sweeps_namespaces_of_dead_harnesses() {
        if !require_privileged() {
            return;
        }
        let _lock = net_lock();
        // A pid that just exited stands in for a harness that was killed.
        let mut gone = Command::new("true").spawn().unwrap();
        let dead_pid = gone.id();
        gone.wait().unwrap();
        let stale = format!("{NETNS_PREFIX}{dead_pid}x0-kind");
        create_netns(&stale).unwrap();
        let mut orphan = Command::new("ip")
            .args(["netns", "exec", &stale, "sleep", "60"])
            .spawn()
            .unwrap();
        // Wait until `ip netns exec` has entered the namespace.
        let deadline = Instant::now() + T;
        while crate::netns::run("ip", &["netns", "pids", &stale])
            .unwrap()
            .trim()
            .is_empty()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let swept = sweep_stale_namespaces().unwrap();
        assert!(swept.contains(&stale), "{swept:?}");
        assert!(!list_netns().unwrap().contains(&stale));
        let status = orphan.wait().unwrap();
        assert!(!status.success());
    }
}
