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
        BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_FRAG_NEEDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode, bpf_fib_lookup as FibParams,
    },
    helpers::{
        bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_skb_adjust_room, bpf_skb_change_tail,
    },
    programs::TcContext,
};
use core::mem::offset_of;

/// `skb->pkt_type` of a frame for another host's MAC (linux/if_packet.h).
const PACKET_OTHERHOST: u32 = 3;

use lb_common::*;
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    arp, ct,
    event::event,
    frag, icmp,
    lb::{self, Choice, Path},
    maps::{
        ANNOUNCE_LEASE, ARP, BACKENDS, CLUSTER_IPS, CONFIG, FRONTENDS, Outcome, REVNAT, SERVICES,
        count, may_answer, record,
    },
    parse::{self, ETH_LEN, FRAG_LATER, FRAG_NONE, IP_LEN, IP_OFF, L4_OFF, Tuple, ptr_at},
    policy::{in_service_cidr, source_allowed},
    reject,
};

/// Offsets in the frame of the fields rewritten here, from the header types.
const TCP_CHECK: usize = L4_OFF + offset_of!(TcpHdr, check);
const UDP_CHECK: usize = L4_OFF + offset_of!(UdpHdr, check);
/// TCP and UDP keep their ports at the same place.
const L4_SPORT: usize = L4_OFF + offset_of!(TcpHdr, source);
const _: () = assert!(
    offset_of!(TcpHdr, source) == offset_of!(UdpHdr, src)
        && offset_of!(TcpHdr, dest) == offset_of!(UdpHdr, dst)
);

/// The longest IPv4 options (a 60-byte header).
const MAX_IP_OPTS: usize = 40;

/// IPv4 options removed from a packet about to be translated or answered, so that its L4
/// header is where the rest of this file writes it (`L4_OFF`). A NAT may drop options
/// (most routers ignore or drop them, RFC 7126); kube-proxy's NAT keeps them, but passing
/// such packets on untranslated, as before, broke their connections outright. `false`: the
/// packet could not be changed (dropped by the caller).
#[inline(always)]
fn strip_ip_options(ctx: &TcContext, opts: u8) -> bool {
    if opts == 0 {
        return true;
    }
    // BPF_ADJ_ROOM_NET removes bytes right after the fixed IPv4 header: the options.
    if unsafe {
        bpf_skb_adjust_room(
            ctx.skb.skb,
            -(opts as i32),
            bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
            0,
        )
    } != 0
    {
        return false;
    }
    pull_headers(ctx);
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), IP_OFF) else {
        return false;
    };
    // SAFETY: bounds checked by ptr_at; the linear data is writable (pulled).
    let ip = unsafe { &mut *ip };
    ip.vihl = 0x45;
    ip.tot_len = (u16::from_be_bytes(ip.tot_len).wrapping_sub(opts as u16)).to_be_bytes();
    // The old checksum covered the options too: computed afresh over the 20 bytes.
    ip.check = [0, 0];
    let words = ip as *const Ipv4Hdr as *const [u8; 2];
    let mut sum = 0u32;
    for i in 0..IP_LEN / 2 {
        // SAFETY: within the header checked above.
        sum += u16::from_ne_bytes(unsafe { *words.add(i) }) as u32;
    }
    ip.check = (!csum::fold(sum)).to_ne_bytes();
    count(Counter::IpOptionsRemoved);
    true
}

/// Headers may sit in paged data: pull what the parser reads into the linear area — up to
/// the end of a TCP header, the longest one read — or the whole packet if it is shorter (a
/// pull past the end would fail and pull nothing).
#[inline(always)]
fn pull_headers(ctx: &TcContext) {
    let want = (L4_OFF + MAX_IP_OPTS + size_of::<TcpHdr>()) as u32;
    let len = ctx.len();
    let _ = ctx.pull_data(if len < want { len } else { want });
}

