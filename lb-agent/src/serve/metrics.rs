//! Observability of a running agent, served over HTTP on `--metrics-addr` (default
//! [`DEFAULT_METRICS_ADDR`]) by tasks on the agent's tokio runtime:
//!
//! - `/metrics`: Prometheus text format (0.0.4), encoded by `prometheus-client`:
//!   - per service port (labels `namespace`, `name`, `port` — the port's name, empty for the
//!     unnamed port of a single-port service —, `protocol`, `scope` `cluster|local`):
//!     `xlb_service_{packets,bytes,new_flows,rejects}_total`, read at scrape time from the
//!     per-CPU `XLB_SVC_STATS` map (summed over CPUs) for every id in `XLB_SERVICES`,
//!     named from `XLB_SVC_META`. A service port that is removed and re-created starts
//!     again from zero (a counter reset, as Prometheus expects after a restart);
//!   - `xlb_datapath_events_total{reason}`: the global `XLB_COUNTERS`, one series per name
//!     of `lb_common::COUNTER_NAMES` (the names `lb-agent status` shows);
//!   - connection tracking, from the GC's sweeps ([`crate::dataplane::conntrack`]; label
//!     `map` is `ct` (`XLB_CT`, confirmed flows), `ct_new` (`XLB_CT_NEW`, unconfirmed) or
//!     `revnat`): `xlb_conntrack_entries{map}` (left by the last sweep; absent before the
//!     first),
//!     `xlb_conntrack_capacity{map}`, `xlb_conntrack_gc_deleted_total{map}`,
//!     `xlb_conntrack_gc_runs_total`, `xlb_conntrack_gc_duration_seconds` (histogram),
//!     `xlb_conntrack_gc_interval_seconds` (until the next sweep) and
//!     `xlb_snat_ports_in_use{backend="10.244.2.5:80",proto="tcp"}` (live reverse entries
//!     holding a SNAT port towards that backend; a backend without any has no series).
//!     LRU evictions are NOT exported: the kernel keeps no per-map count of them; a map
//!     near its capacity is the sign that it evicts;
//!   - `xlb_sync_duration_seconds{source}`: from a source event (the file's modification
//!     time, the first watch event of a kube snapshot's changes) to the map update being
//!     complete, incremental or full;
//!   - `xlb_apply_errors_total{kind}`: failed attempts by [`ErrorKind`] (of a typed
//!     [`crate::error::Error`], [`crate::error::Error::kind`]); `capacity` stays 0 (what
//!     does not fit is refused per service port, not an error; it is logged and posted as
//!     an Event) and is kept for dashboards;
//!   - `xlb_programmed_{services,service_ports,frontends,backends}`: what the last
//!     successful apply programmed; `xlb_ready` (0/1).
//! - `/healthz`: 200 while the agent loop is alive (an iteration within [`LOOP_STALE_AFTER`]),
//!   500 otherwise.
//! - `/readyz`: 200 once the first full sync has been programmed, 503 before.
//! - `/datapath-debug`: GET shows whether the datapath logs debug events; PUT or POST with
//!   `on` or `off` switches them (see [`crate::serve::debug`]).
//! - `/loglevel`: GET shows the level; PUT or POST with a body of
//!   `error|warn|info|debug|trace|off` sets it (`log::set_max_level`).
//! - PUT and POST are accepted only from the node itself and never from a browser
//!   ([`http::refuse_unless_from_node`]): 403 otherwise.
//!
//! Map reads use their own handles on the pins (opened once, at start), never the agent's,
//! so no lock is shared with the agent loop; scrapes and GC sweeps run on blocking threads.
use std::{
    collections::BTreeSet,
    path::Path,
    str::FromStr as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::dataplane::conntrack::SweepReport;
use crate::serve::http::{self, HttpResponse, reply, text};
use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use http_body_util::{BodyExt as _, Limited};
use hyper::{Method, Request, StatusCode, body::Incoming};
use lb_common::*;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::task::JoinHandle;

/// `--metrics-addr` default (`none` disables the server).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9464";
/// `/healthz` fails when the agent loop has not completed an iteration for this long (the
/// loop wakes at least every 300 ms).
pub const LOOP_STALE_AFTER: Duration = Duration::from_secs(10);

const MAX_CONNECTIONS: usize = 16;
/// Largest `/loglevel` request body.
const MAX_BODY: usize = 64;

/// Why an attempt to program the datapath failed: the values of the `kind` label of
/// `xlb_apply_errors_total` (each present from the start, at 0). An error's kind is its
/// type's ([`crate::error::Error::kind`]), never its message's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The source could not be read (file missing or unreadable).
    Source,
    /// The source's content is not valid (YAML, objects, fields).
    Parse,
    /// A BPF map operation failed.
    MapWrite,
    /// Something around a map operation failed.
    Other,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Source,
        ErrorKind::Parse,
        ErrorKind::MapWrite,
        ErrorKind::Other,
    ];

    pub fn metric_label(self) -> &'static str {
        match self {
            ErrorKind::Source => "source",
            ErrorKind::Parse => "parse",
            ErrorKind::MapWrite => "map_write",
            ErrorKind::Other => "other",
        }
    }
}

