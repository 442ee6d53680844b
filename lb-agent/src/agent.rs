//! `lb-agent run`: load and attach the datapath on this node, then keep the maps equal to
//! what the source says.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use lb_common::*;

use crate::{
    dataplane::{
        datapath::{Datapath, Limits, PIN_ROOT, Verify, XdpAttachMode, XdpModeChoice},
        netinfo,
        programmer::{Maps, Programmer, Settings},
    },
    error::Error,
    model::translate::{self, Desired, NodeContext, ServiceEvent},
    serve::metrics::{Metrics, Programmed, SyncSource},
    serve::node_health::{NodeHealth, node_eligible},
    source::yaml,
};

#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Where Services and EndpointSlices come from: `file:<PATH>` (YAML, re-read on change)
    /// or `kube` (watched through the API server; in-cluster config or KUBECONFIG).
    #[arg(long)]
    pub source: String,
    /// This node's name, as in EndpointSlice `nodeName` (decides local vs remote endpoints).
    #[arg(long)]
    pub node_name: String,
    /// The node's uplink: XDP attaches here; NodePorts listen on its addresses.
    #[arg(long)]
    pub iface: String,
    /// Pin directory for the maps [default: /sys/fs/bpf/xlb/<node-name>].
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// XDP on the uplink (tc ingress runs behind it in every mode, and alone with `off`).
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeChoice,
    /// Smallest Maglev table size; larger services get the next prime of the ladder >= 100 x
    /// backends (see maglev.rs for the bounds).
    #[arg(long, default_value_t = crate::dataplane::maglev::DEFAULT_MIN_M)]
    pub maglev_min_m: u32,
    /// Slots in the Maglev arena shared by all services (4 bytes each) [default:
    /// --max-services x 2 x the smallest table, so every service port fits double-buffered
    /// at --maglev-min-m: 33,456,128 slots = 128 MiB with the defaults].
    #[arg(long)]
    pub maglev_arena: Option<u32>,
    /// Seconds a removed endpoint keeps serving its established flows.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
    /// Lowest SNAT source port for flows to backends on other nodes [default: automatic].
    /// Without --snat-port-min and --snat-port-max the agent takes the largest contiguous
    /// range of 1024-65535 outside --service-node-port-range and the node's
    /// net.ipv4.ip_local_port_range (1024-29999 with stock settings); with one of them the
    /// other is 1024 or 65535. A range given is checked against the same two (ports in
    /// net.ipv4.ip_local_reserved_ports may overlap the local range).
    #[arg(long)]
    pub snat_port_min: Option<u16>,
    /// Highest SNAT source port (inclusive) [default: automatic, see --snat-port-min].
    #[arg(long)]
    pub snat_port_max: Option<u16>,
    /// The cluster's NodePort range, as the API server's flag of the same name (`MIN-MAX`,
    /// `BASE+OFFSET` or `PORT`); the SNAT port range must stay out of it.
    #[arg(long, value_name = "RANGE", default_value = "30000-32767")]
    pub service_node_port_range: crate::model::ports::PortRange,
    /// Which node addresses serve NodePorts, as kube-proxy's flag: comma-separated IPv4
    /// CIDRs and/or `primary` (the uplink's first address); 127.0.0.0/8 among them keeps
    /// `localhost:<NodePort>` for the node's processes [default: every address of the
    /// uplink, and localhost].
    #[arg(long, value_name = "CIDR|primary", value_delimiter = ',')]
    pub nodeport_addresses: Vec<crate::model::addresses::NodePortAddress>,
    /// The cluster's service address ranges (comma-separated IPv4 CIDRs, as the API
    /// server's `--service-cluster-ip-range`), in addition to the ServiceCIDR objects of
    /// the kube source. An address inside them that no Service holds is dropped, whoever
    /// sends to it (kube-proxy's nftables mode), instead of being routed towards the
    /// default gateway.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub service_cidr: Vec<crate::model::addresses::Cidr4>,
    /// Confirmed flows (`XLB_CT`, LRU): both directions seen, then the client again.
    #[arg(long, default_value_t = DEFAULT_CT_ENTRIES)]
    pub ct_entries: u32,
    /// Unconfirmed flows (`XLB_CT_NEW`, LRU): a SYN flood evicts only these. Reverse-NAT
    /// entries get --ct-entries + --ct-new-entries.
    #[arg(long, default_value_t = DEFAULT_CT_NEW_ENTRIES)]
    pub ct_new_entries: u32,
    /// Conntrack timeout of a TCP flow not yet confirmed by both directions (seconds, or
    /// a duration like 90s, 10m, 2h13m20s).
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_CT_TCP_SYN_S,
          value_parser = crate::dataplane::conntrack::parse_timeout)]
    pub ct_tcp_syn_timeout: u32,
    /// Conntrack timeout of a confirmed TCP flow without packets.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_CT_TCP_ESTABLISHED_S,
          value_parser = crate::dataplane::conntrack::parse_timeout)]
    pub ct_tcp_established_timeout: u32,
    /// Conntrack timeout of a TCP flow after RST or FIN both ways (and of a flow first seen
    /// mid-stream, until both directions confirm it).
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_CT_TCP_CLOSE_S,
          value_parser = crate::dataplane::conntrack::parse_timeout)]
    pub ct_tcp_close_timeout: u32,
    /// Conntrack timeout of a UDP flow without packets.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_CT_UDP_S,
          value_parser = crate::dataplane::conntrack::parse_timeout)]
    pub ct_udp_timeout: u32,
    /// Capacity of the service-port map (and its stats): raise for large clusters.
    #[arg(long, default_value_t = DEFAULT_MAX_SERVICES)]
    pub max_services: u32,
    /// Capacity of the frontend map (ClusterIPs, NodePorts per node address, LB IPs).
    #[arg(long, default_value_t = DEFAULT_MAX_FRONTENDS)]
    pub max_frontends: u32,
    /// Capacity of the backend map (distinct endpoint address:port pairs).
    #[arg(long, default_value_t = DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,
    /// Directory for the agent's run-time facts read by `status` (bpffs holds only pins).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// cgroup v2 directory whose processes get socket-level load balancing (connect,
    /// sendmsg, recvmsg, getpeername hooks), or `none` [default: see
    /// `dataplane::cgroup`; never the machine's cgroup root unless allowed].
    #[arg(long, value_name = "PATH|none")]
    pub cgroup: Option<String>,
    /// Address of the HTTP server for `/metrics` (Prometheus), `/healthz`, `/readyz` and
    /// `/loglevel`, or `none`.
    #[arg(long, value_name = "ADDR:PORT|none", default_value = crate::serve::metrics::DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// Start with datapath debug events on: the programs log why a packet was passed,
    /// rejected or dropped, and each new flow (also switched at run time with
    /// `PUT /datapath-debug` on the metrics address). Off by default.
    #[arg(long)]
    pub datapath_debug: bool,
    /// Address of kube-proxy's node health server (`/healthz`, `/livez`, probed by cloud
    /// load balancers for `externalTrafficPolicy: Cluster` Services), or `none`.
    #[arg(long, value_name = "ADDR:PORT|none", default_value = crate::serve::node_health::DEFAULT_HEALTHZ_BIND_ADDRESS)]
    pub healthz_bind_address: String,
    /// UDP port of the agents' heartbeats on the uplink, which decide which node answers
    /// ARP for each LoadBalancer address of an L2-advertised pool; `none` turns
    /// announcing off (another component, e.g. MetalLB, answers ARP).
    #[arg(long, value_name = "PORT|none", default_value = "7947")]
    pub announce_port: String,
    /// Full resync period, as kube-proxy's `--sync-period`: every Service re-translated and
    /// compared with the maps (which are written only where they differ), a safety net
    /// under the incremental updates; `0` turns it off.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    pub sync_period: Duration,
    /// Shortest time between two updates from the file source, as kube-proxy's
    /// `--min-sync-period`: a change after a quiet period is applied at once, a burst of
    /// changes is applied in batches at most this often. (The kube source batches the same
    /// way, every 100 ms.)
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub min_sync_period: Duration,
}

