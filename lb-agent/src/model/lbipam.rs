//! LoadBalancer address assignment from MetalLB's `IPAddressPool`s, computed the same way on
//! every node with no coordination: a pure function of the Services, the pools, the
//! `L2Advertisement`s and the addresses each Service already holds ("sticky").
//!
//! # Which Services
//!
//! `spec.type: LoadBalancer` with `spec.loadBalancerClass` unset or [`LB_CLASS`]. Other
//! classes appear as [`Refusal::OtherClass`]: their status belongs to another controller and
//! must be left alone.
//!
//! # Order and stability
//!
//! Services are taken oldest first (`metadata.creationTimestamp`, missing last), then by
//! namespace and name. In a first pass each Service, in that order, claims what it asks for
//! (a requested address, see below) or, when it asks for no address, keeps its sticky address
//! if still valid; in a second pass the Services left get the lowest free address of the first
//! pool that admits them. Hence a newer Service never moves an older one's address, a fresh
//! allocation never takes an address someone keeps, and removing a Service moves nobody (the
//! others keep their sticky addresses). When two Services ask for the same address, the older
//! one gets it. Same inputs in any order give the same [`Assignment`].
//!
//! # MetalLB fields honoured
//!
//! * `IPAddressPool.spec.addresses`: CIDRs and `first-last` ranges; IPv4 only (IPv6 entries
//!   are accepted and ignored; an IPv6-only pool is skipped).
//! * `autoAssign` (default true): a pool with `false` serves only Services that name it
//!   (pool annotation) or ask for one of its addresses.
//! * `avoidBuggyIPs`: `.0` and `.255` addresses are not part of the pool.
//! * `serviceAllocation.priority` (lower first, unset or 0 after all set ones; then pools
//!   pinned by namespaces/selectors before unpinned ones, as MetalLB tries them; then name),
//!   `serviceAllocation.namespaces`, `serviceAllocation.serviceSelectors` (matchLabels and
//!   matchExpressions In/NotIn/Exists/DoesNotExist).
//! * Service `spec.loadBalancerIP`, annotations `metallb.io/loadBalancerIPs` /
//!   `metallb.universe.tf/loadBalancerIPs` (comma-separated; at most one IPv4 address, IPv6
//!   ones ignored) and `metallb.io/address-pool` / `metallb.universe.tf/address-pool`.
//! * `L2Advertisement.spec`: `ipAddressPools`, `ipAddressPoolSelectors` (which pools are
//!   announced; neither = all), `nodeSelectors` and `interfaces` (handed to the announcer in
//!   [`L2Scope`]).
//!
//! A sticky address is kept while it lies in a pool admitting the Service (and in the pool the
//! annotation names, if any) and nobody older claimed it; as in MetalLB, the pool need not
//! auto-assign any more. A Service that asks for an address keeps nothing else: refused, it
//! gets nothing. The `sticky` input must itself be the same on every node (the Services'
//! status with the API server source) for the nodes to agree.
//!
//! # Not honoured
//!
//! The first two are reported in [`Assignment::warnings`] when a pool or Service uses them.
//!
//! * `serviceAllocation.namespaceSelectors`: Namespace labels are not read. A pool restricted
//!   that way admits only the namespaces listed in `serviceAllocation.namespaces` (none if it
//!   lists none), rather than handing its addresses to everyone.
//! * Address sharing (`metallb.universe.tf/allow-shared-ip`, `metallb.io/allow-shared-ip`):
//!   every Service gets its own address; a Service asking for an address another holds is
//!   refused.
//! * Dual stack: no IPv6 address is assigned.
//! * Addresses held by Services of another class are not excluded from the pools.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::jiff::Timestamp;

use crate::source::metallb::{IpAddressPool, L2Advertisement, is_buggy, selector_matches};

/// The `spec.loadBalancerClass` xlb implements (besides unset).
pub const LB_CLASS: &str = "xlb.dev/lb";
/// Annotations asking for specific addresses (comma-separated).
pub const LOAD_BALANCER_IPS_ANNOTATIONS: [&str; 2] = [
    "metallb.io/loadBalancerIPs",
    "metallb.universe.tf/loadBalancerIPs",
];
/// Annotations naming the pool to allocate from.
pub const ADDRESS_POOL_ANNOTATIONS: [&str; 2] = [
    "metallb.io/address-pool",
    "metallb.universe.tf/address-pool",
];
/// Address sharing annotations: not supported.
/// Every annotation the agent reads (on Services): sources may drop the others.
pub fn reads_annotation(key: &str) -> bool {
    LOAD_BALANCER_IPS_ANNOTATIONS
        .iter()
        .chain(&ADDRESS_POOL_ANNOTATIONS)
        .chain(&ALLOW_SHARED_IP_ANNOTATIONS)
        .any(|k| *k == key)
}

pub const ALLOW_SHARED_IP_ANNOTATIONS: [&str; 2] = [
    "metallb.io/allow-shared-ip",
    "metallb.universe.tf/allow-shared-ip",
];

/// `(namespace, name)` of a Service; the namespace is `default` when unset.
pub type ServiceKey = (String, String);

/// The outcome for every LoadBalancer Service, plus notes on configuration not honoured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assignment {
    pub services: BTreeMap<ServiceKey, Outcome>,
    /// Sorted, without duplicates: meant to be logged (as warnings) when they change.
    pub warnings: Vec<String>,
}

impl Assignment {
    pub fn get(&self, namespace: &str, name: &str) -> Option<&Outcome> {
        self.services
            .get(&(namespace.to_string(), name.to_string()))
    }

