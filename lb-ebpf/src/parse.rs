//! Bounds-checked header access. Every header read goes through `ptr_at`, which the verifier
//! can follow: the check against `data_end` sits right next to the pointer it guards.
use core::mem::{offset_of, size_of};

use lb_common::{Counter, FlowKey, FrontendKey, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

pub const ETH_LEN: usize = size_of::<EthHdr>();
pub const IP_OFF: usize = ETH_LEN;
pub const IP_LEN: usize = size_of::<Ipv4Hdr>();
/// Packets with IP options are passed on, so L4 always starts here.
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
}

impl Tuple {
    /// The frontend this packet is addressed to.
    #[inline(always)]
    pub fn frontend_key(&self) -> FrontendKey {
        FrontendKey::new(self.dst, self.dport, self.proto)
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
    if ihl != 5 {
        return Err(Counter::PassIpOptions);
    }
    // More-fragments flag or a non-zero offset: ports are only in the first fragment, and we
    // do not reassemble, so the kernel gets every fragment.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Counter::PassFragment);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < IP_LEN || (whole_frame && data + IP_OFF + tot_len > data_end) {
        return Err(Counter::Truncated);
    }
    let (sport, dport, tcp_flags) = match ip.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(data, data_end, L4_OFF).ok_or(Counter::Truncated)?;
            let tcp = unsafe { &*tcp };
            let flags = unsafe { *(tcp as *const TcpHdr as *const u8).add(TCP_FLAGS_OFF) };
            (
                u16::from_ne_bytes(tcp.source),
                u16::from_ne_bytes(tcp.dest),
                flags,
            )
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(data, data_end, L4_OFF).ok_or(Counter::Truncated)?;
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
    fn what_is_not_ours_says_why() {
        let mut arp = tcp(true, &[]);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(run(&arp).err(), Some(Counter::PassNotIpv4));

        let mut frag = udp(b"x");
        frag[IP_OFF + 6] = 0x20; // more fragments
        assert_eq!(run(&frag).err(), Some(Counter::PassFragment));
        let mut later = udp(b"x");
        later[IP_OFF + 7] = 0x01; // offset 8
        assert_eq!(run(&later).err(), Some(Counter::PassFragment));

        let mut opts = tcp(true, &[]);
        opts[IP_OFF] = 0x46;
        assert_eq!(run(&opts).err(), Some(Counter::PassIpOptions));

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
