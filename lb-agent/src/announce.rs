//! Announcing LoadBalancer addresses on the node network (MetalLB's L2 mode, done by the
//! agents themselves): one node answers ARP for each address, from its XDP program.
//!
//! Every agent broadcasts a heartbeat on its uplink every [`INTERVAL`] saying which
//! addresses it may announce and which it announces ([`heartbeat`]); a peer not heard for
//! [`DEAD_AFTER`] is gone. From the heartbeats each agent decides alone which addresses are
//! its own ([`owner`]: sticky, then rendezvous hashing), writes them to `XLB_ARP`, keeps the
//! datapath's lease running ([`arp`]), and sends a gratuitous ARP for each address it
//! takes over. An owner whose node or uplink goes down is replaced within
//! `DEAD_AFTER` + one interval; a node whose agent is gone stops answering when its lease
//! (`lb_common::ANNOUNCE_LEASE_MS`) runs out, while its peers have taken its addresses over
//! already (its XDP still forwards what reaches it meanwhile). No API server is involved, so
//! there is no API load and the file source works the same.
//!
//! The heartbeats are not authenticated: anything on the node network that can send UDP
//! broadcasts to the heartbeat port can claim addresses, as with ARP itself.
pub mod arp;
pub mod heartbeat;
pub mod owner;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::serve::metrics::Metrics;

/// Heartbeat period.
pub const INTERVAL: Duration = Duration::from_millis(100);
/// A peer not heard for this long is gone (three heartbeats lost, and a margin).
pub const DEAD_AFTER: Duration = Duration::from_millis(350);
/// After start, nothing is announced until the peers have been heard for this long, so a
/// restarting agent does not claim addresses others hold.
pub const SETTLE: Duration = Duration::from_millis(350);

