//! The part of an EndpointSlice the translation reads, kept compact.
//!
//! The agent keeps every EndpointSlice of the cluster between changes (the incremental
//! translation re-reads a Service's slices when one of them changes). As the API type, an
//! endpoint takes ~350 bytes before its strings (every optional field of the API has its
//! slot: targetRef, hints, hostname, deprecatedTopology...), so 10,000 Services of 10
//! endpoints kept ~50 MiB of slices; this form keeps what the translation reads: ~40
//! bytes an endpoint plus its node name. The sources convert each slice after validating
//! it as the API type ([`Slice::from_api`]), so errors still name the API's fields.
use std::net::Ipv4Addr;

use k8s_openapi::{
    api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort, EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

use crate::{
    model::translate::{HEADLESS_LABEL, Proto},
    source::yaml::SERVICE_NAME_LABEL,
};

/// An EndpointSlice as the translation reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slice {
    /// `metadata.namespace` as the source filled it in.
    pub namespace: Option<String>,
    /// `metadata.name`: None for a slice of a manifest that has only `generateName`.
    pub name: Option<String>,
    /// The `kubernetes.io/service-name` label: the Service it belongs to.
    pub service: Option<String>,
    /// Labelled `service.kubernetes.io/headless` (left out, as kube-proxy does).
    pub headless: bool,
    /// `addressType: IPv4` (the sources keep no other, the translation checks anyway).
    pub ipv4: bool,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[Endpoint]>,
}

/// One of `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlicePort {
    /// `name`; unset is "", as the Service port it matches.
    pub name: Box<str>,
    /// `protocol` (unset is TCP); None: one xlb does not serve, matching no port.
    pub proto: Option<Proto>,
    /// `port`; unset means "all ports", which a port-translating proxy cannot use.
    pub port: Option<i32>,
}

/// One of `endpoints`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The first of `addresses` (those of one endpoint are fungible; kube-proxy uses the
    /// first too); None when it is not an IPv4 address.
    pub addr: Option<Ipv4Addr>,
    /// `conditions` as given: unset keeps the API's defaults for the translation to apply.
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Box<str>>,
    /// `hints` (topology aware routing), rare: boxed so that endpoints without stay small.
    pub hints: Option<Box<Hints>>,
}

impl SlicePort {
    pub fn from_api(p: &EndpointPort) -> Self {
        Self {
            name: p.name.as_deref().unwrap_or("").into(),
            proto: Proto::from_k8s(p.protocol.as_deref()).ok(),
            port: p.port,
        }
    }
}

impl Endpoint {
    /// The endpoint of these API fields (`addresses`, `conditions`, `nodeName`, `hints`).
    pub fn from_api(
        addresses: &[String],
        conditions: Option<&EndpointConditions>,
        node_name: Option<&str>,
        hints: Option<&EndpointHints>,
    ) -> Self {
        let hints = hints.map(|h| Hints {
            zones: h
                .for_zones
                .iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            nodes: h
                .for_nodes
                .iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
        Endpoint {
            addr: addresses.first().and_then(|a| a.parse().ok()),
            ready: conditions.and_then(|c| c.ready),
            serving: conditions.and_then(|c| c.serving),
            terminating: conditions.and_then(|c| c.terminating),
            node_name: node_name.map(Into::into),
            hints: hints.map(Box::new),
        }
    }
}

/// `hints.forZones[].name` and `hints.forNodes[].name`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Hints {
    pub zones: Vec<String>,
    pub nodes: Vec<String>,
}

impl Slice {
    /// The slice of an API object (validated or not: what the translation cannot use
    /// reads as above).
    pub fn from_api(s: &EndpointSlice) -> Self {
        Self::from_parts(
            &s.metadata,
            &s.address_type,
            s.ports.iter().flatten().map(SlicePort::from_api).collect(),
            s.endpoints
                .iter()
                .flatten()
                .map(|ep| {
                    Endpoint::from_api(
                        &ep.addresses,
                        ep.conditions.as_ref(),
                        ep.node_name.as_deref(),
                        ep.hints.as_ref(),
                    )
                })
                .collect(),
        )
    }

    /// The slice with these metadata and `addressType`, ports and endpoints (the kube
    /// source builds them from the API's JSON without the API type: `source::kube_slice`).
    pub fn from_parts(
        meta: &ObjectMeta,
        address_type: &str,
        ports: Box<[SlicePort]>,
        endpoints: Box<[Endpoint]>,
    ) -> Self {
        let labels = meta.labels.as_ref();
        Self {
            namespace: meta.namespace.clone(),
            name: meta.name.clone(),
            service: labels.and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned(),
            headless: labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)),
            ipv4: address_type == "IPv4",
            ports,
            endpoints,
        }
    }

    /// (namespace, owning Service name), the namespace defaulted as the sources do; None
    /// without the service-name label.
    pub fn owner(&self) -> Option<(&str, &str)> {
        let owner = self.service.as_deref()?;
        Some((self.namespace_or_default(), owner))
    }

    /// `metadata.namespace`, `default` when unset or empty.
    pub fn namespace_or_default(&self) -> &str {
        self.namespace
            .as_deref()
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(doc: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(doc).unwrap()
    }

    #[test]
    fn reads_what_the_translation_uses() {
        let s = Slice::from_api(&api(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "dev",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"port": 53, "protocol": "SCTP"}],
            "endpoints": [
                {"addresses": ["10.0.0.1", "10.0.0.9"], "nodeName": "n1",
                 "conditions": {"ready": false, "terminating": true},
                 "hints": {"forZones": [{"name": "z1"}]}},
                {"addresses": ["not-an-address"]},
            ],
        })));
        assert_eq!(s.owner(), Some(("dev", "web")));
        assert!(s.ipv4 && !s.headless);
        assert_eq!(&*s.ports[0].name, "http");
        assert_eq!(s.ports[0].proto, Some(Proto::Tcp));
        assert_eq!((s.ports[1].proto, s.ports[1].port), (None, Some(53)));
        let e = &s.endpoints[0];
        assert_eq!(e.addr, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            (e.ready, e.serving, e.terminating),
            (Some(false), None, Some(true))
        );
        assert_eq!(e.node_name.as_deref(), Some("n1"));
        assert_eq!(e.hints.as_ref().unwrap().zones, vec!["z1".to_string()]);
        assert_eq!(s.endpoints[1].addr, None);
        assert_eq!(s.endpoints[1].node_name, None);
    }

    #[test]
    fn defaults_and_labels() {
        let s = Slice::from_api(&api(serde_json::json!({
            "metadata": {"labels": {"service.kubernetes.io/headless": ""}},
            "addressType": "IPv6",
        })));
        assert_eq!(s.owner(), None);
        assert_eq!(s.namespace_or_default(), "default");
        assert!(s.headless && !s.ipv4);
        assert!(s.ports.is_empty() && s.endpoints.is_empty());
    }

    #[test]
    fn an_endpoint_is_small() {
        // What this module is for: keep it from growing back unnoticed.
        assert!(std::mem::size_of::<Endpoint>() <= 40);
    }
}
