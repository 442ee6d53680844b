use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use lb_agent::{
    agent,
    dataplane::{cgroup, conntrack, netinfo},
    serve::{metrics, node_health},
    source::kube::KubeSource,
    status,
};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "xlb: XDP/Maglev load balancer for Kubernetes Services"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines as `key=value` fields (text) or one JSON object per line (json). The level
    /// comes from RUST_LOG (default info) and can be changed at run time through the
    /// agent's `/loglevel`.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// `lb-agent run`: the agent's flags, then the one that goes with `--cgroup` (which also
/// sets `--cgroup`'s help: see dataplane::cgroup).
#[derive(clap::Args)]
struct RunCmd {
    #[command(flatten)]
    args: agent::RunArgs,
    #[command(flatten)]
    cgroup: cgroup::CgroupFlags,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the datapath, then follow the source.
    Run(Box<RunCmd>),
    /// Show what is programmed, read from the pinned maps.
    Status {
        /// Node whose pins to read [default: the only node pinned under /sys/fs/bpf/xlb].
        #[arg(long)]
        node_name: Option<String>,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// Detach every program the agent left attached (pinned links) and remove its pinned
    /// maps and run-time files. Established flows through xlb end.
    Cleanup {
        /// Node whose pins to remove [default: the only node pinned under /sys/fs/bpf/xlb].
        #[arg(long)]
        node_name: Option<String>,
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        #[arg(long)]
        run_dir: Option<PathBuf>,
    },
}

/// `--node-name`, or the pin directory's name, or the only node pinned.
fn resolve_node(node_name: &Option<String>, pin_dir: &Option<PathBuf>) -> Result<String> {
    Ok(match (node_name, pin_dir) {
        (Some(n), _) => n.clone(),
        (None, Some(p)) => p
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        (None, None) => only_node()?,
    })
}

/// Logs at every level pass env_logger's filter (unless RUST_LOG has per-module
/// directives) so that `log::max_level`, which `/loglevel` sets, governs.
fn init_logging(format: LogFormat) {
    use std::io::Write as _;
    let mut builder = env_logger::Builder::new();
    let env = std::env::var("RUST_LOG").unwrap_or_default();
    let env = env.trim();
    let level = if env.is_empty() {
        Some(log::LevelFilter::Info)
    } else {
        env.parse::<log::LevelFilter>().ok()
    };
    match level {
        Some(_) => {
            builder.filter_level(log::LevelFilter::Trace);
        }
        // Per-module directives: env_logger applies them; /loglevel can only lower
        // the level below them.
        None => {
            builder.parse_filters(env);
        }
    }
    builder.format(move |buf, rec| {
        let ts = buf.timestamp_millis();
        let level = rec.level().as_str().to_lowercase();
        let msg = rec.args().to_string();
        match format {
            LogFormat::Json => writeln!(
                buf,
                "{}",
                serde_json::json!({
                    "ts": ts.to_string(),
                    "level": level,
                    "target": rec.target(),
                    "msg": msg,
                })
            ),
            LogFormat::Text => writeln!(
                buf,
                "ts={ts} level={level} target={} msg={}",
                rec.target(),
                logfmt_value(&msg)
            ),
        }
    });
    builder.init();
    if let Some(level) = level {
        log::set_max_level(level);
    }
}

/// A logfmt value: quoted (with `\\`, `\"` and `\n` escapes) when it is empty or holds a
/// space, a quote, an `=` or a control character.
fn logfmt_value(s: &str) -> String {
    let plain = !s.is_empty()
        && !s
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '=' || c.is_control());
    if plain {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Pin and run directories from the flags, defaulting by node name.
fn dirs(
    node_name: Option<String>,
    pin_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
) -> Result<(PathBuf, PathBuf)> {
    let node = resolve_node(&node_name, &pin_dir)?;
    Ok((
        pin_dir.unwrap_or_else(|| agent::default_pin_dir(&node)),
        run_dir.unwrap_or_else(|| agent::default_run_dir(&node)),
    ))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Run(cmd) => {
            let RunCmd { mut args, cgroup } = *cmd;
            // Decided before anything is loaded: an explicit machine root without
            // --allow-cgroup-root refuses the start; the agent gets an explicit choice.
            args.cgroup = Some(
                match cgroup::resolve(args.cgroup.as_deref(), cgroup.allow_cgroup_root)? {
                    Some(path) => path.display().to_string(),
                    None => "none".to_string(),
                },
            );
            run(args)
        }
        Cmd::Cleanup {
            node_name,
            pin_dir,
            run_dir,
        } => {
            let (pin_dir, run_dir) = dirs(node_name, pin_dir, run_dir)?;
            let report = lb_agent::dataplane::datapath::cleanup(&pin_dir, &run_dir)?;
            println!("{report:?}");
            Ok(())
        }
        Cmd::Status {
            node_name,
            pin_dir,
            run_dir,
            output,
        } => {
            let (pin_dir, run_dir) = dirs(node_name, pin_dir, run_dir)?;
            let st = status::read(&pin_dir, &run_dir)?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", status::render(&st));
            }
            Ok(())
        }
    }
}

