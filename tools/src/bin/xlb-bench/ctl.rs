//! Control plane: time from a change of the source to the datapath's maps showing it.
//!
//! Ours: one node running lb-agent with `--source file:`; the bench writes the manifest
//! (write + rename) and polls the agent's pinned maps directly (XLB_FRONTENDS ->
//! XLB_SERVICES lookups of the changed service, every 0.5 ms) until the change is there.
//! kube-proxy's equivalent is the time of the command its sync runs: `iptables-restore` of
//! the full ruleset / `--noflush` of one service's chains (partial sync), `nft -f` of the
//! full table / of one service's incremental transaction.
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{Frontend, FrontendKey, MAP_FRONTENDS, MAP_SERVICES, PROTO_TCP, Service};
use lb_tests::{Cluster, Netns, NodeSpec, SourceMode, TopologySpec, exec_ok};
use serde::{Deserialize, Serialize};

use crate::{
    Args,
    rules::{self, SvcDef},
    util::{median, pct},
};

const EP_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
const SVC_BASE: u32 = u32::from_be_bytes([10, 100, 0, 1]);
const NODE: &str = "ctl-node";
const OTHER_NODE: &str = "ctl-other";
const POLL: Duration = Duration::from_micros(500);

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ControlPlane {
    pub services: u32,
    pub endpoints: u32,
    /// Endpoints per service asked for, when the agent's limits forced fewer.
    pub endpoints_asked: u32,
    pub limit_note: Option<String>,
    /// ms from writing the manifest with every service to the last one being in the maps.
    pub ours_bulk_ms: Vec<f64>,
    /// ms from writing a manifest with one endpoint added/removed to the maps showing it.
    pub ours_change_ms: Vec<f64>,
    pub iptables_full_ms: Vec<f64>,
    pub iptables_partial_ms: Vec<f64>,
    pub iptables_rules: usize,
    pub nft_full_ms: Vec<f64>,
    pub nft_partial_ms: Vec<f64>,
    pub nft_lines: usize,
    /// The agent's steps timed in the bench process (ms, medians): where the time goes.
    #[serde(default)]
    pub breakdown: Vec<(String, f64)>,
    /// Agent arguments used.
    pub agent_args: Vec<String>,
    pub method: Vec<String>,
    /// At cluster scale, per size and source (issue 15; see ctl_scale.rs).
    #[serde(default)]
    pub scales: Vec<crate::ctl_scale::Scale>,
    #[serde(default)]
    pub scale_method: Vec<String>,
    /// kube-proxy's iptables mode at the scales beyond `services`.
    #[serde(default)]
    pub kube_proxy_scales: Vec<crate::ctl_scale::KubeProxyScale>,
}

pub const METHOD: &[&str] = &[
    "One node (no pods), one lb-agent with --source file: and its default flags, except \
     --maglev-arena when the services' tables do not fit the default arena (11 endpoints -> \
     M = 2039 per service, two tables each: the quick run's 1,000 services fit, the full \
     run's 10,000 do not). Endpoints are on another node (remote).",
    "bulk: the manifest goes from no service to all N services x E endpoints in one write; \
     measured until the last service's ClusterIP frontend is in XLB_FRONTENDS and its \
     XLB_SERVICES entry has E backends. Repeated after emptying the manifest.",
    "change: with the N services programmed, the last service gains an 11th endpoint, then \
     loses it again, alternately; measured until its backend count in XLB_SERVICES changes. \
     Each write happens at a pseudo-random offset (100-399 ms) from the previous one: more \
     than the agent's --min-sync-period (100 ms), within which changes are batched. The \
     agent's file source checks the file's mtime every 20 ms, re-reads the file and parses \
     only the list items that differ (source/docs.rs).",
    "kube-proxy: the same services in a scratch namespace; iptables-restore of the full \
     ruleset (nat + filter), iptables-restore --noflush of the changed service's chains \
     (its partial sync), nft -f of the full table (deleted and recreated in one transaction) \
     and nft -f of one service's update (new endpoint chain, service chain flushed and \
     rewritten / old endpoint chain deleted). Wall time of the command, started with ip netns exec.",
];

