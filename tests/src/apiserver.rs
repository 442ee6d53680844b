//! # THE PROJECT'S ONE TEST DOUBLE: a Kubernetes API server stand-in
//!
//! **Why it exists.** `lb-agent --source kube` follows Services and EndpointSlices through
//! the Kubernetes API with the real kube-rs client (watchers, reflectors, Events). No real
//! API server can run on the machines these tests run on (no kind, no Docker, no etcd, no
//! kube-apiserver binary), so the end-to-end tests (`tests/tests/e2e_kube.rs`) talk to this
//! small HTTP server instead. Everything else in those tests is real: real agent processes,
//! real BPF programs, real packets. The real-cluster test in `e2e_kube.rs` (run with
//! `KUBECONFIG` and `XLB_REAL_CLUSTER=1`) checks the same behaviour against a real API server.
//!
//! **What it implements** — the subset of the API the agent uses, with the real wire format:
//!
//! - `GET` list on cluster-wide and namespaced collection paths
//!   (`/api/v1/services`, `/api/v1/namespaces/{ns}/services`,
//!   `/apis/discovery.k8s.io/v1/endpointslices`, …, any group/version/resource), returning a
//!   `<Kind>List` with `metadata.resourceVersion`; `limit` + `continue` pagination served from
//!   a consistent snapshot (a `continue` token becomes `410 Gone` after [`ApiServer::compact`],
//!   as an expired one does on a real server); equality `labelSelector`s (`a=b`, `a!=b`, `a`)
//!   and `fieldSelector`s on `metadata.name` / `metadata.namespace` (`=`, `==`, `!=`; what
//!   the agent uses to follow its own Node), on lists and watches alike.
//! - Cluster-scoped resources (`nodes`, `namespaces`, `networking.k8s.io/v1`
//!   `servicecidrs`, …; see `cluster_scoped`): stored and served without a namespace.
//! - `GET` of one object; `POST` (create, with `generateName`), `PUT`, `PATCH` (JSON merge
//!   patch) and `DELETE` of objects (what kube's `events::Recorder` needs for Events).
//! - The `status` subresource (`.../{name}/status`): `GET`, and `PATCH` (JSON merge patch)
//!   that, as on a real server, changes only the object's `status` (the rest of the patch is
//!   ignored), bumps the resourceVersion and sends a MODIFIED event. Each status PATCH is
//!   recorded with its `fieldManager` and `User-Agent` ([`ApiServer::status_patches`]), so
//!   that a test can tell who wrote a status.
//! - MetalLB's `metallb.io/v1beta1` `ipaddresspools` and `l2advertisements` (namespaced;
//!   kinds `IPAddressPool`, `L2Advertisement`), as any other resource: their CRDs are taken
//!   as installed (make them answer 404 with [`set_refused`](ApiServer::set_refused) for a
//!   cluster without them).
//! - `watch=true` (`watch=1`) with `resourceVersion`, `allowWatchBookmarks` and
//!   `timeoutSeconds`: a chunked stream of JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|
//!   ERROR, "object": …}`. A watch from resourceVersion R replays every change after R from
//!   the history, then streams live ones; without R (or R = "0") it starts with synthetic
//!   ADDED events for the current objects. A watch from a version older than the last
//!   [`compact`](ApiServer::compact) gets what a real server sends: HTTP 200 with one ERROR
//!   event carrying a `Status` with code 410 (reason `Expired`), then the end of the stream.
//!   Bookmarks carry the current resourceVersion and are sent every
//!   [`ApiServer::set_bookmark_interval`] (1 s by default; a real server: about a minute).
//! - One global resourceVersion counter over all resources, as etcd's revision.
//!
//! **Test controls:** [`create`](ApiServer::create) / [`update`](ApiServer::update) /
//! [`apply`](ApiServer::apply) / [`delete`](ApiServer::delete) objects (each bumps the
//! resourceVersion and notifies watchers), [`compact`](ApiServer::compact) (history
//! forgotten: older watches get 410), [`drop_watches`](ApiServer::drop_watches) (open
//! streams end), [`stop`](ApiServer::stop) / [`start`](ApiServer::start) on the same address
//! (restart or outage: every connection is cut, nothing answers meanwhile; the stored
//! objects survive, as they do in etcd), [`set_refused`](ApiServer::set_refused) (one
//! resource answers 404 as on an API server that does not serve it, 403 as without RBAC,
//! or 503), and the posted [`events`](ApiServer::events).
//!
//! **What it does NOT implement:** authentication and authorisation (no TLS, anyone may do
//! anything), admission and validation (objects are stored as given; only `metadata` is
//! managed: name, namespace, uid, resourceVersion, creationTimestamp), defaulting,
//! field selectors on other fields, set-based label selectors, `resourceVersionMatch` (lists are always
//! served at the latest version), streaming lists (`sendInitialEvents`), server-side apply,
//! strategic-merge and JSON patches, subresources other than `/status` (and `PUT` on it;
//! a `PUT` or `PATCH` of the object itself stores its `status` as given, where a real server
//! keeps the old one), deletion grace periods,
//! finalizers and garbage collection, discovery (`/api`, `/apis`), HTTP/2, protobuf, and any
//! object kind the tests do not post (kinds are derived from the resource name). Compaction
//! is explicit, never automatic, and bumps the resourceVersion (on a real cluster other
//! writes, such as leases, always move it on), so that watchers that were up to date before
//! it are sent to relist too.
//!
//! The listener binds where it is told: loopback for the unit tests, or a harness network
//! namespace ([`ApiServer::start_in_netns`]) for the end-to-end tests, never a host address.
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode, body::Frame, body::Incoming, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Group/version and plural resource name: `("v1", "services")`,
/// `("discovery.k8s.io/v1", "endpointslices")`.
type ResKey = (String, String);

/// One stored change, for watches that resume from an older version.
struct Change {
    rv: u64,
    res: ResKey,
    namespace: String,
    kind: &'static str,
    object: Value,
}

struct Watch {
    res: ResKey,
    namespace: Option<String>,
    selector: Vec<LabelReq>,
    fields: Vec<LabelReq>,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    rv: u64,
    next_uid: u64,
    /// (group/version, resource) -> (namespace, name) -> object.
    objects: BTreeMap<ResKey, BTreeMap<(String, String), Value>>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    compacted: u64,
    watches: Vec<Watch>,
    /// Paginated lists in progress: token id -> (list resourceVersion, items as JSON).
    /// Each object is serialised once, when its list starts (not cloned, then serialised
    /// again for its page), and shared: a page copies out only its own items' text.
    pages: HashMap<u64, (u64, std::sync::Arc<Vec<String>>)>,
    next_page_id: u64,
    /// Requests served, by "METHOD path?query" (for tests that check what the client did).
    requests: Vec<String>,
    /// Resources that answer with an error status (see `set_refused`).
    refused: Vec<(ResKey, StatusCode)>,
    /// `PATCH`es of the `status` subresource, in order.
    status_patches: Vec<StatusPatch>,
}

