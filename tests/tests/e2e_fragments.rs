//! Fragmented UDP through NodePorts: a 3,000-byte reply to a small request (DNS with EDNS,
//! statsd batches) and a 3,000-byte request echoed back, each more than one 1,500-byte
//! link can carry, so the sender's IP layer cuts them into fragments. Only the first
//! fragment has ports; the datapath gives the later ones the first one's translation
//! (frag.rs). Before, every fragment went to the kernel untranslated and a remote
//! backend's reply died at the node's SNAT address, where nothing listens.
//!
//! Endpoint on another node (source-NATed flow; the reply's fragments arrive at the entry
//! node's uplink) and on the entry node (the reply's fragments leave the pod through its
//! interface's tc hook); with the default hook (tc alone on these veths) and with XDP in
//! front (which hands fragments to tc).
use std::{net::SocketAddrV4, time::Duration};

use lb_tests::*;

const T: Duration = Duration::from_secs(5);
const BIG: usize = 3_000;

fn run(extra: &[&str]) {
    let OneUdpEndpoint {
        c,
        pod,
        remote,
        local,
    } = OneUdpEndpoint::up(extra).expect("cluster up");
    let client = c.net.client_netns().to_owned();
    for (what, entry) in [("remote", &remote), ("local", &local)] {
        let at = SocketAddrV4::new(entry.addr, DNS_NODE_PORT);
        let before = frag_translated(&c, &entry.name);
        let reply = udp_request(&client, at, format!("big:{BIG}").as_bytes(), T)
            .unwrap_or_else(|e| panic!("{extra:?} {what} endpoint: large reply: {e:#}"));
        assert_eq!(reply.len(), BIG, "{extra:?} {what}: reply length");
        assert!(
            reply.starts_with(pod.name.as_bytes()),
            "{extra:?} {what}: reply from {:?}",
            String::from_utf8_lossy(&reply[..32])
        );
        let mut request = b"echo:".to_vec();
        request.extend((0..BIG - 5).map(|i| b'a' + (i % 26) as u8));
        let echoed = udp_request(&client, at, &request, T)
            .unwrap_or_else(|e| panic!("{extra:?} {what} endpoint: large request: {e:#}"));
        assert!(echoed == request, "{extra:?} {what}: echo differs");
        // Fragments really crossed the datapath (the request's and the reply's).
        let after = frag_translated(&c, &entry.name);
        assert!(
            after >= before + 2,
            "{extra:?} {what}: frag_translated on {} went {before} -> {after}",
            entry.name
        );
    }
}

fn frag_translated(c: &Cluster, node: &str) -> u64 {
    let st = c.agent(node).status().expect("status");
    st.counters.get("frag_translated").copied().unwrap_or(0)
}

#[test]
fn fragmented_udp_through_a_nodeport() {
    let Some(_guard) = privileged() else {
        return;
    };
    run(&[]);
}

#[test]
fn fragmented_udp_through_a_nodeport_with_xdp_in_front() {
    let Some(_guard) = privileged() else {
        return;
    };
    run(&["--xdp-mode", "generic"]);
}
