//! Rejecting connections to a service without serving backends (or to an unused ClusterIP
//! port), as kube-proxy does: the client gets "connection refused" at once instead of
//! retrying into a black hole. TCP gets a RST, UDP an ICMP port unreachable; both are built
//! in place over the offending packet and sent back the way it came. The builders work on
//! plain byte arrays so the XDP and tc programs share them (and host tests check them);
//! only resizing differs (`xdp_reject.rs`, tc.rs).
use core::mem::{offset_of, size_of};

use lb_common::{PROTO_ICMP, PROTO_TCP, csum};
use network_types::{eth::EthHdr, icmp::Icmpv4Hdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{ETH_P_IP, IP_LEN, IP_OFF, L4_OFF};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Offsets in the frame (Ethernet, IPv4 without options, then TCP or ICMP), from the header
/// types.
const ETH_DST: usize = offset_of!(EthHdr, dst_addr);
const ETH_SRC: usize = offset_of!(EthHdr, src_addr);
const ETH_TYPE: usize = offset_of!(EthHdr, ether_type);
const IP_VIHL: usize = IP_OFF + offset_of!(Ipv4Hdr, vihl);
const IP_TOS: usize = IP_OFF + offset_of!(Ipv4Hdr, tos);
const IP_TOT_LEN: usize = IP_OFF + offset_of!(Ipv4Hdr, tot_len);
/// Identification, then flags and fragment offset.
const IP_ID: usize = IP_OFF + offset_of!(Ipv4Hdr, id);
const IP_TTL: usize = IP_OFF + offset_of!(Ipv4Hdr, ttl);
const IP_PROTO: usize = IP_OFF + offset_of!(Ipv4Hdr, proto);
const IP_CHECK: usize = IP_OFF + offset_of!(Ipv4Hdr, check);
const IP_SRC: usize = IP_OFF + offset_of!(Ipv4Hdr, src_addr);
const IP_DST: usize = IP_OFF + offset_of!(Ipv4Hdr, dst_addr);
const TCP_SPORT: usize = L4_OFF + offset_of!(TcpHdr, source);
const TCP_DPORT: usize = L4_OFF + offset_of!(TcpHdr, dest);
const TCP_SEQ: usize = L4_OFF + offset_of!(TcpHdr, seq);
const TCP_ACK_SEQ: usize = L4_OFF + offset_of!(TcpHdr, ack_seq);
/// Data offset (high nibble), then the flags byte.
const TCP_DOFF: usize = L4_OFF + offset_of!(TcpHdr, _bitfield_1);
const TCP_FLAGS: usize = TCP_DOFF + 1;
/// Window, checksum and urgent pointer, up to the end of the header.
const TCP_WINDOW: usize = L4_OFF + offset_of!(TcpHdr, window);
const TCP_CHECK: usize = L4_OFF + offset_of!(TcpHdr, check);
const TCP_HDR_LEN: usize = size_of::<TcpHdr>();
const ICMP_TYPE: usize = L4_OFF + offset_of!(Icmpv4Hdr, type_);
const ICMP_CODE: usize = L4_OFF + offset_of!(Icmpv4Hdr, code);
/// Checksum, then the four bytes of type-specific data (unused for port unreachable).
const ICMP_CHECK: usize = L4_OFF + offset_of!(Icmpv4Hdr, check);
const ICMP_HDR_LEN: usize = size_of::<Icmpv4Hdr>();

/// Ethernet + IPv4 + TCP without options.
pub const RST_LEN: usize = L4_OFF + TCP_HDR_LEN;
/// Ethernet + IPv4 + UDP: what an ICMP error quotes (IP header + 8 bytes).
pub const QUOTE_END: usize = L4_OFF + size_of::<UdpHdr>();
/// IPv4 + ICMP header inserted between the Ethernet header and the quote.
pub const ICMP_GROW: usize = IP_LEN + ICMP_HDR_LEN;
pub const ICMP_LEN: usize = QUOTE_END + ICMP_GROW;

/// A source address a RST or ICMP error may be sent to (network order): not 0.0.0.0/8,
/// loopback, multicast, or 240.0.0.0/4 (reserved, and the limited broadcast). RFC 1122
/// forbids ICMP errors about such datagrams; answering them would let a spoofed packet turn
/// this node into a reflector towards a whole segment.
#[inline(always)]
pub fn answerable(src_be: u32) -> bool {
    let first = u32::from_be(src_be) >> 24;
    first != 0 && first != 127 && first < 224
}

#[inline(always)]
fn swap<const N: usize>(b: &mut [u8], a: usize, c: usize) {
    let mut i = 0;
    while i < N {
        b.swap(a + i, c + i);
        i += 1;
    }
}

/// The `N` bytes of `b` at `off`.
#[inline(always)]
fn read<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut v = [0u8; N];
    let mut i = 0;
    while i < N {
        v[i] = b[off + i];
        i += 1;
    }
    v
}