/// `250ms`, `10s`, `10m`, `1h` or `0`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a duration such as 100ms, 30s, 10m, 1h or 0");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| bad())?;
    let ms = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(bad()),
    };
    n.checked_mul(ms).map(Duration::from_millis).ok_or_else(bad)
}

pub fn default_pin_dir(node: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(node)
}

pub fn default_run_dir(node: &str) -> PathBuf {
    Path::new("/run/xlb").join(node)
}

/// Facts about the running agent that are not in any map.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
pub struct AgentInfo {
    pub node_name: String,
    pub iface: String,
    pub xdp_mode: String,
    /// Why that mode (the flag, or what `auto` saw).
    #[serde(default)]
    pub xdp_mode_reason: String,
    pub node_addrs: Vec<Ipv4Addr>,
    pub pod_ifaces: Vec<String>,
    /// The cgroup the socket programs are attached to (None: socket LB off).
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The uplink's tc program is attached (ClusterIP traffic XDP hands on).
    #[serde(default)]
    pub tc_uplink: bool,
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
    /// The first full sync has been programmed (what `/readyz` answers).
    #[serde(default)]
    pub ready: bool,
    /// Where `/metrics`, `/healthz`, `/readyz` and `/loglevel` are served (None: off).
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// LoadBalancer addresses from the pools, by Service, and whether this node announces
    /// them (answers ARP) as of the last save.
    #[serde(default)]
    pub lb_addresses: Vec<LbAddressInfo>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LbAddressInfo {
    pub namespace: String,
    pub name: String,
    pub addr: Ipv4Addr,
    pub pool: String,
    pub announced_here: bool,
}

/// `--source`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    File(PathBuf),
    Kube,
}

pub fn parse_source(s: &str) -> Result<SourceSpec> {
    match s.split_once(':') {
        _ if s == "kube" => Ok(SourceSpec::Kube),
        Some(("file", path)) if !path.is_empty() => Ok(SourceSpec::File(PathBuf::from(path))),
        _ => bail!("--source {s:?}: expected file:<PATH> or kube"),
    }
}

enum Source {
    /// The file or directory, and its documents as last read (only changed ones are
    /// parsed again).
    File(Box<crate::source::files::FileSource>),
    /// Snapshots are pushed in ([`Agent::apply_objects`]); `seen` names the last one
    /// (source, number) so that the next one's [`crate::source::kube::ChangeLog`] says
    /// what changed since.
    Kube { seen: (u64, u64) },
}

/// Where the socket programs go. `lb-agent run` decides it before the agent starts
/// (`dataplane::cgroup::resolve`, which knows `--allow-cgroup-root`) and passes a path or
/// `none`; a caller that passes nothing gets the same safe default, never the machine's
/// cgroup root.
fn resolve_cgroup(arg: Option<&str>) -> Result<Option<PathBuf>> {
    match arg {
        Some("none") => Ok(None),
        Some(path) => Ok(Some(PathBuf::from(path))),
        None => crate::dataplane::cgroup::resolve(None, false),
    }
}

pub struct Agent {
    args: RunArgs,
    source: Source,
    node: NodeContext,
    dp: Datapath,
    maps: Maps,
    programmer: Programmer,
    info: AgentInfo,
    run_dir: PathBuf,
    /// Writes `agent.json` and `lb-addresses.json` off the loop (see
    /// [`crate::run_files`]).
    run_files: crate::run_files::RunFiles,
    /// Pod interfaces whose attach failed, so that a failure is logged once, not on every
    /// re-scan (ifindex -> name).
    tc_failed: BTreeMap<u32, String>,
    /// When the file source was last looked at.
    last_file_poll: Option<Instant>,
    /// The file source's first look, taken while the agent started: the first tick
    /// programs it instead of looking again.
    first_poll: Option<Result<Option<crate::source::files::Polled>, Error>>,
    /// A watch said the file source changed since.
    file_woken: bool,
    /// A watch reports the file source's changes.
    file_watched: bool,
    /// Every object, and each Service's part of the translation (see
    /// [`crate::model::incremental`]).
    translator: crate::model::incremental::Translator,
    /// When the last full translation and apply ran (for `--sync-period`).
    last_full: Option<Instant>,
    /// When the file source's last change was applied (for `--min-sync-period`).
    last_file_sync: Option<Instant>,
    /// An incremental apply failed part-way: the next pass must be a full one.
    need_full: bool,
    /// Events of the last translation (each is logged/posted when it first appears).
    events: Vec<translate::ServiceEvent>,
    /// New events not yet taken by the source (kube: posted as Kubernetes Events).
    new_events: Vec<translate::ServiceEvent>,
    /// kube-proxy's per-service `healthCheckNodePort` servers.
    health: crate::serve::health::HealthServer,
    metrics: Arc<Metrics>,
    /// kube-proxy's node health state (served by `node_health::serve`).
    node_health: Arc<NodeHealth>,
    /// Reads the datapath's debug events into the log while the agent runs.
    _datapath_events: Option<AbortOnDrop>,
    /// Answers ARP for the LoadBalancer addresses this node owns (None: `--announce-port
    /// none`).
    announce: Option<crate::announce::Announce>,
    /// Pool settings not honoured, as last logged.
    lb_notes: Vec<String>,
    /// The addresses the announcer announced at the last look (for takeover Events).
    announced_seen: BTreeSet<Ipv4Addr>,
    /// Since when each address announced here has been (kube source: the Service's status
    /// is written once the announcement has settled, see [`Agent::take_lb_status`]).
    announced_since: BTreeMap<Ipv4Addr, Instant>,
    /// The LoadBalancer status last handed out by [`Agent::take_lb_status`], by Service.
    lb_status_asked: BTreeMap<(String, String), Vec<Ipv4Addr>>,
}

/// How often the file source is looked at without a watch: a poll is one stat() per file,
/// and every 20 ms keeps an endpoint change within tens of milliseconds of the maps.
pub const FILE_POLL: Duration = Duration::from_millis(20);