/// The IPv4 total length fits the packet (the parser sees only the linear part, so it
/// cannot tell): a packet claiming more is malformed, and is left to the kernel, which drops
/// it, rather than translated and sent on.
#[inline(always)]
fn ip_len_fits(ctx: &TcContext) -> bool {
    match ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), IP_OFF) {
        // SAFETY: bounds checked by ptr_at.
        Some(ip) => {
            ETH_LEN as u32 + u16::from_be_bytes(unsafe { (*ip).tot_len }) as u32 <= ctx.len()
        }
        None => false,
    }
}

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    pull_headers(ctx);
    let mut t = match parse::parse(ctx.data(), ctx.data_end(), false) {
        Ok(t) if ip_len_fits(ctx) => t,
        _ => {
            count(Counter::TcPass);
            return TC_ACT_OK as i32;
        }
    };
    if !frag::fill_ports(&mut t) {
        count(Counter::PassFragment);
        return TC_ACT_OK as i32;
    }
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
                event(ctx, cfg, &t, DebugEvent::DroppedPodNotInSourceRanges);
                return TC_ACT_SHOT as i32;
            }
            let path = Path {
                snat_remote: fe.flags & (FE_CLUSTER_IP | FE_SHORT_CIRCUIT) == 0,
                from_pod: true,
            };
            return to_backend(ctx, &t, fe.inside_svc_id, path, cfg);
        }
    }
    if let Some(action) = unused_service_address(ctx, &t, cfg) {
        return action;
    }
    let Some(rev) = (unsafe { REVNAT.get(&rk) }) else {
        count(Counter::TcPass);
        return TC_ACT_OK as i32;
    };
    let rev = *rev;
    checked_reply(ctx, &t, &rk, &rev, cfg)
}

/// A service address nothing matched: a ClusterIP on a port no service uses is refused, as
/// kube-proxy does; another address of the service CIDRs that no Service holds is dropped.
/// `None`: not a service address.
#[inline(always)]
fn unused_service_address(ctx: &TcContext, t: &Tuple, cfg: &Config) -> Option<i32> {
    // SAFETY: plain-data map value.
    if unsafe { CLUSTER_IPS.get(&t.dst) }.is_some() {
        count(Counter::RejectUnknownPort);
        event(ctx, cfg, t, DebugEvent::RejectedUnusedClusterIpPort);
        return Some(reject(ctx, t));
    }
    if in_service_cidr(t.dst) {
        count(Counter::DropServiceCidr);
        event(ctx, cfg, t, DebugEvent::DroppedUnheldServiceCidrAddress);
        return Some(TC_ACT_SHOT as i32);
    }
    None
}

/// A reply matched a reverse entry: translated if its flow is live, else dropped (a
/// leftover entry must not rewrite another connection's packets).
#[inline(always)]
fn checked_reply(ctx: &TcContext, t: &Tuple, rk: &FlowKey, rev: &RevNat, cfg: &Config) -> i32 {
    if !ct::seen_reply(rk, rev, t.tcp_flags, cfg) {
        event(ctx, cfg, t, DebugEvent::DroppedStaleReply);
        return TC_ACT_SHOT as i32;
    }
    reply(ctx, t, rev)
}

