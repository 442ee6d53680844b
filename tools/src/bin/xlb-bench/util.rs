//! Small helpers shared by the parts of the bench.
use std::{
    fs::File,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use lb_tests::try_in_netns;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted values.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

pub fn enter_netns(netns: &str) -> Result<()> {
    let f = File::open(Path::new("/run/netns").join(netns))
        .with_context(|| format!("opening netns {netns}"))?;
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns into {netns}"))
}

pub fn sysctl_in(netns: &str, key: &str, value: &str) -> Result<()> {
    try_in_netns(netns, || {
        std::fs::write(Path::new("/proc/sys").join(key), value)
            .with_context(|| format!("sysctl {key} in {netns}"))
    })?
}

/// Deletes every conntrack entry of `netns` (ctnetlink IPCTNL_MSG_CT_DELETE without
/// attributes = flush), so repeats of the iptables setup start from the same table size.
pub fn flush_conntrack(netns: &str) -> Result<()> {
    try_in_netns(netns, || -> Result<()> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        ensure!(
            fd >= 0,
            "netlink socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        const NFNL_SUBSYS_CTNETLINK: u16 = 1;
        const IPCTNL_MSG_CT_DELETE: u16 = 2;
        let mut msg = Vec::with_capacity(20);
        msg.extend(20u32.to_ne_bytes()); // nlmsg_len
        msg.extend(((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
        msg.extend(((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
        msg.extend(1u32.to_ne_bytes()); // seq
        msg.extend(0u32.to_ne_bytes()); // pid
        msg.extend([libc::AF_INET as u8, 0, 0, 0]); // nfgenmsg: family, version, res_id
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        ensure!(
            n == msg.len() as isize,
            "netlink send: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = [0u8; 256];
        // SAFETY: buf is a valid writable buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        ensure!(n >= 20, "netlink recv: {}", std::io::Error::last_os_error());
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        ensure!(
            ty == libc::NLMSG_ERROR as u16,
            "netlink: unexpected reply type {ty}"
        );
        let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        ensure!(
            err == 0,
            "conntrack flush: {}",
            std::io::Error::from_raw_os_error(-err)
        );
        let _ = fd.as_fd();
        Ok(())
    })?
}

/// This process's command line, shell-quoted, for the results.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
                format!("'{}'", a.replace('\'', r"'\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn sh(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// A cluster whose agents run with their default flags (plus `extra`) on kind-shaped nodes
/// (`Cluster::kind_shaped`): what a user of the seed's set-up gets.
pub fn default_cluster(
    spec: &lb_tests::TopologySpec,
    manifest: impl FnOnce(&lb_tests::Network) -> String,
    extra: &[String],
) -> Result<lb_tests::Cluster> {
    let mut c = lb_tests::Cluster::up_with_args(spec, manifest, lb_tests::SourceMode::File, extra)?;
    c.kind_shaped()?;
    Ok(c)
}
