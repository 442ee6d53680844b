//! The manifests under deploy/ (the agent's DaemonSet and RBAC, the seed's example objects,
//! the iperf3 bench, the kind cluster config), checked without a cluster: no API server or
//! kind runs on the build machines, so this test is what keeps them correct.
//!
//! Every YAML document is parsed into its typed k8s-openapi object and serialized back; the
//! two must be equal, so a misspelt or misplaced field (which the typed parsers silently
//! drop) fails here. Then the invariants the agent depends on are checked one by one.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use clap::Parser as _;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, ReplicaSet},
        batch::v1::Job,
        core::v1::{Container, Namespace, PodSpec, Probe, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lb_agent::{
    agent::{RunArgs, SourceSpec, parse_source},
    dataplane::cgroup::CgroupFlags,
};
use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// deploy/, or `XLB_DEPLOY_DIR` (to check an edited copy, e.g. when trying what the checks
/// catch without touching the tree).
fn deploy() -> PathBuf {
    std::env::var_os("XLB_DEPLOY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("deploy"))
}

// ---------------------------------------------------------------------------------------
// Loading

// Boxed: the typed objects differ a lot in size.
#[derive(Debug, Clone)]
enum Obj {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    DaemonSet(Box<DaemonSet>),
    ReplicaSet(Box<ReplicaSet>),
    Deployment(Box<Deployment>),
    Job(Box<Job>),
    Service(Box<Service>),
    /// MetalLB's IPAddressPool and L2Advertisement (no typed object; checked by shape).
    MetalLb(Value),
}

#[derive(Debug, Clone)]
struct Doc {
    /// Relative to deploy/.
    file: PathBuf,
    obj: Obj,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(p);
        }
    }
}

fn all_yaml_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    yaml_files(&deploy(), &mut v);
    assert!(!v.is_empty(), "no YAML under deploy/");
    v
}

fn rel(p: &Path) -> PathBuf {
    p.strip_prefix(deploy()).unwrap_or(p).to_owned()
}

fn is_kustomization(p: &Path) -> bool {
    p.file_name().is_some_and(|n| n == "kustomization.yaml")
}

/// deploy/kind/ holds kind's own cluster config, not Kubernetes objects.
fn is_kind_config(p: &Path) -> bool {
    rel(p).starts_with("kind")
}

fn read_docs(path: &Path) -> Vec<Value> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(path).expect("read");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            Value::deserialize(d).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses into `T` and back; the result must equal the input (nothing dropped or renamed).
fn typed<T>(file: &Path, v: &Value) -> Box<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let t: T = serde_yaml::from_value(v.clone()).unwrap_or_else(|e| {
        panic!(
            "{}: not a valid {}: {e}",
            file.display(),
            std::any::type_name::<T>()
        )
    });
    let back = serde_json::to_value(&t).expect("serialize");
    let orig = serde_json::to_value(v).expect("yaml to json");
    if let Some(diff) = first_difference(&orig, &back, "") {
        panic!(
            "{}: {} does not survive a typed round trip (misspelt, misplaced or mistyped \
             field?): {diff}",
            file.display(),
            std::any::type_name::<T>()
        );
    }
    Box::new(t)
}

fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value as J;
    match (a, b) {
        (J::Object(x), J::Object(y)) => {
            for k in x.keys().chain(y.keys()) {
                let here = format!("{at}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => {
                        if let Some(d) = first_difference(p, q, &here) {
                            return Some(d);
                        }
                    }
                    (Some(p), None) => return Some(format!("{here} = {p} is dropped")),
                    (None, Some(q)) => return Some(format!("{here} = {q} appears")),
                    (None, None) => unreachable!(),
                }
            }
            None
        }
        (J::Array(x), J::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(p, q, &format!("{at}[{i}]"))),
        (J::Number(x), J::Number(y)) if x.as_f64() == y.as_f64() => None,
        _ if a == b => None,
        _ => Some(format!("{at}: {a} became {b}")),
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn load() -> Vec<Doc> {
    let mut docs = Vec::new();
    for path in all_yaml_files() {
        if is_kustomization(&path) || is_kind_config(&path) {
            continue;
        }
        let file = rel(&path);
        for v in read_docs(&path) {
            let api = str_at(&v, "apiVersion").unwrap_or_default();
            let kind = str_at(&v, "kind").unwrap_or_default();
            let obj = match (api, kind) {
                ("v1", "Namespace") => Obj::Namespace(typed(&file, &v)),
                ("v1", "ServiceAccount") => Obj::ServiceAccount(typed(&file, &v)),
                ("v1", "Service") => Obj::Service(typed(&file, &v)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    Obj::ClusterRole(typed(&file, &v))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    Obj::ClusterRoleBinding(typed(&file, &v))
                }
                ("apps/v1", "DaemonSet") => Obj::DaemonSet(typed(&file, &v)),
                ("apps/v1", "ReplicaSet") => Obj::ReplicaSet(typed(&file, &v)),
                ("apps/v1", "Deployment") => Obj::Deployment(typed(&file, &v)),
                ("batch/v1", "Job") => Obj::Job(typed(&file, &v)),
                ("metallb.io/v1beta1", "IPAddressPool" | "L2Advertisement") => {
                    Obj::MetalLb(v.clone())
                }
                _ => panic!(
                    "{}: unexpected object apiVersion {api:?} kind {kind:?} (add it to this \
                     test with its checks)",
                    file.display()
                ),
            };
            docs.push(Doc {
                file: file.clone(),
                obj,
            });
        }
    }
    docs
}

