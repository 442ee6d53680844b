//! `lb-agent status`: what is programmed, read back from the pinned maps (plus the agent's
//! run-time facts file), shown like `kubectl get svc` with endpoints and counters.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use lb_common::*;
use serde::Serialize;

use crate::agent::AgentInfo;

#[derive(Serialize, Debug, Clone)]
pub struct SvcStatus {
    pub name: String,
    pub svc_type: String,
    pub cluster_ip: Option<String>,
    pub external_ips: Vec<String>,
    pub port: Option<u16>,
    pub node_port: Option<u16>,
    pub protocol: String,
    pub endpoints: Vec<String>,
    pub maglev_m: u32,
    /// sessionAffinity ClientIP timeout (s), 0 = none.
    pub affinity_timeout: u32,
    /// Only local endpoints (a Local traffic policy).
    pub local_only: bool,
    /// loadBalancerSourceRanges are enforced on its LB addresses.
    pub source_ranges: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rejects: u64,
}

#[derive(Serialize, Debug)]
pub struct Status {
    pub agent: Option<AgentInfo>,
    pub services: Vec<SvcStatus>,
    pub counters: BTreeMap<String, u64>,
}

fn open(pin_dir: &Path, name: &str) -> Result<MapData> {
    let p = pin_dir.join(name);
    MapData::from_pin(&p)
        .with_context(|| format!("opening pinned map {} (is the agent running?)", p.display()))
}

fn ip(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(be.to_ne_bytes())
}

pub fn read(pin_dir: &Path, run_dir: &Path) -> Result<Status> {
    let frontends: HashMap<_, FrontendKey, Frontend> =
        HashMap::try_from(Map::HashMap(open(pin_dir, MAP_FRONTENDS)?))?;
    let services: HashMap<_, u32, Service> =
        HashMap::try_from(Map::HashMap(open(pin_dir, MAP_SERVICES)?))?;
    let backends: HashMap<_, u32, Backend> =
        HashMap::try_from(Map::HashMap(open(pin_dir, MAP_BACKENDS)?))?;
    let maglev: Array<_, u64> = Array::try_from(Map::Array(open(pin_dir, MAP_MAGLEV)?))?;
    let meta: Array<_, SvcMeta> = Array::try_from(Map::Array(open(pin_dir, MAP_SVC_META)?))?;
    let stats: PerCpuArray<_, SvcStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, MAP_SVC_STATS)?))?;
    let counters: PerCpuArray<_, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, MAP_COUNTERS)?))?;

    let mut fes: BTreeMap<u32, Vec<(FrontendKey, Frontend)>> = BTreeMap::new();
    for item in frontends.iter() {
        let (k, v) = item?;
        fes.entry(v.svc_id).or_default().push((k, v));
    }
    let mut out = Vec::new();
    for item in services.iter() {
        let (svc_id, svc) = item?;
        let m = meta.get(&svc_id, 0).unwrap_or_default();
        let mut st = SvcStatus {
            // `ns/name[:port]/PROTO[ (local)]`, as the agent names the port; empty for an
            // entry not written by this layout version.
            name: if m.is_current() {
                m.to_string()
            } else {
                String::new()
            },
            svc_type: m.service_type().unwrap_or_default().as_str().to_string(),
            cluster_ip: None,
            external_ips: vec![],
            port: None,
            node_port: None,
            protocol: String::new(),
            endpoints: vec![],
            maglev_m: svc.table_m,
            affinity_timeout: svc.affinity_timeout,
            local_only: svc.flags & SVC_DROP_IF_EMPTY != 0,
            source_ranges: false,
            packets: 0,
            bytes: 0,
            new_flows: 0,
            rejects: 0,
        };
        for (k, f) in fes.get(&svc_id).map(Vec::as_slice).unwrap_or(&[]) {
            st.protocol = if k.proto == PROTO_UDP { "UDP" } else { "TCP" }.to_string();
            st.source_ranges |= f.flags & FE_SOURCE_RANGES != 0;
            let port = u16::from_be(k.port_be);
            if f.flags & FE_CLUSTER_IP != 0 {
                st.cluster_ip = Some(ip(k.addr_be).to_string());
                st.port = Some(port);
            } else if f.flags & FE_NODEPORT != 0 {
                st.node_port = Some(port);
            } else if f.flags & FE_EXTERNAL != 0 {
                st.external_ips.push(ip(k.addr_be).to_string());
                st.port = Some(port);
            }
        }
        st.external_ips.sort();
        st.external_ips.dedup();
        // Endpoints are whatever the active Maglev table points at.
        let mut ids = BTreeSet::new();
        for i in 0..svc.table_m {
            let slot = svc.table_off + i;
            if let Ok(pair) = maglev.get(&(slot / MAGLEV_SLOTS_PER_ENTRY), 0) {
                // Two slots per element, low half first (see MAGLEV_SLOTS_PER_ENTRY).
                ids.insert((pair >> (32 * (slot % MAGLEV_SLOTS_PER_ENTRY))) as u32);
            }
        }
        for id in ids {
            if let Ok(b) = backends.get(&id, 0) {
                let local = if b.flags & BE_LOCAL != 0 {
                    " (local)"
                } else {
                    ""
                };
                st.endpoints.push(format!(
                    "{}:{}{local}",
                    ip(b.addr_be),
                    u16::from_be(b.port_be)
                ));
            }
        }
        if let Ok(per_cpu) = stats.get(&svc_id, 0) {
            for s in per_cpu.iter() {
                st.packets += s.packets;
                st.bytes += s.bytes;
                st.new_flows += s.new_flows;
                st.rejects += s.rejects;
            }
        }
        out.push(st);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    let mut totals = BTreeMap::new();
    for (i, name) in COUNTER_NAMES.iter().enumerate() {
        let v: u64 = counters
            .get(&(i as u32), 0)
            .map(|p| p.iter().sum())
            .unwrap_or(0);
        totals.insert(name.to_string(), v);
    }
    let agent = std::fs::read_to_string(run_dir.join("agent.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    Ok(Status {
        agent,
        services: out,
        counters: totals,
    })
}

