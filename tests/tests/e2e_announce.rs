//! MetalLB's L2 mode done by the agents: three nodes run the agent on the seed's MetalLB
//! configuration (IPAddressPool `example`, L2Advertisement `empty`), and the client holds no
//! route for the pool, only its on-link kind subnet, so it finds a LoadBalancer address by
//! ARP on the bridge; exactly one node answers (from XDP), and another takes over when that
//! node's uplink fails.
//!
//! Run with `--nocapture` to see the failover times.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_common::arp::{
    ARP, ARP_FRAME_LEN, ETH_DST, ETH_P_ARP, ETH_SRC, ETH_TYPE, IPV4_OVER_ETHERNET, OP_REPLY,
    OP_REQUEST, OPER, SHA, SPA, THA, TPA,
};
use lb_tests::*;

/// The seed's MetalLB configuration, byte for byte.
const METALLB_CONFIG: &str = include_str!("../../deploy/examples/metallb/metallb-config.yaml");
const T: Duration = Duration::from_secs(3);
const WEB_CLUSTER_IP: &str = "10.96.100.20";
const PINNED_CLUSTER_IP: &str = "10.96.100.21";
/// The pinned Service asks for the pool's first address + this.
const PINNED_OFFSET: u32 = 10;
const FAILOVER_REPEATS: usize = 5;
const FAILOVER_BUDGET: Duration = Duration::from_secs(1);

/// The pool's one `first-last` range, from the seed's IPAddressPool.
fn pool_range() -> (Ipv4Addr, Ipv4Addr) {
    for l in METALLB_CONFIG.lines() {
        let Some(item) = l.trim_start().strip_prefix("- ") else {
            continue;
        };
        if let Some((a, b)) = item.trim().split_once('-')
            && let (Ok(a), Ok(b)) = (a.trim().parse(), b.trim().parse())
        {
            return (a, b);
        }
    }
    panic!("no address range in the seed's IPAddressPool:\n{METALLB_CONFIG}");
}

fn web_addr() -> Ipv4Addr {
    pool_range().0
}

fn pinned_addr() -> Ipv4Addr {
    let (first, last) = pool_range();
    let a = Ipv4Addr::from(u32::from(first) + PINNED_OFFSET);
    assert!(a <= last, "pool too small");
    a
}

/// An address of the pool no Service holds.
fn unused_addr() -> Ipv4Addr {
    pool_range().1
}

/// The seed's MetalLB configuration, then two LoadBalancer Services over every pod: `web`
/// (asks for nothing: gets the pool's first address) and `web-pinned` (asks for
/// [`pinned_addr`] with MetalLB's annotation). Both serve HTTP on 80 and the line echo on
/// 7000.
fn manifest(net: &Network) -> String {
    manifest_with(net, None)
}

/// [`manifest`] with `web`'s endpoints limited to the pods `web_pods` names.
fn manifest_with(net: &Network, web_pods: Option<&[String]>) -> String {
    let mut y = METALLB_CONFIG.to_string();
    if !y.ends_with('\n') {
        y.push('\n');
    }
    let slice = |only: Option<&[String]>| {
        let mut eps = String::new();
        for p in net
            .pods()
            .iter()
            .filter(|p| only.is_none_or(|o| o.contains(&p.name)))
        {
            eps.push_str(&format!(
            "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: true, serving: true, terminating: false}}\n  targetRef: {{kind: Pod, namespace: dev, name: {}}}\n",
            p.addr, p.node, p.name
        ));
        }
        eps
    };
    for (name, cip, node_ports, annotations) in [
        ("web", WEB_CLUSTER_IP, (31240, 31241), String::new()),
        (
            "web-pinned",
            PINNED_CLUSTER_IP,
            (31242, 31243),
            format!(
                "  annotations:\n    metallb.io/loadBalancerIPs: \"{}\"\n",
                pinned_addr()
            ),
        ),
    ] {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: dev\n{annotations}spec:\n  type: LoadBalancer\n  clusterIP: {cip}\n  selector: {{app: nginx}}\n  ports:\n  - {{name: http, port: 80, protocol: TCP, targetPort: {POD_HTTP_PORT}, nodePort: {}}}\n  - {{name: echo, port: 7000, protocol: TCP, targetPort: {POD_ECHO_PORT}, nodePort: {}}}\n",
            node_ports.0, node_ports.1
        ));
        let eps = slice(if name == "web" { web_pods } else { None });
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-abcde\n  namespace: dev\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n- {{name: http, port: {POD_HTTP_PORT}, protocol: TCP}}\n- {{name: echo, port: {POD_ECHO_PORT}, protocol: TCP}}\nendpoints:\n{eps}"
        ));
    }
    y
}

