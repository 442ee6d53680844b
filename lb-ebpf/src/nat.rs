//! Address/port rewriting with incremental checksum updates (RFC 1624), for XDP where the
//! program owns the bytes and no skb checksum state exists.
use lb_common::{PROTO_TCP, PROTO_UDP, csum};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{IP_LEN, IP_OFF, L4_OFF, ptr_at};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Src,
    Dst,
}

/// Rewrites one side (address and port, network order) of an IPv4 TCP/UDP packet.
#[inline(always)]
pub fn rewrite(
    data: usize,
    data_end: usize,
    proto: u8,
    side: Side,
    addr: u32,
    port: u16,
) -> Option<()> {
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, IP_OFF)?;
    // SAFETY: bounds checked by ptr_at; XDP owns the frame.
    let ip = unsafe { &mut *ip };
    let old_addr = match side {
        Side::Src => u32::from_ne_bytes(ip.src_addr),
        Side::Dst => u32::from_ne_bytes(ip.dst_addr),
    };
    ip.check = csum::replace32(u16::from_ne_bytes(ip.check), old_addr, addr).to_ne_bytes();
    match side {
        Side::Src => ip.src_addr = addr.to_ne_bytes(),
        Side::Dst => ip.dst_addr = addr.to_ne_bytes(),
    }
    match proto {
        PROTO_TCP => {
            let tcp: *mut TcpHdr = ptr_at(data, data_end, L4_OFF)?;
            let tcp = unsafe { &mut *tcp };
            let field = match side {
                Side::Src => &mut tcp.source,
                Side::Dst => &mut tcp.dest,
            };
            let old_port = u16::from_ne_bytes(*field);
            *field = port.to_ne_bytes();
            // The TCP checksum covers the pseudo-header, so the address change counts too.
            let c = csum::replace32(u16::from_ne_bytes(tcp.check), old_addr, addr);
            tcp.check = csum::replace16(c, old_port, port).to_ne_bytes();
        }
        PROTO_UDP => {
            let udp: *mut UdpHdr = ptr_at(data, data_end, L4_OFF)?;
            let udp = unsafe { &mut *udp };
            let field = match side {
                Side::Src => &mut udp.src,
                Side::Dst => &mut udp.dst,
            };
            let old_port = u16::from_ne_bytes(*field);
            *field = port.to_ne_bytes();
            let check = u16::from_ne_bytes(udp.check);
            let c = csum::replace32(check, old_addr, addr);
            let c = csum::replace16(c, old_port, port);
            udp.check = csum::udp_fix(check, c).to_ne_bytes();
        }
        _ => return None,
    }
    Some(())
}

/// Decrements the TTL as a router must. Returns false when the packet must not be forwarded
/// by us (TTL would expire): the kernel then sends the ICMP time-exceeded.
#[inline(always)]
pub fn dec_ttl(data: usize, data_end: usize) -> Option<bool> {
    let ip: *mut Ipv4Hdr = ptr_at(data, data_end, IP_OFF)?;
    let ip = unsafe { &mut *ip };
    if ip.ttl <= 1 {
        return Some(false);
    }
    // TTL and protocol share one 16-bit checksum word.
    let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.check = csum::replace16(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
    Some(true)
}

/// Whether the TCP/UDP checksum field holds just the pseudo-header seed, which is what a
/// local sender leaves for checksum offload to complete (the skb is CHECKSUM_PARTIAL). XDP
/// cannot see the skb's checksum state, and the incremental update of `rewrite` is only
/// right for a complete checksum: on a seed it would leave a wrong checksum once a device
/// completes it. Such packets go to tc, whose helpers know the state. A complete checksum
/// equals the seed only by chance (1 in 65,536): such a packet also goes to tc, which
/// translates it correctly too, so the test errs only towards the slower path.
#[inline(always)]
pub fn checksum_is_seed(data: usize, data_end: usize, proto: u8) -> bool {
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, data_end, IP_OFF) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let check_off = match proto {
        PROTO_TCP => L4_OFF + core::mem::offset_of!(TcpHdr, check),
        PROTO_UDP => L4_OFF + core::mem::offset_of!(UdpHdr, check),
        _ => return false,
    };
    let Some(check) = ptr_at::<[u8; 2]>(data, data_end, check_off) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let check = u16::from_ne_bytes(unsafe { *check });
    if proto == PROTO_UDP && check == 0 {
        return false; // no checksum at all: nothing to complete
    }
    let l4_len = u16::from_be_bytes(ip.tot_len).wrapping_sub(IP_LEN as u16);
    let seed = csum::fold(csum::pseudo_header(
        u32::from_ne_bytes(ip.src_addr),
        u32::from_ne_bytes(ip.dst_addr),
        proto,
        l4_len,
    ));
    check == seed
}

#[cfg(test)]
mod tests {
    use etherparse::{SlicedPacket, TransportSlice};

    use super::*;
    use crate::parse::tests::{tcp, udp};

