//! The north-south hook in every mode with checksum offload on, as kind leaves it: a
//! client's and pods' packets cross the veths as CHECKSUM_PARTIAL (the TCP/UDP checksum
//! field holds only the pseudo-header seed, completed by "hardware" later). The hops
//! where a packet enters its receiver's namespace (the bridge port towards the client, the
//! node side of each pod's veth) complete checksums in software, so a wrong seed turns
//! into a wrong checksum and the receiver drops the packet: a translation that mishandles
//! CHECKSUM_PARTIAL breaks the transfers below.
//!
//! Modes: `auto` (on these veth uplinks: tc ingress alone), `generic` and `native` XDP
//! (which hand seed-checksum packets to tc: XDP cannot see the skb's checksum state).
use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use lb_tests::*;

const T: Duration = Duration::from_secs(5);
const BULK_T: Duration = Duration::from_secs(20);

fn ethtool_tx(netns: &str, iface: &str, on: bool) {
    let v = if on { "on" } else { "off" };
    exec_ok(
        netns,
        &["ethtool", "-K", iface, "tx", v, "tso", v, "gso", v],
    )
    .unwrap_or_else(|e| panic!("ethtool tx {v} on {iface} in {netns}: {e:#}"));
}

/// Offloads as on a kind node (on), except at the hops that hand a packet to its final
/// receiver, which complete (and so expose) the checksum.
fn offloads_like_kind(net: &Network) {
    ethtool_tx(net.client_netns(), UPLINK, true);
    ethtool_tx(net.kind_netns(), CLIENT_KIND_IFACE, false);
    for node in net.nodes() {
        ethtool_tx(&node.netns, &node.uplink, true);
        ethtool_tx(net.kind_netns(), &node.kind_side_iface, true);
    }
    for pod in net.pods() {
        ethtool_tx(&pod.netns, UPLINK, true);
        ethtool_tx(&net.node(&pod.node).netns, &pod.host_iface, false);
    }
}

/// 256 KiB of lines through the echo service (each answered as `<pod> <line>`), compared
/// byte for byte: many full-size segments each way (GSO on), so every one of them must
/// carry a right checksum.
fn echo_bulk(netns: &str, addr: SocketAddrV4) {
    let lines: Vec<Vec<u8>> = (0..2048u32)
        .map(|n| {
            let mut l: Vec<u8> = (0..127u32)
                .map(|i| b'!' + ((n * 31 + i * 7) % 90) as u8)
                .collect();
            l.push(b'\n');
            l
        })
        .collect();
    let sent = lines.concat();
    let got = try_in_netns(netns, || -> anyhow::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr.into(), T)?;
        // Generous: the echo server is a Python loop answering line by line on a machine
        // shared with builds; a wrong checksum stalls the transfer for good, not seconds.
        s.set_read_timeout(Some(BULK_T))?;
        let mut w = s.try_clone()?;
        let data = sent.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&data)?;
            w.shutdown(std::net::Shutdown::Write)
        });
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        writer.join().expect("writer")?;
        Ok(got)
    })
    .and_then(|r| r)
    .unwrap_or_else(|e| panic!("echo through {addr}: {e:#}"));
    let answered: Vec<&[u8]> = got.split_inclusive(|b| *b == b'\n').collect();
    assert_eq!(answered.len(), lines.len(), "echo through {addr}: lines");
    for (i, (a, l)) in answered.iter().zip(&lines).enumerate() {
        assert!(
            a.len() > l.len() && a.ends_with(l) && a[a.len() - l.len() - 1] == b' ',
            "echo through {addr}: line {i} differs"
        );
    }
}

