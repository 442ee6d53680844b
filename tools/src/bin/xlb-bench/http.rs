//! The minimal HTTP/1.0 exchange both benches time (north-south in `xlb-bench`, east-west
//! in `xlb-bench-ew`, which includes this file by path): the responders in the backend pods
//! and the client's half. One implementation, so the two benches time the same exchange.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Result;

/// What every client sends; the responders read up to its blank line.
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n";

/// The client's half on a freshly connected stream: sends the request and reads the
/// response until the responder closes the connection or `buf` is full; returns the bytes
/// read.
pub fn exchange(mut s: TcpStream, buf: &mut [u8], io_timeout: Duration) -> std::io::Result<usize> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(io_timeout))?;
    s.write_all(REQUEST)?;
    let mut n = 0;
    loop {
        match s.read(&mut buf[n..]) {
            Ok(0) => return Ok(n),
            Ok(k) => {
                n += k;
                if n == buf.len() {
                    return Ok(n);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Rust responders in the pods' namespaces; stopped (and joined) on drop.
pub struct Responders {
    pub stop: Arc<AtomicBool>,
    pub threads: Vec<JoinHandle<()>>,
}

impl Responders {
    pub fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// Serves `listener` (non-blocking, bound in pod `name`'s namespace: sockets keep the
    /// namespace they were created in, so serving threads need no setns) from `threads`
    /// threads, answering every request with a minimal HTTP/1.0 response whose body is the
    /// pod's name, so clients can tell which backend answered.
    pub fn serve_http(
        &mut self,
        listener: &TcpListener,
        name: &str,
        threads: usize,
        io_timeout: Duration,
    ) -> Result<()> {
        let body = format!("{name}\n");
        let response = Arc::new(
            format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        );
        for i in 0..threads {
            let (l, stop, resp) = (listener.try_clone()?, self.stop.clone(), response.clone());
            self.threads.push(
                std::thread::Builder::new()
                    .name(format!("tcp{i}:{name}"))
                    .spawn(move || tcp_responder(&l, &stop, &resp, io_timeout))?,
            );
        }
        Ok(())
    }
}

impl Drop for Responders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Accepts connections until `stop`, reads each request up to its blank line and writes
/// `response`. Polls with a 100 ms timeout so `stop` is seen promptly.
fn tcp_responder(listener: &TcpListener, stop: &AtomicBool, response: &[u8], io_timeout: Duration) {
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let Ok((mut s, _)) = listener.accept() else {
            continue; // the other thread took it
        };
        let _ = (|| -> std::io::Result<()> {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(io_timeout))?;
            let mut n = 0;
            while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
                match s.read(&mut buf[n..]) {
                    Ok(0) => return Ok(()),
                    Ok(k) => n += k,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            s.write_all(response)
        })();
    }
}
