//! Which cgroup gets the socket programs (`--cgroup`, `--allow-cgroup-root`).
//!
//! A cgroup's socket hooks act on every process in it and below, whatever its network
//! namespace. Hooked at the machine's cgroup2 root, they send every connection of the
//! machine to this agent's services; an agent that is not the machine's load balancer (a
//! test network, `ip netns exec`, a pid or cgroup namespace) must never do that. So:
//!
//! - `--cgroup PATH`: that cgroup, except the machine's cgroup2 root, which also needs
//!   `--allow-cgroup-root` (the DaemonSet's agent is the node's load balancer and says so);
//! - `--cgroup none`: no socket programs;
//! - by default (`auto`): the cgroup2 mount point the agent sees — on a kind node or in a
//!   container with its own cgroup namespace, that namespace's root — only when
//!   [`decide_auto`] can tell that it belongs to the agent's node: not the machine's root
//!   (unless allowed), every process in it visible, and its first process (the oldest:
//!   the node's init) in the agent's network namespace. Anything else is "off", with the
//!   reason logged. Nothing depends on pid 1, which a pid namespace makes the agent's own.
//!
//! The machine's root is the cgroup2 directory without a `cgroup.type` file (the kernel
//! gives every cgroup but the root one), so neither a cgroup namespace nor a bind mount
//! hides it.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};

/// `--cgroup`'s help, shown by `lb-agent run --help` (set on the flag by [`CgroupFlags`]).
pub const CGROUP_HELP: &str = "cgroup v2 directory whose processes get socket-level load \
balancing (connect, sendmsg, recvmsg, getpeername hooks), `none`, or `auto` [default: auto: \
the cgroup2 mount point when it belongs to the agent's node: not the machine's cgroup2 \
root, and its first process in the agent's network namespace; else off]. The machine's \
cgroup2 root also needs --allow-cgroup-root";

/// The flag that goes with `--cgroup` (flattened after the agent's `RunArgs`, whose
/// `--cgroup` help it replaces).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(mut_arg("cgroup", |a| a.help(CGROUP_HELP).value_name("PATH|auto|none")))]
pub struct CgroupFlags {
    /// Let the socket programs attach to the machine's cgroup2 root (every process of the
    /// machine, in every network namespace): only for the agent that is the machine's
    /// load balancer, e.g. the DaemonSet's with the host's /sys/fs/cgroup mounted.
    #[arg(long)]
    pub allow_cgroup_root: bool,
}

/// A network namespace: the device and inode of its `/proc/<pid>/ns/net`.
pub type NetnsId = (u64, u64);

/// A process of the candidate cgroup, as the agent sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    /// Start time (clock ticks since boot, `/proc/<pid>/stat` field 22).
    pub start: u64,
    /// None: unreadable (gone, or not ours to inspect).
    pub netns: Option<NetnsId>,
}

/// What [`decide_auto`] decides from, gathered by [`facts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub path: PathBuf,
    /// The root of the whole cgroup2 hierarchy: every process of the machine.
    pub machine_root: bool,
    /// Processes in it and below that the agent can see.
    pub procs: Vec<Proc>,
    /// Processes in it that the agent cannot see (outside its pid namespace: listed as 0).
    pub hidden: usize,
    pub own_pid: u32,
    pub own_netns: NetnsId,
}

/// Where the socket programs go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Attach(PathBuf),
    /// Socket load balancing off, and why.
    Off(String),
}

/// The default's decision (see the module's documentation).
pub fn decide_auto(f: &Facts, allow_root: bool) -> Decision {
    let p = f.path.display();
    if f.machine_root && !allow_root {
        return Decision::Off(format!(
            "{p} is the machine's cgroup2 root (every process of the machine, in every network \
             namespace); pass --cgroup <PATH> for the node's cgroup, or --allow-cgroup-root if \
             this agent is the machine's load balancer"
        ));
    }
    if f.hidden > 0 {
        return Decision::Off(format!(
            "{} processes of {p} are outside the agent's pid namespace: it cannot tell whose \
             cgroup this is; pass --cgroup <PATH> to choose",
            f.hidden
        ));
    }
    let first = f
        .procs
        .iter()
        .filter(|q| q.pid != f.own_pid)
        .min_by_key(|q| (q.start, q.pid));
    let Some(first) = first else {
        return Decision::Off(format!(
            "only the agent itself is in {p} (its own container's cgroup); pass --cgroup <PATH> \
             (e.g. the host's cgroup2 mount) to choose"
        ));
    };
    match first.netns {
        Some(ns) if ns == f.own_netns => Decision::Attach(f.path.clone()),
        Some(_) => Decision::Off(format!(
            "the first process of {p} (pid {}) is in another network namespace than the agent: \
             the agent is not that node's load balancer (a test network, `ip netns exec`); \
             pass --cgroup <PATH> to choose",
            first.pid
        )),
        None => Decision::Off(format!(
            "the network namespace of the first process of {p} (pid {}) cannot be read; pass \
             --cgroup <PATH> to choose",
            first.pid
        )),
    }
}