/// The documents of the files a directory's kustomization lists (deploy/ itself: the agent).
fn base(docs: &[Doc], dir: &str) -> Vec<Doc> {
    docs.iter()
        .filter(|d| d.file.parent().is_some_and(|p| p == Path::new(dir)))
        .cloned()
        .collect()
}

macro_rules! only {
    ($docs:expr, $variant:ident) => {{
        let v: Vec<_> = $docs
            .iter()
            .filter_map(|d| match &d.obj {
                Obj::$variant(o) => Some((**o).clone()),
                _ => None,
            })
            .collect();
        v
    }};
}

fn name_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or_default()
}

fn ns_of(m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or_default()
}

fn the_daemonset() -> DaemonSet {
    let docs = load();
    let ds = only!(base(&docs, ""), DaemonSet);
    assert_eq!(ds.len(), 1, "deploy/ holds one DaemonSet");
    ds.into_iter().next().unwrap()
}

fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec.template.spec.clone().expect("DaemonSet pod spec")
}

fn agent_container(ds: &DaemonSet) -> Container {
    let spec = pod_spec(ds);
    assert_eq!(spec.containers.len(), 1, "one container: the agent");
    spec.containers[0].clone()
}

fn args(c: &Container) -> Vec<String> {
    let mut a = c.command.clone().unwrap_or_default();
    a.extend(c.args.clone().unwrap_or_default());
    a
}

fn string_literal(s: &str) -> Option<String> {
    let a = s.find('"')?;
    let b = s[a + 1..].find('"')?;
    Some(s[a + 1..a + 1 + b].to_string())
}

// ---------------------------------------------------------------------------------------
// `lb-agent run`'s command line, parsed by the agent's own clap parser

/// `lb-agent run` as the agent's binary defines it: its [`RunArgs`]. The DaemonSet's args
/// go through this parser, so a flag the agent does not have, a value it rejects or a
/// missing required flag fails with clap's message, and the checks compare parsed values.
/// (`lb-agent`'s own global flags, such as `--log-format`, are not in `RunArgs`: add them
/// here if the DaemonSet ever passes one.)
#[derive(Debug, clap::Parser)]
#[command(name = "lb-agent run")]
struct AgentRun {
    #[command(flatten)]
    run: RunArgs,
    /// `--allow-cgroup-root`, which `lb-agent run` adds after `RunArgs` (main.rs).
    #[command(flatten)]
    cgroup: CgroupFlags,
}

/// Parses `run <flags>...` as `lb-agent` would. `$(VAR)` references (expanded by the
/// kubelet at start) stay as they are: plain strings to the parser.
fn parse_run_cmd(args: &[String]) -> Result<AgentRun, clap::Error> {
    let flags = args.strip_prefix(&["run".to_string()]).unwrap_or(args);
    AgentRun::try_parse_from(
        std::iter::once("lb-agent run").chain(flags.iter().map(String::as_str)),
    )
}

/// [`parse_run_cmd`]'s `RunArgs`.
fn parse_run(args: &[String]) -> Result<RunArgs, clap::Error> {
    parse_run_cmd(args).map(|a| a.run)
}

/// The agent container's args (which start with `run`), parsed.
fn run_args(c: &Container) -> RunArgs {
    let a = args(c);
    assert_eq!(
        a.first().map(String::as_str),
        Some("run"),
        "args start with `run`: {a:?}"
    );
    parse_run(&a).unwrap_or_else(|e| {
        panic!(
            "the DaemonSet runs `lb-agent {}`, which `lb-agent run` does not accept:\n{e}",
            a.join(" ")
        )
    })
}

/// The built agent, when it is newer than every source file (a stale binary proves nothing).
fn fresh_agent_binary() -> Option<PathBuf> {
    let bin = root().join("target/debug/lb-agent");
    let built = bin.metadata().and_then(|m| m.modified()).ok()?;
    let newest_src = newest_modified(&root().join("lb-agent/src"))?;
    (built >= newest_src).then_some(bin)
}

/// The latest modification time of any file below `dir` (module folders included).
fn newest_modified(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = e.metadata().ok()?;
            if meta.is_dir() {
                newest_modified(&e.path())
            } else {
                meta.modified().ok()
            }
        })
        .max()
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn every_document_is_a_typed_object_that_round_trips() {
    let docs = load();
    // Expected kinds are present at all (an emptied file would otherwise pass).
    assert!(!only!(docs, DaemonSet).is_empty());
    assert!(!only!(docs, ClusterRole).is_empty());
    assert!(!only!(docs, ReplicaSet).is_empty());
    assert!(!only!(docs, Job).is_empty());
    for d in &docs {
        let meta = match &d.obj {
            Obj::Namespace(o) => &o.metadata,
            Obj::ServiceAccount(o) => &o.metadata,
            Obj::ClusterRole(o) => &o.metadata,
            Obj::ClusterRoleBinding(o) => &o.metadata,
            Obj::DaemonSet(o) => &o.metadata,
            Obj::ReplicaSet(o) => &o.metadata,
            Obj::Deployment(o) => &o.metadata,
            Obj::Job(o) => &o.metadata,
            Obj::Service(o) => &o.metadata,
            Obj::MetalLb(v) => {
                let m = v.get("metadata").expect("metadata");
                assert!(str_at(m, "name").is_some(), "{}: no name", d.file.display());
                continue;
            }
        };
        assert!(
            !name_of(meta).is_empty(),
            "{}: an object without a name",
            d.file.display()
        );
    }
}

