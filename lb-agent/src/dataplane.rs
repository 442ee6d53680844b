//! The kernel side: loading and attaching the eBPF object ([`datapath`]), writing its maps
//! ([`programmer`], with [`maglev`] tables placed by [`arena`] and written through
//! [`mmap_array`]), the conntrack GC ([`conntrack`] over [`bpf_table`]), and what the
//! kernel says about the node's links ([`netinfo`]); which cgroup gets the socket programs
//! ([`cgroup`]) and whether pinned maps fit the flags ([`pins`]).
pub mod arena;
pub mod bpf_table;
pub mod cgroup;
pub mod conntrack;
pub mod datapath;
pub mod maglev;
pub mod mmap_array;
pub mod netinfo;
pub mod pins;
pub mod programmer;
#[cfg(test)]
mod programmer_golden;
pub mod tables_ahead;