pub fn render(st: &Status) -> String {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header([
        "NAME",
        "TYPE",
        "CLUSTER-IP",
        "EXTERNAL-IP",
        "PORT(S)",
        "ENDPOINTS",
        "PACKETS",
        "FLOWS",
        "REJECTS",
    ]);
    for s in &st.services {
        let ports = match (s.port, s.node_port) {
            (Some(p), Some(n)) => format!("{p}:{n}/{}", s.protocol),
            (Some(p), None) => format!("{p}/{}", s.protocol),
            (None, Some(n)) => format!("<none>:{n}/{}", s.protocol),
            (None, None) => "<none>".into(),
        };
        let ext = if s.external_ips.is_empty() {
            "<none>".to_string()
        } else {
            s.external_ips.join(",")
        };
        let eps = if s.endpoints.is_empty() {
            "<none>".to_string()
        } else {
            s.endpoints.join(",")
        };
        t.add_row([
            s.name.clone(),
            s.svc_type.clone(),
            s.cluster_ip.clone().unwrap_or_else(|| "<none>".into()),
            ext,
            ports,
            eps,
            s.packets.to_string(),
            s.new_flows.to_string(),
            s.rejects.to_string(),
        ]);
    }
    let mut out = String::new();
    if let Some(a) = &st.agent {
        out.push_str(&format!(
            "node {}  ready: {}\n",
            a.node_name,
            if a.ready {
                "yes"
            } else {
                "no (the first full sync is not programmed yet)"
            }
        ));
        let hook = match (a.xdp_mode.as_str(), a.tc_uplink) {
            ("off", _) => "tc ingress alone".to_string(),
            (m, true) => format!("XDP in {m} mode, tc ingress behind it"),
            (m, false) => format!("XDP in {m} mode"),
        };
        out.push_str(&format!(
            "interface {}: north-south by {hook}  addresses {:?}\n",
            a.iface, a.node_addrs,
        ));
        if !a.xdp_mode_reason.is_empty() {
            out.push_str(&format!("  (why: {})\n", a.xdp_mode_reason));
        }
        out.push_str(&format!(
            "pod interfaces {:?}: tc  socket LB {}  metrics {}\n",
            a.pod_ifaces,
            a.cgroup.as_deref().unwrap_or("off"),
            a.metrics_addr
                .as_deref()
                .map(|m| format!("http://{m}/metrics"))
                .unwrap_or_else(|| "off".into()),
        ));
        if let Some(e) = &a.last_error {
            out.push_str(&format!("last error (previous state kept): {e}\n"));
        }
        for l in &a.lb_addresses {
            out.push_str(&format!(
                "LoadBalancer address {} of {}/{} (pool {}): {}\n",
                l.addr,
                l.namespace,
                l.name,
                l.pool,
                if l.announced_here {
                    format!("announced by this node ({})", a.node_name)
                } else {
                    "announced by another node".to_string()
                }
            ));
        }
    }
    out.push_str(&t.to_string());
    out.push_str("\n\ncounters: ");
    let nz: Vec<String> = st
        .counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out.push_str(&nz.join(" "));
    out.push('\n');
    out
}
