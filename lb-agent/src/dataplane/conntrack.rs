//! Connection tracking in user space: the garbage collector of `XLB_CT`, `XLB_CT_NEW` and
//! `XLB_REVNAT`, and the conntrack timeout flags' parser. The maps are read through
//! [`crate::dataplane::bpf_table`]; the SNAT port range is chosen and checked in
//! [`crate::model::ports`].
//!
//! # Garbage collection
//!
//! The datapath treats an expired entry as absent (`lb_common::ct_expired`) and reuses the
//! SNAT port of a flow that is over, so nothing here is needed for correctness: the GC
//! gives back the memory of dead flows before the LRU has to evict something (LRU order is
//! by last use, so an idle but live established flow can go before an expired SYN), keeps
//! `xlb_conntrack_entries` meaningful and counts the SNAT ports in use.
//!
//! A sweep ([`sweep`]):
//! 1. walks `XLB_CT` then `XLB_CT_NEW` (`BPF_MAP_LOOKUP_BATCH`, 4,096 entries per call;
//!    `get_next_key` + lookup on kernels without it) and remembers the live entries;
//! 2. deletes the expired ones ([`keep_ct`]), each re-read just before its deletion so
//!    that an entry the datapath refreshed meanwhile stays;
//! 3. walks `XLB_REVNAT` and checks each entry against its owner in the live set
//!    ([`keep_revnat`]: owner missing, expired, or using another reply port);
//! 4. waits [`GC_GRACE`] (the datapath writes a new flow's reverse entry a few microseconds
//!    before its conntrack entry), then re-reads each condemned reverse entry and its owner
//!    from the maps and deletes it only if it is still stale.
//!
//! Nothing is deleted during a walk: deleting the key a `get_next_key` walk stands on makes
//! the kernel restart from the first bucket.
//!
//! The first sweep runs when the agent starts (an extra one, outside the schedule). The
//! interval adapts like Cilium's ([`next_interval`]): it starts at [`GC_MIN_INTERVAL`]
//! (10 s), halves when a sweep deleted more than a quarter of a map's capacity, doubles
//! when it deleted less than 5 %, within 10 s .. 10 min; a map left more than 80 % full
//! brings it back to 10 s. Between sweeps, every 10 s, the datapath's new-flow counters
//! (`ct_miss` + `ct_rebalance`, each at most one new entry per map) give an upper bound
//! of each map's fill; a bound above 80 % sweeps early ([`near_full`]).
use std::{
    collections::{BTreeMap, HashMap},
    fmt, io,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray};
use lb_common::*;
use tokio::task::JoinHandle;

use crate::{
    dataplane::bpf_table::{BpfTable, Table},
    serve::metrics::Metrics,
};

/// Shortest and longest time between two sweeps.
pub const GC_MIN_INTERVAL: Duration = Duration::from_secs(10);
pub const GC_MAX_INTERVAL: Duration = Duration::from_secs(600);
/// A sweep that deleted more than this share of a map's capacity halves the interval...
pub const GC_SHRINK_ABOVE: f64 = 0.25;
/// ...and one that deleted less than this share (of every map) doubles it.
pub const GC_GROW_BELOW: f64 = 0.05;
/// A map filled above this share (after a sweep, or estimated between sweeps) is swept
/// again after [`GC_MIN_INTERVAL`].
pub const GC_NEAR_FULL: f64 = 0.8;
/// The datapath's clock (`bpf_ktime_get_coarse_ns`) lags CLOCK_MONOTONIC by up to a tick:
/// an entry is deleted only once it is expired by this many milliseconds more.
pub const GC_CLOCK_SLACK_MS: u32 = 1_000;
/// Time between condemning a reverse entry and re-checking it before the deletion.
pub const GC_GRACE: Duration = Duration::from_millis(100);

/// CLOCK_MONOTONIC in milliseconds, wrapping at 2^32: the datapath's clock
/// (`CtEntry::last_seen_ms`).
pub fn monotonic_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
}

// ------------------------------------------------------------------ decisions

/// A conntrack entry stays unless it is expired (with [`GC_CLOCK_SLACK_MS`] to spare).
/// `confirmed`: it is in `XLB_CT`.
pub fn keep_ct(cfg: &Config, e: &CtEntry, confirmed: bool, now_ms: u32) -> bool {
    !ct_expired(cfg, e, confirmed, now_ms.wrapping_sub(GC_CLOCK_SLACK_MS))
}

/// A reverse-NAT entry `rev` under `key` stays while its owner — the first live entry
/// under `rev.ct_key(key.proto)` in `XLB_CT`, else in `XLB_CT_NEW` (`confirmed` says
/// which) — exists, is kept by [`keep_ct`] and expects replies on `key`'s destination
/// port: its SNAT port when it is source-NATed, the client's own port otherwise. These
/// are the datapath's own checks on a reply (`ct::seen_reply`), so an entry the datapath
/// would still use is never deleted.
pub fn keep_revnat(
    cfg: &Config,
    key: &FlowKey,
    rev: &RevNat,
    owner: Option<(&CtEntry, bool)>,
    now_ms: u32,
) -> bool {
    let Some((e, confirmed)) = owner else {
        return false;
    };
    if !keep_ct(cfg, e, confirmed, now_ms) {
        return false;
    }
    let port = if e.flags & CT_SNAT != 0 {
        e.snat_port_be
    } else {
        rev.dst_port_be
    };
    key.dst_port_be == port
}

/// The interval after a sweep that took `prev` to come and deleted `deleted_share` of a
/// map's capacity (the largest share over the maps), leaving the fullest map `fill` full.
pub fn next_interval(prev: Duration, deleted_share: f64, fill: f64) -> Duration {
    if fill >= GC_NEAR_FULL {
        return GC_MIN_INTERVAL;
    }
    let next = if deleted_share > GC_SHRINK_ABOVE {
        prev / 2
    } else if deleted_share < GC_GROW_BELOW {
        prev * 2
    } else {
        prev
    };
    next.clamp(GC_MIN_INTERVAL, GC_MAX_INTERVAL)
}

