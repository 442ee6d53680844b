//! The heartbeat the agents exchange on the node network: who is alive, which addresses
//! each may announce and which it announces. UDP broadcast on the uplink (no API server,
//! works with the file source); JSON, versioned.
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
pub const VERSION: u32 = 1;

/// The agents' heartbeat port (UDP) [`--announce-port`].
pub const DEFAULT_PORT: u16 = 7947;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Heartbeat {
    pub v: u32,
    pub node: String,
    pub eligible: BTreeSet<Ipv4Addr>,
    pub announcing: BTreeSet<Ipv4Addr>,
}

impl Heartbeat {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `None` for anything that is not a heartbeat of this version.
    pub fn decode(b: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(b)
            .ok()
            .filter(|h| h.v == VERSION && !h.node.is_empty())
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
            eligible: [Ipv4Addr::new(172, 18, 255, 200)].into(),
            announcing: BTreeSet::new(),
        };
        assert_eq!(Heartbeat::decode(&hb.encode()), Some(hb.clone()));
        assert_eq!(Heartbeat::decode(b"hello"), None);
        let other = Heartbeat { v: 2, ..hb };
        assert_eq!(Heartbeat::decode(&other.encode()), None);
    }
}
