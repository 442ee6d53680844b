//! What the agent's HTTP servers (metrics/health, node health, health check node ports)
//! share: binding a `--flag ADDR:PORT|none` socket, the accept loop, serving a connection
//! with header, request and lifetime limits, who may change the agent's state, and building
//! answers.
//!
//! The servers are open to whoever reaches the node (pods included), and kubelet and cloud
//! load balancers probe them, so nobody must be able to starve them:
//!
//! - a connection has [`HEADER_TIMEOUT`] to send a request head, after accept and again
//!   after every answer (hyper arms that timer whenever it waits for a head), so an idle
//!   keep-alive connection closes after it;
//! - a request is answered within [`REQUEST_TIMEOUT`] (503 past it);
//! - at the connection cap a new connection is never refused: the server closes an older
//!   one instead ([`pick_victim`]: one of the peer address holding the most connections,
//!   the one idle the longest), gracefully — an answer in progress is finished, a
//!   connection waiting for a request is closed at once, one still sending its head is
//!   cut after [`EVICTION_GRACE`]. A kubelet or load balancer probe, one connection from
//!   its address, thus gets in however many connections another address holds.
//!
//! State-changing requests (`PUT /loglevel`, `PUT /datapath-debug`) are accepted only from
//! the node itself and never from a browser ([`refuse_unless_from_node`]).
use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Request, StatusCode, body::Bytes, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Notify,
    task::{AbortHandle, JoinHandle, JoinSet},
};

/// Time a client gets to send a request's head, from accept and from the last answer
/// (so also the idle keep-alive timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a handler gets to answer; past it the client gets a 503.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection (keep-alive included): then it closes after its current
/// answer and the client reconnects.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Time a connection that is being closed (evicted or past its lifetime) gets to finish
/// its request before it is cut.
pub const EVICTION_GRACE: Duration = Duration::from_secs(1);
/// Connections being closed count apart from the cap; beyond this many times the cap (a
/// flood of connections that do not finish closing), the oldest are cut at once.
const CLOSING_FACTOR: usize = 4;

/// The answer the servers' handlers give.
pub type HttpResponse = hyper::Response<Full<Bytes>>;

/// One HTTP answer, independent of the HTTP library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    /// `body` as `content_type`, with `X-Content-Type-Options: nosniff`.
    pub fn nosniff(status: u16, content_type: &str, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![
                ("Content-Type", content_type.to_string()),
                ("X-Content-Type-Options", "nosniff".to_string()),
            ],
            body: body.into(),
        }
    }

    /// A JSON `body` ([`Response::nosniff`]).
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::nosniff(status, "application/json", body)
    }

    /// A plain text `body` ([`Response::nosniff`]).
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::nosniff(status, "text/plain; charset=utf-8", body)
    }

    /// The hyper answer (an unknown status is a 500; a header value hyper refuses is left
    /// out).
    pub fn to_http(self) -> HttpResponse {
        let mut out = hyper::Response::new(Full::new(Bytes::from(self.body)));
        *out.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        for (name, value) in self.headers {
            if let Ok(value) = hyper::header::HeaderValue::try_from(value) {
                out.headers_mut().insert(name, value);
            }
        }
        out
    }
}

/// An answer of `content_type`.
pub fn reply(status: StatusCode, content_type: &str, body: String) -> HttpResponse {
    let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// A plain text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> HttpResponse {
    reply(status, "text/plain; charset=utf-8", body.into())
}

/// Binds the socket that `flag` (such as `--metrics-addr`) names; done before anything is
/// attached, so that a taken port fails the start early. `None` for `none`.
pub fn bind(addr: &str, flag: &str) -> Result<Option<std::net::TcpListener>> {
    if addr == "none" {
        return Ok(None);
    }
    let sa: SocketAddr = addr
        .parse()
        .with_context(|| format!("{flag} {addr:?}: expected ADDR:PORT or none"))?;
    let l = std::net::TcpListener::bind(sa).with_context(|| format!("listening on {sa}"))?;
    l.set_nonblocking(true)?;
    Ok(Some(l))
}

