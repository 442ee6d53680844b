//! The fuzzer: random and mutated packets through BPF_PROG_TEST_RUN of the XDP program and
//! both tc programs, with the packet tables' world of services programmed. Seeds are the
//! world's own traffic (every kind of frontend, replies to SNAT ports, pods' replies and
//! ClusterIP requests, ARP, ICMP quoting a translated flow, fragments); mutations truncate,
//! extend, flip bytes, add IPv4 options, fragment, set odd TCP flags and wrong lengths.
//!
//! For every packet: the run succeeds with an action the hook knows; a packet that is not
//! ours (not IPv4/ARP, or addressed to nothing of ours and not from a node or frontend
//! address) leaves byte-identical and passed; a changed packet is IPv4 or an ARP reply, with
//! a valid IPv4 header checksum and a length within the frame, and a TCP/UDP/ICMP checksum
//! that is valid whenever the input's was (translation keeps validity; a packet the program
//! builds — RST, ICMP error — is always valid). At the end the programs' packet counters
//! equal the runs.
//!
//! `XLB_FUZZ_PACKETS` sets the count (default 1,000,000, about 3 s, in `cargo xtask test`;
//! the long run is e.g. `XLB_FUZZ_PACKETS=30000000`), `XLB_FUZZ_SEED` the seed (printed on
//! failure). The run also fails if some program translated or built nothing: a fuzzer that
//! never reaches the translation paths tests nothing.
use aya::maps::PerCpuArray;

use super::arp::who_has;
use super::clusterip::from_pod;
use super::*;

/// xorshift64*: deterministic, no dependency, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The world's traffic, one frame of each kind.
fn seeds() -> Vec<Vec<u8>> {
    let reply_to_client = Pkt {
        smac: MAC_POD_LOCAL,
        dmac: MAC_POD_IF,
        src: POD_LOCAL,
        dst: CLIENT,
        ttl: 64,
        l4: L4::Tcp {
            sport: 8080,
            dport: 40001,
            seq: 7000,
            ack: Some(1001),
            syn: true,
        },
    };
    let mut v = vec![
        syn(40001, NODE, 30080).bytes(),
        ack(40001, NODE, 30080).bytes(),
        syn(40002, NODE, 30081).bytes(),
        ack(40002, NODE, 30081).bytes(),
        udp(40003, NODE, 30053).bytes(),
        udp(40004, NODE, 30054).bytes(),
        syn(40005, NODE, 30090).bytes(),
        udp(40006, NODE, 30091).bytes(),
        syn(40007, LB_IP, 80).bytes(),
        syn(40008, LB_IP_RANGED, 80).bytes(),
        udp(40009, EXT_IP, 53).bytes(),
        syn(40010, CLUSTER_IP, 80).bytes(),
        syn(40011, [10, 96, 0, 99], 80).bytes(),
        syn(40012, NODE, 22).bytes(),
        from_remote(true).bytes(),
        from_remote(false).bytes(),
        reply_to_client.bytes(),
        from_pod(45001, CLUSTER_IP, 80).bytes(),
        from_pod(45002, CLUSTER_IP_REMOTE, 80).bytes(),
        from_pod(45003, CLUSTER_IP_EMPTY, 80).bytes(),
        from_pod(45004, NODE, 30081).bytes(),
        who_has(LB_IP),
    ];
    // ICMP port unreachable quoting a translated UDP flow (as a backend's node would send).
    v.push(icmp_unreachable_for(
        &udp(40004, POD_REMOTE_DNS, 5353).with(|p| {
            p.src = NODE;
            p.smac = MAC_NODE_B;
            p.dmac = MAC_NODE;
        }),
    ));
    // A first fragment and a later one of a NodePort UDP datagram.
    let mut frag = udp(40013, NODE, 30054).bytes();
    frag[20] = 0x20; // MF, offset 0
    v.push(frag.clone());
    frag[20..22].copy_from_slice(&[0x00, 0x10]); // last fragment at offset 128
    v.push(frag);
    v
}

