//! Services and EndpointSlices to what the datapath needs: per service port, the addresses
//! it answers on and the ready backends behind it.
//!
//! Follows kube-proxy's reading of the API: ExternalName and headless services are not
//! proxied, services labelled with `service.kubernetes.io/service-proxy-name` belong to
//! another proxy, endpoints are matched to service ports by port name and protocol, and an
//! endpoint without a `ready` condition counts as ready.
//!
//! Output is sorted throughout so it does not depend on the order of the input objects.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::jiff::Timestamp;
pub use lb_common::ServiceType;

use crate::model::addresses::Cidr4;
use crate::model::lb_addresses::{self, LbAddress};
use crate::model::lbipam;
use crate::model::slice::Slice;
use crate::model::topology::{self, Candidate, Place};
use crate::source::yaml::{Objects, SERVICE_PROXY_NAME_LABEL};

/// The node the agent runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    /// Compared with `endpoints[].nodeName` to tell local backends from remote ones.
    pub node_name: String,
    /// Addresses NodePorts are served on.
    pub node_addrs: Vec<Ipv4Addr>,
    /// Source ports the datapath uses to SNAT flows to remote backends (`--snat-port-min`
    /// ..= `--snat-port-max`): replies to those flows come back to a node address on one of
    /// them, so no external address may be served there.
    pub snat_ports: RangeInclusive<u16>,
    /// NodePorts are also served on 127.0.0.1 to the node's own processes (kube-proxy's
    /// iptables mode does, unless `--nodeport-addresses` leaves out 127.0.0.0/8).
    pub localhost_node_ports: bool,
    /// `--service-cidr`: service address ranges besides the ServiceCIDR objects.
    pub service_cidrs: Vec<(Ipv4Addr, u8)>,
    /// The Node's `topology.kubernetes.io/zone` label; `translate` fills it from the Node
    /// object named `node_name`, when the source has it.
    pub zone: Option<String>,
    /// The uplink's name (L2Advertisement `interfaces`).
    pub uplink: String,
    /// LoadBalancer addresses this agent assigned before (its record, see
    /// `lb_addresses`), by Service (namespace, name).
    pub held_lb_addresses: BTreeMap<(String, String), Vec<Ipv4Addr>>,
}

impl Default for NodeContext {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            node_addrs: Vec::new(),
            snat_ports: lb_common::DEFAULT_SNAT_PORT_MIN..=lb_common::DEFAULT_SNAT_PORT_MAX,
            localhost_node_ports: true,
            service_cidrs: Vec::new(),
            zone: None,
            uplink: String::new(),
            held_lb_addresses: BTreeMap::new(),
        }
    }
}

/// The label kube-proxy reads a node's zone from.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IP protocol number.
    pub fn number(&self) -> u8 {
        match self {
            Proto::Tcp => lb_common::PROTO_TCP,
            Proto::Udp => lb_common::PROTO_UDP,
        }
    }

    /// Kubernetes spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    /// `protocol` as it appears in a Service or EndpointSlice port (unset means TCP); the
    /// error is the unsupported name.
    pub(crate) fn from_k8s(p: Option<&str>) -> Result<Proto, &str> {
        match p.unwrap_or("TCP") {
            "TCP" => Ok(Proto::Tcp),
            "UDP" => Ok(Proto::Udp),
            other => Err(other),
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which endpoints a group of frontends may use (kube-proxy's traffic policies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every ready endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on this node; none there means drop, not reject
    /// (`internalTrafficPolicy: Local` for the ClusterIP, `externalTrafficPolicy: Local`
    /// for NodePorts and external IPs).
    Local,
}

/// One port of one service (and scope): the unit that gets a svc_id and a Maglev table.
/// A service port whose internal and external traffic policies differ is two units.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcPortId {
    pub namespace: String,
    pub name: String,
    /// Empty for the unnamed port of a single-port service.
    pub port_name: String,
    pub proto: Proto,
    pub scope: Scope,
}

impl fmt::Display for SvcPortId {
    /// `ns/name:port_name/TCP`, or `ns/name/TCP` for an unnamed port; ` (local)` appended
    /// for the node-local scope.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.proto)?;
        if self.scope == Scope::Local {
            f.write_str(" (local)")?;
        }
        Ok(())
    }
}

/// Ordered by address and port first (field order), which is the order Maglev names
/// (`maglev::BackendName`, "addr:port") and backend lists are kept in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSpec {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The endpoint runs on this node (its `nodeName` is this node's; the name itself is
    /// not kept: every programmed backend of every port would carry a copy).
    pub local: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    /// `spec.externalIPs` entry.
    External,
    /// `status.loadBalancer.ingress[].ip`.
    LoadBalancer,
    /// A NodePort on 127.0.0.1, for the node's own processes (`curl localhost:<NodePort>`).
    Localhost,
}

