//! Tiny traffic generators that run inside a namespace: enough HTTP and UDP
//! to ask "which pod answered?" without any external tool.
//!
//! Namespace clients ([`http_request`], [`udp_request`], ...) run on a thread inside a
//! network namespace: right for the outside client and for pods ([`pod_http_get`]).
//! Node clients ([`node_http_get`], [`node_udp_request`], [`node_command`]) are separate
//! processes in the node's namespace and cgroup, so cgroup socket programs apply to them.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sched::{CloneFlags, setns};

use crate::cgroup::CgroupJoin;
use crate::netns::try_in_netns;
use crate::network::{Node, Pod};

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

// ---------------------------------------------------------------------------------------
// Node-side clients: real processes of a node (its network namespace AND its cgroup), so
// the agent's cgroup socket programs see them; and pod-side helpers.
// ---------------------------------------------------------------------------------------

/// Extra time a node-side client process gets beyond its own timeout (python start-up)
/// before it is killed.
const NODE_CLIENT_GRACE: Duration = Duration::from_secs(5);

/// `python3 -c NODE_HTTP_PY <host> <port> <path> <timeout s>`: one `GET <path> HTTP/1.0`
/// over an AF_INET socket (`localhost` resolves to 127.0.0.1). On success stdout is one
/// line `<local ip:port> <peer ip:port>` (the peer as getpeername(2) reports it) followed
/// by the raw response; on error it exits 1 with the error on stderr.
const NODE_HTTP_PY: &str = r#"
import socket, sys, time

def main():
    host, port, path, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    deadline = time.monotonic() + timeout

    def left():
        t = deadline - time.monotonic()
        if t <= 0:
            raise TimeoutError("timed out")
        return t

    addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(left())
    s.connect(addr)
    local = "%s:%d" % s.getsockname()
    peer = "%s:%d" % s.getpeername()
    s.settimeout(left())
    s.sendall(("GET %s HTTP/1.0\r\nHost: %s:%d\r\nConnection: close\r\n\r\n" % (path, host, port)).encode())
    chunks = []
    while True:
        s.settimeout(left())
        b = s.recv(65536)
        if not b:
            break
        chunks.append(b)
    out = sys.stdout.buffer
    out.write(("%s %s\n" % (local, peer)).encode())
    out.write(b"".join(chunks))
    out.flush()

try:
    main()
except Exception as e:
    sys.stderr.write("%s: %s\n" % (type(e).__name__, e))
    sys.exit(1)
"#;

/// `python3 -c NODE_UDP_PY <host> <port> <payload hex> <timeout s>`: one datagram with
/// sendto(2) on an unconnected AF_INET socket, then the first reply from anyone with
/// recvfrom(2). On success stdout is one line `<reply source ip:port> <local ip:port>`
/// followed by the raw reply; on error (including a timeout) it exits 1 with the error on
/// stderr.
const NODE_UDP_PY: &str = r#"
import socket, sys

def main():
    host, port, payload, timeout = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
    addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    s.sendto(payload, addr)
    data, peer = s.recvfrom(65535)
    out = sys.stdout.buffer
    out.write(("%s:%d %s:%d\n" % (peer + s.getsockname())).encode())
    out.write(data)
    out.flush()

try:
    main()
except Exception as e:
    sys.stderr.write("%s: %s\n" % (type(e).__name__, e))
    sys.exit(1)
"#;

/// A command that runs as a process of `node`: between fork and exec the child joins the
/// node's network namespace (setns, keeping the mount namespace, unlike `ip netns exec`)
/// and moves itself into the node's cgroup (`node.cgroup`), so cgroup-attached socket
/// programs apply to it and to everything it starts. Configure args, stdio etc. as usual.
/// The network's teardown kills whatever is still running in the cgroup.
pub fn node_command(
    node: &Node,
    program: impl AsRef<OsStr>,
    args: impl IntoIterator<Item = impl AsRef<OsStr>>,
) -> Result<Command> {
    use std::os::{fd::AsFd, unix::process::CommandExt};
    let netns_path = Path::new("/run/netns").join(&node.netns);
    let netns = File::open(&netns_path)
        .with_context(|| format!("opening network namespace {}", netns_path.display()))?;
    let cgroup = CgroupJoin::open(&node.cgroup)?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    // SAFETY: the closure only calls setns(2) and write(2) on descriptors opened before
    // the fork, without allocating: async-signal-safe, as required after fork.
    unsafe {
        cmd.pre_exec(move || {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            cgroup.join_self()
        });
    }
    Ok(cmd)
}

