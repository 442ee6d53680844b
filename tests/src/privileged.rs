//! Gatekeeping for tests that need root and system tools.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Set to `1` (as CI on a prepared machine does) to turn "skipped for lack
/// of privileges" into a failure, so a broken setup cannot pass silently.
pub const REQUIRE_PRIVILEGED_ENV: &str = "XLB_REQUIRE_PRIVILEGED";

/// Tools the harness shells out to.
const REQUIRED_TOOLS: &[&str] = &["ip", "python3", "ethtool"];

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

/// Why privileged tests cannot run here, if they cannot.
pub fn privileged_unavailable_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_owned());
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("kernel without network namespaces".to_owned());
    }
    let missing: Vec<&str> = REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|t| !in_path(t))
        .collect();
    if !missing.is_empty() {
        return Some(format!("missing tools: {}", missing.join(", ")));
    }
    None
}

/// Call first in every test that needs root. Returns `true` if the test can
/// run. Otherwise: panics if `XLB_REQUIRE_PRIVILEGED=1`, else prints a skip
/// line naming the test and returns `false` (the test should just return).
pub fn require_privileged() -> bool {
    let Some(reason) = privileged_unavailable_reason() else {
        return true;
    };
    // libtest names each test's thread after the test.
    let current = std::thread::current();
    let test = current.name().unwrap_or("<unnamed>");
    if std::env::var(REQUIRE_PRIVILEGED_ENV).as_deref() == Ok("1") {
        panic!("{test}: privileged test cannot run ({reason}) and {REQUIRE_PRIVILEGED_ENV}=1");
    }
    eprintln!("SKIP {test}: {reason} (set {REQUIRE_PRIVILEGED_ENV}=1 to fail instead)");
    false
}

static NET_LOCK: Mutex<()> = Mutex::new(());

/// Serialises privileged tests within one test binary: they attach programs,
/// change sysctls and count packets, and are easier to reason about alone.
/// A test that panicked while holding the lock does not poison it for the
/// others (its Network was still torn down by Drop).
pub fn net_lock() -> MutexGuard<'static, ()> {
    NET_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
