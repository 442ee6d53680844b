//! ClusterIP from a pod (tc on the pod's interface): source kept, DNAT, sent on; replies
//! get the ClusterIP back (on the pod's interface, or on the uplink for remote backends).
use super::*;

packet_test!(
    unused_port_gets_rst,
    tc(
        "tc: unused ClusterIP port -> RST back into the pod",
        from_pod(45002, CLUSTER_IP, 81).bytes(),
        Some(rst_for(&from_pod(45002, CLUSTER_IP, 81))),
        TC_ACT_REDIRECT,
    )
);

packet_test!(
    no_endpoints_udp_gets_icmp_port_unreachable,
    tc(
        "tc: ClusterIP without endpoints, UDP -> ICMP port unreachable",
        udp_from_pod(45003, CLUSTER_IP_EMPTY, 53).bytes(),
        Some(icmp_unreachable_for(&udp_from_pod(
            45003,
            CLUSTER_IP_EMPTY,
            53,
        ))),
        TC_ACT_REDIRECT,
    )
);

packet_test!(
    internal_traffic_policy_local_without_local_endpoint_drops,
    tc(
        "tc: internalTrafficPolicy Local without a local endpoint -> drop",
        from_pod(45004, CLUSTER_IP_ITP_LOCAL, 80).bytes(),
        None,
        TC_ACT_SHOT,
    )
);

packet_test!(
    pod_traffic_to_elsewhere_is_untouched,
    tc(
        "tc: pod traffic to elsewhere is untouched",
        from_pod(45005, [192, 0, 2, 1], 443).bytes(),
        None,
        TC_ACT_OK,
    )
);

/// A pod's flow to a ClusterIP with a local backend: DNAT with the pod's source kept, and
/// the backend's reply gets the ClusterIP back.
#[test]
fn local_backend_flow_and_its_reply() {
    let Some(_guard) = privileged() else {
        return;
    };
    let steps = vec![
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
    ];
    run_table(steps, SNAT_PORT);
}

/// A pod's flow to a ClusterIP with a remote backend: no SNAT, sent to node B; XDP leaves
/// the reply to the uplink's tc, which translates it and delivers it into the pod.
#[test]
fn remote_backend_flow_and_its_reply_on_the_uplink() {
    let Some(_guard) = privileged() else {
        return;
    };
    let steps = vec![
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
    ];
    run_table(steps, SNAT_PORT);
}

/// Hairpin: a pod reaching itself through the ClusterIP is SNATed to the node, and the
/// reply goes back to the pod from the ClusterIP.
#[test]
fn hairpin_flow_and_its_reply() {
    let Some(_guard) = privileged() else {
        return;
    };
    let steps = vec![
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
    ];
    run_table(steps, SNAT_PORT);
}

pub(super) fn tc(desc: &'static str, input: Vec<u8>, output: Option<Vec<u8>>, action: u32) -> Step {
    Step::Case {
        desc,
        prog: Prog::TcPod,
        input,
        output,
        action,
    }
}

/// A TCP SYN from the local client pod, as it leaves the pod.
pub(super) fn from_pod(sport: u16, dst: [u8; 4], dport: u16) -> Pkt {
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