/// Runs `cmd` with piped output; kills it if it runs past `limit`.
fn output_with_deadline(mut cmd: Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting node client")?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let err = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let Some(status) = status else {
        bail!(
            "killed after {limit:?}: {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    };
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs an embedded python client as a process of `node`; returns the first stdout line
/// and the rest.
fn run_node_client(
    node: &Node,
    script: &str,
    args: &[String],
    timeout: Duration,
) -> Result<(String, Vec<u8>)> {
    let mut cmd = node_command(node, "python3", ["-I", "-S", "-c", script])?;
    cmd.args(args);
    let out = output_with_deadline(cmd, timeout + NODE_CLIENT_GRACE)?;
    if !out.status.success() {
        bail!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        );
    }
    let nl = out
        .stdout
        .iter()
        .position(|&b| b == b'\n')
        .context("client printed no address line")?;
    let line = String::from_utf8_lossy(&out.stdout[..nl]).into_owned();
    Ok((line, out.stdout[nl + 1..].to_vec()))
}

fn parse_two_addrs(line: &str) -> Result<(SocketAddrV4, SocketAddrV4)> {
    let (a, b) = line
        .split_once(' ')
        .with_context(|| format!("bad address line {line:?}"))?;
    Ok((
        a.parse().with_context(|| format!("bad address {a:?}"))?,
        b.parse().with_context(|| format!("bad address {b:?}"))?,
    ))
}

/// An HTTP exchange made by a node process ([`node_http_request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeHttpResponse {
    pub response: HttpResponse,
    /// The client socket's own address (getsockname).
    pub local: SocketAddrV4,
    /// The peer as the client's getpeername(2) reports it: with socket-level load
    /// balancing, the service address the client connected to, not the backend.
    pub peer: SocketAddrV4,
}

/// `GET <path> HTTP/1.0` to `addr:port` (`addr`: an IPv4 address or a name such as
/// `localhost`, resolved to IPv4 on the machine) from a process of `node` (see
/// [`node_command`]); returns the whole response, whatever its status. `timeout` bounds
/// the exchange; the process is killed a few seconds after that if it hangs.
pub fn node_http_request(
    node: &Node,
    addr: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<NodeHttpResponse> {
    let args = [
        addr.to_owned(),
        port.to_string(),
        path.to_owned(),
        timeout.as_secs_f64().to_string(),
    ];
    (|| -> Result<NodeHttpResponse> {
        let (line, raw) = run_node_client(node, NODE_HTTP_PY, &args, timeout)?;
        let (local, peer) = parse_two_addrs(&line)?;
        Ok(NodeHttpResponse {
            response: parse_response(&raw)?,
            local,
            peer,
        })
    })()
    .with_context(|| {
        format!(
            "HTTP GET http://{addr}:{port}{path} from node {}",
            node.name
        )
    })
}

/// `GET /` to `addr:port` from a process of `node` (the seed's
/// `docker exec service-demo-worker curl -s http://localhost:<NodePort>`); returns the body
/// of a 200 response. Any other status is an error.
pub fn node_http_get(node: &Node, addr: &str, port: u16, timeout: Duration) -> Result<String> {
    let r = node_http_request(node, addr, port, "/", timeout)?;
    if r.response.status != 200 {
        bail!(
            "HTTP GET http://{addr}:{port}/ from node {}: status {}",
            node.name,
            r.response.status
        );
    }
    Ok(r.response.body)
}

/// A UDP reply received by a node process ([`node_udp_request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReply {
    pub payload: Vec<u8>,
    /// Source address of the reply as recvfrom(2) reports it: with socket-level load
    /// balancing, the service address the request was sent to, not the backend.
    pub from: SocketAddrV4,
    /// The client socket's own address (getsockname after sendto: `0.0.0.0:<port>`).
    pub local: SocketAddrV4,
}

/// Sends `payload` to `addr:port` (IPv4 address or name) with sendto(2) on an UNCONNECTED
/// socket from a process of `node` (see [`node_command`]), so cgroup sendmsg4/recvmsg4
/// programs apply, and returns the first reply from any source together with that source.
/// An unconnected socket gets no ICMP errors: a rejected request is a timeout.
pub fn node_udp_request(
    node: &Node,
    addr: &str,
    port: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<UdpReply> {
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    let args = [
        addr.to_owned(),
        port.to_string(),
        hex,
        timeout.as_secs_f64().to_string(),
    ];
    (|| -> Result<UdpReply> {
        let (line, payload) = run_node_client(node, NODE_UDP_PY, &args, timeout)?;
        let (from, local) = parse_two_addrs(&line)?;
        Ok(UdpReply {
            payload,
            from,
            local,
        })
    })()
    .with_context(|| format!("UDP request to {addr}:{port} from node {}", node.name))
}

/// `GET /` to `addr` from inside `pod`'s namespace; returns the whole response (status,
/// headers, body). Pod traffic is handled by tc on the pod's veth, not by cgroup programs,
/// so a thread in the pod's namespace is enough ([`http_request`] with `pod.netns`).
pub fn pod_http_get(pod: &Pod, addr: SocketAddrV4, timeout: Duration) -> Result<HttpResponse> {
    http_request(&pod.netns, addr, "/", timeout).with_context(|| format!("from pod {}", pod.name))
}

/// One datagram to `addr` from inside `pod`'s namespace, first reply returned
/// ([`udp_request`] with `pod.netns`: a connected socket, so only a reply from exactly
/// `addr` counts).
pub fn pod_udp_request(
    pod: &Pod,
    addr: SocketAddrV4,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>> {
    udp_request(&pod.netns, addr, payload, timeout)
        .with_context(|| format!("from pod {}", pod.name))
}
