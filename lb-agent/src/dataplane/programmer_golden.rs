//! Golden dumps of the maps the programmer writes, over the in-memory maps of
//! `programmer::tests` (no BPF, no root: they run with the lib unit tests).
//!
//! A scenario is a list of steps; each step applies a desired state (built from YAML by
//! `yaml::parse_objects` and `translate::translate`) at a fixed time, then dumps every map
//! as text and compares it with `lb-agent/tests/golden/<scenario>/<NN-step>.txt`.
//!
//! To accept a change in the dumps, rewrite the files and review the diff:
//!
//! ```text
//! XLB_UPDATE_GOLDEN=1 cargo test -p lb-agent --lib programmer_golden
//! ```
//!
//! (A file no step writes any more fails the test: delete it by hand.)
//!
//! The restart step adopts the in-memory maps with [`Programmer::adopt`] itself (they
//! implement `programmer::MapReader`).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb_common::*;

use crate::{
    dataplane::programmer::{
        ApplyStats, MapWriter, Programmer, Settings,
        tests::{Fake, buffers},
    },
    model::translate::{self, Desired, NodeContext},
    source::yaml,
};

/// Set to rewrite the golden files instead of comparing with them.
const UPDATE_ENV: &str = "XLB_UPDATE_GOLDEN";

/// Maglev tables up to this size are dumped slot by slot, larger ones only as counts.
const SLOT_LIST_MAX_M: u32 = 509;

fn node() -> NodeContext {
    NodeContext {
        node_name: "node-a".into(),
        node_addrs: vec![Ipv4Addr::new(192, 168, 1, 10)],
        snat_ports: 61000..=65535,
        ..NodeContext::default()
    }
}

fn desired(yaml: &str) -> Desired {
    let objs = yaml::parse_objects(yaml).unwrap_or_else(|e| panic!("scenario YAML: {e}"));
    translate::translate(&objs, &node())
}

/// The smallest Maglev tables (`maglev::M_LADDER[0]`), and a small arena, so the dumps
/// stay short.
fn settings() -> Settings {
    Settings {
        min_m: crate::dataplane::maglev::M_LADDER[0],
        drain: Duration::from_secs(30),
        max_services: 8,
        max_frontends: 64,
        max_backends: 64,
        arena: 4096,
    }
}

fn ip(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr_be.to_ne_bytes())
}

