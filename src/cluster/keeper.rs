//! The lease keeper: one async task per consumer node that keeps its heartbeat and its
//! leases alive, balances shards with the other nodes, and stops using a lease before
//! anyone else may take it.
//!
//! Three loops run in the task, sharing the held-shard state under one lock:
//! - the **renewer**, every `renew_interval`: the node's heartbeat and one conditional
//!   renewal per held shard, all at once, each bounded by `call_timeout`. A renewal sent at
//!   `t` that succeeds moves the shard's self-fence deadline to `t + lease_duration -
//!   safety_margin` (from the *send* time: DynamoDB applied it later, so every observer saw
//!   it later still). A refused renewal (ConditionalCheckFailed) loses the shard at once.
//! - the **watchdog** sleeps until the earliest deadline and loses every shard past it, so
//!   a DynamoDB that is slow, throttled or unreachable makes this node give its shards up
//!   on its own clock, `safety_margin` before the earliest moment another node can judge
//!   the lease expired (see [`super::expiry`]). [`KeeperHandle::fence`] checks the deadline
//!   itself too, so a caller never gets a fence past it even if the watchdog has not run
//!   yet (a process resumed after a pause).
//! - the **balancer round**, every `scan_interval`: a consistent Scan of the lease table,
//!   the expiry observer, the [`super::balance::plan`], claims, hand-offs, and a new
//!   [`ShardMap`] for readers.
//!
//! A hand-off is cooperative: the keeper emits [`ShardEvent::Releasing`] and keeps renewing
//! while the consumer finishes its batch, flushes and acks; then the consumer calls
//! [`KeeperHandle::ready_to_release`] (or `handoff_timeout` passes) and the keeper stops
//! giving out the shard's fence, releases the lease and emits [`ShardEvent::Released`].
//! [`KeeperHandle::stop`] hands every shard off that way, deletes the heartbeat row and
//! ends the task (SIGTERM). A shard the table shows as ours but the keeper does not hold
//! (a renewal that succeeded after the self-fence, a restart under the same node id) is
//! released, never resumed: its state was dropped.
//!
//! Membership: one heartbeat row per node (`node#{id}`), its counter bumped every
//! `renew_interval` and judged by the same observer as the leases; a row unchanged for a
//! lease duration is a dead node, whose row any node deletes (conditional on the counter it
//! saw). A node is live from its first heartbeat until its row expires or it leaves; one
//! that appears while this keeper runs counts for hand-offs only after its heartbeat has
//! advanced once (damping for flapping nodes).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::balance::{plan, BalanceInput, ShardState};
use super::fence::Fence;
use super::lease::{LeaseError, LeaseRow, LeaseStore, TableSnapshot};
use super::map_watch::MapBuilder;
use super::{NodeInfo, ShardId};
use crate::bus::Stop;
use crate::domain::DayKey;

/// Timing and limits of a keeper. [`KeeperConfig::new`] gives the defaults (ADR 005).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeeperConfig {
    pub node: NodeInfo,
    /// How long an unchanged lease row stands before an observer may take it over.
    pub lease_duration: Duration,
    /// Heartbeat and renewal period.
    pub renew_interval: Duration,
    /// Balancer round and [`ShardMap`] refresh period.
    pub scan_interval: Duration,
    /// The owner stops using a lease this long before the lease duration has passed since
    /// its last successful renewal was sent.
    pub safety_margin: Duration,
    /// Timeout of one DynamoDB request of the keeper.
    pub call_timeout: Duration,
    /// How long a hand-off waits for the consumer's [`KeeperHandle::ready_to_release`].
    pub handoff_timeout: Duration,
    /// Claims per round (bounds the write burst when a node dies).
    pub max_acquire: usize,
    /// Hand-offs started per round by this node.
    pub max_release: usize,
    /// Keeper requests in flight at once.
    pub max_in_flight: usize,
}

impl KeeperConfig {
    /// The defaults: lease 10 s, renew every 3 s, scan every 1 s, margin 2 s, requests
    /// time out after 2 s, hand-offs wait 5 s, 16 claims and 2 hand-offs per round.
    pub fn new(node: NodeInfo) -> Self {
        KeeperConfig {
            node,
            lease_duration: Duration::from_secs(10),
            renew_interval: Duration::from_secs(3),
            scan_interval: Duration::from_secs(1),
            safety_margin: Duration::from_secs(2),
            call_timeout: Duration::from_secs(2),
            handoff_timeout: Duration::from_secs(5),
            max_acquire: 16,
            max_release: 2,
            max_in_flight: 16,
        }
    }

    /// The self-fence window: how long after a renewal was sent the owner may use it.
    pub fn fence_window(&self) -> Duration {
        self.lease_duration.saturating_sub(self.safety_margin)
    }

    /// Rejects timings under which a healthy node would fence itself or an owner could
    /// outlive its lease.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let bad = |m: String| Err(LeaseError::Config(m));
        if self.node.id.is_empty() || self.node.id.contains('#') {
            return bad(format!("node id {:?} must be non-empty and without '#'", self.node.id));
        }
        if self.safety_margin.is_zero() || self.safety_margin >= self.lease_duration {
            return bad(format!("safety_margin {:?} must be in (0, lease_duration)", self.safety_margin));
        }
        // Two renewal attempts, each allowed its full timeout, must fit before the fence,
        // so that one slow or lost request never costs a healthy node its shards.
        if self.renew_interval + self.call_timeout > self.fence_window() || self.call_timeout > self.renew_interval {
            return bad(format!(
                "renew_interval {:?} + call_timeout {:?} must fit in lease_duration - safety_margin {:?}, \
                 and call_timeout must not exceed renew_interval",
                self.renew_interval,
                self.call_timeout,
                self.fence_window()
            ));
        }
        if self.scan_interval.is_zero() || self.renew_interval.is_zero() || self.max_in_flight == 0 {
            return bad("intervals and max_in_flight must be non-zero".into());
        }
        Ok(())
    }
}

/// Why a shard was lost (as opposed to handed off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// No successful renewal within `lease_duration - safety_margin` on our clock.
    Deadline,
    /// A renewal was refused: the row no longer has our owner and epoch.
    Refused,
    /// The table shows another owner or epoch.
    Stolen,
}

