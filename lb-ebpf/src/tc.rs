//! tc ingress on the host side of every local pod's interface (traffic leaving a pod).
//!
//! Two jobs, both on packets as they leave a pod:
//! - **ClusterIP**: a pod's packet to a ClusterIP is DNATed to a backend chosen by the same
//!   conntrack and Maglev tables as the XDP path. The pod's address is kept (the backend sees
//!   the real client), except when the pod reaches itself (hairpin), see `lb::Path`.
//! - **Replies**: a pod that is a backend answers with its own address; the reply gets the
//!   frontend the client used (ClusterIP, NodePort or external IP) back as source.
//!
//! Why tc and not XDP: these packets never cross the uplink's XDP hook (they start in a pod
//! on this node), and a pod's veth peer is the pod's own interface, out of our hands. skbs
//! here may carry CHECKSUM_PARTIAL, so the kernel's checksum helpers (which know the skb's
//! checksum state) do the updates instead of the software arithmetic of the XDP path.
use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode,
        bpf_fib_lookup as FibParams,
    },
    helpers::{
        bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_adjust_room, bpf_skb_change_tail,
    },
    programs::TcContext,
};
use core::mem::offset_of;

use lb_common::*;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    ct,
    event::event,
    lb::{self, Choice, Path},
    maps::{CLUSTER_IPS, CONFIG, FRONTENDS, Outcome, REVNAT, SERVICES, count, record},
    parse::{self, ETH_LEN, IP_OFF, L4_OFF, Tuple, ptr_at},
    policy::{in_service_cidr, source_allowed},
    reject,
};

/// Offsets in the frame of the fields rewritten here, from the header types.
const ETH_DST: usize = offset_of!(EthHdr, dst_addr);
const ETH_SRC: usize = offset_of!(EthHdr, src_addr);
const IP_CHECK: usize = IP_OFF + offset_of!(Ipv4Hdr, check);
const IP_TTL: usize = IP_OFF + offset_of!(Ipv4Hdr, ttl);
const IP_SRC: usize = IP_OFF + offset_of!(Ipv4Hdr, src_addr);
const IP_DST: usize = IP_OFF + offset_of!(Ipv4Hdr, dst_addr);
const TCP_CHECK: usize = L4_OFF + offset_of!(TcpHdr, check);
const UDP_CHECK: usize = L4_OFF + offset_of!(UdpHdr, check);
/// TCP and UDP keep their ports at the same place.
const L4_SPORT: usize = L4_OFF + offset_of!(TcpHdr, source);
const L4_DPORT: usize = L4_OFF + offset_of!(TcpHdr, dest);
const _: () = assert!(
    offset_of!(TcpHdr, source) == offset_of!(UdpHdr, src)
        && offset_of!(TcpHdr, dest) == offset_of!(UdpHdr, dst)
);