fn flag_names<T: Copy + Into<u32>>(flags: T, names: &[(T, &str)]) -> String {
    let flags: u32 = flags.into();
    let mut out: Vec<String> = names
        .iter()
        .filter(|(f, _)| flags & (*f).into() != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known = names.iter().fold(0u32, |a, (f, _)| a | (*f).into());
    if flags & !known != 0 {
        out.push(format!("{:#x}", flags & !known));
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        n => format!("proto{n}"),
    }
}

/// One character per slot: the backend id in base 36 (`.` for an unwritten slot).
fn slot_char(id: u32) -> Option<char> {
    if id == 0 {
        Some('.')
    } else {
        char::from_digit(id, 36)
    }
}

/// Every map the programmer writes, as text, in a fixed order.
fn dump(maps: &Fake, p: &Programmer) -> String {
    let mut s = String::new();

    s += "[frontends] XLB_FRONTENDS: addr:port/proto -> svc_id flags\n";
    let mut fes: Vec<_> = maps.frontends.iter().collect();
    fes.sort_by_key(|(k, _)| (ip(k.addr_be), u16::from_be(k.port_be), k.proto));
    for (k, f) in fes {
        let flags = flag_names(
            f.flags,
            &[
                (FE_NODEPORT, "nodeport"),
                (FE_EXTERNAL, "external"),
                (FE_CLUSTER_IP, "cluster_ip"),
                (FE_LOCALHOST, "localhost"),
                (FE_SOURCE_RANGES, "source_ranges"),
                (FE_SHORT_CIRCUIT, "short_circuit"),
            ],
        );
        // The inside service port only when it differs (externalTrafficPolicy Local).
        let inside = if f.inside_svc_id != f.svc_id {
            format!(" inside svc {}", f.inside_svc_id)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  {}:{}/{} -> svc {}{inside} {flags}",
            ip(k.addr_be),
            u16::from_be(k.port_be),
            proto_name(k.proto),
            f.svc_id,
        );
    }

    s += "\n[services] XLB_SERVICES: svc_id table_off m backend_count flags affinity\n";
    for (id, v) in &maps.services {
        let flags = flag_names(v.flags, &[(SVC_DROP_IF_EMPTY, "drop_if_empty")]);
        let _ = writeln!(
            s,
            "  svc {id} off={} m={} backends={} flags={flags} affinity={}",
            v.table_off, v.table_m, v.backend_count, v.affinity_timeout,
        );
    }

    s += "\n[svc_meta] XLB_SVC_META: svc_id version type proto scope port namespace name \
          port_name (ids ever initialised)\n";
    for (id, m) in &maps.meta {
        let ty = match m.service_type() {
            Some(t) => t.as_str().to_string(),
            None => format!("type{}", m.svc_type),
        };
        let proto = match m.proto {
            PROTO_TCP => "TCP".to_string(),
            PROTO_UDP => "UDP".to_string(),
            n => format!("proto{n}"),
        };
        let scope = match m.scope {
            SVC_SCOPE_CLUSTER => "cluster".to_string(),
            SVC_SCOPE_LOCAL => "local".to_string(),
            n => format!("scope{n}"),
        };
        let _ = writeln!(
            s,
            "  svc {id} v{} {ty} {proto} {scope} port={} ns={:?} name={:?} port_name={:?}",
            m.version,
            m.port,
            m.namespace(),
            m.name(),
            m.port_name(),
        );
    }

    s += "\n[backends] XLB_BACKENDS: id addr:port flags\n";
    for (id, b) in &maps.backends {
        let flags = flag_names(b.flags, &[(BE_LOCAL, "local"), (BE_DRAINING, "draining")]);
        let _ = writeln!(
            s,
            "  be {id} {}:{} {flags}",
            ip(b.addr_be),
            u16::from_be(b.port_be)
        );
    }

    s += "\n[maglev] XLB_MAGLEV: each service's table (slots per backend id; slot list as \
          base-36 ids, 64 a row)\n";
    for (id, v) in &maps.services {
        if v.table_m == 0 {
            let _ = writeln!(s, "  svc {id}: no table");
            continue;
        }
        let range = v.table_off as usize..(v.table_off + v.table_m) as usize;
        let slots = &maps.slots[range];
        let mut counts = BTreeMap::<u32, usize>::new();
        for &b in slots {
            *counts.entry(b).or_default() += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(b, n)| format!("be{b}={n}")).collect();
        let _ = writeln!(
            s,
            "  svc {id} @{}..{}: {}",
            v.table_off,
            v.table_off + v.table_m,
            counts.join(" ")
        );
        let chars: Option<String> = slots.iter().map(|&b| slot_char(b)).collect();
        if let Some(chars) = chars.filter(|_| v.table_m <= SLOT_LIST_MAX_M) {
            for (i, row) in chars.as_bytes().chunks(64).enumerate() {
                let _ = writeln!(
                    s,
                    "    {:>4} {}",
                    i * 64,
                    std::str::from_utf8(row).expect("ascii")
                );
            }
        }
    }

    s += "\n[cluster_ips] XLB_CLUSTER_IPS\n";
    let mut cips: Vec<Ipv4Addr> = maps.cluster_ips.iter().map(|&a| ip(a)).collect();
    cips.sort();
    for a in cips {
        let _ = writeln!(s, "  {a}");
    }

    s += "\n[src_ranges] XLB_SRC_RANGES: svc_id cidr\n";
    let mut ranges: Vec<(u32, Ipv4Addr, u8)> = maps
        .ranges
        .iter()
        .map(|&(id, a, len)| (id, ip(a), len))
        .collect();
    ranges.sort();
    for (id, a, len) in ranges {
        let _ = writeln!(s, "  svc {id} {a}/{len}");
    }

    s += "\n[service_cidrs] XLB_SERVICE_CIDRS: cidr\n";
    let mut cidrs: Vec<(Ipv4Addr, u8)> = maps
        .service_cidrs
        .iter()
        .map(|&(a, len)| (ip(a), len))
        .collect();
    cidrs.sort();
    for (a, len) in cidrs {
        let _ = writeln!(s, "  {a}/{len}");
    }

    s += "\n[buffers] programmer state: each port's two Maglev buffers (@off/m), * = active\n";
    for line in buffers(p) {
        let _ = writeln!(s, "  {line}");
    }
    // An empty map reads as such.
    s.split_inclusive("\n\n")
        .map(|sec| {
            let body = sec.trim_end_matches('\n');
            if body.lines().count() == 1 {
                format!("{body}\n  (empty){}", &sec[body.len()..])
            } else {
                sec.to_string()
            }
        })
        .collect()
}

/// The in-memory maps, counting every operation `apply` makes on them (`ApplyStats` does
/// not count all of them: a backend's draining flag, for one).
struct Counting<'a> {
    maps: &'a mut Fake,
    ops: BTreeMap<&'static str, usize>,
}

