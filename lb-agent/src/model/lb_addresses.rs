//! LoadBalancer addresses from the MetalLB pools, as the translation uses them: which
//! address each Service serves (assigned by [`lbipam::assign`], identical on every node),
//! and which of them this node may announce.
//!
//! What keeps an address with its Service (`sticky`): its `status.loadBalancer.ingress`
//! (written by the announcing agent with the API server source; in a services file, written
//! by hand or by `kubectl get -o yaml`), then the agent's own record of what it assigned
//! (`NodeContext::held_lb_addresses`, kept in its run directory across restarts). With the
//! file source every node reads the same file, so every node computes the same answer; an
//! agent that starts after a Service was removed and holds no record could number the
//! remaining Services differently from its peers — pin addresses that must never move with
//! `spec.loadBalancerIP`, the `metallb.io/loadBalancerIPs` annotation or a status in the
//! file.
use std::borrow::Borrow;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::Service;

use super::lbipam::{self, Assignment, Interfaces, Outcome, Refusal};
use crate::source::yaml::Objects;

/// An address a Service serves from a pool, and whether this node may announce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbAddress {
    pub namespace: String,
    pub name: String,
    pub addr: Ipv4Addr,
    pub pool: String,
    /// An L2Advertisement covers the pool and selects this node on its uplink (eTP Local
    /// is checked later, with the endpoints: see `translate`).
    pub l2_here: bool,
    /// The Service has `externalTrafficPolicy: Local`: only a node with a ready local
    /// endpoint may announce it.
    pub local_only: bool,
}

/// The addresses Services hold now: their IPv4 `status.loadBalancer.ingress`, then `held`.
pub fn sticky<S: Borrow<Service>>(
    services: &[S],
    held: &BTreeMap<(String, String), Vec<Ipv4Addr>>,
) -> BTreeMap<(String, String), Vec<Ipv4Addr>> {
    let mut out = held.clone();
    for s in services.iter().map(Borrow::borrow) {
        let ips: Vec<Ipv4Addr> = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect();
        if !ips.is_empty() {
            let ns = s
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            out.insert((ns, s.metadata.name.clone().unwrap_or_default()), ips);
        }
    }
    out
}

/// The assignment for `objs` (empty when there is no pool: then xlb does no address
/// management at all, and Services keep whatever their status says).
pub fn assign(objs: &Objects, held: &BTreeMap<(String, String), Vec<Ipv4Addr>>) -> Assignment {
    if objs.ip_pools.is_empty() {
        return Assignment::default();
    }
    lbipam::assign(
        &objs.services,
        &objs.ip_pools,
        &objs.l2_adverts,
        &sticky(&objs.services, held),
    )
}

/// The granted addresses with what the announcer needs; `labels` are this node's, `uplink`
/// its uplink's name.
pub fn addresses<S: Borrow<Service>>(
    a: &Assignment,
    services: &[S],
    labels: &BTreeMap<String, String>,
    uplink: &str,
) -> Vec<LbAddress> {
    let local: BTreeSet<(String, String)> = services
        .iter()
        .map(Borrow::borrow)
        .filter(|s: &&Service| {
            s.spec
                .as_ref()
                .and_then(|sp| sp.external_traffic_policy.as_deref())
                == Some("Local")
        })
        .map(|s| {
            (
                s.metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                s.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    let mut out = Vec::new();
    for ((ns, name), g) in a.granted() {
        let l2_here =
            g.l2.as_ref()
                .and_then(|l2| l2.for_node(labels))
                .is_some_and(|i| match i {
                    Interfaces::All => true,
                    Interfaces::Only(set) => set.contains(uplink),
                });
        for &addr in &g.addresses {
            out.push(LbAddress {
                namespace: ns.clone(),
                name: name.clone(),
                addr,
                pool: g.pool.clone(),
                l2_here,
                local_only: local.contains(&(ns.clone(), name.clone())),
            });
        }
    }
    out
}

/// The refusals worth telling the Service's owner about (another class's Services are not
/// ours to comment on).
pub fn refusals(a: &Assignment) -> impl Iterator<Item = (&(String, String), &Refusal)> {
    a.services.iter().filter_map(|(k, o)| match o {
        Outcome::Refused(Refusal::OtherClass(_)) => None,
        Outcome::Refused(r) => Some((k, r)),
        Outcome::Granted(_) => None,
    })
}
