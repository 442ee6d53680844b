use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use lb_agent::{agent, kube_source::KubeSource, netinfo, status};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "xlb: XDP/Maglev load balancer for Kubernetes Services"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the datapath, then follow the source.
    Run(agent::RunArgs),
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
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().cmd {
        Cmd::Run(args) => run(args),
        Cmd::Status {
            node_name,
            pin_dir,
            run_dir,
            output,
        } => {
            let node = match (&node_name, &pin_dir) {
                (Some(n), _) => n.clone(),
                (None, Some(p)) => p
                    .file_name()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                (None, None) => only_node()?,
            };
            let pin_dir = pin_dir.unwrap_or_else(|| agent::default_pin_dir(&node));
            let run_dir = run_dir.unwrap_or_else(|| agent::default_run_dir(&node));
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
    let dirs: Vec<String> = std::fs::read_dir(lb_agent::datapath::PIN_ROOT)
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
            lb_agent::datapath::PIN_ROOT
        ),
        many => bail!(
            "several nodes pinned ({}); pass --node-name",
            many.join(", ")
        ),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn run(args: agent::RunArgs) -> Result<()> {
    // The API client's configuration is checked before anything is attached; nothing is
    // programmed until both initial lists are complete (see kube_source).
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
    let mut agent = agent::Agent::start(args, &first)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // The file source is polled (with the kube source the tick only expires drained
    // backends): it works the same for editors that replace the file, for
    // ConfigMap symlink swaps and for bind mounts, where inotify watches go stale.
    let mut every = tokio::time::interval(Duration::from_millis(300));
    // Link notifications can be lost (the socket's buffer overflows under a burst), so a
    // full listing also runs now and then.
    let mut rescan = tokio::time::interval(Duration::from_secs(10));
    rescan.tick().await;
    let mut notifications = true;
    let mut last_err = String::new();
    loop {
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
                if let Some(k) = &kube {
                    for ev in agent.take_new_events() {
                        k.post_event(&ev);
                    }
                }
            }
            _ = every.tick() => {
                // A persistent problem (file missing) is logged once, not every tick.
                match agent.tick(Instant::now()) {
                    Ok(()) => last_err.clear(),
                    Err(e) => {
                        let msg = format!("{e:#}");
                        if msg != last_err {
                            log::error!("{msg}");
                            last_err = msg;
                        }
                    }
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    log::info!(
        "stopping: programs stay attached through their pinned links and maps stay pinned, \
         so the next agent takes over without loss (`lb-agent cleanup` removes them)"
    );
    drop(agent);
    Ok(())
}

/// The kube source's next snapshot; never ready with the file source.
async fn next_snapshot(
    kube: &mut Option<KubeSource>,
) -> Option<std::sync::Arc<lb_agent::k8s::Objects>> {
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
