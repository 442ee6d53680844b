//! XDP's side of rejecting (see `lb_ebpf::reject` for the packets): the frame is resized
//! in place and sent back out of the interface it came in on.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use crate::{
    parse::ptr_at,
    reject::{
        ICMP_GROW, ICMP_LEN, IcmpError, QUOTE_END, RST_LEN, build_icmp_error, build_rst, origin,
    },
};

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

/// XDP: answer a packet with an ICMP error quoting its IP header and 8 bytes: cut the
/// frame to the quote, then grow room for the new headers in front of it.
#[inline(always)]
pub fn icmp_error(ctx: &XdpContext, what: IcmpError) -> u32 {
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
    build_icmp_error(unsafe { &mut *p }, &o, what);
    XDP_TX
}
