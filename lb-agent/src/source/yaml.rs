//! Reading Services and EndpointSlices (and the Nodes and ServiceCIDRs the translation
//! consults, and MetalLB's `IPAddressPool`s and `L2Advertisement`s the LoadBalancer address
//! assignment uses) from YAML text.
//!
//! Accepts what people actually have at hand: a multi-document manifest set (`---`
//! separated, other kinds mixed in) or the output of
//! `kubectl get svc,endpointslices -A -o yaml` (`kind: List`, possibly nested, and typed lists
//! such as `ServiceList` whose items may omit `apiVersion`/`kind`).
//!
//! Parsing a file is all-or-nothing: the first problem is returned and the caller keeps its
//! previous state, so a half-edited file never leaves a half-programmed datapath.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_yaml::{Mapping, Value};

use super::metallb::{self, AddrRange, IpAddressPool, L2Advertisement, METALLB_API_VERSION};
use crate::model::slice::Slice;

/// Label tying an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services carrying this label belong to another proxy implementation (as for kube-proxy).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

pub const SERVICE_API_VERSION: &str = "v1";
pub const ENDPOINT_SLICE_API_VERSION: &str = "discovery.k8s.io/v1";
pub const NODE_API_VERSION: &str = "v1";
pub const SERVICE_CIDR_API_VERSION: &str = "networking.k8s.io/v1";

/// Objects in file order. Namespaces of Services and EndpointSlices are filled in (`default`
/// when the manifest has none), and EndpointSlices of address types other than IPv4 are
/// dropped. Nodes and ServiceCIDRs are cluster-scoped: they carry no namespace.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// Shared: the kube source's watcher store, its snapshots and the translation hold
    /// the same objects (a Service is ~2 KiB as the API type).
    pub services: Vec<Arc<Service>>,
    /// As the translation reads them ([`Slice`]), validated as API objects first; shared
    /// as the Services are.
    pub slices: Vec<Arc<Slice>>,
    /// Node objects (the agent uses its own: zone label for topology, deletion for
    /// `/healthz` on the node health port).
    pub nodes: Vec<Node>,
    /// ServiceCIDR objects (`networking.k8s.io/v1`): the service address ranges, next to
    /// `--service-cidr`; addresses inside them that no Service holds are dropped.
    pub service_cidrs: Vec<ServiceCIDR>,
    /// MetalLB `IPAddressPool`s (`metallb.io/v1beta1`), addresses validated: every entry a
    /// CIDR or range, none overlapping another (in this pool or another), names unique.
    pub ip_pools: Vec<IpAddressPool>,
    /// MetalLB `L2Advertisement`s (`metallb.io/v1beta1`), selectors validated.
    pub l2_adverts: Vec<L2Advertisement>,
    /// Set by the kube source: which Services and EndpointSlices changed between its
    /// recent snapshots, so that a consumer that saw an earlier one can handle only
    /// those ([`crate::source::kube::ChangeLog`]). The lists above are complete whatever
    /// this says.
    pub changes: Option<std::sync::Arc<crate::source::kube::ChangeLog>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("document {doc}: invalid YAML: {msg}")]
    Yaml { doc: usize, msg: String },
    /// The document is not shaped like a Kubernetes object or list.
    #[error("document {doc}: {msg}")]
    Document { doc: usize, msg: String },
    /// `object` is e.g. "Service dev/nginx"; `field` a path such as `spec.ports[0].port`.
    #[error("{object}: {field}: {msg}")]
    Invalid {
        object: String,
        field: String,
        msg: String,
    },
}

/// Parses every YAML document of `text` and validates the Services, EndpointSlices, Nodes,
/// ServiceCIDRs, IPAddressPools and L2Advertisements in it (other kinds are skipped, as are
/// `IPAddressPool`/`L2Advertisement` kinds of API groups other than `metallb.io`).
pub fn parse_objects(text: &str) -> Result<Objects, ParseError> {
    Ok(parse_with(text, Parser::default())?.out)
}

/// The EndpointSlices of `text` as API objects, read and checked as [`parse_objects`]
/// reads them (which keeps only what the translation uses): for tools that hand a
/// manifest's objects on, such as the tests' API server stand-in.
pub fn parse_api_slices(text: &str) -> Result<Vec<EndpointSlice>, ParseError> {
    let p = Parser {
        api_slices: Some(Vec::new()),
        ..Parser::default()
    };
    Ok(parse_with(text, p)?.api_slices.unwrap_or_default())
}

fn parse_with(text: &str, mut p: Parser) -> Result<Parser, ParseError> {
    if let Some(values) = json_values(text) {
        for (i, value) in values.into_iter().enumerate() {
            p.walk(value, i + 1, None)?;
        }
        return Ok(p);
    }
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value: Value = serde::Deserialize::deserialize(de).map_err(|e| ParseError::Yaml {
            doc,
            msg: e.to_string(),
        })?;
        p.walk(value, doc, None)?;
    }
    Ok(p)
}

/// `text` as JSON values (one or more, as `kubectl get -o json` writes them), or None when
/// it is not JSON. JSON is YAML, but a JSON reader is several times faster than the YAML
/// one (a 10,000-Service list: ~0.2 s instead of ~1 s), so JSON input takes it; anything
/// that is not valid JSON goes through the YAML reader, whose errors name the document.
fn json_values(text: &str) -> Option<Vec<Value>> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .ok()
}

#[derive(Default)]
struct Parser {
    out: Objects,
    seen: Seen,
    /// Pool name -> namespace: Services name pools without a namespace.
    seen_pools: HashMap<String, String>,
    /// Every pool's address entries so far: (pool, index in spec.addresses, range).
    pool_ranges: Vec<(String, usize, AddrRange)>,
    /// Some: the EndpointSlices are also kept as API objects ([`parse_api_slices`]).
    api_slices: Option<Vec<EndpointSlice>>,
}

/// Names seen per kind, as [`Doc::once`] records them.
#[derive(Default)]
struct Seen {
    services: HashSet<(String, String)>,
    slices: HashSet<(String, String)>,
    nodes: HashSet<(String, String)>,
    cidrs: HashSet<(String, String)>,
    l2: HashSet<(String, String)>,
}

/// `apiVersion` and `kind` a typed list (`ServiceList`) implies for items that omit them.
type Implied = Option<(String, String)>;

