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

/// Rejects are rate-limited per CPU (`REJECTS_PER_SEC`, burst `REJECT_BURST`): a flood of
/// SYNs to a service without endpoints gets RSTs up to the budget, then drops — XDP and
/// tc alike (they share the budget). The run takes far less than the seconds it would take
/// to refill the burst, so the budget must run out.
#[test]
fn rejects_are_rate_limited() {
    let Some(_guard) = privileged() else {
        return;
    };
    let flood = 3 * REJECT_BURST as usize;
    run_table(
        vec![Step::Run(Box::new(move |dp, ifindex| {
            let started = Instant::now();
            let (mut sent, mut dropped) = (0usize, 0usize);
            for i in 0..flood {
                let (prog, answered, refused) = if i % 2 == 0 {
                    (Prog::Xdp, XDP_TX, XDP_DROP)
                } else {
                    (Prog::TcUplink, TC_ACT_REDIRECT, TC_ACT_SHOT)
                };
                let input = syn(10_000 + i as u16, NODE, 30090).bytes();
                let (rc, _) = test_run(dp, &prog, &input, ifindex).expect("test_run");
                if rc == answered {
                    sent += 1;
                } else {
                    assert_eq!(rc, refused, "packet {i}: neither answered nor dropped");
                    dropped += 1;
                }
            }
            let ms = started.elapsed().as_millis() as usize;
            // BPF_PROG_TEST_RUN runs on the calling CPU, but the thread may move between
            // CPUs: at most one burst per CPU, plus what the elapsed time refilled.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let most = cpus * REJECT_BURST as usize + ms * REJECTS_PER_SEC as usize / 1000 * cpus;
            assert!(sent >= REJECT_BURST as usize, "only {sent} rejects sent");
            assert!(
                sent <= most && dropped > 0,
                "{sent} rejects sent, {dropped} dropped in {ms} ms (at most {most})"
            );
            assert_eq!(
                super::fuzz::counter(dp, Counter::RejectRateLimited),
                dropped as u64
            );
        }))],
        SNAT_PORT,
    );
}
