//! Set-ups several end-to-end tests share.
use std::time::Duration;

use anyhow::Result;

use crate::{Cluster, ManifestOpts, Node, Pod, SourceMode, TopologySpec, seed_manifests};

/// The seed cluster with the UDP service (`ManifestOpts::udp`, NodePort
/// [`crate::DNS_NODE_PORT`]) whose one endpoint is the first pod, programmed on every node;
/// the agents run with `extra` arguments. A client reaches the endpoint through `remote`
/// (another node: the flow is source-NATed there) or through `local` (the pod's node).
pub struct OneUdpEndpoint {
    pub c: Cluster,
    pub pod: Pod,
    pub remote: Node,
    pub local: Node,
}

impl OneUdpEndpoint {
    pub fn up(extra: &[&str]) -> Result<Self> {
        let mut c = Cluster::up_with_args(
            &TopologySpec::seed(),
            |net| {
                seed_manifests(
                    net,
                    &ManifestOpts {
                        endpoints: Some(vec![net.pods()[0].name.clone()]),
                        udp: true,
                        ..Default::default()
                    },
                )
            },
            SourceMode::File,
            &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )?;
        c.wait_for("dns programmed", Duration::from_secs(20), |s| {
            s.services
                .iter()
                .any(|x| x.name.starts_with("dev/dns") && x.endpoints.len() == 1)
        })?;
        let pod = c.net.pods()[0].clone();
        let remote = c
            .net
            .nodes()
            .iter()
            .find(|n| n.name != pod.node)
            .ok_or_else(|| anyhow::anyhow!("no node without the endpoint"))?
            .clone();
        let local = c.net.node(&pod.node).clone();
        Ok(Self {
            c,
            pod,
            remote,
            local,
        })
    }
}

/// The Internet checksum as a Python function `csum(bytes) -> int`, for the test scripts
/// that build raw frames (prepend it to the script).
pub const PY_CSUM: &str = r#"
import struct
def csum(b):
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xffff)
    t += t >> 16
    return ~t & 0xffff
"#;
