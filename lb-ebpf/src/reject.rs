//! Rejecting connections to a service without serving backends (or to an unused ClusterIP
//! port), as kube-proxy does: the client gets "connection refused" at once instead of
//! retrying into a black hole. TCP gets a RST, UDP an ICMP port unreachable; both are built
//! in place over the offending packet and sent back the way it came. The builders work on
//! plain byte arrays so the XDP and tc programs share them; only resizing differs.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{PROTO_ICMP, PROTO_TCP, csum};

use crate::parse::ptr_at;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Ethernet + IPv4 + TCP without options.
pub const RST_LEN: usize = 54;
/// Ethernet + IPv4 + UDP: what an ICMP error quotes (IP header + 8 bytes).
pub const QUOTE_END: usize = 42;
/// IPv4 + ICMP header inserted between the Ethernet header and the quote.
pub const ICMP_GROW: usize = 28;
pub const ICMP_LEN: usize = QUOTE_END + ICMP_GROW;

#[inline(always)]
fn swap<const N: usize>(b: &mut [u8], a: usize, c: usize) {
    let mut i = 0;
    while i < N {
        b.swap(a + i, c + i);
        i += 1;
    }
}

#[inline(always)]
fn ipv4_header(b: &mut [u8], tot_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) {
    b[14] = 0x45;
    b[15] = 0;
    b[16..18].copy_from_slice(&tot_len.to_be_bytes());
    b[18..22].copy_from_slice(&[0, 0, 0, 0]);
    b[22] = 64;
    b[23] = proto;
    b[24..26].copy_from_slice(&[0, 0]);
    b[26..30].copy_from_slice(&src);
    b[30..34].copy_from_slice(&dst);
    let c = csum::checksum(&b[14..34], 0);
    b[24..26].copy_from_slice(&c.to_ne_bytes());
}

/// Rewrites the first 54 bytes of a TCP segment into the RST the closed port would have
/// sent (RFC 9293 3.10.7.1). `tot_len` is the segment's IPv4 total length. Returns false for
/// an incoming RST, which is never answered.
#[inline(always)]
pub fn build_rst(b: &mut [u8; RST_LEN]) -> bool {
    let flags = b[47];
    if flags & TCP_RST != 0 {
        return false;
    }
    let doff = ((b[46] >> 4) as u32) * 4;
    let tot = u16::from_be_bytes([b[16], b[17]]) as u32;
    let payload = tot.saturating_sub(20 + doff);
    let seq = u32::from_be_bytes([b[38], b[39], b[40], b[41]]);
    let ack = u32::from_be_bytes([b[42], b[43], b[44], b[45]]);
    let src = [b[26], b[27], b[28], b[29]];
    let dst = [b[30], b[31], b[32], b[33]];

    swap::<6>(b, 0, 6);
    ipv4_header(b, 40, PROTO_TCP, dst, src);
    swap::<2>(b, 34, 36);
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
    b[38..42].copy_from_slice(&new_seq.to_be_bytes());
    b[42..46].copy_from_slice(&new_ack.to_be_bytes());
    b[46] = 5 << 4;
    b[47] = new_flags;
    b[48..54].copy_from_slice(&[0; 6]); // window, checksum, urgent pointer
    let pseudo = csum::pseudo_header(
        u32::from_ne_bytes(dst),
        u32::from_ne_bytes(src),
        PROTO_TCP,
        20,
    );
    let c = csum::checksum(&b[34..54], pseudo);
    b[50..52].copy_from_slice(&c.to_ne_bytes());
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
        client_mac: [b[6], b[7], b[8], b[9], b[10], b[11]],
        our_mac: [b[0], b[1], b[2], b[3], b[4], b[5]],
        client: [b[26], b[27], b[28], b[29]],
        frontend: [b[30], b[31], b[32], b[33]],
    }
}

/// Fills in Ethernet, IPv4 and ICMP headers in front of the quote already at `b[42..70]`.
#[inline(always)]
pub fn build_icmp_unreachable(b: &mut [u8; ICMP_LEN], o: &Origin) {
    b[0..6].copy_from_slice(&o.client_mac);
    b[6..12].copy_from_slice(&o.our_mac);
    b[12..14].copy_from_slice(&[0x08, 0x00]);
    ipv4_header(b, (20 + 8 + 28) as u16, PROTO_ICMP, o.frontend, o.client);
    b[34] = 3; // destination unreachable
    b[35] = 3; // port unreachable
    b[36..42].copy_from_slice(&[0; 6]);
    let c = csum::checksum(&b[34..70], 0);
    b[36..38].copy_from_slice(&c.to_ne_bytes());
}

/// XDP: answer a TCP segment with a RST out of the interface it came in on.
#[inline(always)]
pub fn tcp_rst(ctx: &XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    let Some(p) = ptr_at::<[u8; RST_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return XDP_DROP;
    };
    // SAFETY: 54 bytes checked by ptr_at; XDP owns the frame.
    if !build_rst(unsafe { &mut *p }) {
        return XDP_DROP;
    }
    // SAFETY: shrinking within the frame; pointers are not used afterwards.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, RST_LEN as i32 - len as i32) } != 0 {
        return XDP_DROP;
    }
    XDP_TX
}

/// XDP: answer a UDP datagram with an ICMP port unreachable quoting its IP header and 8
/// bytes: cut the frame to the quote, then grow room for the new headers in front of it.
#[inline(always)]
pub fn icmp_port_unreachable(ctx: &XdpContext) -> u32 {
    let len = ctx.data_end() - ctx.data();
    let Some(p) = ptr_at::<[u8; QUOTE_END]>(ctx.data(), ctx.data_end(), 0) else {
        return XDP_DROP;
    };
    let o = origin(unsafe { &*p });
    unsafe {
        if bpf_xdp_adjust_tail(ctx.ctx, QUOTE_END as i32 - len as i32) != 0 {
            return XDP_DROP;
        }
        if bpf_xdp_adjust_head(ctx.ctx, -(ICMP_GROW as i32)) != 0 {
            return XDP_DROP;
        }
    }
    let Some(p) = ptr_at::<[u8; ICMP_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return XDP_DROP;
    };
    build_icmp_unreachable(unsafe { &mut *p }, &o);
    XDP_TX
}
