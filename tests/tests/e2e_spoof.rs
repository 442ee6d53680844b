//! Spoofing from the LAN: a frame from the kind network whose source is the node's own
//! address, sent to a pod behind that node, must not reach the pod. Nothing legitimately
//! arrives at the uplink's tc with a node source (XDP, when it runs, hands on only
//! untranslated packets), so tc leaves it to the kernel, which drops it as a martian
//! (before, tc forwarded anything with a node or frontend source, for XDP's benefit).
//! And an attacker guessing a NAT mapping cannot inject into a client's flow.
use std::{
    net::{SocketAddrV4, UdpSocket},
    time::Duration,
};

use lb_tests::*;

/// Sends one UDP datagram as a raw Ethernet frame: `src_ip -> dst_ip:port`, to `dst_mac`,
/// out of the namespace's eth0 (Python, AF_PACKET: the kernel does not check the source).
/// (Run after `PY_CSUM`.)
const SPOOF_PY: &str = r#"
import socket, struct, sys
dst_mac, src_ip, dst_ip, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
src_mac = s.getsockname()[4]
payload = b"spoofed"
udp = struct.pack("!HHHH", 40999, port, 8 + len(payload), 0) + payload
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                 socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x08\x00" + ip + udp
for _ in range(20):
    s.send(frame)
"#;