/// What the last sweep left, to estimate the maps' fill until the next one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pressure {
    /// Entries left in `XLB_CT`, `XLB_CT_NEW`, `XLB_REVNAT`, and their capacities.
    pub entries: [u64; 3],
    pub capacity: [u32; 3],
    /// The datapath's new-flow counters at the sweep.
    pub new_flows: u64,
}

/// Some map may be more than [`GC_NEAR_FULL`] full: each new flow since the sweep (now
/// `new_flows` in all) added at most one entry to each map.
pub fn near_full(p: &Pressure, new_flows: u64) -> bool {
    let added = new_flows.saturating_sub(p.new_flows);
    p.entries
        .iter()
        .zip(p.capacity)
        .any(|(&n, cap)| (n + added) as f64 >= GC_NEAR_FULL * cap as f64)
}

// ------------------------------------------------------------------ sweep

/// The three maps of one sweep.
pub struct CtMaps<'a> {
    pub ct: &'a dyn Table<FlowKey, CtEntry>,
    pub ct_new: &'a dyn Table<FlowKey, CtEntry>,
    pub revnat: &'a dyn Table<FlowKey, RevNat>,
}

/// One map in a sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapSweep {
    pub capacity: u32,
    /// Entries the walk found.
    pub seen: u64,
    pub deleted: u64,
}

impl MapSweep {
    /// Entries left (approximately: the datapath adds and removes entries meanwhile).
    pub fn entries(&self) -> u64 {
        self.seen.saturating_sub(self.deleted)
    }

    fn share(&self, n: u64) -> f64 {
        if self.capacity == 0 {
            0.0
        } else {
            n as f64 / self.capacity as f64
        }
    }
}

/// A backend that SNAT ports point at: reverse entries keyed (backend -> SNAT address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SnatBackend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

impl SnatBackend {
    /// `xlb_snat_ports_in_use` labels: `10.244.2.5:80` and `tcp`/`udp`.
    pub fn labels(&self) -> (String, String) {
        let proto = match self.proto {
            PROTO_TCP => "tcp".to_string(),
            PROTO_UDP => "udp".to_string(),
            p => p.to_string(),
        };
        (format!("{}:{}", self.addr, self.port), proto)
    }
}

/// What a sweep found and did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepReport {
    pub ct: MapSweep,
    pub ct_new: MapSweep,
    pub revnat: MapSweep,
    /// Live reverse entries addressed to the SNAT address and range, by backend.
    pub snat_ports: BTreeMap<SnatBackend, u64>,
    /// Time spent sweeping ([`GC_GRACE`] excluded).
    pub duration: Duration,
    /// Map operations that failed (the sweep goes on without them).
    pub errors: Vec<String>,
}

impl SweepReport {
    /// (`map` label, the map's sweep).
    pub fn maps(&self) -> [(&'static str, &MapSweep); 3] {
        [
            ("ct", &self.ct),
            ("ct_new", &self.ct_new),
            ("revnat", &self.revnat),
        ]
    }

    /// The largest share of a map's capacity deleted.
    pub fn deleted_share(&self) -> f64 {
        self.maps()
            .iter()
            .map(|(_, m)| m.share(m.deleted))
            .fold(0.0, f64::max)
    }

    /// The largest share of a map's capacity left in use.
    pub fn fill(&self) -> f64 {
        self.maps()
            .iter()
            .map(|(_, m)| m.share(m.entries()))
            .fold(0.0, f64::max)
    }

    pub fn pressure(&self, new_flows: u64) -> Pressure {
        Pressure {
            entries: [
                self.ct.entries(),
                self.ct_new.entries(),
                self.revnat.entries(),
            ],
            capacity: [self.ct.capacity, self.ct_new.capacity, self.revnat.capacity],
            new_flows,
        }
    }
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, m) in self.maps() {
            write!(f, "{name} {}/{} (-{}) ", m.entries(), m.capacity, m.deleted)?;
        }
        write!(
            f,
            "snat ports {} to {} backends in {:.1} ms",
            self.snat_ports.values().sum::<u64>(),
            self.snat_ports.len(),
            self.duration.as_secs_f64() * 1e3
        )
    }
}

/// A live reverse entry under `key`: counted when it holds a SNAT port.
fn count_snat(ports: &mut BTreeMap<SnatBackend, u64>, cfg: &Config, key: &FlowKey) {
    if cfg.is_snat_endpoint(key.dst_addr_be, key.dst_port_be) {
        let b = SnatBackend {
            addr: Ipv4Addr::from(key.src_addr_be.to_ne_bytes()),
            port: u16::from_be(key.src_port_be),
            proto: key.proto,
        };
        *ports.entry(b).or_default() += 1;
    }
}

/// Keeps a failed operation's message (a few distinct ones: a map that refuses every
/// deletion must not fill the memory with messages).
fn note(errors: &mut Vec<String>, msg: String) {
    if errors.len() < 8 && !errors.contains(&msg) {
        errors.push(msg);
    }
}

/// The flow's first live entry, in `XLB_CT` else `XLB_CT_NEW`, read from the maps; then
/// `XLB_CT` once more, as the datapath looks (ebpf ct.rs `lookup`): a flow confirmed
/// between the first two reads moved from `XLB_CT_NEW` to `XLB_CT` and is in neither.
fn live_owner(
    m: &CtMaps<'_>,
    key: &FlowKey,
    cfg: &Config,
    now: u32,
) -> io::Result<Option<(CtEntry, bool)>> {
    for (table, confirmed) in [(m.ct, true), (m.ct_new, false), (m.ct, true)] {
        if let Some(e) = table.get(key)?
            && keep_ct(cfg, &e, confirmed, now)
        {
            return Ok(Some((e, confirmed)));
        }
    }
    Ok(None)
}