/// Ownership changes of this node, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardEvent {
    /// The shard is ours under `epoch`: subscribe to its queue, load its days on demand,
    /// stamp writes with the fence.
    Acquired { shard: ShardId, epoch: u64 },
    /// The balancer hands the shard to another node: stop consuming, finish the batch,
    /// flush, ack, drop the shard's state, then call [`KeeperHandle::ready_to_release`].
    /// The lease (and the fence) stay valid meanwhile.
    Releasing { shard: ShardId, epoch: u64 },
    /// The lease was released; the fence is gone.
    Released { shard: ShardId, epoch: u64 },
    /// The shard is no longer ours and may already be someone else's: stop consuming and
    /// acking at once and drop its state without flushing (writes would be refused).
    Lost { shard: ShardId, epoch: u64, reason: LostReason },
}

/// One shard's owner as of the last scan.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ShardOwner {
    pub node: String,
    pub endpoint: String,
    pub epoch: u64,
    /// Judged expired by this node's observer (the owner is probably dead).
    pub expired: bool,
}

/// The cluster as this node last saw it: for forwarding reads to a shard's owner and for
/// the admin view. Cheap to clone from the watch channel (an `Arc`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardMap {
    pub me: String,
    /// Indexed by shard; `None` is a free shard.
    pub shards: Vec<Option<ShardOwner>>,
    /// Live nodes (heartbeat not expired), this node included.
    pub nodes: Vec<NodeInfo>,
    /// Scans so far; 0 means the map is still empty.
    pub generation: u64,
}

impl ShardMap {
    pub fn owner(&self, shard: ShardId) -> Option<&ShardOwner> {
        self.shards.get(shard as usize).and_then(Option::as_ref)
    }

    /// The owner of a resort-day's shard (the partition its rides are routed to).
    pub fn owner_of_day(&self, key: &DayKey) -> Option<&ShardOwner> {
        let shards = u16::try_from(self.shards.len()).unwrap_or(u16::MAX);
        self.owner(key.partition(shards))
    }

    /// Shards per owner, for the admin view and tests.
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        let mut c = BTreeMap::new();
        for o in self.shards.iter().flatten() {
            *c.entry(o.node.as_str()).or_default() += 1;
        }
        c
    }
}

/// One held shard in [`KeeperStats`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HeldShard {
    pub shard: ShardId,
    pub epoch: u64,
    pub draining: bool,
    /// Until the self-fence unless renewed.
    pub fence_in_ms: u64,
}

/// The keeper's counters and state, for the admin endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KeeperStats {
    pub node: String,
    pub shards: u16,
    pub held: Vec<HeldShard>,
    pub live_nodes: usize,
    pub rounds: u64,
    pub scan_failures: u64,
    pub renewals: u64,
    pub renew_failures: u64,
    pub heartbeat_failures: u64,
    pub acquired: u64,
    pub taken_over: u64,
    pub claim_conflicts: u64,
    pub claim_failures: u64,
    pub released: u64,
    pub release_failures: u64,
    pub lost_deadline: u64,
    pub lost_refused: u64,
    pub lost_stolen: u64,
    pub orphans_released: u64,
    pub dead_nodes_removed: u64,
    pub last_round_ms: u64,
    /// How old the [`ShardMap`] is; `None` before the first successful scan. A forwarder
    /// should distrust a map much older than a lease.
    pub map_age_ms: Option<u64>,
}

#[derive(Debug)]
struct Held {
    epoch: u64,
    /// The self-fence: past it the shard is lost.
    deadline: Instant,
    /// `Some(since)` once a hand-off started.
    draining: Option<Instant>,
    /// The consumer is done with it (or the hand-off timed out): release it.
    ready: bool,
    /// The release request was sent: no more fences for it.
    releasing: bool,
}

struct Shared {
    cfg: KeeperConfig,
    store: Arc<dyn LeaseStore>,
    held: Mutex<BTreeMap<ShardId, Held>>,
    stats: Mutex<KeeperStats>,
    events: mpsc::UnboundedSender<ShardEvent>,
    map: watch::Sender<Arc<ShardMap>>,
    /// When the last scan (and so the [`ShardMap`]) succeeded.
    last_scan: Mutex<Option<Instant>>,
    /// Wakes the watchdog when a shard with a new deadline is added.
    deadlines: Notify,
    /// The keeper's own stop (the code base's one stop mechanism): set by
    /// [`KeeperHandle::stop`], after which the rounds hand every shard off.
    stop: Stop,
}

/// Starts keepers; see the module doc.
pub struct LeaseKeeper;

impl LeaseKeeper {
    /// Validates `cfg`, creates (or checks) the lease table, and spawns the keeper on the
    /// current tokio runtime. Returns its handle and the event stream (unbounded: at most a
    /// few events per shard per round, and the consumer must see every one).
    pub async fn start(
        cfg: KeeperConfig,
        store: Arc<dyn LeaseStore>,
    ) -> Result<(KeeperHandle, mpsc::UnboundedReceiver<ShardEvent>), LeaseError> {
        cfg.validate()?;
        store.create().await?;
        let (events, rx) = mpsc::unbounded_channel();
        let shards = store.shards();
        let (map, _) = watch::channel(Arc::new(ShardMap { me: cfg.node.id.clone(), ..ShardMap::default() }));
        let stats = KeeperStats { node: cfg.node.id.clone(), shards, ..KeeperStats::default() };
        let shared = Arc::new(Shared {
            cfg,
            store,
            held: Mutex::new(BTreeMap::new()),
            stats: Mutex::new(stats),
            events,
            map,
            last_scan: Mutex::new(None),
            deadlines: Notify::new(),
            stop: Stop::default(),
        });
        info!(node = %shared.cfg.node.id, shards, lease_ms = shared.cfg.lease_duration.as_millis() as u64, "lease keeper started");
        let task = tokio::spawn(run(shared.clone()));
        Ok((KeeperHandle { shared, task: Arc::new(Mutex::new(Some(task))) }, rx))
    }
}

/// The keeper's handle: fences, the map, stats, hand-off confirmation, stop. Cheap to clone.
#[derive(Clone)]
pub struct KeeperHandle {
    shared: Arc<Shared>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for KeeperHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeeperHandle").field("node", &self.shared.cfg.node.id).finish_non_exhaustive()
    }
}

