//! Bounds-checked header access. Every header read goes through `ptr_at`, which the verifier
//! can follow: the check against `data_end` sits right next to the pointer it guards.
use core::mem::{offset_of, size_of};

use lb_common::{Counter, FlowKey, FrontendKey, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

pub const ETH_LEN: usize = size_of::<EthHdr>();
pub const IP_OFF: usize = ETH_LEN;
pub const IP_LEN: usize = size_of::<Ipv4Hdr>();
/// Where L4 starts without IPv4 options (the translating code sees no others: XDP hands
/// packets with options to tc, which removes the options first).
pub const L4_OFF: usize = IP_OFF + IP_LEN;
pub const ETH_P_IP: u16 = 0x0800;
/// The TCP flags byte: the one after the data offset.
const TCP_FLAGS_OFF: usize = offset_of!(TcpHdr, _bitfield_1) + 1;

#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    if data + off + size_of::<T>() > data_end {
        return None;
    }
    Some((data + off) as *mut T)
}

/// The addresses and ports of an IPv4 TCP/UDP packet, all in network order.
#[derive(Clone, Copy)]
pub struct Tuple {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// TCP flags (header byte 13; see `ct::TCP_*`), 0 for UDP.
    pub tcp_flags: u8,
    /// Whether the packet is a fragment, and which (`FRAG_*`).
    pub frag: u8,
    /// The IPv4 identification field as in the header (network order): what ties the
    /// fragments of a datagram together.
    pub ip_id_be: u16,
    /// Bytes of IPv4 options after the fixed header (0-40): L4 starts that much after
    /// `L4_OFF`. The programs translate only packets without (tc removes them first).
    pub ip_opts: u8,
}

/// Not a fragment.
pub const FRAG_NONE: u8 = 0;
/// The first fragment of a datagram (offset 0, more fragments): it has the ports.
pub const FRAG_FIRST: u8 = 1;
/// A later fragment (offset > 0): no L4 header; `sport`/`dport` are 0 until the first
/// fragment's ports are filled in (frag.rs).
pub const FRAG_LATER: u8 = 2;

impl Tuple {
    /// The frontend this packet is addressed to.
    #[inline(always)]
    pub fn frontend_key(&self) -> FrontendKey {
        FrontendKey::new(self.dst, self.dport, self.proto)
    }

    /// What all fragments of this packet's datagram share.
    #[inline(always)]
    pub fn frag_key(&self) -> lb_common::FragKey {
        lb_common::FragKey {
            src_addr_be: self.src,
            dst_addr_be: self.dst,
            id_be: self.ip_id_be,
            proto: self.proto,
            _pad: 0,
        }
    }

    /// The packet's 5-tuple as a conntrack / reverse-NAT key.
    #[inline(always)]
    pub fn flow_key(&self) -> FlowKey {
        FlowKey::new(self.src, self.dst, self.sport, self.dport, self.proto)
    }
}

/// Why a packet is not ours, as the counter that records it.
pub type NotOurs = Counter;

