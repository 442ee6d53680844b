//! MetalLB's own configuration objects, `IPAddressPool` and `L2Advertisement`
//! (`metallb.io/v1beta1`), so that manifests written for MetalLB keep working once MetalLB is
//! removed. No Kubernetes crate ships these types; these are ours, with MetalLB's field names.
//!
//! Only the fields listed here are read (unknown fields such as `status` are ignored). What
//! the address assignment does with them is in [`crate::model::lbipam`]; the file parser
//! ([`super::yaml`]) validates them with [`validate_pool`] and [`validate_l2`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

pub const METALLB_API_VERSION: &str = "metallb.io/v1beta1";

/// `IPAddressPool`: addresses MetalLB (now xlb) may hand to LoadBalancer Services.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressPool {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: IpAddressPoolSpec,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct IpAddressPoolSpec {
    /// `a.b.c.d/n` CIDRs or `a.b.c.d-e.f.g.h` ranges (IPv6 accepted and kept, not used).
    #[serde(default)]
    pub addresses: Vec<String>,
    /// Whether Services that ask for nothing may get addresses from this pool (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Never hand out addresses ending in `.0` or `.255` (default false).
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

/// Which Services may use a pool, and in which order pools are tried.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Lower numbers are tried first; unset (or 0, as in MetalLB) after every set one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Only Services in these namespaces may use the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Not honoured (Namespace labels are not read): with only these, no namespace matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Only Services whose labels match one of these may use the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_selectors: Vec<LabelSelector>,
}

/// `L2Advertisement`: which pools are announced (ARP) from which nodes and interfaces.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct L2Advertisement {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: L2AdvertisementSpec,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Pools announced, by name. With no names and no selectors, every pool is announced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pools: Vec<String>,
    /// Pools announced, by their labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Nodes that announce (any selector matching); none = every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_selectors: Vec<LabelSelector>,
    /// Interfaces to announce on; none = every interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<String>,
}

/// One entry of `spec.addresses`, inclusive at both ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AddrRange {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl AddrRange {
    /// Same family and at least one address in common.
    pub fn overlaps(&self, other: &AddrRange) -> bool {
        match (self, other) {
            (AddrRange::V4(a, b), AddrRange::V4(c, d)) => a <= d && c <= b,
            (AddrRange::V6(a, b), AddrRange::V6(c, d)) => a <= d && c <= b,
            _ => false,
        }
    }
}

