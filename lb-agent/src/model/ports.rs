//! Port ranges: the `--service-node-port-range` syntax, the node's ephemeral ports from
//! /proc, and the SNAT port range, chosen automatically ([`choose_snat_range`]) or checked
//! ([`check_snat_range`]) against both.
//!
//! The SNAT range should be large. A backend that closes first keeps a TIME_WAIT for the
//! (node, port) tuple for 60 s; with a small range and a few thousand new connections per
//! second to one backend, ports come back within a second or two of a close, and with
//! per-connection random TCP timestamps about half of the SYNs that land on such a
//! TIME_WAIT are refused (PAWS) and stall a second. The kernel's own NAT uses 1024-65535;
//! the automatic choice takes the largest part of that the node leaves free.
use std::{fmt, str::FromStr};

use anyhow::{Result, bail};

const FLAGS: &str = "--snat-port-min/--snat-port-max";

/// The ports the automatic SNAT range is chosen from, and the bounds a single
/// `--snat-port-min` or `--snat-port-max` is completed with: the kernel's NAT range.
pub const SNAT_PORTS_AUTO: PortRange = PortRange::new(1024, 65535);
/// The automatic choice fails rather than take fewer ports than this.
pub const SNAT_PORTS_AUTO_MIN_LEN: u32 = 1024;
/// The kernel's default `net.ipv4.ip_local_port_range`, assumed by the automatic choice
/// when /proc cannot tell.
pub const KERNEL_LOCAL_PORT_RANGE: PortRange = PortRange::new(32768, 60999);

/// An inclusive port range, written like the API server's `--service-node-port-range`:
/// `MIN-MAX`, `BASE+OFFSET` (`BASE` to `BASE + OFFSET`) or `PORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub const fn new(min: u16, max: u16) -> Self {
        Self { min, max }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }

    pub fn overlap(&self, o: &PortRange) -> Option<PortRange> {
        let (min, max) = (self.min.max(o.min), self.max.min(o.max));
        (min <= max).then_some(PortRange { min, max })
    }

    pub fn len(&self) -> u32 {
        (self.max as u32 + 1).saturating_sub(self.min as u32)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let port = |p: &str| -> Result<u32, String> {
            p.trim()
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: expected MIN-MAX, BASE+OFFSET or PORT"))
        };
        let (min, max) = if let Some((a, b)) = s.split_once('-') {
            (port(a)?, port(b)?)
        } else if let Some((a, b)) = s.split_once('+') {
            let base = port(a)?;
            (base, base.saturating_add(port(b)?))
        } else {
            let p = port(s)?;
            (p, p)
        };
        if min > 65535 || max > 65535 {
            return Err(format!("{s:?}: ports go up to 65535"));
        }
        if max < min {
            return Err(format!("{s:?}: the end port is below the start port"));
        }
        Ok(PortRange::new(min as u16, max as u16))
    }
}

/// `net.ipv4.ip_local_reserved_ports`: `PORT` or `MIN-MAX` items separated by commas.
pub fn parse_reserved_ports(s: &str) -> Result<Vec<PortRange>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|i| !i.is_empty())
        .map(|i| i.parse::<PortRange>())
        .collect()
}

/// `net.ipv4.ip_local_port_range` ("32768\t60999").
pub fn parse_local_port_range(s: &str) -> Result<PortRange, String> {
    let mut it = s.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(min)), Some(Ok(max)), None) if min <= max => Ok(PortRange::new(min, max)),
        _ => Err(format!("{s:?}: expected two ports")),
    }
}

/// The ephemeral port range of this network namespace and the ports reserved out of it,
/// from /proc (None and a warning when unreadable).
pub fn local_port_ranges() -> (Option<PortRange>, Vec<PortRange>) {
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let range = std::fs::read_to_string(RANGE)
        .map_err(|e| e.to_string())
        .and_then(|s| parse_local_port_range(&s));
    let range = match range {
        Ok(r) => Some(r),
        Err(e) => {
            log::warn!(
                "{RANGE}: {e}; the SNAT port range is not checked against it (an automatic \
                 one avoids the kernel's default {KERNEL_LOCAL_PORT_RANGE})"
            );
            None
        }
    };
    let reserved = std::fs::read_to_string(RESERVED)
        .map_err(|e| e.to_string())
        .and_then(|s| parse_reserved_ports(&s))
        .unwrap_or_else(|e| {
            log::warn!("{RESERVED}: {e}");
            vec![]
        });
    (range, reserved)
}

