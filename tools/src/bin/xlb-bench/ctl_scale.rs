//! Control plane at cluster scale (issue 15): for each size (10,000 and 100,000 Services x
//! 10 endpoints by default) and each source (one file, a directory of files of
//! [`DIR_FILE_SERVICES`] Services each, the API server stand-in with `--source kube`), one
//! node's lb-agent is started empty, then:
//!
//! - bulk: every Service at once (one manifest write / the objects created in the API
//!   server), timed until the last Service's backends are in the maps;
//! - change: one endpoint removed from the last Service, then given back, alternately
//!   (100-400 ms apart, more than the agent's batching period, so each is a single change),
//!   timed until the maps show it;
//! - burst: 1,000 Services each lose an endpoint (file: one write; kube: 1,000 updates
//!   sent as fast as the stand-in takes them), timed until the maps show all of them;
//! - the agent's memory (VmRSS, and RssAnon: its heap, without the mmapped Maglev arena)
//!   and CPU time (utime + stime from /proc) before and after.
//!
//! The agent gets map capacities that fit the size (`--max-services`, `--max-frontends`,
//! `--max-backends`, `--maglev-arena`); everything else is its defaults.
use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_tests::{Cluster, NodeSpec, SourceMode, TopologySpec};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::rules::{self, NAMESPACE, SvcDef};

const EP_BASE: u32 = u32::from_be_bytes([10, 128, 0, 0]);
const SVC_BASE: u32 = u32::from_be_bytes([10, 100, 0, 1]);
const NODE: &str = "ctl-node";
const OTHER_NODE: &str = "ctl-other";
const BURST: u32 = 1_000;
/// Services per file of the directory source (as a manifest per namespace or application).
pub const DIR_FILE_SERVICES: usize = 100;

/// The directory source's file holding Service `i`.
fn dir_file(i: usize) -> String {
    format!("svc-{:05}.yaml", i / DIR_FILE_SERVICES)
}

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(default)]
pub struct Scale {
    pub services: u32,
    pub endpoints: u32,
    /// "file" (one file), "dir" (a directory of files) or "kube".
    pub source: String,
    pub agent_args: Vec<String>,
    /// Bytes of the manifest (file source).
    pub manifest_bytes: usize,
    /// ms from the write (file) / the first create (kube) to the last Service in the maps.
    pub bulk_ms: f64,
    /// kube: ms the stand-in took to take all objects (included in bulk_ms).
    pub bulk_load_ms: f64,
    /// ms from one endpoint change to the maps showing it.
    pub change_ms: Vec<f64>,
    /// ms the change itself took, within `change_ms`: the rename (file, dir) or the
    /// update call (kube). A slow one is the writer's filesystem or the stand-in, not the
    /// agent.
    pub change_commit_ms: Vec<f64>,
    /// ms from the start of a burst of [`BURST`] endpoint changes to the maps showing all.
    pub burst_ms: f64,
    /// kube: ms to send the burst's updates (included in burst_ms).
    pub burst_send_ms: f64,
    pub burst_changes: u32,
    /// KiB, agent started with no Service / after the bulk.
    pub rss_empty_kib: u64,
    pub rss_loaded_kib: u64,
    pub anon_empty_kib: u64,
    pub anon_loaded_kib: u64,
    /// Agent CPU seconds (user + system) for the bulk, and per single change (mean).
    pub cpu_bulk_s: f64,
    pub cpu_per_change_ms: f64,
    pub cpu_burst_s: f64,
    /// ms from starting the agent (stopped, its pins removed: nothing programmed) with
    /// every Service already in its source to the last Service in the maps: a node's
    /// restart or the DaemonSet's rollout. Loading the programs is included.
    pub start_ms: f64,
    /// Agent CPU seconds of that start, and its memory after it (KiB).
    pub cpu_start_s: f64,
    pub rss_start_kib: u64,
    pub anon_start_kib: u64,
}

impl Scale {
    /// Heap bytes per service port beyond the BPF maps (RssAnon growth / ports).
    pub fn anon_bytes_per_port(&self) -> f64 {
        (self.anon_loaded_kib.saturating_sub(self.anon_empty_kib) as f64 * 1024.0)
            / f64::from(self.services.max(1))
    }

    /// The same after a start with every Service in the source (one full pass, no
    /// history of changes).
    pub fn start_anon_bytes_per_port(&self) -> f64 {
        (self.anon_start_kib.saturating_sub(self.anon_empty_kib) as f64 * 1024.0)
            / f64::from(self.services.max(1))
    }
}

