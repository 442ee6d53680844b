//! Writes the desired state (from `translate`) into the BPF maps, touching only what changed.
//!
//! Order of writes, so that a packet never follows a reference to something not yet written:
//! backends first, then each service's Maglev table into its inactive buffer followed by the
//! service value that flips to it, then frontends; removals go the other way round.
//! Backends that leave every service are not deleted at once: they stay in `XLB_BACKENDS`
//! for a drain period so established flows (whose conntrack entry names the backend) keep
//! working, while the Maglev tables already send new flows elsewhere. Once deleted, a flow
//! still pointing at one is re-balanced by the datapath.
use std::{
    collections::{BTreeMap, BTreeSet},
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
    arena::Arena,
    maglev,
    translate::{BackendSpec, Desired, FrontendKind, Scope, SvcPort, SvcPortId},
};

/// Handles on the pinned maps the agent writes.
pub struct Maps {
    pub frontends: HashMap<MapData, FrontendKey, Frontend>,
    pub services: HashMap<MapData, u32, Service>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub maglev: crate::mmap_array::MmapArray,
    pub config: Array<MapData, Config>,
    pub svc_stats: PerCpuArray<MapData, SvcStats>,
    pub svc_meta: Array<MapData, SvcMeta>,
    pub cluster_ips: HashMap<MapData, u32, u32>,
    pub src_ranges: LpmTrie<MapData, SrcRangeKey, u8>,
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
                crate::mmap_array::MmapArray::new(data)?
            },
            config: t(ebpf, MAP_CONFIG)?,
            svc_stats: t(ebpf, MAP_SVC_STATS)?,
            svc_meta: t(ebpf, MAP_SVC_META)?,
            cluster_ips: t(ebpf, MAP_CLUSTER_IPS)?,
            src_ranges: t(ebpf, MAP_SRC_RANGES)?,
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
    pub arena: u32,
}

struct Table {
    off: u32,
    m: u32,
    /// Backend ids as currently written in the arena (0 = never written).
    slots: Vec<u32>,
}

struct SvcState {
    svc_id: u32,
    tables: [Option<Table>; 2],
    active: usize,
    value: Service,
}

struct BackendState {
    id: u32,
    value: Backend,
    drain_until: Option<Instant>,
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
}

pub struct Programmer {
    settings: Settings,
    arena: Arena,
    services: BTreeMap<SvcPortId, SvcState>,
    free_svc_ids: BTreeSet<u32>,
    next_svc_id: u32,
    backends: BTreeMap<(Ipv4Addr, u16), BackendState>,
    next_backend_id: u32,
    frontends: BTreeMap<FrontendKey, Frontend>,
    cluster_ips: BTreeSet<u32>,
    /// (svc_id, address, prefix length) of every loadBalancerSourceRange written.
    ranges: BTreeSet<(u32, u32, u8)>,
    /// Services found in the pins at start, by name, not yet claimed by an apply.
    adopted: BTreeMap<String, (u32, Service)>,
    /// Their active tables (reserved in the arena).
    adopted_tables: BTreeMap<u32, Table>,
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
    FrontendKey {
        addr_be: u32::from_ne_bytes(addr.octets()),
        port_be: port.to_be(),
        proto,
        _pad: 0,
    }
}

impl Programmer {
    pub fn new(settings: Settings) -> Self {
        Self {
            arena: Arena::new(settings.arena),
            settings,
            services: BTreeMap::new(),
            free_svc_ids: BTreeSet::new(),
            next_svc_id: 0,
            backends: BTreeMap::new(),
            // Backend id 0 is reserved: it marks an unwritten Maglev slot.
            next_backend_id: 1,
            frontends: BTreeMap::new(),
            cluster_ips: BTreeSet::new(),
            ranges: BTreeSet::new(),
            adopted: BTreeMap::new(),
            adopted_tables: BTreeMap::new(),
        }
    }

