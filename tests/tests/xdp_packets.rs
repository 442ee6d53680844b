//! Packet table for the XDP and tc programs, run in the real kernel through
//! BPF_PROG_TEST_RUN (katran style): each case is {description, input packet, expected
//! output packet, expected action}. One fixed world of services is programmed by the agent's
//! own YAML -> translate -> programmer path; FIB and neighbour lookups resolve inside a
//! throwaway network namespace with static entries, so every expected MAC is known.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Header, PacketBuilder, TcpHeader, icmpv4::DestUnreachableHeader,
};
use lb_agent::{
    datapath::{Datapath, Limits},
    k8s,
    programmer::{Maps, Programmer, Settings},
    translate::{self, NodeContext},
};
use lb_common::*;
use lb_tests::{Netns, PinDir, in_netns, privileged};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: [u8; 4] = [172, 30, 0, 2];

const CLIENT: [u8; 4] = [172, 30, 0, 100];
const LB_IP: [u8; 4] = [172, 30, 255, 200];
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
"#,
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

// ---------------------------------------------------------------- the table

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
}

/// The maps a `Step::Maps` sees: the agent's handles and the conntrack maps.
struct MapsView<'a> {
    agent: &'a mut Maps,
    ct: aya::maps::HashMap<&'a mut aya::maps::MapData, FlowKey, CtEntry>,
    ct_new: aya::maps::HashMap<&'a mut aya::maps::MapData, FlowKey, CtEntry>,
    revnat: aya::maps::HashMap<&'a mut aya::maps::MapData, FlowKey, RevNat>,
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