#[test]
fn kustomizations_list_exactly_the_files_beside_them() {
    let files = all_yaml_files();
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .filter(|p| !is_kind_config(p))
        .map(|p| p.parent().unwrap().to_owned())
        .collect();
    for dir in dirs {
        let k = dir.join("kustomization.yaml");
        assert!(
            k.is_file(),
            "{}: YAML without a kustomization.yaml",
            dir.display()
        );
        let docs = read_docs(&k);
        assert_eq!(docs.len(), 1, "{}: one document", k.display());
        let v = &docs[0];
        assert_eq!(
            str_at(v, "apiVersion"),
            Some("kustomize.config.k8s.io/v1beta1")
        );
        assert_eq!(str_at(v, "kind"), Some("Kustomization"));
        let listed: BTreeSet<String> = v
            .get("resources")
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("{}: no resources", k.display()))
            .iter()
            .map(|r| r.as_str().expect("resource is a path").to_string())
            .collect();
        for r in &listed {
            let p = dir.join(r);
            assert!(
                p.is_file() || p.join("kustomization.yaml").is_file(),
                "{}: lists {r}, which does not exist",
                k.display()
            );
        }
        let beside: BTreeSet<String> = files
            .iter()
            .filter(|p| p.parent() == Some(dir.as_path()) && !is_kustomization(p))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let unlisted: Vec<_> = beside.difference(&listed).collect();
        assert!(
            unlisted.is_empty(),
            "{}: does not list {unlisted:?}",
            k.display()
        );
        for (key, _) in v.as_mapping().unwrap() {
            let key = key.as_str().unwrap_or_default();
            assert!(
                ["apiVersion", "kind", "resources"].contains(&key),
                "{}: unexpected field {key} (extend this test)",
                k.display()
            );
        }
    }
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_network() {
    let ds = the_daemonset();
    assert_eq!(name_of(&ds.metadata), "xlb-agent");
    assert_eq!(ns_of(&ds.metadata), "xlb-system");
    let spec = &ds.spec;
    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.termination_grace_period_seconds.is_some_and(|s| s > 0),
        "terminationGracePeriodSeconds"
    );

    // Selector matches the template's labels.
    let labels = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.clone().unwrap_or_default() {
        assert_eq!(labels.get(&k), Some(&v), "selector {k}={v} not on the pods");
    }

    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|r| r.max_unavailable.clone()),
        Some(IntOrString::Int(1)),
        "rollingUpdate.maxUnavailable 1"
    );

    let tol = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tol.iter().any(
            |t| t.key.as_deref() == Some("node-role.kubernetes.io/control-plane")
                && t.effect.as_deref() == Some("NoSchedule")
                && t.operator.as_deref() == Some("Exists")
        ),
        "control-plane NoSchedule toleration: {tol:?}"
    );
    assert!(
        tol.iter().any(|t| t.key.is_none()
            && t.effect.is_none()
            && t.operator.as_deref() == Some("Exists")),
        "tolerate everything (operator Exists without key), as kube-proxy: {tol:?}"
    );

    let c = agent_container(&ds);
    let res = c.resources.as_ref().expect("resources");
    for (what, m) in [("requests", &res.requests), ("limits", &res.limits)] {
        let m = m.clone().unwrap_or_default();
        assert!(m.contains_key("memory"), "resources.{what}.memory");
        if what == "requests" {
            assert!(m.contains_key("cpu"), "resources.requests.cpu");
        }
    }
    assert_eq!(
        c.image.as_deref(),
        Some(xtask_image().as_str()),
        "the DaemonSet must run the image `cargo xtask kind` builds and loads"
    );
}

/// `IMAGE` in xtask/src/kind.rs.
fn xtask_image() -> String {
    let src = std::fs::read_to_string(root().join("xtask/src/kind.rs")).expect("kind.rs");
    let line = src
        .lines()
        .find(|l| l.contains("const IMAGE: &str"))
        .expect("IMAGE in xtask/src/kind.rs");
    string_literal(line).expect("IMAGE literal")
}

