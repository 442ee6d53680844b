//! Slot allocator for the Maglev arena (`XLB_MAGLEV`): one big array holds every service's
//! tables, because the kernel-side aya crate has no map-of-maps. First fit over a sorted
//! free list, with neighbours merged on free so churn does not fragment it for good.
use std::collections::BTreeMap;

/// The arena size `--maglev-arena` should default to: every one of `max_services` service
/// ports with both buffers at the smallest table size, so that admission in the programmer
/// never refuses a port for the arena before the service-port limit, unless ports have
/// more than `min_m / 100` backends. Saturates at `u32::MAX`.
pub fn default_slots(max_services: u32, min_m: u32) -> u32 {
    let m = crate::dataplane::maglev::choose_m(0, min_m);
    u32::try_from(u64::from(max_services) * 2 * u64::from(m)).unwrap_or(u32::MAX)
}

#[derive(Debug)]
pub struct Arena {
    /// offset -> length of each free run.
    free: BTreeMap<u32, u32>,
}

impl Arena {
    pub fn new(size: u32) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(0, size);
        }
        Self { free }
    }

    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&off, &run) = self.free.iter().find(|&(_, &run)| run >= len)?;
        self.free.remove(&off);
        if run > len {
            self.free.insert(off + len, run - len);
        }
        Some(off)
    }

    /// Marks `off..off+len` as used (a table found in the pins at start). False if any
    /// part of it is not free.
    pub fn reserve(&mut self, off: u32, len: u32) -> bool {
        let Some((&start, &run)) = self.free.range(..=off).next_back() else {
            return false;
        };
        if start + run < off + len {
            return false;
        }
        self.free.remove(&start);
        if off > start {
            self.free.insert(start, off - start);
        }
        if start + run > off + len {
            self.free.insert(off + len, start + run - off - len);
        }
        true
    }

    pub fn free(&mut self, off: u32, len: u32) {
        let (mut off, mut len) = (off, len);
        if let Some((&prev, &plen)) = self.free.range(..off).next_back()
            && prev + plen == off
        {
            self.free.remove(&prev);
            off = prev;
            len += plen;
        }
        if let Some(&nlen) = self.free.get(&(off + len)) {
            self.free.remove(&(off + len));
            len += nlen;
        }
        self.free.insert(off, len);
    }

    pub fn free_slots(&self) -> u64 {
        self.free.values().map(|&l| l as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merges_back_to_one_run() {
        let mut a = Arena::new(100);
        let x = a.alloc(30).unwrap();
        let y = a.alloc(30).unwrap();
        let z = a.alloc(40).unwrap();
        assert_eq!((x, y, z), (0, 30, 60));
        assert_eq!(a.alloc(1), None);
        a.free(y, 30);
        a.free(x, 30);
        a.free(z, 40);
        assert_eq!(a.free_slots(), 100);
        assert_eq!(a.alloc(100), Some(0));
    }

    #[test]
    fn reserve_splits_the_free_run() {
        let mut a = Arena::new(100);
        assert!(a.reserve(40, 10));
        assert!(!a.reserve(45, 10), "overlap");
        assert_eq!(a.alloc(40), Some(0));
        assert_eq!(a.alloc(50), Some(50));
        a.free(40, 10);
        assert_eq!(a.alloc(10), Some(40));
    }

    #[test]
    fn default_size_holds_every_service_port_double_buffered() {
        use crate::dataplane::maglev::DEFAULT_MIN_M;
        assert_eq!(
            default_slots(lb_common::DEFAULT_MAX_SERVICES, DEFAULT_MIN_M),
            33_456_128
        );
        assert_eq!(
            default_slots(lb_common::DEFAULT_MAX_SERVICES, DEFAULT_MIN_M),
            lb_common::DEFAULT_MAGLEV_ARENA
        );
        // Raising --max-services raises it; a min M off the ladder counts as the table
        // size it gives.
        assert_eq!(default_slots(20_000, DEFAULT_MIN_M), 20_000 * 2 * 1021);
        assert_eq!(default_slots(10, 1000), 10 * 2 * 1021);
        assert_eq!(default_slots(u32::MAX, DEFAULT_MIN_M), u32::MAX);
    }

    #[test]
    fn first_fit_reuses_holes() {
        let mut a = Arena::new(100);
        let x = a.alloc(10).unwrap();
        let _y = a.alloc(10).unwrap();
        a.free(x, 10);
        assert_eq!(a.alloc(5), Some(0));
        assert_eq!(a.alloc(6), Some(20));
    }
}
