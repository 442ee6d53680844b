//! Incremental translation: a change of some Services and EndpointSlices re-translates only
//! the Services they belong to, so an endpoint change costs in proportion to what changed,
//! not to the cluster (kube-proxy's nftables mode and Cilium work so too).
//!
//! [`Translator`] keeps the objects (an [`Objects`] indexed by name, so a full
//! [`translate`] needs no copy) and every Service's part of the last translation
//! ([`ServiceOutput`]). A Service's part depends on that Service and its slices alone,
//! except in two cases, where the whole translation is redone ([`Update::Full`]):
//!
//! - frontend collisions: two Services claiming one address:port:protocol are settled by
//!   age over all Services. Each Service's frontends are indexed by owner; a change that
//!   makes two Services share one, or any collision in the last full translation, goes
//!   full (a collision is a misconfiguration, logged and posted as an Event: rare);
//! - LoadBalancer address pools: the assignment is computed over all Services (oldest
//!   first), so with pools present every change goes full;
//!
//! and for any change of the other kinds (Nodes, ServiceCIDRs, pools, advertisements).
//! `tests::incremental_equals_full` applies random sequences of changes both ways and
//! compares the maps the programmer writes.
use std::{
    collections::{BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Service;

use crate::{
    dataplane::programmer::PortChange,
    model::slice::Slice,
    model::translate::{
        self, Desired, HealthCheck, NodeContext, Proto, ServiceOutput, SvcPort, Warning,
        WarningKind,
    },
    source::yaml::Objects,
};

/// (namespace, name).
pub type Key = (String, String);

/// Services and EndpointSlices added or changed (`Some`) or deleted (`None`), by key.
/// Namespaces are filled in as the sources do (`default` when empty).
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub services: Vec<(Key, Option<Arc<Service>>)>,
    pub slices: Vec<(Key, Option<Arc<Slice>>)>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }

    /// Objects changed.
    pub fn len(&self) -> usize {
        self.services.len() + self.slices.len()
    }

    /// `other` after `self` (the later state of an object wins).
    pub fn merge(&mut self, other: Change) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
    }
}

/// One Service's translation before and after a change (empty: absent).
#[derive(Debug, Clone, Default)]
pub struct ServiceDelta {
    pub key: Key,
    pub old: ServiceOutput,
    pub new: ServiceOutput,
}

/// What [`Translator::apply`] found.
#[derive(Debug)]
pub enum Update {
    /// Only these Services' translations changed (those that did not are left out).
    Delta(Vec<ServiceDelta>),
    /// The change reaches beyond the Services it names: translate everything
    /// ([`Translator::full`]).
    Full,
}

type FeKey = (Ipv4Addr, u16, Proto);

/// The service ports that differ between the before and after of `deltas`, paired by id,
/// for [`crate::dataplane::programmer::Programmer::apply_delta`].
pub fn port_changes(deltas: &[ServiceDelta]) -> Vec<PortChange<'_>> {
    let mut changes = Vec::new();
    for d in deltas {
        // Both sorted by id.
        let (mut old, mut new) = (d.old.ports.iter().peekable(), d.new.ports.iter().peekable());
        loop {
            let (o, n) = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(o), Some(n)) if o.id == n.id => {
                    let pair = (old.next(), new.next());
                    if pair.0 == pair.1 {
                        continue;
                    }
                    pair
                }
                (Some(o), Some(n)) if o.id < n.id => (old.next(), None),
                (Some(_), None) => (old.next(), None),
                _ => (None, new.next()),
            };
            changes.push(PortChange {
                old: o.map(|p| &**p),
                new: n.map(|p| &**p),
            });
        }
    }
    changes
}

/// Adds `key` to the sorted `keys` unless it is there.
fn insert_sorted(keys: &mut Vec<Key>, key: &Key) {
    if let Err(at) = keys.binary_search(key) {
        // Most Services have one slice: room for one, not the four a push makes.
        keys.reserve_exact(1);
        keys.insert(at, key.clone());
    }
}

