//! Which node announces (answers ARP for) each LoadBalancer address: a pure function of
//! what this node and its live peers say in their heartbeats, so every node reaches the
//! same answer with no coordination and no API server.
//!
//! - **Eligible**: each node says for which addresses it may announce — the address's
//!   L2Advertisement selects the node, and under `externalTrafficPolicy: Local` the node has
//!   a ready local endpoint. Only the node itself knows its labels and local endpoints for
//!   sure, so eligibility travels in the heartbeats.
//! - **Sticky**: an address stays with a live, eligible node that already announces it, so
//!   a node coming back (or a new node) does not pull addresses away from a working owner,
//!   which would break the connections established through it (they are tracked there).
//!   When two nodes claim one address (both sides of a healed partition), the higher score
//!   keeps it.
//! - **Otherwise rendezvous hashing** (highest random weight) over the live eligible nodes:
//!   addresses spread over nodes, and when a node goes only its addresses move.
use std::{collections::BTreeSet, net::Ipv4Addr};

/// What one live peer said in its last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerView {
    pub node: String,
    pub eligible: BTreeSet<Ipv4Addr>,
    pub announcing: BTreeSet<Ipv4Addr>,
}

/// The rendezvous score of `node` for `addr`: the same on every node (FNV-1a over the
/// node's name and the address, then a SplitMix64 finaliser so that similar names spread).
pub fn score(node: &str, addr: Ipv4Addr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes().chain([0]).chain(addr.octets()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The node among `nodes` with the highest score for `addr` (ties, which need equal
/// names, go to the smaller name).
fn best<'a>(addr: Ipv4Addr, nodes: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    nodes.max_by(|a, b| score(a, addr).cmp(&score(b, addr)).then_with(|| b.cmp(a)))
}

/// The addresses node `me` announces, given the addresses it is eligible for, those it
/// announces now, and its live peers' last heartbeats (see the module comment).
pub fn decide(
    me: &str,
    eligible: &BTreeSet<Ipv4Addr>,
    announcing: &BTreeSet<Ipv4Addr>,
    peers: &[PeerView],
) -> BTreeSet<Ipv4Addr> {
    eligible
        .iter()
        .copied()
        .filter(|&addr| {
            let claimants = peers
                .iter()
                .filter(|p| p.announcing.contains(&addr) && p.eligible.contains(&addr))
                .map(|p| p.node.as_str())
                .chain(announcing.contains(&addr).then_some(me));
            let winner = match best(addr, claimants) {
                Some(w) => Some(w),
                None => best(
                    addr,
                    peers
                        .iter()
                        .filter(|p| p.eligible.contains(&addr))
                        .map(|p| p.node.as_str())
                        .chain([me]),
                ),
            };
            winner == Some(me)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> BTreeSet<Ipv4Addr> {
        (0..n)
            .map(|i| Ipv4Addr::new(172, 18, 255, 200 + i))
            .collect()
    }

    fn peer(
        node: &str,
        eligible: &BTreeSet<Ipv4Addr>,
        announcing: &BTreeSet<Ipv4Addr>,
    ) -> PeerView {
        PeerView {
            node: node.into(),
            eligible: eligible.clone(),
            announcing: announcing.clone(),
        }
    }

    /// Every node's decision from a cold start (nobody announces yet), as a map address ->
    /// the nodes that announce it.
    fn cold(nodes: &[&str], all: &BTreeSet<Ipv4Addr>) -> Vec<(Ipv4Addr, Vec<String>)> {
        let none = BTreeSet::new();
        all.iter()
            .map(|&a| {
                let owners = nodes
                    .iter()
                    .filter(|&&me| {
                        let peers: Vec<_> = nodes
                            .iter()
                            .filter(|&&n| n != me)
                            .map(|n| peer(n, all, &none))
                            .collect();
                        decide(me, all, &none, &peers).contains(&a)
                    })
                    .map(|n| n.to_string())
                    .collect();
                (a, owners)
            })
            .collect()
    }

    #[test]
    fn every_address_has_exactly_one_owner_and_they_spread() {
        let all = addrs(40);
        let nodes = ["node-a", "node-b", "node-c"];
        let owners = cold(&nodes, &all);
        assert!(owners.iter().all(|(_, o)| o.len() == 1), "{owners:?}");
        for n in nodes {
            let mine = owners.iter().filter(|(_, o)| o[0] == n).count();
            assert!(mine >= 6, "{n} owns only {mine} of 40");
        }
    }

    #[test]
    fn a_node_leaving_moves_only_its_addresses() {
        let all = addrs(40);
        let before = cold(&["node-a", "node-b", "node-c"], &all);
        let after = cold(&["node-a", "node-b"], &all);
        for ((a, was), (_, now)) in before.iter().zip(&after) {
            if was[0] != "node-c" {
                assert_eq!(was, now, "{a} moved although its owner stayed");
            }
        }
    }

    #[test]
    fn a_working_owner_keeps_its_address_when_a_better_node_returns() {
        let all = addrs(40);
        // Find an address node-c wins against node-a, then let node-a hold it.
        let a = *all
            .iter()
            .find(|&&a| score("node-c", a) > score("node-a", a))
            .unwrap();
        let held: BTreeSet<_> = [a].into();
        let none = BTreeSet::new();
        let peers = [peer("node-a", &all, &held)];
        assert!(!decide("node-c", &all, &none, &peers).contains(&a));
        // node-a keeps announcing it.
        let peers = [peer("node-c", &all, &none)];
        assert!(decide("node-a", &all, &held, &peers).contains(&a));
    }

    #[test]
    fn two_claimants_resolve_to_the_higher_score() {
        let a = Ipv4Addr::new(172, 18, 255, 200);
        let set: BTreeSet<_> = [a].into();
        let (hi, lo) = if score("node-a", a) > score("node-b", a) {
            ("node-a", "node-b")
        } else {
            ("node-b", "node-a")
        };
        assert!(decide(hi, &set, &set, &[peer(lo, &set, &set)]).contains(&a));
        assert!(!decide(lo, &set, &set, &[peer(hi, &set, &set)]).contains(&a));
    }

    #[test]
    fn only_eligible_nodes_announce() {
        let a = Ipv4Addr::new(172, 18, 255, 200);
        let set: BTreeSet<_> = [a].into();
        let none = BTreeSet::new();
        // node-b is not eligible (eTP Local without a local endpoint): node-a announces
        // whatever the scores say, and node-b never does.
        assert!(decide("node-a", &set, &none, &[peer("node-b", &none, &none)]).contains(&a));
        assert!(decide("node-b", &none, &none, &[peer("node-a", &set, &none)]).is_empty());
        // A claimant that lost eligibility is not followed.
        assert!(decide("node-a", &set, &none, &[peer("node-b", &none, &set)]).contains(&a));
    }

    #[test]
    fn scores_are_fixed() {
        // The same on every node and across versions (a change would move addresses during
        // a rolling upgrade): pinned to values computed independently of this code.
        let a = Ipv4Addr::new(172, 18, 255, 200);
        assert_eq!(score("node-a", a), 0x27cc_f21e_edf6_829b);
        assert_eq!(score("node-b", a), 0x95c9_abcc_82e6_d312);
    }
}