/// Headers may sit in paged data: pull what the parser reads into the linear area — up to
/// the end of a TCP header, the longest one read — or the whole packet if it is shorter (a
/// pull past the end would fail and pull nothing).
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let want = (L4_OFF + size_of::<TcpHdr>()) as u32;
    let len = ctx.len();
    let _ = ctx.pull_data(if len < want { len } else { want });
}

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    let t = match parse::parse(ctx.data(), ctx.data_end(), false) {
        Ok(t) => t,
        Err(_) => {
            count(Counter::TcPass);
            return TC_ACT_OK as i32;
        }
    };
    let rk = t.flow_key();
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_OK as i32;
    };
    // A reply of a local backend to a hairpin flow goes to the SNAT address: reverse NAT
    // first there, as on the uplink (a frontend must not capture it).
    let to_snat = cfg.is_snat_endpoint(t.dst, t.dport);
    if to_snat && let Some(rev) = unsafe { REVNAT.get(&rk) } {
        let rev = *rev;
        return checked_reply(ctx, &t, &rk, &rev, cfg);
    }
    let fk = t.frontend_key();
    // SAFETY: plain-data map values, see lb::choose.
    if let Some(fe) = unsafe { FRONTENDS.get(&fk) } {
        // Pods reach NodePorts and external IPs too (kube-proxy serves those to pods as
        // well, masqueraded); ClusterIPs keep the pod's address, and so do the external
        // addresses of an externalTrafficPolicy Local service, which kube-proxy
        // short-circuits to all endpoints (`inside_svc_id`).
        if fe.flags & (FE_CLUSTER_IP | FE_NODEPORT | FE_EXTERNAL) != 0 {
            if fe.flags & FE_SOURCE_RANGES != 0 && !source_allowed(fe.svc_id, t.src) {
                count(Counter::DropSourceRangeInside);
                event(ctx, cfg, &t, "dropped: pod not in loadBalancerSourceRanges");
                return TC_ACT_SHOT as i32;
            }
            let path = Path {
                snat_remote: fe.flags & (FE_CLUSTER_IP | FE_SHORT_CIRCUIT) == 0,
                from_pod: true,
            };
            return to_backend(ctx, &t, fe.inside_svc_id, path, cfg);
        }
    }
    // SAFETY: plain-data map value.
    if unsafe { CLUSTER_IPS.get(&t.dst) }.is_some() {
        // A ClusterIP on a port no service uses: refused, as kube-proxy does.
        count(Counter::RejectUnknownPort);
        event(ctx, cfg, &t, "rejected: ClusterIP port no service uses");
        return reject(ctx, &t);
    }
    if in_service_cidr(t.dst) {
        count(Counter::DropServiceCidr);
        event(
            ctx,
            cfg,
            &t,
            "dropped: service CIDR address no Service holds",
        );
        return TC_ACT_SHOT as i32;
    }
    let Some(rev) = (unsafe { REVNAT.get(&rk) }) else {
        count(Counter::TcPass);
        return TC_ACT_OK as i32;
    };
    let rev = *rev;
    checked_reply(ctx, &t, &rk, &rev, cfg)
}

/// A reply matched a reverse entry: translated if its flow is live, else dropped (a
/// leftover entry must not rewrite another connection's packets).
#[inline(always)]
fn checked_reply(ctx: &TcContext, t: &Tuple, rk: &FlowKey, rev: &RevNat, cfg: &Config) -> i32 {
    if !ct::seen_reply(rk, rev, t.tcp_flags, cfg) {
        event(ctx, cfg, t, "dropped: reply of a flow that is over");
        return TC_ACT_SHOT as i32;
    }
    reply(ctx, t, rev)
}

/// tc ingress on the uplink: replies to flows started by a pod on this node (ClusterIP with
/// a backend elsewhere, or a NodePort through SNAT). XDP passes them on untouched
/// (`REV_TO_LOCAL_POD`) because only tc can put a packet into a pod's veth whatever the XDP
/// mode, and the kernel would drop it as a martian once its source is a node address.
#[inline(always)]
pub fn run_uplink(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    let Ok(t) = parse::parse(ctx.data(), ctx.data_end(), false) else {
        return TC_ACT_OK as i32;
    };
    let rk = t.flow_key();
    // SAFETY: plain-data map value.
    if let Some(rev) = unsafe { REVNAT.get(&rk) }
        && rev.flags & REV_TO_LOCAL_POD != 0
        && let Some(cfg) = CONFIG.get(0)
    {
        let rev = *rev;
        return checked_reply(ctx, &t, &rk, &rev, cfg);
    }
    // A packet XDP already translated but could not send because the next hop has no
    // neighbour entry (XDP_TX traffic never refreshes the kernel's entry, so it ages out
    // on quiet paths). Its source is now a node address, which the kernel would drop as a
    // martian; here it is sent on with neighbour resolution. Recognised by that source:
    // the SNAT address, or a frontend (a reply to a client). Nothing from the wire
    // legitimately carries either.
    let snat = CONFIG.get(0).is_some_and(|c| c.snat_addr_be == t.src);
    let from_frontend = !snat && unsafe { FRONTENDS.get(&reverse_frontend(&t)) }.is_some();
    if snat || from_frontend {
        count(Counter::NeighResolve);
        return forward(ctx, &t);
    }
    TC_ACT_OK as i32
}

