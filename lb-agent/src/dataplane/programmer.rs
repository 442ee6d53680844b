//! Writes the desired state (from `translate`) into the BPF maps, touching only what changed.
//!
//! Order of writes, so that a packet never follows a reference to something not yet written:
//! backends first, then each service's Maglev table into its inactive buffer followed by the
//! service value that flips to it, then frontends; removals go the other way round.
//! Backends that leave every service are not deleted at once: they stay in `XLB_BACKENDS`
//! for a drain period so established flows (whose conntrack entry names the backend) keep
//! working, while the Maglev tables already send new flows elsewhere. Once deleted, a flow
//! still pointing at one is re-balanced by the datapath.
//!
//! Capacity is handed out service port by service port ([`Programmer::apply`]'s admission):
//! ports already programmed first, then the others oldest Service first
//! (`Desired::service_order`). A port that does not fit is left out whole and reported
//! ([`Refusal`]); everything else keeps being programmed. A programmed port is never
//! pushed out: if what it grows into does not fit, it keeps what it has.
//!
//! [`Programmer::apply`] takes the whole desired state (first programming, resyncs);
//! [`Programmer::apply_delta`] takes only the ports that changed and writes only their
//! entries, in the same order, keeping per-backend and per-ClusterIP reference counts and a
//! queue of draining backends instead of recomputing them from every port. It declines
//! (writing nothing) whenever admission by age could matter: something refused, or room
//! that might not suffice.
use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{
    Array, HashMap, MapData, PerCpuArray, PerCpuValues,
    lpm_trie::{Key, LpmTrie},
};
use lb_common::*;

use crate::{
    dataplane::{arena::Arena, maglev, tables_ahead},
    model::translate::{BackendSpec, Desired, FrontendKind, Proto, Scope, SvcPort, SvcPortId},
};

/// Handles on the pinned maps the agent writes.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub services: HashMap<MapData, u32, Service>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub maglev: crate::dataplane::mmap_array::MmapArray,
    pub config: Array<MapData, Config>,
    pub svc_stats: PerCpuArray<MapData, SvcStats>,
    pub svc_meta: Array<MapData, SvcMeta>,
    pub cluster_ips: HashMap<MapData, u32, u32>,
    pub src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
    pub service_cidrs: LpmTrie<MapData, u32, u8>,
}

impl Maps {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        fn t<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
            ebpf: &mut aya::Ebpf,
            name: &str,
        ) -> Result<T> {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))?;
            Ok(T::try_from(map)?)
        }
        Ok(Self {
            frontends: t(ebpf, MAP_FRONTENDS)?,
            services: t(ebpf, MAP_SERVICES)?,
            backends: t(ebpf, MAP_BACKENDS)?,
            maglev: {
                let map = ebpf
                    .take_map(MAP_MAGLEV)
                    .with_context(|| format!("map {MAP_MAGLEV} missing from the eBPF object"))?;
                let aya::maps::Map::Array(data) = map else {
                    bail!("{MAP_MAGLEV} is not an array");
                };
                crate::dataplane::mmap_array::MmapArray::new(data)?
            },
            config: t(ebpf, MAP_CONFIG)?,
            svc_stats: t(ebpf, MAP_SVC_STATS)?,
            svc_meta: t(ebpf, MAP_SVC_META)?,
            cluster_ips: t(ebpf, MAP_CLUSTER_IPS)?,
            src_ranges: t(ebpf, MAP_SRC_RANGES)?,
            service_cidrs: t(ebpf, MAP_SERVICE_CIDRS)?,
        })
    }
}

/// The map writes [`Programmer::apply`] makes: implemented by [`Maps`], and by a map-less
/// stand-in in the unit tests so that what apply decides can be checked without BPF.
pub trait MapWriter {
    fn set_backend(&mut self, id: u32, value: Backend) -> Result<()>;
    /// Many backends at once (a first programming); on an error some may be written.
    fn set_backends(&mut self, entries: &[(u32, Backend)]) -> Result<()> {
        for (id, value) in entries {
            self.set_backend(*id, *value)?;
        }
        Ok(())
    }
    fn remove_backend(&mut self, id: u32);
    /// A new service id: zeroed counters and its name for metrics and status.
    fn init_service(&mut self, svc_id: u32, meta: SvcMeta) -> Result<()>;
    /// Many new service ids at once (a first programming); on an error some may be
    /// written.
    fn init_services(&mut self, entries: &[(u32, SvcMeta)]) -> Result<()> {
        for (svc_id, meta) in entries {
            self.init_service(*svc_id, *meta)?;
        }
        Ok(())
    }
    fn has_service(&self, svc_id: u32) -> bool;
    fn set_service(&mut self, svc_id: u32, value: Service) -> Result<()>;
    /// Many services at once; on an error some may be written.
    fn set_services(&mut self, entries: &[(u32, Service)]) -> Result<()> {
        for (svc_id, value) in entries {
            self.set_service(*svc_id, *value)?;
        }
        Ok(())
    }
    fn remove_service(&mut self, svc_id: u32);
    fn set_slot(&mut self, idx: u32, backend_id: u32) -> Result<()>;
    /// A Maglev slot as the map holds it (the arena is memory-mapped: no copy of the
    /// tables is kept in the agent, 8 KiB per service port at the default size).
    fn read_slot(&self, idx: u32) -> Option<u32>;
    fn set_frontend(&mut self, key: FrontendKey, value: Frontend) -> Result<()>;
    /// Many frontends at once (a first programming); on an error some may be written.
    fn set_frontends(&mut self, entries: &[(FrontendKey, Frontend)]) -> Result<()> {
        for (key, value) in entries {
            self.set_frontend(*key, *value)?;
        }
        Ok(())
    }
    fn remove_frontend(&mut self, key: &FrontendKey);
    fn add_cluster_ip(&mut self, addr_be: u32) -> Result<()>;
    /// Many ClusterIP addresses at once; on an error some may be written.
    fn add_cluster_ips(&mut self, addrs_be: &[u32]) -> Result<()> {
        for &a in addrs_be {
            self.add_cluster_ip(a)?;
        }
        Ok(())
    }
    fn remove_cluster_ip(&mut self, addr_be: u32);
    fn add_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8) -> Result<()>;
    fn remove_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8);
    fn add_service_cidr(&mut self, addr_be: u32, len: u8) -> Result<()>;
    fn remove_service_cidr(&mut self, addr_be: u32, len: u8);
}

impl MapWriter for Maps {
    fn set_backend(&mut self, id: u32, value: Backend) -> Result<()> {
        Ok(self.backends.insert(id, value, 0)?)
    }
    fn set_backends(&mut self, entries: &[(u32, Backend)]) -> Result<()> {
        use aya::maps::IterableMap as _;
        crate::dataplane::bpf_table::update_batch(self.backends.map(), entries)
            .context("writing backends (XLB_BACKENDS)")
    }
    fn remove_backend(&mut self, id: u32) {
        let _ = self.backends.remove(&id);
    }
    fn init_service(&mut self, svc_id: u32, meta: SvcMeta) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        self.svc_stats.set(
            svc_id,
            PerCpuValues::try_from(vec![SvcStats::default(); cpus])?,
            0,
        )?;
        Ok(self.svc_meta.set(svc_id, meta, 0)?)
    }
    fn init_services(&mut self, entries: &[(u32, SvcMeta)]) -> Result<()> {
        use crate::dataplane::bpf_table::{update_batch, update_batch_same};
        use aya::maps::IterableMap as _;
        // A per-CPU value is one 8-byte-aligned copy per possible CPU.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = vec![0u8; size_of::<SvcStats>().next_multiple_of(8) * cpus];
        let ids: Vec<u32> = entries.iter().map(|(id, _)| *id).collect();
        update_batch_same(self.svc_stats.map(), &ids, &zero)
            .context("zeroing service counters (XLB_SVC_STATS)")?;
        update_batch(self.svc_meta.map(), entries).context("writing service names (XLB_SVC_META)")
    }
    fn has_service(&self, svc_id: u32) -> bool {
        self.services.get(&svc_id, 0).is_ok()
    }
    fn set_service(&mut self, svc_id: u32, value: Service) -> Result<()> {
        Ok(self.services.insert(svc_id, value, 0)?)
    }
    fn set_services(&mut self, entries: &[(u32, Service)]) -> Result<()> {
        use aya::maps::IterableMap as _;
        crate::dataplane::bpf_table::update_batch(self.services.map(), entries)
            .context("writing services (XLB_SERVICES)")
    }
    fn remove_service(&mut self, svc_id: u32) {
        let _ = self.services.remove(&svc_id);
    }
    fn set_slot(&mut self, idx: u32, backend_id: u32) -> Result<()> {
        self.maglev.set(idx, backend_id)
    }
    fn read_slot(&self, idx: u32) -> Option<u32> {
        self.maglev.get(idx)
    }
    fn set_frontend(&mut self, key: FrontendKey, value: Frontend) -> Result<()> {
        Ok(self.frontends.insert(key, value, 0)?)
    }
    fn set_frontends(&mut self, entries: &[(FrontendKey, Frontend)]) -> Result<()> {
        use aya::maps::IterableMap as _;
        crate::dataplane::bpf_table::update_batch(self.frontends.map(), entries)
            .context("writing frontends (XLB_FRONTENDS)")
    }
    fn remove_frontend(&mut self, key: &FrontendKey) {
        let _ = self.frontends.remove(key);
    }
    fn add_cluster_ip(&mut self, addr_be: u32) -> Result<()> {
        Ok(self.cluster_ips.insert(addr_be, 0, 0)?)
    }
    fn add_cluster_ips(&mut self, addrs_be: &[u32]) -> Result<()> {
        use aya::maps::IterableMap as _;
        let entries: Vec<(u32, u32)> = addrs_be.iter().map(|&a| (a, 0)).collect();
        crate::dataplane::bpf_table::update_batch(self.cluster_ips.map(), &entries)
            .context("writing ClusterIP addresses (XLB_CLUSTER_IPS)")
    }
    fn remove_cluster_ip(&mut self, addr_be: u32) {
        let _ = self.cluster_ips.remove(&addr_be);
    }
    fn add_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8) -> Result<()> {
        Ok(self
            .src_ranges
            .insert(&range_key(svc_id, addr_be, len), 1, 0)?)
    }
    fn remove_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8) {
        let _ = self.src_ranges.remove(&range_key(svc_id, addr_be, len));
    }
    fn add_service_cidr(&mut self, addr_be: u32, len: u8) -> Result<()> {
        Ok(self
            .service_cidrs
            .insert(&aya::maps::lpm_trie::Key::new(len as u32, addr_be), 1, 0)?)
    }
    fn remove_service_cidr(&mut self, addr_be: u32, len: u8) {
        let _ = self
            .service_cidrs
            .remove(&aya::maps::lpm_trie::Key::new(len as u32, addr_be));
    }
}

/// The map reads [`Programmer::adopt`] makes: implemented by [`Maps`], and by the map-less
/// stand-in of the unit tests so that the golden dumps adopt what a previous run wrote.
/// The listings are in the maps' own order (`adopt` processes them in that order).
pub trait MapReader {
    /// Slots in the Maglev arena.
    fn arena_entries(&self) -> u32;
    /// Every backend, as (id, value).
    fn backends(&self) -> impl Iterator<Item = Result<(u32, Backend)>> + '_;
    /// Every service, as (svc_id, value).
    fn services(&self) -> impl Iterator<Item = Result<(u32, Service)>> + '_;
    /// The metadata of a service id, if it can be read.
    fn service_meta(&self, svc_id: u32) -> Option<SvcMeta>;
    /// The backend id in a Maglev slot; `None` past the arena's end.
    fn slot(&self, idx: u32) -> Option<u32>;
    fn frontends(&self) -> impl Iterator<Item = Result<(FrontendKey, Frontend)>> + '_;
    fn cluster_ips(&self) -> impl Iterator<Item = Result<u32>> + '_;
    /// Every loadBalancerSourceRange, as (svc_id, address, prefix length).
    fn src_ranges(&self) -> impl Iterator<Item = Result<(u32, u32, u8)>> + '_;
    /// Every service CIDR, as (network address, prefix length).
    fn service_cidrs(&self) -> impl Iterator<Item = Result<(u32, u8)>> + '_;
}

impl MapReader for Maps {
    fn arena_entries(&self) -> u32 {
        self.maglev.entries()
    }
    fn backends(&self) -> impl Iterator<Item = Result<(u32, Backend)>> + '_ {
        self.backends.iter().map(|r| Ok(r?))
    }
    fn services(&self) -> impl Iterator<Item = Result<(u32, Service)>> + '_ {
        self.services.iter().map(|r| Ok(r?))
    }
    fn service_meta(&self, svc_id: u32) -> Option<SvcMeta> {
        self.svc_meta.get(&svc_id, 0).ok()
    }
    fn slot(&self, idx: u32) -> Option<u32> {
        self.maglev.get(idx)
    }
    fn frontends(&self) -> impl Iterator<Item = Result<(FrontendKey, Frontend)>> + '_ {
        self.frontends.iter().map(|r| Ok(r?))
    }
    fn cluster_ips(&self) -> impl Iterator<Item = Result<u32>> + '_ {
        self.cluster_ips.keys().map(|r| Ok(r?))
    }
    fn src_ranges(&self) -> impl Iterator<Item = Result<(u32, u32, u8)>> + '_ {
        self.src_ranges.keys().map(|k| {
            let k = k?;
            let d = k.data();
            Ok((
                u32::from_be(d.svc_id_be),
                d.addr_be,
                (k.prefix_len() - 32) as u8,
            ))
        })
    }
    fn service_cidrs(&self) -> impl Iterator<Item = Result<(u32, u8)>> + '_ {
        self.service_cidrs.keys().map(|k| {
            let k = k?;
            Ok((k.data(), k.prefix_len() as u8))
        })
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Smallest Maglev table size (prime, see `maglev::choose_m`).
    pub min_m: u32,
    /// How long a backend removed from every service stays resolvable for established flows.
    pub drain: Duration,
    pub max_services: u32,
    pub max_frontends: u32,
    pub max_backends: u32,
    /// Slots of the Maglev arena; [`Programmer::adopt`] corrects it to the pinned map's size.
    pub arena: u32,
}

