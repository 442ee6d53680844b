//! The service health check server that kube-proxy runs on every node: for each
//! LoadBalancer service with `externalTrafficPolicy: Local`, an HTTP server on the service's
//! `healthCheckNodePort` tells the cloud load balancer whether this node has local endpoints
//! (200) or not (503), so that nodes without endpoints get no traffic.
//!
//! One listener per port, each a task on the agent's tokio runtime. [`HealthServer::update`]
//! is synchronous and never waits on the network: it opens listeners for new ports, closes
//! those of ports that are gone and swaps the answer of the others in place, so a load
//! balancer's open connections see new counts without a restart.
use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    net::{Ipv4Addr, SocketAddrV4},
};

use anyhow::{Context as _, Result};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::watch,
    task::JoinHandle,
};

use crate::{model::translate::HealthCheck, serve::http};

/// Connections served at once on one port. The port is open to anyone who reaches the
/// node: at the cap the connection idle the longest of the address holding the most is
/// closed for a new one (see `serve::http`), so a load balancer's probe always gets in.
const MAX_CONNECTIONS: usize = 64;

pub use crate::serve::http::Response;

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(serde::Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The answer for service `namespace/name` with `local_endpoints` endpoints on this node,
/// as kube-proxy gives it: 200 when there is at least one, else 503; the endpoint count is
/// also the load-balancing weight header. The agent answering at all is its health, so
/// `serviceProxyHealthy` is always true.
pub fn response(namespace: &str, name: &str, local_endpoints: usize) -> Response {
    let body = Body {
        service: ServiceName { namespace, name },
        local_endpoints,
        service_proxy_healthy: true,
    };
    // Serializing strings and numbers cannot fail.
    let body = serde_json::to_string(&body).unwrap_or_default();
    let mut r = Response::json(if local_endpoints > 0 { 200 } else { 503 }, body);
    r.headers.push((
        "X-Load-Balancing-Endpoint-Weight",
        local_endpoints.to_string(),
    ));
    r
}

/// What one port answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    namespace: String,
    name: String,
    local_endpoints: usize,
}

impl From<&HealthCheck> for Target {
    fn from(hc: &HealthCheck) -> Self {
        Self {
            namespace: hc.namespace.clone(),
            name: hc.name.clone(),
            local_endpoints: hc.local_endpoints,
        }
    }
}

/// A port being served; dropping it closes the port and its connections.
struct Listener {
    target: watch::Sender<Target>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The task owns the socket and, through its JoinSet, the connections: they close
        // when the runtime next runs it.
        self.task.abort();
    }
}

/// The health check ports of this node.
pub struct HealthServer {
    bind: Ipv4Addr,
    listeners: BTreeMap<u16, Listener>,
    /// Ports whose listener could not be opened, with the error last logged for each, so
    /// that a lasting failure is logged once; they are retried on every update.
    failed: BTreeMap<u16, String>,
    /// Ports wanted by more than one service (only the first is served), already logged.
    duplicates: BTreeSet<u16>,
}

impl HealthServer {
    /// A server with no ports; `bind` is the address every port listens on (the agent
    /// uses 0.0.0.0, as kube-proxy does by default). Needs no runtime until `update`.
    pub fn new(bind: Ipv4Addr) -> Self {
        Self {
            bind,
            listeners: BTreeMap::new(),
            failed: BTreeMap::new(),
            duplicates: BTreeSet::new(),
        }
    }