impl Parser {
    fn walk(&mut self, value: Value, doc: usize, implied: Implied) -> Result<(), ParseError> {
        let mut map = match value {
            Value::Null => return Ok(()),
            Value::Mapping(m) => m,
            // `!Tag` wrappers carry no meaning for Kubernetes objects.
            Value::Tagged(t) => return self.walk(t.value, doc, implied),
            other => {
                return Err(ParseError::Document {
                    doc,
                    msg: format!(
                        "expected a Kubernetes object (a mapping), found {}",
                        value_kind(&other)
                    ),
                });
            }
        };
        let (implied_api, implied_kind) = implied.unzip();
        let api_version = str_field(&map, "apiVersion").or(implied_api);
        let Some(kind) = str_field(&map, "kind").or(implied_kind) else {
            return Err(ParseError::Document {
                doc,
                msg: "object has no kind".into(),
            });
        };

        if let Some(items) = list_items(&mut map, &kind) {
            let item_implied = kind
                .strip_suffix("List")
                .filter(|k| !k.is_empty())
                .zip(api_version.clone())
                .map(|(k, a)| (a, k.to_string()));
            return match items {
                Value::Null => Ok(()),
                Value::Sequence(items) => {
                    for item in items {
                        self.walk(item, doc, item_implied.clone())?;
                    }
                    Ok(())
                }
                other => Err(ParseError::Document {
                    doc,
                    msg: format!(
                        "{kind}.items: expected a list, found {}",
                        value_kind(&other)
                    ),
                }),
            };
        }

        // Deserialised from a reference to the whole value: no copy of the mapping.
        let map = &Value::Mapping(map);
        let (v, out, seen) = (api_version.as_deref(), &mut self.out, &mut self.seen);
        match kind.as_str() {
            "Service" => keep(&SERVICE, map, v, &mut seen.services, &mut out.services),
            "EndpointSlice" => self.slice(map, v),
            "Node" => keep(&NODE, map, v, &mut seen.nodes, &mut out.nodes),
            "ServiceCIDR" => keep(&CIDR, map, v, &mut seen.cidrs, &mut out.service_cidrs),
            "IPAddressPool" if is_metallb(v) => self.ip_pool(map, v),
            "L2Advertisement" if is_metallb(v) => {
                keep(&L2_ADVERT, map, v, &mut seen.l2, &mut out.l2_adverts)
            }
            _ => Ok(()),
        }
    }

    fn slice(&mut self, map: &Value, api_version: Option<&str>) -> Result<(), ParseError> {
        let (doc, slice) = read(&ENDPOINT_SLICE, map, api_version)?;
        match slice.address_type.as_str() {
            "IPv4" => {}
            // Not errors: dual-stack clusters have them, and we only serve IPv4.
            "IPv6" | "FQDN" => return Ok(()),
            other => {
                return Err(doc.err(
                    "addressType",
                    format!("{other:?} is not one of IPv4, IPv6, FQDN"),
                ));
            }
        }
        (ENDPOINT_SLICE.validate)(&slice).map_err(|e| doc.invalid(e))?;
        // Slices created from a manifest may have only generateName; those cannot collide.
        doc.once(&mut self.seen.slices)?;
        self.out.slices.push(Arc::new(Slice::from_api(&slice)));
        if let Some(api) = &mut self.api_slices {
            api.push(slice);
        }
        Ok(())
    }

    fn ip_pool(&mut self, map: &Value, api_version: Option<&str>) -> Result<(), ParseError> {
        let (doc, pool) = read(&IP_POOL, map, api_version)?;
        let ranges = metallb::validate_pool(&pool).map_err(|e| doc.invalid(e))?;
        // Never empty: `read` requires the name of this kind.
        let name = doc.name.clone().unwrap_or_default();
        match self.seen_pools.get(&name) {
            Some(ns) if *ns == doc.namespace => return Err(doc.twice()),
            Some(ns) => {
                return Err(doc.err(
                    "metadata.name",
                    format!(
                        "an IPAddressPool of this name is in namespace {ns:?}: pool names must \
                         be unique (Services name pools without a namespace)"
                    ),
                ));
            }
            None => {}
        }
        // As MetalLB's webhook: no address in two pools.
        for (i, r) in ranges.iter().enumerate() {
            if let Some((other, j, _)) = self.pool_ranges.iter().find(|(_, _, o)| o.overlaps(r)) {
                return Err(doc.err(
                    &format!("spec.addresses[{i}]"),
                    format!(
                        "{:?} overlaps spec.addresses[{j}] of IPAddressPool {other}",
                        pool.spec.addresses[i]
                    ),
                ));
            }
        }
        self.pool_ranges.extend(
            ranges
                .into_iter()
                .enumerate()
                .map(|(i, r)| (name.clone(), i, r)),
        );
        self.seen_pools.insert(name, doc.namespace);
        self.out.ip_pools.push(pool);
        Ok(())
    }
}

/// Reads `map` as a `kind` object ([`read`]), checks it with its `validate` and adds it to
/// `out`, unless its name is in `seen` already (an error).
fn keep<T: Object, U: From<T>>(
    kind: &Kind<T>,
    map: &Value,
    api_version: Option<&str>,
    seen: &mut HashSet<(String, String)>,
    out: &mut Vec<U>,
) -> Result<(), ParseError> {
    let (doc, object) = read(kind, map, api_version)?;
    (kind.validate)(&object).map_err(|e| doc.invalid(e))?;
    doc.once(seen)?;
    out.push(object.into());
    Ok(())
}

/// The kinds read here: deserialisable, with metadata whose namespace [`read`] sets.
trait Object: serde::de::DeserializeOwned {
    fn metadata_mut(&mut self) -> &mut ObjectMeta;
}

macro_rules! impl_object {
    ($($t:ty),+) => {
        $(impl Object for $t {
            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        })+
    };
}

impl_object!(
    Service,
    EndpointSlice,
    Node,
    ServiceCIDR,
    IpAddressPool,
    L2Advertisement
);

/// What reading an object of one kind needs to know of the kind.
struct Kind<T> {
    /// The kind, first word of the objects' names in errors ("Service dev/nginx").
    name: &'static str,
    api_version: &'static str,
    /// Namespaced kinds get their namespace (`default` when the manifest has none);
    /// cluster-scoped ones lose any the manifest gives.
    namespaced: bool,
    /// `metadata.name` is required (EndpointSlices may have only `generateName`).
    name_required: bool,
    /// Names the field that broke a failed deserialisation.
    blame: Blame,
    /// Checks the fields the agent relies on (after deserialisation).
    validate: fn(&T) -> Result<(), FieldError>,
}

impl<T> Kind<T> {
    /// A namespaced kind whose objects need a name.
    const fn namespaced(name: &'static str, api_version: &'static str, blame: Blame) -> Self {
        Self {
            name,
            api_version,
            namespaced: true,
            name_required: true,
            blame,
            validate: |_| Ok(()),
        }
    }

    /// A cluster-scoped kind whose objects need a name.
    const fn cluster(name: &'static str, api_version: &'static str, blame: Blame) -> Self {
        Self {
            namespaced: false,
            ..Self::namespaced(name, api_version, blame)
        }
    }

    /// The kind with `validate` as its check.
    const fn validated(self, validate: fn(&T) -> Result<(), FieldError>) -> Self {
        Self { validate, ..self }
    }
}

type Blame = fn(&Mapping) -> Option<FieldError>;

const SERVICE: Kind<Service> =
    Kind::namespaced("Service", SERVICE_API_VERSION, blame_service).validated(validate_service);
const ENDPOINT_SLICE: Kind<EndpointSlice> = Kind {
    name_required: false,
    ..Kind::namespaced("EndpointSlice", ENDPOINT_SLICE_API_VERSION, blame_slice)
        .validated(validate_slice)
};
const NODE: Kind<Node> = Kind::cluster("Node", NODE_API_VERSION, blame_node);
const CIDR: Kind<ServiceCIDR> =
    Kind::cluster("ServiceCIDR", SERVICE_CIDR_API_VERSION, blame_service_cidr)
        .validated(validate_service_cidr);
/// Validated by [`Parser::ip_pool`] (which needs the ranges).
const IP_POOL: Kind<IpAddressPool> =
    Kind::namespaced("IPAddressPool", METALLB_API_VERSION, blame_ip_pool);
const L2_ADVERT: Kind<L2Advertisement> =
    Kind::namespaced("L2Advertisement", METALLB_API_VERSION, blame_l2)
        .validated(metallb::validate_l2);