/// A UDP counter of the namespace's stack (`Udp: <name>` of /proc/net/snmp): `InDatagrams`
/// received, `NoPorts` to a port nothing listens on.
fn udp_counter(netns: &str, name: &str) -> u64 {
    let snmp = exec_ok(netns, &["cat", "/proc/net/snmp"]).expect("snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let i = names.split_whitespace().position(|n| n == name).unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[test]
fn a_frame_with_the_nodes_source_from_the_lan_does_not_reach_a_pod() {
    let Some(_guard) = privileged() else {
        return;
    };
    spoofed_node_source(&[]);
}

fn spoofed_node_source(extra: &[&str]) {
    let spec = TopologySpec::seed();
    let mut c = Cluster::up_with_args(
        &spec,
        |net| seed_manifests(net, &ManifestOpts::default()),
        SourceMode::File,
        &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )
    .expect("cluster up");
    let pods = c.net.pods().len();
    c.wait_for(
        "nginx-service programmed",
        std::time::Duration::from_secs(20),
        |s| {
            s.services
                .iter()
                .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == pods)
        },
    )
    .unwrap();
    let pod = c.net.pods()[0].clone();
    let node = c.net.node(&pod.node).clone();
    let mac = exec_ok(
        &node.netns,
        &["cat", &format!("/sys/class/net/{UPLINK}/address")],
    )
    .expect("node MAC");
    let send = |src: std::net::Ipv4Addr| {
        exec_ok(
            c.net.client_netns(),
            &[
                "python3",
                "-c",
                &format!("{PY_CSUM}{SPOOF_PY}"),
                mac.trim(),
                &src.to_string(),
                &pod.addr.to_string(),
                &POD_UDP_PORT.to_string(),
            ],
        )
        .expect("send spoofed frames");
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    // The client's route to pods goes through the node here too, so the same frames with
    // the client's own source must arrive: the check can see a delivery.
    let before = udp_counter(&pod.netns, "InDatagrams");
    send(c.net.client_addr());
    let honest = udp_counter(&pod.netns, "InDatagrams") - before;
    assert!(
        honest > 0,
        "control: the client's own datagrams never reached the pod"
    );
    let before = udp_counter(&pod.netns, "InDatagrams");
    send(node.addr);
    let spoofed = udp_counter(&pod.netns, "InDatagrams") - before;
    assert_eq!(
        spoofed, 0,
        "{spoofed} datagrams with the node's source reached the pod"
    );
}

/// The same spoofed frames with XDP in front of the uplink's tc (generic XDP here): XDP
/// hands nothing on translated, so tc forwards nothing with a node source either.
#[test]
fn with_xdp_in_front_a_frame_with_the_nodes_source_does_not_reach_a_pod() {
    let Some(_guard) = privileged() else {
        return;
    };
    spoofed_node_source(&["--xdp-mode", "generic"]);
}

/// Sends `payload` as raw frames `src_ip:<sport> -> dst_ip:<dport>` for every destination
/// port of `dport_first..=dport_last` (source ports counting up from `sport_first`), to
/// `dst_mac`, out of eth0: an attacker on the LAN guessing a NAT mapping. (Run after
/// `PY_CSUM`.)
const INJECT_PY: &str = r#"
import socket, struct, sys
dst_mac, src_ip, sport, dst_ip, first, last = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
head = bytes.fromhex(dst_mac.replace(":", "")) + s.getsockname()[4] + b"\x08\x00"
payload = b"injected"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 7, 0, 64, 17, 0,
                 socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
for i, port in enumerate(range(first, last + 1)):
    # UDP checksum 0: none, so no pseudo-header sum per frame.
    udp = struct.pack("!HHHH", (sport + i) % 65536 or 1, port, 8 + len(payload), 0)
    s.send(head + ip + udp + payload)
"#;

/// A UDP flow through a NodePort to a backend on another node holds one of the entry
/// node's SNAT ports. An attacker on the LAN sends a datagram to every port of the SNAT
/// range — from its own address, and from the backend's address with other source ports:
/// none reaches the client's socket (reverse NAT matches the whole 5-tuple, as a symmetric
/// NAT does, unlike a full-cone one), and the flow keeps working. (A datagram spoofing the
/// backend's exact address and port on the right SNAT port is indistinguishable from its
/// reply, as for the kernel's conntrack; the port is chosen at random from the range.)
#[test]
fn a_guessed_port_injection_into_a_nated_udp_flow_does_not_reach_the_client() {
    let Some(_guard) = privileged() else {
        return;
    };
    let OneUdpEndpoint {
        c,
        pod,
        remote: entry,
        ..
    } = OneUdpEndpoint::up(&[]).expect("cluster up");
    let cfg = read_config(&c.agent(&entry.name).pin_dir).expect("config");
    let (first, last) = (cfg.snat_port_min, cfg.snat_port_max);
    let mac = exec_ok(
        &entry.netns,
        &["cat", &format!("/sys/class/net/{UPLINK}/address")],
    )
    .expect("entry node MAC");
    let client = c.net.client_netns().to_owned();
    let client_addr = c.net.client_addr();
    let no_ports_before = udp_counter(&entry.netns, "NoPorts");
    let at = SocketAddrV4::new(entry.addr, DNS_NODE_PORT);
    let (injected, replies) = in_netns(&client, || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.connect(at).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let ask = || {
            let mut buf = [0u8; 2048];
            sock.send(b"q").unwrap();
            let n = sock.recv(&mut buf).expect("the flow's reply");
            assert!(buf[..n].starts_with(pod.name.as_bytes()));
        };
        let mut buf = [0u8; 2048];
        ask();
        for (src, sport) in [
            (client_addr, 20_000),
            (pod.addr, POD_UDP_PORT.wrapping_add(1)),
        ] {
            exec_ok(
                &client,
                &[
                    "python3",
                    "-c",
                    &format!("{PY_CSUM}{INJECT_PY}"),
                    mac.trim(),
                    &src.to_string(),
                    &sport.to_string(),
                    &entry.addr.to_string(),
                    &first.to_string(),
                    &last.to_string(),
                ],
            )
            .expect("inject");
        }
        // Whatever arrived on the flow's socket: an injected datagram translated for it.
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut injected = 0;
        while let Ok(n) = sock.recv(&mut buf) {
            if &buf[..n] == b"injected" {
                injected += 1;
            }
        }
        let mut replies = 0;
        for _ in 0..3 {
            ask();
            replies += 1;
        }
        (injected, replies)
    });
    assert_eq!(injected, 0, "injected datagrams reached the client's flow");
    assert_eq!(replies, 3, "the flow stopped working");
    // Control: the injected datagrams did reach the entry node (and were left to its
    // kernel, where no socket has those ports).
    let arrived = udp_counter(&entry.netns, "NoPorts") - no_ports_before;
    let sent = 2 * (u64::from(last) - u64::from(first) + 1);
    assert!(
        arrived >= sent * 9 / 10,
        "only {arrived} of {sent} injected datagrams reached the entry node"
    );
}