impl<'a> Counting<'a> {
    fn new(maps: &'a mut Fake) -> Self {
        Self {
            maps,
            ops: BTreeMap::new(),
        }
    }

    fn count(&mut self, op: &'static str) {
        *self.ops.entry(op).or_default() += 1;
    }

    fn summary(&self) -> String {
        if self.ops.is_empty() {
            return "none".into();
        }
        self.ops
            .iter()
            .map(|(op, n)| format!("{op}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl MapWriter for Counting<'_> {
    fn read_slot(&self, idx: u32) -> Option<u32> {
        self.maps.read_slot(idx)
    }
    fn set_backend(&mut self, id: u32, value: Backend) -> Result<()> {
        self.count("set_backend");
        self.maps.set_backend(id, value)
    }
    fn remove_backend(&mut self, id: u32) {
        self.count("remove_backend");
        self.maps.remove_backend(id)
    }
    fn init_service(&mut self, svc_id: u32, meta: SvcMeta) -> Result<()> {
        self.count("init_service");
        self.maps.init_service(svc_id, meta)
    }
    fn has_service(&self, svc_id: u32) -> bool {
        self.maps.has_service(svc_id)
    }
    fn set_service(&mut self, svc_id: u32, value: Service) -> Result<()> {
        self.count("set_service");
        self.maps.set_service(svc_id, value)
    }
    fn remove_service(&mut self, svc_id: u32) {
        self.count("remove_service");
        self.maps.remove_service(svc_id)
    }
    fn set_slot(&mut self, idx: u32, backend_id: u32) -> Result<()> {
        self.count("set_slot");
        self.maps.set_slot(idx, backend_id)
    }
    fn set_frontend(&mut self, key: FrontendKey, value: Frontend) -> Result<()> {
        self.count("set_frontend");
        self.maps.set_frontend(key, value)
    }
    fn remove_frontend(&mut self, key: &FrontendKey) {
        self.count("remove_frontend");
        self.maps.remove_frontend(key)
    }
    fn add_cluster_ip(&mut self, addr_be: u32) -> Result<()> {
        self.count("add_cluster_ip");
        self.maps.add_cluster_ip(addr_be)
    }
    fn remove_cluster_ip(&mut self, addr_be: u32) {
        self.count("remove_cluster_ip");
        self.maps.remove_cluster_ip(addr_be)
    }
    fn add_service_cidr(&mut self, addr_be: u32, len: u8) -> Result<()> {
        self.count("add_service_cidr");
        self.maps.add_service_cidr(addr_be, len)
    }
    fn remove_service_cidr(&mut self, addr_be: u32, len: u8) {
        self.count("remove_service_cidr");
        self.maps.remove_service_cidr(addr_be, len)
    }
    fn add_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8) -> Result<()> {
        self.count("add_src_range");
        self.maps.add_src_range(svc_id, addr_be, len)
    }
    fn remove_src_range(&mut self, svc_id: u32, addr_be: u32, len: u8) {
        self.count("remove_src_range");
        self.maps.remove_src_range(svc_id, addr_be, len)
    }
}

/// Applies `d` at `now` through [`Counting`] and returns the dump's header: the stats and
/// every map operation.
fn apply(p: &mut Programmer, maps: &mut Fake, d: &Desired, now: Instant) -> (ApplyStats, String) {
    let mut counting = Counting::new(maps);
    let st = p.apply(d, &mut counting, now).unwrap();
    let ops = counting.summary();
    let verdict = if ops == "none" {
        "nothing written or removed"
    } else {
        "maps changed"
    };
    maps.check();
    assert!(p.refusals().is_empty(), "{:?}", p.refusals());
    let head = format!("apply: {st:?}\nmap operations: {ops}\n  => {verdict}");
    (st, head)
}

/// A line diff (longest common subsequence): ` ` kept, `-` golden, `+` now; kept lines
/// only within 3 of a change, `...` for the others.
fn line_diff(want: &str, got: &str) -> String {
    const CONTEXT: usize = 3;
    let a: Vec<&str> = want.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    let (n, m) = (a.len(), b.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && a[i] == b[j] {
            lines.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(('-', a[i]));
            i += 1;
        } else {
            lines.push(('+', b[j]));
            j += 1;
        }
    }
    let changed: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].0 != ' ').collect();
    let near = |k: usize| changed.iter().any(|&c| c.abs_diff(k) <= CONTEXT);
    let mut out = String::new();
    let mut skipped = false;
    for (k, (mark, line)) in lines.iter().enumerate() {
        if near(k) {
            let _ = writeln!(out, "{mark} {line}");
            skipped = false;
        } else if !skipped {
            out += "...\n";
            skipped = true;
        }
    }
    out
}