/// `kind` values no error has any more, still exported at 0 so that dashboards and alerts
/// keep their series: `capacity` (capacity became per-port refusals,
/// [`crate::dataplane::programmer::Refusal`]).
const RETIRED_ERROR_LABELS: [&str; 1] = ["capacity"];

/// Where a sync came from (`xlb_sync_duration_seconds{source}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncSource {
    File,
    Kube,
}

impl SyncSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncSource::File => "file",
            SyncSource::Kube => "kube",
        }
    }
}

/// What the last successful apply programmed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub services: usize,
    pub service_ports: usize,
    pub frontends: usize,
    pub backends: usize,
}

type Label = [(&'static str, &'static str); 1];

/// Registers each `name, metric, help;` in `registry` (a clone of the metric: the same
/// series), in order.
macro_rules! register {
    ($registry:expr; $($name:literal, $metric:expr, $help:literal;)+) => {
        $($registry.register($name, $help, $metric.clone());)+
    };
}

fn sync_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The agent's metrics and probe state, shared between the agent loop (writer) and the
/// HTTP server (reader). All fields are atomics or `prometheus-client` metrics: no locks.
pub struct Metrics {
    registry: Registry,
    start: Instant,
    /// Milliseconds since `start` at the agent loop's last iteration.
    last_iteration_ms: AtomicU64,
    ready: AtomicBool,
    ready_gauge: Gauge,
    sync_seconds: Family<Label, Histogram, fn() -> Histogram>,
    apply_errors: Family<Label, Counter>,
    programmed: [Gauge; 4],
    conntrack: ConntrackMetrics,
    announce: AnnounceMetrics,
    /// The agent's pin directory (None: no maps), for `/datapath-debug`.
    pin_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Metrics of the agent whose maps are pinned in `pin_dir` (opened here, once).
    pub fn new(pin_dir: &Path) -> Result<Self> {
        let mut m = Self::build(Some(MapCollector::open(pin_dir)?));
        m.pin_dir = Some(pin_dir.to_path_buf());
        Ok(m)
    }

    /// Metrics without map-derived series (unit tests, or no pins).
    pub fn without_maps() -> Self {
        Self::build(None)
    }

    fn build(maps: Option<MapCollector>) -> Self {
        let mut registry = Registry::default();
        let ready_gauge = Gauge::default();
        let sync_seconds: Family<Label, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(sync_histogram);
        let apply_errors: Family<Label, Counter> = Family::default();
        let labels = ErrorKind::ALL.map(ErrorKind::metric_label);
        for label in labels.iter().chain(&RETIRED_ERROR_LABELS) {
            // Every kind is present from the start, at 0.
            let _ = apply_errors.get_or_create(&[("kind", *label)]);
        }
        let programmed: [Gauge; 4] = Default::default();
        register!(registry;
            "xlb_ready", ready_gauge,
                "1 once the first full sync has been programmed";
            "xlb_sync_duration_seconds", sync_seconds,
                "Time from a source event (the file written, as its mtime says; the first watch \
                 event of a kube batch) to the map update being complete, incremental or full";
            "xlb_apply_errors", apply_errors,
                "Failed attempts to program the datapath, by kind (source, parse, map_write, \
                 other; capacity is always 0: what does not fit is refused per service port); \
                 the datapath keeps its last good state";
            "xlb_programmed_services", programmed[0],
                "Services with at least one programmed port";
            "xlb_programmed_service_ports", programmed[1],
                "Programmed service ports (each scope of a port counts once)";
            "xlb_programmed_frontends", programmed[2],
                "Programmed frontends";
            "xlb_programmed_backends", programmed[3],
                "Programmed backends (serving or draining), by address and port";
        );
        let conntrack = ConntrackMetrics::register(&mut registry);
        let announce = AnnounceMetrics::register(&mut registry);
        if let Some(maps) = maps {
            registry.register_collector(Box::new(maps));
        }
        Self {
            registry,
            start: Instant::now(),
            last_iteration_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            ready_gauge,
            sync_seconds,
            apply_errors,
            programmed,
            conntrack,
            announce,
            pin_dir: None,
        }
    }

