//! Address ranges the operator gives: `--nodeport-addresses` (which node addresses serve
//! NodePorts, kube-proxy's flag of the same name) and `--service-cidr` (the service
//! address ranges, next to the ServiceCIDR objects). Pure parsing and selection.
use std::{fmt, net::Ipv4Addr, str::FromStr};

/// An IPv4 prefix `a.b.c.d/n`, host bits ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr4 {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr4 {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        u32::from(a) & mask == u32::from(self.addr) & mask
    }

    /// `(network address, length)` with the host bits cleared.
    pub fn network(&self) -> (Ipv4Addr, u8) {
        let mask = if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        };
        (Ipv4Addr::from(u32::from(self.addr) & mask), self.len)
    }
}

impl FromStr for Cidr4 {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (a, n) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IPv4 address"))?;
        let len: u8 = n
            .parse()
            .ok()
            .filter(|&n| n <= 32)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0-32"))?;
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One `--nodeport-addresses` entry: a CIDR or `primary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    /// The node's primary address (the first address of the uplink, which is also the
    /// SNAT address).
    Primary,
    Cidr(Cidr4),
}

impl FromStr for NodePortAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "primary" {
            return Ok(Self::Primary);
        }
        if s.contains(':') {
            return Err(format!(
                "{s:?} is an IPv6 CIDR; xlb serves IPv4 only (leave it out)"
            ));
        }
        s.parse().map(Self::Cidr)
    }
}

/// Which of the node's addresses serve NodePorts, and whether `127.0.0.1` does, under
/// `--nodeport-addresses` (empty: every address of the uplink and localhost, as
/// kube-proxy's iptables mode). `addrs[0]` is the primary address. Fails when the flag
/// selects no address at all, which would silently serve no NodePort.
pub fn node_port_addresses(
    given: &[NodePortAddress],
    addrs: &[Ipv4Addr],
) -> Result<(Vec<Ipv4Addr>, bool), String> {
    if given.is_empty() {
        return Ok((addrs.to_vec(), true));
    }
    let chosen = |a: &Ipv4Addr, i: usize| {
        given.iter().any(|g| match g {
            NodePortAddress::Primary => i == 0,
            NodePortAddress::Cidr(c) => c.contains(*a),
        })
    };
    let out: Vec<Ipv4Addr> = addrs
        .iter()
        .enumerate()
        .filter(|(i, a)| chosen(a, *i))
        .map(|(_, a)| *a)
        .collect();
    let localhost = given
        .iter()
        .any(|g| matches!(g, NodePortAddress::Cidr(c) if c.contains(Ipv4Addr::LOCALHOST)));
    if out.is_empty() && !localhost {
        let have: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        return Err(format!(
            "--nodeport-addresses selects none of the node's addresses ({}): no NodePort \
             would be served",
            have.join(", ")
        ));
    }
    Ok((out, localhost))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c: Cidr4 = "10.96.0.1/12".parse().unwrap();
        assert!(c.contains(a("10.111.255.255")));
        assert!(!c.contains(a("10.112.0.0")));
        assert_eq!(c.network(), (a("10.96.0.0"), 12));
        assert!("0.0.0.0/0".parse::<Cidr4>().unwrap().contains(a("1.2.3.4")));
        assert!("10.0.0.0".parse::<Cidr4>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr4>().is_err());
        assert!("fd00::/8".parse::<NodePortAddress>().is_err());
    }

    #[test]
    fn unset_means_every_address_and_localhost() {
        let addrs = [a("172.18.0.2"), a("192.168.9.2")];
        assert_eq!(
            node_port_addresses(&[], &addrs).unwrap(),
            (addrs.to_vec(), true)
        );
    }

    #[test]
    fn primary_and_cidrs_select_addresses() {
        let addrs = [a("172.18.0.2"), a("192.168.9.2")];
        let p = [NodePortAddress::Primary];
        assert_eq!(
            node_port_addresses(&p, &addrs).unwrap(),
            (vec![a("172.18.0.2")], false)
        );
        let c = [
            "192.168.0.0/16".parse().unwrap(),
            "127.0.0.0/8".parse().unwrap(),
        ];
        assert_eq!(
            node_port_addresses(&c, &addrs).unwrap(),
            (vec![a("192.168.9.2")], true)
        );
        let none = ["10.0.0.0/8".parse().unwrap()];
        assert!(node_port_addresses(&none, &addrs).is_err());
    }
}