fn svcs(n: u32, e: u32) -> Vec<SvcDef> {
    (0..n)
        .map(|i| SvcDef {
            name: format!("svc-{i:06}"),
            cluster_ip: Ipv4Addr::from(SVC_BASE + i),
            port: 80,
            endpoints: (0..e)
                .map(|j| {
                    (
                        Ipv4Addr::from(EP_BASE + i * 16 + j),
                        8080,
                        OTHER_NODE.into(),
                    )
                })
                .collect(),
            node_port: None,
            lb_ip: None,
            udp: false,
        })
        .collect()
}

/// The 11th endpoint of the last service.
fn extra_ep(n: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(EP_BASE + (n - 1) * 16 + 15), 8080)
}

pub(crate) struct Maps {
    frontends: BpfHashMap<MapData, FrontendKey, Frontend>,
    services: BpfHashMap<MapData, u32, Service>,
}

impl Maps {
    pub(crate) fn open(pin_dir: &Path) -> Result<Self> {
        let open = |name: &str| {
            MapData::from_pin(pin_dir.join(name))
                .with_context(|| format!("opening {name} in {}", pin_dir.display()))
        };
        Ok(Self {
            frontends: BpfHashMap::try_from(Map::HashMap(open(MAP_FRONTENDS)?))?,
            services: BpfHashMap::try_from(Map::HashMap(open(MAP_SERVICES)?))?,
        })
    }

    /// Backends of the service behind `ip:port/tcp`, None if the frontend is absent.
    pub(crate) fn backends(&self, ip: Ipv4Addr, port: u16) -> Option<u32> {
        let key = FrontendKey {
            addr_be: u32::from_ne_bytes(ip.octets()),
            port_be: port.to_be(),
            proto: PROTO_TCP,
            _pad: 0,
        };
        let fe = self.frontends.get(&key, 0).ok()?;
        self.services
            .get(&fe.svc_id, 0)
            .ok()
            .map(|s| s.backend_count)
    }