impl KeeperHandle {
    pub fn node(&self) -> &NodeInfo {
        &self.shared.cfg.node
    }

    /// The fence for writing (and acking) `shard` right now, or `None` if this node does
    /// not hold it, its release has begun, or its self-fence deadline has passed. Call it
    /// after a flush returns and before acking what the flush covered.
    pub fn fence(&self, shard: ShardId) -> Option<Fence> {
        let now = Instant::now();
        let held = self.shared.held.lock();
        held.get(&shard).filter(|h| !h.releasing && now < h.deadline).map(|h| Fence { shard, epoch: h.epoch })
    }

    /// Fences of every shard usable right now.
    pub fn fences(&self) -> Vec<Fence> {
        let now = Instant::now();
        let held = self.shared.held.lock();
        held.iter().filter(|(_, h)| !h.releasing && now < h.deadline).map(|(&shard, h)| Fence { shard, epoch: h.epoch }).collect()
    }

    /// The consumer finished with a shard it was told to hand off (after
    /// [`ShardEvent::Releasing`]); the keeper releases it on its next round. `false` if the
    /// shard is not being handed off under `epoch`.
    pub fn ready_to_release(&self, shard: ShardId, epoch: u64) -> bool {
        let mut held = self.shared.held.lock();
        match held.get_mut(&shard) {
            Some(h) if h.epoch == epoch && h.draining.is_some() => {
                h.ready = true;
                true
            }
            _ => false,
        }
    }

    /// The latest map; `changed()` on the receiver waits for the next scan.
    pub fn map(&self) -> watch::Receiver<Arc<ShardMap>> {
        self.shared.map.subscribe()
    }

    pub fn stats(&self) -> KeeperStats {
        let now = Instant::now();
        let mut stats = self.shared.stats.lock().clone();
        stats.map_age_ms = self.shared.last_scan.lock().map(|at| now.saturating_duration_since(at).as_millis() as u64);
        stats.held = self
            .shared
            .held
            .lock()
            .iter()
            .map(|(&shard, h)| HeldShard {
                shard,
                epoch: h.epoch,
                draining: h.draining.is_some(),
                fence_in_ms: h.deadline.saturating_duration_since(now).as_millis() as u64,
            })
            .collect();
        stats
    }

    /// Hands every shard off (cooperatively, as for a rebalance), deletes the heartbeat row
    /// and waits for the task to end. Idempotent.
    pub async fn stop(&self) {
        self.shared.stop.stop();
        let task = self.task.lock().take();
        if let Some(task) = task {
            if let Err(e) = task.await {
                warn!(cause = %e, "lease keeper task failed");
            }
        }
    }

    /// Ends the task without releasing anything, as a crash would (tests; the leases then
    /// expire on the other nodes' clocks).
    pub fn abort(&self) {
        if let Some(task) = self.task.lock().take() {
            task.abort();
        }
    }
}

// ------------------------------------------------------------------ the task ---

async fn run(shared: Arc<Shared>) {
    tokio::select! {
        _ = watchdog(&shared) => {}
        _ = renewer(&shared) => {}
        _ = rounds(&shared) => {}
    }
    info!(node = %shared.cfg.node.id, "lease keeper stopped");
}

fn emit(shared: &Shared, event: ShardEvent) {
    debug!(node = %shared.cfg.node.id, ?event, "shard event");
    let _ = shared.events.send(event); // a dropped receiver only means nobody listens
}

/// Removes `shard` from the held set if it is still held under `epoch` (a later epoch of
/// the same shard is another tenure, not this one); true if it was.
fn take_held(shared: &Shared, shard: ShardId, epoch: u64) -> bool {
    let mut held = shared.held.lock();
    match held.get(&shard) {
        Some(h) if h.epoch == epoch => held.remove(&shard).is_some(),
        _ => false,
    }
}

/// Removes `shard` if still held under `epoch` and reports it lost.
fn lose(shared: &Shared, shard: ShardId, epoch: u64, reason: LostReason) {
    let removed = take_held(shared, shard, epoch);
    if removed {
        warn!(node = %shared.cfg.node.id, shard, epoch, ?reason, "shard lost");
        {
            let mut s = shared.stats.lock();
            match reason {
                LostReason::Deadline => s.lost_deadline += 1,
                LostReason::Refused => s.lost_refused += 1,
                LostReason::Stolen => s.lost_stolen += 1,
            }
        }
        emit(shared, ShardEvent::Lost { shard, epoch, reason });
    }
}

/// Loses every shard whose self-fence deadline passed, as soon as it passes.
async fn watchdog(shared: &Shared) {
    loop {
        let now = Instant::now();
        let (due, next): (Vec<(ShardId, u64)>, Option<Instant>) = {
            let held = shared.held.lock();
            let due = held.iter().filter(|(_, h)| h.deadline <= now).map(|(&s, h)| (s, h.epoch)).collect();
            (due, held.values().map(|h| h.deadline).filter(|&d| d > now).min())
        };
        for (shard, epoch) in due {
            lose(shared, shard, epoch, LostReason::Deadline);
        }
        match next {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = shared.deadlines.notified() => {}
                }
            }
            None => shared.deadlines.notified().await,
        }
    }
}

async fn timed<T>(shared: &Shared, f: impl Future<Output = Result<T, LeaseError>>) -> Result<T, LeaseError> {
    match tokio::time::timeout(shared.cfg.call_timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(LeaseError::Unavailable(format!("no answer within {:?}", shared.cfg.call_timeout))),
    }
}