/// Compares (or with `XLB_UPDATE_GOLDEN=1` writes) the dumps of one scenario. All steps
/// are checked before failing, so one run shows every step that changed.
struct Golden {
    dir: PathBuf,
    update: bool,
    failures: Vec<String>,
    /// File names of the steps checked.
    seen: Vec<String>,
}

impl Golden {
    fn new(scenario: &str) -> Self {
        Self {
            dir: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/golden")
                .join(scenario),
            update: std::env::var_os(UPDATE_ENV).is_some_and(|v| v == "1"),
            failures: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn check(&mut self, step: &str, got: &str) {
        let file = format!("{step}.txt");
        let path = self.dir.join(&file);
        self.seen.push(file);
        if self.update {
            std::fs::create_dir_all(&self.dir).unwrap();
            std::fs::write(&path, got).unwrap();
            return;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == got => {}
            Ok(want) => self.failures.push(format!(
                "{} differs (- golden, + now):\n{}",
                path.display(),
                line_diff(&want, got)
            )),
            Err(e) => self
                .failures
                .push(format!("{}: {e}\nnow:\n{got}", path.display())),
        }
    }

    fn finish(mut self) {
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !self.seen.contains(&name) {
                self.failures
                    .push(format!("{}: no step writes it", e.path().display()));
            }
        }
        assert!(
            self.failures.is_empty(),
            "{}\n\nIf the change is intended, rewrite the golden files with \
             `{UPDATE_ENV}=1 cargo test -p lb-agent --lib programmer_golden` and review \
             the diff of {}.",
            self.failures.join("\n"),
            self.dir.display()
        );
    }
}

/// A Service document with a creation time (its age decides admission order).
fn service(name: &str, created: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: dev, \
         creationTimestamp: \"{created}\"}}\nspec:\n{spec}\n"
    )
}

/// An EndpointSlice for `svc`; `ports` and `endpoints` are YAML flow sequences.
fn slice(svc: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-1\n  \
         namespace: dev\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\n\
         ports: {ports}\nendpoints: {endpoints}\n"
    )
}

