//! The heartbeat the agents exchange on the node network: who is alive, which addresses
//! each may announce and which it announces. UDP broadcast on the uplink (no API server,
//! works with the file source); JSON, versioned, compact (see [`Heartbeat::encode`]).
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

use super::owner::PeerView;

/// Wire format version; a heartbeat of another version is ignored.
pub const VERSION: u32 = 2;

/// The agents' heartbeat port (UDP) [`--announce-port`].
pub const DEFAULT_PORT: u16 = 7947;

/// What an agent says every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub v: u32,
    pub node: String,
    pub eligible: BTreeSet<Ipv4Addr>,
    /// Always a subset of `eligible` (a node announces only what it may).
    pub announcing: BTreeSet<Ipv4Addr>,
}

/// The datagram: pool addresses are handed out lowest first, so `eligible` is sent as
/// ranges, and `announcing` as a bitmap over `eligible` in order (hex). 10,000 addresses
/// take a few hundred bytes to a few kilobytes, far below one UDP datagram.
#[derive(serde::Serialize, serde::Deserialize)]
struct Wire {
    v: u32,
    node: String,
    /// `(first address, count)`, addresses as host-order u32.
    eligible: Vec<(u32, u32)>,
    announcing: String,
}

/// Sorted addresses as `(first, count)` runs of consecutive addresses.
fn ranges(set: &BTreeSet<Ipv4Addr>) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for a in set.iter().map(|&a| u32::from(a)) {
        match out.last_mut() {
            Some((first, n)) if first.checked_add(*n) == Some(a) => *n += 1,
            _ => out.push((a, 1)),
        }
    }
    out
}

impl Heartbeat {
    pub fn encode(&self) -> Vec<u8> {
        let mut bits = vec![0u8; self.eligible.len().div_ceil(8)];
        for (i, a) in self.eligible.iter().enumerate() {
            if self.announcing.contains(a) {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        let wire = Wire {
            v: self.v,
            node: self.node.clone(),
            eligible: ranges(&self.eligible),
            announcing: bits.iter().map(|b| format!("{b:02x}")).collect(),
        };
        serde_json::to_vec(&wire).unwrap_or_default()
    }

    /// `None` for anything that is not a well-formed heartbeat of this version.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let w: Wire = serde_json::from_slice(b).ok()?;
        if w.v != VERSION || w.node.is_empty() || !w.announcing.len().is_multiple_of(2) {
            return None;
        }
        let mut eligible = BTreeSet::new();
        for &(first, n) in &w.eligible {
            // A datagram is at most 64 KiB, but a forged count could ask for billions.
            if n > 1 << 20 || eligible.len() + n as usize > 1 << 20 {
                return None;
            }
            for k in 0..n {
                eligible.insert(Ipv4Addr::from(first.checked_add(k)?));
            }
        }
        let bits: Vec<u8> = (0..w.announcing.len() / 2)
            .map(|i| u8::from_str_radix(&w.announcing[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<_>>()?;
        let announcing = eligible
            .iter()
            .enumerate()
            .filter(|(i, _)| bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0))
            .map(|(_, a)| *a)
            .collect();
        Some(Self {
            v: w.v,
            node: w.node,
            eligible,
            announcing,
        })
    }

    pub fn view(self) -> PeerView {
        PeerView {
            node: self.node,
            eligible: self.eligible,
            announcing: self.announcing,
        }
    }
}

/// A UDP socket on the uplink only (`SO_BINDTODEVICE`), sending to the limited broadcast
/// address and receiving every agent's heartbeats.
pub struct Link {
    sock: UdpSocket,
    port: u16,
    iface: String,
    /// Receive buffer, the largest UDP datagram.
    buf: Vec<u8>,
}

impl Link {
    pub fn open(iface: &str, port: u16) -> Result<Self> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        s.bind_device(Some(iface.as_bytes()))
            .with_context(|| format!("binding the heartbeat socket to {iface}"))?;
        s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())
            .with_context(|| format!("binding the heartbeat socket to UDP port {port}"))?;
        let sock: UdpSocket = s.into();
        sock.set_nonblocking(false)?;
        Ok(Self {
            sock,
            port,
            iface: iface.to_string(),
            buf: vec![0u8; 65_536],
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn send(&self, hb: &Heartbeat) -> Result<()> {
        self.sock.send_to(
            &hb.encode(),
            SocketAddrV4::new(Ipv4Addr::BROADCAST, self.port),
        )?;
        Ok(())
    }

    /// Waits up to `timeout` for the next heartbeat (ours included: the caller skips them).
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Heartbeat>> {
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match self.sock.recv_from(&mut self.buf) {
            Ok((n, _)) => Ok(Heartbeat::decode(&self.buf[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_foreign_datagrams() {
        let hb = Heartbeat {
            v: VERSION,
            node: "node-a".into(),
            eligible: [
                Ipv4Addr::new(172, 18, 255, 200),
                Ipv4Addr::new(172, 18, 255, 201),
                Ipv4Addr::new(10, 0, 0, 1),
            ]
            .into(),
            announcing: [Ipv4Addr::new(172, 18, 255, 201)].into(),
        };
        assert_eq!(Heartbeat::decode(&hb.encode()), Some(hb.clone()));
        assert_eq!(Heartbeat::decode(b"hello"), None);
        let other = Heartbeat { v: 1, ..hb };
        assert_eq!(Heartbeat::decode(&other.encode()), None);
        let forged = br#"{"v":2,"node":"x","eligible":[[1,4000000000]],"announcing":""}"#;
        assert_eq!(Heartbeat::decode(forged), None);
    }

    #[test]
    fn ten_thousand_addresses_fit_one_datagram() {
        let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
        let eligible: BTreeSet<Ipv4Addr> = (0..10_000).map(|i| Ipv4Addr::from(base + i)).collect();
        // A third of them, spread as rendezvous hashing spreads them.
        let announcing = eligible.iter().copied().step_by(3).collect();
        let hb = Heartbeat {
            v: VERSION,
            node: "a-rather-long-node-name.example.internal".into(),
            eligible,
            announcing,
        };
        let wire = hb.encode();
        assert!(wire.len() < 8_000, "{} bytes", wire.len());
        assert_eq!(Heartbeat::decode(&wire), Some(hb));
    }
}
