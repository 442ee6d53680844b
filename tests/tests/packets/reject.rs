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

packet_test!(
    no_reject_towards_an_unanswerable_source,
    Step::Case {
        desc: "no endpoints, UDP from 0.0.0.0 -> dropped, no ICMP (RFC 1122)",
        prog: Prog::Xdp,
        input: udp(40024, NODE, 30091)
            .with(|p| p.src = [0, 0, 0, 0])
            .bytes(),
        output: None,
        action: XDP_DROP,
    }
);

packet_test!(
    no_reject_towards_a_multicast_source,
    Step::Case {
        desc: "no endpoints, TCP SYN from a multicast source -> dropped, no RST",
        prog: Prog::Xdp,
        input: syn(40025, NODE, 30090)
            .with(|p| p.src = [224, 0, 0, 5])
            .bytes(),
        output: None,
        action: XDP_DROP,
    }
);
