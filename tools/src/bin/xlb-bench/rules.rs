//! The services of a run, as the three programmers see them: the agent's manifest (YAML),
//! kube-proxy's iptables mode (`iptables-restore` input) and kube-proxy's nftables mode
//! (`nft -f` input). The rule shapes follow what kube-proxy writes (chain layout, matches,
//! random endpoint choice, masquerade marks); names are derived the same way (a hash of the
//! service port), not byte-identical.
use std::{fmt::Write as _, net::Ipv4Addr};

use crate::kube_proxy::{self, IptRules, IptService, chain_suffix, iptables_restore_input};

/// kind's pod network (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// kube-proxy's `--service-cluster-ip-range` as kind sets it.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const NAMESPACE: &str = "bench";
/// The nftables table kube-proxy's nftables mode owns.
pub const NFT_TABLE: &str = "kube-proxy";

/// One service port with its endpoints, programmed identically by every configuration.
#[derive(Clone, Debug)]
pub struct SvcDef {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// Endpoints: (address, target port, node name).
    pub endpoints: Vec<(Ipv4Addr, u16, String)>,
    pub node_port: Option<u16>,
    pub lb_ip: Option<Ipv4Addr>,
    /// UDP instead of TCP (the packet-rate part's service).
    pub udp: bool,
}

impl SvcDef {
    fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:p", self.name)
    }

    /// The protocol as iptables and nft spell it.
    fn proto(&self) -> &'static str {
        if self.udp { "udp" } else { "tcp" }
    }
}

// ---------------------------------------------------------------- the agent's manifest

/// Services and EndpointSlices as `kubectl get svc,endpointslices -A -o yaml` prints them
/// (a `kind: List`), in the order given.
pub fn manifest(svcs: &[SvcDef]) -> String {
    let mut y = String::with_capacity(svcs.len() * 900);
    y.push_str("apiVersion: v1\nkind: List\nitems:\n");
    for s in svcs {
        let ty = match (s.lb_ip, s.node_port) {
            (Some(_), _) => "LoadBalancer",
            (None, Some(_)) => "NodePort",
            _ => "ClusterIP",
        };
        let np = s
            .node_port
            .map(|p| format!(", nodePort: {p}"))
            .unwrap_or_default();
        let tp = s.endpoints.first().map_or(s.port, |e| e.1);
        let proto = s.proto().to_ascii_uppercase();
        let _ = write!(
            y,
            "- apiVersion: v1\n  kind: Service\n  metadata: {{name: {n}, namespace: {NAMESPACE}}}\n  spec:\n    type: {ty}\n    clusterIP: {ip}\n    ports:\n    - {{name: p, port: {port}, protocol: {proto}, targetPort: {tp}{np}}}\n",
            n = s.name,
            ip = s.cluster_ip,
            port = s.port,
        );
        if let Some(ip) = s.lb_ip {
            let _ = writeln!(
                y,
                "  status:\n    loadBalancer:\n      ingress:\n      - ip: {ip}"
            );
        }
        let _ = write!(
            y,
            "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: {n}-x1\n    namespace: {NAMESPACE}\n    labels: {{kubernetes.io/service-name: {n}}}\n  addressType: IPv4\n  ports:\n  - {{name: p, port: {tp}, protocol: {proto}}}\n  endpoints:\n",
            n = s.name,
        );
        if s.endpoints.is_empty() {
            y.truncate(y.len() - 1);
            y.push_str(" []\n");
        }
        for (ip, _, node) in &s.endpoints {
            let _ = writeln!(
                y,
                "  - addresses: [\"{ip}\"]\n    nodeName: {node}\n    conditions: {{ready: true, serving: true, terminating: false}}"
            );
        }
    }
    y
}

// ---------------------------------------------------------------- iptables mode

