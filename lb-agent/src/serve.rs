//! The agent's HTTP servers: metrics, liveness/readiness, log level and datapath debug
//! events ([`metrics`], [`debug`]), the
//! service health check node ports ([`health`]), kube-proxy's node health server on port
//! 10256 ([`node_health`]), and their shared accept loop ([`http`]).
pub mod debug;
pub mod health;
pub mod http;
pub mod metrics;
pub mod node_health;