/// tc ingress on the uplink: the north-south path for what XDP did not take. That is every
/// packet when the uplink runs without XDP (`--xdp-mode off`, and `auto` on a veth, where tc
/// measured faster than generic XDP), and otherwise what XDP hands on:
/// - replies to flows started by a pod on this node (`REV_TO_LOCAL_POD`): only tc can put a
///   packet into a pod's veth whatever the XDP mode, and the kernel would drop it as a
///   martian once its source is a node address;
/// - packets whose checksum is a seed for offload (CHECKSUM_PARTIAL), which XDP cannot
///   translate correctly and the checksum helpers here can;
/// - fragments (frag.rs);
/// - packets XDP could not send (no neighbour entry for the next hop, too large for it),
///   handed on untranslated.
///
/// The decisions are the XDP path's, in the same order (see xdp.rs). Nothing arrives here
/// translated, so a packet from the wire with a node or frontend source is never sent on
/// (the kernel drops it as a martian): spoofing the node cannot reach a pod.
#[inline(always)]
pub fn run_uplink(ctx: &TcContext) -> i32 {
    count(Counter::TcUplinkPackets);
    pull_headers(ctx);
    let mut t = match parse::parse(ctx.data(), ctx.data_end(), false) {
        Ok(_) if !ip_len_fits(ctx) => {
            count(Counter::Truncated);
            return TC_ACT_OK as i32;
        }
        Ok(t) => t,
        Err(reason) => {
            if reason == Counter::PassNotIpv4 {
                return answer_arp(ctx);
            }
            if reason == Counter::PassNotTcpUdp
                && let Some(action) =
                    icmp_error_for_client(ctx).or_else(|| icmp_error_for_backend(ctx))
            {
                return action;
            }
            count(reason);
            return TC_ACT_OK as i32;
        }
    };
    if !frag::fill_ports(&mut t) {
        count(Counter::PassFragment);
        return TC_ACT_OK as i32;
    }
    // SAFETY: reading a plain field of the context.
    if unsafe { (*ctx.skb.skb).pkt_type } == PACKET_OTHERHOST {
        // For another host's MAC (a switch flooding): the kernel drops it; serving it here
        // could serve one connection from several nodes.
        count(Counter::PassOtherHost);
        return TC_ACT_OK as i32;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return TC_ACT_OK as i32;
    };
    let rk = t.flow_key();
    let to_snat = cfg.is_snat_endpoint(t.dst, t.dport);
    if to_snat && let Some(rev) = unsafe { REVNAT.get(&rk) } {
        let rev = *rev;
        return checked_reply(ctx, &t, &rk, &rev, cfg);
    }
    // SAFETY: plain-data map values, see lb::choose.
    if let Some(fe) = unsafe { FRONTENDS.get(&t.frontend_key()) } {
        if fe.flags & FE_SOURCE_RANGES != 0 && !source_allowed(fe.svc_id, t.src) {
            count(Counter::DropSourceRange);
            event(ctx, cfg, &t, DebugEvent::DroppedClientNotInSourceRanges);
            return TC_ACT_SHOT as i32;
        }
        return to_backend(ctx, &t, fe.svc_id, Path::NORTH_SOUTH, cfg);
    }
    if !to_snat && let Some(rev) = unsafe { REVNAT.get(&rk) } {
        let rev = *rev;
        return checked_reply(ctx, &t, &rk, &rev, cfg);
    }
    if let Some(action) = unused_service_address(ctx, &t, cfg) {
        return action;
    }
    count(Counter::TcPass);
    TC_ACT_OK as i32
}

/// An ICMP error about a source-NATed flow (RFC 5508), from the path to its backend (the
/// backend's node or a router: "fragmentation needed", "time exceeded", unreachables),
/// addressed to the SNAT address and quoting the packet the node sent (SNAT port ->
/// backend). The client gets it as if the frontend had sent it: outer source the frontend,
/// destination the client, the quote its own packet (client -> frontend). `None`: not such
/// an error (left to the kernel, as before).
#[inline(always)]
fn icmp_error_for_client(ctx: &TcContext) -> Option<i32> {
    if (ctx.len() as usize) < icmp::ICMP_ERR_LEN
        || ctx.pull_data(icmp::ICMP_ERR_LEN as u32).is_err()
    {
        return None;
    }
    let cfg = CONFIG.get(0)?;
    let b = ptr_at::<[u8; icmp::ICMP_ERR_LEN]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds checked by ptr_at; the data is writable after pull_data.
    let b = unsafe { &mut *b };
    let (outer_dst, q) = icmp::quoted(b)?;
    if outer_dst != cfg.snat_addr_be || !cfg.is_snat_endpoint(q.src, q.sport) {
        return None;
    }
    // The flow's reply key: backend -> SNAT address and port.
    let rk = FlowKey::new(q.dst, q.src, q.dport, q.sport, q.proto);
    // SAFETY: plain-data map value.
    let rev = *unsafe { REVNAT.get(&rk) }?;
    let to = icmp::Quoted {
        src: rev.dst_addr_be,
        sport: rev.dst_port_be,
        dst: rev.src_addr_be,
        dport: rev.src_port_be,
        ..q
    };
    icmp::rewrite(b, &q, &to, rev.src_addr_be, rev.dst_addr_be);
    count(Counter::IcmpErrorTranslated);
    Some(send_icmp(ctx, rev.src_addr_be, rev.dst_addr_be))
}