    /// The checksums of the frame's IPv4 header and TCP/UDP segment, recomputed from
    /// scratch, equal the ones in the frame.
    fn assert_checksums(f: &[u8]) {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("not IPv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 checksum");
        let payload = ip.payload().payload;
        match p.transport {
            Some(TransportSlice::Tcp(t)) => {
                let want = t.to_header().calc_checksum_ipv4(&h, t.payload()).unwrap();
                assert_eq!(t.checksum(), want, "TCP checksum");
            }
            Some(TransportSlice::Udp(u)) => {
                let want = u.to_header().calc_checksum_ipv4(&h, &payload[8..]).unwrap();
                assert_eq!(u.checksum(), want, "UDP checksum");
            }
            _ => panic!("not TCP/UDP"),
        }
    }

    fn rewrite_frame(f: &mut [u8], proto: u8, side: Side, addr: [u8; 4], port: u16) {
        let d = f.as_mut_ptr() as usize;
        rewrite(
            d,
            d + f.len(),
            proto,
            side,
            u32::from_ne_bytes(addr),
            port.to_be(),
        )
        .unwrap();
    }

    #[test]
    fn dnat_then_snat_keeps_checksums_valid() {
        for mut f in [tcp(true, b"hello"), tcp(false, &[]), udp(b"query")] {
            let proto = f[IP_OFF + 9];
            rewrite_frame(&mut f, proto, Side::Dst, [10, 244, 1, 5], 8080);
            assert_checksums(&f);
            rewrite_frame(&mut f, proto, Side::Src, [172, 18, 0, 2], 20001);
            assert_checksums(&f);
            assert_eq!(
                &f[IP_OFF + 12..IP_OFF + 20],
                &[172, 18, 0, 2, 10, 244, 1, 5]
            );
            assert_eq!(&f[L4_OFF..L4_OFF + 4], &[0x4e, 0x21, 0x1f, 0x90]);
        }
    }

    #[test]
    fn udp_without_checksum_stays_without() {
        let mut f = udp(b"query");
        f[L4_OFF + 6..L4_OFF + 8].copy_from_slice(&[0, 0]);
        rewrite_frame(&mut f, PROTO_UDP, Side::Dst, [10, 244, 1, 5], 5353);
        assert_eq!(&f[L4_OFF + 6..L4_OFF + 8], &[0, 0]);
    }

    #[test]
    fn other_protocols_and_short_frames_are_refused() {
        let mut f = tcp(true, &[]);
        let d = f.as_mut_ptr() as usize;
        assert!(rewrite(d, d + f.len(), 1, Side::Dst, 0, 0).is_none());
        assert!(rewrite(d, d + L4_OFF + 4, PROTO_TCP, Side::Dst, 0, 0).is_none());
    }

    /// The seed as a local sender leaves it for offload (the kernel's
    /// `~csum_tcpudp_magic(saddr, daddr, len, proto, 0)`), written into the frame.
    fn with_seed(mut f: Vec<u8>) -> Vec<u8> {
        let proto = f[IP_OFF + 9];
        let src = u32::from_ne_bytes(f[IP_OFF + 12..IP_OFF + 16].try_into().unwrap());
        let dst = u32::from_ne_bytes(f[IP_OFF + 16..IP_OFF + 20].try_into().unwrap());
        let len = (f.len() - L4_OFF) as u16;
        let seed = !csum::checksum(&[], csum::pseudo_header(src, dst, proto, len));
        let off = L4_OFF + if proto == PROTO_TCP { 16 } else { 6 };
        f[off..off + 2].copy_from_slice(&seed.to_ne_bytes());
        f
    }

    #[test]
    fn a_seed_is_told_from_a_complete_checksum() {
        for f in [tcp(true, b"hello"), tcp(false, &[]), udp(b"query")] {
            let proto = f[IP_OFF + 9];
            let d = f.as_ptr() as usize;
            assert!(
                !checksum_is_seed(d, d + f.len(), proto),
                "complete checksum"
            );
            let s = with_seed(f);
            let d = s.as_ptr() as usize;
            assert!(checksum_is_seed(d, d + s.len(), proto), "seed");
            // Truncated before the checksum field: not judged.
            assert!(!checksum_is_seed(d, d + L4_OFF + 4, proto));
        }
        let mut none = udp(b"query");
        none[L4_OFF + 6..L4_OFF + 8].copy_from_slice(&[0, 0]);
        let d = none.as_ptr() as usize;
        assert!(!checksum_is_seed(d, d + none.len(), PROTO_UDP));
    }

    #[test]
    fn ttl_decrement_keeps_checksum_and_stops_at_one() {
        let mut f = udp(b"x");
        let d = f.as_mut_ptr() as usize;
        assert_eq!(dec_ttl(d, d + f.len()), Some(true));
        assert_eq!(f[IP_OFF + 8], 63);
        assert_checksums(&f);
        f[IP_OFF + 8] = 1;
        assert_eq!(dec_ttl(d, d + f.len()), Some(false));
        assert_eq!(f[IP_OFF + 8], 1);
    }
}
