//! xlb's node agent. Services and EndpointSlices come in through [`source`], become service
//! ports in [`model`], and are written into the eBPF maps by [`dataplane`]; [`agent`] is the
//! loop that ties them together, [`serve`] its HTTP servers, [`status`] what
//! `lb-agent status` reads back (written by [`run_files`]), [`error`] why an attempt
//! failed.
pub mod agent;
pub mod announce;
pub mod dataplane;
pub mod error;
pub mod model;
pub mod run_files;
pub mod serve;
pub mod source;
pub mod status;