fn table() -> Vec<Step> {
    let to_local = |p: Pkt| p.set_dst(POD_LOCAL, 8080);
    let remote_out = |p: Pkt| {
        p.set_dst(POD_REMOTE, 8080)
            .set_src(NODE, SNAT_PORT)
            .routed(MAC_NODE, MAC_NODE_B)
    };
    let remote_reply = from_remote(true);
    let remote_dns_reply = Pkt {
        src: POD_REMOTE_DNS,
        l4: L4::Udp {
            sport: 5353,
            dport: SNAT_PORT,
        },
        ..remote_reply
    };
    let mut frag = udp(40100, NODE, 30053).bytes();
    frag[20] |= 0x20; // more fragments
    frag[24..26].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&frag[14..34], 0);
    frag[24..26].copy_from_slice(&c.to_ne_bytes());
    let mut options = syn(40101, NODE, 30080).bytes();
    options.splice(34..34, [1, 1, 1, 1]); // four NOP options
    options[14] = 0x46;
    let tot = (options.len() - 14) as u16;
    options[16..18].copy_from_slice(&tot.to_be_bytes());
    let mut udp0 = udp(40102, NODE, 30053).bytes();
    udp0[40..42].copy_from_slice(&[0, 0]); // "no checksum"
    let mut udp0_out = to_udp_local(udp(40102, NODE, 30053)).bytes();
    udp0_out[40..42].copy_from_slice(&[0, 0]);
    let mut long_tot = syn(40103, NODE, 30080).bytes();
    long_tot[16..18].copy_from_slice(&2000u16.to_be_bytes());
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend(MAC_CLIENT);
        f.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend(MAC_CLIENT);
        f.extend(CLIENT);
        f.extend([0; 6]);
        f.extend(NODE);
        f
    };
    let ipv6 = {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE)
            .ipv6([0xfd; 16], [0xfe; 16], 64)
            .tcp(40104, 30080, 1, 1024)
            .syn()
            .write(&mut f, &[])
            .unwrap();
        f
    };
    let icmp_echo = {
        let mut f = Vec::new();
        PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE)
            .ipv4(CLIENT, NODE, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut f, b"ping")
            .unwrap();
        f
    };
    let reply_from_local = Pkt {
        smac: [0x02, 0, 0, 0, 0, 0x55],
        dmac: MAC_NODE,
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

    vec![
        // --- NodePort / external IP to a local backend: DNAT, then the kernel forwards.
        case(
            "NodePort TCP SYN -> local pod",
            syn(40001, NODE, 30080).bytes(),
            to_local(syn(40001, NODE, 30080)).bytes(),
            XDP_PASS,
        ),
        case(
            "NodePort TCP ACK, same flow -> same pod",
            ack(40001, NODE, 30080).bytes(),
            to_local(ack(40001, NODE, 30080)).bytes(),
            XDP_PASS,
        ),
        case(
            "LoadBalancer IP TCP SYN -> local pod",
            syn(40002, LB_IP, 80).bytes(),
            to_local(syn(40002, LB_IP, 80)).bytes(),
            XDP_PASS,
        ),
        case(
            "NodePort UDP -> local pod",
            udp(40003, NODE, 30053).bytes(),
            to_udp_local(udp(40003, NODE, 30053)).bytes(),
            XDP_PASS,
        ),
        case(
            "externalIP UDP -> local pod",
            udp(40004, EXT_IP, 53).bytes(),
            to_udp_local(udp(40004, EXT_IP, 53)).bytes(),
            XDP_PASS,
        ),
        case("UDP without checksum keeps none", udp0, udp0_out, XDP_PASS),
        // --- The reply of a local pod, translated by the tc hook on its interface.
        Step::Case {
            desc: "tc: local pod reply gets the NodePort back as source, sent to the client",
            prog: Prog::TcPod,
            input: reply_from_local.bytes(),
            output: Some(
                reply_from_local
                    .set_src(NODE, 30080)
                    .routed(MAC_NODE, MAC_CLIENT)
                    .bytes(),
            ),
            action: TC_ACT_REDIRECT,
        },
        Step::Case {
            desc: "tc: pod traffic that is not a reply is untouched",
            prog: Prog::TcPod,
            input: reply_from_local.set_dst(CLIENT, 49999).bytes(),
            output: None,
            action: TC_ACT_OK,
        },
        // --- Remote backend: SNAT to the node, forwarded to the other node (FIB + neighbour).
        case(
            "NodePort TCP SYN -> remote pod via SNAT, XDP_TX to node B",
            syn(40010, NODE, 30081).bytes(),
            remote_out(syn(40010, NODE, 30081)).bytes(),
            XDP_TX,
        ),
        case(
            "remote flow, next packet: conntrack keeps backend and port",
            ack(40010, NODE, 30081).bytes(),
            remote_out(ack(40010, NODE, 30081)).bytes(),
            XDP_TX,
        ),
        case(
            "reply from remote pod -> client sees the NodePort",
            remote_reply.bytes(),
            remote_reply
                .set_src(NODE, 30081)
                .set_dst(CLIENT, 40010)
                .routed(MAC_NODE, MAC_CLIENT)
                .bytes(),
            XDP_TX,
        ),
        Step::Case {
            desc: "SNAT port range exhausted -> drop, never mis-deliver",
            prog: Prog::Xdp,
            input: syn(40011, NODE, 30081).bytes(),
            output: None,
            action: XDP_DROP,
        },
        case(
            "NodePort UDP -> remote pod via SNAT",
            udp(40012, NODE, 30054).bytes(),
            udp(40012, NODE, 30054)
                .set_dst(POD_REMOTE_DNS, 5353)
                .set_src(NODE, SNAT_PORT)
                .routed(MAC_NODE, MAC_NODE_B)
                .bytes(),
            XDP_TX,
        ),
        case(
            "UDP reply from remote pod -> client",
            remote_dns_reply.bytes(),
            remote_dns_reply
                .set_src(NODE, 30054)
                .set_dst(CLIENT, 40012)
                .routed(MAC_NODE, MAC_CLIENT)
                .bytes(),
            XDP_TX,
        ),
        // --- The next hop's neighbour entry aged out (XDP_TX never refreshes it): XDP
        // translates and hands the packet on; the uplink's tc sends it with resolution
        // instead of letting the kernel drop it for its local source address.
        Step::Exec("ip neigh del 172.30.0.3 dev up0"),
        case(
            "no neighbour for node B: XDP translates and passes to tc",
            udp(40012, NODE, 30054).bytes(),
            udp(40012, NODE, 30054)
                .set_dst(POD_REMOTE_DNS, 5353)
                .set_src(NODE, SNAT_PORT)
                .bytes(),
            XDP_PASS,
        ),
        Step::Case {
            desc: "tc uplink: a translated packet without neighbour is sent with resolution",
            prog: Prog::TcUplink,
            input: udp(40012, NODE, 30054)
                .set_dst(POD_REMOTE_DNS, 5353)
                .set_src(NODE, SNAT_PORT)
                .bytes(),
            output: Some(
                udp(40012, NODE, 30054)
                    .set_dst(POD_REMOTE_DNS, 5353)
                    .set_src(NODE, SNAT_PORT)
                    .with(|p| p.ttl -= 1)
                    .bytes(),
            ),
            action: TC_ACT_REDIRECT,
        },
        Step::Exec("ip neigh replace 172.30.0.3 lladdr 02:00:00:00:00:03 dev up0 nud permanent"),
        // --- No endpoints: reject like kube-proxy.
        case(
            "no endpoints, TCP SYN -> RST|ACK",
            syn(40020, NODE, 30090).bytes(),
            rst_for(&syn(40020, NODE, 30090)),
            XDP_TX,
        ),
        case(
            "no endpoints, TCP ACK -> RST with seq = ack",
            ack(40021, NODE, 30090).bytes(),
            rst_for(&ack(40021, NODE, 30090)),
            XDP_TX,
        ),
        case(
            "no endpoints, UDP -> ICMP port unreachable",
            udp(40022, NODE, 30091).bytes(),
            icmp_unreachable_for(&udp(40022, NODE, 30091)),
            XDP_TX,
        ),
        Step::Case {
            desc: "no endpoints, incoming RST is never answered",
            prog: Prog::Xdp,
            input: {
                let mut f = ack(40023, NODE, 30090).bytes();
                f[47] = 0x04;
                let c = recompute_tcp(&mut f);
                let _ = c;
                f
            },
            output: None,
            action: XDP_DROP,
        },
        // --- Connection tracking across an endpoint change.
        case(
            "ct service: first flow -> backend A",
            syn(40030, NODE, 30100).bytes(),
            syn(40030, NODE, 30100).set_dst(CT_A, 8080).bytes(),
            XDP_PASS,
        ),
        case(
            "ct service: second flow -> backend A",
            syn(40032, NODE, 30100).bytes(),
            syn(40032, NODE, 30100).set_dst(CT_A, 8080).bytes(),
            XDP_PASS,
        ),
        Step::Apply {
            ct_backend: CT_B,
            after: Duration::ZERO,
        },
        case(
            "endpoint A replaced by B: established flow stays on A",
            ack(40030, NODE, 30100).bytes(),
            ack(40030, NODE, 30100).set_dst(CT_A, 8080).bytes(),
            XDP_PASS,
        ),
        case(
            "endpoint A replaced by B: a new flow goes to B",
            syn(40031, NODE, 30100).bytes(),
            syn(40031, NODE, 30100).set_dst(CT_B, 8080).bytes(),
            XDP_PASS,
        ),
        case(
            "a SYN reusing a closed flow's ports while A drains is balanced afresh -> B",
            syn(40032, NODE, 30100).bytes(),
            syn(40032, NODE, 30100).set_dst(CT_B, 8080).bytes(),
            XDP_PASS,
        ),
        Step::Apply {
            ct_backend: CT_B,
            after: Duration::from_secs(3600),
        },
        case(
            "A drained away: the old flow is re-balanced to B",
            ack(40030, NODE, 30100).bytes(),
            ack(40030, NODE, 30100).set_dst(CT_B, 8080).bytes(),
            XDP_PASS,
        ),
        // --- ClusterIP from a pod (tc on the pod's interface): source kept, DNAT, sent on.
        tc(
            "tc: pod -> ClusterIP, local backend: DNAT, pod source kept",
            from_pod(45000, CLUSTER_IP, 80).bytes(),
            Some(
                from_pod(45000, CLUSTER_IP, 80)
                    .set_dst(POD_LOCAL, 8080)
                    .routed(MAC_POD_IF, MAC_POD_LOCAL)
                    .bytes(),
            ),
            TC_ACT_REDIRECT,
        ),
        tc(
            "tc: local backend's reply gets the ClusterIP back",
            pod_reply(POD_LOCAL, 8080, POD_CLIENT, 45000).bytes(),
            Some(
                pod_reply(POD_LOCAL, 8080, POD_CLIENT, 45000)
                    .set_src(CLUSTER_IP, 80)
                    .routed(MAC_POD_IF, MAC_POD_CLIENT)
                    .bytes(),
            ),
            TC_ACT_REDIRECT,
        ),
        tc(
            "tc: pod -> ClusterIP, remote backend: no SNAT, to node B",
            from_pod(45001, CLUSTER_IP_REMOTE, 80).bytes(),
            Some(
                from_pod(45001, CLUSTER_IP_REMOTE, 80)
                    .set_dst(POD_REMOTE, 8080)
                    .routed(MAC_NODE, MAC_NODE_B)
                    .bytes(),
            ),
            TC_ACT_REDIRECT,
        ),
        Step::Case {
            desc: "XDP: reply for a local pod's ClusterIP flow is left to tc",
            prog: Prog::Xdp,
            input: remote_reply_to_pod(45001).bytes(),
            output: None,
            action: XDP_PASS,
        },
        Step::Case {
            desc: "tc uplink: reply for a local pod's ClusterIP flow, translated and delivered",
            prog: Prog::TcUplink,
            input: remote_reply_to_pod(45001).bytes(),
            output: Some(
                remote_reply_to_pod(45001)
                    .set_src(CLUSTER_IP_REMOTE, 80)
                    .routed(MAC_POD_IF, MAC_POD_CLIENT)
                    .bytes(),
            ),
            action: TC_ACT_REDIRECT,
        },
        Step::Case {
            desc: "tc uplink: anything else is untouched",
            prog: Prog::TcUplink,
            input: remote_reply.bytes(),
            output: None,
            action: TC_ACT_OK,
        },
        tc(
            "tc: hairpin, the pod reaches itself: SNAT to the node",
            from_pod(45100, CLUSTER_IP, 80)
                .with(|p| p.src = POD_LOCAL)
                .bytes(),
            Some(
                from_pod(45100, CLUSTER_IP, 80)
                    .with(|p| p.src = POD_LOCAL)
                    .set_dst(POD_LOCAL, 8080)
                    .set_src(NODE, SNAT_PORT)
                    .routed(MAC_POD_IF, MAC_POD_LOCAL)
                    .bytes(),
            ),
            TC_ACT_REDIRECT,
        ),
        tc(
            "tc: hairpin reply goes back to the pod from the ClusterIP",
            pod_reply(POD_LOCAL, 8080, NODE, SNAT_PORT).bytes(),
            Some(
                pod_reply(POD_LOCAL, 8080, NODE, SNAT_PORT)
                    .set_src(CLUSTER_IP, 80)
                    .set_dst(POD_LOCAL, 45100)
                    .routed(MAC_POD_IF, MAC_POD_LOCAL)
                    .bytes(),
            ),
            TC_ACT_REDIRECT,
        ),
        tc(
            "tc: unused ClusterIP port -> RST back into the pod",
            from_pod(45002, CLUSTER_IP, 81).bytes(),
            Some(rst_for(&from_pod(45002, CLUSTER_IP, 81))),
            TC_ACT_REDIRECT,
        ),
        tc(
            "tc: ClusterIP without endpoints, UDP -> ICMP port unreachable",
            udp_from_pod(45003, CLUSTER_IP_EMPTY, 53).bytes(),
            Some(icmp_unreachable_for(&udp_from_pod(
                45003,
                CLUSTER_IP_EMPTY,
                53,
            ))),
            TC_ACT_REDIRECT,
        ),
        tc(
            "tc: internalTrafficPolicy Local without a local endpoint -> drop",
            from_pod(45004, CLUSTER_IP_ITP_LOCAL, 80).bytes(),
            None,
            TC_ACT_SHOT,
        ),
        tc(
            "tc: pod traffic to elsewhere is untouched",
            from_pod(45005, [192, 0, 2, 1], 443).bytes(),
            None,
            TC_ACT_OK,
        ),
        // --- Not ours: untouched.
        untouched(
            "ClusterIP traffic is left to tc",
            syn(40040, CLUSTER_IP, 80).bytes(),
        ),
        untouched(
            "node address, port without a service",
            syn(40041, NODE, 22).bytes(),
        ),
        untouched(
            "NodePort number on a foreign address",
            syn(40042, [172, 30, 0, 77], 30080).bytes(),
        ),
        untouched("ARP", arp),
        untouched("IPv6", ipv6),
        untouched("ICMP echo to the node", icmp_echo),
        untouched("IPv4 fragment", frag),
        untouched("IPv4 with options", options),
        // The kernel refuses test runs below 14 bytes, so the shortest frame is a bare header.
        untouched(
            "Ethernet header alone (IPv4 type, no IP header)",
            syn(40046, NODE, 30080).bytes()[..14].to_vec(),
        ),
        untouched(
            "truncated IPv4 header",
            syn(40043, NODE, 30080).bytes()[..24].to_vec(),
        ),
        untouched("truncated TCP header", {
            let mut f = syn(40044, NODE, 30080).bytes()[..44].to_vec();
            f[16..18].copy_from_slice(&30u16.to_be_bytes());
            f
        }),
        untouched("IPv4 total length beyond the frame", long_tot),
        untouched("IPv4 header length below 5", {
            let mut f = syn(40045, NODE, 30080).bytes();
            f[14] = 0x44;
            f
        }),
    ]
}

