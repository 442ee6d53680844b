//! The socket hooks act for the node's own network namespace only. A pod whose processes
//! sit in the hooked cgroup (as with the cgroup root hooked on a real node) keeps its own
//! `127.0.0.1:<port>` even when the port number is a NodePort, and still reaches ClusterIPs;
//! the node's processes keep `localhost:<NodePort>` (the seed's check).
use std::{net::SocketAddrV4, process::Stdio, time::Duration};

use lb_tests::*;

const T: Duration = Duration::from_secs(5);

/// In the pod's namespace, inside the node's cgroup: listen on 127.0.0.1:`port`, connect
/// to it, and print what the listener answered (its marker) or what else answered.
const OWN_LISTENER_PY: &str = r#"
import socket, sys, threading
port = int(sys.argv[1])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1)
def serve():
    c, _ = srv.accept()
    c.recv(100)
    c.sendall(b"own-listener")
    c.close()
threading.Thread(target=serve, daemon=True).start()
c = socket.create_connection(("127.0.0.1", port), timeout=3)
c.sendall(b"GET / HTTP/1.0\r\n\r\n")
data = b""
while True:
    b = c.recv(4096)
    if not b:
        break
    data += b
sys.stdout.write(data.decode(errors="replace"))
"#;

#[test]
fn a_pods_own_localhost_listener_on_a_nodeport_number_answers_it() {
    let Some(_guard) = privileged() else {
        return;
    };
    let spec = TopologySpec::seed();
    let mut c = Cluster::up(&spec, |net| seed_manifests(net, &ManifestOpts::default()))
        .expect("cluster up");
    let pods = c.net.pods().len();
    c.wait_for("nginx-service programmed", T * 4, |s| {
        s.services
            .iter()
            .any(|x| x.name.starts_with("dev/nginx-service") && x.endpoints.len() == pods)
    })
    .unwrap();
    let pod = c.net.pods()[0].clone();
    let node = c.net.node(&pod.node).clone();
    // A process of the pod (its network namespace) in the node's hooked cgroup.
    let in_pod = Node {
        netns: pod.netns.clone(),
        ..node.clone()
    };
    let out = node_command(
        &in_pod,
        "python3",
        ["-c", OWN_LISTENER_PY, &NGINX_NODE_PORT.to_string()],
    )
    .unwrap()
    .stdin(Stdio::null())
    .output()
    .expect("python3 in the pod");
    let answer = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        answer.trim(),
        "own-listener",
        "the pod's connect to 127.0.0.1:{NGINX_NODE_PORT} was taken away: {answer}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The node's own processes: localhost:<NodePort> is the service (the seed's check).
    let body = node_http_get(&node, "localhost", NGINX_NODE_PORT, T).expect("node localhost");
    assert!(
        c.net.pods().iter().any(|p| p.name == body.trim()),
        "node localhost:{NGINX_NODE_PORT} answered {body}"
    );
    // And the pod, from that cgroup, still reaches the ClusterIP.
    let cip = SocketAddrV4::new(NGINX_CLUSTER_IP.parse().unwrap(), 80);
    let r = pod_http_get(&pod, cip, T).expect("ClusterIP");
    assert_eq!(r.status, 200);
}
