//! kube-proxy's node health server, on `--healthz-bind-address` (default
//! [`DEFAULT_HEALTHZ_BIND_ADDRESS`], port 10256): cloud load balancers probe `/healthz` on
//! every node for `externalTrafficPolicy: Cluster` Services, and drain a node that answers
//! 503.
//!
//! - `/livez`: 200 while the proxier is in sync — the agent loop completed an iteration
//!   within [`LOOP_STALE_AFTER`] and the first full sync has been programmed — else 503.
//!   Body `{"lastUpdated": "<RFC3339>", "currentTime": "<RFC3339>"}`.
//! - `/healthz`: the same, and also 503 when this node is not eligible for traffic
//!   ([`node_eligible`]: being deleted, or tainted `ToBeDeletedByClusterAutoscaler`); the
//!   body adds `"nodeEligible": <bool>`.
//!
//! As kube-proxy does, a healthy answer gives the current time as `lastUpdated` (the loop
//! is running); an unhealthy one gives the last successful sync (`0001-01-01T00:00:00Z`
//! before the first). Any method is answered; other paths get 404.
//!
//! The state ([`NodeHealth`]) is written by the agent loop and read by the server's tasks;
//! it shares no lock with anything else.
use std::{
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use hyper::{Request, body::Incoming};
use k8s_openapi::api::core::v1::Node;
use tokio::task::JoinHandle;

use crate::serve::{
    http::{self, Response},
    metrics::LOOP_STALE_AFTER,
};

/// `--healthz-bind-address` default, kube-proxy's (`none` disables the server).
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// `lastUpdated` before the first sync (Go's zero time, as kube-proxy prints it).
const NEVER: &str = "0001-01-01T00:00:00Z";

/// Load balancers of many sources probe every node.
const MAX_CONNECTIONS: usize = 64;

/// Whether `node` (this node's Node object; None: not known) may get load balancer
/// traffic: not being deleted and not tainted [`TO_BE_DELETED_TAINT`]. Unknown counts as
/// eligible, as in kube-proxy until its first node event.
pub fn node_eligible(node: Option<&Node>) -> bool {
    let Some(node) = node else {
        return true;
    };
    let deleting = node.metadata.deletion_timestamp.is_some();
    let doomed = node
        .spec
        .iter()
        .flat_map(|s| s.taints.iter().flatten())
        .any(|t| t.key == TO_BE_DELETED_TAINT);
    !deleting && !doomed
}

/// What the node health server answers from, shared (`Arc`) between the agent loop
/// (writer) and the server (reader).
#[derive(Debug)]
pub struct NodeHealth {
    start: Instant,
    /// Milliseconds since `start` at the agent loop's last iteration.
    last_iteration_ms: AtomicU64,
    /// The last successful sync (None: none yet).
    last_updated: Mutex<Option<SystemTime>>,
    node_eligible: AtomicBool,
}

impl Default for NodeHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeHealth {
    /// Not synced yet, the loop counted as alive now, the node eligible.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_iteration_ms: AtomicU64::new(0),
            last_updated: Mutex::new(None),
            node_eligible: AtomicBool::new(true),
        }
    }

    /// The agent loop completed an iteration.
    pub fn loop_alive(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_iteration_ms.store(ms, Ordering::Relaxed);
    }

    /// A sync was programmed successfully at `at`.
    pub fn synced(&self, at: SystemTime) {
        *self
            .last_updated
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(at);
    }

    /// This node's eligibility ([`node_eligible`]); a change is logged.
    pub fn set_node_eligible(&self, eligible: bool) {
        if self.node_eligible.swap(eligible, Ordering::Relaxed) != eligible {
            if eligible {
                log::info!("node eligible again: the node health server's /healthz can pass");
            } else {
                log::warn!(
                    "node is being deleted or tainted {TO_BE_DELETED_TAINT}: the node health \
                     server's /healthz answers 503"
                );
            }
        }
    }

    /// The state now.
    pub fn state(&self) -> State {
        let last = Duration::from_millis(self.last_iteration_ms.load(Ordering::Relaxed));
        State {
            last_updated: *self
                .last_updated
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            loop_idle: self.start.elapsed().saturating_sub(last),
            node_eligible: self.node_eligible.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of [`NodeHealth`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// The last successful sync (None: none yet).
    pub last_updated: Option<SystemTime>,
    /// Time since the agent loop's last iteration.
    pub loop_idle: Duration,
    pub node_eligible: bool,
}

impl State {
    /// In sync: the first full sync is programmed and the loop runs (`/livez`).
    pub fn healthy(&self) -> bool {
        self.last_updated.is_some() && self.loop_idle <= LOOP_STALE_AFTER
    }
}

/// RFC 3339 in UTC, to the millisecond.
fn rfc3339(t: SystemTime) -> String {
    match k8s_openapi::jiff::Timestamp::try_from(t) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => NEVER.to_string(),
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
}

/// The answer to `path` in `state` at `now` (see the module's documentation).
pub fn response(path: &str, state: &State, now: SystemTime) -> Response {
    let with_node = match path {
        "/healthz" => true,
        "/livez" => false,
        _ => {
            return Response::text(404, "404 page not found\n");
        }
    };
    let healthy = state.healthy() && (!with_node || state.node_eligible);
    let last_updated = if state.healthy() {
        rfc3339(now)
    } else {
        state
            .last_updated
            .map_or_else(|| NEVER.to_string(), rfc3339)
    };
    let body = Body {
        last_updated,
        current_time: rfc3339(now),
        node_eligible: with_node.then_some(state.node_eligible),
    };
    // Serializing strings and booleans cannot fail.
    let body = serde_json::to_string(&body).unwrap_or_default();
    Response::json(if healthy { 200 } else { 503 }, body)
}

/// Binds the node health server's socket; done before anything is attached, so that a
/// taken port fails the start early. `None` for `none`.
pub fn bind(addr: &str) -> Result<Option<std::net::TcpListener>> {
    http::bind(addr, "--healthz-bind-address")
}

/// Serves `/healthz` and `/livez` on `listener` until the task is aborted. Must run inside
/// a tokio runtime.
pub fn serve(listener: std::net::TcpListener, health: Arc<NodeHealth>) -> Result<JoinHandle<()>> {
    http::serve(
        listener,
        "node health",
        "node health (kube-proxy's /healthz, /livez)",
        MAX_CONNECTIONS,
        move |req: Request<Incoming>| {
            let r = response(req.uri().path(), &health.state(), SystemTime::now());
            std::future::ready(r.to_http())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::{NodeSpec, Taint},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };
    use std::net::SocketAddr;
    use tokio::net::TcpStream;

    fn node(deleting: bool, taints: &[&str]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                deletion_timestamp: deleting
                    .then_some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|k| Taint {
                            key: k.to_string(),
                            effect: "NoSchedule".into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn eligibility() {
        assert!(node_eligible(None));
        assert!(node_eligible(Some(&Node::default())));
        assert!(node_eligible(Some(&node(false, &[]))));
        assert!(node_eligible(Some(&node(
            false,
            &[
                "node.kubernetes.io/unschedulable",
                "DeletionCandidateOfClusterAutoscaler"
            ]
        ))));
        assert!(!node_eligible(Some(&node(true, &[]))));
        assert!(!node_eligible(Some(&node(
            false,
            &["a", TO_BE_DELETED_TAINT]
        ))));
        assert!(!node_eligible(Some(&node(true, &[TO_BE_DELETED_TAINT]))));
    }

    fn at(secs: u64, ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms)
    }

    fn json(r: &Response) -> serde_json::Value {
        assert_eq!(
            r.headers[0],
            ("Content-Type", "application/json".to_string())
        );
        serde_json::from_str(&r.body).unwrap()
    }

    // 2023-11-14T22:13:20Z
    const T: u64 = 1_700_000_000;

    #[test]
    fn answers_from_state_and_clock() {
        let now = at(T + 30, 250);
        let synced = State {
            last_updated: Some(at(T, 0)),
            loop_idle: Duration::from_millis(300),
            node_eligible: true,
        };
        // Healthy: lastUpdated is the current time, as kube-proxy gives it.
        for path in ["/healthz", "/livez"] {
            let r = response(path, &synced, now);
            assert_eq!(r.status, 200, "{path}");
            let j = json(&r);
            assert_eq!(j["currentTime"], "2023-11-14T22:13:50.250Z");
            assert_eq!(j["lastUpdated"], "2023-11-14T22:13:50.250Z");
        }
        assert_eq!(
            json(&response("/healthz", &synced, now)),
            serde_json::json!({
                "lastUpdated": "2023-11-14T22:13:50.250Z",
                "currentTime": "2023-11-14T22:13:50.250Z",
                "nodeEligible": true,
            })
        );
        assert_eq!(
            json(&response("/livez", &synced, now))
                .as_object()
                .unwrap()
                .len(),
            2,
            "/livez has no nodeEligible"
        );

        // Not eligible: /healthz fails, /livez does not.
        let leaving = State {
            node_eligible: false,
            ..synced
        };
        let r = response("/healthz", &leaving, now);
        assert_eq!(r.status, 503);
        assert_eq!(json(&r)["nodeEligible"], false);
        assert_eq!(response("/livez", &leaving, now).status, 200);

        // Never synced: both fail, lastUpdated is Go's zero time.
        let starting = State {
            last_updated: None,
            ..synced
        };
        for path in ["/healthz", "/livez"] {
            let r = response(path, &starting, now);
            assert_eq!(r.status, 503, "{path}");
            assert_eq!(json(&r)["lastUpdated"], NEVER);
        }

        // A stalled loop: both fail, lastUpdated is the last sync.
        let stalled = State {
            loop_idle: LOOP_STALE_AFTER + Duration::from_millis(1),
            ..synced
        };
        for path in ["/healthz", "/livez"] {
            let r = response(path, &stalled, now);
            assert_eq!(r.status, 503, "{path}");
            let j = json(&r);
            assert_eq!(j["lastUpdated"], "2023-11-14T22:13:20.000Z");
            assert_eq!(j["currentTime"], "2023-11-14T22:13:50.250Z");
        }
        let on_the_edge = State {
            loop_idle: LOOP_STALE_AFTER,
            ..synced
        };
        assert_eq!(response("/livez", &on_the_edge, now).status, 200);

        for path in ["/", "/metrics", "/healthz/", "/livez/x", "/readyz"] {
            assert_eq!(response(path, &synced, now).status, 404, "{path}");
        }
    }

    #[test]
    fn state_follows_the_agent() {
        let h = NodeHealth::new();
        let s = h.state();
        assert_eq!(s.last_updated, None);
        assert!(s.node_eligible);
        assert!(!s.healthy());
        h.loop_alive();
        h.synced(at(T, 0));
        assert!(h.state().healthy());
        assert_eq!(h.state().last_updated, Some(at(T, 0)));
        h.set_node_eligible(false);
        assert!(!h.state().node_eligible);
        h.set_node_eligible(true);
        assert!(h.state().node_eligible);
    }

    /// Sends `GET path` on a fresh connection; the server closes it after the answer.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let content_type = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("content-type")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        (status, content_type, body.to_string())
    }

    #[tokio::test]
    async fn serves_healthz_livez_and_404() {
        let listener = bind("127.0.0.1:0").unwrap().unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(NodeHealth::new());
        let task = serve(listener, health.clone()).unwrap();

        // Before the first sync.
        let (status, ct, body) = get(addr, "/healthz").await;
        assert_eq!((status, ct.as_str()), (503, "application/json"));
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["lastUpdated"], NEVER);
        assert_eq!(j["nodeEligible"], true);
        assert_eq!(get(addr, "/livez").await.0, 503);

        health.loop_alive();
        health.synced(SystemTime::now());
        let (status, ct, body) = get(addr, "/healthz").await;
        assert_eq!((status, ct.as_str()), (200, "application/json"));
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["nodeEligible"], true);
        assert!(j["currentTime"].as_str().unwrap().ends_with('Z'), "{body}");
        let (status, _, body) = get(addr, "/livez").await;
        assert_eq!(status, 200);
        assert!(!body.contains("nodeEligible"), "{body}");

        health.set_node_eligible(false);
        assert_eq!(get(addr, "/healthz").await.0, 503);
        assert_eq!(get(addr, "/livez").await.0, 200);

        assert_eq!(get(addr, "/nope").await.0, 404);
        assert!(bind("none").unwrap().is_none());
        assert!(bind("10256").is_err());
        task.abort();
    }
}
