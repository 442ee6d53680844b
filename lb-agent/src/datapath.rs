//! Loading the eBPF object, pinning its maps and attaching its programs.
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode, tc},
};
use lb_common::*;

/// The eBPF object built by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Root of all pins: `/sys/fs/bpf/xlb`. Each agent pins under `<root>/<node name>` so that
/// several nodes sharing one bpffs (the test network) never share maps.
pub const PIN_ROOT: &str = "/sys/fs/bpf/xlb";

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_services: u32,
    pub max_frontends: u32,
    pub max_backends: u32,
    pub maglev_arena: u32,
    pub ct_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: DEFAULT_MAX_SERVICES,
            max_frontends: DEFAULT_MAX_FRONTENDS,
            max_backends: DEFAULT_MAX_BACKENDS,
            maglev_arena: DEFAULT_MAGLEV_ARENA,
            ct_entries: DEFAULT_CT_ENTRIES,
        }
    }
}

/// How an XDP program was attached, as reported in logs and status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum XdpAttachMode {
    Native,
    Generic,
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native where it can deliver XDP_TX frames, generic otherwise (see `attach_xdp`).
    Auto,
    Native,
    Generic,
}

pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the object with its maps pinned under `pin_dir` (reused if already pinned).
    pub fn load(pin_dir: &Path, limits: &Limits) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("the eBPF object was not built (AYA_BUILD_SKIP was set at build time)");
        }
        ensure_bpffs()?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .map_max_entries(MAP_SERVICES, limits.max_services)
            .map_max_entries(MAP_SVC_STATS, limits.max_services)
            .map_max_entries(MAP_SVC_META, limits.max_services)
            .map_max_entries(MAP_FRONTENDS, limits.max_frontends)
            .map_max_entries(MAP_BACKENDS, limits.max_backends)
            .map_max_entries(MAP_MAGLEV, limits.maglev_arena)
            .map_max_entries(MAP_CT, limits.ct_entries)
            .map_max_entries(MAP_REVNAT, limits.ct_entries)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
        };
        for name in [PROG_XDP, PROG_XDP_PASS] {
            let prog: &mut Xdp = dp.program_mut(name)?.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        let prog: &mut SchedClassifier = dp.program_mut(PROG_TC_POD)?.try_into()?;
        prog.load()
            .with_context(|| format!("verifying {PROG_TC_POD}"))?;
        Ok(dp)
    }

    fn program_mut(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))
    }

    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self.program_mut(name)?.try_into()?)
    }

    /// Attaches the load balancer to a node uplink. `Auto` picks native mode except on veth:
    /// a veth delivers native XDP_TX frames only when its peer runs XDP too, and on a kind
    /// node the peer lives in the host, out of our reach, so generic mode is the one that works.
    pub fn attach_xdp(&mut self, iface: &str, choice: XdpModeChoice) -> Result<XdpAttachMode> {
        let prefer_native = match choice {
            XdpModeChoice::Native => true,
            XdpModeChoice::Generic => false,
            XdpModeChoice::Auto => !crate::netinfo::is_veth(iface),
        };
        let prog = self.xdp(PROG_XDP)?;
        if prefer_native {
            match prog.attach(iface, XdpMode::Driver) {
                Ok(_) => return Ok(XdpAttachMode::Native),
                Err(e) if choice == XdpModeChoice::Native => {
                    return Err(e).with_context(|| format!("attaching XDP (native) to {iface}"));
                }
                Err(e) => log::warn!("native XDP on {iface} failed ({e}); falling back to generic"),
            }
        }
        prog.attach(iface, XdpMode::Skb)
            .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
        Ok(XdpAttachMode::Generic)
    }

    /// Attaches the reply translator to the ingress of a pod-facing interface.
    pub fn attach_tc_pod(&mut self, iface: &str) -> Result<()> {
        // Fails with EEXIST when the qdisc is already there; a real failure shows in attach.
        let _ = tc::qdisc_add_clsact(iface);
        let prog: &mut SchedClassifier = self.program_mut(PROG_TC_POD)?.try_into()?;
        prog.attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching tc to {iface}"))?;
        Ok(())
    }
}

/// bpffs must be mounted at /sys/fs/bpf for pins to exist.
pub fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")?;
    Ok(())
}

/// Removes a pin directory and everything in it (maps of an agent that is gone).
pub fn remove_pins(pin_dir: &Path) {
    let _ = std::fs::remove_dir_all(pin_dir);
}