/// See the module docs.
#[derive(Default)]
pub struct Translator {
    objs: Objects,
    /// By Service (namespace, name): where it is in `objs`, the slices naming it as their
    /// owner, its part of the translation. One entry for the three (they were three maps:
    /// three copies of each Service's key and three table slots); absent when all three
    /// are empty.
    svcs: HashMap<Key, PerService>,
    slice_idx: HashMap<Key, usize>,
    /// Which Service each programmed frontend belongs to (its [`PerService::id`]; a copy
    /// of its key here took two strings per frontend).
    owners: HashMap<FeKey, u64>,
    /// The last [`PerService::id`] given.
    last_id: u64,
    /// The last full translation had neither collisions nor address pools, so Services
    /// translate independently.
    composable: bool,
    /// A full translation has been made since the objects were replaced.
    translated: bool,
    node: NodeContext,
    totals: Totals,
}

/// What the [`Translator`] files under one Service's key.
#[derive(Default)]
struct PerService {
    /// Unique among the entries the Translator ever made (not reused when one is dropped
    /// and its key filed again).
    id: u64,
    /// Its position in `objs.services`; None: no such Service (only slices name it, or
    /// its part is still filed until the change that removed it is translated).
    at: Option<usize>,
    /// Keys of the slices naming it as their owner, sorted (a Service owns one slice or a
    /// few: a `BTreeSet` would take a ~540-byte node for each).
    slices: Vec<Key>,
    /// Its part of the last translation (empty: none).
    out: ServiceOutput,
}

/// The entry of `key`, made if absent.
fn entry_of<'a>(
    svcs: &'a mut HashMap<Key, PerService>,
    last_id: &mut u64,
    key: Key,
) -> &'a mut PerService {
    svcs.entry(key).or_insert_with(|| {
        *last_id += 1;
        PerService {
            id: *last_id,
            ..PerService::default()
        }
    })
}

impl PerService {
    fn is_empty(&self) -> bool {
        self.at.is_none() && self.slices.is_empty() && self.out == ServiceOutput::default()
    }
}

/// Sums over every Service's part, kept up to date by each change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Services with at least one service port.
    pub services: usize,
    pub service_ports: usize,
    pub frontends: usize,
    pub warnings: usize,
    pub health_checks: usize,
}

impl Totals {
    fn add(&mut self, o: &ServiceOutput, sign: isize) {
        let f = |v: &mut usize, n: usize| *v = v.wrapping_add_signed(sign * n as isize);
        f(&mut self.services, usize::from(!o.ports.is_empty()));
        f(&mut self.service_ports, o.ports.len());
        f(
            &mut self.frontends,
            o.ports.iter().map(|p| p.frontends.len()).sum(),
        );
        f(&mut self.warnings, o.warnings.len());
        f(&mut self.health_checks, o.health_checks.len());
    }
}

fn slice_key(s: &Slice, i: usize) -> Key {
    let ns = s.namespace_or_default();
    // A slice from a manifest may have only generateName: such slices cannot collide, so
    // each gets a key of its own (no change ever names it: its document changing goes
    // full).
    match s.name.as_deref() {
        Some(n) if !n.is_empty() => (ns.to_string(), n.to_string()),
        _ => (ns.to_string(), format!("\0{i}")),
    }
}

fn owner_key(s: &Slice) -> Option<Key> {
    s.owner().map(|(ns, n)| (ns.to_string(), n.to_string()))
}

