//! `cargo xtask`: set-up, tests, demo and benchmarks.
//!
//! xtask depends on nothing of the project on purpose: on a fresh machine it must compile
//! before the eBPF toolchain exists, because installing that toolchain is its first job.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

mod kind;
mod setup;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check the toolchain and install what is missing (idempotent).
    Setup,
    /// Build everything (user space and eBPF).
    Build,
    /// Set up, build, then run every test (unit, packet tables, end to end).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, build, bring the built-in network up and run the seed article's checks.
    Demo {
        /// Leave the network and the agents running.
        #[arg(long)]
        keep: bool,
        /// Remove what a `--keep` run left running.
        #[arg(long)]
        down: bool,
    },
    /// Set up, build (release), run the benchmarks and write the results under bench/
    /// (`--quick`: a few-minute functional smoke run, results under target/xlb-bench-quick).
    Bench {
        /// Short smoke run (CI): small sizes, one round; fails only if a configuration fails.
        #[arg(long)]
        quick: bool,
        /// Extra arguments for the benchmark binary (see `--help` there).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The agent on the seed's kind cluster `service-demo` (needs docker, kind, kubectl).
    Kind {
        #[command(subcommand)]
        cmd: kind::KindCmd,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Build => {
            setup::run()?;
            build(false)
        }
        Cmd::Test { args } => {
            setup::run()?;
            build(false)?;
            // The eBPF crate's pure part (packet parsing, rewriting, reject builders) on the
            // host; its programs are tested in the kernel by the tests crate.
            let mut lib = cargo();
            lib.args(["test", "-p", "lb-ebpf", "--lib"]);
            run_visible(lib, "cargo test -p lb-ebpf --lib")?;
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--exclude", "lb-ebpf"]);
            cmd.args(&args);
            // Privileged tests share namespaces, pins and the kernel's interfaces: one at a time.
            if !args.iter().any(|a| a == "--") {
                cmd.arg("--");
            }
            cmd.arg("--test-threads=1");
            run_visible(cmd, "cargo test")
        }
        Cmd::Demo { keep, down } => {
            setup::run()?;
            build(false)?;
            let mut cmd = Command::new(root().join("target/debug/xlb-demo"));
            if keep {
                cmd.arg("--keep");
            }
            if down {
                cmd.arg("--down");
            }
            run_visible(cmd, "demo")
        }
        Cmd::Bench { quick, args } => {
            setup::run()?;
            build(true)?;
            let mut cmd = Command::new(root().join("target/release/xlb-bench"));
            if quick {
                cmd.arg("--quick");
            }
            cmd.args(&args).current_dir(root());
            run_visible(cmd, "bench")?;
            // East-west (pod -> ClusterIP, ours vs kube-proxy-shaped iptables).
            let mut ew = Command::new(root().join("target/release/xlb-bench-ew"));
            ew.args(["--only", "east-west"]).current_dir(root());
            if quick {
                ew.args(["--out-dir", "target/xlb-bench-quick/east-west"])
                    .args([
                        "--repeats",
                        "1",
                        "--ew-seconds",
                        "0.5",
                        "--ew-services",
                        "0",
                    ]);
            } else {
                ew.args(["--out-dir", "bench/east-west"]);
            }
            run_visible(ew, "east-west bench")
        }
        Cmd::Kind { cmd } => kind::run(cmd),
    }
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn build(release: bool) -> Result<()> {
    let pb = spinner("building lb-agent, the eBPF object and the test tools");
    let mut cmd = cargo();
    cmd.args(["build", "--workspace", "--exclude", "lb-ebpf", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running cargo build")?;
    pb.finish_and_clear();
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!("cargo build failed");
    }
    println!("✔ built ({})", if release { "release" } else { "debug" });
    Ok(())
}

pub(crate) fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"));
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

fn run_visible(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}