#[inline(always)]
fn ipv4_header(b: &mut [u8], tot_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) {
    b[IP_VIHL] = 0x45;
    b[IP_TOS] = 0;
    b[IP_TOT_LEN..IP_TOT_LEN + 2].copy_from_slice(&tot_len.to_be_bytes());
    b[IP_ID..IP_TTL].copy_from_slice(&[0, 0, 0, 0]);
    b[IP_TTL] = 64;
    b[IP_PROTO] = proto;
    b[IP_CHECK..IP_CHECK + 2].copy_from_slice(&[0, 0]);
    b[IP_SRC..IP_SRC + 4].copy_from_slice(&src);
    b[IP_DST..IP_DST + 4].copy_from_slice(&dst);
    let c = csum::checksum(&b[IP_OFF..L4_OFF], 0);
    b[IP_CHECK..IP_CHECK + 2].copy_from_slice(&c.to_ne_bytes());
}

/// Rewrites the first 54 bytes of a TCP segment into the RST the closed port would have
/// sent (RFC 9293 3.10.7.1). `tot_len` is the segment's IPv4 total length. Returns false for
/// an incoming RST, which is never answered.
#[inline(always)]
pub fn build_rst(b: &mut [u8; RST_LEN]) -> bool {
    let flags = b[TCP_FLAGS];
    if flags & TCP_RST != 0 {
        return false;
    }
    let doff = ((b[TCP_DOFF] >> 4) as u32) * 4;
    let tot = u16::from_be_bytes(read(b, IP_TOT_LEN)) as u32;
    let payload = tot.saturating_sub(IP_LEN as u32 + doff);
    let seq = u32::from_be_bytes(read(b, TCP_SEQ));
    let ack = u32::from_be_bytes(read(b, TCP_ACK_SEQ));
    let src: [u8; 4] = read(b, IP_SRC);
    let dst: [u8; 4] = read(b, IP_DST);

    swap::<6>(b, ETH_DST, ETH_SRC);
    ipv4_header(b, (IP_LEN + TCP_HDR_LEN) as u16, PROTO_TCP, dst, src);
    swap::<2>(b, TCP_SPORT, TCP_DPORT);
    let (new_seq, new_ack, new_flags) = if flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let mut a = seq.wrapping_add(payload);
        if flags & TCP_SYN != 0 {
            a = a.wrapping_add(1);
        }
        if flags & TCP_FIN != 0 {
            a = a.wrapping_add(1);
        }
        (0, a, TCP_RST | TCP_ACK)
    };
    b[TCP_SEQ..TCP_SEQ + 4].copy_from_slice(&new_seq.to_be_bytes());
    b[TCP_ACK_SEQ..TCP_ACK_SEQ + 4].copy_from_slice(&new_ack.to_be_bytes());
    b[TCP_DOFF] = ((TCP_HDR_LEN / 4) as u8) << 4;
    b[TCP_FLAGS] = new_flags;
    b[TCP_WINDOW..RST_LEN].copy_from_slice(&[0; 6]); // window, checksum, urgent pointer
    let pseudo = csum::pseudo_header(
        u32::from_ne_bytes(dst),
        u32::from_ne_bytes(src),
        PROTO_TCP,
        TCP_HDR_LEN as u16,
    );
    let c = csum::checksum(&b[L4_OFF..RST_LEN], pseudo);
    b[TCP_CHECK..TCP_CHECK + 2].copy_from_slice(&c.to_ne_bytes());
    true
}

/// What the ICMP builder needs from the original frame, read before it is resized.
#[derive(Clone, Copy)]
pub struct Origin {
    pub client_mac: [u8; 6],
    pub our_mac: [u8; 6],
    pub client: [u8; 4],
    pub frontend: [u8; 4],
}

#[inline(always)]
pub fn origin(b: &[u8; QUOTE_END]) -> Origin {
    Origin {
        client_mac: read(b, ETH_SRC),
        our_mac: read(b, ETH_DST),
        client: read(b, IP_SRC),
        frontend: read(b, IP_DST),
    }
}

/// ICMP errors the datapath sends, as (type, code).
#[derive(Clone, Copy)]
pub enum IcmpError {
    /// Destination unreachable, port unreachable: a UDP service without endpoints.
    PortUnreachable,
    /// Time exceeded in transit: a packet to forward whose TTL ran out (RFC 1812 5.3.1).
    TtlExceeded,
    /// Fragmentation needed and DF set, with the next hop's MTU (RFC 1191): a packet too
    /// large for the path it is forwarded on.
    FragNeeded(u16),
}

/// Port unreachable (see `build_icmp_error`).
#[inline(always)]
pub fn build_icmp_unreachable(b: &mut [u8; ICMP_LEN], o: &Origin) {
    build_icmp_error(b, o, IcmpError::PortUnreachable)
}