#[test]
fn daemonset_mounts_bpffs_cgroup_and_run_dir() {
    let ds = the_daemonset();
    let pod = pod_spec(&ds);
    let c = agent_container(&ds);
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path_of = |vol: &str| {
        volumes
            .iter()
            .find(|v| v.name == vol)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let mount_of = |host: &str| {
        mounts
            .iter()
            .find(|m| host_path_of(&m.name).as_deref() == Some(host))
            .cloned()
            .unwrap_or_else(|| panic!("no hostPath mount of {host}"))
    };

    let bpf = mount_of("/sys/fs/bpf");
    assert_eq!(
        bpf.mount_path, "/sys/fs/bpf",
        "pins are read at /sys/fs/bpf"
    );
    // Bidirectional propagation is only allowed for privileged containers; the host's
    // bpffs is mounted by the host, and HostToContainer shows one mounted later.
    assert_eq!(
        bpf.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "the host's bpffs, also when mounted after the pod started"
    );
    assert_ne!(bpf.read_only, Some(true), "the agent pins maps and links");

    let cg = mount_of("/sys/fs/cgroup");
    assert_ne!(
        cg.mount_path, "/sys/fs/cgroup",
        "the pod's own /sys/fs/cgroup is its cgroup namespace's subtree; mount the host's \
         elsewhere"
    );
    assert_eq!(
        run_args(&c).cgroup.as_deref(),
        Some(cg.mount_path.as_str()),
        "--cgroup must name the host cgroup2 mount"
    );
    assert_eq!(cg.read_only, Some(true), "attaching needs no write access");
    // On a real node the host's cgroup2 mount is the machine's root, which the agent
    // refuses without the flag that says it is the machine's load balancer.
    let a = parse_run_cmd(&args(&c)).expect("args parse");
    assert!(
        a.cgroup.allow_cgroup_root,
        "--allow-cgroup-root must go with --cgroup {}",
        cg.mount_path
    );

    let run = mount_of("/run/xlb");
    assert_eq!(
        run.mount_path, "/run/xlb",
        "`lb-agent status` reads /run/xlb/<node>"
    );
}

#[test]
fn daemonset_probes_use_the_metrics_port() {
    let ds = the_daemonset();
    let c = agent_container(&ds);
    // Given or the agent's default: the parsed value is what the agent listens on.
    let addr = run_args(&c).metrics_addr;
    assert_ne!(
        addr, "none",
        "the probes need the metrics server: --metrics-addr none turns it off"
    );
    let expected = addr
        .parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("--metrics-addr {addr:?}: not ADDR:PORT ({e})"))
        .port();
    let port_number = |p: &IntOrString| match p {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            c.ports
                .iter()
                .flatten()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("probe port {name:?} is not a container port"))
                .container_port
        }
    };
    let check = |what: &str, probe: &Option<Probe>, path: &str| {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what}: httpGet probe"));
        assert_eq!(get.path.as_deref(), Some(path), "{what} path");
        assert_eq!(
            port_number(&get.port),
            i32::from(expected),
            "{what} port must be the agent's metrics port"
        );
        assert!(
            get.host.is_none(),
            "{what}: no host (hostNetwork pod: the kubelet probes the node's address)"
        );
    };
    check("livenessProbe", &c.liveness_probe, "/healthz");
    check("readinessProbe", &c.readiness_probe, "/readyz");
}

#[test]
fn daemonset_args_are_flags_lb_agent_run_accepts() {
    let ds = the_daemonset();
    let c = agent_container(&ds);
    let a = args(&c);
    // Unknown or repeated flags, values the agent rejects and missing required flags fail
    // here, with clap's message.
    let run = run_args(&c);
    assert_eq!(
        parse_source(&run.source).unwrap_or_else(|e| panic!("{e}")),
        SourceSpec::Kube
    );
    assert_eq!(run.iface, "eth0", "a kind node's uplink");
    assert_eq!(run.node_name, "$(NODE_NAME)");
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"), "NODE_NAME");

    // The built binary agrees, when there is a fresh one.
    if let Some(bin) = fresh_agent_binary() {
        let out = Command::new(&bin)
            .args(["run", "--help"])
            .output()
            .expect("lb-agent run --help");
        assert!(out.status.success(), "lb-agent run --help failed");
        let help = String::from_utf8_lossy(&out.stdout);
        let used = a
            .iter()
            .filter(|w| w.starts_with("--"))
            .map(|w| w.split_once('=').map_or(w.as_str(), |(f, _)| f));
        for f in used {
            assert!(
                help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                    .any(|w| w == f),
                "`{} run --help` does not list {f}",
                bin.display()
            );
        }
    }
}