    /// The agent loop completed an iteration.
    pub fn loop_alive(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_iteration_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the agent loop's last iteration.
    pub fn loop_idle(&self) -> Duration {
        let last = Duration::from_millis(self.last_iteration_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// An apply completed successfully and programmed `programmed`; `event` is the source
    /// event it handled and when that was seen (None: not a source event).
    pub fn synced(&self, event: Option<(SyncSource, Instant)>, programmed: Programmed) {
        if let Some((source, since)) = event {
            self.sync_seconds
                .get_or_create(&[("source", source.as_str())])
                .observe(since.elapsed().as_secs_f64());
        }
        for (g, v) in self.programmed.iter().zip([
            programmed.services,
            programmed.service_ports,
            programmed.frontends,
            programmed.backends,
        ]) {
            g.set(v as i64);
        }
        self.ready.store(true, Ordering::Relaxed);
        self.ready_gauge.set(1);
    }

    /// Counts a failed attempt (`error.kind()` for a typed [`crate::error::Error`]).
    pub fn apply_error(&self, kind: ErrorKind) {
        self.apply_errors
            .get_or_create(&[("kind", kind.metric_label())])
            .inc();
    }

    /// The exposition (Prometheus text format 0.0.4). Reads maps: call it off the runtime's
    /// worker threads.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            log::warn!("encoding metrics: {e}");
        }
        out
    }

    /// The connection-tracking GC's metrics (written by [`crate::dataplane::conntrack`]).
    pub fn conntrack(&self) -> &ConntrackMetrics {
        &self.conntrack
    }

    /// The announcer's metrics (written by [`crate::announce`]).
    pub fn announce(&self) -> &AnnounceMetrics {
        &self.announce
    }
}

/// LoadBalancer address announcement (ARP) and the heartbeats behind it.
#[derive(Debug, Default)]
pub struct AnnounceMetrics {
    pub owned: Gauge,
    pub takeovers: Counter,
    pub peers: Gauge,
    pub peers_lost: Counter,
}

impl AnnounceMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        register!(registry;
            "xlb_announce_owned_addresses", m.owned,
                "LoadBalancer addresses this node answers ARP for";
            "xlb_announce_takeovers", m.takeovers,
                "Addresses this node took over (each announced with a gratuitous ARP)";
            "xlb_announce_peers", m.peers,
                "Other agents heard on the node network within the heartbeat timeout";
            "xlb_announce_peers_lost", m.peers_lost,
                "Peers declared gone after their heartbeats stopped (missed heartbeats)";
        );
        m
    }
}

type MapLabel = [(&'static str, &'static str); 1];
type SnatLabel = [(&'static str, String); 2];

fn gc_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The connection-tracking GC's series (see the module's documentation).
pub struct ConntrackMetrics {
    entries: Family<MapLabel, Gauge>,
    capacity: Family<MapLabel, Gauge>,
    deleted: Family<MapLabel, Counter>,
    runs: Counter,
    duration: Histogram,
    interval: Gauge,
    snat_ports: Family<SnatLabel, Gauge>,
    /// The `snat_ports` series of the last sweep, to remove those that dropped to 0.
    snat_series: Mutex<BTreeSet<SnatLabel>>,
}

impl std::fmt::Debug for ConntrackMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConntrackMetrics").finish_non_exhaustive()
    }
}