impl std::fmt::Display for AddrRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrRange::V4(a, b) => write!(f, "{a}-{b}"),
            AddrRange::V6(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// Parses `a.b.c.d/n` (host bits are ignored, as MetalLB does) or `first-last` (same family,
/// first <= last; spaces around the dash allowed). A single address is written `/32`.
pub fn parse_range(s: &str) -> Result<AddrRange, String> {
    let s = s.trim();
    if let Some((a, b)) = s.split_once('-') {
        let parse = |x: &str| {
            x.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{s:?}: {:?} is not an IP address", x.trim()))
        };
        let (a, b) = (parse(a)?, parse(b)?);
        return match (a, b) {
            (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => Ok(AddrRange::V4(a, b)),
            (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => Ok(AddrRange::V6(a, b)),
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => Err(format!(
                "{s:?}: the range's first address is after its last"
            )),
            _ => Err(format!("{s:?}: the range mixes IPv4 and IPv6")),
        };
    }
    let bad = || {
        format!("{s:?} is neither a CIDR (192.168.10.0/24) nor a range (192.168.9.1-192.168.9.5)")
    };
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len.parse::<u32>() {
        Ok(l) if l <= max => l,
        _ => return Err(format!("{s:?}: prefix length must be 0-{max}")),
    };
    Ok(match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            let first = u32::from(a) & mask;
            AddrRange::V4(first.into(), (first | !mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            let first = u128::from(a) & mask;
            AddrRange::V6(first.into(), (first | !mask).into())
        }
    })
}

impl IpAddressPool {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }

    /// `spec.autoAssign`, true when unset.
    pub fn auto_assign(&self) -> bool {
        self.spec.auto_assign.unwrap_or(true)
    }

    /// `spec.serviceAllocation.priority` when set and positive (0 means unset in MetalLB).
    pub fn priority(&self) -> Option<i32> {
        self.spec
            .service_allocation
            .as_ref()
            .and_then(|a| a.priority)
            .filter(|p| *p > 0)
    }

    /// The parsed `spec.addresses`; entries that do not parse are skipped (the file parser
    /// refuses them; the API server's copy may hold anything).
    pub fn ranges(&self) -> Vec<AddrRange> {
        self.spec
            .addresses
            .iter()
            .filter_map(|a| parse_range(a).ok())
            .collect()
    }

    /// The IPv4 ranges, sorted by first address.
    pub fn ipv4_ranges(&self) -> Vec<(Ipv4Addr, Ipv4Addr)> {
        let mut v: Vec<_> = self
            .ranges()
            .into_iter()
            .filter_map(|r| match r {
                AddrRange::V4(a, b) => Some((a, b)),
                AddrRange::V6(..) => None,
            })
            .collect();
        v.sort();
        v
    }

    /// Whether `ip` belongs to the pool (`.0`/`.255` do not when `avoidBuggyIPs`).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        if self.spec.avoid_buggy_ips && is_buggy(ip) {
            return false;
        }
        self.ipv4_ranges().iter().any(|(a, b)| *a <= ip && ip <= *b)
    }

    /// What of this pool's configuration is accepted but not honoured.
    pub fn unsupported(&self) -> Vec<String> {
        let mut v = Vec::new();
        let alloc = self.spec.service_allocation.as_ref();
        if alloc.is_some_and(|a| !a.namespace_selectors.is_empty()) {
            v.push(format!(
                "IPAddressPool {}: spec.serviceAllocation.namespaceSelectors is not honoured \
                 (Namespace labels are not read): only spec.serviceAllocation.namespaces admit \
                 Services",
                self.name()
            ));
        }
        if self.ranges().iter().all(|r| matches!(r, AddrRange::V6(..))) {
            v.push(format!(
                "IPAddressPool {}: no IPv4 addresses (IPv6 is not served): the pool is unused",
                self.name()
            ));
        }
        v
    }
}

impl L2Advertisement {
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }

    /// Whether this advertisement announces `pool`.
    pub fn covers(&self, pool: &IpAddressPool) -> bool {
        let s = &self.spec;
        if s.ip_address_pools.is_empty() && s.ip_address_pool_selectors.is_empty() {
            return true;
        }
        let empty = BTreeMap::new();
        let labels = pool.metadata.labels.as_ref().unwrap_or(&empty);
        s.ip_address_pools.iter().any(|n| n == pool.name())
            || s.ip_address_pool_selectors
                .iter()
                .any(|sel| selector_matches(sel, labels))
    }
}

/// Addresses ending in `.0` or `.255`, which some CPE firmwares take for broadcasts.
pub fn is_buggy(ip: Ipv4Addr) -> bool {
    matches!(ip.octets()[3], 0 | 255)
}

/// Kubernetes label selector semantics: every `matchLabels` pair and every
/// `matchExpressions` requirement holds (an empty selector matches everything). Operators:
/// `In`, `NotIn`, `Exists`, `DoesNotExist`; an unknown operator matches nothing.
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    labels_ok
        && sel.match_expressions.iter().flatten().all(|req| {
            let values = req.values.as_deref().unwrap_or_default();
            let got = labels.get(&req.key);
            match req.operator.as_str() {
                "In" => got.is_some_and(|v| values.contains(v)),
                "NotIn" => got.is_none_or(|v| !values.contains(v)),
                "Exists" => got.is_some(),
                "DoesNotExist" => got.is_none(),
                _ => false,
            }
        })
}

/// `(field path, message)`, the path relative to the object.
pub type FieldError = (String, String);