    /// Makes the served ports equal to `checks`. Must run inside a tokio runtime (the
    /// listeners are tasks on it). Errors are logged, never returned: a port that cannot be
    /// opened is tried again on the next call. A port is keyed by number: if it moves to
    /// another service, the same listener answers for the new one.
    pub fn update(&mut self, checks: &[HealthCheck]) {
        let mut want: BTreeMap<u16, Target> = BTreeMap::new();
        let mut duplicates = BTreeSet::new();
        for hc in checks {
            match want.entry(hc.node_port) {
                Entry::Vacant(e) => {
                    e.insert(hc.into());
                }
                Entry::Occupied(e) => {
                    duplicates.insert(hc.node_port);
                    if !self.duplicates.contains(&hc.node_port) {
                        let first = e.get();
                        log::warn!(
                            "service {}/{}: healthCheckNodePort {} is already used by {}/{}; \
                             it answers for {}/{} only",
                            hc.namespace,
                            hc.name,
                            hc.node_port,
                            first.namespace,
                            first.name,
                            first.namespace,
                            first.name
                        );
                    }
                }
            }
        }
        self.duplicates = duplicates;
        self.failed.retain(|port, _| want.contains_key(port));
        self.listeners.retain(|port, l| {
            let keep = want.contains_key(port);
            if !keep {
                let t = l.target.borrow();
                log::info!(
                    "health check for {}/{} on port {port} closed",
                    t.namespace,
                    t.name
                );
            }
            keep
        });
        for (port, target) in want {
            if let Some(l) = self.listeners.get(&port) {
                l.target.send_if_modified(|cur| {
                    let changed = *cur != target;
                    *cur = target;
                    changed
                });
                continue;
            }
            match self.listen(port, target.clone()) {
                Ok(l) => {
                    log::info!(
                        "health check for {}/{} listening on {}:{port}",
                        target.namespace,
                        target.name,
                        self.bind
                    );
                    self.failed.remove(&port);
                    self.listeners.insert(port, l);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.failed.get(&port) != Some(&msg) {
                        log::warn!(
                            "health check for {}/{}: {msg}; retrying on the next update",
                            target.namespace,
                            target.name
                        );
                        self.failed.insert(port, msg);
                    }
                }
            }
        }
    }

    /// Ports being served.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Wanted ports that could not be opened at the last update.
    pub fn failed_ports(&self) -> Vec<u16> {
        self.failed.keys().copied().collect()
    }

    fn listen(&self, port: u16, target: Target) -> Result<Listener> {
        let addr = SocketAddrV4::new(self.bind, port);
        let rt = tokio::runtime::Handle::try_current()
            .context("health check server: no tokio runtime")?;
        let open = || -> std::io::Result<TcpListener> {
            let socket = TcpSocket::new_v4()?;
            // As Go's listeners do: a port in TIME_WAIT from the last run is free.
            socket.set_reuseaddr(true)?;
            socket.bind(addr.into())?;
            socket.listen(128)
        };
        let listener = open().with_context(|| format!("listening on {addr}"))?;
        let (tx, rx) = watch::channel(target);
        let task = rt.spawn(serve(listener, rx));
        Ok(Listener { target: tx, task })
    }
}

