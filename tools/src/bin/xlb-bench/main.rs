//! `cargo xtask bench`: xlb against kube-proxy (iptables and nftables modes) and against no
//! load balancer at all, on the built-in network; plus the XDP datapath's per-packet cost
//! (BPF_PROG_TEST_RUN), Maglev table builds and disruption, control-plane latency, and the
//! packet rate through a NodePort to a remote pod (small UDP packets, trafgen).
//!
//! Every run writes `<out-dir>/results/<timestamp>.json` (machine facts and every sample),
//! `<out-dir>/RESULTS.md` (medians, ratios, targets) and SVG charts under
//! `<out-dir>/charts/`. `--quick` is a short functional smoke run (CI): small sizes, one
//! round, written to `target/xlb-bench-quick` unless `--out-dir` says otherwise; like the
//! full run it exits non-zero when a configuration fails functionally. Times are never
//! asserted.
mod ctl;
mod ctl_scale;
mod http;
mod kube_proxy;
mod ns;
mod pps;
mod report;
mod rules;
mod util;
mod xdp;
mod xdp_rows;

use std::{collections::BTreeMap, path::Path, time::Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, ValueEnum};
use lb_tests::privileged_unavailable_reason;
use serde::{Deserialize, Serialize};

use crate::util::{command_line, cpu_model, sh};

#[derive(Parser, Clone)]
#[command(
    name = "xlb-bench",
    about = "xlb vs kube-proxy (iptables, nftables) vs no load balancer on the built-in network; \
             XDP per-packet cost, Maglev, control-plane latency"
)]
pub struct Args {
    /// Short functional smoke run (CI): small sizes, one round; times are not judged.
    #[arg(long)]
    pub quick: bool,
    /// Run only these parts (comma separated); the others are carried over from the newest
    /// results/*.json in the output directory. Default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Part>,
    /// Where RESULTS.md, results/ and charts/ go [default: bench, or target/xlb-bench-quick
    /// with --quick].
    #[arg(long)]
    pub out_dir: Option<String>,
    /// Measure nothing: rewrite RESULTS.md and the charts from the newest results/*.json.
    #[arg(long)]
    pub report_only: bool,
    /// North-south configurations to measure (comma separated). Default: all four.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub configs: Vec<ConfigArg>,

    // ---- XDP / Maglev
    /// Repeats of every XDP and Maglev measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Distinct flows per pass for the new/established figures (one test run per packet).
    #[arg(long, default_value_t = 20_000)]
    pub flows: u32,
    /// Repetitions of the in-kernel loop for the self-mapped established flow.
    #[arg(long, default_value_t = 100_000)]
    pub loop_repeat: u32,
    /// XDP: numbers of services to program, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 1_000, 10_000, 100_000])]
    pub services: Vec<u32>,
    /// XDP: backends per service.
    #[arg(long, default_value_t = 3)]
    pub backends: u32,

    // ---- north-south
    /// Numbers of services programmed (the measured one is the last), comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1, 1_000, 10_000])]
    pub ns_services: Vec<u32>,
    /// Rounds over the configurations (alternating order); medians over rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Connections per conn run.
    #[arg(long, default_value_t = 20_000)]
    pub conns: u32,
    /// Client threads for conn runs (the machine has 2 cores).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// iperf3 -t (seconds).
    #[arg(long, default_value_t = 2.0)]
    pub iperf_seconds: f64,
    /// Diagnostic: run the ceiling with the XDP pass program on both ends of the entry
    /// node's uplink (the cost of native XDP on a veth pair, without load balancing).
    #[arg(long)]
    pub ceiling_xdp: bool,

    // ---- packet rate
    /// pps: seconds of each measured window.
    #[arg(long, default_value_t = 5.0)]
    pub pps_seconds: f64,
    /// pps: windows per configuration (alternating order); medians over them.
    #[arg(long, default_value_t = 3)]
    pub pps_repeats: usize,
    /// pps: flows (client source ports) the generator cycles over.
    #[arg(long, default_value_t = 1024)]
    pub pps_flows: u32,
    /// pps: configurations to measure (comma separated). Default: all six.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub pps_configs: Vec<pps::PpsConfig>,