/// An ICMP error about a reply we sent to a client (from a frontend: NodePort, external
/// or LoadBalancer IP), from the client or a router on the way to it — "fragmentation
/// needed" from a smaller link there (the common path MTU case: large downloads), or
/// unreachables once the client is gone. It is addressed to the frontend and quotes the
/// reply as we sent it (frontend -> client); the backend gets it as if about its own packet
/// (RFC 5508): outer destination the backend (source the SNAT address when the flow is
/// source-NATed), the quote backend -> its peer (the SNAT address and port, or the client).
/// `None`: not such an error.
#[inline(always)]
fn icmp_error_for_backend(ctx: &TcContext) -> Option<i32> {
    let cfg = CONFIG.get(0)?;
    let b = ptr_at::<[u8; icmp::ICMP_ERR_LEN]>(ctx.data(), ctx.data_end(), 0)?;
    // SAFETY: bounds checked by ptr_at; the data is writable (icmp_error_for_client pulled
    // this much before returning None).
    let b = unsafe { &mut *b };
    let (outer_dst, q) = icmp::quoted(b)?;
    // SAFETY: plain-data map value.
    if outer_dst != q.src
        || unsafe { FRONTENDS.get(&FrontendKey::new(q.src, q.sport, q.proto)) }.is_none()
    {
        return None;
    }
    // The flow, client -> frontend.
    let ct_key = FlowKey::new(q.dst, q.src, q.dport, q.sport, q.proto);
    let live = ct::lookup(&ct_key, cfg, ct::now_ms())?;
    // SAFETY: map value pointer, valid while the program runs (RCU).
    let e = unsafe { *live.entry };
    // SAFETY: plain-data map value.
    let be = *unsafe { BACKENDS.get(e.backend_id) }?;
    let outer_src = icmp::outer_src(b);
    let (peer, outer_src) = if e.flags & CT_SNAT != 0 {
        ((cfg.snat_addr_be, e.snat_port_be), cfg.snat_addr_be)
    } else {
        ((q.dst, q.dport), outer_src)
    };
    let to = icmp::Quoted {
        src: be.addr_be,
        sport: be.port_be,
        dst: peer.0,
        dport: peer.1,
        ..q
    };
    icmp::rewrite(b, &q, &to, outer_src, be.addr_be);
    count(Counter::IcmpErrorTranslated);
    Some(send_icmp(ctx, outer_src, be.addr_be))
}

/// Sends an ICMP packet already addressed `src -> dst` on: FIB, TTL, MACs, redirect.
#[inline(always)]
fn send_icmp(ctx: &TcContext, src: u32, dst: u32) -> i32 {
    let out = Tuple {
        src,
        dst,
        sport: 0,
        dport: 0,
        proto: PROTO_ICMP,
        tcp_flags: 0,
        frag: FRAG_NONE,
        ip_id_be: 0,
        ip_opts: 0,
    };
    let (rc, p) = fib_lookup(ctx, &out, 0);
    let resolved = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        _ => {
            count(Counter::FibFail);
            return TC_ACT_SHOT as i32;
        }
    };
    let (data, end) = (ctx.data(), ctx.data_end());
    let (Some(ip), Some(eth)) = (
        ptr_at::<Ipv4Hdr>(data, end, IP_OFF),
        ptr_at::<EthHdr>(data, end, 0),
    ) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: bounds checked by ptr_at; the linear data is writable (pulled).
    unsafe {
        let ip = &mut *ip;
        if ip.ttl <= 1 {
            return TC_ACT_SHOT as i32; // no error about an error
        }
        let old = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let new = u16::from_ne_bytes([ip.ttl, ip.proto]);
        ip.check = csum::replace16(u16::from_ne_bytes(ip.check), old, new).to_ne_bytes();
        if resolved {
            (*eth).dst_addr = p.dmac;
            (*eth).src_addr = p.smac;
        }
    }
    redirect(&p, resolved)
}

