//! tc ingress on the host side of a local pod's veth (traffic leaving the pod).
//!
//! Why a tc hook: a pod chosen by the XDP path gets the client's packet with the client's
//! source address (no SNAT for local backends), so it answers the client directly and the
//! reply never passes the uplink's XDP ingress. Here, on its way out of the pod, the reply's
//! source is turned back into the frontend the client used, and the packet is sent on
//! towards the client from here. skbs here may carry
//! CHECKSUM_PARTIAL, so the kernel's checksum helpers (which know the skb's checksum state)
//! do the updates instead of the software arithmetic of the XDP path.
use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK,
        TC_ACT_SHOT, bpf_fib_lookup as FibParams,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use lb_common::*;

use crate::{
    lb,
    maps::{REVNAT, count},
    parse::{self, IP_OFF, L4_OFF},
};

/// Offsets inside the IPv4 header and the L4 headers.
const IP_CHECK: usize = IP_OFF + 10;
const IP_SRC: usize = IP_OFF + 12;
const TCP_CHECK: usize = L4_OFF + 16;
const UDP_CHECK: usize = L4_OFF + 6;
const L4_SPORT: usize = L4_OFF;

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    // Headers may sit in paged data; pull the part we read into the linear area.
    let _ = ctx.pull_data(L4_OFF as u32 + 8);
    let t = match parse::parse(ctx.data(), ctx.data_end(), false) {
        Ok(t) => t,
        Err(_) => {
            count(Counter::TcPass);
            return TC_ACT_OK as i32;
        }
    };
    let rk = lb::reply_key(t.src, t.dst, t.sport, t.dport, t.proto);
    // SAFETY: plain-data map value.
    let Some(rev) = (unsafe { REVNAT.get(&rk) }) else {
        count(Counter::TcPass);
        return TC_ACT_OK as i32;
    };
    let rev = *rev;
    if snat_source(ctx, &t, rev.src_addr_be, rev.src_port_be).is_err() {
        return TC_ACT_SHOT as i32;
    }
    count(Counter::TcReply);
    let out = parse::Tuple {
        src: rev.src_addr_be,
        sport: rev.src_port_be,
        ..t
    };
    forward(ctx, &out)
}

/// Sends the translated reply straight out of the interface towards the client. Handing it
/// back to the kernel would not do: its source is now a node address (the NodePort's), and
/// the kernel drops packets arriving with a local source as martians.
#[inline(always)]
fn forward(ctx: &TcContext, t: &parse::Tuple) -> i32 {
    // SAFETY: zeroed bpf_fib_lookup is valid input; the fields used are set below.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
    p.l4_protocol = t.proto;
    p.sport = t.sport;
    p.dport = t.dport;
    p.__bindgen_anon_1.tot_len = (ctx.len() as u16).saturating_sub(14);
    // SAFETY: reading the skb's ifindex, a plain field of the context.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    p.__bindgen_anon_3.ipv4_src = t.src;
    p.__bindgen_anon_4.ipv4_dst = t.dst;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    // A router's duty: one hop less (the kernel would have done it on its forwarding path).
    let Ok(ttl) = ctx.load::<u8>(IP_OFF + 8) else {
        return TC_ACT_SHOT as i32;
    };
    if ttl <= 1 {
        return TC_ACT_SHOT as i32;
    }
    let old = u16::from_ne_bytes([ttl, t.proto]) as u64;
    let new = u16::from_ne_bytes([ttl - 1, t.proto]) as u64;
    if ctx.l3_csum_replace(IP_CHECK, old, new, 2).is_err()
        || ctx.store(IP_OFF + 8, &(ttl - 1), 0).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if ctx.store(0, &p.dmac, 0).is_err() || ctx.store(6, &p.smac, 0).is_err() {
                return TC_ACT_SHOT as i32;
            }
            unsafe { bpf_redirect(p.ifindex, 0) as i32 }
        }
        // No neighbour entry yet: let the kernel resolve it and send.
        BPF_FIB_LKUP_RET_NO_NEIGH => unsafe {
            bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32
        },
        _ => {
            count(Counter::FibFail);
            TC_ACT_SHOT as i32
        }
    }
}

#[inline(always)]
fn snat_source(ctx: &TcContext, t: &parse::Tuple, addr: u32, port: u16) -> Result<(), i64> {
    let l4_check = if t.proto == PROTO_TCP {
        TCP_CHECK
    } else {
        UDP_CHECK
    };
    let pseudo = BPF_F_PSEUDO_HDR as u64 | 4;
    // UDP with checksum 0 has none to fix (BPF_F_MARK_MANGLED_0 keeps 0 meaning "none").
    let mangled0 = if t.proto == PROTO_UDP {
        aya_ebpf::bindings::BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    ctx.l4_csum_replace(l4_check, t.src as u64, addr as u64, pseudo | mangled0)?;
    ctx.l4_csum_replace(l4_check, t.sport as u64, port as u64, 2 | mangled0)?;
    ctx.l3_csum_replace(IP_CHECK, t.src as u64, addr as u64, 4)?;
    ctx.store(IP_SRC, &addr, 0)?;
    ctx.store(L4_SPORT, &port, 0)?;
    Ok(())
}
