//! Test harness for xlb: builds a network shaped like the seed article's kind
//! cluster (`service-demo`: a control plane and two workers on docker's
//! `kind` bridge, kindnet pod routing, nginx-like pods, an outside client)
//! out of network namespaces, so the datapath and agent can be exercised
//! end to end on one machine without kind or docker.
//!
//! All traffic stays inside namespaces named `xlb-<pid>x<n>-<role>` that the
//! harness creates and removes itself; namespaces of dead harnesses are swept
//! on the next [`Network::up`]. Each node also gets a cgroup v2 of the same name
//! (`<cgroup2 mount>/xlb-<pid>x<n>-node-<name>`, [`Node::cgroup`]) for its own
//! processes ([`node_command`], [`node_http_get`], [`node_udp_request`]); the agent
//! attaches its socket-level programs there. Those are swept the same way.
//!
//! Privileged tests start with:
//!
//! ```no_run
//! let Some(_guard) = lb_tests::privileged() else {
//!     return;
//! };
//! let net = lb_tests::Network::up(&lb_tests::TopologySpec::seed()).unwrap();
//! ```

mod apiserver;
mod cgroup;
mod client;
mod cluster;
mod conntrack;
mod guards;
mod ipnet;
mod netns;
mod network;
mod privileged;
mod scenarios;
mod server;
mod topology;

pub use apiserver::ApiServer;
pub use cgroup::{cgroup_pids, cgroup2_mount, delete_cgroup, list_cgroups};
pub use client::{
    HttpResponse, NodeHttpResponse, UdpReply, http_get, http_request, node_command, node_http_get,
    node_http_request, node_udp_request, pod_http_get, pod_udp_request, tcp_reachable, udp_request,
};
pub use cluster::{
    API_SERVER_PORT, AgentProc, Cluster, DNS_NODE_PORT, DNS_PORT, ECHO_NODE_PORT, ECHO_PORT,
    METRICS_PORT, ManifestOpts, NGINX_CLUSTER_IP, NGINX_NODE_PORT, SourceMode, agent_bin,
    seed_manifests,
};
pub use conntrack::{
    CtCounts, ct_counts, fetch_metrics, metric_sum, monotonic_ms, read_config, snat_ports_in_use,
};
pub use guards::{Netns, PIN_ROOT, PinDir, sweep_stale_pins};
pub use ipnet::Ipv4Net;
pub use netns::{
    NETNS_PREFIX, delete_netns, exec_in, exec_ok, in_netns, kill_netns_processes, list_netns,
    sweep_stale_cgroups, sweep_stale_namespaces, try_in_netns,
};
pub use network::{BRIDGE_NAME, CLIENT_KIND_IFACE, Network, Node, Pod, UPLINK};
pub use privileged::{
    PrivilegedGuard, REQUIRE_PRIVILEGED_ENV, privileged, privileged_unavailable_reason,
};
pub use scenarios::{OneUdpEndpoint, PY_CSUM};
pub use server::{POD_ECHO_PORT, POD_HTTP_PORT, POD_SERVER_PY, POD_UDP_PORT};
pub use topology::{NodeSpec, TopologySpec};
