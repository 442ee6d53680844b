//! ICMP errors about a translated flow (RFC 5508): the quoted packet is the one the node sent
//! (after translation), so the error must be translated back, outer and inner headers, for
//! the host whose flow it is. Pure functions over a fixed-size frame prefix: Ethernet, IPv4
//! (no options), ICMP header, the quoted IPv4 header (no options) and its first 8 bytes.
use lb_common::{PROTO_ICMP, PROTO_TCP, PROTO_UDP, csum};

/// The frame prefix an ICMP error about a TCP/UDP packet needs (14 + 20 + 8 + 20 + 8).
pub const ICMP_ERR_LEN: usize = 70;
const IP: usize = 14;
const ICMP: usize = IP + 20;
const INNER: usize = ICMP + 8;
const INNER_L4: usize = INNER + 20;

/// The quoted packet's addresses and ports (network order, read as stored).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Quoted {
    pub proto: u8,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
}

fn u32_at(b: &[u8; ICMP_ERR_LEN], o: usize) -> u32 {
    u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u16_at(b: &[u8; ICMP_ERR_LEN], o: usize) -> u16 {
    u16::from_ne_bytes([b[o], b[o + 1]])
}

fn put16(b: &mut [u8; ICMP_ERR_LEN], o: usize, v: u16) {
    let v = v.to_ne_bytes();
    b[o] = v[0];
    b[o + 1] = v[1];
}

fn put32(b: &mut [u8; ICMP_ERR_LEN], o: usize, v: u32) {
    let v = v.to_ne_bytes();
    b[o..o + 4].copy_from_slice(&v);
}

/// An ICMP destination unreachable, time exceeded or parameter problem whose quote is an
/// IPv4 TCP/UDP packet: the outer destination and the quoted tuple. `None` for anything else.
#[inline(always)]
pub fn quoted(b: &[u8; ICMP_ERR_LEN]) -> Option<(u32, Quoted)> {
    if b[12..14] != [0x08, 0x00] || b[IP] != 0x45 || b[IP + 9] != PROTO_ICMP {
        return None;
    }
    if !matches!(b[ICMP], 3 | 11 | 12) || b[INNER] != 0x45 {
        return None;
    }
    let proto = b[INNER + 9];
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    Some((
        u32_at(b, IP + 16),
        Quoted {
            proto,
            src: u32_at(b, INNER + 12),
            dst: u32_at(b, INNER + 16),
            sport: u16_at(b, INNER_L4),
            dport: u16_at(b, INNER_L4 + 2),
        },
    ))
}

/// The outer source address (network order, as stored).
#[inline(always)]
pub fn outer_src(b: &[u8; ICMP_ERR_LEN]) -> u32 {
    u32_at(b, IP + 12)
}

/// Rewrites the quoted packet from `q` to `to` (addresses and ports) and the outer addresses
/// to `outer_src -> outer_dst`, keeping every checksum right: the quoted IPv4 header's, the
/// quoted UDP checksum (the first 8 bytes of a UDP header hold it; TCP's lies beyond them),
/// the ICMP checksum over all of it, and the outer IPv4 header's.
#[inline(always)]
pub fn rewrite(
    b: &mut [u8; ICMP_ERR_LEN],
    q: &Quoted,
    to: &Quoted,
    outer_src: u32,
    outer_dst: u32,
) {
    let old_inner_check = u16_at(b, INNER + 10);
    let mut inner_check = csum::replace32(old_inner_check, q.src, to.src);
    inner_check = csum::replace32(inner_check, q.dst, to.dst);
    let mut icmp = u16_at(b, ICMP + 2);
    icmp = csum::replace32(icmp, q.src, to.src);
    icmp = csum::replace32(icmp, q.dst, to.dst);
    icmp = csum::replace16(icmp, old_inner_check, inner_check);
    icmp = csum::replace16(icmp, q.sport, to.sport);
    icmp = csum::replace16(icmp, q.dport, to.dport);
    if q.proto == PROTO_UDP {
        let old = u16_at(b, INNER_L4 + 6);
        let mut c = csum::replace32(old, q.src, to.src);
        c = csum::replace32(c, q.dst, to.dst);
        c = csum::replace16(c, q.sport, to.sport);
        c = csum::replace16(c, q.dport, to.dport);
        let c = csum::udp_fix(old, c);
        icmp = csum::replace16(icmp, old, c);
        put16(b, INNER_L4 + 6, c);
    }
    put16(b, INNER + 10, inner_check);
    put32(b, INNER + 12, to.src);
    put32(b, INNER + 16, to.dst);
    put16(b, INNER_L4, to.sport);
    put16(b, INNER_L4 + 2, to.dport);
    put16(b, ICMP + 2, icmp);
    let mut outer = u16_at(b, IP + 10);
    outer = csum::replace32(outer, u32_at(b, IP + 12), outer_src);
    outer = csum::replace32(outer, u32_at(b, IP + 16), outer_dst);
    put16(b, IP + 10, outer);
    put32(b, IP + 12, outer_src);
    put32(b, IP + 16, outer_dst);
}

#[cfg(test)]
mod tests {
    use etherparse::{IpNumber, Ipv4Header, PacketBuilder};

    use super::*;

    /// An ICMP "fragmentation needed" from `from` to `to` quoting a UDP datagram
    /// `qs:qsp -> qd:qdp` (with a checksum), as the kernel builds it.
    fn frag_needed(
        from: [u8; 4],
        to: [u8; 4],
        qs: [u8; 4],
        qsp: u16,
        qd: [u8; 4],
        qdp: u16,
    ) -> Vec<u8> {
        let mut quoted = Vec::new();
        PacketBuilder::ipv4(qs, qd, 63)
            .udp(qsp, qdp)
            .write(&mut quoted, b"0123456789")
            .unwrap();
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ip(etherparse::IpHeaders::Ipv4(
                Ipv4Header::new(0, 64, IpNumber::ICMP, from, to).unwrap(),
                Default::default(),
            ))
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1200,
                },
            ))
            .write(&mut out, &quoted)
            .unwrap();
        out
    }

    fn valid(f: &[u8]) {
        assert_eq!(csum::checksum(&f[IP..ICMP], 0), 0, "outer IPv4 checksum");
        assert_eq!(csum::checksum(&f[ICMP..], 0), 0, "ICMP checksum");
        assert_eq!(
            csum::checksum(&f[INNER..INNER_L4], 0),
            0,
            "quoted IPv4 checksum"
        );
        let src = u32::from_ne_bytes(f[INNER + 12..INNER + 16].try_into().unwrap());
        let dst = u32::from_ne_bytes(f[INNER + 16..INNER + 20].try_into().unwrap());
        let udp = &f[INNER_L4..];
        assert_eq!(
            csum::checksum(
                udp,
                csum::pseudo_header(src, dst, PROTO_UDP, udp.len() as u16)
            ),
            0,
            "quoted UDP checksum"
        );
    }

    #[test]
    fn an_error_about_a_snat_flow_is_translated_for_the_client() {
        let node = [10, 0, 0, 2];
        let backend = [10, 244, 2, 7];
        let client = [192, 0, 2, 1];
        let mut f = frag_needed([10, 0, 0, 3], node, node, 20001, backend, 8080);
        valid(&f);
        let b: &mut [u8; ICMP_ERR_LEN] = (&mut f[..ICMP_ERR_LEN]).try_into().unwrap();
        let (outer_dst, q) = quoted(b).unwrap();
        assert_eq!(outer_dst, u32::from_ne_bytes(node));
        assert_eq!(q.sport, 20001u16.to_be());
        let to = Quoted {
            src: u32::from_ne_bytes(client),
            sport: 40000u16.to_be(),
            dst: u32::from_ne_bytes(node),
            dport: 30081u16.to_be(),
            ..q
        };
        rewrite(
            b,
            &q,
            &to,
            u32::from_ne_bytes(node),
            u32::from_ne_bytes(client),
        );
        valid(&f);
        assert_eq!(&f[IP + 12..IP + 20], &[10, 0, 0, 2, 192, 0, 2, 1]);
        assert_eq!(&f[INNER + 12..INNER + 20], &[192, 0, 2, 1, 10, 0, 0, 2]);
        assert_eq!(&f[INNER_L4..INNER_L4 + 4], &[0x9c, 0x40, 0x75, 0x81]);
    }

    #[test]
    fn other_icmp_and_other_quotes_are_not_errors_about_flows() {
        let mut f = frag_needed(
            [10, 0, 0, 3],
            [10, 0, 0, 2],
            [10, 0, 0, 2],
            1,
            [10, 0, 0, 9],
            2,
        );
        f[ICMP] = 8; // echo request
        let b: &[u8; ICMP_ERR_LEN] = (&f[..ICMP_ERR_LEN]).try_into().unwrap();
        assert!(quoted(b).is_none());
        f[ICMP] = 3;
        f[INNER + 9] = 1; // quoting ICMP
        let b: &[u8; ICMP_ERR_LEN] = (&f[..ICMP_ERR_LEN]).try_into().unwrap();
        assert!(quoted(b).is_none());
    }
}