/// One garbage collection of the three maps (see the module's documentation). `clock`
/// gives the datapath's time in seconds; `grace` separates condemning a reverse entry from
/// its re-check.
pub fn sweep(
    m: &CtMaps<'_>,
    cfg: &Config,
    clock: &dyn Fn() -> u32,
    grace: Duration,
) -> SweepReport {
    let started = Instant::now();
    let mut r = SweepReport {
        ct: MapSweep {
            capacity: m.ct.capacity(),
            ..Default::default()
        },
        ct_new: MapSweep {
            capacity: m.ct_new.capacity(),
            ..Default::default()
        },
        revnat: MapSweep {
            capacity: m.revnat.capacity(),
            ..Default::default()
        },
        ..Default::default()
    };
    let now = clock();
    // 1. Both conntrack maps: the live entries (XLB_CT's first, as the datapath looks them
    //    up) and the expired ones.
    let mut live: HashMap<FlowKey, (CtEntry, bool)> = HashMap::new();
    let mut expired: [Vec<FlowKey>; 2] = Default::default();
    for (i, (table, confirmed, name, stats)) in [
        (m.ct, true, MAP_CT, &mut r.ct),
        (m.ct_new, false, MAP_CT_NEW, &mut r.ct_new),
    ]
    .into_iter()
    .enumerate()
    {
        let walked = table.walk(&mut |k, e| {
            stats.seen += 1;
            if keep_ct(cfg, e, confirmed, now) {
                live.entry(*k).or_insert((*e, confirmed));
            } else {
                expired[i].push(*k);
            }
        });
        if let Err(e) = walked {
            note(&mut r.errors, format!("walking {name}: {e}"));
        }
    }
    // 2. Expired entries, unless refreshed since the walk.
    for (i, (table, confirmed, name, stats)) in [
        (m.ct, true, MAP_CT, &mut r.ct),
        (m.ct_new, false, MAP_CT_NEW, &mut r.ct_new),
    ]
    .into_iter()
    .enumerate()
    {
        for k in &expired[i] {
            let now = clock();
            let result = match table.get(k) {
                Ok(Some(e)) if !keep_ct(cfg, &e, confirmed, now) => table.delete(k),
                Ok(Some(e)) => {
                    if confirmed {
                        live.insert(*k, (e, confirmed));
                    } else {
                        live.entry(*k).or_insert((e, confirmed));
                    }
                    Ok(false)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            };
            match result {
                Ok(deleted) => stats.deleted += deleted as u64,
                Err(e) => note(&mut r.errors, format!("deleting from {name}: {e}")),
            }
        }
    }
    drop(expired);
    // 3. Reverse entries against their owners.
    let mut stale: Vec<FlowKey> = Vec::new();
    let walked = m.revnat.walk(&mut |k, rev| {
        r.revnat.seen += 1;
        let owner = live.get(&rev.ct_key(k.proto)).map(|(e, c)| (e, *c));
        if keep_revnat(cfg, k, rev, owner, now) {
            count_snat(&mut r.snat_ports, cfg, k);
        } else {
            stale.push(*k);
        }
    });
    if let Err(e) = walked {
        note(&mut r.errors, format!("walking {MAP_REVNAT}: {e}"));
    }
    drop(live);
    // 4. After the grace period, each condemned entry again, from the maps.
    let waited = if stale.is_empty() {
        Duration::ZERO
    } else {
        let t = Instant::now();
        std::thread::sleep(grace);
        t.elapsed()
    };
    for k in &stale {
        let now = clock();
        let result = (|| -> io::Result<bool> {
            let Some(rev) = m.revnat.get(k)? else {
                return Ok(false);
            };
            let owner = live_owner(m, &rev.ct_key(k.proto), cfg, now)?;
            if keep_revnat(cfg, k, &rev, owner.as_ref().map(|(e, c)| (e, *c)), now) {
                count_snat(&mut r.snat_ports, cfg, k);
                return Ok(false);
            }
            m.revnat.delete(k)
        })();
        match result {
            Ok(deleted) => r.revnat.deleted += deleted as u64,
            Err(e) => note(&mut r.errors, format!("deleting from {MAP_REVNAT}: {e}")),
        }
    }
    r.duration = started.elapsed().saturating_sub(waited);
    r
}

// ------------------------------------------------------------------ the agent's GC

/// The agent's GC: its own handles on the pinned maps.
pub struct Gc {
    ct: BpfTable<FlowKey, CtEntry>,
    ct_new: BpfTable<FlowKey, CtEntry>,
    revnat: BpfTable<FlowKey, RevNat>,
    config: BpfTable<u32, Config>,
    counters: Option<PerCpuArray<MapData, u64>>,
}

impl fmt::Debug for Gc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gc").finish_non_exhaustive()
    }
}

impl Gc {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let counters = MapData::from_pin(pin_dir.join(MAP_COUNTERS))
            .ok()
            .and_then(|m| PerCpuArray::try_from(aya::maps::Map::PerCpuArray(m)).ok());
        if counters.is_none() {
            log::warn!("conntrack GC: no {MAP_COUNTERS}; no early sweeps on new-flow bursts");
        }
        Ok(Self {
            ct: BpfTable::open(pin_dir, MAP_CT)?,
            ct_new: BpfTable::open(pin_dir, MAP_CT_NEW)?,
            revnat: BpfTable::open(pin_dir, MAP_REVNAT)?,
            config: BpfTable::open(pin_dir, MAP_CONFIG)?,
            counters,
        })
    }

    /// (`map` label, capacity) of the three maps.
    pub fn capacities(&self) -> [(&'static str, u32); 3] {
        [
            ("ct", self.ct.capacity()),
            ("ct_new", self.ct_new.capacity()),
            ("revnat", self.revnat.capacity()),
        ]
    }

    /// New flows the datapath has looked up so far (`ct_miss` + `ct_rebalance`).
    pub fn new_flows(&self) -> Option<u64> {
        let c = self.counters.as_ref()?;
        let mut n = 0u64;
        for idx in [Counter::CtMiss, Counter::CtRebalance] {
            n += c.get(&(idx as u32), 0).ok()?.iter().sum::<u64>();
        }
        Some(n)
    }

    /// One sweep, with the configuration the datapath uses (`XLB_CONFIG[0]`).
    pub fn sweep(&self) -> Result<SweepReport> {
        let cfg = self
            .config
            .get(&0)
            .context("reading XLB_CONFIG")?
            .context("XLB_CONFIG[0] is missing")?;
        let maps = CtMaps {
            ct: &self.ct,
            ct_new: &self.ct_new,
            revnat: &self.revnat,
        };
        Ok(sweep(&maps, &cfg, &monotonic_ms, GC_GRACE))
    }
}