    /// Polls until `ok(backends)`; returns the elapsed time since `t0`. Fails early when the
    /// agent's log (`agent`: path, length before the change) shows an error.
    pub(crate) fn wait(
        &self,
        t0: Instant,
        ip: Ipv4Addr,
        port: u16,
        timeout: Duration,
        agent: (&Path, usize),
        ok: impl Fn(Option<u32>) -> bool,
    ) -> Result<f64> {
        let mut next_log_check = Instant::now() + Duration::from_millis(100);
        loop {
            if ok(self.backends(ip, port)) {
                return Ok(t0.elapsed().as_secs_f64() * 1e3);
            }
            if Instant::now() >= next_log_check {
                next_log_check = Instant::now() + Duration::from_millis(200);
                let log = std::fs::read_to_string(agent.0).unwrap_or_default();
                if let Some(l) = log
                    .get(agent.1..)
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.contains("level=error") || l.contains("ERROR"))
                {
                    bail!("lb-agent: {l}");
                }
            }
            if t0.elapsed() > timeout {
                bail!(
                    "timed out after {timeout:?} waiting for {ip}:{port} (now {:?} backends)",
                    self.backends(ip, port)
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

pub fn run(args: &Args) -> Result<ControlPlane> {
    let (n, asked) = (args.ctl_services, args.ctl_endpoints);
    if args.ctl_scale_only {
        let mut out = ControlPlane::default();
        scales(args, n, &mut out);
        return Ok(out);
    }
    anyhow::ensure!(
        n >= 1 && (1..=14).contains(&asked),
        "--ctl-services >= 1, --ctl-endpoints 1..=14"
    );
    // This test runs the agent on its default --max-backends (DEFAULT_MAX_BACKENDS), which
    // rejects a source with more; the change test adds one. (The scale runs raise it.)
    let fits = ((lb_common::DEFAULT_MAX_BACKENDS - 1) / n).max(1);
    let e = asked.min(fits);
    let limit_note = (e < asked).then(|| {
        format!(
            "{n} services x {asked} endpoints = {} backends exceed lb-agent's limit of {} \
             (its default --max-backends, lb_common::DEFAULT_MAX_BACKENDS; the agent logs 'backends \
             exceed the limit' and keeps its last state): measured with {e} endpoints per \
             service instead, for ours and kube-proxy alike",
            u64::from(n) * u64::from(asked),
            lb_common::DEFAULT_MAX_BACKENDS
        )
    });
    if let Some(note) = &limit_note {
        eprintln!("  note: {note}");
    }
    let m = lb_agent::dataplane::maglev::choose_m(
        e as usize + 1,
        lb_agent::dataplane::maglev::DEFAULT_MIN_M,
    );
    let need = 2 * u64::from(m) * (u64::from(n) + 8);
    // The agent's defaults; only a capacity the default arena lacks is raised.
    let (arena, agent_args) = if need <= u64::from(lb_common::DEFAULT_MAGLEV_ARENA) {
        (u64::from(lb_common::DEFAULT_MAGLEV_ARENA), vec![])
    } else {
        (need, vec!["--maglev-arena".to_owned(), need.to_string()])
    };
    let mut out = ControlPlane {
        services: n,
        endpoints: e,
        endpoints_asked: asked,
        limit_note,
        agent_args: agent_args.clone(),
        method: METHOD.iter().map(|m| (*m).to_owned()).collect(),
        ..Default::default()
    };
    let all = svcs(n, e);
    let last = all.last().expect("n >= 1").clone();
    let mut plus = all.clone();
    let (xip, xport) = extra_ep(n);
    plus.last_mut()
        .expect("n >= 1")
        .endpoints
        .push((xip, xport, OTHER_NODE.into()));
    let empty = rules::manifest(&[]);
    let full = rules::manifest(&all);
    let full_plus = rules::manifest(&plus);
    eprintln!(
        "▶ control plane: {n} services x {e} endpoints (manifest {:.1} MB)",
        full.len() as f64 / 1e6
    );

    // ---- ours
    let base = TopologySpec::seed();
    let spec = TopologySpec {
        nodes: vec![NodeSpec {
            name: NODE.into(),
            pods: vec![],
            ..base.nodes[0].clone()
        }],
        lb_ips: vec![],
        ..base
    };
    let mut cluster =
        Cluster::up_with_args(&spec, |_| empty.clone(), SourceMode::File, &agent_args)?;
    cluster.wait_for("the agent", Duration::from_secs(30), |s| s.agent.is_some())?;
    let maps = Maps::open(&cluster.agents[0].pin_dir)?;
    let log = cluster.agents[0].log.clone();
    let log_at = || {
        (
            log.as_path(),
            std::fs::metadata(&log).map_or(0, |m| m.len() as usize),
        )
    };
    let timeout = Duration::from_secs(300);
    let (ip, port) = (last.cluster_ip, last.port);
    for r in 0..args.ctl_bulk_repeats {
        let from = log_at();
        cluster.write_manifest(&empty)?;
        maps.wait(Instant::now(), ip, port, timeout, from, |b| b.is_none())?;
        std::thread::sleep(Duration::from_millis(400));
        let from = log_at();
        let t0 = Instant::now();
        cluster.write_manifest(&full)?;
        let ms = maps.wait(t0, ip, port, timeout, from, |b| b == Some(e))?;
        eprintln!("  ours bulk {}: {ms:.0} ms", r + 1);
        out.ours_bulk_ms.push(ms);
        if !cluster.agents[0].alive() {
            bail!("lb-agent exited: {}", cluster.agents[0].log_text());
        }
    }
    // The manifest now holds `full`.
    let mut seed = 0x2545_f491u32;
    for k in 0..args.ctl_repeats {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        std::thread::sleep(Duration::from_millis(100 + u64::from(seed % 300)));
        let (text, want) = if k % 2 == 0 {
            (&full_plus, e + 1)
        } else {
            (&full, e)
        };
        let from = log_at();
        let t0 = Instant::now();
        cluster.write_manifest(text)?;
        let ms = maps.wait(t0, ip, port, Duration::from_secs(60), from, |b| {
            b == Some(want)
        })?;
        out.ours_change_ms.push(ms);
    }
    if args.ctl_repeats % 2 == 1 {
        cluster.write_manifest(&full)?;
    }
    eprintln!(
        "  ours change: p50 {:.1} ms, p99 {:.1} ms over {}",
        p(&out.ours_change_ms, 50.0),
        p(&out.ours_change_ms, 99.0),
        out.ours_change_ms.len()
    );
    drop(maps);
    drop(cluster);
    eprintln!("  breakdown (in process)…");
    out.breakdown = breakdown(
        &full,
        &full_plus,
        arena as u32,
        args.ctl_bulk_repeats.max(1),
    )?;
    for (k, v) in &out.breakdown {
        eprintln!("    {k}: {v:.1} ms");
    }

    // ---- kube-proxy
    let ns = Netns::new("ctl")?;
    let (ipt, nat_rules) = rules::iptables_full(&all);
    out.iptables_rules = nat_rules;
    let ipt_path = write_tmp("ipt-full", &ipt)?;
    let nft = rules::nft_full(&all);
    out.nft_lines = nft.lines().count();
    let nft_path = write_tmp("nft-full", &nft)?;
    let last_plus = plus.last().expect("n >= 1").clone();
    let ipt_add = write_tmp("ipt-add", &rules::iptables_partial(&last_plus, &[]))?;
    let ipt_del = write_tmp("ipt-del", &rules::iptables_partial(&last, &[(xip, xport)]))?;
    let nft_add = write_tmp(
        "nft-add",
        &rules::nft_partial(&last_plus, &[(xip, xport)], &[]),
    )?;
    let nft_del = write_tmp("nft-del", &rules::nft_partial(&last, &[], &[(xip, xport)]))?;
    let timed = |argv: &[&str]| -> Result<f64> {
        let t0 = Instant::now();
        exec_ok(ns.name(), argv)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    for r in 0..args.ctl_full_repeats {
        let ms = timed(&["iptables-restore", &ipt_path]).context("iptables-restore (full)")?;
        eprintln!(
            "  iptables-restore full {} ({nat_rules} nat rules): {ms:.0} ms",
            r + 1
        );
        out.iptables_full_ms.push(ms);
    }
    for k in 0..args.ctl_repeats {
        let f = if k % 2 == 0 { &ipt_add } else { &ipt_del };
        out.iptables_partial_ms
            .push(timed(&["iptables-restore", "--noflush", f]).context("iptables partial")?);
    }
    // Empty the iptables-nft tables before nft (same kernel objects would share the netns).
    let _ = exec_ok(ns.name(), &["iptables", "-t", "nat", "-F"]);
    for r in 0..args.ctl_full_repeats {
        let ms = timed(&["nft", "-f", &nft_path]).context("nft -f (full)")?;
        eprintln!(
            "  nft -f full {} ({} lines): {ms:.0} ms",
            r + 1,
            out.nft_lines
        );
        out.nft_full_ms.push(ms);
    }
    for k in 0..args.ctl_repeats {
        let f = if k % 2 == 0 { &nft_add } else { &nft_del };
        out.nft_partial_ms
            .push(timed(&["nft", "-f", f]).context("nft partial")?);
    }
    for f in [ipt_path, nft_path, ipt_add, ipt_del, nft_add, nft_del] {
        let _ = std::fs::remove_file(f);
    }
    drop(ns);

    scales(args, n, &mut out);
    Ok(out)
}

/// The runs at cluster scale (issue 15).
fn scales(args: &Args, n: u32, out: &mut ControlPlane) {
    out.scale_method = crate::ctl_scale::METHOD
        .iter()
        .map(|m| (*m).to_owned())
        .collect();
    for &size in &args.ctl_scales {
        for source in &args.ctl_scale_sources {
            match crate::ctl_scale::run(
                size,
                args.ctl_scale_endpoints,
                source,
                args.ctl_scale_repeats,
            ) {
                Ok(s) => out.scales.push(s),
                Err(e) => eprintln!("  control plane at {size} ({source}): {e:#}"),
            }
        }
        if size > n && args.ctl_scale_kube_proxy {
            match crate::ctl_scale::kube_proxy(size, args.ctl_scale_endpoints, 6) {
                Ok(k) => out.kube_proxy_scales.push(k),
                Err(e) => eprintln!("  kube-proxy at {size}: {e:#}"),
            }
        }
    }
}

/// The scale runs as a report section (issue 15's figures).
pub fn scales_section(c: &ControlPlane) -> String {
    if c.scales.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n### At scale: programming from nothing, one endpoint change, bursts, memory\n\n",
    );
    s += "| services x endpoints | source | from nothing ms | agent start with all ms | one change p50 / p99 ms (n) | burst of 1,000 ms | agent CPU: bulk s / per change ms | VmRSS MiB | RssAnon MiB | heap B per service port (after start) |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &c.scales {
        // kube: the stand-in takes the objects one by one while the agent follows; how
        // long that took is part of the figure.
        let bulk = if r.source == "kube" {
            format!(
                "{:.0} (objects created in {:.0}; agent done {:.0} after)",
                r.bulk_ms,
                r.bulk_load_ms,
                r.bulk_ms - r.bulk_load_ms
            )
        } else {
            format!("{:.0}", r.bulk_ms)
        };
        s += &format!(
            "| {} x {} | {} | {} | {:.0} | {:.1} / {:.1} ({}) | {:.0} | {:.2} / {:.2} | {:.0} | {:.0} | {:.0} ({:.0}) |\n",
            r.services,
            r.endpoints,
            r.source,
            bulk,
            r.start_ms,
            p(&r.change_ms, 50.0),
            p(&r.change_ms, 99.0),
            r.change_ms.len(),
            r.burst_ms,
            r.cpu_bulk_s,
            r.cpu_per_change_ms,
            r.rss_loaded_kib as f64 / 1024.0,
            r.anon_loaded_kib as f64 / 1024.0,
            r.anon_bytes_per_port(),
            r.start_anon_bytes_per_port(),
        );
    }
    for k in &c.kube_proxy_scales {
        if k.iptables_full_timed_out {
            s += &format!(
                "\nkube-proxy iptables mode at {} x {} ({} nat rules): iptables-restore of the \
                 full ruleset did not finish within {:.0} s (killed); one service's partial sync \
                 not measured. nftables not measured at this size (a full `nft -f` takes many \
                 minutes).\n",
                k.services,
                k.endpoints,
                k.iptables_rules,
                k.iptables_full_ms / 1e3
            );
            continue;
        }
        s += &format!(
            "\nkube-proxy iptables mode at {} x {} ({} nat rules): iptables-restore of the full \
             ruleset {:.0} ms; --noflush of one service (an endpoint removed / given back) p50 \
             {:.0} ms, p99 {:.0} ms over {}. nftables not measured at this size (a full `nft -f` \
             takes many minutes).\n",
            k.services,
            k.endpoints,
            k.iptables_rules,
            k.iptables_full_ms,
            p(&k.iptables_partial_ms, 50.0),
            p(&k.iptables_partial_ms, 99.0),
            k.iptables_partial_ms.len()
        );
    }
    // Issue 15's targets.
    let mut t = String::from("\n| target (issue 15) | goal | measured | |\n|---|---|---|---|\n");
    let mut row = |what: String, goal: &str, got: String, met: bool| {
        t += &format!(
            "| {what} | {goal} | {got} | {} |\n",
            if met { "met" } else { "**missed**" }
        );
    };
    for r in &c.scales {
        let p99 = p(&r.change_ms, 99.0);
        row(
            format!(
                "one endpoint change visible, p99, {} services, {}",
                r.services, r.source
            ),
            "<= 20 ms",
            format!("{p99:.1} ms"),
            p99 <= 20.0,
        );
    }
    for r in &c.scales {
        let (goal, limit) = match r.services {
            10_000 => ("<= 0.5 s", 500.0),
            100_000 => ("<= 5 s", 5000.0),
            _ => continue,
        };
        // kube: the bulk is as fast as the stand-in takes the objects; the start is the
        // agent's own.
        let bulk = (r.source != "kube").then_some(("one write", r.bulk_ms));
        for (how, ms) in bulk.into_iter().chain([("agent start", r.start_ms)]) {
            row(
                format!(
                    "{} x {} programmed from nothing, {how} ({})",
                    r.services, r.endpoints, r.source
                ),
                goal,
                format!("{:.2} s", ms / 1e3),
                ms <= limit,
            );
        }
    }
    for r in &c.scales {
        row(
            format!(
                "burst of 1,000 endpoint changes, {} services, {}",
                r.services, r.source
            ),
            "<= 1 s",
            format!("{:.0} ms", r.burst_ms),
            r.burst_ms <= 1000.0,
        );
        row(
            format!(
                "agent heap per service port, {} services, {}",
                r.services, r.source
            ),
            "<= 2 KiB",
            format!(
                "{:.1} KiB (after a start with all: {:.1} KiB)",
                r.anon_bytes_per_port() / 1024.0,
                r.start_anon_bytes_per_port() / 1024.0
            ),
            r.anon_bytes_per_port().max(r.start_anon_bytes_per_port()) <= 2048.0,
        );
    }
    s += &t;
    s += "\nMethod (at scale):\n\n";
    for m in &c.scale_method {
        s += &format!("- {m}\n");
    }
    s
}

pub(crate) fn p(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    pct(&s, q)
}

/// p50 / p99 / median helpers for the report.
pub fn summary(v: &[f64]) -> (f64, f64, f64) {
    (
        p(v, 50.0),
        p(v, 99.0),
        if v.is_empty() {
            f64::NAN
        } else {
            median(v.to_vec())
        },
    )
}

fn write_tmp(what: &str, text: &str) -> Result<String> {
    let path = std::env::temp_dir().join(format!("xlb-bench-{}-{what}.rules", std::process::id()));
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

/// Where the agent's time goes, step by step, in this process, as the agent does it: read
/// the manifest (per-document cache), translate, apply to freshly loaded maps (first
/// programming); then the same for a manifest with one endpoint added (incremental), and
/// a full resync with nothing changed. Medians of `repeats` (ms).
fn breakdown(full: &str, plus: &str, arena: u32, repeats: usize) -> Result<Vec<(String, f64)>> {
    use lb_agent::{
        dataplane::{
            datapath::{Datapath, Limits},
            programmer::{Maps as PMaps, Programmer, Settings},
        },
        model::{
            incremental::{Translator, Update, port_changes},
            translate::NodeContext,
        },
        source::docs::{FileCache, FileUpdate},
    };
    let node = NodeContext {
        node_name: NODE.into(),
        node_addrs: vec![Ipv4Addr::new(172, 18, 0, 2)],
        ..Default::default()
    };
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let mut steps: Vec<(String, Vec<f64>)> = [
        "read full manifest (FileCache::read: split, parse on 2 cores)",
        "translate (Translator::full)",
        "apply, first programming (Programmer::apply)",
        "read, one endpoint added (FileCache::read: one item parsed)",
        "translate, one endpoint added (Translator::apply: one Service)",
        "apply, one endpoint added (Programmer::apply_delta)",
        "full resync, nothing changed (Translator::full + Programmer::apply)",
    ]
    .iter()
    .map(|s| ((*s).to_owned(), Vec::new()))
    .collect();
    for _ in 0..repeats {
        let limits = Limits {
            maglev_arena: arena,
            max_backends: 1 << 20,
            max_services: 1 << 18,
            max_frontends: 1 << 18,
            ..Limits::default()
        };
        let pins = lb_tests::PinDir::new("ctlbd")?;
        let mut dp = Datapath::load(pins.path(), &limits)?;
        let mut maps = PMaps::take(&mut dp.ebpf)?;
        let mut programmer = Programmer::new(Settings {
            min_m: lb_agent::dataplane::maglev::DEFAULT_MIN_M,
            drain: Duration::from_secs(30),
            max_services: limits.max_services,
            max_frontends: limits.max_frontends,
            max_backends: limits.max_backends,
            arena: limits.maglev_arena,
        });
        let mut cache = FileCache::new();
        let mut tr = Translator::new();
        let t = Instant::now();
        let FileUpdate::Full(objs) = cache.read(full.to_owned())? else {
            bail!("first read is not full");
        };
        steps[0].1.push(ms(t));
        tr.replace(objs);
        let t = Instant::now();
        let desired = tr.full(&node);
        steps[1].1.push(ms(t));
        let t = Instant::now();
        programmer.apply(&desired, &mut maps, Instant::now())?;
        steps[2].1.push(ms(t));
        drop(desired);
        let t = Instant::now();
        let FileUpdate::Change(change) = cache.read(plus.to_owned())? else {
            bail!("one endpoint added read as full");
        };
        steps[3].1.push(ms(t));
        let t = Instant::now();
        let Update::Delta(deltas) = tr.apply(change, &node) else {
            bail!("one endpoint added translated in full");
        };
        steps[4].1.push(ms(t));
        let t = Instant::now();
        programmer
            .apply_delta(&port_changes(&deltas), &mut maps, Instant::now())?
            .context("the delta was not applied")?;
        steps[5].1.push(ms(t));
        let t = Instant::now();
        let desired = tr.full(&node);
        programmer.apply(&desired, &mut maps, Instant::now())?;
        steps[6].1.push(ms(t));
        drop(maps);
        drop(dp);
        drop(pins);
    }
    Ok(steps.into_iter().map(|(k, v)| (k, median(v))).collect())
}
