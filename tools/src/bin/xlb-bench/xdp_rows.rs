//! The rows of the XDP and Maglev results, as `xlb-bench` writes them to results.json and
//! as `xlb-bench-ew` (which includes this file by path) still reads and prints them from its
//! own results: one definition, so both read the same JSON and print the same columns.
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone)]
pub struct PacketRow {
    pub scenario: String,
    pub services: u32,
    /// How the figure was taken: "repeat=1 x <flows> packets" or "repeat=<n> loop".
    pub method: String,
    pub ours_ns: f64,
    pub floor_ns: f64,
    pub ratio: f64,
    pub net_ns: f64,
}

impl PacketRow {
    pub const HEADER: [&str; 7] = [
        "scenario",
        "services",
        "method",
        "ours ns/pkt",
        "floor ns/pkt",
        "ours/floor",
        "net ns",
    ];

    /// The row's cells, under `HEADER`.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.scenario.clone(),
            self.services.to_string(),
            self.method.clone(),
            format!("{:.1}", self.ours_ns),
            format!("{:.1}", self.floor_ns),
            format!("{:.1}x", self.ratio),
            format!("{:.1}", self.net_ns),
        ]
    }
}

#[derive(Serialize, Deserialize, Clone)]
pub struct ApplyRow {
    pub services: u32,
    pub backends_per_service: u32,
    pub table_m: u32,
    pub slots_written: usize,
    pub apply_ms: f64,
}

impl ApplyRow {
    pub const HEADER: [&str; 5] = [
        "services",
        "backends/svc",
        "Maglev M",
        "slots written",
        "apply ms",
    ];

    /// The row's cells, under `HEADER`.
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.services.to_string(),
            self.backends_per_service.to_string(),
            self.table_m.to_string(),
            self.slots_written.to_string(),
            format!("{:.1}", self.apply_ms),
        ]
    }
}

#[derive(Serialize, Deserialize, Clone)]
pub struct MaglevRow {
    pub m: u32,
    pub backends: u32,
    pub build_ms: f64,
}

impl MaglevRow {
    /// The row's cells: M, backends, build ms (the benches name the last column each their
    /// own way).
    pub fn cells(&self) -> Vec<String> {
        vec![
            self.m.to_string(),
            self.backends.to_string(),
            format!("{:.2}", self.build_ms),
        ]
    }
}
