//! The datapath side of announcing: the addresses XDP answers ARP for (`XLB_ARP`), the lease
//! that keeps it answering (`XLB_ANNOUNCE_LEASE`), and the gratuitous ARP sent on the uplink
//! when this node takes an address over.
use std::{collections::BTreeSet, net::Ipv4Addr, os::fd::AsRawFd as _, path::Path};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{ANNOUNCE_LEASE_MS, MAP_ANNOUNCE_LEASE, MAP_ARP, arp::gratuitous};

use crate::dataplane::conntrack::monotonic_ms;

pub struct Announcer {
    arp: HashMap<MapData, u32, u32>,
    lease: Array<MapData, u32>,
    raw: socket2::Socket,
    ifindex: u32,
    mac: [u8; 6],
    /// What `XLB_ARP` holds.
    announced: BTreeSet<Ipv4Addr>,
}

fn open(pin_dir: &Path, name: &str) -> Result<MapData> {
    let p = pin_dir.join(name);
    MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))
}

impl Announcer {
    /// Its own handles on the agent's pins, and a raw socket on the uplink for gratuitous
    /// ARP. Whatever `XLB_ARP` holds from a previous run is dropped: nothing is announced
    /// until this agent has heard its peers.
    pub fn open(pin_dir: &Path, iface: &str, mac: [u8; 6]) -> Result<Self> {
        let mut arp: HashMap<MapData, u32, u32> =
            HashMap::try_from(Map::HashMap(open(pin_dir, MAP_ARP)?))?;
        let stale: Vec<u32> = arp.keys().filter_map(|k| k.ok()).collect();
        for k in stale {
            let _ = arp.remove(&k);
        }
        let lease = Array::try_from(Map::Array(open(pin_dir, MAP_ANNOUNCE_LEASE)?))?;
        let ifindex =
            nix::net::if_::if_nametoindex(iface).with_context(|| format!("interface {iface}"))?;
        let raw = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::ETH_P_ARP.to_be())),
        )
        .context("raw socket for gratuitous ARP")?;
        Ok(Self {
            arp,
            lease,
            raw,
            ifindex,
            mac,
            announced: BTreeSet::new(),
        })
    }

    /// Makes `XLB_ARP` hold exactly `want`; returns the addresses newly taken.
    pub fn set(&mut self, want: &BTreeSet<Ipv4Addr>) -> Result<Vec<Ipv4Addr>> {
        for a in self.announced.difference(want) {
            let _ = self.arp.remove(&u32::from_ne_bytes(a.octets()));
        }
        let new: Vec<Ipv4Addr> = want.difference(&self.announced).copied().collect();
        for a in &new {
            self.arp.insert(u32::from_ne_bytes(a.octets()), 1, 0)?;
        }
        self.announced = want.clone();
        Ok(new)
    }

    /// Keeps the datapath answering for another [`ANNOUNCE_LEASE_MS`].
    pub fn renew(&mut self) -> Result<()> {
        self.lease
            .set(0, monotonic_ms().wrapping_add(ANNOUNCE_LEASE_MS), 0)?;
        Ok(())
    }

    /// Stops the answers at once (the agent is shutting down cleanly).
    pub fn expire(&mut self) {
        let _ = self.lease.set(0, monotonic_ms(), 0);
    }

    /// Tells the segment that `addr` is now at this node's MAC.
    pub fn gratuitous(&self, addr: Ipv4Addr) -> Result<()> {
        let frame = gratuitous(&self.mac, addr.octets());
        // SAFETY: sockaddr_ll is plain data; zeroed then filled.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        sll.sll_ifindex = self.ifindex as i32;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: valid buffer and address of the right length.
        let n = unsafe {
            libc::sendto(
                self.raw.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            bail!(
                "gratuitous ARP for {addr}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}
