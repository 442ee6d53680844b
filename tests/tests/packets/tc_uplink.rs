//! The uplink's tc ingress program as the whole north-south path (an uplink without XDP:
//! `--xdp-mode off`, and `auto` on a veth), and as the path behind XDP for what XDP hands
//! on. The decisions are XDP's; what differs is how a packet leaves: a local pod's packet is
//! routed by the program itself (MACs of the pod's interface, TTL decremented) instead of
//! being handed to the kernel, and everything sent out is a redirect.
use super::arp::{announce, arp_frame, who_has};
use super::*;

pub(super) fn tc(desc: &'static str, input: Vec<u8>, output: Option<Vec<u8>>, action: u32) -> Step {
    Step::Case {
        desc,
        prog: Prog::TcUplink,
        input,
        output,
        action,
    }
}

/// `p` DNATed to the local web pod and routed into its interface.
fn to_local_routed(p: Pkt) -> Pkt {
    p.set_dst(POD_LOCAL, 8080).routed(MAC_POD_IF, MAC_POD_LOCAL)
}

packet_test!(
    tc_nodeport_tcp_to_local_pod,
    tc(
        "tc uplink: NodePort TCP SYN -> local pod, routed into its interface",
        syn(40201, NODE, 30080).bytes(),
        Some(to_local_routed(syn(40201, NODE, 30080)).bytes()),
        TC_ACT_REDIRECT,
    )
);

packet_test!(
    tc_lb_ip_to_local_pod,
    tc(
        "tc uplink: LoadBalancer IP TCP SYN -> local pod",
        syn(40202, LB_IP, 80).bytes(),
        Some(to_local_routed(syn(40202, LB_IP, 80)).bytes()),
        TC_ACT_REDIRECT,
    )
);