/// Heartbeat and renewals, every `renew_interval`.
async fn renewer(shared: &Shared) {
    let cfg = &shared.cfg;
    let mut tick = tokio::time::interval(cfg.renew_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A shard whose release is under way is not renewed: the release changes its row, and
        // a renewal racing it would be refused and read as a lost lease (the release's own
        // answer says how the hand-off ended).
        let held: Vec<(ShardId, u64)> = shared.held.lock().iter().filter(|(_, h)| !h.releasing).map(|(&s, h)| (s, h.epoch)).collect();
        let heartbeat = async {
            if shared.stop.is_stopped() {
                return; // leaving: the row is deleted at the end, do not re-create it
            }
            if let Err(e) = timed(shared, shared.store.heartbeat(&cfg.node)).await {
                shared.stats.lock().heartbeat_failures += 1;
                warn!(node = %cfg.node.id, cause = %e, "heartbeat failed");
            }
        };
        let renewals = async {
            let results = bounded(
                cfg.max_in_flight,
                held.into_iter().map(|(shard, epoch)| async move {
                    let sent = Instant::now();
                    (shard, epoch, sent, timed(shared, shared.store.renew(shard, &cfg.node.id, epoch)).await)
                }),
            )
            .await;
            for (shard, epoch, sent, result) in results {
                match result {
                    Ok(true) => {
                        let now = Instant::now();
                        let mut held = shared.held.lock();
                        if let Some(h) = held.get_mut(&shard).filter(|h| h.epoch == epoch) {
                            // Past the deadline the shard is lost even if the watchdog has
                            // not said so yet: a fence must not come back after a gap.
                            if now < h.deadline {
                                h.deadline = h.deadline.max(sent + cfg.fence_window());
                            }
                        }
                        drop(held);
                        shared.stats.lock().renewals += 1;
                    }
                    // Sent before the release began, answered after it landed.
                    Ok(false) if held_releasing(shared, shard) => {}
                    Ok(false) => lose(shared, shard, epoch, LostReason::Refused),
                    Err(e) => {
                        shared.stats.lock().renew_failures += 1;
                        warn!(node = %cfg.node.id, shard, epoch, cause = %e, "lease renewal failed");
                    }
                }
            }
        };
        tokio::join!(heartbeat, renewals);
    }
}

/// The balancer's state between rounds.
struct RoundState {
    /// The observers of lease and heartbeat rows, and the map they build (shared with the
    /// watcher of nodes without a keeper, so both judge expiry alike).
    map: MapBuilder,
    /// Nodes that appeared after our first scan, with the heartbeat counter first seen:
    /// they count for the balancer only once the counter has moved (see `round`).
    joining: HashMap<String, u64>,
}

/// Balancer rounds, every `scan_interval`, until a stop has handed every shard off.
async fn rounds(shared: &Shared) {
    let cfg = &shared.cfg;
    let mut state = RoundState { map: MapBuilder::new(cfg.lease_duration), joining: HashMap::new() };
    let mut tick = tokio::time::interval(cfg.scan_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if shared.stop.is_stopped() {
            // Leaving: one round a tick until every hand-off is done (the stop itself
            // resolves at once from now on, so it cannot pace the loop).
            tick.tick().await;
        } else {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shared.stop.stopped() => {}
            }
        }
        let leaving = shared.stop.is_stopped();
        let started = Instant::now();
        round(shared, &mut state, leaving).await;
        {
            let mut s = shared.stats.lock();
            s.rounds += 1;
            s.last_round_ms = started.elapsed().as_millis() as u64;
        }
        if leaving && shared.held.lock().is_empty() {
            if let Err(e) = timed(shared, shared.store.remove_node(&cfg.node.id, None)).await {
                warn!(node = %cfg.node.id, cause = %e, "could not delete the heartbeat row; it will expire");
            }
            return;
        }
    }
}

async fn round(shared: &Shared, state: &mut RoundState, leaving: bool) {
    let cfg = &shared.cfg;
    let me = cfg.node.id.as_str();
    // Hand-offs first: they need no scan, and a stop must not wait for one (with the table
    // unreachable the watchdog ends them).
    if leaving {
        let all: Vec<ShardId> = shared.held.lock().keys().copied().collect();
        start_handoffs(shared, all.into_iter());
    }
    finish_handoffs(shared).await;

    let snapshot = match timed(shared, shared.store.snapshot()).await {
        Ok(s) => s,
        Err(e) => {
            shared.stats.lock().scan_failures += 1;
            warn!(node = %me, cause = %e, "lease table scan failed");
            return;
        }
    };
    let now = Instant::now();
    *shared.last_scan.lock() = Some(now);
    let observed = state.map.observe(&cfg.node, &snapshot, now, !leaving);
    let TableSnapshot { shards: rows, nodes } = snapshot;

    // Membership. A node that shows up after our first scan is live for forwarding at once
    // but counts for the balancer only once its heartbeat has advanced: a node that
    // flaps (one heartbeat, then silence) or a stale row does not trigger hand-offs.
    if state.map.generation() > 1 {
        state.joining.extend(observed.appeared.iter().cloned());
    }
    let mut live: Vec<String> = Vec::new();
    for (id, counter) in &observed.live_others {
        match state.joining.get(id) {
            Some(first) if first == counter => {} // not proven alive yet
            _ => {
                state.joining.remove(id);
                live.push(id.clone());
            }
        }
    }
    let present: HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    state.joining.retain(|id, _| present.contains(id.as_str()));
    if !leaving {
        live.push(me.to_string());
    }
    let dead = observed.dead;

    // Reconcile what we hold with what the table says.
    let held: BTreeMap<ShardId, (u64, bool)> = shared.held.lock().iter().map(|(&s, h)| (s, (h.epoch, h.draining.is_some()))).collect();
    let mut orphans = Vec::new();
    let mut states = Vec::with_capacity(rows.len());
    for (row, &expired) in rows.iter().zip(&observed.expired) {
        let mine = held.get(&row.shard);
        match (&row.owner, mine) {
            (Some(owner), Some(&(epoch, _))) if owner != me || row.epoch != epoch => {
                lose(shared, row.shard, epoch, LostReason::Stolen);
            }
            (None, Some(&(epoch, _))) => {
                if row.epoch == epoch && held_releasing(shared, row.shard) {
                    // Our release was applied but its answer lost.
                    released(shared, row.shard, epoch);
                } else {
                    // Free in the table while we hold it, and not by our release.
                    lose(shared, row.shard, epoch, LostReason::Stolen);
                }
            }
            (Some(owner), None) if owner == me => orphans.push(row.clone()),
            _ => {}
        }
        let draining = mine.is_some_and(|&(_, d)| d);
        states.push(match &row.owner {
            // Shards on their way out count as free, so that the shortfall they cover is
            // not handed off twice (see `balance`).
            Some(owner) if owner == me && draining => ShardState::Free,
            Some(owner) => ShardState::Owned { owner: owner.clone(), expired },
            None => ShardState::Free,
        });
    }
    let live_nodes = observed.map.nodes.len();
    let _ = shared.map.send_replace(Arc::new(observed.map));
    shared.stats.lock().live_nodes = live_nodes;

    // Orphans: ours in the table, not held. Release so that the next owner bumps the epoch.
    run_all(shared, orphans, |row| async move {
        if let Ok(true) = timed(shared, shared.store.release(row.shard, me, row.epoch)).await {
            info!(node = %me, shard = row.shard, epoch = row.epoch, "released an orphaned lease");
            shared.stats.lock().orphans_released += 1;
        }
    })
    .await;
    // Dead nodes' heartbeat rows, so the table does not grow with every restart.
    run_all(shared, dead, |(id, counter)| async move {
        if let Ok(true) = timed(shared, shared.store.remove_node(&id, Some(counter))).await {
            info!(node = %me, dead = %id, "removed a dead node's heartbeat row");
            shared.stats.lock().dead_nodes_removed += 1;
        }
    })
    .await;

    if leaving {
        return;
    }
    let p = plan(&BalanceInput { me, live: &live, shards: &states, max_acquire: cfg.max_acquire, max_release: cfg.max_release });
    if !p.is_empty() {
        debug!(node = %me, acquire = ?p.acquire, release = ?p.release, "balancer plan");
    }
    start_handoffs(shared, p.release.iter().copied());
    let claims: Vec<LeaseRow> = p.acquire.iter().filter(|s| !held.contains_key(s)).map(|&s| rows[s as usize].clone()).collect();
    run_all(shared, claims, |row| claim(shared, row)).await;
}

