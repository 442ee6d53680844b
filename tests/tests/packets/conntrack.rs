//! Connection tracking: flows kept on their backend across an endpoint change until it has
//! drained, and a flow's state across its life with the SNAT port it holds.
use super::*;

/// Endpoint A replaced by B: established flows stay on A while it drains, new flows go to
/// B, and once A has drained away its flows are re-balanced to B.
#[test]
fn endpoint_change_keeps_flows_until_drained() {
    let Some(_guard) = privileged() else {
        return;
    };
    let steps = vec![
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
    ];
    run_table(steps, SNAT_PORT);
}

/// Conntrack and SNAT ports: a flow's state across its life (SYN, reply, confirmation,
/// FIN, RST), ports given back, reverse entries that vanish, mid-stream segments, and
/// reverse NAT ahead of frontends. The SNAT range is one port, so every port decision is
/// visible in the packets.
#[test]
fn flow_states_and_snat_ports() {
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

/// A client tuple already in a live flow to a backend cannot be taken by a new flow through
/// another frontend of the same backend (a guessed or spoofed tuple would otherwise redirect
/// the live flow's replies); once that flow is over, the tuple is free again.
#[test]
fn a_live_flows_backend_tuple_is_not_taken_over() {
    let Some(_guard) = privileged() else {
        return;
    };
    let to_pod = |p: Pkt| p.set_dst(POD_LOCAL, 8080);
    run_table(
        vec![
            case(
                "client:41100 -> NodePort 30080 -> local pod",
                syn(41100, NODE, 30080).bytes(),
                to_pod(syn(41100, NODE, 30080)).bytes(),
                XDP_PASS,
            ),
            xdp(
                "the same client:41100 -> LB IP of the same service: tuple in use, dropped",
                syn(41100, LB_IP, 80).bytes(),
                None,
                XDP_DROP,
            ),
            check("the first flow is over", |v| {
                let k = tcp_key(41100, NODE, 30080);
                let _ = v.ct.remove(&k);
                let _ = v.ct_new.remove(&k);
            }),
            case(
                "now the LB IP flow takes the tuple",
                syn(41100, LB_IP, 80).bytes(),
                to_pod(syn(41100, LB_IP, 80)).bytes(),
                XDP_PASS,
            ),
        ],
        SNAT_PORT,
    );
}