impl ConntrackMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            entries: Family::default(),
            capacity: Family::default(),
            deleted: Family::default(),
            runs: Counter::default(),
            duration: gc_histogram(),
            interval: Gauge::default(),
            snat_ports: Family::default(),
            snat_series: Mutex::new(BTreeSet::new()),
        };
        register!(registry;
            "xlb_conntrack_entries", m.entries,
                "Entries of the connection-tracking maps (ct: XLB_CT, confirmed flows; ct_new: \
                 XLB_CT_NEW, unconfirmed flows; revnat: XLB_REVNAT) left by the last GC sweep";
            "xlb_conntrack_capacity", m.capacity,
                "Capacity (max_entries) of the LRU connection-tracking maps; a map near it evicts";
            "xlb_conntrack_gc_deleted", m.deleted,
                "Entries deleted by the conntrack GC: expired flows, and reverse-NAT entries whose \
                 flow is gone, expired or uses another port";
            "xlb_conntrack_gc_runs", m.runs,
                "Conntrack GC sweeps";
            "xlb_conntrack_gc_duration_seconds", m.duration,
                "Time a conntrack GC sweep took (walks, deletions; the 100 ms grace excluded)";
            "xlb_conntrack_gc_interval_seconds", m.interval,
                "Time from the last conntrack GC sweep to the next (adaptive, 10 s to 10 min)";
            "xlb_snat_ports_in_use", m.snat_ports,
                "SNAT ports held by live flows towards a backend (reverse-NAT entries to the \
                 node's SNAT address whose flow is live), counted by the last GC sweep";
        );
        m
    }

    pub fn set_capacity(&self, map: &'static str, capacity: u32) {
        self.capacity
            .get_or_create(&[("map", map)])
            .set(capacity as i64);
    }

    pub fn set_interval(&self, interval: Duration) {
        self.interval.set(interval.as_secs() as i64);
    }

    /// Records a sweep; `next` is the time until the next one.
    pub fn sweep_done(&self, r: &SweepReport, next: Duration) {
        for (map, m) in r.maps() {
            let label = [("map", map)];
            self.entries.get_or_create(&label).set(m.entries() as i64);
            self.capacity.get_or_create(&label).set(m.capacity as i64);
            self.deleted.get_or_create(&label).inc_by(m.deleted);
        }
        self.runs.inc();
        self.duration.observe(r.duration.as_secs_f64());
        self.set_interval(next);
        let mut series = self
            .snat_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now: BTreeSet<SnatLabel> = r
            .snat_ports
            .iter()
            .map(|(b, n)| {
                let (backend, proto) = b.labels();
                let labels = [("backend", backend), ("proto", proto)];
                self.snat_ports.get_or_create(&labels).set(*n as i64);
                labels
            })
            .collect();
        for old in series.iter() {
            if !now.contains(old) {
                self.snat_ports.remove(old);
            }
        }
        *series = now;
    }
}

fn open(pin_dir: &Path, name: &str) -> Result<MapData> {
    let p = pin_dir.join(name);
    MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))
}

/// Per-service and global counters, read from the pins at scrape time.
struct MapCollector {
    services: HashMap<MapData, u32, Service>,
    meta: Array<MapData, SvcMeta>,
    stats: PerCpuArray<MapData, SvcStats>,
    counters: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for MapCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapCollector").finish_non_exhaustive()
    }
}

