//! Address/port rewriting with incremental checksum updates (RFC 1624), for XDP where the
//! program owns the bytes and no skb checksum state exists.
use lb_common::{PROTO_TCP, PROTO_UDP, csum};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{IP_OFF, L4_OFF, ptr_at};

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
