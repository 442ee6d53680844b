//! Gatekeeping for tests that need root and system tools: every privileged test
//! starts with
//!
//! ```no_run
//! let Some(_guard) = lb_tests::privileged() else {
//!     return;
//! };
//! ```
//!
//! which skips the test (a `SKIP` line, and the test passes) where it cannot run,
//! fails it instead when `XLB_REQUIRE_PRIVILEGED=1`, and otherwise serialises it
//! with the other privileged tests of its binary until `_guard` is dropped.

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

/// Whether a privileged test can run here. Returns `true` if it can. Otherwise:
/// panics if `XLB_REQUIRE_PRIVILEGED=1`, else prints a skip line naming the test
/// and returns `false`. Tests use [`privileged`], which also takes [`net_lock`].
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

/// Held by a privileged test while it runs: the proof that it may run (root and
/// the tools are there) and its turn under `net_lock`. Dropping it lets the next
/// privileged test of the binary start.
#[must_use = "the net lock is released when the guard is dropped: bind it to `_guard`, not `_`"]
pub struct PrivilegedGuard {
    _lock: MutexGuard<'static, ()>,
}

impl std::fmt::Debug for PrivilegedGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivilegedGuard")
    }
}

/// The start of every test that needs root: `let Some(_guard) = privileged() else {
/// return; };`. `None` when the test cannot run here: it printed
/// `SKIP <test>: <reason>` and the test should return (and so pass). Panics instead
/// when `XLB_REQUIRE_PRIVILEGED=1`, so a prepared machine cannot skip silently.
/// `Some`: the test holds `net_lock` until the guard is dropped (bind it to a
/// name such as `_guard`; `let Some(_) = ...` would release the lock at once).
pub fn privileged() -> Option<PrivilegedGuard> {
    if !require_privileged() {
        return None;
    }
    Some(PrivilegedGuard { _lock: net_lock() })
}
