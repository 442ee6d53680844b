//! What the datapath should hold, worked out without touching it: Services and
//! EndpointSlices translated into service ports ([`translate`]), and port ranges — node
//! ports, the node's ephemeral ports, the SNAT range ([`ports`]) — and the endpoints a node
//! uses by policy and topology ([`topology`]); operator-given address ranges ([`addresses`]);
//! LoadBalancer addresses from MetalLB's pools ([`lbipam`]); EndpointSlices as the
//! translation keeps them ([`slice`]).
pub mod addresses;
pub mod incremental;
pub mod lb_addresses;
pub mod lbipam;
pub mod ports;
pub mod slice;
pub mod topology;
pub mod translate;