fn tc(desc: &'static str, input: Vec<u8>, output: Option<Vec<u8>>, action: u32) -> Step {
    Step::Case {
        desc,
        prog: Prog::TcPod,
        input,
        output,
        action,
    }
}

/// A TCP SYN from the local client pod, as it leaves the pod.
fn from_pod(sport: u16, dst: [u8; 4], dport: u16) -> Pkt {
    Pkt {
        smac: MAC_POD_CLIENT,
        dmac: MAC_POD_IF,
        src: POD_CLIENT,
        ..syn(sport, dst, dport)
    }
}

fn udp_from_pod(sport: u16, dst: [u8; 4], dport: u16) -> Pkt {
    Pkt {
        l4: L4::Udp { sport, dport },
        ..from_pod(sport, dst, dport)
    }
}

/// A backend pod's SYN-ACK as it leaves the pod.
fn pod_reply(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Pkt {
    Pkt {
        smac: MAC_POD_LOCAL,
        dmac: MAC_POD_IF,
        src,
        dst,
        ttl: 64,
        l4: L4::Tcp {
            sport,
            dport,
            seq: 9000,
            ack: Some(1001),
            syn: true,
        },
    }
}

/// The remote ClusterIP backend's reply to the local client pod, arriving on the uplink.
fn remote_reply_to_pod(dport: u16) -> Pkt {
    Pkt {
        smac: MAC_NODE_B,
        dmac: MAC_NODE,
        src: POD_REMOTE,
        dst: POD_CLIENT,
        ttl: 63,
        l4: L4::Tcp {
            sport: 8080,
            dport,
            seq: 5000,
            ack: Some(1001),
            syn: true,
        },
    }
}

fn to_udp_local(p: Pkt) -> Pkt {
    p.set_dst(POD_LOCAL_DNS, 5353)
}

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

#[test]
fn packet_table() {
    let Some(_guard) = privileged() else {
        return;
    };
    let steps = table();
    let cases = steps
        .iter()
        .filter(|s| matches!(s, Step::Case { .. }))
        .count();
    assert!(
        cases >= 25,
        "the table must hold at least 25 cases, has {cases}"
    );
    run_table(steps, SNAT_PORT);
}

/// Loads the programs in a throwaway namespace, programs the world and runs `steps`.
/// `snat_port_max`: the SNAT range is `SNAT_PORT..=snat_port_max`.
fn run_table(steps: Vec<Step>, snat_port_max: u16) {
    let ns = Netns::new("pkt").expect("netns");
    setup_netns(&ns);
    let pins = PinDir::new("pkt").expect("pin dir");
    let mut dp = Datapath::load(pins.path(), &Limits::default()).expect("load");
    let mut maps = Maps::take(&mut dp.ebpf).expect("maps");
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
        // xdp_md as BPF_PROG_TEST_RUN wants it: data 0, data_end = len, ingress = up0.
        for step in steps {
            match step {
                Step::Exec(cmd) => {
                    ns.exec(cmd);
                }
                Step::Apply { ct_backend, after } => {
                    program(&mut programmer, &mut maps, ct_backend, t0 + after)
                }
                Step::Maps(what, f) => {
                    let [ct, ct_new, revnat] = dp
                        .ebpf
                        .maps_disjoint_mut([MAP_CT, MAP_CT_NEW, MAP_REVNAT])
                        .map(|m| m.unwrap_or_else(|| panic!("{what}: conntrack maps")));
                    let mut view = MapsView {
                        agent: &mut maps,
                        ct: aya::maps::HashMap::try_from(ct).unwrap(),
                        ct_new: aya::maps::HashMap::try_from(ct_new).unwrap(),
                        revnat: aya::maps::HashMap::try_from(revnat).unwrap(),
                    };
                    f(&mut view);
                }
                Step::Case {
                    desc,
                    prog,
                    input,
                    output,
                    action,
                } => {
                    let mut out = vec![0u8; input.len() + 256];
                    let (rc, size) = match prog {
                        Prog::Xdp => {
                            let mut ctx = [0u32; 6];
                            ctx[1] = input.len() as u32;
                            ctx[3] = ifindex;
                            let ctx_bytes: Vec<u8> =
                                ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
                            let p: &mut Xdp =
                                dp.ebpf.program_mut(PROG_XDP).unwrap().try_into().unwrap();
                            let opts = TestRunOptions {
                                data_in: Some(&input),
                                data_out: Some(&mut out),
                                ctx_in: Some(&ctx_bytes),
                                ..Default::default()
                            };
                            let r = p
                                .test_run(opts)
                                .unwrap_or_else(|e| panic!("{desc}: test_run: {e}"));
                            (r.return_value, r.data_size_out as usize)
                        }
                        Prog::TcPod | Prog::TcUplink => {
                            let name = if matches!(prog, Prog::TcPod) {
                                PROG_TC_POD
                            } else {
                                PROG_TC_UPLINK
                            };
                            let p: &mut SchedClassifier =
                                dp.ebpf.program_mut(name).unwrap().try_into().unwrap();
                            let opts = TestRunOptions {
                                data_in: Some(&input),
                                data_out: Some(&mut out),
                                ..Default::default()
                            };
                            let r = p
                                .test_run(opts)
                                .unwrap_or_else(|e| panic!("{desc}: test_run: {e}"));
                            (r.return_value, r.data_size_out as usize)
                        }
                    };
                    let got = &out[..size];
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

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------- conntrack table

/// Conntrack and SNAT ports: a flow's state across its life (SYN, reply, confirmation,
/// FIN, RST), ports given back, reverse entries that vanish, mid-stream segments, and
/// reverse NAT ahead of frontends. The SNAT range is one port, so every port decision is
/// visible in the packets.
#[test]
fn conntrack_table() {
    let Some(_guard) = privileged() else {
        return;
    };
    run_table(conntrack_steps(), SNAT_PORT);
}

fn tcp_key(sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey {
        src_addr_be: u32::from_ne_bytes(CLIENT),
        dst_addr_be: u32::from_ne_bytes(dst),
        src_port_be: sport.to_be(),
        dst_port_be: dport.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// The reverse key of a flow SNATed to `SNAT_PORT` towards the remote web pod.
fn snat_rev_key() -> FlowKey {
    FlowKey {
        src_addr_be: u32::from_ne_bytes(POD_REMOTE),
        dst_addr_be: u32::from_ne_bytes(NODE),
        src_port_be: 8080u16.to_be(),
        dst_port_be: SNAT_PORT.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// A frame with its TCP flags byte replaced (checksum recomputed).
fn tcp_flags(mut frame: Vec<u8>, flags: u8) -> Vec<u8> {
    frame[47] = flags;
    recompute_tcp(&mut frame);
    frame
}

const FIN_ACK: u8 = 0x11;
const RST_ACK: u8 = 0x14;
const RST: u8 = 0x04;

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

/// The entry of `key` and whether it is confirmed (in `XLB_CT`).
fn entry(v: &MapsView, key: &FlowKey) -> Option<(CtEntry, bool)> {
    if let Ok(e) = v.ct.get(key, 0) {
        assert!(v.ct_new.get(key, 0).is_err(), "{key:?} in both maps");
        return Some((e, true));
    }
    v.ct_new.get(key, 0).ok().map(|e| (e, false))
}

/// Moves the flow's last packet `secs` into the past.
fn age(v: &mut MapsView, key: &FlowKey, secs: u32) {
    let (mut e, confirmed) = entry(v, key).expect("entry to age");
    e.last_seen_ms = e.last_seen_ms.wrapping_sub(secs * 1000);
    if confirmed {
        v.ct.insert(key, e, 0).unwrap();
    } else {
        v.ct_new.insert(key, e, 0).unwrap();
    }
}

fn check(what: &'static str, f: impl FnOnce(&mut MapsView) + Send + 'static) -> Step {
    Step::Maps(what, Box::new(f))
}

fn xdp(desc: &'static str, input: Vec<u8>, output: Option<Vec<u8>>, action: u32) -> Step {
    Step::Case {
        desc,
        prog: Prog::Xdp,
        input,
        output,
        action,
    }
}

fn conntrack_steps() -> Vec<Step> {
    let cfg = Config::DEFAULT;
    let syn_to = |c: u16| syn(c, NODE, 30081);
    let ack_to = |c: u16| ack(c, NODE, 30081);
    let fwd_ok = |desc, p: Pkt| case(desc, p.bytes(), to_remote(p).bytes(), XDP_TX);
    let reply_ok = |desc, p: Pkt, c: u16| case(desc, p.bytes(), to_client(p, c).bytes(), XDP_TX);
    vec![
        // --- A flow's life: unconfirmed, replied, confirmed, half closed, closed.
        fwd_ok(
            "SYN -> remote pod through the only SNAT port",
            syn_to(41000),
        ),
        check("a SYN creates an unconfirmed entry", move |v| {
            let (e, confirmed) = entry(v, &tcp_key(41000, NODE, 30081)).expect("entry");
            assert!(!confirmed);
            assert_eq!(e.flags, CT_SNAT);
            assert_eq!(u16::from_be(e.snat_port_be), SNAT_PORT);
            assert_eq!(ct_timeout_s(&cfg, &e, confirmed), DEFAULT_CT_TCP_SYN_S);
            let rev = v.revnat.get(&snat_rev_key(), 0).expect("reverse entry");
            assert_eq!(rev.ct_key(PROTO_TCP), tcp_key(41000, NODE, 30081));
        }),
        reply_ok("SYN-ACK from the pod -> client", from_remote(true), 41000),
        check("the reply is recorded, still unconfirmed", |v| {
            let (e, confirmed) = entry(v, &tcp_key(41000, NODE, 30081)).unwrap();
            assert!(!confirmed);
            assert_ne!(e.flags & CT_SEEN_REPLY, 0);
        }),
        fwd_ok("client ACK, same port", ack_to(41000)),
        check(
            "the client's ACK after the reply confirms the flow",
            move |v| {
                let (e, confirmed) = entry(v, &tcp_key(41000, NODE, 30081)).unwrap();
                assert!(confirmed);
                assert_eq!(
                    ct_timeout_s(&cfg, &e, confirmed),
                    DEFAULT_CT_TCP_ESTABLISHED_S
                );
            },
        ),
        xdp(
            "another client while the only port is held by a live flow: dropped",
            syn_to(41001).bytes(),
            None,
            XDP_DROP,
        ),
        case(
            "client FIN -> forwarded",
            tcp_flags(ack_to(41000).bytes(), FIN_ACK),
            tcp_flags(to_remote(ack_to(41000)).bytes(), FIN_ACK),
            XDP_TX,
        ),
        check("one FIN does not shorten the entry", move |v| {
            let (e, confirmed) = entry(v, &tcp_key(41000, NODE, 30081)).unwrap();
            assert_ne!(e.flags & CT_FIN_CLIENT, 0);
            assert!(!ct_closed(&e));
            assert_eq!(
                ct_timeout_s(&cfg, &e, confirmed),
                DEFAULT_CT_TCP_ESTABLISHED_S
            );
        }),
        case(
            "pod FIN -> client",
            tcp_flags(from_remote(false).bytes(), FIN_ACK),
            tcp_flags(to_client(from_remote(false), 41000).bytes(), FIN_ACK),
            XDP_TX,
        ),
        check(
            "FIN both ways: the entry lives for the close timeout only",
            move |v| {
                let (e, confirmed) = entry(v, &tcp_key(41000, NODE, 30081)).unwrap();
                assert!(ct_closed(&e));
                assert_eq!(ct_timeout_s(&cfg, &e, confirmed), DEFAULT_CT_TCP_CLOSE_S);
            },
        ),
        fwd_ok(
            "the last ACK of the closed flow is still translated",
            ack_to(41000),
        ),
        xdp(
            "a closed flow keeps its port for a moment (late segments)",
            syn_to(41001).bytes(),
            None,
            XDP_DROP,
        ),
        check("time passes", |v| {
            age(
                v,
                &tcp_key(41000, NODE, 30081),
                SNAT_REUSE_CLOSED_MS / 1000 + 1,
            )
        }),
        fwd_ok(
            "the port of a closed flow goes to a new flow",
            syn_to(41001),
        ),
        check("the closed flow's entry went with its port", |v| {
            assert!(entry(v, &tcp_key(41000, NODE, 30081)).is_none());
            let rev = v.revnat.get(&snat_rev_key(), 0).unwrap();
            assert_eq!(rev.ct_key(PROTO_TCP), tcp_key(41001, NODE, 30081));
        }),
        xdp(
            "a late segment of the old flow never uses the new flow's port",
            ack_to(41000).bytes(),
            None,
            XDP_DROP,
        ),
        // --- RST.
        reply_ok("SYN-ACK -> second client", from_remote(true), 41001),
        fwd_ok("second client's ACK", ack_to(41001)),
        case(
            "client RST -> forwarded",
            tcp_flags(ack_to(41001).bytes(), RST_ACK),
            tcp_flags(to_remote(ack_to(41001)).bytes(), RST_ACK),
            XDP_TX,
        ),
        check(
            "RST: the entry lives for the close timeout only",
            move |v| {
                let (e, confirmed) = entry(v, &tcp_key(41001, NODE, 30081)).unwrap();
                assert!(confirmed);
                assert_ne!(e.flags & CT_RST, 0);
                assert_eq!(ct_timeout_s(&cfg, &e, confirmed), DEFAULT_CT_TCP_CLOSE_S);
                age(
                    v,
                    &tcp_key(41001, NODE, 30081),
                    SNAT_REUSE_CLOSED_MS / 1000 + 1,
                );
            },
        ),
        // --- A reverse entry that vanished (LRU eviction) is written again.
        fwd_ok("third client takes the port", syn_to(41002)),
        reply_ok("SYN-ACK -> third client", from_remote(true), 41002),
        fwd_ok("third client's ACK: confirmed", ack_to(41002)),
        check("the reverse entry is evicted", |v| {
            v.revnat.remove(&snat_rev_key()).unwrap();
            // The flow's next packet comes in a later clock tick (the check runs once per
            // tick of the flow).
            age(v, &tcp_key(41002, NODE, 30081), 1);
        }),
        fwd_ok(
            "next segment: same port, reverse entry recreated",
            ack_to(41002),
        ),
        check("recreated for the same client", |v| {
            let rev = v.revnat.get(&snat_rev_key(), 0).expect("recreated");
            assert_eq!(rev.ct_key(PROTO_TCP), tcp_key(41002, NODE, 30081));
            // Evicted again, and this time another flow takes the port first.
            v.revnat.remove(&snat_rev_key()).unwrap();
            age(v, &tcp_key(41002, NODE, 30081), 1);
        }),
        fwd_ok("a new flow claims the free port", syn_to(41003)),
        xdp(
            "the flow whose reverse entry was taken is never sent through another's port",
            ack_to(41002).bytes(),
            None,
            XDP_DROP,
        ),
        reply_ok(
            "the port's replies reach its new owner",
            from_remote(true),
            41003,
        ),
        // --- Mid-stream segments without state.
        case(
            "mid-stream ACK without state, local pod: forwarded",
            ack(41010, NODE, 30080).bytes(),
            ack(41010, NODE, 30080).set_dst(POD_LOCAL, 8080).bytes(),
            XDP_PASS,
        ),
        check("... with short-lived state", move |v| {
            let (e, confirmed) = entry(v, &tcp_key(41010, NODE, 30080)).unwrap();
            assert!(!confirmed);
            assert_eq!(e.flags, CT_MIDSTREAM);
            assert_eq!(ct_timeout_s(&cfg, &e, confirmed), DEFAULT_CT_TCP_CLOSE_S);
            // The SYN of 41003 never got its ACK: after the SYN timeout it is over.
            age(v, &tcp_key(41003, NODE, 30081), DEFAULT_CT_TCP_SYN_S + 1);
        }),
        fwd_ok(
            "mid-stream ACK without state, remote pod: forwarded",
            ack_to(41011),
        ),
        check("its port is held only for the close timeout", move |v| {
            let (e, confirmed) = entry(v, &tcp_key(41011, NODE, 30081)).unwrap();
            assert_eq!(e.flags, CT_SNAT | CT_MIDSTREAM);
            assert_eq!(ct_timeout_s(&cfg, &e, confirmed), DEFAULT_CT_TCP_CLOSE_S);
            age(v, &tcp_key(41011, NODE, 30081), DEFAULT_CT_TCP_CLOSE_S + 1);
        }),
        fwd_ok("after it, a SYN gets the port", syn_to(41012)),
        xdp(
            "RST without state, remote pod: dropped, no state",
            tcp_flags(ack_to(41020).bytes(), RST),
            None,
            XDP_DROP,
        ),
        case(
            "RST without state, local pod: forwarded",
            tcp_flags(ack(41021, NODE, 30080).bytes(), RST),
            tcp_flags(
                ack(41021, NODE, 30080).set_dst(POD_LOCAL, 8080).bytes(),
                RST,
            ),
            XDP_PASS,
        ),
        check("a RST never creates state", |v| {
            assert!(entry(v, &tcp_key(41020, NODE, 30081)).is_none());
            assert!(entry(v, &tcp_key(41021, NODE, 30080)).is_none());
            // A Service lists the node address as an external IP on the SNAT port (the
            // agent refuses that; the datapath must not depend on it).
            let local = v
                .agent
                .frontends
                .get(
                    &FrontendKey {
                        addr_be: u32::from_ne_bytes(NODE),
                        port_be: 30080u16.to_be(),
                        proto: PROTO_TCP,
                        _pad: 0,
                    },
                    0,
                )
                .unwrap();
            let fe = Frontend {
                flags: FE_EXTERNAL,
                ..local
            };
            v.agent.frontends.insert(snat_frontend(), fe, 0).unwrap();
        }),
        reply_ok(
            "a reply to the SNAT port is reverse-translated despite a frontend there",
            from_remote(true),
            41012,
        ),
        check("the frontend on the SNAT port goes", |v| {
            v.agent.frontends.remove(&snat_frontend()).unwrap();
        }),
        untouched(
            "a segment to the SNAT port that is no reply of ours is the node's",
            from_remote(false)
                .with(|p| {
                    p.l4 = L4::Tcp {
                        sport: 9999,
                        dport: SNAT_PORT,
                        seq: 1,
                        ack: Some(1),
                        syn: false,
                    }
                })
                .bytes(),
        ),
        check("the flow is gone, its reverse entry stays", |v| {
            let k = tcp_key(41012, NODE, 30081);
            let confirmed = entry(v, &k).unwrap().1;
            if confirmed {
                v.ct.remove(&k).unwrap();
            } else {
                v.ct_new.remove(&k).unwrap();
            }
        }),
        xdp(
            "a reply whose flow is gone is not translated",
            from_remote(false).bytes(),
            None,
            XDP_DROP,
        ),
        check("the leftover reverse entry is removed", |v| {
            assert!(v.revnat.get(&snat_rev_key(), 0).is_err());
        }),
        // --- A spoofed SYN: the backend's SYN-ACK reaches a host without the connection,
        // which answers with a RST. That RST closes the flow and does not confirm it.
        check("the port is free again", |v| {
            let k = tcp_key(41012, NODE, 30081);
            assert!(entry(v, &k).is_none());
        }),
        fwd_ok("spoofed SYN", syn_to(41040)),
        reply_ok("SYN-ACK to the spoofed source", from_remote(true), 41040),
        case(
            "the spoofed source's RST",
            tcp_flags(ack_to(41040).bytes(), RST),
            tcp_flags(to_remote(ack_to(41040)).bytes(), RST),
            XDP_TX,
        ),
        check(
            "a RST after the reply closes the flow unconfirmed",
            move |v| {
                let (e, confirmed) = entry(v, &tcp_key(41040, NODE, 30081)).unwrap();
                assert!(!confirmed, "a RST must not confirm a flow");
                assert!(ct_closed(&e));
                assert_eq!(ct_timeout_s(&cfg, &e, confirmed), DEFAULT_CT_TCP_CLOSE_S);
            },
        ),
        // --- UDP.
        case(
            "UDP creates state",
            udp(41030, NODE, 30054).bytes(),
            udp(41030, NODE, 30054)
                .set_dst(POD_REMOTE_DNS, 5353)
                .set_src(NODE, SNAT_PORT)
                .routed(MAC_NODE, MAC_NODE_B)
                .bytes(),
            XDP_TX,
        ),
        check("UDP entry and timeout", move |v| {
            let mut k = tcp_key(41030, NODE, 30054);
            k.proto = PROTO_UDP;
            let (e, confirmed) = entry(v, &k).unwrap();
            assert_eq!(ct_timeout_s(&cfg, &e, confirmed), DEFAULT_CT_UDP_S);
        }),
    ]
}

fn snat_frontend() -> FrontendKey {
    FrontendKey {
        addr_be: u32::from_ne_bytes(NODE),
        port_be: SNAT_PORT.to_be(),
        proto: PROTO_TCP,
        _pad: 0,
    }
}