/// Removes `shard` if still held under `epoch` and reports it released.
fn released(shared: &Shared, shard: ShardId, epoch: u64) {
    let removed = take_held(shared, shard, epoch);
    if removed {
        shared.stats.lock().released += 1;
        info!(node = %shared.cfg.node.id, shard, epoch, "shard released");
        emit(shared, ShardEvent::Released { shard, epoch });
    }
}

fn held_releasing(shared: &Shared, shard: ShardId) -> bool {
    shared.held.lock().get(&shard).is_some_and(|h| h.releasing)
}

async fn run_all<T, F, Fut>(shared: &Shared, items: Vec<T>, f: F)
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = ()>,
{
    bounded(shared.cfg.max_in_flight, items.into_iter().map(f)).await;
}

/// Runs the futures with at most `limit` in flight; outputs in completion order.
async fn bounded<F: Future>(limit: usize, futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut waiting = futures.into_iter();
    let mut running = FuturesUnordered::new();
    let mut out = Vec::new();
    loop {
        while running.len() < limit.max(1) {
            match waiting.next() {
                Some(f) => running.push(f),
                None => break,
            }
        }
        match running.next().await {
            Some(v) => out.push(v),
            None => return out,
        }
    }
}

async fn claim(shared: &Shared, row: LeaseRow) {
    let cfg = &shared.cfg;
    let sent = Instant::now();
    match timed(shared, shared.store.claim(&row, &cfg.node)).await {
        Ok(Some(epoch)) => {
            let takeover = row.owner.is_some();
            {
                let mut held = shared.held.lock();
                held.insert(row.shard, Held { epoch, deadline: sent + cfg.fence_window(), draining: None, ready: false, releasing: false });
            }
            shared.deadlines.notify_one();
            {
                let mut s = shared.stats.lock();
                s.acquired += 1;
                s.taken_over += u64::from(takeover);
            }
            info!(node = %cfg.node.id, shard = row.shard, epoch, from = ?row.owner, "shard acquired");
            emit(shared, ShardEvent::Acquired { shard: row.shard, epoch });
        }
        Ok(None) => shared.stats.lock().claim_conflicts += 1,
        Err(e) => {
            // The claim may have been applied with its answer lost: then the row shows us as
            // owner and the next round releases it as an orphan.
            shared.stats.lock().claim_failures += 1;
            warn!(node = %cfg.node.id, shard = row.shard, cause = %e, "lease claim failed");
        }
    }
}

fn start_handoffs(shared: &Shared, shards: impl Iterator<Item = ShardId>) {
    let now = Instant::now();
    let mut started = Vec::new();
    {
        let mut held = shared.held.lock();
        for shard in shards {
            if let Some(h) = held.get_mut(&shard).filter(|h| h.draining.is_none()) {
                h.draining = Some(now);
                started.push((shard, h.epoch));
            }
        }
    }
    for (shard, epoch) in started {
        info!(node = %shared.cfg.node.id, shard, epoch, "handing shard off");
        emit(shared, ShardEvent::Releasing { shard, epoch });
    }
}

