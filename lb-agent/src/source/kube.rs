//! `--source kube`: Services and EndpointSlices (plus the agent's own Node and the
//! ServiceCIDRs) followed through the Kubernetes API.
//!
//! Four kube-runtime watchers feed four reflector stores, holding trimmed objects (no
//! `managedFields`, no annotations: nothing here reads them, and on a large cluster they are
//! most of the bytes): Services and EndpointSlices in all namespaces, the agent's own Node
//! only (field selector `metadata.name=<node name>`: its zone label and deletion), and the
//! cluster-scoped `networking.k8s.io/v1` ServiceCIDRs (the service address ranges). The
//! watchers do the protocol work: paginated lists (500 per page), watches resumed from the
//! last resourceVersion or bookmark, a full relist after `410 Gone`, and reconnects with
//! kube's default backoff (client-go's: 0.8 s doubling to 30 s, jittered) when the API server
//! cannot be reached.
//!
//! A snapshot ([`Objects`], the same input the file source produces) is published only
//! after ALL FOUR stores have completed their first list, so an agent that starts while the
//! API server is slow never programs an empty cluster. A Node list with no object (the node
//! is not registered yet, or `--node-name` is wrong) is a complete, empty list. ServiceCIDRs
//! are served from Kubernetes 1.33 on; an API server that answers their list with `404`
//! (older) or `403` (the ClusterRole lacks them) counts as an empty, complete list, logged
//! once at warn, so the agent still starts; the watcher keeps retrying with its backoff and
//! fills the store if they become readable. After that, every change is followed by a
//! short quiet period ([`DEBOUNCE`]) so that a burst (a rollout rewriting many
//! EndpointSlices) becomes one snapshot. While the API server is away no snapshot comes: the
//! datapath keeps its last state, and a relist replaces a store's content in one step
//! (reflector semantics), so nothing half-listed is ever published.
//!
//! Warnings about unsupported features (`translate::ServiceEvent`) are posted as
//! `events.k8s.io/v1` Events of type Warning on the Service ([`KubeSource::post_event`]).
use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, ObjectReference, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    model::translate::ServiceEvent,
    source::yaml::{Objects, SERVICE_NAME_LABEL},
};

/// Quiet period after a change before a snapshot is published.
pub const DEBOUNCE: Duration = Duration::from_millis(150);

/// `reportingController` of the Events the agent posts.
pub const EVENT_CONTROLLER: &str = "xlb.dev/lb-agent";

/// Attempts to post one Event (the API server may be away for a while).
const EVENT_ATTEMPTS: u32 = 6;