/// An ARP request for an address this node announces, while the agent's lease holds:
/// answered through the interface it came in on (the XDP responder's job when XDP runs).
#[inline(always)]
fn answer_arp(ctx: &TcContext) -> i32 {
    if ctx.pull_data(arp::ARP_FRAME_LEN as u32).is_err() {
        return TC_ACT_OK as i32;
    }
    let Some(frame) = ptr_at::<[u8; arp::ARP_FRAME_LEN]>(ctx.data(), ctx.data_end(), 0) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: bounds checked by ptr_at; the data is writable after pull_data.
    let frame = unsafe { &mut *frame };
    let Some(target) = arp::request_target(frame) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: plain-data map value.
    if unsafe { ARP.get(&target) }.is_none() {
        return TC_ACT_OK as i32;
    }
    let (Some(cfg), Some(lease)) = (CONFIG.get(0), ANNOUNCE_LEASE.get(0)) else {
        return TC_ACT_OK as i32;
    };
    if !lease_running(*lease, ct::now_ms()) {
        count(Counter::ArpLeaseExpired);
        return TC_ACT_OK as i32;
    }
    arp::make_reply(frame, &cfg.mac);
    count(Counter::ArpReply);
    // SAFETY: reading a plain field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

#[inline(always)]
fn reply(ctx: &TcContext, t: &Tuple, rev: &RevNat) -> i32 {
    count(Counter::TcReply);
    let out = Tuple {
        src: rev.src_addr_be,
        dst: rev.dst_addr_be,
        sport: rev.src_port_be,
        dport: rev.dst_port_be,
        ..*t
    };
    forward(ctx, t, &out)
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
            event(ctx, cfg, t, DebugEvent::RejectedNoEndpoint);
            return reject(ctx, t);
        }
        Choice::Drop => {
            event(ctx, cfg, t, DebugEvent::DroppedNoLocalEndpointOrSnatPort);
            return TC_ACT_SHOT as i32;
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
    count(match (path.from_pod, target.snat_port) {
        (true, _) => Counter::TcClusterIp,
        (false, 0) => Counter::FwdLocal,
        (false, _) => Counter::FwdRemote,
    });
    let be = target.backend;
    let mut out = Tuple {
        dst: be.addr_be,
        dport: be.port_be,
        ..*t
    };
    if target.snat_port != 0 {
        // Hairpin, or a NodePort/external IP whose backend is on another node.
        out.src = target.snat_addr;
        out.sport = target.snat_port;
    }
    forward(ctx, t, &out)
}

/// Rewrites the packet from `t`'s addresses and ports to `out`'s and sends it on towards
/// `out.dst`: FIB lookup, checksums, TTL, MACs, redirect. Handing it back to the kernel
/// would not always do: a reply's source may now be a node address (the NodePort's, or
/// the hairpin SNAT address) and the kernel drops packets arriving with a local source as
/// martians.
///
/// Only the L4 checksum goes through the kernel's helpers, which know the skb's checksum
/// state (CHECKSUM_PARTIAL: only the pseudo-header part of the seed changes); two calls
/// with precomputed differences instead of one per field. The IPv4 header checksum is never
/// offloaded, so it, the addresses, ports, TTL and MACs are written directly: helper calls
/// per field were most of this program's own cost (`xlb-bench --only pps`).
#[inline(always)]
fn forward(ctx: &TcContext, t: &Tuple, out: &Tuple) -> i32 {
    if !strip_ip_options(ctx, t.ip_opts) {
        return TC_ACT_SHOT as i32;
    }
    // The length the next hop's MTU is checked against; 0 for a GSO packet, whose segments
    // the kernel cuts to size later (the FIB then checks it as the kernel would).
    // SAFETY: reading a plain field of the context.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    let tot_len = if gso {
        0
    } else {
        (ctx.len() as u16).saturating_sub(ETH_LEN as u16)
    };
    let (rc, p) = fib_lookup(ctx, out, tot_len);
    let resolved = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        // No neighbour entry yet: the kernel resolves it and sends (redirect_neigh).
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        // Too large for the next hop: the sender learns the path's MTU (RFC 1191), as from
        // any router; a packet that may be fragmented cannot be here, so it is dropped.
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: the lookup wrote the next hop's MTU into this member.
            let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
            return frag_needed(ctx, t, mtu);
        }
        _ => {
            count(Counter::FibFail);
            return TC_ACT_SHOT as i32;
        }
    };
    // A router's duty: one hop less; an expiring packet is answered, untranslated, with
    // ICMP time exceeded (RFC 1812) instead of being forwarded — not a later fragment,
    // which no ICMP error is about (RFC 1122 3.2.2).
    match ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), IP_OFF) {
        // SAFETY: bounds checked by ptr_at.
        Some(ip) if unsafe { (*ip).ttl } > 1 => {}
        Some(_) if t.frag != FRAG_LATER && may_answer(t.src) => {
            count(Counter::TtlExceeded);
            return icmp_error(ctx, reject::IcmpError::TtlExceeded);
        }
        _ => return TC_ACT_SHOT as i32,
    }
    if t.frag == FRAG_LATER {
        // No L4 header (its checksum, in the first fragment, covers the whole datagram
        // and was updated there): addresses only.
        count(Counter::FragTranslated);
        return send_rewritten(ctx, t, out, &p, resolved);
    }
    frag::remember(t);
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
    if out.src != t.src || out.dst != t.dst {
        let d = diff(&[t.src, t.dst], &[out.src, out.dst]);
        // Size 0: `to` is a checksum difference.
        if ctx
            .l4_csum_replace(l4_check, 0, d as u64, BPF_F_PSEUDO_HDR as u64 | mangled0)
            .is_err()
        {
            return TC_ACT_SHOT as i32;
        }
    }
    let ports_in = u16_pair(t.sport, t.dport);
    let ports_out = u16_pair(out.sport, out.dport);
    if ports_in != ports_out {
        let d = diff(&[ports_in], &[ports_out]);
        if ctx
            .l4_csum_replace(l4_check, 0, d as u64, mangled0)
            .is_err()
        {
            return TC_ACT_SHOT as i32;
        }
    }
    // The helpers above may move the packet: fresh pointers from here on.
    let Some(ports) = ptr_at::<[u8; 4]>(ctx.data(), ctx.data_end(), L4_SPORT) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: bounds checked by ptr_at; the linear data is writable (pulled, and tc's
    // prologue uncloned the head).
    unsafe { *ports = ports_out.to_ne_bytes() };
    send_rewritten(ctx, t, out, &p, resolved)
}