/// The frontend a translated reply comes from (its source address and port).
#[inline(always)]
fn reverse_frontend(t: &Tuple) -> FrontendKey {
    FrontendKey::new(t.src, t.sport, t.proto)
}

#[inline(always)]
fn reply(ctx: &TcContext, t: &Tuple, rev: &RevNat) -> i32 {
    if rewrite(ctx, t, rev.src_addr_be, rev.src_port_be, true).is_err()
        || rewrite(ctx, t, rev.dst_addr_be, rev.dst_port_be, false).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    count(Counter::TcReply);
    let out = Tuple {
        src: rev.src_addr_be,
        dst: rev.dst_addr_be,
        sport: rev.src_port_be,
        dport: rev.dst_port_be,
        proto: t.proto,
        tcp_flags: 0,
    };
    forward(ctx, &out)
}

#[inline(always)]
fn to_backend(ctx: &TcContext, t: &Tuple, svc_id: u32, path: Path, cfg: &Config) -> i32 {
    let Some(svc) = (unsafe { SERVICES.get(svc_id) }) else {
        return TC_ACT_OK as i32;
    };
    let svc = *svc;
    let len = ctx.len() as u64;
    let ct_key = t.flow_key();
    let target = match lb::choose(&ct_key, t.tcp_flags, svc_id, &svc, path) {
        Choice::Go(target) => target,
        Choice::Reject => {
            record(svc_id, len, Outcome::Reject);
            event(ctx, cfg, t, "rejected: service has no serving endpoint");
            return reject(ctx, t);
        }
        Choice::Drop => {
            event(
                ctx,
                cfg,
                t,
                "dropped: no endpoint for this node or no SNAT port",
            );
            return TC_ACT_SHOT as i32;
        }
    };
    if target.new_flow {
        event(ctx, cfg, t, "new flow");
    }
    record(
        svc_id,
        len,
        Outcome::Forward {
            new_flow: target.new_flow,
        },
    );
    count(Counter::TcClusterIp);
    let be = target.backend;
    if rewrite(ctx, t, be.addr_be, be.port_be, false).is_err() {
        return TC_ACT_SHOT as i32;
    }
    let mut out = Tuple {
        dst: be.addr_be,
        dport: be.port_be,
        ..*t
    };
    if target.snat_port != 0 {
        // Hairpin, or a NodePort/external IP whose backend is on another node.
        if rewrite(ctx, t, target.snat_addr, target.snat_port, true).is_err() {
            return TC_ACT_SHOT as i32;
        }
        out.src = target.snat_addr;
        out.sport = target.snat_port;
    }
    forward(ctx, &out)
}

/// Rewrites source (`src`) or destination address and port with the kernel's checksum
/// helpers. No-op when nothing changes (the common case for the destination of replies).
#[inline(always)]
fn rewrite(ctx: &TcContext, t: &Tuple, addr: u32, port: u16, src: bool) -> Result<(), i64> {
    let (old_addr, old_port, addr_off, port_off) = if src {
        (t.src, t.sport, IP_SRC, L4_SPORT)
    } else {
        (t.dst, t.dport, IP_DST, L4_DPORT)
    };
    if old_addr == addr && old_port == port {
        return Ok(());
    }
    let l4_check = if t.proto == PROTO_TCP {
        TCP_CHECK
    } else {
        UDP_CHECK
    };
    // UDP with checksum 0 has none to fix (BPF_F_MARK_MANGLED_0 keeps 0 meaning "none").
    let mangled0 = if t.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    ctx.l4_csum_replace(
        l4_check,
        old_addr as u64,
        addr as u64,
        BPF_F_PSEUDO_HDR as u64 | 4 | mangled0,
    )?;
    ctx.l4_csum_replace(l4_check, old_port as u64, port as u64, 2 | mangled0)?;
    ctx.l3_csum_replace(IP_CHECK, old_addr as u64, addr as u64, 4)?;
    ctx.store(addr_off, &addr, 0)?;
    ctx.store(port_off, &port, 0)?;
    Ok(())
}