/// Parses Ethernet/IPv4/TCP|UDP from the start of `data`. Anything else is `Err(reason)`.
/// Fragments are parsed too (`Tuple::frag`): a first fragment with its ports, a later one
/// without; the caller decides what to do with them.
/// `whole_frame`: the IPv4 total length must fit in `data..data_end` (XDP sees the whole
/// frame; a tc skb may keep its payload in pages beyond the linear part).
#[inline(always)]
pub fn parse(data: usize, data_end: usize, whole_frame: bool) -> Result<Tuple, NotOurs> {
    let eth: *const EthHdr = ptr_at(data, data_end, 0).ok_or(Counter::Truncated)?;
    // SAFETY: bounds checked by ptr_at.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(Counter::PassNotIpv4);
    }
    let ip: *const Ipv4Hdr = ptr_at(data, data_end, IP_OFF).ok_or(Counter::Truncated)?;
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Counter::PassNotIpv4);
    }
    let ihl = ip.vihl & 0x0f;
    if ihl < 5 {
        return Err(Counter::Truncated);
    }
    // Options (up to 40 bytes) sit between the fixed header and L4.
    let opts = (ihl as usize - 5) * 4;
    let l4_off = L4_OFF + opts;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < IP_LEN + opts || (whole_frame && data + IP_OFF + tot_len > data_end) {
        return Err(Counter::Truncated);
    }
    // Ports are only in a datagram's first fragment (offset 0, more fragments set).
    let frags = u16::from_be_bytes(ip.frags);
    let frag = if frags & 0x1fff != 0 {
        FRAG_LATER
    } else if frags & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    // The L4 header must lie within the packet: a first fragment too short to hold it is
    // the tiny-fragment attack (RFC 1858), whose ports a later fragment would supply.
    let l4_len = match ip.proto {
        PROTO_TCP => size_of::<TcpHdr>(),
        PROTO_UDP => size_of::<UdpHdr>(),
        _ => 0,
    };
    if frag != FRAG_LATER && tot_len < IP_LEN + opts + l4_len {
        return Err(Counter::Truncated);
    }
    let (sport, dport, tcp_flags) = match ip.proto {
        PROTO_TCP | PROTO_UDP if frag == FRAG_LATER => (0, 0, 0),
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(data, data_end, l4_off).ok_or(Counter::Truncated)?;
            let tcp = unsafe { &*tcp };
            let flags = unsafe { *(tcp as *const TcpHdr as *const u8).add(TCP_FLAGS_OFF) };
            (
                u16::from_ne_bytes(tcp.source),
                u16::from_ne_bytes(tcp.dest),
                flags,
            )
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(data, data_end, l4_off).ok_or(Counter::Truncated)?;
            let udp = unsafe { &*udp };
            (u16::from_ne_bytes(udp.src), u16::from_ne_bytes(udp.dst), 0)
        }
        _ => return Err(Counter::PassNotTcpUdp),
    };
    Ok(Tuple {
        src: u32::from_ne_bytes(ip.src_addr),
        dst: u32::from_ne_bytes(ip.dst_addr),
        sport,
        dport,
        proto: ip.proto,
        tcp_flags,
        frag,
        ip_id_be: u16::from_ne_bytes(ip.id),
        ip_opts: opts as u8,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use etherparse::{IpNumber, PacketBuilder};

    use super::*;

    pub const CLIENT: [u8; 4] = [192, 0, 2, 1];
    pub const FRONTEND: [u8; 4] = [198, 51, 100, 7];

    pub fn tcp(flags_syn: bool, payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(CLIENT, FRONTEND, 64)
            .tcp(40000, 80, 1000, 64240);
        let b = if flags_syn { b.syn() } else { b.ack(5000) };
        let mut v = vec![];
        b.write(&mut v, payload).unwrap();
        v
    }

    pub fn udp(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![];
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(CLIENT, FRONTEND, 64)
            .udp(40001, 53)
            .write(&mut v, payload)
            .unwrap();
        v
    }

    pub fn run(f: &[u8]) -> Result<Tuple, NotOurs> {
        let d = f.as_ptr() as usize;
        parse(d, d + f.len(), true)
    }

    #[test]
    fn tcp_and_udp_tuples_in_network_order() {
        let t = run(&tcp(true, &[])).unwrap();
        assert_eq!(t.src, u32::from_ne_bytes(CLIENT));
        assert_eq!(t.dst, u32::from_ne_bytes(FRONTEND));
        assert_eq!((u16::from_be(t.sport), u16::from_be(t.dport)), (40000, 80));
        assert_eq!((t.proto, t.tcp_flags), (PROTO_TCP, 0x02));
        let u = run(&udp(b"q")).unwrap();
        assert_eq!((u16::from_be(u.sport), u16::from_be(u.dport)), (40001, 53));
        assert_eq!((u.proto, u.tcp_flags), (PROTO_UDP, 0));
    }

    #[test]
    fn fragments_say_which_they_are() {
        let mut first = udp(b"x");
        first[IP_OFF + 4..IP_OFF + 6].copy_from_slice(&0x1234u16.to_be_bytes());
        first[IP_OFF + 6] = 0x20; // more fragments, offset 0
        let t = run(&first).unwrap();
        assert_eq!((t.frag, u16::from_be(t.ip_id_be)), (FRAG_FIRST, 0x1234));
        assert_eq!((u16::from_be(t.sport), u16::from_be(t.dport)), (40001, 53));
        let mut later = first.clone();
        later[IP_OFF + 6..IP_OFF + 8].copy_from_slice(&[0x00, 0x01]); // last, offset 8
        let t = run(&later).unwrap();
        assert_eq!(
            (t.frag, t.sport, t.dport, t.tcp_flags),
            (FRAG_LATER, 0, 0, 0)
        );
        assert_eq!(t.frag_key(), run(&first).unwrap().frag_key());
        assert_eq!(run(&udp(b"x")).unwrap().frag, FRAG_NONE);
        // Don't-fragment alone is not a fragment.
        let mut df = udp(b"x");
        df[IP_OFF + 6] = 0x40;
        assert_eq!(run(&df).unwrap().frag, FRAG_NONE);
    }

    #[test]
    fn what_is_not_ours_says_why() {
        let mut arp = tcp(true, &[]);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(run(&arp).err(), Some(Counter::PassNotIpv4));

        // Options: L4 after them; a header longer than the packet is truncated.
        let mut opts = tcp(true, &[]);
        opts.splice(L4_OFF..L4_OFF, [1, 1, 1, 1]); // four NOP options
        opts[IP_OFF] = 0x46;
        let len = (opts.len() - IP_OFF) as u16;
        opts[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&len.to_be_bytes());
        let t = run(&opts).unwrap();
        assert_eq!(
            (u16::from_be(t.sport), u16::from_be(t.dport), t.ip_opts),
            (40000, 80, 4)
        );
        let mut long_ihl = tcp(true, &[]);
        long_ihl[IP_OFF] = 0x4f;
        assert_eq!(run(&long_ihl).err(), Some(Counter::Truncated));

        let mut icmp = udp(b"x");
        icmp[IP_OFF + 9] = u8::from(IpNumber::ICMP);
        assert_eq!(run(&icmp).err(), Some(Counter::PassNotTcpUdp));

        let whole = tcp(true, &[]);
        assert_eq!(run(&whole[..L4_OFF + 10]).err(), Some(Counter::Truncated));
        let mut long = tcp(true, &[]);
        long[IP_OFF + 2..IP_OFF + 4].copy_from_slice(&1500u16.to_be_bytes());
        assert_eq!(run(&long).err(), Some(Counter::Truncated));
        // tc: the payload may sit beyond the linear part, so only the headers must fit.
        let d = long.as_ptr() as usize;
        assert!(parse(d, d + long.len(), false).is_ok());
        assert_eq!(run(&[0u8; 10]).err(), Some(Counter::Truncated));
        let mut short_ihl = tcp(true, &[]);
        short_ihl[IP_OFF] = 0x44;
        assert_eq!(run(&short_ihl).err(), Some(Counter::Truncated));
    }
}