pub const METHOD: &[&str] = &[
    "Scale runs: one node, one lb-agent (release build) started with an empty source and \
     map capacities for the size (--max-services, --max-frontends, --max-backends = size + \
     headroom, --maglev-arena = 2 x 1021 x (services + 64)); other flags default (so \
     --min-sync-period 100ms, --sync-period 10m). Endpoints are on another node.",
    "bulk: all Services x 10 endpoints at once: file = one manifest (kubectl's List \
     shape), dir = one file per 100 Services (the same shape), written beforehand under \
     hidden names and renamed into place (dir: one after another; the agent starts on the \
     first and takes the rest in batches), kube = every object created in the API server \
     stand-in (tests/src/apiserver.rs, in the bench process, watched by the agent over \
     HTTP); timed from the first rename (kube: the first create) until the last Service's \
     XLB_SERVICES entry has 10 backends.",
    "change: the last Service's EndpointSlice loses its 10th endpoint, then gets it back, \
     alternately, 100-400 ms apart (pseudo-random); timed from the change (file: the rename \
     of the new text, written beforehand under a temporary name, into place — the moment \
     the change exists for a reader, the replaced file being kept linked until the change \
     is seen, as freeing a 17 MB file takes 10-45 ms inside the rename on ext4; kube: the \
     update handed to the stand-in) until \
     XLB_SERVICES shows the new count, polled every 0.5 ms (the rename's or the update's own \
     time is recorded beside it: change_commit_ms). file: the whole file is rewritten; dir: the last file (100 \
     Services). The agent learns of a file change from inotify (its directory is watched).",
    "burst: the first 1,000 Services lose their 10th endpoint: file = one write changing \
     1,000 EndpointSlices; dir = the 10 files holding them rewritten; kube = 1,000 EndpointSlice updates sent one after another; timed \
     until all 1,000 show 9 backends.",
    "memory: /proc/<agent>/status VmRSS and RssAnon after start (no Service) and after the \
     bulk; RssAnon is the agent's heap (objects, translation, programmer state), VmRSS adds \
     the touched pages of the mmapped Maglev arena and the binary. CPU: utime + stime of \
     the agent from /proc/<agent>/stat around each phase.",
    "start: last, the agent is stopped, its pins (maps, programs) removed, and started \
     again with every Service in its source (kube: in the stand-in), as on a node's restart \
     or a DaemonSet rollout; timed from the start of the process (loading and attaching the \
     programs included) until the last Service's XLB_SERVICES entry has its backends; \
     memory after it, against the first start's with no Service.",
];

/// New texts for files of the manifest, written beside them under hidden temporary names
/// (which the agent skips) and put in place by [`Staged::commit`]: a change exists for a
/// reader from the rename on, so that is when its clock starts (writing 168 MB is the
/// writer's work, not the agent's latency; so is syncing it, done before). The files they
/// replace are kept (hard-linked under another hidden name) until the [`Replaced`] that
/// `commit` returns is dropped, after the measurement: a rename over the last link of a
/// 17 MB file frees its pages and blocks inside the rename, 10-45 ms of the writer's time
/// on ext4 that would otherwise be counted as the agent's (the agent reads the new file
/// meanwhile, on the other core).
struct Staged {
    files: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    kept: Replaced,
}

impl Staged {
    /// `files`: (name in the directory, text); one file: a single entry, name ignored.
    fn write(cluster: &Cluster, files: &[(String, String)], dir: bool) -> Result<Self> {
        let mut out = Vec::with_capacity(files.len());
        let mut kept = Replaced(Vec::new());
        for (name, text) in files {
            let dest = if dir {
                cluster.manifest.join(name)
            } else {
                cluster.manifest.clone()
            };
            let file = dest.file_name().context("manifest path")?.to_string_lossy();
            let tmp = dest.with_file_name(format!(".{file}.tmp"));
            // Synced before the rename, as a careful writer does: otherwise the rename
            // starts the new file's writeback (ext4's replace-by-rename rule) and the
            // disk's work lands in the timed window.
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            std::io::Write::write_all(&mut f, text.as_bytes())
                .and_then(|()| f.sync_all())
                .with_context(|| format!("writing {}", tmp.display()))?;
            let old = dest.with_file_name(format!(".{file}.old"));
            let _ = std::fs::remove_file(&old);
            if std::fs::hard_link(&dest, &old).is_ok() {
                kept.0.push(old);
            }
            out.push((tmp, dest));
        }
        Ok(Self { files: out, kept })
    }

