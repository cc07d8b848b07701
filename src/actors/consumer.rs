//! The consumer: bus → WAL → aggregator actors → ack, and the WAL replay at start.
//!
//! Ack policy (ADR 002): a batch of deliveries is appended to the WAL as one record,
//! fsynced once (group commit), dispatched to the owning actors, and only then acked to
//! the bus (for the embedded bus: the POSTs answer 201). A crash before the fsync loses
//! only unacked rides, which the client or the broker sends again; a crash after it is
//! repaired by replay, and duplicates from either side are dropped by the actors' id check.
//! Batches form on mailbox drain: whatever queued up during the previous fsync is the next
//! batch, so the fsync rate, not the request rate, bounds the cost of durability.

use crate::retry::Backoff;
use futures_util::StreamExt as _;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::registry::Registry;
use super::seasons::SeasonBook;
use crate::bus::EventSource;
use crate::cluster::ShardEvent;
use crate::domain::{DayKey, RideEvent};
use crate::error::PublishError;
use liftlog_wal::{Wal, WalError};

pub use super::progress::{AckLedger, FlushTrigger, Progress, ProgressView};

/// When a batch is acknowledged to the bus (ADR 002).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AckAfter {
    /// After the WAL fsync and the apply: lowest latency. Exact across a crash of this
    /// node as long as its WAL comes back with it (same disk, or the volume moved).
    Wal,
    /// After the tables hold the batch (the flusher's checkpoint): a standby on another
    /// machine that takes the partitions over finds every acked ride in the tables and
    /// gets the rest redelivered, so failover is exact without the dead node's disk.
    /// Acks wait up to a flush interval: raise `prefetch` accordingly.
    Table,
}

pub struct Consumer {
    pub wal: Arc<Wal>,
    pub registry: Arc<Registry>,
    pub seasons: Arc<SeasonBook>,
    pub progress: Arc<Progress>,
    /// Most rides per WAL record. Large enough to amortise an fsync over thousands of
    /// rides, small enough that one record decodes in well under a millisecond.
    pub max_batch: usize,
    /// Fault injection for crash tests: abort the process right after this many WAL
    /// batches were made durable, before they are acked (`LIFTLOG_FAULT_ABORT_AFTER_WAL_BATCHES`).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    pub abort_after_batches: Option<u64>,
    /// Size trigger of the flusher: rides consumed before a flush is started early.
    pub flush_after_rides: u64,
    pub ack_after: AckAfter,
}

/// The batch per day, each ride with its index in the batch (to answer it).
fn group(events: &[RideEvent]) -> FxHashMap<DayKey, (Vec<usize>, Vec<RideEvent>)> {
    let mut groups: FxHashMap<DayKey, (Vec<usize>, Vec<RideEvent>)> = FxHashMap::default();
    for (i, e) in events.iter().enumerate() {
        let (at, rides) = groups.entry(e.key()).or_default();
        at.push(i);
        rides.push(*e);
    }
    groups
}

/// An acker for a batch some of whose rides were refused at apply: acking it answers
/// those with their refusal (see [`crate::bus::Acker::ack_refusing`]).
struct Refusing {
    inner: Box<dyn crate::bus::Acker>,
    refused: Vec<(usize, PublishError)>,
}

impl Refusing {
    fn wrap(inner: Box<dyn crate::bus::Acker>, refused: Vec<usize>, events: &[RideEvent]) -> Box<dyn crate::bus::Acker> {
        if refused.is_empty() {
            return inner;
        }
        let refused = refused.into_iter().map(|i| (i, PublishError::Refused(crate::domain::full_day_message(&events[i])))).collect();
        Box::new(Refusing { inner, refused })
    }
}

#[async_trait::async_trait]
impl crate::bus::Acker for Refusing {
    async fn ack(self: Box<Self>) {
        self.inner.ack_refusing(self.refused).await
    }
    async fn nack(self: Box<Self>, error: PublishError) {
        self.inner.nack(error).await
    }
}

/// A batch some of whose rides no actor applied: the owning actors were dead.
#[derive(Debug)]
struct Unapplied {
    days: Vec<DayKey>,
}

impl std::fmt::Display for Unapplied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let days: Vec<String> = self.days.iter().map(|k| k.to_string()).collect();
        write!(f, "the aggregator of {} is not running; the node needs a restart to replay its WAL", days.join(", "))
    }
}

/// First and longest wait between two attempts to write a batch the WAL refused, while the
/// consumer holds it (broker). Bounded so that consumption resumes within seconds of the
/// WAL taking writes again (a full WAL frees space at the flusher's next checkpoint).
const WAL_RETRY_FIRST: Duration = Duration::from_millis(100);
const WAL_RETRY_CAP: Duration = Duration::from_secs(2);
/// How often a consumer still holding a batch says so.
const WAL_HOLD_LOG_EVERY: Duration = Duration::from_secs(30);

/// How holding a batch the WAL refused ended.
enum Held {
    /// The WAL took it: record `seq`.
    Written(u64, Vec<RideEvent>),
    /// The consumer was paused first; the batch is still unacked.
    Paused,
    /// The writer task panicked and took the rides with it.
    TaskFailed,
}

