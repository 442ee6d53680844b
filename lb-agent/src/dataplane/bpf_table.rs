//! BPF hash and array maps with fixed key and value types through raw bpf(2) calls
//! ([`BpfTable`]), for what aya lacks: batch lookups (`BPF_MAP_LOOKUP_BATCH`, with a
//! `BPF_MAP_GET_NEXT_KEY` + lookup fallback on kernels before 5.6). [`Table`] is what the
//! conntrack GC needs from a map, so that its sweep also runs on fakes in unit tests.
use std::{
    fmt, io,
    marker::PhantomData,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;

/// Entries per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 4096;

/// The operations a sweep needs from a map (a BPF map, or a fake in unit tests).
pub trait Table<K, V> {
    fn capacity(&self) -> u32;
    /// Calls `f` on every entry. Entries added or removed meanwhile may or may not be seen.
    fn walk(&self, f: &mut dyn FnMut(&K, &V)) -> io::Result<()>;
    fn get(&self, key: &K) -> io::Result<Option<V>>;
    /// `false`: the key was not there.
    fn delete(&self, key: &K) -> io::Result<bool>;
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// The kernel's internal "not supported", which leaks to user space from some commands.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value`, or `next_key` for `BPF_MAP_GET_NEXT_KEY`.
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch commands.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to the name.
#[repr(C)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// The bpf(2) system call; `attr` is the leading part of `union bpf_attr` that `cmd`
/// reads (the kernel zero-fills the rest).
fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of union bpf_attr for `cmd`; the pointers in it
    // are valid for the call's duration (the callers keep the buffers alive).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A as *mut libc::c_void,
            size_of::<A>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Entries per `BPF_MAP_UPDATE_BATCH` call.
const UPDATE_BATCH: usize = 4096;

/// Writes `entries` into `map` (`BPF_ANY`) with `BPF_MAP_UPDATE_BATCH`, a call per 4,096
/// instead of one per entry (a first programming writes ten backends per service port: a
/// million entries at 100,000 ports took 0.52 s instead of 0.68-0.81 s on the
/// development machine); one call per entry on kernels without batch updates (before
/// 5.6). `K` and `V` must be the map's key and value types. On an error
/// some of the entries may be written.
pub fn update_batch<K: Copy, V: Copy>(map: &MapData, entries: &[(K, V)]) -> io::Result<()> {
    for chunk in entries.chunks(UPDATE_BATCH) {
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        // SAFETY: both point at `chunk.len()` initialised values of their types.
        unsafe {
            update_raw(
                map,
                keys.as_ptr().cast(),
                size_of::<K>(),
                values.as_ptr().cast(),
                size_of::<V>(),
                chunk.len(),
            )
        }?;
    }
    Ok(())
}

/// [`update_batch`] of one value for every key, given as its bytes (`value.len()` must be
/// the map's value size: for a per-CPU map, one 8-byte-aligned copy per possible CPU).
pub fn update_batch_same<K: Copy>(map: &MapData, keys: &[K], value: &[u8]) -> io::Result<()> {
    // One buffer of values for every chunk: they are all the same.
    let values = value.repeat(keys.len().min(UPDATE_BATCH));
    for chunk in keys.chunks(UPDATE_BATCH) {
        // SAFETY: `chunk.len()` keys, and at least as many values of `value.len()` bytes.
        unsafe {
            update_raw(
                map,
                chunk.as_ptr().cast(),
                size_of::<K>(),
                values.as_ptr(),
                value.len(),
                chunk.len(),
            )
        }?;
    }
    Ok(())
}

/// One `BPF_MAP_UPDATE_BATCH` of `count` keys and values, or an update per entry where
/// the kernel has no batch updates.
///
/// # Safety
/// `keys` and `values` must point at `count` keys of `key_size` and values of `value_size`
/// bytes, laid out one after the other.
unsafe fn update_raw(
    map: &MapData,
    keys: *const u8,
    key_size: usize,
    values: *const u8,
    value_size: usize,
    count: usize,
) -> io::Result<()> {
    let fd = map.fd().as_fd().as_raw_fd() as u32;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys as u64,
        values: values as u64,
        count: count as u32,
        map_fd: fd,
        elem_flags: 0,
        flags: 0,
    };
    match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => return Ok(()),
        // The kernel writes back how many it wrote only from the batch operation itself:
        // a kernel without it (before 5.6) or a map type without it leaves `count` as
        // given.
        Err(e)
            if attr.count as usize == count
                && matches!(errno(&e), libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) => {}
        Err(e) => return Err(e),
    }
    for i in 0..count {
        let mut attr = ElemAttr {
            map_fd: fd,
            _pad: 0,
            key: keys.wrapping_add(i * key_size) as u64,
            value: values.wrapping_add(i * value_size) as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    }
    Ok(())
}

/// A BPF hash (or array) map with fixed key and value types, through raw bpf(2) calls:
/// aya has no batch operations.
pub struct BpfTable<K, V> {
    map: MapData,
    capacity: u32,
    /// `BPF_MAP_LOOKUP_BATCH` works on this map (cleared at the first refusal).
    batch: std::sync::atomic::AtomicBool,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> fmt::Debug for BpfTable<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BpfTable")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<K: aya::Pod + Default, V: aya::Pod + Default> BpfTable<K, V> {
    /// The map pinned as `pin_dir/name`.
    pub fn open(pin_dir: &Path, name: &str) -> Result<Self> {
        let path = pin_dir.join(name);
        let map = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        Self::new(map, name)
    }

    /// Wraps `map`, checking its key and value sizes against `K` and `V`.
    pub fn new(map: MapData, name: &str) -> Result<Self> {
        let info = map.info().with_context(|| format!("map {name}"))?;
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if (k, v) != (size_of::<K>(), size_of::<V>()) {
            bail!(
                "map {name} has key/value sizes {k}/{v}, expected {}/{}",
                size_of::<K>(),
                size_of::<V>()
            );
        }
        Ok(Self {
            capacity: info.max_entries(),
            map,
            batch: true.into(),
            _types: PhantomData,
        })
    }

    /// A new unpinned LRU hash map (benchmarks and tests; needs CAP_BPF).
    pub fn create_lru(capacity: u32, name: &str) -> Result<Self> {
        Self::create(BPF_MAP_TYPE_LRU_HASH, capacity, name)
    }

    /// A new unpinned array map (tests; needs CAP_BPF). `K` must be `u32`-sized.
    pub fn create_array(capacity: u32, name: &str) -> Result<Self> {
        Self::create(BPF_MAP_TYPE_ARRAY, capacity, name)
    }

    /// Pins the map at `path` (tests: a map the agent's GC then opens by its pin).
    pub fn pin(&self, path: &Path) -> Result<()> {
        self.map
            .pin(path)
            .with_context(|| format!("pinning map at {}", path.display()))
    }

    fn create(map_type: u32, capacity: u32, name: &str) -> Result<Self> {
        let mut map_name = [0u8; 16];
        for (d, s) in map_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let mut attr = CreateAttr {
            map_type,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries: capacity,
            map_flags: 0,
            inner_map_fd: 0,
            numa_node: 0,
            map_name,
        };
        let fd = bpf(BPF_MAP_CREATE, &mut attr).with_context(|| format!("creating map {name}"))?;
        // SAFETY: a new fd, owned by nobody else.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        Self::new(MapData::from_fd(fd)?, name)
    }

    fn fd(&self) -> u32 {
        self.map.fd().as_fd().as_raw_fd() as u32
    }

    /// Writes an entry (`BPF_ANY`).
    pub fn insert(&self, key: &K, value: &V) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd(),
            _pad: 0,
            key: key as *const K as u64,
            value: value as *const V as u64,
            flags: 0,
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }

    /// Walks with `BPF_MAP_LOOKUP_BATCH`. `Ok(false)`: the kernel refused the first call
    /// (no batch support), nothing was walked.
    fn walk_batch(&self, f: &mut dyn FnMut(&K, &V)) -> io::Result<bool> {
        let mut chunk = BATCH.min(self.capacity.max(1) as usize);
        let mut keys = vec![K::default(); chunk];
        let mut values = vec![V::default(); chunk];
        // Hash maps use a u32 bucket cursor; room for a key-sized one anyway.
        let mut cursor_in = [0u8; 64];
        let mut cursor_out = [0u8; 64];
        let mut first = true;
        // Each bucket is visited once; the bound only guards against a kernel surprise.
        let limit = 2 * self.capacity as u64 + BATCH as u64;
        let mut seen = 0u64;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { cursor_in.as_ptr() as u64 },
                out_batch: cursor_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: chunk as u32,
                map_fd: self.fd(),
                elem_flags: 0,
                flags: 0,
            };
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(chunk);
            let done = match r {
                Ok(_) => false,
                Err(e) if errno(&e) == libc::ENOENT => true,
                // One bucket holds more than `chunk` entries.
                Err(e) if errno(&e) == libc::ENOSPC && n == 0 => {
                    chunk *= 2;
                    keys.resize(chunk, K::default());
                    values.resize(chunk, V::default());
                    continue;
                }
                Err(e)
                    if first
                        && n == 0
                        && matches!(errno(&e), libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(e),
            };
            for (k, v) in keys[..n].iter().zip(&values[..n]) {
                f(k, v);
            }
            seen += n as u64;
            if done || seen > limit {
                return Ok(true);
            }
            cursor_in = cursor_out;
            first = false;
        }
    }

    /// Walks with `BPF_MAP_GET_NEXT_KEY` and a lookup per key (kernels before 5.6). A key
    /// deleted under the walk makes the kernel restart it; the walk stops after twice the
    /// capacity.
    fn walk_keys(&self, f: &mut dyn FnMut(&K, &V)) -> io::Result<()> {
        let mut prev: Option<K> = None;
        let mut next = K::default();
        let limit = 2 * self.capacity as u64;
        let mut seen = 0u64;
        loop {
            let mut attr = ElemAttr {
                map_fd: self.fd(),
                _pad: 0,
                key: prev.as_ref().map_or(0, |k| k as *const K as u64),
                value: &mut next as *mut K as u64,
                flags: 0,
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {}
                Err(e) if errno(&e) == libc::ENOENT => return Ok(()),
                Err(e) => return Err(e),
            }
            if let Some(v) = self.get(&next)? {
                f(&next, &v);
            }
            prev = Some(next);
            seen += 1;
            if seen > limit {
                return Ok(());
            }
        }
    }

    /// The walk without batches, for comparison in the benchmark.
    pub fn walk_per_key(&self, f: &mut dyn FnMut(&K, &V)) -> io::Result<()> {
        self.walk_keys(f)
    }
}