/// Which nodes say they announce each pool address (`announced_here` in agent.json).
fn owners(c: &Cluster) -> BTreeMap<Ipv4Addr, Vec<String>> {
    let mut out: BTreeMap<Ipv4Addr, Vec<String>> = BTreeMap::new();
    for a in &c.agents {
        let Ok(s) = a.status() else { continue };
        for l in s.agent.iter().flat_map(|i| i.lb_addresses.iter()) {
            let e = out.entry(l.addr).or_default();
            if l.announced_here {
                e.push(a.node.clone());
            }
        }
    }
    out
}

/// Brings the cluster up and waits until both Services have their addresses on every
/// node, each address has exactly one announcing node, and `web` answers from the client.
fn up() -> Cluster {
    let spec = TopologySpec::seed_l2();
    let mut c = Cluster::up(&spec, manifest).expect("cluster up");
    let routes = exec_ok(c.net.client_netns(), &["ip", "-4", "route", "show"]).unwrap();
    assert!(
        !routes.contains(&web_addr().to_string()) && !routes.contains("default"),
        "the client must reach the pool by ARP only: {routes}"
    );
    let pods = c.net.pods().len();
    c.wait_for(
        "both Services programmed with their pool addresses",
        Duration::from_secs(30),
        |s| {
            let addrs: Vec<(String, Ipv4Addr)> = s
                .agent
                .iter()
                .flat_map(|a| a.lb_addresses.iter())
                .map(|l| (l.name.clone(), l.addr))
                .collect();
            addrs.len() == 2
                && s.services
                    .iter()
                    .filter(|x| x.name.starts_with("dev/web") && x.endpoints.len() == pods)
                    .count()
                    >= 2
        },
    )
    .unwrap();
    wait_one_owner_each(&c, Duration::from_secs(10)).unwrap();
    c
}

/// Waits until every pool address in use has exactly one announcing node.
fn wait_one_owner_each(c: &Cluster, timeout: Duration) -> Result<BTreeMap<Ipv4Addr, String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let o = owners(c);
        if o.len() == 2 && o.values().all(|v| v.len() == 1) {
            return Ok(o.into_iter().map(|(a, v)| (a, v[0].clone())).collect());
        }
        if Instant::now() > deadline {
            bail!("no single owner per address after {timeout:?}: {o:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mac_of(netns: &str, iface: &str) -> [u8; 6] {
    let text = exec_ok(netns, &["cat", &format!("/sys/class/net/{iface}/address")]).unwrap();
    let mut mac = [0u8; 6];
    let parts: Vec<u8> = text
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    mac.copy_from_slice(&parts);
    mac
}

fn fmt_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Node name by uplink MAC.
fn node_macs(c: &Cluster) -> BTreeMap<String, String> {
    c.net
        .nodes()
        .iter()
        .map(|n| (fmt_mac(&mac_of(&n.netns, &n.uplink)), n.name.clone()))
        .collect()
}

/// Sends `requests` ARP requests for `target` from the client's `eth0` (a raw socket in
/// the client's namespace, as `arping` would), waiting `window` after each, and counts the
/// replies by sender MAC.
fn arp_probe(
    c: &Cluster,
    target: Ipv4Addr,
    requests: usize,
    window: Duration,
) -> Result<BTreeMap<String, usize>> {
    let src_mac = mac_of(c.net.client_netns(), UPLINK);
    let src_ip = c.net.client_addr();
    try_in_netns(c.net.client_netns(), move || -> Result<_> {
        let ifindex = nix::net::if_::if_nametoindex(UPLINK)?;
        let proto_be = ETH_P_ARP.to_be();
        // SAFETY: plain socket(2).
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto_be),
            )
        };
        ensure!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is ours, owned from here.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        use std::os::fd::AsRawFd as _;
        // SAFETY: zeroed sockaddr_ll, then filled.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto_be;
        sll.sll_ifindex = ifindex as i32;
        let sll_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: valid address of the right length.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                sll_len,
            )
        };
        ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
        let mut req = [0u8; ARP_FRAME_LEN];
        req[ETH_DST..ETH_DST + 6].copy_from_slice(&[0xff; 6]);
        req[ETH_SRC..ETH_SRC + 6].copy_from_slice(&src_mac);
        req[ETH_TYPE..ETH_TYPE + 2].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        req[ARP..ARP + 6].copy_from_slice(&IPV4_OVER_ETHERNET);
        req[OPER..OPER + 2].copy_from_slice(&OP_REQUEST.to_be_bytes());
        req[SHA..SHA + 6].copy_from_slice(&src_mac);
        req[SPA..SPA + 4].copy_from_slice(&src_ip.octets());
        req[THA..THA + 6].copy_from_slice(&[0; 6]);
        req[TPA..TPA + 4].copy_from_slice(&target.octets());
        let mut dst = sll;
        dst.sll_halen = 6;
        dst.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let mut seen = BTreeMap::new();
        for _ in 0..requests {
            // SAFETY: valid buffer and address.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&dst as *const libc::sockaddr_ll).cast(),
                    sll_len,
                )
            };
            ensure!(n >= 0, "sendto: {}", std::io::Error::last_os_error());
            let deadline = Instant::now() + window;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let mut pfd = libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let r = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
                if r <= 0 {
                    continue;
                }
                let mut buf = [0u8; 1600];
                // SAFETY: valid buffer.
                let n = unsafe {
                    libc::recv(
                        sock.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < ARP_FRAME_LEN as isize {
                    continue;
                }
                let f = &buf[..n as usize];
                let is_reply = f[ETH_TYPE..ETH_TYPE + 2] == ETH_P_ARP.to_be_bytes()
                    && f[OPER..OPER + 2] == OP_REPLY.to_be_bytes()
                    && f[SPA..SPA + 4] == target.octets()
                    && f[TPA..TPA + 4] == src_ip.octets()
                    && f[THA..THA + 6] == src_mac;
                if is_reply {
                    *seen.entry(fmt_mac(&f[SHA..SHA + 6])).or_insert(0) += 1;
                }
            }
        }
        Ok(seen)
    })?
}