/// The SNAT port range must be a range of real ports outside the NodePort range (a reply
/// to a source-NATed flow would be taken for a NodePort connection) and outside the node's
/// ephemeral ports (`local`: the node's own connections would share ports with SNATed
/// flows) unless those ports are reserved (`reserved`: the kernel then never picks them).
pub fn check_snat_range(
    snat: PortRange,
    node_ports: PortRange,
    local: Option<PortRange>,
    reserved: &[PortRange],
) -> Result<()> {
    if snat.min > snat.max {
        bail!(
            "--snat-port-min ({}) exceeds --snat-port-max ({})",
            snat.min,
            snat.max
        );
    }
    if snat.min == 0 {
        bail!("--snat-port-min must be at least 1 (port 0 is no source port)");
    }
    if let Some(o) = snat.overlap(&node_ports) {
        bail!(
            "the SNAT port range {snat} ({FLAGS}) overlaps the NodePort range {node_ports} \
             (--service-node-port-range, which must match the API server's) on {o}: replies \
             to source-NATed flows would be taken for NodePort connections. Change \
             {FLAGS} to a range outside {node_ports}, or leave both out for an automatic \
             choice"
        );
    }
    if let Some(local) = local
        && let Some(o) = snat.overlap(&local)
    {
        let unreserved = (o.min..=o.max)
            .filter(|p| !reserved.iter().any(|r| r.contains(*p)))
            .count();
        if unreserved > 0 {
            bail!(
                "the SNAT port range {snat} ({FLAGS}) overlaps the node's ephemeral port range \
                 {local} (net.ipv4.ip_local_port_range) on {o} ({unreserved} of those ports \
                 not in net.ipv4.ip_local_reserved_ports): the node's own connections could \
                 use ports that xlb gives to source-NATed flows. Change {FLAGS} to a range \
                 outside {local} (or leave both out for an automatic choice), or narrow \
                 net.ipv4.ip_local_port_range, or reserve {o} in \
                 net.ipv4.ip_local_reserved_ports"
            );
        }
    }
    Ok(())
}

/// The SNAT port range from `--snat-port-min` (`min`) and `--snat-port-max` (`max`).
///
/// Without either, the largest contiguous range of [`SNAT_PORTS_AUTO`] (1024-65535) that
/// overlaps neither the NodePort range nor the node's ephemeral ports (`local`, the kernel's
/// default [`KERNEL_LOCAL_PORT_RANGE`] when unknown; its ports in `reserved` are never
/// picked by the kernel and do not count), the lowest of equally large ones: 1024-29999
/// with stock settings. Fails when that leaves fewer than [`SNAT_PORTS_AUTO_MIN_LEN`] ports.
///
/// With one flag, the other bound is 1024 (min) or 65535 (max); an explicit range is
/// checked by [`check_snat_range`].
pub fn choose_snat_range(
    min: Option<u16>,
    max: Option<u16>,
    node_ports: PortRange,
    local: Option<PortRange>,
    reserved: &[PortRange],
) -> Result<PortRange> {
    if min.is_some() || max.is_some() {
        let snat = PortRange::new(
            min.unwrap_or(SNAT_PORTS_AUTO.min),
            max.unwrap_or(SNAT_PORTS_AUTO.max),
        );
        if min.is_none() && snat.max < snat.min {
            bail!(
                "--snat-port-max ({}) is below {}, where the SNAT range starts without \
                 --snat-port-min: give --snat-port-min too",
                snat.max,
                snat.min
            );
        }
        check_snat_range(snat, node_ports, local, reserved)?;
        return Ok(snat);
    }
    let ephemeral = local.unwrap_or(KERNEL_LOCAL_PORT_RANGE);
    let taken = |p: u16| {
        node_ports.contains(p) || (ephemeral.contains(p) && !reserved.iter().any(|r| r.contains(p)))
    };
    let mut best: Option<PortRange> = None;
    let mut run: Option<PortRange> = None;
    for p in SNAT_PORTS_AUTO.min..=SNAT_PORTS_AUTO.max {
        if taken(p) {
            run = None;
            continue;
        }
        let r = match run {
            Some(r) => PortRange::new(r.min, p),
            None => PortRange::new(p, p),
        };
        run = Some(r);
        if best.is_none_or(|b| r.len() > b.len()) {
            best = Some(r);
        }
    }
    match best {
        Some(b) if b.len() >= SNAT_PORTS_AUTO_MIN_LEN => {
            check_snat_range(b, node_ports, local, reserved)?;
            Ok(b)
        }
        _ => bail!(
            "no range of at least {SNAT_PORTS_AUTO_MIN_LEN} SNAT ports within \
             {SNAT_PORTS_AUTO} lies outside both the NodePort range {node_ports} \
             (--service-node-port-range) and the node's ephemeral port range {ephemeral} \
             (net.ipv4.ip_local_port_range{}, less net.ipv4.ip_local_reserved_ports); the \
             largest is {}. Give {FLAGS}, or narrow net.ipv4.ip_local_port_range, or reserve \
             a range in net.ipv4.ip_local_reserved_ports",
            if local.is_none() {
                ": unreadable, the kernel's default assumed"
            } else {
                ""
            },
            best.map_or("none".to_string(), |b| format!("{b} ({} ports)", b.len())),
        ),
    }
}

