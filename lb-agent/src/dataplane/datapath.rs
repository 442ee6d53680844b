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
        links::{FdLink, PinnedLink},
        tc,
        tc::SchedClassifierLink,
        xdp::XdpLink,
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
    /// Confirmed flows (`XLB_CT`); also sizes the socket-level and affinity maps.
    pub ct_entries: u32,
    /// Unconfirmed flows (`XLB_CT_NEW`). `XLB_REVNAT` holds `ct_entries + ct_new_entries`:
    /// one reverse entry per flow of either map.
    pub ct_new_entries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_services: DEFAULT_MAX_SERVICES,
            max_frontends: DEFAULT_MAX_FRONTENDS,
            max_backends: DEFAULT_MAX_BACKENDS,
            maglev_arena: DEFAULT_MAGLEV_ARENA,
            ct_entries: DEFAULT_CT_ENTRIES,
            ct_new_entries: DEFAULT_CT_NEW_ENTRIES,
        }
    }
}

/// How the north-south path runs on the uplink, as reported in logs and status. tc ingress
/// is always attached behind it (see `attach_tc_uplink`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum XdpAttachMode {
    Native,
    Generic,
    /// No XDP program: tc ingress carries the whole north-south path.
    Off,
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Per interface, the hook that measured fastest for its kind (`cargo xtask bench
    /// --only pps`): native XDP where the driver has it; on a veth, tc alone (see
    /// `attach_xdp`).
    Auto,
    /// Native (driver) XDP; fails if the driver has none.
    Native,
    /// Generic (skb) XDP in front of tc.
    Generic,
    /// No XDP: the uplink's tc ingress program does the north-south path.
    Off,
}

/// The XDP program for a mode: native mode takes multi-buffer frames.
fn xdp_program(mode: XdpAttachMode) -> &'static str {
    match mode {
        XdpAttachMode::Native => PROG_XDP_MB,
        _ => PROG_XDP,
    }
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

/// Every attachment the agent made, as the bpffs path of its pinned link.
///
/// Why pinned links: a link lives as long as its pin, not as long as the agent. An agent
/// that stops (a DaemonSet rolling update, a crash) leaves the datapath running on the
/// pinned maps; the next agent finds the pins and swaps its freshly loaded programs into
/// the same links atomically (bpf_link_update), so no packet meets a detached hook.
/// `lb-agent cleanup` removes the pins, which detaches everything.
#[derive(Default)]
struct Attached {
    xdp: Vec<(String, PathBuf)>,
    tc_uplink: Option<(String, PathBuf)>,
    /// Pod-facing interfaces by ifindex: the filter belongs to the index, and a pod
    /// interface re-created under the same name is a new attachment.
    tc_pods: BTreeMap<u32, (String, PathBuf)>,
    sock: Vec<PathBuf>,
}

/// Subdirectory of the pin directory holding the pinned links.
pub const LINKS_DIR: &str = "links";

/// Takes a pinned link out of bpffs (the returned fd keeps it attached until dropped or
/// pinned again). None when there is no such pin.
fn unpin_link(path: &Path) -> Option<FdLink> {
    let pinned = PinnedLink::from_pin(path).ok()?;
    match pinned.unpin() {
        Ok(fd) => Some(fd),
        Err(e) => {
            log::warn!("unpinning {}: {e}", path.display());
            None
        }
    }
}

/// Which programs [`Datapath::load_with`] verifies before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Every program of the object (tests and tools run any of them).
    All,
    /// What every node attaches (tc, socket hooks); an XDP program when
    /// [`Datapath::attach_xdp`] picks it (still during the agent's start, so a program
    /// the kernel rejects fails the start as before). A veth uplink (kind) runs no XDP,
    /// and a node runs one of the two XDP programs at most: their verification (~0.2 s
    /// of CPU each) is skipped where they are not used.
    NodeAttached,
}