    /// The Services that got addresses.
    pub fn granted(&self) -> impl Iterator<Item = (&ServiceKey, &Granted)> {
        self.services.iter().filter_map(|(k, o)| match o {
            Outcome::Granted(g) => Some((k, g)),
            Outcome::Refused(_) => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Granted(Granted),
    Refused(Refusal),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Granted {
    /// One IPv4 address today (a list for the status' shape and future sharing/dual stack).
    pub addresses: Vec<Ipv4Addr>,
    /// `metadata.name` of the pool the address came from.
    pub pool: String,
    pub how: How,
    /// How the pool is announced; `None` when no `L2Advertisement` covers it (the address is
    /// assigned and served, but nobody answers ARP for it).
    pub l2: Option<L2Scope>,
}

/// Why the Service holds its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// It asked for it (`spec.loadBalancerIP` or the loadBalancerIPs annotation).
    Requested,
    /// It already had it (the `sticky` input) and it is still valid.
    Kept,
    /// Lowest free address of the first pool admitting it.
    Allocated,
}

/// Why a Service got no address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// `spec.loadBalancerClass` is another controller's: leave the Service alone.
    OtherClass(String),
    /// The request cannot be read (bad address, several IPv4 addresses, two different pools).
    InvalidRequest(String),
    /// The pool annotation names a pool that does not exist.
    UnknownPool(String),
    /// The requested address is in no pool (or not in the pool the annotation names).
    NotInPool {
        address: Ipv4Addr,
        pool: Option<String>,
    },
    /// The pool holding the requested address, or named by the annotation, does not admit the
    /// Service (`spec.serviceAllocation`).
    PoolNotAllowed {
        address: Option<Ipv4Addr>,
        pool: String,
    },
    /// The requested address belongs to an older Service.
    Held { address: Ipv4Addr, by: ServiceKey },
    /// No pool admits the Service for automatic allocation.
    NoPoolMatches,
    /// Every pool admitting the Service is full.
    Exhausted { pools: Vec<String> },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::OtherClass(c) => write!(
                f,
                "spec.loadBalancerClass {c:?} is not {LB_CLASS:?}: left to its own controller"
            ),
            Refusal::InvalidRequest(m) => write!(f, "{m}"),
            Refusal::UnknownPool(p) => write!(f, "address pool {p:?} does not exist"),
            Refusal::NotInPool {
                address,
                pool: None,
            } => write!(f, "requested address {address} is in no address pool"),
            Refusal::NotInPool {
                address,
                pool: Some(p),
            } => write!(
                f,
                "requested address {address} is not in the address pool {p:?}"
            ),
            Refusal::PoolNotAllowed { address, pool } => {
                if let Some(a) = address {
                    write!(f, "requested address {a}: ")?;
                }
                write!(
                    f,
                    "address pool {pool:?} does not admit this Service (spec.serviceAllocation)"
                )
            }
            Refusal::Held { address, by } => write!(
                f,
                "requested address {address} is held by the older Service {}/{} (sharing is \
                 not supported)",
                by.0, by.1
            ),
            Refusal::NoPoolMatches => write!(f, "no address pool admits this Service"),
            Refusal::Exhausted { pools } => {
                write!(f, "no free address in address pool(s) {}", pools.join(", "))
            }
        }
    }
}

/// How a pool is announced: one entry per `L2Advertisement` covering it, sorted by name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct L2Scope {
    pub adverts: Vec<L2Announce>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct L2Announce {
    /// `metadata.name` of the `L2Advertisement`.
    pub name: String,
    /// Nodes announcing (any selector); empty = every node.
    pub node_selectors: Vec<LabelSelector>,
    /// Interfaces to announce on; empty = every interface.
    pub interfaces: Vec<String>,
}

/// Interfaces a node announces on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interfaces {
    All,
    Only(BTreeSet<String>),
}

impl L2Scope {
    /// Whether a node with these labels announces, and on which interfaces (the union over
    /// the advertisements selecting it). `None`: the node does not announce.
    pub fn for_node(&self, node_labels: &BTreeMap<String, String>) -> Option<Interfaces> {
        let mut only = BTreeSet::new();
        let mut any = false;
        for a in &self.adverts {
            let selected = a.node_selectors.is_empty()
                || a.node_selectors
                    .iter()
                    .any(|s| selector_matches(s, node_labels));
            if !selected {
                continue;
            }
            if a.interfaces.is_empty() {
                return Some(Interfaces::All);
            }
            any = true;
            only.extend(a.interfaces.iter().cloned());
        }
        any.then_some(Interfaces::Only(only))
    }
}

/// The `L2Advertisement`s announcing the pool named `pool` (by name, by pool selector, or by
/// naming no pool at all). `None`: the pool does not exist or is not announced.
pub fn l2_for(pool: &str, pools: &[IpAddressPool], l2: &[L2Advertisement]) -> Option<L2Scope> {
    let named: Vec<&IpAddressPool> = pools.iter().filter(|p| p.name() == pool).collect();
    if named.is_empty() {
        return None;
    }
    let mut adverts: Vec<(&str, &str, L2Announce)> = l2
        .iter()
        .filter(|a| named.iter().any(|p| a.covers(p)))
        .map(|a| {
            (
                a.name(),
                a.metadata.namespace.as_deref().unwrap_or(""),
                L2Announce {
                    name: a.name().to_string(),
                    node_selectors: a.spec.node_selectors.clone(),
                    interfaces: a.spec.interfaces.clone(),
                },
            )
        })
        .collect();
    if adverts.is_empty() {
        return None;
    }
    adverts.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    Some(L2Scope {
        adverts: adverts.into_iter().map(|(_, _, a)| a).collect(),
    })
}

/// A pool with its IPv4 ranges (as integers, sorted) and its place in the trial order.
struct Pool<'a> {
    pool: &'a IpAddressPool,
    ranges: Vec<(u32, u32)>,
}

