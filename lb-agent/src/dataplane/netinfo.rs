//! What the agent learns about the node from the kernel: the uplink's addresses, and the
//! node's links (rtnetlink), among them the pod-facing interfaces.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result, bail};
use futures_channel::mpsc::UnboundedReceiver;
use futures_util::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkInfo, LinkMessage},
};
use rtnetlink::{Handle, MulticastGroup};

/// IPv4 addresses on `iface` (the node's NodePort addresses and SNAT source).
pub fn iface_addrs(iface: &str) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        if ifa.interface_name != iface {
            continue;
        }
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            out.push(sin.ip());
        }
    }
    if out.is_empty() {
        bail!("interface {iface} has no IPv4 address (is it the node's uplink?)");
    }
    Ok(out)
}

/// The MAC address of `iface` (the source of the datapath's ARP replies).
/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`, Linux 5.14):
/// the datapath's socket hooks compare a socket's namespace with it.
pub fn netns_cookie() -> Result<u64> {
    /// linux/asm-generic/socket.h
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .context("a socket to read the network namespace cookie")?;
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and an out buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

pub fn iface_mac(iface: &str) -> Result<[u8; 6]> {
    for ifa in nix::ifaddrs::getifaddrs().context("getifaddrs")? {
        if ifa.interface_name != iface {
            continue;
        }
        if let Some(mac) = ifa
            .address
            .as_ref()
            .and_then(|a| a.as_link_addr())
            .and_then(|l| l.addr())
        {
            return Ok(mac);
        }
    }
    bail!("interface {iface} has no MAC address")
}

/// One network interface, as rtnetlink describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub name: String,
    pub index: u32,
    /// IFLA_INFO_KIND ("veth", "bridge", ...); None for physical devices and loopback.
    pub kind: Option<String>,
}

impl LinkFacts {
    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

fn link_facts(msg: &LinkMessage) -> Option<LinkFacts> {
    let mut name = None;
    let mut kind = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkInfo(infos) => {
                kind = infos.iter().find_map(|i| match i {
                    LinkInfo::Kind(k) => Some(k.to_string()),
                    _ => None,
                });
            }
            _ => {}
        }
    }
    Some(LinkFacts {
        name: name?,
        index: msg.header.index,
        kind,
    })
}

/// The interfaces that lead to pods: every veth except the uplink (a kind node's uplink is a
/// veth too). kindnet, ptp and calico give each pod a routed veth; a bridge CNI's pod veths
/// are ports of its bridge, and tc ingress on a port still sees what the pod sends. All of
/// them count, not only those of backends: a pod is also a client of ClusterIPs.
/// Returns ifindex -> name.
pub fn pod_facing(links: &[LinkFacts], uplink: &str) -> BTreeMap<u32, String> {
    links
        .iter()
        .filter(|l| l.is_veth() && l.name != uplink)
        .map(|l| (l.index, l.name.clone()))
        .collect()
}

/// Every link of the agent's network namespace.
pub async fn list_links(handle: &Handle) -> Result<Vec<LinkFacts>> {
    let msgs: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("listing links (rtnetlink)")?;
    Ok(msgs.iter().filter_map(link_facts).collect())
}

type Notifications =
    UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, netlink_sys::SocketAddr)>;

/// A netlink socket subscribed to link notifications (RTNLGRP_LINK), with a handle for
/// requests on the same socket. Subscribing before the first listing means no link can
/// appear unseen between the two. Needs a tokio runtime: the socket's task is spawned.
pub struct LinkMonitor {
    pub handle: Handle,
    events: Notifications,
}

impl LinkMonitor {
    pub fn new() -> Result<Self> {
        let (conn, handle, events) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .context("opening a netlink socket for link notifications")?;
        tokio::spawn(conn);
        Ok(Self { handle, events })
    }

    /// Waits for the next link notification, then takes every one already queued with it:
    /// a pod's set-up is a burst of them (create, move into the namespace, rename, up), and
    /// one re-listing covers them all. Returns false when the socket is closed.
    pub async fn changed(&mut self) -> bool {
        let mut any = false;
        loop {
            let next = if any {
                match futures_util::FutureExt::now_or_never(self.events.next()) {
                    Some(m) => m,
                    None => return true,
                }
            } else {
                self.events.next().await
            };
            match next {
                Some((msg, _)) => {
                    // The group carries only link messages, but errors and the like may be
                    // queued too; anything else is no reason to re-list.
                    if let NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_),
                    ) = msg.payload
                    {
                        any = true;
                    }
                }
                None => return any,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::InfoKind;

    fn link(name: &str, index: u32, kind: Option<&str>) -> LinkFacts {
        LinkFacts {
            name: name.into(),
            index,
            kind: kind.map(Into::into),
        }
    }

    #[test]
    fn pod_facing_is_every_veth_but_the_uplink() {
        let links = [
            link("lo", 1, None),
            link("eth0", 2, Some("veth")),
            link("cni0", 3, Some("bridge")),
            link("veth1a2b", 4, Some("veth")),
            link("cali0f3", 5, Some("veth")),
            link("vxlan.calico", 6, Some("vxlan")),
            link("ens3", 7, None),
        ];
        assert_eq!(
            pod_facing(&links, "eth0"),
            BTreeMap::from([(4, "veth1a2b".to_string()), (5, "cali0f3".to_string())])
        );
        // On a node whose uplink is physical, every veth is a pod's.
        assert_eq!(pod_facing(&links, "ens3").len(), 3);
        assert!(pod_facing(&links[..1], "eth0").is_empty());
    }

    #[test]
    fn facts_from_a_link_message() {
        let mut msg = LinkMessage::default();
        msg.header.index = 9;
        msg.attributes = vec![
            LinkAttribute::IfName("veth9".into()),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        assert_eq!(link_facts(&msg), Some(link("veth9", 9, Some("veth"))));
        msg.attributes = vec![LinkAttribute::IfName("lo".into())];
        assert_eq!(link_facts(&msg), Some(link("lo", 9, None)));
        msg.attributes.clear();
        assert_eq!(link_facts(&msg), None);
    }
}