fn only_node() -> Result<String> {
    let dirs: Vec<String> = std::fs::read_dir(lb_agent::dataplane::datapath::PIN_ROOT)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    match dirs.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "nothing pinned under {}: is the agent running?",
            lb_agent::dataplane::datapath::PIN_ROOT
        ),
        many => bail!(
            "several nodes pinned ({}); pass --node-name",
            many.join(", ")
        ),
    }
}

// One worker thread next to the agent loop (which runs on the main thread, in block_on):
// the metrics, health and probe servers answer while the loop is busy programming, so
// `/healthz` can tell a stalled loop from a busy one.
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn run(args: agent::RunArgs) -> Result<()> {
    // Bound before anything is attached: a taken port fails the start early.
    let metrics_listener = metrics::bind(&args.metrics_addr)?;
    let healthz_listener = node_health::bind(&args.healthz_bind_address)?;
    // The API client's configuration is checked before anything is attached; nothing is
    // programmed until both initial lists are complete (see source::kube).
    let mut kube = match agent::parse_source(&args.source)? {
        agent::SourceSpec::Kube => Some(KubeSource::start(
            KubeSource::client().await?,
            &args.node_name,
        )),
        agent::SourceSpec::File(_) => None,
    };
    // Subscribed before the first listing, so that no pod interface appears unseen.
    let mut links = netinfo::LinkMonitor::new()?;
    let first = netinfo::list_links(&links.handle).await?;
    let pin_dir = args
        .pin_dir
        .clone()
        .unwrap_or_else(|| agent::default_pin_dir(&args.node_name));
    let mut agent = agent::Agent::start(args, &first)?;
    let metrics = agent.metrics();
    let _metrics_server = match metrics_listener {
        Some(l) => Some(AbortOnDrop(metrics::serve(l, metrics.clone())?)),
        None => None,
    };
    let _node_health_server = match healthz_listener {
        Some(l) => Some(AbortOnDrop(node_health::serve(l, agent.node_health())?)),
        None => None,
    };
    // Connection-tracking GC, on its own handles on the pins (see conntrack.rs).
    let _conntrack_gc = AbortOnDrop(conntrack::spawn(&pin_dir, metrics.clone())?);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The tick looks at the file source when the watch said it changed, or as a backstop
    // every so often (see Agent::tick); with the kube source it only expires drained
    // backends and resyncs. 20 ms keeps held changes (--min-sync-period) and unwatched
    // files within tens of milliseconds of the maps.
    let mut every = tokio::time::interval(Duration::from_millis(20));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watch =
        agent.file_watch_target().and_then(
            |(dir, name)| match lb_agent::source::watch::Watch::new(&dir, name) {
                Ok(w) => Some(w),
                Err(e) => {
                    log::warn!(
                        "cannot watch {} ({e}); the file source is polled every {:?}",
                        dir.display(),
                        agent::FILE_POLL
                    );
                    None
                }
            },
        );
    agent.set_file_watched(watch.is_some());
    // Link notifications can be lost (the socket's buffer overflows under a burst), so a
    // full listing also runs now and then.
    let mut rescan = tokio::time::interval(Duration::from_secs(10));
    rescan.tick().await;
    let mut notifications = true;
    let mut last_err = String::new();
    loop {
        agent.loop_alive();
        tokio::select! {
            changed = links.changed(), if notifications => {
                if !changed {
                    log::warn!("link notifications stopped; pod interfaces are re-listed every 10 s");
                    notifications = false;
                    continue;
                }
                sync_links(&mut agent, &links).await;
            }
            _ = rescan.tick() => sync_links(&mut agent, &links).await,
            objs = next_snapshot(&mut kube) => {
                let Some(objs) = objs else {
                    bail!("the Kubernetes watchers stopped");
                };
                agent.apply_objects(objs, Instant::now());
            }
            woke = next_file_change(&watch) => {
                match woke {
                    Ok(()) => agent.file_event(),
                    Err(e) => {
                        log::warn!(
                            "the file source's watch ended ({e}); it is polled every {:?}",
                            agent::FILE_POLL
                        );
                        watch = None;
                        agent.set_file_watched(false);
                    }
                }
                tick_and_report(&mut agent, &metrics, &mut last_err);
            }
            _ = every.tick() => tick_and_report(&mut agent, &metrics, &mut last_err),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        // New Events of whatever programmed last (a snapshot, or a re-apply when drained
        // backends expire), posted on their Services.
        if let Some(k) = &kube {
            for ev in agent.take_new_events() {
                k.post_event(&ev);
            }
            // The status of the Services whose address this node announces.
            for ((ns, name), ips) in agent.take_lb_status(Instant::now()) {
                k.write_lb_status(&ns, &name, &ips);
            }
        }
    }
    log::info!(
        "stopping: programs stay attached through their pinned links and maps stay pinned, \
         so the next agent takes over without loss (`lb-agent cleanup` removes them)"
    );
    drop(agent);
    Ok(())
}

/// One agent tick; a source that cannot be read is logged and counted once while the
/// same problem lasts.
fn tick_and_report(agent: &mut agent::Agent, metrics: &metrics::Metrics, last_err: &mut String) {
    match agent.tick(Instant::now()) {
        Ok(()) => last_err.clear(),
        Err(e) => {
            let msg = format!("{e:#}");
            if msg != *last_err {
                metrics.apply_error(metrics::ErrorKind::Source);
                log::error!("{msg}");
                *last_err = msg;
            }
        }
    }
}

/// The file source's next change (never, without a watch).
async fn next_file_change(watch: &Option<lb_agent::source::watch::Watch>) -> std::io::Result<()> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// The kube source's next snapshot; never ready with the file source.
async fn next_snapshot(
    kube: &mut Option<KubeSource>,
) -> Option<std::sync::Arc<lb_agent::source::yaml::Objects>> {
    match kube {
        Some(k) => k.next().await,
        None => std::future::pending().await,
    }
}

async fn sync_links(agent: &mut agent::Agent, links: &netinfo::LinkMonitor) {
    match netinfo::list_links(&links.handle).await {
        Ok(all) => agent.sync_pod_ifaces(&all),
        Err(e) => log::warn!("{e:#}"),
    }
}

/// Aborts a background task when dropped (at the agent's exit).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logfmt_values() {
        assert_eq!(logfmt_value("plain"), "plain");
        assert_eq!(logfmt_value(""), "\"\"");
        assert_eq!(logfmt_value("a b"), "\"a b\"");
        assert_eq!(logfmt_value("k=v"), "\"k=v\"");
        assert_eq!(
            logfmt_value("say \"hi\"\\\nnext"),
            "\"say \\\"hi\\\"\\\\\\nnext\""
        );
    }
}