    /// Takes over what a previous run of the agent left in the pinned maps, so a restart
    /// loses nothing: backend ids are kept (conntrack entries name them), service ids and
    /// their active Maglev tables are kept until the first apply replaces them, and the
    /// first apply then removes whatever the new desired state no longer has. Until that
    /// apply the datapath keeps serving the old state untouched.
    pub fn adopt(&mut self, maps: &mut Maps) -> Result<Adopted> {
        let mut out = Adopted::default();
        for item in maps.backends.iter() {
            let (id, b) = item?;
            let key = (
                Ipv4Addr::from(b.addr_be.to_ne_bytes()),
                u16::from_be(b.port_be),
            );
            self.backends.insert(
                key,
                BackendState {
                    id,
                    value: b,
                    drain_until: None,
                },
            );
            self.next_backend_id = self.next_backend_id.max(id.wrapping_add(1).max(1));
            out.backends += 1;
        }
        for item in maps.services.iter() {
            let (svc_id, svc) = item?;
            let meta = maps.svc_meta.get(&svc_id, 0).unwrap_or_default();
            let end = meta
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(meta.name.len());
            let name = String::from_utf8_lossy(&meta.name[..end]).into_owned();
            if svc.table_m > 0 {
                if !self.arena.reserve(svc.table_off, svc.table_m) {
                    bail!(
                        "pinned Maglev table of {name} overlaps another; remove the pins to start afresh"
                    );
                }
                let mut slots = Vec::with_capacity(svc.table_m as usize);
                for i in 0..svc.table_m {
                    slots.push(
                        maps.maglev
                            .get(svc.table_off + i)
                            .context("pinned table out of the arena")?,
                    );
                }
                self.adopted_tables.insert(
                    svc_id,
                    Table {
                        off: svc.table_off,
                        m: svc.table_m,
                        slots,
                    },
                );
            }
            self.next_svc_id = self.next_svc_id.max(svc_id + 1);
            self.adopted.insert(name, (svc_id, svc));
            out.services += 1;
        }
        let used: BTreeSet<u32> = self.adopted.values().map(|(id, _)| *id).collect();
        self.free_svc_ids = (0..self.next_svc_id)
            .filter(|id| !used.contains(id))
            .collect();
        for item in maps.frontends.iter() {
            let (k, v) = item?;
            self.frontends.insert(k, v);
            out.frontends += 1;
        }
        for k in maps.cluster_ips.keys() {
            self.cluster_ips.insert(k?);
        }
        for k in maps.src_ranges.keys() {
            let k = k?;
            let d = k.data();
            self.ranges.insert((
                u32::from_be(d.svc_id_be),
                d.addr_be,
                (k.prefix_len() - 32) as u8,
            ));
        }
        Ok(out)
    }

    /// Rejects a desired state that cannot fit before anything is written.
    fn check_capacity(&self, desired: &Desired) -> Result<()> {
        let s = &self.settings;
        let ports = desired.ports.len() as u64;
        if ports > s.max_services as u64 {
            bail!(
                "{ports} service ports exceed the limit of {}",
                s.max_services
            );
        }
        let fes: u64 = desired.ports.iter().map(|p| p.frontends.len() as u64).sum();
        if fes > s.max_frontends as u64 {
            bail!("{fes} frontends exceed the limit of {}", s.max_frontends);
        }
        let bes: BTreeSet<_> = desired
            .ports
            .iter()
            .flat_map(|p| p.backends.iter().map(|b| (b.addr, b.port)))
            .collect();
        if bes.len() as u64 > s.max_backends as u64 {
            bail!(
                "{} backends exceed the limit of {}",
                bes.len(),
                s.max_backends
            );
        }
        let slots: u64 = desired
            .ports
            .iter()
            .filter(|p| !p.backends.is_empty())
            .map(|p| 2 * maglev::choose_m(p.backends.len(), s.min_m) as u64)
            .sum();
        if slots > s.arena as u64 {
            bail!(
                "Maglev tables need {slots} slots, the arena has {} (raise --maglev-arena)",
                s.arena
            );
        }
        Ok(())
    }