/// One to three mutations of a seed (or, now and then, random bytes).
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    if rng.below(50) == 0 {
        let n = rng.below(120);
        return (0..n).map(|_| rng.byte()).collect();
    }
    let mut f = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(3) {
        match rng.below(11) {
            // Keep it as it is: the seeds' own traffic mixed in (flows get state).
            0 | 1 => {}
            2 => f.truncate(rng.below(f.len() + 1)),
            3 => f.extend((0..rng.below(64)).map(|_| rng.byte())),
            4 => {
                let i = rng.below(f.len());
                if let Some(b) = f.get_mut(i) {
                    *b = rng.byte();
                }
            }
            // IPv4 options: a longer header, the options' bytes random.
            5 if f.len() > 14 => {
                let words = 1 + rng.below(10);
                f[14] = 0x40 | (5 + words) as u8;
                let extra: Vec<u8> = (0..words * 4).map(|_| rng.byte()).collect();
                let at = 34.min(f.len());
                f.splice(at..at, extra);
            }
            // Fragment flags and offsets.
            6 if f.len() > 22 => {
                f[20] = rng.byte() & 0x3f;
                f[21] = rng.byte();
            }
            // TCP flags anything.
            7 if f.len() > 47 => f[47] = rng.byte(),
            // Wrong IPv4 total length.
            8 if f.len() > 18 => {
                let l = rng.next() as u16;
                f[16..18].copy_from_slice(&l.to_be_bytes());
            }
            // Another protocol.
            9 if f.len() > 23 => f[23] = [1, 6, 17, 47, 132, rng.byte()][rng.below(6)],
            // Checksums zeroed (UDP "none") or all ones.
            10 if f.len() > 52 => {
                let v = if rng.below(2) == 0 {
                    [0, 0]
                } else {
                    [0xff, 0xff]
                };
                let at = if f[23] == PROTO_TCP { 50 } else { 40 };
                f[at..at + 2].copy_from_slice(&v);
            }
            _ => {}
        }
    }
    f
}

fn is_ipv4(f: &[u8]) -> bool {
    f.len() >= 34 && f[12..14] == [0x08, 0x00] && f[14] >> 4 == 4
}

/// Where L4 starts in an IPv4 frame (after the header and its options).
fn l4_off(f: &[u8]) -> usize {
    14 + ((f[14] & 0x0f) as usize) * 4
}

/// The L4 checksum of an unfragmented IPv4 frame: Some(valid) for TCP, UDP (with a
/// checksum) and ICMP whose whole segment is in the frame; None otherwise.
fn l4_valid(f: &[u8]) -> Option<bool> {
    if !is_ipv4(f) || f[14] & 0x0f < 5 || f[20] & 0x3f != 0 || f[21] != 0 {
        return None;
    }
    let tot = u16::from_be_bytes([f[16], f[17]]) as usize;
    if tot < l4_off(f) - 14 || f.len() < 14 + tot {
        return None;
    }
    let l4 = &f[l4_off(f)..14 + tot];
    let src = u32::from_ne_bytes(f[26..30].try_into().unwrap());
    let dst = u32::from_ne_bytes(f[30..34].try_into().unwrap());
    let pseudo = |p| csum::pseudo_header(src, dst, p, l4.len() as u16);
    match f[23] {
        PROTO_TCP if l4.len() >= 20 => Some(csum::checksum(l4, pseudo(PROTO_TCP)) == 0),
        PROTO_UDP if l4.len() >= 8 && l4[6..8] != [0, 0] => {
            Some(csum::checksum(l4, pseudo(PROTO_UDP)) == 0)
        }
        PROTO_ICMP if l4.len() >= 8 => Some(csum::checksum(l4, 0) == 0),
        _ => None,
    }
}

/// Addressed to something of ours, or carrying one of our addresses as source (a
/// translated packet the uplink's tc sends on): everything else must pass untouched.
fn maybe_ours(f: &[u8]) -> bool {
    if f.len() >= 12 + 2 && f[12..14] == [0x08, 0x06] {
        return true; // ARP: the responder's
    }
    if !is_ipv4(f) {
        return false;
    }
    let (src, dst): ([u8; 4], [u8; 4]) =
        (f[26..30].try_into().unwrap(), f[30..34].try_into().unwrap());
    let ours = |a: [u8; 4]| {
        [NODE, LB_IP, LB_IP_RANGED, EXT_IP].contains(&a)
            || a[..2] == [10, 96] // service CIDR
            || a[..2] == [10, 250] // pods: replies to local pods' flows
    };
    ours(dst) || ours(src)
}

fn check(prog: &Prog, input: &[u8], rc: u32, out: &[u8]) -> Result<(), String> {
    let known = match prog {
        Prog::Xdp => [XDP_DROP, XDP_PASS, XDP_TX, 4].contains(&rc),
        _ => [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&rc),
    };
    if !known {
        return Err(format!("unknown action {rc}"));
    }
    let passed = rc == XDP_PASS && matches!(prog, Prog::Xdp)
        || rc == TC_ACT_OK && !matches!(prog, Prog::Xdp);
    if !maybe_ours(input) && (!passed || out != input) {
        return Err(format!("not ours, yet action {rc} or changed"));
    }
    let dropped = matches!((prog, rc), (Prog::Xdp, XDP_DROP))
        || (!matches!(prog, Prog::Xdp) && rc == TC_ACT_SHOT);
    if dropped || out == input {
        return Ok(());
    }
    if out.len() >= 42 && out[12..14] == [0x08, 0x06] {
        return if out[20..22] == [0, 2] {
            Ok(())
        } else {
            Err("changed ARP that is not a reply".into())
        };
    }
    if !is_ipv4(out) {
        return Err("changed into something that is not IPv4".into());
    }
    // Built by the program (a reject): always valid. Translated: as valid as the input.
    let rst = |f: &[u8]| {
        let flags = l4_off(f) + 13;
        f.len() > flags && f[23] == PROTO_TCP && f[flags] & 0x04 != 0
    };
    let built = !is_ipv4(input) || out[23] != input[23] || (rst(out) && !rst(input));
    let header_ok = |f: &[u8]| {
        let ihl = ((f[14] & 0x0f) as usize) * 4;
        ihl >= 20 && f.len() >= 14 + ihl && csum::checksum(&f[14..14 + ihl], 0) == 0
    };
    if !header_ok(out) && (built || header_ok(input)) {
        return Err("IPv4 header checksum".into());
    }
    let tot = u16::from_be_bytes([out[16], out[17]]) as usize;
    if tot > out.len() - 14 {
        return Err(format!("IPv4 total length {tot} beyond the frame"));
    }
    match (l4_valid(input), l4_valid(out)) {
        (_, Some(false)) if built => Err("generated packet with a bad checksum".into()),
        (Some(true), Some(false)) => Err("translation broke a valid L4 checksum".into()),
        _ => Ok(()),
    }
}