fn web(endpoints: &str) -> String {
    service(
        "web",
        "2024-01-01T00:00:00Z",
        "  type: NodePort\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, nodePort: 30080}]",
    ) + &slice("web", "[{name: http, port: 8080}]", endpoints)
}

fn db() -> String {
    service(
        "db",
        "2024-01-02T00:00:00Z",
        "  clusterIP: 10.96.0.20\n  ports: [{name: pg, port: 5432}]",
    ) + &slice(
        "db",
        "[{name: pg, port: 5432}]",
        "[{addresses: [10.244.2.20], nodeName: node-b}]",
    )
}

fn cache() -> String {
    service(
        "cache",
        "2024-01-03T00:00:00Z",
        "  type: LoadBalancer\n  clusterIP: 10.96.0.30\n  \
         ports: [{name: redis, port: 6379, nodePort: 30379}]\n  \
         loadBalancerSourceRanges: [203.0.113.0/24]\n\
         status: {loadBalancer: {ingress: [{ip: 192.168.49.200}]}}",
    ) + &slice(
        "cache",
        "[{name: redis, port: 6379}]",
        "[{addresses: [10.244.1.30], nodeName: node-a}, {addresses: [10.244.3.30], nodeName: node-c}]",
    )
}

const WEB_3: &str = "[{addresses: [10.244.1.5], nodeName: node-a}, \
                     {addresses: [10.244.2.9], nodeName: node-b}, \
                     {addresses: [10.244.3.7], nodeName: node-c}]";
/// 10.244.2.9 removed.
const WEB_2: &str = "[{addresses: [10.244.1.5], nodeName: node-a}, \
                     {addresses: [10.244.3.7], nodeName: node-c}]";
/// A new endpoint, 10.244.3.8: three again.
const WEB_3_NEW: &str = "[{addresses: [10.244.1.5], nodeName: node-a}, \
                         {addresses: [10.244.3.7], nodeName: node-c}, \
                         {addresses: [10.244.3.8], nodeName: node-c}]";

