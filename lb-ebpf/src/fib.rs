//! Next hop and MAC addresses from the kernel's FIB and neighbour tables: nothing about the
//! network is configured into the program.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action::{XDP_DROP, XDP_REDIRECT, XDP_TX},
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::Counter;
use network_types::eth::EthHdr;

use crate::{
    maps::count,
    nat::dec_ttl,
    parse::{Tuple, ptr_at},
};

const AF_INET: u8 = 2;

/// The next hop of `t` (its addresses, protocol and ports; `tot_len` for the MTU check)
/// from the packet's interface. `Err(rc)`: the FIB cannot answer for XDP (no neighbour
/// entry yet, no route, too large for the next hop: `BPF_FIB_LKUP_RET_*`); the caller hands
/// the packet on untranslated and the uplink's tc, which can ask the kernel to resolve a
/// neighbour or answer with an ICMP error, takes it from there.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, t: &Tuple, tot_len: u16) -> Result<FibParams, i64> {
    // SAFETY: an all-zero bpf_fib_lookup is a valid input; the fields we need are set below.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = t.proto;
    p.sport = t.sport;
    p.dport = t.dport;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = t.src;
    p.__bindgen_anon_4.ipv4_dst = t.dst;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        Ok(p)
    } else {
        Err(rc)
    }
}

/// Sends a translated packet to the next hop `p` found: one hop less, the next hop's MACs,
/// XDP_TX when it is behind the interface the packet came in on, a redirect otherwise.
/// (The caller checked the TTL.)
#[inline(always)]
pub fn send(ctx: &XdpContext, p: &FibParams) -> u32 {
    if dec_ttl(ctx.data(), ctx.data_end()) != Some(true) {
        return XDP_DROP;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = p.dmac;
        (*eth).src_addr = p.smac;
    }
    if p.ifindex == ctx.ingress_ifindex() as u32 {
        XDP_TX
    } else {
        let rc = unsafe { bpf_redirect(p.ifindex, 0) };
        if rc == XDP_REDIRECT as i64 {
            XDP_REDIRECT
        } else {
            count(Counter::FibFail);
            XDP_DROP
        }
    }
}