/// Spawns [`run`] on `listener` (from [`bind`]), logging `"{served} served on http://ADDR"`.
/// Must run inside a tokio runtime.
pub fn serve<H, Fut>(
    listener: std::net::TcpListener,
    what: &'static str,
    served: &str,
    max: usize,
    handler: H,
) -> Result<JoinHandle<()>>
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let listener = TcpListener::from_std(listener)?;
    if let Ok(a) = listener.local_addr() {
        log::info!("{served} served on http://{a}");
    }
    Ok(tokio::spawn(run(listener, what, max, handler)))
}

/// Answers every request on `listener` with `handler`, at most `max` connections at once
/// (see the module's documentation for what happens at the cap), until the task running
/// it is aborted. `what` names the server in debug logs. Each request carries its client's
/// address as a [`Peer`] extension.
pub async fn run<H, Fut>(listener: TcpListener, what: &'static str, max: usize, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    accept_loop(listener, max, what, move |stream, peer, conn| {
        serve_connection(stream, peer, conn, what, handler.clone())
    })
    .await
}

/// The client of a request (its TCP peer), in the request's extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer(pub SocketAddr);

/// What the accept loop and a connection's task share.
#[derive(Debug)]
pub struct ConnState {
    /// Milliseconds since the accept loop started at the connection's last activity
    /// (accept, the start and the end of each request).
    last_active_ms: AtomicU64,
    /// Set once by the accept loop to close the connection gracefully.
    evict: Notify,
    epoch: Instant,
}

impl ConnState {
    fn new(epoch: Instant) -> Self {
        let s = Self {
            last_active_ms: AtomicU64::new(0),
            evict: Notify::new(),
            epoch,
        };
        s.touch();
        s
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_active_ms.store(ms, Ordering::Relaxed);
    }

    fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }
}

/// Serves one connection with `handler`: request heads within [`HEADER_TIMEOUT`], answers
/// within [`REQUEST_TIMEOUT`], closed gracefully when evicted or past
/// [`CONNECTION_LIFETIME`] and cut [`EVICTION_GRACE`] after that.
async fn serve_connection<H, Fut>(
    stream: TcpStream,
    peer: SocketAddr,
    conn_state: Arc<ConnState>,
    what: &'static str,
    handler: H,
) where
    H: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let state = conn_state.clone();
    let service = service_fn(move |mut req: Request<Incoming>| {
        state.touch();
        req.extensions_mut().insert(Peer(peer));
        let answer = answer_within(REQUEST_TIMEOUT, handler(req));
        let state = state.clone();
        async move {
            let r = answer.await;
            state.touch();
            Ok::<_, Infallible>(r)
        }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let lifetime = tokio::time::sleep(CONNECTION_LIFETIME);
    tokio::pin!(lifetime);
    // Set when the connection was asked to close: the time it gets until it is cut.
    let mut cut_at: Option<tokio::time::Instant> = None;
    loop {
        let closing = cut_at.is_some();
        let cut = async {
            match cut_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    log::debug!("{what} connection from {peer}: {e}");
                }
                return;
            }
            _ = conn_state.evict.notified(), if !closing => {
                log::debug!("{what} connection from {peer}: closed to make room (connection cap)");
                conn.as_mut().graceful_shutdown();
                cut_at = Some(tokio::time::Instant::now() + EVICTION_GRACE);
            }
            _ = &mut lifetime, if !closing => {
                conn.as_mut().graceful_shutdown();
                cut_at = Some(tokio::time::Instant::now() + EVICTION_GRACE);
            }
            _ = cut => return,
        }
    }
}

/// `answer`, or a 503 if it takes longer than `limit`.
async fn answer_within(
    limit: Duration,
    answer: impl Future<Output = HttpResponse>,
) -> HttpResponse {
    tokio::time::timeout(limit, answer)
        .await
        .unwrap_or_else(|_| {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the answer took too long; try again\n",
            )
        })
}

