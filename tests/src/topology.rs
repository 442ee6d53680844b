//! What network to build: a declarative description of a kind-like cluster.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use anyhow::{Result, bail, ensure};

use crate::ipnet::Ipv4Net;

/// A kind cluster's shape: the docker-style L2 network the nodes share, the
/// nodes with their pod CIDRs and pods, an outside client, and the
/// LoadBalancer IPs and which node each is delivered to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologySpec {
    /// The shared L2 subnet (docker's `kind` network). Node and client
    /// addresses are assigned on it with this prefix length.
    pub kind_subnet: Ipv4Net,
    pub nodes: Vec<NodeSpec>,
    /// The outside client's address on `kind_subnet`.
    pub client_addr: Ipv4Addr,
    /// `(LB IP, name of the node that receives it)`: the client gets a /32
    /// route to each IP via that node, as MetalLB L2 or a cloud LB would
    /// deliver it.
    pub lb_ips: Vec<(Ipv4Addr, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Kubernetes node name, e.g. `service-demo-worker`.
    pub name: String,
    /// Address on the kind subnet.
    pub addr: Ipv4Addr,
    /// The node's pod CIDR; its first address is the pods' gateway and pods
    /// get addresses from the second one up.
    pub pod_cidr: Ipv4Net,
    /// Pods started with the network, in order.
    pub pods: Vec<String>,
}

impl TopologySpec {
    /// The seed article's cluster: kind cluster `service-demo` with a control
    /// plane and two workers on 172.18.0.0/16, kindnet pod CIDRs
    /// 10.244.{0,1,2}.0/24, the three pods of the nginx ReplicaSet on the
    /// workers (two on `service-demo-worker`, one on `service-demo-worker2`),
    /// a `curl` container at 172.18.0.100 and one LoadBalancer IP,
    /// 172.18.255.200, delivered to `service-demo-worker`.
    pub fn seed() -> Self {
        let node = |name: &str, addr: [u8; 4], pod_net: u8, pods: &[&str]| NodeSpec {
            name: name.to_owned(),
            addr: Ipv4Addr::from(addr),
            pod_cidr: Ipv4Net::new(Ipv4Addr::new(10, 244, pod_net, 0), 24),
            pods: pods.iter().map(|p| (*p).to_owned()).collect(),
        };
        Self {
            kind_subnet: Ipv4Net::new(Ipv4Addr::new(172, 18, 0, 0), 16),
            nodes: vec![
                node("service-demo-control-plane", [172, 18, 0, 2], 0, &[]),
                node(
                    "service-demo-worker",
                    [172, 18, 0, 3],
                    1,
                    &["nginx-replicaset-4kq7x", "nginx-replicaset-9xjtm"],
                ),
                node(
                    "service-demo-worker2",
                    [172, 18, 0, 4],
                    2,
                    &["nginx-replicaset-r2d8c"],
                ),
            ],
            client_addr: Ipv4Addr::new(172, 18, 0, 100),
            lb_ips: vec![(
                Ipv4Addr::new(172, 18, 255, 200),
                "service-demo-worker".to_owned(),
            )],
        }
    }

    /// The seed's cluster with MetalLB in L2 mode instead of static routes: no
    /// `lb_ips`, so the client holds only its on-link route for the kind subnet and
    /// reaches a LoadBalancer address of the seed's pool (172.18.255.200-250, inside
    /// 172.18.0.0/16) by ARP on the bridge, answered by whichever node announces it.
    pub fn seed_l2() -> Self {
        Self {
            lb_ips: Vec::new(),
            ..Self::seed()
        }
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Checks everything [`crate::Network::up`] relies on, so a bad spec
    /// fails before any namespace exists.
    pub fn validate(&self) -> Result<()> {
        let subnet = self.kind_subnet;
        ensure!(
            (1..=30).contains(&subnet.prefix),
            "kind subnet {subnet}: prefix must be 1..=30"
        );
        ensure!(!self.nodes.is_empty(), "topology has no nodes");
        let mut addrs = HashSet::new();
        for (what, addr) in self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.addr))
            .chain([("client", self.client_addr)])
        {
            ensure!(
                subnet.is_host_addr(addr),
                "{what}: {addr} is not a host address of kind subnet {subnet}"
            );
            ensure!(addrs.insert(addr), "{what}: address {addr} used twice");
        }
        let mut names = HashSet::new();
        let mut pods = HashSet::new();
        for (i, node) in self.nodes.iter().enumerate() {
            check_name("node", &node.name)?;
            ensure!(names.insert(&node.name), "node {} listed twice", node.name);
            ensure!(
                node.pod_cidr.prefix <= 30,
                "node {}: pod CIDR {} too small for a gateway and pods",
                node.name,
                node.pod_cidr
            );
            ensure!(
                !node.pod_cidr.overlaps(&subnet),
                "node {}: pod CIDR {} overlaps the kind subnet",
                node.name,
                node.pod_cidr
            );
            for other in &self.nodes[..i] {
                ensure!(
                    !node.pod_cidr.overlaps(&other.pod_cidr),
                    "pod CIDRs of {} and {} overlap",
                    node.name,
                    other.name
                );
            }
            for pod in &node.pods {
                check_name("pod", pod)?;
                ensure!(pods.insert(pod), "pod {pod} listed twice");
            }
        }
        for (ip, node) in &self.lb_ips {
            ensure!(self.node(node).is_some(), "LB IP {ip}: unknown node {node}");
            ensure!(
                !addrs.contains(ip),
                "LB IP {ip} is also a node/client address"
            );
        }
        Ok(())
    }
}

/// Names end up in namespace names (`/run/netns/...`) and command lines, so
/// keep them to the Kubernetes name alphabet.
pub(crate) fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        bail!("{what} name {name:?}: use 1-200 characters of [A-Za-z0-9._-]");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_is_valid_and_shaped_like_the_article() {
        let spec = TopologySpec::seed();
        spec.validate().unwrap();
        assert_eq!(spec.nodes.len(), 3);
        assert_eq!(spec.nodes.iter().map(|n| n.pods.len()).sum::<usize>(), 3);
        assert!(
            spec.node("service-demo-control-plane")
                .unwrap()
                .pods
                .is_empty()
        );
    }

    #[test]
    fn seed_l2_has_no_lb_routes() {
        let spec = TopologySpec::seed_l2();
        spec.validate().unwrap();
        assert!(spec.lb_ips.is_empty());
        assert_eq!(spec.nodes, TopologySpec::seed().nodes);
    }

    #[test]
    fn rejects_bad_specs() {
        let mut spec = TopologySpec::seed();
        spec.client_addr = Ipv4Addr::new(10, 0, 0, 1);
        assert!(spec.validate().is_err());

        let mut spec = TopologySpec::seed();
        spec.nodes[1].pod_cidr = spec.nodes[2].pod_cidr;
        assert!(spec.validate().is_err());

        let mut spec = TopologySpec::seed();
        spec.lb_ips[0].1 = "nope".into();
        assert!(spec.validate().is_err());

        let mut spec = TopologySpec::seed();
        let dup = spec.nodes[1].pods[0].clone();
        spec.nodes[2].pods.push(dup);
        assert!(spec.validate().is_err());

        let mut spec = TopologySpec::seed();
        spec.nodes[0].name = "a/b".into();
        assert!(spec.validate().is_err());
    }
}