/// How often it is looked at while an inotify watch reports changes as they happen: only
/// a backstop for changes a watch cannot see (a file changed on another host of a network
/// file system).
pub const FILE_POLL_WATCHED: Duration = Duration::from_secs(1);

/// How long an address must have been announced here before this agent writes it into
/// its Service's status: two agents that took it at once (each before hearing the other)
/// settle it within a heartbeat or two, so only the one that keeps it writes.
pub const LB_STATUS_SETTLE: Duration = Duration::from_millis(500);

/// Event reason when this node starts announcing a Service's address (MetalLB's).
pub const NODE_ASSIGNED_REASON: &str = "nodeAssigned";

/// This agent's record of the LoadBalancer addresses it assigned, in its run directory.
const LB_ADDRESSES_FILE: &str = "lb-addresses.json";

/// The record left by a previous run, if any.
fn load_lb_addresses(run_dir: &Path) -> BTreeMap<(String, String), Vec<Ipv4Addr>> {
    std::fs::read_to_string(run_dir.join(LB_ADDRESSES_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Vec<((String, String), Vec<Ipv4Addr>)>>(&t).ok())
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// A task that stops with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Agent {
    /// Loads and attaches everything; `links` is the namespace's link list (netinfo), for
    /// the uplink's kind and the pod-facing interfaces.
    pub fn start(args: RunArgs, links: &[netinfo::LinkFacts]) -> Result<Self> {
        // The file source's first read (parsing a large manifest takes a second of CPU at
        // 10,000 Services) runs while the programs are verified, instead of after: the
        // first sync of a start comes that much sooner (the kube source's watchers
        // likewise list while the agent loads).
        let first_read = match parse_source(&args.source)? {
            SourceSpec::File(path) => {
                let mut files = Box::new(crate::source::files::FileSource::new(path));
                Some(
                    std::thread::Builder::new()
                        .name("first-read".into())
                        .spawn(move || {
                            let polled = files.poll();
                            (files, polled)
                        })
                        .context("starting the file source's first read")?,
                )
            }
            SourceSpec::Kube => None,
        };
        // Before anything is attached: the SNAT range, chosen outside the node's own ports
        // or, given, checked against them (a collision fails the start).
        let (local_ports, reserved_ports) = crate::model::ports::local_port_ranges();
        let snat_ports = crate::model::ports::choose_snat_range(
            args.snat_port_min,
            args.snat_port_max,
            args.service_node_port_range,
            local_ports,
            &reserved_ports,
        )?;
        log::info!(
            "{}",
            crate::model::ports::describe_snat_range(
                snat_ports,
                args.snat_port_min.is_some() || args.snat_port_max.is_some(),
                args.service_node_port_range,
                local_ports,
            )
        );
        if !crate::dataplane::maglev::is_prime(args.maglev_min_m)
            || args.maglev_min_m > crate::dataplane::maglev::MAX_M
        {
            bail!(
                "--maglev-min-m must be a prime <= {}",
                crate::dataplane::maglev::MAX_M
            );
        }
        let node_addrs = netinfo::iface_addrs(&args.iface)?;
        let (node_port_addrs, localhost_node_ports) =
            crate::model::addresses::node_port_addresses(&args.nodeport_addresses, &node_addrs)
                .map_err(anyhow::Error::msg)?;
        let pin_dir = args
            .pin_dir
            .clone()
            .unwrap_or_else(|| default_pin_dir(&args.node_name));
        let run_dir = args
            .run_dir
            .clone()
            .unwrap_or_else(|| default_run_dir(&args.node_name));
        let limits = Limits {
            max_services: args.max_services,
            max_frontends: args.max_frontends,
            max_backends: args.max_backends,
            maglev_arena: args.maglev_arena.unwrap_or_else(|| {
                crate::dataplane::arena::default_slots(args.max_services, args.maglev_min_m)
            }),
            ct_entries: args.ct_entries,
            ct_new_entries: args.ct_new_entries,
        };
        let mut dp = Datapath::load_with(&pin_dir, &limits, Verify::NodeAttached)?;
        // Its own handles on the pins: scrapes never touch the agent's.
        let metrics = Arc::new(Metrics::new(&pin_dir)?);
        let mut maps = Maps::take(&mut dp.ebpf)?;
        let datapath_events = match aya_log::EbpfLogger::init_with_logger(
            &mut dp.ebpf,
            crate::serve::debug::EventText(log::logger()),
        ) {
            Ok(logger) => Some(AbortOnDrop(crate::serve::debug::spawn_reader(logger)?)),
            Err(e) => {
                log::warn!("datapath debug events unavailable: {e}");
                None
            }
        };
        let mac = netinfo::iface_mac(&args.iface).unwrap_or_else(|e| {
            log::warn!("{e:#}; ARP for LoadBalancer addresses will not be answered");
            [0; 6]
        });
        maps.config.set(
            0,
            Config {
                snat_addr_be: u32::from_ne_bytes(node_addrs[0].octets()),
                snat_port_min: snat_ports.min,
                snat_port_max: snat_ports.max,
                ct_tcp_syn_s: args.ct_tcp_syn_timeout,
                ct_tcp_established_s: args.ct_tcp_established_timeout,
                ct_tcp_close_s: args.ct_tcp_close_timeout,
                ct_udp_s: args.ct_udp_timeout,
                flags: crate::serve::debug::with_debug(0, args.datapath_debug),
                mac,
                host_netns_cookie: netinfo::netns_cookie().unwrap_or_else(|e| {
                    log::warn!("{e:#}; the socket hooks will take every socket for the node's own");
                    0
                }),
                ..Config::DEFAULT
            },
            0,
        )?;
        let mut programmer = Programmer::new(Settings {
            min_m: args.maglev_min_m,
            drain: Duration::from_secs(args.drain_seconds),
            max_services: limits.max_services,
            max_frontends: limits.max_frontends,
            max_backends: limits.max_backends,
            arena: limits.maglev_arena,
        });
        // Whatever a previous run left keeps serving until the first apply replaces it.
        let adopted = programmer.adopt(&maps)?;
        if adopted != Default::default() {
            log::info!("adopted the previous run's state from the pins: {adopted:?}");
        }
        // tc first: it serves the uplink on its own while XDP is being (re)placed or when
        // no XDP program runs.
        dp.attach_tc_uplink(&args.iface)?;
        log::info!("{PROG_TC_UPLINK} attached to the ingress of {}", args.iface);
        let uplink_is_veth = links.iter().any(|l| l.name == args.iface && l.is_veth());
        let (mode, xdp_mode_reason) = dp.attach_xdp(&args.iface, args.xdp_mode, uplink_is_veth)?;
        log::info!(
            "north-south hook on {}: {} ({xdp_mode_reason}); node addresses {:?}; maps pinned \
             in {}",
            args.iface,
            match mode {
                XdpAttachMode::Native => "native XDP, tc behind it",
                XdpAttachMode::Generic => "generic XDP, tc behind it",
                XdpAttachMode::Off => "tc ingress alone",
            },
            node_addrs,
            pin_dir.display()
        );
        let cgroup = resolve_cgroup(args.cgroup.as_deref())?;
        if let Some(path) = &cgroup {
            dp.attach_cgroup(path)?;
            log::info!(
                "socket programs ({}) attached to cgroup {}",
                crate::dataplane::datapath::SOCK_PROGRAMS.join(", "),
                path.display()
            );
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let info = AgentInfo {
            node_name: args.node_name.clone(),
            iface: args.iface.clone(),
            xdp_mode: format!("{mode:?}").to_lowercase(),
            xdp_mode_reason,
            node_addrs: node_addrs.clone(),
            pod_ifaces: vec![],
            cgroup: cgroup.map(|p| p.display().to_string()),
            tc_uplink: true,
            last_error: None,
            warnings: vec![],
            ready: false,
            metrics_addr: (args.metrics_addr != "none").then(|| args.metrics_addr.clone()),
            lb_addresses: vec![],
        };
        let announce = match args.announce_port.as_str() {
            "none" => None,
            p => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--announce-port: {p:?} is not a port or none"))?;
                let link = crate::announce::heartbeat::Link::open(&args.iface, port)?;
                let announcer = crate::announce::arp::Announcer::open(&pin_dir, &args.iface, mac)?;
                Some(crate::announce::Announce::start(
                    args.node_name.clone(),
                    link,
                    announcer,
                    metrics.clone(),
                )?)
            }
        };
        let (source, first_poll) = match first_read {
            Some(read) => {
                let (files, polled) = read.join().expect("the first read does not panic");
                (Source::File(files), Some(polled))
            }
            None => (Source::Kube { seen: (0, 0) }, None),
        };
        let mut agent = Self {
            node: NodeContext {
                node_name: args.node_name.clone(),
                node_addrs: node_port_addrs,
                snat_ports: snat_ports.min..=snat_ports.max,
                localhost_node_ports,
                service_cidrs: args.service_cidr.iter().map(|c| c.network()).collect(),
                zone: None,
                uplink: args.iface.clone(),
                held_lb_addresses: load_lb_addresses(&run_dir),
            },
            args,
            source,
            dp,
            maps,
            programmer,
            info,
            run_dir,
            run_files: crate::run_files::RunFiles::new()
                .context("starting the thread that writes the run directory's files")?,
            tc_failed: BTreeMap::new(),
            last_file_poll: None,
            first_poll,
            file_woken: false,
            file_watched: false,
            translator: Default::default(),
            last_full: None,
            last_file_sync: None,
            need_full: false,
            events: vec![],
            new_events: vec![],
            health: crate::serve::health::HealthServer::new(Ipv4Addr::UNSPECIFIED),
            metrics,
            node_health: Arc::new(NodeHealth::new()),
            _datapath_events: datapath_events,
            announce,
            lb_notes: vec![],
            announced_seen: BTreeSet::new(),
            announced_since: BTreeMap::new(),
            lb_status_asked: BTreeMap::new(),
        };
        agent.sync_pod_ifaces(links);
        agent.save_info();
        Ok(agent)
    }

    /// One pass: re-read the source if it changed, program the maps, expire drained
    /// backends, resync in full when `--sync-period` says so. (Pod interfaces follow link
    /// notifications: `sync_pod_ifaces`.) The file source is looked at when
    /// [`Agent::file_event`] said it changed, or every [`FILE_POLL`]
    /// ([`FILE_POLL_WATCHED`] while a watch reports its changes).
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        self.note_takeovers();
        let due = self.programmer.next_deadline().is_some_and(|d| d <= now);
        let resync = self.need_full
            || (!self.args.sync_period.is_zero()
                && self
                    .last_full
                    .is_some_and(|t| now.duration_since(t) >= self.args.sync_period));
        let idle = |a: &mut Self| {
            if a.last_full.is_some() && (resync || due) {
                a.record(|a| a.program_pass(None, now, None, resync));
            }
            Ok(())
        };
        let Source::File(files) = &mut self.source else {
            return idle(self);
        };
        let every = if self.file_watched {
            FILE_POLL_WATCHED
        } else {
            FILE_POLL
        };
        let look = self.file_woken
            || self
                .last_file_poll
                .is_none_or(|t| now.duration_since(t) >= every);
        // A change within --min-sync-period of the last one waits (it is looked at again
        // at a later tick): bursts are applied in batches.
        let held = self
            .last_file_sync
            .is_some_and(|t| now.duration_since(t) < self.args.min_sync_period);
        if !look || held {
            return idle(self);
        }
        self.file_woken = false;
        self.last_file_poll = Some(now);
        let read_started = Instant::now();
        let polled = match self.first_poll.take() {
            Some(polled) => polled,
            None => files.poll(),
        };
        if let Ok(Some(_)) = &polled {
            log::debug!("source read in {:?}", read_started.elapsed());
        }
        let polled = match polled {
            Ok(None) => return idle(self),
            Ok(Some(p)) => Ok(p),
            // The caller reports a source that cannot be read (once while it lasts).
            Err(e @ Error::SourceRead { .. }) => return Err(e.into()),
            Err(e) => Err(e),
        };
        let path = files.path().to_path_buf();
        self.last_file_sync = Some(now);
        let result = polled.and_then(|p| {
            // A changed file is a source event, timed from its modification (the write)
            // to the end of the map update.
            let age = SystemTime::now()
                .duration_since(p.modified)
                .unwrap_or_default();
            let since = now.checked_sub(age).unwrap_or(now);
            for e in &p.errors {
                self.metrics.apply_error(e.kind());
                log::error!("{e:#}; that file keeps its last good content");
            }
            match p.update {
                Some(update) => {
                    let update = match update {
                        crate::source::docs::FileUpdate::Full(objs) => Err(objs),
                        crate::source::docs::FileUpdate::Change(c) => Ok(c),
                    };
                    self.program_update(update, now, Some((SyncSource::File, since)), resync)
                }
                None => Ok(()),
            }
        });
        let result = result.inspect_err(|e| {
            if matches!(e, Error::Parse(_) | Error::SourceFile { .. }) {
                self.metrics.apply_error(e.kind());
            }
        });
        let Source::File(files) = &self.source else {
            unreachable!("checked above")
        };
        let broken: Vec<&str> = files.broken().collect();
        match &result {
            Ok(()) if broken.is_empty() => self.info.last_error = None,
            Ok(()) => self.info.last_error = Some(broken.join("; ")),
            Err(e) => {
                log::error!("{}: {e:#}; keeping the last good state", path.display());
                self.info.last_error = Some(format!("{e:#}"));
            }
        }
        self.save_info();
        Ok(())
    }

    /// The file source's watch saw a change: the next tick looks at the file(s).
    pub fn file_event(&mut self) {
        self.file_woken = true;
    }

    /// Whether a watch reports the file source's changes (the poll then only backs it up).
    pub fn set_file_watched(&mut self, watched: bool) {
        self.file_watched = watched;
    }

    /// What to watch for the file source's changes (see
    /// [`crate::source::files::FileSource::watch_target`]); None with the kube source.
    pub fn file_watch_target(&self) -> Option<(PathBuf, Option<std::ffi::OsString>)> {
        match &self.source {
            Source::File(f) => Some(f.watch_target()),
            Source::Kube { .. } => None,
        }
    }

    /// Programs a snapshot of the kube source (complete: both initial lists are done);
    /// when the snapshot says which objects changed since the last one handled here, only
    /// those are re-translated. An error is logged and kept in the status; the datapath
    /// keeps its last good state.
    pub fn apply_objects(&mut self, objs: Arc<yaml::Objects>, now: Instant) {
        let Source::Kube { seen } = &mut self.source else {
            return;
        };
        let log = objs.changes.clone();
        let change = log
            .as_ref()
            .and_then(|l| l.since(seen.0, seen.1))
            .filter(|_| self.last_full.is_some());
        *seen = log.map_or((0, 0), |l| (l.source, l.seq));
        let update = match change {
            Some((svcs, slices, first_event)) => {
                let c = crate::source::kube::change_of(&objs, &svcs, &slices);
                (Ok(c), first_event.unwrap_or(now).min(now))
            }
            None => (Err((*objs).clone()), now),
        };
        // Let go of the snapshot before programming: the source patches its next one in
        // place when nobody else holds it.
        drop(objs);
        self.record(|a| a.program_update(update.0, now, Some((SyncSource::Kube, update.1)), false));
        // Asked again after each snapshot: a write that gave up (API server away), or a
        // status someone else changed, is made good (the source skips what is already so).
        self.lb_status_asked.clear();
    }

    /// With the kube source: the LoadBalancer status (`status.loadBalancer.ingress`) to
    /// write, by Service (namespace, name), for the Services whose pool address this node
    /// announces, as of the last successful program, and has announced for at least
    /// [`LB_STATUS_SETTLE`]; only what changed since the last call (and everything again
    /// after a snapshot). The caller hands them to `KubeSource::write_lb_status`. Only the
    /// announcing agent writes a Service's status; none clears it (see there).
    pub fn take_lb_status(&mut self, now: Instant) -> Vec<((String, String), Vec<Ipv4Addr>)> {
        let (Source::Kube { .. }, Some(a)) = (&self.source, &self.announce) else {
            return Vec::new();
        };
        let announced = a.announced();
        self.announced_since
            .retain(|addr, _| announced.contains(addr));
        for addr in &announced {
            self.announced_since.entry(*addr).or_insert(now);
        }
        let mut want: BTreeMap<(String, String), Vec<Ipv4Addr>> = BTreeMap::new();
        for l in &self.info.lb_addresses {
            if self
                .announced_since
                .get(&l.addr)
                .is_some_and(|since| now.duration_since(*since) >= LB_STATUS_SETTLE)
            {
                want.entry((l.namespace.clone(), l.name.clone()))
                    .or_default()
                    .push(l.addr);
            }
        }
        let out = want
            .iter()
            .filter(|(k, ips)| self.lb_status_asked.get(*k) != Some(*ips))
            .map(|(k, ips)| (k.clone(), ips.clone()))
            .collect();
        self.lb_status_asked = want;
        out
    }

    /// Runs `pass`, logging its error and keeping it in the status.
    fn record(&mut self, pass: impl FnOnce(&mut Self) -> Result<(), Error>) {
        match pass(self).map_err(anyhow::Error::from) {
            Ok(()) => self.info.last_error = None,
            Err(e) => {
                log::error!("{e:#}; keeping the last good state");
                self.info.last_error = Some(format!("{e:#}"));
            }
        }
        self.save_info();
    }

    /// An Event on the Service for each address this node has started announcing since the
    /// last look (with the kube source), and the status file brought up to date.
    fn note_takeovers(&mut self) {
        let Some(a) = &self.announce else {
            return;
        };
        let now = a.announced();
        if now == self.announced_seen {
            return;
        }
        for addr in now.difference(&self.announced_seen) {
            let Some(l) = self.info.lb_addresses.iter().find(|l| l.addr == *addr) else {
                continue;
            };
            if matches!(self.source, Source::Kube { .. }) {
                self.new_events.push(ServiceEvent {
                    namespace: l.namespace.clone(),
                    name: l.name.clone(),
                    reason: NODE_ASSIGNED_REASON.into(),
                    message: format!("announcing {addr} from node {}", self.node.node_name),
                });
            }
        }
        self.announced_seen = now;
        self.save_info();
    }

    /// Keeps the LoadBalancer addresses assigned from the pools as this agent's record
    /// (sticky for the next translations, and across restarts through the run directory),
    /// and logs pool settings xlb does not honour when they change.
    fn hold_lb_addresses(&mut self, desired: &translate::Desired) {
        let mut held: BTreeMap<(String, String), Vec<Ipv4Addr>> = BTreeMap::new();
        for a in &desired.lb_addresses {
            held.entry((a.namespace.clone(), a.name.clone()))
                .or_default()
                .push(a.addr);
        }
        if held != self.node.held_lb_addresses {
            self.node.held_lb_addresses = held;
            let list: Vec<_> = self.node.held_lb_addresses.iter().collect();
            if let Ok(text) = serde_json::to_string(&list) {
                self.run_files
                    .write(self.run_dir.join(LB_ADDRESSES_FILE), text.into_bytes());
            }
        }
        if desired.lb_notes != self.lb_notes {
            for n in desired
                .lb_notes
                .iter()
                .filter(|n| !self.lb_notes.contains(n))
            {
                log::warn!("{n}");
            }
            self.lb_notes = desired.lb_notes.clone();
        }
    }

    /// Events that appeared since the last call (each once per agent lifetime).
    pub fn take_new_events(&mut self) -> Vec<translate::ServiceEvent> {
        std::mem::take(&mut self.new_events)
    }

    /// Metrics and probes of this agent (served by `metrics::serve`).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// kube-proxy's node health state of this agent (served by `node_health::serve`).
    pub fn node_health(&self) -> Arc<NodeHealth> {
        self.node_health.clone()
    }

    /// Programs what a source handed over: every object (`Err`: replaces them all, then a
    /// full translation and apply) or the Services and EndpointSlices that changed (`Ok`:
    /// only their Services are re-translated, only their entries written, unless the
    /// change reaches further). `full` forces the full path. `sync` names the source
    /// event and when it happened: its time to a complete map update is recorded.
    fn program_update(
        &mut self,
        update: Result<crate::model::incremental::Change, yaml::Objects>,
        now: Instant,
        sync: Option<(SyncSource, Instant)>,
        full: bool,
    ) -> Result<(), Error> {
        let change = match update {
            Err(objs) => {
                self.translator.replace(objs);
                return self.program_full(now, sync);
            }
            Ok(change) => change,
        };
        self.program_pass(Some(change), now, sync, full)
    }

    /// One incremental pass (`change`: None only expires drained backends), or the full
    /// one when `full`, when the translation or the programmer cannot do it
    /// incrementally, or before the first full one.
    fn program_pass(
        &mut self,
        change: Option<crate::model::incremental::Change>,
        now: Instant,
        sync: Option<(SyncSource, Instant)>,
        full: bool,
    ) -> Result<(), Error> {
        use crate::model::incremental::Update;
        let update = match change {
            Some(c) => {
                let started = Instant::now();
                let u = self.translator.apply(c, &self.node);
                log::debug!("incremental translation in {:?}", started.elapsed());
                u
            }
            None => Update::Delta(vec![]),
        };
        let deltas = match update {
            Update::Delta(d) if !full && !self.need_full && self.last_full.is_some() => d,
            _ => return self.program_full(now, sync),
        };
        let changes = crate::model::incremental::port_changes(&deltas);
        let st = match self.programmer.apply_delta(&changes, &mut self.maps, now) {
            Ok(Some(st)) => st,
            Ok(None) => return self.program_full(now, sync),
            Err(e) => {
                let e = Error::from(e);
                self.metrics.apply_error(e.kind());
                self.need_full = true;
                return Err(e);
            }
        };
        // Warnings and Events change only with the Services that carry them.
        let warnings_moved = deltas
            .iter()
            .any(|d| !d.old.warnings.is_empty() || !d.new.warnings.is_empty())
            || !self.programmer.refusals().is_empty()
            || self.info.warnings.len() != self.translator.totals().warnings;
        if warnings_moved {
            let warnings: Vec<&translate::Warning> = self.translator.warnings();
            let texts: Vec<String> = warnings
                .iter()
                .map(ToString::to_string)
                .chain(self.programmer.refusals().iter().map(|r| r.message.clone()))
                .collect();
            {
                let before: std::collections::HashSet<&String> =
                    self.info.warnings.iter().collect();
                for w in texts.iter().filter(|w| !before.contains(w)) {
                    log::warn!("{w}");
                }
            }
            let mut events: Vec<ServiceEvent> = warnings.iter().filter_map(|w| w.event()).collect();
            events.extend(capacity_events(self.programmer.refusals()));
            self.post_fresh(events);
            self.info.warnings = texts;
        }
        if deltas
            .iter()
            .any(|d| !d.old.health_checks.is_empty() || !d.new.health_checks.is_empty())
        {
            self.health.update(&self.translator.health_checks());
        }
        let t = self.translator.totals();
        let gauges = Programmed {
            services: t.services,
            service_ports: t.service_ports,
            frontends: t.frontends,
            backends: self.programmer.backends_in_use(),
        };
        if !changes.is_empty() || st != Default::default() {
            log::info!("programmed {} changed service ports: {st:?}", changes.len());
        }
        if let Some((source, since)) = sync {
            log::debug!(
                "{} change in the maps {:?} after the source saw it",
                source.as_str(),
                since.elapsed()
            );
        }
        self.metrics.synced(sync, gauges);
        self.node_health.synced(SystemTime::now());
        Ok(())
    }

    /// Events not posted before (each once per agent lifetime), queued for the kube
    /// source.
    fn post_fresh(&mut self, events: Vec<ServiceEvent>) {
        let fresh: Vec<ServiceEvent> = {
            let seen: std::collections::HashSet<&ServiceEvent> = self.events.iter().collect();
            merge_events(events)
                .into_iter()
                .filter(|ev| !seen.contains(ev))
                .collect()
        };
        if matches!(self.source, Source::Kube { .. }) {
            for ev in &fresh {
                if !self.new_events.contains(ev) {
                    self.new_events.push(ev.clone());
                }
            }
        }
        self.events.extend(fresh);
    }

    /// The full pass: every object translated, every port applied (the maps are written
    /// only where they differ). `sync` as for [`Agent::program_update`]. An error is
    /// counted here and logged by the caller.
    fn program_full(
        &mut self,
        now: Instant,
        sync: Option<(SyncSource, Instant)>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let node_name = Some(self.node.node_name.as_str());
        let node = self
            .translator
            .objects()
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == node_name);
        self.node_health.set_node_eligible(node_eligible(node));
        let desired = self.translator.full(&self.node);
        let translated = started.elapsed();
        self.last_full = Some(now);
        self.need_full = false;
        let result = self
            .programmer
            .apply(&desired, &mut self.maps, now)
            .map_err(Error::from);
        log::debug!(
            "full pass: translated in {translated:?}, applied in {:?}",
            started.elapsed() - translated
        );
        let refusals = self.programmer.refusals();
        // Warnings: the translation's and what did not fit; each is logged once while it
        // lasts.
        let warnings: Vec<String> = desired
            .warnings
            .iter()
            .map(ToString::to_string)
            .chain(refusals.iter().map(|r| r.message.clone()))
            .collect();
        {
            let before: std::collections::HashSet<&String> = self.info.warnings.iter().collect();
            for w in warnings.iter().filter(|w| !before.contains(w)) {
                log::warn!("{w}");
            }
        }
        // Events: those the translation's warnings ask for, what did not fit, and an apply
        // error about one service port; each is posted once. All of them are log lines
        // already (warnings above, an error by the caller).
        let mut events = desired.events.clone();
        events.extend(capacity_events(refusals));
        if let Err(e) = &result {
            self.metrics.apply_error(e.kind());
            events.extend(apply_error_event(e));
        }
        let fresh: Vec<ServiceEvent> = {
            let seen: std::collections::HashSet<&ServiceEvent> = self.events.iter().collect();
            merge_events(events)
                .into_iter()
                .filter(|ev| !seen.contains(ev))
                .collect()
        };
        if matches!(self.source, Source::Kube { .. }) {
            for ev in &fresh {
                if !self.new_events.contains(ev) {
                    self.new_events.push(ev.clone());
                }
            }
        }
        // Remembered for the agent's lifetime: a problem that flickers while objects are
        // being updated (one snapshot without it, the next with it) is posted once, not
        // every time it comes back.
        self.events.extend(fresh);
        let refused: std::collections::HashSet<(&str, &str)> = refusals
            .iter()
            .filter(|r| r.whole)
            .map(|r| (r.id.namespace.as_str(), r.id.name.as_str()))
            .collect();
        let gauges = programmed(&desired, refusals);
        self.info.warnings = warnings;
        let st = result?;
        log::info!(
            "programmed {} service ports: {st:?}",
            desired.ports.len() - st.ports_refused
        );
        // A cloud load balancer must not pick this node for a Service whose ports are not
        // all programmed here.
        let checks: Vec<translate::HealthCheck> = desired
            .health_checks
            .iter()
            .filter(|h| !refused.contains(&(h.namespace.as_str(), h.name.as_str())))
            .cloned()
            .collect();
        self.health.update(&checks);
        self.hold_lb_addresses(&desired);
        self.info.lb_addresses = desired
            .lb_addresses
            .iter()
            .map(|a| LbAddressInfo {
                namespace: a.namespace.clone(),
                name: a.name.clone(),
                addr: a.addr,
                pool: a.pool.clone(),
                announced_here: false,
            })
            .collect();
        if let Some(a) = &self.announce {
            a.set_eligible(desired.announce_eligible.clone());
        }
        self.metrics.synced(sync, gauges);
        // A full pass (a large file parsed on two threads, every Service translated)
        // leaves most of its transient memory free in the allocator's arenas: given back
        // to the system, so the resident size is what the agent keeps.
        // SAFETY: malloc_trim only releases free memory; glibc is the allocator here.
        unsafe {
            libc::malloc_trim(0);
        }
        log::debug!("full pass took {:?}", started.elapsed());
        self.node_health.synced(SystemTime::now());
        if !self.info.ready {
            log::info!("ready: the first full sync is in the maps");
            self.info.ready = true;
        }
        Ok(())
    }

    /// Makes the pod program's attachments equal to the pod-facing interfaces among
    /// `links` (a full listing of the namespace): new ones are attached, vanished ones
    /// forgotten (the kernel dropped their filters with them), and a name re-created with a
    /// new ifindex is a new attachment.
    pub fn sync_pod_ifaces(&mut self, links: &[netinfo::LinkFacts]) {
        let wanted = netinfo::pod_facing(links, &self.args.iface);
        for (idx, name) in self.dp.tc_pods() {
            if !wanted.contains_key(&idx) {
                self.dp.detach_tc_pod(idx);
                log::info!("pod interface {name} (ifindex {idx}) is gone");
            }
        }
        self.tc_failed.retain(|idx, _| wanted.contains_key(idx));
        let attached = self.dp.tc_pods();
        for (idx, name) in wanted {
            if attached.get(&idx) == Some(&name) {
                continue;
            }
            match self.dp.attach_tc_pod(&name, idx) {
                Ok(()) => {
                    if let Some(old) = attached.get(&idx) {
                        log::info!("pod interface {old} is now {name}");
                    } else {
                        log::info!("{PROG_TC_POD} attached to pod interface {name}");
                    }
                    self.tc_failed.remove(&idx);
                }
                // Often a race with the pod's teardown; the next listing settles it.
                Err(e) => {
                    if self.tc_failed.insert(idx, name).is_none() {
                        log::warn!("{e:#}");
                    }
                }
            }
        }
        let mut names: Vec<String> = self.dp.tc_pods().into_values().collect();
        names.sort();
        if names != self.info.pod_ifaces {
            self.info.pod_ifaces = names;
            self.save_info();
        }
    }

    /// The agent loop completed an iteration (for `/healthz`).
    pub fn loop_alive(&self) {
        self.metrics.loop_alive();
        self.node_health.loop_alive();
    }

    fn save_info(&mut self) {
        let announced = self
            .announce
            .as_ref()
            .map(|a| a.announced())
            .unwrap_or_default();
        for a in &mut self.info.lb_addresses {
            a.announced_here = announced.contains(&a.addr);
        }
        let path = self.run_dir.join("agent.json");
        if let Ok(s) = serde_json::to_string_pretty(&self.info) {
            self.run_files.write(path, s.into_bytes());
        }
    }
}

