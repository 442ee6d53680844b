//! Remote backends: SNAT to the node, forwarded to the other node (FIB + neighbour), the
//! replies translated back. The SNAT range is one port, so every port decision shows.
use super::*;

/// A TCP flow to a remote pod takes the only SNAT port and keeps backend and port; its
/// reply reaches the client from the NodePort; a second client finds the range exhausted.
#[test]
fn tcp_flow_holds_the_only_snat_port() {
    let Some(_guard) = privileged() else {
        return;
    };
    let remote_reply = from_remote(true);
    let steps = vec![
        case(
            "NodePort TCP SYN -> remote pod via SNAT, XDP_TX to node B",
            syn(40010, NODE, 30081).bytes(),
            to_remote(syn(40010, NODE, 30081)).bytes(),
            XDP_TX,
        ),
        case(
            "remote flow, next packet: conntrack keeps backend and port",
            ack(40010, NODE, 30081).bytes(),
            to_remote(ack(40010, NODE, 30081)).bytes(),
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
        // The uplink's tc translates such a reply the same way when XDP hands it on (or
        // runs without XDP): its reverse entry is live.
        Step::Case {
            desc: "tc uplink: a reply XDP handed on is translated the same way",
            prog: Prog::TcUplink,
            input: remote_reply.bytes(),
            output: Some(
                remote_reply
                    .set_src(NODE, 30081)
                    .set_dst(CLIENT, 40010)
                    .routed(MAC_NODE, MAC_CLIENT)
                    .bytes(),
            ),
            action: TC_ACT_REDIRECT,
        },
    ];
    run_table(steps, SNAT_PORT);
}

/// A UDP flow to a remote pod and its reply; then the next hop's neighbour entry ages out
/// (XDP_TX never refreshes it): XDP hands the packet on untranslated, and the uplink's tc
/// translates it the same way (same backend, same SNAT port) and sends it with the kernel's
/// neighbour resolution.
#[test]
fn udp_flow_across_a_lost_neighbour() {
    let Some(_guard) = privileged() else {
        return;
    };
    let remote_dns_reply = Pkt {
        src: POD_REMOTE_DNS,
        l4: L4::Udp {
            sport: 5353,
            dport: SNAT_PORT,
        },
        ..from_remote(true)
    };
    let steps = vec![
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
        Step::Exec("ip neigh del 172.30.0.3 dev up0"),
        untouched(
            "no neighbour for node B: XDP hands it to tc untranslated",
            udp(40012, NODE, 30054).bytes(),
        ),
        Step::Case {
            desc: "tc uplink: translated, sent with neighbour resolution (MACs left to it)",
            prog: Prog::TcUplink,
            input: udp(40012, NODE, 30054).bytes(),
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
    ];
    run_table(steps, SNAT_PORT);
}