/// A fsync's result, with the rides handed back: the seq, or the error with the record's
/// seq when the append got that far (then only the fsync is retried).
type WalWrite = (Vec<RideEvent>, Result<u64, (Option<u64>, WalError)>);

/// What the clients of a batch the WAL refused are told (embedded bus). A failed append
/// wrote nothing: not recorded. A fsync that failed after the append leaves a record that
/// may survive and be replayed at the next start: outcome unknown.
/// Longest one attempt to load a day may take: a table store that hangs instead of
/// failing must not keep a day parked forever on one attempt.
const ACTIVATION_TIMEOUT: Duration = Duration::from_secs(10);
const ACTIVATION_RETRY_FIRST: Duration = Duration::from_millis(50);
const ACTIVATION_RETRY_CAP: Duration = Duration::from_secs(5);
/// How often a consumer holding for memory looks again (the checkpoint moves on flushes).
const MEMORY_HOLD_POLL: Duration = Duration::from_millis(50);

/// One day's share of a WAL batch, parked until the day is resident.
struct ParkedGroup {
    seq: u64,
    /// Each ride's index in its batch, to answer it.
    at: Vec<usize>,
    rides: Vec<RideEvent>,
}

/// A batch some of whose days are parked: answered (acked) once all of them are applied.
struct Waiting {
    acker: Box<dyn crate::bus::Acker>,
    events: Vec<RideEvent>,
    refused: Vec<usize>,
    days: usize,
}

type Load =
    std::pin::Pin<Box<dyn std::future::Future<Output = (DayKey, Result<super::registry::LoadedDay, crate::error::TableError>)> + Send>>;

/// Days whose activation waits for the tables (issue 13, item 7). Their rides are in the
/// WAL already; they wait here, in WAL order per day, while the consumer goes on applying
/// the resident days of later batches. Activation is retried with backoff in the
/// background; once a day loads, its parked rides are applied in order and the batches
/// they belong to are answered.
struct Parked {
    days: FxHashMap<DayKey, std::collections::VecDeque<ParkedGroup>>,
    /// Days with a load in flight.
    loading: rustc_hash::FxHashSet<DayKey>,
    loads: futures_util::stream::FuturesUnordered<Load>,
    batches: FxHashMap<u64, Waiting>,
    rides: usize,
    backoff: Backoff,
    retry_at: tokio::time::Instant,
}

impl Default for Parked {
    fn default() -> Self {
        Parked {
            days: FxHashMap::default(),
            loading: Default::default(),
            loads: Default::default(),
            batches: FxHashMap::default(),
            rides: 0,
            backoff: Backoff::new(ACTIVATION_RETRY_FIRST, ACTIVATION_RETRY_CAP),
            retry_at: tokio::time::Instant::now(),
        }
    }
}

impl Parked {
    fn park(&mut self, key: DayKey, seq: u64, at: Vec<usize>, rides: Vec<RideEvent>) {
        self.rides += rides.len();
        self.days.entry(key).or_default().push_back(ParkedGroup { seq, at, rides });
    }

    /// Whether some parked day has no load in flight.
    fn retry_pending(&self) -> bool {
        self.days.keys().any(|k| !self.loading.contains(k))
    }

    /// Publishes the figures the flusher and the admin views read.
    fn publish(&self, progress: &Progress) {
        let floor = self.days.values().filter_map(|g| g.front().map(|g| g.seq)).min().unwrap_or(0);
        progress.parked_floor.store(floor, Ordering::Release);
        progress.parked_rides.store(self.rides as u64, Ordering::Relaxed);
        progress.parked_days.store(self.days.len() as u64, Ordering::Relaxed);
    }
}

fn refusal(appended: bool, e: WalError) -> PublishError {
    match e {
        e if appended => PublishError::Uncertain(format!("write-ahead log fsync failed after the append: {e}")),
        WalError::Full { .. } => PublishError::Overloaded,
        WalError::DiskLow { .. } => PublishError::Unavailable("the WAL's disk is nearly full".into()),
        other => PublishError::Unavailable(format!("write-ahead log: {other}")),
    }
}