/// The nat-table chains and rules of one service port (KUBE-SVC, KUBE-EXT, KUBE-SEP) plus
/// its KUBE-SERVICES / KUBE-NODEPORTS entry points.
fn ipt_service(s: &SvcDef) -> IptRules {
    kube_proxy::ipt_service(
        &IptService {
            port_name: &s.port_name(),
            proto: s.proto(),
            cluster_ip: s.cluster_ip,
            port: s.port,
            node_port: s.node_port,
            lb_ip: s.lb_ip,
            endpoints: s.endpoints.iter().map(|(ip, tp, _)| (*ip, *tp)).collect(),
        },
        CLUSTER_CIDR,
    )
}

/// iptables-restore input shaped like kube-proxy's iptables mode (nat + filter), services in
/// the order given (the last one is the last rule of KUBE-SERVICES before the NodePort jump).
/// Returns the text and the number of nat rules.
pub fn iptables_full(svcs: &[SvcDef]) -> (String, usize) {
    let mut chains = String::new();
    let (mut rules, mut entry, mut nodeports) = (vec![], vec![], vec![]);
    for s in svcs {
        let svc = ipt_service(s);
        chains += &svc.chains;
        rules.extend(svc.rules);
        entry.extend(svc.entry);
        nodeports.extend(svc.nodeports);
    }
    entry.push(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into(),
    );
    iptables_restore_input(&chains, nodeports.into_iter().chain(rules).chain(entry))
}

/// kube-proxy's partial sync for one changed service (`iptables-restore --noflush`): its
/// KUBE-SVC / KUBE-EXT / KUBE-SEP chains declared again (which flushes them) and rewritten;
/// `gone` lists endpoint chains to delete.
pub fn iptables_partial(s: &SvcDef, gone: &[(Ipv4Addr, u16)]) -> String {
    let IptRules { chains, rules, .. } = ipt_service(s);
    let mut t = String::from("*nat\n");
    t += &chains;
    let pn = s.port_name();
    let gone: Vec<String> = gone
        .iter()
        .map(|(ip, tp)| {
            format!(
                "KUBE-SEP-{}",
                chain_suffix(&format!("{pn}/{}/{ip}:{tp}", s.proto()))
            )
        })
        .collect();
    for g in &gone {
        let _ = writeln!(t, ":{g} - [0:0]");
    }
    for r in rules {
        t += &r;
        t.push('\n');
    }
    for g in &gone {
        let _ = writeln!(t, "-X {g}");
    }
    t += "COMMIT\n";
    t
}

// ---------------------------------------------------------------- nftables mode

fn nft_svc_chain(s: &SvcDef) -> String {
    let p = s.proto();
    format!(
        "service-{}-{NAMESPACE}/{}/{p}/p",
        &chain_suffix(&format!("{}/{p}", s.port_name()))[..8],
        s.name
    )
}

fn nft_ext_chain(s: &SvcDef) -> String {
    let p = s.proto();
    format!(
        "external-{}-{NAMESPACE}/{}/{p}/p",
        &chain_suffix(&format!("{}/{p}", s.port_name()))[..8],
        s.name
    )
}

fn nft_ep_chain(s: &SvcDef, ip: Ipv4Addr, tp: u16) -> String {
    let p = s.proto();
    format!(
        "endpoint-{}-{NAMESPACE}/{}/{p}/p__{ip}/{tp}",
        &chain_suffix(&format!("{}/{p}/{ip}:{tp}", s.port_name()))[..8],
        s.name
    )
}

/// Adds one endpoint's chain (masquerade hairpin traffic, DNAT to the endpoint) as `nft`
/// commands; returns the chain's name. The full and the incremental sync write the same.
fn nft_endpoint(out: &mut String, s: &SvcDef, ip: Ipv4Addr, tp: u16) -> String {
    let t = NFT_TABLE;
    let ep = nft_ep_chain(s, ip, tp);
    let _ = writeln!(out, "add chain ip {t} {ep}");
    let _ = writeln!(
        out,
        "add rule ip {t} {ep} ip saddr {ip} jump mark-for-masquerade"
    );
    let _ = writeln!(
        out,
        "add rule ip {t} {ep} meta l4proto {} dnat to {ip}:{tp}",
        s.proto()
    );
    ep
}

