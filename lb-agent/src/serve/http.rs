//! What the agent's HTTP servers (metrics/health, node health, health check node ports)
//! share: binding a `--flag ADDR:PORT|none` socket, the accept loop (bounded concurrency,
//! and no busy loop when accept fails), serving a connection with header and lifetime
//! limits, and building answers.
use std::{convert::Infallible, future::Future, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{
    Request, StatusCode, body::Bytes, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

/// Time a client gets to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest life of one connection (keep-alive included); the client reconnects.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

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
/// (more are closed at once), until the task running it is aborted. `what` names the server in
/// debug logs.
pub async fn run<H, Fut>(listener: TcpListener, what: &'static str, max: usize, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    accept_loop(listener, max, what, move |s| {
        serve_connection(s, what, handler.clone())
    })
    .await
}

/// Serves one connection with `handler`: headers within [`HEADER_TIMEOUT`], dropped past
/// [`CONNECTION_LIFETIME`].
async fn serve_connection<H, Fut>(stream: TcpStream, what: &'static str, handler: H)
where
    H: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = HttpResponse> + Send + 'static,
{
    let service = service_fn(move |req| {
        let answer = handler(req);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    // Past its lifetime the connection is dropped: the client reconnects.
    if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
        log::debug!("{what} connection: {e}");
    }
}

/// Serves each connection on `listener` with `serve`, at most `max` at once (more are
/// closed at once), until the task running it is aborted.
async fn accept_loop<F, Fut>(listener: TcpListener, max: usize, what: &'static str, serve: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if conns.len() < max => {
                    conns.spawn(serve(stream));
                }
                Ok(_) => {}
                // Out of file descriptors and the like: wait instead of spinning.
                Err(e) => {
                    log::debug!("{what} accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}
