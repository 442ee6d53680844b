//! ARP for the LoadBalancer addresses this node announces (MetalLB's L2 mode, answered by
//! the datapath): a request for an announced address is turned into the reply in place and
//! sent back out of the interface it came in on. Pure functions over the frame's bytes, so
//! the host tests check them; the XDP glue is in `xdp.rs`, the layout and the gratuitous
//! ARP the agent sends in `lb_common::arp`.
pub use lb_common::arp::{ARP_FRAME_LEN, ETH_P_ARP};
use lb_common::arp::{
    ETH_DST, ETH_SRC, ETH_TYPE, HTYPE, IPV4_OVER_ETHERNET, OP_REPLY, OP_REQUEST, OPER, SHA, SPA,
    THA, TPA, put,
};

#[inline(always)]
fn copy<const N: usize>(b: &mut [u8], to: usize, from: usize) {
    let mut i = 0;
    while i < N {
        b[to + i] = b[from + i];
        i += 1;
    }
}

/// The target address of an ARP request for an IPv4 address over Ethernet (network
/// order, as a `u32` of its bytes), or `None` for anything else (replies, other protocols,
/// a gratuitous request for the sender's own address).
#[inline(always)]
pub fn request_target(b: &[u8; ARP_FRAME_LEN]) -> Option<u32> {
    if u16::from_be_bytes([b[ETH_TYPE], b[ETH_TYPE + 1]]) != ETH_P_ARP {
        return None;
    }
    let mut i = 0;
    while i < IPV4_OVER_ETHERNET.len() {
        if b[HTYPE + i] != IPV4_OVER_ETHERNET[i] {
            return None;
        }
        i += 1;
    }
    if u16::from_be_bytes([b[OPER], b[OPER + 1]]) != OP_REQUEST {
        return None;
    }
    let tpa = [b[TPA], b[TPA + 1], b[TPA + 2], b[TPA + 3]];
    let spa = [b[SPA], b[SPA + 1], b[SPA + 2], b[SPA + 3]];
    if tpa == spa {
        return None;
    }
    Some(u32::from_ne_bytes(tpa))
}

/// Rewrites a request (checked by [`request_target`]) into the reply "target is at `mac`",
/// addressed to the requester.
#[inline(always)]
pub fn make_reply(b: &mut [u8; ARP_FRAME_LEN], mac: &[u8; 6]) {
    copy::<6>(b, ETH_DST, SHA);
    put(b, ETH_SRC, mac);
    put(b, OPER, &OP_REPLY.to_be_bytes());
    // Target becomes the requester; sender is us, at the address asked for.
    copy::<6>(b, THA, SHA);
    let asked = [b[TPA], b[TPA + 1], b[TPA + 2], b[TPA + 3]];
    copy::<4>(b, TPA, SPA);
    put(b, SHA, mac);
    put(b, SPA, &asked);
}

#[cfg(test)]
mod tests {
    use etherparse_arp::{ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header};

    use lb_common::arp::ARP;

    use super::*;

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x64];
    const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const CLIENT: [u8; 4] = [172, 18, 0, 100];
    const LB: [u8; 4] = [172, 18, 255, 200];

    fn request(op: ArpOperation, sender: [u8; 4], target: [u8; 4]) -> [u8; ARP_FRAME_LEN] {
        let eth = Ethernet2Header {
            source: CLIENT_MAC,
            destination: [0xff; 6],
            ether_type: EtherType::ARP,
        };
        let arp = ArpPacket::new(
            ArpHardwareId::ETHERNET,
            EtherType::IPV4,
            op,
            &CLIENT_MAC,
            &sender,
            &[0; 6],
            &target,
        )
        .unwrap();
        let mut v = eth.to_bytes().to_vec();
        v.extend_from_slice(&arp.to_bytes());
        v.try_into().unwrap()
    }

    #[test]
    fn request_becomes_the_reply_to_the_requester() {
        let mut b = request(ArpOperation::REQUEST, CLIENT, LB);
        assert_eq!(request_target(&b), Some(u32::from_ne_bytes(LB)));
        make_reply(&mut b, &OUR_MAC);
        let (eth, rest) = Ethernet2Header::from_slice(&b).unwrap();
        assert_eq!(
            (eth.destination, eth.source, eth.ether_type),
            (CLIENT_MAC, OUR_MAC, EtherType::ARP)
        );
        let arp = ArpPacket::from_slice(rest).unwrap();
        assert_eq!(arp.operation, ArpOperation::REPLY);
        assert_eq!(arp.sender_hw_addr(), &OUR_MAC);
        assert_eq!(arp.sender_protocol_addr(), &LB);
        assert_eq!(arp.target_hw_addr(), &CLIENT_MAC);
        assert_eq!(arp.target_protocol_addr(), &CLIENT);
    }

    #[test]
    fn replies_gratuitous_requests_and_other_frames_are_not_requests() {
        assert_eq!(
            request_target(&request(ArpOperation::REPLY, CLIENT, LB)),
            None
        );
        assert_eq!(
            request_target(&request(ArpOperation::REQUEST, LB, LB)),
            None
        );
        let mut ipv4 = request(ArpOperation::REQUEST, CLIENT, LB);
        ipv4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(request_target(&ipv4), None);
        let mut ipv6_arp = request(ArpOperation::REQUEST, CLIENT, LB);
        ipv6_arp[ARP + 2..ARP + 4].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(request_target(&ipv6_arp), None);
    }

    #[test]
    fn gratuitous_arp_shape() {
        let b = lb_common::arp::gratuitous(&OUR_MAC, LB);
        let (eth, rest) = Ethernet2Header::from_slice(&b).unwrap();
        assert_eq!((eth.destination, eth.source), ([0xff; 6], OUR_MAC));
        let arp = ArpPacket::from_slice(rest).unwrap();
        assert_eq!(arp.operation, ArpOperation::REQUEST);
        assert_eq!(arp.sender_protocol_addr(), &LB);
        assert_eq!(arp.target_protocol_addr(), &LB);
        assert_eq!(arp.sender_hw_addr(), &OUR_MAC);
    }
}
