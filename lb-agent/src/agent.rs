//! `lb-agent run`: load and attach the datapath on this node, then keep the maps equal to
//! what the source says.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
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
    /// Where Services and EndpointSlices come from: `file:<PATH>` (YAML, re-read on change).
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
    pub last_error: Option<String>,
    pub warnings: Vec<String>,
}

enum Source {
    File(PathBuf),
}

fn parse_source(s: &str) -> Result<Source> {
    match s.split_once(':') {
        Some(("file", path)) if !path.is_empty() => Ok(Source::File(PathBuf::from(path))),
        _ => bail!("--source {s:?}: expected file:<PATH>"),
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
    /// Pod-facing interfaces with the reply hook attached, by name -> ifindex.
    tc_ifaces: BTreeMap<String, u32>,
    last_seen: Option<(SystemTime, u64)>,
    local_backends: Vec<Ipv4Addr>,
}

impl Agent {
    pub fn start(args: RunArgs) -> Result<Self> {
        let source = parse_source(&args.source)?;
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
        Programmer::reset_maps(&mut maps)?;
        let programmer = Programmer::new(Settings {
            min_m: args.maglev_min_m,
            drain: Duration::from_secs(args.drain_seconds),
            max_services: limits.max_services,
            max_frontends: limits.max_frontends,
            max_backends: limits.max_backends,
            arena: limits.maglev_arena,
        });
        let mode = dp.attach_xdp(&args.iface, args.xdp_mode)?;
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
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        let info = AgentInfo {
            node_name: args.node_name.clone(),
            iface: args.iface.clone(),
            xdp_mode: format!("{mode:?}").to_lowercase(),
            node_addrs: node_addrs.clone(),
            pod_ifaces: vec![],
            last_error: None,
            warnings: vec![],
        };
        Ok(Self {
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
            tc_ifaces: BTreeMap::new(),
            last_seen: None,
            local_backends: vec![],
        })
    }

    /// One pass: re-read the source if it changed, program the maps, attach new pod
    /// interfaces, expire drained backends.
    pub fn tick(&mut self, now: Instant) -> Result<()> {
        let Source::File(path) = &self.source;
        let path = path.clone();
        let meta =
            std::fs::metadata(&path).with_context(|| format!("reading {}", path.display()))?;
        let stamp = (meta.modified()?, meta.len());
        let due = self.programmer.next_deadline().is_some_and(|d| d <= now);
        if self.last_seen == Some(stamp) && !due {
            return self.attach_pod_ifaces();
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        self.last_seen = Some(stamp);
        let result = self.program(&text, now);
        match &result {
            Ok(()) => self.info.last_error = None,
            Err(e) => {
                log::error!("{}: {e:#}; keeping the last good state", path.display());
                self.info.last_error = Some(format!("{e:#}"));
            }
        }
        self.attach_pod_ifaces()?;
        self.save_info();
        Ok(())
    }

    fn program(&mut self, text: &str, now: Instant) -> Result<()> {
        let objs = k8s::parse_objects(text)?;
        let desired = translate::translate(&objs, &self.node);
        for w in &desired.warnings {
            if !self.info.warnings.contains(w) {
                log::warn!("{w}");
            }
        }
        self.info.warnings = desired.warnings.clone();
        let st = self.programmer.apply(&desired, &mut self.maps, now)?;
        log::info!("programmed {} service ports: {st:?}", desired.ports.len());
        self.local_backends = desired
            .ports
            .iter()
            .flat_map(|p| p.backends.iter().filter(|b| b.local).map(|b| b.addr))
            .collect();
        Ok(())
    }

    /// The reply hook goes on every interface that routes to a local backend; interfaces
    /// that vanished (pod deleted) are forgotten, and a re-created one is attached again.
    fn attach_pod_ifaces(&mut self) -> Result<()> {
        self.tc_ifaces
            .retain(|name, idx| nix::net::if_::if_nametoindex(name.as_str()).ok() == Some(*idx));
        let mut wanted = std::collections::BTreeSet::new();
        for addr in &self.local_backends {
            if let Some(iface) = netinfo::route_iface(*addr)?
                && iface != self.args.iface
                && iface != "lo"
            {
                wanted.insert(iface);
            }
        }
        for iface in wanted {
            if self.tc_ifaces.contains_key(&iface) {
                continue;
            }
            match self.dp.attach_tc_pod(&iface) {
                Ok(()) => {
                    let idx = nix::net::if_::if_nametoindex(iface.as_str()).unwrap_or(0);
                    log::info!("reply hook attached to pod interface {iface}");
                    self.tc_ifaces.insert(iface, idx);
                }
                Err(e) => log::warn!("{e:#}"),
            }
        }
        let names: Vec<String> = self.tc_ifaces.keys().cloned().collect();
        if names != self.info.pod_ifaces {
            self.info.pod_ifaces = names;
            self.save_info();
        }
        Ok(())
    }

    fn save_info(&self) {
        let path = self.run_dir.join("agent.json");
        if let Ok(s) = serde_json::to_string_pretty(&self.info) {
            let _ = std::fs::write(path, s);
        }
    }
}
