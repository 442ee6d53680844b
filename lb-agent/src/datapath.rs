//! Loading the eBPF object, pinning its maps and attaching its programs.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
        cgroup_sock_addr::CgroupSockAddrLinkId, tc, tc::SchedClassifierLinkId, xdp::XdpLinkId,
    },
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

/// The socket-level programs, attached together to one cgroup.
pub const SOCK_PROGRAMS: [&str; 4] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_GETPEERNAME4,
];

/// cgroup2's `statfs` magic number (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    attached: Attached,
}

/// Every attachment the agent made, so that they are detached one by one in a chosen order
/// (see `Drop`) and a pod interface's hook can be dropped on its own.
#[derive(Default)]
struct Attached {
    xdp: Vec<(String, XdpLinkId)>,
    tc_uplink: Option<(String, SchedClassifierLinkId)>,
    /// Pod-facing interfaces by ifindex: the filter belongs to the index, and a pod
    /// interface re-created under the same name is a new attachment.
    tc_pods: BTreeMap<u32, (String, SchedClassifierLinkId)>,
    sock: Vec<(&'static str, CgroupSockAddrLinkId)>,
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
            .map_max_entries(MAP_CLUSTER_IPS, limits.max_services)
            .map_max_entries(MAP_SOCK_REVNAT, limits.ct_entries)
            .map_max_entries(MAP_AFFINITY, limits.ct_entries)
            .map_max_entries(MAP_SRC_RANGES, limits.max_frontends)
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attached: Attached::default(),
        };
        // Everything is verified up front, whatever gets attached later: a program the
        // kernel rejects is a build problem and must fail the start, not a later attach.
        for name in [PROG_XDP, PROG_XDP_PASS] {
            let prog: &mut Xdp = dp.program_mut(name)?.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        for name in [PROG_TC_POD, PROG_TC_UPLINK] {
            let prog: &mut SchedClassifier = dp.program_mut(name)?.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        for name in SOCK_PROGRAMS {
            let prog: &mut CgroupSockAddr = dp.program_mut(name)?.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
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
    /// `iface_is_veth` comes from the link kind (netinfo::list_links).
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
        iface_is_veth: bool,
    ) -> Result<XdpAttachMode> {
        let prefer_native = match choice {
            XdpModeChoice::Native => true,
            XdpModeChoice::Generic => false,
            XdpModeChoice::Auto => !iface_is_veth,
        };
        let prog = self.xdp(PROG_XDP)?;
        if prefer_native {
            match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => {
                    self.attached.xdp.push((iface.to_owned(), id));
                    return Ok(XdpAttachMode::Native);
                }
                Err(e) if choice == XdpModeChoice::Native => {
                    return Err(e).with_context(|| format!("attaching XDP (native) to {iface}"));
                }
                Err(e) => log::warn!("native XDP on {iface} failed ({e}); falling back to generic"),
            }
        }
        let id = prog
            .attach(iface, XdpMode::Skb)
            .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
        self.attached.xdp.push((iface.to_owned(), id));
        Ok(XdpAttachMode::Generic)
    }

    fn attach_tc(&mut self, prog: &str, iface: &str) -> Result<SchedClassifierLinkId> {
        // Kernels before 6.6 attach through a clsact qdisc (newer ones use tcx and ignore
        // it). Fails with EEXIST when the qdisc is already there; a real failure shows in
        // attach.
        let _ = tc::qdisc_add_clsact(iface);
        let p: &mut SchedClassifier = self.program_mut(prog)?.try_into()?;
        p.attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching {prog} to the ingress of {iface}"))
    }

    /// Attaches the uplink's tc program (packets XDP passed on) to the uplink's ingress.
    pub fn attach_tc_uplink(&mut self, iface: &str) -> Result<()> {
        if self.attached.tc_uplink.is_some() {
            bail!("{PROG_TC_UPLINK} is already attached");
        }
        let id = self.attach_tc(PROG_TC_UPLINK, iface)?;
        self.attached.tc_uplink = Some((iface.to_owned(), id));
        Ok(())
    }

    /// Attaches the pod program to the ingress of a pod-facing interface (what the pod
    /// sends). `ifindex` is the one the interface had when it was listed; attaching the same
    /// index twice is a no-op.
    pub fn attach_tc_pod(&mut self, iface: &str, ifindex: u32) -> Result<()> {
        if let Some((name, _)) = self.attached.tc_pods.get_mut(&ifindex) {
            // Renamed (CNIs create a veth under a temporary name): the filter stays.
            *name = iface.to_owned();
            return Ok(());
        }
        let id = self.attach_tc(PROG_TC_POD, iface)?;
        self.attached
            .tc_pods
            .insert(ifindex, (iface.to_owned(), id));
        // aya attaches by name: if the name now belongs to another interface (the pod was
        // re-created since the listing), the filter sits on an index we do not track.
        if nix::net::if_::if_nametoindex(iface).ok() != Some(ifindex) {
            self.detach_tc_pod(ifindex);
            bail!("{iface} changed while {PROG_TC_POD} was attached; retrying on the next listing");
        }
        Ok(())
    }

    /// Drops the pod program's attachment on `ifindex`. When the interface is gone the
    /// kernel already removed the filter with it, so a failing detach is expected there and
    /// only worth a warning when the interface still exists.
    pub fn detach_tc_pod(&mut self, ifindex: u32) {
        let Some((name, id)) = self.attached.tc_pods.remove(&ifindex) else {
            return;
        };
        let Ok(prog) = self.program_mut(PROG_TC_POD) else {
            return;
        };
        let Ok(prog) = <&mut SchedClassifier>::try_from(prog) else {
            return;
        };
        if let Err(e) = prog.detach(id) {
            let still_there = nix::net::if_::if_nametoindex(name.as_str()).ok() == Some(ifindex);
            if still_there {
                log::warn!("detaching {PROG_TC_POD} from {name}: {e}");
            } else {
                log::debug!("{name} is gone, and its filter with it ({e})");
            }
        }
    }

    /// Pod-facing interfaces with the pod program attached: ifindex -> name.
    pub fn tc_pods(&self) -> BTreeMap<u32, String> {
        self.attached
            .tc_pods
            .iter()
            .map(|(idx, (name, _))| (*idx, name.clone()))
            .collect()
    }

    /// Attaches the four socket programs (connect, sendmsg, recvmsg, getpeername) to the
    /// cgroup v2 directory `path`; they apply to every process in it and below. All or
    /// nothing: a half-attached set would rewrite connects without translating replies.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<()> {
        if !self.attached.sock.is_empty() {
            bail!("the socket programs are already attached");
        }
        let fs =
            nix::sys::statfs::statfs(path).with_context(|| format!("cgroup {}", path.display()))?;
        if fs.filesystem_type().0 as i64 != CGROUP2_SUPER_MAGIC {
            bail!(
                "{} is not a cgroup v2 directory (socket programs need cgroup2)",
                path.display()
            );
        }
        let dir = std::fs::File::open(path)
            .with_context(|| format!("opening cgroup {}", path.display()))?;
        let mut attach_all = || -> Result<()> {
            for name in SOCK_PROGRAMS {
                let prog: &mut CgroupSockAddr = self.program_mut(name)?.try_into()?;
                // Single is the only mode a cgroup bpf_link accepts (the kernel rejects
                // flags on link_create); such links always stack, so other tools' programs
                // on the same cgroup keep running next to ours.
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to {}", path.display()))?;
                self.attached.sock.push((name, id));
            }
            Ok(())
        };
        let result = attach_all();
        if result.is_err() {
            self.detach_cgroup();
        }
        result
    }

