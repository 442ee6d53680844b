//! Pinned maps against the flags. aya reuses a map pinned under the map's name without
//! looking at it, so a map an earlier agent created with other sizes would be used as it
//! is: a larger `--ct-entries` would silently do nothing, a larger `--maglev-arena` or
//! `--max-services` would fail half-way through an apply. A pinned map cannot be resized
//! in place, and moving the live entries into a new map while the previous agent's
//! programs still write the old one (until this agent swaps its programs into the pinned
//! links) would lose the flows created meanwhile. So a pinned map whose capacity differs
//! from what the flags ask for is refused, all of them in one message that names each map,
//! both sizes, and the two ways on: the flags the maps were made with, or `lb-agent
//! cleanup` and a fresh start.
//!
//! [`capacities`] is also what the loader sizes new maps with, so the two cannot disagree.
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use lb_common::*;

use crate::dataplane::datapath::Limits;

/// How many entries a map must have, and what sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub map: &'static str,
    pub max_entries: u32,
    /// The flags that size it (empty: fixed by this agent version).
    pub flags: &'static [&'static str],
    /// A pinned map with more entries is fine too (counter arrays: new counters are
    /// appended, a newer agent's larger array is read by index).
    pub at_least: bool,
}

const SERVICES: &[&str] = &["--max-services"];
const FRONTENDS: &[&str] = &["--max-frontends"];
const BACKENDS: &[&str] = &["--max-backends"];
const ARENA: &[&str] = &["--maglev-arena"];
const CT: &[&str] = &["--ct-entries"];
const CT_NEW: &[&str] = &["--ct-new-entries"];
const CT_BOTH: &[&str] = &["--ct-entries", "--ct-new-entries"];
const FIXED: &[&str] = &[];

/// Every map's capacity for `limits` (what the loader gives maps it creates).
pub fn capacities(limits: &Limits) -> Result<Vec<Capacity>> {
    if limits.ct_entries == 0 || limits.ct_new_entries == 0 {
        bail!("--ct-entries and --ct-new-entries must be at least 1");
    }
    let revnat = limits
        .ct_entries
        .checked_add(limits.ct_new_entries)
        .context("--ct-entries + --ct-new-entries exceed 2^32 - 1")?;
    let c = |map, max_entries, flags| Capacity {
        map,
        max_entries,
        flags,
        at_least: false,
    };
    Ok(vec![
        c(MAP_SERVICES, limits.max_services, SERVICES),
        c(MAP_SVC_STATS, limits.max_services, SERVICES),
        c(MAP_SVC_META, limits.max_services, SERVICES),
        c(MAP_CLUSTER_IPS, limits.max_services, SERVICES),
        c(MAP_FRONTENDS, limits.max_frontends, FRONTENDS),
        c(MAP_SRC_RANGES, limits.max_frontends, FRONTENDS),
        c(MAP_BACKENDS, limits.max_backends, BACKENDS),
        c(MAP_MAGLEV, maglev_entries(limits.maglev_arena), ARENA),
        c(MAP_CT, limits.ct_entries, CT),
        c(MAP_SOCK_REVNAT, limits.ct_entries, CT),
        c(MAP_AFFINITY, limits.ct_entries, CT),
        c(MAP_CT_NEW, limits.ct_new_entries, CT_NEW),
        c(MAP_REVNAT, revnat, CT_BOTH),
        c(MAP_CONFIG, 1, FIXED),
        Capacity {
            at_least: true,
            ..c(MAP_COUNTERS, COUNTER_COUNT, FIXED)
        },
        c(MAP_ARP, MAX_ANNOUNCED, FIXED),
        c(MAP_ANNOUNCE_LEASE, 1, FIXED),
        c(MAP_SERVICE_CIDRS, MAX_SERVICE_CIDRS, FIXED),
        c(MAP_FRAGS, MAX_FRAGS, FIXED),
        c(MAP_REJECT_BUDGET, 1, FIXED),
    ])
}

/// A pinned map of another size than wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub wanted: Capacity,
    pub pinned: u32,
}

