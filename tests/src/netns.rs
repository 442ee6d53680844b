//! Network-namespace plumbing: running code and commands inside a named
//! namespace, and finding/removing namespaces left behind by dead harnesses.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Every namespace the harness creates starts with this, followed by the
/// creating process's pid; [`sweep_stale_namespaces`] relies on that shape.
pub const NETNS_PREFIX: &str = "xlb-";

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_DIR: &str = "/run/netns";

fn netns_path(netns: &str) -> Result<PathBuf> {
    if netns.is_empty() || netns.contains('/') || netns == "." || netns == ".." {
        bail!("invalid network namespace name {netns:?}");
    }
    Ok(PathBuf::from(NETNS_DIR).join(netns))
}

/// Runs `f` on a fresh thread that has joined the network namespace
/// `/run/netns/<netns>`, and returns its result.
///
/// Only that thread switches namespace (network namespaces are per-thread),
/// so the caller and the rest of the process stay where they are. Sockets
/// created inside `f` belong to `netns` for their whole life, even if they
/// are returned out of it. A panic in `f` is resumed on the caller.
///
/// Panics if the namespace cannot be entered; see [`try_in_netns`].
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    try_in_netns(netns, f).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Like [`in_netns`], but reports a namespace that cannot be entered as an
/// error instead of panicking.
pub fn try_in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(netns)?;
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns:{netns}"))
            .spawn_scoped(scope, move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into {}", path.display()))?;
                Ok(f())
            })
            .context("spawning namespace thread")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `argv` inside `netns` via `ip netns exec` and returns its output,
/// whatever its exit status (callers may expect failures). Errors only if the
/// command cannot be started.
pub fn exec_in(netns: &str, argv: &[&str]) -> Result<Output> {
    if argv.is_empty() {
        bail!("exec_in({netns}): empty command");
    }
    netns_path(netns)?;
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(argv)
        .output()
        .with_context(|| format!("running `ip netns exec {netns} {}`", argv.join(" ")))
}

/// Like [`exec_in`], but a non-zero exit status is an error (carrying the
/// command's stderr); returns stdout.
pub fn exec_ok(netns: &str, argv: &[&str]) -> Result<String> {
    let out = exec_in(netns, argv)?;
    check_output(&format!("ip netns exec {netns} {}", argv.join(" ")), out)
}

/// Runs an arbitrary host command; a non-zero exit status is an error.
pub(crate) fn run(program: &str, args: &[&str]) -> Result<String> {
    log::debug!("+ {program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running `{program} {}`", args.join(" ")))?;
    check_output(&format!("{program} {}", args.join(" ")), out)
}

/// `ip -n <netns> <args>`: iproute2 enters the namespace itself, which is
/// cheaper than `ip netns exec` (no mount namespace, no /sys remount).
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full)
}