/// A flow to a remote pod through the only SNAT port and its reply, as XDP does them.
#[test]
fn tc_remote_flow_and_reply() {
    let Some(_guard) = privileged() else {
        return;
    };
    let remote_reply = from_remote(true).set_dst(NODE, SNAT_PORT);
    run_table(
        vec![
            tc(
                "tc uplink: NodePort TCP SYN -> remote pod via SNAT",
                syn(40210, NODE, 30081).bytes(),
                Some(to_remote(syn(40210, NODE, 30081)).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: next packet keeps backend and SNAT port",
                ack(40210, NODE, 30081).bytes(),
                Some(to_remote(ack(40210, NODE, 30081)).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: reply from the remote pod -> client sees the NodePort",
                remote_reply.bytes(),
                Some(to_client(remote_reply, 40210).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: SNAT range exhausted -> dropped",
                syn(40211, NODE, 30081).bytes(),
                None,
                TC_ACT_SHOT,
            ),
        ],
        SNAT_PORT,
    );
}

packet_test!(
    tc_service_without_endpoints_rst,
    tc(
        "tc uplink: TCP to a service without endpoints -> RST to the client",
        syn(40220, NODE, 30090).bytes(),
        Some(rst_for(&syn(40220, NODE, 30090))),
        TC_ACT_REDIRECT,
    )
);

packet_test!(
    tc_service_without_endpoints_icmp,
    tc(
        "tc uplink: UDP to a service without endpoints -> ICMP port unreachable",
        udp(40221, NODE, 30091).bytes(),
        Some(icmp_unreachable_for(&udp(40221, NODE, 30091))),
        TC_ACT_REDIRECT,
    )
);

packet_test!(
    tc_source_ranges_drop_client_outside,
    tc(
        "tc uplink: LB IP with source ranges, client outside them -> dropped",
        syn(40230, LB_IP_RANGED, 80)
            .with(|p| p.src = [172, 30, 1, 5])
            .bytes(),
        None,
        TC_ACT_SHOT,
    )
);

packet_test!(
    tc_unallocated_service_cidr_dropped,
    tc(
        "tc uplink: service-CIDR address no Service holds -> dropped",
        syn(40231, [10, 96, 0, 99], 80).bytes(),
        None,
        TC_ACT_SHOT,
    )
);

packet_test!(
    tc_frame_for_another_host_untouched,
    tc(
        "tc uplink: NodePort SYN in a frame for another host's MAC -> left to the kernel",
        syn(40232, NODE, 30080)
            .with(|p| p.dmac = [0x02, 0, 0, 0, 0, 0x77])
            .bytes(),
        None,
        TC_ACT_OK,
    )
);

packet_test!(
    tc_not_a_service_untouched,
    tc(
        "tc uplink: TCP to a node port no service uses -> left to the kernel",
        syn(40233, NODE, 22).bytes(),
        None,
        TC_ACT_OK,
    )
);

#[test]
fn tc_answers_arp_for_announced_addresses() {
    let Some(_guard) = privileged() else {
        return;
    };
    run_table(
        vec![
            tc(
                "tc uplink: nothing announced yet -> left to the kernel",
                who_has(LB_IP),
                None,
                TC_ACT_OK,
            ),
            announce(3_000),
            tc(
                "tc uplink: who has LB_IP -> the node's MAC, back to the client",
                who_has(LB_IP),
                Some(arp_frame(
                    MAC_CLIENT, MAC_NODE, 2, MAC_NODE, LB_IP, MAC_CLIENT, CLIENT,
                )),
                TC_ACT_REDIRECT,
            ),
        ],
        SNAT_PORT,
    );
}

/// A TCP SYN whose checksum field holds only the pseudo-header seed, as a process on the
/// other end of a veth leaves it for offload (CHECKSUM_PARTIAL).
fn with_seed_checksum(p: Pkt) -> Vec<u8> {
    let mut f = p.bytes();
    let src = u32::from_ne_bytes(f[26..30].try_into().unwrap());
    let dst = u32::from_ne_bytes(f[30..34].try_into().unwrap());
    let seed = !csum::checksum(
        &[],
        csum::pseudo_header(src, dst, PROTO_TCP, (f.len() - 34) as u16),
    );
    f[50..52].copy_from_slice(&seed.to_ne_bytes());
    f
}

packet_test!(
    xdp_hands_seed_checksums_to_tc,
    Step::Case {
        desc: "XDP: a NodePort SYN with a seed checksum (CHECKSUM_PARTIAL) -> untouched, to tc",
        prog: Prog::Xdp,
        input: with_seed_checksum(syn(40240, NODE, 30081)),
        output: None,
        action: XDP_PASS,
    }
);

// Nothing arrives at the uplink's tc translated (XDP hands on what it cannot send
// untranslated), so a packet from the wire with the node's (SNAT) address as source is
// spoofed: left to the kernel, never forwarded — with or without XDP in front.
packet_test!(
    tc_does_not_forward_spoofed_node_sources,
    tc(
        "tc uplink: a packet from the wire with the node's source -> to the kernel",
        udp(40250, POD_REMOTE_DNS, 5353)
            .with(|p| p.src = NODE)
            .bytes(),
        None,
        TC_ACT_OK,
    )
);

/// The ICMP time exceeded a router sends for `p` (RFC 1812): from the address `p` was sent
/// to, quoting `p`'s IPv4 header and 8 bytes as received.
fn time_exceeded_for(p: &Pkt) -> Vec<u8> {
    let input = p.bytes();
    let mut ip =
        etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::ICMP, p.dst, p.src).unwrap();
    ip.identification = 0;
    ip.dont_fragment = false;
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(p.dmac, p.smac)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(
            etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit,
        ))
        .write(&mut out, &input[14..42])
        .unwrap();
    out
}

#[test]
fn an_expiring_ttl_gets_time_exceeded() {
    let Some(_guard) = privileged() else {
        return;
    };
    let last_hop = |sport| syn(sport, NODE, 30081).with(|p| p.ttl = 1);
    run_table(
        vec![
            Step::Case {
                desc: "XDP: NodePort SYN to a remote pod with TTL 1 -> time exceeded",
                prog: Prog::Xdp,
                input: last_hop(40260).bytes(),
                output: Some(time_exceeded_for(&last_hop(40260))),
                action: XDP_TX,
            },
            tc(
                "tc uplink: the same -> time exceeded back out of the uplink",
                last_hop(40261).bytes(),
                Some(time_exceeded_for(&last_hop(40261))),
                TC_ACT_REDIRECT,
            ),
        ],
        SNAT_PORT + 8,
    );
}

#[test]
fn too_large_for_the_next_hop_gets_frag_needed() {
    let Some(_guard) = privileged() else {
        return;
    };
    // 1,200 bytes of payload towards the local pod, whose interface now has MTU 1,000.
    let payload = vec![0x61u8; 1200];
    let frame = |sport: u16| {
        let mut t = etherparse::TcpHeader::new(sport, 30080, 1000, 64240);
        t.ack = true;
        t.acknowledgment_number = 5000;
        let mut ip =
            etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, CLIENT, NODE).unwrap();
        ip.identification = 0x1234;
        ip.dont_fragment = true;
        let mut out = Vec::new();
        etherparse::PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE)
            .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
            .tcp_header(t)
            .write(&mut out, &payload)
            .unwrap();
        out
    };
    let input = frame(40270);
    let mut ip =
        etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::ICMP, NODE, CLIENT).unwrap();
    ip.identification = 0;
    ip.dont_fragment = false;
    let mut want = Vec::new();
    etherparse::PacketBuilder::ethernet2(MAC_NODE, MAC_CLIENT)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1000 },
        ))
        .write(&mut want, &input[14..42])
        .unwrap();
    run_table(
        vec![
            Step::Exec("ip link set pod0 mtu 1000"),
            tc(
                "tc uplink: 1,240-byte DF segment for a 1,000-byte hop -> fragmentation needed, MTU 1000",
                input,
                Some(want),
                TC_ACT_REDIRECT,
            ),
        ],
        SNAT_PORT,
    );
}