/// The object being read: its names, and how its errors name it.
struct Doc {
    /// Such as "Service dev/nginx" or "Node n1" (`<unnamed>` without a name).
    object: String,
    namespaced: bool,
    /// `metadata.namespace`, `default` when none (even for cluster-scoped kinds).
    namespace: String,
    name: Option<String>,
}

impl Doc {
    fn new<T>(kind: &Kind<T>, map: &Mapping) -> Self {
        let (namespace, name) = meta_names(map);
        let shown = name.as_deref().unwrap_or("<unnamed>");
        let object = if kind.namespaced {
            format!("{} {namespace}/{shown}", kind.name)
        } else {
            format!("{} {shown}", kind.name)
        };
        Self {
            object,
            namespaced: kind.namespaced,
            namespace,
            name,
        }
    }

    fn err(&self, field: &str, msg: String) -> ParseError {
        ParseError::Invalid {
            object: self.object.clone(),
            field: field.into(),
            msg,
        }
    }

    fn invalid(&self, (field, msg): FieldError) -> ParseError {
        self.err(&field, msg)
    }

    fn twice(&self) -> ParseError {
        self.err(
            "metadata.name",
            "defined more than once in this file".into(),
        )
    }

    /// What the object's `metadata.namespace` becomes: None for cluster-scoped kinds.
    fn meta_namespace(&self) -> Option<String> {
        self.namespaced.then(|| self.namespace.clone())
    }

    /// Records the object in `seen` (namespace, empty for cluster-scoped kinds, and name);
    /// an error if it is there already. An object without a name cannot collide.
    fn once(&self, seen: &mut HashSet<(String, String)>) -> Result<(), ParseError> {
        let Some(name) = &self.name else {
            return Ok(());
        };
        let namespace = self.meta_namespace().unwrap_or_default();
        if seen.insert((namespace, name.clone())) {
            Ok(())
        } else {
            Err(self.twice())
        }
    }
}

/// Reads `map` as an object of `kind`: the apiVersion checked, then the name when required,
/// then deserialised (a failure blamed on the field that caused it) and the namespace set
/// ([`Doc::meta_namespace`]).
fn read<T: Object>(
    kind: &Kind<T>,
    value: &Value,
    api_version: Option<&str>,
) -> Result<(Doc, T), ParseError> {
    let map = value.as_mapping().expect("objects are mappings (walk)");
    let doc = Doc::new(kind, map);
    check_api_version(api_version, kind.api_version).map_err(|m| doc.err("apiVersion", m))?;
    if kind.name_required && doc.name.is_none() {
        return Err(doc.err("metadata.name", "required".into()));
    }
    let mut object: T = T::deserialize(value).map_err(|e| {
        let m = e.to_string();
        let (f, m) = (kind.blame)(map).unwrap_or(("(object)".into(), m));
        doc.err(&f, m)
    })?;
    object.metadata_mut().namespace = doc.meta_namespace();
    Ok((doc, object))
}

/// `IPAddressPool` and `L2Advertisement` are MetalLB's when their group is `metallb.io` (or
/// the apiVersion is missing, which [`check_api_version`] then reports); other groups' kinds
/// of the same name are not ours.
fn is_metallb(api_version: Option<&str>) -> bool {
    api_version.is_none_or(|v| v.split('/').next() == Some("metallb.io"))
}

/// The `items` of a list object: `kind: List` or any `...List` kind that has `items`.
fn list_items(map: &mut Mapping, kind: &str) -> Option<Value> {
    let is_list = kind == "List" || (kind.ends_with("List") && map.contains_key("items"));
    if is_list {
        Some(map.remove("items").unwrap_or(Value::Null))
    } else {
        None
    }
}

fn str_field(map: &Mapping, key: &str) -> Option<String> {
    map.get(key).and_then(Value::as_str).map(str::to_string)
}

/// Namespace (defaulted) and name, read before deserialising so errors can name the object.
fn meta_names(map: &Mapping) -> (String, Option<String>) {
    let meta = map.get("metadata").and_then(Value::as_mapping);
    let get = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    (
        get("namespace").unwrap_or_else(|| "default".into()),
        get("name"),
    )
}

fn check_api_version(got: Option<&str>, want: &str) -> Result<(), String> {
    match got {
        Some(v) if v == want => Ok(()),
        Some(v) => Err(format!("{v:?} is not supported (expected {want:?})")),
        None => Err(format!("required (expected {want:?})")),
    }
}

/// serde's errors carry no path, so after a failed deserialisation the parts people write by
/// hand are retried one by one to name the field that broke it.
fn blame<T: serde::de::DeserializeOwned>(
    parent: &Mapping,
    key: &str,
    path: &str,
) -> Option<FieldError> {
    let v = parent.get(key)?;
    serde_yaml::from_value::<T>(v.clone())
        .err()
        .map(|e| (path.to_string(), e.to_string()))
}

/// Like [`blame`] for each element of the list `parent[key]`.
fn blame_each<T: serde::de::DeserializeOwned>(
    parent: &Mapping,
    key: &str,
    path: &str,
) -> Option<FieldError> {
    let items = parent.get(key)?.as_sequence()?;
    items.iter().enumerate().find_map(|(i, v)| {
        serde_yaml::from_value::<T>(v.clone())
            .err()
            .map(|e| (format!("{path}[{i}]"), e.to_string()))
    })
}

fn blame_service(map: &Mapping) -> Option<FieldError> {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    let spec = map.get("spec").and_then(Value::as_mapping);
    let meta = map.get("metadata").and_then(Value::as_mapping);
    // The creation time decides which Service keeps a contested frontend, so a bad one is
    // named rather than folded into "metadata".
    meta.and_then(|m| blame::<Time>(m, "creationTimestamp", "metadata.creationTimestamp"))
        .or_else(|| blame::<ObjectMeta>(map, "metadata", "metadata"))
        .or_else(|| spec.and_then(|s| blame_each::<ServicePort>(s, "ports", "spec.ports")))
        .or_else(|| blame::<ServiceSpec>(map, "spec", "spec"))
        .or_else(|| blame::<ServiceStatus>(map, "status", "status"))
}

fn blame_slice(map: &Mapping) -> Option<FieldError> {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    blame::<ObjectMeta>(map, "metadata", "metadata")
        .or_else(|| blame_each::<EndpointPort>(map, "ports", "ports"))
        .or_else(|| blame_each::<Endpoint>(map, "endpoints", "endpoints"))
}

fn blame_node(map: &Mapping) -> Option<FieldError> {
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    blame::<ObjectMeta>(map, "metadata", "metadata")
        .or_else(|| blame::<NodeSpec>(map, "spec", "spec"))
        .or_else(|| blame::<NodeStatus>(map, "status", "status"))
}

fn blame_service_cidr(map: &Mapping) -> Option<FieldError> {
    use k8s_openapi::api::networking::v1::{ServiceCIDRSpec, ServiceCIDRStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let spec = map.get("spec").and_then(Value::as_mapping);
    blame::<ObjectMeta>(map, "metadata", "metadata")
        .or_else(|| spec.and_then(|s| blame_each::<String>(s, "cidrs", "spec.cidrs")))
        .or_else(|| blame::<ServiceCIDRSpec>(map, "spec", "spec"))
        .or_else(|| blame::<ServiceCIDRStatus>(map, "status", "status"))
}

fn blame_selectors(parent: &Mapping, key: &str, path: &str) -> Option<FieldError> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    blame_list::<LabelSelector>(parent, key, path)
}