/// Event reasons: what [`Programmer::apply`](crate::dataplane::programmer::Programmer::apply)
/// left out for lack of room ([`crate::dataplane::programmer::Refusal`]), and an apply error
/// about one service port ([`Error::port`]). The translation's warnings have theirs
/// ([`translate::WarningKind::event_reason`]).
pub const CAPACITY_REASON: &str = "CapacityExceeded";
pub const APPLY_ERROR_REASON: &str = "ProgrammingFailed";
pub use translate::{COLLISION_REASON, UNSUPPORTED_REASON};

/// What the desired state programs (all but the ports refused whole), for the
/// `xlb_programmed_*` gauges.
fn programmed(desired: &Desired, refusals: &[crate::dataplane::programmer::Refusal]) -> Programmed {
    let refused: std::collections::HashSet<&translate::SvcPortId> =
        refusals.iter().filter(|r| r.whole).map(|r| &r.id).collect();
    let ports: Vec<&translate::SvcPort> = desired
        .ports
        .iter()
        .map(|p| &**p)
        .filter(|p| !refused.contains(&p.id))
        .collect();
    let services: std::collections::BTreeSet<(&str, &str)> = ports
        .iter()
        .map(|p| (p.id.namespace.as_str(), p.id.name.as_str()))
        .collect();
    let backends: std::collections::BTreeSet<(Ipv4Addr, u16)> = ports
        .iter()
        .flat_map(|p| p.backends.iter().chain(&p.draining))
        .map(|b| (b.addr, b.port))
        .collect();
    Programmed {
        services: services.len(),
        service_ports: ports.len(),
        frontends: ports.iter().map(|p| p.frontends.len()).sum(),
        backends: backends.len(),
    }
}