/// Loads (verifies) the programs of the object `which` names, on all CPUs: the verifier
/// takes ~1 s of CPU for the large programs, one after another, which was most of an
/// agent's start (the maps are not programmed before the programs are in). The programs
/// are independent, so each is verified on a thread of its own.
fn verify_all(ebpf: &mut Ebpf, which: Verify) -> Result<()> {
    // Largest first, so that a thread per CPU taking the next program when done ends
    // them together.
    let xdp = [PROG_XDP, PROG_XDP_MB, PROG_XDP_PASS];
    let expected: Vec<&str> = [
        PROG_XDP,
        PROG_XDP_MB,
        PROG_TC_UPLINK,
        PROG_TC_POD,
        PROG_XDP_PASS,
    ]
    .into_iter()
    .chain(SOCK_PROGRAMS)
    .filter(|name| which == Verify::All || !xdp.contains(name))
    .collect();
    let mut progs: Vec<(&str, &mut aya::programs::Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| expected.contains(name))
        .collect();
    for name in &expected {
        if !progs.iter().any(|(n, _)| n == name) {
            bail!("program {name} missing from the eBPF object");
        }
    }
    progs.sort_by_key(|(name, _)| expected.iter().position(|e| e == name));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(progs.len());
    let queue = std::sync::Mutex::new(progs.into_iter());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let Some((name, prog)) = queue.lock().expect("queue").next() else {
                            return Ok(());
                        };
                        verify(name, prog)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("verifier thread"))
    })
}