impl Translator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The objects as of the last change.
    pub fn objects(&self) -> &Objects {
        &self.objs
    }

    /// Replaces every object (a full snapshot, a file read whole); the next
    /// [`Translator::full`] translates them.
    pub fn replace(&mut self, objs: Objects) {
        self.objs = objs;
        // The parts are dropped too: nothing reads them before the next full translation.
        self.svcs.clear();
        for (i, s) in self.objs.services.iter().enumerate() {
            let (ns, n) = translate::service_key(s);
            entry_of(
                &mut self.svcs,
                &mut self.last_id,
                (ns.to_string(), n.to_string()),
            )
            .at = Some(i);
        }
        self.slice_idx.clear();
        for (i, s) in self.objs.slices.iter().enumerate() {
            let key = slice_key(s, i);
            if let Some(owner) = owner_key(s) {
                insert_sorted(
                    &mut entry_of(&mut self.svcs, &mut self.last_id, owner).slices,
                    &key,
                );
            }
            self.slice_idx.insert(key, i);
        }
        self.translated = false;
    }

    /// Translates every object (as [`translate::translate`]) and files each Service's
    /// part for the changes to come.
    pub fn full(&mut self, node: &NodeContext) -> Desired {
        let desired = translate::translate(&self.objs, node);
        self.node = translate::effective_node(&self.objs.nodes, node);
        for e in self.svcs.values_mut() {
            e.out = ServiceOutput::default();
        }
        self.svcs.retain(|_, e| !e.is_empty());
        self.owners.clear();
        fn entry<'a>(
            svcs: &'a mut HashMap<Key, PerService>,
            last_id: &mut u64,
            ns: &str,
            name: &str,
        ) -> &'a mut ServiceOutput {
            &mut entry_of(svcs, last_id, (ns.to_string(), name.to_string())).out
        }
        // Rows (`kubectl get svc` lines) are not kept: nothing reads them after a change.
        let mut collisions = false;
        for p in &desired.ports {
            let key = (p.id.namespace.clone(), p.id.name.clone());
            let e = entry_of(&mut self.svcs, &mut self.last_id, key);
            for f in &p.frontends {
                self.owners.insert((f.addr, f.port, p.id.proto), e.id);
            }
            e.out.ports.push(Arc::clone(p));
        }
        for w in &desired.warnings {
            collisions |= matches!(
                w.kind,
                WarningKind::FrontendCollision | WarningKind::LbAddress
            );
            let (ns, name) = (w.subject.namespace(), w.subject.name());
            entry(&mut self.svcs, &mut self.last_id, ns, name)
                .warnings
                .push(w.clone());
        }
        for h in &desired.health_checks {
            entry(&mut self.svcs, &mut self.last_id, &h.namespace, &h.name)
                .health_checks
                .push(h.clone());
        }
        self.composable = !collisions && self.objs.ip_pools.is_empty();
        self.totals = Totals::default();
        for e in self.svcs.values() {
            self.totals.add(&e.out, 1);
        }
        self.translated = true;
        desired
    }

    /// Applies `change` to the objects and re-translates the Services it touches. With
    /// [`Update::Full`] the objects are changed all the same: call [`Translator::full`].
    /// `node` must be what the last [`Translator::full`] was given (else: full).
    pub fn apply(&mut self, change: Change, node: &NodeContext) -> Update {
        let mut affected: BTreeSet<Key> = BTreeSet::new();
        for (key, svc) in change.services {
            affected.insert(key.clone());
            self.put_service(key, svc);
        }
        for (key, slice) in change.slices {
            if let Some(&i) = self.slice_idx.get(&key)
                && let Some(owner) = owner_key(&self.objs.slices[i])
            {
                affected.insert(owner);
            }
            if let Some(owner) = slice.as_deref().and_then(owner_key) {
                affected.insert(owner);
            }
            self.put_slice(key, slice);
        }
        if !self.translated
            || !self.composable
            || translate::effective_node(&self.objs.nodes, node) != self.node
        {
            return Update::Full;
        }
        let mut deltas = Vec::new();
        for key in affected {
            let filed = self.svcs.get(&key);
            let new = match filed.and_then(|e| e.at.map(|i| (i, &e.slices))) {
                None => ServiceOutput::default(),
                Some((i, owned)) => {
                    let slices: Vec<&Slice> = owned
                        .iter()
                        .filter_map(|k| self.slice_idx.get(k))
                        .map(|&i| &*self.objs.slices[i])
                        .collect();
                    translate::translate_service(&self.objs.services[i], &slices, &self.node)
                }
            };
            let old = filed.map(|e| e.out.clone()).unwrap_or_default();
            let id = filed.map(|e| e.id);
            if new == old {
                continue;
            }
            // Another Service's frontend (a collision the age order settles), or one
            // within the Service: the whole translation decides.
            let taken = new.ports.iter().any(|p| {
                p.frontends.iter().any(|f| {
                    self.owners
                        .get(&(f.addr, f.port, p.id.proto))
                        .is_some_and(|o| Some(*o) != id)
                })
            });
            if taken
                || new
                    .warnings
                    .iter()
                    .any(|w| w.kind == WarningKind::FrontendCollision)
            {
                self.composable = false;
                return Update::Full;
            }
            for p in &old.ports {
                for f in &p.frontends {
                    self.owners.remove(&(f.addr, f.port, p.id.proto));
                }
            }
            self.totals.add(&old, -1);
            self.totals.add(&new, 1);
            if new == ServiceOutput::default() {
                if let Some(e) = self.svcs.get_mut(&key) {
                    e.out = ServiceOutput::default();
                }
                self.tidy(&key);
            } else {
                let e = entry_of(&mut self.svcs, &mut self.last_id, key.clone());
                for p in &new.ports {
                    for f in &p.frontends {
                        self.owners.insert((f.addr, f.port, p.id.proto), e.id);
                    }
                }
                e.out = new.clone();
            }
            deltas.push(ServiceDelta { key, old, new });
        }
        Update::Delta(deltas)
    }

    /// Drops `key`'s entry when nothing is filed under it any more.
    fn tidy(&mut self, key: &Key) {
        if self.svcs.get(key).is_some_and(PerService::is_empty) {
            self.svcs.remove(key);
        }
    }

    fn put_service(&mut self, key: Key, svc: Option<Arc<Service>>) {
        match (self.svcs.get(&key).and_then(|e| e.at), svc) {
            (Some(i), Some(s)) => self.objs.services[i] = s,
            (None, Some(s)) => {
                entry_of(&mut self.svcs, &mut self.last_id, key).at =
                    Some(self.objs.services.len());
                self.objs.services.push(s);
            }
            (Some(i), None) => {
                if let Some(e) = self.svcs.get_mut(&key) {
                    e.at = None;
                }
                self.tidy(&key);
                self.objs.services.swap_remove(i);
                if let Some(moved) = self.objs.services.get(i) {
                    let (ns, n) = translate::service_key(moved);
                    entry_of(
                        &mut self.svcs,
                        &mut self.last_id,
                        (ns.to_string(), n.to_string()),
                    )
                    .at = Some(i);
                }
            }
            (None, None) => {}
        }
    }

    fn put_slice(&mut self, key: Key, slice: Option<Arc<Slice>>) {
        if let Some(&i) = self.slice_idx.get(&key)
            && let Some(owner) = owner_key(&self.objs.slices[i])
            && let Some(e) = self.svcs.get_mut(&owner)
        {
            if let Ok(at) = e.slices.binary_search(&key) {
                e.slices.remove(at);
            }
            if e.slices.is_empty() {
                e.slices = Vec::new();
            }
            self.tidy(&owner);
        }
        if let Some(owner) = slice.as_deref().and_then(owner_key) {
            insert_sorted(
                &mut entry_of(&mut self.svcs, &mut self.last_id, owner).slices,
                &key,
            );
        }
        match (self.slice_idx.get(&key).copied(), slice) {
            (Some(i), Some(s)) => self.objs.slices[i] = s,
            (None, Some(s)) => {
                self.slice_idx.insert(key, self.objs.slices.len());
                self.objs.slices.push(s);
            }
            (Some(i), None) => {
                self.slice_idx.remove(&key);
                self.objs.slices.swap_remove(i);
                if let Some(moved) = self.objs.slices.get(i) {
                    let last = self.objs.slices.len();
                    let filed = match moved.name.as_deref() {
                        Some(n) if !n.is_empty() => slice_key(moved, last),
                        // A nameless one is filed under its first position: looked up
                        // (rare: only manifests have them).
                        _ => self
                            .slice_idx
                            .iter()
                            .find(|(_, j)| **j == last)
                            .map(|(k, _)| k.clone())
                            .unwrap_or_else(|| slice_key(moved, last)),
                    };
                    self.slice_idx.insert(filed, i);
                }
            }
            (None, None) => {}
        }
    }

    /// Sums over every Service's part.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Every warning of the last translation (a scan: call it when warnings changed).
    pub fn warnings(&self) -> Vec<&Warning> {
        let mut keys: Vec<&Key> = self
            .svcs
            .iter()
            .filter(|(_, e)| !e.out.warnings.is_empty())
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        keys.iter()
            .flat_map(|k| &self.svcs[*k].out.warnings)
            .collect()
    }

    /// Every health check, sorted by node port (a scan: call it when they changed).
    pub fn health_checks(&self) -> Vec<HealthCheck> {
        let mut out: Vec<HealthCheck> = self
            .svcs
            .values()
            .flat_map(|e| e.out.health_checks.iter().cloned())
            .collect();
        out.sort_by_key(|h| h.node_port);
        out
    }

    /// Every service port, for tests.
    pub fn ports(&self) -> Vec<&SvcPort> {
        let mut v: Vec<&SvcPort> = self
            .svcs
            .values()
            .flat_map(|e| e.out.ports.iter().map(|p| &**p))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, Instant},
    };

    use lb_common::SvcMeta;
    use serde_json::json;

    use super::*;
    use crate::dataplane::programmer::{Programmer, Settings, tests::Fake};

    /// xorshift: reproducible sequences without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn node() -> NodeContext {
        NodeContext {
            node_name: "n1".into(),
            node_addrs: vec![Ipv4Addr::new(172, 18, 0, 2)],
            snat_ports: 61000..=65535,
            ..NodeContext::default()
        }
    }

    fn settings() -> Settings {
        Settings {
            min_m: 251,
            drain: Duration::from_secs(30),
            max_services: 4096,
            max_frontends: 16384,
            max_backends: 16384,
            arena: 1 << 20,
        }
    }

    /// A random Service: few ClusterIPs and NodePorts to choose from, so that Services
    /// collide now and then (which the incremental path must hand to the full one).
    fn service(rng: &mut Rng, ns: &str, name: &str) -> Service {
        let ty = ["ClusterIP", "NodePort", "NodePort"][rng.below(3) as usize];
        let mut ports = vec![json!({"name": "http", "port": 80 + rng.below(2), "protocol": "TCP"})];
        if rng.below(3) == 0 {
            ports.push(json!({"name": "dns", "port": 53, "protocol": "UDP"}));
        }
        if ty == "NodePort" {
            for p in &mut ports {
                p["nodePort"] = json!(30000 + rng.below(1500));
            }
        }
        let mut spec = json!({
            "type": ty,
            "clusterIP": format!("10.96.{}.{}", rng.below(8), 1 + rng.below(250)),
            "ports": ports,
        });
        if ty == "NodePort" && rng.below(3) == 0 {
            spec["externalTrafficPolicy"] = json!("Local");
        }
        if rng.below(5) == 0 {
            spec["sessionAffinity"] = json!("ClientIP");
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .unwrap()
    }

    fn slice(rng: &mut Rng, ns: &str, name: &str, owner: &str) -> Slice {
        let endpoints: Vec<_> = (0..rng.below(5))
            .map(|_| {
                let ready = rng.below(4) != 0;
                let addr = format!("10.244.{}.{}", rng.below(3), 1 + rng.below(12));
                let serving = ready || rng.below(2) == 0;
                let node = ["n1", "n2"][rng.below(2) as usize];
                json!({
                    "addresses": [addr],
                    "conditions": {"ready": ready, "serving": serving, "terminating": !ready},
                    "nodeName": node,
                })
            })
            .collect();
        let api: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": owner}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080 + rng.below(2), "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": endpoints,
        }))
        .unwrap();
        Slice::from_api(&api)
    }

    /// A random change of one to three objects, applied to `svcs`/`slices` too.
    fn change(
        rng: &mut Rng,
        svcs: &mut BTreeMap<Key, Service>,
        slices: &mut BTreeMap<Key, Slice>,
    ) -> Change {
        let mut c = Change::default();
        for _ in 0..1 + rng.below(3) {
            let ns = ["dev", "prod"][rng.below(2) as usize].to_string();
            let svc = format!("s{}", rng.below(25));
            match rng.below(10) {
                // Mostly endpoint changes, as in a cluster.
                0..=5 => {
                    let name = format!("{svc}-{}", rng.below(2));
                    let key = (ns.clone(), name.clone());
                    let s = (rng.below(8) != 0).then(|| slice(rng, &ns, &name, &svc));
                    match &s {
                        Some(s) => slices.insert(key.clone(), s.clone()),
                        None => slices.remove(&key),
                    };
                    c.slices.push((key, s.map(Arc::new)));
                }
                _ => {
                    let key = (ns.clone(), svc.clone());
                    let s = (rng.below(4) != 0).then(|| service(rng, &ns, &svc));
                    match &s {
                        Some(s) => svcs.insert(key.clone(), s.clone()),
                        None => svcs.remove(&key),
                    };
                    c.services.push((key, s.map(Arc::new)));
                }
            }
        }
        c
    }

    /// The maps with ids replaced by what they stand for (service ids by the port their
    /// metadata names, backend ids by address and port), one line per entry.
    fn dump(f: &Fake) -> Vec<String> {
        let meta = |id: u32| {
            let m: &SvcMeta = &f.meta[&id];
            format!(
                "{}/{}:{}/{}/{}",
                m.namespace(),
                m.name(),
                m.port_name(),
                m.proto,
                m.scope
            )
        };
        let be = |id: u32| {
            let b = f.backends[&id];
            format!(
                "{}:{}",
                Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                u16::from_be(b.port_be)
            )
        };
        let mut out = Vec::new();
        for (k, fe) in &f.frontends {
            out.push(format!(
                "fe {}:{}/{} -> {} inside {} flags {:#x}",
                Ipv4Addr::from(k.addr_be.to_ne_bytes()),
                u16::from_be(k.port_be),
                k.proto,
                meta(fe.svc_id),
                meta(fe.inside_svc_id),
                fe.flags
            ));
        }
        for (id, s) in &f.services {
            let table: Vec<String> = (s.table_off..s.table_off + s.table_m)
                .map(|i| be(f.slots[i as usize]))
                .collect();
            out.push(format!(
                "svc {} backends {} flags {:#x} affinity {} m {} table {}",
                meta(*id),
                s.backend_count,
                s.flags,
                s.affinity_timeout,
                s.table_m,
                table.join(",")
            ));
        }
        for b in f.backends.values() {
            out.push(format!(
                "be {}:{} flags {:#x}",
                Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                u16::from_be(b.port_be),
                b.flags
            ));
        }
        for a in &f.cluster_ips {
            out.push(format!("cip {}", Ipv4Addr::from(a.to_ne_bytes())));
        }
        for (svc, a, len) in &f.ranges {
            out.push(format!("range {} {a:#x}/{len}", meta(*svc)));
        }
        out.sort();
        out
    }

    /// What `tr` files by Service: the key of the Service it points at, the slice keys, the
    /// part of the translation.
    fn filed(tr: &Translator) -> BTreeMap<Key, (Option<Key>, Vec<Key>, ServiceOutput)> {
        tr.svcs
            .iter()
            .map(|(k, e)| {
                let at = e.at.map(|i| {
                    let (ns, n) = translate::service_key(&tr.objs.services[i]);
                    (ns.to_string(), n.to_string())
                });
                (k.clone(), (at, e.slices.clone(), e.out.clone()))
            })
            .collect()
    }

    /// Which Service (key) owns each frontend, as `tr` files it.
    fn frontend_owners(tr: &Translator) -> Vec<(String, Key)> {
        let by_id: HashMap<u64, &Key> = tr.svcs.iter().map(|(k, e)| (e.id, k)).collect();
        let mut v: Vec<(String, Key)> = tr
            .owners
            .iter()
            .map(|(fe, id)| (format!("{fe:?}"), by_id[id].clone()))
            .collect();
        v.sort();
        v
    }

    /// Random sequences of changes, applied incrementally (the agent's way: translate the
    /// touched Services, write the touched ports, fall back to the full path when told) and
    /// by a full translation and apply each time: the maps must read the same after every
    /// step, and so must the translations.
    #[test]
    fn incremental_equals_full() {
        let (mut deltas, mut fulls) = (0, 0);
        for seed in 1..=6u64 {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let (mut svcs, mut slices) = (BTreeMap::new(), BTreeMap::new());
            let mut tr = Translator::new();
            let (mut pa, mut pb) = (Programmer::new(settings()), Programmer::new(settings()));
            let (mut ma, mut mb) = (Fake::new(&settings()), Fake::new(&settings()));
            let start = Instant::now();
            let mut now = start;
            // Start from a populated state, programmed in full by both.
            let mut first = Change::default();
            for _ in 0..15 {
                first.merge(change(&mut rng, &mut svcs, &mut slices));
            }
            tr.replace(Objects::default());
            let _ = tr.apply(first, &node());
            let d = tr.full(&node());
            pa.apply(&d, &mut ma, now).unwrap();
            pb.apply(&d, &mut mb, now).unwrap();
            for step in 0..120 {
                now += Duration::from_millis(rng.below(8000));
                let c = change(&mut rng, &mut svcs, &mut slices);
                // Incremental.
                let applied = match tr.apply(c, &node()) {
                    Update::Delta(ds) => pa
                        .apply_delta(&port_changes(&ds), &mut ma, now)
                        .unwrap()
                        .is_some(),
                    Update::Full => false,
                };
                if applied {
                    deltas += 1;
                } else {
                    fulls += 1;
                    let d = tr.full(&node());
                    pa.apply(&d, &mut ma, now).unwrap();
                }
                // Full, from the objects as they are.
                let objs = Objects {
                    services: svcs.values().cloned().map(Arc::new).collect(),
                    slices: slices.values().cloned().map(Arc::new).collect(),
                    ..Objects::default()
                };
                let want = translate::translate(&objs, &node());
                pb.apply(&want, &mut mb, now).unwrap();
                // What the incremental translator keeps is what a fresh one keeps (nothing
                // left behind by deleted Services and slices).
                let mut fresh = Translator::new();
                fresh.replace(objs.clone());
                fresh.full(&node());
                assert_eq!(filed(&tr), filed(&fresh), "seed {seed} step {step}");
                assert_eq!(
                    frontend_owners(&tr),
                    frontend_owners(&fresh),
                    "seed {seed} step {step}"
                );
                ma.check();
                let got: Vec<&SvcPort> = tr.ports();
                let want_ports: Vec<&SvcPort> = want.ports.iter().map(|p| &**p).collect();
                if got != want_ports {
                    let only_got: Vec<_> = got.iter().filter(|p| !want_ports.contains(p)).collect();
                    let only_want: Vec<_> =
                        want_ports.iter().filter(|p| !got.contains(p)).collect();
                    panic!(
                        "seed {seed} step {step}: translations differ\nincremental only: \
                         {only_got:#?}\nfull only: {only_want:#?}\nwarnings {:#?}",
                        want.warnings
                    );
                }
                let (a, b) = (dump(&ma), dump(&mb));
                if a != b {
                    let only_a: Vec<_> = a.iter().filter(|l| !b.contains(l)).collect();
                    let only_b: Vec<_> = b.iter().filter(|l| !a.contains(l)).collect();
                    panic!(
                        "seed {seed} step {step} (delta: {applied}): maps differ\n\
                         incremental only: {only_a:#?}\nfull only: {only_b:#?}"
                    );
                }
                assert_eq!(
                    pa.next_deadline(),
                    pb.next_deadline(),
                    "seed {seed} step {step}"
                );
            }
        }
        // Both paths were taken, the incremental one mostly.
        assert!(
            deltas > 2 * fulls && fulls > 0,
            "{deltas} deltas, {fulls} full"
        );
    }

    #[test]
    fn a_change_touches_only_its_service() {
        let mut rng = Rng(7);
        let mut svcs: BTreeMap<Key, Service> = BTreeMap::new();
        let mut slices: BTreeMap<Key, Slice> = BTreeMap::new();
        let mut tr = Translator::new();
        let mut objs = Objects::default();
        for i in 0..50 {
            let (ns, name) = ("dev", format!("a{i}"));
            // Distinct addresses: no collisions.
            let mut s = service(&mut rng, ns, &name);
            let spec = s.spec.as_mut().unwrap();
            spec.cluster_ip = Some(format!("10.97.0.{}", i + 1));
            spec.type_ = Some("ClusterIP".into());
            for p in spec.ports.iter_mut().flatten() {
                p.node_port = None;
            }
            svcs.insert((ns.into(), name.clone()), s.clone());
            objs.services.push(Arc::new(s));
            let sl = slice(&mut rng, ns, &format!("{name}-0"), &name);
            slices.insert((ns.into(), format!("{name}-0")), sl.clone());
            objs.slices.push(Arc::new(sl));
        }
        tr.replace(objs);
        tr.full(&node());
        let before = tr.totals();
        let key: Key = ("dev".into(), "a7-0".into());
        let mut sl = slices[&key].clone();
        sl.endpoints = [crate::model::slice::Endpoint {
            addr: Some(Ipv4Addr::new(10, 244, 9, 9)),
            ready: None,
            serving: None,
            terminating: None,
            node_name: Some("n2".into()),
            hints: None,
        }]
        .into();
        let Update::Delta(ds) = tr.apply(
            Change {
                services: vec![],
                slices: vec![(key, Some(Arc::new(sl)))],
            },
            &node(),
        ) else {
            panic!("expected a delta");
        };
        assert_eq!(ds.len(), 1);
        assert_eq!(ds[0].key, ("dev".to_string(), "a7".to_string()));
        let http = ds[0]
            .new
            .ports
            .iter()
            .find(|p| p.id.port_name == "http")
            .unwrap();
        assert_eq!(http.backends.len(), 1);
        assert_eq!(tr.totals().service_ports, before.service_ports);
        // A Service taking another's ClusterIP and port goes full.
        let mut other = (*tr.objects().services[0]).clone();
        other.metadata.name = Some("intruder".into());
        assert!(matches!(
            tr.apply(
                Change {
                    services: vec![(("dev".into(), "intruder".into()), Some(Arc::new(other)))],
                    slices: vec![],
                },
                &node(),
            ),
            Update::Full
        ));
    }
}