impl Consumer {
    /// Appends `events` as one WAL record (unless an earlier attempt did: `appended`) and
    /// fsyncs, on the blocking pool.
    async fn write_wal(&self, events: Vec<RideEvent>, appended: Option<u64>) -> Result<WalWrite, tokio::task::JoinError> {
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || {
            let seq = match appended {
                Some(seq) => seq,
                None => match wal.append_serde(&events) {
                    Ok(seq) => seq,
                    Err(e) => return (events, Err((None, e))),
                },
            };
            let fsync = Instant::now();
            let synced = wal.sync().map(|()| seq).map_err(|e| (Some(seq), e));
            crate::metrics::wal_fsync(fsync, events.len());
            (events, synced)
        })
        .await
    }

    /// A WAL failure with a broker: consumption pauses (no next batch is taken, the broker
    /// sends nothing past the prefetch) and the held batch is written again with a bounded
    /// backoff until the WAL takes it. Nacking instead redelivered it every 100 ms, and
    /// RabbitMQ 4.x dead-letters a ride after 20 redeliveries by default: two seconds of
    /// disk trouble moved rides that got their 201 into a queue nobody reads.
    async fn hold_until_durable(
        &self,
        mut events: Vec<RideEvent>,
        mut appended: Option<u64>,
        first: WalError,
        pause: &crate::bus::Stop,
    ) -> Held {
        let held = Instant::now();
        let mut backoff = Backoff::new(WAL_RETRY_FIRST, WAL_RETRY_CAP);
        let (mut attempts, mut logged) = (1u64, Instant::now());
        self.progress.wal_failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(cause = %first, rides = events.len(), "WAL refused a batch: consumption paused; the batch is held unacked and written again with backoff");
        loop {
            tokio::select! {
                biased;
                _ = pause.stopped() => {
                    tracing::warn!(attempts, "consumer paused while holding a batch the WAL refused; the broker redelivers it");
                    return Held::Paused;
                }
                _ = backoff.wait() => {}
            }
            attempts += 1;
            match self.write_wal(events, appended).await {
                Ok((events, Ok(seq))) => {
                    tracing::warn!(attempts, paused_ms = held.elapsed().as_millis() as u64, "WAL takes writes again: consumption resumed");
                    return Held::Written(seq, events);
                }
                Ok((again, Err((seq, e)))) => {
                    self.progress.wal_failures.fetch_add(1, Ordering::Relaxed);
                    if logged.elapsed() >= WAL_HOLD_LOG_EVERY {
                        logged = Instant::now();
                        tracing::error!(cause = %e, attempts, paused_ms = held.elapsed().as_millis() as u64, "WAL still refuses the held batch; consumption stays paused");
                    }
                    (events, appended) = (again, seq);
                }
                Err(join) => {
                    tracing::error!(cause = %join, "WAL writer task failed");
                    return Held::TaskFailed;
                }
            }
        }
    }

    /// Replays the WAL after its checkpoint into the actors and waits until they applied
    /// it. Must finish before the node serves reads.
    pub async fn replay(&self) -> Result<u64, WalError> {
        /// Rides gathered across records before one dispatch: WAL records are as small as
        /// the traffic made them (often a few dozen rides), and one actor message per
        /// record per day would cost more than applying the rides.
        const REPLAY_CHUNK: usize = 65_536;
        let started = Instant::now();
        let mut last = self.wal.checkpoint();
        let (mut records, mut events) = (0u64, 0u64);
        // (sequence of the chunk's first record, rides). The first sequence is what the
        // actors mark the rides with: conservative for the checkpoint, which then never
        // passes a record whose raw rides are still pending.
        let mut chunk: Option<(u64, Vec<RideEvent>)> = None;
        for record in self.wal.replay() {
            let record = record?;
            let batch: Vec<RideEvent> = Wal::decode(&record.payload)?;
            events += batch.len() as u64;
            records += 1;
            self.progress.unflushed(record.seq, started, batch.len() as u64);
            last = record.seq;
            let (_, rides) = chunk.get_or_insert_with(|| (record.seq, Vec::with_capacity(REPLAY_CHUNK)));
            rides.extend_from_slice(&batch);
            if rides.len() >= REPLAY_CHUNK {
                if let Some((first, rides)) = chunk.take() {
                    self.replay_chunk(first, &rides).await;
                }
            }
        }
        if let Some((first, rides)) = chunk.take() {
            self.replay_chunk(first, &rides).await;
        }
        // A round trip to every actor: all replayed batches are applied after it.
        for h in self.registry.all() {
            let _ = h.stats().await;
        }
        self.progress.dispatched_seq.store(last, Ordering::Release);
        self.progress.replayed_records.store(records, Ordering::Relaxed);
        self.progress.replayed_events.store(events, Ordering::Relaxed);
        self.progress.replay_micros.store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        tracing::info!(records, events, millis = started.elapsed().as_millis() as u64, "WAL replayed");
        Ok(events)
    }

    /// A replayed ride that is refused again (its day was full when it was first applied)
    /// had its answer then; an actor that dies during the replay holds the checkpoint.
    async fn replay_chunk(&self, first: u64, rides: &[RideEvent]) {
        if let Err(e) = self.dispatch(first, rides).await {
            tracing::error!(seq = first, cause = %e, "WAL replay: rides not applied; the WAL keeps them");
        }
    }

    /// Waits for the actors that were handed a batch's groups (`(day, indexes of its rides in
    /// the batch, the apply)`): the indexes of the rides refused at apply, or, if an actor
    /// was dead (`dead` holds the days found dead before), `Unapplied`, with `seq` noted so
    /// that no checkpoint passes it.
    async fn await_applied<F>(&self, seq: u64, applied: Vec<F>, mut dead: Vec<DayKey>) -> Result<Vec<usize>, Unapplied>
    where
        F: std::future::Future<Output = (DayKey, Vec<usize>, Result<crate::actors::aggregator::Applied, actix::MailboxError>)>,
    {
        let mut refused = Vec::new();
        for (key, at, result) in futures_util::future::join_all(applied).await {
            match result {
                Ok(out) => refused.extend(out.refused.iter().map(|i| at[*i])),
                Err(e) => {
                    tracing::error!(%key, seq, cause = %e, "aggregator is dead; its rides stay in the WAL, unacknowledged");
                    dead.push(key);
                }
            }
        }
        if !dead.is_empty() {
            self.progress.note_unapplied(seq);
            self.progress.actor_failures.fetch_add(1, Ordering::Relaxed);
            return Err(Unapplied { days: dead });
        }
        self.progress.rides_refused.fetch_add(refused.len() as u64, Ordering::Relaxed);
        Ok(refused)
    }

    /// The replay's dispatch (before the node serves): activates the owners (retrying while
    /// the tables are unreachable: the rides are already durable, so giving up is not an
    /// option), dispatches the batch and waits
    /// until the actors applied it, so that a 201 is visible to the very next GET.
    /// Returns the indexes (into `events`) of the rides refused at apply, or an error if
    /// an actor was dead: then the batch is not applied, `seq` is noted so that no
    /// checkpoint passes it, and the caller must not acknowledge it.
    async fn dispatch(&self, seq: u64, events: &[RideEvent]) -> Result<Vec<usize>, Unapplied> {
        let mut applied = Vec::new();
        let mut dead = Vec::new();
        for (key, (at, group)) in group(events) {
            self.seasons.observe(key.resort, key.season, false);
            let mut backoff = Backoff::new(ACTIVATION_RETRY_FIRST, ACTIVATION_RETRY_CAP);
            loop {
                match self.registry.activate(key).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(%key, cause = %e, "activating aggregator failed; retrying");
                        backoff.wait().await;
                    }
                }
            }
            match self.registry.dispatch(&key, seq, group) {
                Some(done) => applied.push(async move { (key, at, done.await) }),
                None => {
                    tracing::error!(%key, seq, "aggregator vanished between activation and dispatch");
                    dead.push(key);
                }
            }
        }
        let mut refused = self.await_applied(seq, applied, dead).await?;
        refused.sort_unstable();
        Ok(refused)
    }

    /// The live dispatch: like [`Self::dispatch`], except that a day that cannot be
    /// activated now is parked instead of retried in place, so that one day's activation
    /// never holds up the batch's other days nor later batches (issue 13, item 7). A day
    /// that is parked already takes its new rides behind the parked ones (WAL order per
    /// day). While any day is parked (the tables are failing), new days are parked
    /// without an attempt of their own: the background retry loads them.
    /// Returns the refused rides' indexes and how many days of the batch were parked.
    async fn dispatch_live(&self, seq: u64, events: &[RideEvent], parked: &mut Parked) -> Result<(Vec<usize>, usize), Unapplied> {
        let mut applied = Vec::new();
        let mut dead = Vec::new();
        let mut new = Vec::new();
        let mut waits = 0;
        let mut send =
            |key: DayKey, at: Vec<usize>, group: Vec<RideEvent>, dead: &mut Vec<DayKey>| match self.registry.dispatch(&key, seq, group) {
                Some(done) => applied.push(async move { (key, at, done.await) }),
                None => {
                    tracing::error!(%key, seq, "aggregator vanished between activation and dispatch");
                    dead.push(key);
                }
            };
        for (key, (at, group)) in group(events) {
            self.seasons.observe(key.resort, key.season, false);
            if parked.days.contains_key(&key) {
                parked.park(key, seq, at, group);
                waits += 1;
            } else if self.registry.is_resident(&key) {
                send(key, at, group, &mut dead);
            } else {
                new.push((key, at, group));
            }
        }
        if !new.is_empty() && parked.days.is_empty() {
            // One attempt each, all at once: the usual way a day becomes resident.
            let loads = futures_util::future::join_all(new.iter().map(|(k, _, _)| timed_load(self.registry.load(*k)))).await;
            for ((key, at, group), loaded) in new.into_iter().zip(loads) {
                match loaded {
                    Ok(day) => {
                        self.registry.install(day);
                        send(key, at, group, &mut dead);
                    }
                    Err(e) => {
                        self.progress.activation_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%key, cause = %e, "activating aggregator failed; its rides wait in the WAL while the other days go on");
                        parked.park(key, seq, at, group);
                        parked.retry_at = tokio::time::Instant::now() + parked.backoff.ceiling();
                        waits += 1;
                    }
                }
            }
        } else {
            for (key, at, group) in new {
                parked.park(key, seq, at, group);
                waits += 1;
            }
        }
        let refused = self.await_applied(seq, applied, dead).await?;
        Ok((refused, waits))
    }

    /// Starts a load for every parked day without one in flight.
    fn retry_parked(&self, parked: &mut Parked) {
        let keys: Vec<DayKey> = parked.days.keys().filter(|k| !parked.loading.contains(k)).copied().collect();
        for key in keys {
            parked.loading.insert(key);
            let load = timed_load(self.registry.load(key));
            parked.loads.push(Box::pin(async move { (key, load.await) }));
        }
    }

    /// A parked day's load finished: on success its rides are applied in WAL order and the
    /// batches whose last parked day it was are answered; on failure it is retried later.
    async fn activated(&self, key: DayKey, loaded: Result<super::registry::LoadedDay, crate::error::TableError>, parked: &mut Parked) {
        parked.loading.remove(&key);
        let day = match loaded {
            Ok(day) => day,
            Err(e) => {
                self.progress.activation_failures.fetch_add(1, Ordering::Relaxed);
                parked.backoff.next_delay();
                parked.retry_at = tokio::time::Instant::now() + parked.backoff.ceiling();
                tracing::warn!(%key, cause = %e, retry_in_ms = parked.backoff.ceiling().as_millis() as u64, "activating a parked day failed; retrying");
                return;
            }
        };
        self.registry.install(day);
        parked.backoff.reset();
        parked.retry_at = tokio::time::Instant::now();
        let groups = parked.days.remove(&key).unwrap_or_default();
        let mut done = Vec::new();
        for g in groups {
            parked.rides -= g.rides.len();
            let result = match self.registry.dispatch(&key, g.seq, g.rides) {
                Some(applied) => applied.await.ok(),
                None => None,
            };
            match result {
                Some(out) => {
                    self.progress.rides_refused.fetch_add(out.refused.len() as u64, Ordering::Relaxed);
                    if let Some(w) = parked.batches.get_mut(&g.seq) {
                        w.refused.extend(out.refused.iter().map(|i| g.at[*i]));
                        w.days -= 1;
                        if w.days == 0 {
                            done.push(g.seq);
                        }
                    }
                }
                None => {
                    tracing::error!(%key, seq = g.seq, "aggregator is dead; its parked rides stay in the WAL, unacknowledged");
                    self.progress.note_unapplied(g.seq);
                    self.progress.actor_failures.fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = parked.batches.remove(&g.seq) {
                        w.acker.nack(PublishError::Unavailable(Unapplied { days: vec![key] }.to_string())).await;
                    }
                }
            }
        }
        tracing::info!(%key, answered = done.len(), "a parked day is resident again; its rides are applied");
        for seq in done {
            if let Some(w) = parked.batches.remove(&seq) {
                self.settle(seq, w.acker, w.refused, &w.events).await;
            }
        }
        parked.publish(&self.progress);
    }

    /// Drops every resident day, the held acks and the parked rides: whatever they hold that
    /// the tables lack was never acked, so the broker redelivers it to the partition's owner
    /// (this node again, or another), and the days reload from the tables.
    fn drop_state(&self, parked: &mut Parked, why: &str) {
        let dropped_acks = self.progress.acks.drop_all();
        // A load begun before the reset may be stale.
        let dropped_parked = std::mem::take(parked).rides;
        parked.publish(&self.progress);
        let days = self.registry.clear();
        self.progress.ownership_resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(days, dropped_acks, dropped_parked, "{why}: resident state dropped; the broker redelivers what was not acked");
    }

    /// A change of this node's shards (cluster mode, ADR 005).
    fn shard_event(&self, event: ShardEvent, link: &ClusterLink, drains: &mut Drains, parked: &mut Parked) {
        match event {
            ShardEvent::Acquired { shard, epoch } => {
                // Days of the shard from an earlier ownership are stale: the next owner may
                // have written since. They were dropped when the shard went; this is cheap.
                let stale = self.registry.drop_where(|k| k.partition(link.shards) == shard);
                tracing::info!(shard, epoch, stale, "shard acquired: consuming its queue");
                link.subscriptions.subscribe(shard);
            }
            ShardEvent::Releasing { shard, epoch } => {
                tracing::info!(shard, epoch, "shard handed off: draining, flushing and acking it");
                drains.begin(shard, epoch);
                link.subscriptions.cancel(shard);
            }
            ShardEvent::Released { shard, epoch } => {
                if drains.take(shard).is_some() {
                    // The keeper stopped waiting (`cluster.handoff_timeout_ms`): what the
                    // shard still holds must not be flushed or acked any more.
                    self.lose(shard, epoch, link, drains, parked, "hand-off timed out");
                }
            }
            ShardEvent::Lost { shard, epoch, reason } => {
                drains.take(shard);
                self.lose(shard, epoch, link, drains, parked, &format!("lease lost ({reason:?})"));
            }
        }
    }

    /// A shard gone without its hand-off: nothing more is acked on any channel (the source
    /// opens every subscription again) and all resident state goes, so that no ride of it
    /// is acked by this node now. Coarse, and rare: a paused, cut-off or overloaded node.
    fn lose(&self, shard: u16, epoch: u64, link: &ClusterLink, drains: &mut Drains, parked: &mut Parked, why: &str) {
        self.progress.shards_lost.fetch_add(1, Ordering::Relaxed);
        link.subscriptions.reset(shard);
        self.drop_state(parked, &format!("shard {shard} (epoch {epoch}): {why}"));
        drains.abandon(link);
    }

    /// Releases the shards being handed off whose last delivery is flushed and acked.
    fn finish_drains(&self, link: &ClusterLink, drains: &mut Drains) {
        let acked = self.progress.acks.acked_through();
        for (shard, epoch) in drains.done(acked) {
            link.subscriptions.close(shard);
            let days = self.registry.drop_where(|k| k.partition(link.shards) == shard);
            self.progress.shards_handed_off.fetch_add(1, Ordering::Relaxed);
            tracing::info!(shard, epoch, days, "shard flushed and acked: released");
            link.keeper.ready_to_release(shard, epoch);
        }
    }

    /// Answers a batch whose rides are all applied (ADR 002's ack policy).
    async fn settle(&self, seq: u64, acker: Box<dyn crate::bus::Acker>, mut refused: Vec<usize>, events: &[RideEvent]) {
        refused.sort_unstable();
        let acker = Refusing::wrap(acker, refused, events);
        match self.ack_after {
            AckAfter::Wal => acker.ack().await,
            AckAfter::Table => self.progress.acks.hold(seq, acker),
        }
    }

    /// Consumes until the source is closed and drained, or until `pause` fires; then
    /// hands the source back, still connected, so the caller can flush before letting it
    /// go (a broker hands the partitions to a standby only once it is dropped).
    ///
    /// A batch of a new epoch (the broker connection was lost and opened again) may come
    /// after another consumer owned these partitions: the standby takes them the moment
    /// the connection drops, and they come back when it loses its own. Resident days are
    /// then stale: their next write would carry as many rides as the other owner's and
    /// lose to it, or win over rides only the tables hold. With `AckAfter::Table` they
    /// are dropped, unflushed changes included, before the batch is applied: whatever
    /// they held that the tables lack was never acked, so the broker redelivers it to
    /// whoever owns the partition now, and the days reload from the tables. Held acks go
    /// too: their connection is gone. With `AckAfter::Wal` acked rides may exist only
    /// here, so nothing is dropped (ADR 002: `wal` is for a consumer without a standby).
    ///
    /// Days that cannot be activated are parked (see [`Self::dispatch_live`]); the batches
    /// they belong to are answered once they are applied. With the embedded bus their POSTs
    /// meanwhile get the publisher's deadline answer, 503 "may have been recorded", which
    /// is true: the WAL holds them. Past `max_unflushed_rides` no batch is taken until the
    /// checkpoint moves, except to drain a closing source.
    pub async fn run(self, source: Box<dyn EventSource>, pause: crate::bus::Stop) -> Box<dyn EventSource> {
        self.run_with(source, pause, None).await
    }

    /// [`Self::run`], in cluster mode when `cluster` is given: the keeper's shard events
    /// decide which partition queues are consumed (see [`ClusterLink`]).
    pub async fn run_with(
        self,
        mut source: Box<dyn EventSource>,
        pause: crate::bus::Stop,
        mut cluster: Option<ClusterLink>,
    ) -> Box<dyn EventSource> {
        let mut epoch = None;
        let mut parked = Parked::default();
        let mut drains = Drains::default();
        let closing = source.stop_handle();
        let bound = match self.progress.max_unflushed_rides.load(Ordering::Relaxed) {
            0 => u64::MAX,
            n => n,
        };
        loop {
            drains.mark(&self.progress);
            let full = self.progress.unflushed_events.load(Ordering::Relaxed) >= bound;
            let take = !full || closing.is_stopped();
            let was_holding = self.progress.holding_for_memory.swap(!take, Ordering::Relaxed);
            if !take && !was_holding {
                self.progress.memory_holds.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    unflushed = self.progress.unflushed_events.load(Ordering::Relaxed),
                    bound,
                    "unflushed rides at their bound: no new batch until a flush moves the checkpoint"
                );
            }
            // `next_batch` is dropped whenever a load or the retry timer wins, so it must be
            // cancel-safe: both sources await only a channel `recv` before taking the rest
            // of the batch without awaiting (bus::embedded, bus::amqp). A source that
            // awaited after taking a ride would lose it here.
            let batch = tokio::select! {
                biased;
                _ = pause.stopped() => break,
                Some((key, loaded)) = parked.loads.next(), if !parked.loads.is_empty() => {
                    self.activated(key, loaded, &mut parked).await;
                    continue;
                }
                _ = tokio::time::sleep_until(parked.retry_at), if parked.retry_pending() => {
                    self.retry_parked(&mut parked);
                    continue;
                }
                Some(event) = next_shard_event(&mut cluster), if cluster.is_some() => {
                    if let Some(link) = &cluster {
                        self.shard_event(event, link, &mut drains, &mut parked);
                    }
                    continue;
                }
                _ = tokio::time::sleep(DRAIN_POLL), if drains.waiting() => {
                    if let Some(link) = &cluster {
                        self.finish_drains(link, &mut drains);
                    }
                    continue;
                }
                _ = tokio::time::sleep(MEMORY_HOLD_POLL), if !take => continue,
                batch = source.next_batch(self.max_batch), if take => match batch {
                    Some(batch) => batch,
                    None => break,
                },
            };
            // Hand-offs whose last delivery this batch holds (or came before it).
            drains.drained(&batch.drained);
            if batch.events.is_empty() {
                continue;
            }
            if epoch.is_some_and(|e| e != batch.epoch) && self.ack_after == AckAfter::Table {
                self.drop_state(&mut parked, "broker subscription taken again");
                if let Some(link) = &cluster {
                    // Their deliveries were on the lost connection: nothing of them is left
                    // to flush or ack here, and their next owner gets them redelivered.
                    drains.abandon(link);
                }
                tracing::warn!(epoch = batch.epoch, "resident days dropped, to be reloaded from the tables");
            }
            epoch = Some(batch.epoch);
            let n = batch.events.len() as u64;
            let started = Instant::now();
            let (seq, events) = match self.write_wal(batch.events, None).await {
                Ok((events, Ok(seq))) => (seq, events),
                // A broker: pause consuming and hold the batch until the WAL takes it, rather
                // than nack it into a redelivery loop (see `Acker::hold_on_wal_failure`).
                Ok((events, Err((appended, e)))) if batch.acker.hold_on_wal_failure() => {
                    match self.hold_until_durable(events, appended, e, &pause).await {
                        Held::Written(seq, events) => (seq, events),
                        // Dropped unacked: the broker redelivers it to whoever consumes next.
                        Held::Paused => break,
                        Held::TaskFailed => {
                            batch.acker.nack(PublishError::Uncertain("write-ahead log task failed".into())).await;
                            continue;
                        }
                    }
                }
                Ok((_, Err((appended, e)))) => {
                    self.progress.wal_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(cause = %e, rides = n, "WAL append failed; rides refused");
                    batch.acker.nack(refusal(appended.is_some(), e)).await;
                    // The clients have their answer; this only keeps a failing disk from being a busy loop.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(join) => {
                    tracing::error!(cause = %join, "WAL writer task failed");
                    batch.acker.nack(PublishError::Uncertain("write-ahead log task failed".into())).await;
                    continue;
                }
            };
            self.progress.fsync_micros_total.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            // The one log line that ties a WAL record to the requests of its rides (see
            // crate::trace); the flusher's lines then say up to which sequence is in the tables.
            tracing::debug!(seq, rides = n, request_ids = %batch.request_ids, "WAL batch durable");
            #[cfg(feature = "fault-injection")]
            if self.abort_after_batches.is_some_and(|n| self.progress.batches.load(Ordering::Relaxed) + 1 >= n) {
                tracing::error!(seq, "fault injection: aborting after the WAL fsync, before the ack");
                std::process::abort();
            }
            self.progress.unflushed(seq, started, n);
            let (refused, waits) = match self.dispatch_live(seq, &events, &mut parked).await {
                Ok(out) => out,
                Err(e) => {
                    // Fail closed (issue 13, item 6): rides no actor applied get no 201 and
                    // no broker ack; the WAL keeps them (see `Progress::checkpoint_limit`).
                    batch.acker.nack(PublishError::Unavailable(e.to_string())).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            self.progress.dispatched_seq.store(seq, Ordering::Release);
            // Rides parked behind a day's activation are applied later; their lag is counted
            // here, at dispatch, which is when the other rides of the batch became readable.
            crate::metrics::applied_lag(&batch.published_us);
            tracing::debug!(seq, rides = n, refused = refused.len(), waiting_days = waits, "WAL batch applied");
            self.progress.batches.fetch_add(1, Ordering::Relaxed);
            self.progress.events.fetch_add(n, Ordering::Relaxed);
            self.progress.last_batch_size.store(n, Ordering::Relaxed);
            if waits == 0 {
                self.settle(seq, batch.acker, refused, &events).await;
            } else {
                parked.batches.insert(seq, Waiting { acker: batch.acker, events, refused, days: waits });
                parked.publish(&self.progress);
            }
            self.progress.trigger.consumed(n, self.flush_after_rides);
        }
        if parked.rides > 0 {
            // Their batches stay unanswered (the embedded POSTs get "may have been recorded",
            // a broker redelivers), and `parked_floor` keeps the checkpoint below them: the
            // next start replays them from the WAL.
            tracing::warn!(
                rides = parked.rides,
                days = parked.days.len(),
                "consumer stopped with rides parked behind their day's activation; the WAL keeps them"
            );
        }
        tracing::info!("consumer stopped");
        source
    }
}