/// Loads one program as the type its section gives it.
fn verify(name: &str, prog: &mut aya::programs::Program) -> Result<()> {
    use aya::programs::Program;
    match prog {
        Program::Xdp(p) => p.load(),
        Program::SchedClassifier(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        other => bail!("program {name}: unexpected type {:?}", other.prog_type()),
    }
    .with_context(|| format!("verifying {name}"))
}

impl Datapath {
    /// [`Datapath::load_with`], every program verified.
    pub fn load(pin_dir: &Path, limits: &Limits) -> Result<Self> {
        Self::load_with(pin_dir, limits, Verify::All)
    }

    /// Loads the object with its maps pinned under `pin_dir` (reused if already pinned),
    /// and verifies the programs `verify` names.
    pub fn load_with(pin_dir: &Path, limits: &Limits, verify: Verify) -> Result<Self> {
        if EBPF_OBJECT.is_empty() {
            bail!("the eBPF object was not built (AYA_BUILD_SKIP was set at build time)");
        }
        ensure_bpffs()?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        // Every map's size, for the maps created now and to check the pinned ones against
        // (aya would reuse a pinned map of any size: see pins.rs).
        let capacities = super::pins::capacities(limits)?;
        check_pinned_layout(pin_dir)?;
        super::pins::check_capacities(pin_dir, &capacities)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for c in &capacities {
            loader.map_max_entries(c.map, c.max_entries);
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object")?;
        let mut dp = Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            attached: Attached::default(),
        };
        // Verified up front, whatever gets attached later: a program the kernel rejects is
        // a build problem and must fail the start, not a later attach (the agent's XDP
        // program is verified by the attach its start makes: `Verify::NodeAttached`).
        verify_all(&mut dp.ebpf, verify)?;
        Ok(dp)
    }

    fn program_mut(&mut self, name: &str) -> Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))
    }

    /// The XDP program `name`, loaded (verified) on first use.
    pub fn xdp(&mut self, name: &str) -> Result<&mut Xdp> {
        let prog: &mut Xdp = self.program_mut(name)?.try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        Ok(prog)
    }

    /// Attaches the XDP program to a node uplink, or none; returns the mode and why it is
    /// that one (for `lb-agent status`). `Auto` picks native mode except on veth: a veth
    /// delivers native XDP_TX frames only when its peer runs XDP too, and on a kind node the
    /// peer lives in the host, out of our reach; of what is left there, generic XDP (an skb
    /// already built, copied to get XDP's headroom, GSO packets linearized whole) measured
    /// no faster in packets per second than tc ingress alone (`xlb-bench --only pps`), so a
    /// veth gets no XDP. `iface_is_veth` comes from the link kind
    /// (netinfo::list_links). The uplink's tc program must be attached first: it is what
    /// serves the traffic while no XDP program is attached.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        choice: XdpModeChoice,
        iface_is_veth: bool,
    ) -> Result<(XdpAttachMode, String)> {
        // A link left by the previous agent: swap the new program in, keeping its mode.
        for (mode, tag) in [
            (XdpAttachMode::Native, "native"),
            (XdpAttachMode::Generic, "generic"),
        ] {
            let path = self.link_path(&format!("xdp-{tag}-{iface}"));
            let wanted = match choice {
                // A previous agent's link is kept when it is what auto picks now.
                XdpModeChoice::Auto => !iface_is_veth,
                XdpModeChoice::Off => false,
                XdpModeChoice::Native => mode == XdpAttachMode::Native,
                XdpModeChoice::Generic => mode == XdpAttachMode::Generic,
            };
            let Some(fd) = unpin_link(&path) else {
                continue;
            };
            if !wanted {
                drop(fd); // the user asked for the other mode: detach and attach anew
                continue;
            }
            match self.replace_xdp(fd, &path, mode) {
                Ok(()) => {
                    log::info!("XDP on {iface}: replaced the program in the pinned {tag} link");
                    self.attached.xdp.push((iface.to_owned(), path));
                    return Ok((
                        mode,
                        format!("kept from the previous agent's pinned {tag} link"),
                    ));
                }
                Err(e) => log::warn!("pinned XDP link on {iface} unusable ({e:#}); attaching anew"),
            }
        }
        match choice {
            XdpModeChoice::Off => {
                return Ok((
                    XdpAttachMode::Off,
                    "--xdp-mode off: tc ingress only".to_string(),
                ));
            }
            XdpModeChoice::Auto if iface_is_veth => {
                return Ok((
                    XdpAttachMode::Off,
                    "auto: a veth uplink gets tc ingress only (native XDP_TX frames arrive \
                     only when the peer runs XDP, not so on kind; generic XDP measured no \
                     faster than tc and copies GSO packets whole to linearize them)"
                        .to_string(),
                ));
            }
            _ => {}
        }
        let prefer_native = choice != XdpModeChoice::Generic;
        let mut why = match choice {
            XdpModeChoice::Native => "--xdp-mode native".to_string(),
            XdpModeChoice::Generic => "--xdp-mode generic".to_string(),
            _ => "auto: not a veth, native first".to_string(),
        };
        let mut attached = None;
        if prefer_native {
            let prog = self.xdp(PROG_XDP_MB)?;
            match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => attached = Some((id, XdpAttachMode::Native, "native")),
                Err(e) if choice == XdpModeChoice::Native => {
                    return Err(e).with_context(|| format!("attaching XDP (native) to {iface}"));
                }
                Err(e) => {
                    log::warn!("native XDP on {iface} failed ({e}); falling back to generic");
                    why = format!("auto: native XDP failed on this driver ({e})");
                }
            }
        }
        let (id, mode, tag) = match attached {
            Some(a) => a,
            None => (
                self.xdp(PROG_XDP)?
                    .attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP (generic) to {iface}"))?,
                XdpAttachMode::Generic,
                "generic",
            ),
        };
        let link = self.xdp(xdp_program(mode))?.take_link(id)?;
        let path = self.link_path(&format!("xdp-{tag}-{iface}"));
        self.pin(
            FdLink::try_from(link).context("XDP attached without a bpf_link")?,
            &path,
        )?;
        self.attached.xdp.push((iface.to_owned(), path));
        Ok((mode, why))
    }

    fn replace_xdp(&mut self, fd: FdLink, path: &Path, mode: XdpAttachMode) -> Result<()> {
        let link = XdpLink::try_from(fd)?;
        let prog = self.xdp(xdp_program(mode))?;
        let id = prog.attach_to_link(link)?;
        let link = prog.take_link(id)?;
        self.pin(FdLink::try_from(link)?, path)
    }

    fn link_path(&self, name: &str) -> PathBuf {
        self.pin_dir.join(LINKS_DIR).join(name)
    }

    fn pin(&self, fd: FdLink, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(path);
        fd.pin(path)
            .with_context(|| format!("pinning link {}", path.display()))?;
        Ok(())
    }

    /// Attaches `prog` to the ingress of `iface` through the pinned link `pin_name`,
    /// swapping the program into a link the previous agent left there.
    fn attach_tc(&mut self, prog: &str, iface: &str, pin_name: &str) -> Result<PathBuf> {
        let path = self.link_path(pin_name);
        if let Some(fd) = unpin_link(&path) {
            let replaced = (|| -> Result<()> {
                let link = SchedClassifierLink::try_from(fd)?;
                let p: &mut SchedClassifier = self.program_mut(prog)?.try_into()?;
                let id = p.attach_to_link(link)?;
                let link = p.take_link(id)?;
                self.pin(FdLink::try_from(link)?, &path)
            })();
            match replaced {
                Ok(()) => {
                    log::info!("{prog} on {iface}: replaced the program in the pinned link");
                    return Ok(path);
                }
                Err(e) => {
                    log::warn!("pinned {prog} link on {iface} unusable ({e:#}); attaching anew")
                }
            }
        }
        // Kernels before 6.6 attach through a clsact qdisc (newer ones use tcx and ignore
        // it). Fails with EEXIST when the qdisc is already there; a real failure shows in
        // attach.
        let _ = tc::qdisc_add_clsact(iface);
        let p: &mut SchedClassifier = self.program_mut(prog)?.try_into()?;
        let id = p
            .attach(iface, TcAttachType::Ingress)
            .with_context(|| format!("attaching {prog} to the ingress of {iface}"))?;
        let link = p.take_link(id)?;
        // tcx links (kernel >= 6.6) can be pinned; a netlink filter (older kernels) cannot
        // and then simply lives with the interface.
        match FdLink::try_from(link) {
            Ok(fd) => self.pin(fd, &path)?,
            Err(_) => log::warn!("{prog} on {iface} is a netlink filter: it cannot be pinned"),
        }
        Ok(path)
    }

    /// Attaches the uplink's tc program (packets XDP passed on) to the uplink's ingress.
    pub fn attach_tc_uplink(&mut self, iface: &str) -> Result<()> {
        if self.attached.tc_uplink.is_some() {
            bail!("{PROG_TC_UPLINK} is already attached");
        }
        let path = self.attach_tc(PROG_TC_UPLINK, iface, &format!("tc-uplink-{iface}"))?;
        self.attached.tc_uplink = Some((iface.to_owned(), path));
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
        let path = self.attach_tc(PROG_TC_POD, iface, &format!("tc-pod-{ifindex}"))?;
        self.attached
            .tc_pods
            .insert(ifindex, (iface.to_owned(), path));
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
        let Some((name, path)) = self.attached.tc_pods.remove(&ifindex) else {
            return;
        };
        // Dropping the unpinned link detaches it (a no-op when the interface is gone).
        drop(unpin_link(&path));
        log::debug!("{PROG_TC_POD} detached from {name} ({ifindex})");
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
        // cgroup links cannot swap programs: attach the new set next to the old one (the
        // old programs translate, the new ones then see backend addresses and pass), then
        // drop the old set, so there is no moment without translation.
        let mut fresh = Vec::new();
        let mut attach_all = || -> Result<()> {
            for name in SOCK_PROGRAMS {
                let prog: &mut CgroupSockAddr = self.program_mut(name)?.try_into()?;
                // Single is the only mode a cgroup bpf_link accepts (the kernel rejects
                // flags on link_create); such links always stack, so other tools' programs
                // on the same cgroup keep running next to ours.
                let id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .with_context(|| format!("attaching {name} to {}", path.display()))?;
                let link = prog.take_link(id)?;
                fresh.push((
                    name,
                    FdLink::try_from(link).context("cgroup program attached without a bpf_link")?,
                ));
            }
            Ok(())
        };
        attach_all()?; // on error the fresh links are dropped, i.e. detached
        for (name, fd) in fresh {
            let final_path = self.link_path(&format!("cgroup-{name}"));
            let old = unpin_link(&final_path);
            self.pin(fd, &final_path)?;
            drop(old);
            self.attached.sock.push(final_path);
        }
        Ok(())
    }
}

