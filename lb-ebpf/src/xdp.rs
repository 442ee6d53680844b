//! The north-south path on a node's uplink: NodePort and external/LoadBalancer IPs are
//! DNATed to a Maglev-chosen backend; replies of SNATed flows are translated back.
use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    programs::XdpContext,
};
use lb_common::*;

use crate::{
    arp, ct,
    event::event,
    fib,
    lb::{self, Choice},
    maps::{
        ANNOUNCE_LEASE, ARP, CLUSTER_IPS, CONFIG, FRONTENDS, Outcome, REVNAT, SERVICES, count,
        may_answer, record,
    },
    nat::{Side, rewrite},
    parse::{self, FRAG_NONE, Tuple},
    policy::{in_service_cidr, source_allowed},
    xdp_reject,
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    count(Counter::Packets);
    let t = match parse::parse(ctx.data(), ctx.data_end(), true) {
        Ok(t) => t,
        Err(reason) => {
            if reason == Counter::PassNotIpv4
                && let Some(action) = answer_arp(ctx)
            {
                return action;
            }
            count(reason);
            return XDP_PASS;
        }
    };
    if t.frag != FRAG_NONE || t.ip_opts != 0 {
        // Fragments and packets with IPv4 options are translated by the uplink's tc hook
        // (frag.rs; tc removes the options first).
        count(if t.ip_opts != 0 {
            Counter::PassIpOptions
        } else {
            Counter::PassToTc
        });
        return XDP_PASS;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return XDP_PASS;
    };
    if !for_this_host(ctx, cfg) {
        // A frame for another host's MAC (a switch floods unknown unicast, e.g. right
        // after an LB address moved): the kernel would drop it; load-balancing it here
        // could serve one connection from several nodes.
        count(Counter::PassOtherHost);
        return XDP_PASS;
    }
    let rk = t.flow_key();
    // Reverse NAT before frontends for the node's SNAT address and range: a reply to one
    // of our SNAT ports is ours even if a frontend claims that address and port. Anything
    // else there is not ours: the node's own services may listen on ports of the range
    // (the kernel's NAT shares its ports with them too; the 5-tuple tells them apart).
    let to_snat = cfg.is_snat_endpoint(t.dst, t.dport);
    if to_snat && let Some(rev) = unsafe { REVNAT.get(&rk) } {
        let rev = *rev;
        return translate_reply(ctx, &t, &rk, &rev, cfg);
    }
    let fk = t.frontend_key();
    // SAFETY: plain-data map values, see lb::choose.
    if let Some(fe) = unsafe { FRONTENDS.get(&fk) } {
        // Everything arriving here comes from outside the node, ClusterIPs included (a
        // router or another host sending service-CIDR traffic to this node): kube-proxy
        // DNATs that too, masquerading it towards backends on other nodes.
        if fe.flags & FE_SOURCE_RANGES != 0 && !source_allowed(fe.svc_id, t.src) {
            count(Counter::DropSourceRange);
            event(ctx, cfg, &t, DebugEvent::DroppedClientNotInSourceRanges);
            return XDP_DROP;
        }
        if seed_checksum(ctx, &t) {
            return XDP_PASS;
        }
        return to_backend(ctx, &t, fe.svc_id, cfg);
    }
    // Replies of flows that are not source-NATed (backend -> client).
    if !to_snat && let Some(rev) = unsafe { REVNAT.get(&rk) } {
        let rev = *rev;
        return translate_reply(ctx, &t, &rk, &rev, cfg);
    }
    // SAFETY: plain-data map value.
    if unsafe { CLUSTER_IPS.get(&t.dst) }.is_some() {
        // A ClusterIP on a port no service uses, from outside: refused, as kube-proxy does.
        count(Counter::RejectUnknownPort);
        event(ctx, cfg, &t, DebugEvent::RejectedUnusedClusterIpPort);
        return refuse(ctx, &t);
    }
    if in_service_cidr(t.dst) {
        count(Counter::DropServiceCidr);
        event(ctx, cfg, &t, DebugEvent::DroppedUnheldServiceCidrAddress);
        return XDP_DROP;
    }
    count(Counter::PassNoMatch);
    event(ctx, cfg, &t, DebugEvent::PassedNoService);
    XDP_PASS
}

