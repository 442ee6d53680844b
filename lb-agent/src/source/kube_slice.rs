//! EndpointSlices as the kube source receives and stores them.
//!
//! The watcher's store holds every EndpointSlice of the cluster. As the API type an
//! endpoint takes ~350 bytes before its strings, plus what the agent never reads
//! (`targetRef`, `hostname`, `zone`, `deprecatedTopology`: ~150 bytes of strings each in a
//! real cluster). [`KubeSlice`] is deserialised straight from the API's JSON into the
//! fields the agent reads ([`Slice`]) and the object's metadata (which the watcher needs:
//! resourceVersion, and names for its store); the other fields are skipped while parsing.
use std::{borrow::Cow, sync::Arc};

use k8s_openapi::{
    NamespaceResourceScope,
    api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use crate::model::slice::{Endpoint, Slice, SlicePort};

/// An EndpointSlice in the kube source's store.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeSlice {
    /// What the watcher and its store read of the metadata: name, namespace and
    /// resourceVersion ([`store_meta`]). The labels the translation reads are in `slice`;
    /// the rest (owner reference, uid, a map of labels: ~600 bytes a slice) is dropped.
    pub metadata: ObjectMeta,
    /// Shared with the snapshots and the translation.
    pub slice: Arc<Slice>,
}

impl KubeSlice {
    /// From the API type (tests, and anything that has one at hand).
    pub fn from_api(s: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Self {
        Self {
            metadata: store_meta(&s.metadata),
            slice: Arc::new(Slice::from_api(s)),
        }
    }
}

/// The metadata kept with a slice: what the store files it under and the watcher resumes
/// from. Everything the translation reads was taken into the [`Slice`] before.
fn store_meta(meta: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    }
}

impl<'de> Deserialize<'de> for KubeSlice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The fields read; serde skips the others without keeping them.
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire {
            #[serde(default)]
            metadata: ObjectMeta,
            address_type: String,
            #[serde(default)]
            ports: Option<Vec<EndpointPort>>,
            #[serde(default)]
            endpoints: Option<Vec<WireEndpoint>>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct WireEndpoint {
            #[serde(default)]
            addresses: Vec<String>,
            conditions: Option<EndpointConditions>,
            node_name: Option<String>,
            hints: Option<EndpointHints>,
        }
        let w = Wire::deserialize(d)?;
        let slice = Slice::from_parts(
            &w.metadata,
            &w.address_type,
            w.ports.iter().flatten().map(SlicePort::from_api).collect(),
            w.endpoints
                .iter()
                .flatten()
                .map(|e| {
                    Endpoint::from_api(
                        &e.addresses,
                        e.conditions.as_ref(),
                        e.node_name.as_deref(),
                        e.hints.as_ref(),
                    )
                })
                .collect(),
        );
        Ok(Self {
            metadata: store_meta(&w.metadata),
            slice: Arc::new(slice),
        })
    }
}

impl kube::Resource for KubeSlice {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "EndpointSlice".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "discovery.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "endpointslices".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn api_json() -> serde_json::Value {
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-abc", "namespace": "dev", "resourceVersion": "42",
                "labels": {"kubernetes.io/service-name": "web",
                           "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                           "app": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": ["10.244.1.5"], "nodeName": "n1", "zone": "z1", "hostname": "h",
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "dev", "uid": "u"},
                "hints": {"forZones": [{"name": "z1"}]},
            }],
        })
    }

    /// What the watcher parses equals the API type's translation-relevant part.
    #[test]
    fn reads_as_the_api_type_does() {
        let api: k8s_openapi::api::discovery::v1::EndpointSlice =
            serde_json::from_value(api_json()).unwrap();
        let ours: KubeSlice = serde_json::from_value(api_json()).unwrap();
        assert_eq!(ours, KubeSlice::from_api(&api));
        assert_eq!(*ours.slice, Slice::from_api(&api));
        assert_eq!(ours.metadata.resource_version.as_deref(), Some("42"));
        // The labels were read into the slice; none stays in the stored metadata.
        assert_eq!(ours.slice.service.as_deref(), Some("web"));
        assert_eq!(ours.metadata.labels, None);
        assert_eq!(ours.metadata.name.as_deref(), Some("web-abc"));
        assert_eq!(ours.metadata.namespace.as_deref(), Some("dev"));
        use kube::Resource as _;
        assert_eq!(
            KubeSlice::url_path(&(), Some("dev")),
            "/apis/discovery.k8s.io/v1/namespaces/dev/endpointslices"
        );
    }

    #[test]
    fn a_slice_without_endpoints_or_ports() {
        let s: KubeSlice = serde_json::from_value(json!({
            "metadata": {"name": "x"}, "addressType": "IPv6", "endpoints": null,
        }))
        .unwrap();
        assert!(s.slice.endpoints.is_empty() && s.slice.ports.is_empty() && !s.slice.ipv4);
        assert!(serde_json::from_value::<KubeSlice>(json!({"metadata": {}})).is_err());
    }
}