/// Key and value sizes of every map, from the shared types: what a pinned map must have
/// for this agent to reuse it.
fn expected_layout() -> Vec<(&'static str, usize, usize)> {
    use std::mem::size_of;
    vec![
        (
            MAP_FRONTENDS,
            size_of::<FrontendKey>(),
            size_of::<Frontend>(),
        ),
        (MAP_SERVICES, 4, size_of::<Service>()),
        (MAP_BACKENDS, 4, size_of::<Backend>()),
        (MAP_MAGLEV, 4, 8),
        (MAP_CT, size_of::<FlowKey>(), size_of::<CtEntry>()),
        (MAP_CT_NEW, size_of::<FlowKey>(), size_of::<CtEntry>()),
        (MAP_REVNAT, size_of::<FlowKey>(), size_of::<RevNat>()),
        (MAP_CONFIG, 4, size_of::<Config>()),
        (MAP_COUNTERS, 4, 8),
        (MAP_SVC_STATS, 4, size_of::<SvcStats>()),
        (MAP_SVC_META, 4, size_of::<SvcMeta>()),
        (MAP_CLUSTER_IPS, 4, 4),
        (
            MAP_SOCK_REVNAT,
            size_of::<SockRevKey>(),
            size_of::<SockRev>(),
        ),
        (
            MAP_AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<Affinity>(),
        ),
        (MAP_SRC_RANGES, 4 + size_of::<SrcRangeKey>(), 1),
    ]
}