/// A reply matched a reverse entry: translated here, or handed to the uplink's tc hook
/// when it is for a pod on this node (tc checks and translates it there).
#[inline(always)]
fn translate_reply(ctx: &XdpContext, t: &Tuple, rk: &FlowKey, rev: &RevNat, cfg: &Config) -> u32 {
    if rev.flags & REV_TO_LOCAL_POD != 0 {
        count(Counter::PassToTc);
        return XDP_PASS;
    }
    if seed_checksum(ctx, t) {
        return XDP_PASS;
    }
    if !ct::seen_reply(rk, rev, t.tcp_flags, cfg) {
        // Its flow is gone: nothing to translate it to.
        event(ctx, cfg, t, DebugEvent::DroppedStaleReply);
        return XDP_DROP;
    }
    reply(ctx, t, rev)
}

/// A packet whose checksum is left for offload to complete (see `nat::checksum_is_seed`):
/// handed untranslated to the uplink's tc hook, which translates it with the kernel's
/// checksum helpers. Happens only to packets sent by a process on the host at the other end
/// of a veth uplink (a kind node reached from its host); frames from a NIC carry complete
/// checksums.
#[inline(always)]
fn seed_checksum(ctx: &XdpContext, t: &Tuple) -> bool {
    if crate::nat::checksum_is_seed(ctx.data(), ctx.data_end(), t.proto) {
        count(Counter::PassCsumPartial);
        return true;
    }
    false
}

#[inline(always)]
fn to_backend(ctx: &XdpContext, t: &Tuple, svc_id: u32, cfg: &Config) -> u32 {
    let Some(svc) = (unsafe { SERVICES.get(svc_id) }) else {
        count(Counter::PassNoMatch);
        return XDP_PASS;
    };
    let svc = *svc;
    let len = (ctx.data_end() - ctx.data()) as u64;
    let ct_key = t.flow_key();
    let target = match lb::choose(&ct_key, t.tcp_flags, svc_id, &svc, lb::Path::NORTH_SOUTH) {
        Choice::Go(target) => target,
        Choice::Reject => {
            record(svc_id, len, Outcome::Reject);
            event(ctx, cfg, t, DebugEvent::RejectedNoEndpoint);
            return refuse(ctx, t);
        }
        Choice::Drop => {
            event(ctx, cfg, t, DebugEvent::DroppedNoLocalEndpointOrSnatPort);
            return XDP_DROP;
        }
    };
    if target.new_flow {
        event(ctx, cfg, t, DebugEvent::NewFlow);
    }
    record(
        svc_id,
        len,
        Outcome::Forward {
            new_flow: target.new_flow,
        },
    );
    let be = target.backend;
    if target.snat_port == 0 {
        // Local pod: the node's own forwarding delivers it through the pod's veth, and the
        // tc hook there translates the reply.
        if rewrite(
            ctx.data(),
            ctx.data_end(),
            t.proto,
            Side::Dst,
            be.addr_be,
            be.port_be,
        )
        .is_none()
        {
            return XDP_DROP;
        }
        count(Counter::FwdLocal);
        return XDP_PASS;
    }
    let from = (target.snat_addr, target.snat_port);
    forward(
        ctx,
        t.proto,
        from,
        (be.addr_be, be.port_be),
        Counter::FwdRemote,
    )
}

/// A backend on another node answers our SNAT address: give the client back the frontend.
#[inline(always)]
fn reply(ctx: &XdpContext, t: &Tuple, rev: &RevNat) -> u32 {
    let from = (rev.src_addr_be, rev.src_port_be);
    forward(
        ctx,
        t.proto,
        from,
        (rev.dst_addr_be, rev.dst_port_be),
        Counter::Reply,
    )
}

