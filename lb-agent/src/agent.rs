//! `lb-agent run`: load and attach the datapath on this node, then keep the maps equal to
//! what the source says.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use lb_common::*;

use crate::{
    datapath::{Datapath, Limits, PIN_ROOT, XdpAttachMode, XdpModeChoice},
    k8s, netinfo,
    programmer::{Maps, Programmer, Settings},
    translate::{self, NodeContext},
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
    /// XDP mode on the uplink.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeChoice,
    /// Smallest Maglev table size; larger services get the next prime of the ladder >= 100 x
    /// backends (see maglev.rs for the bounds).
    #[arg(long, default_value_t = crate::maglev::DEFAULT_MIN_M)]
    pub maglev_min_m: u32,
    /// Slots in the Maglev arena shared by all services (4 bytes each).
    #[arg(long, default_value_t = DEFAULT_MAGLEV_ARENA)]
    pub maglev_arena: u32,
    /// Seconds a removed endpoint keeps serving its established flows.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
    /// SNAT source port range for flows to backends on other nodes (inclusive).
    #[arg(long, default_value_t = DEFAULT_SNAT_PORT_MIN)]
    pub snat_port_min: u16,
    #[arg(long, default_value_t = DEFAULT_SNAT_PORT_MAX)]
    pub snat_port_max: u16,
    /// Connection-tracking entries (LRU).
    #[arg(long, default_value_t = DEFAULT_CT_ENTRIES)]
    pub ct_entries: u32,
    /// Directory for the agent's run-time facts read by `status` (bpffs holds only pins).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// cgroup v2 directory whose processes get socket-level load balancing (connect,
    /// sendmsg, recvmsg, getpeername hooks), or `none` [default: the cgroup2 mount point,
    /// when the agent shares pid 1's network namespace].
    #[arg(long, value_name = "PATH|none")]
    pub cgroup: Option<String>,
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
    File(PathBuf),
    /// Snapshots are pushed in ([`Agent::apply_objects`]); the last one is kept for
    /// re-programming when drained backends expire.
    Kube(Option<Arc<k8s::Objects>>),
}

