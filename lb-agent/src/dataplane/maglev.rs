//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4).
//!
//! A table of `M` slots (M prime) maps a flow hash to a backend. Every backend derives a
//! permutation of the slots from its name, and the backends take turns claiming their next
//! preferred free slot, which gives each backend `floor(M/N)` or `ceil(M/N)` slots and moves
//! few slots when the backend set changes.
//!
//! Table size: [`choose_m`] picks the smallest prime of [`M_LADDER`] that is at least
//! `max(min_m, 100 * N)`; the paper's rule `M > 100 N` keeps per-backend imbalance around 1%.
//! The default lower bound is [`DEFAULT_MIN_M`] (1021) and the upper bound [`MAX_M`] (65537),
//! so a service with more than ~655 backends gets a table with less than 100 slots per backend.
//!
//! Everything here is deterministic across machines, Rust versions and input order: all nodes
//! must build identical tables so a flow picks the same backend whichever node receives it.

/// Lower bound for [`choose_m`] unless the operator asks for another one.
pub const DEFAULT_MIN_M: u32 = 1021;
/// Largest table size [`choose_m`] returns.
pub const MAX_M: u32 = 65537;

/// Table sizes [`choose_m`] chooses from: the largest prime below each power of two from 2^8
/// to 2^16, then 65537. Roughly doubling steps keep the arena use within 2x of what the rule
/// asks for, and a short fixed list means a table changes size rarely (a size change
/// reshuffles every slot).
pub const M_LADDER: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, MAX_M];

/// Trial division; u32 needs divisors up to 65535 only, which is cheap for the few calls per
/// table build.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Smallest size on [`M_LADDER`] that is at least `max(min_m, 100 * backends)`, capped at
/// [`MAX_M`].
pub fn choose_m(backends: usize, min_m: u32) -> u32 {
    let per_backend = u32::try_from(backends)
        .unwrap_or(u32::MAX)
        .saturating_mul(100);
    let want = min_m.max(per_backend);
    M_LADDER
        .iter()
        .copied()
        .find(|&m| m >= want)
        .unwrap_or(MAX_M)
}

const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// Arbitrary distinct seeds, so h1 and h2 are unrelated functions of the name.
const SEED_OFFSET: u64 = 0x5851_f42d_4c95_7f2d;
const SEED_SKIP: u64 = 0x1405_7b7e_f767_814f;

