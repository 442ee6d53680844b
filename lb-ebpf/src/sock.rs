//! Socket-level load balancing for the node's own processes (cgroup sock_addr hooks).
//!
//! Why sockets and not packets: a process on the node reaching a ClusterIP, its own
//! `<node IP>:<NodePort>` or `localhost:<NodePort>` sends packets that never enter through
//! the uplink or a pod interface, and localhost traffic never leaves `lo`. Translating the
//! destination once at connect()/sendmsg() time covers all three with no per-packet work and
//! no reverse NAT on the wire: the socket simply talks to the backend. recvmsg/getpeername
//! put the service address back where the application looks.
use aya_ebpf::bindings::BPF_ANY;
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use lb_common::*;

use crate::{
    lb::{self, Choice},
    maps::{CLUSTER_IPS, CONFIG, FRONTENDS, Outcome, SERVICES, SOCK_REVNAT, count, record},
    policy::{in_service_cidr, source_allowed},
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn refuse(c: Counter) -> i32 {
    count(c);
    // The application sees "connection refused", as with kube-proxy's REJECT.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}

/// connect4 and sendmsg4: service address -> backend address.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context fields are readable (and user_ip4/user_port writable) here.
    let (addr, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let fk = FrontendKey::new(addr, port, proto);
    let host = CONFIG.get(0).map_or(0, |c| c.host_netns_cookie);
    // SAFETY: the helper only reads the socket's namespace.
    let in_host = host == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) } == host;
    let Some(fe) = (unsafe { FRONTENDS.get(&fk) }) else {
        if unsafe { CLUSTER_IPS.get(&addr) }.is_some() {
            return refuse(Counter::RejectUnknownPort);
        }
        if in_service_cidr(addr) {
            // kube-proxy's nftables mode drops it in the output path. A socket hook can
            // only let the connect go or fail it: EPERM at once (a UDP sender sees EPERM
            // under kube-proxy too; a TCP connect there would time out instead).
            count(Counter::DropServiceCidr);
            return DENY;
        }
        return ALLOW;
    };
    if !in_host && fe.flags & FE_CLUSTER_IP == 0 {
        // A socket of another network namespace (a pod's, in a hooked cgroup): its
        // 127.0.0.1 is its own, and its NodePort and external-address traffic goes the
        // packet path (tc on its interface), where kube-proxy would see it too.
        return ALLOW;
    }
    // The node's processes are inside the cluster: externalTrafficPolicy Local does not
    // restrict them (`inside_svc_id`), loadBalancerSourceRanges does, with the node's
    // address as the source the connection will have.
    if fe.flags & FE_SOURCE_RANGES != 0 {
        let node = CONFIG.get(0).map(|c| c.snat_addr_be).unwrap_or(0);
        if !source_allowed(fe.svc_id, node) {
            count(Counter::DropSourceRangeInside);
            return DENY;
        }
    }
    let svc_id = fe.inside_svc_id;
    let Some(&svc) = (unsafe { SERVICES.get(svc_id) }) else {
        return ALLOW;
    };
    match lb::no_backend(&svc) {
        None => {}
        Some(Choice::Reject) => {
            record(svc_id, 0, Outcome::Reject);
            return refuse(Counter::SockReject);
        }
        Some(_) => return DENY,
    }
    // One socket, one backend: every datagram of an unconnected UDP socket goes to the same
    // backend, so request/response protocols keep their peer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let h = ((cookie ^ (cookie >> 32)) as u32).wrapping_mul(0x9e37_79b1);
    // The node itself is the client for session affinity (msg_src_ip4 exists only in
    // sendmsg hooks, and the source is not chosen yet at connect time).
    let client = CONFIG.get(0).map(|c| c.snat_addr_be).unwrap_or(0);
    let Some((_, be)) = lb::pick(svc_id, &svc, client, h, true) else {
        return ALLOW;
    };
    let key = SockRevKey {
        cookie,
        backend_addr_be: be.addr_be,
        backend_port_be: be.port_be,
        _pad: 0,
    };
    let rev = SockRev {
        addr_be: addr,
        port_be: port,
        _pad: 0,
    };
    let _ = SOCK_REVNAT.insert(&key, &rev, BPF_ANY as u64);
    unsafe {
        (*sa).user_ip4 = be.addr_be;
        (*sa).user_port = be.port_be as u32;
    }
    record(svc_id, 0, Outcome::Forward { new_flow: true });
    count(Counter::SockLb);
    ALLOW
}

/// recvmsg4 and getpeername4: backend address -> the service address the socket asked for.
#[inline(always)]
pub fn from_backend(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let key = SockRevKey {
        cookie,
        backend_addr_be: unsafe { (*sa).user_ip4 },
        backend_port_be: unsafe { (*sa).user_port as u16 },
        _pad: 0,
    };
    if let Some(rev) = unsafe { SOCK_REVNAT.get(&key) } {
        unsafe {
            (*sa).user_ip4 = rev.addr_be;
            (*sa).user_port = rev.port_be as u32;
        }
    }
    ALLOW
}