/// Where the socket programs go: `--cgroup`, or by default the cgroup2 mount point.
///
/// The default applies only when the agent shares pid 1's network namespace. A cgroup's
/// socket hooks act on every process below it whatever its network namespace, so an agent
/// started inside another one (a test network, `ip netns exec`) is not the host's load
/// balancer, and hooking the cgroup root would send the whole machine's connections to its
/// services; there only an explicit `--cgroup` attaches. (In a DaemonSet pod with
/// hostNetwork and on a kind node, pid 1 is in the agent's namespace.)
fn resolve_cgroup(arg: Option<&str>) -> Option<PathBuf> {
    match arg {
        Some("none") => return None,
        Some(path) => return Some(PathBuf::from(path)),
        None => {}
    }
    let same_netns = |a: &str, b: &str| -> Option<bool> {
        use std::os::unix::fs::MetadataExt as _;
        let (a, b) = (std::fs::metadata(a).ok()?, std::fs::metadata(b).ok()?);
        Some(a.dev() == b.dev() && a.ino() == b.ino())
    };
    // Unreadable (no access to pid 1, as in some sandboxes) counts as "not the host": the
    // cost of a wrong guess is socket LB off and a log line, the other way the machine's
    // connections.
    if same_netns("/proc/self/ns/net", "/proc/1/ns/net") != Some(true) {
        log::info!(
            "socket load balancing off: the agent is not (or cannot tell that it is) in pid \
             1's network namespace; pass --cgroup <PATH> to enable it"
        );
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let found = crate::datapath::cgroup2_mount(&mounts);
    if found.is_none() {
        log::warn!("socket load balancing off: no cgroup2 file system is mounted");
    }
    found
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
    /// Pod interfaces whose attach failed, so that a failure is logged once, not on every
    /// re-scan (ifindex -> name).
    tc_failed: BTreeMap<u32, String>,
    last_seen: Option<(SystemTime, u64)>,
    /// Events of the last translation (each is logged/posted when it first appears).
    events: Vec<translate::ServiceEvent>,
    /// New events not yet taken by the source (kube: posted as Kubernetes Events).
    new_events: Vec<translate::ServiceEvent>,
    /// kube-proxy's per-service `healthCheckNodePort` servers.
    health: crate::health::HealthServer,
}

impl Agent {
    /// Loads and attaches everything; `links` is the namespace's link list (netinfo), for
    /// the uplink's kind and the pod-facing interfaces.
    pub fn start(args: RunArgs, links: &[netinfo::LinkFacts]) -> Result<Self> {
        let source = match parse_source(&args.source)? {
            SourceSpec::File(path) => Source::File(path),
            SourceSpec::Kube => Source::Kube(None),
        };
        if args.snat_port_min > args.snat_port_max {
            bail!("--snat-port-min must not exceed --snat-port-max");
        }
        if !crate::maglev::is_prime(args.maglev_min_m) || args.maglev_min_m > crate::maglev::MAX_M {
            bail!("--maglev-min-m must be a prime <= {}", crate::maglev::MAX_M);
        }
        let node_addrs = netinfo::iface_addrs(&args.iface)?;
        let pin_dir = args
            .pin_dir
            .clone()
            .unwrap_or_else(|| default_pin_dir(&args.node_name));
        let run_dir = args
            .run_dir
            .clone()
            .unwrap_or_else(|| default_run_dir(&args.node_name));
        let limits = Limits {
            maglev_arena: args.maglev_arena,
            ct_entries: args.ct_entries,
            ..Limits::default()
        };
        let mut dp = Datapath::load(&pin_dir, &limits)?;
        let mut maps = Maps::take(&mut dp.ebpf)?;
        maps.config.set(
            0,
            Config {
                snat_addr_be: u32::from_ne_bytes(node_addrs[0].octets()),
                snat_port_min: args.snat_port_min,
                snat_port_max: args.snat_port_max,
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
        let adopted = programmer.adopt(&mut maps)?;
        if adopted != Default::default() {
            log::info!("adopted the previous run's state from the pins: {adopted:?}");
        }
        let uplink_is_veth = links.iter().any(|l| l.name == args.iface && l.is_veth());
        let mode = dp.attach_xdp(&args.iface, args.xdp_mode, uplink_is_veth)?;
        log::info!(
            "XDP attached to {} in {} mode; node addresses {:?}; maps pinned in {}",
            args.iface,
            match mode {
                XdpAttachMode::Native => "native",
                XdpAttachMode::Generic => "generic",
            },
            node_addrs,
            pin_dir.display()
        );
        dp.attach_tc_uplink(&args.iface)?;
        log::info!("{PROG_TC_UPLINK} attached to the ingress of {}", args.iface);
        let cgroup = resolve_cgroup(args.cgroup.as_deref());
        if let Some(path) = &cgroup {
            dp.attach_cgroup(path)?;
            log::info!(
                "socket programs ({}) attached to cgroup {}",
                crate::datapath::SOCK_PROGRAMS.join(", "),
                path.display()
            );
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let info = AgentInfo {
            node_name: args.node_name.clone(),
            iface: args.iface.clone(),
            xdp_mode: format!("{mode:?}").to_lowercase(),
            node_addrs: node_addrs.clone(),
            pod_ifaces: vec![],
            cgroup: cgroup.map(|p| p.display().to_string()),
            tc_uplink: true,
            last_error: None,
            warnings: vec![],
        };
        let mut agent = Self {
            node: NodeContext {
                node_name: args.node_name.clone(),
                node_addrs,
            },
            args,
            source,
            dp,
            maps,
            programmer,
            info,
            run_dir,
            tc_failed: BTreeMap::new(),
            last_seen: None,
            events: vec![],
            new_events: vec![],
            health: crate::health::HealthServer::new(Ipv4Addr::UNSPECIFIED),
        };
        agent.sync_pod_ifaces(links);
        agent.save_info();
        Ok(agent)
    }

    /// One pass: re-read the source if it changed, program the maps, expire drained
    /// backends. (Pod interfaces follow link notifications: `sync_pod_ifaces`.)
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        let due = self.programmer.next_deadline().is_some_and(|d| d <= now);
        let path = match &self.source {
            Source::File(path) => path.clone(),
            Source::Kube(Some(objs)) if due => {
                let objs = objs.clone();
                self.program_and_record(&objs, now);
                return Ok(());
            }
            Source::Kube(_) => return Ok(()),
        };
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let stamp = (meta.modified()?, meta.len());
        if self.last_seen == Some(stamp) && !due {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        self.last_seen = Some(stamp);
        let result = k8s::parse_objects(&text)
            .map_err(anyhow::Error::from)
            .and_then(|objs| self.program(&objs, now));
        match &result {
            Ok(()) => self.info.last_error = None,
            Err(e) => {
                log::error!("{}: {e:#}; keeping the last good state", path.display());
                self.info.last_error = Some(format!("{e:#}"));
            }
        }
        self.save_info();
        Ok(())
    }

    /// Programs a snapshot of the kube source (complete: both initial lists are done).
    /// An error is logged and kept in the status; the datapath keeps its last good state.
    pub fn apply_objects(&mut self, objs: Arc<k8s::Objects>, now: Instant) {
        if let Source::Kube(last) = &mut self.source {
            *last = Some(objs.clone());
        }
        self.program_and_record(&objs, now);
    }

    fn program_and_record(&mut self, objs: &k8s::Objects, now: Instant) {
        match self.program(objs, now) {
            Ok(()) => self.info.last_error = None,
            Err(e) => {
                log::error!("{e:#}; keeping the last good state");
                self.info.last_error = Some(format!("{e:#}"));
            }
        }
        self.save_info();
    }

    /// Events that appeared since the last call (each once, while it lasts; one that goes
    /// away and comes back is new again).
    pub fn take_new_events(&mut self) -> Vec<translate::ServiceEvent> {
        std::mem::take(&mut self.new_events)
    }

    fn program(&mut self, objs: &k8s::Objects, now: Instant) -> Result<()> {
        let desired = translate::translate(objs, &self.node);
        for w in &desired.warnings {
            if !self.info.warnings.contains(w) {
                log::warn!("{w}");
            }
        }
        for ev in &desired.events {
            if self.events.contains(ev) {
                continue;
            }
            // Most are warnings too, already logged above.
            if !desired.warnings.iter().any(|w| w.contains(&ev.message)) {
                log::warn!("Service {}/{}: {}", ev.namespace, ev.name, ev.message);
            }
            if matches!(self.source, Source::Kube(_)) && !self.new_events.contains(ev) {
                self.new_events.push(ev.clone());
            }
        }
        self.events = desired.events.clone();
        self.info.warnings = desired.warnings.clone();
        let st = self.programmer.apply(&desired, &mut self.maps, now)?;
        log::info!("programmed {} service ports: {st:?}", desired.ports.len());
        self.health.update(&desired.health_checks);
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

    fn save_info(&self) {
        let path = self.run_dir.join("agent.json");
        if let Ok(s) = serde_json::to_string_pretty(&self.info) {
            let _ = std::fs::write(path, s);
        }
    }
}
