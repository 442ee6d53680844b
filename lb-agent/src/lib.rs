//! xlb's node agent. Services and EndpointSlices come in through [`source`], become service
//! ports in [`model`], and are written into the eBPF maps by [`dataplane`]; [`agent`] is the
//! loop that ties them together, [`serve`] its HTTP servers, [`status`] what
//! `lb-agent status` reads back, [`error`] why an attempt failed.
pub mod agent;
pub mod dataplane;
pub mod error;
pub mod model;
pub mod serve;
pub mod source;
pub mod status;

/// The old flat paths (`lb_agent::programmer`, …), kept for the tests crate.
pub use dataplane::{
    arena, bpf_table, conntrack, datapath, maglev, mmap_array, netinfo, programmer,
};
/// The old flat paths (`lb_agent::translate`, `lb_agent::ports`), kept for the tests crate.
pub use model::{ports, translate};
/// The old flat paths (`lb_agent::metrics`, …), kept for the tests crate.
pub use serve::{health, http, metrics};
/// The old flat path `lb_agent::kube_source`, kept for the tests crate.
pub use source::kube as kube_source;
/// The old flat path `lb_agent::k8s`, kept for the tests crate.
pub use source::yaml as k8s;