/// What the parse above catches, shown on the DaemonSet's own args: the check is only as
/// good as its failures.
#[test]
fn args_check_rejects_unknown_flags_bad_values_and_missing_flags() {
    use clap::error::ErrorKind;
    let a = args(&agent_container(&the_daemonset()));
    let with = |extra: &[&str]| {
        let mut v = a.clone();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let kind = |v: &[String]| parse_run(v).err().map(|e| e.kind());
    assert_eq!(kind(&a), None, "the DaemonSet's args parse");
    assert_eq!(
        kind(&with(&["--metrics-adr", "0.0.0.0:1"])),
        Some(ErrorKind::UnknownArgument)
    );
    assert_eq!(
        kind(&with(&["--drain-seconds", "ten"])),
        Some(ErrorKind::ValueValidation)
    );
    assert_eq!(
        kind(&with(&["--xdp-mode", "fast"])),
        Some(ErrorKind::InvalidValue)
    );
    assert_eq!(
        kind(&with(&["--iface", "eth1"])),
        Some(ErrorKind::ArgumentConflict)
    );
    let i = a.iter().position(|w| w == "--iface").expect("--iface");
    let mut without = a.clone();
    without.drain(i..i + 2);
    assert_eq!(kind(&without), Some(ErrorKind::MissingRequiredArgument));
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let docs = base(&load(), "");
    let roles = only!(docs, ClusterRole);
    assert_eq!(roles.len(), 1, "one ClusterRole in deploy/");
    let role = &roles[0];
    assert!(role.aggregation_rule.is_none(), "no aggregation");
    let mut granted = BTreeSet::new();
    for r in role.rules.iter().flatten() {
        assert!(
            r.non_resource_urls.is_none() && r.resource_names.is_none(),
            "no nonResourceURLs or resourceNames: {r:?}"
        );
        for g in r.api_groups.iter().flatten() {
            for res in r.resources.iter().flatten() {
                for v in &r.verbs {
                    assert!(
                        ![g, res, v].iter().any(|s| s.contains('*')),
                        "no wildcards: {r:?}"
                    );
                    granted.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    let mut want = BTreeSet::new();
    for (g, res, verbs) in [
        ("", "services", &["get", "list", "watch"][..]),
        ("", "services/status", &["patch"]),
        ("", "nodes", &["get", "list", "watch"]),
        (
            "discovery.k8s.io",
            "endpointslices",
            &["get", "list", "watch"],
        ),
        ("networking.k8s.io", "servicecidrs", &["list", "watch"]),
        ("metallb.io", "ipaddresspools", &["list", "watch"]),
        ("metallb.io", "l2advertisements", &["list", "watch"]),
        ("", "events", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ] {
        for v in verbs {
            want.insert((g.to_string(), res.to_string(), v.to_string()));
        }
    }
    assert_eq!(
        granted,
        want,
        "extra: {:?}; missing: {:?}",
        granted.difference(&want).collect::<Vec<_>>(),
        want.difference(&granted).collect::<Vec<_>>()
    );
}

#[test]
fn binding_gives_the_role_to_the_daemonsets_service_account() {
    let docs = base(&load(), "");
    let ds = only!(docs, DaemonSet).pop().expect("DaemonSet");
    let sa_name = pod_spec(&ds)
        .service_account_name
        .expect("serviceAccountName");
    let ns = ns_of(&ds.metadata).to_string();
    assert!(
        only!(docs, Namespace)
            .iter()
            .any(|n| name_of(&n.metadata) == ns),
        "deploy/ creates the namespace {ns}"
    );
    assert!(
        only!(docs, ServiceAccount)
            .iter()
            .any(|s| name_of(&s.metadata) == sa_name && ns_of(&s.metadata) == ns),
        "ServiceAccount {ns}/{sa_name} exists"
    );
    let role = only!(docs, ClusterRole).pop().expect("ClusterRole");
    let bindings = only!(docs, ClusterRoleBinding);
    assert_eq!(bindings.len(), 1);
    let b = &bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(
        b.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(b.role_ref.name, name_of(&role.metadata));
    let subjects = b.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, sa_name);
    assert_eq!(subjects[0].namespace.as_deref(), Some(ns.as_str()));
    // Every namespaced object of the base lives in the agent's namespace.
    for d in &docs {
        let m = match &d.obj {
            Obj::ServiceAccount(o) => &o.metadata,
            Obj::DaemonSet(o) => &o.metadata,
            _ => continue,
        };
        assert_eq!(ns_of(m), ns, "{}", d.file.display());
    }
}

#[test]
fn examples_hold_the_seed_articles_objects() {
    let docs = load();
    let ex = base(&docs, "examples");
    assert!(
        only!(ex, Namespace)
            .iter()
            .any(|n| name_of(&n.metadata) == "dev"),
        "namespace dev"
    );

    let services = only!(ex, Service);
    let svc = |name: &str| {
        services
            .iter()
            .find(|s| name_of(&s.metadata) == name && ns_of(&s.metadata) == "dev")
            .unwrap_or_else(|| panic!("Service dev/{name}"))
            .spec
            .clone()
            .expect("spec")
    };
    let nginx = svc("nginx-service");
    assert_eq!(nginx.type_.as_deref(), Some("LoadBalancer"));
    let ports = nginx.ports.clone().unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, 80);
    assert_eq!(ports[0].protocol.as_deref(), Some("TCP"));
    let selector = nginx.selector.clone().unwrap_or_default();
    assert_eq!(selector.get("app").map(String::as_str), Some("nginx"));
    // The node-port check xtask prints uses this port.
    let kind_rs = std::fs::read_to_string(root().join("xtask/src/kind.rs")).unwrap();
    let node_port = ports[0]
        .node_port
        .expect("nodePort fixed for the printed check");
    assert!(
        kind_rs.contains(&format!("NGINX_NODE_PORT: u16 = {node_port};")),
        "xtask/src/kind.rs prints the NodePort check with another port than {node_port}"
    );

    let ext = svc("my-external-service");
    assert_eq!(ext.type_.as_deref(), Some("ExternalName"));
    assert_eq!(ext.external_name.as_deref(), Some("example.com"));

    let rs = only!(ex, ReplicaSet);
    assert_eq!(rs.len(), 1);
    let rs = &rs[0];
    assert_eq!(ns_of(&rs.metadata), "dev");
    let spec = &rs.spec;
    assert_eq!(spec.replicas, Some(3), "the seed's 3 replicas");
    let tmpl = spec.template.as_ref().expect("template");
    let pod_labels = tmpl
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in &selector {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "nginx-service's selector must match the pods"
        );
    }
    for (k, v) in spec.selector.match_labels.clone().unwrap_or_default() {
        assert_eq!(pod_labels.get(&k), Some(&v), "ReplicaSet selector");
    }
    let pod = tmpl.spec.as_ref().unwrap();
    let target = match ports[0].target_port.clone() {
        Some(IntOrString::Int(n)) => n,
        other => panic!("targetPort {other:?}"),
    };
    assert!(
        pod.containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .any(|p| p.container_port == target),
        "a container listens on targetPort {target}"
    );
    // The page is the pod's name: POD_NAME from the downward API, written by a command.
    let all: Vec<&Container> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .collect();
    assert!(
        all.iter().any(|c| {
            let pod_name = c.env.iter().flatten().any(|e| {
                e.name == "POD_NAME"
                    && e.value_from
                        .as_ref()
                        .and_then(|v| v.field_ref.as_ref())
                        .is_some_and(|f| f.field_path == "metadata.name")
            });
            pod_name && args(c).join(" ").contains("$POD_NAME")
        }),
        "a container writes $POD_NAME (metadata.name) into the page"
    );

    // MetalLB as in the seed.
    let metallb: Vec<Value> = docs
        .iter()
        .filter_map(|d| match &d.obj {
            Obj::MetalLb(v) => Some(v.clone()),
            _ => None,
        })
        .collect();
    let pool = metallb
        .iter()
        .find(|v| str_at(v, "kind") == Some("IPAddressPool"))
        .expect("IPAddressPool");
    assert_eq!(
        pool.get("metadata").and_then(|m| str_at(m, "namespace")),
        Some("metallb-system")
    );
    let ranges = pool
        .get("spec")
        .and_then(|s| s.get("addresses"))
        .and_then(Value::as_sequence)
        .expect("spec.addresses");
    assert_eq!(
        ranges.len(),
        1,
        "one range (xtask moves it into the kind subnet)"
    );
    let (a, b) = ranges[0]
        .as_str()
        .and_then(|r| r.split_once('-'))
        .expect("a-b range");
    let (a, b): (Ipv4Addr, Ipv4Addr) = (a.parse().unwrap(), b.parse().unwrap());
    assert!(a <= b && a.octets()[..2] == [172, 18] && b.octets()[..2] == [172, 18]);
    assert!(
        metallb
            .iter()
            .any(|v| str_at(v, "kind") == Some("L2Advertisement")
                && v.get("metadata").and_then(|m| str_at(m, "namespace"))
                    == Some("metallb-system")),
        "L2Advertisement"
    );
}

#[test]
fn bench_runs_iperf3_through_nodeport_and_loadbalancer() {
    let docs = load();
    let bench: Vec<Doc> = docs
        .iter()
        .filter(|d| d.file.starts_with("bench"))
        .cloned()
        .collect();
    let deps = only!(bench, Deployment);
    assert_eq!(deps.len(), 1);
    let dep = &deps[0];
    let dspec = &dep.spec;
    let labels = dspec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let server = &dspec.template.spec.as_ref().unwrap().containers[0];
    let server_ports: Vec<_> = server.ports.clone().unwrap_or_default();
    let services = only!(bench, Service);
    let mut types = BTreeSet::new();
    let mut node_port = None;
    for s in &services {
        assert_eq!(ns_of(&s.metadata), ns_of(&dep.metadata));
        let spec = s.spec.as_ref().unwrap();
        for (k, v) in spec.selector.clone().unwrap_or_default() {
            assert_eq!(
                labels.get(&k),
                Some(&v),
                "{} selects the servers",
                name_of(&s.metadata)
            );
        }
        for p in spec.ports.iter().flatten() {
            let ok = match &p.target_port {
                Some(IntOrString::String(n)) => {
                    server_ports.iter().any(|sp| sp.name.as_deref() == Some(n))
                }
                Some(IntOrString::Int(n)) => server_ports.iter().any(|sp| sp.container_port == *n),
                None => server_ports.iter().any(|sp| sp.container_port == p.port),
            };
            assert!(ok, "{}: targetPort reaches iperf3", name_of(&s.metadata));
            if spec.type_.as_deref() == Some("NodePort") {
                node_port = p.node_port;
            }
        }
        types.insert(spec.type_.clone().unwrap_or_default());
    }
    assert!(
        types.contains("NodePort") && types.contains("LoadBalancer"),
        "{types:?}"
    );

    let jobs = only!(bench, Job);
    assert_eq!(jobs.len(), 1);
    let job = jobs[0].spec.as_ref().unwrap();
    let pod = job.template.spec.as_ref().unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let c = &pod.containers[0];
    let script = args(c).join(" ");
    assert!(script.contains("iperf3"), "the client runs iperf3");
    let node_port = node_port.expect("NodePort has a fixed nodePort");
    assert!(
        script.contains(&node_port.to_string()),
        "the client uses NodePort {node_port}"
    );
    let env: BTreeMap<_, _> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.clone()))
        .collect();
    assert!(
        env.get("LB_ADDR").is_some_and(|e| e.value.is_some()),
        "LB_ADDR with a `value:` (cargo xtask kind bench fills it in)"
    );
    assert!(script.contains("$LB_ADDR") && script.contains("$HOST_IP"));
}

#[test]
fn kind_config_is_the_seed_cluster_without_kube_proxy() {
    let docs = read_docs(&deploy().join("kind/cluster.yaml"));
    assert_eq!(docs.len(), 1);
    let c = &docs[0];
    assert_eq!(str_at(c, "apiVersion"), Some("kind.x-k8s.io/v1alpha4"));
    assert_eq!(str_at(c, "kind"), Some("Cluster"));
    assert_eq!(str_at(c, "name"), Some("service-demo"));
    assert_eq!(
        c.get("networking").and_then(|n| str_at(n, "kubeProxyMode")),
        Some("none")
    );
    let roles: Vec<&str> = c
        .get("nodes")
        .and_then(Value::as_sequence)
        .expect("nodes")
        .iter()
        .map(|n| str_at(n, "role").unwrap_or_default())
        .collect();
    assert_eq!(roles, ["control-plane", "worker", "worker"]);
}

#[test]
fn containerfile_builds_the_agent_with_the_ebpf_toolchain() {
    let cf = std::fs::read_to_string(deploy().join("Containerfile")).expect("deploy/Containerfile");
    let from: Vec<&str> = cf.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(from.len() >= 2, "multi-stage: {from:?}");
    for needle in [
        "rust-src",
        "llvm-22-dev",
        "bpf-linker --version 0.13",
        "--features llvm-22",
        "LLVM_SYS_221_PREFIX=/usr/lib/llvm-22",
        "-p lb-agent",
        "ENTRYPOINT [\"/usr/local/bin/lb-agent\"]",
    ] {
        assert!(cf.contains(needle), "deploy/Containerfile lacks {needle:?}");
    }
    // Every workspace member is copied in (cargo needs all members' manifests).
    let ws = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let members = ws
        .lines()
        .find(|l| l.starts_with("members"))
        .expect("workspace members");
    for m in members.split('"').skip(1).step_by(2) {
        assert!(
            cf.lines().any(|l| l.trim() == format!("COPY {m} {m}")),
            "deploy/Containerfile does not copy workspace member {m}"
        );
    }
    // The runtime stage (after the last FROM) carries only the agent.
    let last = cf.rfind("\nFROM ").unwrap();
    let runtime = &cf[last..];
    assert!(runtime.contains("--from=builder"));
    assert!(
        !runtime.contains("cargo"),
        "no toolchain in the runtime stage"
    );
}

// ---------------------------------------------------------------------------------------
// Hardening: the DaemonSet's privileges, and the rendered manifests through
// kubernetes-validate --strict and checkov

/// The capabilities the agent may be given, each for a reason the DaemonSet's comment
/// states. tests/tests/e2e_hardening.rs runs the agent with exactly the DaemonSet's list.
const ALLOWED_CAPS: [&str; 4] = ["BPF", "NET_ADMIN", "PERFMON", "NET_RAW"];

#[test]
fn daemonset_is_unprivileged_with_only_the_capabilities_it_lists() {
    let ds = the_daemonset();
    let pod = pod_spec(&ds);
    let c = agent_container(&ds);
    let sc = c
        .security_context
        .clone()
        .expect("container securityContext");
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "drop ALL first");
    let add = caps.add.clone().unwrap_or_default();
    assert!(!add.is_empty(), "the datapath needs capabilities");
    for cap in &add {
        assert!(
            ALLOWED_CAPS.contains(&cap.as_str()),
            "capability {cap} is not one the agent needs ({ALLOWED_CAPS:?})"
        );
    }
    // Each added capability is explained where it is granted.
    let text = std::fs::read_to_string(deploy().join("daemonset.yaml")).unwrap();
    for cap in &add {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("#   {cap} "))),
            "daemonset.yaml: no comment line `#   {cap} <why>`"
        );
    }
    for (what, profile) in [
        (
            "pod",
            pod.security_context
                .as_ref()
                .and_then(|s| s.seccomp_profile.clone()),
        ),
        ("container", sc.seccomp_profile.clone()),
    ] {
        assert_eq!(
            profile.map(|p| p.type_).as_deref(),
            Some("RuntimeDefault"),
            "{what} seccompProfile"
        );
    }
    // Fixed image: a tag that is neither empty nor latest, never pulled behind our back.
    let image = c.image.clone().expect("image");
    let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
    assert!(
        !tag.is_empty() && tag != "latest" && !tag.contains('/'),
        "image {image}: pin a tag (or digest)"
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
    // With a read-only root, what the agent writes must be mounted: its run directory and
    // the pins.
    let mounts: BTreeSet<String> = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.read_only != Some(true))
        .map(|m| m.mount_path.clone())
        .collect();
    for dir in ["/run/xlb", "/sys/fs/bpf"] {
        assert!(mounts.contains(dir), "{dir} must be a writable mount");
    }
}