struct Table {
    off: u32,
    m: u32,
}

impl Table {
    /// Backend ids as the arena holds them now.
    fn slots(&self, maps: &impl MapWriter) -> Vec<u32> {
        (self.off..self.off + self.m)
            .map(|i| self.slot(maps, i))
            .collect()
    }

    fn slot(&self, maps: &impl MapWriter, i: u32) -> u32 {
        maps.read_slot(i).unwrap_or(0)
    }

    /// Whether the arena holds `table` here.
    fn holds(&self, maps: &impl MapWriter, table: &[u32]) -> bool {
        table.len() == self.m as usize
            && (self.off..)
                .zip(table)
                .all(|(i, &id)| self.slot(maps, i) == id)
    }

    /// Writes the slots of `table` (of this size) that differ from what the arena holds;
    /// returns how many it wrote.
    fn write(&self, maps: &mut impl MapWriter, table: &[u32]) -> Result<usize> {
        let mut written = 0;
        for (i, &id) in (self.off..).zip(table) {
            if self.slot(maps, i) != id {
                maps.set_slot(i, id)?;
                written += 1;
            }
        }
        Ok(written)
    }
}

struct SvcState {
    svc_id: u32,
    tables: [Option<Table>; 2],
    active: usize,
    value: Service,
    /// Admitted, but its counters and name are not written yet.
    fresh: bool,
    /// Fingerprint of what [`Programmer::write_service`] last wrote completely (backend
    /// ids, flags, table size): an unchanged port skips rebuilding its Maglev table, the
    /// bulk of a resync's cost. None: unknown, or served by a smaller table than wanted.
    written: Option<u64>,
}

/// 12 bytes: a first programming keeps one per backend (a million at 100,000 ports); the
/// drain deadline of the few that drain is in `Programmer::drain_at`.
struct BackendState {
    id: u32,
    value: Backend,
}

/// What one `apply` changed, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyStats {
    pub services_written: usize,
    pub services_removed: usize,
    pub slots_written: usize,
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_written: usize,
    pub backends_removed: usize,
    /// Service ports left out because they do not fit (see [`Programmer::refusals`]).
    pub ports_refused: usize,
}

/// Which limit a service port ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Limit {
    /// `--max-services`: the service map and its per-port arrays.
    ServicePorts,
    /// `--max-frontends`.
    Frontends,
    /// `--max-backends`.
    Backends,
    /// `--maglev-arena`.
    MaglevArena,
}

impl Limit {
    pub const ALL: [Limit; 4] = [
        Limit::ServicePorts,
        Limit::Frontends,
        Limit::Backends,
        Limit::MaglevArena,
    ];

    /// Label value for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ServicePorts => "service_ports",
            Limit::Frontends => "frontends",
            Limit::Backends => "backends",
            Limit::MaglevArena => "maglev_arena",
        }
    }
}

/// A service port (or part of one) the last apply could not program for lack of room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub id: SvcPortId,
    pub limit: Limit,
    /// The port is not programmed at all. Otherwise it is, but without some of what it
    /// asked for (frontends, backends, a Maglev table of the size it needs, or the update
    /// itself), and it keeps serving what it had.
    pub whole: bool,
    /// `<port id>: ...`, saying what is missing and which flag raises the limit. The same
    /// refusal reads the same from one apply to the next (it is logged and posted once).
    pub message: String,
}

/// Why [`Programmer::apply`] failed: a write to the maps did not go through. (What does
/// not fit is not an error: see [`Refusal`].) Reads as the map writer's error, whose
/// causes are its `source()`s.
#[derive(Debug)]
pub enum ApplyError {
    /// A BPF map operation failed (an `aya::maps::MapError` among the causes).
    MapWrite {
        /// The service port whose own entries were being written (its counters and name,
        /// Maglev table, service value); None for shared ones (backends, frontends,
        /// ClusterIP addresses, source ranges).
        port: Option<SvcPortId>,
        error: anyhow::Error,
    },
    /// Something around a map operation failed (counting CPUs, the Maglev arena's
    /// bounds).
    Other {
        port: Option<SvcPortId>,
        error: anyhow::Error,
    },
}

impl ApplyError {
    /// Classifies what a [`MapWriter`] returned while writing `port` (see
    /// [`ApplyError::MapWrite`]).
    pub fn new(error: anyhow::Error, port: Option<SvcPortId>) -> Self {
        if error.chain().any(|c| c.is::<aya::maps::MapError>()) {
            ApplyError::MapWrite { port, error }
        } else {
            ApplyError::Other { port, error }
        }
    }

    /// The service port being written, if the write was its own.
    pub fn port(&self) -> Option<&SvcPortId> {
        match self {
            ApplyError::MapWrite { port, .. } | ApplyError::Other { port, .. } => port.as_ref(),
        }
    }

    fn error(&self) -> &anyhow::Error {
        match self {
            ApplyError::MapWrite { error, .. } | ApplyError::Other { error, .. } => error,
        }
    }
}

/// Every `?` in `apply` is a [`MapWriter`] operation.
impl From<anyhow::Error> for ApplyError {
    fn from(error: anyhow::Error) -> Self {
        ApplyError::new(error, None)
    }
}

impl std::fmt::Display for ApplyError {
    /// The map writer's own message (without `{:#}`'s causes: those are `source()`'s).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error())
    }
}

impl std::error::Error for ApplyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        (**self.error()).source()
    }
}

pub struct Programmer {
    settings: Settings,
    arena: Arena,
    services: BTreeMap<SvcPortId, SvcState>,
    free_svc_ids: BTreeSet<u32>,
    next_svc_id: u32,
    /// Hashed, not ordered: nothing needs them in order (the drain pass sorts what it
    /// writes), and a `BTreeMap` filled in ascending order leaves its nodes half empty.
    backends: FastMap<BackendKey, BackendState>,
    next_backend_id: u32,
    frontends: BTreeMap<FrontendKey, Frontend>,
    cluster_ips: BTreeSet<u32>,
    /// (svc_id, address, prefix length) of every loadBalancerSourceRange written.
    ranges: BTreeSet<(u32, u32, u8)>,
    /// (network address, prefix length) of every service CIDR written.
    service_cidrs: BTreeSet<(u32, u8)>,
    /// Services found in the pins at start, by the port their metadata names, not yet
    /// claimed by an apply.
    adopted: BTreeMap<AdoptKey, (u32, Service)>,
    /// Their active tables (reserved in the arena).
    adopted_tables: BTreeMap<u32, Table>,
    /// What the last apply left out.
    refusals: Vec<Refusal>,
    /// The last apply left something out while it freed room (ids, tables, backends are
    /// freed only after the writes): applying again now may fit it.
    retry_at: Option<Instant>,
    /// Per backend, how many programmed ports list it as serving, as draining, and as
    /// local: what [`Programmer::apply_delta`] updates instead of recomputing every
    /// port's backends.
    be_refs: FastMap<BackendKey, (u32, u32, u32)>,
    /// Per ClusterIP address, how many programmed frontends use it.
    cip_refs: FastMap<u32, u32>,
    /// Backends no port uses, waiting to be deleted: the deadline of each.
    drain_at: FastMap<BackendKey, Instant>,
    /// The same by deadline, so that neither an apply nor [`Programmer::next_deadline`]
    /// scans every backend.
    drain_queue: BTreeSet<(Instant, BackendKey)>,
    /// The last apply programmed everything it was given and no write failed, so the
    /// state above matches the maps and [`Programmer::apply_delta`] may build on it.
    delta_ok: bool,
}

/// One service port's change for [`Programmer::apply_delta`]: what the last apply
/// programmed for it (None: a new port) and what it becomes (None: the port is gone).
#[derive(Debug, Clone, Copy)]
pub struct PortChange<'a> {
    pub old: Option<&'a SvcPort>,
    pub new: Option<&'a SvcPort>,
}

/// What `adopt` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Adopted {
    pub services: usize,
    pub backends: usize,
    pub frontends: usize,
}

fn range_key(svc_id: u32, addr_be: u32, len: u8) -> Key<SrcRangeKey> {
    Key::new(
        32 + len as u32,
        SrcRangeKey {
            svc_id_be: svc_id.to_be(),
            addr_be,
        },
    )
}

fn fe_key(addr: Ipv4Addr, port: u16, proto: u8) -> FrontendKey {
    FrontendKey::new(u32::from_ne_bytes(addr.octets()), port.to_be(), proto)
}

type BackendKey = (Ipv4Addr, u16);

/// The programmer's maps by backend (a million entries at 100,000 ports, each looked up
/// several times per apply) hash with aHash, randomly keyed like std's SipHash (the keys
/// come from the cluster's EndpointSlices) but several times faster on these small keys.
type FastMap<K, V> = StdHashMap<K, V, ahash::RandomState>;
type FastSet<K> = HashSet<K, ahash::RandomState>;

fn be_key(b: &BackendSpec) -> BackendKey {
    (b.addr, b.port)
}

/// Service map writes of one [`Programmer::write_ports`], held back to be written in
/// batches ([`Programmer::flush`]): a first programming of 100,000 service ports made
/// three bpf(2) calls for each (counters, name, value).
#[derive(Default)]
struct HeldWrites<'a> {
    /// New service ids: (id, name, port).
    inits: Vec<(u32, SvcMeta, &'a SvcPortId)>,
    values: Vec<HeldValue<'a>>,
}

impl<'a> HeldWrites<'a> {
    /// Holds `value` for `port`, whose state `svc` is not yet changed to it.
    fn hold_value(&mut self, port: &'a SvcPortId, svc: &SvcState, value: Service) {
        self.values.push(HeldValue {
            svc_id: svc.svc_id,
            value,
            port,
            before: svc.value,
            active_before: svc.active,
        });
    }
}

/// A service value held back, and what the programmer recorded before it.
#[derive(Clone, Copy)]
struct HeldValue<'a> {
    svc_id: u32,
    value: Service,
    port: &'a SvcPortId,
    before: Service,
    active_before: usize,
}

/// Backend keys, sorted and unique: a port's few new backends (a `BTreeSet` took a node
/// allocation per port, 100,000 of them in a first programming).
struct NewKeys(Vec<BackendKey>);

impl NewKeys {
    fn of(mut keys: Vec<BackendKey>) -> Self {
        keys.sort_unstable();
        keys.dedup();
        Self(keys)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn contains(&self, k: &BackendKey) -> bool {
        self.0.binary_search(k).is_ok()
    }
}

/// What the written ports need in the maps besides their tables.
#[derive(Default)]
struct Wanted {
    /// loadBalancerSourceRanges, as (svc_id, address, prefix length).
    ranges: BTreeSet<(u32, u32, u8)>,
    cluster_ips: BTreeSet<u32>,
    frontends: BTreeMap<FrontendKey, Frontend>,
}

impl Wanted {
    /// Records what the written port `p` (service id `svc_id`) needs: its source ranges,
    /// ClusterIP addresses and frontends.
    fn add(&mut self, p: &SvcPort, svc_id: u32) {
        for &(addr, len) in &p.source_ranges {
            self.ranges
                .insert((svc_id, u32::from_ne_bytes(addr.octets()), len));
        }
        for f in &p.frontends {
            let mut flags = f.kind.flag();
            if f.kind == FrontendKind::LoadBalancer && !p.source_ranges.is_empty() {
                flags |= FE_SOURCE_RANGES;
            }
            if f.kind == FrontendKind::ClusterIp {
                self.cluster_ips.insert(u32::from_ne_bytes(f.addr.octets()));
            }
            self.frontends.insert(
                fe_key(f.addr, f.port, p.id.proto.number()),
                Frontend {
                    svc_id,
                    flags,
                    inside_svc_id: svc_id,
                },
            );
        }
    }
}

/// The names `p`'s Maglev table is built from, one per backend in order.
fn maglev_names(p: &SvcPort) -> Vec<maglev::BackendName> {
    p.backends
        .iter()
        .map(|b| maglev::BackendName::new(b.addr, b.port))
        .collect()
}

/// The service ports `apply` programs this time.
struct Plan<'a> {
    /// In `desired.ports` order; trimmed copies where a programmed port got less than it
    /// asked for.
    ports: Vec<Cow<'a, SvcPort>>,
    refusals: Vec<Refusal>,
}

/// Room left while ports are admitted.
#[derive(Default)]
struct Budget {
    frontends: FastSet<FrontendKey>,
    /// Backend keys admitted this round that have no id yet.
    new_backends: FastSet<BackendKey>,
}

