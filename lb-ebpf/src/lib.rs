//! The pure part of the datapath: functions over packet bytes that need no map, helper or
//! context, so that they build and are tested on the host as well (`cargo test -p lb-ebpf
//! --lib`, run by `cargo xtask test`), as aya-template's eBPF crates do. The programs
//! (main.rs and its modules) use them from here.
#![cfg_attr(not(test), no_std)]

pub mod arp;
pub mod icmp;
pub mod nat;
pub mod parse;
pub mod reject;