/// A connection the accept loop may close to make room: its task, its client's address
/// and its last activity ([`ConnState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate<K> {
    pub key: K,
    pub peer: IpAddr,
    pub last_active_ms: u64,
}

/// Which connection to close when a new one arrives at the cap: among the connections of
/// the client address holding the most, the one idle the longest. A client cannot push
/// out a probe by opening connections, only its own older ones (ties between addresses go
/// to the address whose connection is idle the longest). None for no connections.
pub fn pick_victim<K: Copy>(conns: &[Candidate<K>]) -> Option<K> {
    let mut per_peer: HashMap<IpAddr, usize> = HashMap::new();
    for c in conns {
        *per_peer.entry(c.peer).or_default() += 1;
    }
    conns
        .iter()
        // Most connections first, then the oldest activity.
        .min_by_key(|c| (std::cmp::Reverse(per_peer[&c.peer]), c.last_active_ms))
        .map(|c| c.key)
}

/// Serves each connection on `listener` with `serve`, at most `max` at once (at the cap a
/// [`pick_victim`] connection is asked to close for each new one), until the task running
/// it is aborted.
async fn accept_loop<F, Fut>(listener: TcpListener, max: usize, what: &'static str, serve: F)
where
    F: Fn(TcpStream, SocketAddr, Arc<ConnState>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max = max.max(1);
    let epoch = Instant::now();
    let mut conns = JoinSet::new();
    // The connections not asked to close, by task.
    let mut live: HashMap<tokio::task::Id, (IpAddr, Arc<ConnState>, AbortHandle)> = HashMap::new();
    // The ones asked to close and still finishing, oldest first.
    let mut closing: VecDeque<AbortHandle> = VecDeque::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if live.len() >= max {
                        let candidates: Vec<_> = live
                            .iter()
                            .map(|(id, (ip, s, _))| Candidate {
                                key: *id,
                                peer: *ip,
                                last_active_ms: s.last_active_ms(),
                            })
                            .collect();
                        if let Some((_, state, handle)) =
                            pick_victim(&candidates).and_then(|id| live.remove(&id))
                        {
                            state.evict.notify_one();
                            closing.push_back(handle);
                        }
                        // A flood of connections that do not finish closing (half-sent
                        // heads): cut the oldest rather than refuse the new one.
                        while closing.len() > max * CLOSING_FACTOR {
                            if let Some(h) = closing.pop_front() {
                                h.abort();
                            }
                        }
                    }
                    let state = Arc::new(ConnState::new(epoch));
                    let handle = conns.spawn(serve(stream, peer, state.clone()));
                    live.insert(handle.id(), (peer.ip(), state, handle));
                }
                // Out of file descriptors and the like: wait instead of spinning.
                Err(e) => {
                    log::debug!("{what} accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(done) = conns.join_next_with_id(), if !conns.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                if live.remove(&id).is_none() {
                    closing.retain(|h| h.id() != id);
                }
            }
        }
    }
}

/// Whether `peer` is this node itself: a loopback address, or one of `local` (the
/// addresses of the agent's network namespace, i.e. the node's with hostNetwork). A pod,
/// another node or anything outside has another address.
pub fn is_node_local(peer: IpAddr, local: &[IpAddr]) -> bool {
    let peer = peer.to_canonical();
    peer.is_loopback() || local.contains(&peer)
}

