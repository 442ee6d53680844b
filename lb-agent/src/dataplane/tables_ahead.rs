//! Maglev tables built on other threads ahead of the thread that writes them.
//!
//! A bulk programming (10,000 ports from nothing) builds one table per port, ~15 µs each
//! at 1,021 slots, and writes each port's maps in order on one thread. Here helper threads
//! (one per further CPU: `available_parallelism`, which follows the container's CPU limit)
//! take the ports in order and build their tables while the writer writes. When the
//! writer reaches a port no helper has taken yet it builds that table itself, and while a
//! helper is still building the one it needs it builds a later one, so no CPU idles:
//! 10,000 tables take ~78 ms on 2 CPUs instead of ~145 ms on one. (Before, the tables of
//! each 1,024 ports were built on all CPUs first and then written on one, and the other
//! CPUs idled during the writes.) Helpers stay at most [`WINDOW`] ports ahead of the
//! writer, which bounds the tables in flight (4 KiB each at the default size).

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicUsize, Ordering},
};
use std::time::Duration;

use crate::dataplane::maglev::{self, BackendName};

/// How far (in ports) helpers may run ahead of the writer.
pub const WINDOW: usize = 1024;
/// Tables per helper below which a thread costs more than it saves (a table of 1,021
/// slots takes ~15 µs, a thread ~30 µs to start).
pub const MIN_PER_THREAD: usize = 32;

/// The Maglev names of one port's backends.
pub type Names = Vec<BackendName>;

/// The tables of a sequence of ports, handed out in order by [`Tables::take`].
pub struct Tables<'a, F> {
    shared: &'a Shared<'a, F>,
}

struct Shared<'a, F> {
    /// Per port: the size of the table to build, or None (no table).
    sizes: &'a [Option<u32>],
    /// Port i's backend names.
    names: F,
    /// The first port no one has taken.
    next: AtomicUsize,
    /// The port the writer is at.
    at: AtomicUsize,
    /// The writer is done (or gave up): helpers stop.
    stop: AtomicBool,
    /// A helper died (panicked): the writer builds what it had taken.
    lost: AtomicBool,
    built: Vec<Mutex<Option<Vec<u32>>>>,
}

/// Runs `write` with the tables of a sequence of ports (port i: a table of `sizes[i]`
/// slots, none if None, of the backends `names(i)`) built ahead of it on helper threads
/// when there are enough of them.
pub fn with_tables<F: Fn(usize) -> Names + Sync, R>(
    sizes: &[Option<u32>],
    names: F,
    write: impl FnOnce(&mut Tables<'_, F>) -> R,
) -> R {
    let due = sizes.iter().flatten().count();
    let helpers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .min(due / MIN_PER_THREAD);
    let shared = Shared {
        sizes,
        names,
        next: AtomicUsize::new(0),
        at: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        built: if helpers == 0 {
            Vec::new()
        } else {
            sizes.iter().map(|_| Mutex::new(None)).collect()
        },
    };
    if helpers == 0 {
        // Everything is built by the writer as it goes (`take` finds every port untaken).
        return write(&mut Tables { shared: &shared });
    }
    std::thread::scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(|| shared.help());
        }
        // Helpers stop however `write` ends (an error returned, or a panic).
        struct Stop<'s>(&'s AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _stop = Stop(&shared.stop);
        write(&mut Tables { shared: &shared })
    })
}

impl<F: Fn(usize) -> Names> Shared<'_, F> {
    fn build(&self, i: usize, m: u32) -> Vec<u32> {
        maglev::build_table(&(self.names)(i), m)
    }

    fn help(&self) {
        // A helper that panics has taken a port it never delivers: the writer is told.
        struct Lost<'s>(&'s AtomicBool);
        impl Drop for Lost<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.store(true, Ordering::Release);
                }
            }
        }
        let _lost = Lost(&self.lost);
        while !self.stop.load(Ordering::Acquire)
            && self.next.load(Ordering::Acquire) < self.sizes.len()
        {
            if !self.build_next() {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Takes the first port no one has taken, unless that is [`WINDOW`] or more ahead of
    /// the writer, and builds its table into `built`. False when there was none to take.
    fn build_next(&self) -> bool {
        let i = self.next.load(Ordering::Acquire);
        if i >= self.sizes.len() || i >= self.at.load(Ordering::Acquire) + WINDOW {
            return false;
        }
        if self
            .next
            .compare_exchange(i, i + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && let Some(m) = self.sizes[i]
        {
            let table = self.build(i, m);
            *self.built[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(table);
        }
        true
    }
}

impl<F: Fn(usize) -> Names> Tables<'_, F> {
    /// The table of port `i` (as (size, backend indexes)), None when it has no job. Ports
    /// are taken in increasing order; one never taken is skipped.
    pub fn take(&mut self, i: usize) -> Option<(u32, Vec<u32>)> {
        let s = self.shared;
        s.at.store(i, Ordering::Release);
        let m = (*s.sizes.get(i)?)?;
        let build = || Some((m, s.build(i, m)));
        loop {
            let next = s.next.load(Ordering::Acquire);
            if next <= i {
                // No helper has it: the writer builds it (and helpers go on after it).
                if s.next
                    .compare_exchange(next, i + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return build();
                }
                continue;
            }
            if let Some(t) = s.built[i].lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Some((m, t));
            }
            if s.lost.load(Ordering::Acquire) {
                return build();
            }
            // A helper is building it (~15 µs): build a later one meanwhile.
            if !s.build_next() {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// Every third port has no table; sizes and backend counts vary.
    fn sizes(n: usize) -> Vec<Option<u32>> {
        (0..n)
            .map(|i| (i % 3 != 2).then_some(if i % 2 == 0 { 251 } else { 1021 }))
            .collect()
    }

    fn names(i: usize) -> Names {
        (0..1 + i % 7)
            .map(|j| BackendName::new(Ipv4Addr::new(10, 1, (i % 256) as u8, j as u8), 80))
            .collect()
    }

    fn want(sizes: &[Option<u32>], i: usize) -> Option<(u32, Vec<u32>)> {
        sizes[i].map(|m| (m, maglev::build_table(&names(i), m)))
    }

    #[test]
    fn every_port_gets_its_table_in_order() {
        let sizes = sizes(3 * WINDOW + 17);
        let got: Vec<_> = with_tables(&sizes, names, |t| {
            (0..sizes.len()).map(|i| t.take(i)).collect()
        });
        let want: Vec<_> = (0..sizes.len()).map(|i| want(&sizes, i)).collect();
        assert!(got == want);
    }

    #[test]
    fn ports_may_be_skipped_and_the_writer_may_stop_early() {
        let sizes = sizes(2 * WINDOW);
        with_tables(&sizes, names, |t| {
            for i in (0..sizes.len()).step_by(5).take(100) {
                assert!(t.take(i) == want(&sizes, i), "port {i}");
            }
        });
        // Too few to be worth a thread: built in line.
        let few = super::tests::sizes(MIN_PER_THREAD / 2);
        with_tables(&few, names, |t| {
            for i in 0..few.len() {
                assert!(t.take(i) == want(&few, i));
            }
        });
    }
}