impl Pool<'_> {
    fn name(&self) -> &str {
        self.pool.name()
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        if self.pool.spec.avoid_buggy_ips && is_buggy(ip) {
            return false;
        }
        let n = u32::from(ip);
        self.ranges.iter().any(|(a, b)| *a <= n && n <= *b)
    }

    /// Pinned: restricted to some namespaces or Services (MetalLB tries these first).
    fn pinned(&self) -> bool {
        self.pool.spec.service_allocation.as_ref().is_some_and(|a| {
            !a.namespaces.is_empty()
                || !a.namespace_selectors.is_empty()
                || !a.service_selectors.is_empty()
        })
    }

    fn order_key(&self) -> (bool, i32, bool, &str, &str) {
        let prio = self.pool.priority();
        (
            prio.is_none(),
            prio.unwrap_or(0),
            !self.pinned(),
            self.name(),
            self.pool.metadata.namespace.as_deref().unwrap_or(""),
        )
    }

    /// `spec.serviceAllocation` lets `svc` (in `namespace`) use this pool.
    fn admits(&self, namespace: &str, svc: &Service) -> bool {
        let Some(alloc) = &self.pool.spec.service_allocation else {
            return true;
        };
        // namespaceSelectors cannot be evaluated: they match no namespace.
        let ns_restricted = !alloc.namespaces.is_empty() || !alloc.namespace_selectors.is_empty();
        if ns_restricted && !alloc.namespaces.iter().any(|n| n == namespace) {
            return false;
        }
        if alloc.service_selectors.is_empty() {
            return true;
        }
        let empty = BTreeMap::new();
        let labels = svc.metadata.labels.as_ref().unwrap_or(&empty);
        alloc
            .service_selectors
            .iter()
            .any(|s| selector_matches(s, labels))
    }

    /// Lowest address of the pool nobody holds.
    fn lowest_free(&self, held: &BTreeMap<Ipv4Addr, ServiceKey>) -> Option<Ipv4Addr> {
        for &(a, b) in &self.ranges {
            let mut n = u64::from(a);
            while n <= u64::from(b) {
                let ip = Ipv4Addr::from(n as u32);
                let excluded = self.pool.spec.avoid_buggy_ips && is_buggy(ip);
                if !excluded && !held.contains_key(&ip) {
                    return Some(ip);
                }
                n += 1;
            }
        }
        None
    }
}

/// What a Service asks for.
#[derive(Default)]
struct Request {
    address: Option<Ipv4Addr>,
    pool: Option<String>,
}

fn annotation<'a>(svc: &'a Service, keys: &[&str]) -> Vec<(&'a str, &'a str)> {
    let Some(ann) = &svc.metadata.annotations else {
        return Vec::new();
    };
    keys.iter()
        .filter_map(|k| ann.get_key_value(*k))
        .map(|(k, v)| (k.as_str(), v.trim()))
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn request(svc: &Service, warnings: &mut Vec<String>, who: &str) -> Result<Request, String> {
    let mut asked: Vec<(&str, &str)> = Vec::new();
    if let Some(ip) = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        asked.push(("spec.loadBalancerIP", ip));
    }
    for (k, v) in annotation(svc, &LOAD_BALANCER_IPS_ANNOTATIONS) {
        asked.extend(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| (k, s)),
        );
    }
    let mut v4 = BTreeSet::new();
    let mut v6 = false;
    for (from, s) in &asked {
        match s.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                v4.insert(a);
            }
            Ok(IpAddr::V6(_)) => v6 = true,
            Err(_) => return Err(format!("{from}: {s:?} is not an IP address")),
        }
    }
    if v4.len() > 1 {
        let list: Vec<String> = v4.iter().map(ToString::to_string).collect();
        return Err(format!(
            "more than one IPv4 address requested ({}): at most one per Service",
            list.join(", ")
        ));
    }
    if v6 {
        if v4.is_empty() {
            return Err("only IPv6 addresses requested: xlb assigns IPv4 addresses only".into());
        }
        warnings.push(format!(
            "Service {who}: requested IPv6 addresses are ignored (IPv4 only)"
        ));
    }
    let pools: BTreeSet<&str> = annotation(svc, &ADDRESS_POOL_ANNOTATIONS)
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    if pools.len() > 1 {
        return Err(format!(
            "{} and {} name different pools",
            ADDRESS_POOL_ANNOTATIONS[0], ADDRESS_POOL_ANNOTATIONS[1]
        ));
    }
    if !annotation(svc, &ALLOW_SHARED_IP_ANNOTATIONS).is_empty() {
        warnings.push(format!(
            "Service {who}: allow-shared-ip is not supported: the Service gets an address of \
             its own"
        ));
    }
    Ok(Request {
        address: v4.into_iter().next(),
        pool: pools.into_iter().next().map(str::to_string),
    })
}

fn is_load_balancer(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"))
}

fn key_of(svc: &Service) -> Option<ServiceKey> {
    let name = svc.metadata.name.as_deref().filter(|n| !n.is_empty())?;
    let ns = svc
        .metadata
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some((ns.to_string(), name.to_string()))
}

/// Oldest first, missing creation time last, then namespace and name.
fn age_key(svc: &Service, key: &ServiceKey) -> (bool, Option<Timestamp>, ServiceKey) {
    let t = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (t.is_none(), t, key.clone())
}

