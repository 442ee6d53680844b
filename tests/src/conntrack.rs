//! An agent's connection tracking read straight from its pinned maps (tests and the bench):
//! entry counts and the SNAT ports live flows hold, independent of what the agent exports
//! on `/metrics` (which [`metric_sum`] reads).
use std::{collections::HashSet, net::SocketAddrV4, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use lb_common::{
    CT_SNAT, Config, CtEntry, FlowKey, MAP_CONFIG, MAP_CT, MAP_CT_NEW, MAP_REVNAT, RevNat,
    ct_closed, ct_expired,
};

/// The datapath's clock (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC) in milliseconds,
/// wrapping, as `CtEntry::last_seen_ms` holds it: the agent's own.
pub use lb_agent::dataplane::conntrack::monotonic_ms;

/// What [`ct_counts`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtCounts {
    /// Entries in `XLB_CT` (confirmed flows), whatever their state.
    pub ct: usize,
    /// Entries in `XLB_CT_NEW` (unconfirmed flows); 0 if the map is not pinned.
    pub ct_new: usize,
    /// Entries in `XLB_REVNAT`.
    pub revnat: usize,
    /// SNAT ports in use: `XLB_REVNAT` entries addressed to the node's SNAT address whose
    /// owning `CtEntry` (in `XLB_CT` or `XLB_CT_NEW`) is not expired (`ct_expired`) and
    /// still uses that port.
    pub snat_in_use: usize,
    /// Of those, flows already closed (FIN both ways or RST): reusable soon, gone when
    /// their close timeout passes.
    pub snat_closed: usize,
}

impl std::fmt::Display for CtCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ct={} ct_new={} revnat={} snat_in_use={} (closed {})",
            self.ct, self.ct_new, self.revnat, self.snat_in_use, self.snat_closed
        )
    }
}

type Lru<V> = BpfHashMap<MapData, FlowKey, V>;

/// A pinned LRU map keyed by 5-tuples and its capacity; None if it is not pinned.
fn open_lru<V: aya::Pod>(pin_dir: &Path, name: &str) -> Result<Option<(Lru<V>, usize)>> {
    let path = pin_dir.join(name);
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let cap = data.info()?.max_entries() as usize;
    Ok(Some((BpfHashMap::try_from(Map::LruHashMap(data))?, cap)))
}

/// The keys of a map that the datapath changes while we walk it. `get_next_key` restarts
/// from the first key when the current one was deleted meanwhile, so the walk is bounded
/// (twice the map's capacity) and deduplicated; the result is a snapshot of roughly one
/// moment, good for counts.
fn keys<V: aya::Pod>(map: &Lru<V>, cap: usize) -> HashSet<FlowKey> {
    let mut out = HashSet::new();
    for (i, k) in map.keys().enumerate() {
        if i >= cap.saturating_mul(2) {
            break;
        }
        match k {
            Ok(k) => {
                out.insert(k);
            }
            Err(_) => break,
        }
    }
    out
}

/// The agent's `XLB_CONFIG[0]` (SNAT address, port range, conntrack timeouts).
pub fn read_config(pin_dir: &Path) -> Result<Config> {
    let path = pin_dir.join(MAP_CONFIG);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let arr: Array<MapData, Config> = Array::try_from(Map::Array(data))?;
    Ok(arr.get(&0, 0)?)
}