    // ---- control plane
    /// Services for the control-plane measurement.
    #[arg(long, default_value_t = 10_000)]
    pub ctl_services: u32,
    /// Endpoints per service there.
    #[arg(long, default_value_t = 10)]
    pub ctl_endpoints: u32,
    /// Single-endpoint changes (alternately added and removed).
    #[arg(long, default_value_t = 40)]
    pub ctl_repeats: usize,
    /// Bulk programmings of all services by the agent.
    #[arg(long, default_value_t = 3)]
    pub ctl_bulk_repeats: usize,
    /// Full iptables-restore / nft -f loads (slow at 10,000 services).
    #[arg(long, default_value_t = 1)]
    pub ctl_full_repeats: usize,
    /// Control plane at scale: numbers of Services (x --ctl-scale-endpoints), each through
    /// the file source and the API server stand-in; empty: skipped.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10_000, 100_000])]
    pub ctl_scales: Vec<u32>,
    /// Endpoints per Service at scale.
    #[arg(long, default_value_t = 10)]
    pub ctl_scale_endpoints: u32,
    /// Sources measured at scale: `file` (one manifest), `json` (the same as one JSON file),
    /// `dir` (a directory of manifests of
    /// 100 Services each), `kube` (the API server stand-in).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["file".to_owned(), "dir".to_owned(), "kube".to_owned()])]
    pub ctl_scale_sources: Vec<String>,
    /// kube-proxy's restore times at each scale larger than --ctl-services (iptables at
    /// 100,000 Services runs into its 600 s bound).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ctl_scale_kube_proxy: bool,
    /// Only the runs at scale (not the 10,000 x 6 comparison before them).
    #[arg(long)]
    pub ctl_scale_only: bool,
    /// Single-endpoint changes per scale run.
    #[arg(long, default_value_t = 60)]
    pub ctl_scale_repeats: usize,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    /// XDP per-packet cost and in-process apply times.
    Xdp,
    /// Maglev table builds and disruption.
    Maglev,
    /// Client -> NodePort / LB IP: ours vs kube-proxy iptables / nftables vs no LB.
    NorthSouth,
    /// Source change -> maps updated; kube-proxy's restore times.
    ControlPlane,
    /// Packets/s of 64-byte UDP to a NodePort with a remote endpoint, CPU per packet.
    Pps,
}

#[derive(ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConfigArg {
    Ours,
    OursNative,
    Iptables,
    Nftables,
    Ceiling,
}

impl Args {
    fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }

    /// `--quick` shrinks every size it was not given explicitly.
    fn apply_quick(&mut self, explicit: &dyn Fn(&str) -> bool) {
        if !self.quick {
            return;
        }
        let set = |name: &str, f: &mut dyn FnMut()| {
            if !explicit(name) {
                f();
            }
        };
        set("repeats", &mut || self.repeats = 2);
        set("flows", &mut || self.flows = 2_000);
        set("loop_repeat", &mut || self.loop_repeat = 10_000);
        set("services", &mut || self.services = vec![1, 1_000]);
        set("ns_services", &mut || self.ns_services = vec![1, 100]);
        set("rounds", &mut || self.rounds = 1);
        set("conns", &mut || self.conns = 2_000);
        set("iperf_seconds", &mut || self.iperf_seconds = 1.0);
        set("ctl_services", &mut || self.ctl_services = 1_000);
        set("ctl_repeats", &mut || self.ctl_repeats = 6);
        set("ctl_bulk_repeats", &mut || self.ctl_bulk_repeats = 1);
        set("ctl_scales", &mut || self.ctl_scales = vec![1_000]);
        set("ctl_scale_repeats", &mut || self.ctl_scale_repeats = 6);
        set("pps_seconds", &mut || self.pps_seconds = 1.0);
        set("pps_repeats", &mut || self.pps_repeats = 1);
    }
}

#[derive(Serialize, Deserialize, Clone, Default)]
#[serde(default)]
pub struct XdpPart {
    pub repeats: usize,
    pub flows: u32,
    pub loop_repeat: u32,
    pub packets: Vec<xdp_rows::PacketRow>,
    pub apply: Vec<xdp_rows::ApplyRow>,
    pub method: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Default)]
#[serde(default)]
pub struct MaglevPart {
    pub builds: Vec<xdp_rows::MaglevRow>,
    pub disruption: Vec<xdp::MaglevDisruption>,
}

#[derive(Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Results {
    pub command: String,
    pub date: String,
    pub quick: bool,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    /// /proc/loadavg at the start and the end of the run (other work on the machine).
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub versions: BTreeMap<String, String>,
    /// Which run produced each part ("<command> @ <date>").
    pub parts: BTreeMap<String, String>,
    pub xdp: Option<XdpPart>,
    pub maglev: Option<MaglevPart>,
    pub north_south: Option<ns::NorthSouth>,
    pub control_plane: Option<ctl::ControlPlane>,
    pub pps: Option<pps::Pps>,
    /// Functional failures of this run's parts.
    pub failures: Vec<String>,
    pub seconds: f64,
}

