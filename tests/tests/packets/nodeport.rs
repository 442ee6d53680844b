//! NodePort, LoadBalancer IP and external IP to a local backend: DNAT, then the kernel
//! forwards; the pod's reply is translated by the tc hook on its interface.
use super::*;

fn to_local(p: Pkt) -> Pkt {
    p.set_dst(POD_LOCAL, 8080)
}

fn to_udp_local(p: Pkt) -> Pkt {
    p.set_dst(POD_LOCAL_DNS, 5353)
}

packet_test!(
    lb_ip_tcp_syn_to_local_pod,
    case(
        "LoadBalancer IP TCP SYN -> local pod",
        syn(40002, LB_IP, 80).bytes(),
        to_local(syn(40002, LB_IP, 80)).bytes(),
        XDP_PASS,
    )
);

packet_test!(
    nodeport_udp_to_local_pod,
    case(
        "NodePort UDP -> local pod",
        udp(40003, NODE, 30053).bytes(),
        to_udp_local(udp(40003, NODE, 30053)).bytes(),
        XDP_PASS,
    )
);

packet_test!(
    external_ip_udp_to_local_pod,
    case(
        "externalIP UDP -> local pod",
        udp(40004, EXT_IP, 53).bytes(),
        to_udp_local(udp(40004, EXT_IP, 53)).bytes(),
        XDP_PASS,
    )
);

packet_test!(udp_without_checksum_keeps_none, {
    let mut udp0 = udp(40102, NODE, 30053).bytes();
    udp0[40..42].copy_from_slice(&[0, 0]); // "no checksum"
    let mut udp0_out = to_udp_local(udp(40102, NODE, 30053)).bytes();
    udp0_out[40..42].copy_from_slice(&[0, 0]);
    case("UDP without checksum keeps none", udp0, udp0_out, XDP_PASS)
});

/// A NodePort TCP flow to a local pod: its packets stay on that pod, the pod's reply gets
/// the NodePort back as source, and the pod's other traffic is not taken for a reply.
#[test]
fn tcp_flow_to_local_pod_and_its_reply() {
    let Some(_guard) = privileged() else {
        return;
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
    let steps = vec![
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
        // The reply of the local pod, translated by the tc hook on its interface.
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
    ];
    run_table(steps, SNAT_PORT);
}