/// The maps among `wanted` whose pinned size (`pinned(map)`, None: not pinned) does not fit.
pub fn mismatches(wanted: &[Capacity], pinned: impl Fn(&str) -> Option<u32>) -> Vec<Mismatch> {
    wanted
        .iter()
        .filter_map(|w| {
            let p = pinned(w.map)?;
            let fits = if w.at_least {
                p >= w.max_entries
            } else {
                p == w.max_entries
            };
            (!fits).then_some(Mismatch {
                wanted: *w,
                pinned: p,
            })
        })
        .collect()
}

/// The flag values the pinned maps were made with, as far as `pinned` tells (from the map
/// each flag sizes alone).
fn pinned_flags(pinned: &impl Fn(&str) -> Option<u32>, flags: &[&str]) -> Vec<String> {
    flags
        .iter()
        .filter_map(|f| {
            let v = match *f {
                "--max-services" => pinned(MAP_SERVICES)?,
                "--max-frontends" => pinned(MAP_FRONTENDS)?,
                "--max-backends" => pinned(MAP_BACKENDS)?,
                "--maglev-arena" => pinned(MAP_MAGLEV)?.saturating_mul(MAGLEV_SLOTS_PER_ENTRY),
                "--ct-entries" => pinned(MAP_CT)?,
                "--ct-new-entries" => pinned(MAP_CT_NEW)?,
                _ => return None,
            };
            Some(format!("{f} {v}"))
        })
        .collect()
}

/// The refusal for `found` (not empty) in `pin_dir`.
pub fn refusal(pin_dir: &Path, found: &[Mismatch], pinned: impl Fn(&str) -> Option<u32>) -> String {
    let mut lines = vec![];
    let mut flags: Vec<&str> = vec![];
    let mut fixed = false;
    for m in found {
        let w = m.wanted;
        let asks = match w.flags {
            [] => "this agent version needs".to_string(),
            [one] => format!("{one} asks for"),
            many => format!("{} ask for", many.join(" + ")),
        };
        let at_least = if w.at_least { "at least " } else { "" };
        lines.push(format!(
            "  {}: pinned with {} entries, {asks} {at_least}{}",
            w.map, m.pinned, w.max_entries
        ));
        fixed |= w.flags.is_empty();
        for f in w.flags {
            if !flags.contains(f) {
                flags.push(f);
            }
        }
    }
    let keep = pinned_flags(&pinned, &flags);
    let mut ways = vec![];
    if !keep.is_empty() && !fixed {
        ways.push(format!(
            "start with the sizes the pinned maps were made with ({})",
            keep.join(", ")
        ));
    }
    ways.push(format!(
        "run `lb-agent cleanup --pin-dir {}` and start again, which creates the maps with the new \
         sizes (established flows through xlb end; the Services are programmed again from the \
         source)",
        pin_dir.display()
    ));
    format!(
        "pinned maps in {} do not have the sizes this agent needs, and a pinned map cannot be \
         resized in place (it is not reused silently either):\n{}\nEither {}.",
        pin_dir.display(),
        lines.join("\n"),
        ways.join(", or ")
    )
}

/// The capacity of the map pinned at `pin_dir/map`, if there is one.
fn pinned_capacity(pin_dir: &Path, map: &str) -> Result<Option<u32>> {
    let path = pin_dir.join(map);
    if !path.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapData::from_pin(&path)
        .and_then(|m| m.info())
        .with_context(|| format!("reading pinned map {}", path.display()))?;
    Ok(Some(info.max_entries()))
}