/// The start-up log line of the SNAT range `snat`: chosen automatically (`explicit`
/// false) outside `node_ports` and `local` (the kernel's default when unknown), or given.
pub fn describe_snat_range(
    snat: PortRange,
    explicit: bool,
    node_ports: PortRange,
    local: Option<PortRange>,
) -> String {
    let head = format!("SNAT ports {snat} ({} per backend", snat.len());
    if explicit {
        return format!("{head}; from {FLAGS})");
    }
    let local = match local {
        Some(l) => l.to_string(),
        None => format!("{KERNEL_LOCAL_PORT_RANGE} (unreadable; the kernel's default)"),
    };
    format!("{head}; outside NodePorts {node_ports} and ip_local_port_range {local})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_like_the_api_server() {
        let p = |s: &str| s.parse::<PortRange>();
        assert_eq!(p("30000-32767"), Ok(PortRange::new(30000, 32767)));
        assert_eq!(p(" 30000+767 "), Ok(PortRange::new(30000, 30767)));
        assert_eq!(p("8080"), Ok(PortRange::new(8080, 8080)));
        for bad in ["", "a-b", "5-3", "70000", "1-70000", "65000+1000", "1-2-3"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        assert_eq!(PortRange::new(30000, 32767).to_string(), "30000-32767");
        assert_eq!(PortRange::new(5, 4).len(), 0);
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Ok(PortRange::new(32768, 60999))
        );
        assert!(parse_local_port_range("32768").is_err());
        assert_eq!(
            parse_reserved_ports("30000-32767,40000\n"),
            Ok(vec![
                PortRange::new(30000, 32767),
                PortRange::new(40000, 40000)
            ])
        );
        assert_eq!(parse_reserved_ports("\n"), Ok(vec![]));
    }

    #[test]
    fn snat_range_checks() {
        let np = PortRange::new(30000, 32767);
        let local = Some(PortRange::new(32768, 60999));
        for ok in [PortRange::new(1024, 29999), PortRange::new(61000, 65535)] {
            check_snat_range(ok, np, local, &[]).unwrap();
            check_snat_range(ok, np, None, &[]).unwrap();
        }
        let err = |snat, local, reserved: &[PortRange]| {
            format!(
                "{:#}",
                check_snat_range(snat, np, local, reserved).unwrap_err()
            )
        };
        let e = err(PortRange::new(62000, 61000), local, &[]);
        assert!(
            e.contains("--snat-port-min (62000) exceeds --snat-port-max (61000)"),
            "{e}"
        );
        assert!(err(PortRange::new(0, 10), None, &[]).contains("at least 1"));
        let e = err(PortRange::new(20000, 30000), local, &[]);
        for part in [
            "20000-30000",
            "NodePort range 30000-32767",
            "--service-node-port-range",
            "on 30000-30000",
            "Change --snat-port-min/--snat-port-max",
            "leave both out for an automatic choice",
        ] {
            assert!(e.contains(part), "{part:?} in {e}");
        }
        let e = err(PortRange::new(60000, 65535), local, &[]);
        for part in [
            "60000-65535",
            "ephemeral port range 32768-60999 (net.ipv4.ip_local_port_range)",
            "on 60000-60999 (1000 of those ports",
            "Change --snat-port-min/--snat-port-max",
        ] {
            assert!(e.contains(part), "{part:?} in {e}");
        }
        // Reserved ports are never picked by the kernel: an overlap inside them is fine.
        let reserved = [PortRange::new(60000, 60999)];
        check_snat_range(PortRange::new(60000, 65535), np, local, &reserved).unwrap();
        let e = err(PortRange::new(59999, 65535), local, &reserved);
        assert!(e.contains("(1 of those ports"), "{e}");
    }

    #[test]
    fn snat_range_is_chosen_outside_node_ports_and_ephemeral_ports() {
        let np = PortRange::new(30000, 32767);
        let local = Some(PortRange::new(32768, 60999));
        let auto =
            |np, local, reserved: &[PortRange]| choose_snat_range(None, None, np, local, reserved);
        // Stock settings: below the NodePorts.
        assert_eq!(auto(np, local, &[]).unwrap(), PortRange::new(1024, 29999));
        assert_eq!(auto(np, local, &[]).unwrap().len(), 28_976);
        // Unknown ephemeral range: the kernel's default is assumed.
        assert_eq!(auto(np, None, &[]).unwrap(), PortRange::new(1024, 29999));
        // A lower NodePort range: the larger of 1024-19999 and 61000-65535.
        let np2 = PortRange::new(20000, 32767);
        assert_eq!(auto(np2, local, &[]).unwrap(), PortRange::new(1024, 19999));
        let np3 = PortRange::new(1024, 32767);
        assert_eq!(auto(np3, local, &[]).unwrap(), PortRange::new(61000, 65535));
        // Ephemeral ports the node reserved are free for SNAT.
        let wide = Some(PortRange::new(1024, 65535));
        let reserved = [PortRange::new(40000, 59999)];
        assert_eq!(
            auto(np, wide, &reserved).unwrap(),
            PortRange::new(40000, 59999)
        );
        // Ephemeral ports everywhere but the NodePorts: nothing left.
        let e = format!("{:#}", auto(np, wide, &[]).unwrap_err());
        for part in [
            "no range of at least 1024 SNAT ports within 1024-65535",
            "NodePort range 30000-32767 (--service-node-port-range)",
            "ephemeral port range 1024-65535 (net.ipv4.ip_local_port_range",
            "the largest is none",
            "Give --snat-port-min/--snat-port-max",
        ] {
            assert!(e.contains(part), "{part:?} in {e}");
        }
        // Too small a gap is no choice either.
        let e = format!(
            "{:#}",
            auto(
                PortRange::new(30000, 65535),
                Some(PortRange::new(1024, 29499)),
                &[]
            )
            .unwrap_err()
        );
        assert!(e.contains("the largest is 29500-29999 (500 ports)"), "{e}");
        // The choice always passes the check.
        for np in [np, np2, np3] {
            let r = auto(np, local, &[]).unwrap();
            check_snat_range(r, np, local, &[]).unwrap();
        }
    }

    #[test]
    fn snat_range_flags_are_completed_and_checked() {
        let np = PortRange::new(30000, 32767);
        let local = Some(PortRange::new(32768, 60999));
        let choose = |min, max| choose_snat_range(min, max, np, local, &[]);
        assert_eq!(
            choose(Some(61000), Some(65535)).unwrap(),
            PortRange::new(61000, 65535)
        );
        // One flag: the other bound is 1024 or 65535.
        assert_eq!(
            choose(Some(61000), None).unwrap(),
            PortRange::new(61000, 65535)
        );
        assert_eq!(
            choose(None, Some(29999)).unwrap(),
            PortRange::new(1024, 29999)
        );
        assert_eq!(
            choose(None, Some(5000)).unwrap(),
            PortRange::new(1024, 5000)
        );
        // Explicit ranges are checked, not moved.
        let e = format!("{:#}", choose(Some(20000), None).unwrap_err());
        assert!(e.contains("NodePort range 30000-32767"), "{e}");
        let e = format!("{:#}", choose(Some(50000), Some(61000)).unwrap_err());
        assert!(e.contains("net.ipv4.ip_local_port_range"), "{e}");
        let e = format!("{:#}", choose(Some(62000), Some(61000)).unwrap_err());
        assert!(e.contains("exceeds --snat-port-max"), "{e}");
        let e = format!("{:#}", choose(None, Some(500)).unwrap_err());
        assert!(e.contains("--snat-port-max (500) is below 1024"), "{e}");
        let e = format!("{:#}", choose(Some(0), Some(10)).unwrap_err());
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn snat_range_log_line() {
        let np = PortRange::new(30000, 32767);
        let local = Some(PortRange::new(32768, 60999));
        assert_eq!(
            describe_snat_range(PortRange::new(1024, 29999), false, np, local),
            "SNAT ports 1024-29999 (28976 per backend; outside NodePorts 30000-32767 and \
             ip_local_port_range 32768-60999)"
        );
        assert_eq!(
            describe_snat_range(PortRange::new(61000, 65535), true, np, local),
            "SNAT ports 61000-65535 (4536 per backend; from --snat-port-min/--snat-port-max)"
        );
        let unknown = describe_snat_range(PortRange::new(1024, 29999), false, np, None);
        assert!(
            unknown
                .ends_with("ip_local_port_range 32768-60999 (unreadable; the kernel's default))"),
            "{unknown}"
        );
    }
}