impl<K: aya::Pod + Default, V: aya::Pod + Default> Table<K, V> for BpfTable<K, V> {
    fn capacity(&self) -> u32 {
        self.capacity
    }

    fn walk(&self, f: &mut dyn FnMut(&K, &V)) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.batch.load(Relaxed) {
            if self.walk_batch(f)? {
                return Ok(());
            }
            log::info!("BPF_MAP_LOOKUP_BATCH unsupported; conntrack GC walks key by key");
            self.batch.store(false, Relaxed);
        }
        self.walk_keys(f)
    }

    fn get(&self, key: &K) -> io::Result<Option<V>> {
        let mut value = V::default();
        let mut attr = ElemAttr {
            map_fd: self.fd(),
            _pad: 0,
            key: key as *const K as u64,
            value: &mut value as *mut V as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if errno(&e) == libc::ENOENT => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, key: &K) -> io::Result<bool> {
        let mut attr = ElemAttr {
            map_fd: self.fd(),
            _pad: 0,
            key: key as *const K as u64,
            value: 0,
            flags: 0,
        };
        match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Ok(_) => Ok(true),
            Err(e) if errno(&e) == libc::ENOENT => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What a test that needs BPF maps (root, CAP_BPF) made, or None when this process may
/// not make them: the test then skips, saying so, unless `XLB_REQUIRE_PRIVILEGED=1`
/// (`.ci/run` sets it, as for the privileged tests of `tests/`), where not being able to is
/// a failure.
#[cfg(test)]
pub(crate) fn made_or_skip<T>(made: Result<T>, test: &str) -> Option<T> {
    match made {
        Ok(t) => Some(t),
        Err(e) if std::env::var("XLB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("{test}: privileged test cannot run ({e:#}) and XLB_REQUIRE_PRIVILEGED=1")
        }
        Err(e) => {
            eprintln!("SKIP {test}: {e:#} (set XLB_REQUIRE_PRIVILEGED=1 to fail instead)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real maps, when this process may create them (root): both walks of an LRU hash see
    /// every entry; get, insert and delete behave like the map's; an array reads zeroes.
    #[test]
    fn batch_updates_write_every_entry() {
        let made = BpfTable::<u32, u64>::create_lru(32768, "xlb_bt_batch");
        let Some(t) = made_or_skip(made, "batch_updates_write_every_entry") else {
            return;
        };
        // More than two calls' worth, and an entry written twice (the later value wins).
        let mut entries: Vec<(u32, u64)> = (0..10_000u32).map(|k| (k, u64::from(k) * 7)).collect();
        entries.push((3, 1));
        update_batch(&t.map, &entries).unwrap();
        for k in 0..10_000u32 {
            let want = if k == 3 { 1 } else { u64::from(k) * 7 };
            assert_eq!(t.get(&k).unwrap(), Some(want), "key {k}");
        }
        assert_eq!(t.get(&10_000).unwrap(), None);
        update_batch::<u32, u64>(&t.map, &[]).unwrap();
    }

    /// One value for many keys of a per-CPU array (the agent zeroes new services'
    /// counters so): every CPU's copy of every key written, in more than one call.
    #[test]
    fn one_value_for_many_keys_of_a_per_cpu_array() {
        const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
        let made = BpfTable::<u32, u64>::create(BPF_MAP_TYPE_PERCPU_ARRAY, 10_000, "xlb_bt_pcpu");
        let Some(t) = made_or_skip(made, "one_value_for_many_keys_of_a_per_cpu_array") else {
            return;
        };
        let cpus = aya::util::nr_cpus().unwrap();
        let mut a =
            aya::maps::PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(t.map)).unwrap();
        for k in 0..10_000u32 {
            let ones = aya::maps::PerCpuValues::try_from(vec![1u64; cpus]).unwrap();
            a.set(k, ones, 0).unwrap();
        }
        let keys: Vec<u32> = (0..10_000u32).filter(|k| k % 3 != 0).collect();
        let value: Vec<u8> = (0..cpus as u64)
            .flat_map(|c| (c + 7).to_ne_bytes())
            .collect();
        update_batch_same(aya::maps::IterableMap::map(&a), &keys, &value).unwrap();
        for k in 0..10_000u32 {
            let got: Vec<u64> = a.get(&k, 0).unwrap().iter().copied().collect();
            let want: Vec<u64> = if k % 3 == 0 {
                vec![1; cpus]
            } else {
                (0..cpus as u64).map(|c| c + 7).collect()
            };
            assert_eq!(got, want, "key {k}");
        }
    }

    #[test]
    fn walks_and_edits_a_real_map() {
        let made = BpfTable::<u32, u64>::create_lru(8192, "xlb_bt_test");
        let Some(t) = made_or_skip(made, "walks_and_edits_a_real_map") else {
            return;
        };
        assert_eq!(t.capacity(), 8192);
        let n = 5000u32;
        for k in 0..n {
            t.insert(&k, &(u64::from(k) * 3)).unwrap();
        }
        let (mut batch, mut per_key) = (0u64, 0u64);
        let mut sum = 0u64;
        t.walk(&mut |k, v| {
            assert_eq!(*v, u64::from(*k) * 3);
            batch += 1;
            sum += *v;
        })
        .unwrap();
        t.walk_per_key(&mut |_, _| per_key += 1).unwrap();
        assert_eq!((batch, per_key), (n as u64, n as u64));
        assert_eq!(sum, 3 * (n as u64 - 1) * n as u64 / 2);
        assert_eq!(t.get(&7).unwrap(), Some(21));
        assert!(t.delete(&7).unwrap());
        assert!(!t.delete(&7).unwrap());
        assert_eq!(t.get(&7).unwrap(), None);
        let arr = BpfTable::<u32, u32>::create_array(4, "xlb_bt_arr").unwrap();
        assert_eq!(arr.get(&3).unwrap(), Some(0));
        arr.insert(&3, &9).unwrap();
        assert_eq!(arr.get(&3).unwrap(), Some(9));
    }
}