    fn detach_cgroup(&mut self) {
        for (name, id) in std::mem::take(&mut self.attached.sock) {
            if let Ok(p) = self.program_mut(name)
                && let Ok(prog) = <&mut CgroupSockAddr>::try_from(p)
                && let Err(e) = prog.detach(id)
            {
                log::warn!("detaching {name}: {e}");
            }
        }
    }

    /// Detaches everything this datapath attached, in an order that never leaves a
    /// half-translating path: first the socket hooks (new host connections then go to the
    /// service address as without xlb), then XDP on the uplink (no new flows), then the tc
    /// programs that translate replies of flows already set up. Each link is detached on
    /// its own, so one failure (a pod interface that vanished) does not keep the others
    /// attached; aya's own drop stops at the first error.
    pub fn detach_all(&mut self) {
        self.detach_cgroup();
        for (iface, id) in std::mem::take(&mut self.attached.xdp) {
            if let Ok(prog) = self.xdp(PROG_XDP)
                && let Err(e) = prog.detach(id)
            {
                log::warn!("detaching XDP from {iface}: {e}");
            }
        }
        if let Some((iface, id)) = self.attached.tc_uplink.take()
            && let Ok(p) = self.program_mut(PROG_TC_UPLINK)
            && let Ok(prog) = <&mut SchedClassifier>::try_from(p)
            && let Err(e) = prog.detach(id)
        {
            log::warn!("detaching {PROG_TC_UPLINK} from {iface}: {e}");
        }
        let pods: Vec<u32> = self.attached.tc_pods.keys().copied().collect();
        for idx in pods {
            self.detach_tc_pod(idx);
        }
    }
}

impl Drop for Datapath {
    /// Pins stay: the maps outlive the process so that a restarted agent keeps the flows.
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// The cgroup v2 mount point in a /proc/self/mounts text (the first one: on a hybrid
/// machine /sys/fs/cgroup/unified, on a cgroup2-only node /sys/fs/cgroup).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        // Mount points with spaces are octal-escaped; a cgroup root never has one.
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0\n\
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }
}
