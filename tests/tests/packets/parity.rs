//! kube-proxy parity decisions: ClusterIPs reached from outside the node, unallocated
//! service-CIDR addresses, loadBalancerSourceRanges for pods, and externalTrafficPolicy
//! Local seen from outside (local endpoints only) and from a pod (every endpoint, the pod's
//! address kept).
use super::clusterip::{from_pod, tc};
use super::*;

/// An address of the service CIDR (10.96.0.0/16) that no Service holds.
const UNALLOCATED: [u8; 4] = [10, 96, 0, 99];
/// A client outside LB_IP_RANGED's loadBalancerSourceRanges (172.30.0.0/24).
const FAR_CLIENT: [u8; 4] = [172, 30, 1, 5];

packet_test!(
    cluster_ip_from_outside_is_dnated,
    case(
        "ClusterIP from outside the node -> local pod (kube-proxy DNATs it too)",
        syn(40040, CLUSTER_IP, 80).bytes(),
        syn(40040, CLUSTER_IP, 80).set_dst(POD_LOCAL, 8080).bytes(),
        XDP_PASS,
    )
);

packet_test!(
    unallocated_service_address_from_outside_is_dropped,
    Step::Case {
        desc: "service-CIDR address no Service holds, from outside -> dropped",
        prog: Prog::Xdp,
        input: syn(40041, UNALLOCATED, 80).bytes(),
        output: None,
        action: XDP_DROP,
    }
);

packet_test!(
    unallocated_service_address_from_pod_is_dropped,
    tc(
        "tc: pod -> service-CIDR address no Service holds -> dropped",
        from_pod(45060, UNALLOCATED, 80).bytes(),
        None,
        TC_ACT_SHOT,
    )
);

packet_test!(
    cluster_ip_unused_port_from_outside_is_refused,
    case(
        "ClusterIP from outside, port no service uses -> RST",
        syn(40046, CLUSTER_IP, 81).bytes(),
        rst_for(&syn(40046, CLUSTER_IP, 81)),
        XDP_TX,
    )
);

packet_test!(
    address_outside_the_service_cidrs_is_not_ours,
    untouched(
        "an address outside the service CIDRs is passed on",
        syn(40042, [10, 97, 0, 1], 80).bytes(),
    )
);

packet_test!(
    source_ranges_admit_client_inside,
    case(
        "LB IP with source ranges, client inside them -> local pod",
        syn(40043, LB_IP_RANGED, 80).bytes(),
        syn(40043, LB_IP_RANGED, 80)
            .set_dst(POD_LOCAL, 8080)
            .bytes(),
        XDP_PASS,
    )
);

packet_test!(
    source_ranges_drop_client_outside,
    Step::Case {
        desc: "LB IP with source ranges, client outside them -> dropped",
        prog: Prog::Xdp,
        input: syn(40044, LB_IP_RANGED, 80)
            .with(|p| p.src = FAR_CLIENT)
            .bytes(),
        output: None,
        action: XDP_DROP,
    }
);

packet_test!(
    source_ranges_drop_pod_outside,
    tc(
        "tc: pod outside the LB IP's source ranges -> dropped",
        from_pod(45061, LB_IP_RANGED, 80).bytes(),
        None,
        TC_ACT_SHOT,
    )
);

packet_test!(
    external_policy_local_from_outside_without_local_endpoint_drops,
    Step::Case {
        desc: "eTP Local NodePort from outside, endpoints only on node B -> dropped",
        prog: Prog::Xdp,
        input: syn(40045, NODE, 30110).bytes(),
        output: None,
        action: XDP_DROP,
    }
);

packet_test!(
    external_policy_local_from_pod_reaches_every_endpoint,
    tc(
        "tc: pod -> eTP Local NodePort -> node B's endpoint, pod address kept",
        from_pod(45062, NODE, 30110).bytes(),
        Some(
            from_pod(45062, NODE, 30110)
                .set_dst(POD_REMOTE, 8080)
                .routed(MAC_NODE, MAC_NODE_B)
                .bytes(),
        ),
        TC_ACT_REDIRECT,
    )
);
