//! Packet tables for the XDP and tc programs, run in the real kernel through
//! BPF_PROG_TEST_RUN (katran style): each case is {description, input packet, expected
//! output packet, expected action}. One fixed world of services is programmed by the agent's
//! own YAML -> translate -> programmer path; FIB and neighbour lookups resolve inside a
//! throwaway network namespace with static entries, so every expected MAC is known.
//!
//! One module per feature. A case that stands alone is its own test, named after it, so a
//! failing case names itself and the others still run; a sequence whose packets depend on
//! earlier ones (conntrack, draining, the neighbour that goes away) is one test. Every test
//! loads the programs into a fresh namespace of its own (`run_table`).
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, PacketBuilder, TcpHeader, icmpv4::DestUnreachableHeader,
};
use lb_agent::{
    dataplane::{
        datapath::{Datapath, Limits},
        programmer::{Maps, Programmer, Settings},
    },
    model::translate::{self, NodeContext},
    serve::debug::EventText,
    source::yaml as k8s,
};
use lb_common::*;
use lb_tests::{Netns, PinDir, in_netns, privileged};

/// A case that stands alone, as its own test named after it: `packet_test!(name, step);`.
macro_rules! packet_test {
    ($name:ident, $step:expr) => {
        #[test]
        fn $name() {
            let Some(_guard) = privileged() else {
                return;
            };
            run_table(vec![$step], SNAT_PORT);
        }
    };
}

mod arp;
mod clusterip;
mod conntrack;
mod debug_events;
mod fragments;
mod fuzz;
mod nodeport;
mod not_ours;
mod parity;
mod reject;
mod remote;
mod tc_uplink;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: [u8; 4] = [172, 30, 0, 2];

const CLIENT: [u8; 4] = [172, 30, 0, 100];
const LB_IP: [u8; 4] = [172, 30, 255, 200];
/// LoadBalancer IP of a service with loadBalancerSourceRanges 172.30.0.0/24.
const LB_IP_RANGED: [u8; 4] = [172, 30, 255, 201];
const EXT_IP: [u8; 4] = [172, 30, 9, 9];
const CLUSTER_IP: [u8; 4] = [10, 96, 0, 20];
const POD_LOCAL: [u8; 4] = [10, 250, 1, 5];
const POD_LOCAL_DNS: [u8; 4] = [10, 250, 1, 6];
const POD_REMOTE: [u8; 4] = [10, 250, 2, 7];
const POD_REMOTE_DNS: [u8; 4] = [10, 250, 2, 8];
const CT_A: [u8; 4] = [10, 250, 1, 20];
const CT_B: [u8; 4] = [10, 250, 1, 21];

const MAC_NODE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const MAC_NODE_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const MAC_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const MAC_POD_IF: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_POD_LOCAL: [u8; 6] = [0x02, 0, 0, 0, 0, 0x55];
const MAC_POD_CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x59];
const POD_CLIENT: [u8; 4] = [10, 250, 1, 9];
const CLUSTER_IP_REMOTE: [u8; 4] = [10, 96, 0, 11];
const CLUSTER_IP_EMPTY: [u8; 4] = [10, 96, 0, 14];
const CLUSTER_IP_ITP_LOCAL: [u8; 4] = [10, 96, 0, 21];
const TC_ACT_SHOT: u32 = 2;
const SNAT_PORT: u16 = 61000;