/// An ICMP "fragmentation needed" (MTU 1000) from `src` (MACs `smac -> dmac`) to `dst`,
/// quoting `quoted`'s IPv4 header and 8 bytes.
fn frag_needed_about(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    quoted: &Pkt,
) -> Vec<u8> {
    let q = quoted.bytes();
    let mut ip = etherparse::Ipv4Header::new(0, ttl, etherparse::IpNumber::ICMP, src, dst).unwrap();
    ip.identification = 0x4321;
    let mut out = Vec::new();
    etherparse::PacketBuilder::ethernet2(smac, dmac)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1000 },
        ))
        .write(&mut out, &q[14..42])
        .unwrap();
    out
}

/// Path MTU to a remote backend: the backend's node answers our SNATed segment with
/// "fragmentation needed"; the client gets it from the NodePort, quoting its own segment.
#[test]
fn an_icmp_error_about_a_snat_flow_reaches_its_client() {
    let Some(_guard) = privileged() else {
        return;
    };
    let first = syn(40280, NODE, 30081);
    let node_b = [172, 30, 0, 3];
    run_table(
        vec![
            tc(
                "tc uplink: NodePort SYN -> remote pod via SNAT",
                first.bytes(),
                Some(to_remote(first).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: frag needed from node B about it -> to the client, from the NodePort",
                frag_needed_about(MAC_NODE_B, MAC_NODE, node_b, NODE, 64, &to_remote(first)),
                Some(frag_needed_about(
                    MAC_NODE,
                    MAC_CLIENT,
                    NODE,
                    CLIENT,
                    63,
                    &first.with(|p| p.ttl = 63),
                )),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: an error quoting a flow that is not ours -> left to the kernel",
                frag_needed_about(
                    MAC_NODE_B,
                    MAC_NODE,
                    node_b,
                    NODE,
                    64,
                    &to_remote(syn(40281, NODE, 30081)).set_src(NODE, SNAT_PORT - 1),
                ),
                None,
                TC_ACT_OK,
            ),
        ],
        SNAT_PORT,
    );
}

/// Path MTU towards the client (large downloads through a smaller link near it): the
/// client, or a router before it, answers our reply with "fragmentation needed", addressed
/// to the frontend and quoting the reply as we sent it. The backend gets it about its own
/// packet: through the SNAT address for a remote backend, with the sender's address kept
/// for a local one.
#[test]
fn an_icmp_error_about_a_reply_reaches_its_backend() {
    let Some(_guard) = privileged() else {
        return;
    };
    let remote = syn(40290, NODE, 30081);
    let remote_reply = from_remote(true).with(|p| p.ttl = 62);
    let local = syn(40291, NODE, 30080);
    let local_reply = syn(8080, CLIENT, 40291).with(|p| {
        p.src = POD_LOCAL;
        p.ttl = 62;
    });
    run_table(
        vec![
            tc(
                "tc uplink: NodePort SYN -> remote pod via SNAT",
                remote.bytes(),
                Some(to_remote(remote).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: frag needed from the client about the reply -> the remote pod",
                frag_needed_about(
                    MAC_CLIENT,
                    MAC_NODE,
                    CLIENT,
                    NODE,
                    64,
                    &to_client(from_remote(true), 40290).with(|p| p.ttl = 62),
                ),
                Some(frag_needed_about(
                    MAC_NODE,
                    MAC_NODE_B,
                    NODE,
                    POD_REMOTE,
                    63,
                    &remote_reply,
                )),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: NodePort SYN -> local pod",
                local.bytes(),
                Some(to_local_routed(local).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: frag needed from the client about the local pod's reply -> the pod",
                frag_needed_about(
                    MAC_CLIENT,
                    MAC_NODE,
                    CLIENT,
                    NODE,
                    64,
                    &local_reply.set_src(NODE, 30080),
                ),
                Some(frag_needed_about(
                    MAC_POD_IF,
                    MAC_POD_LOCAL,
                    CLIENT,
                    POD_LOCAL,
                    63,
                    &local_reply,
                )),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: an error about a reply of no flow -> left to the kernel",
                frag_needed_about(
                    MAC_CLIENT,
                    MAC_NODE,
                    CLIENT,
                    NODE,
                    64,
                    &local_reply.set_src(NODE, 30080).set_dst(CLIENT, 40299),
                ),
                None,
                TC_ACT_OK,
            ),
        ],
        SNAT_PORT,
    );
}

/// `frame` with four NOP IPv4 options inserted (length and header checksum fixed).
fn with_ip_options(mut frame: Vec<u8>) -> Vec<u8> {
    frame.splice(34..34, [1, 1, 1, 1]);
    frame[14] = 0x46;
    let len = (frame.len() - 14) as u16;
    frame[16..18].copy_from_slice(&len.to_be_bytes());
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&frame[14..38], 0);
    frame[24..26].copy_from_slice(&c.to_ne_bytes());
    frame
}

/// Packets with IPv4 options: XDP hands them to tc, which removes the options and then
/// translates (or answers) them like any other.
#[test]
fn ip_options_are_removed_and_the_packet_translated() {
    let Some(_guard) = privileged() else {
        return;
    };
    run_table(
        vec![
            Step::Case {
                desc: "XDP: NodePort SYN with IPv4 options -> handed to tc untouched",
                prog: Prog::Xdp,
                input: with_ip_options(syn(40295, NODE, 30080).bytes()),
                output: None,
                action: XDP_PASS,
            },
            tc(
                "tc uplink: NodePort SYN with IPv4 options -> local pod, options removed",
                with_ip_options(syn(40295, NODE, 30080).bytes()),
                Some(to_local_routed(syn(40295, NODE, 30080)).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: the flow's next packet with options -> the same pod",
                with_ip_options(ack(40295, NODE, 30080).bytes()),
                Some(to_local_routed(ack(40295, NODE, 30080)).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: SYN with options to a service without endpoints -> RST",
                with_ip_options(syn(40296, NODE, 30090).bytes()),
                Some(rst_for(&syn(40296, NODE, 30090))),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: options to the node's own port -> left to the kernel as they are",
                with_ip_options(syn(40297, NODE, 22).bytes()),
                None,
                TC_ACT_OK,
            ),
        ],
        SNAT_PORT,
    );
}
