//! Which endpoints a node uses, as kube-proxy chooses them (pkg/proxy/topology.go): pure
//! functions over the endpoints of one service port and the node's name and zone.
//!
//! - **Cluster policy**: the ready endpoints, narrowed by topology hints when every ready
//!   endpoint carries them and some name this node (`hints.forNodes`, from
//!   `trafficDistribution: PreferSameNode`) or its zone (`hints.forZones`, from
//!   `PreferClose`/`PreferSameZone`, or the topology-aware-routing annotation); otherwise
//!   all of them. None ready: the serving-and-terminating ones, under the same hints.
//! - **Local policy**: this node's ready endpoints, else its serving-and-terminating ones.
//!   Hints do not apply.
//! - **Has any endpoints**: some endpoint anywhere is ready, or serving and terminating.
//!   Under a Local policy a node without local endpoints drops new connections when the
//!   service has endpoints elsewhere and rejects them when it has none at all.
//!
//! kube-proxy reads only the hints, never `trafficDistribution` itself: the EndpointSlice
//! controller turns that field into hints, and so do we (through the slices).
use super::translate::BackendSpec;

/// An endpoint of a service port with what kube-proxy looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub spec: BackendSpec,
    /// `nodeName`: part of the order in which duplicates are settled, as it was.
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `hints.forZones[].name` (empty: no zone hints).
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name` (empty: no node hints).
    pub node_hints: Vec<String>,
}

/// Where the agent runs, for topology hints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Place<'a> {
    pub node: &'a str,
    /// The Node's `topology.kubernetes.io/zone` label, when known.
    pub zone: Option<&'a str>,
}

/// The endpoints of one service port for each policy: `(selected, rest)`, both sorted; the
/// rest stays resolvable for flows already established to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chosen {
    pub cluster: (Vec<BackendSpec>, Vec<BackendSpec>),
    pub local: (Vec<BackendSpec>, Vec<BackendSpec>),
    /// Some endpoint anywhere can take traffic (ready, or serving and terminating).
    pub has_any: bool,
    /// Cluster endpoints were narrowed by hints (for logs and tests).
    pub narrowed: Option<Narrowed>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Narrowed {
    ToNode,
    ToZone,
}

/// kube-proxy's `topologyModeFromHints`: node hints win when every ready endpoint has
/// them and one names this node; then zone hints likewise; otherwise no narrowing.
fn mode(cands: &[Candidate], place: Place) -> Option<Narrowed> {
    let ready: Vec<&Candidate> = cands.iter().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return None;
    }
    let all_node_hints = ready.iter().all(|c| !c.node_hints.is_empty());
    let for_node = ready
        .iter()
        .any(|c| c.node_hints.iter().any(|n| n == place.node));
    if all_node_hints && for_node && !place.node.is_empty() {
        return Some(Narrowed::ToNode);
    }
    let all_zone_hints = ready.iter().all(|c| !c.zone_hints.is_empty());
    let for_zone = place
        .zone
        .is_some_and(|z| ready.iter().any(|c| c.zone_hints.iter().any(|h| h == z)));
    if all_zone_hints && for_zone {
        return Some(Narrowed::ToZone);
    }
    None
}

fn available(c: &Candidate, mode: Option<Narrowed>, place: Place) -> bool {
    match mode {
        None => true,
        Some(Narrowed::ToNode) => c.node_hints.iter().any(|n| n == place.node),
        Some(Narrowed::ToZone) => place
            .zone
            .is_some_and(|z| c.zone_hints.iter().any(|h| h == z)),
    }
}

/// The ready candidates that pass `keep`; if none, the serving-and-terminating ones.
fn ready_else_terminating(
    cands: &[Candidate],
    keep: impl Fn(&Candidate) -> bool,
) -> (Vec<BackendSpec>, Vec<BackendSpec>) {
    let mut chosen: Vec<&Candidate> = cands.iter().filter(|c| c.ready && keep(c)).collect();
    if chosen.is_empty() {
        chosen = cands
            .iter()
            .filter(|c| c.serving && c.terminating && keep(c))
            .collect();
    }
    let selected: Vec<BackendSpec> = chosen.iter().map(|c| c.spec.clone()).collect();
    let rest = cands
        .iter()
        .filter(|c| !selected.contains(&c.spec))
        .map(|c| c.spec.clone())
        .collect();
    (selected, rest)
}

/// The endpoints this node uses for each policy (see the module comment).
pub fn choose(cands: &[Candidate], place: Place) -> Chosen {
    let narrowed = mode(cands, place);
    Chosen {
        cluster: ready_else_terminating(cands, |c| available(c, narrowed, place)),
        local: ready_else_terminating(cands, |c| c.spec.local),
        has_any: cands
            .iter()
            .any(|c| c.ready || (c.serving && c.terminating)),
        narrowed,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ep(last: u8, node: &str, here: bool) -> Candidate {
        Candidate {
            spec: BackendSpec {
                addr: Ipv4Addr::new(10, 244, 0, last),
                port: 8080,
                local: here,
            },
            node_name: Some(node.into()),
            ready: true,
            serving: true,
            terminating: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn zone(mut c: Candidate, z: &[&str]) -> Candidate {
        c.zone_hints = z.iter().map(|s| s.to_string()).collect();
        c
    }

    fn node_hint(mut c: Candidate, n: &[&str]) -> Candidate {
        c.node_hints = n.iter().map(|s| s.to_string()).collect();
        c
    }

    fn terminating(mut c: Candidate, serving: bool) -> Candidate {
        c.ready = false;
        c.serving = serving;
        c.terminating = true;
        c
    }

    fn lasts(v: &[BackendSpec]) -> Vec<u8> {
        v.iter().map(|b| b.addr.octets()[3]).collect()
    }

    const HERE: Place = Place {
        node: "node-a",
        zone: Some("zone-a"),
    };

    #[test]
    fn zone_hints_narrow_cluster_endpoints_to_this_zone() {
        let c = [
            zone(ep(1, "node-a", true), &["zone-a"]),
            zone(ep(2, "node-b", false), &["zone-a"]),
            zone(ep(3, "node-c", false), &["zone-b"]),
        ];
        let got = choose(&c, HERE);
        assert_eq!(got.narrowed, Some(Narrowed::ToZone));
        assert_eq!(lasts(&got.cluster.0), [1, 2]);
        assert_eq!(lasts(&got.cluster.1), [3]);
        assert!(got.has_any);
    }

    #[test]
    fn no_hint_for_this_zone_means_all_endpoints() {
        let c = [
            zone(ep(1, "node-b", false), &["zone-b"]),
            zone(ep(2, "node-c", false), &["zone-c"]),
        ];
        let got = choose(&c, HERE);
        assert_eq!(got.narrowed, None);
        assert_eq!(lasts(&got.cluster.0), [1, 2]);
    }

    #[test]
    fn hints_on_only_some_endpoints_are_ignored() {
        let c = [
            zone(ep(1, "node-a", true), &["zone-a"]),
            ep(2, "node-b", false),
        ];
        let got = choose(&c, HERE);
        assert_eq!(got.narrowed, None);
        assert_eq!(lasts(&got.cluster.0), [1, 2]);
    }

    #[test]
    fn node_without_zone_label_ignores_zone_hints() {
        let c = [
            zone(ep(1, "node-a", true), &["zone-a"]),
            zone(ep(2, "node-b", false), &["zone-b"]),
        ];
        let got = choose(
            &c,
            Place {
                node: "node-a",
                zone: None,
            },
        );
        assert_eq!(got.narrowed, None);
        assert_eq!(lasts(&got.cluster.0), [1, 2]);
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let c = [
            node_hint(zone(ep(1, "node-a", true), &["zone-a"]), &["node-a"]),
            node_hint(zone(ep(2, "node-b", false), &["zone-a"]), &["node-b"]),
        ];
        let got = choose(&c, HERE);
        assert_eq!(got.narrowed, Some(Narrowed::ToNode));
        assert_eq!(lasts(&got.cluster.0), [1]);
    }

    #[test]
    fn node_hints_for_other_nodes_fall_back_to_zone_hints() {
        let c = [
            node_hint(zone(ep(1, "node-b", false), &["zone-a"]), &["node-b"]),
            node_hint(zone(ep(2, "node-c", false), &["zone-b"]), &["node-c"]),
        ];
        let got = choose(&c, HERE);
        assert_eq!(got.narrowed, Some(Narrowed::ToZone));
        assert_eq!(lasts(&got.cluster.0), [1]);
    }

    #[test]
    fn hints_of_unready_endpoints_do_not_count() {
        // The only endpoint with a hint for this zone is not ready: kube-proxy looks at
        // ready endpoints only, and those have no hint for zone-a.
        let c = [
            terminating(zone(ep(1, "node-a", true), &["zone-a"]), false),
            zone(ep(2, "node-b", false), &["zone-b"]),
        ];
        let got = choose(&c, HERE);
        assert_eq!(got.narrowed, None);
        assert_eq!(lasts(&got.cluster.0), [2]);
    }

    #[test]
    fn local_policy_ignores_hints() {
        let c = [
            zone(ep(1, "node-a", true), &["zone-b"]),
            zone(ep(2, "node-b", false), &["zone-a"]),
        ];
        let got = choose(&c, HERE);
        assert_eq!(lasts(&got.local.0), [1]);
        assert_eq!(lasts(&got.cluster.0), [2]);
    }

    #[test]
    fn terminating_fallback_is_decided_per_policy() {
        // Locally only a terminating (still serving) endpoint; elsewhere a ready one.
        let c = [
            terminating(ep(1, "node-a", true), true),
            ep(2, "node-b", false),
        ];
        let got = choose(&c, HERE);
        assert_eq!(lasts(&got.cluster.0), [2]);
        assert_eq!(lasts(&got.local.0), [1]);
    }

    #[test]
    fn terminating_and_not_serving_never_gets_traffic() {
        let c = [terminating(ep(1, "node-a", true), false)];
        let got = choose(&c, HERE);
        assert!(got.cluster.0.is_empty() && got.local.0.is_empty());
        assert!(
            !got.has_any,
            "no endpoint can take traffic: reject, not drop"
        );
        assert_eq!(lasts(&got.cluster.1), [1]);
    }

    #[test]
    fn endpoints_only_elsewhere_count_as_having_endpoints() {
        let got = choose(&[ep(2, "node-b", false)], HERE);
        assert!(got.local.0.is_empty());
        assert!(got.has_any, "Local policy: drop, not reject");
        assert!(!choose(&[], HERE).has_any);
    }
}