impl Programmer {
    pub fn new(settings: Settings) -> Self {
        Self {
            arena: Arena::new(settings.arena),
            settings,
            services: BTreeMap::new(),
            free_svc_ids: BTreeSet::new(),
            next_svc_id: 0,
            backends: FastMap::default(),
            // Backend id 0 is reserved: it marks an unwritten Maglev slot.
            next_backend_id: 1,
            frontends: BTreeMap::new(),
            cluster_ips: BTreeSet::new(),
            ranges: BTreeSet::new(),
            service_cidrs: BTreeSet::new(),
            adopted: BTreeMap::new(),
            adopted_tables: BTreeMap::new(),
            refusals: Vec::new(),
            retry_at: None,
            be_refs: FastMap::default(),
            cip_refs: FastMap::default(),
            drain_at: FastMap::default(),
            drain_queue: BTreeSet::new(),
            delta_ok: false,
        }
    }

    /// Takes over what a previous run of the agent left in the pinned maps, so a restart
    /// loses nothing: backend ids are kept (conntrack entries name them), service ids and
    /// their active Maglev tables are kept until the first apply replaces them, and the
    /// first apply then removes whatever the new desired state no longer has. Until that
    /// apply the datapath keeps serving the old state untouched.
    pub fn adopt(&mut self, maps: &impl MapReader) -> Result<Adopted> {
        // A pinned arena keeps the size it was created with, whatever this run asked for.
        let entries = maps.arena_entries();
        if entries != self.settings.arena {
            log::info!(
                "the pinned Maglev arena has {entries} slots (not {}): using that",
                self.settings.arena
            );
            self.settings.arena = entries;
            self.arena = Arena::new(entries);
        }
        let mut out = Adopted::default();
        for item in maps.backends() {
            let (id, b) = item?;
            let key = (
                Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                u16::from_be(b.port_be),
            );
            self.backends.insert(key, BackendState { id, value: b });
            self.next_backend_id = self.next_backend_id.max(id.wrapping_add(1).max(1));
            out.backends += 1;
        }
        for item in maps.services() {
            let (svc_id, svc) = item?;
            let meta = maps.service_meta(svc_id).unwrap_or_default();
            let key = meta_id(&meta).map_or(AdoptKey::Unnamed(svc_id), AdoptKey::Port);
            if svc.table_m > 0 {
                if !self.arena.reserve(svc.table_off, svc.table_m) {
                    let name = match &key {
                        AdoptKey::Port(id) => id.to_string(),
                        AdoptKey::Unnamed(id) => format!("service id {id}"),
                    };
                    bail!(
                        "pinned Maglev table of {name} overlaps another; remove the pins to start afresh"
                    );
                }
                if u64::from(svc.table_off) + u64::from(svc.table_m) > u64::from(entries) {
                    bail!("pinned table out of the arena");
                }
                self.adopted_tables.insert(
                    svc_id,
                    Table {
                        off: svc.table_off,
                        m: svc.table_m,
                    },
                );
            }
            self.next_svc_id = self.next_svc_id.max(svc_id + 1);
            self.adopted.insert(key, (svc_id, svc));
            out.services += 1;
        }
        let used: BTreeSet<u32> = self.adopted.values().map(|(id, _)| *id).collect();
        self.free_svc_ids = (0..self.next_svc_id)
            .filter(|id| !used.contains(id))
            .collect();
        for item in maps.frontends() {
            let (k, v) = item?;
            self.frontends.insert(k, v);
            out.frontends += 1;
        }
        for k in maps.cluster_ips() {
            self.cluster_ips.insert(k?);
        }
        for k in maps.service_cidrs() {
            self.service_cidrs.insert(k?);
        }
        for k in maps.src_ranges() {
            self.ranges.insert(k?);
        }
        Ok(out)
    }

    /// What the last apply left out or programmed only in part, in admission order.
    pub fn refusals(&self) -> &[Refusal] {
        &self.refusals
    }

