//! Where the Services and EndpointSlices come from: YAML text ([`yaml`],
//! `--source file:<PATH>`, a file or a directory: [`files`]) or the Kubernetes API ([`kube`], `--source kube`). Both produce
//! the same [`yaml::Objects`] snapshot. MetalLB's `IPAddressPool`/`L2Advertisement` types are
//! in [`metallb`].
pub mod docs;
pub mod files;
pub mod kube;
pub mod kube_slice;
pub mod metallb;
pub mod watch;
pub mod yaml;