pub(crate) fn counter(dp: &mut Datapath, c: Counter) -> u64 {
    let map = dp.ebpf.map(MAP_COUNTERS).expect("counters map");
    let a: PerCpuArray<_, u64> = PerCpuArray::try_from(map).expect("per-CPU array");
    a.get(&(c as u32), 0).expect("counter").iter().sum()
}

#[test]
fn fuzz_every_program() {
    let Some(_guard) = privileged() else {
        return;
    };
    let n: usize = env_or("XLB_FUZZ_PACKETS", 1_000_000);
    let seed: u64 = env_or("XLB_FUZZ_SEED", 0x005e_ed0f_f022);
    let run = move |dp: &mut Datapath, ifindex: u32| {
        let mut rng = Rng(seed);
        let seeds = seeds();
        let (xdp0, tc0) = (
            counter(dp, Counter::Packets),
            counter(dp, Counter::TcUplinkPackets),
        );
        let (mut xdp_runs, mut tc_runs) = (0u64, 0u64);
        // Per program (XDP, tc uplink, tc pod): packets changed (translated or built), and
        // passed untouched.
        let mut changed = [0u64; 3];
        let mut untouched = [0u64; 3];
        let started = Instant::now();
        for i in 0..n {
            let input = mutate(&mut rng, &seeds);
            let prog = match i % 3 {
                0 => Prog::Xdp,
                1 => Prog::TcUplink,
                _ => Prog::TcPod,
            };
            match prog {
                Prog::Xdp => xdp_runs += 1,
                Prog::TcUplink => tc_runs += 1,
                Prog::TcPod => {}
            }
            // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header, and for tc
            // an IPv4 frame shorter than an IPv4 header (EINVAL): those cannot be run here.
            let short = input.len() < 14 || (!matches!(prog, Prog::Xdp) && input.len() < 34);
            let (rc, out) = match test_run(dp, &prog, &input, ifindex) {
                Ok(r) => r,
                Err(_) if short => {
                    match prog {
                        Prog::Xdp => xdp_runs -= 1,
                        Prog::TcUplink => tc_runs -= 1,
                        Prog::TcPod => {}
                    }
                    continue;
                }
                Err(e) => panic!(
                    "packet {i} (seed {seed:#x}): test_run failed: {e:?} ({} bytes, prog {})\n in: {}",
                    input.len(),
                    i % 3,
                    hex(&input)
                ),
            };
            let k = i % 3;
            if out == input {
                untouched[k] += 1;
            } else if !out.is_empty() {
                changed[k] += 1;
            }
            if let Err(why) = check(&prog, &input, rc, &out) {
                panic!(
                    "packet {i} (seed {seed:#x}) through {}: {why}\n in:  {}\n out: {}",
                    match prog {
                        Prog::Xdp => "XDP",
                        Prog::TcUplink => "tc uplink",
                        Prog::TcPod => "tc pod",
                    },
                    hex(&input),
                    hex(&out)
                );
            }
        }
        eprintln!(
            "fuzz: {n} packets in {:.1} s (seed {seed:#x}); changed (XDP, tc uplink, tc pod) \
             {changed:?}, untouched {untouched:?}",
            started.elapsed().as_secs_f64()
        );
        assert!(
            changed.iter().all(|&c| c > 0),
            "some program never translated or built a packet: {changed:?}"
        );
        assert_eq!(
            counter(dp, Counter::Packets) - xdp0,
            xdp_runs,
            "XDP packets counter"
        );
        assert_eq!(
            counter(dp, Counter::TcUplinkPackets) - tc0,
            tc_runs,
            "tc uplink packets counter"
        );
    };
    run_table(vec![Step::Run(Box::new(run))], SNAT_PORT + 63);
}
