//! The "pod" workload: a small python3 program standing in for the seed
//! article's nginx pods. It is python rather than a Rust binary so the
//! harness needs no extra build step, and it is embedded so the crate is
//! self-contained.

/// TCP port pod servers answer HTTP on (the seed's nginx `containerPort`).
pub const POD_HTTP_PORT: u16 = 80;
/// UDP port pod servers answer datagrams on.
pub const POD_UDP_PORT: u16 = 5353;

/// TCP port of a line echo that keeps the connection open (for tests of established flows).
pub const POD_ECHO_PORT: u16 = 7000;

/// Run as `python3 -c POD_SERVER_PY <pod name> <http port> <udp port> <echo port>`.
///
/// - HTTP `GET` (any path): 200, body `<pod name>\n`, with Content-Length,
///   then close. Headers `X-Pod-Name` and `X-Client` (the peer address as
///   the pod sees it) let tests check source-address preservation.
/// - UDP: every datagram is answered with `<pod name>\n` to its sender; `big:<n>` with `n`
///   bytes starting with the name (a large reply to a small request), `echo:...` with itself.
/// - Echo (TCP): every line is answered with `<pod name> <line>`, on one long-lived
///   connection.
///
/// The UDP socket is bound before the HTTP listener, so once HTTP answers
/// both are ready.
pub const POD_SERVER_PY: &str = r#"
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, http_port, udp_port, echo_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
body = (name + "\n").encode()

def udp_echo(sock):
    while True:
        data, peer = sock.recvfrom(65535)
        if data.startswith(b"big:"):
            # A large reply to a small request (DNS with EDNS): fragmented on its way back.
            n = int(data[4:])
            sock.sendto(body + b"x" * (n - len(body)), peer)
        elif data.startswith(b"echo:"):
            sock.sendto(data, peer)
        else:
            sock.sendto(body, peer)

def echo_conn(conn):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(name.encode() + b" " + line)

def echo_accept(sock):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=echo_conn, args=(conn,), daemon=True).start()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.send_header("X-Pod-Name", name)
        self.send_header("X-Client", "%s:%d" % self.client_address[:2])
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    # Load tests open many connections at once; the default backlog of 5
    # would turn bursts into SYN retransmits that look like LB bugs.
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", udp_port))
threading.Thread(target=udp_echo, args=(udp,), daemon=True).start()
echo = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
echo.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
echo.bind(("0.0.0.0", echo_port))
echo.listen(128)
threading.Thread(target=echo_accept, args=(echo,), daemon=True).start()
Server(("0.0.0.0", http_port), Handler).serve_forever()
"#;