/// As the API server validates a selector: known operators, values only and always where they
/// belong.
pub fn validate_selector(field: &str, sel: &LabelSelector) -> Result<(), FieldError> {
    for (i, req) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        if req.key.is_empty() {
            return Err((format!("{f}.key"), "required".into()));
        }
        let n = req.values.as_ref().map_or(0, Vec::len);
        match req.operator.as_str() {
            "In" | "NotIn" if n == 0 => {
                return Err((
                    format!("{f}.values"),
                    format!("required with operator {}", req.operator),
                ));
            }
            "Exists" | "DoesNotExist" if n > 0 => {
                return Err((
                    format!("{f}.values"),
                    format!("must be empty with operator {}", req.operator),
                ));
            }
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => {
                return Err((
                    format!("{f}.operator"),
                    format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
                ));
            }
        }
    }
    Ok(())
}

/// Checks a pool as MetalLB's webhook would (within the object): at least one address entry,
/// each a CIDR or range, no two overlapping.
pub fn validate_pool(pool: &IpAddressPool) -> Result<Vec<AddrRange>, FieldError> {
    let s = &pool.spec;
    if s.addresses.is_empty() {
        return Err((
            "spec.addresses".into(),
            "at least one CIDR or range is required".into(),
        ));
    }
    let mut ranges: Vec<AddrRange> = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let f = format!("spec.addresses[{i}]");
        let r = parse_range(a).map_err(|m| (f.clone(), m))?;
        if let Some(j) = ranges.iter().position(|o| o.overlaps(&r)) {
            return Err((f, format!("{a:?} overlaps spec.addresses[{j}]")));
        }
        ranges.push(r);
    }
    if let Some(alloc) = &s.service_allocation {
        for (i, ns) in alloc.namespaces.iter().enumerate() {
            if ns.is_empty() {
                return Err((
                    format!("spec.serviceAllocation.namespaces[{i}]"),
                    "must not be empty".into(),
                ));
            }
        }
        for (i, sel) in alloc.namespace_selectors.iter().enumerate() {
            validate_selector(
                &format!("spec.serviceAllocation.namespaceSelectors[{i}]"),
                sel,
            )?;
        }
        for (i, sel) in alloc.service_selectors.iter().enumerate() {
            validate_selector(
                &format!("spec.serviceAllocation.serviceSelectors[{i}]"),
                sel,
            )?;
        }
    }
    Ok(ranges)
}