/// An explicit `--cgroup PATH`: used as given, except the machine's root without
/// `allow_root`, which is refused (the agent does not start).
pub fn decide_explicit(path: &Path, machine_root: bool, allow_root: bool) -> Result<PathBuf> {
    if machine_root && !allow_root {
        bail!(
            "--cgroup {}: this is the machine's cgroup2 root; socket programs there act on every \
             process of the machine, in every network namespace. Pass --allow-cgroup-root as \
             well if this agent is the machine's load balancer (as the DaemonSet's is), or name \
             the node's cgroup below it",
            path.display()
        );
    }
    Ok(path.to_owned())
}

/// Whether `path` is the root of the cgroup2 hierarchy: a cgroup directory (it has
/// `cgroup.procs`) without `cgroup.type`, which the kernel gives every cgroup but the root.
pub fn is_machine_root(path: &Path) -> bool {
    path.join("cgroup.procs").is_file() && !path.join("cgroup.type").exists()
}

/// `--cgroup` and `--allow-cgroup-root`, resolved: the cgroup to attach to, or None (off,
/// with the reason logged). Errors refuse the start.
pub fn resolve(arg: Option<&str>, allow_root: bool) -> Result<Option<PathBuf>> {
    match arg {
        Some("none") => return Ok(None),
        Some("auto") | None => {}
        Some(path) => {
            let path = Path::new(path);
            return decide_explicit(path, is_machine_root(path), allow_root).map(Some);
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some(mount) = crate::dataplane::datapath::cgroup2_mount(&mounts) else {
        log::warn!("socket load balancing off: no cgroup2 file system is mounted");
        return Ok(None);
    };
    match facts(&mount) {
        Ok(f) => match decide_auto(&f, allow_root) {
            Decision::Attach(p) => {
                log::info!(
                    "--cgroup auto: {} (its first process shares the agent's network namespace)",
                    p.display()
                );
                Ok(Some(p))
            }
            Decision::Off(why) => {
                log::info!("socket load balancing off (--cgroup auto): {why}");
                Ok(None)
            }
        },
        Err(e) => {
            log::info!(
                "socket load balancing off (--cgroup auto): {e:#}; pass --cgroup <PATH> to choose"
            );
            Ok(None)
        }
    }
}

/// Reads what [`decide_auto`] needs about `path` (a cgroup2 directory) and the agent.
pub fn facts(path: &Path) -> Result<Facts> {
    use anyhow::Context as _;
    let own_netns = netns_of("self").context("reading the agent's network namespace")?;
    let mut procs = vec![];
    let mut hidden = 0;
    // The cgroup and its descendants; bounded, a node has far fewer.
    let mut dirs = vec![path.to_owned()];
    let mut seen_dirs = 0;
    while let Some(dir) = dirs.pop() {
        seen_dirs += 1;
        if seen_dirs > 100_000 {
            bail!("{} has too many cgroups to inspect", path.display());
        }
        let list = std::fs::read_to_string(dir.join("cgroup.procs"))
            .with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
        for pid in list.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if pid == 0 {
                hidden += 1;
                continue;
            }
            // A process that exited meanwhile is simply not counted.
            if let Some(start) = start_time(pid) {
                procs.push(Proc {
                    pid,
                    start,
                    netns: netns_of(&pid.to_string()),
                });
            }
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            dirs.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(Facts {
        path: path.to_owned(),
        machine_root: is_machine_root(path),
        procs,
        hidden,
        own_pid: std::process::id(),
        own_netns,
    })
}

fn netns_of(pid: &str) -> Option<NetnsId> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    Some((m.dev(), m.ino()))
}

/// Field 22 of /proc/<pid>/stat (after the command, which may hold spaces and parens).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields 3.. follow the command: the start time is the 20th of them.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: NetnsId = (4, 4026531840);
    const TEST_NET: NetnsId = (4, 4026532999);

    fn facts(machine_root: bool, procs: &[(u32, u64, Option<NetnsId>)], hidden: usize) -> Facts {
        Facts {
            path: PathBuf::from("/sys/fs/cgroup"),
            machine_root,
            procs: procs
                .iter()
                .map(|&(pid, start, netns)| Proc { pid, start, netns })
                .collect(),
            hidden,
            own_pid: 4242,
            own_netns: TEST_NET,
        }
    }

    fn off(d: Decision) -> String {
        match d {
            Decision::Off(why) => why,
            Decision::Attach(p) => panic!("attached to {}", p.display()),
        }
    }

    #[test]
    fn the_machine_root_needs_the_flag() {
        // An agent in a test network on a host: the cgroup2 mount is the machine's root.
        let f = facts(true, &[(1, 10, Some(HOST)), (4242, 900, Some(TEST_NET))], 0);
        let why = off(decide_auto(&f, false));
        assert!(why.contains("machine's cgroup2 root"), "{why}");
        assert!(why.contains("--allow-cgroup-root"), "{why}");
        // Even allowed, the machine is not this agent's node.
        let why = off(decide_auto(&f, true));
        assert!(why.contains("another network namespace"), "{why}");
        // The host's own agent, allowed.
        let host = Facts {
            own_netns: HOST,
            ..f.clone()
        };
        assert!(matches!(decide_auto(&host, false), Decision::Off(_)));
        assert_eq!(
            decide_auto(&host, true),
            Decision::Attach(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn a_pid_namespace_does_not_fool_it() {
        // Inside a new pid namespace in a test network, on a cgroup namespace root (a
        // container): the agent sees only its own namespace's processes, the rest are 0s.
        // pid 1 there is in the agent's network namespace, which fooled the old check.
        let f = facts(
            false,
            &[(1, 500, Some(TEST_NET)), (4242, 900, Some(TEST_NET))],
            37,
        );
        let why = off(decide_auto(&f, false));
        assert!(why.contains("37 processes"), "{why}");
        assert!(
            matches!(decide_auto(&f, true), Decision::Off(_)),
            "allowed or not"
        );
    }

    #[test]
    fn the_first_process_decides_the_node() {
        // A kind node (its own cgroup namespace): the node's init is the oldest process and
        // shares the hostNetwork agent's namespace; pods have their own.
        let kind = Facts {
            own_netns: HOST,
            ..facts(
                false,
                &[
                    (300, 50, Some(TEST_NET)),
                    (1, 10, Some(HOST)),
                    (4242, 900, Some(HOST)),
                ],
                0,
            )
        };
        assert_eq!(
            decide_auto(&kind, false),
            Decision::Attach(PathBuf::from("/sys/fs/cgroup"))
        );
        // A container running the tests: its init is in the container's namespace, the
        // agent in a test network's.
        let ci = facts(
            false,
            &[(1, 10, Some(HOST)), (4242, 900, Some(TEST_NET))],
            0,
        );
        assert!(off(decide_auto(&ci, false)).contains("pid 1"));
        // Same start time: the lower pid is the first.
        let tie = facts(false, &[(7, 10, Some(HOST)), (3, 10, Some(TEST_NET))], 0);
        assert_eq!(
            decide_auto(&tie, false),
            Decision::Attach(PathBuf::from("/sys/fs/cgroup"))
        );
        // Unreadable: off.
        let unreadable = facts(false, &[(1, 10, None)], 0);
        assert!(off(decide_auto(&unreadable, false)).contains("cannot be read"));
    }

    #[test]
    fn the_agents_own_container_is_not_worth_hooking() {
        let own = facts(false, &[(4242, 900, Some(TEST_NET))], 0);
        assert!(off(decide_auto(&own, false)).contains("only the agent itself"));
        let empty = facts(false, &[], 0);
        assert!(matches!(decide_auto(&empty, false), Decision::Off(_)));
    }

    #[test]
    fn explicit_paths() {
        let p = Path::new("/host/sys/fs/cgroup");
        let e = decide_explicit(p, true, false).unwrap_err().to_string();
        assert!(e.contains("--cgroup /host/sys/fs/cgroup"), "{e}");
        assert!(e.contains("--allow-cgroup-root"), "{e}");
        assert_eq!(decide_explicit(p, true, true).unwrap(), p);
        let node = Path::new("/sys/fs/cgroup/xlb-1x0-node-worker");
        assert_eq!(decide_explicit(node, false, false).unwrap(), node);
    }

    #[test]
    fn resolve_none_and_explicit() {
        assert_eq!(resolve(Some("none"), true).unwrap(), None);
        // Not a cgroup at all: passed on (attaching says what is wrong with it).
        let dir = std::env::temp_dir();
        assert_eq!(
            resolve(Some(dir.to_str().unwrap()), false).unwrap(),
            Some(dir.clone())
        );
    }

    #[test]
    fn this_machine() {
        // Whatever this machine is, the facts of its cgroup2 mount are readable.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let Some(mount) = crate::dataplane::datapath::cgroup2_mount(&mounts) else {
            return;
        };
        if is_machine_root(&mount) {
            // The root has no cgroup.type, and a cgroup below it does.
            assert!(!mount.join("cgroup.type").exists());
            assert!(mount.join("cgroup.procs").is_file());
        }
        let f = super::facts(&mount).unwrap();
        assert!(!f.procs.is_empty() || f.hidden > 0);
        assert_eq!(f.own_pid, std::process::id());
        assert!(start_time(std::process::id()).is_some());
    }
}
