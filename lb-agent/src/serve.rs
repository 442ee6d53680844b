//! The agent's HTTP servers: metrics, liveness/readiness and log level ([`metrics`]), the
//! service health check node ports ([`health`]), and their shared accept loop ([`http`]).
pub mod health;
pub mod http;
pub mod metrics;