/// One `PATCH` of an object's `status` subresource (see [`ApiServer::status_patches`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusPatch {
    /// Plural resource name, e.g. `services`.
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// The `fieldManager` query parameter (kube's `PatchParams::field_manager`).
    pub field_manager: Option<String>,
    /// The `User-Agent` header, if any (kube-rs sends none unless configured).
    pub user_agent: Option<String>,
    /// The request body.
    pub patch: Value,
    /// Whether the object existed and was patched (else 404).
    pub applied: bool,
}

struct Shared {
    state: Mutex<State>,
    bookmark_every: Mutex<Duration>,
}

/// The stand-in. Dropping it stops the server.
pub struct ApiServer {
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    netns: Option<String>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts on `127.0.0.1` with a free port (unit tests).
    pub fn start_local() -> Result<Self> {
        Self::start_at("127.0.0.1:0".parse()?, None)
    }

    /// Starts listening on `addr` inside the network namespace `netns`, as a control plane
    /// node's API server (the socket stays in that namespace for its whole life).
    pub fn start_in_netns(netns: &str, addr: SocketAddr) -> Result<Self> {
        Self::start_at(addr, Some(netns.to_string()))
    }

    fn start_at(addr: SocketAddr, netns: Option<String>) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("apiserver")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            bookmark_every: Mutex::new(Duration::from_secs(1)),
        });
        let ticker = shared.clone();
        rt.spawn(async move {
            loop {
                let every = *ticker.bookmark_every.lock().unwrap();
                tokio::time::sleep(every).await;
                ticker.state.lock().unwrap().send_bookmarks();
            }
        });
        let mut s = Self {
            shared,
            rt: Some(rt),
            addr,
            netns,
            server: None,
        };
        s.start()?;
        Ok(s)
    }

    /// The address clients use.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig that points at this server (no credentials: it has none).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\nusers:\n- name: anyone\n  user: {{}}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: anyone\ncurrent-context: stand-in\n",
            self.url()
        )
    }

    /// (Re)opens the listener on the same address. Stored objects are kept.
    pub fn start(&mut self) -> Result<()> {
        if self.server.is_some() {
            return Ok(());
        }
        let addr = self.addr;
        let bind = move || -> Result<std::net::TcpListener> {
            // std sets SO_REUSEADDR, so a restart can take the same port at once.
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("API server stand-in: binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let listener = match &self.netns {
            Some(ns) => crate::netns::try_in_netns(ns, bind)??,
            None => bind()?,
        };
        self.addr = listener.local_addr()?;
        let shared = self.shared.clone();
        let rt = self.rt.as_ref().expect("runtime");
        self.server = Some(rt.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("API server stand-in: {e}");
                    return;
                }
            };
            // Owned by this task: aborting it (stop) cuts every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let shared = shared.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                let shared = shared.clone();
                                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
                            });
                            let _ = http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        }));
        Ok(())
    }

    /// Closes the listener and every connection, open watches included (a crash or an
    /// outage). Objects stay for [`start`](Self::start).
    pub fn stop(&mut self) {
        if let Some(h) = self.server.take() {
            h.abort();
            if let Some(rt) = &self.rt {
                let _ = rt.block_on(h);
            }
        }
        self.shared.state.lock().unwrap().watches.clear();
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Ends every open watch stream cleanly (as an API server does on a timeout or a
    /// rolling restart); clients resume from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.state.lock().unwrap().watches.clear();
    }

    /// Forgets the change history: a watch from any version before now gets `410 Gone`, and
    /// list `continue` tokens expire. Bumps the resourceVersion (see the module docs).
    pub fn compact(&self) {
        let mut st = self.shared.state.lock().unwrap();
        st.rv += 1;
        st.compacted = st.rv;
        st.history.clear();
        st.pages.clear();
    }

    /// Makes every request on one resource (e.g. `("discovery.k8s.io/v1",
    /// "endpointslices")`) answer `503 Service Unavailable` (or work again), as an
    /// aggregated or overloaded API would; open watches on it end.
    pub fn set_unavailable(&self, api_version: &str, resource: &str, unavailable: bool) {
        self.set_refused(api_version, resource, unavailable.then_some(503));
    }

    /// Makes every request on one resource answer `code` with the Status a real server
    /// sends (`None`: served again): 404 as an API server that does not serve the resource
    /// (e.g. `networking.k8s.io/v1` `servicecidrs` before Kubernetes 1.33), 403 as a
    /// ClusterRole that does not grant it, 503 as [`set_unavailable`](Self::set_unavailable).
    /// Open watches on it end.
    pub fn set_refused(&self, api_version: &str, resource: &str, code: Option<u16>) {
        let res = (api_version.to_string(), resource.to_string());
        let mut st = self.shared.state.lock().unwrap();
        st.refused.retain(|(r, _)| *r != res);
        if let Some(code) = code {
            let code = StatusCode::from_u16(code).expect("an HTTP status code");
            st.watches.retain(|w| w.res != res);
            st.refused.push((res, code));
        }
    }

    /// How often open watches with bookmarks get one.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_every.lock().unwrap() = every;
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.state.lock().unwrap().rv
    }

    /// Open watch streams.
    pub fn watch_count(&self) -> usize {
        let mut st = self.shared.state.lock().unwrap();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.len()
    }

    /// Requests served so far, as "METHOD path?query".
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// The `PATCH`es of `status` subresources so far, in order (who wrote which status).
    pub fn status_patches(&self) -> Vec<StatusPatch> {
        self.shared.state.lock().unwrap().status_patches.clone()
    }

    /// Creates an object (typed k8s-openapi objects serialise with `apiVersion`/`kind`).
    pub fn create(&self, obj: &impl serde::Serialize) -> Result<Value> {
        let (res, ns, name, obj) = locate(obj)?;
        let mut st = self.shared.state.lock().unwrap();
        st.create(res, &ns, Some(name), obj)
            .map_err(|(_, m)| anyhow::anyhow!(m))
    }

    /// Replaces an existing object.
    pub fn update(&self, obj: &impl serde::Serialize) -> Result<Value> {
        let (res, ns, name, obj) = locate(obj)?;
        let mut st = self.shared.state.lock().unwrap();
        st.replace(res, &ns, &name, obj)
            .map_err(|(_, m)| anyhow::anyhow!(m))
    }

    /// Creates or replaces.
    pub fn apply(&self, obj: &impl serde::Serialize) -> Result<Value> {
        let (res, ns, name, obj) = locate(obj)?;
        let mut st = self.shared.state.lock().unwrap();
        if st.get(&res, &ns, &name).is_some() {
            st.replace(res, &ns, &name, obj)
        } else {
            st.create(res, &ns, Some(name), obj)
        }
        .map_err(|(_, m)| anyhow::anyhow!(m))
    }

    /// Deletes the object `obj` names (only apiVersion, kind and metadata are read).
    pub fn delete(&self, obj: &impl serde::Serialize) -> Result<()> {
        let (res, ns, name, _) = locate(obj)?;
        let mut st = self.shared.state.lock().unwrap();
        st.remove(&res, &ns, &name)
            .map(|_| ())
            .map_err(|(_, m)| anyhow::anyhow!(m))
    }

    /// Objects of one resource, e.g. `("v1", "services")`.
    pub fn list(&self, api_version: &str, resource: &str) -> Vec<Value> {
        let st = self.shared.state.lock().unwrap();
        st.objects
            .get(&(api_version.to_string(), resource.to_string()))
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Events posted (core/v1 and events.k8s.io/v1).
    pub fn events(&self) -> Vec<Value> {
        let mut out = self.list("events.k8s.io/v1", "events");
        out.extend(self.list("v1", "events"));
        out
    }

    /// Makes the stored Services, EndpointSlices, Nodes, ServiceCIDRs and MetalLB
    /// IPAddressPools and L2Advertisements equal to `objs` and `slices` (creates, updates
    /// only what differs, deletes the rest), one change at a time as controllers would.
    /// `slices` are the API objects of `objs.slices` (which keeps only what the agent reads:
    /// `yaml::parse_api_slices` gives them).
    pub fn sync_objects(
        &self,
        objs: &lb_agent::source::yaml::Objects,
        slices: &[k8s_openapi::api::discovery::v1::EndpointSlice],
    ) -> Result<()> {
        use lb_agent::source::metallb::METALLB_API_VERSION;
        // MetalLB's types carry no apiVersion/kind of their own.
        let typed = |v: serde_json::Result<Value>, kind: &str| {
            v.map(|mut v| {
                v["apiVersion"] = json!(METALLB_API_VERSION);
                v["kind"] = json!(kind);
                v
            })
        };
        let mut want: BTreeMap<ResKey, BTreeMap<(String, String), Value>> = BTreeMap::new();
        for v in objs
            .services
            .iter()
            .map(serde_json::to_value)
            .chain(slices.iter().map(serde_json::to_value))
            .chain(objs.nodes.iter().map(serde_json::to_value))
            .chain(objs.service_cidrs.iter().map(serde_json::to_value))
            .chain(
                objs.ip_pools
                    .iter()
                    .map(|p| typed(serde_json::to_value(p), "IPAddressPool")),
            )
            .chain(
                objs.l2_adverts
                    .iter()
                    .map(|l| typed(serde_json::to_value(l), "L2Advertisement")),
            )
        {
            let (res, ns, name, v) = locate(&v?)?;
            want.entry(res).or_default().insert((ns, name), v);
        }
        let mut st = self.shared.state.lock().unwrap();
        for res in [
            ("v1".to_string(), "services".to_string()),
            ("discovery.k8s.io/v1".into(), "endpointslices".into()),
            ("v1".into(), "nodes".into()),
            ("networking.k8s.io/v1".into(), "servicecidrs".into()),
            (METALLB_API_VERSION.into(), "ipaddresspools".into()),
            (METALLB_API_VERSION.into(), "l2advertisements".into()),
        ] {
            let have: Vec<(String, String)> = st
                .objects
                .get(&res)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let wanted = want.remove(&res).unwrap_or_default();
            for (ns, name) in have {
                if !wanted.contains_key(&(ns.clone(), name.clone())) {
                    st.remove(&res, &ns, &name)
                        .map_err(|(_, m)| anyhow::anyhow!(m))?;
                }
            }
            for ((ns, name), v) in wanted {
                let r = match st.get(&res, &ns, &name) {
                    Some(old) if same_content(old, &v) => continue,
                    Some(_) => st.replace(res.clone(), &ns, &name, v),
                    None => st.create(res.clone(), &ns, Some(name), v),
                };
                r.map_err(|(_, m)| anyhow::anyhow!(m))?;
            }
        }
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Equal apart from server-managed metadata.
fn same_content(stored: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            for k in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
                m.remove(k);
            }
        }
        v
    };
    strip(stored) == strip(new)
}