fn main() -> Result<()> {
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let mut args = <Args as clap::FromArgMatches>::from_arg_matches(&matches)?;
    args.apply_quick(&|name| {
        matches.value_source(name) == Some(clap::parser::ValueSource::CommandLine)
    });
    if let Some(reason) = privileged_unavailable_reason() {
        bail!("xlb-bench needs root (BPF programs, network namespaces): {reason}");
    }
    ensure!(
        args.repeats > 0 && args.rounds > 0,
        "--repeats and --rounds must be >= 1"
    );
    ensure!(
        args.flows > 0 && args.conns > 0,
        "--flows and --conns must be >= 1"
    );
    ensure!(args.backends > 0, "--backends must be at least 1");
    ensure!((1..=8).contains(&args.threads), "--threads must be 1..=8");
    ensure!(args.iperf_seconds > 0.0, "--iperf-seconds must be positive");
    ensure!(
        args.pps_seconds > 0.0 && args.pps_repeats > 0 && (1..=60_000).contains(&args.pps_flows),
        "--pps-seconds must be positive, --pps-repeats >= 1, --pps-flows 1..=60000"
    );
    let out_dir = args.out_dir.clone().unwrap_or_else(|| {
        if args.quick {
            "target/xlb-bench-quick".into()
        } else {
            "bench".into()
        }
    });
    let out_dir = Path::new(&out_dir);
    if args.report_only {
        let r = report::previous(out_dir).context("no results/*.json to report")?;
        eprintln!("{}", report::write(&r, out_dir)?);
        return Ok(());
    }
    let started = Instant::now();
    let command = command_line();
    let date = sh("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]);
    let stamp = format!("{command} @ {date}");
    let mut results = if args.only.is_empty() {
        Results::default()
    } else {
        report::previous(out_dir).unwrap_or_default()
    };
    results.command = command;
    results.date = date.clone();
    results.quick = args.quick;
    results.failures.clear();
    results.loadavg_start = loadavg();
    results.kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    results.cpu = cpu_model();
    results.cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    results.versions = ns::versions().into_iter().collect();
    results
        .versions
        .insert("rustc".into(), sh("rustc", &["--version"]));
    results.versions.insert("trafgen".into(), pps::version());
    eprintln!("load average at start: {}", results.loadavg_start);

    if args.runs(Part::Xdp) {
        let (packets, apply) = xdp::run(&args)?;
        results.xdp = Some(XdpPart {
            repeats: args.repeats,
            flows: args.flows,
            loop_repeat: args.loop_repeat,
            packets,
            apply,
            method: xdp::METHOD.iter().map(|m| (*m).to_owned()).collect(),
        });
        results.parts.insert("xdp".into(), stamp.clone());
    }
    if args.runs(Part::Maglev) {
        eprintln!("▶ Maglev table builds and disruption…");
        results.maglev = Some(MaglevPart {
            builds: vec![
                xdp::bench_maglev(65_537, 1_000, args.repeats.max(5)),
                xdp::bench_maglev(16_381, 100, args.repeats.max(5)),
                xdp::bench_maglev(1_021, 10, args.repeats.max(5)),
            ],
            disruption: vec![
                xdp::maglev_disruption(65_537, 1_000),
                xdp::maglev_disruption(16_381, 100),
                xdp::maglev_disruption(1_021, 10),
                xdp::maglev_disruption(509, 3),
            ],
        });
        results.parts.insert("maglev".into(), stamp.clone());
    }
    if args.runs(Part::NorthSouth) {
        let configs: Vec<ns::Config> = if args.configs.is_empty() {
            ns::CONFIGS.to_vec()
        } else {
            args.configs
                .iter()
                .map(|c| match c {
                    ConfigArg::Ours => ns::Config::Ours,
                    ConfigArg::OursNative => ns::Config::OursNative,
                    ConfigArg::Iptables => ns::Config::Iptables,
                    ConfigArg::Nftables => ns::Config::Nftables,
                    ConfigArg::Ceiling => ns::Config::Ceiling,
                })
                .collect()
        };
        let n = ns::run(&args, &configs)?;
        results
            .failures
            .extend(n.failures.iter().map(|f| format!("north-south: {f}")));
        results.north_south = Some(n);
        results.parts.insert("north-south".into(), stamp.clone());
    }
    if args.runs(Part::ControlPlane) {
        match ctl::run(&args) {
            Ok(c) => results.control_plane = Some(c),
            Err(e) => {
                results.control_plane = None;
                results.failures.push(format!("control plane: {e:#}"));
            }
        }
        results.parts.insert("control-plane".into(), stamp.clone());
    }
    if args.runs(Part::Pps) {
        match pps::run(&args, &results.command) {
            Ok(p) => {
                results
                    .failures
                    .extend(p.failures.iter().map(|f| format!("pps: {f}")));
                results.pps = Some(p);
            }
            Err(e) => {
                results.pps = None;
                results.failures.push(format!("pps: {e:#}"));
            }
        }
        results.parts.insert("pps".into(), stamp.clone());
    }
    results.loadavg_end = loadavg();
    results.seconds = started.elapsed().as_secs_f64();
    let written = report::write(&results, out_dir)?;
    eprintln!(
        "✔ done in {:.0} s (load average {} -> {}); {written}",
        results.seconds, results.loadavg_start, results.loadavg_end
    );
    if !results.failures.is_empty() {
        for f in &results.failures {
            eprintln!("✘ {f}");
        }
        bail!("{} functional failure(s)", results.failures.len());
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