/// Rewrites source and destination to `from` and `to` (address, port; network order) and
/// sends the frame out towards `to` (see fib.rs), counting it as `what`.
#[inline(always)]
fn forward(ctx: &XdpContext, proto: u8, from: (u32, u16), to: (u32, u16), what: Counter) -> u32 {
    if let Some(action) = ttl_expired(ctx) {
        return action;
    }
    let out = Tuple {
        src: from.0,
        dst: to.0,
        sport: from.1,
        dport: to.1,
        proto,
        tcp_flags: 0,
        frag: FRAG_NONE,
        ip_id_be: 0,
        ip_opts: 0,
    };
    // The next hop first, the rewrite after: a packet XDP cannot send goes to the uplink's
    // tc untranslated, and tc takes the same decision (the flow's conntrack entry is there
    // now) and sends it with the kernel's neighbour resolution, or answers "fragmentation
    // needed". So nothing ever reaches tc already translated, and tc never has to trust a
    // node or frontend source address on a packet from the wire.
    let p = match fib::lookup(ctx, &out, ip_tot_len(ctx)) {
        Ok(p) => p,
        Err(rc) => {
            count(if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
                Counter::NeighResolve
            } else {
                Counter::PassToTc
            });
            return XDP_PASS;
        }
    };
    let (data, end) = (ctx.data(), ctx.data_end());
    if rewrite(data, end, proto, Side::Src, from.0, from.1).is_none()
        || rewrite(data, end, proto, Side::Dst, to.0, to.1).is_none()
    {
        return XDP_DROP;
    }
    count(what);
    fib::send(ctx, &p)
}

/// A packet to forward whose TTL runs out here: answered, untranslated, with ICMP time
/// exceeded from the address it was sent to (RFC 1812), or dropped when its source cannot
/// be answered. `None`: the TTL allows forwarding.
#[inline(always)]
fn ttl_expired(ctx: &XdpContext) -> Option<u32> {
    let ip =
        parse::ptr_at::<network_types::ip::Ipv4Hdr>(ctx.data(), ctx.data_end(), parse::IP_OFF)?;
    // SAFETY: bounds checked by ptr_at.
    let (ttl, src) = unsafe { ((*ip).ttl, u32::from_ne_bytes((*ip).src_addr)) };
    if ttl > 1 {
        return None;
    }
    if !may_answer(src) {
        return Some(XDP_DROP);
    }
    count(Counter::TtlExceeded);
    Some(xdp_reject::icmp_error(
        ctx,
        crate::reject::IcmpError::TtlExceeded,
    ))
}

/// The frame's destination is this node's MAC (or a group address); always true while
/// the agent has not written the MAC (`Config::mac` all zero).
#[inline(always)]
fn for_this_host(ctx: &XdpContext, cfg: &Config) -> bool {
    let Some(eth) = parse::ptr_at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at.
    let dst = unsafe { *eth };
    cfg.mac == [0; 6] || dst == cfg.mac || dst[0] & 1 != 0
}

/// An ARP request for an address this node announces, while the agent's lease holds:
/// answered in place (XDP_TX). `None`: not ours, left to the kernel.
#[inline(always)]
fn answer_arp(ctx: &XdpContext) -> Option<u32> {
    let frame = parse::ptr_at::<[u8; arp::ARP_FRAME_LEN]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds checked by ptr_at; XDP owns the frame.
    let frame = unsafe { &mut *frame };
    let target = arp::request_target(frame)?;
    // SAFETY: plain-data map value.
    unsafe { ARP.get(&target) }?;
    let cfg = CONFIG.get(0)?;
    if !lease_running(*ANNOUNCE_LEASE.get(0)?, ct::now_ms()) {
        count(Counter::ArpLeaseExpired);
        return None;
    }
    arp::make_reply(frame, &cfg.mac);
    count(Counter::ArpReply);
    Some(XDP_TX)
}

/// "Connection refused" back to the client: a RST for TCP, ICMP port unreachable for UDP.
#[inline(always)]
fn refuse(ctx: &XdpContext, t: &Tuple) -> u32 {
    if !may_answer(t.src) {
        return XDP_DROP;
    }
    if t.proto == PROTO_TCP {
        count(Counter::RejectRst);
        xdp_reject::tcp_rst(ctx)
    } else {
        count(Counter::RejectIcmp);
        xdp_reject::icmp_error(ctx, crate::reject::IcmpError::PortUnreachable)
    }
}

#[inline(always)]
fn ip_tot_len(ctx: &XdpContext) -> u16 {
    match parse::ptr_at::<network_types::ip::Ipv4Hdr>(ctx.data(), ctx.data_end(), parse::IP_OFF) {
        Some(ip) => u16::from_be_bytes(unsafe { (*ip).tot_len }),
        None => 0,
    }
}