/// The running announcer; dropping it stops the heartbeats and the ARP answers.
pub struct Announce {
    eligible: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
    announced: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Announce {
    pub fn start(
        node: String,
        link: heartbeat::Link,
        announcer: arp::Announcer,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let eligible = Arc::new(Mutex::new(BTreeSet::new()));
        let announced = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let state = Loop {
            iface: link.iface().to_string(),
            node,
            link,
            announcer,
            metrics,
            eligible: eligible.clone(),
            announced: announced.clone(),
            stop: stop.clone(),
            peers: BTreeMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("xlb-announce".into())
            .spawn(move || state.run())?;
        Ok(Self {
            eligible,
            announced,
            stop,
            thread: Some(thread),
        })
    }

    /// The addresses this node may announce (from the last programmed state).
    pub fn set_eligible(&self, set: BTreeSet<Ipv4Addr>) {
        *self.eligible.lock().unwrap_or_else(|e| e.into_inner()) = set;
    }

    /// The addresses this node announces now.
    pub fn announced(&self) -> BTreeSet<Ipv4Addr> {
        self.announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for Announce {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Loop {
    node: String,
    /// The uplink, whose carrier is watched: a node cut off the network hears no peers and
    /// must not go on claiming every address (see `run`).
    iface: String,
    link: heartbeat::Link,
    announcer: arp::Announcer,
    metrics: Arc<Metrics>,
    eligible: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
    announced: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
    stop: Arc<AtomicBool>,
    /// Live peers: when last heard, and what they said.
    peers: BTreeMap<String, (Instant, owner::PeerView)>,
}

impl Loop {
    /// One pass per [`INTERVAL`]: send the heartbeat, take in every peer's until the next
    /// one is due, then decide and renew the lease — once per interval, not per datagram
    /// received (a large cluster sends many).
    fn run(mut self) {
        let mut started = Instant::now();
        let mut mine: BTreeSet<Ipv4Addr> = BTreeSet::new();
        while !self.stop.load(Ordering::Relaxed) {
            let next = Instant::now() + INTERVAL;
            // Uplink down: this node hears no peer and would believe itself alone, claim
            // every address, and win some back by score when the link returns — moving
            // them away from the node that served them meanwhile (and its tracked flows).
            // So it announces nothing while the link is down, and settles again (claiming
            // nothing until its peers have been heard) when it comes back, as after a
            // restart.
            if !carrier(&self.iface) {
                if !mine.is_empty() {
                    log::warn!(
                        "announce: {} has no carrier: announcing nothing",
                        self.iface
                    );
                    mine.clear();
                    let _ = self.announcer.set(&mine);
                    self.publish(&mine);
                }
                self.peers.clear();
                started = Instant::now();
                std::thread::sleep(INTERVAL);
                continue;
            }
            let eligible = self
                .eligible
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            // A node with nothing to announce stays quiet: a cluster without L2 pools sees
            // no heartbeats at all.
            if !eligible.is_empty() || !mine.is_empty() {
                let hb = heartbeat::Heartbeat {
                    v: heartbeat::VERSION,
                    node: self.node.clone(),
                    eligible: eligible.clone(),
                    announcing: mine.clone(),
                };
                if let Err(e) = self.link.send(&hb) {
                    log::debug!("heartbeat send: {e:#}");
                }
            }
            self.receive_until(next);
            self.forget_silent_peers();
            if started.elapsed() < SETTLE {
                continue;
            }
            let peers: Vec<owner::PeerView> = self.peers.values().map(|(_, v)| v.clone()).collect();
            let want = owner::decide(&self.node, &eligible, &mine, &peers);
            if want != mine {
                match self.announcer.set(&want) {
                    Ok(new) => {
                        for a in new {
                            log::warn!("announce: taking over {a}");
                            self.metrics.announce().takeovers.inc();
                            if let Err(e) = self.announcer.gratuitous(a) {
                                log::warn!("{e:#}");
                            }
                        }
                        mine = want;
                        self.publish(&mine);
                    }
                    Err(e) => log::warn!("announce: writing XLB_ARP: {e:#}"),
                }
            }
            if let Err(e) = self.announcer.renew() {
                log::warn!("announce: renewing the ARP lease: {e:#}");
            }
        }
        let _ = self.announcer.set(&BTreeSet::new());
        self.announcer.expire();
    }

    /// Every peer's heartbeat that arrives before `deadline`.
    fn receive_until(&mut self, deadline: Instant) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.link.recv(left) {
                Ok(Some(hb)) if hb.node != self.node => {
                    if !self.peers.contains_key(&hb.node) {
                        log::info!("announce: peer {} heard", hb.node);
                    }
                    self.peers
                        .insert(hb.node.clone(), (Instant::now(), hb.view()));
                }
                Ok(_) => {}
                Err(e) => {
                    log::warn!("heartbeat receive: {e:#}");
                    std::thread::sleep(left);
                    return;
                }
            }
        }
    }

    fn forget_silent_peers(&mut self) {
        let now = Instant::now();
        let before = self.peers.len();
        self.peers.retain(|node, (seen, _)| {
            let live = now.duration_since(*seen) < DEAD_AFTER;
            if !live {
                log::warn!("announce: peer {node} silent for {DEAD_AFTER:?}: gone");
            }
            live
        });
        let m = self.metrics.announce();
        m.peers_lost.inc_by((before - self.peers.len()) as u64);
        m.peers.set(self.peers.len() as i64);
    }

    /// `mine` is what `XLB_ARP` holds now: metrics and `Announce::announced` follow.
    fn publish(&self, mine: &BTreeSet<Ipv4Addr>) {
        self.metrics.announce().owned.set(mine.len() as i64);
        *self.announced.lock().unwrap_or_else(|e| e.into_inner()) = mine.clone();
    }
}

/// `iface` is up with a carrier (IFF_RUNNING), as seen from this network namespace.
fn carrier(iface: &str) -> bool {
    use nix::net::if_::InterfaceFlags;
    nix::ifaddrs::getifaddrs()
        .map(|mut all| {
            all.any(|i| {
                i.interface_name == iface
                    && i.flags
                        .contains(InterfaceFlags::IFF_UP | InterfaceFlags::IFF_RUNNING)
            })
        })
        // Unknown: keep going rather than drop every address.
        .unwrap_or(true)
}