/// Counts the conntrack entries of the agent pinned at `pin_dir` and the SNAT ports its
/// live flows hold (see [`CtCounts::snat_in_use`]), at the datapath's current time.
pub fn ct_counts(pin_dir: &Path) -> Result<CtCounts> {
    let cfg = read_config(pin_dir)?;
    let (ct, ct_cap) = open_lru::<CtEntry>(pin_dir, MAP_CT)?.context("XLB_CT is not pinned")?;
    let ct_new = open_lru::<CtEntry>(pin_dir, MAP_CT_NEW)?;
    let (revnat, rev_cap) =
        open_lru::<RevNat>(pin_dir, MAP_REVNAT)?.context("XLB_REVNAT is not pinned")?;
    let ct_keys = keys(&ct, ct_cap);
    let ct_new_keys = ct_new
        .as_ref()
        .map(|(m, cap)| keys(m, *cap))
        .unwrap_or_default();
    let ct_new = ct_new.map(|(m, _)| m);
    let rev_keys = keys(&revnat, rev_cap);
    let now = monotonic_ms();
    let mut out = CtCounts {
        ct: ct_keys.len(),
        ct_new: ct_new_keys.len(),
        revnat: rev_keys.len(),
        ..Default::default()
    };
    for rk in &rev_keys {
        if !cfg.is_snat_endpoint(rk.dst_addr_be, rk.dst_port_be) {
            continue;
        }
        let Ok(rev) = revnat.get(rk, 0) else {
            continue; // deleted meanwhile
        };
        let key = rev.ct_key(rk.proto);
        let owner = match ct.get(&key, 0) {
            Ok(e) => Some((e, true)),
            Err(_) => ct_new
                .as_ref()
                .and_then(|m| m.get(&key, 0).ok())
                .map(|e| (e, false)),
        };
        let Some((e, confirmed)) = owner else {
            continue; // orphaned: its port is free
        };
        if e.flags & CT_SNAT == 0
            || e.snat_port_be != rk.dst_port_be
            || ct_expired(&cfg, &e, confirmed, now)
        {
            continue; // the port went to another flow, or the flow is over
        }
        out.snat_in_use += 1;
        if ct_closed(&e) {
            out.snat_closed += 1;
        }
    }
    Ok(out)
}

/// SNAT ports in use on the agent pinned at `pin_dir`: [`ct_counts`]' `snat_in_use`.
pub fn snat_ports_in_use(pin_dir: &Path) -> Result<usize> {
    Ok(ct_counts(pin_dir)?.snat_in_use)
}

/// The agent's `/metrics` text, fetched from inside `netns` (e.g. the client namespace,
/// with [`crate::AgentProc::metrics_addr`]).
pub fn fetch_metrics(netns: &str, addr: SocketAddrV4) -> Result<String> {
    let r = crate::http_request(netns, addr, "/metrics", Duration::from_secs(5))?;
    anyhow::ensure!(r.status == 200, "GET /metrics: status {}", r.status);
    Ok(r.body)
}

/// The sum of every sample of `metric` (any labels) in a Prometheus text exposition; None
/// when there is no such sample.
pub fn metric_sum(text: &str, metric: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let value = if let Some(labels) = rest.strip_prefix('{') {
            // Label values may hold spaces; the value follows the closing brace.
            labels.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None // another metric whose name starts with `metric`
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next())
            && let Ok(v) = v.parse::<f64>()
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_samples_of_one_metric() {
        let text = "# TYPE xlb_snat_ports_in_use gauge\n\
                    xlb_snat_ports_in_use{backend=\"10.244.2.2:80\",proto=\"tcp\"} 3\n\
                    xlb_snat_ports_in_use{backend=\"10.244.2.3:80\",proto=\"tcp\"} 4.5\n\
                    xlb_snat_ports_in_use_total 100\n\
                    xlb_conntrack_entries{map=\"ct\"} 7\n";
        assert_eq!(metric_sum(text, "xlb_snat_ports_in_use"), Some(7.5));
        assert_eq!(metric_sum(text, "xlb_conntrack_entries"), Some(7.0));
        assert_eq!(metric_sum(text, "xlb_nope"), None);
        assert_eq!(metric_sum("xlb_ready 1\n", "xlb_ready"), Some(1.0));
    }

    #[test]
    fn clock_moves() {
        let a = monotonic_ms();
        assert!(monotonic_ms().wrapping_sub(a) < 2000);
    }
}
