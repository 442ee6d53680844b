//! `--source kube`: Services and EndpointSlices (plus the agent's own Node, the
//! ServiceCIDRs and MetalLB's address pools) followed through the Kubernetes API.
//!
//! Six kube-runtime watchers feed six reflector stores, holding trimmed objects (no
//! `managedFields`, no annotations: nothing here reads them, and on a large cluster they are
//! most of the bytes): Services and EndpointSlices in all namespaces, the agent's own Node
//! only (field selector `metadata.name=<node name>`: its zone label and deletion), the
//! cluster-scoped `networking.k8s.io/v1` ServiceCIDRs (the service address ranges), and
//! MetalLB's `metallb.io/v1beta1` `IPAddressPool`s and `L2Advertisement`s in all namespaces
//! (kept as [`DynamicObject`]s: no Kubernetes crate has their types; each is converted into
//! [`IpAddressPool`] / [`L2Advertisement`] when a snapshot is taken, so one object that does
//! not read leaves the others usable). The watchers do the protocol work: paginated lists
//! (500 per page), watches resumed from the last resourceVersion or bookmark, a full relist
//! after `410 Gone`, and reconnects with kube's default backoff (client-go's: 0.8 s doubling
//! to 30 s, jittered) when the API server cannot be reached.
//!
//! A snapshot ([`Objects`], the same input the file source produces) is published only
//! after ALL SIX stores have completed their first list, so an agent that starts while the
//! API server is slow never programs an empty cluster. A Node list with no object (the node
//! is not registered yet, or `--node-name` is wrong) is a complete, empty list. Three kinds
//! are optional: an API server that answers their list with `404` (not served) or `403` (the
//! ClusterRole lacks them) counts as an empty, complete list, logged once, so the agent
//! still starts; the watcher keeps retrying with its backoff and fills the store if they
//! become readable. ServiceCIDRs are served from Kubernetes 1.33 on (a refusal is logged at
//! warn); MetalLB's CRDs exist only where MetalLB's manifests (or xlb's copy of its CRDs)
//! were applied (logged at info: without pools xlb assigns no LoadBalancer address).
//! After that, a change is published at once, and further changes at most once per
//! [`DEBOUNCE`] (kube-proxy's `minSyncPeriod`): a single change reaches the agent without
//! delay, a burst (a rollout rewriting many EndpointSlices) becomes a few snapshots. A
//! snapshot after the first is the previous one patched with the Services and
//! EndpointSlices that changed (no copy of the others when the agent has let go of the
//! previous one), and says which changed ([`ChangeLog`]), so the agent re-translates only
//! those. While the API
//! server is away no snapshot comes: the datapath keeps its last state, and a relist
//! replaces a store's content in one step (reflector semantics), so nothing half-listed is
//! ever published.
//!
//! Pools and advertisements are checked as the file source checks them (MetalLB's webhook
//! is gone with MetalLB): one that does not read or does not validate
//! ([`metallb::validate_pool`], [`metallb::validate_l2`]), a pool whose addresses overlap an
//! older pool's, or a pool whose name an older pool in another namespace has, is left out,
//! with a warning logged once while it lasts. Every agent sees the same objects and so
//! leaves out the same ones.
//!
//! Warnings about unsupported features (`translate::ServiceEvent`) are posted as
//! `events.k8s.io/v1` Events of type Warning on the Service ([`KubeSource::post_event`]).
//!
//! The Services' `status.loadBalancer.ingress` is written by the agent that announces the
//! address ([`KubeSource::write_lb_status`]; the caller decides which), so exactly one agent
//! writes each Service's status.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{LoadBalancerIngress, Node, ObjectReference, Service},
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    core::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{
        WatchStreamExt as _,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    model::{slice::Slice, translate::ServiceEvent},
    source::{
        kube_slice::KubeSlice,
        metallb::{self, IpAddressPool, L2Advertisement},
        yaml::Objects,
    },
};

/// Shortest time between two snapshots (a change after a quiet period is published at
/// once; kube-proxy's `minSyncPeriod`).
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// (namespace, name).
pub type Key = (String, String);

/// Which Services and EndpointSlices changed between a kube source's recent snapshots
/// ([`Objects::changes`]).
#[derive(Debug, Clone, Default)]
pub struct ChangeLog {
    /// Tells one source's snapshots from another's.
    pub source: u64,
    /// This snapshot's number (1 for the first).
    pub seq: u64,
    /// For recent snapshots (number, oldest first, up to this one): what changed since
    /// the one before, None when anything may have (the first, a relist, other kinds).
    pub steps: std::collections::VecDeque<(u64, Option<Arc<Step>>)>,
}

/// The changes one snapshot carries over its predecessor.
#[derive(Debug, Clone, Default)]
pub struct Step {
    pub services: Vec<Key>,
    pub slices: Vec<Key>,
    /// When the first of these changes was seen (watch event).
    pub first_event: Option<std::time::Instant>,
}

/// Snapshots whose changes a [`ChangeLog`] keeps.
const CHANGE_LOG_STEPS: usize = 64;

impl ChangeLog {
    /// The changes since snapshot `seen` of `source`: (Services, EndpointSlices, first
    /// event); None when the log does not say (another source, too far back, a step
    /// that may have changed anything).
    pub fn since(
        &self,
        source: u64,
        seen: u64,
    ) -> Option<(BTreeSet<Key>, BTreeSet<Key>, Option<std::time::Instant>)> {
        if source != self.source || seen >= self.seq {
            return None;
        }
        let first = self.steps.front()?.0;
        if seen + 1 < first {
            return None;
        }
        let (mut svcs, mut slices, mut since) = (BTreeSet::new(), BTreeSet::new(), None);
        for (n, step) in self.steps.iter().filter(|(n, _)| *n > seen) {
            let _ = n;
            let step = step.as_ref()?;
            svcs.extend(step.services.iter().cloned());
            slices.extend(step.slices.iter().cloned());
            since = match (since, step.first_event) {
                (Some(a), Some(b)) => Some(std::cmp::min(a, b)),
                (a, b) => a.or(b),
            };
        }
        Some((svcs, slices, since))
    }
}