/// The running watchers and the snapshots they produce. Dropping it stops them.
pub struct KubeSource {
    snapshots: watch::Receiver<Option<Arc<Objects>>>,
    services: Store<Service>,
    recorder: Recorder,
    runtime: tokio::runtime::Handle,
    tasks: Vec<JoinHandle<()>>,
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
        let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
        let (node_reader, node_writer) = reflector::store::<Node>();
        let (cidr_reader, cidr_writer) = reflector::store::<ServiceCIDR>();
        // A generation counter bumped after each change to any store.
        let (changes, changes_rx) = watch::channel(0u64);
        // Set when the ServiceCIDR list is refused (404/403): listed, as empty.
        let (cidrs_refused, cidrs_refused_rx) = watch::channel(false);
        let (snap_tx, snapshots) = watch::channel(None);
        let all = watcher::Config::default;
        let tasks = vec![
            tokio::spawn(follow(
                Api::<Service>::all(client.clone()),
                all(),
                svc_writer,
                "Services",
                changes.clone(),
                None,
            )),
            tokio::spawn(follow(
                Api::<EndpointSlice>::all(client.clone()),
                all(),
                slice_writer,
                "EndpointSlices",
                changes.clone(),
                None,
            )),
            tokio::spawn(follow(
                Api::<Node>::all(client.clone()),
                all().fields(&format!("metadata.name={node_name}")),
                node_writer,
                "Node",
                changes.clone(),
                None,
            )),
            tokio::spawn(follow(
                Api::<ServiceCIDR>::all(client.clone()),
                all(),
                cidr_writer,
                "ServiceCIDRs",
                changes,
                Some(cidrs_refused),
            )),
            tokio::spawn(publish(
                Stores {
                    services: svc_reader.clone(),
                    slices: slice_reader,
                    nodes: node_reader,
                    service_cidrs: cidr_reader,
                },
                cidrs_refused_rx,
                changes_rx,
                snap_tx,
                debounce,
            )),
        ];
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: EVENT_CONTROLLER.into(),
                instance: Some(format!("lb-agent-{node_name}")),
            },
        );
        Self {
            snapshots,
            services: svc_reader,
            recorder,
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

/// Drops what is never read, before the object is stored.
fn trim<K: Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
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

/// Runs one watcher into its store for ever; bumps `changes` after each change the store
/// saw, logs trouble once per distinct error and the recovery. With `refused_ok`, a
/// [`refused`] list is logged once at warn and sets the flag (the gate in [`publish`] then
/// takes the store as listed and empty); the watcher keeps retrying.
async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    changes: watch::Sender<u64>,
    refused_ok: Option<watch::Sender<bool>>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
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
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                        changes.send_modify(|g| *g += 1)
                    }
                    watcher::Event::InitDone => {
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
                if let (Some(flag), Some(code)) = (&refused_ok, refused(&e)) {
                    if !refusal_logged {
                        let why = if code == 404 {
                            "not served by this API server (Kubernetes before 1.33)"
                        } else {
                            "forbidden (the ClusterRole does not grant list/watch)"
                        };
                        log::warn!(
                            "{what}: {why}: {msg}; taken as none (--service-cidr only); \
                             retrying with backoff"
                        );
                        refusal_logged = true;
                    }
                    if !flag.send_replace(true) {
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
    pub slices: Store<EndpointSlice>,
    /// The agent's own Node (none or one).
    pub nodes: Store<Node>,
    pub service_cidrs: Store<ServiceCIDR>,
}

/// Publishes snapshots: the first when every store is listed (the ServiceCIDRs' also when
/// their list was refused, see [`refused`]), then one per quiet period after changes.
async fn publish(
    stores: Stores,
    mut cidrs_refused: watch::Receiver<bool>,
    mut changes: watch::Receiver<u64>,
    out: watch::Sender<Option<Arc<Objects>>>,
    debounce: Duration,
) {
    let cidrs_listed = async {
        tokio::select! {
            r = stores.service_cidrs.wait_until_ready() => r.is_ok(),
            r = cidrs_refused.wait_for(|refused| *refused) => r.is_ok(),
        }
    };
    if stores.services.wait_until_ready().await.is_err()
        || stores.slices.wait_until_ready().await.is_err()
        || stores.nodes.wait_until_ready().await.is_err()
        || !cidrs_listed.await
    {
        return;
    }
    loop {
        changes.borrow_and_update();
        let objs = snapshot(&stores);
        log::debug!(
            "snapshot: {} services, {} IPv4 endpoint slices, {} node, {} service CIDRs",
            objs.services.len(),
            objs.slices.len(),
            objs.nodes.len(),
            objs.service_cidrs.len()
        );
        if out.send(Some(Arc::new(objs))).is_err() {
            return;
        }
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(debounce).await;
    }
}

/// The stores' content in the shape `translate` takes, sorted by namespace and name (the
/// translation does not depend on order; logs and diffs read better).
pub fn snapshot(stores: &Stores) -> Objects {
    let mut sl: Vec<EndpointSlice> = stores
        .slices
        .state()
        .iter()
        .filter(|s| usable_slice(s))
        .map(|s| (**s).clone())
        .collect();
    sl.sort_by_key(key);
    Objects {
        services: sorted(&stores.services),
        slices: sl,
        nodes: sorted(&stores.nodes),
        service_cidrs: sorted(&stores.service_cidrs),
        // MetalLB pools/advertisements are not watched yet (file source only for now).
        ip_pools: Vec::new(),
        l2_adverts: Vec::new(),
    }
}

fn sorted<K: Resource + Clone>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut v: Vec<K> = store.state().iter().map(|o| (**o).clone()).collect();
    v.sort_by_key(key);
    v
}

fn key<K: Resource>(o: &K) -> (String, String) {
    (
        o.meta().namespace.clone().unwrap_or_default(),
        o.meta().name.clone().unwrap_or_default(),
    )
}

/// As the file source and kube-proxy: IPv4 slices that name their Service.
pub fn usable_slice(s: &EndpointSlice) -> bool {
    s.address_type == "IPv4"
        && s.labels()
            .get(SERVICE_NAME_LABEL)
            .is_some_and(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

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
        assert!(usable_slice(&slice("IPv4", Some("web"))));
        assert!(!usable_slice(&slice("IPv6", Some("web"))));
        assert!(!usable_slice(&slice("FQDN", Some("web"))));
        assert!(!usable_slice(&slice("IPv4", None)));
        assert!(!usable_slice(&slice("IPv4", Some(""))));
    }

    #[test]
    fn trim_drops_managed_fields_and_annotations_only() {
        let mut s = slice("IPv4", Some("web"));
        s.metadata.annotations = Some([("a".to_string(), "b".to_string())].into());
        s.metadata.managed_fields = Some(vec![Default::default()]);
        trim(&mut s);
        assert!(s.metadata.annotations.is_none());
        assert!(s.metadata.managed_fields.is_none());
        assert!(s.metadata.labels.is_some());
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
        let (slices, mut w) = reflector::store::<EndpointSlice>();
        w.apply_watcher_event(&Event::Apply(slice("IPv4", Some("a"))));
        let mut v6 = slice("IPv6", Some("a"));
        v6.metadata.name = Some("s-v6".into());
        w.apply_watcher_event(&Event::Apply(v6));
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
        let objs = snapshot(&Stores {
            services,
            slices,
            nodes,
            service_cidrs,
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
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