/// Like [`blame_each`], the list itself first (a scalar where a list belongs).
fn blame_list<T: serde::de::DeserializeOwned>(
    parent: &Mapping,
    key: &str,
    path: &str,
) -> Option<FieldError> {
    blame::<Vec<Value>>(parent, key, path).or_else(|| blame_each::<T>(parent, key, path))
}

fn blame_ip_pool(map: &Mapping) -> Option<FieldError> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use metallb::{IpAddressPoolSpec, ServiceAllocation};
    let spec = map.get("spec").and_then(Value::as_mapping);
    let alloc = spec
        .and_then(|s| s.get("serviceAllocation"))
        .and_then(Value::as_mapping);
    let a = "spec.serviceAllocation";
    blame::<ObjectMeta>(map, "metadata", "metadata")
        .or_else(|| spec.and_then(|s| blame_list::<String>(s, "addresses", "spec.addresses")))
        .or_else(|| spec.and_then(|s| blame::<bool>(s, "autoAssign", "spec.autoAssign")))
        .or_else(|| spec.and_then(|s| blame::<bool>(s, "avoidBuggyIPs", "spec.avoidBuggyIPs")))
        .or_else(|| alloc.and_then(|m| blame::<i32>(m, "priority", &format!("{a}.priority"))))
        .or_else(|| {
            alloc.and_then(|m| blame_list::<String>(m, "namespaces", &format!("{a}.namespaces")))
        })
        .or_else(|| {
            alloc.and_then(|m| {
                blame_selectors(m, "namespaceSelectors", &format!("{a}.namespaceSelectors"))
            })
        })
        .or_else(|| {
            alloc.and_then(|m| {
                blame_selectors(m, "serviceSelectors", &format!("{a}.serviceSelectors"))
            })
        })
        .or_else(|| spec.and_then(|s| blame::<ServiceAllocation>(s, "serviceAllocation", a)))
        .or_else(|| blame::<IpAddressPoolSpec>(map, "spec", "spec"))
}

fn blame_l2(map: &Mapping) -> Option<FieldError> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use metallb::L2AdvertisementSpec;
    let spec = map.get("spec").and_then(Value::as_mapping);
    blame::<ObjectMeta>(map, "metadata", "metadata")
        .or_else(|| {
            spec.and_then(|s| blame_list::<String>(s, "ipAddressPools", "spec.ipAddressPools"))
        })
        .or_else(|| {
            spec.and_then(|s| {
                blame_selectors(s, "ipAddressPoolSelectors", "spec.ipAddressPoolSelectors")
            })
        })
        .or_else(|| spec.and_then(|s| blame_selectors(s, "nodeSelectors", "spec.nodeSelectors")))
        .or_else(|| spec.and_then(|s| blame_list::<String>(s, "interfaces", "spec.interfaces")))
        .or_else(|| blame::<L2AdvertisementSpec>(map, "spec", "spec"))
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

type FieldError = (String, String);

fn check_port(field: String, port: i32) -> Result<(), FieldError> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err((field, format!("{port} must be 1-65535")))
    }
}

fn check_protocol(field: String, proto: Option<&str>) -> Result<(), FieldError> {
    match proto {
        None | Some("TCP" | "UDP" | "SCTP") => Ok(()),
        Some(p) => Err((field, format!("{p:?} is not one of TCP, UDP, SCTP"))),
    }
}

fn check_ip(field: String, s: &str) -> Result<(), FieldError> {
    s.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| (field, format!("{s:?} is not an IP address")))
}

/// Checks the fields `translate` relies on; everything else is passed through untouched.
fn validate_service(svc: &Service) -> Result<(), FieldError> {
    let Some(spec) = &svc.spec else {
        return Ok(());
    };
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(
        ty,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        return Err((
            "spec.type".into(),
            format!("{ty:?} is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"),
        ));
    }
    if ty == "ExternalName" && spec.external_name.as_deref().unwrap_or("").is_empty() {
        return Err((
            "spec.externalName".into(),
            "required for type ExternalName".into(),
        ));
    }
    match spec.cluster_ip.as_deref() {
        None | Some("" | "None") => {}
        Some(ip) => check_ip("spec.clusterIP".into(), ip)?,
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        if ip != "None" {
            check_ip(format!("spec.clusterIPs[{i}]"), ip)?;
        }
    }
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        check_ip(format!("spec.externalIPs[{i}]"), ip)?;
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, p) in ports.iter().enumerate() {
        let f = |name: &str| format!("spec.ports[{i}].{name}");
        check_port(f("port"), p.port)?;
        check_protocol(f("protocol"), p.protocol.as_deref())?;
        if let Some(np) = p.node_port {
            check_port(f("nodePort"), np)?;
        }
        // Port names identify the port in EndpointSlices, so they must be unambiguous.
        let name = p.name.as_deref().unwrap_or("");
        if name.is_empty() && ports.len() > 1 {
            return Err((
                f("name"),
                "required when the service has several ports".into(),
            ));
        }
        if !names.insert(name) {
            return Err((f("name"), format!("{name:?} is used by another port")));
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if !numbers.insert((p.port, proto)) {
            return Err((
                f("port"),
                format!("{}/{proto} is used by another port", p.port),
            ));
        }
    }

    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        if let Some(ip) = &ing.ip {
            check_ip(format!("status.loadBalancer.ingress[{i}].ip"), ip)?;
        }
    }
    Ok(())
}

/// `addr/len` with an IPv4 or IPv6 address and a prefix length that fits it.
fn check_cidr(field: String, s: &str) -> Result<IpAddr, FieldError> {
    let bad = || {
        (
            field.clone(),
            format!("{s:?} is not a CIDR (such as 10.96.0.0/12 or fd00:10:96::/112)"),
        )
    };
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    // Digits only: `u8::from_str` would take "+8".
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match len.parse::<u8>() {
        Ok(l) if l <= max => Ok(addr),
        _ => Err((field, format!("{s:?}: prefix length must be 0-{max}"))),
    }
}

/// As the API server: one or two CIDRs, at most one per IP family. IPv6 ones are kept here
/// (the translation uses the IPv4 ones).
fn validate_service_cidr(cidr: &ServiceCIDR) -> Result<(), FieldError> {
    let cidrs = cidr
        .spec
        .as_ref()
        .and_then(|s| s.cidrs.as_deref())
        .unwrap_or_default();
    if cidrs.is_empty() {
        return Err(("spec.cidrs".into(), "at least one CIDR is required".into()));
    }
    if cidrs.len() > 2 {
        return Err((
            "spec.cidrs".into(),
            format!(
                "{} CIDRs: at most 2 are allowed (one per IP family)",
                cidrs.len()
            ),
        ));
    }
    let mut families = HashSet::new();
    for (i, c) in cidrs.iter().enumerate() {
        let field = format!("spec.cidrs[{i}]");
        let addr = check_cidr(field.clone(), c)?;
        if !families.insert(addr.is_ipv4()) {
            return Err((field, "only one CIDR per IP family is allowed".into()));
        }
    }
    Ok(())
}