    /// Decides which service ports this apply programs, in priority order, and reserves
    /// their room: ids, and Maglev buffers in the arena (allocated here, in that order, so
    /// that the writes cannot run out of arena, fragmented or not). Touches no map.
    fn admit<'a>(&mut self, desired: &'a Desired, maps: &impl MapWriter) -> Plan<'a> {
        // Services from before a restart are programmed ports like any other.
        let adopting = !self.adopted.is_empty();
        for p in desired.ports.iter().filter(|_| adopting) {
            if !self.services.contains_key(&p.id)
                && let Some((svc_id, value)) = self.adopted.remove(&AdoptKey::Port(p.id.clone()))
            {
                // Same id (frontends already point at it); its live table becomes the
                // active buffer, the next one goes to the other.
                let table = self.adopted_tables.remove(&svc_id);
                self.services.insert(
                    p.id.clone(),
                    SvcState {
                        svc_id,
                        tables: [table, None],
                        active: 0,
                        value,
                        fresh: false,
                        written: None,
                    },
                );
            }
        }
        let age: StdHashMap<(&str, &str), usize> = desired
            .service_order
            .iter()
            .enumerate()
            .map(|(i, (ns, name))| ((ns.as_str(), name.as_str()), i))
            .collect();
        let mut order: Vec<usize> = (0..desired.ports.len()).collect();
        order.sort_by_cached_key(|&i| {
            let id = &desired.ports[i].id;
            (
                !self.services.contains_key(id),
                age.get(&(id.namespace.as_str(), id.name.as_str()))
                    .copied()
                    .unwrap_or(usize::MAX),
                i,
            )
        });

        let mut admitted: Vec<Option<Cow<'a, SvcPort>>> =
            (0..desired.ports.len()).map(|_| None).collect();
        let mut refusals = Vec::new();
        let mut budget = Budget::default();
        // Room for the new backends at once (a first programming: all of them; growing a
        // set of a million step by step rehashes it at every doubling).
        let listed: usize = desired
            .ports
            .iter()
            .map(|p| p.backends.len() + p.draining.len())
            .sum();
        budget
            .new_backends
            .reserve(listed.saturating_sub(self.backends.len()));
        for i in order {
            let p = &desired.ports[i];
            admitted[i] = if self.services.contains_key(&p.id) {
                Some(self.admit_programmed(p, &mut budget, &mut refusals, maps))
            } else {
                match self.admit_new(p, &mut budget) {
                    Ok(p) => Some(p),
                    Err((limit, why)) => {
                        refusals.push(Refusal {
                            id: p.id.clone(),
                            limit,
                            whole: true,
                            message: format!("{}: not programmed: {why}", p.id),
                        });
                        None
                    }
                }
            };
        }
        Plan {
            ports: admitted.into_iter().flatten().collect(),
            refusals,
        }
    }

    fn free_backend_slots(&self, budget: &Budget) -> usize {
        (self.settings.max_backends as usize)
            .saturating_sub(self.backends.len() + budget.new_backends.len())
    }

    /// Backend keys of `p` that have no id yet and are not admitted yet: (serving,
    /// draining), each sorted and unique ([`NewKeys`]).
    fn new_backend_keys(&self, p: &SvcPort, budget: &Budget) -> (NewKeys, NewKeys) {
        let new = |b: &&BackendSpec| {
            !self.backends.contains_key(&be_key(b)) && !budget.new_backends.contains(&be_key(b))
        };
        let serving = NewKeys::of(p.backends.iter().filter(new).map(be_key).collect());
        let draining = NewKeys::of(
            p.draining
                .iter()
                .filter(new)
                .map(be_key)
                .filter(|k| !serving.contains(k))
                .collect(),
        );
        (serving, draining)
    }

    fn admit_new<'a>(
        &mut self,
        p: &'a SvcPort,
        budget: &mut Budget,
    ) -> std::result::Result<Cow<'a, SvcPort>, (Limit, String)> {
        let s = &self.settings;
        if !self.has_free_svc_id() {
            return Err((
                Limit::ServicePorts,
                format!(
                    "all {} service-port slots are in use (raise --max-services)",
                    s.max_services
                ),
            ));
        }
        let keys: Vec<FrontendKey> = p
            .frontends
            .iter()
            .map(|f| fe_key(f.addr, f.port, p.id.proto.number()))
            .filter(|k| !budget.frontends.contains(k))
            .collect();
        let fe_free = (s.max_frontends as usize).saturating_sub(budget.frontends.len());
        if keys.len() > fe_free {
            return Err((
                Limit::Frontends,
                format!(
                    "the frontend map is full (needs {} of its {} entries; raise --max-frontends)",
                    keys.len(),
                    s.max_frontends
                ),
            ));
        }
        let be_free = self.free_backend_slots(budget);
        let (serving, draining) = self.new_backend_keys(p, budget);
        let mut port = Cow::Borrowed(p);
        if serving.len() + draining.len() > be_free {
            if serving.len() > be_free {
                return Err((
                    Limit::Backends,
                    format!(
                        "the backend map is full (needs {} new of its {} entries; raise --max-backends)",
                        serving.len(),
                        s.max_backends
                    ),
                ));
            }
            // Endpoints that no longer serve and were never programmed carry no flow.
            port.to_mut()
                .draining
                .retain(|b| !draining.contains(&be_key(b)));
        }
        // Both buffers now, at the size the backends ask for, so that later updates never
        // wait for room a newer Service took.
        let m = maglev::choose_m(p.backends.len(), s.min_m);
        let free = self.arena.free_slots();
        let tables = match self.arena.alloc(m) {
            Some(a) => match self.arena.alloc(m) {
                Some(b) => Some((a, b)),
                None => {
                    self.arena.free(a, m);
                    None
                }
            },
            None => None,
        };
        let Some((a, b)) = tables else {
            // No count of free slots in the text: it changes with every other Service, and
            // the same refusal must read the same to be logged and posted once.
            let why = if free >= 2 * u64::from(m) {
                format!(
                    "the Maglev arena is fragmented (no room for two tables of {m} slots in its {} \
                     slots; raise --maglev-arena)",
                    s.arena
                )
            } else {
                format!(
                    "the Maglev arena is full (needs {} of its {} slots; raise --maglev-arena)",
                    2 * m,
                    s.arena
                )
            };
            return Err((Limit::MaglevArena, why));
        };
        let svc_id = self.alloc_svc_id().expect("checked above");
        let table = |off| Table { off, m };
        self.services.insert(
            p.id.clone(),
            SvcState {
                svc_id,
                tables: [Some(table(a)), Some(table(b))],
                active: 0,
                value: Service::default(),
                fresh: true,
                written: None,
            },
        );
        budget.frontends.extend(keys);
        budget.new_backends.extend(serving.0);
        budget.new_backends.extend(
            port.draining
                .iter()
                .map(be_key)
                .filter(|k| draining.contains(k)),
        );
        Ok(port)
    }

    /// A programmed port is always admitted: what it has keeps working, and what it grew
    /// into is programmed as far as it fits.
    fn admit_programmed<'a>(
        &mut self,
        p: &'a SvcPort,
        budget: &mut Budget,
        refusals: &mut Vec<Refusal>,
        maps: &impl MapWriter,
    ) -> Cow<'a, SvcPort> {
        let s = self.settings.clone();
        let svc_id = self.services[&p.id].svc_id;
        let mut port = Cow::Borrowed(p);
        let mut refuse = |limit, message: String| {
            refusals.push(Refusal {
                id: p.id.clone(),
                limit,
                whole: false,
                message,
            })
        };

        // Frontends: the ones it has first, then new ones while they fit.
        let proto = p.id.proto.number();
        let key = |f: &crate::model::translate::FrontendSpec| fe_key(f.addr, f.port, proto);
        let wanted = p
            .frontends
            .iter()
            .filter(|f| !budget.frontends.contains(&key(f)))
            .count();
        let mut fe_free = (s.max_frontends as usize).saturating_sub(budget.frontends.len());
        if wanted > fe_free {
            let has = |f: &crate::model::translate::FrontendSpec| {
                self.frontends.get(&key(f)).map(|v| v.svc_id) == Some(svc_id)
            };
            let mut keep = BTreeSet::new();
            for pass_has in [true, false] {
                for f in &p.frontends {
                    let k = key(f);
                    if has(f) == pass_has && fe_free > 0 && !budget.frontends.contains(&k) {
                        keep.insert(k);
                        fe_free -= 1;
                    }
                }
            }
            let left: Vec<String> = p
                .frontends
                .iter()
                .filter(|f| !keep.contains(&key(f)) && !budget.frontends.contains(&key(f)))
                .map(|f| format!("{}:{}", f.addr, f.port))
                .collect();
            refuse(
                Limit::Frontends,
                format!(
                    "{}: frontends {} not programmed: the frontend map is full ({} entries; \
                     raise --max-frontends)",
                    p.id,
                    left.join(", "),
                    s.max_frontends
                ),
            );
            port.to_mut()
                .frontends
                .retain(|f| keep.contains(&key(f)) || budget.frontends.contains(&key(f)));
        }
        budget.frontends.extend(port.frontends.iter().map(key));

        // Backends: the ones with ids first, then new ones while they fit.
        let be_free = self.free_backend_slots(budget);
        let (serving, draining) = self.new_backend_keys(&port, budget);
        if serving.len() + draining.len() > be_free {
            // The lowest keys fit (the draining ones may be what does not).
            let (fit, left) = serving.0.split_at(be_free.min(serving.len()));
            let take = NewKeys(fit.to_vec());
            let left: Vec<String> = left.iter().map(|(a, p)| format!("{a}:{p}")).collect();
            let port = port.to_mut();
            port.draining.retain(|b| !draining.contains(&be_key(b)));
            if !left.is_empty() {
                refuse(
                    Limit::Backends,
                    format!(
                        "{}: backends {} not programmed: the backend map is full ({} entries; \
                         raise --max-backends)",
                        p.id,
                        left.join(", "),
                        s.max_backends
                    ),
                );
                port.backends
                    .retain(|b| !serving.contains(&be_key(b)) || take.contains(&be_key(b)));
            }
            budget.new_backends.extend(take.0);
        } else {
            budget.new_backends.extend(serving.0);
            budget.new_backends.extend(draining.0);
        }

        // The buffer the next update goes to must have the size the backends ask for; if
        // the arena cannot give it, the buffer keeps its size (a less even spread, but the
        // update happens).
        let m = maglev::choose_m(port.backends.len(), s.min_m);
        let svc = self.services.get_mut(&p.id).expect("programmed");
        let inactive = 1 - svc.active;
        if svc.tables[inactive].as_ref().is_none_or(|t| t.m != m) {
            let old = svc.tables[inactive].take();
            if let Some(old) = &old {
                self.arena.free(old.off, old.m);
            }
            match self.arena.alloc(m) {
                Some(off) => svc.tables[inactive] = Some(Table { off, m }),
                None => {
                    if let Some(old) = old {
                        // Just freed, so it is still there; its slots are unchanged.
                        let back = self.arena.reserve(old.off, old.m);
                        debug_assert!(back);
                        svc.tables[inactive] = Some(old);
                    }
                }
            }
        }
        if svc.tables[inactive].is_none() {
            // No buffer to write an update into (a table adopted from an older agent, and
            // a full arena): the port keeps serving exactly what its table holds, so those
            // backends must stay.
            let active: BTreeSet<u32> = svc.tables[svc.active]
                .iter()
                .flat_map(|t| t.slots(maps))
                .filter(|&id| id != 0)
                .collect();
            let held: Vec<BackendSpec> = self
                .backends
                .iter()
                .filter(|(_, b)| active.contains(&b.id))
                .map(|(&(addr, port), b)| BackendSpec {
                    addr,
                    port,
                    local: b.value.flags & BE_LOCAL != 0,
                })
                .collect();
            let port = port.to_mut();
            if port.backends.iter().map(be_key).ne(held.iter().map(be_key)) {
                refuse(
                    Limit::MaglevArena,
                    format!(
                        "{}: endpoint changes not programmed, it keeps its previous backends: \
                         the Maglev arena has no room for a second table of {m} slots (raise \
                         --maglev-arena)",
                        p.id,
                    ),
                );
            }
            port.backends = held;
        }
        port
    }

    fn has_free_svc_id(&self) -> bool {
        self.free_svc_ids
            .range(..self.settings.max_services)
            .next()
            .is_some()
            || self.next_svc_id < self.settings.max_services
    }

    /// An id below `max_services`: it indexes the per-port arrays (stats, names).
    fn alloc_svc_id(&mut self) -> Option<u32> {
        if let Some(&id) = self.free_svc_ids.range(..self.settings.max_services).next() {
            self.free_svc_ids.remove(&id);
            return Some(id);
        }
        if self.next_svc_id < self.settings.max_services {
            self.next_svc_id += 1;
            return Some(self.next_svc_id - 1);
        }
        None
    }

    /// Makes the maps equal to `desired`, except for what does not fit: those service
    /// ports are left out (or kept as they were) and listed in [`Self::refusals`]; that is
    /// not an error. An error is a failed map operation: the state is then partly written,
    /// consistently (nothing refers to what is not written), and the next apply completes
    /// it.
    pub fn apply(
        &mut self,
        desired: &Desired,
        maps: &mut impl MapWriter,
        now: Instant,
    ) -> Result<ApplyStats, ApplyError> {
        self.retry_at = None;
        self.refusals.clear();
        // Only a complete apply makes the indexes true again (an error leaves them stale).
        self.delta_ok = false;
        let plan = self.admit(desired, maps);
        let mut refusals = plan.refusals;
        let ports = plan.ports;
        let mut st = ApplyStats {
            ports_refused: refusals.iter().filter(|r| r.whole).count(),
            ..ApplyStats::default()
        };

        // 1. Backends every programmed service needs, in address order (sorted, not a
        // tree: a first programming has a million of them at 100,000 ports).
        // Endpoints still listed but not serving new flows stay resolvable (draining); one
        // that serves new flows for any service is not draining.
        // Local when any listing says so (one address on two nodes is a transient
        // inconsistency; this way the answer does not depend on the order of the ports).
        let mut listed: Vec<(BackendKey, bool, bool)> = ports
            .iter()
            .flat_map(|p| {
                let serving = p.backends.iter().map(|b| (be_key(b), b.local, true));
                serving.chain(p.draining.iter().map(|b| (be_key(b), b.local, false)))
            })
            .collect();
        listed.sort_unstable_by_key(|&(key, _, _)| key);
        let mut wanted: Vec<(BackendKey, Backend)> = Vec::with_capacity(listed.len());
        for (key, local, serving) in listed {
            let flags = if local { BE_LOCAL } else { 0 };
            match wanted.last_mut() {
                Some((k, v)) if *k == key => {
                    v.flags |= flags;
                    if serving {
                        v.flags &= !BE_DRAINING;
                    }
                }
                _ => wanted.push((
                    key,
                    Backend {
                        addr_be: u32::from_ne_bytes(key.0.octets()),
                        port_be: key.1.to_be(),
                        flags: flags | if serving { 0 } else { BE_DRAINING },
                        _pad: 0,
                    },
                )),
            }
        }
        let is_wanted = |key: &BackendKey| wanted.binary_search_by_key(key, |(k, _)| *k).is_ok();
        // Written together (one batch call per 4,096), and taken as written only once
        // they all are: after an error the next apply writes them again.
        let mut writes: Vec<(u32, Backend)> = Vec::new();
        let mut written: Vec<BackendKey> = Vec::new();
        // Room for them all at once: growing a map of a million entries step by step
        // rehashes (and faults in) it again at every doubling.
        self.backends
            .reserve(wanted.len().saturating_sub(self.backends.len()));
        for (key, value) in &wanted {
            let state = self.backends.entry(*key).or_insert_with(|| {
                let id = self.next_backend_id;
                self.next_backend_id = self.next_backend_id.checked_add(1).unwrap_or(1);
                BackendState {
                    id,
                    value: Backend::default(),
                }
            });
            if !self.drain_at.is_empty() {
                self.drain_at.remove(key);
            }
            if state.value != *value {
                writes.push((state.id, *value));
                written.push(*key);
                state.value = *value;
            }
        }
        if let Err(e) = maps.set_backends(&writes) {
            // Some may be written: none is taken as written, the next apply writes them all.
            for key in &written {
                if let Some(state) = self.backends.get_mut(key) {
                    state.value = Backend::default();
                }
            }
            return Err(e.into());
        }
        st.backends_written += writes.len();

        // 2. Services and their Maglev tables.
        let port_refs: Vec<&SvcPort> = ports.iter().map(|p| &**p).collect();
        let live: BTreeSet<SvcPortId> = port_refs.iter().map(|p| p.id.clone()).collect();
        let mut w = Wanted::default();
        self.write_ports(&port_refs, maps, &mut st, &mut refusals, &mut w)?;
        let Wanted {
            ranges,
            cluster_ips,
            frontends: fe_wanted,
        } = w;

        // Source ranges before the frontends that enforce them, so a new LB IP never opens
        // to everyone for a moment.
        for &(svc_id, addr, len) in ranges.difference(&self.ranges) {
            maps.add_src_range(svc_id, addr, len)?;
        }

        // 3. Frontends. Stale ones go first so that the map never holds more than the
        // admitted set (admission counted on that); a frontend that moves to another
        // service is overwritten in place, never missing.
        let stale: Vec<_> = self
            .frontends
            .keys()
            .filter(|k| !fe_wanted.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            maps.remove_frontend(&k);
            self.frontends.remove(&k);
            st.frontends_removed += 1;
        }
        // ClusterIP addresses: removed after their frontends, added after them (a new
        // address must not reject its own service's ports).
        for &a in self.cluster_ips.difference(&cluster_ips) {
            maps.remove_cluster_ip(a);
        }
        self.cluster_ips.retain(|a| cluster_ips.contains(a));
        // Written together (a batch call per 4,096), taken as written once they all are.
        let writes: Vec<(FrontendKey, Frontend)> = fe_wanted
            .iter()
            .filter(|(k, v)| self.frontends.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect();
        maps.set_frontends(&writes)?;
        st.frontends_written += writes.len();
        self.frontends.extend(writes);
        let new_cips: Vec<u32> = cluster_ips.difference(&self.cluster_ips).copied().collect();
        maps.add_cluster_ips(&new_cips)?;
        self.cluster_ips = cluster_ips;
        for &(svc_id, addr, len) in self.ranges.difference(&ranges) {
            maps.remove_src_range(svc_id, addr, len);
        }
        self.ranges = ranges;
        // Service CIDRs after every frontend and ClusterIP: a new range must not drop a
        // new service's address before its frontends are in.
        let cidrs: BTreeSet<(u32, u8)> = desired
            .service_cidrs
            .iter()
            .map(|&(a, len)| (u32::from_ne_bytes(a.octets()), len))
            .collect();
        for &(a, len) in self.service_cidrs.difference(&cidrs) {
            maps.remove_service_cidr(a, len);
        }
        for &(a, len) in cidrs.difference(&self.service_cidrs) {
            maps.add_service_cidr(a, len)?;
        }
        self.service_cidrs = cidrs;

        // 4. Services that are gone: none when every programmed one is live (each live one
        // is programmed), as on a first programming or a resync with nothing removed.
        let gone: Vec<_> = if self.services.len() == live.len() {
            Vec::new()
        } else {
            self.services
                .keys()
                .filter(|k| !live.contains(*k))
                .cloned()
                .collect()
        };
        for id in gone {
            if let Some(s) = self.services.remove(&id) {
                maps.remove_service(s.svc_id);
                for t in s.tables.into_iter().flatten() {
                    self.arena.free(t.off, t.m);
                }
                self.free_svc_ids.insert(s.svc_id);
                st.services_removed += 1;
            }
        }

        // Services from before a restart that the new state does not have.
        for (_, (svc_id, _)) in std::mem::take(&mut self.adopted) {
            maps.remove_service(svc_id);
            if let Some(t) = self.adopted_tables.remove(&svc_id) {
                self.arena.free(t.off, t.m);
            }
            self.free_svc_ids.insert(svc_id);
            st.services_removed += 1;
        }

        // 5. Backends no service uses: drain, then delete.
        let drain = self.settings.drain;
        let (mut to_drain, mut expired) = (Vec::new(), Vec::new());
        // Every wanted backend has its state now: when they are all there is, nothing is
        // unused (and a million lookups are saved).
        let unused = self.backends.len() > wanted.len();
        for key in self.backends.keys().filter(|_| unused) {
            if is_wanted(key) {
                continue;
            }
            match self.drain_at.get(key) {
                None => to_drain.push(*key),
                Some(&t) if t <= now => expired.push(*key),
                Some(_) => {}
            }
        }
        // Written in address order (the map is unordered): the same writes in the same
        // order for the same state.
        to_drain.sort_unstable();
        expired.sort_unstable();
        for key in to_drain {
            let b = self.backends.get_mut(&key).expect("listed above");
            self.drain_at.insert(key, now + drain);
            // Session affinity must stop choosing it at once.
            let mut v = b.value;
            v.flags |= BE_DRAINING;
            if v != b.value {
                maps.set_backend(b.id, v)?;
                b.value = v;
            }
        }
        for key in expired {
            self.drain_at.remove(&key);
            if let Some(b) = self.backends.remove(&key) {
                maps.remove_backend(b.id);
                st.backends_removed += 1;
            }
        }

        if !refusals.is_empty() && (st.services_removed > 0 || st.backends_removed > 0) {
            self.retry_at = Some(now);
        }
        self.rebuild_indexes(&ports);
        self.delta_ok = refusals.is_empty();
        self.refusals = refusals;
        Ok(st)
    }

    /// The indexes [`Programmer::apply_delta`] maintains, recomputed from what a full
    /// apply programmed.
    fn rebuild_indexes(&mut self, ports: &[Cow<'_, SvcPort>]) {
        self.be_refs.clear();
        self.cip_refs.clear();
        self.be_refs.reserve(self.backends.len());
        for p in ports {
            count_port(&mut self.be_refs, &mut self.cip_refs, p, 1);
        }
        self.drain_queue = self.drain_at.iter().map(|(k, t)| (*t, *k)).collect();
    }

    /// Whether [`Programmer::apply_delta`] can build on the last apply (it programmed
    /// everything it was given, and no write failed).
    pub fn delta_ready(&self) -> bool {
        self.delta_ok
    }

    /// Backends programmed (serving or draining for some port), by address and port.
    pub fn backends_in_use(&self) -> usize {
        self.be_refs.len()
    }

    /// Applies the changes of some service ports on top of the last apply, touching only
    /// their entries (and the backends, frontends, addresses they gain or lose), and
    /// deletes drained backends that are due. `changes[i].old` must be what was last
    /// applied for that port. Returns `Ok(None)`, having written nothing, when the change
    /// needs the full [`Programmer::apply`]: the last apply left something out or failed,
    /// or this change might not fit (admission by Service age needs every port). An
    /// empty `changes` only expires drained backends.
    pub fn apply_delta(
        &mut self,
        changes: &[PortChange<'_>],
        maps: &mut impl MapWriter,
        now: Instant,
    ) -> Result<Option<ApplyStats>, ApplyError> {
        if !self.delta_ok || !self.adopted.is_empty() || self.retry_at.is_some() {
            return Ok(None);
        }
        // Room, counted pessimistically (nothing this change frees is counted as free):
        // within it admission cannot refuse anything.
        let s = &self.settings;
        let mut new_ports = 0usize;
        let mut new_fe: HashSet<FrontendKey> = HashSet::new();
        let mut new_be: HashSet<BackendKey> = HashSet::new();
        for c in changes {
            match (c.old, c.new) {
                (Some(o), _) if !self.services.contains_key(&o.id) => return Ok(None),
                (None, Some(n)) if self.services.contains_key(&n.id) => return Ok(None),
                (Some(o), Some(n)) if o.id != n.id => return Ok(None),
                _ => {}
            }
            let Some(n) = c.new else { continue };
            if c.old.is_none() {
                new_ports += 1;
            }
            let proto = n.id.proto.number();
            new_fe.extend(
                n.frontends
                    .iter()
                    .map(|f| fe_key(f.addr, f.port, proto))
                    .filter(|k| !self.frontends.contains_key(k)),
            );
            new_be.extend(
                n.backends
                    .iter()
                    .chain(&n.draining)
                    .map(be_key)
                    .filter(|k| !self.backends.contains_key(k)),
            );
        }
        let free_ids = (s.max_services.saturating_sub(self.next_svc_id) as usize)
            + self
                .free_svc_ids
                .range(..s.max_services)
                .take(new_ports)
                .count();
        if new_ports > free_ids
            || self.frontends.len() + new_fe.len() > s.max_frontends as usize
            || self.backends.len() + new_be.len() > s.max_backends as usize
        {
            return Ok(None);
        }
        // Admission: ids and Maglev buffers. Only the arena can still refuse (fragmented);
        // then everything admitted here is given back and the full apply decides.
        let mut admitted: Vec<(Option<&SvcPort>, Option<Cow<'_, SvcPort>>)> = Vec::new();
        let mut refusals = Vec::new();
        let mut fresh: Vec<SvcPortId> = Vec::new();
        let mut failed = false;
        for c in changes {
            let new = match c.new {
                None => None,
                Some(n) if c.old.is_none() => match self.admit_new(n, &mut Budget::default()) {
                    Ok(p) => {
                        fresh.push(n.id.clone());
                        Some(p)
                    }
                    Err(_) => {
                        failed = true;
                        break;
                    }
                },
                Some(n) => {
                    Some(self.admit_programmed(n, &mut Budget::default(), &mut refusals, maps))
                }
            };
            admitted.push((c.old, new));
        }
        if failed || !refusals.is_empty() {
            for id in fresh {
                if let Some(svc) = self.services.remove(&id) {
                    for t in svc.tables.into_iter().flatten() {
                        self.arena.free(t.off, t.m);
                    }
                    self.free_svc_ids.insert(svc.svc_id);
                }
            }
            return Ok(None);
        }
        // From here on a failed write leaves the indexes behind the maps: the next apply
        // must be a full one.
        self.delta_ok = false;
        let mut st = ApplyStats::default();

        // 1. Backends: counts updated, the ones now used written (draining or not).
        let mut touched: BTreeSet<BackendKey> = BTreeSet::new();
        for (old, new) in &admitted {
            if let Some(o) = old {
                count_port(&mut self.be_refs, &mut self.cip_refs, o, -1);
                touched.extend(o.backends.iter().chain(&o.draining).map(be_key));
            }
            if let Some(n) = new {
                count_port(&mut self.be_refs, &mut self.cip_refs, n, 1);
                touched.extend(n.backends.iter().chain(&n.draining).map(be_key));
            }
        }
        let mut unused = Vec::new();
        for key in &touched {
            let Some(&(serving, draining, local)) = self.be_refs.get(key) else {
                unused.push(*key);
                continue;
            };
            let value = Backend {
                addr_be: u32::from_ne_bytes(key.0.octets()),
                port_be: key.1.to_be(),
                flags: if local > 0 { BE_LOCAL } else { 0 }
                    | if serving == 0 && draining > 0 {
                        BE_DRAINING
                    } else {
                        0
                    },
                _pad: 0,
            };
            let state = match self.backends.get_mut(key) {
                Some(s) => s,
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id = self.next_backend_id.checked_add(1).unwrap_or(1);
                    self.backends.entry(*key).or_insert(BackendState {
                        id,
                        value: Backend::default(),
                    })
                }
            };
            if let Some(t) = self.drain_at.remove(key) {
                self.drain_queue.remove(&(t, *key));
            }
            if state.value != value {
                maps.set_backend(state.id, value)?;
                state.value = value;
                st.backends_written += 1;
            }
        }

        // 2. Services and their tables; the frontends and ranges they now want.
        let mut ranges_old: BTreeSet<(u32, u32, u8)> = BTreeSet::new();
        let mut fe_old: BTreeSet<FrontendKey> = BTreeSet::new();
        let mut cips: BTreeSet<u32> = BTreeSet::new();
        for (old, _) in &admitted {
            if let Some(o) = old {
                let svc_id = self.services[&o.id].svc_id;
                for &(addr, len) in &o.source_ranges {
                    ranges_old.insert((svc_id, u32::from_ne_bytes(addr.octets()), len));
                }
                let proto = o.id.proto.number();
                for f in &o.frontends {
                    fe_old.insert(fe_key(f.addr, f.port, proto));
                    if f.kind == FrontendKind::ClusterIp {
                        cips.insert(u32::from_ne_bytes(f.addr.octets()));
                    }
                }
            }
        }
        let new_ports: Vec<&SvcPort> = admitted.iter().filter_map(|(_, n)| n.as_deref()).collect();
        // The old ports' ClusterIP addresses are looked at too (one may be gone).
        let mut w = Wanted {
            cluster_ips: cips,
            ..Wanted::default()
        };
        self.write_ports(&new_ports, maps, &mut st, &mut refusals, &mut w)?;
        let Wanted {
            ranges: ranges_new,
            cluster_ips: cips,
            frontends: fe_wanted,
        } = w;
        // 3. In the full apply's order: ranges in, stale frontends out, ClusterIPs out,
        // frontends in, ClusterIPs in, ranges out.
        for &(svc_id, addr, len) in ranges_new.difference(&self.ranges) {
            maps.add_src_range(svc_id, addr, len)?;
        }
        self.ranges.extend(ranges_new.iter().copied());
        for k in fe_old.iter().filter(|k| !fe_wanted.contains_key(k)) {
            if self.frontends.remove(k).is_some() {
                maps.remove_frontend(k);
                st.frontends_removed += 1;
            }
        }
        for a in &cips {
            if !self.cip_refs.contains_key(a) && self.cluster_ips.remove(a) {
                maps.remove_cluster_ip(*a);
            }
        }
        for (k, v) in &fe_wanted {
            if self.frontends.get(k) != Some(v) {
                maps.set_frontend(*k, *v)?;
                self.frontends.insert(*k, *v);
                st.frontends_written += 1;
            }
        }
        for a in &cips {
            if self.cip_refs.contains_key(a) && !self.cluster_ips.contains(a) {
                maps.add_cluster_ip(*a)?;
                self.cluster_ips.insert(*a);
            }
        }
        for r in ranges_old.difference(&ranges_new) {
            maps.remove_src_range(r.0, r.1, r.2);
            self.ranges.remove(r);
        }

        // 4. Ports that are gone.
        for (old, new) in &admitted {
            if let (Some(o), None) = (old, new)
                && let Some(s) = self.services.remove(&o.id)
            {
                maps.remove_service(s.svc_id);
                for t in s.tables.into_iter().flatten() {
                    self.arena.free(t.off, t.m);
                }
                self.free_svc_ids.insert(s.svc_id);
                st.services_removed += 1;
            }
        }

        // 5. Backends no port uses any more start draining; those due are deleted.
        let drain = self.settings.drain;
        for key in unused {
            let Some(b) = self.backends.get_mut(&key) else {
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(e) = self.drain_at.entry(key) {
                e.insert(now + drain);
                self.drain_queue.insert((now + drain, key));
                let mut v = b.value;
                v.flags |= BE_DRAINING;
                if v != b.value {
                    maps.set_backend(b.id, v)?;
                    b.value = v;
                }
            }
        }
        while let Some(&(t, key)) = self.drain_queue.first() {
            if t > now {
                break;
            }
            self.drain_queue.pop_first();
            // A backend used again since (or draining anew) has another deadline or none.
            if self.drain_at.get(&key) != Some(&t) {
                continue;
            }
            self.drain_at.remove(&key);
            if let Some(b) = self.backends.remove(&key) {
                maps.remove_backend(b.id);
                st.backends_removed += 1;
            }
        }
        // Only a refusal of a smaller table than wanted can be left here (write_service).
        self.refusals = refusals;
        self.delta_ok = self.refusals.is_empty();
        Ok(Some(st))
    }

    /// The earliest moment the caller should apply again: a draining backend is due for
    /// deletion, or room was freed that something left out may fit in.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.drain_queue
            .first()
            .map(|(t, _)| *t)
            .into_iter()
            .chain(self.retry_at)
            .min()
    }

    /// The table fingerprint of `p` as written now (see `write_service`), with its backend
    /// ids and table size.
    fn fingerprint(&self, p: &SvcPort) -> (Vec<u32>, u64, u32) {
        let ids: Vec<u32> = p
            .backends
            .iter()
            .map(|b| self.backends[&be_key(b)].id)
            .collect();
        let flags = if p.drop_if_empty {
            SVC_DROP_IF_EMPTY
        } else {
            0
        };
        let affinity_timeout = p.affinity_timeout.unwrap_or(0);
        let want_m = maglev::choose_m(ids.len(), self.settings.min_m);
        // Backend ids stand for the names the table is built from (one id per address and
        // port), so equal fingerprints mean an equal table, as long as the value written is
        // still what we wrote.
        let fingerprint = {
            use std::hash::{Hash as _, Hasher as _};
            let mut h = std::hash::DefaultHasher::new();
            (&ids, flags, affinity_timeout, want_m).hash(&mut h);
            h.finish()
        };
        (ids, fingerprint, want_m)
    }

    /// The size of the first Maglev table [`Self::write_service`] will build for the
    /// admitted port `p` (its backends written), None if it builds none.
    fn first_table_m(&self, p: &SvcPort) -> Option<u32> {
        if p.backends.is_empty() {
            return None;
        }
        let svc = self.services.get(&p.id)?;
        let (_, fingerprint, want_m) = self.fingerprint(p);
        if svc.written == Some(fingerprint) {
            return None;
        }
        let next_m = svc.tables[1 - svc.active].as_ref().map(|t| t.m);
        match &svc.tables[svc.active] {
            Some(a) if a.m == want_m || next_m != Some(want_m) => Some(a.m),
            _ => next_m,
        }
    }

    /// Writes the admitted `ports` in order (their tables built ahead: [`tables_ahead`])
    /// and records in `w` what they need besides. externalTrafficPolicy Local: the external
    /// frontends' traffic from inside the cluster goes to the port with all endpoints; only
    /// frontends that were admitted (written for their own port) are touched.
    fn write_ports(
        &mut self,
        ports: &[&SvcPort],
        maps: &mut impl MapWriter,
        st: &mut ApplyStats,
        refusals: &mut Vec<Refusal>,
        w: &mut Wanted,
    ) -> Result<(), ApplyError> {
        let sizes: Vec<Option<u32>> = ports.iter().map(|p| self.first_table_m(p)).collect();
        let names = |i: usize| maglev_names(ports[i]);
        let mut held = HeldWrites::default();
        let inside = tables_ahead::with_tables(&sizes, names, |tables| {
            let mut inside = Vec::new();
            for (i, &p) in ports.iter().enumerate() {
                let svc_id = self
                    .write_service(p, tables.take(i), maps, st, refusals, &mut held)
                    .map_err(|e| ApplyError::new(e, Some(p.id.clone())))?;
                w.add(p, svc_id);
                inside.push((svc_id, p));
            }
            Ok::<_, ApplyError>(inside)
        });
        // The writes held back go out even when a port failed: what was written before
        // the failure must stay consistent with what the programmer recorded. The port's
        // own error comes first.
        let flushed = self.flush(held, maps);
        let inside = inside?;
        flushed?;
        for (svc_id, p) in inside {
            for f in &p.inside_frontends {
                let key = fe_key(f.addr, f.port, p.id.proto.number());
                if let Some(fe) = w.frontends.get_mut(&key) {
                    fe.inside_svc_id = svc_id;
                    fe.flags |= FE_SHORT_CIRCUIT;
                }
            }
        }
        Ok(())
    }

    /// Writes what `write_service` held back, in batches. If a batch fails, its entries
    /// are written one by one: a port whose counters and name still fail gets no value
    /// written either, and a port whose value is not written is recorded as it was before
    /// (its value and active table), so that the programmer's record does not claim what
    /// the maps do not hold and the next apply writes it again. The first entry's error
    /// is returned, naming its port.
    fn flush(&mut self, held: HeldWrites<'_>, maps: &mut impl MapWriter) -> Result<(), ApplyError> {
        let mut first_err = None;
        // Ports whose counters and name could not be written (rare: empty).
        let mut unnamed: BTreeSet<&SvcPortId> = BTreeSet::new();
        let inits: Vec<(u32, SvcMeta)> = held.inits.iter().map(|i| (i.0, i.1)).collect();
        if !inits.is_empty() && maps.init_services(&inits).is_err() {
            for &(svc_id, meta, id) in &held.inits {
                if let Err(e) = maps.init_service(svc_id, meta) {
                    self.services.get_mut(id).expect("admitted").fresh = true;
                    unnamed.insert(id);
                    first_err.get_or_insert_with(|| ApplyError::new(e, Some(id.clone())));
                }
            }
        }
        let mut restore = |v: &HeldValue<'_>| {
            let svc = self.services.get_mut(v.port).expect("admitted");
            svc.value = v.before;
            svc.active = v.active_before;
            svc.written = None;
        };
        let mut values = Vec::with_capacity(held.values.len());
        for v in &held.values {
            if unnamed.contains(v.port) {
                restore(v);
            } else {
                values.push((v.svc_id, v.value));
            }
        }
        if !values.is_empty() && maps.set_services(&values).is_err() {
            for v in held.values.iter().filter(|v| !unnamed.contains(v.port)) {
                if let Err(e) = maps.set_service(v.svc_id, v.value) {
                    restore(v);
                    first_err.get_or_insert_with(|| ApplyError::new(e, Some(v.port.clone())));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// `prebuilt`: the first table this builds, if it was built ahead
    /// ([`tables_ahead`]; its size as [`Self::first_table_m`] foresaw). The service's
    /// counters, name and value are written by [`Self::flush`] (`held`), after every port's
    /// tables (a table is always written before the value that points at it).
    fn write_service<'a>(
        &mut self,
        p: &'a SvcPort,
        prebuilt: Option<(u32, Vec<u32>)>,
        maps: &mut impl MapWriter,
        st: &mut ApplyStats,
        refusals: &mut Vec<Refusal>,
        held: &mut HeldWrites<'a>,
    ) -> Result<u32> {
        let (ids, fingerprint, want_m) = self.fingerprint(p);
        let svc = self.services.get_mut(&p.id).expect("admitted");
        let svc_id = svc.svc_id;
        if svc.fresh {
            held.inits.push((svc_id, meta(p), &p.id));
            svc.fresh = false;
        }

        let flags = if p.drop_if_empty {
            SVC_DROP_IF_EMPTY
        } else {
            0
        };
        let affinity_timeout = p.affinity_timeout.unwrap_or(0);
        if svc.written == Some(fingerprint) {
            return Ok(svc_id);
        }
        svc.written = None;
        if ids.is_empty() {
            let value = Service {
                flags,
                ..Service::default()
            };
            if svc.value != value || !maps.has_service(svc_id) {
                held.hold_value(&p.id, svc, value);
                svc.value = value;
                st.services_written += 1;
            }
            svc.written = Some(fingerprint);
            return Ok(svc_id);
        }

        let inactive = 1 - svc.active;
        // Admission sized the inactive buffer: `want_m`, or smaller when the arena is full.
        let next_m = svc.tables[inactive].as_ref().map(|t| t.m);
        let prebuilt = std::cell::Cell::new(prebuilt);
        let build = |m: u32| -> Vec<u32> {
            let mut table = match prebuilt.take() {
                Some((pm, table)) if pm == m => table,
                // Not prebuilt, or for another size.
                _ => maglev::build_table(&maglev_names(p), m),
            };
            for slot in &mut table {
                *slot = ids[*slot as usize];
            }
            table
        };
        let mut built = None;
        if let Some(a) = &svc.tables[svc.active]
            // A smaller table than wanted stays only while no larger buffer is at hand.
            && (a.m == want_m || next_m != Some(want_m))
        {
            let table = build(a.m);
            if a.holds(maps, &table)
                && svc.value.table_off == a.off
                && svc.value.table_m == a.m
                && svc.value.backend_count == ids.len() as u32
                && svc.value.flags == flags
                && svc.value.affinity_timeout == affinity_timeout
            {
                if a.m < want_m {
                    refusals.push(small_table(&p.id, a.m, want_m));
                } else {
                    svc.written = Some(fingerprint);
                }
                return Ok(svc_id); // nothing changed
            }
            built = Some((a.m, table));
        }
        let Some(t) = svc.tables[inactive].as_mut() else {
            // Admission reported it and kept the backends the active table uses.
            return Ok(svc_id);
        };
        let m = t.m;
        let table = match built {
            Some((bm, table)) if bm == m => table,
            _ => build(m),
        };
        st.slots_written += t.write(maps, &table)?;
        let value = Service {
            table_off: t.off,
            table_m: m,
            backend_count: ids.len() as u32,
            flags,
            affinity_timeout,
        };
        // The flip: one hash-map update (held, see above) makes the fully written table
        // visible.
        held.hold_value(&p.id, svc, value);
        svc.value = value;
        svc.active = inactive;
        st.services_written += 1;
        if m < want_m {
            refusals.push(small_table(&p.id, m, want_m));
        } else {
            svc.written = Some(fingerprint);
        }
        Ok(svc_id)
    }
}

/// Adds (`by` 1) or removes (-1) a programmed port's backends and ClusterIP addresses
/// to/from the reference counts; a count that reaches zero is removed.
fn count_port(
    be: &mut FastMap<BackendKey, (u32, u32, u32)>,
    cip: &mut FastMap<u32, u32>,
    p: &SvcPort,
    by: i32,
) {
    let bump = |n: &mut u32| *n = n.wrapping_add_signed(by);
    for (list, draining) in [(&p.backends, false), (&p.draining, true)] {
        for b in list {
            let e = be.entry(be_key(b)).or_default();
            bump(if draining { &mut e.1 } else { &mut e.0 });
            if b.local {
                bump(&mut e.2);
            }
            if (e.0, e.1) == (0, 0) {
                be.remove(&be_key(b));
            }
        }
    }
    for f in p
        .frontends
        .iter()
        .filter(|f| f.kind == FrontendKind::ClusterIp)
    {
        let a = u32::from_ne_bytes(f.addr.octets());
        let e = cip.entry(a).or_default();
        bump(e);
        if *e == 0 {
            cip.remove(&a);
        }
    }
}

fn small_table(id: &SvcPortId, m: u32, want: u32) -> Refusal {
    Refusal {
        id: id.clone(),
        limit: Limit::MaglevArena,
        whole: false,
        message: format!(
            "{id}: served by a Maglev table of {m} slots instead of {want} (less even spread): \
             the Maglev arena has no room for the larger one (raise --maglev-arena)"
        ),
    }
}

/// How [`Programmer::adopt`] files a service found in the pins: by the port its
/// `XLB_SVC_META` entry names, or, when that entry cannot be read (never written, or by an
/// agent with another layout), by its id alone: never claimed, so the first apply removes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum AdoptKey {
    Port(SvcPortId),
    Unnamed(u32),
}

/// `XLB_SVC_META` for a service port: its structured identity, type and port.
fn meta(p: &SvcPort) -> SvcMeta {
    let id = &p.id;
    let scope = match id.scope {
        Scope::Cluster => SVC_SCOPE_CLUSTER,
        Scope::Local => SVC_SCOPE_LOCAL,
    };
    let proto = id.proto.number();
    SvcMeta::new(
        &id.namespace,
        &id.name,
        &id.port_name,
        p.svc_type,
        proto,
        scope,
        p.port,
    )
    // Longer than Kubernetes allows (only a YAML source can say so): the entry names the
    // port only in part, and adoption after a restart will not recognise it (it is then
    // removed and programmed afresh).
    .unwrap_or_else(|| {
        SvcMeta::new_truncated(
            &id.namespace,
            &id.name,
            &id.port_name,
            p.svc_type,
            proto,
            scope,
            p.port,
        )
    })
}

/// The service port a pinned `XLB_SVC_META` entry names (the identity adoption compares:
/// namespace, name, port name, protocol, scope); `None` if the entry was not written by
/// this layout version or holds codes it does not know.
fn meta_id(m: &SvcMeta) -> Option<SvcPortId> {
    if !m.is_current() {
        return None;
    }
    let proto = match m.proto {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let scope = match m.scope {
        SVC_SCOPE_CLUSTER => Scope::Cluster,
        SVC_SCOPE_LOCAL => Scope::Local,
        _ => return None,
    };
    Some(SvcPortId {
        namespace: m.namespace().to_string(),
        name: m.name().to_string(),
        port_name: m.port_name().to_string(),
        proto,
        scope,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::translate::FrontendSpec;

    /// The maps as plain collections, with the kernel's limits: a hash map refuses a new
    /// key when full, an array an index past its end.
    /// Also used by the golden dumps (`crate::dataplane::programmer_golden`).
    pub(crate) struct Fake {
        max_services: u32,
        max_frontends: u32,
        max_backends: u32,
        pub(crate) backends: BTreeMap<u32, Backend>,
        pub(crate) services: BTreeMap<u32, Service>,
        pub(crate) meta: BTreeMap<u32, SvcMeta>,
        pub(crate) slots: Vec<u32>,
        pub(crate) frontends: BTreeMap<FrontendKey, Frontend>,
        pub(crate) cluster_ips: BTreeSet<u32>,
        pub(crate) ranges: BTreeSet<(u32, u32, u8)>,
        pub(crate) service_cidrs: BTreeSet<(u32, u8)>,
        /// A service id whose value writes fail (as a full or failing map would).
        refuse_service: Option<u32>,
        /// A service id whose counters and name cannot be written.
        refuse_init: Option<u32>,
    }

    impl Fake {
        pub(crate) fn new(s: &Settings) -> Self {
            Self {
                max_services: s.max_services,
                max_frontends: s.max_frontends,
                max_backends: s.max_backends,
                backends: BTreeMap::new(),
                services: BTreeMap::new(),
                meta: BTreeMap::new(),
                slots: vec![0; s.arena as usize],
                frontends: BTreeMap::new(),
                cluster_ips: BTreeSet::new(),
                ranges: BTreeSet::new(),
                service_cidrs: BTreeSet::new(),
                refuse_service: None,
                refuse_init: None,
            }
        }

        /// What the datapath could follow: every frontend leads to a service, every
        /// service with a table to slots inside the arena naming existing backends.
        pub(crate) fn check(&self) {
            for (k, f) in &self.frontends {
                assert!(
                    self.services.contains_key(&f.svc_id),
                    "frontend {k:?} points at missing service {}",
                    f.svc_id
                );
            }
            for (id, s) in &self.services {
                assert!(*id < self.max_services);
                if s.table_m == 0 {
                    continue;
                }
                assert!(s.table_off as usize + s.table_m as usize <= self.slots.len());
                for i in s.table_off..s.table_off + s.table_m {
                    let b = self.slots[i as usize];
                    assert!(b != 0, "service {id}: slot {i} unwritten");
                    assert!(self.backends.contains_key(&b), "service {id}: backend {b}");
                }
            }
        }

        /// Backends (address, port) the service's table sends new flows to.
        fn table_backends(&self, svc_id: u32) -> BTreeSet<(Ipv4Addr, u16)> {
            let s = self.services[&svc_id];
            (s.table_off..s.table_off + s.table_m)
                .map(|i| {
                    let b = self.backends[&self.slots[i as usize]];
                    (
                        Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                        u16::from_be(b.port_be),
                    )
                })
                .collect()
        }

        fn svc_of(&self, fe: &FrontendSpec, proto: Proto) -> Option<u32> {
            self.frontends
                .get(&fe_key(fe.addr, fe.port, proto.number()))
                .map(|f| f.svc_id)
        }
    }

    /// The programmer's view of each service port's two Maglev buffers, one line each:
    /// `<port> id=<svc_id> A@<off>/<m> B@<off>/<m>`, the active one marked with `*`.
    pub(crate) fn buffers(p: &Programmer) -> Vec<String> {
        p.services
            .iter()
            .map(|(id, s)| {
                let mut line = format!("{id} id={}", s.svc_id);
                for (i, t) in s.tables.iter().enumerate() {
                    let name = ["A", "B"][i];
                    let mark = if i == s.active { "*" } else { "" };
                    match t {
                        Some(t) => line += &format!(" {mark}{name}@{}/{}", t.off, t.m),
                        None => line += &format!(" {mark}{name}=none"),
                    }
                }
                line
            })
            .collect()
    }

    fn full<K: Ord, V>(m: &BTreeMap<K, V>, k: &K, max: u32) -> Result<()> {
        if !m.contains_key(k) && m.len() >= max as usize {
            bail!("map full (E2BIG)");
        }
        Ok(())
    }

    impl MapReader for Fake {
        fn arena_entries(&self) -> u32 {
            self.slots.len() as u32
        }
        fn backends(&self) -> impl Iterator<Item = Result<(u32, Backend)>> + '_ {
            self.backends.iter().map(|(&k, &v)| Ok((k, v)))
        }
        fn services(&self) -> impl Iterator<Item = Result<(u32, Service)>> + '_ {
            self.services.iter().map(|(&k, &v)| Ok((k, v)))
        }
        fn service_meta(&self, svc_id: u32) -> Option<SvcMeta> {
            self.meta.get(&svc_id).copied()
        }
        fn slot(&self, idx: u32) -> Option<u32> {
            self.slots.get(idx as usize).copied()
        }
        fn frontends(&self) -> impl Iterator<Item = Result<(FrontendKey, Frontend)>> + '_ {
            self.frontends.iter().map(|(&k, &v)| Ok((k, v)))
        }
        fn cluster_ips(&self) -> impl Iterator<Item = Result<u32>> + '_ {
            self.cluster_ips.iter().map(|&a| Ok(a))
        }
        fn src_ranges(&self) -> impl Iterator<Item = Result<(u32, u32, u8)>> + '_ {
            self.ranges.iter().map(|&r| Ok(r))
        }
        fn service_cidrs(&self) -> impl Iterator<Item = Result<(u32, u8)>> + '_ {
            self.service_cidrs.iter().map(|&r| Ok(r))
        }
    }

    impl MapWriter for Fake {
        fn set_backend(&mut self, id: u32, value: Backend) -> Result<()> {
            full(&self.backends, &id, self.max_backends)?;
            self.backends.insert(id, value);
            Ok(())
        }
        fn remove_backend(&mut self, id: u32) {
            self.backends.remove(&id);
        }
        fn init_service(&mut self, svc_id: u32, meta: SvcMeta) -> Result<()> {
            if svc_id >= self.max_services {
                bail!("index {svc_id} out of bounds");
            }
            if self.refuse_init == Some(svc_id) {
                bail!("service {svc_id}'s name refused");
            }
            self.meta.insert(svc_id, meta);
            Ok(())
        }
        fn has_service(&self, svc_id: u32) -> bool {
            self.services.contains_key(&svc_id)
        }
        fn set_service(&mut self, svc_id: u32, value: Service) -> Result<()> {
            full(&self.services, &svc_id, self.max_services)?;
            if self.refuse_service == Some(svc_id) {
                bail!("service {svc_id} refused");
            }
            self.services.insert(svc_id, value);
            Ok(())
        }
        fn remove_service(&mut self, svc_id: u32) {
            self.services.remove(&svc_id);
        }
        fn read_slot(&self, idx: u32) -> Option<u32> {
            self.slots.get(idx as usize).copied()
        }
        fn set_slot(&mut self, idx: u32, backend_id: u32) -> Result<()> {
            *self
                .slots
                .get_mut(idx as usize)
                .context("out of the arena")? = backend_id;
            Ok(())
        }
        fn set_frontend(&mut self, key: FrontendKey, value: Frontend) -> Result<()> {
            full(&self.frontends, &key, self.max_frontends)?;
            self.frontends.insert(key, value);
            Ok(())
        }
        fn remove_frontend(&mut self, key: &FrontendKey) {
            self.frontends.remove(key);
        }
        fn add_cluster_ip(&mut self, addr_be: u32) -> Result<()> {
            self.cluster_ips.insert(addr_be);
            Ok(())
        }
        fn remove_cluster_ip(&mut self, addr_be: u32) {
            self.cluster_ips.remove(&addr_be);
        }
        fn add_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8) -> Result<()> {
            self.ranges.insert((svc_id, addr_be, len));
            Ok(())
        }
        fn remove_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8) {
            self.ranges.remove(&(svc_id, addr_be, len));
        }
        fn add_service_cidr(&mut self, addr_be: u32, len: u8) -> Result<()> {
            self.service_cidrs.insert((addr_be, len));
            Ok(())
        }
        fn remove_service_cidr(&mut self, addr_be: u32, len: u8) {
            self.service_cidrs.remove(&(addr_be, len));
        }
    }

    fn settings(arena: u32) -> Settings {
        Settings {
            min_m: maglev::DEFAULT_MIN_M,
            drain: Duration::from_secs(30),
            max_services: DEFAULT_MAX_SERVICES,
            max_frontends: DEFAULT_MAX_FRONTENDS,
            max_backends: DEFAULT_MAX_BACKENDS,
            arena,
        }
    }

    fn addr(n: u32) -> Ipv4Addr {
        Ipv4Addr::from(0x0a00_0000 + n)
    }

    /// Every port's table in the maps is the Maglev table of its backends, whether it was
    /// built ahead on other threads (a bulk of ports: `tables_ahead`) or in line (one port's
    /// change), for fresh ports and for changed ones.
    #[test]
    fn bulk_and_single_changes_write_the_maglev_tables() {
        let n = 3 * tables_ahead::MIN_PER_THREAD as u32 * 2 + 5;
        let s = settings((n + 8) * 2 * 1021);
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let now = Instant::now();
        let check = |p: &Programmer, maps: &Fake, d: &Desired| {
            for port in &d.ports {
                let svc = maps.services[&p.services[&port.id].svc_id];
                let names = maglev_names(port);
                let want: Vec<u32> = maglev::build_table(&names, svc.table_m)
                    .into_iter()
                    .map(|i| p.backends[&be_key(&port.backends[i as usize])].id)
                    .collect();
                let off = svc.table_off as usize;
                assert_eq!(
                    maps.slots[off..off + svc.table_m as usize],
                    want[..],
                    "{}",
                    port.id
                );
            }
        };
        let d = desired((0..n).map(|i| port(i, 3)).collect(), 0..n);
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        check(&p, &maps, &d);
        // Every port loses a backend and gains two: all tables rebuilt in bulk.
        let grown = |i: u32| {
            let mut q = port(i, 5);
            q.backends.remove(0);
            q
        };
        let d2 = desired((0..n).map(grown).collect(), 0..n);
        p.apply(&d2, &mut maps, now).unwrap();
        maps.check();
        check(&p, &maps, &d2);
        // One port changes through a delta, the others in bulk through a delta.
        let d3 = desired((0..n).map(|i| port(i, 2)).collect(), 0..n);
        let changes: Vec<PortChange<'_>> = d2
            .ports
            .iter()
            .zip(&d3.ports)
            .map(|(o, n)| PortChange {
                old: Some(o),
                new: Some(n),
            })
            .collect();
        assert!(
            p.apply_delta(&changes[..1], &mut maps, now)
                .unwrap()
                .is_some()
        );
        assert!(
            p.apply_delta(&changes[1..], &mut maps, now)
                .unwrap()
                .is_some()
        );
        maps.check();
        check(&p, &maps, &d3);
    }

    /// Service values are written in a batch after the tables; one the maps refuse leaves
    /// the datapath on that port's previous table and the port recorded as unwritten, the
    /// others written: the next apply writes it, into the buffer the datapath does not read.
    #[test]
    fn a_refused_service_value_is_written_by_the_next_apply() {
        let s = settings(64 * 2 * 1021);
        let now = Instant::now();
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let d = desired((0..8).map(|i| port(i, 3)).collect(), 0..8);
        p.apply(&d, &mut maps, now).unwrap();
        let id = |p: &Programmer, i: usize| p.services[&d.ports[i].id].svc_id;
        let before = maps.services[&id(&p, 5)];
        let d2 = desired((0..8).map(|i| port(i, 4)).collect(), 0..8);
        maps.refuse_service = Some(id(&p, 5));
        assert!(p.apply(&d2, &mut maps, now).is_err());
        maps.check();
        assert_eq!(
            maps.services[&id(&p, 5)],
            before,
            "the refused port serves as before"
        );
        let st = &p.services[&d.ports[5].id];
        let active = st.tables[st.active].as_ref().unwrap().off;
        assert_eq!(
            active, before.table_off,
            "recorded as the table the datapath reads"
        );
        assert_eq!(maps.table_backends(id(&p, 5)).len(), 3);
        assert_eq!(
            maps.table_backends(id(&p, 6)).len(),
            4,
            "the next port is written"
        );
        maps.refuse_service = None;
        p.apply(&d2, &mut maps, now).unwrap();
        maps.check();
        for i in 0..8 {
            assert_eq!(maps.table_backends(id(&p, i)).len(), 4, "port {i}");
        }
    }

    /// A new port whose counters and name cannot be written gets no value either (else a
    /// restarted agent would adopt it under the name an earlier owner of its id left), the
    /// error names it, and the next apply writes all three.
    #[test]
    fn a_port_whose_name_is_refused_gets_no_value() {
        let s = settings(64 * 2 * 1021);
        let now = Instant::now();
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        maps.refuse_init = Some(5);
        let d = desired((0..8).map(|i| port(i, 3)).collect(), 0..8);
        let err = p.apply(&d, &mut maps, now).unwrap_err();
        let refused = d
            .ports
            .iter()
            .find(|q| p.services[&q.id].svc_id == 5)
            .unwrap();
        assert_eq!(err.port(), Some(&refused.id));
        assert!(!maps.services.contains_key(&5), "no value without its name");
        assert_eq!(maps.services.len(), 7);
        maps.check();
        maps.refuse_init = None;
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        assert!(maps.meta.contains_key(&5));
        assert_eq!(maps.table_backends(5).len(), 3);
    }

    /// What the first programming of `XLB_BENCH_PORTS` (10,000) service ports x 10 backends
    /// costs in the agent, maps in memory (no syscalls), and how much of it is the Maglev
    /// tables: `cargo test --release -p lb-agent --lib bench_first_apply -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn bench_first_apply() {
        let n: u32 = std::env::var("XLB_BENCH_PORTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let s = Settings {
            max_services: n + 64,
            max_frontends: n + 64,
            max_backends: n * 10 + 64,
            ..settings((n + 64) * 2 * 1021)
        };
        let d = desired((0..n).map(|i| port(i, 10)).collect(), 0..n);
        // Medians over a few runs: one run on a shared machine varies by a third.
        let (mut tables, mut applies) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            for p in &d.ports {
                std::hint::black_box(maglev::build_table(&maglev_names(p), 1021));
            }
            tables.push(t.elapsed());
            let mut p = Programmer::new(s.clone());
            let mut maps = Fake::new(&s);
            // The arena's pages exist before the apply, as a BPF map's do from its creation.
            std::hint::black_box(maps.slots.iter_mut()).for_each(|s| *s = 1);
            let t = Instant::now();
            p.apply(&d, &mut maps, Instant::now()).unwrap();
            applies.push(t.elapsed());
            assert_eq!(maps.services.len(), n as usize);
        }
        tables.sort();
        applies.sort();
        let (apply, tables) = (applies[2], tables[2]);
        eprintln!(
            "{n} ports x 10: apply {apply:?} (median of 5; all {applies:?}), of which Maglev \
             tables alone {tables:?} (one thread)"
        );
    }

    #[test]
    fn meta_names_the_port_as_its_id_does() {
        let mut p = port(3, 1);
        p.id.port_name = "dns".into();
        p.id.proto = Proto::Udp;
        p.id.scope = Scope::Local;
        p.svc_type = ServiceType::LoadBalancer;
        let m = meta(&p);
        assert_eq!(m.to_string(), p.id.to_string());
        assert_eq!(m.to_string(), "dev/svc-0003:dns/UDP (local)");
        assert_eq!(meta_id(&m), Some(p.id.clone()));
        assert_eq!(
            (m.port, m.service_type(), m.proto, m.scope),
            (
                80,
                Some(ServiceType::LoadBalancer),
                PROTO_UDP,
                SVC_SCOPE_LOCAL
            )
        );
        // Longer than Kubernetes allows: written cut short, and never taken for the port.
        p.id.name = "x".repeat(70);
        let m = meta(&p);
        assert_eq!(m.name(), "x".repeat(63));
        assert_ne!(meta_id(&m), Some(p.id.clone()));
        // Never initialised: names nothing.
        assert_eq!(meta_id(&SvcMeta::default()), None);
    }

    /// Service `i`: one TCP port, ClusterIP 10.96.x.y:80, `backends` endpoints of its own.
    fn port(i: u32, backends: u32) -> SvcPort {
        SvcPort {
            id: SvcPortId {
                namespace: "dev".into(),
                name: format!("svc-{i:04}"),
                port_name: String::new(),
                proto: Proto::Tcp,
                scope: Scope::Cluster,
            },
            port: 80,
            svc_type: ServiceType::ClusterIP,
            frontends: vec![FrontendSpec {
                addr: Ipv4Addr::from(0x0a60_0000 + i),
                port: 80,
                kind: FrontendKind::ClusterIp,
            }],
            backends: (0..backends)
                .map(|j| BackendSpec {
                    addr: addr(0x10_0000 + i * 64 + j),
                    port: 8080,
                    local: false,
                })
                .collect(),
            draining: vec![],
            affinity_timeout: None,
            source_ranges: vec![],
            drop_if_empty: false,
            inside_frontends: vec![],
        }
    }

    /// `ports` with the Services created in `age` order (oldest first).
    fn desired(ports: Vec<SvcPort>, age: impl IntoIterator<Item = u32>) -> Desired {
        let mut ports = ports;
        ports.sort_by(|a, b| a.id.cmp(&b.id));
        Desired {
            ports: ports.into_iter().map(std::sync::Arc::new).collect(),
            service_order: age
                .into_iter()
                .map(|i| ("dev".to_string(), format!("svc-{i:04}")))
                .collect(),
            ..Desired::default()
        }
    }

    fn refused(p: &Programmer) -> Vec<String> {
        p.refusals()
            .iter()
            .filter(|r| r.whole)
            .map(|r| r.id.name.clone())
            .collect()
    }

    fn svc_id(p: &Programmer, d: &Desired, name: &str) -> Option<u32> {
        let port = d.ports.iter().find(|p| p.id.name == name)?;
        p.services.get(&port.id).map(|s| s.svc_id)
    }

    #[test]
    fn services_beyond_the_arena_are_refused_one_by_one() {
        // Room for 2,000 service ports at M = 1021, double-buffered; 2,100 asked for. The
        // Services were created in reverse name order, so the newest are svc-0000..0099.
        let s = settings(2_000 * 2 * 1021);
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let now = Instant::now();
        let n = 2_100;
        let ports = |f: &dyn Fn(u32) -> SvcPort| (0..n).map(f).collect::<Vec<_>>();
        let d = desired(ports(&|i| port(i, 2)), (0..n).rev());
        let st = p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(st.ports_refused, 100);
        assert_eq!(maps.services.len(), 2_000);
        // In admission order: oldest first.
        let want: Vec<String> = (0..100).rev().map(|i| format!("svc-{i:04}")).collect();
        assert_eq!(refused(&p), want);
        let r = &p.refusals()[0];
        assert_eq!(r.limit, Limit::MaglevArena);
        assert_eq!(
            r.message,
            "dev/svc-0099/TCP: not programmed: the Maglev arena is full (needs 2042 of its \
             4084000 slots; raise --maglev-arena)"
        );
        // Nothing of a refused port is in the maps: no frontend, no backend.
        let last = &d.ports[0];
        assert_eq!(last.id.name, "svc-0000");
        assert_eq!(maps.svc_of(&last.frontends[0], Proto::Tcp), None);
        assert_eq!(maps.backends.len(), 4_000);

        // An endpoint change of a programmed Service still applies; a new Service (the
        // newest of all) does not push anyone out.
        let mut changed = ports(&|i| port(i, 2));
        changed[2_099].backends[1].addr = addr(0x50_0000);
        changed.push(port(n, 1));
        let d2 = desired(changed, (0..=n).rev().skip(1).chain([n]));
        let st = p.apply(&d2, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(st.ports_refused, 101);
        assert!(refused(&p).contains(&format!("svc-{n:04}")));
        let id = svc_id(&p, &d2, "svc-2099").unwrap();
        assert!(maps.table_backends(id).contains(&(addr(0x50_0000), 8080)));
        assert_eq!(maps.table_backends(id).len(), 2);

        // A programmed Service grows past M = 1021 with the arena full: it keeps a table
        // of 1021 slots, with the new backends, and says so.
        let mut grown = ports(&|i| port(i, 2));
        grown[1_000] = port(1_000, 11);
        let d3 = desired(grown, (0..n).rev());
        p.apply(&d3, &mut maps, now).unwrap();
        maps.check();
        let id = svc_id(&p, &d3, "svc-1000").unwrap();
        assert_eq!(maps.services[&id].table_m, 1021);
        assert_eq!(maps.services[&id].backend_count, 11);
        assert_eq!(maps.table_backends(id).len(), 11);
        assert!(
            p.refusals().iter().any(|r| !r.whole
                && r.message.starts_with(
                    "dev/svc-1000/TCP: served by a Maglev table of 1021 slots instead of 2039"
                )),
            "{:?}",
            p.refusals()
        );

        // Deleting a Service frees its room after the writes; the agent is asked to apply
        // again, and the oldest refused Service (svc-0099) gets in.
        let mut fewer = ports(&|i| port(i, 2));
        fewer.remove(1_500);
        let d4 = desired(fewer, (0..n).rev().filter(|&i| i != 1_500));
        p.apply(&d4, &mut maps, now).unwrap();
        assert!(p.next_deadline().is_some_and(|t| t <= now));
        assert_eq!(refused(&p).len(), 100);
        p.apply(&d4, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(refused(&p).len(), 99);
        assert!(!refused(&p).contains(&"svc-0099".to_string()));
        assert!(svc_id(&p, &d4, "svc-0099").is_some());
        assert!(p.next_deadline().is_none_or(|t| t > now));
    }

    #[test]
    fn a_fragmented_arena_refuses_only_the_port_that_does_not_fit() {
        let mut s = settings(2_600);
        s.min_m = 251;
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let now = Instant::now();
        // Five ports of two 251-slot tables each: 2,510 slots.
        let d = desired((0..5).map(|i| port(i, 1)).collect(), 0..5);
        p.apply(&d, &mut maps, now).unwrap();
        assert!(p.refusals().is_empty());
        // Two gone: 1,094 slots free, in runs of 502, 502 and 90.
        let keep = [0, 2, 4];
        let d = desired(keep.iter().map(|&i| port(i, 1)).collect(), keep);
        p.apply(&d, &mut maps, now).unwrap();
        assert_eq!(p.arena.free_slots(), 1_094);
        // Three backends want M = 509: 1,018 slots, free but not in one piece. One backend
        // (M = 251) fits.
        let mut ports: Vec<SvcPort> = keep.iter().map(|&i| port(i, 1)).collect();
        ports.push(port(10, 3));
        ports.push(port(11, 1));
        let d = desired(ports, [0, 2, 4, 10, 11]);
        let st = p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(st.ports_refused, 1);
        assert_eq!(
            p.refusals()[0].message,
            "dev/svc-0010/TCP: not programmed: the Maglev arena is fragmented (no room for two \
             tables of 509 slots in its 2600 slots; raise --maglev-arena)"
        );
        assert!(svc_id(&p, &d, "svc-0011").is_some());
        assert_eq!(maps.services.len(), 4);
    }

    #[test]
    fn service_frontend_and_backend_limits_refuse_per_port() {
        let mut s = settings(1 << 20);
        s.max_services = 3;
        s.max_frontends = 3;
        s.max_backends = 5;
        let now = Instant::now();

        // Service ports: the fourth oldest is refused, and an id never reaches the limit.
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let d = desired((0..4).map(|i| port(i, 1)).collect(), [3, 2, 1, 0]);
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(refused(&p), ["svc-0000"]);
        assert_eq!(
            p.refusals()[0].message,
            "dev/svc-0000/TCP: not programmed: all 3 service-port slots are in use (raise \
             --max-services)"
        );

        // Frontends: a port with two does not fit after two ports of one.
        s.max_services = 10;
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let mut two = port(2, 1);
        two.frontends.push(FrontendSpec {
            addr: "203.0.113.7".parse().unwrap(),
            port: 80,
            kind: FrontendKind::External,
        });
        let d = desired(vec![port(0, 1), port(1, 1), two], [0, 1, 2]);
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(refused(&p), ["svc-0002"]);
        assert_eq!(p.refusals()[0].limit, Limit::Frontends);

        // Backends: 2 + 2 fit in 5, the next 2 do not; a shared one costs nothing.
        s.max_frontends = 10;
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let mut shared = port(2, 0);
        shared.backends = port(0, 2).backends;
        let d = desired(vec![port(0, 2), port(1, 2), shared, port(3, 2)], 0..4);
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(refused(&p), ["svc-0003"]);
        assert_eq!(p.refusals()[0].limit, Limit::Backends);
        assert_eq!(maps.backends.len(), 4);

        // A programmed port that grows past the backend limit keeps what it had and gets
        // what fits.
        let mut grown = port(1, 4);
        grown.backends[..2].clone_from_slice(&port(1, 2).backends);
        let d = desired(vec![port(0, 2), grown, port(2, 0)], 0..3);
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        let id = svc_id(&p, &d, "svc-0001").unwrap();
        // 4 held (2 of svc-0000, 2 of svc-0001): one new one fits.
        assert_eq!(maps.table_backends(id).len(), 3);
        assert!(
            p.refusals()
                .iter()
                .any(|r| !r.whole && r.limit == Limit::Backends),
            "{:?}",
            p.refusals()
        );
    }

    #[test]
    fn a_port_without_endpoints_holds_its_tables() {
        // Created before its pods: once the endpoints come, the table is there, even if a
        // newer Service filled the arena meanwhile.
        let s = settings(2 * 2 * 1021);
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let now = Instant::now();
        let d = desired(vec![port(0, 0)], [0]);
        p.apply(&d, &mut maps, now).unwrap();
        let d = desired(vec![port(0, 0), port(1, 3), port(2, 3)], 0..3);
        p.apply(&d, &mut maps, now).unwrap();
        assert_eq!(refused(&p), ["svc-0002"]);
        let d = desired(vec![port(0, 3), port(1, 3), port(2, 3)], 0..3);
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        let id = svc_id(&p, &d, "svc-0000").unwrap();
        assert_eq!(maps.table_backends(id).len(), 3);
        assert_eq!(refused(&p), ["svc-0002"]);
    }

    /// A delta that might not fit goes to the full apply (which decides by age) and writes
    /// nothing; one that fits writes only its own entries.
    #[test]
    fn apply_delta_writes_only_its_ports_and_defers_what_might_not_fit() {
        let s = Settings {
            max_services: 2,
            ..settings(1 << 16)
        };
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let now = Instant::now();
        let (a, b) = (port(0, 2), port(1, 2));
        // Nothing applied in full yet: no delta.
        assert!(
            p.apply_delta(
                &[PortChange {
                    old: None,
                    new: Some(&a)
                }],
                &mut maps,
                now
            )
            .unwrap()
            .is_none()
        );
        p.apply(&desired(vec![a.clone()], [0]), &mut maps, now)
            .unwrap();
        // b fits: only its service, slots, frontend, ClusterIP and backends are written.
        let st = p
            .apply_delta(
                &[PortChange {
                    old: None,
                    new: Some(&b),
                }],
                &mut maps,
                now,
            )
            .unwrap()
            .expect("fits");
        assert_eq!(
            (
                st.services_written,
                st.frontends_written,
                st.backends_written
            ),
            (1, 1, 2)
        );
        maps.check();
        assert_eq!((maps.services.len(), maps.frontends.len()), (2, 2));
        // A third port: the service map is full, so the full apply must decide.
        let c = port(2, 1);
        let before = (
            maps.services.clone(),
            maps.frontends.clone(),
            maps.backends.clone(),
        );
        assert!(
            p.apply_delta(
                &[PortChange {
                    old: None,
                    new: Some(&c)
                }],
                &mut maps,
                now
            )
            .unwrap()
            .is_none()
        );
        assert_eq!(
            before,
            (
                maps.services.clone(),
                maps.frontends.clone(),
                maps.backends.clone()
            )
        );
        // b loses a backend: it drains, and is deleted once due (an empty delta expires it).
        let mut b2 = b.clone();
        b2.backends.pop();
        p.apply_delta(
            &[PortChange {
                old: Some(&b),
                new: Some(&b2),
            }],
            &mut maps,
            now,
        )
        .unwrap()
        .expect("fits");
        let gone = b.backends[1].clone();
        let draining = |m: &Fake| {
            m.backends.values().any(|v| {
                v.addr_be == u32::from_ne_bytes(gone.addr.octets()) && v.flags & BE_DRAINING != 0
            })
        };
        assert!(draining(&maps));
        assert_eq!(p.next_deadline(), Some(now + s.drain));
        let later = now + s.drain;
        let st = p
            .apply_delta(&[], &mut maps, later)
            .unwrap()
            .expect("expiry");
        assert_eq!(st.backends_removed, 1);
        assert!(!draining(&maps));
        assert_eq!(p.next_deadline(), None);
        // b gone: its service, frontend and ClusterIP are removed.
        p.apply_delta(
            &[PortChange {
                old: Some(&b2),
                new: None,
            }],
            &mut maps,
            later,
        )
        .unwrap()
        .expect("fits");
        maps.check();
        assert_eq!((maps.services.len(), maps.frontends.len()), (1, 1));
        assert_eq!(maps.cluster_ips.len(), 1);
    }

    #[test]
    fn a_single_table_without_room_for_its_second_keeps_its_backends() {
        // As adopted from an agent that kept one buffer, in an arena with no room for the
        // other: an endpoint change cannot be written, so the table and every backend it
        // names stay, past the drain period too.
        let s = settings(1021);
        let mut p = Programmer::new(s.clone());
        let mut maps = Fake::new(&s);
        let old = port(0, 2);
        let names = maglev_names(&old);
        let slots: Vec<u32> = maglev::build_table(&names, 1021)
            .into_iter()
            .map(|i| i + 1)
            .collect();
        for (i, b) in old.backends.iter().enumerate() {
            let value = Backend {
                addr_be: u32::from_ne_bytes(b.addr.octets()),
                port_be: b.port.to_be(),
                flags: 0,
                _pad: 0,
            };
            let id = i as u32 + 1;
            maps.backends.insert(id, value);
            p.backends.insert(be_key(b), BackendState { id, value });
        }
        p.next_backend_id = 3;
        maps.slots.clone_from(&slots);
        let value = Service {
            table_off: 0,
            table_m: 1021,
            backend_count: 2,
            flags: 0,
            affinity_timeout: 0,
        };
        maps.services.insert(0, value);
        assert!(p.arena.reserve(0, 1021));
        p.adopted.insert(AdoptKey::Port(old.id.clone()), (0, value));
        p.adopted_tables.insert(0, Table { off: 0, m: 1021 });
        p.next_svc_id = 1;

        let mut new = port(0, 2);
        new.backends[1].addr = addr(0x50_0000);
        let d = desired(vec![new], [0]);
        let now = Instant::now();
        p.apply(&d, &mut maps, now).unwrap();
        maps.check();
        assert_eq!(
            maps.table_backends(0),
            old.backends.iter().map(be_key).collect()
        );
        let r = &p.refusals()[0];
        assert!(!r.whole);
        assert!(
            r.message
                .starts_with("dev/svc-0000/TCP: endpoint changes not programmed"),
            "{}",
            r.message
        );
        p.apply(&d, &mut maps, now + Duration::from_secs(60))
            .unwrap();
        maps.check();
        assert_eq!(maps.backends.len(), 2);
    }
}
