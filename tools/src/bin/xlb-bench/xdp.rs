//! `cargo xtask bench`: per-packet cost of the XDP datapath, measured in the real kernel with
//! BPF_PROG_TEST_RUN, next to the trivial `xlb_xdp_pass` program (the floor), at several
//! numbers of programmed services; plus Maglev table builds and the agent's `apply` time.
//!
//! Results go to stdout and, overwritten on every run, to `bench/RESULTS.md` and
//! `bench/results.json` (relative to the working directory, the workspace root under xtask).
//!
//! How packets are timed, and why:
//!
//! * The kernel's repeat loop runs the program again on the *same* buffer, so the output of
//!   run i is the input of run i+1. A DNATed packet no longer matches its frontend, so a
//!   plain `repeat = 100_000` would time one real translation and 99,999 "no match" passes.
//!   Per-flow figures therefore use `repeat = 1`, one call per packet, each call with a fresh
//!   copy of the packet: "new flow" is the first packet of each of `--flows` distinct flows
//!   (distinct client address and port, spread over the services) on an empty conntrack,
//!   "established" is the same packets sent again (conntrack hit). With `repeat = 1` the
//!   kernel's figure for a call still includes a fixed timer and bh-disable overhead; the
//!   floor is timed the same way, and the `net` column is ours minus the floor.
//! * The in-kernel loop (`--loop-repeat`, default 100,000) is used where the program leaves
//!   the packet as it found it: an established flow to a local backend whose address and
//!   port equal the frontend's (a self-mapped service added to every world), so each
//!   repetition does the full established-flow work (frontend, service, conntrack and
//!   backend lookups, stats, DNAT rewrite) on an unchanged packet.
//! * Every pass is checked against the datapath's own counters (`XLB_COUNTERS`): a pass that
//!   did not take the path it claims to measure fails the run.
//!
//! Conntrack and reverse-NAT maps are emptied before each repeat, so "new" flows are new and
//! SNAT ports never run out. Per-packet cost does not depend on the Maglev table size M (one
//! array lookup at `hash % M`), so large worlds use a small M to fit the arena.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::{
    maps::{HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use lb_agent::{
    dataplane::{
        datapath::{Datapath, Limits},
        maglev,
        programmer::{Maps, Programmer, Settings},
    },
    model::translate::{
        BackendSpec, Desired, FrontendKind, FrontendSpec, Proto, Scope, SvcPort, SvcPortId,
    },
};
use lb_common::*;
use lb_tests::{Netns, PinDir, exec_ok, in_netns};
use serde::{Deserialize, Serialize};

use crate::{
    Args,
    util::{median, ms},
    xdp_rows::{ApplyRow, MaglevRow, PacketRow},
};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// The node: `up0` in the bench namespace.
const NODE: [u8; 4] = [172, 30, 0, 2];
const MAC_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
/// Remote backends live behind this neighbour (static entry, so the FIB always answers).
const NODE_B: &str = "172.30.0.3";
const MAC_NODE_B: &str = "02:00:00:00:00:03";
/// Backend k of the world is `BACKEND_BASE + k`, port 8080; the route to 10.64.0.0/10
/// points at node B.
const BACKEND_BASE: u32 = u32::from_be_bytes([10, 64, 0, 0]);
const BACKEND_ROUTE: &str = "10.64.0.0/10";
const BACKEND_PORT: u16 = 8080;
/// Service i answers on `FRONTEND_BASE + i / FE_PORTS` port `FE_PORT_MIN + i % FE_PORTS`.
const FRONTEND_BASE: u32 = u32::from_be_bytes([172, 30, 1, 1]);
const FE_PORT_MIN: u16 = 20_000;
const FE_PORTS: u32 = 20_000;
/// Client k is `CLIENT_BASE + k` port `CLIENT_PORT_MIN + k % CLIENT_PORTS`.
const CLIENT_BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
const CLIENT_PORT_MIN: u16 = 10_000;
const CLIENT_PORTS: u32 = 50_000;
/// The self-mapped service: frontend and (local) backend are both NODE:LOOP_PORT.
const LOOP_PORT: u16 = 30_999;
/// Flow k goes to service `(k * FLOW_STRIDE) % services`, spreading flows over the maps.
const FLOW_STRIDE: u64 = 7919;
/// Full port range for SNAT: many concurrent new flows per backend must not run out.
/// The agent's SNAT range on a stock node (NodePorts and the frontends above lie outside it,
/// as they do on a real node).
const SNAT_MIN: u16 = DEFAULT_SNAT_PORT_MIN;
const SNAT_MAX: u16 = DEFAULT_SNAT_PORT_MAX;

pub const METHOD: &[&str] = &[
    "All packet figures come from BPF_PROG_TEST_RUN; medians over the repeats.",
    "repeat=1 rows: one call per packet, each with a fresh copy; 'new' = first packet of each \
     distinct flow (a SYN) on an empty conntrack (miss -> Maglev -> CT insert), 'established' = \
     an ACK of each flow after its entry was confirmed (moved to XLB_CT as a handshake would: \
     CT hit). The per-call figure includes the kernel's fixed timer overhead, which the floor \
     shows too: 'net' = ours - floor. The SNAT range is the agent's stock-node default; the \
     frontends lie outside it.",
    "The kernel's repeat loop reuses one buffer (run i+1 sees the output of run i), so a \
     translated packet stops matching after the first run; the loop row uses a self-mapped \
     local backend (backend address:port = frontend) so every repetition is a full \
     established-flow run on an unchanged packet.",
    "Every pass is checked against XLB_COUNTERS (ct_miss/ct_hit/fwd_local/fwd_remote) and the \
     return code.",
    "local = DNAT + XDP_PASS; remote = DNAT + SNAT + FIB lookup + XDP_TX (static neighbour in \
     a private netns).",
    "Per-packet cost does not depend on the Maglev table size M (one array lookup), so the \
     largest world uses a small M to fit the arena.",
];

fn setup_netns(ns: &Netns) -> Result<()> {
    let cmds = [
        "ip link add up0 type veth peer name up1".to_owned(),
        "ip link set up0 address 02:00:00:00:00:02".to_owned(),
        "ip addr add 172.30.0.2/16 dev up0".to_owned(),
        "ip link set up0 up".to_owned(),
        "ip link set up1 up".to_owned(),
        "ip link set lo up".to_owned(),
        format!("ip neigh replace {NODE_B} lladdr {MAC_NODE_B} dev up0 nud permanent"),
        format!("ip route add {BACKEND_ROUTE} via {NODE_B} dev up0"),
        "sysctl -qw net.ipv4.ip_forward=1".to_owned(),
    ];
    for cmd in cmds {
        let argv: Vec<&str> = cmd.split_whitespace().collect();
        exec_ok(ns.name(), &argv).with_context(|| format!("bench netns: {cmd}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- the programmed world

/// One loaded datapath with `services` services programmed. Field order is drop order: the
/// maps and programs go before their pin directory.
struct World {
    services: u32,
    backends: u32,
    dp: Datapath,
    maps: Maps,
    programmer: Programmer,
    ct: HashMap<MapData, FlowKey, CtEntry>,
    ct_new: HashMap<MapData, FlowKey, CtEntry>,
    revnat: HashMap<MapData, FlowKey, RevNat>,
    counters: PerCpuArray<MapData, u64>,
    apply_row: ApplyRow,
    _pins: PinDir,
}

fn min_m_for(services: u32) -> u32 {
    // 100k services x 2 tables x M slots must fit the arena; small M keeps it at ~400 MB.
    if services > 10_000 {
        maglev::M_LADDER[0]
    } else {
        maglev::DEFAULT_MIN_M
    }
}

impl World {
    fn new(services: u32, args: &Args) -> Result<Self> {
        let min_m = min_m_for(services);
        let m = maglev::choose_m(args.backends as usize, min_m);
        let svc_ports = services + 1; // + the self-mapped loop service
        let backends = services * args.backends + 1;
        // The loop service has one backend: choose_m(1) <= m.
        let arena = (2 * u64::from(m) * u64::from(svc_ports)).max(u64::from(DEFAULT_MAGLEV_ARENA));
        let limits = Limits {
            max_services: svc_ports.max(DEFAULT_MAX_SERVICES),
            max_frontends: svc_ports.max(DEFAULT_MAX_FRONTENDS),
            max_backends: backends.max(DEFAULT_MAX_BACKENDS),
            maglev_arena: u32::try_from(arena).context("Maglev arena above 4 Gi slots")?,
            ct_entries: DEFAULT_CT_ENTRIES.max(4 * args.flows),
            ..Limits::default()
        };
        let pins = PinDir::new("bench")?;
        let mut dp = Datapath::load(pins.path(), &limits)?;
        let mut maps = Maps::take(&mut dp.ebpf)?;
        let ct = take_map(&mut dp, MAP_CT)?;
        let ct_new = take_map(&mut dp, MAP_CT_NEW)?;
        let revnat = take_map(&mut dp, MAP_REVNAT)?;
        let counters = take_map(&mut dp, MAP_COUNTERS)?;
        maps.config.set(
            0,
            Config {
                snat_addr_be: u32::from_ne_bytes(NODE),
                snat_port_min: SNAT_MIN,
                snat_port_max: SNAT_MAX,
                ..Config::DEFAULT
            },
            0,
        )?;
        let mut programmer = Programmer::new(Settings {
            min_m,
            drain: Duration::from_secs(30),
            max_services: limits.max_services,
            max_frontends: limits.max_frontends,
            max_backends: limits.max_backends,
            arena: limits.maglev_arena,
        });
        let desired = desired(services, args.backends, true);
        let t0 = Instant::now();
        let stats = programmer.apply(&desired, &mut maps, Instant::now())?;
        let apply_ms = ms(t0.elapsed());
        Ok(Self {
            services,
            backends: args.backends,
            dp,
            maps,
            programmer,
            ct,
            ct_new,
            revnat,
            counters,
            apply_row: ApplyRow {
                services,
                backends_per_service: args.backends,
                table_m: m,
                slots_written: stats.slots_written,
                apply_ms,
            },
            _pins: pins,
        })
    }

    /// Re-programs the same services with every (non-loop) backend local or remote.
    fn set_backends_local(&mut self, local: bool) -> Result<()> {
        let desired = desired(self.services, self.backends, local);
        self.programmer
            .apply(&desired, &mut self.maps, Instant::now())?;
        Ok(())
    }

    /// Empties conntrack (confirmed and unconfirmed) and reverse NAT, so the next packets
    /// start new flows.
    fn clear_flows(&mut self) -> Result<()> {
        for ct in [&mut self.ct, &mut self.ct_new] {
            let keys: Vec<FlowKey> = ct.keys().collect::<Result<_, _>>()?;
            for k in keys {
                ct.remove(&k)?;
            }
        }
        let keys: Vec<FlowKey> = self.revnat.keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.revnat.remove(&k)?;
        }
        Ok(())
    }

    /// Moves every unconfirmed flow to `XLB_CT`, where the datapath puts a flow once both
    /// directions were seen (a handshake BPF_PROG_TEST_RUN cannot play): the
    /// "established" packets then take the path of a real connection's data.
    fn confirm_flows(&mut self) -> Result<()> {
        let entries: Vec<(FlowKey, CtEntry)> = self.ct_new.iter().collect::<Result<_, _>>()?;
        for (k, mut e) in entries {
            e.flags |= CT_SEEN_REPLY;
            self.ct.insert(k, e, 0)?;
            self.ct_new.remove(&k)?;
        }
        Ok(())
    }

    /// Datapath counters summed over CPUs.
    fn counters(&self) -> Result<Vec<u64>> {
        (0..COUNTER_COUNT)
            .map(|i| Ok(self.counters.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// One BPF_PROG_TEST_RUN of `prog` on `pkt`, arriving on `ifindex`: (action, per-run time).
    fn run(&mut self, prog: &str, pkt: &[u8], ifindex: u32, repeat: u32) -> Result<(u32, u64)> {
        // xdp_md as BPF_PROG_TEST_RUN wants it: data 0, data_end = len, ingress ifindex.
        let mut ctx = [0u32; 6];
        ctx[1] = pkt.len() as u32;
        ctx[3] = ifindex;
        let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let opts = TestRunOptions {
            data_in: Some(pkt),
            ctx_in: Some(&ctx_bytes),
            repeat,
            ..Default::default()
        };
        let r = self
            .dp
            .xdp(prog)?
            .test_run(opts)
            .with_context(|| format!("test_run {prog}"))?;
        Ok((r.return_value, r.duration.as_nanos() as u64))
    }
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    dp: &mut Datapath,
    name: &str,
) -> Result<T> {
    let map = dp
        .ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    Ok(T::try_from(map)?)
}

fn addr(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v)
}

fn frontend_of(svc: u32) -> (Ipv4Addr, u16) {
    (
        addr(FRONTEND_BASE + svc / FE_PORTS),
        FE_PORT_MIN + (svc % FE_PORTS) as u16,
    )
}

/// `services` NodePort services with `backends` backends each (all local or all remote),
/// plus the self-mapped loop service; built from translate's types directly.
fn desired(services: u32, backends: u32, local: bool) -> Desired {
    let port = |name: String, fe: (Ipv4Addr, u16), bes: Vec<BackendSpec>| SvcPort {
        id: SvcPortId {
            namespace: "bench".into(),
            name,
            port_name: String::new(),
            proto: Proto::Tcp,
            scope: Scope::Cluster,
        },
        port: fe.1,
        svc_type: ServiceType::NodePort,
        frontends: vec![FrontendSpec {
            addr: fe.0,
            port: fe.1,
            kind: FrontendKind::NodePort,
        }],
        backends: bes,
        draining: vec![],
        affinity_timeout: None,
        source_ranges: vec![],
        drop_if_empty: false,
        inside_frontends: vec![],
    };
    let mut ports: Vec<SvcPort> = (0..services)
        .map(|i| {
            let bes = (0..backends)
                .map(|j| BackendSpec {
                    addr: addr(BACKEND_BASE + i * backends + j),
                    port: BACKEND_PORT,
                    local,
                })
                .collect();
            port(format!("svc-{i:06}"), frontend_of(i), bes)
        })
        .collect();
    let self_fe = (Ipv4Addr::from(NODE), LOOP_PORT);
    ports.push(port(
        "loop".into(),
        self_fe,
        vec![BackendSpec {
            addr: self_fe.0,
            port: self_fe.1,
            local: true,
        }],
    ));
    ports.sort_by(|a, b| a.id.cmp(&b.id));
    Desired {
        ports: ports.into_iter().map(std::sync::Arc::new).collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- packets

/// Ethernet + IPv4 + TCP SYN with valid checksums, addressed to the node's MAC.
fn tcp_syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp(src, sport, dst, dport, 0x02)
}

/// A segment of an established connection (ACK).
fn tcp_ack(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp(src, sport, dst, dport, 0x10)
}

/// A TCP segment with `flags` (header byte 13).
fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(54);
    f.extend(MAC_NODE);
    f.extend(MAC_CLIENT);
    f.extend([0x08, 0x00]);
    // IPv4: version/IHL, TOS, total length 40, id, DF, TTL 64, TCP, checksum (later).
    f.extend([0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    f.extend(src.octets());
    f.extend(dst.octets());
    // TCP: ports, seq 1000, ack 0, data offset 5, SYN, window 64240, checksum, urgent.
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend(1000u32.to_be_bytes());
    f.extend(0u32.to_be_bytes());
    f.extend([0x50, flags]);
    f.extend(64240u16.to_be_bytes());
    f.extend([0, 0, 0, 0]);
    let c = csum::checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_ne_bytes());
    let (s, d) = (
        u32::from_ne_bytes(src.octets()),
        u32::from_ne_bytes(dst.octets()),
    );
    let c = csum::checksum(&f[34..], csum::pseudo_header(s, d, PROTO_TCP, 20));
    f[50..52].copy_from_slice(&c.to_ne_bytes());
    f
}

/// The first packet of `flows` distinct client flows spread over `services` services.
/// The first packet (SYN) of each flow, and a later one (ACK).
fn flow_packets(services: u32, flows: u32) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    (0..flows)
        .map(|k| {
            let svc = ((u64::from(k) * FLOW_STRIDE) % u64::from(services)) as u32;
            let (fa, fp) = frontend_of(svc);
            let sport = CLIENT_PORT_MIN + (k % CLIENT_PORTS) as u16;
            let client = addr(CLIENT_BASE + k);
            (
                tcp_syn(client, sport, fa, fp),
                tcp_ack(client, sport, fa, fp),
            )
        })
        .unzip()
}

// ---------------------------------------------------------------- measurements

fn counter_delta(before: &[u64], after: &[u64], c: Counter) -> u64 {
    after[c as usize] - before[c as usize]
}

/// Runs every packet once (repeat = 1) through `prog`; returns the mean per-packet time and
/// fails if any run returned something other than `want`.
fn pass(world: &mut World, prog: &str, pkts: &[Vec<u8>], ifindex: u32, want: u32) -> Result<f64> {
    let mut total = 0u64;
    for p in pkts {
        let (rc, ns) = world.run(prog, p, ifindex, 1)?;
        ensure!(rc == want, "{prog}: action {rc}, expected {want}");
        total += ns;
    }
    Ok(total as f64 / pkts.len() as f64)
}

/// Medians over the repeats of (new flow, established, floor) per packet, for one backend
/// placement. Each repeat starts from an empty conntrack.
fn measure_flows(world: &mut World, ifindex: u32, local: bool, args: &Args) -> Result<[f64; 3]> {
    let (syns, acks) = flow_packets(world.services, args.flows);
    let (want, fwd) = if local {
        (XDP_PASS, Counter::FwdLocal)
    } else {
        (XDP_TX, Counter::FwdRemote)
    };
    let n = u64::from(args.flows);
    let (mut new, mut est, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        world.clear_flows()?;
        let c0 = world.counters()?;
        new.push(pass(world, PROG_XDP, &syns, ifindex, want)?);
        world.confirm_flows()?;
        let c1 = world.counters()?;
        est.push(pass(world, PROG_XDP, &acks, ifindex, want)?);
        let c2 = world.counters()?;
        floor.push(pass(world, PROG_XDP_PASS, &acks, ifindex, XDP_PASS)?);
        ensure!(
            counter_delta(&c0, &c1, Counter::CtMiss) == n && counter_delta(&c0, &c1, fwd) == n,
            "new-flow pass did not take the conntrack-miss path for every packet"
        );
        ensure!(
            counter_delta(&c1, &c2, Counter::CtHit) == n && counter_delta(&c1, &c2, fwd) == n,
            "established pass did not hit conntrack for every packet"
        );
    }
    Ok([median(new), median(est), median(floor)])
}

/// Established flow to the self-mapped local backend in the kernel's repeat loop:
/// medians of (ours, floor) per packet.
fn measure_loop(world: &mut World, ifindex: u32, args: &Args) -> Result<[f64; 2]> {
    let node = Ipv4Addr::from(NODE);
    let syn = tcp_syn(addr(CLIENT_BASE), CLIENT_PORT_MIN, node, LOOP_PORT);
    let pkt = tcp_ack(addr(CLIENT_BASE), CLIENT_PORT_MIN, node, LOOP_PORT);
    // Establish the flow, then every repetition is a conntrack hit.
    let (rc, _) = world.run(PROG_XDP, &syn, ifindex, 1)?;
    ensure!(rc == XDP_PASS, "loop flow: action {rc}");
    world.confirm_flows()?;
    let n = u64::from(args.loop_repeat);
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..args.repeats {
        let c0 = world.counters()?;
        let (rc, ns) = world.run(PROG_XDP, &pkt, ifindex, args.loop_repeat)?;
        let c1 = world.counters()?;
        ensure!(rc == XDP_PASS, "loop: action {rc}");
        ensure!(
            counter_delta(&c0, &c1, Counter::CtHit) == n
                && counter_delta(&c0, &c1, Counter::FwdLocal) == n,
            "loop: not every repetition was an established local flow"
        );
        ours.push(ns as f64);
        let (rc, ns) = world.run(PROG_XDP_PASS, &pkt, ifindex, args.loop_repeat)?;
        ensure!(rc == XDP_PASS, "floor loop: action {rc}");
        floor.push(ns as f64);
    }
    Ok([median(ours), median(floor)])
}

fn row(scenario: &str, services: u32, method: String, ours: f64, floor: f64) -> PacketRow {
    PacketRow {
        scenario: scenario.to_owned(),
        services,
        method,
        ours_ns: ours,
        floor_ns: floor,
        ratio: ours / floor.max(0.01),
        net_ns: ours - floor,
    }
}

/// All packet figures for one world; runs inside the bench namespace (FIB lookups).
fn measure_world(world: &mut World, args: &Args) -> Result<Vec<PacketRow>> {
    let ifindex = nix::net::if_::if_nametoindex("up0").context("up0 in the bench netns")?;
    let n = world.services;
    let per_pkt = format!("repeat=1 x {} pkts", args.flows);
    let mut rows = Vec::new();

    let [ours, floor] = measure_loop(world, ifindex, args)?;
    rows.push(row(
        "established, local (in-kernel loop)",
        n,
        format!("repeat={}", args.loop_repeat),
        ours,
        floor,
    ));
    // The world starts with local backends; the remote variant re-programs only backends.
    for local in [true, false] {
        if !local {
            world.set_backends_local(false)?;
        }
        let [new, est, floor] = measure_flows(world, ifindex, local, args)?;
        let (a, b) = if local {
            ("new flow, local (DNAT, XDP_PASS)", "established, local")
        } else {
            (
                "new flow, remote (DNAT+SNAT+FIB, XDP_TX)",
                "established, remote",
            )
        };
        rows.push(row(a, n, per_pkt.clone(), new, floor));
        rows.push(row(b, n, per_pkt.clone(), est, floor));
    }
    world.clear_flows()?;
    Ok(rows)
}

/// Median time to build one Maglev table of `m` slots over `backends` backends.
pub fn bench_maglev(m: u32, backends: u32, repeats: usize) -> MaglevRow {
    let names: Vec<String> = (0..backends)
        .map(|k| format!("{}:{BACKEND_PORT}", addr(BACKEND_BASE + k)))
        .collect();
    let times = (0..repeats)
        .map(|_| {
            let t0 = Instant::now();
            let table = maglev::build_table(&names, m);
            let t = t0.elapsed();
            assert_eq!(table.len(), m as usize);
            ms(t)
        })
        .collect();
    MaglevRow {
        m,
        backends,
        build_ms: median(times),
    }
}

/// The XDP part: per-packet figures and apply times for every `--services` size.
pub fn run(args: &Args) -> Result<(Vec<PacketRow>, Vec<ApplyRow>)> {
    let ns = Netns::new("bench")?;
    setup_netns(&ns)?;
    let mut packets = Vec::new();
    let mut apply = Vec::new();
    for &n in &args.services {
        ensure!(n > 0, "--services entries must be at least 1");
        eprintln!("▶ XDP, {n} services: loading and programming…");
        let mut world = World::new(n, args)?;
        apply.push(world.apply_row.clone());
        eprintln!(
            "  applied in {:.1} ms; measuring packets…",
            world.apply_row.apply_ms
        );
        packets.extend(in_netns(ns.name(), || measure_world(&mut world, args))?);
    }
    Ok((packets, apply))
}

/// What removing one backend does to a Maglev table, and how evenly slots are spread.
#[derive(Serialize, Deserialize, Clone)]
pub struct MaglevDisruption {
    pub m: u32,
    pub backends: u32,
    /// Slots whose backend changed when backend `backends / 2` was removed.
    pub moved_slots: u64,
    /// moved_slots / (M / N): 1.0 means only the removed backend's share moved.
    pub moved_vs_ideal: f64,
    pub max_slots: u64,
    pub min_slots: u64,
}

pub fn maglev_disruption(m: u32, backends: u32) -> MaglevDisruption {
    let names: Vec<String> = (0..backends)
        .map(|k| format!("{}:{BACKEND_PORT}", addr(BACKEND_BASE + k)))
        .collect();
    let before = maglev::build_table(&names, m);
    let mut counts = vec![0u64; names.len()];
    for &b in &before {
        counts[b as usize] += 1;
    }
    let gone = (backends / 2) as usize;
    let mut fewer = names.clone();
    fewer.remove(gone);
    let after = maglev::build_table(&fewer, m);
    // Indices of `after` point into `fewer`; compare names.
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| names[**b as usize] != fewer[**a as usize])
        .count() as u64;
    MaglevDisruption {
        m,
        backends,
        moved_slots: moved,
        moved_vs_ideal: moved as f64 / (f64::from(m) / f64::from(backends)),
        max_slots: counts.iter().copied().max().unwrap_or(0),
        min_slots: counts.iter().copied().min().unwrap_or(0),
    }
}
