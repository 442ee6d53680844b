//! xlb datapath: XDP on node uplinks (north-south) and tc on pod interfaces (replies of
//! locally delivered flows). The files follow the packet: parse -> lb (backend choice) with
//! ct (conntrack state and time) and snat (reverse entries, ports) -> nat (rewrite) -> fib
//! (forward), with reject for services without endpoints.
#![no_std]
#![no_main]

mod ct;
mod event;
mod fib;
mod frag;
mod lb;
mod maps;
mod policy;
mod snat;
mod sock;
mod tc;
mod xdp;
mod xdp_reject;

// The pure packet functions live in the library part (lib.rs), tested on the host; the
// programs' modules reach them as `crate::parse` and so on.
use lb_ebpf::{arp, icmp, nat, parse, reject};

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{cgroup_sock_addr, classifier, xdp},
    programs::{SockAddrContext, TcContext, XdpContext},
};

/// The north-south program for generic mode: single-buffer frames. (In generic mode a
/// multi-buffer program makes the kernel re-lay the skb in pages for it, and the uplink's
/// tc program then no longer found the packets XDP handed on.)
#[xdp]
pub fn xlb_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

/// The same for native mode, taking multi-buffer frames: a veth in native mode hands over
/// GSO packets from its peer (TSO on, as docker leaves it) as multi-buffer frames and drops
/// them before a program that cannot take them. The program reads only the first buffer:
/// a packet longer than that fails the parser's length check and goes to the kernel (and
/// the uplink's tc hook).
#[xdp(frags)]
pub fn xlb_xdp_mb(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

#[classifier]
pub fn xlb_tc_pod(ctx: TcContext) -> i32 {
    tc::run(&ctx)
}

#[classifier]
pub fn xlb_tc_uplink(ctx: TcContext) -> i32 {
    tc::run_uplink(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn xlb_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn xlb_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn xlb_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::from_backend(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn xlb_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::from_backend(&ctx)
}

/// Does nothing but let frames in. Two uses: the floor in benchmarks, and the peer end of a
/// veth in the test network, because native XDP_TX/redirect frames are only received by a
/// veth whose peer has an XDP program.
#[xdp(frags)]
pub fn xlb_xdp_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
