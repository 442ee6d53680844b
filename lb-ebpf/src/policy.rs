//! Who may use a frontend, and what happens to service addresses no Service holds: the
//! checks the XDP, tc and socket paths share.
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::SrcRangeKey;

use crate::maps::{SERVICE_CIDRS, SRC_RANGES};

/// loadBalancerSourceRanges: the longest prefix under this service port that covers the
/// client, if any.
#[inline(always)]
pub fn source_allowed(svc_id: u32, src_be: u32) -> bool {
    let key = Key::new(
        64,
        SrcRangeKey {
            svc_id_be: svc_id.to_be(),
            addr_be: src_be,
        },
    );
    SRC_RANGES.get(&key).is_some()
}

/// `addr_be` lies in one of the service CIDRs (kube-proxy's nftables mode drops traffic to
/// such an address when no Service holds it, rather than routing it out).
#[inline(always)]
pub fn in_service_cidr(addr_be: u32) -> bool {
    SERVICE_CIDRS.get(&Key::new(32, addr_be)).is_some()
}