fn check_output(what: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Names of all named network namespaces on the machine.
pub fn list_netns() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        // No namespace was ever created on this boot: nothing to list.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context(NETNS_DIR),
    };
    let mut names = Vec::new();
    for entry in entries {
        names.push(
            entry
                .context(NETNS_DIR)?
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    Ok(names)
}

/// Creates the named namespace.
pub(crate) fn create_netns(netns: &str) -> Result<()> {
    netns_path(netns)?;
    run("ip", &["netns", "add", netns]).map(drop)
}

/// SIGKILLs every process whose network namespace is `netns`.
///
/// A process keeps its namespace (and its interfaces) alive after
/// `ip netns del`, so they must go first for teardown to really tear down.
pub fn kill_netns_processes(netns: &str) -> Result<()> {
    let me = std::process::id();
    let pids = run("ip", &["netns", "pids", netns])?;
    for pid in pids.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        // Defensive: never signal ourselves, whatever `ip` reports.
        if pid == me {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        // ESRCH just means it exited on its own meanwhile.
        let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
    }
    Ok(())
}

/// Kills the processes inside `netns` and deletes it. Its interfaces (and
/// therefore the peers of its veths) go away with it.
pub fn delete_netns(netns: &str) -> Result<()> {
    netns_path(netns)?;
    kill_netns_processes(netns)?;
    run("ip", &["netns", "del", netns]).map(drop)
}

/// Where the server running in `netns` (if any) writes its stderr.
pub(crate) fn server_log_path(netns: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{netns}.log"))
}

/// The pid embedded in a harness namespace name (`xlb-<pid>x<n>-<role>`).
pub(crate) fn netns_owner_pid(netns: &str) -> Option<u32> {
    let rest = netns.strip_prefix(NETNS_PREFIX)?;
    let (pid, _) = rest.split_once('x')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    // Signal 0 probes for existence; EPERM would still mean "exists".
    !matches!(
        kill(Pid::from_raw(raw), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Serialises sweeps and records whether this process has swept before.
static SWEEP_LOCK: Mutex<()> = Mutex::new(());
static SWEPT_ONCE: AtomicBool = AtomicBool::new(false);

/// Deletes `xlb-*` namespaces whose creating process is gone (a harness
/// that was SIGKILLed or aborted never ran its Drop), killing any pod
/// servers still running in them. Returns the names it removed. Also sweeps
/// stale harness cgroups, as [`sweep_stale_cgroups`] does.
///
/// The first sweep in a process also removes namespaces carrying this
/// process's own pid: the pid was recycled from a dead harness, since this
/// process has not created any namespace yet.
pub fn sweep_stale_namespaces() -> Result<Vec<String>> {
    Ok(sweep_stale()?.0)
}

/// Removes harness cgroups (`<cgroup2 mount>/xlb-<pid>x…`) whose creating process is gone,
/// SIGKILLing the processes still inside first, and returns their paths. Also sweeps stale
/// namespaces, as [`sweep_stale_namespaces`] does (both share the "first sweep of this
/// process" rule for recycled pids).
pub fn sweep_stale_cgroups() -> Result<Vec<PathBuf>> {
    Ok(sweep_stale()?.1)
}

fn sweep_stale() -> Result<(Vec<String>, Vec<PathBuf>)> {
    let _guard = SWEEP_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let first = !SWEPT_ONCE.swap(true, Ordering::SeqCst);
    let me = std::process::id();
    let is_stale = |pid: u32| if pid == me { first } else { !pid_alive(pid) };
    // Cgroups first: their processes may hold namespaces open.
    let mut swept_cgroups = Vec::new();
    for cgroup in crate::cgroup::list_cgroups()? {
        let Some(pid) = cgroup
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(netns_owner_pid)
        else {
            continue;
        };
        if !is_stale(pid) {
            continue;
        }
        match crate::cgroup::delete_cgroup(&cgroup) {
            Ok(()) => swept_cgroups.push(cgroup),
            Err(_) if !cgroup.exists() => {}
            Err(e) => {
                return Err(e.context(format!("sweeping stale cgroup {}", cgroup.display())));
            }
        }
    }
    let mut swept = Vec::new();
    for netns in list_netns()? {
        let Some(pid) = netns_owner_pid(&netns) else {
            continue;
        };
        if !is_stale(pid) {
            continue;
        }
        // A pod server's log (see `Network`) dies with its namespace.
        let _ = std::fs::remove_file(server_log_path(&netns));
        match delete_netns(&netns) {
            Ok(()) => swept.push(netns),
            // Another harness may be sweeping the same leftovers right now.
            Err(_) if !netns_path(&netns)?.exists() => {}
            Err(e) => return Err(e.context(format!("sweeping stale namespace {netns}"))),
        }
    }
    if !swept.is_empty() {
        log::info!("swept stale namespaces: {}", swept.join(", "));
    }
    if !swept_cgroups.is_empty() {
        log::info!("swept stale cgroups: {swept_cgroups:?}");
    }
    Ok((swept, swept_cgroups))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parsing() {
        assert_eq!(netns_owner_pid("xlb-1234x0-kind"), Some(1234));
        assert_eq!(netns_owner_pid("xlb-1234x17-pod-nginx"), Some(1234));
        assert_eq!(netns_owner_pid("xlb-x0-kind"), None);
        assert_eq!(netns_owner_pid("xlb-12a4x0-kind"), None);
        assert_eq!(netns_owner_pid("other-1234x0"), None);
    }

    #[test]
    fn rejects_path_like_names() {
        assert!(netns_path("../etc").is_err());
        assert!(netns_path("").is_err());
        assert!(netns_path("xlb-1x0-kind").is_ok());
    }
}