/// The service, external and endpoint chains of one service port, as `nft` commands
/// (`add chain` + `add rule`), and its `service-ips` / `service-nodeports` elements.
fn nft_service(s: &SvcDef, out: &mut String, ips: &mut Vec<String>, nodeports: &mut Vec<String>) {
    let t = NFT_TABLE;
    let svc = nft_svc_chain(s);
    let _ = writeln!(out, "add chain ip {t} {svc}");
    let _ = writeln!(
        out,
        "add rule ip {t} {svc} ip daddr {} {} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.cluster_ip,
        s.proto(),
        s.port
    );
    let mut vmap = Vec::new();
    for (k, (ip, tp, _)) in s.endpoints.iter().enumerate() {
        let ep = nft_endpoint(out, s, *ip, *tp);
        vmap.push(format!("{k} : goto {ep}"));
    }
    if !vmap.is_empty() {
        let _ = writeln!(
            out,
            "add rule ip {t} {svc} numgen random mod {} vmap {{ {} }}",
            vmap.len(),
            vmap.join(", ")
        );
    }
    let p = s.proto();
    ips.push(format!("{} . {p} . {} : goto {svc}", s.cluster_ip, s.port));
    if s.node_port.is_some() || s.lb_ip.is_some() {
        let ext = nft_ext_chain(s);
        let _ = writeln!(out, "add chain ip {t} {ext}");
        let _ = writeln!(out, "add rule ip {t} {ext} jump mark-for-masquerade");
        let _ = writeln!(out, "add rule ip {t} {ext} goto {svc}");
        if let Some(ip) = s.lb_ip {
            ips.push(format!("{ip} . {p} . {} : goto {ext}", s.port));
        }
        if let Some(np) = s.node_port {
            nodeports.push(format!("{p} . {np} : goto {ext}"));
        }
    }
}