/// Releases the shards whose hand-off the consumer confirmed or whose timeout passed.
async fn finish_handoffs(shared: &Shared) {
    let cfg = &shared.cfg;
    let now = Instant::now();
    let listeners_gone = shared.events.is_closed();
    let due: Vec<(ShardId, u64)> = {
        let mut held = shared.held.lock();
        held.iter_mut()
            .filter(|(_, h)| {
                // Nobody listening to the events (no consumer) means nothing to wait for.
                h.draining.is_some_and(|since| h.ready || listeners_gone || now.saturating_duration_since(since) >= cfg.handoff_timeout)
            })
            .map(|(&s, h)| {
                h.releasing = true; // no fence from here on, even if the release fails
                (s, h.epoch)
            })
            .collect()
    };
    run_all(shared, due, |(shard, epoch)| async move {
        match timed(shared, shared.store.release(shard, &cfg.node.id, epoch)).await {
            Ok(true) => released(shared, shard, epoch),
            Ok(false) => lose(shared, shard, epoch, LostReason::Refused),
            Err(e) => {
                // Still ours until the deadline; the next round tries again.
                shared.stats.lock().release_failures += 1;
                warn!(node = %cfg.node.id, shard, epoch, cause = %e, "lease release failed");
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    //! Against DynamoDB Local (`LIFTLOG_TEST_DYNAMODB`), on real time with short leases:
    //! tokio's `test-util` (paused time) is not enabled in this crate, and the SDK's own
    //! timeouts would not follow a paused clock anyway.
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use async_trait::async_trait;
    use aws_sdk_dynamodb::types::{AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType};

    use super::*;
    use crate::cluster::lease::{DynamoLeases, NodeRow};
    use crate::tables::dynamo::DynamoConfig;

    const NEEDS: &str = "needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)";
    const SHARDS: u16 = 8;

    fn prefix(test: &str) -> String {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        format!("lease{nanos}_{test}_")
    }

    async fn dynamo(prefix: &str) -> DynamoLeases {
        let endpoint = std::env::var("LIFTLOG_TEST_DYNAMODB").unwrap_or_else(|_| panic!("{NEEDS}"));
        let cfg =
            DynamoConfig { endpoint: Some(endpoint), table_prefix: prefix.to_string(), max_concurrency: 16, ..DynamoConfig::default() };
        DynamoLeases::connect(cfg, SHARDS).await.unwrap()
    }

    /// Short timings, in the proportions of the defaults.
    fn config(id: &str) -> KeeperConfig {
        KeeperConfig {
            lease_duration: Duration::from_millis(3000),
            renew_interval: Duration::from_millis(1000),
            scan_interval: Duration::from_millis(250),
            safety_margin: Duration::from_millis(750),
            call_timeout: Duration::from_millis(1000),
            handoff_timeout: Duration::from_millis(2000),
            max_acquire: 8,
            max_release: 2,
            ..KeeperConfig::new(NodeInfo { id: id.into(), endpoint: format!("http://{id}:8080") })
        }
    }

    /// A lease store whose requests can be held back, as for a paused or partitioned node
    /// (or a DynamoDB that stopped answering it).
    struct Stallable {
        inner: DynamoLeases,
        stalled: AtomicBool,
    }

    impl Stallable {
        async fn gate(&self) {
            while self.stalled.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[async_trait]
    impl LeaseStore for Stallable {
        fn shards(&self) -> u16 {
            self.inner.shards()
        }
        async fn create(&self) -> Result<(), LeaseError> {
            self.gate().await;
            self.inner.create().await
        }
        async fn snapshot(&self) -> Result<TableSnapshot, LeaseError> {
            self.gate().await;
            self.inner.snapshot().await
        }
        async fn claim(&self, seen: &LeaseRow, me: &NodeInfo) -> Result<Option<u64>, LeaseError> {
            self.gate().await;
            self.inner.claim(seen, me).await
        }
        async fn renew(&self, shard: ShardId, me: &str, epoch: u64) -> Result<bool, LeaseError> {
            self.gate().await;
            self.inner.renew(shard, me, epoch).await
        }
        async fn release(&self, shard: ShardId, me: &str, epoch: u64) -> Result<bool, LeaseError> {
            self.gate().await;
            self.inner.release(shard, me, epoch).await
        }
        async fn heartbeat(&self, me: &NodeInfo) -> Result<(), LeaseError> {
            self.gate().await;
            self.inner.heartbeat(me).await
        }
        async fn remove_node(&self, id: &str, seen_counter: Option<u64>) -> Result<bool, LeaseError> {
            self.gate().await;
            self.inner.remove_node(id, seen_counter).await
        }
    }

    /// Every event with when it arrived.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<(Instant, ShardEvent)>>>);

    impl Log {
        fn events(&self) -> Vec<(Instant, ShardEvent)> {
            self.0.lock().clone()
        }

        fn first(&self, want: impl Fn(&ShardEvent) -> bool) -> Option<(Instant, ShardEvent)> {
            self.events().into_iter().find(|(_, e)| want(e))
        }
    }

    /// A stand-in consumer: logs the events and confirms hand-offs at once.
    fn consume(handle: KeeperHandle, mut rx: mpsc::UnboundedReceiver<ShardEvent>) -> Log {
        let log = Log::default();
        let out = log.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                log.0.lock().push((Instant::now(), event.clone()));
                if let ShardEvent::Releasing { shard, epoch } = event {
                    assert!(handle.fence(shard).is_some(), "the fence holds while a hand-off drains");
                    assert!(handle.ready_to_release(shard, epoch));
                }
            }
        });
        out
    }

    async fn start(id: &str, store: Arc<dyn LeaseStore>) -> (KeeperHandle, Log) {
        let (handle, rx) = LeaseKeeper::start(config(id), store).await.unwrap();
        let log = consume(handle.clone(), rx);
        (handle, log)
    }

    async fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !done() {
            assert!(Instant::now() < deadline, "not within {within:?}: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn held(h: &KeeperHandle) -> BTreeMap<ShardId, u64> {
        h.fences().into_iter().map(|f| (f.shard, f.epoch)).collect()
    }

    #[tokio::test]
    #[ignore = "needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)"]
    async fn two_keepers_split_eight_shards_four_and_four() {
        let p = prefix("split");
        let (a, _) = start("a", Arc::new(dynamo(&p).await)).await;
        let (b, _) = start("b", Arc::new(dynamo(&p).await)).await;
        wait_until("4/4", Duration::from_secs(40), || held(&a).len() == 4 && held(&b).len() == 4).await;
        // Disjoint, and the map agrees once it is refreshed.
        assert!(held(&a).keys().all(|s| !held(&b).contains_key(s)));
        let map = a.map();
        wait_until("map shows 4/4", Duration::from_secs(10), || {
            let m = map.borrow();
            m.counts() == BTreeMap::from([("a", 4), ("b", 4)]) && m.nodes.len() == 2
        })
        .await;
        let m = map.borrow().clone();
        for (shard, epoch) in held(&b) {
            let owner = m.owner(shard).unwrap();
            assert_eq!((owner.node.as_str(), owner.endpoint.as_str(), owner.epoch), ("b", "http://b:8080", epoch));
        }
        let stats = a.stats();
        assert_eq!((stats.held.len(), stats.live_nodes, stats.lost_deadline), (4, 2, 0));
        assert!(stats.map_age_ms.is_some_and(|ms| ms < 5000), "{stats:?}");
        assert!(stats.held.iter().all(|h| h.fence_in_ms > 0 && !h.draining), "{stats:?}");
        // A node with another shard count is refused.
        let other = DynamoLeases::new(dynamo(&p).await.client().clone(), &p, SHARDS * 2).unwrap();
        assert!(matches!(other.create().await, Err(LeaseError::ShardCountMismatch { table: 8, configured: 16 })));
        a.stop().await;
        b.stop().await;
    }

    #[tokio::test]
    #[ignore = "needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)"]
    async fn a_stalled_owner_fences_itself_before_the_other_takes_over_and_its_late_writes_fail() {
        let p = prefix("stall");
        let cfg = config("x");
        let (a, a_log) = start("a", Arc::new(dynamo(&p).await)).await;
        let b_store = Arc::new(Stallable { inner: dynamo(&p).await, stalled: AtomicBool::new(false) });
        let (b, b_log) = start("b", b_store.clone()).await;
        wait_until("4/4", Duration::from_secs(40), || held(&a).len() == 4 && held(&b).len() == 4).await;
        let b_had = held(&b);

        let stalled_at = Instant::now();
        b_store.stalled.store(true, Ordering::SeqCst);
        wait_until("a takes all 8", Duration::from_secs(30), || held(&a).len() == 8).await;
        assert!(held(&b).is_empty(), "b gives out no fence");
        let a_had = held(&a);

        for (&shard, &old) in &b_had {
            let (lost_at, lost) = b_log.first(|e| matches!(e, ShardEvent::Lost { shard: s, .. } if *s == shard)).unwrap();
            assert_eq!(lost, ShardEvent::Lost { shard, epoch: old, reason: LostReason::Deadline });
            // (a may have held it before, at a lower epoch, and handed it to b)
            let (taken_at, _) = a_log
                .first(|e| *e == ShardEvent::Acquired { shard, epoch: old + 1 })
                .unwrap_or_else(|| panic!("a took {shard} over at epoch {}: {:?}", old + 1, a_log.events()));
            assert!(lost_at < taken_at, "shard {shard}: b lost it after a took it");
            // b's last good renewal was sent at most a renew interval before the stall: it
            // fenced itself within the fence window of that, plus scheduling slack.
            let fenced_after = lost_at - stalled_at;
            // The order above is the safety property; this bound only catches a fence that waits for
            // something else, with a renew interval of slack for a loaded two-core machine.
            assert!(fenced_after <= cfg.fence_window() + cfg.renew_interval, "fenced after {fenced_after:?}");
            // a waited for the whole lease from a renewal sent no earlier than that.
            let taken_after = taken_at - stalled_at;
            assert!(taken_after >= cfg.lease_duration - cfg.renew_interval, "taken after {taken_after:?}");
            assert!(taken_at - lost_at >= cfg.safety_margin - cfg.renew_interval / 2, "margin {:?}", taken_at - lost_at);
            eprintln!("shard {shard}: fenced {fenced_after:?} and taken {taken_after:?} after the stall");
        }

        // The zombie's renewal and its fenced data write are refused.
        let (&shard, &old) = b_had.iter().next().unwrap();
        assert!(!b_store.inner.renew(shard, "b", old).await.unwrap(), "stale renew refused");
        assert!(!b_store.inner.release(shard, "b", old).await.unwrap(), "stale release refused");
        let new = Fence { shard, epoch: held(&a)[&shard] };
        fenced_writes(b_store.inner.client(), &p, new, Fence { shard, epoch: old }).await;

        // Back from the pause, b rejoins and gets its share by hand-off, under new epochs.
        b_store.stalled.store(false, Ordering::SeqCst);
        wait_until("4/4 again", Duration::from_secs(50), || held(&a).len() == 4 && held(&b).len() == 4).await;
        // Which shards a hands back is the planner's choice, not necessarily b's old ones; each
        // one b takes comes from a by a change of owner, so its epoch is above a's.
        for (shard, epoch) in held(&b) {
            assert!(epoch > a_had[&shard], "shard {shard} back at epoch {epoch}, a held it at {}", a_had[&shard]);
        }
        a.stop().await;
        b.stop().await;
    }

    /// The contract of ADR 005 on a real table: the new owner writes, the old one cannot.
    async fn fenced_writes(client: &aws_sdk_dynamodb::Client, prefix: &str, new: Fence, old: Fence) {
        let table = format!("{prefix}FenceProbe");
        client
            .create_table()
            .table_name(&table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(KeySchemaElement::builder().attribute_name("K").key_type(KeyType::Hash).build().unwrap())
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("K")
                    .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        // A put like the flusher's: the item carries the epoch and its version.
        let put = |fence: Fence, version: u64| {
            let (attr, epoch) = fence.item_attribute();
            let (name, attr_name) = Fence::name_binding();
            let (value, bound) = fence.value_binding();
            client
                .put_item()
                .table_name(&table)
                .item("K", AttributeValue::S("1#2025#1".into()))
                .item(attr, epoch)
                .item("Version", AttributeValue::N(version.to_string()))
                .condition_expression(Fence::versioned_condition("#v", ":v"))
                .expression_attribute_names(name, attr_name)
                .expression_attribute_names("#v", "Version")
                .expression_attribute_values(value, bound)
                .expression_attribute_values(":v", AttributeValue::N(version.to_string()))
                .send()
        };
        let refused = |r: Result<_, aws_sdk_dynamodb::error::SdkError<_>>| match r {
            Ok(_) => false,
            Err(e) => {
                let e: aws_sdk_dynamodb::error::SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError> = e;
                assert!(e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()), "{e:?}");
                true
            }
        };
        assert!(!refused(put(old, 10).await), "first touch by anyone is allowed");
        assert!(!refused(put(new, 3).await), "a newer epoch wins over a higher version");
        assert!(refused(put(old, 50).await), "the stale owner's write fails, whatever its version");
        assert!(!refused(put(new, 4).await), "the owner's next version");
        assert!(refused(put(new, 4).await), "the same version again is stale");
        let plain = client
            .put_item()
            .table_name(&table)
            .item("K", AttributeValue::S("other".into()))
            .item(old.item_attribute().0, old.item_attribute().1)
            .condition_expression(Fence::condition())
            .expression_attribute_names(Fence::name_binding().0, Fence::name_binding().1)
            .expression_attribute_values(new.value_binding().0, new.value_binding().1)
            .send()
            .await;
        assert!(plain.is_ok(), "the epoch-only fragment is valid DynamoDB syntax: {plain:?}");
    }

    #[tokio::test]
    #[ignore = "needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)"]
    async fn a_joining_node_gets_shards_by_cooperative_hand_off_with_an_epoch_bump() {
        let p = prefix("handoff");
        let (a, a_log) = start("a", Arc::new(dynamo(&p).await)).await;
        wait_until("a holds 8", Duration::from_secs(30), || held(&a).len() == 8).await;
        let before = held(&a);
        let (b, b_log) = start("b", Arc::new(dynamo(&p).await)).await;
        let joined = Instant::now();
        wait_until("4/4", Duration::from_secs(40), || held(&a).len() == 4 && held(&b).len() == 4).await;
        // Well before any lease could have expired: the shards moved by hand-off.
        assert!(joined.elapsed() < config("a").lease_duration * 6, "a join must not wait for lease expiry rounds: {:?}", joined.elapsed());
        for (shard, epoch) in held(&b) {
            assert_eq!(epoch, before[&shard] + 1, "shard {shard}");
            let (released_at, _) = a_log
                .first(|e| *e == ShardEvent::Released { shard, epoch: before[&shard] })
                .unwrap_or_else(|| panic!("a released {shard}"));
            let (releasing_at, _) = a_log.first(|e| *e == ShardEvent::Releasing { shard, epoch: before[&shard] }).unwrap();
            let (acquired_at, _) = b_log.first(|e| *e == ShardEvent::Acquired { shard, epoch }).unwrap();
            assert!(releasing_at <= released_at && released_at < acquired_at);
        }
        assert!(a_log.events().iter().all(|(_, e)| !matches!(e, ShardEvent::Lost { .. })), "{:?}", a_log.events());
        // Hand-offs were bounded per round.
        assert!(a.stats().released == 4 && a.stats().rounds >= 2);

        // b leaves (SIGTERM): everything goes back to a by hand-off, b's row is gone.
        let b_had = held(&b);
        b.stop().await;
        assert!(held(&b).is_empty());
        wait_until("a holds 8 again", Duration::from_secs(30), || held(&a).len() == 8).await;
        for (shard, epoch) in b_had {
            assert_eq!(held(&a)[&shard], epoch + 1);
            // (the stand-in consumer logs asynchronously)
            wait_until(&format!("b logs Released {shard}: {:?}", b_log.events()), Duration::from_secs(4), || {
                b_log.first(|e| *e == ShardEvent::Released { shard, epoch }).is_some()
            })
            .await;
        }
        let rows = dynamo(&p).await.snapshot().await.unwrap();
        let ids: Vec<&NodeRow> = rows.nodes.iter().collect();
        assert_eq!(ids.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["a"]);
        a.stop().await;
    }

    #[tokio::test]
    #[ignore = "needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)"]
    async fn a_crashed_nodes_shards_are_taken_over_after_expiry_and_its_row_removed() {
        let p = prefix("crash");
        let (a, _) = start("a", Arc::new(dynamo(&p).await)).await;
        let (b, _) = start("b", Arc::new(dynamo(&p).await)).await;
        wait_until("4/4", Duration::from_secs(40), || held(&a).len() == 4 && held(&b).len() == 4).await;
        b.abort();
        let crashed = Instant::now();
        wait_until("a holds 8", Duration::from_secs(30), || held(&a).len() == 8).await;
        let cfg = config("a");
        assert!(crashed.elapsed() >= cfg.lease_duration - cfg.renew_interval, "{:?}", crashed.elapsed());
        assert!(a.stats().taken_over >= 4);
        wait_until("b's row removed", Duration::from_secs(10), || a.stats().dead_nodes_removed == 1).await;
        a.stop().await;
    }

    #[tokio::test]
    #[ignore = "needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)"]
    async fn a_lease_taken_behind_the_owners_back_is_lost_at_once_and_an_orphan_is_released() {
        let p = prefix("thief");
        let (a, a_log) = start("a", Arc::new(dynamo(&p).await)).await;
        wait_until("a holds 8", Duration::from_secs(30), || held(&a).len() == 8).await;
        let store = dynamo(&p).await;
        // Someone claims shard 0 on the exact row (as a takeover would) without waiting.
        let row = store.snapshot().await.unwrap().shards[0].clone();
        let thief = NodeInfo { id: "thief".into(), endpoint: "http://thief".into() };
        let epoch = store.claim(&row, &thief).await.unwrap().expect("the exact row is claimable");
        assert_eq!(store.claim(&row, &thief).await.unwrap(), None, "the same row twice: the second fails");
        let cfg = config("a");
        wait_until("a loses shard 0", cfg.renew_interval + cfg.scan_interval * 2, || a.fence(0).is_none()).await;
        wait_until("a logs it", Duration::from_secs(2), || {
            a_log.first(|e| matches!(e, ShardEvent::Lost { shard: 0, reason: LostReason::Refused | LostReason::Stolen, .. })).is_some()
        })
        .await;
        assert_eq!(held(&a).len(), 7);
        // A row that names "a" but that a does not hold (as after a restart under the same
        // id) is released, so that the next owner bumps the epoch; a then reclaims it.
        let row = store.snapshot().await.unwrap().shards[0].clone();
        assert_eq!((row.owner.as_deref(), row.epoch), (Some("thief"), epoch));
        let as_a = NodeInfo { id: "a".into(), endpoint: "http://elsewhere".into() };
        let orphan_epoch = store.claim(&row, &as_a).await.unwrap().unwrap();
        wait_until("a reclaims 0 past the orphan", Duration::from_secs(10), || a.fence(0).is_some_and(|f| f.epoch == orphan_epoch + 1))
            .await;
        assert!(a.stats().orphans_released >= 1);
        a.stop().await;
    }

    #[test]
    fn timings_that_would_fence_a_healthy_node_are_rejected() {
        let ok = config("a");
        assert!(ok.validate().is_ok());
        assert!(KeeperConfig::new(ok.node.clone()).validate().is_ok(), "the defaults");
        for bad in [
            KeeperConfig { safety_margin: ok.lease_duration, ..ok.clone() },
            KeeperConfig { renew_interval: ok.lease_duration, ..ok.clone() },
            KeeperConfig { call_timeout: ok.renew_interval * 2, ..ok.clone() },
            KeeperConfig { node: NodeInfo { id: "a#b".into(), endpoint: String::new() }, ..ok.clone() },
        ] {
            assert!(matches!(bad.validate(), Err(LeaseError::Config(_))), "{bad:?}");
        }
    }
}