/// The last step of `forward`, and all of it for a packet without an L4 header of its own
/// (a later fragment): the IPv4 header to `out`'s addresses, MACs when the neighbour was
/// resolved, out to the next hop.
#[inline(always)]
fn send_rewritten(ctx: &TcContext, t: &Tuple, out: &Tuple, p: &FibParams, resolved: bool) -> i32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    let (Some(ip), Some(eth)) = (
        ptr_at::<Ipv4Hdr>(data, end, IP_OFF),
        ptr_at::<EthHdr>(data, end, 0),
    ) else {
        return TC_ACT_SHOT as i32;
    };
    // SAFETY: bounds checked by ptr_at; the linear data is writable (pulled).
    unsafe {
        rewrite_ip(&mut *ip, t, out);
        if resolved {
            (*eth).dst_addr = p.dmac;
            (*eth).src_addr = p.smac;
        }
    }
    redirect(p, resolved)
}

/// The IPv4 header from `t`'s addresses to `out`'s, one hop less (the caller checked the
/// TTL), its checksum updated.
#[inline(always)]
fn rewrite_ip(ip: &mut Ipv4Hdr, t: &Tuple, out: &Tuple) {
    let old_ttl = u16::from_ne_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let mut check = u16::from_ne_bytes(ip.check);
    check = csum::replace16(check, old_ttl, u16::from_ne_bytes([ip.ttl, ip.proto]));
    check = csum::replace32(check, t.src, out.src);
    check = csum::replace32(check, t.dst, out.dst);
    ip.check = check.to_ne_bytes();
    ip.src_addr = out.src.to_ne_bytes();
    ip.dst_addr = out.dst.to_ne_bytes();
}

