//! Types shared by the eBPF programs and the agent: map keys and values, limits and the
//! checksum arithmetic both sides need.
//!
//! Byte order is named in every field: `_be` fields hold network byte order exactly as they
//! appear in the packet (the eBPF side compares them without swapping); fields without a
//! suffix are host byte order and never touch a packet.
#![no_std]

pub mod arp;
pub mod csum;
pub mod event;
pub mod maps;

pub use event::*;
pub use maps::*;

/// IP protocol numbers as they appear in the IPv4 header.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