fn validate_slice(slice: &EndpointSlice) -> Result<(), FieldError> {
    let has_owner = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .is_some_and(|s| !s.is_empty());
    if !has_owner {
        return Err((
            format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "required (names the Service this slice belongs to)".into(),
        ));
    }
    let mut names = HashSet::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let f = |name: &str| format!("ports[{i}].{name}");
        if let Some(port) = p.port {
            check_port(f("port"), port)?;
        }
        check_protocol(f("protocol"), p.protocol.as_deref())?;
        let name = p.name.as_deref().unwrap_or("");
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if !names.insert((name, proto)) {
            return Err((
                f("name"),
                format!("{name:?}/{proto} is used by another port"),
            ));
        }
    }
    for (i, ep) in slice.endpoints.iter().flatten().enumerate() {
        if ep.addresses.is_empty() {
            return Err((
                format!("endpoints[{i}].addresses"),
                "at least one address is required".into(),
            ));
        }
        for (j, a) in ep.addresses.iter().enumerate() {
            if a.parse::<Ipv4Addr>().is_err() {
                return Err((
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{a:?} is not an IPv4 address"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "
apiVersion: v1
kind: Service
metadata: {name: nginx-service, namespace: dev}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
";

    const SLICE: &str = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: nginx-abc
  namespace: dev
  labels: {kubernetes.io/service-name: nginx-service}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
  nodeName: node-a
";

    fn err(text: &str) -> String {
        parse_objects(text).unwrap_err().to_string()
    }

    #[test]
    fn multi_document_with_other_kinds_and_empty_documents() {
        let text = format!(
            "---\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: x}}\n---\n{SVC}---\n# only a comment\n---\n{SLICE}"
        );
        let objs = parse_objects(&text).unwrap();
        assert_eq!(objs.services.len(), 1);
        assert_eq!(objs.slices.len(), 1);
        assert_eq!(
            objs.services[0].metadata.name.as_deref(),
            Some("nginx-service")
        );
        assert_eq!(
            objs.slices[0].endpoints[0].addr,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
    }

    #[test]
    fn creation_timestamp_is_kept() {
        let stamped = |t: &str| {
            SVC.replace(
                "namespace: dev}",
                &format!("namespace: dev, creationTimestamp: {t}}}"),
            )
        };
        let created = |t: &str| {
            parse_objects(&stamped(t)).unwrap().services[0]
                .metadata
                .creation_timestamp
                .clone()
                .map(|t| t.0.to_string())
        };
        assert_eq!(
            created("2024-05-01T10:00:00Z").as_deref(),
            Some("2024-05-01T10:00:00Z")
        );
        // RFC 3339 with an offset, quoted or not.
        assert_eq!(
            created("\"2024-05-01T12:00:00+02:00\"").as_deref(),
            Some("2024-05-01T10:00:00Z")
        );
        assert_eq!(created("null"), None);
        let e = err(&stamped("yesterday"));
        assert!(
            e.starts_with("Service dev/nginx-service: metadata.creationTimestamp: "),
            "{e}"
        );
    }

    #[test]
    fn empty_text_is_empty_objects() {
        let objs = parse_objects("").unwrap();
        assert!(objs.services.is_empty() && objs.slices.is_empty());
    }

    #[test]
    fn kubectl_list_output() {
        let text = include_str!("../../tests/fixtures/kubectl-list.yaml");
        let objs = parse_objects(text).unwrap();
        let names: Vec<_> = objs
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["kubernetes", "nginx-service"]);
        // The IPv6 slice is dropped, the IPv4 one kept.
        assert_eq!(objs.slices.len(), 1);
    }

    /// `kubectl get -o json` output (a List, or several objects one after another) reads
    /// as its YAML form does; broken JSON is reported by the YAML reader.
    #[test]
    fn json_reads_as_its_yaml() {
        let text = include_str!("../../tests/fixtures/kubectl-list.yaml");
        let list: Value = serde_yaml::from_str(text).unwrap();
        let json = serde_json::to_string_pretty(&list).unwrap();
        assert!(json_values(&json).is_some(), "not taken as JSON");
        let (a, b) = (parse_objects(text).unwrap(), parse_objects(&json).unwrap());
        let ser = |o: &Objects| serde_json::to_string(&(&o.services, &o.slices, &o.nodes)).unwrap();
        assert_eq!(ser(&a), ser(&b));
        // Items one after another, not in a list.
        let items = list["items"].as_sequence().unwrap();
        let stream: String = items
            .iter()
            .map(|v| serde_json::to_string(v).unwrap() + "\n")
            .collect();
        assert_eq!(ser(&parse_objects(&stream).unwrap()), ser(&a));
        // Errors: an invalid field names the object as in YAML; broken JSON is YAML's error.
        let bad = json.replacen("\"port\": 443", "\"port\": 70000", 1);
        assert_ne!(bad, json, "the fixture has no port 443");
        assert!(matches!(
            parse_objects(&bad),
            Err(ParseError::Invalid { .. })
        ));
        let broken = &json[..json.len() / 2];
        assert!(matches!(
            parse_objects(broken),
            Err(ParseError::Yaml { .. })
        ));
    }

    #[test]
    fn nested_and_typed_lists() {
        let text = "
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: List
  items:
  - apiVersion: v1
    kind: ServiceList
    items:
    - metadata: {name: a}
      spec: {ports: [{port: 80}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSliceList
  items:
  - metadata: {name: a-1, labels: {kubernetes.io/service-name: a}}
    addressType: IPv4
    endpoints: []
";
        let objs = parse_objects(text).unwrap();
        assert_eq!(objs.services.len(), 1);
        assert_eq!(
            objs.services[0].metadata.namespace.as_deref(),
            Some("default")
        );
        assert_eq!(objs.slices.len(), 1);
    }

    #[test]
    fn errors_name_object_and_field() {
        let bad_port = SVC.replace("port: 80,", "port: 70000,");
        assert_eq!(
            err(&bad_port),
            "Service dev/nginx-service: spec.ports[0].port: 70000 must be 1-65535"
        );
        let bad_addr = SLICE.replace("[10.0.0.1]", "[10.0.0.x]");
        assert_eq!(
            err(&bad_addr),
            "EndpointSlice dev/nginx-abc: endpoints[0].addresses[0]: \"10.0.0.x\" is not an IPv4 address"
        );
        let bad_yaml = format!("{SVC}---\nkind: [\n");
        assert!(
            err(&bad_yaml).starts_with("document 2: invalid YAML: "),
            "{}",
            err(&bad_yaml)
        );
    }

    #[test]
    fn service_validation() {
        let cases = [
            (
                "type: NodePort",
                "type: Weird",
                "spec.type: \"Weird\" is not one of",
            ),
            (
                "clusterIP: 10.96.0.10",
                "clusterIP: 10.96.0",
                "spec.clusterIP: \"10.96.0\" is not an IP",
            ),
            (
                "nodePort: 30080",
                "nodePort: 0",
                "spec.ports[0].nodePort: 0 must be 1-65535",
            ),
            (
                "targetPort: 8080,",
                "protocol: ICMP,",
                "spec.ports[0].protocol: \"ICMP\" is not one of",
            ),
            (
                "apiVersion: v1",
                "apiVersion: v2",
                "apiVersion: \"v2\" is not supported",
            ),
            (
                "{name: nginx-service, namespace: dev}",
                "{namespace: dev}",
                "Service dev/<unnamed>: metadata.name: required",
            ),
            (
                "port: 80,",
                "port: \"80\",",
                "Service dev/nginx-service: spec.ports[0]: invalid type: string \"80\"",
            ),
            (
                "type: NodePort",
                "type: 3",
                "Service dev/nginx-service: spec: invalid type",
            ),
        ];
        for (from, to, want) in cases {
            let text = SVC.replace(from, to);
            assert_ne!(text, SVC, "{from}");
            let got = err(&text);
            assert!(got.contains(want), "{to}: {got}");
        }
    }

    #[test]
    fn service_ports_must_be_distinguishable() {
        let two_unnamed = SVC.replace(
            "  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}",
            "  - {port: 80}\n  - {port: 443}",
        );
        assert!(err(&two_unnamed).contains("spec.ports[0].name: required"));
        let same_name = SVC.replace(
            "  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}",
            "  - {name: a, port: 80}\n  - {name: a, port: 443}",
        );
        assert!(err(&same_name).contains("spec.ports[1].name"));
        let same_port = SVC.replace(
            "  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}",
            "  - {name: a, port: 80}\n  - {name: b, port: 80}",
        );
        assert!(err(&same_port).contains("spec.ports[1].port: 80/TCP"));
        let tcp_and_udp = SVC.replace(
            "  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}",
            "  - {name: a, port: 53}\n  - {name: b, port: 53, protocol: UDP}",
        );
        parse_objects(&tcp_and_udp).unwrap();
    }

    #[test]
    fn accepted_service_variants() {
        for (from, to) in [
            ("clusterIP: 10.96.0.10", "clusterIP: None"),
            ("clusterIP: 10.96.0.10", "clusterIP: \"\""),
            ("clusterIP: 10.96.0.10", "clusterIP: fd00::10"),
            ("targetPort: 8080,", "protocol: SCTP,"),
            ("type: NodePort", "type: LoadBalancer"),
            (", nodePort: 30080", ""),
            (
                "{name: nginx-service, namespace: dev}",
                "{name: nginx-service}",
            ),
        ] {
            let text = SVC.replace(from, to);
            assert_ne!(text, SVC, "{from}");
            parse_objects(&text).unwrap_or_else(|e| panic!("{to}: {e}"));
        }
    }

    #[test]
    fn duplicate_service_is_an_error() {
        let text = format!("{SVC}---{SVC}");
        assert_eq!(
            err(&text),
            "Service dev/nginx-service: metadata.name: defined more than once in this file"
        );
        // Same name in another namespace is a different service.
        let other = SVC.replace("namespace: dev", "namespace: prod");
        parse_objects(&format!("{SVC}---{other}")).unwrap();
    }

    #[test]
    fn slice_validation() {
        let no_label = SLICE.replace(
            "labels: {kubernetes.io/service-name: nginx-service}",
            "labels: {}",
        );
        assert!(err(&no_label).contains("metadata.labels[kubernetes.io/service-name]: required"));
        let wrong_api = SLICE.replace("discovery.k8s.io/v1", "discovery.k8s.io/v1beta1");
        assert!(err(&wrong_api).starts_with("EndpointSlice dev/nginx-abc: apiVersion: "));
        let bad_type = SLICE.replace("addressType: IPv4", "addressType: IPv5");
        assert!(err(&bad_type).contains("addressType: \"IPv5\""));
        let bad_port = SLICE.replace("port: 8080", "port: 0");
        assert!(err(&bad_port).contains("ports[0].port: 0 must be 1-65535"));
        let no_addr = SLICE.replace("[10.0.0.1]", "[]");
        assert!(err(&no_addr).contains("endpoints[0].addresses: at least one"));
        let dup = format!("{SLICE}---{SLICE}");
        assert!(err(&dup).contains("defined more than once"));
    }

    #[test]
    fn non_ipv4_slices_are_dropped() {
        for ty in ["IPv6", "FQDN"] {
            let text = SLICE
                .replace("addressType: IPv4", &format!("addressType: {ty}"))
                .replace("[10.0.0.1]", "[\"fd00::1\"]");
            assert!(parse_objects(&text).unwrap().slices.is_empty());
        }
    }

    const NODE: &str = "
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {topology.kubernetes.io/zone: zone-1, kubernetes.io/hostname: node-a}
spec: {podCIDR: 10.244.1.0/24}
status:
  addresses: [{type: InternalIP, address: 172.18.0.2}]
";

    const SCIDR: &str = "
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec:
  cidrs: [10.96.0.0/12, fd00:10:96::/112]
";

    #[test]
    fn nodes_and_service_cidrs() {
        let text = format!("{SVC}---{NODE}---{SCIDR}");
        let objs = parse_objects(&text).unwrap();
        assert_eq!(objs.services.len(), 1);
        assert_eq!(objs.nodes.len(), 1);
        let node = &objs.nodes[0];
        assert_eq!(node.metadata.name.as_deref(), Some("node-a"));
        assert_eq!(node.metadata.namespace, None, "cluster-scoped");
        assert_eq!(
            node.metadata.labels.as_ref().unwrap()["topology.kubernetes.io/zone"],
            "zone-1"
        );
        assert_eq!(objs.service_cidrs.len(), 1);
        let cidr = &objs.service_cidrs[0];
        assert_eq!(cidr.metadata.name.as_deref(), Some("kubernetes"));
        assert_eq!(cidr.metadata.namespace, None);
        // The IPv6 range is kept; the translation picks the IPv4 ones.
        assert_eq!(
            cidr.spec.as_ref().unwrap().cidrs.as_deref().unwrap(),
            ["10.96.0.0/12", "fd00:10:96::/112"]
        );
        // A namespace written on a cluster-scoped object is dropped.
        let with_ns = NODE.replace("name: node-a\n", "name: node-a\n  namespace: dev\n");
        assert_ne!(with_ns, NODE);
        assert_eq!(
            parse_objects(&with_ns).unwrap().nodes[0].metadata.namespace,
            None
        );
    }

    #[test]
    fn nodes_and_service_cidrs_in_lists() {
        let text = "
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: NodeList
  items:
  - metadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}
  - metadata: {name: n2}
- apiVersion: networking.k8s.io/v1
  kind: ServiceCIDRList
  items:
  - metadata: {name: kubernetes}
    spec: {cidrs: [10.96.0.0/12]}
  - metadata: {name: extra}
    spec: {cidrs: [\"10.100.0.0/16\"]}
- apiVersion: networking.k8s.io/v1
  kind: ServiceCIDR
  metadata: {name: v6-only}
  spec: {cidrs: [\"fd00:10:96::/112\"]}
";
        let objs = parse_objects(text).unwrap();
        let names = |v: Vec<Option<String>>| v.into_iter().map(Option::unwrap).collect::<Vec<_>>();
        assert_eq!(
            names(objs.nodes.iter().map(|n| n.metadata.name.clone()).collect()),
            ["n1", "n2"]
        );
        assert_eq!(
            names(
                objs.service_cidrs
                    .iter()
                    .map(|c| c.metadata.name.clone())
                    .collect()
            ),
            ["kubernetes", "extra", "v6-only"]
        );
    }

    #[test]
    fn node_validation() {
        assert_eq!(
            err(&NODE.replace("name: node-a\n", "")),
            "Node <unnamed>: metadata.name: required"
        );
        assert_eq!(
            err(&format!("{NODE}---{NODE}")),
            "Node node-a: metadata.name: defined more than once in this file"
        );
        assert!(
            err(&NODE.replace("apiVersion: v1", "apiVersion: v2"))
                .starts_with("Node node-a: apiVersion: \"v2\" is not supported")
        );
        let e = err(&NODE.replace("{podCIDR: 10.244.1.0/24}", "{unschedulable: maybe}"));
        assert!(e.starts_with("Node node-a: spec: "), "{e}");
        let e = err(&NODE.replace(
            "labels: {topology.kubernetes.io/zone: zone-1, kubernetes.io/hostname: node-a}",
            "labels: [zone-1]",
        ));
        assert!(e.starts_with("Node node-a: metadata: "), "{e}");
    }

    #[test]
    fn service_cidr_validation() {
        let cases = [
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[10.96.0.0]",
                "ServiceCIDR kubernetes: spec.cidrs[0]: \"10.96.0.0\" is not a CIDR",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[10.96.0.0/12, 10.300.0.0/16]",
                "ServiceCIDR kubernetes: spec.cidrs[1]: \"10.300.0.0/16\" is not a CIDR",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[10.96.0.0/33]",
                "spec.cidrs[0]: \"10.96.0.0/33\": prefix length must be 0-32",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[\"fd00::/129\"]",
                "spec.cidrs[0]: \"fd00::/129\": prefix length must be 0-128",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[10.96.0.0/+8]",
                "spec.cidrs[0]: \"10.96.0.0/+8\" is not a CIDR",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[10.96.0.0/12, 10.100.0.0/16]",
                "spec.cidrs[1]: only one CIDR per IP family",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[10.96.0.0/12, fd00:10:96::/112, 10.100.0.0/16]",
                "ServiceCIDR kubernetes: spec.cidrs: 3 CIDRs: at most 2 are allowed",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[]",
                "ServiceCIDR kubernetes: spec.cidrs: at least one CIDR is required",
            ),
            (
                "[10.96.0.0/12, fd00:10:96::/112]",
                "[10.96.0.0/12, {a: b}]",
                "ServiceCIDR kubernetes: spec.cidrs[1]: invalid type",
            ),
            (
                "networking.k8s.io/v1",
                "networking.k8s.io/v1beta1",
                "ServiceCIDR kubernetes: apiVersion: \"networking.k8s.io/v1beta1\" is not supported",
            ),
            (
                "{name: kubernetes}",
                "{}",
                "ServiceCIDR <unnamed>: metadata.name: required",
            ),
        ];
        for (from, to, want) in cases {
            let text = SCIDR.replace(from, to);
            assert_ne!(text, SCIDR, "{from}");
            let got = err(&text);
            assert!(got.contains(want), "{to}: {got}");
        }
        assert_eq!(
            err(&SCIDR.replace("  cidrs: [10.96.0.0/12, fd00:10:96::/112]\n", "  {}\n")),
            "ServiceCIDR kubernetes: spec.cidrs: at least one CIDR is required"
        );
        assert_eq!(
            err(&format!("{SCIDR}---{SCIDR}")),
            "ServiceCIDR kubernetes: metadata.name: defined more than once in this file"
        );
        // Accepted: one family only, either one; a /0 and a host route.
        for ok in [
            "[10.96.0.0/12]",
            "[\"fd00::/108\"]",
            "[0.0.0.0/0, \"::1/128\"]",
        ] {
            let text = SCIDR.replace("[10.96.0.0/12, fd00:10:96::/112]", ok);
            parse_objects(&text).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn document_shape_errors() {
        assert_eq!(
            err("apiVersion: v1\nkind: Service\n---\n- 1\n"),
            "Service default/<unnamed>: metadata.name: required"
        );
        assert_eq!(
            err("kind: Pod\n---\n- 1\n"),
            "document 2: expected a Kubernetes object (a mapping), found a list"
        );
        assert_eq!(
            err("metadata: {name: x}\n"),
            "document 1: object has no kind"
        );
        assert_eq!(
            err("apiVersion: v1\nkind: List\nitems: 3\n"),
            "document 1: List.items: expected a list, found a number"
        );
    }
    /// `manifests/metallb-config.yaml` of the seed article, verbatim (comment included).
    const SEED_METALLB: &str = "apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: example
  namespace: metallb-system
spec:
  addresses:
  - 172.18.255.200-172.18.255.250  # kind ネットワーク内の未使用 IP 範囲（要調整）
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: empty
  namespace: metallb-system
";

    fn check_seed_metallb(objs: &Objects) {
        assert_eq!(objs.ip_pools.len(), 1);
        let pool = &objs.ip_pools[0];
        assert_eq!(pool.metadata.name.as_deref(), Some("example"));
        assert_eq!(pool.metadata.namespace.as_deref(), Some("metallb-system"));
        assert_eq!(pool.spec.addresses, ["172.18.255.200-172.18.255.250"]);
        assert!(pool.auto_assign() && !pool.spec.avoid_buggy_ips);
        assert_eq!(objs.l2_adverts.len(), 1);
        let l2 = &objs.l2_adverts[0];
        assert_eq!(l2.metadata.name.as_deref(), Some("empty"));
        assert_eq!(l2.spec, Default::default());
        assert!(l2.covers(pool));
    }

    #[test]
    fn seed_metallb_manifests() {
        check_seed_metallb(&parse_objects(SEED_METALLB).unwrap());
        let text = include_str!("../../../deploy/examples/metallb/metallb-config.yaml");
        check_seed_metallb(&parse_objects(text).unwrap());
        // The kustomization next to it is another kind: skipped.
        let kust = include_str!("../../../deploy/examples/metallb/kustomization.yaml");
        let objs = parse_objects(kust).unwrap();
        assert!(objs.ip_pools.is_empty() && objs.l2_adverts.is_empty());
        // Mixed with Services, in a list.
        let text = format!("{SVC}---\n{SEED_METALLB}");
        let objs = parse_objects(&text).unwrap();
        assert_eq!(objs.services.len(), 1);
        check_seed_metallb(&objs);
    }

    #[test]
    fn metallb_lists_and_all_fields() {
        let text = "
apiVersion: v1
kind: List
items:
- apiVersion: metallb.io/v1beta1
  kind: IPAddressPoolList
  items:
  - metadata: {name: a, labels: {announce: 'yes'}}
    spec:
      addresses: [10.0.0.0/24, '10.0.1.1 - 10.0.1.9', 'fd00::/64']
      autoAssign: false
      avoidBuggyIPs: true
      serviceAllocation:
        priority: 10
        namespaces: [dev]
        serviceSelectors:
        - matchLabels: {tier: gold}
          matchExpressions: [{key: app, operator: Exists}]
  - metadata: {name: b}
    spec: {addresses: [10.0.2.0/24]}
- apiVersion: metallb.io/v1beta1
  kind: L2AdvertisementList
  items:
  - metadata: {name: l2}
    spec:
      ipAddressPools: [b]
      ipAddressPoolSelectors: [{matchLabels: {announce: 'yes'}}]
      nodeSelectors: [{matchExpressions: [{key: node-role, operator: NotIn, values: [edge]}]}]
      interfaces: [eth0, eth1]
";
        let objs = parse_objects(text).unwrap();
        assert_eq!(objs.ip_pools.len(), 2);
        let a = &objs.ip_pools[0];
        assert_eq!(a.metadata.namespace.as_deref(), Some("default"));
        assert!(!a.auto_assign() && a.spec.avoid_buggy_ips);
        assert_eq!(a.priority(), Some(10));
        assert_eq!(a.ranges().len(), 3);
        let alloc = a.spec.service_allocation.as_ref().unwrap();
        assert_eq!(alloc.namespaces, ["dev"]);
        assert_eq!(alloc.service_selectors.len(), 1);
        let l2 = &objs.l2_adverts[0];
        assert_eq!(l2.spec.ip_address_pools, ["b"]);
        assert_eq!(l2.spec.interfaces, ["eth0", "eth1"]);
        assert_eq!(l2.spec.node_selectors.len(), 1);
        assert!(l2.covers(a) && l2.covers(&objs.ip_pools[1]));
    }

    #[test]
    fn metallb_validation() {
        let pool = "
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: p, namespace: metallb-system}
spec:
  addresses: [10.0.0.0/24, 10.0.1.1-10.0.1.9]
  serviceAllocation:
    serviceSelectors: [{matchLabels: {tier: gold}}]
";
        parse_objects(pool).unwrap();
        let cases = [
            (
                "10.0.1.1-10.0.1.9]",
                "10.0.1.9-10.0.1.1]",
                "IPAddressPool metallb-system/p: spec.addresses[1]: \"10.0.1.9-10.0.1.1\": the range's first address is after its last",
            ),
            (
                "10.0.1.1-10.0.1.9]",
                "10.0.1.1-10.0.1.x]",
                "IPAddressPool metallb-system/p: spec.addresses[1]: \"10.0.1.1-10.0.1.x\": \"10.0.1.x\" is not an IP address",
            ),
            (
                "[10.0.0.0/24,",
                "[10.0.0.0/33,",
                "spec.addresses[0]: \"10.0.0.0/33\": prefix length must be 0-32",
            ),
            (
                "[10.0.0.0/24,",
                "[10.0.0.7,",
                "spec.addresses[0]: \"10.0.0.7\" is neither a CIDR",
            ),
            (
                "10.0.1.1-10.0.1.9]",
                "10.0.0.200-10.0.1.9]",
                "spec.addresses[1]: \"10.0.0.200-10.0.1.9\" overlaps spec.addresses[0]",
            ),
            (
                "[10.0.0.0/24, 10.0.1.1-10.0.1.9]",
                "[]",
                "IPAddressPool metallb-system/p: spec.addresses: at least one CIDR or range is required",
            ),
            (
                "[10.0.0.0/24,",
                "[{a: 1},",
                "IPAddressPool metallb-system/p: spec.addresses[0]: invalid type",
            ),
            (
                "{matchLabels: {tier: gold}}",
                "{matchExpressions: [{key: tier, operator: Like, values: [g]}]}",
                "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].operator: \"Like\" is not one of In, NotIn, Exists, DoesNotExist",
            ),
            (
                "{matchLabels: {tier: gold}}",
                "{matchExpressions: [{key: tier, operator: In}]}",
                "spec.serviceAllocation.serviceSelectors[0].matchExpressions[0].values: required with operator In",
            ),
            (
                "{matchLabels: {tier: gold}}",
                "{matchLabels: [tier]}",
                "IPAddressPool metallb-system/p: spec.serviceAllocation.serviceSelectors[0]: invalid type",
            ),
            (
                "serviceSelectors: [{matchLabels: {tier: gold}}]",
                "priority: high",
                "IPAddressPool metallb-system/p: spec.serviceAllocation.priority: invalid type",
            ),
            (
                "  serviceAllocation:",
                "  autoAssign: maybe\n  serviceAllocation:",
                "IPAddressPool metallb-system/p: spec.autoAssign: invalid type",
            ),
            (
                "metallb.io/v1beta1",
                "metallb.io/v1alpha1",
                "IPAddressPool metallb-system/p: apiVersion: \"metallb.io/v1alpha1\" is not supported",
            ),
            (
                "{name: p, namespace: metallb-system}",
                "{namespace: metallb-system}",
                "IPAddressPool metallb-system/<unnamed>: metadata.name: required",
            ),
        ];
        for (from, to, want) in cases {
            let text = pool.replace(from, to);
            assert_ne!(text, pool, "{from}");
            let got = err(&text);
            assert!(got.contains(want), "{to}: {got}");
        }
        // Across pools: no overlap, unique names (even across namespaces).
        let other = pool.replace("name: p,", "name: q,").replace(
            "[10.0.0.0/24, 10.0.1.1-10.0.1.9]",
            "[10.0.2.0/24, 10.0.1.9/32]",
        );
        assert_eq!(
            err(&format!("{pool}---{other}")),
            "IPAddressPool metallb-system/q: spec.addresses[1]: \"10.0.1.9/32\" overlaps spec.addresses[1] of IPAddressPool p"
        );
        assert_eq!(
            err(&format!("{pool}---{pool}")),
            "IPAddressPool metallb-system/p: metadata.name: defined more than once in this file"
        );
        let elsewhere = pool
            .replace("namespace: metallb-system", "namespace: other")
            .replace("[10.0.0.0/24, 10.0.1.1-10.0.1.9]", "[10.0.3.0/24]");
        assert!(
            err(&format!("{pool}---{elsewhere}"))
                .contains("an IPAddressPool of this name is in namespace \"metallb-system\"")
        );
        // IPv6 entries overlap only IPv6 ones.
        let v6 = pool
            .replace("name: p,", "name: v6,")
            .replace("[10.0.0.0/24, 10.0.1.1-10.0.1.9]", "[\"::/0\"]");
        assert_eq!(
            parse_objects(&format!("{pool}---{v6}"))
                .unwrap()
                .ip_pools
                .len(),
            2
        );

        let l2 = "
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: l2, namespace: metallb-system}
spec:
  ipAddressPools: [p]
  nodeSelectors: [{matchLabels: {kubernetes.io/hostname: n1}}]
  interfaces: [eth0]
";
        parse_objects(l2).unwrap();
        let cases = [
            (
                "{matchLabels: {kubernetes.io/hostname: n1}}",
                "{matchExpressions: [{key: a, operator: Exists, values: [x]}]}",
                "L2Advertisement metallb-system/l2: spec.nodeSelectors[0].matchExpressions[0].values: must be empty with operator Exists",
            ),
            (
                "{matchLabels: {kubernetes.io/hostname: n1}}",
                "7",
                "L2Advertisement metallb-system/l2: spec.nodeSelectors[0]: invalid type",
            ),
            (
                "interfaces: [eth0]",
                "interfaces: eth0",
                "L2Advertisement metallb-system/l2: spec.interfaces: invalid type",
            ),
            (
                "interfaces: [eth0]",
                "interfaces: [\"\"]",
                "spec.interfaces[0]: must not be empty",
            ),
            (
                "ipAddressPools: [p]",
                "ipAddressPools: [[p]]",
                "L2Advertisement metallb-system/l2: spec.ipAddressPools[0]: invalid type",
            ),
            (
                "metallb.io/v1beta1",
                "metallb.io/v1beta2",
                "L2Advertisement metallb-system/l2: apiVersion: \"metallb.io/v1beta2\" is not supported",
            ),
        ];
        for (from, to, want) in cases {
            let text = l2.replace(from, to);
            assert_ne!(text, l2, "{from}");
            let got = err(&text);
            assert!(got.contains(want), "{to}: {got}");
        }
        assert!(err(&format!("{l2}---{l2}")).contains("defined more than once"));
        // Same kind names in other API groups are not MetalLB's: skipped.
        let foreign = pool.replace("metallb.io/v1beta1", "ipam.example.com/v1");
        let objs =
            parse_objects(&format!("{foreign}---{}", l2.replace("metallb.io", "x.io"))).unwrap();
        assert!(objs.ip_pools.is_empty() && objs.l2_adverts.is_empty());
        // All-or-nothing: a bad pool fails the whole file, Services included.
        let bad = pool.replace("10.0.1.1-10.0.1.9", "10.0.1.9-10.0.1.1");
        assert!(parse_objects(&format!("{SVC}---{bad}")).is_err());
    }
}