impl FrontendKind {
    /// The `FE_*` flag the datapath keys its behaviour on.
    pub fn flag(&self) -> u32 {
        match self {
            FrontendKind::ClusterIp => lb_common::FE_CLUSTER_IP,
            FrontendKind::NodePort => lb_common::FE_NODEPORT,
            FrontendKind::External | FrontendKind::LoadBalancer => lb_common::FE_EXTERNAL,
            FrontendKind::Localhost => lb_common::FE_LOCALHOST,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendSpec {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub kind: FrontendKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcPort {
    pub id: SvcPortId,
    /// The Service's `port` (the ClusterIP and external addresses' port; not a nodePort).
    pub port: u16,
    pub svc_type: ServiceType,
    /// Sorted, unique by (addr, port); may be empty after a collision with another service.
    pub frontends: Vec<FrontendSpec>,
    /// Backends for new flows, sorted, unique by (addr, port). Empty means "reject" (or
    /// "drop" for the Local scope).
    pub backends: Vec<BackendSpec>,
    /// Endpoints still listed but not used for new flows (terminating, not ready): their
    /// established flows keep working.
    pub draining: Vec<BackendSpec>,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges`, applied to the LoadBalancer ingress frontends.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// With no backend for new flows: drop them (true) or reject them. kube-proxy drops
    /// only under a Local policy while the service has endpoints on other nodes; with no
    /// endpoint anywhere it rejects.
    pub drop_if_empty: bool,
    /// Frontends of another port of the same service (its Local scope, for
    /// `externalTrafficPolicy: Local`) whose traffic from inside the cluster — pods and
    /// the node's own processes — this port serves: kube-proxy restricts only traffic from
    /// outside to local endpoints, and short-circuits pods' traffic (keeping their address).
    pub inside_frontends: Vec<FrontendSpec>,
}

/// A `healthCheckNodePort` to serve (LoadBalancer with `externalTrafficPolicy: Local`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub node_port: u16,
    /// Distinct local endpoints used for new flows on this node.
    pub local_endpoints: usize,
}

/// Something a user must be told on the Service itself (a Kubernetes Event with the kube
/// source), besides the log line.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceEvent {
    pub namespace: String,
    pub name: String,
    pub reason: String,
    pub message: String,
}

/// Event reasons of the translation's warnings ([`WarningKind::event_reason`]).
pub const UNSUPPORTED_REASON: &str = "Unsupported";
pub const COLLISION_REASON: &str = "FrontendCollision";

/// What a [`Warning`] is about; decides whether it is also posted on the Service, and with
/// which reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WarningKind {
    /// Labelled for another proxy (`service.kubernetes.io/service-proxy-name`): left to it.
    OtherProxy,
    /// A feature xlb does not serve (IPv6 addresses, SCTP).
    Unsupported,
    /// A value that cannot be used (not an IP, not a CIDR, an IPv6 source range, an invalid
    /// port number), or a port without a nodePort or anything to serve on: skipped.
    Ignored,
    /// A frontend another service port has (see `drop_colliding_frontends`).
    FrontendCollision,
    /// An external address on a node address with a port of the SNAT range: refused.
    FrontendInSnatRange,
    /// No LoadBalancer address could be assigned from the pools.
    LbAddress,
}

/// Event reason for [`WarningKind::LbAddress`] (MetalLB's).
pub const ALLOCATION_FAILED_REASON: &str = "AllocationFailed";

impl WarningKind {
    /// The reason of the Event posted on the Service; None: the warning is only logged.
    pub fn event_reason(self) -> Option<&'static str> {
        match self {
            WarningKind::Unsupported => Some(UNSUPPORTED_REASON),
            WarningKind::FrontendCollision | WarningKind::FrontendInSnatRange => {
                Some(COLLISION_REASON)
            }
            WarningKind::LbAddress => Some(ALLOCATION_FAILED_REASON),
            WarningKind::OtherProxy | WarningKind::Ignored => None,
        }
    }
}

/// What a [`Warning`] concerns: a Service, or one of its service ports.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Service { namespace: String, name: String },
    Port(SvcPortId),
}

impl Subject {
    pub fn namespace(&self) -> &str {
        match self {
            Subject::Service { namespace, .. } => namespace,
            Subject::Port(id) => &id.namespace,
        }
    }

    /// The Service's name.
    pub fn name(&self) -> &str {
        match self {
            Subject::Service { name, .. } => name,
            Subject::Port(id) => &id.name,
        }
    }
}

impl fmt::Display for Subject {
    /// `ns/name`, or the port's id.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Service { namespace, name } => write!(f, "{namespace}/{name}"),
            Subject::Port(id) => id.fmt(f),
        }
    }
}

/// Something the translation skipped or changed, and why. Logged as its Display,
/// `<subject>: <message>`; a kind with an [`WarningKind::event_reason`] is also an Event on
/// the Service ([`Warning::event`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Warning {
    pub kind: WarningKind,
    pub subject: Subject,
    /// What happened, without the subject (the Event's message).
    pub message: String,
}

impl Warning {
    /// The Event this warning asks for: on its Service, with its kind's reason.
    pub fn event(&self) -> Option<ServiceEvent> {
        Some(ServiceEvent {
            namespace: self.subject.namespace().to_string(),
            name: self.subject.name().to_string(),
            reason: self.kind.event_reason()?.into(),
            message: self.message.clone(),
        })
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// Tests compare warnings with their text.
#[cfg(test)]
impl PartialEq<&str> for Warning {
    fn eq(&self, other: &&str) -> bool {
        let text = self.to_string();
        text == *other
    }
}

/// A Service's `spec.type` as the model reads it: one of the types the datapath serves, or
/// ExternalName, which is only listed (a DNS alias: nothing to program).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SvcType {
    Proxied(ServiceType),
    ExternalName,
}

impl SvcType {
    /// `spec.type`; unset means ClusterIP. The API server and the YAML source accept no
    /// other value; one would be served as ClusterIP, as before.
    fn from_k8s(t: Option<&str>) -> SvcType {
        match t.unwrap_or("ClusterIP") {
            "ExternalName" => SvcType::ExternalName,
            "NodePort" => SvcType::Proxied(ServiceType::NodePort),
            "LoadBalancer" => SvcType::Proxied(ServiceType::LoadBalancer),
            _ => SvcType::Proxied(ServiceType::ClusterIP),
        }
    }

    /// As `kubectl get svc` prints it in the TYPE column.
    pub fn as_str(&self) -> &'static str {
        match self {
            SvcType::Proxied(t) => t.as_str(),
            SvcType::ExternalName => "ExternalName",
        }
    }
}

impl fmt::Display for SvcType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of `kubectl get svc` (columns as kubectl prints them, without truncation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRow {
    pub namespace: String,
    pub name: String,
    pub svc_type: SvcType,
    pub cluster_ip: String,
    pub external_ip: String,
    pub ports: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Sorted by id. Shared with the [`crate::model::incremental::Translator`]'s
    /// per-Service parts: a full translation hands each port over once, not a copy of it.
    pub ports: Vec<Arc<SvcPort>>,
    /// Every service, sorted by (namespace, name), including those not programmed.
    pub rows: Vec<ServiceRow>,
    /// What was skipped and why, each naming its service.
    pub warnings: Vec<Warning>,
    /// Health-check node ports to serve, sorted by port.
    pub health_checks: Vec<HealthCheck>,
    /// The Events the warnings ask for ([`Warning::event`]), in the same order.
    pub events: Vec<ServiceEvent>,
    /// Every service as (namespace, name), oldest first (see [`age_key`]): the order in
    /// which contested frontends and, in the programmer, capacity are handed out.
    pub service_order: Vec<(String, String)>,
    /// Service address ranges (`--service-cidr` and the IPv4 ServiceCIDR objects), sorted,
    /// host bits cleared: an address inside them that no Service holds is dropped.
    pub service_cidrs: Vec<(Ipv4Addr, u8)>,
    /// LoadBalancer addresses assigned from the pools (every node computes the same).
    pub lb_addresses: Vec<LbAddress>,
    /// Of those, the ones this node may announce (ARP): its L2Advertisement selects this
    /// node, and under `externalTrafficPolicy: Local` the node has a ready local endpoint.
    pub announce_eligible: BTreeSet<Ipv4Addr>,
    /// Pool and advertisement settings xlb does not honour (logged).
    pub lb_notes: Vec<String>,
}

/// Computes the desired datapath state. Services are expected to be unique by
/// (namespace, name), as [`crate::source::yaml::parse_objects`] guarantees.
pub fn translate(objs: &Objects, node: &NodeContext) -> Desired {
    let slices = index_slices(&objs.slices);
    let mut services: Vec<&Service> = objs.services.iter().map(|s| &**s).collect();
    services.sort_by(|a, b| (namespace(a), name(a)).cmp(&(namespace(b), name(b))));
    let this_node = objs
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node.node_name.as_str()));
    let node = effective_node(&objs.nodes, node);

    let assignment = lb_addresses::assign(objs, &node.held_lb_addresses);
    let mut out = Desired {
        service_cidrs: service_cidrs(objs, &node),
        lb_notes: assignment.warnings.clone(),
        ..Desired::default()
    };
    for svc in &services {
        out.rows.push(row(svc));
        let owned = slices
            .get(&(namespace(svc), name(svc)))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let granted: Vec<Ipv4Addr> = match assignment.get(namespace(svc), name(svc)) {
            Some(lbipam::Outcome::Granted(g)) => g.addresses.clone(),
            _ => vec![],
        };
        program_service(svc, owned, &node, &granted, &mut out);
    }
    services.sort_by_cached_key(|s| age_key(s));
    out.service_order = services
        .iter()
        .map(|s| (namespace(s).to_string(), name(s).to_string()))
        .collect();
    let created: Vec<Option<Timestamp>> = services.iter().map(|s| created(s)).collect();
    out.ports.sort_by(|a, b| a.id.cmp(&b.id));
    out.health_checks.sort_by_key(|h| h.node_port);
    drop_colliding_frontends(&mut out, &node, &created);
    let labels = this_node
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    out.lb_addresses = lb_addresses::addresses(&assignment, &objs.services, &labels, &node.uplink);
    out.announce_eligible = announce_eligible(&out);
    for ((ns, name), why) in lb_addresses::refusals(&assignment) {
        out.warnings.push(Warning {
            kind: WarningKind::LbAddress,
            subject: Subject::Service {
                namespace: ns.clone(),
                name: name.clone(),
            },
            message: format!("no LoadBalancer address: {why}"),
        });
    }
    out.events = out.warnings.iter().filter_map(Warning::event).collect();
    out
}

/// `node` as the translation uses it: addresses sorted and unique, the zone from this
/// node's Node object (its `topology.kubernetes.io/zone` label) when there is one.
pub fn effective_node(
    nodes: &[k8s_openapi::api::core::v1::Node],
    node: &NodeContext,
) -> NodeContext {
    let mut node_addrs = node.node_addrs.clone();
    node_addrs.sort();
    node_addrs.dedup();
    let zone = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node.node_name.as_str()))
        .and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(ZONE_LABEL))
        .filter(|z| !z.is_empty())
        .cloned()
        .or_else(|| node.zone.clone());
    NodeContext {
        node_addrs,
        zone,
        ..node.clone()
    }
}

/// One Service's part of a translation ([`translate`] restricted to it), without its
/// `kubectl get svc` line (nothing reads a row after a change; the Translator keeps one of
/// these per Service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceOutput {
    /// Its service ports, sorted by id.
    pub ports: Vec<Arc<SvcPort>>,
    pub warnings: Vec<Warning>,
    pub health_checks: Vec<HealthCheck>,
}

/// [`translate`] of one Service and its EndpointSlices (`slices` may hold others: only
/// those it owns are used), `node` as [`effective_node`] makes it. Equal to that Service's
/// part of the whole translation as long as no other Service claims one of its frontends
/// and no address pool assigns it a LoadBalancer address ([`crate::model::incremental`]
/// checks both).
pub fn translate_service(svc: &Service, slices: &[&Slice], node: &NodeContext) -> ServiceOutput {
    let key = (namespace(svc), name(svc));
    let owned: Vec<&Slice> = slices
        .iter()
        .copied()
        .filter(|s| !s.headless)
        .filter(|s| s.owner().is_some_and(|(ns, owner)| (ns, owner) == key))
        .collect();
    let mut out = Desired {
        service_order: vec![(key.0.to_string(), key.1.to_string())],
        ..Desired::default()
    };
    program_service(svc, &owned, node, &[], &mut out);
    out.ports.sort_by(|a, b| a.id.cmp(&b.id));
    out.health_checks.sort_by_key(|h| h.node_port);
    drop_colliding_frontends(&mut out, node, &[created(svc)]);
    ServiceOutput {
        ports: out.ports,
        warnings: out.warnings,
        health_checks: out.health_checks,
    }
}

/// (namespace, name) of a Service, the namespace defaulted as the translation does.
pub fn service_key(svc: &Service) -> (&str, &str) {
    (namespace(svc), name(svc))
}

/// The pool addresses this node may announce: L2-selected here, and under
/// externalTrafficPolicy Local only with a ready local endpoint (a local-scope port of the
/// Service with backends), as MetalLB announces such Services.
fn announce_eligible(d: &Desired) -> BTreeSet<Ipv4Addr> {
    // Services with a ready local endpoint, once (not a scan of every port per address).
    let local_ready: std::collections::HashSet<(&str, &str)> = d
        .ports
        .iter()
        .filter(|p| p.id.scope == Scope::Local && !p.backends.is_empty())
        .map(|p| (p.id.namespace.as_str(), p.id.name.as_str()))
        .collect();
    d.lb_addresses
        .iter()
        .filter(|a| a.l2_here)
        .filter(|a| !a.local_only || local_ready.contains(&(a.namespace.as_str(), a.name.as_str())))
        .map(|a| a.addr)
        .collect()
}

/// `--service-cidr` and the IPv4 `spec.cidrs` of the ServiceCIDR objects.
fn service_cidrs(objs: &Objects, node: &NodeContext) -> Vec<(Ipv4Addr, u8)> {
    let from_objects = objs
        .service_cidrs
        .iter()
        .flat_map(|c| c.spec.iter().flat_map(|s| s.cidrs.iter().flatten()))
        .filter_map(|c| c.parse::<Cidr4>().ok())
        .map(|c| c.network());
    let mut out: Vec<(Ipv4Addr, u8)> = node
        .service_cidrs
        .iter()
        .copied()
        .chain(from_objects)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Orders Services as the API server saw them arrive: by `metadata.creationTimestamp`,
/// then namespace and name (timestamps have one-second resolution). A Service without a
/// timestamp (written by hand in a file) sorts after every timestamped one: nothing says
/// it is older, and a real cluster's objects keep their standing against it.
pub fn age_key(svc: &Service) -> (bool, Option<Timestamp>, String, String) {
    let created = created(svc);
    (
        created.is_none(),
        created,
        namespace(svc).to_string(),
        name(svc).to_string(),
    )
}

fn created(svc: &Service) -> Option<Timestamp> {
    svc.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

fn namespace(svc: &Service) -> &str {
    svc.metadata
        .namespace
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

fn name(svc: &Service) -> &str {
    svc.metadata.name.as_deref().unwrap_or("")
}

fn svc_type(spec: &ServiceSpec) -> SvcType {
    SvcType::from_k8s(spec.type_.as_deref())
}

/// Slices by (namespace, owning service name).
fn index_slices(slices: &[Arc<Slice>]) -> BTreeMap<(&str, &str), Vec<&Slice>> {
    let mut by_svc: BTreeMap<_, Vec<_>> = BTreeMap::new();
    for s in slices.iter().map(|s| &**s).filter(|s| !s.headless) {
        if let Some(owner) = s.owner() {
            by_svc.entry(owner).or_default().push(s);
        }
    }
    by_svc
}

/// Objects labelled `service.kubernetes.io/headless` (the EndpointSlice controller marks the
/// slices of headless Services so) are left out, as kube-proxy's informers select them out.
fn is_headless_labelled(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.contains_key(HEADLESS_LABEL))
}

/// See [`is_headless_labelled`].
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

fn valid_port(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|&p| p != 0)
}

fn program_service(
    svc: &Service,
    slices: &[&Slice],
    node: &NodeContext,
    granted: &[Ipv4Addr],
    out: &mut Desired,
) {
    let (ns, name) = (namespace(svc), name(svc));
    let mut warn = |kind: WarningKind, message: String| {
        out.warnings.push(Warning {
            kind,
            subject: Subject::Service {
                namespace: ns.to_string(),
                name: name.to_string(),
            },
            message,
        })
    };

    if is_headless_labelled(&svc.metadata) {
        return; // as kube-proxy's informers, which never see it
    }
    if let Some(proxy) = svc
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL))
    {
        warn(
            WarningKind::OtherProxy,
            format!("labelled {SERVICE_PROXY_NAME_LABEL}={proxy}; left to that proxy"),
        );
        return;
    }
    let default_spec = ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);
    let SvcType::Proxied(ty) = svc_type(spec) else {
        return; // ExternalName: listed only
    };

    // Dual-stack services list both families in clusterIPs; the primary one may be IPv6.
    let primary = spec
        .cluster_ip
        .as_deref()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            spec.cluster_ips
                .as_ref()
                .and_then(|v| v.first())
                .map(String::as_str)
        })
        .unwrap_or("");
    if primary == "None" {
        return;
    }
    let cluster_ip = std::iter::once(primary)
        .chain(spec.cluster_ips.iter().flatten().map(String::as_str))
        .find_map(|s| s.parse::<Ipv4Addr>().ok());
    if !primary.is_empty() && cluster_ip.is_none() {
        warn(
            WarningKind::Unsupported,
            format!("ClusterIP {primary} is not IPv4; service skipped (xlb serves IPv4 only)"),
        );
        return;
    }

    let mut external: Vec<(Ipv4Addr, FrontendKind)> = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .filter(|_| ty == ServiceType::LoadBalancer);
    // `ipMode: Proxy`: the load balancer proxies (it does not keep the destination), so
    // kube-proxy does not program that address at all and in-cluster clients go out to it.
    let ingress_ips = ingress
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.clone())
        // Addresses from the pools serve at once, before (or without) a status.
        .chain(
            granted
                .iter()
                .filter(|_| ty == ServiceType::LoadBalancer)
                .map(|a| a.to_string()),
        )
        .map(|ip| (ip, FrontendKind::LoadBalancer));
    for (ip, kind) in spec
        .external_ips
        .iter()
        .flatten()
        .map(|ip| (ip.clone(), FrontendKind::External))
        .chain(ingress_ips)
    {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => external.push((a, kind)),
            Ok(IpAddr::V6(_)) => warn(
                WarningKind::Unsupported,
                format!("external address {ip} is IPv6; not served (xlb serves IPv4 only)"),
            ),
            Err(_) => warn(
                WarningKind::Ignored,
                format!("external address {ip:?} is not an IP; ignored"),
            ),
        }
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match parse_cidr(r) {
            Some(c) => source_ranges.push(c),
            None if r.contains(':') => warn(
                WarningKind::Ignored,
                format!("loadBalancerSourceRange {r} is IPv6; ignored"),
            ),
            None => warn(
                WarningKind::Ignored,
                format!("loadBalancerSourceRange {r:?} is not a CIDR; ignored"),
            ),
        }
    }

    let wants_node_ports = matches!(ty, ServiceType::NodePort | ServiceType::LoadBalancer);
    // An explicit opt-out is not worth a warning on every sync.
    let node_ports_disabled =
        ty == ServiceType::LoadBalancer && spec.allocate_load_balancer_node_ports == Some(false);

    let mut local_endpoints = std::collections::BTreeSet::new();
    for sp in spec.ports.iter().flatten() {
        let port_name = sp.name.clone().unwrap_or_default();
        let shown = if port_name.is_empty() {
            sp.port.to_string()
        } else {
            format!("{port_name} ({})", sp.port)
        };
        let proto = match Proto::from_k8s(sp.protocol.as_deref()) {
            Ok(p) => p,
            Err(p) => {
                warn(
                    WarningKind::Unsupported,
                    format!("port {shown}/{p} skipped: {p} is not supported"),
                );
                continue;
            }
        };
        let Some(port) = valid_port(sp.port) else {
            warn(
                WarningKind::Ignored,
                format!("port {shown} skipped: invalid port number"),
            );
            continue;
        };

        let mut frontends = Vec::new();
        if let Some(addr) = cluster_ip {
            frontends.push(FrontendSpec {
                addr,
                port,
                kind: FrontendKind::ClusterIp,
            });
        }
        if wants_node_ports {
            match sp.node_port.and_then(valid_port) {
                Some(np) => {
                    frontends.extend(node.node_addrs.iter().map(|&addr| FrontendSpec {
                        addr,
                        port: np,
                        kind: FrontendKind::NodePort,
                    }));
                    if node.localhost_node_ports {
                        frontends.push(FrontendSpec {
                            addr: Ipv4Addr::LOCALHOST,
                            port: np,
                            kind: FrontendKind::Localhost,
                        });
                    }
                }
                None if node_ports_disabled => {}
                None => warn(
                    WarningKind::Ignored,
                    format!("port {shown}/{proto} has no nodePort; not served as a NodePort"),
                ),
            }
        }
        frontends.extend(
            external
                .iter()
                .map(|&(addr, kind)| FrontendSpec { addr, port, kind }),
        );
        if frontends.is_empty() {
            warn(
                WarningKind::Ignored,
                format!(
                    "port {shown}/{proto} has no ClusterIP, NodePort or external address; nothing to serve"
                ),
            );
            continue;
        }
        // Same address twice (e.g. an externalIP equal to a node address): keep the most
        // specific kind, which sorts first.
        frontends.sort();
        frontends.dedup_by(|b, a| (a.addr, a.port) == (b.addr, b.port));

        let cands = candidates(slices, &port_name, proto, node);
        // Decided separately for each policy, as kube-proxy does (topology.rs).
        let chosen = topology::choose(
            &cands,
            Place {
                node: &node.node_name,
                zone: node.zone.as_deref(),
            },
        );
        let (all, local) = (&chosen.cluster, &chosen.local);
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        let external_local = wants_node_ports_or_external(ty, &external)
            && spec.external_traffic_policy.as_deref() == Some("Local");
        let (internal, external_fes): (Vec<_>, Vec<_>) = frontends
            .into_iter()
            .partition(|f| f.kind == FrontendKind::ClusterIp);
        // (scope, frontends, frontends it serves only for traffic from inside the cluster):
        // under externalTrafficPolicy Local the external frontends' in-cluster traffic
        // goes to all endpoints (the cluster scope), as kube-proxy short-circuits it.
        let inside = if external_local {
            external_fes.clone()
        } else {
            vec![]
        };
        let groups = match (internal_local, external_local) {
            (false, false) => vec![(Scope::Cluster, [internal, external_fes].concat(), vec![])],
            (true, true) => vec![
                (Scope::Local, [internal, external_fes].concat(), vec![]),
                (Scope::Cluster, vec![], inside),
            ],
            (false, true) => vec![
                (Scope::Cluster, internal, inside),
                (Scope::Local, external_fes, vec![]),
            ],
            (true, false) => vec![
                (Scope::Local, internal, vec![]),
                (Scope::Cluster, external_fes, vec![]),
            ],
        };
        for (scope, mut frontends, mut inside_frontends) in groups {
            if frontends.is_empty() && inside_frontends.is_empty() {
                continue;
            }
            frontends.sort();
            inside_frontends.sort();
            out.ports.push(Arc::new(SvcPort {
                id: SvcPortId {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                    port_name: port_name.clone(),
                    proto,
                    scope,
                },
                port,
                svc_type: ty,
                frontends,
                backends: if scope == Scope::Local {
                    local.0.clone()
                } else {
                    all.0.clone()
                },
                // Every endpoint still listed stays resolvable for established flows.
                draining: if scope == Scope::Local {
                    local.1.clone()
                } else {
                    all.1.clone()
                },
                affinity_timeout,
                source_ranges: source_ranges.clone(),
                drop_if_empty: scope == Scope::Local && chosen.has_any,
                inside_frontends,
            }));
        }
        if external_local {
            local_endpoints.extend(local.0.iter().map(|b| b.addr));
        }
    }
    // kube-proxy's health check server answers for LoadBalancer services with
    // externalTrafficPolicy Local, so cloud load balancers skip nodes without endpoints.
    if ty == ServiceType::LoadBalancer
        && spec.external_traffic_policy.as_deref() == Some("Local")
        && let Some(port) = spec.health_check_node_port.and_then(valid_port)
    {
        out.health_checks.push(HealthCheck {
            namespace: ns.to_string(),
            name: name.to_string(),
            node_port: port,
            local_endpoints: local_endpoints.len(),
        });
    }
}

/// sessionAffinityConfig.clientIP.timeoutSeconds default (3 hours), as in the API.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// "a.b.c.d/n" (IPv4 only).
fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, n) = s.trim().split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let len: u8 = n.parse().ok().filter(|&n| n <= 32)?;
    Some((addr, len))
}

/// `externalTrafficPolicy` applies to services with node ports or external addresses.
fn wants_node_ports_or_external(ty: ServiceType, external: &[(Ipv4Addr, FrontendKind)]) -> bool {
    matches!(ty, ServiceType::NodePort | ServiceType::LoadBalancer) || !external.is_empty()
}

fn candidates(
    slices: &[&Slice],
    port_name: &str,
    proto: Proto,
    node: &NodeContext,
) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for slice in slices {
        if !slice.ipv4 {
            continue;
        }
        // The slice's port carries the resolved targetPort for its endpoints, which is how a
        // named targetPort can map to different numbers in different pods.
        let target = slice
            .ports
            .iter()
            .find(|p| &*p.name == port_name && p.proto == Some(proto));
        // A slice port without a number means "all ports", which a port-translating proxy
        // cannot use.
        let Some(port) = target.and_then(|p| p.port).and_then(valid_port) else {
            continue;
        };
        for ep in slice.endpoints.iter() {
            // Addresses of one endpoint are fungible; kube-proxy uses the first too.
            let Some(addr) = ep.addr else {
                continue;
            };
            // API defaults: ready unset means ready; serving unset means "as ready";
            // terminating unset means not terminating.
            let ready = ep.ready.unwrap_or(true);
            let serving = ep.serving.unwrap_or(ready);
            let terminating = ep.terminating.unwrap_or(false);
            let node_name = ep.node_name.as_deref().map(str::to_string);
            let local = !node.node_name.is_empty() && node_name.as_deref() == Some(&node.node_name);
            let hints = ep.hints.as_deref();
            out.push(Candidate {
                spec: BackendSpec { addr, port, local },
                node_name,
                ready,
                serving,
                terminating,
                zone_hints: hints.map(|h| h.zones.clone()).unwrap_or_default(),
                node_hints: hints.map(|h| h.nodes.clone()).unwrap_or_default(),
            });
        }
    }
    // An endpoint listed by two slices (the controller moving it) counts once: the ready
    // listing wins, as in kube-proxy's endpoint-slice cache, then the serving one. The
    // whole entry is the sort key, so the one kept never depends on the order of the
    // slices (an incremental translation sees them in another order than a full one).
    out.sort_by(|a, b| {
        (
            &a.spec,
            &a.node_name,
            !a.ready,
            !a.serving,
            a.terminating,
            &a.zone_hints,
            &a.node_hints,
        )
            .cmp(&(
                &b.spec,
                &b.node_name,
                !b.ready,
                !b.serving,
                b.terminating,
                &b.zone_hints,
                &b.node_hints,
            ))
    });
    out.dedup_by(|b, a| (a.spec.addr, a.spec.port) == (b.spec.addr, b.spec.port));
    out
}

/// Frontends the API server allocates (ClusterIPs, NodePorts) come first: it keeps them
/// unique, while `externalIPs` and ingress IPs are free text anyone who can write a
/// Service sets, so one must never take traffic meant for another Service's allocation.
fn claim_class(kind: FrontendKind) -> u8 {
    match kind {
        FrontendKind::ClusterIp | FrontendKind::NodePort | FrontendKind::Localhost => 0,
        FrontendKind::External | FrontendKind::LoadBalancer => 1,
    }
}

fn kind_name(kind: FrontendKind) -> &'static str {
    match kind {
        FrontendKind::ClusterIp => "ClusterIP",
        FrontendKind::NodePort => "NodePort",
        FrontendKind::Localhost => "localhost NodePort",
        FrontendKind::External => "external IP",
        FrontendKind::LoadBalancer => "load-balancer IP",
    }
}

/// Two service ports cannot share an address:port:protocol (the datapath keys frontends on
/// it). The winner is decided by [`claim_class`], then by Service age (`service_order`;
/// `created` holds the creation times in that order), then by port id, so the outcome does
/// not depend on input order and a new Service never takes a frontend an existing one
/// serves. External addresses on a node address are also refused ports of the SNAT range.
fn drop_colliding_frontends(out: &mut Desired, node: &NodeContext, created: &[Option<Timestamp>]) {
    let mut warnings = Vec::new();
    // The ports are fresh here (no other holder): make_mut changes them in place.
    for p in out.ports.iter_mut().map(Arc::make_mut) {
        p.frontends.retain(|f| {
            let snat = claim_class(f.kind) == 1
                && node.node_addrs.contains(&f.addr)
                && node.snat_ports.contains(&f.port);
            if snat {
                warnings.push(Warning {
                    kind: WarningKind::FrontendInSnatRange,
                    subject: Subject::Port(p.id.clone()),
                    message: format!(
                        "frontend {}:{}/{} is a node address with a port of the SNAT range \
                         {}-{} (replies of source-NATed flows arrive there); dropped",
                        f.addr,
                        f.port,
                        p.id.proto,
                        node.snat_ports.start(),
                        node.snat_ports.end()
                    ),
                });
            }
            !snat
        });
    }

    let ages: HashMap<(&str, &str), usize> = out
        .service_order
        .iter()
        .enumerate()
        .map(|(i, (ns, name))| ((ns.as_str(), name.as_str()), i))
        .collect();
    let age = |id: &SvcPortId| {
        ages.get(&(id.namespace.as_str(), id.name.as_str()))
            .copied()
            .unwrap_or(usize::MAX)
    };
    // (class, age, port index, kind); ports are sorted by id, so the index breaks ties in
    // id order.
    type Claim = (u8, usize, usize, FrontendKind);
    let mut winner: HashMap<(Ipv4Addr, u16, Proto), Claim> = HashMap::new();
    for (i, p) in out.ports.iter().enumerate() {
        for f in &p.frontends {
            let claim = (claim_class(f.kind), age(&p.id), i, f.kind);
            winner
                .entry((f.addr, f.port, p.id.proto))
                .and_modify(|w| *w = (*w).min(claim))
                .or_insert(claim);
        }
    }
    for i in 0..out.ports.len() {
        let frontends = std::mem::take(&mut Arc::make_mut(&mut out.ports[i]).frontends);
        let ports = &out.ports;
        let kept = frontends
            .into_iter()
            .filter(|f| {
                let p = &ports[i];
                let (class, w_age, w, w_kind) = winner[&(f.addr, f.port, p.id.proto)];
                if w == i {
                    return true;
                }
                let why = if class < claim_class(f.kind) {
                    format!(
                        "its {}, which an external address never takes",
                        kind_name(w_kind)
                    )
                } else if w_age == age(&p.id) {
                    "same Service, first by port name".to_string()
                } else if match (
                    created.get(w_age).copied().flatten(),
                    created.get(age(&p.id)).copied().flatten(),
                ) {
                    (Some(w), Some(l)) => w < l,
                    (w, l) => w.is_some() && l.is_none(),
                } {
                    "an older Service".to_string()
                } else {
                    "same or unknown creation time, first by namespace/name".to_string()
                };
                warnings.push(Warning {
                    kind: WarningKind::FrontendCollision,
                    subject: Subject::Port(p.id.clone()),
                    message: format!(
                        "frontend {}:{}/{} already used by {} ({why}); dropped",
                        f.addr, f.port, p.id.proto, ports[w].id
                    ),
                });
                false
            })
            .collect();
        Arc::make_mut(&mut out.ports[i]).frontends = kept;
    }
    out.warnings.extend(warnings);
}

fn row(svc: &Service) -> ServiceRow {
    let default_spec = ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);
    let ty = svc_type(spec);
    let cluster_ip = match spec.cluster_ip.as_deref() {
        _ if ty == SvcType::ExternalName => "<none>".to_string(),
        None | Some("") => "<none>".to_string(),
        Some(ip) => ip.to_string(),
    };

    let external_ips = spec.external_ips.clone().unwrap_or_default();
    let ingress: Vec<String> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
        .collect();
    const LB: SvcType = SvcType::Proxied(ServiceType::LoadBalancer);
    let external_ip = match ty {
        SvcType::ExternalName => spec.external_name.clone().unwrap_or_default(),
        LB if ingress.is_empty() && external_ips.is_empty() => "<pending>".into(),
        LB => [ingress, external_ips].concat().join(","),
        _ if external_ips.is_empty() => "<none>".into(),
        _ => external_ips.join(","),
    };

    let ports: Vec<String> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            match p.node_port {
                Some(np) if np > 0 => format!("{}:{np}/{proto}", p.port),
                _ => format!("{}/{proto}", p.port),
            }
        })
        .collect();

    ServiceRow {
        namespace: namespace(svc).to_string(),
        name: name(svc).to_string(),
        svc_type: ty,
        cluster_ip,
        external_ip,
        ports: if ports.is_empty() {
            "<none>".into()
        } else {
            ports.join(",")
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::yaml::parse_objects;

    fn node() -> NodeContext {
        NodeContext {
            node_name: "node-a".into(),
            node_addrs: vec![ip("192.168.1.11"), ip("192.168.1.10")],
            snat_ports: 61000..=65535,
            ..NodeContext::default()
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn run(yaml: &str) -> Desired {
        translate(&parse_objects(yaml).unwrap(), &node())
    }

    fn fe(addr: &str, port: u16, kind: FrontendKind) -> FrontendSpec {
        FrontendSpec {
            addr: ip(addr),
            port,
            kind,
        }
    }

    fn be(addr: &str, port: u16, node_name: &str) -> BackendSpec {
        BackendSpec {
            addr: ip(addr),
            port,
            local: node_name == "node-a",
        }
    }

    fn port<'a>(d: &'a Desired, id: &str) -> &'a SvcPort {
        d.ports
            .iter()
            .find(|p| p.id.to_string() == id)
            .unwrap_or_else(|| {
                panic!(
                    "{id} not in {:?}",
                    d.ports.iter().map(|p| p.id.to_string()).collect::<Vec<_>>()
                )
            })
    }

    fn service(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: dev}}\nspec:\n{spec}\n"
        )
    }

    /// A slice for `svc`; `ports` and `endpoints` are YAML flow sequences.
    fn slice(name: &str, svc: &str, ports: &str, endpoints: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: dev\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nports: {ports}\nendpoints: {endpoints}\n"
        )
    }

    const WEB_SLICE: &str = "[{name: http, port: 8080}]";
    const TWO_PODS: &str = "[{addresses: [10.244.1.5], nodeName: node-a}, {addresses: [10.244.2.9], nodeName: node-b}]";

    fn web(spec: &str) -> String {
        service("web", spec) + &slice("web-1", "web", WEB_SLICE, TWO_PODS)
    }

    #[test]
    fn cluster_ip_service() {
        let d = run(&web(
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: http}]",
        ));
        assert_eq!(d.ports.len(), 1);
        let p = &d.ports[0];
        assert_eq!(p.id.to_string(), "dev/web:http/TCP");
        assert_eq!(p.frontends, [fe("10.96.0.10", 80, FrontendKind::ClusterIp)]);
        assert_eq!(
            p.backends,
            [
                be("10.244.1.5", 8080, "node-a"),
                be("10.244.2.9", 8080, "node-b")
            ]
        );
        assert!(p.backends[0].local && !p.backends[1].local);
        assert_eq!(
            d.rows,
            [ServiceRow {
                namespace: "dev".into(),
                name: "web".into(),
                svc_type: SvcType::Proxied(ServiceType::ClusterIP),
                cluster_ip: "10.96.0.10".into(),
                external_ip: "<none>".into(),
                ports: "80/TCP".into(),
            }]
        );
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn node_port_service() {
        let d = run(&web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ));
        let p = port(&d, "dev/web:http/TCP");
        assert_eq!(
            p.frontends,
            [
                fe("10.96.0.10", 80, FrontendKind::ClusterIp),
                fe("127.0.0.1", 30080, FrontendKind::Localhost),
                fe("192.168.1.10", 30080, FrontendKind::NodePort),
                fe("192.168.1.11", 30080, FrontendKind::NodePort),
            ]
        );
        assert_eq!(p.backends.len(), 2);
        // The Service's port, not the nodePort, and its type, for XLB_SVC_META.
        assert_eq!((p.port, p.svc_type), (80, ServiceType::NodePort));
        assert_eq!(d.rows[0].svc_type, SvcType::Proxied(ServiceType::NodePort));
        assert_eq!(d.rows[0].svc_type.to_string(), "NodePort");
        assert_eq!(d.rows[0].ports, "80:30080/TCP");
    }

    #[test]
    fn load_balancer_service() {
        // The status block belongs to the Service document, so it goes inside `spec`'s text.
        let text = web(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 31234}]\nstatus: {loadBalancer: {ingress: [{ip: 192.168.49.200}, {hostname: lb.example.com}]}}",
        );
        let d = run(&text);
        let p = port(&d, "dev/web:http/TCP");
        assert_eq!(
            p.frontends,
            [
                fe("10.96.0.10", 80, FrontendKind::ClusterIp),
                fe("127.0.0.1", 31234, FrontendKind::Localhost),
                fe("192.168.1.10", 31234, FrontendKind::NodePort),
                fe("192.168.1.11", 31234, FrontendKind::NodePort),
                fe("192.168.49.200", 80, FrontendKind::LoadBalancer),
            ]
        );
        assert_eq!(d.rows[0].external_ip, "192.168.49.200,lb.example.com");
        assert_eq!(d.rows[0].ports, "80:31234/TCP");

        let pending = run(&web(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 31234}]",
        ));
        assert_eq!(pending.rows[0].external_ip, "<pending>");
        assert_eq!(port(&pending, "dev/web:http/TCP").frontends.len(), 4);
    }

    #[test]
    fn load_balancer_without_node_ports() {
        let text =
            web("  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]");
        let d = run(&text);
        assert_eq!(port(&d, "dev/web:http/TCP").frontends.len(), 1);
        assert_eq!(
            d.warnings,
            ["dev/web: port http (80)/TCP has no nodePort; not served as a NodePort"]
        );
        let opted_out = text.replace(
            "type: LoadBalancer",
            "type: LoadBalancer\n  allocateLoadBalancerNodePorts: false",
        );
        assert!(run(&opted_out).warnings.is_empty());
    }

    #[test]
    fn external_name_is_listed_not_programmed() {
        let d = run(&service(
            "db",
            "  type: ExternalName\n  externalName: db.example.com\n  externalIPs: [1.2.3.4]",
        ));
        assert!(d.ports.is_empty());
        assert!(d.warnings.is_empty());
        assert_eq!(
            d.rows,
            [ServiceRow {
                namespace: "dev".into(),
                name: "db".into(),
                svc_type: SvcType::ExternalName,
                cluster_ip: "<none>".into(),
                external_ip: "db.example.com".into(),
                ports: "<none>".into(),
            }]
        );
    }

    #[test]
    fn headless_is_listed_not_programmed() {
        let d = run(&web("  clusterIP: None\n  ports: [{name: http, port: 80}]"));
        assert!(d.ports.is_empty());
        assert_eq!(d.rows[0].cluster_ip, "None");
        assert_eq!(d.rows[0].ports, "80/TCP");
    }

    #[test]
    fn named_target_ports_resolve_per_slice() {
        // Two pod templates name the "http" container port differently; each slice carries
        // its own number.
        let text = service(
            "web",
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 9090, targetPort: metrics}]",
        ) + &slice(
            "web-1",
            "web",
            "[{name: http, port: 8080}, {name: metrics, port: 9100}]",
            "[{addresses: [10.244.1.5], nodeName: node-a}, {addresses: [10.244.1.6], nodeName: node-a}]",
        ) + &slice(
            "web-2",
            "web",
            "[{name: metrics, port: 9100}, {name: http, port: 8081}]",
            "[{addresses: [10.244.2.9], nodeName: node-b}]",
        );
        let d = run(&text);
        assert_eq!(d.ports.len(), 2);
        assert_eq!(
            port(&d, "dev/web:http/TCP").backends,
            [
                be("10.244.1.5", 8080, "node-a"),
                be("10.244.1.6", 8080, "node-a"),
                be("10.244.2.9", 8081, "node-b"),
            ]
        );
        let metrics = port(&d, "dev/web:metrics/TCP");
        assert_eq!(
            metrics.frontends,
            [fe("10.96.0.10", 9090, FrontendKind::ClusterIp)]
        );
        assert_eq!(
            metrics.backends.iter().map(|b| b.port).collect::<Vec<_>>(),
            [9100, 9100, 9100]
        );
        assert_eq!(d.rows[0].ports, "80/TCP,9090/TCP");
    }

    #[test]
    fn tcp_and_udp_are_matched_by_protocol() {
        let text = service(
            "dns",
            "  clusterIP: 10.96.0.53\n  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]",
        ) + &slice(
            "dns-1",
            "dns",
            "[{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}, {name: dns, port: 9999, protocol: TCP}]",
            "[{addresses: [10.244.1.7], nodeName: node-b}]",
        );
        let d = run(&text);
        let udp = port(&d, "dev/dns:dns/UDP");
        assert_eq!(udp.id.proto.number(), 17);
        assert_eq!(udp.backends, [be("10.244.1.7", 5353, "node-b")]);
        let tcp = port(&d, "dev/dns:dns-tcp/TCP");
        assert_eq!(tcp.id.proto.number(), 6);
        assert_eq!(tcp.backends, [be("10.244.1.7", 5354, "node-b")]);
        assert_eq!(d.rows[0].ports, "53/UDP,53/TCP");
    }

    #[test]
    fn only_ready_endpoints() {
        let text = service(
            "web",
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]",
        ) + &slice(
            "web-1",
            "web",
            WEB_SLICE,
            "[{addresses: [10.244.0.1], conditions: {ready: true}}, {addresses: [10.244.0.2], conditions: {ready: false, serving: true, terminating: true}}, {addresses: [10.244.0.3], conditions: {}}, {addresses: [10.244.0.4]}]",
        );
        let d = run(&text);
        let addrs: Vec<_> = port(&d, "dev/web:http/TCP")
            .backends
            .iter()
            .map(|b| b.addr)
            .collect();
        assert_eq!(
            addrs,
            [ip("10.244.0.1"), ip("10.244.0.3"), ip("10.244.0.4")]
        );
        assert!(
            port(&d, "dev/web:http/TCP")
                .backends
                .iter()
                .all(|b| !b.local)
        );
    }

    #[test]
    fn slices_are_merged_and_deduplicated() {
        let text = [
            service("web", "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]"),
            slice(
                "web-1",
                "web",
                WEB_SLICE,
                "[{addresses: [10.244.0.2], nodeName: node-b}, {addresses: [10.244.0.1], nodeName: node-a}]",
            ),
            // During a pod move the same endpoint can sit in two slices for a moment.
            slice(
                "web-2",
                "web",
                WEB_SLICE,
                "[{addresses: [10.244.0.3], nodeName: node-c}, {addresses: [10.244.0.2], nodeName: node-b}]",
            ),
            // Same owner name in another namespace, and a slice of another service.
            slice("web-3", "web", WEB_SLICE, "[{addresses: [10.244.0.9]}]")
                .replace("namespace: dev", "namespace: prod"),
            slice("api-1", "api", WEB_SLICE, "[{addresses: [10.244.0.8]}]"),
        ]
        .concat();
        let d = run(&text);
        assert_eq!(
            port(&d, "dev/web:http/TCP").backends,
            [
                be("10.244.0.1", 8080, "node-a"),
                be("10.244.0.2", 8080, "node-b"),
                be("10.244.0.3", 8080, "node-c"),
            ]
        );
    }

    #[test]
    fn no_slices_means_no_backends() {
        let d = run(&service(
            "web",
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]",
        ));
        assert!(port(&d, "dev/web:http/TCP").backends.is_empty());
    }

    #[test]
    fn external_ips_on_any_type() {
        let d = run(&web(
            "  clusterIP: 10.96.0.10\n  externalIPs: [203.0.113.7, 203.0.113.5, \"2001:db8::1\"]\n  ports: [{name: http, port: 80}]",
        ));
        assert_eq!(
            port(&d, "dev/web:http/TCP").frontends,
            [
                fe("10.96.0.10", 80, FrontendKind::ClusterIp),
                fe("203.0.113.5", 80, FrontendKind::External),
                fe("203.0.113.7", 80, FrontendKind::External),
            ]
        );
        assert_eq!(d.rows[0].external_ip, "203.0.113.7,203.0.113.5,2001:db8::1");
        assert_eq!(
            d.warnings,
            ["dev/web: external address 2001:db8::1 is IPv6; not served (xlb serves IPv4 only)"]
        );
    }

    #[test]
    fn service_proxy_name_label_is_skipped() {
        let text = web("  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]").replace(
            "namespace: dev}",
            "namespace: dev, labels: {service.kubernetes.io/service-proxy-name: other}}",
        );
        let d = run(&text);
        assert!(d.ports.is_empty());
        assert_eq!(d.rows.len(), 1);
        assert!(
            d.warnings[0]
                .to_string()
                .starts_with("dev/web: labelled service.kubernetes.io/service-proxy-name=other")
        );
    }

    #[test]
    fn sctp_and_ipv6_are_skipped_with_warnings() {
        let text = service(
            "mixed",
            "  clusterIP: 10.96.0.20\n  ports: [{name: a, port: 80}, {name: b, port: 9000, protocol: SCTP}]",
        ) + &service("v6", "  clusterIP: \"fd00::20\"\n  ports: [{port: 80}]")
            + &service(
                "dual",
                "  clusterIP: \"fd00::21\"\n  clusterIPs: [\"fd00::21\", 10.96.0.21]\n  ports: [{port: 80}]",
            );
        let d = run(&text);
        let ids: Vec<_> = d.ports.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(ids, ["dev/dual/TCP", "dev/mixed:a/TCP"]);
        assert_eq!(
            port(&d, "dev/dual/TCP").frontends,
            [fe("10.96.0.21", 80, FrontendKind::ClusterIp)]
        );
        assert_eq!(
            d.warnings,
            [
                "dev/mixed: port b (9000)/SCTP skipped: SCTP is not supported",
                "dev/v6: ClusterIP fd00::20 is not IPv4; service skipped (xlb serves IPv4 only)",
            ]
        );
        // Both are Events on their Service, with the warning's message.
        let evs: Vec<(&str, &str, &str)> = d
            .events
            .iter()
            .map(|e| (e.name.as_str(), e.reason.as_str(), e.message.as_str()))
            .collect();
        assert_eq!(
            evs,
            [
                (
                    "mixed",
                    UNSUPPORTED_REASON,
                    "port b (9000)/SCTP skipped: SCTP is not supported"
                ),
                (
                    "v6",
                    UNSUPPORTED_REASON,
                    "ClusterIP fd00::20 is not IPv4; service skipped (xlb serves IPv4 only)"
                ),
            ]
        );
        assert!(
            d.warnings
                .iter()
                .all(|w| w.kind == WarningKind::Unsupported)
        );
        assert_eq!(d.rows.len(), 3);
    }

    #[test]
    fn unallocated_cluster_ip_still_serves_node_ports() {
        // Manifests written by hand have no clusterIP: the API server would assign one.
        let d = run(&web(
            "  type: NodePort\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ));
        // Two node addresses and localhost.
        assert_eq!(port(&d, "dev/web:http/TCP").frontends.len(), 3);
        assert_eq!(d.rows[0].cluster_ip, "<none>");
        let d = run(&web("  ports: [{name: http, port: 80}]"));
        assert!(d.ports.is_empty());
        assert_eq!(
            d.warnings,
            [
                "dev/web: port http (80)/TCP has no ClusterIP, NodePort or external address; nothing to serve"
            ]
        );
    }

    #[test]
    fn colliding_frontends_go_to_the_first_service() {
        let text = service(
            "b",
            "  type: NodePort\n  clusterIP: 10.96.0.2\n  ports: [{port: 80, nodePort: 30080}]",
        ) + &service(
            "a",
            "  type: NodePort\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, nodePort: 30080}]",
        );
        let d = run(&text);
        assert_eq!(port(&d, "dev/a/TCP").frontends.len(), 4);
        assert_eq!(
            port(&d, "dev/b/TCP").frontends,
            [fe("10.96.0.2", 80, FrontendKind::ClusterIp)]
        );
        // Two node addresses and localhost collide.
        assert_eq!(d.warnings.len(), 3);
        assert!(
            d.warnings[0]
                .to_string()
                .contains("already used by dev/a/TCP"),
            "{:?}",
            d.warnings
        );
    }

    /// A Service in `ns` created at `created` (RFC 3339; None: no timestamp).
    fn svc_at(ns: &str, name: &str, created: Option<&str>, spec: &str) -> String {
        let created = created
            .map(|t| format!(", creationTimestamp: \"{t}\""))
            .unwrap_or_default();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}{created}}}\nspec:\n{spec}\n"
        )
    }

    #[test]
    fn the_older_service_keeps_a_contested_frontend() {
        let ingress = |created| {
            svc_at(
                "kube-system",
                "ingress",
                created,
                "  clusterIP: 10.96.0.5\n  externalIPs: [203.0.113.7]\n  ports: [{port: 443}]",
            )
        };
        let grab = |created| {
            svc_at(
                "default",
                "grab",
                created,
                "  clusterIP: 10.96.0.6\n  externalIPs: [203.0.113.7]\n  ports: [{port: 443}]",
            )
        };
        let external = |d: &Desired, id: &str| {
            port(d, id)
                .frontends
                .iter()
                .any(|f| f.kind == FrontendKind::External)
        };

        // kube-system's was there first; `default` sorts first by name but is newer.
        let d = run(&(ingress(Some("2020-01-01T00:00:00Z")) + &grab(Some("2024-06-01T12:00:00Z"))));
        assert!(external(&d, "kube-system/ingress/TCP"));
        assert!(!external(&d, "default/grab/TCP"));
        assert_eq!(
            d.warnings,
            [
                "default/grab/TCP: frontend 203.0.113.7:443/TCP already used by \
                 kube-system/ingress/TCP (an older Service); dropped"
            ]
        );
        assert_eq!(
            d.service_order,
            [
                ("kube-system".to_string(), "ingress".to_string()),
                ("default".to_string(), "grab".to_string())
            ]
        );

        // The other way round, the other way out.
        let d = run(&(ingress(Some("2024-06-01T12:00:01Z")) + &grab(Some("2024-06-01T12:00:00Z"))));
        assert!(external(&d, "default/grab/TCP"));
        assert!(!external(&d, "kube-system/ingress/TCP"));

        // Without a timestamp, after every timestamped Service; among themselves by
        // namespace and name.
        let d = run(&(ingress(Some("2024-06-01T12:00:00Z")) + &grab(None)));
        assert!(external(&d, "kube-system/ingress/TCP"));
        let d = run(&(ingress(None) + &grab(None)));
        assert!(external(&d, "default/grab/TCP"));
        assert!(
            d.warnings[0]
                .to_string()
                .contains("(same or unknown creation time, first by namespace/name)")
        );
    }

    #[test]
    fn external_addresses_never_take_cluster_ips_node_ports_or_snat_ports() {
        let older = Some("2020-01-01T00:00:00Z");
        let newer = Some("2024-01-01T00:00:00Z");
        let text = [
            // (a) An old Service's externalIP is a newer Service's ClusterIP:port.
            svc_at(
                "a",
                "squat",
                older,
                "  clusterIP: 10.96.0.50\n  externalIPs: [10.96.0.60, 10.96.0.61]\n  ports: [{port: 80}]",
            ),
            svc_at("a", "api", newer, "  clusterIP: 10.96.0.60\n  ports: [{port: 80}]"),
            // (b) A node address:port that is another Service's NodePort.
            svc_at(
                "b",
                "squat",
                older,
                "  clusterIP: 10.96.0.70\n  externalIPs: [192.168.1.10]\n  ports: [{port: 30080}]",
            ),
            svc_at(
                "b",
                "web",
                newer,
                "  type: NodePort\n  clusterIP: 10.96.0.71\n  ports: [{port: 80, nodePort: 30080}]",
            ),
            // (c) A node address with a port of the SNAT range, as externalIP and as
            // ingress IP; the same port on another address, and another port on the node
            // address, are fine.
            svc_at(
                "c",
                "snat",
                older,
                "  type: LoadBalancer\n  clusterIP: 10.96.0.80\n  externalIPs: [192.168.1.11, 203.0.113.9]\n  ports: [{name: hi, port: 61001, nodePort: 30081}, {name: lo, port: 8080, nodePort: 30082}]\nstatus: {loadBalancer: {ingress: [{ip: 192.168.1.10}]}}",
            ),
        ]
        .concat();
        let d = run(&text);
        let fes = |id: &str| {
            port(&d, id)
                .frontends
                .iter()
                .map(|f| format!("{}:{}", f.addr, f.port))
                .collect::<Vec<_>>()
        };
        assert_eq!(fes("a/squat/TCP"), ["10.96.0.50:80", "10.96.0.61:80"]);
        assert_eq!(fes("a/api/TCP"), ["10.96.0.60:80"]);
        assert_eq!(fes("b/squat/TCP"), ["10.96.0.70:30080"]);
        assert!(fes("b/web/TCP").contains(&"192.168.1.10:30080".to_string()));
        assert_eq!(
            fes("c/snat:hi/TCP"),
            [
                "10.96.0.80:61001",
                "127.0.0.1:30081",
                "192.168.1.10:30081",
                "192.168.1.11:30081",
                "203.0.113.9:61001"
            ]
        );
        assert!(fes("c/snat:lo/TCP").contains(&"192.168.1.11:8080".to_string()));
        assert!(fes("c/snat:lo/TCP").contains(&"192.168.1.10:8080".to_string()));
        let mut w: Vec<String> = d.warnings.iter().map(ToString::to_string).collect();
        w.sort();
        assert_eq!(
            w,
            [
                "a/squat/TCP: frontend 10.96.0.60:80/TCP already used by a/api/TCP (its \
                 ClusterIP, which an external address never takes); dropped",
                "b/squat/TCP: frontend 192.168.1.10:30080/TCP already used by b/web/TCP (its \
                 NodePort, which an external address never takes); dropped",
                "c/snat:hi/TCP: frontend 192.168.1.10:61001/TCP is a node address with a port \
                 of the SNAT range 61000-65535 (replies of source-NATed flows arrive there); \
                 dropped",
                "c/snat:hi/TCP: frontend 192.168.1.11:61001/TCP is a node address with a port \
                 of the SNAT range 61000-65535 (replies of source-NATed flows arrive there); \
                 dropped",
            ]
        );

        // The range is the node's: with another one, 61001 is free.
        let mut n = node();
        n.snat_ports = 40000..=40999;
        let d = translate(&parse_objects(&text).unwrap(), &n);
        assert!(
            port(&d, "c/snat:hi/TCP")
                .frontends
                .iter()
                .any(|f| f.addr == ip("192.168.1.10") && f.port == 61001)
        );
    }

    #[test]
    fn output_is_independent_of_input_order() {
        let text = web(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalIPs: [203.0.113.7]\n  ports: [{name: http, port: 80, nodePort: 30080}, {name: https, port: 443, nodePort: 30443}]",
        ) + &slice(
            "web-2",
            "web",
            "[{name: https, port: 8443}, {name: http, port: 8080}]",
            "[{addresses: [10.244.3.3], nodeName: node-a}, {addresses: [10.244.0.2]}]",
        ) + &service(
            "dns",
            "  clusterIP: 10.96.0.53\n  ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]",
        ) + &slice(
            "dns-1",
            "dns",
            "[{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]",
            "[{addresses: [10.244.5.5]}, {addresses: [10.244.1.1]}]",
        ) + &service(
            "a",
            "  type: NodePort\n  clusterIP: 10.96.0.1\n  ports: [{port: 80, nodePort: 30080}]",
        );
        let objs = parse_objects(&text).unwrap();
        let reference = translate(&objs, &node());
        assert_eq!(reference.ports.len(), 5);
        for rot in 0..objs.services.len().max(objs.slices.len()) {
            let mut o = objs.clone();
            o.services.rotate_left(rot % objs.services.len());
            o.slices.rotate_left(rot % objs.slices.len());
            o.slices.reverse();
            for s in o.slices.iter_mut() {
                Arc::make_mut(s).endpoints.reverse();
            }
            let mut n = node();
            n.node_addrs.reverse();
            assert_eq!(translate(&o, &n), reference, "rotation {rot}");
        }
    }

    #[test]
    fn display_and_flags() {
        let id = SvcPortId {
            namespace: "dev".into(),
            name: "nginx".into(),
            port_name: "http".into(),
            proto: Proto::Udp,
            scope: Scope::Cluster,
        };
        assert_eq!(id.to_string(), "dev/nginx:http/UDP");
        assert_eq!(FrontendKind::NodePort.flag(), lb_common::FE_NODEPORT);
        let b = be("10.0.0.1", 80, "x");
        let name = crate::dataplane::maglev::BackendName::new(b.addr, b.port);
        assert_eq!(name.as_ref(), b"10.0.0.1:80");
    }

    #[test]
    fn kubectl_fixture_translates() {
        let objs = parse_objects(include_str!("../../tests/fixtures/kubectl-list.yaml")).unwrap();
        let d = translate(&objs, &node());
        let ids: Vec<_> = d.ports.iter().map(|p| p.id.to_string()).collect();
        assert_eq!(
            ids,
            ["default/kubernetes:https/TCP", "dev/nginx-service:http/TCP"]
        );
        let nginx = port(&d, "dev/nginx-service:http/TCP");
        // The terminating endpoint on node-b is not ready.
        assert_eq!(nginx.backends, [be("10.244.1.5", 8080, "node-a")]);
        assert_eq!(nginx.frontends.len(), 5);
        // The apiserver service has no slice in the fixture: frontends but no backends.
        assert!(port(&d, "default/kubernetes:https/TCP").backends.is_empty());
    }

    #[test]
    fn internal_traffic_policy_local_splits_the_cluster_ip_off() {
        let d = run(&web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ));
        let local = port(&d, "dev/web:http/TCP (local)");
        assert_eq!(
            local.frontends,
            [fe("10.96.0.10", 80, FrontendKind::ClusterIp)]
        );
        assert_eq!(local.backends, [be("10.244.1.5", 8080, "node-a")]);
        let cluster = port(&d, "dev/web:http/TCP");
        assert_eq!(cluster.frontends.len(), 3, "{:?}", cluster.frontends);
        assert!(
            cluster
                .frontends
                .iter()
                .all(|f| f.kind != FrontendKind::ClusterIp)
        );
        assert_eq!(cluster.backends.len(), 2);
    }

    #[test]
    fn external_traffic_policy_local_keeps_only_local_endpoints_for_node_ports() {
        let d = run(&web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ));
        let local = port(&d, "dev/web:http/TCP (local)");
        assert!(
            local
                .frontends
                .iter()
                .all(|f| f.kind != FrontendKind::ClusterIp)
        );
        assert_eq!(local.backends, [be("10.244.1.5", 8080, "node-a")]);
        assert_eq!(port(&d, "dev/web:http/TCP").backends.len(), 2);
    }

    #[test]
    fn both_policies_local_is_one_local_unit() {
        let d = run(&web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ));
        let local = port(&d, "dev/web:http/TCP (local)");
        assert_eq!(local.frontends.len(), 4);
        // In-cluster traffic to the NodePorts still reaches every endpoint (kube-proxy's
        // short-circuit), through a cluster-scope port with no frontend of its own.
        let cluster = port(&d, "dev/web:http/TCP");
        assert!(cluster.frontends.is_empty());
        assert_eq!(cluster.inside_frontends.len(), 3);
        assert_eq!(cluster.backends.len(), 2);
    }

    #[test]
    fn external_policy_local_short_circuits_in_cluster_traffic() {
        let d = run(&web(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 172.18.255.200}]}}",
        ));
        let cluster = port(&d, "dev/web:http/TCP");
        assert_eq!(
            cluster.frontends,
            [fe("10.96.0.10", 80, FrontendKind::ClusterIp)]
        );
        assert_eq!(
            cluster.inside_frontends,
            port(&d, "dev/web:http/TCP (local)").frontends
        );
        assert!(cluster.inside_frontends.contains(&fe(
            "172.18.255.200",
            80,
            FrontendKind::LoadBalancer
        )));
        // eTP Cluster: nothing to short-circuit.
        let d = run(&web(
            "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ));
        assert!(d.ports.iter().all(|p| p.inside_frontends.is_empty()));
    }

    #[test]
    fn local_policy_drops_only_when_endpoints_exist_elsewhere() {
        let spec = "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]";
        // Endpoints on another node only: drop.
        let elsewhere = service("web", spec)
            + &slice(
                "web-1",
                "web",
                WEB_SLICE,
                "[{addresses: [10.244.2.9], nodeName: node-b}]",
            );
        let p = run(&elsewhere);
        let p = port(&p, "dev/web:http/TCP (local)");
        assert!(p.backends.is_empty() && p.drop_if_empty);
        // No endpoint at all, or none ready or serving: reject.
        for eps in [
            "[]",
            "[{addresses: [10.244.2.9], nodeName: node-b, conditions: {ready: false, serving: false, terminating: true}}]",
        ] {
            let d = run(&(service("web", spec) + &slice("web-1", "web", WEB_SLICE, eps)));
            let p = port(&d, "dev/web:http/TCP (local)");
            assert!(p.backends.is_empty() && !p.drop_if_empty, "{eps}");
        }
        // Cluster policy never drops.
        let d = run(&service(
            "web",
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]",
        ));
        assert!(!port(&d, "dev/web:http/TCP").drop_if_empty);
    }

    #[test]
    fn proxy_ip_mode_ingress_is_not_programmed() {
        let d = run(&web(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]\nstatus: {loadBalancer: {ingress: [{ip: 172.18.255.200, ipMode: Proxy}, {ip: 172.18.255.201, ipMode: VIP}]}}",
        ));
        let fes = &port(&d, "dev/web:http/TCP").frontends;
        assert!(!fes.iter().any(|f| f.addr == ip("172.18.255.200")));
        assert!(fes.contains(&fe("172.18.255.201", 80, FrontendKind::LoadBalancer)));
    }

    #[test]
    fn headless_label_is_skipped_like_kube_proxy() {
        let labelled = "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: dev, labels: {service.kubernetes.io/headless: ''}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n"
            .to_string()
            + &slice("web-1", "web", WEB_SLICE, TWO_PODS);
        assert!(run(&labelled).ports.is_empty());
        let slice_labelled = service(
            "web",
            "  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]",
        ) + "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: dev\n  labels: {kubernetes.io/service-name: web, service.kubernetes.io/headless: ''}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.244.1.5], nodeName: node-a}]\n";
        assert!(run(&slice_labelled).ports[0].backends.is_empty());
    }

    #[test]
    fn zone_hints_follow_the_nodes_zone_label() {
        let eps = "[{addresses: [10.244.1.5], nodeName: node-a, hints: {forZones: [{name: zone-a}]}}, {addresses: [10.244.2.9], nodeName: node-b, hints: {forZones: [{name: zone-b}]}}]";
        let text = service(
            "web",
            "  clusterIP: 10.96.0.10\n  trafficDistribution: PreferClose\n  ports: [{name: http, port: 80}]",
        ) + &slice("web-1", "web", WEB_SLICE, eps);
        // No Node object: the zone is unknown and hints are ignored.
        assert_eq!(run(&text).ports[0].backends.len(), 2);
        let node = "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-b}}\n";
        let d = run(&(text + node));
        assert_eq!(d.ports[0].backends, [be("10.244.2.9", 8080, "node-b")]);
        assert_eq!(d.ports[0].draining, [be("10.244.1.5", 8080, "node-a")]);
    }

    #[test]
    fn service_cidrs_from_flag_and_objects() {
        let text = "---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\nspec: {cidrs: [10.96.0.0/16, 'fd00:10:96::/112']}\n";
        let objs = parse_objects(text).unwrap();
        let d = translate(
            &objs,
            &NodeContext {
                service_cidrs: vec![(ip("10.200.0.0"), 24), (ip("10.96.0.0"), 16)],
                ..node()
            },
        );
        assert_eq!(
            d.service_cidrs,
            [(ip("10.96.0.0"), 16), (ip("10.200.0.0"), 24)]
        );
    }

    #[test]
    fn localhost_node_ports_follow_the_node_context() {
        let spec = "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]";
        let objs = parse_objects(&web(spec)).unwrap();
        let off = translate(
            &objs,
            &NodeContext {
                localhost_node_ports: false,
                ..node()
            },
        );
        assert!(
            off.ports[0]
                .frontends
                .iter()
                .all(|f| f.kind != FrontendKind::Localhost)
        );
        let on = translate(&objs, &node());
        assert!(
            on.ports[0]
                .frontends
                .iter()
                .any(|f| f.kind == FrontendKind::Localhost)
        );
    }

    const POOL: &str = "---\napiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: example, namespace: metallb-system}\nspec: {addresses: [172.18.255.200-172.18.255.250]}\n---\napiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: empty, namespace: metallb-system}\n";

    #[test]
    fn pool_addresses_become_load_balancer_frontends() {
        let d = run(&(web(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ) + POOL));
        let lb = ip("172.18.255.200");
        assert!(port(&d, "dev/web:http/TCP").frontends.contains(&fe(
            "172.18.255.200",
            80,
            FrontendKind::LoadBalancer
        )));
        assert_eq!(d.lb_addresses.len(), 1);
        assert_eq!(d.lb_addresses[0].addr, lb);
        // The empty L2Advertisement announces the pool everywhere: eligible here.
        assert_eq!(d.announce_eligible, [lb].into());
    }

    #[test]
    fn local_policy_announces_only_with_a_local_endpoint() {
        let spec = "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n  ports: [{name: http, port: 80, nodePort: 30080}]";
        let elsewhere = service("web", spec)
            + &slice(
                "web-1",
                "web",
                WEB_SLICE,
                "[{addresses: [10.244.2.9], nodeName: node-b}]",
            )
            + POOL;
        let d = run(&elsewhere);
        assert_eq!(d.lb_addresses.len(), 1);
        assert!(d.announce_eligible.is_empty());
        let here = run(&(web(spec) + POOL));
        assert_eq!(here.announce_eligible.len(), 1);
    }

    #[test]
    fn no_pools_means_no_address_management() {
        let d = run(&web(
            "  type: LoadBalancer\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]",
        ));
        assert!(d.lb_addresses.is_empty() && d.warnings.is_empty());
    }

    #[test]
    fn held_addresses_stay_when_an_older_service_goes() {
        let svc = |name: &str, created: &str| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: dev, creationTimestamp: '{created}'}}\nspec:\n  type: LoadBalancer\n  clusterIP: None\n  ports: [{{name: http, port: 80, nodePort: 30080}}]\n"
            )
        };
        let both = svc("a", "2024-01-01T00:00:00Z") + &svc("b", "2024-01-02T00:00:00Z") + POOL;
        let d = run(&both);
        let b_addr = d.lb_addresses.iter().find(|a| a.name == "b").unwrap().addr;
        assert_eq!(b_addr, ip("172.18.255.201"));
        let held = [(("dev".to_string(), "b".to_string()), vec![b_addr])].into();
        let only_b = parse_objects(&(svc("b", "2024-01-02T00:00:00Z") + POOL)).unwrap();
        let d = translate(
            &only_b,
            &NodeContext {
                held_lb_addresses: held,
                ..node()
            },
        );
        assert_eq!(d.lb_addresses[0].addr, b_addr, "b moved when a went");
    }
}
