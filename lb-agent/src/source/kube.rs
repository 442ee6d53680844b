//! `--source kube`: Services and EndpointSlices followed through the Kubernetes API.
//!
//! Two kube-runtime watchers (all namespaces) feed two reflector stores, holding trimmed
//! objects (no `managedFields`, no annotations: nothing here reads them, and on a large
//! cluster they are most of the bytes). The watchers do the protocol work: paginated lists
//! (500 per page), watches resumed from the last resourceVersion or bookmark, a full relist
//! after `410 Gone`, and reconnects with kube's default backoff (client-go's: 0.8 s doubling
//! to 30 s, jittered) when the API server cannot be reached.
//!
//! A snapshot ([`Objects`], the same input the file source produces) is published only
//! after BOTH stores have completed their first list, so an agent that starts while the API
//! server is slow never programs an empty cluster. After that, every change is followed by a
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
    core::v1::{ObjectReference, Service},
    discovery::v1::EndpointSlice,
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

    /// Starts the watchers on `client` (on the current tokio runtime); `node_name` tags the
    /// Events this agent posts.
    pub fn start(client: Client, node_name: &str) -> Self {
        Self::start_with(client, node_name, DEBOUNCE)
    }

    pub fn start_with(client: Client, node_name: &str, debounce: Duration) -> Self {
        let (svc_reader, svc_writer) = reflector::store::<Service>();
        let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
        // A generation counter bumped after each change to either store.
        let (changes, changes_rx) = watch::channel(0u64);
        let (snap_tx, snapshots) = watch::channel(None);
        let tasks = vec![
            tokio::spawn(follow(
                Api::<Service>::all(client.clone()),
                svc_writer,
                "Services",
                changes.clone(),
            )),
            tokio::spawn(follow(
                Api::<EndpointSlice>::all(client.clone()),
                slice_writer,
                "EndpointSlices",
                changes,
            )),
            tokio::spawn(publish(
                svc_reader.clone(),
                slice_reader,
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

    /// The next snapshot: the first one once both initial lists are complete, then one per
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

/// Runs one watcher into its store for ever; bumps `changes` after each change the store
/// saw, logs trouble once per distinct error and the recovery.
async fn follow<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    changes: watch::Sender<u64>,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim::<K>)
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut failing: Option<String> = None;
    let mut listed = false;
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

/// Publishes snapshots: the first when both stores are listed, then one per quiet period
/// after changes.
async fn publish(
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    mut changes: watch::Receiver<u64>,
    out: watch::Sender<Option<Arc<Objects>>>,
    debounce: Duration,
) {
    if services.wait_until_ready().await.is_err() || slices.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        changes.borrow_and_update();
        let objs = snapshot(&services, &slices);
        log::debug!(
            "snapshot: {} services, {} IPv4 endpoint slices",
            objs.services.len(),
            objs.slices.len()
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
pub fn snapshot(services: &Store<Service>, slices: &Store<EndpointSlice>) -> Objects {
    let mut svcs: Vec<Service> = services.state().iter().map(|s| (**s).clone()).collect();
    svcs.sort_by_key(key);
    let mut sl: Vec<EndpointSlice> = slices
        .state()
        .iter()
        .filter(|s| usable_slice(s))
        .map(|s| (**s).clone())
        .collect();
    sl.sort_by_key(key);
    Objects {
        services: svcs,
        slices: sl,
    }
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
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