/// Refuses the start when a map pinned in `pin_dir` does not have the capacity `wanted`
/// says (see the module's documentation).
pub fn check_capacities(pin_dir: &Path, wanted: &[Capacity]) -> Result<()> {
    let mut sizes = std::collections::BTreeMap::new();
    for w in wanted {
        if let Some(n) = pinned_capacity(pin_dir, w.map)? {
            sizes.insert(w.map, n);
        }
    }
    let pinned = |m: &str| sizes.get(m).copied();
    let found = mismatches(wanted, pinned);
    if found.is_empty() {
        return Ok(());
    }
    bail!("{}", refusal(pin_dir, &found, pinned))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pinned_as(limits: &Limits) -> BTreeMap<&'static str, u32> {
        capacities(limits)
            .unwrap()
            .into_iter()
            .map(|c| (c.map, c.max_entries))
            .collect()
    }

    #[test]
    fn every_pinned_map_is_sized_and_invalid_sizes_are_refused() {
        let all = capacities(&Limits::default()).unwrap();
        // One entry per map of the object (lb-ebpf/src/maps.rs pins all of them).
        let mut names: Vec<_> = all.iter().map(|c| c.map).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        assert_eq!(all.len(), 20);
        let revnat = all.iter().find(|c| c.map == MAP_REVNAT).unwrap();
        assert_eq!(
            revnat.max_entries,
            DEFAULT_CT_ENTRIES + DEFAULT_CT_NEW_ENTRIES
        );
        let no_ct = Limits {
            ct_entries: 0,
            ..Limits::default()
        };
        assert!(capacities(&no_ct).is_err());
        let huge = Limits {
            ct_entries: u32::MAX,
            ..Limits::default()
        };
        assert!(capacities(&huge).is_err());
    }

    #[test]
    fn same_flags_fit_and_nothing_pinned_fits() {
        let l = Limits::default();
        let pinned = pinned_as(&l);
        let wanted = capacities(&l).unwrap();
        assert!(mismatches(&wanted, |m| pinned.get(m).copied()).is_empty());
        assert!(mismatches(&wanted, |_| None).is_empty());
        // The arena rounds to whole elements: one slot more or less in the same element
        // is the same map.
        let odd = Limits {
            maglev_arena: l.maglev_arena - 1,
            ..l.clone()
        };
        assert!(mismatches(&capacities(&odd).unwrap(), |m| pinned.get(m).copied()).is_empty());
    }

    #[test]
    fn a_larger_ct_is_refused_naming_maps_sizes_and_ways_on() {
        let old = Limits::default();
        let pinned = pinned_as(&old);
        let new = Limits {
            ct_entries: 2 * DEFAULT_CT_ENTRIES,
            ..old.clone()
        };
        let get = |m: &str| pinned.get(m).copied();
        let found = mismatches(&capacities(&new).unwrap(), get);
        let maps: Vec<_> = found.iter().map(|m| m.wanted.map).collect();
        assert_eq!(
            maps,
            [MAP_CT, MAP_SOCK_REVNAT, MAP_AFFINITY, MAP_REVNAT],
            "every map --ct-entries sizes"
        );
        let msg = refusal(Path::new("/sys/fs/bpf/xlb/n1"), &found, get);
        assert!(
            msg.contains("XLB_CT: pinned with 262144 entries, --ct-entries asks for 524288"),
            "{msg}"
        );
        assert!(
            msg.contains(
                "XLB_REVNAT: pinned with 327680 entries, --ct-entries + --ct-new-entries ask \
                 for 589824"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("(--ct-entries 262144, --ct-new-entries 65536)"),
            "{msg}"
        );
        assert!(
            msg.contains("lb-agent cleanup --pin-dir /sys/fs/bpf/xlb/n1"),
            "{msg}"
        );
    }

    #[test]
    fn a_smaller_arena_is_refused_too() {
        let old = Limits::default();
        let pinned = pinned_as(&old);
        let new = Limits {
            maglev_arena: 1000,
            ..old.clone()
        };
        let get = |m: &str| pinned.get(m).copied();
        let found = mismatches(&capacities(&new).unwrap(), get);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].wanted.map, MAP_MAGLEV);
        assert_eq!(found[0].pinned, maglev_entries(DEFAULT_MAGLEV_ARENA));
        let msg = refusal(Path::new("/p"), &found, get);
        assert!(
            msg.contains(&format!("--maglev-arena {DEFAULT_MAGLEV_ARENA}")),
            "{msg}"
        );
    }

    #[test]
    fn counters_may_be_more_but_not_fewer() {
        let wanted = capacities(&Limits::default()).unwrap();
        let more = |m: &str| (m == MAP_COUNTERS).then_some(COUNTER_COUNT + 3);
        assert!(mismatches(&wanted, more).is_empty());
        let fewer = |m: &str| (m == MAP_COUNTERS).then_some(COUNTER_COUNT - 1);
        let found = mismatches(&wanted, fewer);
        assert_eq!(found.len(), 1);
        let msg = refusal(Path::new("/p"), &found, fewer);
        assert!(msg.contains("this agent version needs at least"), "{msg}");
        assert!(!msg.contains("start with the sizes"), "{msg}");
        assert!(msg.contains("lb-agent cleanup"), "{msg}");
    }
}