/// One event per (service, reason), messages joined: the Event recorder keys its cache on
/// the object and the reason, so two notes with the same reason would be folded into one
/// Event with a series count instead of being two Events.
fn merge_events(events: Vec<ServiceEvent>) -> Vec<ServiceEvent> {
    let mut out: Vec<(ServiceEvent, Vec<String>)> = Vec::new();
    let mut index: std::collections::HashMap<(String, String, String), usize> =
        std::collections::HashMap::new();
    for ev in events {
        let key = (ev.namespace.clone(), ev.name.clone(), ev.reason.clone());
        match index.get(&key) {
            Some(&i) => {
                let parts = &mut out[i].1;
                if !parts.contains(&ev.message) {
                    parts.push(ev.message);
                }
            }
            None => {
                index.insert(key, out.len());
                let message = ev.message.clone();
                out.push((ev, vec![message]));
            }
        }
    }
    out.into_iter()
        .map(|(mut ev, parts)| {
            ev.message = parts.join("; ");
            ev
        })
        .collect()
}

/// Service ports (or parts of them) that did not fit, as Events on their Service.
fn capacity_events(refusals: &[crate::dataplane::programmer::Refusal]) -> Vec<ServiceEvent> {
    refusals
        .iter()
        .map(|r| ServiceEvent {
            namespace: r.id.namespace.clone(),
            name: r.id.name.clone(),
            reason: CAPACITY_REASON.into(),
            message: r.message.clone(),
        })
        .collect()
}