/// Assigns addresses to every LoadBalancer Service of ours (see the module documentation).
///
/// `sticky` holds what each Service (namespace, name) has now: its
/// `status.loadBalancer.ingress` with the API server source, the agent's own record with
/// the file source. Only the IPv4 addresses the caller passes are considered.
pub fn assign<S: std::borrow::Borrow<Service>>(
    services: &[S],
    pools: &[IpAddressPool],
    l2: &[L2Advertisement],
    sticky: &BTreeMap<(String, String), Vec<Ipv4Addr>>,
) -> Assignment {
    let mut out = Assignment::default();
    let mut warnings: Vec<String> = pools.iter().flat_map(|p| p.unsupported()).collect();

    let mut usable: Vec<Pool> = pools
        .iter()
        .filter(|p| !p.name().is_empty())
        .map(|p| Pool {
            pool: p,
            ranges: p
                .ipv4_ranges()
                .into_iter()
                .map(|(a, b)| (u32::from(a), u32::from(b)))
                .collect(),
        })
        .filter(|p| !p.ranges.is_empty())
        .collect();
    usable.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    let exists = |name: &str| pools.iter().any(|p| p.name() == name);

    let mut svcs: Vec<(ServiceKey, &Service)> = services
        .iter()
        .map(|s| s.borrow())
        .filter(|s| is_load_balancer(s))
        .filter_map(|s| key_of(s).map(|k| (k, s)))
        .collect();
    svcs.sort_by_cached_key(|(k, s)| age_key(s, k));
    // A Service listed twice (not possible from one source): the first in age order counts.
    svcs.dedup_by(|b, a| a.0 == b.0);

    let mut held: BTreeMap<Ipv4Addr, ServiceKey> = BTreeMap::new();
    let grant = |out: &mut Assignment,
                 held: &mut BTreeMap<Ipv4Addr, ServiceKey>,
                 key: &ServiceKey,
                 ip: Ipv4Addr,
                 pool: &Pool,
                 how: How| {
        held.insert(ip, key.clone());
        out.services.insert(
            key.clone(),
            Outcome::Granted(Granted {
                addresses: vec![ip],
                pool: pool.name().to_string(),
                how,
                l2: l2_for(pool.name(), pools, l2),
            }),
        );
    };
    let refuse = |out: &mut Assignment, key: &ServiceKey, why: Refusal| {
        out.services.insert(key.clone(), Outcome::Refused(why));
    };

    // First pass: requests and sticky addresses, oldest Service first.
    let mut pending: Vec<(&ServiceKey, &Service, Option<String>)> = Vec::new();
    for (key, svc) in &svcs {
        let class = svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref());
        if let Some(c) = class.filter(|c| *c != LB_CLASS) {
            refuse(&mut out, key, Refusal::OtherClass(c.to_string()));
            continue;
        }
        let who = format!("{}/{}", key.0, key.1);
        let req = match request(svc, &mut warnings, &who) {
            Ok(r) => r,
            Err(m) => {
                refuse(&mut out, key, Refusal::InvalidRequest(m));
                continue;
            }
        };
        if let Some(p) = &req.pool
            && !exists(p)
        {
            refuse(&mut out, key, Refusal::UnknownPool(p.clone()));
            continue;
        }
        let in_pool = |p: &Pool| req.pool.as_deref().is_none_or(|want| p.name() == want);
        if let Some(ip) = req.address {
            let holding: Vec<&Pool> = usable
                .iter()
                .filter(|p| in_pool(p) && p.contains(ip))
                .collect();
            let Some(first) = holding.first() else {
                refuse(
                    &mut out,
                    key,
                    Refusal::NotInPool {
                        address: ip,
                        pool: req.pool.clone(),
                    },
                );
                continue;
            };
            let Some(pool) = holding.iter().find(|p| p.admits(&key.0, svc)) else {
                refuse(
                    &mut out,
                    key,
                    Refusal::PoolNotAllowed {
                        address: Some(ip),
                        pool: first.name().to_string(),
                    },
                );
                continue;
            };
            if let Some(by) = held.get(&ip) {
                let by = by.clone();
                refuse(&mut out, key, Refusal::Held { address: ip, by });
                continue;
            }
            grant(&mut out, &mut held, key, ip, pool, How::Requested);
            continue;
        }
        // Sticky: the lowest still valid address it holds.
        let mut mine: Vec<Ipv4Addr> = sticky.get(key).cloned().unwrap_or_default();
        mine.sort();
        let kept = mine.into_iter().find_map(|ip| {
            if held.contains_key(&ip) {
                return None;
            }
            usable
                .iter()
                .find(|p| in_pool(p) && p.contains(ip) && p.admits(&key.0, svc))
                .map(|p| (ip, p))
        });
        match kept {
            Some((ip, pool)) => grant(&mut out, &mut held, key, ip, pool, How::Kept),
            None => pending.push((key, svc, req.pool)),
        }
    }

    // Second pass: fresh addresses for the rest, oldest first.
    for (key, svc, want) in pending {
        let eligible: Vec<&Pool> = usable
            .iter()
            .filter(|p| match &want {
                Some(w) => p.name() == w,
                None => p.pool.auto_assign(),
            })
            .filter(|p| p.admits(&key.0, svc))
            .collect();
        if eligible.is_empty() {
            let why = match want {
                // Named but IPv6 only: nothing to give.
                Some(w) if !usable.iter().any(|p| p.name() == w) => {
                    Refusal::Exhausted { pools: vec![w] }
                }
                Some(w) => Refusal::PoolNotAllowed {
                    address: None,
                    pool: w,
                },
                None => Refusal::NoPoolMatches,
            };
            refuse(&mut out, key, why);
            continue;
        }
        match eligible
            .iter()
            .find_map(|p| p.lowest_free(&held).map(|ip| (ip, *p)))
        {
            Some((ip, pool)) => grant(&mut out, &mut held, key, ip, pool, How::Allocated),
            None => {
                let mut names: Vec<String> =
                    eligible.iter().map(|p| p.name().to_string()).collect();
                names.dedup();
                refuse(&mut out, key, Refusal::Exhausted { pools: names });
            }
        }
    }

    warnings.sort();
    warnings.dedup();
    out.warnings = warnings;
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::metallb::{IpAddressPoolSpec, L2AdvertisementSpec, ServiceAllocation};
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        LabelSelectorRequirement, ObjectMeta, Time,
    };

    type Sticky = BTreeMap<(String, String), Vec<Ipv4Addr>>;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn key(ns: &str, name: &str) -> ServiceKey {
        (ns.to_string(), name.to_string())
    }

    /// A LoadBalancer Service in `dev`, created at `00:00:<sec>` (`None`: no creation time).
    fn lb(name: &str, sec: Option<u32>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("dev".into()),
                creation_timestamp: sec
                    .map(|s| Time(format!("2024-05-01T00:00:{s:02}Z").parse().unwrap())),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_ip(mut s: Service, a: &str) -> Service {
        s.spec.as_mut().unwrap().load_balancer_ip = Some(a.into());
        s
    }

    fn annotate(mut s: Service, k: &str, v: &str) -> Service {
        s.metadata
            .annotations
            .get_or_insert_default()
            .insert(k.into(), v.into());
        s
    }

    fn label(mut s: Service, k: &str, v: &str) -> Service {
        s.metadata
            .labels
            .get_or_insert_default()
            .insert(k.into(), v.into());
        s
    }

    fn pool(name: &str, addrs: &[&str]) -> IpAddressPool {
        IpAddressPool {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("metallb-system".into()),
                ..Default::default()
            },
            spec: IpAddressPoolSpec {
                addresses: addrs.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        }
    }

    fn alloc(mut p: IpAddressPool, a: ServiceAllocation) -> IpAddressPool {
        p.spec.service_allocation = Some(a);
        p
    }

    fn l2_all() -> Vec<L2Advertisement> {
        vec![L2Advertisement {
            metadata: ObjectMeta {
                name: Some("empty".into()),
                namespace: Some("metallb-system".into()),
                ..Default::default()
            },
            spec: L2AdvertisementSpec::default(),
        }]
    }

    fn run(svcs: &[Service], pools: &[IpAddressPool]) -> Assignment {
        assign(svcs, pools, &l2_all(), &Sticky::new())
    }

    /// `name -> address or refusal` for Services in `dev`.
    fn table(a: &Assignment) -> BTreeMap<String, Result<Ipv4Addr, Refusal>> {
        a.services
            .iter()
            .map(|((_, n), o)| {
                let v = match o {
                    Outcome::Granted(g) => {
                        assert_eq!(g.addresses.len(), 1);
                        Ok(g.addresses[0])
                    }
                    Outcome::Refused(r) => Err(r.clone()),
                };
                (n.clone(), v)
            })
            .collect()
    }

    fn got(a: &Assignment, name: &str) -> Result<Ipv4Addr, Refusal> {
        table(a)
            .remove(name)
            .unwrap_or_else(|| panic!("{name} not assigned"))
    }

    /// Every address a Service holds, as sticky input for the next round.
    fn sticky_of(a: &Assignment) -> Sticky {
        a.granted()
            .map(|(k, g)| (k.clone(), g.addresses.clone()))
            .collect()
    }

    fn seed_pool() -> IpAddressPool {
        pool("example", &["172.18.255.200-172.18.255.250"])
    }

    #[test]
    fn seed_pool_gives_first_address_to_first_service() {
        let a = run(&[lb("nginx-service", Some(1))], &[seed_pool()]);
        let Some(Outcome::Granted(g)) = a.get("dev", "nginx-service") else {
            panic!("{a:?}");
        };
        assert_eq!(g.addresses, [ip("172.18.255.200")]);
        assert_eq!(g.pool, "example");
        assert_eq!(g.how, How::Allocated);
        let l2 =
            g.l2.as_ref()
                .expect("the empty L2Advertisement announces every pool");
        assert_eq!(l2.adverts.len(), 1);
        assert_eq!(l2.adverts[0].name, "empty");
        assert_eq!(l2.for_node(&BTreeMap::new()), Some(Interfaces::All));
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
        // The next Services get the next addresses, in age order.
        let a = run(
            &[lb("c", Some(3)), lb("b", None), lb("a", Some(2))],
            &[seed_pool()],
        );
        assert_eq!(got(&a, "a"), Ok(ip("172.18.255.200")));
        assert_eq!(got(&a, "c"), Ok(ip("172.18.255.201")));
        assert_eq!(got(&a, "b"), Ok(ip("172.18.255.202")), "no time: last");
    }

    #[test]
    fn only_load_balancers_of_our_class() {
        let mut cluster_ip = lb("cip", Some(1));
        cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let mut other = lb("other", Some(2));
        other.spec.as_mut().unwrap().load_balancer_class = Some("example.com/lb".into());
        let mut ours = lb("ours", Some(3));
        ours.spec.as_mut().unwrap().load_balancer_class = Some(LB_CLASS.into());
        let a = run(
            &[cluster_ip, other, ours, lb("unset", Some(4))],
            &[seed_pool()],
        );
        let t = table(&a);
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(
            t["other"],
            Err(Refusal::OtherClass("example.com/lb".into()))
        );
        assert_eq!(t["ours"], Ok(ip("172.18.255.200")));
        assert_eq!(t["unset"], Ok(ip("172.18.255.201")));
    }

    #[test]
    fn requests() {
        let p = [seed_pool()];
        let a = run(
            &[
                lb("auto", Some(1)),
                with_ip(lb("spec", Some(2)), "172.18.255.200"),
                annotate(
                    lb("ann", Some(3)),
                    "metallb.universe.tf/loadBalancerIPs",
                    " 172.18.255.210 , fd00::1",
                ),
                annotate(
                    lb("ann2", Some(4)),
                    "metallb.io/loadBalancerIPs",
                    "172.18.255.211",
                ),
                with_ip(lb("outside", Some(5)), "10.0.0.1"),
                annotate(
                    lb("two", Some(6)),
                    "metallb.io/loadBalancerIPs",
                    "172.18.255.220,172.18.255.221",
                ),
                with_ip(lb("bad", Some(7)), "172.18.255"),
                annotate(lb("v6", Some(8)), "metallb.io/loadBalancerIPs", "fd00::1"),
            ],
            &p,
        );
        let t = table(&a);
        // The older unrequested Service does not take the requested address.
        assert_eq!(t["spec"], Ok(ip("172.18.255.200")));
        assert_eq!(t["auto"], Ok(ip("172.18.255.201")));
        assert_eq!(t["ann"], Ok(ip("172.18.255.210")));
        assert_eq!(t["ann2"], Ok(ip("172.18.255.211")));
        assert_eq!(
            t["outside"],
            Err(Refusal::NotInPool {
                address: ip("10.0.0.1"),
                pool: None
            })
        );
        assert!(
            matches!(&t["two"], Err(Refusal::InvalidRequest(m)) if m.contains("more than one"))
        );
        assert!(
            matches!(&t["bad"], Err(Refusal::InvalidRequest(m)) if m.contains("spec.loadBalancerIP: \"172.18.255\""))
        );
        assert!(matches!(&t["v6"], Err(Refusal::InvalidRequest(m)) if m.contains("IPv6")));
        let Some(Outcome::Granted(g)) = a.get("dev", "ann") else {
            panic!()
        };
        assert_eq!(g.how, How::Requested);
        assert_eq!(
            a.warnings,
            ["Service dev/ann: requested IPv6 addresses are ignored (IPv4 only)"]
        );
        // Same address through both fields: one request.
        let both = annotate(
            with_ip(lb("both", Some(1)), "172.18.255.230"),
            "metallb.io/loadBalancerIPs",
            "172.18.255.230",
        );
        assert_eq!(got(&run(&[both], &p), "both"), Ok(ip("172.18.255.230")));
    }

    #[test]
    fn conflicting_requests_older_wins() {
        let p = [seed_pool()];
        let older = with_ip(lb("older", Some(1)), "172.18.255.205");
        let newer = with_ip(lb("newer", Some(2)), "172.18.255.205");
        for svcs in [
            vec![older.clone(), newer.clone()],
            vec![newer.clone(), older.clone()],
        ] {
            let a = run(&svcs, &p);
            assert_eq!(got(&a, "older"), Ok(ip("172.18.255.205")));
            assert_eq!(
                got(&a, "newer"),
                Err(Refusal::Held {
                    address: ip("172.18.255.205"),
                    by: key("dev", "older")
                })
            );
        }
        // An older Service asking for a newer one's kept address wins it; the newer one moves.
        let a = run(&[lb("first", Some(5))], &p);
        let mut sticky = sticky_of(&a);
        assert_eq!(sticky[&key("dev", "first")], [ip("172.18.255.200")]);
        sticky.insert(key("dev", "zero"), vec![]);
        let zero = with_ip(lb("zero", Some(0)), "172.18.255.200");
        let a = assign(&[lb("first", Some(5)), zero], &p, &l2_all(), &sticky);
        assert_eq!(got(&a, "zero"), Ok(ip("172.18.255.200")));
        assert_eq!(got(&a, "first"), Ok(ip("172.18.255.201")));
        // A newer Service asking for an older one's kept address is refused.
        let late = with_ip(lb("late", Some(9)), "172.18.255.200");
        let a = assign(
            &[lb("first", Some(5)), late],
            &p,
            &l2_all(),
            &sticky_of(&run(&[lb("first", Some(5))], &p)),
        );
        assert_eq!(got(&a, "first"), Ok(ip("172.18.255.200")));
        assert!(matches!(got(&a, "late"), Err(Refusal::Held { .. })));
    }

    #[test]
    fn exhaustion_refuses_only_the_newest() {
        let small = [pool("small", &["10.0.0.1-10.0.0.2"])];
        let svcs = [lb("a", Some(1)), lb("b", Some(2)), lb("c", Some(3))];
        let a = run(&svcs, &small);
        assert_eq!(got(&a, "a"), Ok(ip("10.0.0.1")));
        assert_eq!(got(&a, "b"), Ok(ip("10.0.0.2")));
        assert_eq!(
            got(&a, "c"),
            Err(Refusal::Exhausted {
                pools: vec!["small".into()]
            })
        );
        assert_eq!(
            Refusal::Exhausted {
                pools: vec!["small".into()]
            }
            .to_string(),
            "no free address in address pool(s) small"
        );
        // A new, older-looking Service without an address does not evict kept ones.
        let sticky = sticky_of(&a);
        let mut svcs = svcs.to_vec();
        svcs.push(lb("zero", Some(0)));
        let b = assign(&svcs, &small, &l2_all(), &sticky);
        assert_eq!(got(&b, "a"), Ok(ip("10.0.0.1")));
        assert_eq!(got(&b, "b"), Ok(ip("10.0.0.2")));
        assert!(matches!(got(&b, "c"), Err(Refusal::Exhausted { .. })));
        assert!(matches!(got(&b, "zero"), Err(Refusal::Exhausted { .. })));
    }

    #[test]
    fn sticky_survives_removal_of_an_older_service() {
        let p = [seed_pool()];
        let a = run(&[lb("a", Some(1)), lb("b", Some(2))], &p);
        assert_eq!(got(&a, "b"), Ok(ip("172.18.255.201")));
        // Without memory, b would slide down to .200 ...
        let fresh = run(&[lb("b", Some(2))], &p);
        assert_eq!(got(&fresh, "b"), Ok(ip("172.18.255.200")));
        // ... with it, b keeps .201, and a newcomer gets the freed .200.
        let b = assign(
            &[lb("b", Some(2)), lb("c", Some(3))],
            &p,
            &l2_all(),
            &sticky_of(&a),
        );
        assert_eq!(got(&b, "b"), Ok(ip("172.18.255.201")));
        assert_eq!(got(&b, "c"), Ok(ip("172.18.255.200")));
        let Some(Outcome::Granted(g)) = b.get("dev", "b") else {
            panic!()
        };
        assert_eq!(g.how, How::Kept);
        // A sticky address outside every pool (the pool shrank) is dropped.
        let shrunk = [pool("example", &["172.18.255.210-172.18.255.250"])];
        let c = assign(&[lb("b", Some(2))], &shrunk, &l2_all(), &sticky_of(&a));
        assert_eq!(got(&c, "b"), Ok(ip("172.18.255.210")));
        // A sticky address is kept even when the pool stopped auto-assigning.
        let mut manual = seed_pool();
        manual.spec.auto_assign = Some(false);
        let d = assign(&[lb("b", Some(2))], &[manual], &l2_all(), &sticky_of(&a));
        assert_eq!(got(&d, "b"), Ok(ip("172.18.255.201")));
    }

    #[test]
    fn stable_under_input_order() {
        let mut gold = pool("gold", &["10.1.0.0/30"]);
        gold.spec.service_allocation = Some(ServiceAllocation {
            priority: Some(1),
            service_selectors: vec![LabelSelector {
                match_labels: Some([("tier".to_string(), "gold".to_string())].into()),
                ..Default::default()
            }],
            ..Default::default()
        });
        let pools = vec![
            gold,
            pool("b-pool", &["10.2.0.0-10.2.0.2"]),
            pool("a-pool", &["10.3.0.0-10.3.0.1", "fd00::/64"]),
        ];
        let mut svcs = vec![
            lb("s1", Some(1)),
            lb("s2", Some(1)),
            lb("s3", None),
            lb("s4", None),
            label(lb("g1", Some(4)), "tier", "gold"),
            label(lb("g2", Some(3)), "tier", "gold"),
            with_ip(lb("r1", Some(9)), "10.2.0.1"),
            with_ip(lb("r2", Some(8)), "10.2.0.1"),
            annotate(lb("p1", Some(7)), "metallb.io/address-pool", "b-pool"),
        ];
        let want = run(&svcs, &pools);
        let mut l2 = l2_all();
        l2.push(L2Advertisement {
            metadata: ObjectMeta {
                name: Some("a-first".into()),
                ..Default::default()
            },
            spec: L2AdvertisementSpec {
                ip_address_pools: vec!["gold".into()],
                interfaces: vec!["eth1".into()],
                ..Default::default()
            },
        });
        let want_l2 = assign(&svcs, &pools, &l2, &Sticky::new());
        // A fixed pseudo-random walk through permutations.
        fn swap<T>(v: &mut [T], i: usize, j: usize) {
            let n = v.len();
            v.swap(i % n, j % n);
        }
        let mut pools = pools;
        let mut seed = 0x2545_f491_u64;
        for _ in 0..50 {
            for v in 0..3 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let (i, j) = ((seed >> 33) as usize, (seed >> 17) as usize);
                match v {
                    0 => swap(&mut svcs, i, j),
                    1 => swap(&mut pools, i, j),
                    _ => swap(&mut l2, i, j),
                }
            }
            assert_eq!(run(&svcs, &pools), want);
            assert_eq!(assign(&svcs, &pools, &l2, &Sticky::new()), want_l2);
        }
        let t = table(&want);
        assert_eq!(t["s1"], Ok(ip("10.3.0.0")), "a-pool before b-pool by name");
        assert_eq!(t["s2"], Ok(ip("10.3.0.1")));
        assert_eq!(t["g2"], Ok(ip("10.1.0.0")), "gold has priority 1");
        assert_eq!(t["g1"], Ok(ip("10.1.0.1")));
        assert_eq!(t["r2"], Ok(ip("10.2.0.1")));
        assert!(matches!(t["r1"], Err(Refusal::Held { .. })));
        assert_eq!(t["p1"], Ok(ip("10.2.0.0")));
        assert_eq!(t["s3"], Ok(ip("10.2.0.2")));
        assert_eq!(
            t["s4"],
            Err(Refusal::Exhausted {
                pools: vec!["a-pool".into(), "b-pool".into()]
            })
        );
        // gold is announced by both advertisements, sorted by name.
        let Some(Outcome::Granted(g)) = want_l2.get("dev", "g1") else {
            panic!()
        };
        let names: Vec<_> =
            g.l2.as_ref()
                .unwrap()
                .adverts
                .iter()
                .map(|a| &a.name)
                .collect();
        assert_eq!(names, ["a-first", "empty"]);
    }

    #[test]
    fn auto_assign_false() {
        let mut manual = pool("manual", &["10.9.0.1-10.9.0.9"]);
        manual.spec.auto_assign = Some(false);
        let pools = [manual];
        let a = run(
            &[
                lb("plain", Some(1)),
                with_ip(lb("asked", Some(2)), "10.9.0.5"),
                annotate(
                    lb("named", Some(3)),
                    "metallb.universe.tf/address-pool",
                    "manual",
                ),
                annotate(lb("ghost", Some(4)), "metallb.io/address-pool", "nope"),
            ],
            &pools,
        );
        let t = table(&a);
        assert_eq!(t["plain"], Err(Refusal::NoPoolMatches));
        assert_eq!(t["asked"], Ok(ip("10.9.0.5")));
        assert_eq!(t["named"], Ok(ip("10.9.0.1")));
        assert_eq!(t["ghost"], Err(Refusal::UnknownPool("nope".into())));
        // A requested address must be in the named pool.
        let other = pool("other", &["10.8.0.0/24"]);
        let both = annotate(
            with_ip(lb("x", Some(1)), "10.8.0.7"),
            "metallb.io/address-pool",
            "manual",
        );
        assert_eq!(
            got(&run(&[both], &[pools[0].clone(), other]), "x"),
            Err(Refusal::NotInPool {
                address: ip("10.8.0.7"),
                pool: Some("manual".into())
            })
        );
        // Two annotations naming different pools.
        let two = annotate(
            annotate(lb("y", Some(1)), "metallb.io/address-pool", "manual"),
            "metallb.universe.tf/address-pool",
            "other",
        );
        assert!(matches!(
            got(&run(&[two], &pools), "y"),
            Err(Refusal::InvalidRequest(_))
        ));
    }

    #[test]
    fn avoid_buggy_ips() {
        let mut p = pool("p", &["10.0.0.254-10.0.1.1"]);
        let svcs = [lb("a", Some(1)), lb("b", Some(2)), lb("c", Some(3))];
        let t = table(&run(&svcs, std::slice::from_ref(&p)));
        assert_eq!(t["a"], Ok(ip("10.0.0.254")));
        assert_eq!(t["b"], Ok(ip("10.0.0.255")));
        assert_eq!(t["c"], Ok(ip("10.0.1.0")));
        p.spec.avoid_buggy_ips = true;
        let t = table(&run(&svcs, std::slice::from_ref(&p)));
        assert_eq!(t["a"], Ok(ip("10.0.0.254")));
        assert_eq!(t["b"], Ok(ip("10.0.1.1")));
        assert!(matches!(t["c"], Err(Refusal::Exhausted { .. })));
        // Asking for a buggy address of such a pool: not in the pool.
        let asked = with_ip(lb("d", Some(1)), "10.0.0.255");
        assert!(matches!(
            got(&run(&[asked], &[p]), "d"),
            Err(Refusal::NotInPool { .. })
        ));
    }

    #[test]
    fn priority() {
        let prio = |name: &str, addr: &str, p: Option<i32>| {
            alloc(
                pool(name, &[addr]),
                ServiceAllocation {
                    priority: p,
                    ..Default::default()
                },
            )
        };
        let pools = [
            prio("a-unset", "10.0.0.1/32", None),
            prio("b-ten", "10.0.0.2/32", Some(10)),
            prio("c-two", "10.0.0.3/32", Some(2)),
            prio("d-zero", "10.0.0.4/32", Some(0)),
            pool("e-none", &["10.0.0.5/32"]),
        ];
        let svcs: Vec<Service> = (1..=6).map(|i| lb(&format!("s{i}"), Some(i))).collect();
        let t = table(&run(&svcs, &pools));
        let order: Vec<_> = (1..=5)
            .map(|i| t[&format!("s{i}")].clone().unwrap())
            .collect();
        assert_eq!(
            order,
            ["10.0.0.3", "10.0.0.2", "10.0.0.1", "10.0.0.4", "10.0.0.5"].map(ip)
        );
        assert!(matches!(t["s6"], Err(Refusal::Exhausted { ref pools }) if pools.len() == 5));
        // Without priorities, pools pinned to the namespace come before open ones.
        let pinned = alloc(
            pool("z-dev", &["10.0.1.1/32"]),
            ServiceAllocation {
                namespaces: vec!["dev".into()],
                ..Default::default()
            },
        );
        let t = table(&run(
            &svcs[..1],
            &[pool("a-open", &["10.0.2.1/32"]), pinned],
        ));
        assert_eq!(t["s1"], Ok(ip("10.0.1.1")));
    }

    #[test]
    fn service_allocation_filters() {
        let gold = alloc(
            pool("gold", &["10.0.0.1-10.0.0.3"]),
            ServiceAllocation {
                service_selectors: vec![LabelSelector {
                    match_expressions: Some(vec![LabelSelectorRequirement {
                        key: "tier".into(),
                        operator: "In".into(),
                        values: Some(vec!["gold".into(), "platinum".into()]),
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        let prod_only = alloc(
            pool("prod", &["10.0.1.1-10.0.1.3"]),
            ServiceAllocation {
                namespaces: vec!["prod".into()],
                ..Default::default()
            },
        );
        let pools = [gold, prod_only];
        let mut in_prod = lb("p", Some(4));
        in_prod.metadata.namespace = Some("prod".into());
        let a = run(
            &[
                label(lb("g", Some(1)), "tier", "platinum"),
                label(lb("s", Some(2)), "tier", "silver"),
                with_ip(lb("r", Some(3)), "10.0.1.2"),
                in_prod,
            ],
            &pools,
        );
        let t = table(&a);
        assert_eq!(t["g"], Ok(ip("10.0.0.1")));
        assert_eq!(t["s"], Err(Refusal::NoPoolMatches));
        assert_eq!(
            t["r"],
            Err(Refusal::PoolNotAllowed {
                address: Some(ip("10.0.1.2")),
                pool: "prod".into()
            })
        );
        assert_eq!(
            a.get("prod", "p"),
            Some(&Outcome::Granted(Granted {
                addresses: vec![ip("10.0.1.1")],
                pool: "prod".into(),
                how: How::Allocated,
                l2: l2_for("prod", &pools, &l2_all()),
            }))
        );
        // namespaceSelectors cannot be honoured: warned, and they admit no namespace.
        let by_label = alloc(
            pool("team", &["10.0.2.1/32"]),
            ServiceAllocation {
                namespace_selectors: vec![LabelSelector::default()],
                ..Default::default()
            },
        );
        let a = run(&[lb("n", Some(1))], &[by_label]);
        assert_eq!(got(&a, "n"), Err(Refusal::NoPoolMatches));
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("namespaceSelectors is not honoured"));
    }

    #[test]
    fn ipv6_only_pool_is_skipped() {
        let pools = [pool("v6", &["fd00::/120"]), pool("v4", &["10.0.0.1/32"])];
        let a = run(
            &[
                lb("a", Some(1)),
                annotate(lb("b", Some(2)), "metallb.io/address-pool", "v6"),
            ],
            &pools,
        );
        assert_eq!(got(&a, "a"), Ok(ip("10.0.0.1")));
        assert!(matches!(got(&a, "b"), Err(Refusal::Exhausted { .. })));
        assert!(
            a.warnings[0].contains("no IPv4 addresses"),
            "{:?}",
            a.warnings
        );
    }

    #[test]
    fn sharing_is_not_supported() {
        let p = [seed_pool()];
        let share = |name: &str, sec| {
            annotate(
                with_ip(lb(name, Some(sec)), "172.18.255.200"),
                "metallb.universe.tf/allow-shared-ip",
                "key",
            )
        };
        let a = run(&[share("tcp", 1), share("udp", 2)], &p);
        assert_eq!(got(&a, "tcp"), Ok(ip("172.18.255.200")));
        assert!(matches!(got(&a, "udp"), Err(Refusal::Held { .. })));
        assert_eq!(a.warnings.len(), 2);
        assert!(a.warnings[0].contains("allow-shared-ip is not supported"));
    }

    #[test]
    fn l2_scope() {
        let pools = [
            seed_pool(),
            {
                let mut p = pool("labelled", &["10.0.0.0/24"]);
                p.metadata.labels = Some([("announce".to_string(), "yes".to_string())].into());
                p
            },
            pool("dark", &["10.0.1.0/24"]),
        ];
        let node_sel = |host: &str| LabelSelector {
            match_labels: Some([("kubernetes.io/hostname".to_string(), host.to_string())].into()),
            ..Default::default()
        };
        let adv = |name: &str, spec: L2AdvertisementSpec| L2Advertisement {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec,
        };
        let l2 = [
            adv(
                "by-name",
                L2AdvertisementSpec {
                    ip_address_pools: vec!["example".into()],
                    node_selectors: vec![node_sel("n1")],
                    interfaces: vec!["eth0".into()],
                    ..Default::default()
                },
            ),
            adv(
                "by-label",
                L2AdvertisementSpec {
                    ip_address_pool_selectors: vec![LabelSelector {
                        match_labels: Some([("announce".to_string(), "yes".to_string())].into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ),
            adv(
                "example-n2",
                L2AdvertisementSpec {
                    ip_address_pools: vec!["example".into()],
                    node_selectors: vec![node_sel("n2")],
                    interfaces: vec!["eth1".into(), "eth2".into()],
                    ..Default::default()
                },
            ),
        ];
        assert_eq!(l2_for("dark", &pools, &l2), None);
        assert_eq!(l2_for("missing", &pools, &l2), None);
        assert_eq!(l2_for("example", &pools, &[]), None);
        let lab = l2_for("labelled", &pools, &l2).unwrap();
        assert_eq!(lab.adverts.len(), 1);
        assert_eq!(lab.adverts[0].name, "by-label");
        assert_eq!(lab.for_node(&BTreeMap::new()), Some(Interfaces::All));
        let ex = l2_for("example", &pools, &l2).unwrap();
        let names: Vec<_> = ex.adverts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["by-name", "example-n2"]);
        let host =
            |h: &str| BTreeMap::from([("kubernetes.io/hostname".to_string(), h.to_string())]);
        assert_eq!(
            ex.for_node(&host("n1")),
            Some(Interfaces::Only(["eth0".to_string()].into()))
        );
        assert_eq!(
            ex.for_node(&host("n2")),
            Some(Interfaces::Only(
                ["eth1".to_string(), "eth2".to_string()].into()
            ))
        );
        assert_eq!(ex.for_node(&host("n3")), None);
        // An assignment from an unannounced pool carries no scope.
        let a = assign(
            &[annotate(
                lb("d", Some(1)),
                "metallb.io/address-pool",
                "dark",
            )],
            &pools,
            &l2,
            &Sticky::new(),
        );
        let Some(Outcome::Granted(g)) = a.get("dev", "d") else {
            panic!()
        };
        assert_eq!(g.l2, None);
    }
}