/// The objects `keys` name in a snapshot (sorted, as [`snapshot`] makes it), as a change:
/// present ones as they are, absent ones deleted.
pub fn change_of(
    objs: &Objects,
    services: &BTreeSet<Key>,
    slices: &BTreeSet<Key>,
) -> crate::model::incremental::Change {
    fn find<'a, K: Keyed>(list: &'a [K], k: &Key) -> Option<&'a K> {
        list.binary_search_by(|o| cmp_key(o, k))
            .ok()
            .map(|i| &list[i])
    }
    crate::model::incremental::Change {
        services: services
            .iter()
            .map(|k| (k.clone(), find(&objs.services, k).cloned()))
            .collect(),
        slices: slices
            .iter()
            .map(|k| (k.clone(), find(&objs.slices, k).cloned()))
            .collect(),
    }
}

/// What a snapshot's lists are sorted by: (namespace, name) as the object has them.
trait Keyed {
    fn ns_name(&self) -> (&str, &str);
}

impl Keyed for Service {
    fn ns_name(&self) -> (&str, &str) {
        let m = &self.metadata;
        (
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default(),
        )
    }
}

impl<T: Keyed> Keyed for Arc<T> {
    fn ns_name(&self) -> (&str, &str) {
        (**self).ns_name()
    }
}

impl Keyed for Slice {
    fn ns_name(&self) -> (&str, &str) {
        (
            self.namespace.as_deref().unwrap_or_default(),
            self.name.as_deref().unwrap_or_default(),
        )
    }
}

fn cmp_key<K: Keyed>(o: &K, k: &Key) -> std::cmp::Ordering {
    o.ns_name().cmp(&(k.0.as_str(), k.1.as_str()))
}

/// Changes seen by the watchers since the last snapshot.
#[derive(Debug, Default)]
struct Dirty {
    services: BTreeSet<Key>,
    slices: BTreeSet<Key>,
    /// Another kind changed, or a store was relisted: take a whole snapshot.
    all: bool,
    first_event: Option<std::time::Instant>,
}

/// Which [`Dirty`] set a watcher's changes go to.
#[derive(Debug, Clone, Copy)]
enum Track {
    Services,
    Slices,
    Other,
}

/// `reportingController` of the Events the agent posts.
pub const EVENT_CONTROLLER: &str = "xlb.dev/lb-agent";

/// Attempts to post one Event (the API server may be away for a while).
const EVENT_ATTEMPTS: u32 = 6;

/// Attempts to write one Service's status (as many as for an Event).
const STATUS_ATTEMPTS: u32 = EVENT_ATTEMPTS;

/// MetalLB's group and version (`metallb.io/v1beta1`).
pub const METALLB_GROUP: &str = "metallb.io";
pub const METALLB_VERSION: &str = "v1beta1";

/// `ipMode` of the ingress entries written: traffic reaches the address itself (kube-proxy
/// keeps it in its rules; `Proxy` would tell it the load balancer rewrites it).
pub const LB_IP_MODE: &str = "VIP";

/// The `IPAddressPool` resource (`metallb.io/v1beta1`, plural `ipaddresspools`).
pub fn ip_pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(METALLB_GROUP, METALLB_VERSION, "IPAddressPool"),
        "ipaddresspools",
    )
}

/// The `L2Advertisement` resource (`metallb.io/v1beta1`, plural `l2advertisements`).
pub fn l2_advert_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(METALLB_GROUP, METALLB_VERSION, "L2Advertisement"),
        "l2advertisements",
    )
}

/// The running watchers and the snapshots they produce. Dropping it stops them.
pub struct KubeSource {
    snapshots: watch::Receiver<Option<Arc<Objects>>>,
    services: Store<Service>,
    recorder: Recorder,
    client: Client,
    /// `fieldManager` of the status writes: `lb-agent-<node>`.
    field_manager: String,
    /// Status writes by Service (see [`KubeSource::write_lb_status`]).
    status_writes: Arc<Mutex<StatusWrites>>,
    runtime: tokio::runtime::Handle,
    tasks: Vec<JoinHandle<()>>,
}

/// The status writes in flight or done, so that a Service's status is written once per
/// change even while the store has not seen the write yet.
#[derive(Default)]
struct StatusWrites {
    next: u64,
    by_service: HashMap<(String, String), StatusWrite>,
}

struct StatusWrite {
    /// Identifies the write: a later one for the same Service supersedes it.
    id: u64,
    ips: Vec<Ipv4Addr>,
    /// The resourceVersion the API server gave the written object (None: in flight).
    written_rv: Option<String>,
}

impl KubeSource {
    /// Client from the in-cluster service account or `KUBECONFIG`/`~/.kube/config`
    /// (`kube::Config::infer`). Does not contact the API server yet.
    pub async fn client() -> Result<Client> {
        Client::try_default().await.context(
            "--source kube: no Kubernetes client configuration (in-cluster service account, \
             KUBECONFIG or ~/.kube/config)",
        )
    }

    /// Starts the watchers on `client` (on the current tokio runtime); `node_name` selects the
    /// Node that is followed and tags the Events this agent posts.
    pub fn start(client: Client, node_name: &str) -> Self {
        Self::start_with(client, node_name, DEBOUNCE)
    }

