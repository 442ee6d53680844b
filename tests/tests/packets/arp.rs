//! The ARP responder for announced LoadBalancer addresses (MetalLB's L2 mode in the
//! datapath): a request for an address in `XLB_ARP` is answered by XDP_TX with the uplink's
//! MAC while the agent's lease (`XLB_ANNOUNCE_LEASE`) holds; anything else is left to
//! the kernel.
use lb_agent::dataplane::conntrack::monotonic_ms;

use super::*;

/// A pool address no Service holds (not in `XLB_ARP`).
const UNUSED_POOL_IP: [u8; 4] = [172, 30, 255, 210];
/// An address of another node's (not announced here).
const FOREIGN_IP: [u8; 4] = [172, 30, 0, 3];

/// Ethernet + ARP (RFC 826, IPv4 over Ethernet): a fixture written out byte by byte.
pub(super) fn arp_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&eth_dst);
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f
}

/// The client asks who has `ip`.
pub(super) fn who_has(ip: [u8; 4]) -> Vec<u8> {
    arp_frame([0xff; 6], MAC_CLIENT, 1, MAC_CLIENT, CLIENT, [0; 6], ip)
}

/// `XLB_ARP` holds LB_IP; the lease runs `lease_ms` from now (negative: ran out).
pub(super) fn announce(lease_ms: i64) -> Step {
    Step::Maps(
        "announce LB_IP",
        Box::new(move |v| {
            v.arp.insert(u32::from_ne_bytes(LB_IP), 1, 0).unwrap();
            let mut c = v.agent.config.get(&0, 0).unwrap();
            c.mac = MAC_NODE;
            v.agent.config.set(0, c, 0).unwrap();
            let until = (monotonic_ms() as i64 + lease_ms) as u32;
            v.lease.set(0, until, 0).unwrap();
        }),
    )
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

#[test]
fn request_for_an_announced_address_is_answered() {
    let Some(_guard) = privileged() else {
        return;
    };
    run_table(
        vec![
            xdp(
                "before the agent announces anything: left to the kernel",
                who_has(LB_IP),
                None,
                XDP_PASS,
            ),
            announce(3_000),
            xdp(
                "who has LB_IP -> LB_IP is at the node's MAC, to the client",
                who_has(LB_IP),
                Some(arp_frame(
                    MAC_CLIENT, MAC_NODE, 2, MAC_NODE, LB_IP, MAC_CLIENT, CLIENT,
                )),
                XDP_TX,
            ),
            xdp(
                "a pool address no Service holds: no answer",
                who_has(UNUSED_POOL_IP),
                None,
                XDP_PASS,
            ),
            xdp(
                "another node's address: left to the kernel",
                who_has(FOREIGN_IP),
                None,
                XDP_PASS,
            ),
            xdp(
                "an ARP reply is not answered",
                arp_frame(MAC_NODE, MAC_CLIENT, 2, MAC_CLIENT, CLIENT, MAC_NODE, LB_IP),
                None,
                XDP_PASS,
            ),
        ],
        SNAT_PORT,
    );
}

#[test]
fn an_expired_lease_stops_the_answers() {
    let Some(_guard) = privileged() else {
        return;
    };
    run_table(
        vec![
            announce(-1_000),
            xdp(
                "announced, but the agent's lease ran out: no answer",
                who_has(LB_IP),
                None,
                XDP_PASS,
            ),
        ],
        SNAT_PORT,
    );
}