/// Two services, an endpoint removed (it drains), a table flip back, the drain running
/// out, a service replaced (its id reused), and a restart that adopts the maps and has
/// nothing to write.
#[test]
fn golden_lifecycle_dumps() {
    let s = settings();
    let mut maps = Fake::new(&s);
    let mut p = Programmer::new(s.clone());
    let mut g = Golden::new("lifecycle");
    let t0 = Instant::now();
    let at = |secs| t0 + Duration::from_secs(secs);

    let steps: Vec<(&str, &str, String, u64)> = vec![
        (
            "01-add-two-services",
            "web (NodePort, 3 endpoints) and db (ClusterIP, 1 endpoint) appear",
            web(WEB_3) + &db(),
            0,
        ),
        (
            "02-endpoint-removed",
            "web's 10.244.2.9 leaves the slice: it is flagged draining (an operation \
             ApplyStats does not count) and is out of web's new table (2 backends: m=251), \
             written into buffer A (resized from 509 to 251), which becomes active",
            web(WEB_2) + &db(),
            10,
        ),
        (
            "03-table-flip-back",
            "web gets a new endpoint 10.244.3.8 (3 backends: m=509): its table goes into \
             buffer B, which still holds step 01's table, so only the slots that differ are \
             written, and B is active again; 10.244.2.9 is still draining",
            web(WEB_3_NEW) + &db(),
            20,
        ),
        (
            "04-drain-expired",
            "nothing changes in the cluster; 30 s after its removal 10.244.2.9 is deleted \
             (web's inactive buffer A is resized back to 509, no write)",
            web(WEB_3_NEW) + &db(),
            41,
        ),
        (
            "05-service-removed",
            "db is deleted: its service, frontend and ClusterIP go, its id and tables are \
             freed, its backend drains",
            web(WEB_3_NEW),
            50,
        ),
        (
            "06-service-added",
            "cache (LoadBalancer with a source range) is created: it gets db's freed id 1 \
             and db's freed arena room; db's backend keeps draining",
            web(WEB_3_NEW) + &cache(),
            60,
        ),
    ];
    let mut last = None;
    let mut db_id = None;
    for (step, what, yaml, secs) in steps {
        let d = desired(&yaml);
        assert!(d.warnings.is_empty(), "{step}: {:?}", d.warnings);
        let (_, head) = apply(&mut p, &mut maps, &d, at(secs));
        let text = format!(
            "# {step} (t0+{secs}s): {what}\n{head}\n\n{}",
            dump(&maps, &p)
        );
        g.check(step, &text);
        // What the dumps are meant to show, checked whatever the golden files say.
        let gone = Ipv4Addr::new(10, 244, 2, 9);
        match step {
            "02-endpoint-removed" | "03-table-flip-back" => {
                let (id, b) = backend(&maps, gone).expect("kept while draining");
                assert_ne!(b.flags & BE_DRAINING, 0, "{step}");
                let web = svc_id(&maps, "dev/web:http/TCP").unwrap();
                assert!(
                    !table(&maps, web).contains(&id),
                    "{step}: still in the table"
                );
            }
            "04-drain-expired" => assert!(backend(&maps, gone).is_none()),
            "05-service-removed" => assert_eq!(svc_id(&maps, "dev/db:pg/TCP"), None),
            "06-service-added" => assert_eq!(svc_id(&maps, "dev/cache:redis/TCP"), db_id),
            _ => {}
        }
        if step == "01-add-two-services" {
            db_id = svc_id(&maps, "dev/db:pg/TCP");
            assert!(db_id.is_some());
        }
        last = Some((d, secs, text));
    }

    // The agent restarts: a new Programmer adopts what the maps hold and applies the same
    // desired state. Nothing may be rewritten, and the maps read the same.
    let (d, secs, before) = last.unwrap();
    let before_maps = before.split_once("\n\n").unwrap().1;
    let mut p = Programmer::new(s.clone());
    let adopted = p.adopt(&maps).unwrap();
    let (st, head) = apply(&mut p, &mut maps, &d, at(secs + 5));
    assert_eq!(st, ApplyStats::default(), "a restart rewrote the maps");
    assert!(head.ends_with("nothing written or removed"), "{head}");
    let step = "07-restart-adopt";
    let text = format!(
        "# {step} (t0+{}s): a fresh Programmer adopts the maps of step 06 and applies the same \
         desired state\nadopt: {adopted:?}\n{head}\n\n{}",
        secs + 5,
        dump(&maps, &p)
    );
    // The maps are those of step 06; only the programmer's buffers may differ.
    let maps_part = |t: &str| t.split("\n[buffers]").next().unwrap().to_string();
    assert_eq!(
        maps_part(text.split_once("\n\n").unwrap().1),
        maps_part(before_maps)
    );
    g.check(step, &text);

    // The drain period of db's backend started again at the adoption (deadlines are not
    // in the maps): still there at t0+81, past the deadline of the first run (t0+80).
    let db_be = Ipv4Addr::new(10, 244, 2, 20);
    apply(&mut p, &mut maps, &d, at(81));
    assert!(backend(&maps, db_be).is_some());
    let secs = secs + 5 + 30;
    let (_, head) = apply(&mut p, &mut maps, &d, at(secs));
    assert!(backend(&maps, db_be).is_none());
    let step = "08-restart-drain-expired";
    let text = format!(
        "# {step} (t0+{secs}s): after the restart, db's backend 10.244.2.20 is deleted 30 s \
         after the adoption (its drain started again there: deadlines are not in the maps)\n\
         {head}\n\n{}",
        dump(&maps, &p)
    );
    g.check(step, &text);
    g.finish();
}