/// Resource, namespace (`""` for cluster-scoped ones, `default` when a namespaced object
/// names none) name and JSON of a serialisable object.
fn locate(obj: &impl serde::Serialize) -> Result<(ResKey, String, String, Value)> {
    let v = serde_json::to_value(obj)?;
    let api_version = v["apiVersion"]
        .as_str()
        .context("object has no apiVersion")?;
    let kind = v["kind"].as_str().context("object has no kind")?;
    let name = v["metadata"]["name"]
        .as_str()
        .context("object has no metadata.name")?;
    let res = (api_version.to_string(), plural(kind));
    let ns = if cluster_scoped(&res.1) {
        ""
    } else {
        v["metadata"]["namespace"].as_str().unwrap_or("default")
    };
    Ok((res, ns.to_string(), name.to_string(), v))
}

/// Resources without namespaces (those the tests may use): stored under namespace `""`,
/// served without `metadata.namespace`.
fn cluster_scoped(resource: &str) -> bool {
    matches!(
        resource,
        "nodes"
            | "namespaces"
            | "servicecidrs"
            | "ipaddresses"
            | "clusterroles"
            | "clusterrolebindings"
    )
}

fn plural(kind: &str) -> String {
    let k = kind.to_lowercase();
    if k.ends_with('s') {
        format!("{k}es")
    } else {
        format!("{k}s")
    }
}

/// `kind` for a resource (the kinds the tests use, else a guess from the plural).
fn kind_of(resource: &str) -> String {
    match resource {
        "services" => "Service".into(),
        "endpointslices" => "EndpointSlice".into(),
        "events" => "Event".into(),
        "endpoints" => "Endpoints".into(),
        "nodes" => "Node".into(),
        "namespaces" => "Namespace".into(),
        "servicecidrs" => "ServiceCIDR".into(),
        "ipaddresses" => "IPAddress".into(),
        "ipaddresspools" => "IPAddressPool".into(),
        "l2advertisements" => "L2Advertisement".into(),
        other => {
            let s = other.strip_suffix('s').unwrap_or(other);
            let mut c = s.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        }
    }
}

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
}

fn parse_selector(s: &str) -> std::result::Result<Vec<LabelReq>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let p = p.trim();
            if let Some((k, v)) = p.split_once("!=") {
                Ok(LabelReq::Ne(k.trim().into(), v.trim().into()))
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Ok(LabelReq::Eq(k.trim().into(), v.trim().into()))
            } else if p.contains(' ') || p.contains('(') || p.starts_with('!') {
                Err(format!(
                    "labelSelector {p:?}: set-based selectors are not implemented by the stand-in"
                ))
            } else {
                Ok(LabelReq::Exists(p.into()))
            }
        })
        .collect()
}

/// A `fieldSelector`: the equality forms of [`parse_selector`] on the fields every object has.
fn parse_field_selector(s: &str) -> std::result::Result<Vec<LabelReq>, String> {
    let reqs = parse_selector(s).map_err(|_| format!("fieldSelector {s:?}: not supported"))?;
    for r in &reqs {
        match r {
            LabelReq::Eq(k, _) | LabelReq::Ne(k, _)
                if k == "metadata.name" || k == "metadata.namespace" => {}
            // A real server answers 400 too (field label not supported).
            _ => {
                return Err(format!(
                    "fieldSelector {s:?}: only metadata.name and metadata.namespace with =, == \
                     or != are implemented by the stand-in"
                ));
            }
        }
    }
    Ok(reqs)
}