/// A new agent version whose maps differ from the pinned ones must not reuse them: the
/// kernel would hand its programs values of the old shape. Refuse with what to do instead.
/// Counter arrays that grew (new counters appended) are the one change that migrates by
/// itself: aya recreates nothing, so a too-small COUNTERS map is refused too.
fn check_pinned_layout(pin_dir: &Path) -> Result<()> {
    for (name, key, value) in expected_layout() {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapData::from_pin(&path)
            .and_then(|m| m.info())
            .with_context(|| format!("reading pinned map {}", path.display()))?;
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if k != key || v != value {
            bail!(
                "pinned map {} has key/value sizes {k}/{v}, this agent needs {key}/{value}: it \
                 was left by an agent with another map layout. Run the matching agent version, \
                 or `lb-agent cleanup` to start afresh (established flows through xlb end)",
                path.display()
            );
        }
        if name == MAP_COUNTERS && info.max_entries() < COUNTER_COUNT {
            bail!(
                "pinned map {} holds {} counters, this agent needs {COUNTER_COUNT}: run \
                 `lb-agent cleanup` to start afresh",
                path.display(),
                info.max_entries()
            );
        }
    }
    Ok(())
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links_detached: usize,
    pub maps_unpinned: usize,
    pub run_dir_removed: bool,
}

/// `lb-agent cleanup`: detaches every program the agent pinned and removes its maps and
/// run-time files. Established flows through xlb end with it.
pub fn cleanup(pin_dir: &Path, run_dir: &Path) -> Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let links = pin_dir.join(LINKS_DIR);
    if let Ok(rd) = std::fs::read_dir(&links) {
        for e in rd.flatten() {
            // Unpinning drops the last reference: the kernel detaches the program.
            if unpin_link(&e.path()).is_some() {
                report.links_detached += 1;
            } else {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&links);
    }
    if let Ok(rd) = std::fs::read_dir(pin_dir) {
        for e in rd.flatten() {
            std::fs::remove_file(e.path())
                .with_context(|| format!("unpinning {}", e.path().display()))?;
            report.maps_unpinned += 1;
        }
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    }
    if run_dir.exists() {
        std::fs::remove_dir_all(run_dir)
            .with_context(|| format!("removing {}", run_dir.display()))?;
        report.run_dir_removed = true;
    }
    Ok(report)
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
    .context(
        "mounting bpffs at /sys/fs/bpf (an agent without CAP_SYS_ADMIN, as the DaemonSet's, \
         needs it mounted on the host first: `mount -t bpf bpf /sys/fs/bpf`, which systemd \
         does at boot)",
    )?;
    Ok(())
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
