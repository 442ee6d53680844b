//! Toolchain check and install, in the order that works (see shared TOOLCHAIN notes):
//! nightly rust-src -> LLVM 22 dev packages -> bpf-linker built against them -> tools ->
//! the PyPI manifest checkers (in a venv) -> bpffs. Each step checks first, so running it again costs a few milliseconds.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

const LLVM_PKGS: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Debian packages for the tools the tests, demo and benchmarks run, by the command they give.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("ethtool", "ethtool"),
    ("iperf3", "iperf3"),
    ("trafgen", "netsniff-ng"),
    ("ping", "iputils-ping"),
    ("python3", "python3"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// PyPI tools that tests/tests/manifests.rs runs over the rendered manifests, pinned.
const PY_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "checkov==3.3.30"];
/// Their venv, under the (git-ignored) target directory of the workspace; the tests look
/// for it there too.
const PY_VENV: &str = "target/xlb-pytools";
/// Written into the venv once PY_TOOLS are installed: another list installs again.
const PY_STAMP: &str = "xlb-tools.txt";

struct Step {
    name: &'static str,
    ok: fn() -> bool,
    fix: fn() -> Result<()>,
}

pub fn run() -> Result<()> {
    let steps = [
        Step {
            name: "nightly toolchain with rust-src (eBPF is built with -Z build-std)",
            ok: has_rust_src,
            fix: add_rust_src,
        },
        Step {
            name: "LLVM 22 development packages (bpf-linker links against them)",
            ok: || missing_pkgs(LLVM_PKGS).is_empty(),
            fix: || apt_install(&missing_pkgs(LLVM_PKGS)),
        },
        Step {
            name: "bpf-linker 0.13 built against LLVM 22",
            ok: has_bpf_linker,
            fix: install_bpf_linker,
        },
        Step {
            name: "network tools (iproute2, ethtool, iperf3, trafgen, ping, python3, iptables, nftables)",
            ok: || missing_tools().is_empty(),
            fix: || apt_install(&missing_tools()),
        },
        Step {
            name: "manifest checkers kubernetes-validate and checkov (PyPI, in target/xlb-pytools)",
            ok: has_py_tools,
            fix: install_py_tools,
        },
        Step {
            name: "bpffs mounted at /sys/fs/bpf",
            ok: bpffs_mounted,
            fix: || {
                stream(
                    Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]),
                    "mount bpffs",
                )
            },
        },
    ];
    for (i, s) in steps.iter().enumerate() {
        let label = format!("[{}/{}] {}", i + 1, steps.len(), s.name);
        if (s.ok)() {
            println!("✔ {label}");
            continue;
        }
        println!("… {label}: missing, installing");
        (s.fix)().with_context(|| format!("installing: {}", s.name))?;
        if !(s.ok)() {
            bail!("{}: still missing after installing", s.name);
        }
        println!("✔ {label}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn has_rust_src() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")))
}

fn add_rust_src() -> Result<()> {
    // Adding the component to the nightly already there keeps its LLVM (22, matching the
    // packages below); installing a fresh nightly could move to another LLVM.
    let has_nightly = output(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")));
    let mut cmd = Command::new("rustup");
    if has_nightly {
        cmd.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
    } else {
        cmd.args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]);
    }
    stream(&mut cmd, "rustup: nightly rust-src")
}

fn missing_pkgs(pkgs: &[&'static str]) -> Vec<&'static str> {
    pkgs.iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect()
}

fn missing_tools() -> Vec<&'static str> {
    let mut pkgs: Vec<&str> = TOOLS
        .iter()
        .filter(|(cmd, _)| which::which(cmd).is_err())
        .map(|(_, pkg)| *pkg)
        .collect();
    pkgs.dedup();
    pkgs
}

fn has_bpf_linker() -> bool {
    output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|s| s.contains(BPF_LINKER_VERSION))
}

fn install_bpf_linker() -> Result<()> {
    let llvm = "/usr/lib/llvm-22";
    let path = format!("{llvm}/bin:{}", std::env::var("PATH").unwrap_or_default());
    stream(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--force",
            ])
            // Without these the build looks for libLLVM in /usr/lib64 and fails.
            .env("LLVM_SYS_221_PREFIX", llvm)
            .env("LLVM_PREFIX", llvm)
            .env("PATH", path),
        "cargo install bpf-linker",
    )
}

fn py_venv() -> std::path::PathBuf {
    crate::root().join(PY_VENV)
}

fn has_py_tools() -> bool {
    let venv = py_venv();
    std::fs::read_to_string(venv.join(PY_STAMP)).is_ok_and(|s| s.trim() == PY_TOOLS.join(" "))
        && ["kubernetes-validate", "checkov"]
            .iter()
            .all(|t| venv.join("bin").join(t).is_file())
}

fn install_py_tools() -> Result<()> {
    let venv = py_venv();
    let python = venv.join("bin/python");
    if !python.is_file() {
        // Debian's python3 has venv in a package of its own.
        let has_venv = Command::new("python3")
            .args(["-m", "venv", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_venv {
            apt_install(&["python3-venv"])?;
        }
        stream(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv target/xlb-pytools",
        )?;
    }
    // pip's own lines (Collecting, Downloading, Installing) are the progress shown.
    stream(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--progress-bar",
                "off",
                "--disable-pip-version-check",
            ])
            .args(PY_TOOLS),
        &format!("pip install {}", PY_TOOLS.join(" ")),
    )?;
    std::fs::write(venv.join(PY_STAMP), PY_TOOLS.join(" "))?;
    Ok(())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    })
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    if pkgs.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!("installing {} needs root (apt-get)", pkgs.join(" "));
    }
    stream(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    stream(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {}", pkgs.join(" ")),
    )
}

fn nix_is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// Runs a long command behind a spinner that shows its latest output line.
fn stream(cmd: &mut Command, what: &str) -> Result<()> {
    let pb = crate::spinner(what);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let stderr = child.stderr.take().expect("piped");
    let pb2 = pb.clone();
    let what2 = what.to_string();
    let tail = std::thread::spawn(move || {
        let mut last = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            pb2.set_message(format!("{what2}: {}", line.trim()));
            last.push(line);
            if last.len() > 40 {
                last.remove(0);
            }
        }
        last
    });
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            pb.set_message(format!("{what}: {}", line.trim()));
        }
    }
    let status = child.wait()?;
    let last = tail.join().unwrap_or_default();
    pb.finish_and_clear();
    if !status.success() {
        eprintln!("{}", last.join("\n"));
        bail!("{what} failed ({status})");
    }
    println!("  {what}: done");
    Ok(())
}