fn fields_selected(obj: &Value, sel: &[LabelReq]) -> bool {
    let field = |k: &str| {
        let key = k.strip_prefix("metadata.").unwrap_or(k);
        // Cluster-scoped objects have no namespace: it matches "".
        obj["metadata"][key].as_str().unwrap_or("").to_string()
    };
    sel.iter().all(|r| match r {
        LabelReq::Eq(k, v) => field(k) == *v,
        LabelReq::Ne(k, v) => field(k) != *v,
        LabelReq::Exists(_) => false,
    })
}

fn selected(obj: &Value, sel: &[LabelReq]) -> bool {
    let label = |k: &str| obj["metadata"]["labels"][k].as_str().map(str::to_string);
    sel.iter().all(|r| match r {
        LabelReq::Eq(k, v) => label(k).as_deref() == Some(v),
        LabelReq::Ne(k, v) => label(k).as_deref() != Some(v),
        LabelReq::Exists(k) => label(k).is_some(),
    })
}

type Failure = (StatusCode, String);

impl State {
    fn get(&self, res: &ResKey, ns: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(res)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
    }

    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn create(
        &mut self,
        res: ResKey,
        ns: &str,
        name: Option<String>,
        mut obj: Value,
    ) -> std::result::Result<Value, Failure> {
        let name = match name.filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => {
                    self.next_uid += 1;
                    format!("{prefix}{:05x}", self.next_uid * 7919 % 0xfffff)
                }
                None => {
                    return Err((
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "metadata.name: Required value".into(),
                    ));
                }
            },
        };
        if self.get(&res, ns, &name).is_some() {
            return Err((
                StatusCode::CONFLICT,
                format!("{} \"{name}\" already exists", res.1),
            ));
        }
        let rv = self.bump();
        self.next_uid += 1;
        let meta = obj
            .as_object_mut()
            .ok_or((StatusCode::BAD_REQUEST, "not an object".to_string()))?
            .entry("metadata")
            .or_insert_with(|| json!({}));
        meta["name"] = json!(name);
        if ns.is_empty() {
            if let Some(m) = meta.as_object_mut() {
                m.remove("namespace");
            }
        } else {
            meta["namespace"] = json!(ns);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.next_uid));
        meta["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
        obj["apiVersion"] = json!(res.0);
        obj["kind"] = json!(kind_of(&res.1));
        self.objects
            .entry(res.clone())
            .or_default()
            .insert((ns.to_string(), name), obj.clone());
        self.record(rv, res, ns, "ADDED", &obj);
        Ok(obj)
    }

    fn replace(
        &mut self,
        res: ResKey,
        ns: &str,
        name: &str,
        mut obj: Value,
    ) -> std::result::Result<Value, Failure> {
        let Some(old) = self.get(&res, ns, name).cloned() else {
            return Err((
                StatusCode::NOT_FOUND,
                format!("{} \"{name}\" not found", res.1),
            ));
        };
        let rv = self.bump();
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        for k in ["uid", "creationTimestamp"] {
            obj["metadata"][k] = old["metadata"][k].clone();
        }
        obj["metadata"]["name"] = json!(name);
        if ns.is_empty() {
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("namespace");
            }
        } else {
            obj["metadata"]["namespace"] = json!(ns);
        }
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["apiVersion"] = json!(res.0);
        obj["kind"] = json!(kind_of(&res.1));
        self.objects
            .entry(res.clone())
            .or_default()
            .insert((ns.to_string(), name.to_string()), obj.clone());
        self.record(rv, res, ns, "MODIFIED", &obj);
        Ok(obj)
    }

    fn remove(
        &mut self,
        res: &ResKey,
        ns: &str,
        name: &str,
    ) -> std::result::Result<Value, Failure> {
        let Some(mut obj) = self
            .objects
            .get_mut(res)
            .and_then(|m| m.remove(&(ns.to_string(), name.to_string())))
        else {
            return Err((
                StatusCode::NOT_FOUND,
                format!("{} \"{name}\" not found", res.1),
            ));
        };
        // As a real server: the DELETED event carries the deletion's resourceVersion.
        let rv = self.bump();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(rv, res.clone(), ns, "DELETED", &obj);
        Ok(obj)
    }

    fn record(&mut self, rv: u64, res: ResKey, ns: &str, kind: &'static str, obj: &Value) {
        let line = event_line(kind, obj);
        self.watches.retain(|w| {
            if w.res != res
                || w.namespace.as_deref().is_some_and(|n| n != ns)
                || !selected(obj, &w.selector)
                || !fields_selected(obj, &w.fields)
            {
                return !w.tx.is_closed();
            }
            w.tx.send(line.clone()).is_ok()
        });
        self.history.push(Change {
            rv,
            res,
            namespace: ns.to_string(),
            kind,
            object: obj.clone(),
        });
    }

    fn send_bookmarks(&mut self) {
        let rv = self.rv.to_string();
        self.watches.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let obj = json!({
                "apiVersion": w.res.0,
                "kind": kind_of(&w.res.1),
                "metadata": {"resourceVersion": rv},
            });
            w.tx.send(event_line("BOOKMARK", &obj)).is_ok()
        });
    }
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap();
    s.push(b'\n');
    Bytes::from(s)
}

fn status(code: StatusCode, message: &str) -> Value {
    let reason = match code.as_u16() {
        403 => "Forbidden",
        404 => "NotFound",
        409 => "AlreadyExists",
        410 => "Expired",
        422 => "Invalid",
        405 => "MethodNotAllowed",
        503 => "ServiceUnavailable",
        _ => "BadRequest",
    };
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn reply(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(v).unwrap())).boxed())
        .unwrap()
}

fn fail((code, msg): Failure) -> Response<Body> {
    reply(code, &status(code, &msg))
}

