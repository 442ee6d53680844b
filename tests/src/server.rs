//! The "pod" workload: a small python3 program standing in for the seed
//! article's nginx pods. It is python rather than a Rust binary so the
//! harness needs no extra build step, and it is embedded so the crate is
//! self-contained.

/// TCP port pod servers answer HTTP on (the seed's nginx `containerPort`).
pub const POD_HTTP_PORT: u16 = 80;
/// UDP port pod servers answer datagrams on.
pub const POD_UDP_PORT: u16 = 5353;

/// Run as `python3 -c POD_SERVER_PY <pod name> <http port> <udp port>`.
///
/// - HTTP `GET` (any path): 200, body `<pod name>\n`, with Content-Length,
///   then close. Headers `X-Pod-Name` and `X-Client` (the peer address as
///   the pod sees it) let tests check source-address preservation.
/// - UDP: every datagram is answered with `<pod name>\n` to its sender.
///
/// The UDP socket is bound before the HTTP listener, so once HTTP answers
/// both are ready.
pub const POD_SERVER_PY: &str = r#"
import socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

name, http_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = (name + "\n").encode()

def udp_echo(sock):
    while True:
        _, peer = sock.recvfrom(65535)
        sock.sendto(body, peer)

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
Server(("0.0.0.0", http_port), Handler).serve_forever()
"#;
