//! The ARP frame (RFC 826, IPv4 over Ethernet) as the datapath answers it and the agent
//! announces it: offsets, and the gratuitous ARP a node sends when it takes an address over.

/// Ethernet (14 bytes) + ARP for IPv4 over Ethernet (28 bytes).
pub const ARP_FRAME_LEN: usize = 14 + 28;
pub const ETH_P_ARP: u16 = 0x0806;

pub const ETH_DST: usize = 0;
pub const ETH_SRC: usize = 6;
pub const ETH_TYPE: usize = 12;
pub const ARP: usize = 14;
/// Hardware type, protocol type, their lengths, operation.
pub const HTYPE: usize = ARP;
pub const OPER: usize = ARP + 6;
/// Sender hardware and protocol address, target hardware and protocol address.
pub const SHA: usize = ARP + 8;
pub const SPA: usize = ARP + 14;
pub const THA: usize = ARP + 18;
pub const TPA: usize = ARP + 24;
/// htype Ethernet (1), ptype IPv4 (0x0800), hlen 6, plen 4.
pub const IPV4_OVER_ETHERNET: [u8; 6] = [0, 1, 0x08, 0x00, 6, 4];
pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;

/// Writes `v` at `b[to..]` (an indexed loop: what the eBPF verifier follows).
#[inline(always)]
pub fn put<const N: usize>(b: &mut [u8], to: usize, v: &[u8; N]) {
    let mut i = 0;
    while i < N {
        b[to + i] = v[i];
        i += 1;
    }
}

/// A gratuitous ARP (a request for `addr` from `addr`, broadcast) announcing that `addr`
/// is at `mac`: what a node sends when it takes an address over, so neighbours' caches
/// move at once.
pub fn gratuitous(mac: &[u8; 6], addr: [u8; 4]) -> [u8; ARP_FRAME_LEN] {
    let mut b = [0u8; ARP_FRAME_LEN];
    put(&mut b, ETH_DST, &[0xff; 6]);
    put(&mut b, ETH_SRC, mac);
    put(&mut b, ETH_TYPE, &ETH_P_ARP.to_be_bytes());
    put(&mut b, HTYPE, &IPV4_OVER_ETHERNET);
    put(&mut b, OPER, &OP_REQUEST.to_be_bytes());
    put(&mut b, SHA, mac);
    put(&mut b, SPA, &addr);
    put(&mut b, TPA, &addr);
    b
}
