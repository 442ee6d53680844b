//! No endpoints: rejected like kube-proxy does (TCP RST, ICMP port unreachable), by XDP_TX
//! back to the client.
use super::*;

packet_test!(
    tcp_syn_gets_rst_ack,
    case(
        "no endpoints, TCP SYN -> RST|ACK",
        syn(40020, NODE, 30090).bytes(),
        rst_for(&syn(40020, NODE, 30090)),
        XDP_TX,
    )
);

packet_test!(
    tcp_ack_gets_rst_with_seq_of_ack,
    case(
        "no endpoints, TCP ACK -> RST with seq = ack",
        ack(40021, NODE, 30090).bytes(),
        rst_for(&ack(40021, NODE, 30090)),
        XDP_TX,
    )
);

packet_test!(
    udp_gets_icmp_port_unreachable,
    case(
        "no endpoints, UDP -> ICMP port unreachable",
        udp(40022, NODE, 30091).bytes(),
        icmp_unreachable_for(&udp(40022, NODE, 30091)),
        XDP_TX,
    )
);

packet_test!(
    incoming_rst_is_never_answered,
    Step::Case {
        desc: "no endpoints, incoming RST is never answered",
        prog: Prog::Xdp,
        input: {
            let mut f = ack(40023, NODE, 30090).bytes();
            f[47] = 0x04;
            recompute_tcp(&mut f);
            f
        },
        output: None,
        action: XDP_DROP,
    }
);