async fn serve(listener: TcpListener, target: watch::Receiver<Target>) {
    http::run(listener, "health check", MAX_CONNECTIONS, move |_req| {
        // Any method and path, as kube-proxy.
        let t = target.borrow();
        let answer = response(&t.namespace, &t.name, t.local_endpoints).to_http();
        std::future::ready(answer)
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpStream;

    use super::*;

    fn hc(name: &str, port: u16, n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: name.into(),
            node_port: port,
            local_endpoints: n,
        }
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn response_with_endpoints() {
        let r = response("shop", "web", 3);
        assert_eq!(r.status, 200);
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"));
        assert_eq!(header(&r, "x-load-balancing-endpoint-weight"), Some("3"));
        assert_eq!(
            r.body,
            r#"{"service":{"namespace":"shop","name":"web"},"localEndpoints":3,"serviceProxyHealthy":true}"#
        );
    }

    #[test]
    fn response_without_endpoints() {
        let r = response("shop", "web", 0);
        assert_eq!(r.status, 503);
        assert_eq!(header(&r, "x-load-balancing-endpoint-weight"), Some("0"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["localEndpoints"], 0);
        assert_eq!(v["serviceProxyHealthy"], true);
    }

    #[test]
    fn response_escapes_names() {
        let r = response("a\"b", "c\\d", 1);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["service"]["namespace"], "a\"b");
        assert_eq!(v["service"]["name"], "c\\d");
    }

    /// `N` distinct ports free on loopback right now.
    fn free_ports<const N: usize>() -> [u16; N] {
        let held: Vec<_> = (0..N)
            .map(|_| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap())
            .collect();
        std::array::from_fn(|i| held[i].local_addr().unwrap().port())
    }

    struct Answer {
        status: u16,
        headers: Vec<(String, String)>,
        json: serde_json::Value,
    }

    impl Answer {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Sends one request on `conn` and reads one response (Content-Length framed).
    async fn request(conn: &mut BufReader<TcpStream>, path: &str) -> std::io::Result<Answer> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n");
        conn.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut headers = vec![];
        loop {
            line.clear();
            conn.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .unwrap()
            .1
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        conn.read_exact(&mut body).await?;
        Ok(Answer {
            status,
            headers,
            json: serde_json::from_slice(&body).unwrap(),
        })
    }

    async fn connect(port: u16) -> std::io::Result<BufReader<TcpStream>> {
        Ok(BufReader::new(
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?,
        ))
    }

    async fn get(port: u16) -> Answer {
        request(&mut connect(port).await.unwrap(), "/healthz")
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn serves_updates_and_closes() {
        let [p1, p2] = free_ports();
        let mut srv = HealthServer::new(Ipv4Addr::LOCALHOST);
        srv.update(&[hc("web", p1, 2), hc("db", p2, 0)]);
        let mut want = vec![p1, p2];
        want.sort();
        assert_eq!(srv.ports(), want);

        let a = get(p1).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-type"), Some("application/json"));
        assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(a.header("x-load-balancing-endpoint-weight"), Some("2"));
        assert_eq!(a.json["service"]["namespace"], "default");
        assert_eq!(a.json["service"]["name"], "web");
        assert_eq!(a.json["localEndpoints"], 2);
        assert_eq!(a.json["serviceProxyHealthy"], true);
        let b = get(p2).await;
        assert_eq!(b.status, 503);
        assert_eq!(b.json["service"]["name"], "db");
        assert_eq!(b.json["localEndpoints"], 0);

        // A kept-alive connection sees the new counts: the listener is not restarted.
        let mut kept = connect(p1).await.unwrap();
        assert_eq!(request(&mut kept, "/").await.unwrap().status, 200);
        srv.update(&[hc("web", p1, 0), hc("db", p2, 5)]);
        let a = request(&mut kept, "/any/path").await.unwrap();
        assert_eq!(a.status, 503);
        assert_eq!(a.json["localEndpoints"], 0);
        let b = get(p2).await;
        assert_eq!(b.status, 200);
        assert_eq!(b.header("x-load-balancing-endpoint-weight"), Some("5"));

        // A removed port stops answering, open connections included.
        srv.update(&[hc("db", p2, 5)]);
        assert_eq!(srv.ports(), vec![p2]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(connect(p1).await.is_err(), "port {p1} still accepts");
        assert!(request(&mut kept, "/").await.is_err());
        assert_eq!(get(p2).await.status, 200);

        // Dropping the server closes everything.
        drop(srv);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(connect(p2).await.is_err());
    }

    #[tokio::test]
    async fn busy_port_is_retried() {
        let blocker = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let busy = blocker.local_addr().unwrap().port();
        let [ok] = free_ports();
        let mut srv = HealthServer::new(Ipv4Addr::LOCALHOST);
        srv.update(&[hc("web", busy, 1), hc("db", ok, 1)]);
        assert_eq!(srv.ports(), vec![ok]);
        assert_eq!(srv.failed_ports(), vec![busy]);
        assert_eq!(get(ok).await.status, 200);
        // Still busy: still failed, the others untouched.
        srv.update(&[hc("web", busy, 1), hc("db", ok, 1)]);
        assert_eq!(srv.failed_ports(), vec![busy]);
        drop(blocker);
        srv.update(&[hc("web", busy, 1), hc("db", ok, 1)]);
        assert!(srv.failed_ports().is_empty());
        let a = get(busy).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json["service"]["name"], "web");
        // A failed port that is no longer wanted is forgotten.
        let blocker = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let busy2 = blocker.local_addr().unwrap().port();
        srv.update(&[hc("x", busy2, 1)]);
        assert_eq!(srv.failed_ports(), vec![busy2]);
        srv.update(&[]);
        assert!(srv.failed_ports().is_empty());
        assert!(srv.ports().is_empty());
    }

    #[tokio::test]
    async fn duplicate_port_serves_the_first() {
        let [p] = free_ports();
        let mut srv = HealthServer::new(Ipv4Addr::LOCALHOST);
        srv.update(&[hc("first", p, 1), hc("second", p, 0)]);
        let a = get(p).await;
        assert_eq!(a.json["service"]["name"], "first");
        // The port moves to another service without a restart.
        srv.update(&[hc("second", p, 0)]);
        let a = get(p).await;
        assert_eq!(a.status, 503);
        assert_eq!(a.json["service"]["name"], "second");
    }

    #[test]
    fn update_outside_a_runtime_fails_softly() {
        let mut srv = HealthServer::new(Ipv4Addr::LOCALHOST);
        let [p] = free_ports();
        srv.update(&[hc("web", p, 1)]);
        assert_eq!(srv.failed_ports(), vec![p]);
        assert!(srv.ports().is_empty());
    }
}