/// An apply error about one service port, as an Event on its Service. Errors about
/// shared state (backends, frontends) name no service and give none.
fn apply_error_event(e: &Error) -> Option<ServiceEvent> {
    let port = e.port()?;
    Some(ServiceEvent {
        namespace: port.namespace.clone(),
        name: port.name.clone(),
        reason: APPLY_ERROR_REASON.into(),
        message: format!("{port}: {}", crate::error::chain_text(e)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(yaml: &str) -> Desired {
        let objs = yaml::parse_objects(yaml).unwrap();
        translate::translate(
            &objs,
            &NodeContext {
                node_name: "n1".into(),
                node_addrs: vec![Ipv4Addr::new(172, 18, 0, 2)],
                snat_ports: 61000..=65535,
                ..NodeContext::default()
            },
        )
    }

    const TWO_NODEPORTS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: dev}
spec:
  type: NodePort
  clusterIP: 10.96.0.1
  ports: [{port: 80, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: dev}
spec:
  type: NodePort
  clusterIP: 10.96.0.2
  ports: [{port: 80, nodePort: 30080}]
";

    #[test]
    fn collisions_become_events_on_the_losing_service() {
        let d = desired(TWO_NODEPORTS);
        assert!(!d.events.is_empty(), "{:?}", d.warnings);
        for ev in &d.events {
            assert_eq!((ev.namespace.as_str(), ev.name.as_str()), ("dev", "b"));
            assert_eq!(ev.reason, COLLISION_REASON);
            assert!(ev.message.starts_with("frontend "), "{}", ev.message);
            assert!(ev.message.contains("already used by dev/a/TCP"));
            // Logged as a warning already, with the port in front.
            assert!(
                d.warnings
                    .iter()
                    .any(|w| w.to_string() == format!("dev/b/TCP: {}", ev.message))
            );
        }
    }

    #[test]
    fn refused_frontends_become_events_and_events_merge_per_reason() {
        // An external IP on the node address, in the SNAT range, with a local scope.
        let d = desired(
            "apiVersion: v1\nkind: Service\nmetadata: {name: c, namespace: dev}\nspec:\n  \
             clusterIP: 10.96.0.3\n  externalTrafficPolicy: Local\n  externalIPs: [172.18.0.2]\n  \
             ports: [{port: 61001}]\n",
        );
        let evs = &d.events;
        assert_eq!(evs.len(), 1, "{:?}", d.warnings);
        assert_eq!(
            (evs[0].name.as_str(), evs[0].reason.as_str()),
            ("c", COLLISION_REASON)
        );
        assert!(
            evs[0]
                .message
                .starts_with("frontend 172.18.0.2:61001/TCP is a node address"),
            "{}",
            evs[0].message
        );

        let ev = |message: &str| ServiceEvent {
            namespace: "dev".into(),
            name: "c".into(),
            reason: CAPACITY_REASON.into(),
            message: message.into(),
        };
        let merged = merge_events(vec![
            ev("a (x; raise --y)"),
            ev("b"),
            ev("a (x; raise --y)"),
        ]);
        assert_eq!(merged, [ev("a (x; raise --y); b")]);
    }

    fn port_id(ns: &str, name: &str) -> translate::SvcPortId {
        translate::SvcPortId {
            namespace: ns.into(),
            name: name.into(),
            port_name: "http".into(),
            proto: translate::Proto::Tcp,
            scope: translate::Scope::Cluster,
        }
    }

    /// Events come from a warning's kind and subject: its text may say anything.
    #[test]
    fn warning_events_come_from_kind_and_subject_not_text() {
        use translate::{Subject, Warning, WarningKind};
        let expected = [
            (WarningKind::OtherProxy, None),
            (WarningKind::Unsupported, Some(UNSUPPORTED_REASON)),
            (WarningKind::Ignored, None),
            (WarningKind::FrontendCollision, Some(COLLISION_REASON)),
            (WarningKind::FrontendInSnatRange, Some(COLLISION_REASON)),
        ];
        for (kind, reason) in expected {
            for subject in [
                Subject::Service {
                    namespace: "team".into(),
                    name: "web".into(),
                },
                Subject::Port(port_id("team", "web")),
            ] {
                let w = Warning {
                    kind,
                    subject,
                    message: "a message reworded beyond recognition: already used by x".into(),
                };
                let ev = w.event();
                assert_eq!(ev.as_ref().map(|e| e.reason.as_str()), reason, "{w}");
                if let Some(ev) = ev {
                    assert_eq!((ev.namespace.as_str(), ev.name.as_str()), ("team", "web"));
                    assert_eq!(ev.message, w.message);
                }
            }
        }
        // The log line is the subject, then the message.
        let w = Warning {
            kind: WarningKind::FrontendCollision,
            subject: Subject::Port(port_id("team", "web")),
            message: "gone".into(),
        };
        assert_eq!(w.to_string(), "team/web:http/TCP: gone");
    }

    /// Events of a translation follow its warnings' kinds, whatever their messages say.
    #[test]
    fn translated_events_do_not_depend_on_warning_text() {
        let mut d = desired(TWO_NODEPORTS);
        let before = d.events.clone();
        for w in &mut d.warnings {
            w.message = w.message.replace("already used by", "taken by");
        }
        let after: Vec<ServiceEvent> = d
            .warnings
            .iter()
            .filter_map(translate::Warning::event)
            .collect();
        assert_eq!(after.len(), before.len());
        for (a, b) in after.iter().zip(&before) {
            assert_eq!(
                (&a.namespace, &a.name, &a.reason),
                (&b.namespace, &b.name, &b.reason)
            );
            assert!(a.message.contains("taken by"), "{}", a.message);
        }
    }

    #[test]
    fn apply_errors_about_a_port_become_events() {
        use crate::dataplane::programmer::ApplyError;
        let id = port_id("dev", "b");
        let e = Error::from(ApplyError::new(
            anyhow::Error::from(aya::maps::MapError::KeyNotFound).context("anything"),
            Some(id.clone()),
        ));
        assert_eq!(e.metric_label(), "map_write");
        let ev = apply_error_event(&e).unwrap();
        assert_eq!(
            (ev.namespace.as_str(), ev.name.as_str(), ev.reason.as_str()),
            ("dev", "b", APPLY_ERROR_REASON)
        );
        assert!(
            ev.message.starts_with("dev/b:http/TCP: anything: "),
            "{}",
            ev.message
        );
        // The text reads as the map writer's error (`{:#}`), whatever the variant.
        let shared = Error::from(ApplyError::from(
            anyhow::anyhow!("inner").context("writing dev/b:http/TCP"),
        ));
        assert_eq!(shared.metric_label(), "other");
        assert_eq!(
            format!("{:#}", anyhow::Error::from(shared)),
            "writing dev/b:http/TCP: inner"
        );
        // Naming a port in the text does not make it about that port.
        let shared = Error::from(ApplyError::from(anyhow::anyhow!("dev/b:http/TCP")));
        assert_eq!(apply_error_event(&shared), None);
        let read = Error::SourceRead {
            path: "/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(apply_error_event(&read), None);
        assert!(format!("{:#}", anyhow::Error::from(read)).starts_with("reading /x: "));
    }

    #[test]
    fn programmed_counts() {
        let d = desired(TWO_NODEPORTS);
        let p = programmed(&d, &[]);
        assert_eq!((p.services, p.service_ports, p.backends), (2, 2, 0));
        assert!(p.frontends >= 2);
        let refused = crate::dataplane::programmer::Refusal {
            id: d.ports[1].id.clone(),
            limit: crate::dataplane::programmer::Limit::MaglevArena,
            whole: true,
            message: "dev/b/TCP: not programmed: the Maglev arena is full".into(),
        };
        let p = programmed(&d, std::slice::from_ref(&refused));
        assert_eq!((p.services, p.service_ports), (1, 1));
        let evs = capacity_events(&[refused]);
        assert_eq!(
            evs[0].message,
            "dev/b/TCP: not programmed: the Maglev arena is full"
        );
        assert_eq!(
            (evs[0].name.as_str(), evs[0].reason.as_str()),
            ("b", CAPACITY_REASON)
        );
    }
}