/// `nft -f` input shaped like kube-proxy's nftables mode: table `ip kube-proxy` with the
/// `service-ips` and `service-nodeports` verdict maps, per-service chains choosing an
/// endpoint with `numgen random mod N`, DNAT in per-endpoint chains, masquerade by mark,
/// the filter-side checks. Deletes an existing table first (in the same transaction).
pub fn nft_full(svcs: &[SvcDef]) -> String {
    let t = NFT_TABLE;
    let mut body = String::with_capacity(svcs.len() * 1200);
    let (mut ips, mut nodeports) = (Vec::new(), Vec::new());
    for s in svcs {
        nft_service(s, &mut body, &mut ips, &mut nodeports);
    }
    let cluster_ips: Vec<String> = svcs.iter().map(|s| s.cluster_ip.to_string()).collect();
    let mut out = String::with_capacity(body.len() + ips.len() * 80 + 4096);
    let _ = write!(
        out,
        "add table ip {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         delete table ip {t}\n\
         add table ip {t} {{ comment \"rules for kube-proxy\" ; }}\n\
         add set ip {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add map ip {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map ip {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add map ip {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add map ip {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; }}\n\
         add map ip {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}\n\
         add chain ip {t} mark-for-masquerade\n\
         add rule ip {t} mark-for-masquerade meta mark set meta mark or 0x4000\n\
         add chain ip {t} masquerading\n\
         add rule ip {t} masquerading meta mark & 0x4000 == 0 return\n\
         add rule ip {t} masquerading meta mark set meta mark xor 0x4000\n\
         add rule ip {t} masquerading masquerade fully-random\n\
         add chain ip {t} services\n\
         add chain ip {t} firewall-check\n\
         add chain ip {t} service-endpoints-check\n\
         add chain ip {t} nodeport-endpoints-check\n\
         add chain ip {t} cluster-ips-check\n\
         add chain ip {t} nat-prerouting {{ type nat hook prerouting priority dstnat ; }}\n\
         add chain ip {t} nat-output {{ type nat hook output priority -100 ; }}\n\
         add chain ip {t} nat-postrouting {{ type nat hook postrouting priority srcnat ; }}\n\
         add chain ip {t} filter-prerouting {{ type filter hook prerouting priority -110 ; }}\n\
         add chain ip {t} filter-input {{ type filter hook input priority -110 ; }}\n\
         add chain ip {t} filter-forward {{ type filter hook forward priority -110 ; }}\n\
         add chain ip {t} filter-output {{ type filter hook output priority -110 ; }}\n\
         add rule ip {t} nat-prerouting jump services\n\
         add rule ip {t} nat-output jump services\n\
         add rule ip {t} nat-postrouting jump masquerading\n\
         add rule ip {t} filter-prerouting ct state new jump firewall-check\n\
         add rule ip {t} filter-input ct state new jump nodeport-endpoints-check\n\
         add rule ip {t} filter-input ct state new jump service-endpoints-check\n\
         add rule ip {t} filter-forward ct state new jump service-endpoints-check\n\
         add rule ip {t} filter-forward ct state new jump cluster-ips-check\n\
         add rule ip {t} filter-output ct state new jump service-endpoints-check\n\
         add rule ip {t} filter-output ct state new jump firewall-check\n\
         add rule ip {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add rule ip {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add rule ip {t} nodeport-endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add rule ip {t} cluster-ips-check ip daddr @cluster-ips reject\n\
         add rule ip {t} cluster-ips-check ip daddr {SERVICE_CIDR} drop\n\
         add rule ip {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n"
    );
    out += &body;
    // Elements in batches: one huge line is slow to parse.
    for chunk in cluster_ips.chunks(1000) {
        let _ = writeln!(
            out,
            "add element ip {t} cluster-ips {{ {} }}",
            chunk.join(", ")
        );
    }
    for chunk in ips.chunks(1000) {
        let _ = writeln!(
            out,
            "add element ip {t} service-ips {{ {} }}",
            chunk.join(", ")
        );
    }
    if !nodeports.is_empty() {
        let _ = writeln!(
            out,
            "add element ip {t} service-nodeports {{ {} }}",
            nodeports.join(", ")
        );
    }
    out
}

/// kube-proxy's nftables incremental sync for one changed service: its service chain
/// flushed and rewritten, new endpoint chains added, removed ones deleted.
pub fn nft_partial(s: &SvcDef, added: &[(Ipv4Addr, u16)], gone: &[(Ipv4Addr, u16)]) -> String {
    let t = NFT_TABLE;
    let svc = nft_svc_chain(s);
    let mut out = String::new();
    for (ip, tp) in added {
        nft_endpoint(&mut out, s, *ip, *tp);
    }
    let _ = writeln!(out, "flush chain ip {t} {svc}");
    let _ = writeln!(
        out,
        "add rule ip {t} {svc} ip daddr {} {} dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        s.cluster_ip,
        s.proto(),
        s.port
    );
    let vmap: Vec<String> = s
        .endpoints
        .iter()
        .enumerate()
        .map(|(k, (ip, tp, _))| format!("{k} : goto {}", nft_ep_chain(s, *ip, *tp)))
        .collect();
    let _ = writeln!(
        out,
        "add rule ip {t} {svc} numgen random mod {} vmap {{ {} }}",
        vmap.len(),
        vmap.join(", ")
    );
    for (ip, tp) in gone {
        let ep = nft_ep_chain(s, *ip, *tp);
        let _ = writeln!(out, "flush chain ip {t} {ep}");
        let _ = writeln!(out, "delete chain ip {t} {ep}");
    }
    out
}
