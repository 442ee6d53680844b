//! What the agent learns about the node from the kernel: the uplink's addresses, interface
//! drivers, and which interface leads to a local pod.
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};

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

/// The driver name of an interface, from the ethtool ioctl (e.g. "veth", "virtio_net").
pub fn driver(iface: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 164],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    if iface.len() >= 16 {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 164],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..iface.len()].copy_from_slice(iface.as_bytes());
    // SAFETY: a datagram socket used only for this ioctl, closed below; `req` outlives it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        if rc != 0 {
            return None;
        }
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}

pub fn is_veth(iface: &str) -> bool {
    driver(iface).as_deref() == Some("veth")
}

/// The interface the main routing table sends `dst` out of (longest prefix match over
/// /proc/net/route). Used to find the interface of a local pod: kindnet, ptp and bridge CNIs
/// all leave a route to the pod's address there.
pub fn route_iface(dst: Ipv4Addr) -> Result<Option<String>> {
    let table = std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    Ok(lpm(&table, dst))
}

fn lpm(table: &str, dst: Ipv4Addr) -> Option<String> {
    // Columns hold the address bytes in network order, printed as a native-endian u32.
    let addr = |hex: &str| {
        u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| u32::from(Ipv4Addr::from(v.to_ne_bytes())))
    };
    let d = u32::from(dst);
    let mut best: Option<(u32, String)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(net), Some(mask)) = (addr(f[1]), addr(f[7])) else {
            continue;
        };
        let len = mask.count_ones();
        if d & mask == net && best.as_ref().is_none_or(|(l, _)| len > *l) {
            best = Some((len, f[0].to_string()));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let table = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
vethab\t0201F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            lpm(table, "10.244.1.2".parse().unwrap()).as_deref(),
            Some("vethab")
        );
        assert_eq!(
            lpm(table, "172.18.0.9".parse().unwrap()).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            lpm(table, "8.8.8.8".parse().unwrap()).as_deref(),
            Some("eth0")
        );
    }
}
