//! Tiny traffic generators that run inside a namespace: enough HTTP and UDP
//! to ask "which pod answered?" without any external tool.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::try_in_netns;

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names as sent (case preserved), in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    // Zero would mean "no timeout" to set_read_timeout; treat it as expiry.
    if left.is_zero() {
        bail!("timed out");
    }
    Ok(left)
}

/// Sends `GET <path> HTTP/1.0` to `addr` from inside `netns` and returns the
/// whole response, whatever its status. `timeout` bounds the whole exchange.
pub fn http_request(
    netns: &str,
    addr: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    try_in_netns(netns, || http_request_here(addr, path, timeout))?
        .with_context(|| format!("HTTP GET http://{addr}{path} from netns {netns}"))
}

fn http_request_here(addr: SocketAddrV4, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout)?;
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    // HTTP/1.0 + Connection: close: the server ends the body by closing, so
    // one connection is one request, which is what LB tests want to count.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("response has no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body = String::from_utf8_lossy(&raw[split + 4..]).into_owned();
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

/// `GET /` against `addr` from inside `netns`; returns the body of a 200
/// response (for pod servers: `<pod name>\n`). Any other status is an error.
pub fn http_get(netns: &str, addr: SocketAddrV4, timeout: Duration) -> Result<String> {
    let resp = http_request(netns, addr, "/", timeout)?;
    if resp.status != 200 {
        bail!(
            "HTTP GET http://{addr}/ from netns {netns}: status {}",
            resp.status
        );
    }
    Ok(resp.body)
}

/// Sends one datagram to `addr` from inside `netns` and returns the first
/// reply. The socket is connected, so only a reply whose source is exactly
/// `addr` counts, as for a real client behind a load balancer: a reply
/// from a pod's own address (missed reverse NAT) shows up as a timeout.
pub fn udp_request(
    netns: &str,
    addr: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    try_in_netns(netns, || -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        sock.connect(addr)?;
        sock.send(payload)?;
        let mut buf = vec![0u8; 65536];
        loop {
            sock.set_read_timeout(Some(remaining(deadline)?))?;
            match sock.recv(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // Includes ECONNREFUSED from an ICMP port unreachable: the
                // reply is not coming, so report it rather than wait.
                Err(e) => return Err(e.into()),
            }
        }
    })?
    .with_context(|| format!("UDP request to {addr} from netns {netns}"))
}

/// Checks that a host answers TCP at `addr` from inside `netns`: an accepted
/// connection or a refusal (RST) both prove two-way reachability; a timeout
/// or an unreachable error does not.
pub fn tcp_reachable(netns: &str, addr: SocketAddrV4, timeout: Duration) -> Result<()> {
    try_in_netns(netns, || {
        match TcpStream::connect_timeout(&SocketAddr::V4(addr), timeout) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(()),
            Err(e) => Err(e),
        }
    })?
    .with_context(|| format!("TCP probe of {addr} from netns {netns}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let raw = b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\nX-Pod-Name: a\r\n\r\nabc\n";
        let r = parse_response(raw).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-pod-name"), Some("a"));
        assert_eq!(r.body, "abc\n");
        assert!(parse_response(b"HTTP/1.0 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