    fn commit(self) -> Result<Replaced> {
        for (tmp, dest) in &self.files {
            std::fs::rename(tmp, dest)
                .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
        }
        Ok(self.kept)
    }
}

/// The files a [`Staged::commit`] replaced, removed when dropped, and the removal committed
/// to the disk at once (the directory synced): the filesystem frees a large file's blocks
/// at its next journal commit (and discards them, with `-o discard`), which on 2 cores
/// stole up to 40 ms from whichever change was being timed then.
struct Replaced(Vec<std::path::PathBuf>);

impl Drop for Replaced {
    fn drop(&mut self) {
        for old in &self.0 {
            let _ = std::fs::remove_file(old);
        }
        if let Some(dir) = self.0.first().and_then(|p| p.parent()) {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
    }
}

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

/// The EndpointSlice `rules::manifest` writes for `s`, as an API object.
fn slice_json(s: &SvcDef) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-x1", s.name),
            "namespace": NAMESPACE,
            "labels": {"kubernetes.io/service-name": s.name},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": s.endpoints.iter().map(|(ip, _, node)| json!({
            "addresses": [ip.to_string()],
            "nodeName": node,
            "conditions": {"ready": true, "serving": true, "terminating": false},
        })).collect::<Vec<_>>(),
    })
}

/// The agent process whose command line names `pin_dir`.
fn agent_pid(pin_dir: &Path) -> Option<u32> {
    let want = pin_dir.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("lb-agent")) && args.contains(&want) {
            return Some(pid);
        }
    }
    None
}

/// (VmRSS, RssAnon) in KiB.
fn mem_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

/// utime + stime in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')': state
    // (field 3) first, so utime (field 14) and stime (15) are the 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let (ut, st) = (num(11), num(12));
    (ut + st) as f64 / 100.0
}