/// A parsed request path.
struct Target {
    res: ResKey,
    namespace: Option<String>,
    name: Option<String>,
    /// `status` in `.../{name}/status`.
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => ((*v).to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, subresource) = match rest {
        [r] => (r.to_string(), None, None),
        [r, n] => (r.to_string(), Some(n.to_string()), None),
        [r, n, sub] => (r.to_string(), Some(n.to_string()), Some(sub.to_string())),
        _ => return None,
    };
    Some(Target {
        res: (gv, resource),
        namespace,
        name,
        subresource,
    })
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    Some((decode(k)?, decode(v)?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let q = query(&req);
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let user_agent = req
        .headers()
        .get(hyper::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    shared.state.lock().unwrap().requests.push(format!(
        "{method} {path}{}",
        req.uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    ));
    let Some(t) = parse_path(&path) else {
        return fail((
            StatusCode::NOT_FOUND,
            format!("the server could not find {path}"),
        ));
    };
    let refused = {
        let st = shared.state.lock().unwrap();
        st.refused
            .iter()
            .find(|(r, _)| *r == t.res)
            .map(|(_, code)| *code)
    };
    if let Some(code) = refused {
        // The messages of a real server.
        let (group, _) = t.res.0.rsplit_once('/').unwrap_or(("", &t.res.0));
        let msg = match code {
            StatusCode::NOT_FOUND => "the server could not find the requested resource".into(),
            StatusCode::FORBIDDEN => format!(
                "{res}{dot}{group} is forbidden: User \"system:anonymous\" cannot {verb} \
                 resource \"{res}\" in API group \"{group}\" at the cluster scope",
                res = t.res.1,
                dot = if group.is_empty() { "" } else { "." },
                verb = match (&method, q.get("watch").map(String::as_str)) {
                    (&Method::GET, Some("true" | "1")) => "watch",
                    (&Method::GET, _) => "list",
                    _ => "access",
                },
            ),
            _ => format!("{} is unavailable (stand-in control)", t.res.1),
        };
        return fail((code, msg));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return fail((StatusCode::BAD_REQUEST, e.to_string())),
    };
    let json_body = || -> std::result::Result<Value, Failure> {
        serde_json::from_slice(&body).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))
    };
    let ns = match &t.namespace {
        Some(ns) => ns.clone(),
        None if cluster_scoped(&t.res.1) => String::new(),
        None => "default".into(),
    };
    let is_watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if let Some(sub) = &t.subresource {
        let name = t.name.as_deref().unwrap_or_default();
        return match (&method, sub.as_str()) {
            (&Method::GET, "status") => {
                let st = shared.state.lock().unwrap();
                match st.get(&t.res, &ns, name) {
                    Some(o) => reply(StatusCode::OK, o),
                    None => fail((
                        StatusCode::NOT_FOUND,
                        format!("{} \"{name}\" not found", t.res.1),
                    )),
                }
            }
            (&Method::PATCH, "status") => {
                let r = json_body().and_then(|patch| {
                    let mut st = shared.state.lock().unwrap();
                    let existing = st.get(&t.res, &ns, name).cloned();
                    st.status_patches.push(StatusPatch {
                        resource: t.res.1.clone(),
                        namespace: ns.clone(),
                        name: name.to_string(),
                        field_manager: q.get("fieldManager").cloned(),
                        user_agent: user_agent.clone(),
                        patch: patch.clone(),
                        applied: existing.is_some(),
                    });
                    let Some(mut obj) = existing else {
                        return Err((
                            StatusCode::NOT_FOUND,
                            format!("{} \"{name}\" not found", t.res.1),
                        ));
                    };
                    // Only the status: a real server ignores the rest on this subresource.
                    if let Some(status) = patch.get("status") {
                        merge_patch(
                            obj.as_object_mut()
                                .expect("stored objects are objects")
                                .entry("status")
                                .or_insert(Value::Null),
                            status,
                        );
                    }
                    st.replace(t.res.clone(), &ns, name, obj)
                });
                match r {
                    Ok(o) => reply(StatusCode::OK, &o),
                    Err(f) => fail(f),
                }
            }
            _ => fail((
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} {path} is not implemented by the stand-in"),
            )),
        };
    }
    match (&method, &t.name) {
        (&Method::GET, None) if is_watch => watch(shared, &t, &q),
        (&Method::GET, None) => list(shared, &t, &q),
        (&Method::GET, Some(name)) => {
            let st = shared.state.lock().unwrap();
            match st.get(&t.res, &ns, name) {
                Some(o) => reply(StatusCode::OK, o),
                None => fail((
                    StatusCode::NOT_FOUND,
                    format!("{} \"{name}\" not found", t.res.1),
                )),
            }
        }
        (&Method::POST, None) => {
            let r = json_body().and_then(|obj| {
                let name = obj["metadata"]["name"].as_str().map(str::to_string);
                shared
                    .state
                    .lock()
                    .unwrap()
                    .create(t.res.clone(), &ns, name, obj)
            });
            match r {
                Ok(o) => reply(StatusCode::CREATED, &o),
                Err(f) => fail(f),
            }
        }
        (&Method::PUT, Some(name)) => {
            let r = json_body().and_then(|obj| {
                shared
                    .state
                    .lock()
                    .unwrap()
                    .replace(t.res.clone(), &ns, name, obj)
            });
            match r {
                Ok(o) => reply(StatusCode::OK, &o),
                Err(f) => fail(f),
            }
        }
        (&Method::PATCH, Some(name)) => {
            let r = json_body().and_then(|patch| {
                let mut st = shared.state.lock().unwrap();
                let Some(mut obj) = st.get(&t.res, &ns, name).cloned() else {
                    return Err((
                        StatusCode::NOT_FOUND,
                        format!("{} \"{name}\" not found", t.res.1),
                    ));
                };
                merge_patch(&mut obj, &patch);
                st.replace(t.res.clone(), &ns, name, obj)
            });
            match r {
                Ok(o) => reply(StatusCode::OK, &o),
                Err(f) => fail(f),
            }
        }
        (&Method::DELETE, Some(name)) => {
            let r = shared.state.lock().unwrap().remove(&t.res, &ns, name);
            match r {
                Ok(o) => reply(StatusCode::OK, &o),
                Err(f) => fail(f),
            }
        }
        _ => fail((
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} {path} is not implemented by the stand-in"),
        )),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn list(shared: &Shared, t: &Target, q: &HashMap<String, String>) -> Response<Body> {
    let selector = match parse_selector(q.get("labelSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(m) => return fail((StatusCode::BAD_REQUEST, m)),
    };
    let fields = match parse_field_selector(q.get("fieldSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(m) => return fail((StatusCode::BAD_REQUEST, m)),
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let mut st = shared.state.lock().unwrap();
    let (id, list_rv, offset_here, items) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let parsed = token
                .strip_prefix("page-")
                .and_then(|r| r.split_once('-'))
                .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse::<usize>().ok()?)));
            let Some((id, offset)) = parsed else {
                return fail((StatusCode::BAD_REQUEST, "invalid continue token".into()));
            };
            let Some((rv, items)) = st.pages.get(&id) else {
                return fail((
                    StatusCode::GONE,
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter."
                        .into(),
                ));
            };
            (id, *rv, offset.min(items.len()), items.clone())
        }
        None => {
            let items: Vec<String> = st
                .objects
                .get(&t.res)
                .map(|m| {
                    m.iter()
                        .filter(|((ns, _), _)| t.namespace.as_ref().is_none_or(|n| n == ns))
                        .map(|(_, v)| v)
                        .filter(|v| selected(v, &selector) && fields_selected(v, &fields))
                        .map(|v| serde_json::to_string(v).expect("JSON value"))
                        .collect()
                })
                .unwrap_or_default();
            st.next_page_id += 1;
            let id = st.next_page_id;
            let rv = st.rv;
            let items = std::sync::Arc::new(items);
            st.pages.insert(id, (rv, items.clone()));
            (id, rv, 0, items)
        }
    };
    let rest = &items[offset_here..];
    let (page, more) = match limit {
        Some(l) if rest.len() > l => (&rest[..l], true),
        _ => (rest, false),
    };
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if more {
        meta["continue"] = json!(format!("page-{id}-{}", offset_here + page.len()));
    } else {
        st.pages.remove(&id);
    }
    let (api_version, kind) = (t.res.0.clone(), format!("{}List", kind_of(&t.res.1)));
    // The list object without its items, then the items' text spliced in.
    let mut body =
        serde_json::to_string(&json!({"apiVersion": api_version, "kind": kind, "metadata": meta}))
            .expect("JSON value");
    body.pop(); // the closing brace
    body.push_str(",\"items\":[");
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