/// The kernel's FIB and neighbour tables asked for the next hop of `out` (its addresses,
/// protocol and ports; `tot_len` for the MTU check, 0 for none) from the packet's interface:
/// the helper's answer and the filled-in parameters.
#[inline(always)]
fn fib_lookup(ctx: &TcContext, out: &Tuple, tot_len: u16) -> (i64, FibParams) {
    // SAFETY: zeroed bpf_fib_lookup is valid input; the fields used are set below.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = 2; // AF_INET
    p.l4_protocol = out.proto;
    p.sport = out.sport;
    p.dport = out.dport;
    p.__bindgen_anon_1.tot_len = tot_len;
    // SAFETY: reading the skb's ifindex, a plain field of the context.
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    p.__bindgen_anon_3.ipv4_src = out.src;
    p.__bindgen_anon_4.ipv4_dst = out.dst;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb as *mut _,
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    (rc, p)
}

/// Out through the next hop's interface: MACs already written when the neighbour was
/// `resolved`, else the kernel resolves it first (redirect_neigh).
#[inline(always)]
fn redirect(p: &FibParams, resolved: bool) -> i32 {
    if resolved {
        unsafe { bpf_redirect(p.ifindex, 0) as i32 }
    } else {
        unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
    }
}

/// Source and destination port (network order) as the 32-bit word they form in the header.
#[inline(always)]
fn u16_pair(a: u16, b: u16) -> u32 {
    let (a, b) = (a.to_ne_bytes(), b.to_ne_bytes());
    u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
}

/// One's-complement difference between two runs of 32-bit words (what bpf_csum_diff
/// computes), for a checksum helper's size-0 form.
#[inline(always)]
fn diff<const N: usize>(from: &[u32; N], to: &[u32; N]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < N {
        sum = csum::add32(sum, !from[i]);
        sum = csum::add32(sum, to[i]);
        i += 1;
    }
    csum::fold(sum) as u32
}

/// Refuses the pod's packet: RST or ICMP port unreachable built over it and sent back into
/// the pod through the interface it came from.
#[inline(always)]
fn reject(ctx: &TcContext, t: &Tuple) -> i32 {
    // A later fragment has no header to answer (and no ICMP error is about one).
    if t.frag == FRAG_LATER || !may_answer(t.src) || !strip_ip_options(ctx, t.ip_opts) {
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
        return icmp_error(ctx, reject::IcmpError::PortUnreachable);
    }
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// A packet too large for its next hop (the FIB said so, before anything was rewritten):
/// with DF set, "fragmentation needed" with the hop's MTU back to its sender, quoting it as
/// received; without DF (it could be fragmented, which a BPF program cannot do), dropped.
#[inline(always)]
fn frag_needed(ctx: &TcContext, t: &Tuple, mtu: u16) -> i32 {
    let df = match ptr_at::<Ipv4Hdr>(ctx.data(), ctx.data_end(), IP_OFF) {
        // SAFETY: bounds checked by ptr_at.
        Some(ip) => (unsafe { (*ip).frags[0] } & 0x40) != 0,
        None => false,
    };
    if !df {
        count(Counter::FibFail);
        return TC_ACT_SHOT as i32;
    }
    if !may_answer(t.src) {
        return TC_ACT_SHOT as i32;
    }
    count(Counter::FragNeeded);
    icmp_error(ctx, reject::IcmpError::FragNeeded(mtu))
}

/// An ICMP error about the packet, quoting its IPv4 header and 8 bytes, sent back out of
/// the interface it came in on.
#[inline(always)]
fn icmp_error(ctx: &TcContext, what: reject::IcmpError) -> i32 {
    // SAFETY: reading the skb's ifindex, a plain field of the context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
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
    reject::build_icmp_error(unsafe { &mut *p }, &o, what);
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}
