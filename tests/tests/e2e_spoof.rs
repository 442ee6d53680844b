//! Spoofing from the LAN: a frame from the kind network whose source is the node's own
//! address, sent to a pod behind that node, must not reach the pod. On a tc-only uplink
//! (the default on a veth) nothing legitimately arrives with a node source, so the uplink's
//! tc leaves it to the kernel, which drops it as a martian (before, tc forwarded anything
//! with a node or frontend source, for XDP's benefit).
use lb_tests::*;

/// Sends one UDP datagram as a raw Ethernet frame: `src_ip -> dst_ip:port`, to `dst_mac`,
/// out of the namespace's eth0 (Python, AF_PACKET: the kernel does not check the source).
const SPOOF_PY: &str = r#"
import socket, struct, sys
dst_mac, src_ip, dst_ip, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
src_mac = s.getsockname()[4]
payload = b"spoofed"
udp = struct.pack("!HHHH", 40999, port, 8 + len(payload), 0) + payload
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xffff)
    t += t >> 16
    return ~t & 0xffff
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                 socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex(dst_mac.replace(":", "")) + src_mac + b"\x08\x00" + ip + udp
for _ in range(20):
    s.send(frame)
"#;

/// UDP datagrams the namespace's stack received (`Udp: InDatagrams` of /proc/net/snmp).
fn udp_in(netns: &str) -> u64 {
    let snmp = exec_ok(netns, &["cat", "/proc/net/snmp"]).expect("snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InDatagrams")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[test]
fn a_frame_with_the_nodes_source_from_the_lan_does_not_reach_a_pod() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let mut c = Cluster::up(&spec, |net| seed_manifests(net, &ManifestOpts::default()))
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
                SPOOF_PY,
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
    let before = udp_in(&pod.netns);
    send(c.net.client_addr());
    let honest = udp_in(&pod.netns) - before;
    assert!(
        honest > 0,
        "control: the client's own datagrams never reached the pod"
    );
    let before = udp_in(&pod.netns);
    send(node.addr);
    let spoofed = udp_in(&pod.netns) - before;
    assert_eq!(
        spoofed, 0,
        "{spoofed} datagrams with the node's source reached the pod"
    );
}
