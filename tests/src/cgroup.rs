//! cgroup v2 plumbing: one cgroup per simulated node, so the agent's socket-level programs
//! (cgroup/connect4, sendmsg4, recvmsg4, getpeername4) apply to that node's own processes
//! and to nothing else on the machine.
//!
//! Harness cgroups live directly under the cgroup2 mount and are named like the
//! namespaces, `xlb-<pid>x<n>-<role>`, so the stale sweep can tell whether their creator is
//! still alive. Nothing here ever writes to a cgroup that is not named that way.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::{NETNS_PREFIX, netns_owner_pid};

/// How long removing a cgroup waits for its killed processes to leave it.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(5);

/// Unescapes the octal escapes (`\040` for a space, ...) the kernel uses in
/// /proc/self/mounts fields.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first cgroup2 mount point listed in a /proc/self/mounts text.
fn find_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let _source = fields.next()?;
        let target = fields.next()?;
        let fstype = fields.next()?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
    })
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` on a pure v2 machine,
/// `/sys/fs/cgroup/unified` on a hybrid one), from /proc/self/mounts.
pub fn cgroup2_mount() -> Result<PathBuf> {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(m) = MOUNT.get() {
        return Ok(m.clone());
    }
    let mounts =
        std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    let mount = find_cgroup2_mount(&mounts)
        .context("cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mounts)")?;
    Ok(MOUNT.get_or_init(|| mount).clone())
}

/// `<cgroup2 mount>/<name>` for a harness cgroup name (`xlb-<pid>x<n>-<role>`); anything
/// else is refused so no code path can reach a cgroup the harness does not own.
pub(crate) fn harness_cgroup_path(name: &str) -> Result<PathBuf> {
    if name.contains('/') || netns_owner_pid(name).is_none() {
        bail!("invalid harness cgroup name {name:?} (expected {NETNS_PREFIX}<pid>x<n>-<role>)");
    }
    Ok(cgroup2_mount()?.join(name))
}

/// Creates the harness cgroup `name` directly under the cgroup2 mount and returns its path.
pub(crate) fn create_cgroup(name: &str) -> Result<PathBuf> {
    let path = harness_cgroup_path(name)?;
    std::fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
    Ok(path)
}

/// Checks that `path` is a harness cgroup: a directory named `xlb-<pid>x…` directly under
/// the cgroup2 mount.
fn check_harness_cgroup(path: &Path) -> Result<()> {
    let mount = cgroup2_mount()?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("bad cgroup path {}", path.display()))?;
    if path.parent() != Some(mount.as_path()) || harness_cgroup_path(name)? != path {
        bail!(
            "refusing to touch {}: not a harness cgroup under {}",
            path.display(),
            mount.display()
        );
    }
    Ok(())
}

/// Pids listed in `<cgroup>/cgroup.procs` (empty if the cgroup is gone).
pub fn cgroup_pids(cgroup: &Path) -> Result<Vec<u32>> {
    let file = cgroup.join("cgroup.procs");
    match std::fs::read_to_string(&file) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", file.display())),
    }
}

/// SIGKILLs every process in `dir` and in the cgroups below it.
fn kill_tree(dir: &Path) {
    let me = std::process::id();
    // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, also processes that
    // fork meanwhile.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_tree(&e.path());
            }
        }
    }
    for pid in cgroup_pids(dir).unwrap_or_default() {
        if pid == me {
            continue;
        }
        if let Ok(raw) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
        }
    }
}

/// Removes `dir` and the cgroups below it (deepest first); each must be empty by now.
fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Kills every process in the harness cgroup at `path` (and in any cgroup below it), then
/// removes it, retrying while the killed processes are still on their way out. A cgroup
/// that is already gone is not an error. Refuses paths that are not harness cgroups.
pub fn delete_cgroup(path: &Path) -> Result<()> {
    check_harness_cgroup(path)?;
    if !path.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + RMDIR_TIMEOUT;
    loop {
        kill_tree(path);
        match rmdir_tree(path) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| {
                    format!(
                        "removing cgroup {} (pids still inside: {:?})",
                        path.display(),
                        cgroup_pids(path).unwrap_or_default()
                    )
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Harness cgroups (`xlb-<pid>x…`) directly under the cgroup2 mount, whoever made them.
/// Empty if cgroup v2 is not mounted.
pub fn list_cgroups() -> Result<Vec<PathBuf>> {
    let Ok(mount) = cgroup2_mount() else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for e in std::fs::read_dir(&mount).with_context(|| format!("listing {}", mount.display()))? {
        let e = e.with_context(|| format!("listing {}", mount.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if netns_owner_pid(&name).is_some() && e.file_type().is_ok_and(|t| t.is_dir()) {
            found.push(e.path());
        }
    }
    found.sort();
    Ok(found)
}

/// An open `<cgroup>/cgroup.procs`, for a child to move itself into between fork and exec.
pub(crate) struct CgroupJoin {
    procs: File,
}

impl CgroupJoin {
    pub(crate) fn open(cgroup: &Path) -> Result<Self> {
        check_harness_cgroup(cgroup)?;
        let path = cgroup.join("cgroup.procs");
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { procs })
    }

    /// Moves the calling process into the cgroup. Async-signal-safe (no allocation), for
    /// use in `pre_exec`.
    pub(crate) fn join_self(&self) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut buf = [0u8; 12];
        let mut n = std::process::id();
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        // One write(2) per pid, as cgroup.procs expects.
        (&self.procs).write(&buf[i..]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let escaped = "none /mnt/my\\040cg cgroup2 rw 0 0\n";
        assert_eq!(
            find_cgroup2_mount(escaped),
            Some(PathBuf::from("/mnt/my cg"))
        );
        assert_eq!(
            find_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"),
            None
        );
    }

    #[test]
    fn refuses_foreign_cgroups() {
        if cgroup2_mount().is_err() {
            return;
        }
        assert!(harness_cgroup_path("system.slice").is_err());
        assert!(harness_cgroup_path("xlb-1x0-node-a/../..").is_err());
        assert!(harness_cgroup_path("xlb-1x0-node-a").is_ok());
        let mount = cgroup2_mount().unwrap();
        assert!(delete_cgroup(&mount).is_err());
        assert!(delete_cgroup(&mount.join("init.scope")).is_err());
        assert!(delete_cgroup(&mount.join("xlb-1x0-a").join("xlb-1x0-b")).is_err());
        assert!(delete_cgroup(Path::new("/tmp/xlb-1x0-a")).is_err());
    }
}