impl MapCollector {
    fn open(pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open(pin_dir, MAP_SERVICES)?))?,
            meta: Array::try_from(Map::Array(open(pin_dir, MAP_SVC_META)?))?,
            stats: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, MAP_SVC_STATS)?))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, MAP_COUNTERS)?))?,
        })
    }

    /// (labels, summed stats) of every programmed service port.
    fn service_stats(&self) -> Vec<(PortLabels, SvcStats)> {
        let mut out = vec![];
        for key in self.services.keys() {
            let Ok(svc_id) = key else { break };
            let Ok(meta) = self.meta.get(&svc_id, 0) else {
                continue;
            };
            let Some(labels) = PortLabels::from_meta(&meta) else {
                continue;
            };
            let mut sum = SvcStats::default();
            if let Ok(per_cpu) = self.stats.get(&svc_id, 0) {
                for s in per_cpu.iter() {
                    sum.packets += s.packets;
                    sum.bytes += s.bytes;
                    sum.new_flows += s.new_flows;
                    sum.rejects += s.rejects;
                }
            }
            out.push((labels, sum));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        // An id reused between the key walk and the reads could name a port twice; a
        // series must appear once.
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

/// Labels of one service port, from the fields of its `XLB_SVC_META` entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortLabels {
    pub namespace: String,
    pub name: String,
    /// The port's name; empty for an unnamed port.
    pub port: String,
    /// `TCP` or `UDP`.
    pub protocol: &'static str,
    /// `cluster` or `local`.
    pub scope: &'static str,
}

impl PortLabels {
    /// `None` for an entry that names no port this agent wrote (never initialised, another
    /// layout version, unknown codes, empty names).
    pub fn from_meta(m: &SvcMeta) -> Option<Self> {
        if !m.is_current() || m.namespace().is_empty() || m.name().is_empty() {
            return None;
        }
        let protocol = match m.proto {
            PROTO_TCP => "TCP",
            PROTO_UDP => "UDP",
            _ => return None,
        };
        let scope = match m.scope {
            SVC_SCOPE_CLUSTER => "cluster",
            SVC_SCOPE_LOCAL => "local",
            _ => return None,
        };
        Some(Self {
            namespace: m.namespace().into(),
            name: m.name().into(),
            port: m.port_name().into(),
            protocol,
            scope,
        })
    }

    fn set(&self) -> [(&'static str, &str); 5] {
        [
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("port", &self.port),
            ("protocol", self.protocol),
            ("scope", self.scope),
        ]
    }
}

impl Collector for MapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let stats = self.service_stats();
        type Field = fn(&SvcStats) -> u64;
        let fields: [(&str, &str, Field); 4] = [
            (
                "xlb_service_packets",
                "Packets of the service port's flows seen by the datapath.",
                |s| s.packets,
            ),
            (
                "xlb_service_bytes",
                "Bytes of the service port's flows seen by the datapath.",
                |s| s.bytes,
            ),
            (
                "xlb_service_new_flows",
                "New flows (connections) balanced to a backend.",
                |s| s.new_flows,
            ),
            (
                "xlb_service_rejects",
                "New flows rejected or dropped because the service port had no backend.",
                |s| s.rejects,
            ),
        ];
        for (name, help, field) in fields {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, s) in &stats {
                let set = labels.set();
                ConstCounter::new(field(s)).encode(m.encode_family(&set)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "xlb_datapath_events",
            "Global datapath counters (XLB_COUNTERS, summed over CPUs), by reason.",
            None,
            MetricType::Counter,
        )?;
        for (i, reason) in COUNTER_NAMES.iter().enumerate() {
            let v: u64 = self
                .counters
                .get(&(i as u32), 0)
                .map(|p| p.iter().sum())
                .unwrap_or(0);
            ConstCounter::new(v).encode(m.encode_family(&[("reason", *reason)])?)?;
        }
        Ok(())
    }
}

/// Binds the observability server's socket; done before anything is attached, so that a
/// taken port fails the start early. `None` for `none`.
pub fn bind(addr: &str) -> Result<Option<std::net::TcpListener>> {
    http::bind(addr, "--metrics-addr")
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `/loglevel` on `listener` until the task is
/// aborted. Must run inside a tokio runtime.
pub fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) -> Result<JoinHandle<()>> {
    http::serve(
        listener,
        "metrics",
        "metrics, health and log level",
        MAX_CONNECTIONS,
        move |req| handle(req, metrics.clone()),
    )
}

async fn handle(req: Request<Incoming>, metrics: Arc<Metrics>) -> HttpResponse {
    let (parts, body) = req.into_parts();
    let read = matches!(parts.method, Method::GET | Method::HEAD);
    // Changing the log level or the datapath's debug events: only from the node itself
    // (the server listens on every address, pods included), before any body is read.
    if !read
        && matches!(parts.uri.path(), "/loglevel" | "/datapath-debug")
        && let Some(refused) = http::refuse_unless_from_node(&parts)
    {
        return refused;
    }
    match parts.uri.path() {
        "/metrics" if read => {
            let m = metrics.clone();
            match tokio::task::spawn_blocking(move || m.render()).await {
                Ok(body) => reply(
                    StatusCode::OK,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    body,
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        "/healthz" if read => {
            let idle = metrics.loop_idle();
            if idle <= LOOP_STALE_AFTER {
                text(StatusCode::OK, "ok\n")
            } else {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "agent loop stalled: last iteration {:.1} s ago\n",
                        idle.as_secs_f64()
                    ),
                )
            }
        }
        "/readyz" if read => {
            if metrics.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: the first full sync has not been programmed yet\n",
                )
            }
        }
        "/datapath-debug" => datapath_debug(parts.method, body, &metrics).await,
        "/loglevel" if read => text(
            StatusCode::OK,
            format!("{}\n", log::max_level().as_str().to_lowercase()),
        ),
        "/loglevel" if matches!(parts.method, Method::PUT | Method::POST) => {
            let bytes = match Limited::new(body, MAX_BODY).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            let wanted = String::from_utf8_lossy(&bytes).trim().to_string();
            match log::LevelFilter::from_str(&wanted) {
                Ok(level) => {
                    let old = log::max_level();
                    log::set_max_level(level);
                    // Logged at warn so that the change itself shows at most levels.
                    log::warn!(
                        "log level changed from {} to {} through /loglevel",
                        old.as_str().to_lowercase(),
                        level.as_str().to_lowercase()
                    );
                    text(
                        StatusCode::OK,
                        format!("{}\n", level.as_str().to_lowercase()),
                    )
                }
                Err(_) => text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unknown level {wanted:?}: expected error, warn, info, debug, trace or off\n"
                    ),
                ),
            }
        }
        "/metrics" | "/healthz" | "/readyz" | "/loglevel" => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz, /loglevel\n",
        ),
    }
}