    pub fn start_with(client: Client, node_name: &str, debounce: Duration) -> Self {
        let (svc_reader, svc_writer) = reflector::store::<Service>();
        let (slice_reader, slice_writer) = reflector::store::<KubeSlice>();
        let (node_reader, node_writer) = reflector::store::<Node>();
        let (cidr_reader, cidr_writer) = reflector::store::<ServiceCIDR>();
        let pool_writer = reflector::store::Writer::new(ip_pool_resource());
        let pool_reader = pool_writer.as_reader();
        let l2_writer = reflector::store::Writer::new(l2_advert_resource());
        let l2_reader = l2_writer.as_reader();
        // A generation counter bumped after each change to any store.
        let (changes, changes_rx) = watch::channel(0u64);
        // Set when an optional kind's list is refused (404/403): listed, as empty.
        let (cidrs_refused, cidrs_refused_rx) = watch::channel(false);
        let (pools_refused, pools_refused_rx) = watch::channel(false);
        let (l2_refused, l2_refused_rx) = watch::channel(false);
        let (snap_tx, snapshots) = watch::channel(None);
        let dirty = Arc::new(Mutex::new(Dirty::default()));
        let d = |t| (dirty.clone(), t);
        let all = watcher::Config::default;
        let tasks = vec![
            tokio::spawn(follow(
                Api::<Service>::all(client.clone()),
                all(),
                svc_writer,
                "Services",
                changes.clone(),
                None,
                d(Track::Services),
            )),
            tokio::spawn(follow(
                Api::<KubeSlice>::all(client.clone()),
                all(),
                slice_writer,
                "EndpointSlices",
                changes.clone(),
                None,
                d(Track::Slices),
            )),
            tokio::spawn(follow(
                Api::<Node>::all(client.clone()),
                all().fields(&format!("metadata.name={node_name}")),
                node_writer,
                "Node",
                changes.clone(),
                None,
                d(Track::Other),
            )),
            tokio::spawn(follow(
                Api::<ServiceCIDR>::all(client.clone()),
                all(),
                cidr_writer,
                "ServiceCIDRs",
                changes.clone(),
                Some(Optional {
                    refused: cidrs_refused,
                    not_served: "not served by this API server (Kubernetes before 1.33)",
                    without: "taken as none (--service-cidr only)",
                    level: log::Level::Warn,
                }),
                d(Track::Other),
            )),
            tokio::spawn(follow(
                Api::<DynamicObject>::all_with(client.clone(), &ip_pool_resource()),
                all(),
                pool_writer,
                "IPAddressPools",
                changes.clone(),
                Some(Optional {
                    refused: pools_refused,
                    not_served: METALLB_NOT_SERVED,
                    without: "taken as none (no LoadBalancer address is assigned from pools)",
                    level: log::Level::Info,
                }),
                d(Track::Other),
            )),
            tokio::spawn(follow(
                Api::<DynamicObject>::all_with(client.clone(), &l2_advert_resource()),
                all(),
                l2_writer,
                "L2Advertisements",
                changes,
                Some(Optional {
                    refused: l2_refused,
                    not_served: METALLB_NOT_SERVED,
                    without: "taken as none (pool addresses are not announced)",
                    level: log::Level::Info,
                }),
                d(Track::Other),
            )),
            tokio::spawn(publish(
                Stores {
                    services: svc_reader.clone(),
                    slices: slice_reader,
                    nodes: node_reader,
                    service_cidrs: cidr_reader,
                    ip_pools: pool_reader,
                    l2_adverts: l2_reader,
                },
                Refusals {
                    service_cidrs: cidrs_refused_rx,
                    ip_pools: pools_refused_rx,
                    l2_adverts: l2_refused_rx,
                },
                changes_rx,
                snap_tx,
                debounce,
                dirty,
            )),
        ];
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: EVENT_CONTROLLER.into(),
                instance: Some(format!("lb-agent-{node_name}")),
            },
        );
        Self {
            snapshots,
            services: svc_reader,
            recorder,
            client,
            field_manager: format!("lb-agent-{node_name}"),
            status_writes: Arc::default(),
            runtime: tokio::runtime::Handle::current(),
            tasks,
        }
    }

    /// The next snapshot: the first one once all initial lists are complete, then one per
    /// burst of changes. `None` if the watchers stopped (they do not, short of a panic).
    pub async fn next(&mut self) -> Option<Arc<Objects>> {
        loop {
            self.snapshots.changed().await.ok()?;
            if let Some(objs) = self.snapshots.borrow_and_update().clone() {
                return Some(objs);
            }
        }
    }

    /// Posts `ev` as a Warning Event on its Service, in the background, retrying while the
    /// API server is unreachable. The caller decides what is new (each once).
    pub fn post_event(&self, ev: &ServiceEvent) {
        let svc = self
            .services
            .get(&ObjectRef::new(&ev.name).within(&ev.namespace));
        let reference = match &svc {
            Some(svc) => svc.object_ref(&()),
            None => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(ev.namespace.clone()),
                name: Some(ev.name.clone()),
                ..Default::default()
            },
        };
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: ev.reason.clone(),
            note: Some(truncate(&ev.message, 1024)),
            action: "Program".into(),
            secondary: None,
        };
        let recorder = self.recorder.clone();
        let what = format!("{} on Service {}/{}", ev.reason, ev.namespace, ev.name);
        self.runtime.spawn(async move {
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=EVENT_ATTEMPTS {
                match recorder.publish(&event, &reference).await {
                    Ok(()) => {
                        log::info!("posted Event {what}");
                        return;
                    }
                    Err(e) if attempt == EVENT_ATTEMPTS => {
                        log::warn!("could not post Event {what}: {e}; giving up");
                    }
                    Err(e) => {
                        log::debug!("posting Event {what}: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }

    /// Makes the Service's `status.loadBalancer.ingress` list `ips` (each with `ipMode:
    /// VIP`): a JSON merge patch of the `status` subresource, `fieldManager`
    /// `lb-agent-<node>`, in the background, retrying while the API server is unreachable.
    ///
    /// The caller calls it only for the addresses its node announces, so that exactly one
    /// agent writes each Service's status; asking again is cheap. Nothing is written when
    /// the Service's status (as the reflector store has it) already says so, when this
    /// agent's own write of the same addresses has not reached the store yet, or when the
    /// Service is not known. A later call for the same Service supersedes a write still
    /// retrying.
    ///
    /// Not done: clearing the status of a Service that lost its address (its pool removed,
    /// or refused): no agent announces the address any more, so none is the one to write.
    /// Such a Service keeps the old address in its status until it gets a new one.
    pub fn write_lb_status(&self, namespace: &str, name: &str, ips: &[Ipv4Addr]) {
        let key = (namespace.to_string(), name.to_string());
        let want = ingress(ips);
        let svc_ref = ObjectRef::<Service>::new(name).within(namespace);
        let Some(svc) = self.services.get(&svc_ref) else {
            return;
        };
        if lb_ingress(&svc) == want {
            return;
        }
        let id = {
            let mut w = self.status_writes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(prev) = w.by_service.get(&key)
                && prev.ips == ips
            {
                match &prev.written_rv {
                    None => return,
                    // Written by us, and the store has not seen that write yet.
                    Some(rv) if !newer(svc.meta().resource_version.as_deref(), rv) => return,
                    Some(_) => {}
                }
            }
            w.next += 1;
            let id = w.next;
            w.by_service.insert(
                key.clone(),
                StatusWrite {
                    id,
                    ips: ips.to_vec(),
                    written_rv: None,
                },
            );
            id
        };
        let api: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams {
            field_manager: Some(self.field_manager.clone()),
            ..Default::default()
        };
        let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": want}}});
        let services = self.services.clone();
        let writes = self.status_writes.clone();
        let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
        let what = format!(
            "status.loadBalancer of Service {namespace}/{name} ({})",
            list.join(", ")
        );
        self.runtime.spawn(async move {
            let current = || {
                let w = writes.lock().unwrap_or_else(|e| e.into_inner());
                w.by_service.get(&key).is_some_and(|x| x.id == id)
            };
            let forget = || {
                let mut w = writes.lock().unwrap_or_else(|e| e.into_inner());
                if w.by_service.get(&key).is_some_and(|x| x.id == id) {
                    w.by_service.remove(&key);
                }
            };
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=STATUS_ATTEMPTS {
                if !current() {
                    return;
                }
                match services.get(&svc_ref) {
                    None => return forget(),
                    Some(s) if lb_ingress(&s) == want => return forget(),
                    Some(_) => {}
                }
                match api
                    .patch_status(&key.1, &params, &Patch::Merge(&patch))
                    .await
                {
                    Ok(svc) => {
                        log::info!("wrote {what}");
                        let mut w = writes.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(x) = w.by_service.get_mut(&key).filter(|x| x.id == id) {
                            x.written_rv =
                                Some(svc.meta().resource_version.clone().unwrap_or_default());
                        }
                        return;
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => return forget(),
                    // RBAC (no `patch` on `services/status`) or a rejected value: retrying
                    // does not help.
                    Err(kube::Error::Api(s)) if matches!(s.code, 403 | 422) => {
                        log::warn!("could not write {what}: {}", s.message);
                        return forget();
                    }
                    Err(e) if attempt == STATUS_ATTEMPTS => {
                        log::warn!("could not write {what}: {e}; giving up until the next change");
                        forget();
                    }
                    Err(e) => {
                        log::debug!("writing {what}: {e}; retrying in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }
}

/// The ingress entries written for `ips`.
fn ingress(ips: &[Ipv4Addr]) -> Vec<LoadBalancerIngress> {
    ips.iter()
        .map(|ip| LoadBalancerIngress {
            ip: Some(ip.to_string()),
            ip_mode: Some(LB_IP_MODE.into()),
            ..Default::default()
        })
        .collect()
}

/// A Service's `status.loadBalancer.ingress` (empty when unset).
fn lb_ingress(svc: &Service) -> Vec<LoadBalancerIngress> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default()
}

/// Whether the store's resourceVersion `have` is after `written`. resourceVersions are
/// opaque to clients, but every API server in use (etcd's revision) makes them increasing
/// integers; anything else counts as not newer (nothing is written twice).
fn newer(have: Option<&str>, written: &str) -> bool {
    match (
        have.and_then(|h| h.parse::<u64>().ok()),
        written.parse::<u64>(),
    ) {
        (Some(h), Ok(w)) => h > w,
        _ => false,
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Drops what is never read, before the object is stored: managedFields, and the
/// annotations other than MetalLB's address requests on Services (an address or pool asked
/// for by annotation must reach the assignment; `kubectl apply` leaves its whole
/// last-applied configuration in another one).
fn trim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.retain(|k, _| crate::model::lbipam::reads_annotation(k));
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

/// `404` (the API server does not serve the resource) or `403` (RBAC does not grant it) on
/// the list or the watch.
fn refused(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if matches!(s.code, 403 | 404) =>
        {
            Some(s.code)
        }
        watcher::Error::WatchError(s) if matches!(s.code, 403 | 404) => Some(s.code),
        _ => None,
    }
}

/// What [`MetalLB`](METALLB_GROUP)'s kinds answer with 404.
const METALLB_NOT_SERVED: &str =
    "not served by this API server (MetalLB's CRDs are not installed; they are optional)";

/// An optional kind: a [`refused`] list sets `refused` (the gate in [`publish`] then takes
/// the store as listed and empty), logged once at `level`.
struct Optional {
    refused: watch::Sender<bool>,
    /// Why a 404 (the 403 reason is the same for all).
    not_served: &'static str,
    /// What the agent does without them.
    without: &'static str,
    level: log::Level,
}

/// Runs one watcher into its store for ever; bumps `changes` after each change the store
/// saw, logs trouble once per distinct error and the recovery. With `refused_ok`, a
/// [`refused`] list is logged once and sets its flag; the watcher keeps retrying.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    changes: watch::Sender<u64>,
    refused_ok: Option<Optional>,
    (dirty, track): (Arc<Mutex<Dirty>>, Track),
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(trim::<K>)
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut failing: Option<String> = None;
    let mut listed = false;
    let mut refusal_logged = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => {
                if let Some(e) = failing.take() {
                    log::info!("{what}: watch restored (after: {e})");
                }
                match ev {
                    watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                        {
                            let mut d = dirty.lock().unwrap_or_else(|e| e.into_inner());
                            d.first_event.get_or_insert_with(std::time::Instant::now);
                            match track {
                                Track::Services => {
                                    d.services.insert(key(&o));
                                }
                                Track::Slices => {
                                    d.slices.insert(key(&o));
                                }
                                Track::Other => d.all = true,
                            }
                        }
                        changes.send_modify(|g| *g += 1)
                    }
                    watcher::Event::InitDone => {
                        dirty.lock().unwrap_or_else(|e| e.into_inner()).all = true;
                        if !listed {
                            log::info!("{what}: initial list complete");
                        } else {
                            log::info!("{what}: relisted");
                        }
                        listed = true;
                        changes.send_modify(|g| *g += 1);
                    }
                    // A relist fills a buffer; the store changes at InitDone only.
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            }
            Err(e) => {
                let msg = match &e {
                    watcher::Error::WatchError(s) if s.code == 410 => {
                        // Expected after compaction: the watcher relists by itself.
                        log::info!("{what}: resourceVersion too old (410 Gone); relisting");
                        continue;
                    }
                    e => format!("{e}"),
                };
                if let (Some(opt), Some(code)) = (&refused_ok, refused(&e)) {
                    if !refusal_logged {
                        let why = if code == 404 {
                            opt.not_served
                        } else {
                            "forbidden (the ClusterRole does not grant list/watch)"
                        };
                        log::log!(
                            opt.level,
                            "{what}: {why}: {msg}; {}; retrying with backoff",
                            opt.without
                        );
                        refusal_logged = true;
                    }
                    if !opt.refused.send_replace(true) {
                        dirty.lock().unwrap_or_else(|e| e.into_inner()).all = true;
                        changes.send_modify(|g| *g += 1);
                    }
                    failing = Some(msg);
                    continue;
                }
                if failing.as_deref() != Some(msg.as_str()) {
                    log::warn!(
                        "{what}: {msg}; retrying with backoff, the datapath keeps its last state"
                    );
                }
                failing = Some(msg);
            }
        }
    }
}

/// The reflector stores the snapshots are taken from.
#[derive(Clone)]
pub struct Stores {
    pub services: Store<Service>,
    pub slices: Store<KubeSlice>,
    /// The agent's own Node (none or one).
    pub nodes: Store<Node>,
    pub service_cidrs: Store<ServiceCIDR>,
    /// MetalLB `IPAddressPool`s ([`ip_pool_resource`]).
    pub ip_pools: Store<DynamicObject>,
    /// MetalLB `L2Advertisement`s ([`l2_advert_resource`]).
    pub l2_adverts: Store<DynamicObject>,
}

/// The refusal flags of the optional kinds (see [`Optional`]).
struct Refusals {
    service_cidrs: watch::Receiver<bool>,
    ip_pools: watch::Receiver<bool>,
    l2_adverts: watch::Receiver<bool>,
}

/// The store listed, or its list refused (see [`refused`]); false if the watcher is gone.
async fn listed_or_refused<K>(store: &Store<K>, refused: &mut watch::Receiver<bool>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::select! {
        r = store.wait_until_ready() => r.is_ok(),
        r = refused.wait_for(|refused| *refused) => r.is_ok(),
    }
}

/// Publishes snapshots: the first when every store is listed (the optional kinds' also when
/// their list was refused, see [`refused`]), then one per change, at most one per
/// `min_period`.
async fn publish(
    stores: Stores,
    mut refusals: Refusals,
    mut changes: watch::Receiver<u64>,
    out: watch::Sender<Option<Arc<Objects>>>,
    min_period: Duration,
    dirty: Arc<Mutex<Dirty>>,
) {
    if stores.services.wait_until_ready().await.is_err()
        || stores.slices.wait_until_ready().await.is_err()
        || stores.nodes.wait_until_ready().await.is_err()
        || !listed_or_refused(&stores.service_cidrs, &mut refusals.service_cidrs).await
        || !listed_or_refused(&stores.ip_pools, &mut refusals.ip_pools).await
        || !listed_or_refused(&stores.l2_adverts, &mut refusals.l2_adverts).await
    {
        return;
    }
    // Pool/advertisement problems logged, while they last.
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let mut log = ChangeLog {
        source: {
            use std::hash::{BuildHasher as _, RandomState};
            RandomState::new().hash_one(std::time::SystemTime::now())
        },
        ..ChangeLog::default()
    };
    let mut cur: Option<Arc<Objects>> = None;
    loop {
        changes.borrow_and_update();
        let d = std::mem::take(&mut *dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let step = match cur.take() {
            Some(mut objs) if !d.all => {
                // The channel's copy is dropped first, so that the patch happens in place
                // when the agent holds none either (else it copies, as before).
                let _ = out.send_replace(None);
                let o = Arc::make_mut(&mut objs);
                patch(&mut o.services, &d.services, |k| {
                    stores.services.get(&ObjectRef::new(&k.1).within(&k.0))
                });
                patch(&mut o.slices, &d.slices, |k| {
                    stores
                        .slices
                        .get(&ObjectRef::new(&k.1).within(&k.0))
                        .filter(|s| usable_slice(s))
                        .map(|s| s.slice.clone())
                });
                cur = Some(objs);
                Some(Arc::new(Step {
                    services: d.services.into_iter().collect(),
                    slices: d.slices.into_iter().collect(),
                    first_event: d.first_event,
                }))
            }
            _ => {
                let (objs, problems) = snapshot_checked(&stores);
                for p in problems.iter().filter(|p| !warned.contains(*p)) {
                    log::warn!("{p}");
                }
                warned = problems.into_iter().collect();
                log::debug!(
                    "snapshot: {} services, {} IPv4 endpoint slices, {} node, {} service \
                     CIDRs, {} address pools, {} L2 advertisements",
                    objs.services.len(),
                    objs.slices.len(),
                    objs.nodes.len(),
                    objs.service_cidrs.len(),
                    objs.ip_pools.len(),
                    objs.l2_adverts.len()
                );
                cur = Some(Arc::new(objs));
                None
            }
        };
        log.seq += 1;
        log.steps.push_back((log.seq, step));
        while log.steps.len() > CHANGE_LOG_STEPS {
            log.steps.pop_front();
        }
        let objs = cur.as_mut().expect("set above");
        Arc::make_mut(objs).changes = Some(Arc::new(log.clone()));
        if out.send(Some(objs.clone())).is_err() {
            return;
        }
        let published = tokio::time::Instant::now();
        if changes.changed().await.is_err() {
            return;
        }
        // At most one snapshot per period; a change after a quiet period goes at once
        // (after a yield, so that events that arrived together are one snapshot).
        tokio::time::sleep_until(published + min_period).await;
        tokio::task::yield_now().await;
    }
}

/// Brings `list` (sorted by namespace and name) up to date for `keys`: `get` gives an
/// object's current state (None: gone or not used).
fn patch<K: Keyed>(list: &mut Vec<K>, keys: &BTreeSet<Key>, get: impl Fn(&Key) -> Option<K>) {
    for k in keys {
        match (list.binary_search_by(|o| cmp_key(o, k)), get(k)) {
            (Ok(i), Some(o)) => list[i] = o,
            (Ok(i), None) => {
                list.remove(i);
            }
            (Err(i), Some(o)) => list.insert(i, o),
            (Err(_), None) => {}
        }
    }
}

/// The stores' content in the shape `translate` takes, sorted by namespace and name (the
/// translation does not depend on order; logs and diffs read better).
pub fn snapshot(stores: &Stores) -> Objects {
    snapshot_checked(stores).0
}

/// [`snapshot`], and why pools or advertisements were left out (see the module docs).
pub fn snapshot_checked(stores: &Stores) -> (Objects, Vec<String>) {
    let mut problems = Vec::new();
    let ip_pools = checked_pools(
        converted(&stores.ip_pools, "IPAddressPool", &mut problems),
        &mut problems,
    );
    let l2_adverts =
        converted::<L2Advertisement>(&stores.l2_adverts, "L2Advertisement", &mut problems)
            .into_iter()
            .filter(|l2| match metallb::validate_l2(l2) {
                Ok(()) => true,
                Err((field, msg)) => {
                    problems.push(format!(
                        "L2Advertisement {}: {field}: {msg}; ignored",
                        name_of(&l2.metadata)
                    ));
                    false
                }
            })
            .collect();
    let mut sl: Vec<Arc<Slice>> = stores
        .slices
        .state()
        .iter()
        .filter(|s| usable_slice(s))
        .map(|s| s.slice.clone())
        .collect();
    sl.sort_by(|a, b| a.ns_name().cmp(&b.ns_name()));
    let objs = Objects {
        services: shared(&stores.services),
        slices: sl,
        nodes: sorted(&stores.nodes),
        service_cidrs: sorted(&stores.service_cidrs),
        ip_pools,
        l2_adverts,
        changes: None,
    };
    (objs, problems)
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        meta.name.as_deref().unwrap_or("")
    )
}

/// The store's objects read as `T` (MetalLB's types), sorted by namespace and name; those
/// that do not read are reported and left out.
fn converted<T: serde::de::DeserializeOwned>(
    store: &Store<DynamicObject>,
    kind: &str,
    problems: &mut Vec<String>,
) -> Vec<T> {
    let mut objs: Vec<Arc<DynamicObject>> = store.state();
    objs.sort_by(|a, b| key_ref(&**a).cmp(&key_ref(&**b)));
    objs.iter()
        .filter_map(|o| {
            let read = serde_json::to_value(&**o).and_then(serde_json::from_value::<T>);
            match read {
                Ok(t) => Some(t),
                Err(e) => {
                    problems.push(format!("{kind} {}: {e}; ignored", name_of(&o.metadata)));
                    None
                }
            }
        })
        .collect()
}

/// Pools that validate, as the file source takes them (MetalLB's webhook is gone): each
/// valid on its own, and, oldest first (then by namespace and name), none overlapping a pool
/// kept before it nor named as one in another namespace. Sorted by namespace and name.
fn checked_pools(mut pools: Vec<IpAddressPool>, problems: &mut Vec<String>) -> Vec<IpAddressPool> {
    pools.sort_by_cached_key(|p| {
        let t = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (t.is_none(), t, key_of_meta(&p.metadata))
    });
    let mut kept: Vec<(IpAddressPool, Vec<metallb::AddrRange>)> = Vec::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    'pools: for p in pools {
        let who = format!("IPAddressPool {}", name_of(&p.metadata));
        let ranges = match metallb::validate_pool(&p) {
            Ok(r) => r,
            Err((field, msg)) => {
                problems.push(format!("{who}: {field}: {msg}; ignored"));
                continue;
            }
        };
        let (ns, name) = key_of_meta(&p.metadata);
        if let Some(other) = names.get(&name) {
            problems.push(format!(
                "{who}: an IPAddressPool of this name is in namespace {other:?}: pool names \
                 must be unique (Services name pools without a namespace); ignored"
            ));
            continue;
        }
        for (i, r) in ranges.iter().enumerate() {
            for (other, theirs) in &kept {
                if theirs.iter().any(|o| o.overlaps(r)) {
                    problems.push(format!(
                        "{who}: spec.addresses[{i}] {:?} overlaps IPAddressPool {}; ignored",
                        p.spec.addresses[i],
                        name_of(&other.metadata)
                    ));
                    continue 'pools;
                }
            }
        }
        names.insert(name, ns);
        kept.push((p, ranges));
    }
    let mut out: Vec<IpAddressPool> = kept.into_iter().map(|(p, _)| p).collect();
    out.sort_by(|a, b| meta_ref(&a.metadata).cmp(&meta_ref(&b.metadata)));
    out
}

fn key_of_meta(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
    let (ns, name) = meta_ref(m);
    (ns.to_owned(), name.to_owned())
}

/// The store's objects themselves (no copy), sorted as [`sorted`].
fn shared<K: Resource + Clone>(store: &Store<K>) -> Vec<Arc<K>>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut v = store.state();
    v.sort_by(|a, b| key_ref(&**a).cmp(&key_ref(&**b)));
    v
}

fn sorted<K: Resource + Clone>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut v: Vec<K> = store.state().iter().map(|o| (**o).clone()).collect();
    v.sort_by(|a, b| key_ref(a).cmp(&key_ref(b)));
    v
}

/// An object's (namespace, name) borrowed, to sort by: a sort compares n log n times (17
/// per object at 100,000), and a key with owned strings allocates two at every comparison.
fn key_ref<K: Resource>(o: &K) -> (&str, &str) {
    meta_ref(o.meta())
}

fn meta_ref(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default(),
    )
}

fn key<K: Resource>(o: &K) -> (String, String) {
    key_of_meta(o.meta())
}

/// As the file source and kube-proxy: IPv4 slices that name their Service.
pub fn usable_slice(s: &KubeSlice) -> bool {
    s.slice.ipv4 && s.slice.service.as_deref().is_some_and(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::yaml::SERVICE_NAME_LABEL;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    fn slice(addr_type: &str, label: Option<&str>) -> EndpointSlice {
        EndpointSlice {
            address_type: addr_type.into(),
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("dev".into()),
                labels: label.map(|l| [(SERVICE_NAME_LABEL.to_string(), l.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn only_ipv4_slices_owned_by_a_service_are_used() {
        let usable = |s: EndpointSlice| usable_slice(&KubeSlice::from_api(&s));
        assert!(usable(slice("IPv4", Some("web"))));
        assert!(!usable(slice("IPv6", Some("web"))));
        assert!(!usable(slice("FQDN", Some("web"))));
        assert!(!usable(slice("IPv4", None)));
        assert!(!usable(slice("IPv4", Some(""))));
    }

    #[test]
    fn trim_drops_managed_fields_and_unread_annotations_only() {
        let mut s = slice("IPv4", Some("web"));
        s.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
        s.metadata.managed_fields = Some(vec![Default::default()]);
        trim(&mut s);
        assert!(s.metadata.annotations.is_none());
        assert!(s.metadata.managed_fields.is_none());
        assert!(s.metadata.labels.is_some());
        // MetalLB's requests stay: the address assignment reads them.
        let mut svc = Service::default();
        let pool = crate::model::lbipam::ADDRESS_POOL_ANNOTATIONS[0];
        svc.metadata.annotations = Some(
            [
                (pool.to_string(), "p".to_string()),
                (
                    "kubectl.kubernetes.io/last-applied-configuration".into(),
                    "{}".into(),
                ),
            ]
            .into(),
        );
        trim(&mut svc);
        let kept: Vec<&String> = svc
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|a| a.0)
            .collect();
        assert_eq!(kept, [pool]);
    }

    #[test]
    fn only_404_and_403_count_as_refused() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        use watcher::Error as E;
        assert_eq!(refused(&E::InitialListFailed(api(404))), Some(404));
        assert_eq!(refused(&E::InitialListFailed(api(403))), Some(403));
        assert_eq!(refused(&E::WatchStartFailed(api(403))), Some(403));
        assert_eq!(refused(&E::InitialListFailed(api(503))), None);
        assert_eq!(refused(&E::InitialListFailed(api(410))), None);
        assert_eq!(refused(&E::NoResourceVersion), None);
    }

    #[test]
    fn snapshot_fills_every_kind_sorted() {
        use kube::runtime::watcher::Event;
        let named = |name: &str| ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        };
        let (services, mut w) = reflector::store::<Service>();
        w.apply_watcher_event(&Event::Apply(Service {
            metadata: named("b"),
            ..Default::default()
        }));
        w.apply_watcher_event(&Event::Apply(Service {
            metadata: named("a"),
            ..Default::default()
        }));
        let (slices, mut w) = reflector::store::<KubeSlice>();
        w.apply_watcher_event(&Event::Apply(KubeSlice::from_api(&slice(
            "IPv4",
            Some("a"),
        ))));
        let mut v6 = slice("IPv6", Some("a"));
        v6.metadata.name = Some("s-v6".into());
        w.apply_watcher_event(&Event::Apply(KubeSlice::from_api(&v6)));
        let (nodes, mut w) = reflector::store::<Node>();
        w.apply_watcher_event(&Event::Apply(Node {
            metadata: named("n1"),
            ..Default::default()
        }));
        let (service_cidrs, mut w) = reflector::store::<ServiceCIDR>();
        for n in ["z", "kubernetes"] {
            w.apply_watcher_event(&Event::Apply(ServiceCIDR {
                metadata: named(n),
                ..Default::default()
            }));
        }
        let mut w = reflector::store::Writer::new(ip_pool_resource());
        for (ns, name, addr) in [("b", "p", "10.0.0.2/32"), ("a", "q", "10.0.0.1/32")] {
            w.apply_watcher_event(&Event::Apply(pool(ns, name, &[addr], None)));
        }
        let ip_pools = w.as_reader();
        let mut w = reflector::store::Writer::new(l2_advert_resource());
        w.apply_watcher_event(&Event::Apply(dynamic(
            &l2_advert_resource(),
            "metallb-system",
            "l2",
            json!({"spec": {"ipAddressPools": ["p"]}}),
        )));
        let l2_adverts = w.as_reader();
        let objs = snapshot(&Stores {
            services,
            slices,
            nodes,
            service_cidrs,
            ip_pools,
            l2_adverts,
        });
        let names = |v: Vec<&ObjectMeta>| {
            v.into_iter()
                .map(|m| m.name.clone().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(objs.services.iter().map(|s| &s.metadata).collect()),
            ["a", "b"]
        );
        assert_eq!(objs.slices.len(), 1);
        assert_eq!(
            names(objs.nodes.iter().map(|s| &s.metadata).collect()),
            ["n1"]
        );
        assert_eq!(
            names(objs.service_cidrs.iter().map(|s| &s.metadata).collect()),
            ["kubernetes", "z"]
        );
        assert_eq!(
            names(objs.ip_pools.iter().map(|s| &s.metadata).collect()),
            ["q", "p"],
            "by namespace, then name"
        );
        assert_eq!(objs.ip_pools[0].spec.addresses, ["10.0.0.1/32"]);
        assert_eq!(objs.l2_adverts.len(), 1);
        assert_eq!(objs.l2_adverts[0].spec.ip_address_pools, ["p"]);
    }

    fn dynamic(ar: &ApiResource, ns: &str, name: &str, body: serde_json::Value) -> DynamicObject {
        let mut o = DynamicObject::new(name, ar).within(ns);
        o.data = body;
        o
    }

    /// A pool `ns/name` with `addrs`, created at second `created`.
    fn pool(ns: &str, name: &str, addrs: &[&str], created: Option<i64>) -> DynamicObject {
        let mut o = dynamic(
            &ip_pool_resource(),
            ns,
            name,
            json!({"spec": {"addresses": addrs}, "status": {"assignedIPv4": 1}}),
        );
        o.metadata.creation_timestamp = created.map(|s| {
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(s).unwrap(),
            )
        });
        o
    }

    #[test]
    fn pools_that_do_not_read_or_validate_are_left_out_with_a_reason() {
        use kube::runtime::watcher::Event;
        let mut w = reflector::store::Writer::new(ip_pool_resource());
        for o in [
            pool("a", "old", &["10.0.0.0/30"], Some(100)),
            // Overlaps the older one: out, whatever its name.
            pool("a", "aaa-newer", &["10.0.0.2-10.0.0.9"], Some(200)),
            // The same name in another namespace: out.
            pool("b", "old", &["10.1.0.0/30"], Some(300)),
            pool("a", "bad", &["10.2.0.0/33"], Some(50)),
            pool("a", "fine", &["10.3.0.0/30"], None),
            dynamic(
                &ip_pool_resource(),
                "a",
                "unreadable",
                json!({"spec": {"addresses": "10.4.0.0/30"}}),
            ),
        ] {
            w.apply_watcher_event(&Event::Apply(o));
        }
        let mut l2 = reflector::store::Writer::new(l2_advert_resource());
        l2.apply_watcher_event(&Event::Apply(dynamic(
            &l2_advert_resource(),
            "a",
            "empty-pool-name",
            json!({"spec": {"ipAddressPools": [""]}}),
        )));
        let stores = Stores {
            services: reflector::store::<Service>().0,
            slices: reflector::store::<KubeSlice>().0,
            nodes: reflector::store::<Node>().0,
            service_cidrs: reflector::store::<ServiceCIDR>().0,
            ip_pools: w.as_reader(),
            l2_adverts: l2.as_reader(),
        };
        let (objs, problems) = snapshot_checked(&stores);
        let kept: Vec<_> = objs.ip_pools.iter().map(|p| name_of(&p.metadata)).collect();
        assert_eq!(kept, ["a/fine", "a/old"]);
        assert!(objs.l2_adverts.is_empty());
        let text = problems.join("\n");
        for want in [
            "IPAddressPool a/aaa-newer: spec.addresses[0]",
            "overlaps IPAddressPool a/old",
            "IPAddressPool b/old: an IPAddressPool of this name is in namespace \"a\"",
            "IPAddressPool a/bad: spec.addresses[0]",
            "IPAddressPool a/unreadable:",
            "L2Advertisement a/empty-pool-name: spec.ipAddressPools[0]",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert_eq!(problems.len(), 5, "{text}");
    }

    #[test]
    fn status_comparison_and_resource_versions() {
        let ips = [Ipv4Addr::new(172, 18, 255, 200)];
        let mut svc = Service::default();
        assert!(lb_ingress(&svc).is_empty());
        svc.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
                {"ip": "172.18.255.200", "ipMode": "VIP"}
            ]}}))
            .unwrap(),
        );
        assert_eq!(lb_ingress(&svc), ingress(&ips));
        svc.status = Some(
            serde_json::from_value(json!({"loadBalancer": {"ingress": [
                {"ip": "172.18.255.200"}
            ]}}))
            .unwrap(),
        );
        assert_ne!(lb_ingress(&svc), ingress(&ips), "ipMode differs");
        assert_eq!(
            serde_json::to_value(ingress(&ips)).unwrap(),
            json!([{"ip": "172.18.255.200", "ipMode": "VIP"}])
        );
        assert!(newer(Some("12"), "9"));
        assert!(!newer(Some("9"), "9"));
        assert!(!newer(Some("8"), "9"));
        assert!(!newer(None, "9"));
        assert!(!newer(Some("abc"), "9"));
    }

    fn named(ns: &str, name: &str) -> Slice {
        let mut s = slice("IPv4", Some("web"));
        s.metadata.namespace = Some(ns.into());
        s.metadata.name = Some(name.into());
        Slice::from_api(&s)
    }

    fn k(ns: &str, name: &str) -> Key {
        (ns.into(), name.into())
    }

    /// Patching keeps the list sorted and equal to the objects as they are; the change log
    /// names what changed since an earlier snapshot only while it reaches back that far
    /// and no step may have changed anything.
    #[test]
    fn snapshots_are_patched_and_say_what_changed() {
        let mut list = vec![named("a", "1"), named("b", "1"), named("b", "3")];
        let now: BTreeMap<Key, Slice> = [
            (k("a", "0"), named("a", "0")),
            (k("b", "1"), named("b", "1")),
            (k("b", "2"), named("b", "2")),
        ]
        .into();
        let keys: BTreeSet<Key> = [k("a", "0"), k("a", "1"), k("b", "2"), k("b", "3")].into();
        patch(&mut list, &keys, |key| now.get(key).cloned());
        let names: Vec<Key> = list
            .iter()
            .map(|s| (s.ns_name().0.to_string(), s.ns_name().1.to_string()))
            .collect();
        assert_eq!(names, [k("a", "0"), k("b", "1"), k("b", "2")]);

        let step = |n: u64, slices: &[Key]| {
            (
                n,
                Some(Arc::new(Step {
                    services: vec![],
                    slices: slices.to_vec(),
                    first_event: None,
                })),
            )
        };
        let log = ChangeLog {
            source: 7,
            seq: 4,
            steps: [(2, None), step(3, &[k("a", "0")]), step(4, &[k("b", "2")])].into(),
        };
        let (_, slices, _) = log.since(7, 2).expect("covered");
        assert_eq!(slices, [k("a", "0"), k("b", "2")].into());
        assert_eq!(log.since(7, 3).unwrap().1, [k("b", "2")].into());
        // Step 2 may have changed anything; another source; the same snapshot; too old.
        assert!(log.since(7, 1).is_none());
        assert!(log.since(8, 3).is_none());
        assert!(log.since(7, 4).is_none());
        let old = ChangeLog {
            steps: [step(3, &[]), step(4, &[])].into(),
            ..log
        };
        assert!(old.since(7, 1).is_none());
        assert!(old.since(7, 2).is_some());

        // The change handed to the translation: present objects as they are, the rest gone.
        let objs = Objects {
            slices: list.into_iter().map(Arc::new).collect(),
            ..Objects::default()
        };
        let c = change_of(&objs, &BTreeSet::new(), &[k("a", "0"), k("a", "1")].into());
        assert_eq!(c.slices.len(), 2);
        assert_eq!(c.slices[0].0, k("a", "0"));
        assert!(c.slices[0].1.is_some() && c.slices[1].1.is_none());
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