    pub fn apply(
        &mut self,
        desired: &Desired,
        maps: &mut Maps,
        now: Instant,
    ) -> Result<ApplyStats> {
        self.check_capacity(desired)?;
        let mut st = ApplyStats::default();

        // 1. Backends every desired service needs.
        let mut wanted: BTreeMap<(Ipv4Addr, u16), Backend> = BTreeMap::new();
        let backend = |b: &BackendSpec, draining: bool| Backend {
            addr_be: u32::from_ne_bytes(b.addr.octets()),
            port_be: b.port.to_be(),
            flags: if b.local { BE_LOCAL } else { 0 } | if draining { BE_DRAINING } else { 0 },
            _pad: 0,
        };
        // Endpoints still listed but not serving new flows stay resolvable (draining); one
        // that serves new flows for any service is not draining.
        for p in &desired.ports {
            for b in &p.draining {
                wanted.entry((b.addr, b.port)).or_insert(backend(b, true));
            }
        }
        for p in &desired.ports {
            for b in &p.backends {
                wanted.insert((b.addr, b.port), backend(b, false));
            }
        }
        for (key, value) in &wanted {
            let state = match self.backends.get_mut(key) {
                Some(s) => s,
                None => {
                    let id = self.next_backend_id;
                    self.next_backend_id = self.next_backend_id.checked_add(1).unwrap_or(1);
                    self.backends.entry(*key).or_insert(BackendState {
                        id,
                        value: Backend::default(),
                        drain_until: None,
                    })
                }
            };
            state.drain_until = None;
            if state.value != *value {
                maps.backends.insert(state.id, *value, 0)?;
                state.value = *value;
                st.backends_written += 1;
            }
        }

        // 2. Services and their Maglev tables.
        let mut live: BTreeSet<SvcPortId> = BTreeSet::new();
        let mut fe_wanted: BTreeMap<FrontendKey, Frontend> = BTreeMap::new();
        let mut cluster_ips: BTreeSet<u32> = BTreeSet::new();
        let mut ranges: BTreeSet<(u32, u32, u8)> = BTreeSet::new();
        for p in &desired.ports {
            live.insert(p.id.clone());
            let svc_id = self.write_service(p, desired, maps, &mut st)?;
            for &(addr, len) in &p.source_ranges {
                ranges.insert((svc_id, u32::from_ne_bytes(addr.octets()), len));
            }
            for f in &p.frontends {
                let mut flags = f.kind.flag();
                if f.kind == FrontendKind::LoadBalancer && !p.source_ranges.is_empty() {
                    flags |= FE_SOURCE_RANGES;
                }
                if f.kind == FrontendKind::ClusterIp {
                    cluster_ips.insert(u32::from_ne_bytes(f.addr.octets()));
                }
                fe_wanted.insert(
                    fe_key(f.addr, f.port, p.id.proto.number()),
                    Frontend { svc_id, flags },
                );
            }
        }

        // Source ranges before the frontends that enforce them, so a new LB IP never opens
        // to everyone for a moment.
        for &(svc_id, addr, len) in ranges.difference(&self.ranges) {
            maps.src_ranges
                .insert(&range_key(svc_id, addr, len), 1, 0)?;
        }

        // 3. Frontends.
        for (k, v) in &fe_wanted {
            if self.frontends.get(k) != Some(v) {
                maps.frontends.insert(*k, *v, 0)?;
                st.frontends_written += 1;
            }
        }
        let stale: Vec<_> = self
            .frontends
            .keys()
            .filter(|k| !fe_wanted.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            let _ = maps.frontends.remove(&k);
            st.frontends_removed += 1;
        }
        self.frontends = fe_wanted;
        // ClusterIP addresses: added after their frontends (a new address must not reject
        // its own service's ports), removed after them.
        for a in cluster_ips.difference(&self.cluster_ips) {
            maps.cluster_ips.insert(*a, 0, 0)?;
        }
        for a in self.cluster_ips.difference(&cluster_ips) {
            let _ = maps.cluster_ips.remove(a);
        }
        self.cluster_ips = cluster_ips;
        for &(svc_id, addr, len) in self.ranges.difference(&ranges) {
            let _ = maps.src_ranges.remove(&range_key(svc_id, addr, len));
        }
        self.ranges = ranges;

        // 4. Services that are gone.
        let gone: Vec<_> = self
            .services
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(s) = self.services.remove(&id) {
                let _ = maps.services.remove(&s.svc_id);
                for t in s.tables.into_iter().flatten() {
                    self.arena.free(t.off, t.m);
                }
                self.free_svc_ids.insert(s.svc_id);
                st.services_removed += 1;
            }
        }

        // Services from before a restart that the new state does not have.
        for (_, (svc_id, _)) in std::mem::take(&mut self.adopted) {
            let _ = maps.services.remove(&svc_id);
            if let Some(t) = self.adopted_tables.remove(&svc_id) {
                self.arena.free(t.off, t.m);
            }
            self.free_svc_ids.insert(svc_id);
            st.services_removed += 1;
        }