/// Opens the maps pinned in `pin_dir` and runs the GC until the task is aborted, each
/// sweep on a blocking thread. Must run inside a tokio runtime.
pub fn spawn(pin_dir: &Path, metrics: Arc<Metrics>) -> Result<JoinHandle<()>> {
    let gc = Gc::open(pin_dir)?;
    for (map, cap) in gc.capacities() {
        metrics.conntrack().set_capacity(map, cap);
    }
    metrics.conntrack().set_interval(GC_MIN_INTERVAL);
    Ok(tokio::spawn(run(Arc::new(Mutex::new(gc)), metrics)))
}

async fn run(gc: Arc<Mutex<Gc>>, metrics: Arc<Metrics>) {
    let mut interval = GC_MIN_INTERVAL;
    let mut last_sweep = Instant::now();
    let mut pressure: Option<Pressure> = None;
    let mut first = true;
    loop {
        // The first sweep right away: the series exist from the start, and what a previous
        // agent left expired is collected at once.
        if !first {
            let remaining = interval.saturating_sub(last_sweep.elapsed());
            tokio::time::sleep(remaining.min(GC_MIN_INTERVAL)).await;
        }
        let due = first || last_sweep.elapsed() >= interval;
        let was_first = std::mem::replace(&mut first, false);
        let may_hurry = last_sweep.elapsed() >= GC_MIN_INTERVAL;
        let gc = gc.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let gc = gc.lock().unwrap_or_else(PoisonError::into_inner);
            let flows = gc.new_flows();
            let early = !due
                && may_hurry
                && matches!((pressure, flows), (Some(p), Some(f)) if near_full(&p, f));
            if !due && !early {
                return None;
            }
            Some((gc.sweep(), flows.unwrap_or(0), early))
        })
        .await;
        let (report, flows, early) = match outcome {
            Ok(Some(o)) => o,
            Ok(None) => continue,
            Err(e) => {
                log::warn!("conntrack GC: {e}");
                last_sweep = Instant::now();
                continue;
            }
        };
        last_sweep = Instant::now();
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                log::warn!("conntrack GC: {e:#}");
                continue;
            }
        };
        for e in &report.errors {
            log::warn!("conntrack GC: {e}");
        }
        // The start-up sweep is an extra one: the schedule starts after it.
        if !was_first {
            interval = next_interval(interval, report.deleted_share(), report.fill());
        }
        pressure = Some(report.pressure(flows));
        metrics.conntrack().sweep_done(&report, interval);
        let msg = format!(
            "conntrack GC{}: {report}; next in {} s",
            if early {
                " (early: a map may be near full)"
            } else {
                ""
            },
            interval.as_secs()
        );
        if was_first || early {
            log::info!("{msg}");
        } else {
            log::debug!("{msg}");
        }
    }
}

// ------------------------------------------------------------------ flags