/// kube-proxy's policies in the maps: an externalTrafficPolicy Local service whose
/// external frontends point in-cluster traffic at its cluster-scope port, an
/// internalTrafficPolicy Local service with endpoints elsewhere only (drop) and one with no
/// endpoint at all (reject), and the service CIDR.
#[test]
fn golden_policy_dumps() {
    let s = settings();
    let mut maps = Fake::new(&s);
    let mut p = Programmer::new(s.clone());
    let mut g = Golden::new("policy");
    let yaml = service(
        "edge",
        "2024-01-01T00:00:00Z",
        "  type: NodePort\n  clusterIP: 10.96.0.40\n  externalTrafficPolicy: Local\n  \
         ports: [{name: http, port: 80, nodePort: 30040}]",
    ) + &slice(
        "edge",
        "[{name: http, port: 8080}]",
        "[{addresses: [10.244.2.40], nodeName: node-b}]",
    ) + &service(
        "elsewhere",
        "2024-01-02T00:00:00Z",
        "  clusterIP: 10.96.0.41\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]",
    ) + &slice(
        "elsewhere",
        "[{name: http, port: 8080}]",
        "[{addresses: [10.244.2.41], nodeName: node-b}]",
    ) + &service(
        "nowhere",
        "2024-01-03T00:00:00Z",
        "  clusterIP: 10.96.0.42\n  internalTrafficPolicy: Local\n  ports: [{name: http, port: 80}]",
    ) + "---\napiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: kubernetes}\n\
         spec: {cidrs: [10.96.0.0/16]}\n";
    let d = desired(&yaml);
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    let (_, head) = apply(&mut p, &mut maps, &d, Instant::now());
    let step = "01-local-policies";
    g.check(
        step,
        &format!(
            "# {step}: edge (NodePort, eTP Local, its endpoint on node-b): its NodePorts serve \
             the local-scope port (no endpoint here: drop) from outside and the cluster-scope \
             port from inside; elsewhere (iTP Local, endpoint on node-b): drop_if_empty; \
             nowhere (iTP Local, no endpoint): reject; the service CIDR\n{head}\n\n{}",
            dump(&maps, &p)
        ),
    );
    let edge_local = svc_id(&maps, "dev/edge:http/TCP (local)").unwrap();
    let edge_cluster = svc_id(&maps, "dev/edge:http/TCP").unwrap();
    let np = maps
        .frontends
        .iter()
        .find(|(k, _)| u16::from_be(k.port_be) == 30040 && ip(k.addr_be) != Ipv4Addr::LOCALHOST)
        .map(|(_, f)| *f)
        .unwrap();
    assert_eq!((np.svc_id, np.inside_svc_id), (edge_local, edge_cluster));
    assert_ne!(np.flags & FE_SHORT_CIRCUIT, 0);
    let flags = |name: &str| maps.services[&svc_id(&maps, name).unwrap()].flags;
    assert_ne!(
        flags("dev/elsewhere:http/TCP (local)") & SVC_DROP_IF_EMPTY,
        0
    );
    assert_eq!(flags("dev/nowhere:http/TCP (local)") & SVC_DROP_IF_EMPTY, 0);
    assert_eq!(maps.service_cidrs.len(), 1);
    g.finish();
}

/// The backend with address `addr`, as (id, value).
fn backend(maps: &Fake, addr: Ipv4Addr) -> Option<(u32, Backend)> {
    maps.backends
        .iter()
        .find(|(_, b)| ip(b.addr_be) == addr)
        .map(|(&id, &b)| (id, b))
}

/// The id of the programmed service port named `name` (`SvcPortId`'s display, which is
/// `SvcMeta`'s).
fn svc_id(maps: &Fake, name: &str) -> Option<u32> {
    maps.services
        .keys()
        .copied()
        .find(|id| maps.meta.get(id).is_some_and(|m| m.to_string() == name))
}

/// The backend ids in a service's active Maglev table.
fn table(maps: &Fake, svc_id: u32) -> Vec<u32> {
    let v = maps.services[&svc_id];
    maps.slots[v.table_off as usize..(v.table_off + v.table_m) as usize].to_vec()
}

#[test]
fn line_diff_marks_changed_lines() {
    assert_eq!(line_diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
    assert_eq!(line_diff("", "a\n"), "+ a\n");
    let far: String = (0..10).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        line_diff(&far, &far.replace("8\n", "eight\n")),
        "...\n  5\n  6\n  7\n- 8\n+ eight\n  9\n"
    );
}
