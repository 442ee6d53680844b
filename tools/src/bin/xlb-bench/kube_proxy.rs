//! What kube-proxy writes that both benches imitate (`xlb-bench`'s rules and
//! `xlb-bench-ew`, which includes this file by path): its chain-name hash and the fixed
//! skeleton of its iptables-mode `iptables-restore` input. Shared so the two benches compare
//! against the same kube-proxy.
use std::{fmt::Write as _, net::Ipv4Addr};

/// kube-proxy-style chain suffix: 16 characters of base32 over a hash of `key`.
pub fn chain_suffix(key: &str) -> String {
    let fnv = |salt: u8| {
        key.bytes()
            .chain([salt])
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
    };
    let bits = (u128::from(fnv(1)) << 64) | u128::from(fnv(2));
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..16)
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// One service port as kube-proxy's iptables mode sees it.
pub struct IptService<'a> {
    /// `<namespace>/<service>:<port name>`, which names its chains.
    pub port_name: &'a str,
    /// `tcp` or `udp`.
    pub proto: &'a str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub lb_ip: Option<Ipv4Addr>,
    /// (address, target port), in the order of the random choice.
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// The nat-table chains and rules of one service port.
pub struct IptRules {
    /// Declarations of its KUBE-SVC, KUBE-EXT and KUBE-SEP chains, one a line.
    pub chains: String,
    /// The rules of those chains.
    pub rules: Vec<String>,
    /// Its KUBE-SERVICES entry points (cluster IP, then LoadBalancer IP).
    pub entry: Vec<String>,
    /// Its KUBE-NODEPORTS entry point.
    pub nodeports: Vec<String>,
}

/// The chains and rules kube-proxy writes for `s`; `cluster_cidr` is its `--cluster-cidr`
/// (traffic from outside it to the cluster IP is masqueraded).
pub fn ipt_service(s: &IptService, cluster_cidr: &str) -> IptRules {
    let (pn, p) = (s.port_name, s.proto);
    let svc_chain = format!("KUBE-SVC-{}", chain_suffix(&format!("{pn}/{p}")));
    let mut chains = format!(":{svc_chain} - [0:0]\n");
    let (mut rules, mut entry, mut nodeports) = (vec![], vec![], vec![]);
    entry.push(format!(
        "-A KUBE-SERVICES -d {}/32 -p {p} -m comment --comment \"{pn} cluster IP\" -m {p} --dport {} -j {svc_chain}",
        s.cluster_ip, s.port
    ));
    if s.node_port.is_some() || s.lb_ip.is_some() {
        let ext = format!("KUBE-EXT-{}", chain_suffix(&format!("{pn}/{p}")));
        let _ = writeln!(chains, ":{ext} - [0:0]");
        rules.push(format!(
            "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
        ));
        rules.push(format!("-A {ext} -j {svc_chain}"));
        if let Some(ip) = s.lb_ip {
            entry.push(format!(
                "-A KUBE-SERVICES -d {ip}/32 -p {p} -m comment --comment \"{pn} loadbalancer IP\" -m {p} --dport {} -j {ext}",
                s.port
            ));
        }
        if let Some(np) = s.node_port {
            nodeports.push(format!(
                "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{pn}\" -m {p} --dport {np} -j {ext}"
            ));
        }
    }
    rules.push(format!(
        "-A {svc_chain} ! -s {cluster_cidr} -d {}/32 -p {p} -m comment --comment \"{pn} cluster IP\" -m {p} --dport {} -j KUBE-MARK-MASQ",
        s.cluster_ip, s.port
    ));
    let n = s.endpoints.len();
    for (k, (ip, tp)) in s.endpoints.iter().enumerate() {
        let dest = format!("{ip}:{tp}");
        let sep = format!("KUBE-SEP-{}", chain_suffix(&format!("{pn}/{p}/{dest}")));
        let _ = writeln!(chains, ":{sep} - [0:0]");
        let left = n - k;
        let stat = if left > 1 {
            format!(
                " -m statistic --mode random --probability {:.11}",
                1.0 / left as f64
            )
        } else {
            String::new()
        };
        rules.push(format!(
            "-A {svc_chain} -m comment --comment \"{pn} -> {dest}\"{stat} -j {sep}"
        ));
        rules.push(format!(
            "-A {sep} -s {ip}/32 -m comment --comment \"{pn}\" -j KUBE-MARK-MASQ"
        ));
        rules.push(format!(
            "-A {sep} -p {p} -m comment --comment \"{pn}\" -m {p} -j DNAT --to-destination {dest}"
        ));
    }
    IptRules {
        chains,
        rules,
        entry,
        nodeports,
    }
}

/// The nat rules kube-proxy writes whatever the services (chain hooks, masquerade marks).
const FIXED_NAT_RULES: [&str; 7] = [
    "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
    "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully",
];

/// iptables-restore input shaped like kube-proxy's iptables mode: the nat table (its own
/// chains, then `chains`, the fixed rules and `nat_rules`, one rule each, in order) and the
/// filter table. Returns the text and the number of nat rules.
pub fn iptables_restore_input<S: AsRef<str>>(
    chains: &str,
    nat_rules: impl IntoIterator<Item = S>,
) -> (String, usize) {
    let nat_rules = nat_rules.into_iter();
    let mut t = String::with_capacity(
        chains.len() + (FIXED_NAT_RULES.len() + nat_rules.size_hint().0) * 160,
    );
    t += "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n";
    t += chains;
    for r in FIXED_NAT_RULES {
        t += r;
        t.push('\n');
    }
    let mut n_rules = FIXED_NAT_RULES.len();
    for r in nat_rules {
        t += r.as_ref();
        t.push('\n');
        n_rules += 1;
    }
    t += "COMMIT\n";
    t += "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
          :KUBE-FORWARD - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n\
          :KUBE-NODEPORTS - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
          -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
          -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
          -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
          -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
          -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
          -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
          -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
          -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
          -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
          -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
          -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
          COMMIT\n";
    (t, n_rules)
}