/// A conntrack timeout flag: seconds (`60`), or a duration of hours, minutes and seconds
/// (`2m`, `2h13m20s`). Between 1 s and 2^31 - 1 s (the datapath compares times as i32).
pub fn parse_timeout(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?}: expected seconds or a duration like 90s, 10m, 2h13m20s");
    let s = s.trim();
    let total: u64 = if let Ok(n) = s.parse::<u64>() {
        n
    } else {
        let mut total = 0u64;
        let mut digits = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            let mult = match c {
                'h' => 3600,
                'm' => 60,
                's' => 1,
                _ => return Err(bad()),
            };
            let n: u64 = digits.parse().map_err(|_| bad())?;
            digits.clear();
            total = n
                .checked_mul(mult)
                .and_then(|v| total.checked_add(v))
                .ok_or_else(bad)?;
        }
        if !digits.is_empty() || s.is_empty() {
            return Err(bad());
        }
        total
    };
    if total == 0 || total > u64::from(CT_TIMEOUT_MAX_S) {
        return Err(format!("{s:?}: between 1 s and {} s", CT_TIMEOUT_MAX_S));
    }
    Ok(total as u32)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    use super::*;

    const TCP: u8 = PROTO_TCP;
    const NOW: u32 = 10_000_000;

    fn ip(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// SNAT ports 61000-65535, whatever the default range.
    fn cfg() -> Config {
        Config {
            snat_addr_be: ip([172, 18, 0, 2]),
            snat_port_min: 61_000,
            snat_port_max: 65_535,
            ..Config::DEFAULT
        }
    }

    fn entry(flags: u8, snat_port: u16, age: u32) -> CtEntry {
        CtEntry {
            backend_id: 1,
            svc_id: 1,
            snat_port_be: snat_port.to_be(),
            flags,
            proto: TCP,
            last_seen_ms: NOW.wrapping_sub(age * 1000),
        }
    }

    #[test]
    fn keep_ct_follows_the_datapath_timeouts_with_a_second_to_spare() {
        let c = cfg();
        // Unconfirmed SYN: 60 s, then one second of slack.
        assert!(keep_ct(&c, &entry(0, 0, 60), false, NOW));
        assert!(keep_ct(&c, &entry(0, 0, 61), false, NOW));
        assert!(!keep_ct(&c, &entry(0, 0, 62), false, NOW));
        // The same entry confirmed: 8000 s.
        assert!(keep_ct(&c, &entry(0, 0, 7_000), true, NOW));
        assert!(!keep_ct(&c, &entry(0, 0, 8_002), true, NOW));
        // Closed: 10 s, confirmed or not; mid-stream: 10 s until confirmed.
        assert!(!keep_ct(&c, &entry(CT_RST, 0, 12), true, NOW));
        assert!(keep_ct(&c, &entry(CT_RST, 0, 11), true, NOW));
        assert!(!keep_ct(&c, &entry(CT_MIDSTREAM, 0, 12), false, NOW));
        // UDP: 60 s.
        let udp = CtEntry {
            proto: PROTO_UDP,
            ..entry(0, 0, 62)
        };
        assert!(!keep_ct(&c, &udp, true, NOW));
        // Timeouts come from the configuration.
        let short = Config {
            ct_tcp_established_s: 100,
            ..c
        };
        assert!(!keep_ct(&short, &entry(0, 0, 102), true, NOW));
        // An entry stamped after `now` (our clock read before the datapath's) is young.
        assert!(keep_ct(&c, &entry(0, 0, 0), false, NOW - 3000));
    }

    /// A SNAT flow: client 10.0.0.9:40000 -> frontend 172.18.0.2:30080, backend
    /// 10.244.2.5:80, SNAT port `port`.
    fn snat_flow(port: u16) -> (FlowKey, RevNat, FlowKey) {
        let client = ip([10, 0, 0, 9]);
        let fe = ip([172, 18, 0, 2]);
        let ct_key = FlowKey {
            src_addr_be: client,
            dst_addr_be: fe,
            src_port_be: 40_000u16.to_be(),
            dst_port_be: 30_080u16.to_be(),
            proto: TCP,
            _pad: [0; 3],
        };
        let rev = RevNat {
            src_addr_be: fe,
            dst_addr_be: client,
            src_port_be: 30_080u16.to_be(),
            dst_port_be: 40_000u16.to_be(),
            flags: 0,
        };
        let rk = FlowKey {
            src_addr_be: ip([10, 244, 2, 5]),
            dst_addr_be: cfg().snat_addr_be,
            src_port_be: 80u16.to_be(),
            dst_port_be: port.to_be(),
            proto: TCP,
            _pad: [0; 3],
        };
        (ct_key, rev, rk)
    }

    #[test]
    fn keep_revnat_checks_the_owner() {
        let c = cfg();
        let (ct_key, rev, rk) = snat_flow(61_234);
        assert_eq!(rev.ct_key(TCP), ct_key);
        let own = entry(CT_SNAT, 61_234, 5);
        assert!(keep_revnat(&c, &rk, &rev, Some((&own, false)), NOW));
        // Missing, expired, or holding another port: stale.
        assert!(!keep_revnat(&c, &rk, &rev, None, NOW));
        let old = entry(CT_SNAT, 61_234, 100);
        assert!(!keep_revnat(&c, &rk, &rev, Some((&old, false)), NOW));
        assert!(keep_revnat(&c, &rk, &rev, Some((&old, true)), NOW));
        let moved = entry(CT_SNAT, 61_999, 5);
        assert!(!keep_revnat(&c, &rk, &rev, Some((&moved, true)), NOW));
        // A flow without SNAT: its reverse key is backend -> client, on the client's port.
        let direct = entry(0, 0, 5);
        let dk = FlowKey {
            dst_addr_be: rev.dst_addr_be,
            dst_port_be: rev.dst_port_be,
            ..rk
        };
        assert!(keep_revnat(&c, &dk, &rev, Some((&direct, true)), NOW));
        // ...and not on a SNAT port.
        assert!(!keep_revnat(&c, &rk, &rev, Some((&direct, true)), NOW));
    }

    #[test]
    fn interval_adapts_between_bounds() {
        let s = Duration::from_secs;
        // Few deletions: doubles up to 10 min.
        assert_eq!(next_interval(s(10), 0.0, 0.1), s(20));
        assert_eq!(next_interval(s(400), 0.01, 0.1), s(600));
        // Many: halves down to 10 s.
        assert_eq!(next_interval(s(600), 0.5, 0.1), s(300));
        assert_eq!(next_interval(s(15), 0.9, 0.1), s(10));
        // In between: unchanged.
        assert_eq!(next_interval(s(80), 0.1, 0.1), s(80));
        // A map left near full: back to the minimum.
        assert_eq!(next_interval(s(600), 0.0, 0.85), s(10));
        // From the start, a quiet node reaches the maximum in 6 sweeps.
        let mut i = GC_MIN_INTERVAL;
        for _ in 0..6 {
            i = next_interval(i, 0.0, 0.0);
        }
        assert_eq!(i, GC_MAX_INTERVAL);
    }

    #[test]
    fn pressure_estimates_fill_from_new_flows() {
        let p = Pressure {
            entries: [100, 10, 110],
            capacity: [1000, 100, 1100],
            new_flows: 5_000,
        };
        assert!(!near_full(&p, 5_000));
        assert!(!near_full(&p, 5_069));
        // CT_NEW: 10 + 70 >= 80.
        assert!(near_full(&p, 5_070));
        // A counter reset (pins re-created) is no burst.
        assert!(!near_full(&p, 3));
    }

    /// A map in memory. `hidden` keys are left out of walks (written after the walk);
    /// `walk_values` replace what a walk sees (the value at walk time).
    struct Fake<V> {
        cap: u32,
        map: RefCell<BTreeMap<[u32; 4], (FlowKey, V)>>,
        hidden: BTreeSet<[u32; 4]>,
        walk_values: BTreeMap<[u32; 4], V>,
    }

    fn id(k: &FlowKey) -> [u32; 4] {
        [
            k.src_addr_be,
            k.dst_addr_be,
            ((k.src_port_be as u32) << 16) | k.dst_port_be as u32,
            k.proto as u32,
        ]
    }

    impl<V: Copy> Fake<V> {
        fn new(cap: u32, entries: &[(FlowKey, V)]) -> Self {
            Self {
                cap,
                map: RefCell::new(entries.iter().map(|(k, v)| (id(k), (*k, *v))).collect()),
                hidden: BTreeSet::new(),
                walk_values: BTreeMap::new(),
            }
        }

        fn has(&self, k: &FlowKey) -> bool {
            self.map.borrow().contains_key(&id(k))
        }
    }

    impl<V: Copy> Table<FlowKey, V> for Fake<V> {
        fn capacity(&self) -> u32 {
            self.cap
        }
        fn walk(&self, f: &mut dyn FnMut(&FlowKey, &V)) -> io::Result<()> {
            for (i, (k, v)) in self.map.borrow().iter() {
                if !self.hidden.contains(i) {
                    f(k, self.walk_values.get(i).unwrap_or(v));
                }
            }
            Ok(())
        }
        fn get(&self, k: &FlowKey) -> io::Result<Option<V>> {
            Ok(self.map.borrow().get(&id(k)).map(|(_, v)| *v))
        }
        fn delete(&self, k: &FlowKey) -> io::Result<bool> {
            Ok(self.map.borrow_mut().remove(&id(k)).is_some())
        }
    }

    fn client(n: u16) -> (FlowKey, RevNat, FlowKey) {
        let (mut k, mut rev, rk) = snat_flow(61_000 + n);
        k.src_port_be = (40_000 + n).to_be();
        rev.dst_port_be = k.src_port_be;
        (k, rev, rk)
    }

    #[test]
    fn sweep_deletes_what_the_datapath_would_ignore() {
        let c = cfg();
        let (k_live, r_live, rk_live) = client(1); // confirmed, live
        let (k_old, r_old, rk_old) = client(2); // confirmed, expired
        let (k_syn, r_syn, rk_syn) = client(3); // unconfirmed, live
        let (k_synold, _, _) = client(4); // unconfirmed, expired, no reverse entry
        let (_, r_orphan, rk_orphan) = client(5); // reverse entry without owner
        let (k_moved, r_moved, rk_moved) = client(6); // owner holds another port now
        let (k_new, r_new, rk_new) = client(7); // written during the sweep
        let (k_fresh, r_fresh, rk_fresh) = client(8); // refreshed after the walk
        // A flow to another backend without SNAT (reverse key: backend -> client).
        let (k_direct, r_direct, _) = client(9);
        let rk_direct = FlowKey {
            src_addr_be: ip([10, 244, 1, 7]),
            dst_addr_be: r_direct.dst_addr_be,
            src_port_be: 8080u16.to_be(),
            dst_port_be: r_direct.dst_port_be,
            proto: TCP,
            _pad: [0; 3],
        };
        let snat = |n: u16, age| entry(CT_SNAT, 61_000 + n, age);
        let mut ct = Fake::new(
            100,
            &[
                (k_live, snat(1, 100)),
                (k_old, snat(2, 9_000)),
                (k_moved, snat(99, 5)),
                (k_fresh, snat(8, 1)),
                (k_direct, entry(0, 0, 3)),
            ],
        );
        ct.walk_values.insert(id(&k_fresh), snat(8, 9_000));
        let mut ct_new = Fake::new(
            10,
            &[
                (k_syn, snat(3, 5)),
                (k_synold, snat(4, 70)),
                (k_new, snat(7, 0)),
            ],
        );
        ct_new.hidden.insert(id(&k_new));
        let revnat = Fake::new(
            110,
            &[
                (rk_live, r_live),
                (rk_old, r_old),
                (rk_syn, r_syn),
                (rk_orphan, r_orphan),
                (rk_moved, r_moved),
                (rk_new, r_new),
                (rk_fresh, r_fresh),
                (rk_direct, r_direct),
            ],
        );
        let maps = CtMaps {
            ct: &ct,
            ct_new: &ct_new,
            revnat: &revnat,
        };
        let r = sweep(&maps, &c, &|| NOW, Duration::ZERO);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(
            (r.ct, r.ct_new, r.revnat),
            (
                MapSweep {
                    capacity: 100,
                    seen: 5,
                    deleted: 1
                },
                MapSweep {
                    capacity: 10,
                    seen: 2,
                    deleted: 1
                },
                MapSweep {
                    capacity: 110,
                    seen: 8,
                    deleted: 3
                },
            )
        );
        assert!(ct.has(&k_live) && !ct.has(&k_old) && ct.has(&k_fresh));
        assert!(ct_new.has(&k_syn) && !ct_new.has(&k_synold) && ct_new.has(&k_new));
        for (k, kept) in [
            (rk_live, true),
            (rk_old, false),
            (rk_syn, true),
            (rk_orphan, false),
            (rk_moved, false),
            (rk_new, true),
            (rk_fresh, true),
            (rk_direct, true),
        ] {
            assert_eq!(revnat.has(&k), kept, "{k:?}");
        }
        // live, syn, new, fresh: four SNAT ports towards 10.244.2.5:80; the direct flow's
        // reverse entry holds none.
        let be = SnatBackend {
            addr: Ipv4Addr::new(10, 244, 2, 5),
            port: 80,
            proto: TCP,
        };
        assert_eq!(r.snat_ports, BTreeMap::from([(be, 4)]));
        assert_eq!(be.labels(), ("10.244.2.5:80".into(), "tcp".into()));
        assert_eq!(r.ct.entries(), 4);
        assert!(
            (r.deleted_share() - 0.1).abs() < 1e-9,
            "{}",
            r.deleted_share()
        );
        assert!((r.fill() - 0.1).abs() < 1e-9, "{}", r.fill());
        // A second sweep finds nothing more to do.
        let again = sweep(&maps, &c, &|| NOW, Duration::ZERO);
        assert_eq!(
            (again.ct.deleted, again.ct_new.deleted, again.revnat.deleted),
            (0, 0, 0)
        );
    }

    /// `XLB_CT_NEW` while the datapath confirms a flow: the first read of `moving` finds it
    /// already gone from here, and from then on it is in `ct` (inserted there before the
    /// removal, as ebpf ct.rs `seen_forward` does).
    struct Confirming<'a> {
        ct_new: Fake<CtEntry>,
        ct: &'a Fake<CtEntry>,
        moving: FlowKey,
    }

    impl Table<FlowKey, CtEntry> for Confirming<'_> {
        fn capacity(&self) -> u32 {
            self.ct_new.capacity()
        }
        fn walk(&self, f: &mut dyn FnMut(&FlowKey, &CtEntry)) -> io::Result<()> {
            self.ct_new.walk(f)
        }
        fn get(&self, k: &FlowKey) -> io::Result<Option<CtEntry>> {
            if *k == self.moving
                && let Some((_, e)) = self.ct_new.map.borrow_mut().remove(&id(k))
            {
                self.ct.map.borrow_mut().insert(id(k), (*k, e));
                return Ok(None);
            }
            self.ct_new.get(k)
        }
        fn delete(&self, k: &FlowKey) -> io::Result<bool> {
            self.ct_new.delete(k)
        }
    }

    /// A flow opened during a sweep (its reverse entry condemned: no owner in the walks) and
    /// confirmed just as the re-check reads its owner is still found, in `XLB_CT` at the
    /// re-check's last look: its reverse entry stays.
    #[test]
    fn sweep_keeps_the_reverse_entry_of_a_flow_confirmed_during_the_recheck() {
        let c = cfg();
        let (k, rev, rk) = client(1);
        let ct = Fake::new(100, &[]);
        let mut ct_new = Fake::new(10, &[(k, entry(CT_SNAT | CT_SEEN_REPLY, 61_001, 0))]);
        ct_new.hidden.insert(id(&k));
        let ct_new = Confirming {
            ct_new,
            ct: &ct,
            moving: k,
        };
        let revnat = Fake::new(110, &[(rk, rev)]);
        let maps = CtMaps {
            ct: &ct,
            ct_new: &ct_new,
            revnat: &revnat,
        };
        let r = sweep(&maps, &c, &|| NOW, Duration::ZERO);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(ct.has(&k) && !ct_new.ct_new.has(&k), "the flow moved");
        assert_eq!(r.revnat.deleted, 0);
        assert!(revnat.has(&rk), "a live flow's reverse entry was deleted");
    }

    #[test]
    fn timeouts_parse_as_seconds_or_durations() {
        assert_eq!(parse_timeout("60"), Ok(60));
        assert_eq!(parse_timeout("90s"), Ok(90));
        assert_eq!(parse_timeout("10m"), Ok(600));
        assert_eq!(parse_timeout("2h13m20s"), Ok(8000));
        assert_eq!(parse_timeout("24h"), Ok(86_400));
        for bad in ["", "0", "0s", "5x", "m", "10m5", "-1", "3000000000", "1.5s"] {
            assert!(parse_timeout(bad).is_err(), "{bad:?}");
        }
    }

    /// Real LRU maps, when this process may create them (root): the batch walk, the
    /// fallback walk and a sweep agree with the fakes.
    #[test]
    fn sweeps_real_maps() {
        let made = BpfTable::<FlowKey, CtEntry>::create_lru(4096, "xlb_gct_ct");
        let Some(ct) = crate::dataplane::bpf_table::made_or_skip(made, "sweeps_real_maps") else {
            return;
        };
        let ct_new = BpfTable::<FlowKey, CtEntry>::create_lru(1024, "xlb_gct_new").unwrap();
        let revnat = BpfTable::<FlowKey, RevNat>::create_lru(5120, "xlb_gct_rev").unwrap();
        let c = cfg();
        let now = monotonic_ms();
        let n = 3000u16;
        for i in 0..n {
            let (k, rev, rk) = client(i);
            // Every third flow is expired.
            let age = if i % 3 == 0 { 9_000 } else { 5 };
            let e = CtEntry {
                last_seen_ms: now.wrapping_sub(age * 1000),
                ..entry(CT_SNAT, 61_000 + i, 0)
            };
            ct.insert(&k, &e).unwrap();
            revnat.insert(&rk, &rev).unwrap();
        }
        let mut walked = (0, 0);
        ct.walk(&mut |_, _| walked.0 += 1).unwrap();
        ct.walk_per_key(&mut |_, _| walked.1 += 1).unwrap();
        assert_eq!(walked, (n as u64, n as u64));
        let maps = CtMaps {
            ct: &ct,
            ct_new: &ct_new,
            revnat: &revnat,
        };
        let r = sweep(&maps, &c, &monotonic_ms, Duration::from_millis(1));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!((r.ct.seen, r.ct.deleted), (3000, 1000));
        assert_eq!((r.revnat.seen, r.revnat.deleted), (3000, 1000));
        assert_eq!(r.snat_ports.values().sum::<u64>(), 2000);
        let mut left = 0;
        revnat.walk(&mut |_, _| left += 1).unwrap();
        assert_eq!(left, 2000);
    }

    /// The agent's GC task on pinned maps (in `/sys/fs/bpf/xlb-gcbench-<pid>`, removed
    /// after), when this process may create them: the start-up sweep and its metrics.
    #[tokio::test]
    async fn gc_task_sweeps_pinned_maps() {
        let made = BpfTable::<FlowKey, CtEntry>::create_lru(64, "xlb_gct_ct");
        let Some(ct) =
            crate::dataplane::bpf_table::made_or_skip(made, "gc_task_sweeps_pinned_maps")
        else {
            return;
        };
        let ct_new = BpfTable::<FlowKey, CtEntry>::create_lru(16, "xlb_gct_new").unwrap();
        let revnat = BpfTable::<FlowKey, RevNat>::create_lru(80, "xlb_gct_rev").unwrap();
        let config = BpfTable::<u32, Config>::create_array(1, "xlb_gct_cfg").unwrap();
        let c = cfg();
        config.insert(&0, &c).unwrap();
        let now = monotonic_ms();
        for (i, age) in [(1u16, 5u32), (2, 9_000), (3, 7)] {
            let (k, rev, rk) = client(i);
            let e = CtEntry {
                last_seen_ms: now.wrapping_sub(age * 1000),
                ..entry(CT_SNAT, 61_000 + i, 0)
            };
            ct.insert(&k, &e).unwrap();
            revnat.insert(&rk, &rev).unwrap();
        }
        struct Dir(std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Dir(format!("/sys/fs/bpf/xlb-gcbench-{}", std::process::id()).into());
        let made = std::fs::create_dir(&dir.0).context("no bpffs at /sys/fs/bpf");
        if crate::dataplane::bpf_table::made_or_skip(made, "gc_task_sweeps_pinned_maps").is_none() {
            return;
        }
        ct.pin(&dir.0.join(MAP_CT)).unwrap();
        ct_new.pin(&dir.0.join(MAP_CT_NEW)).unwrap();
        revnat.pin(&dir.0.join(MAP_REVNAT)).unwrap();
        config.pin(&dir.0.join(MAP_CONFIG)).unwrap();
        let metrics = Arc::new(Metrics::without_maps());
        let task = spawn(&dir.0, metrics.clone()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !metrics.render().contains("xlb_conntrack_gc_runs_total 1") {
            assert!(Instant::now() < deadline, "{}", metrics.render());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
        let text = metrics.render();
        for line in [
            "xlb_conntrack_entries{map=\"ct\"} 2",
            "xlb_conntrack_gc_deleted_total{map=\"revnat\"} 1",
            "xlb_conntrack_capacity{map=\"revnat\"} 80",
            "xlb_conntrack_gc_interval_seconds 10",
            "xlb_snat_ports_in_use{backend=\"10.244.2.5:80\",proto=\"tcp\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
        }
    }

    /// GC cost over 1 M entries: `cargo test -p lb-agent --release --lib
    /// conntrack::tests::bench_gc_1m -- --ignored --nocapture` (root). The maps are
    /// unpinned and go with the process. `XLB_GCBENCH_CT=262144` sizes `XLB_CT` otherwise.
    #[test]
    #[ignore]
    fn bench_gc_1m() {
        let n: u32 = std::env::var("XLB_GCBENCH_CT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 20);
        let n_new = DEFAULT_CT_NEW_ENTRIES;
        let ct = BpfTable::<FlowKey, CtEntry>::create_lru(n, "xlb_gcb_ct").expect("root?");
        let ct_new = BpfTable::<FlowKey, CtEntry>::create_lru(n_new, "xlb_gcb_new").unwrap();
        let revnat = BpfTable::<FlowKey, RevNat>::create_lru(n + n_new, "xlb_gcb_rev").unwrap();
        let c = Config {
            snat_port_min: 1024,
            snat_port_max: 65535,
            ..cfg()
        };
        let now = monotonic_ms();
        let t = Instant::now();
        // Flows of 17 Ki clients x 64 ports to 18 backends x 64,000 SNAT ports; half of each
        // map expired.
        let fill = |table: &BpfTable<FlowKey, CtEntry>, n: u32, base: u32, expired_age: u32| {
            for i in 0..n {
                let g = base + i;
                let client = u32::from_be_bytes([10, 1, 0, 0]) + g / 64;
                let k = FlowKey {
                    src_addr_be: client.to_be(),
                    dst_addr_be: ip([172, 18, 0, 2]),
                    src_port_be: (40_000 + (g % 64) as u16).to_be(),
                    dst_port_be: 30_080u16.to_be(),
                    proto: TCP,
                    _pad: [0; 3],
                };
                let port = 1024 + (g % 64_000) as u16;
                let e = CtEntry {
                    last_seen_ms: now.wrapping_sub(1000 * if i % 2 == 0 { expired_age } else { 5 }),
                    ..entry(CT_SNAT, port, 0)
                };
                table.insert(&k, &e).unwrap();
                let rev = RevNat {
                    src_addr_be: k.dst_addr_be,
                    dst_addr_be: k.src_addr_be,
                    src_port_be: k.dst_port_be,
                    dst_port_be: k.src_port_be,
                    flags: 0,
                };
                let rk = FlowKey {
                    src_addr_be: ip([10, 244, 2, (g / 64_000) as u8 + 1]),
                    dst_addr_be: c.snat_addr_be,
                    src_port_be: 80u16.to_be(),
                    dst_port_be: port.to_be(),
                    proto: TCP,
                    _pad: [0; 3],
                };
                revnat.insert(&rk, &rev).unwrap();
            }
        };
        fill(&ct, n, 0, 9_000);
        fill(&ct_new, n_new, n, 100);
        eprintln!("filled in {:.1} s", t.elapsed().as_secs_f64());
        let mut seen = 0u64;
        let t = Instant::now();
        ct.walk(&mut |_, _| seen += 1).unwrap();
        eprintln!(
            "batch walk of XLB_CT: {seen} entries in {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let (mut seen, t) = (0u64, Instant::now());
        ct.walk_per_key(&mut |_, _| seen += 1).unwrap();
        eprintln!(
            "get_next_key + lookup walk of XLB_CT: {seen} entries in {:.0} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        let maps = CtMaps {
            ct: &ct,
            ct_new: &ct_new,
            revnat: &revnat,
        };
        let rss = || {
            std::fs::read_to_string("/proc/self/status")
                .unwrap_or_default()
                .lines()
                .find(|l| l.starts_with("VmHWM"))
                .unwrap_or("")
                .to_string()
        };
        eprintln!("before sweep: {}", rss());
        let r = sweep(&maps, &c, &monotonic_ms, GC_GRACE);
        eprintln!("sweep 1: {r}\n  errors {:?}; {}", r.errors, rss());
        assert_eq!(r.ct.deleted as u32, n / 2);
        let r = sweep(&maps, &c, &monotonic_ms, GC_GRACE);
        eprintln!("sweep 2 (nothing to delete): {r}");
    }
}