/// FNV-1a over the name with a seeded start, then a splitmix64 finaliser: FNV alone leaves
/// similar names (e.g. "10.0.0.1:80" and "10.0.0.2:80") with correlated low bits, and the
/// table only uses the value modulo M.
fn hash64(seed: u64, data: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A backend's name as the tables hash it, "a.b.c.d:port" (as `format!("{addr}:{port}")`
/// writes it), kept on the stack: a first programming names ten backends per service
/// port, and a `String` each was ~7% of its apply.
#[derive(Clone, Copy)]
pub struct BackendName {
    buf: [u8; 21],
    len: u8,
}

impl BackendName {
    pub fn new(addr: std::net::Ipv4Addr, port: u16) -> Self {
        let mut name = Self {
            buf: [0; 21],
            len: 0,
        };
        let mut digits = itoa::Buffer::new();
        for (i, octet) in addr.octets().into_iter().enumerate() {
            if i > 0 {
                name.push(b".");
            }
            name.push(digits.format(octet).as_bytes());
        }
        name.push(b":");
        name.push(digits.format(port).as_bytes());
        name
    }

    fn push(&mut self, bytes: &[u8]) {
        let at = usize::from(self.len);
        self.buf[at..at + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len() as u8;
    }
}

impl AsRef<[u8]> for BackendName {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// Builds a Maglev table of `m` slots; slot `i` holds the index into `backend_names` of the
/// backend that owns it. Returns an empty table when there are no backends.
///
/// The result does not depend on the order of `backend_names`. Names should be unique (e.g.
/// "addr:port"); equal names get identical preference lists and are told apart only by
/// their position, so for them the order does matter.
///
/// # Panics
/// When `m` is not prime: with a composite M a skip sharing a factor with M would not visit
/// every slot and the fill would never finish.
pub fn build_table<N: AsRef<[u8]>>(backend_names: &[N], m: u32) -> Vec<u32> {
    assert!(is_prime(m), "Maglev table size {m} is not prime");
    if backend_names.is_empty() {
        return Vec::new();
    }
    // Claim order follows the sorted names, so the caller's order cannot change who wins a
    // contested slot.
    let name = |i: usize| backend_names[i].as_ref();
    let mut order: Vec<usize> = (0..backend_names.len()).collect();
    order.sort_by(|&a, &b| name(a).cmp(name(b)).then(a.cmp(&b)));

    let m64 = u64::from(m);
    // Permutation of backend k: slot(j) = (offset + j * skip) mod M, walked incrementally
    // (add a multiple of skip, subtract M once if past the end) instead of stored as N x M
    // entries or recomputed with a division per step: the walk is the whole cost of the
    // build (10,000 tables of 1,021 slots for 10 backends: ~100 ms on one CPU, ~130 ms
    // one slot at a time).
    let mut walk: Vec<(u32, [u32; 4])> = order
        .iter()
        .map(|&i| {
            let offset = hash64(SEED_OFFSET, name(i)) % m64;
            let skip = hash64(SEED_SKIP, name(i)) % (m64 - 1) + 1;
            let times = |n: u64| (skip * n % m64) as u32;
            (offset as u32, [times(1), times(2), times(3), times(4)])
        })
        .collect();

    let mut table = vec![EMPTY; m as usize];
    let mut filled = 0u32;
    loop {
        for (k, (pos, skips)) in walk.iter_mut().enumerate() {
            // Terminates: skip is in 1..M and M is prime, so the walk visits every slot
            // within M steps and at least one slot is still free here.
            *pos = next_free(&table, *pos, *skips, m);
            table[*pos as usize] = order[k] as u32;
            *pos = step(*pos, skips[0], m);
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

const EMPTY: u32 = u32::MAX;

/// The first free slot of the walk from `pos` (itself included), `skips` being the
/// backend's skip times 1, 2, 3 and 4 (mod M). Looks at four slots per round, all four
/// computed from the round's first (the walk's dependency chain is one step per four
/// slots), and picks the first free one from a bit mask: a branch per slot looked at was
/// mispredicted about once a claim.
#[inline(always)]
fn next_free(table: &[u32], pos: u32, skips: [u32; 4], m: u32) -> u32 {
    let mut p0 = pos;
    loop {
        let p = [
            p0,
            step(p0, skips[0], m),
            step(p0, skips[1], m),
            step(p0, skips[2], m),
        ];
        let free = |i: usize| u32::from(table[p[i] as usize] == EMPTY) << i;
        let mask = free(0) | free(1) | free(2) | free(3);
        if mask != 0 {
            return p[mask.trailing_zeros() as usize];
        }
        p0 = step(p0, skips[3], m);
    }
}

/// (pos + skip) mod m for pos, skip < m, without a division.
#[inline(always)]
fn step(pos: u32, skip: u32, m: u32) -> u32 {
    let next = pos as u64 + skip as u64;
    if next >= m as u64 {
        (next - m as u64) as u32
    } else {
        next as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0usize; n];
        for &b in table {
            c[b as usize] += 1;
        }
        c
    }

    /// Deterministic Fisher-Yates with a small LCG, so the test needs no RNG crate.
    fn shuffle<T>(v: &mut [T], mut state: u64) {
        for i in (1..v.len()).rev() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let j = ((state >> 33) % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }

    #[test]
    fn ladder_is_prime_and_increasing() {
        for w in M_LADDER.windows(2) {
            assert!(w[0] < w[1]);
        }
        for m in M_LADDER {
            assert!(is_prime(m), "{m}");
        }
        assert_eq!(*M_LADDER.last().unwrap(), MAX_M);
        assert!(M_LADDER.contains(&DEFAULT_MIN_M));
    }

    #[test]
    fn is_prime_small_and_large() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65521));
        assert!(!is_prime(65535));
        assert!(is_prime(4_294_967_291));
        assert!(!is_prime(4_294_967_295));
    }

    #[test]
    fn choose_m_follows_ladder() {
        assert_eq!(choose_m(0, DEFAULT_MIN_M), 1021);
        assert_eq!(choose_m(1, DEFAULT_MIN_M), 1021);
        assert_eq!(choose_m(10, DEFAULT_MIN_M), 1021);
        assert_eq!(choose_m(11, DEFAULT_MIN_M), 2039);
        assert_eq!(choose_m(20, DEFAULT_MIN_M), 2039);
        assert_eq!(choose_m(21, DEFAULT_MIN_M), 4093);
        assert_eq!(choose_m(81, DEFAULT_MIN_M), 8191);
        assert_eq!(choose_m(82, DEFAULT_MIN_M), 16381);
        assert_eq!(choose_m(327, DEFAULT_MIN_M), 32749);
        assert_eq!(choose_m(328, DEFAULT_MIN_M), 65537);
        assert_eq!(choose_m(100_000, DEFAULT_MIN_M), MAX_M);
        assert_eq!(choose_m(usize::MAX, DEFAULT_MIN_M), MAX_M);
        assert_eq!(choose_m(1, 0), 251);
        assert_eq!(choose_m(3, 0), 509);
        assert_eq!(choose_m(1, 1022), 2039);
        assert_eq!(choose_m(1, u32::MAX), MAX_M);
    }

    #[test]
    fn backend_names_read_as_formatted() {
        for (a, port) in [
            ([0, 0, 0, 0], 0),
            ([10, 244, 1, 7], 8080),
            ([255, 255, 255, 255], 65535),
            ([1, 20, 100, 9], 9),
            ([192, 168, 0, 10], 443),
        ] {
            let addr = std::net::Ipv4Addr::from(a);
            let name = BackendName::new(addr, port);
            assert_eq!(name.as_ref(), format!("{addr}:{port}").as_bytes());
        }
        // The table is built from the bytes: either spelling gives the same one.
        let strings = names(10);
        let stack: Vec<BackendName> = (0..10u32)
            .map(|i| BackendName::new(std::net::Ipv4Addr::new(10, 0, 0, i as u8), 8080))
            .collect();
        assert_eq!(build_table(&strings, 1021), build_table(&stack, 1021));
    }

    /// The plain fill as the paper gives it (each claim walks its permutation one slot at
    /// a time): [`build_table`]'s four-slot rounds must give the same table.
    fn plain_fill(names: &[String], m: u32) -> Vec<u32> {
        let mut order: Vec<usize> = (0..names.len()).collect();
        order.sort_by(|&a, &b| names[a].cmp(&names[b]).then(a.cmp(&b)));
        let m64 = u64::from(m);
        let mut walk: Vec<(u64, u64)> = order
            .iter()
            .map(|&i| {
                let name = names[i].as_bytes();
                (
                    hash64(SEED_OFFSET, name) % m64,
                    hash64(SEED_SKIP, name) % (m64 - 1) + 1,
                )
            })
            .collect();
        let mut table = vec![EMPTY; m as usize];
        let mut filled = 0;
        'fill: loop {
            for (k, (pos, skip)) in walk.iter_mut().enumerate() {
                while table[*pos as usize] != EMPTY {
                    *pos = (*pos + *skip) % m64;
                }
                table[*pos as usize] = order[k] as u32;
                *pos = (*pos + *skip) % m64;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        table
    }

    #[test]
    fn same_table_as_the_plain_fill() {
        for m in M_LADDER {
            for n in [1usize, 2, 3, 4, 5, 10, 11, 99, 250, 300, 1000] {
                let mut all = names(n);
                shuffle(&mut all, u64::from(m) + n as u64);
                assert_eq!(build_table(&all, m), plain_fill(&all, m), "m={m} n={n}");
            }
        }
    }

    #[test]
    fn empty_backends_give_empty_table() {
        assert!(build_table::<String>(&[], 1021).is_empty());
    }

    #[test]
    #[should_panic(expected = "not prime")]
    fn composite_m_panics() {
        build_table(&names(3), 1000);
    }

    #[test]
    fn single_backend_owns_everything() {
        let t = build_table(&names(1), 251);
        assert_eq!(t.len(), 251);
        assert!(t.iter().all(|&b| b == 0));
    }

    #[test]
    fn balanced_within_one_slot() {
        for m in [251u32, 1021, 4093, 65537] {
            for n in [1usize, 2, 3, 7, 10, 64, 100, 250] {
                if n > m as usize {
                    continue;
                }
                let t = build_table(&names(n), m);
                assert_eq!(t.len(), m as usize);
                let c = counts(&t, n);
                let lo = m as usize / n;
                let hi = lo + usize::from(!(m as usize).is_multiple_of(n));
                for (b, &k) in c.iter().enumerate() {
                    assert!(lo <= k && k <= hi, "m={m} n={n} backend {b} has {k} slots");
                }
            }
        }
    }

    #[test]
    fn more_backends_than_slots_still_fills_table() {
        let t = build_table(&names(300), 251);
        assert_eq!(t.len(), 251);
        let c = counts(&t, 300);
        assert!(c.iter().all(|&k| k <= 1));
    }

    #[test]
    fn independent_of_input_order() {
        let base = names(37);
        let reference = build_table(&base, 4093);
        for seed in 1..6 {
            let mut shuffled = base.clone();
            shuffle(&mut shuffled, seed);
            let t = build_table(&shuffled, 4093);
            // Compare owners by name: indices refer to each caller's own order.
            for (slot, (&a, &b)) in reference.iter().zip(&t).enumerate() {
                assert_eq!(base[a as usize], shuffled[b as usize], "slot {slot}");
            }
        }
    }

    #[test]
    fn removing_a_backend_moves_about_one_nth() {
        for (n, m) in [
            (2usize, 251u32),
            (5, 1021),
            (10, 1021),
            (10, 65537),
            (50, 8191),
            (100, 16381),
            (100, 1021),
        ] {
            let all = names(n);
            let before = build_table(&all, m);
            for removed in [0, n / 2, n - 1] {
                let mut rest = all.clone();
                rest.remove(removed);
                let after = build_table(&rest, m);
                let mut moved_survivor = 0usize;
                for (&a, &b) in before.iter().zip(&after) {
                    let (old, new) = (&all[a as usize], &rest[b as usize]);
                    if *old != all[removed] && old != new {
                        moved_survivor += 1;
                    }
                }
                // Slots of the removed backend must move (about M/N of them); slots of
                // survivors should mostly stay. Measured: 1-3% of M at M >= 100 N, 4.5% for
                // N = 100 at M = 1021.
                let limit = m as usize * 5 / 100;
                assert!(
                    moved_survivor <= limit,
                    "n={n} m={m} removed={removed}: {moved_survivor} survivor slots moved (> {limit})"
                );
            }
        }
    }

    #[test]
    fn hashes_are_stable() {
        // Pinned so a change to the hash (which would reshuffle every table in a mixed-version
        // cluster) cannot go unnoticed.
        let t = build_table(&names(3), 251);
        let pinned: Vec<u32> = t[..16].to_vec();
        assert_eq!(pinned, PINNED_PREFIX);
    }

    const PINNED_PREFIX: [u32; 16] = [2, 0, 0, 0, 2, 1, 2, 2, 0, 0, 2, 1, 2, 2, 2, 0];
}