/// The Python tools (kubernetes-validate, checkov) that `cargo xtask setup` installs into
/// its venv (xtask/src/setup.rs), or `XLB_PYTOOLS`. None: not installed, and the test
/// skips (a failure instead with `XLB_REQUIRE_PRIVILEGED=1`, set by CI and on a prepared
/// machine, as for the privileged tests).
fn pytool(name: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("XLB_PYTOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/xlb-pytools"));
    let bin = venv.join("bin").join(name);
    if bin.is_file() {
        return Some(bin);
    }
    let msg = format!(
        "{} missing: run `cargo xtask setup` (installs kubernetes-validate and checkov into {})",
        bin.display(),
        venv.display()
    );
    if std::env::var("XLB_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIP: {msg}");
    None
}

/// The YAML a kustomization renders, as `kubectl kustomize` would (its files, in order,
/// as documents): the kustomizations hold nothing but `resources`
/// ([`kustomizations_list_exactly_the_files_beside_them`]), so that is all they render.
/// Comments are kept, which is what kustomize drops.
fn render(dir: &Path) -> String {
    let k = read_docs(&dir.join("kustomization.yaml"));
    let mut out = String::new();
    for r in k[0]
        .get("resources")
        .and_then(Value::as_sequence)
        .expect("resources")
    {
        let p = dir.join(r.as_str().expect("resource path"));
        if p.is_dir() {
            out.push_str(&render(&p));
        } else {
            let text = std::fs::read_to_string(&p).expect("resource");
            out.push_str("---\n");
            out.push_str(&text);
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}

/// Writes `yaml` to a fresh file named after `what` and returns its path.
fn temp_manifest(what: &str, yaml: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("xlb-manifests-{}-{what}.yaml", std::process::id()));
    std::fs::write(&p, yaml).expect("write rendered manifest");
    p
}

#[test]
fn rendered_manifests_pass_kubernetes_validate_strict() {
    let Some(tool) = pytool("kubernetes-validate") else {
        return;
    };
    for base in ["", "examples", "bench"] {
        let yaml = render(&deploy().join(base));
        let file = temp_manifest(if base.is_empty() { "agent" } else { base }, &yaml);
        let out = Command::new(&tool)
            .arg("--strict")
            .arg(&file)
            .output()
            .expect("running kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&file);
        assert!(
            out.status.success(),
            "kubernetes-validate --strict failed on deploy/{base}:\n{text}"
        );
        // It checked something: one `passed` line per built-in object.
        assert!(text.contains("passed for resource"), "{text}");
    }
}

/// checkov's JSON summary and (check id, skip reason) lists for `file`.
fn checkov(tool: &Path, file: &Path) -> (serde_json::Value, Vec<String>, Vec<(String, String)>) {
    let out = Command::new(tool)
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "-o",
            "json",
            "-f",
        ])
        .arg(file)
        // No calls home (the machines may have no Internet access).
        .env("BC_SKIP_MAPPING", "TRUE")
        .output()
        .expect("running checkov");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "checkov printed no JSON ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    // One framework: one report (a list when several).
    let report = match report {
        serde_json::Value::Array(mut v) => v.remove(0),
        r => r,
    };
    let ids = |key: &str| -> Vec<serde_json::Value> {
        report["results"][key]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let failed = ids("failed_checks")
        .iter()
        .map(|c| {
            format!(
                "{} {} ({})",
                c["check_id"].as_str().unwrap_or_default(),
                c["check_name"].as_str().unwrap_or_default(),
                c["resource"].as_str().unwrap_or_default()
            )
        })
        .collect();
    let skipped = ids("skipped_checks")
        .iter()
        .map(|c| {
            (
                c["check_id"].as_str().unwrap_or_default().to_string(),
                c["check_result"]["suppress_comment"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    (report["summary"].clone(), failed, skipped)
}

#[test]
fn rendered_agent_manifests_pass_checkov_with_every_exception_explained() {
    let Some(tool) = pytool("checkov") else {
        return;
    };
    let yaml = render(&deploy());
    let file = temp_manifest("checkov", &yaml);
    let (summary, failed, skipped) = checkov(&tool, &file);
    assert!(
        failed.is_empty(),
        "checkov findings on deploy/ (fix them, or explain one with a checkov.io/skipN \
         annotation and a comment on the DaemonSet):\n{}",
        failed.join("\n")
    );
    // It ran: every object parsed, the DaemonSet's checks among them.
    assert!(
        summary["resource_count"].as_u64().unwrap_or(0) >= 5,
        "{summary}"
    );
    assert!(summary["passed"].as_u64().unwrap_or(0) >= 50, "{summary}");
    for (id, why) in &skipped {
        assert!(
            why.len() >= 30,
            "checkov check {id} is skipped without a real reason: {why:?}"
        );
    }
    // The exceptions are exactly the findings checkov reports without them: none is
    // stale, and the check above is one that fails.
    let bare: String = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with("checkov.io/skip"))
        .map(|l| format!("{l}\n"))
        .collect();
    let bare_file = temp_manifest("checkov-bare", &bare);
    let (_, bare_failed, bare_skipped) = checkov(&tool, &bare_file);
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&bare_file);
    assert!(bare_skipped.is_empty(), "{bare_skipped:?}");
    let mut found: Vec<String> = bare_failed
        .iter()
        .map(|f| f.split(' ').next().unwrap_or_default().to_string())
        .collect();
    found.sort();
    found.dedup();
    let mut excused: Vec<String> = skipped.iter().map(|(id, _)| id.clone()).collect();
    excused.sort();
    excused.dedup();
    assert_eq!(found, excused, "skip annotations vs. findings without them");
}