/// The addresses of the agent's network namespace, now (interfaces come and go).
fn local_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return vec![];
    };
    addrs
        .filter_map(|a| {
            let sa = a.address?;
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Headers only browsers send: a state change must never come from a web page (CSRF, DNS
/// rebinding), whatever the address the browser runs at.
const BROWSER_HEADERS: [&str; 3] = ["origin", "sec-fetch-site", "sec-fetch-mode"];

/// `None` when the request may change the agent's state: it comes from the node itself
/// ([`is_node_local`], from the [`Peer`] extension [`run`] adds) and not from a browser.
/// Otherwise the 403 to answer, which says how to do it instead.
pub fn refuse_unless_from_node(parts: &hyper::http::request::Parts) -> Option<HttpResponse> {
    refusal(parts, &local_addrs())
}

fn refusal(parts: &hyper::http::request::Parts, local: &[IpAddr]) -> Option<HttpResponse> {
    let peer = parts.extensions.get::<Peer>().map(|p| p.0);
    let from_node = peer.is_some_and(|p| is_node_local(p.ip(), local));
    let browser = BROWSER_HEADERS
        .iter()
        .any(|h| parts.headers.contains_key(*h));
    if from_node && !browser {
        return None;
    }
    let who = peer.map_or_else(|| "an unknown client".to_string(), |p| p.ip().to_string());
    log::warn!(
        "refused {} {} from {who}: {}",
        parts.method,
        parts.uri.path(),
        if from_node {
            "a browser request"
        } else {
            "not from this node"
        }
    );
    Some(text(
        StatusCode::FORBIDDEN,
        "changes are accepted only from the node itself (loopback or the node's addresses), \
         not from browsers: e.g. `curl -X PUT -d debug http://127.0.0.1:9464/loglevel` on \
         the node\n",
    ))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn node_local_addresses() {
        let local = [ip("172.18.0.2"), ip("10.244.1.1"), ip("fe80::1")];
        assert!(is_node_local(ip("127.0.0.1"), &local));
        assert!(is_node_local(ip("127.3.2.1"), &local));
        assert!(is_node_local(ip("::1"), &local));
        assert!(is_node_local(ip("::ffff:127.0.0.1"), &local));
        assert!(is_node_local(ip("172.18.0.2"), &local));
        assert!(is_node_local(ip("::ffff:172.18.0.2"), &local));
        // A pod, another node, the outside.
        assert!(!is_node_local(ip("10.244.1.5"), &local));
        assert!(!is_node_local(ip("172.18.0.3"), &local));
        assert!(!is_node_local(ip("192.0.2.7"), &local));
        assert!(!is_node_local(ip("0.0.0.0"), &local));
    }

    fn parts(peer: Option<&str>, headers: &[(&str, &str)]) -> hyper::http::request::Parts {
        let mut b = Request::builder().method("PUT").uri("/loglevel");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        if let Some(p) = peer {
            parts.extensions.insert(Peer(p.parse().unwrap()));
        }
        parts
    }

    #[test]
    fn changes_only_from_the_node_and_never_from_browsers() {
        let local = [ip("172.18.0.2")];
        assert!(refusal(&parts(Some("127.0.0.1:40000"), &[]), &local).is_none());
        assert!(refusal(&parts(Some("172.18.0.2:40000"), &[]), &local).is_none());
        let pod = refusal(&parts(Some("10.244.1.5:40000"), &[]), &local).unwrap();
        assert_eq!(pod.status(), StatusCode::FORBIDDEN);
        assert!(refusal(&parts(Some("172.18.0.3:40000"), &[]), &local).is_some());
        assert!(
            refusal(&parts(None, &[]), &local).is_some(),
            "no peer known"
        );
        for h in ["Origin", "Sec-Fetch-Site", "sec-fetch-mode"] {
            assert!(
                refusal(&parts(Some("127.0.0.1:40000"), &[(h, "x")]), &local).is_some(),
                "{h}"
            );
        }
    }

    fn cand(key: u32, peer: &str, last: u64) -> Candidate<u32> {
        Candidate {
            key,
            peer: ip(peer),
            last_active_ms: last,
        }
    }

    #[test]
    fn victims_come_from_the_busiest_address_oldest_first() {
        assert_eq!(pick_victim::<u32>(&[]), None);
        // The probe (kubelet, one connection) stays; the address holding many loses the
        // connection idle the longest.
        let conns = [
            cand(1, "172.18.0.2", 5),
            cand(2, "10.244.1.5", 30),
            cand(3, "10.244.1.5", 10),
            cand(4, "10.244.1.5", 20),
            cand(5, "10.244.2.9", 1),
            cand(6, "10.244.2.9", 2),
        ];
        assert_eq!(pick_victim(&conns), Some(3));
        // Equal counts: the connection idle the longest.
        let conns = [
            cand(1, "10.0.0.1", 7),
            cand(2, "10.0.0.2", 3),
            cand(3, "10.0.0.3", 9),
        ];
        assert_eq!(pick_victim(&conns), Some(2));
    }

    /// A server on loopback with cap `max` answering `ok` (or after `delay`).
    async fn server(max: usize, delay: Duration) -> (SocketAddr, JoinHandle<()>) {
        let l = bind("127.0.0.1:0", "--test").unwrap().unwrap();
        let addr = l.local_addr().unwrap();
        let task = serve(
            l,
            "test",
            "test",
            max,
            move |req: Request<Incoming>| async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(delay).await;
                }
                let peer = req.extensions().get::<Peer>().map(|p| p.0.ip().to_string());
                text(StatusCode::OK, format!("ok {}\n", peer.unwrap_or_default()))
            },
        )
        .unwrap();
        (addr, task)
    }

    /// One `GET path` on a fresh connection, answer read to the end.
    async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Whether the server closed `s` (EOF or reset) within `within`.
    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(within, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }

    #[tokio::test]
    async fn idle_connections_cannot_starve_probes() {
        let (addr, task) = server(4, Duration::ZERO).await;
        // Held open: some never send anything, some after one keep-alive request, one in
        // the middle of its head.
        let mut idle = vec![];
        for i in 0..12 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            match i % 3 {
                0 => {}
                1 => {
                    s.write_all(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
                        .await
                        .unwrap();
                    let mut buf = [0u8; 256];
                    let _ = s.read(&mut buf).await.unwrap();
                }
                _ => s.write_all(b"GET /x HTTP/1.1\r\nHo").await.unwrap(),
            }
            idle.push(s);
        }
        for _ in 0..5 {
            let answer = tokio::time::timeout(Duration::from_secs(2), get(addr, "/healthz"))
                .await
                .expect("a probe answered within 2 s")
                .unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.ends_with("ok 127.0.0.1\n"), "{answer}");
        }
        // The idle ones were closed to make room (all but at most the cap).
        let mut still_open = 0;
        for s in &mut idle {
            if !closed(s, Duration::from_millis(1500)).await {
                still_open += 1;
            }
        }
        assert!(still_open <= 4, "{still_open} idle connections left open");
        task.abort();
    }

    #[tokio::test]
    async fn an_answer_in_progress_is_finished_when_its_connection_is_evicted() {
        let (addr, task) = server(1, Duration::from_millis(300)).await;
        let slow = tokio::spawn(get(addr, "/slow"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // At the cap: the slow one is asked to close, but finishes its answer.
        let fast = get(addr, "/").await.unwrap();
        assert!(fast.starts_with("HTTP/1.1 200"), "{fast}");
        let slow = slow.await.unwrap().unwrap();
        assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
        task.abort();
    }

    #[tokio::test]
    async fn slow_handlers_time_out() {
        let limit = Duration::from_millis(100);
        let slow = answer_within(limit, async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            text(StatusCode::OK, "late")
        })
        .await;
        assert_eq!(slow.status(), StatusCode::SERVICE_UNAVAILABLE);
        let fast = answer_within(limit, async { text(StatusCode::OK, "in time") }).await;
        assert_eq!(fast.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn idle_keep_alive_connections_close_after_the_header_timeout() {
        let (addr, task) = server(4, Duration::ZERO).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        let t = Instant::now();
        assert!(closed(&mut s, HEADER_TIMEOUT + Duration::from_secs(2)).await);
        assert!(t.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(200));
        task.abort();
    }
}
