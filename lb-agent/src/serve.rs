//! The agent's HTTP servers: metrics, liveness/readiness, log level and datapath debug
//! events ([`metrics`], [`debug`]), the
//! service health check node ports ([`health`]), and their shared accept loop ([`http`]).
pub mod debug;
pub mod health;
pub mod http;
pub mod metrics;