/// Fills in Ethernet, IPv4 and ICMP headers in front of the quote already at
/// `b[QUOTE_END..ICMP_LEN]` (the original IPv4 header and 8 bytes, moved by `ICMP_GROW`).
#[inline(always)]
pub fn build_icmp_error(b: &mut [u8; ICMP_LEN], o: &Origin, what: IcmpError) {
    b[ETH_DST..ETH_DST + 6].copy_from_slice(&o.client_mac);
    b[ETH_SRC..ETH_SRC + 6].copy_from_slice(&o.our_mac);
    b[ETH_TYPE..ETH_TYPE + 2].copy_from_slice(&ETH_P_IP.to_be_bytes());
    ipv4_header(
        b,
        (ICMP_LEN - IP_OFF) as u16,
        PROTO_ICMP,
        o.frontend,
        o.client,
    );
    let (typ, code, mtu) = match what {
        IcmpError::PortUnreachable => (3, 3, 0),
        IcmpError::TtlExceeded => (11, 0, 0),
        IcmpError::FragNeeded(mtu) => (3, 4, mtu),
    };
    b[ICMP_TYPE] = typ;
    b[ICMP_CODE] = code;
    b[ICMP_CHECK..L4_OFF + ICMP_HDR_LEN].copy_from_slice(&[0; 6]);
    // The next-hop MTU sits in the header's last two bytes (zero for the other errors).
    b[L4_OFF + ICMP_HDR_LEN - 2..L4_OFF + ICMP_HDR_LEN].copy_from_slice(&mtu.to_be_bytes());
    let c = csum::checksum(&b[L4_OFF..ICMP_LEN], 0);
    b[ICMP_CHECK..ICMP_CHECK + 2].copy_from_slice(&c.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;
    use crate::parse::tests::{CLIENT, FRONTEND, tcp, udp};

    fn rst_of(mut f: Vec<u8>) -> Option<Vec<u8>> {
        let b: &mut [u8; RST_LEN] = (&mut f[..RST_LEN]).try_into().unwrap();
        build_rst(b).then(|| f[..RST_LEN].to_vec())
    }

    fn tcp_of(f: &[u8]) -> (etherparse::Ipv4Header, etherparse::TcpHeader) {
        let p = SlicedPacket::from_ethernet(f).unwrap();
        let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(t))) = (p.net, p.transport) else {
            panic!("not TCP/IPv4")
        };
        let (h, t) = (ip.header().to_header(), t.to_header());
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!(t.checksum, t.calc_checksum_ipv4(&h, &[]).unwrap());
        (h, t)
    }

    #[test]
    fn syn_with_payload_gets_rst_ack_acking_all_of_it() {
        let r = rst_of(tcp(true, b"abc")).unwrap();
        let (h, t) = tcp_of(&r);
        assert_eq!((h.source, h.destination), (FRONTEND, CLIENT));
        assert_eq!((t.source_port, t.destination_port), (80, 40000));
        assert!(t.rst && t.ack && !t.syn);
        assert_eq!(
            (t.sequence_number, t.acknowledgment_number),
            (0, 1000 + 3 + 1)
        );
        // Back to the client's MAC, from ours.
        assert_eq!(&r[0..12], &[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn ack_gets_rst_with_its_ack_as_seq() {
        let (_, t) = tcp_of(&rst_of(tcp(false, &[])).unwrap());
        assert!(t.rst && !t.ack);
        assert_eq!(t.sequence_number, 5000);
    }

    #[test]
    fn only_unicast_sources_are_answered() {
        let be = |a: [u8; 4]| u32::from_ne_bytes(a);
        assert!(answerable(be([192, 0, 2, 1])));
        assert!(answerable(be([10, 244, 1, 5])));
        for bad in [
            [0, 0, 0, 0],
            [0, 1, 2, 3],
            [127, 0, 0, 1],
            [224, 0, 0, 1],
            [239, 255, 255, 250],
            [240, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            assert!(!answerable(be(bad)), "{bad:?}");
        }
    }

    #[test]
    fn rst_is_never_answered() {
        let mut f = tcp(false, &[]);
        f[TCP_FLAGS] |= TCP_RST;
        assert!(rst_of(f).is_none());
    }

    #[test]
    fn icmp_port_unreachable_quotes_the_datagram() {
        let f = udp(b"query");
        let o = origin((&f[..QUOTE_END]).try_into().unwrap());
        let mut b = [0u8; ICMP_LEN];
        b[ICMP_LEN - (QUOTE_END - IP_OFF)..].copy_from_slice(&f[IP_OFF..QUOTE_END]);
        build_icmp_unreachable(&mut b, &o);
        let p = SlicedPacket::from_ethernet(&b).unwrap();
        let Some(NetSlice::Ipv4(ip)) = p.net else {
            panic!("not IPv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
        assert_eq!((h.source, h.destination), (FRONTEND, CLIENT));
        let icmp = &b[L4_OFF..];
        assert_eq!((icmp[0], icmp[1]), (3, 3));
        // Summed with its checksum, a valid ICMP message folds to 0.
        assert_eq!(csum::checksum(icmp, 0), 0, "ICMP checksum");
        assert_eq!(
            &icmp[8..],
            &f[IP_OFF..QUOTE_END],
            "quote: IP header + 8 bytes"
        );
    }
}