/// One HTTP/1.0 GET with a short connect timeout; the answering pod's name.
fn quick_get(addr: SocketAddrV4, connect: Duration, total: Duration) -> Result<String> {
    let deadline = Instant::now() + total;
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(addr), connect)?;
    s.set_write_timeout(Some(total))?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "timed out");
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let text = String::from_utf8_lossy(&raw);
    ensure!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    let body = text.split("\r\n\r\n").nth(1).context("no body")?;
    Ok(body.trim().to_string())
}

/// Retries new connections from the client (100 ms connect timeout, tight loop) until one
/// gets an HTTP answer or `until` passes; the time of the first answer.
fn first_success(c: &Cluster, addr: SocketAddrV4, until: Instant) -> (Option<Instant>, usize) {
    in_netns(c.net.client_netns(), || {
        let mut tries = 0;
        while Instant::now() < until {
            tries += 1;
            if quick_get(addr, Duration::from_millis(100), Duration::from_millis(300)).is_ok() {
                return (Some(Instant::now()), tries);
            }
        }
        (None, tries)
    })
}

fn pod_names(c: &Cluster) -> Vec<String> {
    c.net.pods().iter().map(|p| p.name.clone()).collect()
}

fn summary(c: &Cluster) -> String {
    let mut s = format!("owners (announced_here): {:?}\n", owners(c));
    for a in &c.agents {
        let log = a.log_text();
        let tail: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("announce"))
            .rev()
            .take(15)
            .collect();
        s.push_str(&format!(
            "--- {} (announce log lines, newest first)\n",
            a.node
        ));
        for l in tail {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// 1. The pool's first address answers HTTP from the client (found by ARP), and a Service
///    asking for a pool address gets exactly that address and answers on it.
#[test]
fn pool_addresses_answer_http_by_arp() {
    let Some(_guard) = privileged() else {
        return;
    };
    let c = up();
    let pods = pod_names(&c);
    let by_service: BTreeMap<String, Ipv4Addr> = c.agents[0]
        .status()
        .unwrap()
        .agent
        .unwrap()
        .lb_addresses
        .iter()
        .map(|l| (l.name.clone(), l.addr))
        .collect();
    assert_eq!(by_service.get("web"), Some(&web_addr()), "{by_service:?}");
    assert_eq!(
        by_service.get("web-pinned"),
        Some(&pinned_addr()),
        "{by_service:?}"
    );
    for addr in [web_addr(), pinned_addr()] {
        for i in 0..20 {
            let body = http_get(c.net.client_netns(), SocketAddrV4::new(addr, 80), T)
                .unwrap_or_else(|e| panic!("request {i} to {addr}: {e:#}\n{}", summary(&c)));
            assert!(pods.contains(&body.trim().to_string()), "{body}");
        }
    }
    // It was ARP: the client's neighbour table has the address at an announcing node's MAC.
    let neigh = exec_ok(c.net.client_netns(), &["ip", "neigh", "show"]).unwrap();
    let macs = node_macs(&c);
    let o = owners(&c);
    for addr in [web_addr(), pinned_addr()] {
        let line = neigh
            .lines()
            .find(|l| l.starts_with(&format!("{addr} ")))
            .unwrap_or_else(|| panic!("no neighbour entry for {addr}: {neigh}"));
        let node = macs
            .iter()
            .find(|(m, _)| line.contains(m.as_str()))
            .map(|(_, n)| n.clone());
        assert_eq!(
            node.as_ref(),
            o[&addr].first(),
            "{addr}: {line}; owners {o:?}"
        );
        println!("{addr}: resolved to {} ({line})", node.unwrap());
    }
}

/// 2. Exactly one node answers ARP for each address, and it is the one whose agent reports
///    `announced_here` (exactly one per address).
#[test]
fn exactly_one_node_answers_arp_per_address() {
    let Some(_guard) = privileged() else {
        return;
    };
    let c = up();
    let macs = node_macs(&c);
    let o = owners(&c);
    for addr in [web_addr(), pinned_addr()] {
        assert_eq!(
            o[&addr].len(),
            1,
            "{addr}: announced_here on {:?}",
            o[&addr]
        );
        let seen = arp_probe(&c, addr, 8, Duration::from_millis(150)).unwrap();
        let named: BTreeMap<String, usize> = seen
            .iter()
            .map(|(m, n)| (macs.get(m).cloned().unwrap_or_else(|| m.clone()), *n))
            .collect();
        println!(
            "{addr}: ARP replies by node {named:?}; announced_here on {:?}",
            o[&addr]
        );
        assert_eq!(
            named.len(),
            1,
            "{addr}: replies from {named:?}\n{}",
            summary(&c)
        );
        assert_eq!(named.keys().next(), o[&addr].first(), "{addr}: {named:?}");
        assert!(
            named.values().all(|&n| n >= 6),
            "{addr}: replies lost: {named:?}"
        );
    }
}

/// 3. A pool address no Service holds gets no ARP answer.
#[test]
fn unused_pool_address_gets_no_arp_answer() {
    let Some(_guard) = privileged() else {
        return;
    };
    let c = up();
    for addr in [unused_addr(), Ipv4Addr::from(u32::from(web_addr()) + 1)] {
        let seen = arp_probe(&c, addr, 5, Duration::from_millis(200)).unwrap();
        assert!(seen.is_empty(), "{addr}: unexpected ARP replies {seen:?}");
        // And the control: the address in use does get one in the same way.
        let seen = arp_probe(&c, web_addr(), 1, Duration::from_millis(200)).unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
    }
}

/// The MAC the client's neighbour table has for `addr` (None: no usable entry).
fn client_neigh_mac(c: &Cluster, addr: Ipv4Addr) -> Option<String> {
    let out = exec_ok(
        c.net.client_netns(),
        &["ip", "neigh", "show", &addr.to_string()],
    )
    .ok()?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_string)
}

/// Makes `web`'s endpoints the pods that do not run on `owner`, so that a failure of
/// `owner` tests the announcement alone (its pods would otherwise stay in the
/// EndpointSlice, unreachable, and new connections hashed to them would time out whatever
/// the announcer does). Returns at once if that is already so.
fn endpoints_off(c: &mut Cluster, owner: &str, current: &mut Option<String>) {
    if current.as_deref() == Some(owner) {
        return;
    }
    let keep: Vec<String> = c
        .net
        .pods()
        .iter()
        .filter(|p| p.node != owner)
        .map(|p| p.name.clone())
        .collect();
    let n = keep.len();
    let text = manifest_with(&c.net, Some(&keep));
    c.write_manifest(&text).unwrap();
    c.wait_for("web's endpoints updated", Duration::from_secs(20), |s| {
        // Status names are `ns/name:port/PROTO`.
        let web: Vec<_> = s
            .services
            .iter()
            .filter(|x| x.name.starts_with("dev/web:"))
            .collect();
        !web.is_empty() && web.iter().all(|x| x.endpoints.len() == n)
    })
    .unwrap();
    *current = Some(owner.to_string());
}

/// 4. When the announcing node's uplink fails, another node takes the address over and new
///    connections from the client succeed again within [`FAILOVER_BUDGET`], every time.
///
/// Per round: the client resolves the address afresh (its neighbour entry flushed), so it
/// starts at the owner's MAC; `web`'s endpoints exclude the owner's pods (see
/// [`endpoints_off`]). Measured from just before `ip link set eth0 down` in the owner's
/// namespace: the first HTTP answer on a new connection (100 ms connect timeout, tight
/// loop), and when the client's neighbour entry moved to another MAC (the new owner's
/// gratuitous ARP).
#[test]
fn failover_when_the_owner_uplink_goes_down() {
    let Some(_guard) = privileged() else {
        return;
    };
    let mut c = up();
    let macs = node_macs(&c);
    let addr = SocketAddrV4::new(web_addr(), 80);
    let mut conn_times = vec![];
    let mut arp_times = vec![];
    let mut failures = vec![];
    let mut eps_off = None;
    for round in 0..FAILOVER_REPEATS {
        let o = wait_one_owner_each(&c, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", summary(&c)));
        let owner = o[&web_addr()].clone();
        endpoints_off(&mut c, &owner, &mut eps_off);
        let owner_mac = macs
            .iter()
            .find(|(_, n)| **n == owner)
            .map(|(m, _)| m.clone())
            .unwrap();
        // Working before the failure, with the client's entry resolved afresh.
        exec_ok(
            c.net.client_netns(),
            &["ip", "neigh", "flush", "to", &web_addr().to_string()],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while http_get(c.net.client_netns(), addr, Duration::from_millis(500)).is_err() {
            assert!(
                Instant::now() < deadline,
                "round {round}: {addr} does not answer before the failure\n{}",
                summary(&c)
            );
        }
        let before = client_neigh_mac(&c, web_addr());
        assert_eq!(
            before.as_deref(),
            Some(owner_mac.as_str()),
            "round {round}: the client resolved {} to {before:?}, not to the owner {owner}",
            web_addr()
        );
        let t0 = Instant::now();
        let (took, tries, moved) = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                while t0.elapsed() < Duration::from_secs(5) {
                    if let Some(m) = client_neigh_mac(&c, web_addr())
                        && m != owner_mac
                    {
                        return Some((t0.elapsed(), m));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                None
            });
            c.net.set_uplink(&owner, false).unwrap();
            let (ok, tries) = first_success(&c, addr, t0 + Duration::from_secs(5));
            (ok.map(|t| t - t0), tries, watcher.join().unwrap())
        });
        let new_owners = owners(&c);
        let moved_to = moved
            .as_ref()
            .map(|(d, m)| format!("{d:?} -> {}", macs.get(m).cloned().unwrap_or(m.clone())));
        println!(
            "round {round}: {owner} down; first HTTP answer after {took:?} ({tries} connection \
             attempts); client neighbour entry moved after {moved_to:?}; announced_here now \
             {new_owners:?}"
        );
        match took {
            Some(d) => {
                conn_times.push(d);
                if d > FAILOVER_BUDGET {
                    failures.push(format!("round {round}: first answer after {d:?}"));
                }
            }
            None => failures.push(format!("round {round}: no answer within 5 s")),
        }
        match moved {
            Some((d, _)) => {
                arp_times.push(d);
                if d > FAILOVER_BUDGET {
                    failures.push(format!("round {round}: neighbour entry moved after {d:?}"));
                }
            }
            None => failures.push(format!(
                "round {round}: the client's neighbour entry never left {owner}'s MAC within 5 s"
            )),
        }
        c.net.set_uplink(&owner, true).unwrap();
        // Let the returning node hear its peers and the claims resolve.
        std::thread::sleep(Duration::from_millis(1000));
    }
    let dist = |what: &str, v: &mut Vec<Duration>| {
        v.sort();
        if v.is_empty() {
            return;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{what} over {} repeats: min {:.0} ms, median {:.0} ms, max {:.0} ms; all: {:?}",
            v.len(),
            ms(v[0]),
            ms(v[v.len() / 2]),
            ms(v[v.len() - 1]),
            v.iter().map(|&d| ms(d).round() as u64).collect::<Vec<_>>()
        );
    };
    dist(
        "failure -> first successful new connection",
        &mut conn_times,
    );
    dist(
        "failure -> client's ARP entry at the new owner",
        &mut arp_times,
    );
    assert!(
        failures.is_empty(),
        "failover over budget {FAILOVER_BUDGET:?}: {failures:?}\n{}",
        summary(&c)
    );
}

/// 5. After a failover, a connection established through the new owner keeps exchanging
///    data when the old owner's uplink comes back.
#[test]
fn returning_node_does_not_break_established_connection() {
    established_across_return(false);
}

/// 6. Like 5, but after the old owner is back the client resolves the address again (its
///    neighbour entry flushed, as happens when it ages out): the connection must survive
///    going to whichever node announces the address then.
///
/// Ignored: fails today (the returning node wins the address back by score, without a
/// gratuitous ARP, and the flow reaches a node that has no conntrack entry and another
/// SNAT address for it: reset). Run with `--ignored`.
#[test]
fn established_connection_survives_client_rearp_after_return() {
    established_across_return(true);
}

fn established_across_return(rearp: bool) {
    let Some(_guard) = privileged() else {
        return;
    };
    let c = up();
    let macs = node_macs(&c);
    let old = wait_one_owner_each(&c, Duration::from_secs(10)).unwrap()[&web_addr()].clone();
    c.net.set_uplink(&old, false).unwrap();
    let echo = SocketAddrV4::new(web_addr(), 7000);
    // A long-lived connection through whichever node owns the address now (retrying until
    // the failover is done and the connection lands on a pod that is still reachable).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (conn, first) = loop {
        let r = in_netns(c.net.client_netns(), || -> Result<(TcpStream, String)> {
            let s = TcpStream::connect_timeout(&echo.into(), Duration::from_millis(200))?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            (&s).write_all(b"hello\n")?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line)?;
            ensure!(line.ends_with(" hello\n"), "echo answered {line:?}");
            Ok((s, line))
        });
        match r {
            Ok(x) => break x,
            Err(e) => assert!(
                Instant::now() < deadline,
                "no echo connection through {echo} after {old} went down: {e:#}\n{}",
                summary(&c)
            ),
        }
    };
    let pod = first.split(' ').next().unwrap().to_string();
    let neigh = exec_ok(
        c.net.client_netns(),
        &["ip", "neigh", "show", &web_addr().to_string()],
    )
    .unwrap();
    let via = macs
        .iter()
        .find(|(m, _)| neigh.contains(m.as_str()))
        .map(|(_, n)| n.clone());
    println!(
        "connection to {echo} established via {via:?} (pod {pod}) while {old} is down; owners {:?}",
        owners(&c)
    );

    c.net.set_uplink(&old, true).unwrap();
    let back = Instant::now();
    if rearp {
        // Give the claims a moment to resolve, then let the client ask again.
        std::thread::sleep(Duration::from_millis(1000));
        exec_ok(
            c.net.client_netns(),
            &["ip", "neigh", "flush", "to", &web_addr().to_string()],
        )
        .unwrap();
        println!(
            "client neighbour entry flushed {:?} after {old} came back; owners {:?}",
            back.elapsed(),
            owners(&c)
        );
    }
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut n = 0;
    while back.elapsed() < Duration::from_secs(5) {
        let msg = format!("line {n}\n");
        let r = (&conn)
            .write_all(msg.as_bytes())
            .map_err(anyhow::Error::from)
            .and_then(|_| {
                let mut line = String::new();
                reader.read_line(&mut line)?;
                Ok(line)
            });
        match r {
            Ok(line) => assert_eq!(
                line,
                format!("{pod} {msg}"),
                "after {:?} since {old} came back",
                back.elapsed()
            ),
            Err(e) => panic!(
                "established connection broke {:?} after {old} came back (line {n}): {e:#}\n{}",
                back.elapsed(),
                summary(&c)
            ),
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let neigh = exec_ok(
        c.net.client_netns(),
        &["ip", "neigh", "show", &web_addr().to_string()],
    )
    .unwrap();
    println!(
        "{n} lines echoed over 5 s after {old} came back; owners now {:?}; client neighbour \
         entry: {}",
        owners(&c),
        neigh.trim()
    );
}
