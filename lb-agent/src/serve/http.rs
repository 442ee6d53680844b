//! The accept loop shared by the agent's HTTP servers (metrics/health, health check node
//! ports): bounded concurrency, and no busy loop when accept fails.
use std::{future::Future, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// Serves each connection on `listener` with `serve`, at most `max` at once (more are
/// closed at once), until the task running it is aborted.
pub async fn accept_loop<F, Fut>(listener: TcpListener, max: usize, what: &'static str, serve: F)
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
