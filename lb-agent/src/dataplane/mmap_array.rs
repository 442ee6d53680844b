//! The Maglev arena written through a shared memory mapping instead of one syscall per slot.
//!
//! Why: a table of M slots written with map updates costs M syscalls (about 1 µs each);
//! programming 10,000 services at M = 1021 took tens of seconds that way. The map is
//! created with BPF_F_MMAPABLE, so the kernel lets us map its value area and a slot write is
//! a plain store. Ordering is still safe: slots are written into a service's inactive
//! buffer, and the service value that flips to it is updated afterwards with a syscall,
//! which orders every store before it.
use std::{os::fd::AsFd as _, ptr::NonNull};

use anyhow::{Context as _, Result, bail};
use aya::maps::MapData;

/// BPF_F_MMAPABLE from uapi/linux/bpf.h.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

pub struct MmapArray {
    ptr: NonNull<u8>,
    len: usize,
    entries: u32,
    /// Keeps the map (and so the mapping's object) alive.
    _map: MapData,
}

// SAFETY: the mapping is owned by this value; access goes through &self/&mut self.
unsafe impl Send for MmapArray {}

/// Slots are u32s packed two to an 8-byte element (`lb_common::MAGLEV_SLOTS_PER_ENTRY`):
/// the value area is a dense array of u32.
const STRIDE: usize = 4;

impl MmapArray {
    /// Maps an array of u64 (two u32 slots each) created with BPF_F_MMAPABLE.
    pub fn new(map: MapData) -> Result<Self> {
        let info = map.info()?;
        if info.value_size() != 8 {
            bail!(
                "the pinned Maglev arena has the layout of an older agent: run `lb-agent \
                 cleanup` to start afresh"
            );
        }
        if info.map_flags() & BPF_F_MMAPABLE == 0 {
            bail!(
                "the pinned Maglev arena is not memory-mappable (left by an older agent): run \
                 `lb-agent cleanup` to start afresh"
            );
        }
        let entries = info.max_entries() * lb_common::MAGLEV_SLOTS_PER_ENTRY;
        let len = (entries as usize * STRIDE).next_multiple_of(4096);
        // SAFETY: a fresh shared mapping of the map's value area; the kernel checks bounds.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&map.fd().as_fd()),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap of the Maglev arena");
        }
        Ok(Self {
            ptr: NonNull::new(ptr.cast()).context("mmap returned null")?,
            len,
            entries,
            _map: map,
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn get(&self, idx: u32) -> Option<u32> {
        (idx < self.entries).then(|| {
            // SAFETY: idx is in bounds; the stride keeps the u32 aligned.
            unsafe {
                self.ptr
                    .as_ptr()
                    .add(idx as usize * STRIDE)
                    .cast::<u32>()
                    .read_volatile()
            }
        })
    }

    pub fn set(&mut self, idx: u32, value: u32) -> Result<()> {
        if idx >= self.entries {
            bail!("Maglev arena index {idx} out of bounds ({})", self.entries);
        }
        // SAFETY: as in get; volatile so the store is not elided or merged away.
        unsafe {
            self.ptr
                .as_ptr()
                .add(idx as usize * STRIDE)
                .cast::<u32>()
                .write_volatile(value)
        };
        Ok(())
    }
}

impl Drop for MmapArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
