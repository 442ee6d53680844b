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
    /// Agent arguments used.
    pub agent_args: Vec<String>,
    pub method: Vec<String>,
}

pub const METHOD: &[&str] = &[
    "One node (no pods), one lb-agent with --source file:, --maglev-min-m 251 and an arena \
     sized for the services (10 endpoints -> M = 1021 per service, two tables each). \
     Endpoints are on another node (remote).",
    "bulk: the manifest goes from no service to all N services x E endpoints in one write; \
     measured until the last service's ClusterIP frontend is in XLB_FRONTENDS and its \
     XLB_SERVICES entry has E backends. Repeated after emptying the manifest.",
    "change: with the N services programmed, the last service gains an 11th endpoint, then \
     loses it again, alternately; measured until its backend count in XLB_SERVICES changes. \
     Each write happens at a pseudo-random offset (0-299 ms) from the previous one. The \
     agent's file source polls the file's mtime every 300 ms and re-reads the whole file.",
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
        })
        .collect()
}

/// The 11th endpoint of the last service.
fn extra_ep(n: u32) -> (Ipv4Addr, u16) {
    (Ipv4Addr::from(EP_BASE + (n - 1) * 16 + 15), 8080)
}

struct Maps {
    frontends: BpfHashMap<MapData, FrontendKey, Frontend>,
    services: BpfHashMap<MapData, u32, Service>,
}

impl Maps {
    fn open(pin_dir: &Path) -> Result<Self> {
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
    fn backends(&self, ip: Ipv4Addr, port: u16) -> Option<u32> {
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

    /// Polls until `ok(backends)`; returns the elapsed time since `t0`.
    fn wait(
        &self,
        t0: Instant,
        ip: Ipv4Addr,
        port: u16,
        timeout: Duration,
        ok: impl Fn(Option<u32>) -> bool,
    ) -> Result<f64> {
        loop {
            if ok(self.backends(ip, port)) {
                return Ok(t0.elapsed().as_secs_f64() * 1e3);
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
    let (n, e) = (args.ctl_services, args.ctl_endpoints);
    anyhow::ensure!(
        n >= 1 && (1..=14).contains(&e),
        "--ctl-services >= 1, --ctl-endpoints 1..=14"
    );
    let m = lb_agent::maglev::choose_m(e as usize + 1, 251);
    let arena = (2 * u64::from(m) * (u64::from(n) + 8))
        .next_power_of_two()
        .max(u64::from(lb_common::DEFAULT_MAGLEV_ARENA));
    let agent_args: Vec<String> = [
        "--maglev-min-m".to_owned(),
        "251".into(),
        "--maglev-arena".into(),
        arena.to_string(),
    ]
    .into();
    let mut out = ControlPlane {
        services: n,
        endpoints: e,
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
    let timeout = Duration::from_secs(300);
    for r in 0..args.ctl_bulk_repeats {
        cluster.write_manifest(&empty)?;
        maps.wait(Instant::now(), last.cluster_ip, last.port, timeout, |b| {
            b.is_none()
        })?;
        std::thread::sleep(Duration::from_millis(400));
        let t0 = Instant::now();
        cluster.write_manifest(&full)?;
        let ms = maps.wait(t0, last.cluster_ip, last.port, timeout, |b| b == Some(e))?;
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
        std::thread::sleep(Duration::from_millis(u64::from(seed % 300)));
        let (text, want) = if k % 2 == 0 {
            (&full_plus, e + 1)
        } else {
            (&full, e)
        };
        let t0 = Instant::now();
        cluster.write_manifest(text)?;
        let ms = maps.wait(
            t0,
            last.cluster_ip,
            last.port,
            Duration::from_secs(60),
            |b| b == Some(want),
        )?;
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
    Ok(out)
}

fn p(v: &[f64], q: f64) -> f64 {
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