fn world(ct_backend: [u8; 4]) -> String {
    let ip = |a: [u8; 4]| Ipv4Addr::from(a).to_string();
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: local-web, namespace: t}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}}]
status:
  loadBalancer: {{ingress: [{{ip: {lb}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: local-web-1, namespace: t, labels: {{kubernetes.io/service-name: local-web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{pl}"], nodeName: node-a, conditions: {{ready: true}}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: remote-web, namespace: t}}
spec:
  type: NodePort
  clusterIP: 10.96.0.11
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30081, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: remote-web-1, namespace: t, labels: {{kubernetes.io/service-name: remote-web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{pr}"], nodeName: node-b}}]
---
apiVersion: v1
kind: Service
metadata: {{name: dns-local, namespace: t}}
spec:
  type: NodePort
  clusterIP: 10.96.0.12
  externalIPs: ["{ext}"]
  ports: [{{name: dns, port: 53, targetPort: 5353, nodePort: 30053, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-local-1, namespace: t, labels: {{kubernetes.io/service-name: dns-local}}}}
addressType: IPv4
ports: [{{name: dns, port: 5353, protocol: UDP}}]
endpoints: [{{addresses: ["{pld}"], nodeName: node-a}}]
---
apiVersion: v1
kind: Service
metadata: {{name: dns-remote, namespace: t}}
spec:
  type: NodePort
  clusterIP: 10.96.0.13
  ports: [{{name: dns, port: 53, targetPort: 5353, nodePort: 30054, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-remote-1, namespace: t, labels: {{kubernetes.io/service-name: dns-remote}}}}
addressType: IPv4
ports: [{{name: dns, port: 5353, protocol: UDP}}]
endpoints: [{{addresses: ["{prd}"], nodeName: node-b}}]
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: t}}
spec:
  type: NodePort
  clusterIP: 10.96.0.14
  ports:
  - {{name: tcp, port: 80, nodePort: 30090, protocol: TCP}}
  - {{name: udp, port: 53, nodePort: 30091, protocol: UDP}}
---
apiVersion: v1
kind: Service
metadata: {{name: internal, namespace: t}}
spec:
  clusterIP: {cip}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: internal-1, namespace: t, labels: {{kubernetes.io/service-name: internal}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{pl}"], nodeName: node-a}}]
---
apiVersion: v1
kind: Service
metadata: {{name: ct, namespace: t}}
spec:
  type: NodePort
  clusterIP: 10.96.0.15
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30100, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ct-1, namespace: t, labels: {{kubernetes.io/service-name: ct}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{ctb}"], nodeName: node-a}}]
---
apiVersion: v1
kind: Service
metadata: {{name: itp-local, namespace: t}}
spec:
  clusterIP: 10.96.0.21
  internalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: itp-local-1, namespace: t, labels: {{kubernetes.io/service-name: itp-local}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{pr}"], nodeName: node-b}}]
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {{name: kubernetes}}
spec: {{cidrs: [10.96.0.0/16]}}
---
apiVersion: v1
kind: Service
metadata: {{name: ranged, namespace: t}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.30
  loadBalancerSourceRanges: [172.30.0.0/24]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30120, protocol: TCP}}]
status:
  loadBalancer: {{ingress: [{{ip: {lbr}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ranged-1, namespace: t, labels: {{kubernetes.io/service-name: ranged}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{pl}"], nodeName: node-a}}]
---
apiVersion: v1
kind: Service
metadata: {{name: etp-local, namespace: t}}
spec:
  type: NodePort
  clusterIP: 10.96.0.31
  externalTrafficPolicy: Local
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30110, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: etp-local-1, namespace: t, labels: {{kubernetes.io/service-name: etp-local}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: ["{pr}"], nodeName: node-b}}]
"#,
        lbr = ip(LB_IP_RANGED),
        lb = ip(LB_IP),
        ext = ip(EXT_IP),
        cip = ip(CLUSTER_IP),
        pl = ip(POD_LOCAL),
        pr = ip(POD_REMOTE),
        pld = ip(POD_LOCAL_DNS),
        prd = ip(POD_REMOTE_DNS),
        ctb = ip(ct_backend),
    )
}

// ---------------------------------------------------------------- packet building

#[derive(Clone, Copy)]
enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: Option<u32>,
        syn: bool,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
}

#[derive(Clone, Copy)]
struct Pkt {
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    l4: L4,
}

const PAYLOAD: &[u8] = b"GET / HTTP/1.0\r\n\r\n";

fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, proto: IpNumber) -> Ipv4Header {
    let mut h = Ipv4Header::new(0, ttl, proto, src, dst).unwrap();
    h.identification = 0x1234;
    h.dont_fragment = true;
    h
}

impl Pkt {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let proto = match self.l4 {
            L4::Tcp { .. } => IpNumber::TCP,
            L4::Udp { .. } => IpNumber::UDP,
        };
        let b = PacketBuilder::ethernet2(self.smac, self.dmac).ip(IpHeaders::Ipv4(
            ipv4(self.src, self.dst, self.ttl, proto),
            Default::default(),
        ));
        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                seq,
                ack,
                syn,
            } => {
                let mut t = TcpHeader::new(sport, dport, seq, 64240);
                t.syn = syn;
                if let Some(a) = ack {
                    t.ack = true;
                    t.acknowledgment_number = a;
                }
                b.tcp_header(t).write(&mut out, PAYLOAD).unwrap();
            }
            L4::Udp { sport, dport } => b.udp(sport, dport).write(&mut out, PAYLOAD).unwrap(),
        }
        out
    }
    fn with(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
    fn set_src(mut self, a: [u8; 4], p: u16) -> Self {
        self.src = a;
        match &mut self.l4 {
            L4::Tcp { sport, .. } | L4::Udp { sport, .. } => *sport = p,
        }
        self
    }
    fn set_dst(mut self, a: [u8; 4], p: u16) -> Self {
        self.dst = a;
        match &mut self.l4 {
            L4::Tcp { dport, .. } | L4::Udp { dport, .. } => *dport = p,
        }
        self
    }
    /// As forwarded by us: MACs from the neighbour table, TTL decremented.
    fn routed(self, smac: [u8; 6], dmac: [u8; 6]) -> Self {
        self.with(|p| {
            p.smac = smac;
            p.dmac = dmac;
            p.ttl -= 1;
        })
    }
}

fn syn(sport: u16, dst: [u8; 4], dport: u16) -> Pkt {
    Pkt {
        smac: MAC_CLIENT,
        dmac: MAC_NODE,
        src: CLIENT,
        dst,
        ttl: 64,
        l4: L4::Tcp {
            sport,
            dport,
            seq: 1000,
            ack: None,
            syn: true,
        },
    }
}

fn ack(sport: u16, dst: [u8; 4], dport: u16) -> Pkt {
    syn(sport, dst, dport).with(|p| {
        p.l4 = L4::Tcp {
            sport,
            dport,
            seq: 1001,
            ack: Some(5000),
            syn: false,
        }
    })
}

fn udp(sport: u16, dst: [u8; 4], dport: u16) -> Pkt {
    Pkt {
        l4: L4::Udp { sport, dport },
        ..syn(sport, dst, dport)
    }
}

/// The RST our program must send for `p` (RFC 9293: SYN -> RST|ACK, ACK -> RST seq=ack).
fn rst_for(p: &Pkt) -> Vec<u8> {
    let L4::Tcp {
        sport,
        dport,
        seq,
        ack,
        syn,
    } = p.l4
    else {
        unreachable!()
    };
    let mut t = TcpHeader::new(dport, sport, 0, 0);
    t.rst = true;
    match ack {
        Some(a) => t.sequence_number = a,
        None => {
            t.ack = true;
            t.acknowledgment_number = seq + PAYLOAD.len() as u32 + u32::from(syn);
        }
    }
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, p.dst, p.src).unwrap();
    ip.identification = 0;
    ip.dont_fragment = false;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(p.dmac, p.smac)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp_header(t)
        .write(&mut out, &[])
        .unwrap();
    out
}

fn icmp_unreachable_for(p: &Pkt) -> Vec<u8> {
    let input = p.bytes();
    let mut ip = Ipv4Header::new(0, 64, IpNumber::ICMP, p.dst, p.src).unwrap();
    ip.identification = 0;
    ip.dont_fragment = false;
    let mut out = Vec::new();
    PacketBuilder::ethernet2(p.dmac, p.smac)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, &input[14..42])
        .unwrap();
    out
}

/// A frame's TCP checksum recomputed in place (after a change to its header).
fn recompute_tcp(f: &mut [u8]) -> u16 {
    f[50..52].copy_from_slice(&[0, 0]);
    let src = u32::from_ne_bytes(f[26..30].try_into().unwrap());
    let dst = u32::from_ne_bytes(f[30..34].try_into().unwrap());
    let l4len = f.len() - 34;
    let c = csum::checksum(
        &f[34..],
        csum::pseudo_header(src, dst, PROTO_TCP, l4len as u16),
    );
    f[50..52].copy_from_slice(&c.to_ne_bytes());
    c
}

/// The remote web pod's segment to the node's SNAT port.
fn from_remote(syn: bool) -> Pkt {
    Pkt {
        smac: MAC_NODE_B,
        dmac: MAC_NODE,
        src: POD_REMOTE,
        dst: NODE,
        ttl: 63,
        l4: L4::Tcp {
            sport: 8080,
            dport: SNAT_PORT,
            seq: 5000,
            ack: Some(1001),
            syn,
        },
    }
}

/// `p` as the client of port `cport` gets it back from the NodePort 30081.
fn to_client(p: Pkt, cport: u16) -> Pkt {
    p.set_src(NODE, 30081)
        .set_dst(CLIENT, cport)
        .routed(MAC_NODE, MAC_CLIENT)
}

/// `p` (client -> NodePort 30081) as sent to the remote pod through the SNAT port.
fn to_remote(p: Pkt) -> Pkt {
    p.set_dst(POD_REMOTE, 8080)
        .set_src(NODE, SNAT_PORT)
        .routed(MAC_NODE, MAC_NODE_B)
}

/// Every IPv4 output must carry valid IP and L4 checksums.
fn assert_checksums(desc: &str, frame: &[u8]) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = ((frame[14] & 0x0f) as usize) * 4;
    if frame.len() < 14 + ihl {
        return;
    }
    assert_eq!(
        csum::checksum(&frame[14..14 + ihl], 0),
        0,
        "{desc}: IPv4 header checksum"
    );
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    if frame.len() < 14 + tot || frame[20..22] != [0x40, 0] && frame[20..22] != [0, 0] {
        return; // truncated or fragment: nothing to verify
    }
    let l4 = &frame[14 + ihl..14 + tot];
    let src = u32::from_ne_bytes(frame[26..30].try_into().unwrap());
    let dst = u32::from_ne_bytes(frame[30..34].try_into().unwrap());
    match frame[23] {
        PROTO_TCP => assert_eq!(
            csum::checksum(
                l4,
                csum::pseudo_header(src, dst, PROTO_TCP, l4.len() as u16)
            ),
            0,
            "{desc}: TCP checksum"
        ),
        PROTO_UDP if l4.len() >= 8 && l4[6..8] != [0, 0] => assert_eq!(
            csum::checksum(
                l4,
                csum::pseudo_header(src, dst, PROTO_UDP, l4.len() as u16)
            ),
            0,
            "{desc}: UDP checksum"
        ),
        PROTO_ICMP => assert_eq!(csum::checksum(l4, 0), 0, "{desc}: ICMP checksum"),
        _ => {}
    }
}

// ---------------------------------------------------------------- steps

enum Prog {
    Xdp,
    TcPod,
    TcUplink,
}

enum Step {
    Case {
        desc: &'static str,
        prog: Prog,
        input: Vec<u8>,
        output: Option<Vec<u8>>,
        action: u32,
    },
    /// A command in the test namespace (e.g. to remove a neighbour entry).
    Exec(&'static str),
    /// Re-program the world (agent path) as if time advanced by `after`.
    Apply {
        ct_backend: [u8; 4],
        after: Duration,
    },
    /// Look at or change the maps between packets (conntrack state, simulated evictions,
    /// the passing of time).
    Maps(&'static str, Box<dyn FnOnce(&mut MapsView) + Send>),
    /// The debug events (aya-log) the programs sent since the last such step.
    Events(&'static str, EventCheck),
    /// Free use of the loaded programs (`test_run`) and maps, with the uplink's ifindex: the
    /// fuzzer.
    Run(RunFn),
}

/// What a `Step::Run` does with the loaded programs and the uplink's ifindex.
type RunFn = Box<dyn FnOnce(&mut Datapath, u32) + Send>;

/// What a `Step::Events` asserts about the events it collected.
type EventCheck = Box<dyn FnOnce(&[String]) + Send>;

/// Collects what the programs log, for `Step::Events`.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

/// The maps a `Step::Maps` sees: the agent's handles and the conntrack maps.
struct MapsView<'a> {
    agent: &'a mut Maps,
    ct: aya::maps::HashMap<&'a mut aya::maps::MapData, FlowKey, CtEntry>,
    ct_new: aya::maps::HashMap<&'a mut aya::maps::MapData, FlowKey, CtEntry>,
    revnat: aya::maps::HashMap<&'a mut aya::maps::MapData, FlowKey, RevNat>,
    /// Addresses this node announces (ARP).
    arp: aya::maps::HashMap<&'a mut aya::maps::MapData, u32, u32>,
    lease: aya::maps::Array<&'a mut aya::maps::MapData, u32>,
}

fn case(desc: &'static str, input: Vec<u8>, output: Vec<u8>, action: u32) -> Step {
    Step::Case {
        desc,
        prog: Prog::Xdp,
        input,
        output: Some(output),
        action,
    }
}

fn untouched(desc: &'static str, input: Vec<u8>) -> Step {
    Step::Case {
        desc,
        prog: Prog::Xdp,
        input,
        output: None,
        action: XDP_PASS,
    }
}

// ---------------------------------------------------------------- runner

fn setup_netns(ns: &Netns) {
    let ip = |args: &str| ns.exec(&format!("ip {args}"));
    ip("link add up0 type veth peer name up1");
    ip("link set up0 address 02:00:00:00:00:02");
    ip("addr add 172.30.0.2/16 dev up0");
    ip("link set up0 up");
    ip("link set up1 up");
    ip("link set lo up");
    ip("neigh replace 172.30.0.100 lladdr 02:00:00:00:00:64 dev up0 nud permanent");
    ip("neigh replace 172.30.0.3 lladdr 02:00:00:00:00:03 dev up0 nud permanent");
    ip("route add 10.250.2.0/24 via 172.30.0.3 dev up0");
    // Local pods sit behind one pod-facing interface here; its routes and neighbours are
    // static so the expected MACs are known.
    ip("link add pod0 type veth peer name pod0p");
    ip("link set pod0 address 02:00:00:00:00:0a");
    ip("link set pod0 up");
    ip("link set pod0p up");
    ip("route add 10.250.1.0/24 dev pod0");
    ip("neigh replace 10.250.1.5 lladdr 02:00:00:00:00:55 dev pod0 nud permanent");
    ip("neigh replace 10.250.1.9 lladdr 02:00:00:00:00:59 dev pod0 nud permanent");
    ns.exec("sysctl -qw net.ipv4.ip_forward=1");
}

fn program(programmer: &mut Programmer, maps: &mut Maps, ct_backend: [u8; 4], now: Instant) {
    let objs = k8s::parse_objects(&world(ct_backend)).expect("world parses");
    let node = NodeContext {
        node_name: "node-a".into(),
        node_addrs: vec![NODE.into()],
        ..Default::default()
    };
    let desired = translate::translate(&objs, &node);
    programmer.apply(&desired, maps, now).expect("apply");
}

/// Loads the programs in a throwaway namespace, programs the world and runs `steps`.
/// `snat_port_max`: the SNAT range is `SNAT_PORT..=snat_port_max`.
fn run_table(steps: Vec<Step>, snat_port_max: u16) {
    let ns = Netns::new("pkt").expect("netns");
    setup_netns(&ns);
    let pins = PinDir::new("pkt").expect("pin dir");
    let mut dp = Datapath::load(pins.path(), &Limits::default()).expect("load");
    let mut maps = Maps::take(&mut dp.ebpf).expect("maps");
    let captured = Captured::default();
    let mut events =
        aya_log::EbpfLogger::init_with_logger(&mut dp.ebpf, EventText(captured.clone()))
            .expect("aya-log");
    maps.config
        .set(
            0,
            Config {
                snat_addr_be: u32::from_ne_bytes(NODE),
                snat_port_min: SNAT_PORT,
                snat_port_max,
                ..Config::DEFAULT
            },
            0,
        )
        .unwrap();
    let mut programmer = Programmer::new(Settings {
        min_m: 251,
        drain: Duration::from_secs(30),
        max_services: DEFAULT_MAX_SERVICES,
        max_frontends: DEFAULT_MAX_FRONTENDS,
        max_backends: DEFAULT_MAX_BACKENDS,
        arena: DEFAULT_MAGLEV_ARENA,
    });
    let t0 = Instant::now();
    program(&mut programmer, &mut maps, CT_A, t0);

    in_netns(ns.name(), || {
        let ifindex = nix::net::if_::if_nametoindex("up0").expect("up0");
        for step in steps {
            match step {
                Step::Exec(cmd) => {
                    ns.exec(cmd);
                }
                Step::Apply { ct_backend, after } => {
                    program(&mut programmer, &mut maps, ct_backend, t0 + after)
                }
                Step::Maps(what, f) => {
                    let [ct, ct_new, revnat, arp, lease] = dp
                        .ebpf
                        .maps_disjoint_mut([
                            MAP_CT,
                            MAP_CT_NEW,
                            MAP_REVNAT,
                            MAP_ARP,
                            MAP_ANNOUNCE_LEASE,
                        ])
                        .map(|m| m.unwrap_or_else(|| panic!("{what}: conntrack maps")));
                    let mut view = MapsView {
                        agent: &mut maps,
                        ct: aya::maps::HashMap::try_from(ct).unwrap(),
                        ct_new: aya::maps::HashMap::try_from(ct_new).unwrap(),
                        revnat: aya::maps::HashMap::try_from(revnat).unwrap(),
                        arp: aya::maps::HashMap::try_from(arp).unwrap(),
                        lease: aya::maps::Array::try_from(lease).unwrap(),
                    };
                    f(&mut view);
                }
                Step::Run(f) => f(&mut dp, ifindex),
                Step::Events(what, f) => {
                    events.flush();
                    let got = std::mem::take(&mut *captured.0.lock().unwrap());
                    eprintln!("{what}: {got:?}");
                    f(&got);
                }
                Step::Case {
                    desc,
                    prog,
                    input,
                    output,
                    action,
                } => {
                    let (rc, out) = test_run(&mut dp, &prog, &input, ifindex)
                        .unwrap_or_else(|e| panic!("{desc}: test_run: {e}"));
                    let got = &out[..];
                    assert_eq!(rc, action, "{desc}: action");
                    let want = output.as_deref().unwrap_or(&input);
                    if action != XDP_DROP {
                        assert_eq!(hex(got), hex(want), "{desc}: output packet");
                        // Untouched inputs may be deliberately malformed; translated and
                        // generated packets must be valid.
                        if output.is_some() {
                            assert_checksums(desc, got);
                        }
                    }
                }
            }
        }
    });
}

/// Runs `prog` once over `input` through BPF_PROG_TEST_RUN, as it would run on the uplink
/// (ifindex `ifindex`) or a pod's interface; returns the action and the packet after it.
fn test_run(
    dp: &mut Datapath,
    prog: &Prog,
    input: &[u8],
    ifindex: u32,
) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
    let mut out = vec![0u8; input.len() + 256];
    let (rc, size) = match prog {
        Prog::Xdp => {
            // xdp_md as BPF_PROG_TEST_RUN wants it: data 0, data_end = len, ingress = up0.
            let mut ctx = [0u32; 6];
            ctx[1] = input.len() as u32;
            ctx[3] = ifindex;
            let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let p: &mut Xdp = dp.ebpf.program_mut(PROG_XDP).unwrap().try_into().unwrap();
            let opts = TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_bytes),
                ..Default::default()
            };
            let r = p.test_run(opts)?;
            (r.return_value, r.data_size_out as usize)
        }
        Prog::TcPod | Prog::TcUplink => {
            let name = if matches!(prog, Prog::TcPod) {
                PROG_TC_POD
            } else {
                PROG_TC_UPLINK
            };
            // The uplink's program sees frames arriving on up0 (its MAC decides the frame's
            // pkt_type); the pod's, from loopback.
            let mut skb = [0u32; 11];
            skb[10] = ifindex; // __sk_buff::ifindex
            let skb: Vec<u8> = skb.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let p: &mut SchedClassifier = dp.ebpf.program_mut(name).unwrap().try_into().unwrap();
            let opts = TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: matches!(prog, Prog::TcUplink).then_some(&skb[..]),
                ..Default::default()
            };
            let r = p.test_run(opts)?;
            (r.return_value, r.data_size_out as usize)
        }
    };
    out.truncate(size);
    Ok((rc, out))
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