pub fn run(n: u32, e: u32, source: &str, repeats: usize) -> Result<Scale> {
    let kube = source == "kube";
    let dir = source == "dir";
    // "json": one file, as `kubectl get -o json` writes it.
    let file_text = |state: &[SvcDef]| -> String {
        let y = rules::manifest(state);
        if source != "json" {
            return y;
        }
        let v: serde_yaml::Value = serde_yaml::from_str(&y).expect("the bench's own YAML");
        serde_json::to_string_pretty(&v).expect("serialisable")
    };
    let m = lb_agent::dataplane::maglev::choose_m(
        e as usize,
        lb_agent::dataplane::maglev::DEFAULT_MIN_M,
    );
    let head = 64u64;
    let agent_args: Vec<String> = [
        ("--max-services", u64::from(n) + head),
        ("--max-frontends", u64::from(n) + head),
        ("--max-backends", u64::from(n) * u64::from(e) + head),
        ("--maglev-arena", 2 * u64::from(m) * (u64::from(n) + head)),
    ]
    .iter()
    .flat_map(|(k, v)| [(*k).to_owned(), v.to_string()])
    .collect();
    let mut out = Scale {
        services: n,
        endpoints: e,
        source: source.into(),
        agent_args: agent_args.clone(),
        burst_changes: BURST.min(n),
        ..Default::default()
    };
    let all = svcs(n, e);
    let empty = rules::manifest(&[]);
    eprintln!("▶ control plane at scale: {n} services x {e} endpoints, {source} source");

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
    let mode = match source {
        "kube" => SourceMode::Kube,
        "dir" => SourceMode::Dir,
        "file" | "json" => SourceMode::File,
        other => bail!("unknown source {other:?}: file, json, dir or kube"),
    };
    // The directory's files for the given Services (index of each file's first Service).
    let files_of = |state: &[SvcDef], first: usize, last: usize| -> Vec<(String, String)> {
        let (a, b) = (first / DIR_FILE_SERVICES, last / DIR_FILE_SERVICES);
        (a..=b)
            .map(|f| {
                let lo = f * DIR_FILE_SERVICES;
                let hi = (lo + DIR_FILE_SERVICES).min(state.len());
                (dir_file(lo), rules::manifest(&state[lo..hi]))
            })
            .collect()
    };
    let put = |cluster: &Cluster, files: &[(String, String)]| -> Result<()> {
        for (name, text) in files {
            cluster.write_manifest_file(name, text)?;
        }
        Ok(())
    };
    let mut cluster = Cluster::up_with_args(&spec, |_| empty.clone(), mode, &agent_args)?;
    cluster.wait_for("the agent", Duration::from_secs(60), |s| s.agent.is_some())?;
    let pin_dir = cluster.agents[0].pin_dir.clone();
    let maps = crate::ctl::Maps::open(&pin_dir)?;
    let pid = agent_pid(&pin_dir).context("finding the agent's pid")?;
    std::thread::sleep(Duration::from_millis(500));
    (out.rss_empty_kib, out.anon_empty_kib) = mem_kib(pid);
    let log = cluster.agents[0].log.clone();
    let log_at = || {
        (
            log.as_path(),
            std::fs::metadata(&log).map_or(0, |m| m.len() as usize),
        )
    };
    let timeout = Duration::from_secs(600);
    let last = all.last().expect("n >= 1").clone();

    // ---- bulk
    let cpu0 = cpu_s(pid);
    let from = log_at();
    let mut t0 = Instant::now();
    if kube {
        let api = cluster.api();
        for s in &all {
            api.apply(&json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": s.name, "namespace": NAMESPACE},
                "spec": {"type": "ClusterIP", "clusterIP": s.cluster_ip.to_string(),
                         "ports": [{"name": "p", "port": s.port, "protocol": "TCP",
                                    "targetPort": 8080}]},
            }))?;
            api.apply(&slice_json(s))?;
        }
        out.bulk_load_ms = t0.elapsed().as_secs_f64() * 1e3;
    } else if dir {
        let files = files_of(&all, 0, all.len() - 1);
        out.manifest_bytes = files.iter().map(|f| f.1.len()).sum();
        let staged = Staged::write(&cluster, &files, true)?;
        t0 = Instant::now();
        let _replaced = staged.commit()?;
        out.bulk_load_ms = t0.elapsed().as_secs_f64() * 1e3;
    } else {
        let text = file_text(&all);
        out.manifest_bytes = text.len();
        let staged = Staged::write(&cluster, &[(String::new(), text)], false)?;
        t0 = Instant::now();
        let _replaced = staged.commit()?;
        out.bulk_load_ms = t0.elapsed().as_secs_f64() * 1e3;
    }
    let first = all.first().expect("n >= 1");
    maps.wait(t0, first.cluster_ip, first.port, timeout, from, |b| {
        b == Some(e)
    })?;
    out.bulk_ms = maps.wait(t0, last.cluster_ip, last.port, timeout, from, |b| {
        b == Some(e)
    })?;
    // Let the agent settle (logs, status file) before reading its CPU and memory.
    std::thread::sleep(Duration::from_millis(1000));
    out.cpu_bulk_s = cpu_s(pid) - cpu0;
    (out.rss_loaded_kib, out.anon_loaded_kib) = mem_kib(pid);
    eprintln!(
        "  bulk: {:.0} ms (agent CPU {:.2} s); RssAnon {} -> {} KiB ({:.0} B per service port)",
        out.bulk_ms,
        out.cpu_bulk_s,
        out.anon_empty_kib,
        out.anon_loaded_kib,
        out.anon_bytes_per_port()
    );
    if !cluster.agents[0].alive() {
        bail!("lb-agent exited: {}", cluster.agents[0].log_text());
    }

    // ---- single changes: the last Service loses / regains its last endpoint.
    let mut minus = last.clone();
    minus.endpoints.pop();
    let mut state = all.clone();
    let write = |cluster: &Cluster, state: &[SvcDef], changed: &[&SvcDef]| -> Result<()> {
        if dir {
            put(cluster, &files_of(state, 0, state.len() - 1))
        } else if !kube {
            cluster.write_manifest(&file_text(state))
        } else {
            for s in changed {
                cluster.api().update(&slice_json(s))?;
            }
            Ok(())
        }
    };
    // The file source's text is rendered before the clock starts (the directory source:
    // the last file's).
    let texts = (!kube).then(|| {
        let mut a = all.clone();
        *a.last_mut().expect("n >= 1") = minus.clone();
        if dir {
            let k = all.len() - 1;
            (files_of(&a, k, k), files_of(&all, k, k))
        } else {
            (
                vec![(String::new(), file_text(&a))],
                vec![(String::new(), file_text(&all))],
            )
        }
    });
    let mut seed = 0x2545_f491u32;
    let cpu0 = cpu_s(pid);
    for k in 0..repeats {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        std::thread::sleep(Duration::from_millis(100 + u64::from(seed % 300)));
        let (s, want) = if k % 2 == 0 {
            (&minus, e - 1)
        } else {
            (&last, e)
        };
        let staged = match &texts {
            Some((m, f)) => Some(Staged::write(
                &cluster,
                if k % 2 == 0 { m } else { f },
                dir,
            )?),
            None => None,
        };
        let from = log_at();
        let t0 = Instant::now();
        // The replaced file goes after the measurement (see Staged).
        let _replaced = match staged {
            Some(staged) => Some(staged.commit()?),
            None => {
                cluster.api().update(&slice_json(s))?;
                None
            }
        };
        out.change_commit_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let ms = maps.wait(
            t0,
            last.cluster_ip,
            last.port,
            Duration::from_secs(60),
            from,
            |b| b == Some(want),
        )?;
        out.change_ms.push(ms);
    }
    out.cpu_per_change_ms = (cpu_s(pid) - cpu0) * 1e3 / repeats.max(1) as f64;
    if repeats % 2 == 1 {
        write(&cluster, &state, &[&last])?;
        maps.wait(
            Instant::now(),
            last.cluster_ip,
            last.port,
            timeout,
            log_at(),
            |b| b == Some(e),
        )?;
    }
    let (p50, p99) = (
        crate::ctl::p(&out.change_ms, 50.0),
        crate::ctl::p(&out.change_ms, 99.0),
    );
    eprintln!(
        "  one endpoint change: p50 {p50:.1} ms, p99 {p99:.1} ms over {} (agent CPU {:.2} ms \
         each; the change itself took up to {:.1} ms)",
        out.change_ms.len(),
        out.cpu_per_change_ms,
        out.change_commit_ms.iter().copied().fold(0.0, f64::max)
    );

    // ---- burst: the first BURST Services lose their last endpoint.
    std::thread::sleep(Duration::from_millis(300));
    let k = out.burst_changes as usize;
    for s in state.iter_mut().take(k) {
        s.endpoints.pop();
    }
    let staged = if dir {
        Some(Staged::write(&cluster, &files_of(&state, 0, k - 1), true)?)
    } else if !kube {
        Some(Staged::write(
            &cluster,
            &[(String::new(), file_text(&state))],
            false,
        )?)
    } else {
        None
    };
    let cpu0 = cpu_s(pid);
    let from = log_at();
    let t0 = Instant::now();
    let _replaced = match staged {
        Some(staged) => Some(staged.commit()?),
        None => {
            let changed: Vec<&SvcDef> = state.iter().take(k).collect();
            write(&cluster, &state, &changed)?;
            None
        }
    };
    out.burst_send_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut pending: Vec<&SvcDef> = state.iter().take(k).collect();
    while !pending.is_empty() {
        pending.retain(|s| maps.backends(s.cluster_ip, s.port) != Some(e - 1));
        if t0.elapsed() > timeout {
            bail!(
                "burst: {} services not updated after {timeout:?}",
                pending.len()
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    out.burst_ms = t0.elapsed().as_secs_f64() * 1e3;
    let _ = from;
    std::thread::sleep(Duration::from_millis(300));
    out.cpu_burst_s = cpu_s(pid) - cpu0;
    eprintln!(
        "  burst of {k} endpoint changes: {:.0} ms (sent in {:.0} ms; agent CPU {:.2} s)",
        out.burst_ms, out.burst_send_ms, out.cpu_burst_s
    );
    if !cluster.agents[0].alive() {
        bail!("lb-agent exited: {}", cluster.agents[0].log_text());
    }

    // ---- start: the agent stopped, its pins removed, started with everything in place.
    let want_last = state.last().map_or(e, |s| s.endpoints.len() as u32);
    drop(maps);
    cluster.agents[0].stop_now();
    std::fs::remove_dir_all(&pin_dir)
        .with_context(|| format!("removing the agent's pins {}", pin_dir.display()))?;
    let from = log_at();
    let t0 = Instant::now();
    cluster.agents[0].restart()?;
    let maps = loop {
        // The maps exist once the agent has pinned them.
        match crate::ctl::Maps::open(&pin_dir) {
            Ok(m) => break m,
            Err(_) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(1)),
            Err(err) => return Err(err.context("the restarted agent's maps")),
        }
    };
    out.start_ms = maps.wait(t0, last.cluster_ip, last.port, timeout, from, |b| {
        b == Some(want_last)
    })?;
    let pid = agent_pid(&pin_dir).context("finding the restarted agent's pid")?;
    std::thread::sleep(Duration::from_millis(1000));
    out.cpu_start_s = cpu_s(pid);
    (out.rss_start_kib, out.anon_start_kib) = mem_kib(pid);
    eprintln!(
        "  start with everything in the source: {:.0} ms (agent CPU {:.2} s); RssAnon {} KiB \
         ({:.0} B per service port)",
        out.start_ms,
        out.cpu_start_s,
        out.anon_start_kib,
        out.start_anon_bytes_per_port()
    );
    if !cluster.agents[0].alive() {
        bail!("lb-agent exited: {}", cluster.agents[0].log_text());
    }
    drop(maps);
    drop(cluster);
    Ok(out)
}

/// kube-proxy's iptables mode at a size beyond the main control-plane test: the full
/// ruleset restored once, then one service's chains (`--noflush`, its partial sync) with
/// an endpoint removed and given back, alternately. nftables is left out at this size: one
/// full `nft -f` of 100,000 Services takes many minutes (33 s at 10,000).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
#[serde(default)]
pub struct KubeProxyScale {
    pub services: u32,
    pub endpoints: u32,
    pub iptables_rules: usize,
    pub iptables_full_ms: f64,
    /// The full restore did not finish within [`KUBE_PROXY_TIMEOUT_S`] (killed; no partial
    /// syncs measured).
    pub iptables_full_timed_out: bool,
    pub iptables_partial_ms: Vec<f64>,
}

/// Bound on one full iptables-restore at scale (3.2 million rules at 100,000 x 10 did not
/// finish in 15 minutes on the 2-core machine).
pub const KUBE_PROXY_TIMEOUT_S: u32 = 600;

pub fn kube_proxy(n: u32, e: u32, repeats: usize) -> Result<KubeProxyScale> {
    eprintln!("▶ kube-proxy iptables at {n} services x {e} endpoints");
    let all = svcs(n, e);
    let last = all.last().expect("n >= 1").clone();
    let mut minus = last.clone();
    let gone = minus.endpoints.pop().map(|(ip, port, _)| (ip, port));
    let (ipt, rules_n) = rules::iptables_full(&all);
    drop(all);
    let dir = std::env::temp_dir();
    let write = |what: &str, text: &str| -> Result<String> {
        let p = dir.join(format!("xlb-bench-{}-{what}.rules", std::process::id()));
        std::fs::write(&p, text)?;
        Ok(p.to_string_lossy().into_owned())
    };
    let full = write("scale-ipt-full", &ipt)?;
    drop(ipt);
    let del = write(
        "scale-ipt-del",
        &rules::iptables_partial(&minus, gone.as_slice()),
    )?;
    let add = write("scale-ipt-add", &rules::iptables_partial(&last, &[]))?;
    let ns = lb_tests::Netns::new("ctlscale")?;
    let timed = |argv: &[&str]| -> Result<f64> {
        let t0 = Instant::now();
        lb_tests::exec_ok(ns.name(), argv)?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    let mut out = KubeProxyScale {
        services: n,
        endpoints: e,
        iptables_rules: rules_n,
        ..Default::default()
    };
    // Bounded: a restore this size may take many minutes.
    let limit = KUBE_PROXY_TIMEOUT_S.to_string();
    match timed(&["timeout", &limit, "iptables-restore", &full]) {
        Ok(ms) => out.iptables_full_ms = ms,
        Err(e) if format!("{e:#}").contains("exit status: 124") => {
            eprintln!("  iptables-restore full ({rules_n} nat rules): not done after {limit} s");
            out.iptables_full_ms = f64::from(KUBE_PROXY_TIMEOUT_S) * 1e3;
            out.iptables_full_timed_out = true;
            drop(ns);
            for f in [full, del, add] {
                let _ = std::fs::remove_file(f);
            }
            return Ok(out);
        }
        Err(e) => return Err(e.context("iptables-restore (full)")),
    }
    eprintln!(
        "  iptables-restore full ({rules_n} nat rules): {:.0} ms",
        out.iptables_full_ms
    );
    for k in 0..repeats {
        let f = if k % 2 == 0 { &del } else { &add };
        out.iptables_partial_ms
            .push(timed(&["iptables-restore", "--noflush", f]).context("iptables partial")?);
    }
    eprintln!(
        "  iptables-restore --noflush, one service: p50 {:.0} ms over {}",
        crate::ctl::p(&out.iptables_partial_ms, 50.0),
        repeats
    );
    drop(ns);
    for f in [full, del, add] {
        let _ = std::fs::remove_file(f);
    }
    Ok(out)
}