/// `GET /datapath-debug`: `on` or `off`; `PUT`/`POST` with `on` or `off` switches the
/// datapath's debug events (see `serve::debug`).
async fn datapath_debug(method: Method, body: Incoming, metrics: &Metrics) -> HttpResponse {
    use crate::serve::debug::{DebugSwitch, parse_switch};
    let Some(pin_dir) = metrics.pin_dir.clone() else {
        return text(StatusCode::NOT_FOUND, "no datapath\n");
    };
    let wanted = match method {
        Method::GET | Method::HEAD => None,
        Method::PUT | Method::POST => {
            let bytes = match Limited::new(body, MAX_BODY).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            };
            match parse_switch(&String::from_utf8_lossy(&bytes)) {
                Some(on) => Some(on),
                None => return text(StatusCode::BAD_REQUEST, "send `on` or `off`\n"),
            }
        }
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "GET, PUT or POST\n"),
    };
    let result = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
        let mut switch = DebugSwitch::open(&pin_dir)?;
        if let Some(on) = wanted {
            switch.set(on)?;
            // Logged at warn so that the change itself shows at most levels.
            log::warn!(
                "datapath debug events switched {} through /datapath-debug",
                if on { "on" } else { "off" }
            );
        }
        switch.is_on()
    })
    .await;
    match result {
        Ok(Ok(on)) => text(StatusCode::OK, if on { "on\n" } else { "off\n" }),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each of `lines` is a line of `text`.
    fn assert_lines(text: &str, lines: &[&str]) {
        for line in lines {
            assert!(
                text.lines().any(|l| l == *line),
                "{line:?} missing in\n{text}"
            );
        }
    }

    #[test]
    fn port_labels_from_meta() {
        let meta = |ns: &str, name: &str, port: &str, proto, scope| {
            SvcMeta::new(ns, name, port, ServiceType::NodePort, proto, scope, 80).unwrap()
        };
        assert_eq!(
            PortLabels::from_meta(&meta(
                "dev",
                "nginx-service",
                "http",
                PROTO_TCP,
                SVC_SCOPE_CLUSTER
            )),
            Some(PortLabels {
                namespace: "dev".into(),
                name: "nginx-service".into(),
                port: "http".into(),
                protocol: "TCP",
                scope: "cluster",
            })
        );
        let l = PortLabels::from_meta(&meta("kube-system", "dns", "", PROTO_UDP, SVC_SCOPE_LOCAL))
            .unwrap();
        assert_eq!(
            (l.name.as_str(), l.port.as_str(), l.protocol, l.scope),
            ("dns", "", "UDP", "local")
        );
        // Never initialised, unreadable, or nameless: no series.
        assert_eq!(PortLabels::from_meta(&SvcMeta::default()), None);
        let mut old = meta("dev", "x", "", PROTO_TCP, SVC_SCOPE_CLUSTER);
        old.version = 0;
        assert_eq!(PortLabels::from_meta(&old), None);
        assert_eq!(
            PortLabels::from_meta(&meta("", "x", "", PROTO_TCP, SVC_SCOPE_CLUSTER)),
            None
        );
        assert_eq!(
            PortLabels::from_meta(&meta("dev", "x", "", PROTO_ICMP, SVC_SCOPE_CLUSTER)),
            None
        );
    }

    /// The label comes from the error's type: changing or dropping a message does not
    /// move an error to another kind.
    #[test]
    fn error_kinds_come_from_types_not_messages() {
        use crate::dataplane::programmer::ApplyError;
        use crate::error::Error;
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let read = Error::SourceRead {
            path: "/x.yaml".into(),
            source: io(),
        };
        assert_eq!(read.metric_label(), "source");
        let parse = Error::from(crate::source::yaml::ParseError::Document {
            doc: 1,
            msg: "anything at all".into(),
        });
        assert_eq!(parse.metric_label(), "parse");
        // A map error anywhere among the causes, whatever the messages say.
        let map = anyhow::Error::from(aya::maps::MapError::KeyNotFound).context("renamed");
        assert_eq!(
            Error::from(ApplyError::from(map)).metric_label(),
            "map_write"
        );
        // Text that once meant "capacity" is just another failure now.
        let text = anyhow::anyhow!("70000 frontends exceed the limit of 65536");
        assert_eq!(Error::from(ApplyError::from(text)).metric_label(), "other");
    }

    #[test]
    fn exposition_without_maps() {
        let m = Metrics::without_maps();
        assert!(!m.is_ready());
        m.apply_error(ErrorKind::Parse);
        m.synced(
            Some((SyncSource::File, Instant::now())),
            Programmed {
                services: 2,
                service_ports: 3,
                frontends: 7,
                backends: 4,
            },
        );
        assert!(m.is_ready());
        let text = m.render();
        assert_lines(
            &text,
            &[
                "xlb_ready 1",
                "xlb_apply_errors_total{kind=\"parse\"} 1",
                "xlb_apply_errors_total{kind=\"capacity\"} 0",
                "xlb_apply_errors_total{kind=\"map_write\"} 0",
                "xlb_programmed_frontends 7",
                "xlb_sync_duration_seconds_count{source=\"file\"} 1",
            ],
        );
    }

    #[test]
    fn conntrack_series() {
        use crate::dataplane::conntrack::{MapSweep, SnatBackend};
        use std::net::Ipv4Addr;
        let m = Metrics::without_maps();
        m.conntrack().set_capacity("ct", 262_144);
        let be = |last: u8| SnatBackend {
            addr: Ipv4Addr::new(10, 244, 2, last),
            port: 80,
            proto: PROTO_TCP,
        };
        let mut r = SweepReport {
            ct: MapSweep {
                capacity: 262_144,
                seen: 120,
                deleted: 20,
            },
            snat_ports: [(be(5), 3), (be(6), 1)].into(),
            duration: Duration::from_millis(12),
            ..Default::default()
        };
        m.conntrack().sweep_done(&r, Duration::from_secs(20));
        r.snat_ports.remove(&be(6));
        m.conntrack().sweep_done(&r, Duration::from_secs(40));
        let text = m.render();
        assert_lines(
            &text,
            &[
                "xlb_conntrack_entries{map=\"ct\"} 100",
                "xlb_conntrack_entries{map=\"ct_new\"} 0",
                "xlb_conntrack_capacity{map=\"ct\"} 262144",
                "xlb_conntrack_gc_deleted_total{map=\"ct\"} 40",
                "xlb_conntrack_gc_runs_total 2",
                "xlb_conntrack_gc_duration_seconds_count 2",
                "xlb_conntrack_gc_interval_seconds 40",
                "xlb_snat_ports_in_use{backend=\"10.244.2.5:80\",proto=\"tcp\"} 3",
            ],
        );
        // A backend without SNAT ports any more has no series.
        assert!(!text.contains("10.244.2.6:80"), "{text}");
    }

    #[test]
    fn loop_liveness() {
        let m = Metrics::without_maps();
        m.loop_alive();
        assert!(m.loop_idle() < Duration::from_secs(1));
    }
}
