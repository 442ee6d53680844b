//! Single-purpose guards for tests that need one namespace or one pin directory rather
//! than the whole network: both are named after the creating process so sweeps can find
//! leftovers of dead runs, and both delete on drop (also when a test panics).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::netns::{create_netns, delete_netns, exec_ok, netns_owner_pid, sweep_stale_namespaces};

/// A throwaway network namespace `xlb-<pid>x<n>-<role>`.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(role: &str) -> Result<Self> {
        sweep_stale_namespaces()?;
        let name = format!("xlb-{}-{role}", crate::network::next_tag());
        create_netns(&name)?;
        Ok(Self { name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a whitespace-separated command inside; panics on failure (test set-up).
    pub fn exec(&self, cmd: &str) -> String {
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        exec_ok(&self.name, &argv).unwrap_or_else(|e| panic!("{cmd}: {e:#}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = delete_netns(&self.name);
    }
}

/// Root of the project's pins; test pin directories are `test-<pid>x<n>-<role>` under it.
pub const PIN_ROOT: &str = "/sys/fs/bpf/xlb";

/// A pin directory for one test's maps, removed on drop.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub fn new(role: &str) -> Result<Self> {
        sweep_stale_pins();
        let path = Path::new(PIN_ROOT).join(format!("test-{}-{role}", crate::network::next_tag()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes pin directories (`test-<pid>x…` and `<pid>x…-<node>` of harness agents) whose
/// creating process is gone.
pub fn sweep_stale_pins() {
    let Ok(rd) = std::fs::read_dir(PIN_ROOT) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let tagged = name.strip_prefix("test-").unwrap_or(&name);
        let Some(pid) = netns_owner_pid(&format!("xlb-{tagged}")) else {
            continue;
        };
        let alive = pid == std::process::id()
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}