/// Every agent's non-zero counters, for a failure's message.
fn counters(c: &Cluster) -> String {
    c.net
        .nodes()
        .iter()
        .map(|n| match c.agent(&n.name).status() {
            Ok(st) => format!("{}: {:?}", n.name, st.counters),
            Err(e) => format!("{}: {e:#}", n.name),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn run(mode: &str) {
    let spec = TopologySpec::seed();
    let opts = ManifestOpts {
        echo: true,
        udp: true,
        ..Default::default()
    };
    let args = ["--xdp-mode".to_string(), mode.to_string()];
    let mut c = Cluster::up_with_args(
        &spec,
        |net| seed_manifests(net, &opts),
        SourceMode::File,
        &args,
    )
    .expect("cluster up");
    let pods = c.net.pods().len();
    c.wait_for("nginx-service programmed", Duration::from_secs(20), |s| {
        s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == pods)
    })
    .unwrap();
    offloads_like_kind(&c.net);

    let client = c.net.client_netns().to_owned();
    let pod_names: Vec<String> = c.net.pods().iter().map(|p| p.name.clone()).collect();
    for node in c.net.nodes().to_vec() {
        // Enough requests to reach the local pod (if any) and the remote ones.
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..30 {
            let body = http_get(&client, SocketAddrV4::new(node.addr, NGINX_NODE_PORT), T)
                .unwrap_or_else(|e| {
                    panic!(
                        "{mode}: HTTP {i} via {}: {e:#}\n{}",
                        node.name,
                        counters(&c)
                    )
                });
            seen.insert(body.trim().to_string());
        }
        assert_eq!(
            seen.len(),
            pod_names.len(),
            "{mode}: NodePort on {} reached {seen:?}",
            node.name
        );
        let r = udp_request(
            &client,
            SocketAddrV4::new(node.addr, DNS_NODE_PORT),
            b"q",
            T,
        )
        .unwrap_or_else(|e| panic!("{mode}: UDP via {}: {e:#}", node.name));
        assert!(!r.is_empty(), "{mode}: empty UDP reply");
        echo_bulk(&client, SocketAddrV4::new(node.addr, ECHO_NODE_PORT));
    }
    let lb = SocketAddrV4::new(c.net.lb_ips()[0].0, 80);
    for i in 0..10 {
        http_get(&client, lb, T).unwrap_or_else(|e| panic!("{mode}: LB IP request {i}: {e:#}"));
    }

    // The path under test really carried seed checksums, and the mode is what was asked.
    let node = &c.net.nodes()[1].name;
    let st = c.agent(node).status().expect("status");
    let agent = st.agent.expect("agent info");
    let counter = |n: &str| st.counters.get(n).copied().unwrap_or(0);
    match mode {
        "auto" => {
            assert_eq!(agent.xdp_mode, "off", "{}", agent.xdp_mode_reason);
            assert!(counter("tc_uplink_packets") > 0, "{:?}", st.counters);
        }
        m => {
            assert_eq!(agent.xdp_mode, m, "{}", agent.xdp_mode_reason);
            assert!(counter("pass_csum_partial") > 0, "{:?}", st.counters);
        }
    }
}

#[test]
fn checksum_offload_on_auto_mode_tc() {
    let Some(_guard) = privileged() else {
        return;
    };
    run("auto");
}

#[test]
fn checksum_offload_on_generic_xdp() {
    let Some(_guard) = privileged() else {
        return;
    };
    run("generic");
}

#[test]
fn checksum_offload_on_native_xdp() {
    let Some(_guard) = privileged() else {
        return;
    };
    run("native");
}

/// Path MTU discovery through a NodePort: the only endpoint sits behind a 1,200-byte hop
/// (its route on its node: the pod itself still advertises a full-size MSS, so only path
/// MTU discovery can find the limit). The client's full-size segments get "fragmentation
/// needed" and the transfer completes with smaller ones instead of stalling. Endpoint on
/// the entry node: the uplink's tc sends the error (the FIB's MTU check). Endpoint on
/// another node: that node's kernel sends it to the entry node's SNAT address, and the
/// entry node translates it back for the client (RFC 5508).
fn path_mtu(remote: bool) {
    const MTU_NODE_PORT: u16 = 30710;
    let spec = TopologySpec::seed();
    let mut c = Cluster::up(&spec, |net| {
        let pod = net.pods()[0].clone();
        format!(
            "{}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: mtu-echo, namespace: dev}}\n\
             spec:\n  type: NodePort\n  clusterIP: 10.96.100.31\n  ports:\n  - {{name: echo, port: 7000, \
             protocol: TCP, targetPort: {POD_ECHO_PORT}, nodePort: {MTU_NODE_PORT}}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: mtu-echo-1\n  \
             namespace: dev\n  labels: {{kubernetes.io/service-name: mtu-echo}}\naddressType: IPv4\n\
             ports: [{{name: echo, port: {POD_ECHO_PORT}, protocol: TCP}}]\nendpoints:\n- addresses: \
             [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: true}}\n",
            seed_manifests(net, &ManifestOpts::default()),
            pod.addr,
            pod.node
        )
    })
    .expect("cluster up");
    c.wait_for("mtu-echo programmed", Duration::from_secs(20), |s| {
        s.services
            .iter()
            .any(|x| x.name.starts_with("dev/mtu-echo") && x.endpoints.len() == 1)
    })
    .unwrap();
    let pod = c.net.pods()[0].clone();
    let pod_node = c.net.node(&pod.node).clone();
    let entry = if remote {
        c.net
            .nodes()
            .iter()
            .find(|n| n.name != pod.node)
            .expect("another node")
            .clone()
    } else {
        pod_node.clone()
    };
    let dst = format!("{}/32", pod.addr);
    exec_ok(
        &pod_node.netns,
        &[
            "ip",
            "route",
            "replace",
            &dst,
            "dev",
            &pod.host_iface,
            "scope",
            "link",
            "mtu",
            "lock",
            "1200",
        ],
    )
    .unwrap();
    echo_bulk(
        c.net.client_netns(),
        SocketAddrV4::new(entry.addr, MTU_NODE_PORT),
    );
    let st = c.agent(&entry.name).status().expect("status");
    let counter = if remote {
        "icmp_error_translated"
    } else {
        "frag_needed"
    };
    assert!(
        st.counters.get(counter).copied().unwrap_or(0) > 0,
        "no {counter}: {:?}",
        st.counters
    );
}

#[test]
fn path_mtu_behind_the_node() {
    let Some(_guard) = privileged() else {
        return;
    };
    path_mtu(false);
}

#[test]
fn path_mtu_behind_another_node() {
    let Some(_guard) = privileged() else {
        return;
    };
    path_mtu(true);
}

/// Sends, from the namespace's own address, ICMP "fragmentation needed" (next-hop MTU
/// `mtu`) to `frontend`, quoting a UDP datagram `frontend:fport -> client:cport` — what a
/// router before the client sends about a reply too large for its next link.
/// (Run after `PY_CSUM`.)
const FRAG_NEEDED_PY: &str = r#"
import socket, struct, sys
frontend, fport, client, cport, mtu = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 1400, 7, 0x4000, 62, 17, 0,
                 socket.inet_aton(frontend), socket.inet_aton(client))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
quote = ip + struct.pack("!HHHH", fport, cport, 1380, 0)
icmp = struct.pack("!BBHHH", 3, 4, 0, 0, mtu) + quote
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.sendto(icmp, (frontend, 0))
"#;

/// Path MTU towards the client: a router before the client (played by the client itself)
/// answers a reply with "fragmentation needed", addressed to the NodePort's address and
/// quoting the reply as the client received it. The endpoint's kernel must learn the MTU
/// for its peer — the entry node's SNAT address when the endpoint is on another node, the
/// client when it is on the entry node — or it keeps sending what cannot pass.
#[test]
fn path_mtu_towards_the_client() {
    let Some(_guard) = privileged() else {
        return;
    };
    let OneUdpEndpoint {
        c,
        pod,
        remote,
        local,
    } = OneUdpEndpoint::up(&[]).expect("cluster up");
    let client = c.net.client_netns().to_owned();
    let client_addr = c.net.client_addr();
    for (i, (entry, peer, mtu)) in [
        (&remote, remote.addr, 1100u16),
        (&local, client_addr, 1200u16),
    ]
    .into_iter()
    .enumerate()
    {
        let cport = 41_000 + i as u16;
        let at = SocketAddrV4::new(entry.addr, DNS_NODE_PORT);
        in_netns(&client, || {
            let s = std::net::UdpSocket::bind(SocketAddrV4::new(client_addr, cport)).unwrap();
            s.connect(at).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.send(b"q").unwrap();
            let mut buf = [0u8; 2048];
            s.recv(&mut buf).expect("the flow's reply");
        });
        let route = |what: &str| {
            exec_ok(&pod.netns, &["ip", "route", "get", &peer.to_string()])
                .unwrap_or_else(|e| panic!("{what}: ip route get: {e:#}"))
        };
        let before = route("before");
        assert!(!before.contains(&format!("mtu {mtu}")), "{before}");
        exec_ok(
            &client,
            &[
                "python3",
                "-c",
                &format!("{PY_CSUM}{FRAG_NEEDED_PY}"),
                &entry.addr.to_string(),
                &DNS_NODE_PORT.to_string(),
                &client_addr.to_string(),
                &cport.to_string(),
                &mtu.to_string(),
            ],
        )
        .expect("send frag needed");
        let deadline = std::time::Instant::now() + T;
        loop {
            let now = route("after");
            if now.contains(&format!("mtu {mtu}")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "endpoint behind {} never learned MTU {mtu} towards {peer}: {now}\n{}",
                entry.name,
                counters(&c)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