pub fn validate_l2(l2: &L2Advertisement) -> Result<(), FieldError> {
    let s = &l2.spec;
    for (i, p) in s.ip_address_pools.iter().enumerate() {
        if p.is_empty() {
            return Err((
                format!("spec.ipAddressPools[{i}]"),
                "must not be empty".into(),
            ));
        }
    }
    for (i, sel) in s.ip_address_pool_selectors.iter().enumerate() {
        validate_selector(&format!("spec.ipAddressPoolSelectors[{i}]"), sel)?;
    }
    for (i, sel) in s.node_selectors.iter().enumerate() {
        validate_selector(&format!("spec.nodeSelectors[{i}]"), sel)?;
    }
    for (i, itf) in s.interfaces.iter().enumerate() {
        if itf.is_empty() {
            return Err((format!("spec.interfaces[{i}]"), "must not be empty".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn v4(a: &str, b: &str) -> AddrRange {
        AddrRange::V4(a.parse().unwrap(), b.parse().unwrap())
    }

    #[test]
    fn ranges_and_cidrs() {
        assert_eq!(
            parse_range("172.18.255.200-172.18.255.250"),
            Ok(v4("172.18.255.200", "172.18.255.250"))
        );
        assert_eq!(
            parse_range(" 10.0.0.1 - 10.0.0.1 "),
            Ok(v4("10.0.0.1", "10.0.0.1"))
        );
        assert_eq!(
            parse_range("192.168.10.0/24"),
            Ok(v4("192.168.10.0", "192.168.10.255"))
        );
        // Host bits ignored, as Go's net.ParseCIDR does for MetalLB.
        assert_eq!(
            parse_range("192.168.10.7/30"),
            Ok(v4("192.168.10.4", "192.168.10.7"))
        );
        assert_eq!(parse_range("10.1.2.3/32"), Ok(v4("10.1.2.3", "10.1.2.3")));
        assert_eq!(
            parse_range("0.0.0.0/0"),
            Ok(v4("0.0.0.0", "255.255.255.255"))
        );
        assert_eq!(
            parse_range("fd00::/120"),
            Ok(AddrRange::V6(
                "fd00::".parse().unwrap(),
                "fd00::ff".parse().unwrap()
            ))
        );
        for (bad, want) in [
            ("10.0.0.9-10.0.0.1", "first address is after its last"),
            ("10.0.0.1-fd00::1", "mixes IPv4 and IPv6"),
            ("10.0.0.1-10.0.0", "\"10.0.0\" is not an IP address"),
            ("10.0.0.1", "is neither a CIDR"),
            ("10.0.0.0/33", "prefix length must be 0-32"),
            ("10.0.0.0/+8", "is neither a CIDR"),
            ("fd00::/129", "prefix length must be 0-128"),
            ("", "is neither a CIDR"),
        ] {
            let e = parse_range(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn overlap() {
        assert!(v4("10.0.0.0", "10.0.0.9").overlaps(&v4("10.0.0.9", "10.0.0.20")));
        assert!(!v4("10.0.0.0", "10.0.0.9").overlaps(&v4("10.0.0.10", "10.0.0.20")));
        let six = parse_range("::/0").unwrap();
        assert!(!six.overlaps(&v4("0.0.0.0", "255.255.255.255")));
    }

    fn req(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selectors() {
        let labels: BTreeMap<String, String> = [("tier", "gold"), ("app", "web")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let sel = |ml: &[(&str, &str)], me: Vec<LabelSelectorRequirement>| LabelSelector {
            match_labels: (!ml.is_empty()).then(|| {
                ml.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            match_expressions: (!me.is_empty()).then_some(me),
        };
        assert!(selector_matches(&sel(&[], vec![]), &labels));
        assert!(selector_matches(&sel(&[("tier", "gold")], vec![]), &labels));
        assert!(!selector_matches(
            &sel(&[("tier", "silver")], vec![]),
            &labels
        ));
        let cases = [
            (req("tier", "In", &["gold", "silver"]), true),
            (req("tier", "In", &["silver"]), false),
            (req("tier", "NotIn", &["silver"]), true),
            (req("tier", "NotIn", &["gold"]), false),
            (req("zone", "NotIn", &["a"]), true),
            (req("app", "Exists", &[]), true),
            (req("zone", "Exists", &[]), false),
            (req("zone", "DoesNotExist", &[]), true),
            (req("app", "DoesNotExist", &[]), false),
            (req("app", "Gt", &["1"]), false),
        ];
        for (r, want) in cases {
            let s = sel(&[("app", "web")], vec![r.clone()]);
            assert_eq!(selector_matches(&s, &labels), want, "{r:?}");
        }
        assert!(
            validate_selector("s", &sel(&[], vec![req("a", "In", &[])]))
                .unwrap_err()
                .0
                .ends_with("matchExpressions[0].values")
        );
        assert!(validate_selector("s", &sel(&[], vec![req("a", "Exists", &["x"])])).is_err());
        let e = validate_selector("s", &sel(&[], vec![req("a", "Gt", &["1"])])).unwrap_err();
        assert_eq!(e.0, "s.matchExpressions[0].operator");
    }

    const SEED: &str = "
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: example
  namespace: metallb-system
spec:
  addresses:
  - 172.18.255.200-172.18.255.250
";

    #[test]
    fn pool_fields_and_defaults() {
        let pool: IpAddressPool = serde_yaml::from_str(SEED).unwrap();
        assert_eq!(pool.name(), "example");
        assert!(pool.auto_assign());
        assert!(!pool.spec.avoid_buggy_ips);
        assert_eq!(pool.priority(), None);
        assert_eq!(
            pool.ipv4_ranges(),
            [(
                "172.18.255.200".parse().unwrap(),
                "172.18.255.250".parse().unwrap()
            )]
        );
        assert!(pool.contains("172.18.255.200".parse().unwrap()));
        assert!(!pool.contains("172.18.255.251".parse().unwrap()));
        assert!(pool.unsupported().is_empty());

        let full: IpAddressPool = serde_yaml::from_str(
            "
metadata: {name: p}
spec:
  addresses: [10.0.0.0/24, \"fd00::/64\"]
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 5
    namespaces: [dev]
    namespaceSelectors: [{matchLabels: {team: a}}]
    serviceSelectors:
    - matchExpressions: [{key: tier, operator: In, values: [gold]}]
",
        )
        .unwrap();
        assert!(!full.auto_assign());
        assert!(full.spec.avoid_buggy_ips);
        assert_eq!(full.priority(), Some(5));
        let alloc = full.spec.service_allocation.as_ref().unwrap();
        assert_eq!(alloc.namespaces, ["dev"]);
        assert_eq!(alloc.service_selectors.len(), 1);
        assert!(!full.contains("10.0.0.0".parse().unwrap()));
        assert!(!full.contains("10.0.0.255".parse().unwrap()));
        assert!(full.contains("10.0.0.1".parse().unwrap()));
        assert_eq!(full.ranges().len(), 2);
        assert_eq!(full.ipv4_ranges().len(), 1);
        let notes = full.unsupported();
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("namespaceSelectors is not honoured"));
        validate_pool(&full).unwrap();
        // Serialises back with MetalLB's spelling.
        let json = serde_json::to_value(&full).unwrap();
        assert_eq!(json["spec"]["avoidBuggyIPs"], true);
        assert_eq!(json["spec"]["autoAssign"], false);
        let back: IpAddressPool = serde_json::from_value(json).unwrap();
        assert_eq!(back, full);
    }

    #[test]
    fn pool_validation() {
        let with = |addrs: &[&str]| IpAddressPool {
            spec: IpAddressPoolSpec {
                addresses: addrs.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(validate_pool(&with(&[])).unwrap_err().0, "spec.addresses");
        let e = validate_pool(&with(&["10.0.0.0/24", "10.0.0.9-10.0.0.300"])).unwrap_err();
        assert_eq!(e.0, "spec.addresses[1]");
        let e = validate_pool(&with(&["10.0.0.0/24", "10.0.0.9-10.0.1.3"])).unwrap_err();
        assert_eq!(
            e,
            (
                "spec.addresses[1]".into(),
                "\"10.0.0.9-10.0.1.3\" overlaps spec.addresses[0]".into()
            )
        );
        assert_eq!(
            validate_pool(&with(&["10.0.0.0/24", "fd00::/64"]))
                .unwrap()
                .len(),
            2
        );
        let v6 = with(&["fd00::/64"]);
        assert!(v6.unsupported()[0].contains("no IPv4 addresses"));
    }

    #[test]
    fn l2_covers() {
        let pool = |name: &str, labels: &[(&str, &str)]| IpAddressPool {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            ..Default::default()
        };
        let empty: L2Advertisement =
            serde_yaml::from_str("metadata: {name: empty, namespace: metallb-system}").unwrap();
        assert!(empty.covers(&pool("example", &[])));
        let named: L2Advertisement = serde_yaml::from_str(
            "
metadata: {name: l2}
spec:
  ipAddressPools: [a]
  ipAddressPoolSelectors: [{matchLabels: {announce: 'yes'}}]
  nodeSelectors: [{matchLabels: {kubernetes.io/hostname: n1}}]
  interfaces: [eth0]
",
        )
        .unwrap();
        validate_l2(&named).unwrap();
        assert_eq!(named.spec.interfaces, ["eth0"]);
        assert!(named.covers(&pool("a", &[])));
        assert!(!named.covers(&pool("b", &[])));
        assert!(named.covers(&pool("b", &[("announce", "yes")])));
    }
}