/// How often a consumer with a hand-off under way looks whether its acks went out.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Cluster mode's link between the consumer and the lease keeper (ADR 005): the keeper's
/// events say which shards (partition queues) to consume, and a shard handed off is
/// released only once its deliveries are flushed and acked.
pub struct ClusterLink {
    pub keeper: crate::cluster::KeeperHandle,
    pub events: tokio::sync::mpsc::UnboundedReceiver<ShardEvent>,
    pub subscriptions: crate::bus::amqp::Subscriptions,
    pub shards: u16,
}

async fn next_shard_event(cluster: &mut Option<ClusterLink>) -> Option<ShardEvent> {
    match cluster {
        Some(link) => link.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Shards being handed off. A hand-off goes: cancel the subscription → the source says
/// every delivery of it is queued (`Batch::drained`) → the WAL record holding the last one
/// is known once that batch was handled → the flusher has written and acked through it
/// (`AckLedger::acked_through`) → close the channel, drop the days, release.
#[derive(Default)]
struct Drains {
    shards: std::collections::BTreeMap<u16, Drain>,
    /// Drained in the batch just taken: their WAL bound is read at the next loop head,
    /// after the batch was handled whichever way it went.
    just_drained: Vec<u16>,
}

struct Drain {
    epoch: u64,
    /// WAL sequence of the last record that can hold one of its rides.
    upto: Option<u64>,
}

impl Drains {
    fn begin(&mut self, shard: u16, epoch: u64) {
        self.shards.insert(shard, Drain { epoch, upto: None });
    }

    fn take(&mut self, shard: u16) -> Option<Drain> {
        self.shards.remove(&shard)
    }

    fn drained(&mut self, shards: &[u16]) {
        self.just_drained.extend_from_slice(shards);
    }

    fn mark(&mut self, progress: &Progress) {
        if self.just_drained.is_empty() {
            return;
        }
        let upto = progress.dispatched_seq.load(Ordering::Acquire);
        for shard in std::mem::take(&mut self.just_drained) {
            if let Some(d) = self.shards.get_mut(&shard) {
                d.upto = Some(upto);
                // Flush now rather than at the interval: the hand-off waits for it.
                progress.trigger.kick();
            }
        }
    }

    fn waiting(&self) -> bool {
        self.shards.values().any(|d| d.upto.is_some())
    }

    /// The shards whose bound `acked` passed, taken out.
    fn done(&mut self, acked: u64) -> Vec<(u16, u64)> {
        let done: Vec<(u16, u64)> =
            self.shards.iter().filter(|(_, d)| d.upto.is_some_and(|u| u <= acked)).map(|(s, d)| (*s, d.epoch)).collect();
        for (s, _) in &done {
            self.shards.remove(s);
        }
        done
    }

    /// Resident state was dropped: every shard being handed off has nothing left here to
    /// flush or ack (its unacked deliveries are redelivered to its next owner), so it is
    /// released now.
    fn abandon(&mut self, link: &ClusterLink) {
        for (shard, d) in std::mem::take(&mut self.shards) {
            link.subscriptions.close(shard);
            link.keeper.ready_to_release(shard, d.epoch);
        }
        self.just_drained.clear();
    }
}

/// One load attempt, bounded by [`ACTIVATION_TIMEOUT`].
async fn timed_load(
    load: impl std::future::Future<Output = Result<super::registry::LoadedDay, crate::error::TableError>>,
) -> Result<super::registry::LoadedDay, crate::error::TableError> {
    tokio::time::timeout(ACTIVATION_TIMEOUT, load).await.unwrap_or_else(|_| {
        Err(crate::error::TableError::Unavailable(format!("loading the day took over {} s", ACTIVATION_TIMEOUT.as_secs())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-off's bound is the WAL record dispatched when its drain marker was handled,
    /// and it completes only once the acks went out through that record.
    #[test]
    fn a_hand_off_waits_for_the_acks_through_its_last_record() {
        let progress = Progress::default();
        let mut drains = Drains::default();
        drains.begin(3, 7);
        drains.begin(5, 2);
        progress.dispatched_seq.store(40, Ordering::Release);
        assert!(!drains.waiting(), "no marker yet: no bound");
        drains.drained(&[3, 9]); // 9 is not being handed off: ignored
        progress.dispatched_seq.store(41, Ordering::Release); // the marker's batch was handled
        drains.mark(&progress);
        assert!(drains.waiting());
        assert_eq!(drains.done(40), vec![], "acks only through 40: record 41 may hold shard 3's rides");
        assert_eq!(drains.done(41), vec![(3, 7)]);
        assert!(!drains.waiting() && drains.shards.contains_key(&5), "shard 5 still waits for its marker");
    }

    /// What the embedded bus's clients are told when the WAL refuses their batch: a failed
    /// append wrote nothing, a failed fsync after the append may still surface at replay.
    #[test]
    fn a_fsync_failing_after_the_append_is_an_unknown_outcome() {
        let io = || WalError::Io(std::io::Error::other("EIO"));
        assert!(refusal(true, io()).may_be_recorded());
        assert!(!refusal(false, io()).may_be_recorded());
        assert!(matches!(refusal(false, WalError::Full { live_bytes: 1, max_bytes: 1 }), PublishError::Overloaded));
        assert!(!refusal(false, WalError::DiskLow { free_bytes: 0, reserve_bytes: 1 }).may_be_recorded());
    }
}
