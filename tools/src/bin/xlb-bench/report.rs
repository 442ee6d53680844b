//! RESULTS.md, the per-run JSON and the charts.
use std::path::Path;

use anyhow::{Context as _, Result};
use comfy_table::{Table, presets::ASCII_MARKDOWN};
use plotters::prelude::*;

use crate::{
    Results,
    ctl::summary,
    ns::{CONFIGS, Config, NorthSouth, med},
    pps::{PPS_CONFIGS, Pps, PpsConfig},
    xdp_rows::{ApplyRow, MaglevRow, PacketRow},
};

/// The newest results/*.json of `dir`.
pub fn previous(dir: &Path) -> Option<Results> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("results"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    let text = std::fs::read_to_string(files.last()?).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes the JSON, RESULTS.md and the charts; returns a line saying where.
pub fn write(r: &Results, dir: &Path) -> Result<String> {
    let results = dir.join("results");
    std::fs::create_dir_all(&results).with_context(|| results.display().to_string())?;
    let stamp = r.date.trim_end_matches(" UTC").replace([' ', ':'], "-");
    let json = results.join(format!("{stamp}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| json.display().to_string())?;
    let mut charts = Vec::new();
    if let Some(n) = &r.north_south {
        let cdir = dir.join("charts");
        std::fs::create_dir_all(&cdir)?;
        charts = write_charts(n, &cdir)?;
    }
    let md = dir.join("RESULTS.md");
    std::fs::write(&md, markdown(r, &json, &charts)).with_context(|| md.display().to_string())?;
    Ok(format!("{}, {}", md.display(), json.display()))
}

fn table(header: Vec<&str>, rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(ASCII_MARKDOWN).set_header(header);
    for row in rows {
        t.add_row(row);
    }
    t.to_string()
}

fn f(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

fn x(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.2}x"),
        _ => "-".into(),
    }
}

fn conn(n: &NorthSouth, c: Config, size: u32, path: &str) -> Option<f64> {
    med(&n.samples, c, size, "conn", path, |s| Some(s.value))
}

fn p99(n: &NorthSouth, c: Config, size: u32, path: &str) -> Option<f64> {
    med(&n.samples, c, size, "conn", path, |s| s.p99_us)
}

fn p50(n: &NorthSouth, c: Config, size: u32, path: &str) -> Option<f64> {
    med(&n.samples, c, size, "conn", path, |s| s.p50_us)
}

fn iperf(n: &NorthSouth, c: Config, size: u32, w: &str, path: &str) -> Option<f64> {
    med(&n.samples, c, size, w, path, |s| Some(s.value))
}

/// Headline: NodePort conn/s and p99 per configuration and size.
pub fn headline(n: &NorthSouth) -> String {
    let mut rows = Vec::new();
    for &size in &n.sizes {
        let mut row = vec![size.to_string()];
        for c in CONFIGS {
            row.push(
                match (conn(n, c, size, "nodeport"), p99(n, c, size, "nodeport")) {
                    (Some(r), Some(l)) => format!("{r:.0} /s, p99 {l:.0} µs"),
                    _ => "-".into(),
                },
            );
        }
        row.push(x(ratio(
            conn(n, Config::Ours, size, "nodeport"),
            conn(n, Config::Iptables, size, "nodeport"),
        )));
        row.push(x(ratio(
            conn(n, Config::Ours, size, "nodeport"),
            conn(n, Config::Ceiling, size, "nodeport"),
        )));
        rows.push(row);
    }
    let mut header = vec!["services"];
    header.extend(CONFIGS.iter().map(|c| c.label()));
    header.extend(["ours/iptables", "ours/ceiling"]);
    table(header, rows)
}

struct Target {
    what: &'static str,
    goal: &'static str,
    got: String,
    met: Option<bool>,
}

fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    if let Some(n) = &r.north_south {
        let largest = n.sizes.iter().copied().max().unwrap_or(1);
        let sizes: &[u32] = if largest == 1 { &[1] } else { &[1, largest] };
        // Issue 13's targets: default flags (ours), one run side by side with the ceiling.
        for &size in sizes {
            for (path, what_rate, what_p99) in [
                (
                    "nodeport",
                    "NodePort conn/s vs ceiling",
                    "NodePort p99 latency vs ceiling",
                ),
                (
                    "lbip",
                    "LB IP conn/s vs ceiling",
                    "LB IP p99 latency vs ceiling",
                ),
            ] {
                let v = ratio(
                    conn(n, Config::Ours, size, path),
                    conn(n, Config::Ceiling, size, "nodeport"),
                );
                t.push(Target {
                    what: what_rate,
                    goal: ">= 0.95x",
                    got: format!("{} ({size} services)", x(v)),
                    met: v.map(|v| v >= 0.95),
                });
                let v = ratio(
                    p99(n, Config::Ours, size, path),
                    p99(n, Config::Ceiling, size, "nodeport"),
                );
                t.push(Target {
                    what: what_p99,
                    goal: "<= 1.1x",
                    got: format!("{} ({size} services)", x(v)),
                    met: v.map(|v| v <= 1.1),
                });
            }
        }
        for w in ["iperf1", "iperf4"] {
            let v = ratio(
                iperf(n, Config::Ours, 1, w, "nodeport"),
                iperf(n, Config::Ceiling, 1, w, "nodeport"),
            );
            t.push(Target {
                what: if w == "iperf1" {
                    "NodePort throughput vs ceiling, 1 stream"
                } else {
                    "NodePort throughput vs ceiling, 4 streams"
                },
                goal: ">= 0.95x",
                got: x(v),
                met: v.map(|v| v >= 0.95),
            });
        }
    }
    if let Some(p) = &r.pps {
        let mpps = |c| crate::pps::med(p, c, |x| x.mpps);
        for (other, goal, min, what) in [
            (
                PpsConfig::Nftables,
                ">= 2x",
                2.0,
                "packets/s per core through a NodePort vs nftables",
            ),
            (
                PpsConfig::Routing,
                ">= 0.9x",
                0.9,
                "packets/s per core through a NodePort vs plain routing",
            ),
        ] {
            let v = ratio(mpps(PpsConfig::Ours), mpps(other));
            t.push(Target {
                what,
                goal,
                got: x(v),
                met: v.map(|v| v >= min),
            });
        }
    }
    if let Some(xd) = &r.xdp {
        let max = xd.packets.iter().map(|p| p.services).max().unwrap_or(1);
        for scen in [
            "established, local (in-kernel loop)",
            "new flow, local (DNAT, XDP_PASS)",
        ] {
            let get = |n: u32| {
                xd.packets
                    .iter()
                    .find(|p| p.scenario == scen && p.services == n)
                    .map(|p| {
                        if scen.contains("loop") {
                            p.ours_ns
                        } else {
                            p.net_ns
                        }
                    })
            };
            let v = ratio(get(max), get(1));
            t.push(Target {
                what: if scen.contains("loop") {
                    "per-packet cost, largest vs 1 service (established)"
                } else {
                    "per-packet cost, largest vs 1 service (new flow, net of floor)"
                },
                goal: "<= 1.1x",
                got: format!("{} ({max} services)", x(v)),
                met: v.map(|v| v <= 1.1),
            });
        }
    }
    if let Some(b) = r.maglev.as_ref().and_then(|m| {
        m.builds
            .iter()
            .find(|b| b.m == 65_537 && b.backends == 1_000)
    }) {
        t.push(Target {
            what: "Maglev build, M=65537, 1000 backends",
            goal: "<= 1.8 ms",
            got: format!("{:.2} ms", b.build_ms),
            met: Some(b.build_ms <= 1.8),
        });
    }
    if let Some(c) = r.control_plane.as_ref().filter(|c| c.services > 0) {
        let (_, _, med) = summary(&c.ours_bulk_ms);
        t.push(Target {
            what: "services programmed at once (agent)",
            goal: "<= 1 s for 10,000",
            got: format!(
                "{:.0} ms for {} x {} endpoints",
                med, c.services, c.endpoints
            ),
            met: (c.services >= 10_000).then_some(med <= 1000.0),
        });
        let (_, p99, _) = summary(&c.ours_change_ms);
        t.push(Target {
            what: "one endpoint change visible, p99",
            goal: "<= 50 ms",
            got: format!("{p99:.0} ms"),
            met: Some(p99 <= 50.0),
        });
    }
    t
}

fn targets_table(r: &Results) -> String {
    let rows = targets(r)
        .into_iter()
        .map(|t| {
            vec![
                t.what.to_owned(),
                t.goal.to_owned(),
                t.got,
                match t.met {
                    Some(true) => "met".into(),
                    Some(false) => "**missed**".into(),
                    None => "n/a".into(),
                },
            ]
        })
        .collect();
    table(vec!["target", "goal", "measured (median)", ""], rows)
}

fn ns_section(n: &NorthSouth, s: &mut String, charts: &[String]) {
    *s += &format!(
        "\n## North-south: client -> NodePort / LB IP\n\n- {} round(s), configurations alternating; {} connections per conn run from {} threads; iperf3 -t {}\n\n",
        n.rounds, n.conns, n.threads, n.iperf_seconds
    );
    if n.ceiling_xdp {
        *s += "- **diagnostic run**: the ceiling has the XDP pass program on both ends of the entry node's uplink (`--ceiling-xdp`)\n\n";
    }
    for c in charts {
        *s += &format!("![{c}](charts/{c})\n");
    }
    let mut rows = Vec::new();
    for &size in &n.sizes {
        for c in CONFIGS {
            let paths: &[&str] = if c == Config::Ceiling {
                &["direct"]
            } else {
                &["nodeport", "lbip"]
            };
            for &path in paths {
                if conn(n, c, size, path).is_none() && iperf(n, c, size, "iperf1", path).is_none() {
                    continue;
                }
                rows.push(vec![
                    size.to_string(),
                    c.label().to_owned(),
                    path.to_owned(),
                    f(conn(n, c, size, path), 0),
                    f(p50(n, c, size, path), 0),
                    f(p99(n, c, size, path), 0),
                    f(iperf(n, c, size, "iperf1", path), 2),
                    f(iperf(n, c, size, "iperf4", path), 2),
                ]);
            }
        }
    }
    *s += "\nMedians over rounds (ceiling: the client connects to the pods directly).\n\n";
    *s += &table(
        vec![
            "services",
            "configuration",
            "path",
            "conn/s",
            "p50 µs",
            "p99 µs",
            "iperf 1 Gbit/s",
            "iperf 4 Gbit/s",
        ],
        rows,
    );
    let mut rows = Vec::new();
    for &size in &n.sizes {
        for path in ["nodeport", "lbip"] {
            let o = |get: &dyn Fn(Config) -> Option<f64>, other: Config| {
                x(ratio(get(Config::Ours), get(other)))
            };
            let cr = |c: Config| conn(n, c, size, path);
            let lat = |c: Config| p99(n, c, size, path);
            let tp = |c: Config| iperf(n, c, size, "iperf4", path);
            rows.push(vec![
                size.to_string(),
                path.to_owned(),
                o(&cr, Config::Iptables),
                o(&cr, Config::Nftables),
                o(&cr, Config::Ceiling),
                o(&lat, Config::Iptables),
                o(&lat, Config::Nftables),
                o(&lat, Config::Ceiling),
                o(&tp, Config::Iptables),
                o(&tp, Config::Ceiling),
            ]);
        }
    }
    *s += "\n\nRatios (conn/s and throughput above 1, latency below 1 favour ours):\n\n";
    *s += &table(
        vec![
            "services",
            "path",
            "conn/s /iptables",
            "conn/s /nftables",
            "conn/s /ceiling",
            "p99 /iptables",
            "p99 /nftables",
            "p99 /ceiling",
            "iperf4 /iptables",
            "iperf4 /ceiling",
        ],
        rows,
    );
    let rows = n
        .programming
        .iter()
        .filter(|p| p.config != Config::Ceiling)
        .map(|p| {
            vec![
                p.services.to_string(),
                p.config.label().to_owned(),
                format!("{:.2}", p.seconds),
                if p.rules > 0 {
                    p.rules.to_string()
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    *s += "\n\nProgramming the entry node (ours: manifest written until every agent's status shows all services; includes the agents' 20 ms file poll and the status reads):\n\n";
    *s += &table(
        vec!["services", "configuration", "seconds", "rules/lines"],
        rows,
    );
    *s += "\n";
    if !n.skipped.is_empty() {
        *s += "\nNot measured:\n\n";
        for k in &n.skipped {
            *s += &format!("- {k}\n");
        }
    }
}

fn pps_section(p: &Pps, s: &mut String) {
    *s += &format!(
        "\n## Packet rate: {}-byte UDP frames to a NodePort whose endpoint is on another node\n\n\
         - command: `{}`\n- {} flows (source ports), {} s windows, {} repeat(s) (medians), configurations alternating; generator: {}\n\n",
        p.frame_bytes, p.command, p.flows, p.seconds, p.repeats, p.generator
    );
    let mpps = |c| crate::pps::med(p, c, |x| x.mpps);
    let cpu = |c| crate::pps::med(p, c, |x| x.cpu_ns_per_packet);
    let mut rows = Vec::new();
    for c in PPS_CONFIGS {
        if mpps(c).is_none() {
            continue;
        }
        rows.push(vec![
            c.label().to_owned(),
            p.xdp_modes
                .get(c.key())
                .cloned()
                .unwrap_or_else(|| "-".into()),
            f(mpps(c), 3),
            f(crate::pps::med(p, c, |x| x.sent_mpps), 3),
            f(
                crate::pps::med(p, c, |x| 100.0 * x.delivered as f64 / x.sent.max(1) as f64),
                1,
            ),
            f(cpu(c), 0),
            f(crate::pps::med(p, c, |x| x.softirq_ns_per_packet), 0),
            f(crate::pps::med(p, c, |x| 100.0 * x.gen_cpu_share), 0),
        ]);
    }
    *s += &table(
        vec![
            "configuration",
            "XDP mode",
            "Mpps delivered",
            "Mpps sent",
            "delivered %",
            "CPU ns/packet (sys+irq+softirq)",
            "softirq ns/packet",
            "% of it on the generator's CPU",
        ],
        rows,
    );
    *s += &format!(
        "\n\nThe generator and the whole path share CPU {}; where the last column is well below \
         100, a veth's NAPI poll (native XDP) ran on the other CPU part of the time and Mpps is \
         not a one-CPU figure: compare CPU ns/packet there.",
        p.gen_cpu
    );
    let mut rows = Vec::new();
    for ours in [
        PpsConfig::Ours,
        PpsConfig::OursGeneric,
        PpsConfig::OursNative,
    ] {
        if mpps(ours).is_none() {
            continue;
        }
        let mut row = vec![ours.label().to_owned()];
        let others = [
            PpsConfig::Nftables,
            PpsConfig::Iptables,
            PpsConfig::Routing,
            PpsConfig::RoutingXdp,
        ];
        for other in others {
            row.push(x(ratio(mpps(ours), mpps(other))));
        }
        for other in others {
            row.push(x(ratio(cpu(ours), cpu(other))));
        }
        rows.push(row);
    }
    *s += "\n\nRatios (Mpps above 1 and CPU per packet below 1 favour ours):\n\n";
    *s += &table(
        vec![
            "",
            "Mpps /nftables",
            "Mpps /iptables",
            "Mpps /routing",
            "Mpps /routing+XDP",
            "CPU/pkt /nftables",
            "CPU/pkt /iptables",
            "CPU/pkt /routing",
            "CPU/pkt /routing+XDP",
        ],
        rows,
    );
    *s += "\n\nMethod:\n\n";
    for m in &p.method {
        *s += &format!("- {m}\n");
    }
}

fn markdown(r: &Results, json: &Path, charts: &[String]) -> String {
    let mut s = String::from(
        "# xlb benchmark results\n\nWritten by `xlb-bench` (`cargo xtask bench`); every sample is in the run's JSON file. \
         Targets are reported, not asserted.\n\n",
    );
    s += &format!("- command: `{}` ({})\n", r.command, r.date);
    s += &format!(
        "- samples: [`{}`](results/{})\n",
        json.file_name().unwrap_or_default().to_string_lossy(),
        json.file_name().unwrap_or_default().to_string_lossy()
    );
    s += &format!("- kernel {}, {} ({} CPUs)\n", r.kernel, r.cpu, r.cpus);
    s += &format!(
        "- load average (1/5/15 min) at start {}, at end {} — other work shares this 2-core machine, so figures are noisy\n",
        r.loadavg_start, r.loadavg_end
    );
    for (k, v) in &r.versions {
        s += &format!("- {k}: {v}\n");
    }
    for (part, from) in &r.parts {
        s += &format!("- {part}: from `{from}`\n");
    }
    if r.quick {
        s += "- **quick run**: small sizes, one round; a smoke test, not a measurement\n";
    }
    s += &format!("\n## Targets\n\n{}\n", targets_table(r));
    if let Some(n) = &r.north_south {
        s += &format!(
            "\n## Headline: NodePort connections/s and p99 latency\n\n{}\n",
            headline(n)
        );
    }
    if !r.failures.is_empty() {
        s += "\n## Failures\n\n";
        for f in &r.failures {
            s += &format!("```\n{f}\n```\n");
        }
    }
    if let Some(n) = &r.north_south {
        ns_section(n, &mut s, charts);
    }
    if let Some(p) = &r.pps {
        pps_section(p, &mut s);
    }
    if let Some(c) = &r.control_plane {
        let line = |what: &str, v: &[f64]| {
            let (p50, p99, _) = summary(v);
            vec![
                what.to_owned(),
                v.len().to_string(),
                format!("{p50:.1}"),
                format!("{p99:.1}"),
                format!("{:.1}", v.iter().copied().fold(f64::NAN, f64::max)),
            ]
        };
        // `--ctl-scale-only` runs the scale rows alone: no small-run section then.
        if c.services > 0 {
            s += &format!(
                "\n## Control plane: {} services x {} endpoints\n\nagent arguments: {}; iptables: {} nat rules; nft: {} lines\n\n",
                c.services,
                c.endpoints,
                if c.agent_args.is_empty() {
                    "none (defaults)".to_owned()
                } else {
                    format!("`{}`", c.agent_args.join(" "))
                },
                c.iptables_rules,
                c.nft_lines
            );
            s += &table(
                vec!["what", "n", "p50 ms", "p99 ms", "max ms"],
                vec![
                    line(
                        "ours: all services at once (manifest -> maps)",
                        &c.ours_bulk_ms,
                    ),
                    line(
                        "ours: one endpoint added/removed (manifest -> maps)",
                        &c.ours_change_ms,
                    ),
                    line(
                        "kube-proxy iptables: iptables-restore, full ruleset",
                        &c.iptables_full_ms,
                    ),
                    line(
                        "kube-proxy iptables: iptables-restore --noflush, one service",
                        &c.iptables_partial_ms,
                    ),
                    line("kube-proxy nftables: nft -f, full table", &c.nft_full_ms),
                    line(
                        "kube-proxy nftables: nft -f, one service",
                        &c.nft_partial_ms,
                    ),
                ],
            );
            if !c.breakdown.is_empty() {
                s += "\n\nWhere the agent's time goes (the same steps timed in the bench process, medians):\n\n";
                s += &table(
                    vec!["step", "ms"],
                    c.breakdown
                        .iter()
                        .map(|(k, v)| vec![k.clone(), format!("{v:.1}")])
                        .collect(),
                );
            }
            if let Some(note) = &c.limit_note {
                s += &format!("\n\nNote: {note}.\n");
            }
            s += "\n\nMethod:\n\n";
            for m in &c.method {
                s += &format!("- {m}\n");
            }
        }
        s += &crate::ctl::scales_section(c);
    }
    if let Some(xd) = &r.xdp {
        s += &format!(
            "\n## XDP per-packet cost (BPF_PROG_TEST_RUN)\n\nrepeats {} (medians), flows per pass {}, loop repeat {}\n\n",
            xd.repeats, xd.flows, xd.loop_repeat
        );
        s += &table(
            PacketRow::HEADER.to_vec(),
            xd.packets.iter().map(PacketRow::cells).collect(),
        );
        s += "\n\nIn-process programming (Programmer::apply, first programming):\n\n";
        s += &table(
            ApplyRow::HEADER.to_vec(),
            xd.apply.iter().map(ApplyRow::cells).collect(),
        );
        s += "\n\nMethod:\n\n";
        for m in &xd.method {
            s += &format!("- {m}\n");
        }
    }
    if let Some(m) = &r.maglev {
        s += "\n## Maglev\n\n";
        s += &table(
            vec!["M", "backends", "build ms (median)"],
            m.builds.iter().map(MaglevRow::cells).collect(),
        );
        s += "\n\nOne backend of N removed (slots moved vs the ideal M/N) and balance (slots per backend):\n\n";
        s += &table(
            vec![
                "M",
                "backends",
                "slots moved",
                "moved / ideal",
                "max slots",
                "min slots",
                "max/min",
            ],
            m.disruption
                .iter()
                .map(|d| {
                    vec![
                        d.m.to_string(),
                        d.backends.to_string(),
                        d.moved_slots.to_string(),
                        format!("{:.3}", d.moved_vs_ideal),
                        d.max_slots.to_string(),
                        d.min_slots.to_string(),
                        format!("{:.3}", d.max_slots as f64 / d.min_slots.max(1) as f64),
                    ]
                })
                .collect(),
        );
        s += "\n";
    }
    if let Some(n) = &r.north_south {
        s += "\n## North-south method\n\n";
        for m in &n.method {
            s += &format!("- {m}\n");
        }
        s += &format!(
            "- ours' lb-agent arguments beyond the harness's: {}\n",
            if n.ours_agent_args.is_empty() {
                "none (defaults)".to_owned()
            } else {
                format!("`{}`", n.ours_agent_args.join(" "))
            }
        );
    }
    s
}

// ---------------------------------------------------------------- charts

const COLORS: [RGBColor; 4] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x55, 0x55, 0x55),
];

/// A chart's value for (configuration, services).
type Getter<'a> = dyn Fn(Config, u32) -> Option<f64> + 'a;

fn write_charts(n: &NorthSouth, dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let charts: [(&str, &str, &Getter); 4] = [
        ("conn_rate.svg", "NodePort: new connections/s", &|c, s| {
            conn(n, c, s, "nodeport")
        }),
        (
            "latency_p50.svg",
            "NodePort: request latency p50 (µs)",
            &|c, s| p50(n, c, s, "nodeport"),
        ),
        (
            "latency_p99.svg",
            "NodePort: request latency p99 (µs)",
            &|c, s| p99(n, c, s, "nodeport"),
        ),
        (
            "throughput.svg",
            "NodePort: iperf3, 4 streams (Gbit/s)",
            &|c, s| iperf(n, c, s, "iperf4", "nodeport"),
        ),
    ];
    for (file, title, get) in charts {
        let path = dir.join(file);
        line_chart(&path, title, &n.sizes, get)
            .map_err(|e| anyhow::anyhow!("chart {}: {e}", path.display()))?;
        out.push(file.to_owned());
    }
    Ok(out)
}

fn line_chart(
    path: &Path,
    title: &str,
    sizes: &[u32],
    get: &dyn Fn(Config, u32) -> Option<f64>,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (760, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let ymax = CONFIGS
        .iter()
        .flat_map(|&c| sizes.iter().filter_map(move |&s| get(c, s)))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let xmax = f64::from(sizes.iter().copied().max().unwrap_or(1)).max(10.0) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.7f64..xmax).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("services programmed (log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, c) in CONFIGS.iter().enumerate() {
        let pts: Vec<(f64, f64)> = sizes
            .iter()
            .filter_map(|&s| get(*c, s).map(|v| (f64::from(s), v)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let color = COLORS[i];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(c.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
