//! A minimal IPv4 prefix type, so topology specs can name subnets without
//! pulling in a dependency for a handful of arithmetic helpers.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use anyhow::{Context, bail};

/// An IPv4 prefix such as `172.18.0.0/16`.
///
/// `addr` is kept as given; [`Ipv4Net::network`] masks it, so
/// `10.244.1.7/24` and `10.244.1.0/24` describe the same prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// Panics if `prefix > 32`: a spec with such a prefix is a typo, not data.
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        assert!(prefix <= 32, "IPv4 prefix length must be <= 32");
        Self { addr, prefix }
    }

    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        }
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !self.mask())
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }

    /// The `n`-th address of the prefix (`0` is the network address), or
    /// `None` if the prefix is too small to hold it.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        if u64::from(n) >= size {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network()) + n))
    }

    /// Whether `ip` can be given to a host: inside the prefix and neither
    /// the network nor the broadcast address (for prefixes shorter than /31).
    pub fn is_host_addr(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && (self.prefix >= 31 || (ip != self.network() && ip != self.broadcast()))
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (addr, prefix) = s
            .split_once('/')
            .with_context(|| format!("{s:?}: expected ADDR/PREFIX"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("{s:?}: bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("{s:?}: bad prefix"))?;
        if prefix > 32 {
            bail!("{s:?}: prefix length must be <= 32");
        }
        Ok(Self { addr, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic() {
        let n: Ipv4Net = "10.244.1.7/24".parse().unwrap();
        assert_eq!(n.network(), Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 244, 1, 255));
        assert_eq!(n.nth(1), Some(Ipv4Addr::new(10, 244, 1, 1)));
        assert_eq!(n.nth(256), None);
        assert!(n.contains(Ipv4Addr::new(10, 244, 1, 200)));
        assert!(!n.contains(Ipv4Addr::new(10, 244, 2, 1)));
        assert!(n.is_host_addr(Ipv4Addr::new(10, 244, 1, 1)));
        assert!(!n.is_host_addr(Ipv4Addr::new(10, 244, 1, 255)));
        let wide = Ipv4Net::new(Ipv4Addr::new(10, 244, 0, 0), 16);
        assert!(wide.overlaps(&n) && n.overlaps(&wide));
        assert!(!n.overlaps(&"10.244.2.0/24".parse().unwrap()));
        assert_eq!(Ipv4Net::new(Ipv4Addr::UNSPECIFIED, 0).mask(), 0);
        assert_eq!(n.to_string(), "10.244.1.7/24");
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0".parse::<Ipv4Net>().is_err());
    }
}