        // 5. Backends no service uses: drain, then delete.
        let drain = self.settings.drain;
        let mut expired = Vec::new();
        for (key, b) in self.backends.iter_mut() {
            if wanted.contains_key(key) {
                continue;
            }
            match b.drain_until {
                None => {
                    b.drain_until = Some(now + drain);
                    // Session affinity must stop choosing it at once.
                    let mut v = b.value;
                    v.flags |= BE_DRAINING;
                    if v != b.value {
                        maps.backends.insert(b.id, v, 0)?;
                        b.value = v;
                    }
                }
                Some(t) if t <= now => expired.push(*key),
                Some(_) => {}
            }
        }
        for key in expired {
            if let Some(b) = self.backends.remove(&key) {
                let _ = maps.backends.remove(&b.id);
                st.backends_removed += 1;
            }
        }
        Ok(st)
    }

    /// The earliest moment a draining backend is due for deletion, so the caller can apply
    /// again then.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.backends.values().filter_map(|b| b.drain_until).min()
    }

    fn alloc_svc_id(&mut self) -> u32 {
        if let Some(id) = self.free_svc_ids.pop_first() {
            return id;
        }
        let id = self.next_svc_id;
        self.next_svc_id += 1;
        id
    }

    fn write_service(
        &mut self,
        p: &SvcPort,
        desired: &Desired,
        maps: &mut Maps,
        st: &mut ApplyStats,
    ) -> Result<u32> {
        if !self.services.contains_key(&p.id)
            && let Some((svc_id, value)) = self.adopted.remove(&p.id.to_string())
        {
            // Same service as before the restart: same id (frontends already point at it),
            // its live table becomes the active buffer, the new one goes to the other.
            let table = self.adopted_tables.remove(&svc_id);
            self.services.insert(
                p.id.clone(),
                SvcState {
                    svc_id,
                    tables: [table, None],
                    active: 0,
                    value,
                },
            );
        }
        if !self.services.contains_key(&p.id) {
            let svc_id = self.alloc_svc_id();
            let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
            maps.svc_stats.set(
                svc_id,
                PerCpuValues::try_from(vec![SvcStats::default(); cpus])?,
                0,
            )?;
            maps.svc_meta.set(svc_id, meta(p, desired), 0)?;
            self.services.insert(
                p.id.clone(),
                SvcState {
                    svc_id,
                    tables: [None, None],
                    active: 0,
                    value: Service::default(),
                },
            );
        }
        let backends = &self.backends;
        let ids: Vec<u32> = p
            .backends
            .iter()
            .map(|b| backends[&(b.addr, b.port)].id)
            .collect();
        let names: Vec<String> = p
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect();
        let svc = self.services.get_mut(&p.id).expect("inserted above");
        let svc_id = svc.svc_id;

        let flags = if p.id.scope == Scope::Local {
            SVC_DROP_IF_EMPTY
        } else {
            0
        };
        let affinity_timeout = p.affinity_timeout.unwrap_or(0);
        if ids.is_empty() {
            let value = Service {
                flags,
                ..Service::default()
            };
            if svc.value != value || maps.services.get(&svc_id, 0).is_err() {
                maps.services.insert(svc_id, value, 0)?;
                svc.value = value;
                st.services_written += 1;
            }
            return Ok(svc_id);
        }

        let m = maglev::choose_m(ids.len(), self.settings.min_m);
        let table: Vec<u32> = maglev::build_table(&names, m)
            .into_iter()
            .map(|i| ids[i as usize])
            .collect();
        if let Some(active) = &svc.tables[svc.active]
            && active.m == m
            && active.slots == table
            && svc.value.backend_count == ids.len() as u32
            && svc.value.flags == flags
            && svc.value.affinity_timeout == affinity_timeout
        {
            return Ok(svc_id); // nothing changed
        }
        let inactive = 1 - svc.active;
        if svc.tables[inactive].as_ref().is_none_or(|t| t.m != m) {
            if let Some(old) = svc.tables[inactive].take() {
                self.arena.free(old.off, old.m);
            }
            let off = self
                .arena
                .alloc(m)
                .with_context(|| format!("no room for a Maglev table of {m} slots for {}", p.id))?;
            svc.tables[inactive] = Some(Table {
                off,
                m,
                slots: vec![0; m as usize],
            });
        }
        let t = svc.tables[inactive].as_mut().expect("allocated above");
        for (slot, id) in maglev::changed_slots(&t.slots, &table) {
            maps.maglev.set(t.off + slot, id)?;
            st.slots_written += 1;
        }
        t.slots = table;
        let value = Service {
            table_off: t.off,
            table_m: m,
            backend_count: ids.len() as u32,
            flags,
            affinity_timeout,
        };
        // The flip: one hash-map update makes the fully written table visible.
        maps.services.insert(svc_id, value, 0)?;
        svc.value = value;
        svc.active = inactive;
        st.services_written += 1;
        Ok(svc_id)
    }
}

fn meta(p: &SvcPort, desired: &Desired) -> SvcMeta {
    let mut m = SvcMeta::default();
    let name = p.id.to_string();
    let n = name.len().min(m.name.len());
    m.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // Rows are sorted by (namespace, name): a binary search keeps programming 100k
    // services from turning quadratic.
    let key = (p.id.namespace.as_str(), p.id.name.as_str());
    let row = desired
        .rows
        .binary_search_by(|r| (r.namespace.as_str(), r.name.as_str()).cmp(&key))
        .ok()
        .map(|i| &desired.rows[i]);
    m.svc_type = match row.map(|r| r.svc_type.as_str()) {
        Some("NodePort") => SVC_TYPE_NODE_PORT,
        Some("LoadBalancer") => SVC_TYPE_LOAD_BALANCER,
        _ => SVC_TYPE_CLUSTER_IP,
    };
    m
}