fn watch(shared: &Shared, t: &Target, q: &HashMap<String, String>) -> Response<Body> {
    let selector = match parse_selector(q.get("labelSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(m) => return fail((StatusCode::BAD_REQUEST, m)),
    };
    let fields = match parse_field_selector(q.get("fieldSelector").map_or("", String::as_str)) {
        Ok(s) => s,
        Err(m) => return fail((StatusCode::BAD_REQUEST, m)),
    };
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let from = q
        .get("resourceVersion")
        .filter(|s| !s.is_empty() && *s != "0");
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    {
        let mut st = shared.state.lock().unwrap();
        let matches = |res: &ResKey, ns: &str, obj: &Value| {
            *res == t.res
                && t.namespace.as_deref().is_none_or(|n| n == ns)
                && selected(obj, &selector)
                && fields_selected(obj, &fields)
        };
        match from {
            Some(rv) => {
                let Ok(rv) = rv.parse::<u64>() else {
                    return fail((
                        StatusCode::BAD_REQUEST,
                        format!("invalid resourceVersion {rv:?}"),
                    ));
                };
                if rv < st.compacted {
                    // What a real server does: 200, one ERROR event with 410, end of stream.
                    let msg = format!("too old resource version: {rv} ({})", st.compacted);
                    let _ = tx.send(event_line("ERROR", &status(StatusCode::GONE, &msg)));
                    drop(tx);
                    return stream_reply(rx, None);
                }
                for c in st.history.iter().filter(|c| c.rv > rv) {
                    if matches(&c.res, &c.namespace, &c.object) {
                        let _ = tx.send(event_line(c.kind, &c.object));
                    }
                }
            }
            None => {
                for ((ns, _), obj) in st.objects.get(&t.res).into_iter().flatten() {
                    if matches(&t.res, ns, obj) {
                        let _ = tx.send(event_line("ADDED", obj));
                    }
                }
            }
        }
        st.watches.push(Watch {
            res: t.res.clone(),
            namespace: t.namespace.clone(),
            selector,
            fields,
            bookmarks,
            tx,
        });
    }
    stream_reply(rx, timeout)
}

fn stream_reply(rx: mpsc::UnboundedReceiver<Bytes>, timeout: Option<Duration>) -> Response<Body> {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let stream = futures_util::stream::unfold(rx, move |mut rx| async move {
        let next = match deadline {
            Some(d) => tokio::time::timeout_at(d, rx.recv()).await.ok().flatten(),
            None => rx.recv().await,
        };
        next.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{StreamExt as _, TryStreamExt as _};
    use k8s_openapi::api::core::v1::Service;
    use kube::{
        Api, Client,
        api::{ListParams, WatchEvent, WatchParams},
        runtime::{WatchStreamExt as _, reflector, watcher},
    };

    fn svc(name: &str, port: i32) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "dev", "labels": {"app": name}},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": port}]},
        }))
        .unwrap()
    }

    fn client(srv: &ApiServer, rt: &tokio::runtime::Runtime) -> Client {
        let cfg = kube::Config::new(srv.url().parse().unwrap());
        rt.block_on(async { Client::try_from(cfg).unwrap() })
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn paths_and_selectors() {
        let t = parse_path("/api/v1/namespaces/dev/services/web").unwrap();
        assert_eq!(t.res, ("v1".into(), "services".into()));
        assert_eq!(t.namespace.as_deref(), Some("dev"));
        assert_eq!(t.name.as_deref(), Some("web"));
        let t = parse_path("/apis/discovery.k8s.io/v1/endpointslices").unwrap();
        assert_eq!(
            t.res,
            ("discovery.k8s.io/v1".into(), "endpointslices".into())
        );
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = parse_path("/api/v1/namespaces").unwrap();
        assert_eq!(t.res.1, "namespaces");
        let sel = parse_selector("a=b,c!=d,e").unwrap();
        let obj = json!({"metadata": {"labels": {"a": "b", "e": "x"}}});
        assert!(selected(&obj, &sel));
        assert!(!selected(
            &json!({"metadata": {"labels": {"a": "b"}}}),
            &sel
        ));
        assert!(parse_selector("a in (b)").is_err());
        assert_eq!(decode("a%3Db+c").as_deref(), Some("a=b c"));
    }

    #[test]
    fn list_paginates_through_the_real_client() {
        let srv = ApiServer::start_local().unwrap();
        for i in 0..7 {
            srv.create(&svc(&format!("s{i}"), 80)).unwrap();
        }
        let rt = rt();
        let api: Api<Service> = Api::all(client(&srv, &rt));
        let first = rt
            .block_on(api.list(&ListParams::default().limit(3)))
            .unwrap();
        assert_eq!(first.items.len(), 3);
        let tok = first.metadata.continue_.clone().expect("continue token");
        // A change between pages does not show in the rest of this list.
        srv.create(&svc("s9", 80)).unwrap();
        let second = rt
            .block_on(api.list(&ListParams::default().limit(3).continue_token(&tok)))
            .unwrap();
        let third = rt
            .block_on(
                api.list(
                    &ListParams::default()
                        .limit(3)
                        .continue_token(second.metadata.continue_.as_deref().unwrap()),
                ),
            )
            .unwrap();
        assert_eq!(second.items.len() + third.items.len(), 4);
        assert!(third.metadata.continue_.is_none());
        assert_eq!(
            first.metadata.resource_version,
            third.metadata.resource_version
        );
        // Expired tokens: 410.
        let again = rt
            .block_on(api.list(&ListParams::default().limit(2)))
            .unwrap();
        srv.compact();
        let err = rt
            .block_on(api.list(
                &ListParams::default().continue_token(again.metadata.continue_.as_deref().unwrap()),
            ))
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 410),
            "{err:?}"
        );
        // Namespaced path and label selector.
        let dev: Api<Service> = Api::namespaced(client(&srv, &rt), "dev");
        let one = rt
            .block_on(dev.list(&ListParams::default().labels("app=s3")))
            .unwrap();
        assert_eq!(one.items.len(), 1);
        let other: Api<Service> = Api::namespaced(client(&srv, &rt), "other");
        assert!(
            rt.block_on(other.list(&ListParams::default()))
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn watch_streams_changes_and_bookmarks() {
        let srv = ApiServer::start_local().unwrap();
        srv.set_bookmark_interval(Duration::from_millis(200));
        srv.create(&svc("a", 80)).unwrap();
        let rt = rt();
        let api: Api<Service> = Api::all(client(&srv, &rt));
        let rv = rt
            .block_on(api.list(&ListParams::default()))
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        let mut stream = rt
            .block_on(api.watch(&WatchParams::default(), &rv))
            .unwrap()
            .boxed();
        srv.update(&svc("a", 81)).unwrap();
        srv.delete(&svc("a", 0)).unwrap();
        srv.create(&svc("b", 80)).unwrap();
        let mut seen = vec![];
        let mut bookmark = None;
        rt.block_on(async {
            tokio::time::timeout(T, async {
                while let Some(ev) = stream.try_next().await.unwrap() {
                    match ev {
                        WatchEvent::Modified(s) => {
                            seen.push(format!("M {}", s.metadata.name.unwrap()))
                        }
                        WatchEvent::Deleted(s) => {
                            seen.push(format!("D {}", s.metadata.name.unwrap()))
                        }
                        WatchEvent::Added(s) => {
                            seen.push(format!("A {}", s.metadata.name.unwrap()))
                        }
                        WatchEvent::Bookmark(b) => {
                            bookmark = Some(b.metadata.resource_version);
                            break;
                        }
                        WatchEvent::Error(e) => panic!("{e:?}"),
                    }
                }
            })
            .await
            .unwrap()
        });
        assert_eq!(seen, ["M a", "D a", "A b"]);
        assert_eq!(bookmark.unwrap(), srv.resource_version().to_string());
        // A watch resumed from an older version replays what came after it.
        let mut replay = rt
            .block_on(api.watch(&WatchParams::default(), &rv))
            .unwrap()
            .boxed();
        let first = rt.block_on(replay.try_next()).unwrap().unwrap();
        assert!(matches!(first, WatchEvent::Modified(_)), "{first:?}");
    }

    #[test]
    fn too_old_watch_gets_410_and_the_watcher_relists() {
        let srv = ApiServer::start_local().unwrap();
        srv.create(&svc("a", 80)).unwrap();
        let rt = rt();
        let api: Api<Service> = Api::all(client(&srv, &rt));
        let rv = rt
            .block_on(api.list(&ListParams::default()))
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        srv.compact();
        let mut stream = rt
            .block_on(api.watch(&WatchParams::default(), &rv))
            .unwrap()
            .boxed();
        match rt.block_on(stream.try_next()).unwrap() {
            Some(WatchEvent::Error(s)) => assert_eq!(s.code, 410),
            other => panic!("expected a 410 ERROR event, got {other:?}"),
        }
        assert!(rt.block_on(stream.try_next()).unwrap().is_none());

        // kube's watcher: list, watch; after compact + drop it relists (Init..InitDone), and
        // a store fed by it forgets what was deleted meanwhile.
        let (reader, writer) = reflector::store::<Service>();
        let w = watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        let (etx, mut erx) = tokio::sync::mpsc::unbounded_channel();
        let task = rt.spawn(async move {
            let mut w = std::pin::pin!(w);
            while let Some(ev) = w.next().await {
                let tag = match ev {
                    Ok(watcher::Event::Init) => "Init".to_string(),
                    Ok(watcher::Event::InitDone) => "InitDone".into(),
                    Ok(watcher::Event::Apply(s)) => format!("Apply {}", s.metadata.name.unwrap()),
                    Ok(watcher::Event::Delete(s)) => format!("Delete {}", s.metadata.name.unwrap()),
                    Ok(watcher::Event::InitApply(_)) => continue,
                    Err(e) => format!("Err {e}"),
                };
                if etx.send(tag).is_err() {
                    return;
                }
            }
        });
        let next = |erx: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
            rt.block_on(async { tokio::time::timeout(T, erx.recv()).await.unwrap().unwrap() })
        };
        assert_eq!(next(&mut erx), "Init");
        assert_eq!(next(&mut erx), "InitDone");
        srv.create(&svc("b", 80)).unwrap();
        assert_eq!(next(&mut erx), "Apply b");
        // Stop, change while away, compact, start: the resumed watch gets 410 -> relist.
        let mut srv = srv;
        srv.stop();
        srv.delete(&svc("a", 0)).unwrap();
        srv.create(&svc("c", 80)).unwrap();
        srv.compact();
        srv.start().unwrap();
        let mut tags = vec![];
        loop {
            let t = next(&mut erx);
            let done = t == "InitDone";
            tags.push(t);
            if done {
                break;
            }
        }
        assert!(
            tags.iter().any(|t| t.contains("too old resource version")),
            "expected a 410 before the relist: {tags:?}"
        );
        let mut names: Vec<String> = reader
            .state()
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
        task.abort();
    }

    #[test]
    fn watches_resume_after_drop_and_restart() {
        let mut srv = ApiServer::start_local().unwrap();
        let addr = srv.addr();
        let rt = rt();
        let api: Api<Service> = Api::all(client(&srv, &rt));
        let (reader, writer) = reflector::store::<Service>();
        let w = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        let task = rt.spawn(async move {
            let mut w = std::pin::pin!(w);
            while w.next().await.is_some() {}
        });
        let wait = |what: &str, f: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !f() {
                assert!(std::time::Instant::now() < deadline, "timed out: {what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        wait("watch open", &|| srv.watch_count() == 1);
        srv.create(&svc("a", 80)).unwrap();
        wait("a seen", &|| reader.len() == 1);
        srv.drop_watches();
        srv.create(&svc("b", 80)).unwrap();
        wait("b seen after the drop", &|| reader.len() == 2);
        wait("watch reopened", &|| srv.watch_count() == 1);
        srv.stop();
        srv.create(&svc("c", 80)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(reader.len(), 2, "nothing can arrive while stopped");
        srv.start().unwrap();
        assert_eq!(srv.addr(), addr, "restarted on the same address");
        wait("c seen after the restart", &|| reader.len() == 3);
        // The client resumed from its resourceVersion: no relist after the first one.
        let lists = srv
            .requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/services") && !r.contains("watch="))
            .count();
        assert_eq!(lists, 1, "{:?}", srv.requests());
        task.abort();
    }

    #[test]
    fn cluster_scoped_objects_field_selectors_and_refusals() {
        use k8s_openapi::api::{core::v1::Node, networking::v1::ServiceCIDR};
        let node = |name: &str, zone: &str| -> Node {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            }))
            .unwrap()
        };
        let srv = ApiServer::start_local().unwrap();
        srv.create(&node("n1", "a")).unwrap();
        srv.create(&node("n2", "b")).unwrap();
        let stored = srv.list("v1", "nodes");
        assert_eq!(stored.len(), 2);
        assert!(
            stored[0]["metadata"].get("namespace").is_none(),
            "{stored:?}"
        );
        let rt = rt();
        let nodes: Api<Node> = Api::all(client(&srv, &rt));
        let lp = ListParams::default().fields("metadata.name=n2");
        let got = rt.block_on(nodes.list(&lp)).unwrap();
        assert_eq!(got.items.len(), 1);
        assert_eq!(got.items[0].metadata.name.as_deref(), Some("n2"));
        assert_eq!(got.items[0].metadata.namespace, None);
        assert_eq!(
            rt.block_on(nodes.get("n1")).unwrap().metadata.name.unwrap(),
            "n1"
        );
        let bad = rt
            .block_on(nodes.list(&ListParams::default().fields("spec.unschedulable=true")))
            .unwrap_err();
        assert!(
            matches!(&bad, kube::Error::Api(s) if s.code == 400),
            "{bad:?}"
        );
        // A watch with the selector sees only its node.
        let rv = got.metadata.resource_version.unwrap();
        let wp = WatchParams::default().fields("metadata.name=n2");
        let mut stream = rt.block_on(nodes.watch(&wp, &rv)).unwrap().boxed();
        srv.update(&node("n1", "c")).unwrap();
        srv.update(&node("n2", "c")).unwrap();
        match rt.block_on(stream.try_next()).unwrap() {
            Some(WatchEvent::Modified(n)) => assert_eq!(n.metadata.name.unwrap(), "n2"),
            other => panic!("{other:?}"),
        }
        // ServiceCIDRs: the kind is served under its real name; 404 and 403 on request.
        let cidr: ServiceCIDR = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": "kubernetes"}, "spec": {"cidrs": ["10.96.0.0/12"]},
        }))
        .unwrap();
        srv.create(&cidr).unwrap();
        let cidrs: Api<ServiceCIDR> = Api::all(client(&srv, &rt));
        let list = rt.block_on(cidrs.list(&ListParams::default())).unwrap();
        assert_eq!(list.items.len(), 1);
        for code in [404, 403] {
            srv.set_refused("networking.k8s.io/v1", "servicecidrs", Some(code));
            let e = rt.block_on(cidrs.list(&ListParams::default())).unwrap_err();
            assert!(matches!(&e, kube::Error::Api(s) if s.code == code), "{e:?}");
        }
        srv.set_refused("networking.k8s.io/v1", "servicecidrs", None);
        rt.block_on(cidrs.list(&ListParams::default())).unwrap();
    }

    #[test]
    fn status_patches_change_only_the_status_and_are_recorded() {
        use kube::api::{Patch, PatchParams};
        let srv = ApiServer::start_local().unwrap();
        let created = srv.create(&svc("web", 80)).unwrap();
        let rt = rt();
        let api: Api<Service> = Api::namespaced(client(&srv, &rt), "dev");
        let rv = created["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_string();
        let mut stream = rt
            .block_on(api.watch(&WatchParams::default(), &rv))
            .unwrap()
            .boxed();
        let pp = PatchParams {
            field_manager: Some("lb-agent-n1".into()),
            ..Default::default()
        };
        let patch = json!({
            "spec": {"clusterIP": "10.96.9.9"},
            "status": {"loadBalancer": {"ingress": [{"ip": "172.18.255.200", "ipMode": "VIP"}]}},
        });
        let got = rt
            .block_on(api.patch_status("web", &pp, &Patch::Merge(&patch)))
            .unwrap();
        let ingress = got.status.unwrap().load_balancer.unwrap().ingress.unwrap();
        assert_eq!(ingress[0].ip.as_deref(), Some("172.18.255.200"));
        assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"));
        assert_eq!(
            got.spec.unwrap().cluster_ip.as_deref(),
            Some("10.96.0.10"),
            "the spec is not changed through /status"
        );
        assert_ne!(got.metadata.resource_version.as_deref(), Some(rv.as_str()));
        match rt.block_on(stream.try_next()).unwrap() {
            Some(WatchEvent::Modified(s)) => assert!(s.status.is_some()),
            other => panic!("{other:?}"),
        }
        let fetched = rt.block_on(api.get_status("web")).unwrap();
        assert!(fetched.status.unwrap().load_balancer.is_some());
        let e = rt
            .block_on(api.patch_status("nope", &pp, &Patch::Merge(&patch)))
            .unwrap_err();
        assert!(matches!(&e, kube::Error::Api(s) if s.code == 404), "{e:?}");
        let patches = srv.status_patches();
        assert_eq!(patches.len(), 2, "{patches:?}");
        assert_eq!(
            (
                patches[0].resource.as_str(),
                patches[0].namespace.as_str(),
                patches[0].name.as_str(),
                patches[0].field_manager.as_deref(),
                patches[0].applied
            ),
            ("services", "dev", "web", Some("lb-agent-n1"), true)
        );
        assert!(!patches[1].applied);
    }

    #[test]
    fn metallb_kinds_are_served_namespaced() {
        use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
        let srv = ApiServer::start_local().unwrap();
        for (kind, name, spec) in [
            (
                "IPAddressPool",
                "example",
                json!({"addresses": ["172.18.255.200-172.18.255.250"]}),
            ),
            ("L2Advertisement", "empty", json!({})),
        ] {
            srv.create(&json!({
                "apiVersion": "metallb.io/v1beta1", "kind": kind,
                "metadata": {"name": name, "namespace": "metallb-system"},
                "spec": spec,
            }))
            .unwrap();
        }
        assert_eq!(srv.list("metallb.io/v1beta1", "ipaddresspools").len(), 1);
        let rt = rt();
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("metallb.io", "v1beta1", "IPAddressPool"),
            "ipaddresspools",
        );
        let all: Api<DynamicObject> = Api::all_with(client(&srv, &rt), &ar);
        let list = rt.block_on(all.list(&ListParams::default())).unwrap();
        assert_eq!(list.items.len(), 1);
        let pool = &list.items[0];
        assert_eq!(pool.types.as_ref().unwrap().kind, "IPAddressPool");
        assert_eq!(pool.metadata.namespace.as_deref(), Some("metallb-system"));
        assert_eq!(
            pool.data["spec"]["addresses"][0],
            "172.18.255.200-172.18.255.250"
        );
        let other: Api<DynamicObject> = Api::namespaced_with(client(&srv, &rt), "dev", &ar);
        assert!(
            rt.block_on(other.list(&ListParams::default()))
                .unwrap()
                .items
                .is_empty()
        );
        let l2 = srv.list("metallb.io/v1beta1", "l2advertisements");
        assert_eq!(l2[0]["kind"], "L2Advertisement");
    }

    #[test]
    fn events_can_be_posted_and_patched() {
        let srv = ApiServer::start_local().unwrap();
        let s = srv.create(&svc("web", 80)).unwrap();
        let rt = rt();
        let client = client(&srv, &rt);
        let svc: Service = serde_json::from_value(s).unwrap();
        use kube::Resource as _;
        let recorder = kube::runtime::events::Recorder::new(client, "test".into());
        let ev = kube::runtime::events::Event {
            type_: kube::runtime::events::EventType::Warning,
            reason: "Unsupported".into(),
            note: Some("SCTP".into()),
            action: "Program".into(),
            secondary: None,
        };
        rt.block_on(recorder.publish(&ev, &svc.object_ref(&())))
            .unwrap();
        rt.block_on(recorder.publish(&ev, &svc.object_ref(&())))
            .unwrap();
        let evs = srv.events();
        assert_eq!(evs.len(), 1, "{evs:?}");
        assert_eq!(evs[0]["regarding"]["name"], "web");
        assert_eq!(evs[0]["type"], "Warning");
        assert_eq!(evs[0]["series"]["count"], 2, "{evs:?}");
    }
}
