//! What the datapath should hold, worked out without touching it: Services and
//! EndpointSlices translated into service ports ([`translate`]), and port ranges — node
//! ports, the node's ephemeral ports, the SNAT range ([`ports`]).
pub mod ports;
pub mod translate;