/// Sends a translated packet on from here: FIB lookup, MACs, TTL, redirect. Handing it back
/// to the kernel would not always do: a reply's source may now be a node address (the
/// NodePort's, or the hairpin SNAT address) and the kernel drops packets arriving with a
/// local source as martians.
#[inline(always)]
fn forward(ctx: &TcContext, t: &Tuple) -> i32 {
    // SAFETY: zeroed bpf_fib_lookup is valid input; the fields used are set below.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
    p.l4_protocol = t.proto;
    p.sport = t.sport;
    p.dport = t.dport;
    p.__bindgen_anon_1.tot_len = (ctx.len() as u16).saturating_sub(ETH_LEN as u16);
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
    let Ok(ttl) = ctx.load::<u8>(IP_TTL) else {
        return TC_ACT_SHOT as i32;
    };
    if ttl <= 1 {
        return TC_ACT_SHOT as i32;
    }
    let old = u16::from_ne_bytes([ttl, t.proto]) as u64;
    let new = u16::from_ne_bytes([ttl - 1, t.proto]) as u64;
    if ctx.l3_csum_replace(IP_CHECK, old, new, 2).is_err()
        || ctx.store(IP_TTL, &(ttl - 1), 0).is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if ctx.store(ETH_DST, &p.dmac, 0).is_err() || ctx.store(ETH_SRC, &p.smac, 0).is_err() {
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

/// Refuses the pod's packet: RST or ICMP port unreachable built over it and sent back into
/// the pod through the interface it came from.
#[inline(always)]
fn reject(ctx: &TcContext, t: &Tuple) -> i32 {
    if !reject::answerable(t.src) {
        count(Counter::RejectSuppressed);
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: reading the skb's ifindex, a plain field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if t.proto == PROTO_TCP {
        count(Counter::RejectRst);
        if unsafe { bpf_skb_change_tail(ctx.skb.skb, reject::RST_LEN as u32, 0) } != 0
            || ctx.pull_data(reject::RST_LEN as u32).is_err()
        {
            return TC_ACT_SHOT as i32;
        }
        let Some(p) = ptr_at::<[u8; reject::RST_LEN]>(ctx.data(), ctx.data_end(), 0) else {
            return TC_ACT_SHOT as i32;
        };
        // SAFETY: bounds checked by ptr_at; the skb's data is writable after pull_data.
        if !reject::build_rst(unsafe { &mut *p }) {
            return TC_ACT_SHOT as i32;
        }
    } else {
        count(Counter::RejectIcmp);
        if ctx.pull_data(reject::QUOTE_END as u32).is_err() {
            return TC_ACT_SHOT as i32;
        }
        let Some(p) = ptr_at::<[u8; reject::QUOTE_END]>(ctx.data(), ctx.data_end(), 0) else {
            return TC_ACT_SHOT as i32;
        };
        let o = reject::origin(unsafe { &*p });
        unsafe {
            if bpf_skb_change_tail(ctx.skb.skb, reject::QUOTE_END as u32, 0) != 0
                || bpf_skb_adjust_room(
                    ctx.skb.skb,
                    reject::ICMP_GROW as i32,
                    bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
                    0,
                ) != 0
            {
                return TC_ACT_SHOT as i32;
            }
        }
        if ctx.pull_data(reject::ICMP_LEN as u32).is_err() {
            return TC_ACT_SHOT as i32;
        }
        let Some(p) = ptr_at::<[u8; reject::ICMP_LEN]>(ctx.data(), ctx.data_end(), 0) else {
            return TC_ACT_SHOT as i32;
        };
        reject::build_icmp_unreachable(unsafe { &mut *p }, &o);
    }
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
