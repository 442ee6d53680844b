//! Fragments of translated datagrams (frag.rs): the first fragment is translated with its
//! ports and remembered by (addresses, IP id, protocol); later fragments, which have no
//! ports, get the same translation through it. XDP hands every fragment to the uplink's tc.
use super::tc_uplink::tc;
use super::*;

/// L4 bytes in the first fragment (a multiple of 8, as fragment offsets count in 8 bytes).
const FIRST_L4: usize = 16;

/// `frame` (Ethernet + 20-byte IPv4 header, DF cleared) cut after `FIRST_L4` bytes of its
/// IP payload: the first fragment (more fragments, offset 0) and the last one, each with
/// its length and header checksum set, as a sender's IP layer cuts it. Cutting the
/// translated datagram the same way gives what the program must make of each fragment: the
/// first fragment's L4 checksum is the whole datagram's.
fn cut(frame: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let (eth_ip, l4) = frame.split_at(34);
    let piece = |flags_offset: u16, data: &[u8]| {
        let mut f = eth_ip.to_vec();
        f[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        f[20..22].copy_from_slice(&flags_offset.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let c = csum::checksum(&f[14..34], 0);
        f[24..26].copy_from_slice(&c.to_ne_bytes());
        f.extend_from_slice(data);
        f
    };
    (
        piece(0x2000, &l4[..FIRST_L4]),
        piece((FIRST_L4 / 8) as u16, &l4[FIRST_L4..]),
    )
}

/// A UDP packet as a fragment-able datagram: DF clear, as a sender fragmenting it has it.
fn datagram(p: Pkt) -> Vec<u8> {
    let mut f = p.bytes();
    f[20] &= !0x40;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&f[14..34], 0);
    f[24..26].copy_from_slice(&c.to_ne_bytes());
    f
}

/// The remote DNS pod's reply to the node's SNAT port.
fn dns_reply() -> Pkt {
    udp(5353, NODE, SNAT_PORT).with(|p| {
        p.src = POD_REMOTE_DNS;
        p.smac = MAC_NODE_B;
        p.ttl = 63;
    })
}

/// `p` (client -> NodePort 30054) as sent to the remote DNS pod through the SNAT port.
fn to_remote_dns(p: Pkt) -> Pkt {
    p.set_dst(POD_REMOTE_DNS, 5353)
        .set_src(NODE, SNAT_PORT)
        .routed(MAC_NODE, MAC_NODE_B)
}

/// A fragmented request and a fragmented reply of one UDP flow through a NodePort to a
/// backend on another node: every fragment translated; a later fragment whose first one
/// was not translated is left to the kernel.
#[test]
fn fragments_of_a_nodeport_udp_flow_are_translated() {
    let Some(_guard) = privileged() else {
        return;
    };
    let req = udp(40301, NODE, 30054);
    let (req1, req2) = cut(&datagram(udp(40301, NODE, 30054)));
    let (want_req1, want_req2) = cut(&datagram(to_remote_dns(udp(40301, NODE, 30054))));
    let reply = || dns_reply().set_src(POD_REMOTE_DNS, 5353);
    let (rep1, rep2) = cut(&datagram(reply()));
    let to_client = |p: Pkt| {
        p.set_src(NODE, 30054)
            .set_dst(CLIENT, 40301)
            .routed(MAC_NODE, MAC_CLIENT)
    };
    let (want_rep1, want_rep2) = cut(&datagram(to_client(reply())));
    // The same reply's later fragment under another IP id: its first fragment never came.
    let mut orphan = rep2.clone();
    orphan[18..20].copy_from_slice(&0x4321u16.to_be_bytes());
    orphan[24..26].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&orphan[14..34], 0);
    orphan[24..26].copy_from_slice(&c.to_ne_bytes());
    run_table(
        vec![
            Step::Case {
                desc: "XDP: a first fragment -> handed to tc untouched",
                prog: Prog::Xdp,
                input: req1.clone(),
                output: None,
                action: XDP_PASS,
            },
            Step::Case {
                desc: "XDP: a later fragment -> handed to tc untouched",
                prog: Prog::Xdp,
                input: req2.clone(),
                output: None,
                action: XDP_PASS,
            },
            tc(
                "tc uplink: a later fragment before its first one -> to the kernel",
                req2.clone(),
                None,
                TC_ACT_OK,
            ),
            tc(
                "tc uplink: request's first fragment -> remote pod via SNAT, ports and checksum",
                req1,
                Some(want_req1),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: request's later fragment -> the same backend, addresses only",
                req2,
                Some(want_req2),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: an unfragmented request of the flow -> the same backend",
                req.bytes(),
                Some(to_remote_dns(udp(40301, NODE, 30054)).bytes()),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: reply's first fragment -> client, from the NodePort",
                rep1,
                Some(want_rep1),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: reply's later fragment -> client, from the node",
                rep2,
                Some(want_rep2),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: a later fragment of a datagram never seen -> to the kernel",
                orphan,
                None,
                TC_ACT_OK,
            ),
        ],
        SNAT_PORT,
    );
}

/// The fragment memory is keyed by the whole datagram identity: the same IP id from
/// another source is not the translated datagram's.
#[test]
fn a_later_fragment_from_another_source_is_not_translated() {
    let Some(_guard) = privileged() else {
        return;
    };
    let (req1, req2) = cut(&datagram(udp(40302, NODE, 30054)));
    let (want_req1, _) = cut(&datagram(to_remote_dns(udp(40302, NODE, 30054))));
    let mut spoofed = req2.clone();
    spoofed[26..30].copy_from_slice(&[172, 30, 0, 101]);
    spoofed[24..26].copy_from_slice(&[0, 0]);
    let c = csum::checksum(&spoofed[14..34], 0);
    spoofed[24..26].copy_from_slice(&c.to_ne_bytes());
    run_table(
        vec![
            tc(
                "tc uplink: request's first fragment -> remote pod",
                req1,
                Some(want_req1),
                TC_ACT_REDIRECT,
            ),
            tc(
                "tc uplink: a later fragment, same id, other source -> to the kernel",
                spoofed,
                None,
                TC_ACT_OK,
            ),
        ],
        SNAT_PORT,
    );
}
