//! The flusher: moves what the actors changed into the tables, then checkpoints the WAL.
//!
//! One cycle: read how far the consumer has dispatched, ask every actor for its dirty
//! snapshot (the mailbox order guarantees it includes everything dispatched before),
//! write aggregates first — seasons, skier-days, day counts — then a bounded slice of
//! raw rides, make the writes durable, tell the actors what was committed, and only then
//! move the WAL checkpoint. A failed cycle changes nothing: the actors keep their dirty
//! marks, the WAL keeps its records, and the next cycle tries again with backoff.
//!
//! Two things hold the checkpoint back without failing the cycle (issue 13, items 1, 6):
//! - an item the store refuses for good (`WriteReport::refused`): the others are written
//!   and committed; that item stays dirty (tried again each cycle, counted and logged in
//!   [`FlushStats`]), and the checkpoint stays below the first WAL record of its
//!   unflushed changes, so its rides stay replayable until it is written or an operator
//!   steps in. Its raw rides are written all the same. The WAL then grows behind it, and
//!   its own bound turns that into 503s, not into lost rides: a checkpoint past the item
//!   would delete the only copy that can rebuild it (the raw rows alone are not reloaded).
//! - a dead actor (a handler panicked): its state is read under its lock but not flushed,
//!   since a panic may have left it half-applied; the checkpoint stays below its oldest
//!   unflushed change and below any batch it did not apply, until a restart replays.

use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::progress::Progress;
use super::registry::Registry;
use super::seasons::SeasonBook;
use super::unix_ms;
use crate::error::TableError;
use crate::tables::Tables;
use liftlog_wal::Wal;

/// Items per table write call. Each store splits further as it must (DynamoDB: 25 per
/// BatchWriteItem); larger calls keep the per-call overhead (a blocking-pool hop for sled,
/// a round of concurrent requests for DynamoDB) off the per-item cost.
pub const WRITE_CHUNK: usize = 2_000;

#[derive(Clone, Debug, Default, Serialize)]
pub struct FlushStats {
    pub cycles: u64,
    pub failures: u64,
    pub consecutive_failures: u64,
    pub skier_days_written: u64,
    pub counts_written: u64,
    pub rides_written: u64,
    pub stale_skipped: u64,
    /// Items the store refused for good, over all cycles (each cycle tries them again).
    pub items_refused: u64,
    /// The latest such refusal: which item and why.
    pub last_refused: Option<String>,
    /// Resident aggregators found dead in the last cycle; their days are not flushed.
    pub dead_actors: usize,
    /// Where the last cycle held the checkpoint below what was dispatched, and why.
    pub checkpoint_held: Option<String>,
    pub last_flush_unix_ms: Option<u64>,
    pub last_duration_ms: u64,
    pub last_error: Option<String>,
    pub checkpoint: u64,
}

/// What one cycle wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlushReport {
    pub skier_days: usize,
    pub counts: usize,
    pub rides: usize,
    /// Items refused for good in this cycle (see the module doc).
    pub refused: usize,
    pub checkpoint: u64,
    pub millis: u64,
}

/// What the store refused in one cycle: skiers per snapshot, and snapshots whose day count
/// it refused.
#[derive(Default)]
struct Refusals {
    skiers: Vec<Vec<u32>>,
    counts: Vec<bool>,
    total: usize,
}

pub struct Flusher {
    pub registry: Arc<Registry>,
    pub tables: Arc<dyn Tables>,
    pub wal: Arc<Wal>,
    pub seasons: Arc<SeasonBook>,
    pub progress: Arc<Progress>,
    /// Raw rides taken from one actor per cycle, so a backlog of raw rides never delays
    /// the aggregates behind it by more than one bounded write.
    pub rides_per_actor: usize,
    /// For a store on the local disk: (its directory, free bytes it must leave). A cycle
    /// that would eat into that reserve is skipped, because sled cannot recover from a
    /// full disk without a restart. The WAL keeps the rides meanwhile.
    disk_guard: Option<(std::path::PathBuf, u64)>,
    /// Fault injection for the crash tests (`LIFTLOG_FAULT_ABORT_MID_FLUSH=n`): the n-th
    /// cycle that writes skier-days aborts the process once they are durable, before the
    /// day counts and raw rides are written — the torn flush a crash can cause.
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    abort_mid_flush: Option<u64>,
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    torn_cycles: std::sync::atomic::AtomicU64,
    /// One cycle at a time: the interval timer and `POST /admin/flush` share it.
    lock: tokio::sync::Mutex<()>,
    stats: parking_lot::Mutex<FlushStats>,
    /// Cluster mode: the keeper whose fences stamp every write, and the shard count.
    fencing: Option<(crate::cluster::KeeperHandle, u16)>,
}

impl Flusher {
    pub fn new(
        registry: Arc<Registry>,
        tables: Arc<dyn Tables>,
        wal: Arc<Wal>,
        seasons: Arc<SeasonBook>,
        progress: Arc<Progress>,
        rides_per_actor: usize,
        disk_guard: Option<(std::path::PathBuf, u64)>,
    ) -> Self {
        Flusher {
            registry,
            tables,
            wal,
            seasons,
            progress,
            rides_per_actor: rides_per_actor.max(1),
            disk_guard,
            abort_mid_flush: None,
            torn_cycles: std::sync::atomic::AtomicU64::new(0),
            lock: tokio::sync::Mutex::new(()),
            stats: parking_lot::Mutex::new(FlushStats::default()),
            fencing: None,
        }
    }

    /// Cluster mode (ADR 005, "The fencing contract"): a day is written only under a fence
    /// of its shard, stamped on its items; a day whose shard has none is not written (its
    /// shard is being lost, and the consumer drops it); the acks a cycle releases wait until
    /// every fence it wrote under was still held after the writes returned.
    pub fn with_fencing(mut self, keeper: crate::cluster::KeeperHandle, shards: u16) -> Self {
        self.fencing = Some((keeper, shards));
        self
    }

    /// Arms the torn-flush fault (see `abort_mid_flush`).
    pub fn with_abort_mid_flush(mut self, nth_cycle: Option<u64>) -> Self {
        self.abort_mid_flush = nth_cycle.filter(|n| *n > 0);
        self
    }

    pub fn stats(&self) -> FlushStats {
        self.stats.lock().clone()
    }

    /// Runs one cycle now; waits for a cycle already under way to finish first.
    pub async fn flush(&self) -> Result<FlushReport, TableError> {
        let _one_at_a_time = self.lock.lock().await;
        let started = Instant::now();
        let result = self.cycle().await;
        let mut s = self.stats.lock();
        s.cycles += 1;
        s.last_duration_ms = started.elapsed().as_millis() as u64;
        crate::metrics::flush_cycle(started);
        match &result {
            Ok(r) => {
                s.consecutive_failures = 0;
                s.skier_days_written += r.skier_days as u64;
                s.counts_written += r.counts as u64;
                s.rides_written += r.rides as u64;
                s.items_refused += r.refused as u64;
                s.last_flush_unix_ms = Some(unix_ms());
                s.checkpoint = r.checkpoint;
                s.last_error = None;
                // With the consumer's "WAL batch durable" lines: a ride's request id names
                // its WAL record, and this says when that record reached the tables.
                tracing::debug!(checkpoint = r.checkpoint, skier_days = r.skier_days, rides = r.rides, "flushed: WAL checkpoint moved");
            }
            Err(e) => {
                s.failures += 1;
                s.consecutive_failures += 1;
                s.last_error = Some(e.to_string());
            }
        }
        result.map(|mut r| {
            r.millis = started.elapsed().as_millis() as u64;
            r
        })
    }

    async fn cycle(&self) -> Result<FlushReport, TableError> {
        if let Some((dir, reserve)) = &self.disk_guard {
            if let Some(free) = liftlog_wal::free_space(dir).filter(|free| free < reserve) {
                return Err(TableError::Unavailable(format!("disk nearly full: {free} bytes free under {}", dir.display())));
            }
        }
        self.progress.trigger.cycle_started();
        // Never past a batch a dead actor did not apply, nor past rides parked behind their
        // day's activation (`Progress::checkpoint_limit`).
        let upto = self.progress.checkpoint_limit();
        let mut checkpoint = upto;
        let mut held: Option<String> = (upto < self.progress.dispatched_seq.load(Ordering::Acquire)).then(|| {
            let why = if self.progress.parked_floor.load(Ordering::Acquire) == upto + 1 {
                "whose day waits for its activation"
            } else {
                "which a dead aggregator did not apply"
            };
            format!("below WAL record {}, {why}", upto + 1)
        });
        let handles = self.registry.all_keyed();
        let mut snaps = Vec::with_capacity(handles.len());
        // The epoch each snapshot is written under (cluster mode; 0 otherwise), and the
        // fences used, checked again once the writes returned.
        let mut epochs = Vec::with_capacity(handles.len());
        let mut fences = rustc_hash::FxHashSet::default();
        let mut dead = 0;
        for (key, h) in handles {
            let fence = match &self.fencing {
                None => None,
                Some((keeper, shards)) => match keeper.fence(key.partition(*shards)) {
                    Some(fence) => Some(fence),
                    None => {
                        // Not ours to write any more: the consumer drops it. Until then it
                        // holds the checkpoint like any unflushed day.
                        if let Some(oldest) = h.read(|st| st.oldest_unflushed()) {
                            checkpoint = checkpoint.min(oldest.saturating_sub(1));
                        }
                        continue;
                    }
                },
            };
            match h.take_dirty(self.rides_per_actor).await {
                Some(s) => {
                    snaps.push((h, s));
                    epochs.push(fence.map_or(0, |f| f.epoch));
                    fences.extend(fence);
                }
                None => {
                    // Dead: what it holds that the tables lack exists only in the WAL now.
                    dead += 1;
                    let (key, oldest) = h.read(|st| (st.key, st.oldest_unflushed()));
                    if let Some(oldest) = oldest {
                        checkpoint = checkpoint.min(oldest.saturating_sub(1));
                        held = Some(format!("below WAL record {oldest}: the aggregator of {key} is dead"));
                    }
                    tracing::error!(%key, oldest_unflushed = ?oldest, "aggregator is dead; its day is not flushed and the WAL keeps its rides");
                }
            }
        }
        let seasons = self.seasons.take_dirty();
        let written = match self.write(&seasons, &snaps, &epochs).await {
            Ok(refusals) => self.still_fenced(&fences).map(|()| refusals),
            Err(e) => Err(e),
        };
        let refusals = match written {
            Ok(refusals) => refusals,
            Err(e) => {
                self.seasons.restore_dirty(seasons);
                return Err(e);
            }
        };
        let mut report = FlushReport { refused: refusals.total, ..FlushReport::default() };
        for (i, (h, s)) in snaps.iter().enumerate() {
            report.skier_days += s.skier_days.len() - refusals.skiers[i].len();
            report.counts += (s.count.is_some() && !refusals.counts[i]) as usize;
            report.rides += s.rides.len();
            if let Some(oldest) = s.oldest_left {
                checkpoint = checkpoint.min(oldest.saturating_sub(1));
            }
            for m in s.marks.iter().filter(|m| refusals.skiers[i].contains(&m.skier)) {
                // Its rides since its last write are in no item: keep their WAL records.
                if m.first <= checkpoint {
                    checkpoint = m.first.saturating_sub(1);
                    held = Some(format!(
                        "below WAL record {}: the store refused skier {}'s item of {}",
                        m.first, m.skier, s.skier_days[0].key
                    ));
                }
            }
            h.committed(s, &refusals.skiers[i], refusals.counts[i]);
        }
        {
            let mut stats = self.stats.lock();
            stats.dead_actors = dead;
            stats.checkpoint_held = held;
        }
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || wal.set_checkpoint(checkpoint))
            .await
            .map_err(|e| TableError::Unavailable(e.to_string()))?
            .map_err(|e| TableError::Unavailable(format!("WAL checkpoint: {e}")))?;
        report.checkpoint = checkpoint;
        self.progress.checkpointed(checkpoint);
        // AckAfter::Table: these batches are in the tables now.
        for acker in self.progress.acks.release(checkpoint) {
            acker.ack().await;
        }
        self.progress.acks.sent_through(checkpoint);
        self.registry.passivate_idle();
        Ok(report)
    }

    /// Cluster mode: whether every shard written under a fence in this cycle still has that
    /// fence now that the writes returned. A write in flight when the lease passed may
    /// have landed; acking it would be acking for a shard another node owns, so the cycle
    /// fails instead (nothing is committed or acked; the consumer drops the lost shard, and
    /// the broker redelivers to its new owner).
    fn still_fenced(&self, used: &rustc_hash::FxHashSet<crate::cluster::Fence>) -> Result<(), TableError> {
        let Some((keeper, _)) = &self.fencing else { return Ok(()) };
        match used.iter().find(|f| keeper.fence(f.shard) != Some(**f)) {
            None => Ok(()),
            Some(f) => Err(TableError::Unavailable(format!(
                "the lease of shard {} (epoch {}) ended while its days were written; nothing of this flush is acked",
                f.shard, f.epoch
            ))),
        }
    }

    /// Writes the snapshots; returns what the store refused for good (see the module doc).
    async fn write(
        &self,
        seasons: &[(u32, u16)],
        snaps: &[(crate::actors::aggregator::DayHandle, crate::actors::aggregator::DirtySnapshot)],
        epochs: &[u64],
    ) -> Result<Refusals, TableError> {
        if !seasons.is_empty() {
            self.tables.put_seasons(seasons).await?;
        }
        let mut refusals = Refusals { skiers: vec![Vec::new(); snaps.len()], counts: vec![false; snaps.len()], total: 0 };
        let refused = |what: String, why: &str| {
            tracing::error!(item = %what, cause = why, "the table store refused an item for good; it stays dirty and the WAL keeps its rides");
            self.stats.lock().last_refused = Some(format!("{what}: {why}"));
        };
        let mut stale = 0;
        let t0 = Instant::now();
        // Which snapshot each item comes from, to keep a refused one dirty.
        let owners: Vec<usize> = snaps.iter().enumerate().flat_map(|(i, (_, s))| std::iter::repeat_n(i, s.skier_days.len())).collect();
        let days: Vec<_> = snaps.iter().flat_map(|(_, s)| s.skier_days.iter().cloned()).collect();
        let day_epochs: Vec<u64> = owners.iter().map(|i| epochs[*i]).collect();
        for (c, chunk) in days.chunks(WRITE_CHUNK).enumerate() {
            let r = match self.fencing {
                None => self.tables.put_skier_days(chunk).await?,
                Some(_) => self.tables.put_skier_days_fenced(chunk, &day_epochs[c * WRITE_CHUNK..][..chunk.len()]).await?,
            };
            stale += r.stale;
            for (at, why) in r.refused {
                let item = &chunk[at];
                refusals.skiers[owners[c * WRITE_CHUNK + at]].push(item.skier);
                refusals.total += 1;
                refused(format!("SkierDays {} skier {} ({} ids)", item.key, item.skier, item.ids.len()), &why);
            }
        }
        #[cfg(feature = "fault-injection")]
        if let Some(n) = self.abort_mid_flush.filter(|_| !days.is_empty()) {
            if self.torn_cycles.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                self.tables.sync().await?;
                tracing::error!(
                    skier_days = days.len(),
                    "fault injection: aborting mid-flush; skier-days written, counts and raw rides not"
                );
                std::process::abort();
            }
        }
        let counted: Vec<usize> = snaps.iter().enumerate().filter(|(_, (_, s))| s.count.is_some()).map(|(i, _)| i).collect();
        let counts: Vec<_> = snaps.iter().filter_map(|(_, s)| s.count.clone()).collect();
        let count_epochs: Vec<u64> = counted.iter().map(|i| epochs[*i]).collect();
        for (c, chunk) in counts.chunks(WRITE_CHUNK).enumerate() {
            let r = match self.fencing {
                None => self.tables.put_day_counts(chunk).await?,
                Some(_) => self.tables.put_day_counts_fenced(chunk, &count_epochs[c * WRITE_CHUNK..][..chunk.len()]).await?,
            };
            stale += r.stale;
            for (at, why) in r.refused {
                // A count needs no WAL record: activation rebuilds it from the items.
                refusals.counts[counted[c * WRITE_CHUNK + at]] = true;
                refusals.total += 1;
                refused(format!("LiftRideCounts {}", chunk[at].key), &why);
            }
        }
        let t1 = Instant::now();
        for (_, s) in snaps {
            for chunk in s.rides.chunks(WRITE_CHUNK) {
                self.tables.put_rides(chunk).await?;
            }
        }
        let t2 = Instant::now();
        self.tables.sync().await?;
        tracing::debug!(
            days = days.len(),
            aggregates_ms = (t1 - t0).as_millis() as u64,
            rides_ms = (t2 - t1).as_millis() as u64,
            sync_ms = t2.elapsed().as_millis() as u64,
            "flush phases"
        );
        self.stats.lock().stale_skipped += stale as u64;
        Ok(refusals)
    }

    /// Flushes every `interval`, or earlier when the consumer signals that many rides are
    /// waiting, until `stop` fires; failures back off up to [`FAILED_FLUSH_CAP`] (and ignore
    /// the size trigger meanwhile, so an outage does not turn into a retry storm).
    pub async fn run(self: Arc<Self>, interval: Duration, stop: crate::bus::Stop) {
        let mut failing = crate::retry::Backoff::new((interval * 2).min(FAILED_FLUSH_CAP), FAILED_FLUSH_CAP);
        let (mut wait, mut healthy) = (interval, true);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.progress.trigger.kicked(), if healthy => {}
                _ = stop.stopped() => break,
            }
            match self.flush().await {
                Ok(_) => {
                    failing.reset();
                    (wait, healthy) = (interval, true);
                }
                Err(e) => {
                    (wait, healthy) = (failing.next_delay(), false);
                    tracing::warn!(cause = %e, retry_in_ms = wait.as_millis() as u64, "flush failed; WAL keeps the rides");
                }
            }
        }
    }
}

/// Longest wait between two cycles while they fail.
pub const FAILED_FLUSH_CAP: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::consumer::{AckAfter, Consumer};
    use crate::actors::season_index::SeasonIndex;
    use crate::bus::{embedded, Publisher};
    use crate::domain::{DayKey, RideEvent, Stamp};
    use crate::tables::sled_store::SledTables;
    use liftlog_wal::{Durability, WalConfig};

    /// A consuming node in one process: WAL and sled tables in `dir`, the embedded bus.
    struct Node {
        publisher: Arc<embedded::EmbeddedPublisher>,
        registry: Arc<Registry>,
        tables: Arc<SledTables>,
        wal: Arc<Wal>,
        progress: Arc<Progress>,
        flusher: Flusher,
    }

    fn node(dir: &std::path::Path) -> Node {
        let tables = Arc::new(SledTables::open(&dir.join("tables")).unwrap());
        node_with(dir, tables.clone(), tables)
    }

    /// A node whose flusher and registry use `store`, read back through `tables`.
    fn node_with(dir: &std::path::Path, tables: Arc<SledTables>, store: Arc<dyn Tables>) -> Node {
        node_bounded(dir, tables, store, u64::MAX)
    }

    /// The same, with the consumer's bound on unflushed rides.
    fn node_bounded(dir: &std::path::Path, tables: Arc<SledTables>, store: Arc<dyn Tables>, max_unflushed_rides: u64) -> Node {
        let wal_cfg = WalConfig {
            dir: dir.join("wal"),
            durability: Durability::GroupCommit,
            max_bytes: 1 << 30,
            min_free_bytes: 0,
            truncate_corrupt: false,
        };
        let wal = Arc::new(Wal::open(wal_cfg).unwrap().0);
        let registry = Arc::new(Registry::new(store.clone(), Arc::new(SeasonIndex::new()), 100));
        let seasons = Arc::new(SeasonBook::default());
        let progress = Arc::new(Progress::default());
        let (publisher, source) = embedded::channel(1_000, Duration::from_secs(5));
        let consumer = Consumer {
            wal: wal.clone(),
            registry: registry.clone(),
            seasons: seasons.clone(),
            progress: progress.clone(),
            max_batch: 1_000,
            abort_after_batches: None,
            flush_after_rides: u64::MAX,
            ack_after: AckAfter::Wal,
        };
        progress.max_unflushed_rides.store(max_unflushed_rides, Ordering::Relaxed);
        actix_rt::spawn(consumer.run(Box::new(source), crate::bus::Stop::default()));
        let flusher = Flusher::new(registry.clone(), store, wal.clone(), seasons, progress.clone(), 10_000, None);
        Node { publisher: Arc::new(publisher), registry, tables, wal, progress, flusher }
    }

    fn ride(id: u64, day: u16, skier: u32) -> RideEvent {
        RideEvent { id, resort: 1, season: 2025, day, skier, time: 1, lift: 5, vertical: 50 }
    }

    #[actix_rt::test]
    async fn a_dead_actors_batch_is_not_acknowledged_and_the_checkpoint_stays_before_it() {
        dead_actor_fails_closed(false).await;
    }

    #[actix_rt::test]
    async fn a_panicked_actors_batch_is_not_acknowledged_and_the_checkpoint_stays_before_it() {
        dead_actor_fails_closed(true).await;
    }

    async fn dead_actor_fails_closed(panic: bool) {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let day1 = DayKey { resort: 1, season: 2025, day: 1 };
        n.publisher.publish(ride(1, 1, 7)).await.expect("a ride to a live actor is accepted");
        assert_eq!(n.flusher.flush().await.unwrap().checkpoint, 1);

        // The day's actor dies (a panic in a handler does the same). A ride for it reaches
        // the WAL but no actor: it must not get its 201, and no checkpoint may pass it.
        n.registry.resident(&day1).unwrap().kill(panic).await;
        let refused = n.publisher.publish(ride(2, 1, 7)).await;
        assert!(refused.is_err(), "a ride no actor applied must not be acknowledged: {refused:?}");
        // Other days go on.
        n.publisher.publish(ride(3, 2, 7)).await.expect("a ride for another day is accepted");
        let flushed = n.flusher.flush().await;
        let checkpoint = n.wal.checkpoint();
        assert!(checkpoint < 2, "the checkpoint passed the dead actor's batch (2): {checkpoint}, {:?}", flushed.map(|r| r.checkpoint));
        // What the WAL still holds replays the refused ride at the next start.
        let held: Vec<u64> = n.wal.replay().map(|r| r.unwrap().seq).collect();
        assert!(held.contains(&2), "{held:?}");
        // The other day's ride reached the tables all the same.
        let day2 = DayKey { day: 2, ..day1 };
        assert_eq!(n.tables.get_skier_day(7, day2).await.unwrap().map(|d| d.vertical), Some(50));
        let seen = n.progress.view();
        assert_eq!((seen.actor_failures, seen.unapplied_floor), (1, 2), "the refusal is counted and its record noted");
        assert_eq!(n.flusher.stats().dead_actors, 1);
        assert!(!n.registry.resident(&day1).unwrap().passivatable(), "a dead actor is kept: it holds the checkpoint");
    }

    #[actix_rt::test]
    async fn an_item_the_store_refuses_is_isolated_and_holds_only_its_own_wal_records() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledTables::open(&dir.path().join("tables")).unwrap());
        let store = Arc::new(crate::tables::scripted::Scripted::new(sled.clone()));
        store.refuse_skier(Some(13));
        let n = node_with(dir.path(), sled.clone(), store.clone());
        let day1 = DayKey { resort: 1, season: 2025, day: 1 };
        let day2 = DayKey { day: 2, ..day1 };
        // One WAL record each: skier 13 (refused by the store) first, then two others.
        for r in [ride(1, 1, 13), ride(2, 1, 7), ride(3, 2, 8)] {
            n.publisher.publish(r).await.unwrap();
        }
        let report = n.flusher.flush().await.expect("one refused item must not fail the cycle");
        assert_eq!(report.refused, 1);
        // Everything else reached the tables, raw rides included.
        assert_eq!(sled.get_skier_day(7, day1).await.unwrap().map(|d| d.vertical), Some(50));
        assert_eq!(sled.get_skier_day(8, day2).await.unwrap().map(|d| d.vertical), Some(50));
        assert_eq!(sled.get_day_count(day1).await.unwrap().map(|c| c.rides), Some(2));
        assert!(sled.get_skier_day(13, day1).await.unwrap().is_none());
        assert_eq!(sled.ride_count(), 3);
        // The checkpoint stays below the refused item's record (1): it is the only copy of
        // that ride that can rebuild the item.
        assert_eq!((report.checkpoint, n.wal.checkpoint()), (0, 0));
        let stats = n.flusher.stats();
        assert_eq!(stats.items_refused, 1);
        assert!(stats.last_refused.as_deref().is_some_and(|m| m.contains("skier 13") && m.contains("size")), "{stats:?}");
        assert!(stats.checkpoint_held.as_deref().is_some_and(|m| m.contains("skier 13")), "{stats:?}");
        // The day keeps the item dirty, so it is never passivated, and every cycle retries.
        assert!(!n.registry.resident(&day1).unwrap().passivatable());
        assert_eq!(n.flusher.flush().await.unwrap().refused, 1);
        // Once the store takes it, the checkpoint moves on past everything.
        store.refuse_skier(None);
        let report = n.flusher.flush().await.unwrap();
        assert_eq!((report.refused, report.checkpoint), (0, 3));
        assert_eq!(sled.get_skier_day(13, day1).await.unwrap().map(|d| d.vertical), Some(50));
        assert_eq!(n.flusher.stats().checkpoint_held, None);
    }

    #[actix_rt::test]
    async fn with_a_broker_a_ride_past_the_bound_is_acked_dropped_and_counted() {
        use crate::domain::MAX_RIDES_PER_SKIER_DAY as MAX;
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        // A broker's batch: the publisher got its 201 at the broker's confirm, so the acker
        // has no way to answer a ride refused at apply.
        let consumer = broker_consumer(&n, dir.path(), n.progress.clone(), AckAfter::Wal);
        let settled = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send((1, "ack", (1..=MAX as u64 + 1).map(|id| ride(id, 1, 7)).collect())).unwrap();
        drop(tx);
        let source = Scripted(rx, settled.clone());
        consumer.run(Box::new(source), crate::bus::Stop::default()).await;
        // Acked, not nacked: a requeue would only be refused again, forever.
        assert_eq!(*settled.lock(), vec!["ack"]);
        assert_eq!(n.progress.view().rides_refused, 1);
        let day1 = DayKey { resort: 1, season: 2025, day: 1 };
        let h = n.registry.resident(&day1).unwrap();
        assert_eq!(h.read(|st| st.rides), MAX as u64);
        assert_eq!(h.stats().await.unwrap().rides_refused, 1);
    }

    /// A second consumer on the node's registry with a WAL of its own, for the tests that
    /// feed it batches as a broker would ([`Scripted`]).
    fn broker_consumer(n: &Node, dir: &std::path::Path, progress: Arc<Progress>, ack_after: AckAfter) -> Consumer {
        let wal_cfg = WalConfig {
            dir: dir.join("wal2"),
            durability: Durability::GroupCommit,
            max_bytes: 1 << 30,
            min_free_bytes: 0,
            truncate_corrupt: false,
        };
        Consumer {
            wal: Arc::new(Wal::open(wal_cfg).unwrap().0),
            registry: n.registry.clone(),
            seasons: Arc::new(SeasonBook::default()),
            progress,
            max_batch: 10_000,
            abort_after_batches: None,
            flush_after_rides: u64::MAX,
            ack_after,
        }
    }

    /// A broker stand-in fed by the test: each batch with the epoch (connection generation)
    /// it says, its settlement recorded under its name.
    struct Scripted(tokio::sync::mpsc::UnboundedReceiver<(u64, &'static str, Vec<RideEvent>)>, Arc<parking_lot::Mutex<Vec<&'static str>>>);

    struct Named(&'static str, Arc<parking_lot::Mutex<Vec<&'static str>>>);

    #[async_trait::async_trait]
    impl crate::bus::Acker for Named {
        async fn ack(self: Box<Self>) {
            self.1.lock().push(self.0);
        }
        async fn nack(self: Box<Self>, _: crate::error::PublishError) {
            self.1.lock().push("nack");
        }
    }

    #[async_trait::async_trait]
    impl crate::bus::EventSource for Scripted {
        async fn next_batch(&mut self, _: usize) -> Option<crate::bus::Batch> {
            let (epoch, name, events) = self.0.recv().await?;
            Some(crate::bus::Batch {
                events,
                request_ids: Default::default(),
                published_us: Vec::new(),
                acker: Box::new(Named(name, self.1.clone())),
                epoch,
                drained: Vec::new(),
            })
        }
        fn stop_handle(&self) -> crate::bus::Stop {
            crate::bus::Stop::default()
        }
    }

    /// `ack_after = table` in-process: a batch is acked only by the flush whose checkpoint
    /// covers it, and a batch of a new broker epoch first drops the resident days and the
    /// held acks (ADR 006), so the day reloads from the tables and the dropped batch is
    /// left to the broker's redelivery instead of being acked for a stale state.
    #[actix_rt::test]
    async fn acks_after_the_table_wait_for_the_checkpoint_and_a_new_epoch_drops_the_resident_days() {
        let dir = tempfile::tempdir().unwrap();
        let n = node(dir.path());
        let progress = Arc::new(Progress::default());
        let consumer = broker_consumer(&n, dir.path(), progress.clone(), AckAfter::Table);
        let wal = consumer.wal.clone();
        let flusher = Flusher::new(
            n.registry.clone(),
            n.tables.clone(),
            wal.clone(),
            Arc::new(SeasonBook::default()),
            progress.clone(),
            10_000,
            None,
        );
        let settled = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        actix_rt::spawn(consumer.run(Box::new(Scripted(rx, settled.clone())), crate::bus::Stop::default()));
        let day = DayKey { resort: 1, season: 2025, day: 1 };
        let batches = || progress.batches.load(Ordering::Relaxed);

        tx.send((1, "first", vec![ride(1, 1, 7)])).unwrap();
        until("the first batch", || batches() == 1).await;
        assert!(settled.lock().is_empty(), "acked before the tables held it");
        assert_eq!(flusher.flush().await.unwrap().checkpoint, 1);
        assert_eq!(*settled.lock(), vec!["first"]);

        tx.send((1, "second", vec![ride(2, 1, 7)])).unwrap();
        until("the second batch", || batches() == 2).await;
        assert_eq!(n.registry.resident(&day).unwrap().read(|d| d.rides), 2);
        // The connection was lost and taken again: another consumer may have owned the day.
        tx.send((2, "third", vec![ride(3, 1, 7)])).unwrap();
        until("the third batch", || batches() == 3).await;
        assert_eq!(progress.view().ownership_resets, 1);
        assert_eq!(n.registry.resident(&day).unwrap().read(|d| d.rides), 2, "reloaded from the tables (ride 1) plus ride 3");
        flusher.flush().await.unwrap();
        assert_eq!(*settled.lock(), vec!["first", "third"], "the second batch's ack went with its connection");
        assert_eq!(n.tables.get_skier_day(7, day).await.unwrap().map(|d| d.vertical), Some(100));
    }

    /// Polls a figure of the node's own progress (never a fixed sleep), for at most 10 s.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let started = Instant::now();
        while !cond() {
            assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Issue 13, item 7: during a table outage a ride for a day that is not resident cannot
    /// be activated. It used to be retried in place, in the consumer's loop, so every later
    /// batch (every partition, every resident day) waited behind it. Now it is parked: the
    /// resident day keeps applying, the checkpoint stays below the parked ride, and once the
    /// tables are back the day loads and its ride is applied and answered.
    #[actix_rt::test]
    async fn a_new_day_waiting_for_the_tables_does_not_hold_up_the_resident_days() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledTables::open(&dir.path().join("tables")).unwrap());
        let store = Arc::new(crate::tables::scripted::Scripted::new(sled.clone()));
        let n = node_with(dir.path(), sled.clone(), store.clone());
        let (day1, day2) = (DayKey { resort: 1, season: 2025, day: 1 }, DayKey { resort: 1, season: 2025, day: 2 });
        n.publisher.publish(ride(1, 1, 7)).await.unwrap();
        assert_eq!(n.flusher.flush().await.unwrap().checkpoint, 1);

        store.set_down(true);
        // A ride for a new day: its POST waits (the WAL holds it) while its day cannot load.
        let waiting = {
            let p = n.publisher.clone();
            actix_rt::spawn(async move { p.publish(ride(2, 2, 8)).await })
        };
        until("the new day's ride in the WAL", || n.progress.view().unflushed_events == 1).await;
        // The resident day goes on, within well under the publisher's 5 s deadline.
        let resident = tokio::time::timeout(Duration::from_secs(2), n.publisher.publish(ride(3, 1, 9))).await;
        assert!(matches!(resident, Ok(Ok(()))), "a resident day's ride must be applied while a new day waits: {resident:?}");
        assert_eq!(n.registry.resident(&day1).unwrap().read(|d| d.rides), 2);
        assert!(n.registry.resident(&day2).is_none());
        assert!(n.flusher.flush().await.is_err(), "flushes fail during the outage");
        let seen = n.progress.view();
        assert_eq!((seen.parked_rides, seen.parked_floor), (1, 2), "{:?}", serde_json::to_string(&seen));
        assert!(seen.activation_failures >= 1);

        // The tables come back: the day loads, its ride is applied and answered, and the
        // next flush writes everything and checkpoints past all three records.
        store.set_down(false);
        until("the parked day applied", || n.progress.view().parked_rides == 0).await;
        assert!(matches!(waiting.await, Ok(Ok(()))), "the parked ride is answered once applied");
        assert_eq!(n.registry.resident(&day2).unwrap().read(|d| d.rides), 1);
        assert_eq!(n.flusher.flush().await.unwrap().checkpoint, 3);
        assert_eq!(sled.get_skier_day(8, day2).await.unwrap().map(|d| d.vertical), Some(50));
        assert_eq!(sled.get_day_count(day1).await.unwrap().map(|c| c.rides), Some(2));
    }

    /// A torn flush — a crash after a cycle wrote the skier-days and before it wrote the
    /// day's count — is repaired once the day is activated: the count is rebuilt from the
    /// items and written by the next cycle, even though no ride of the day comes again;
    /// the ids the items hold still drop a redelivered ride.
    #[actix_rt::test]
    async fn a_torn_flush_is_repaired_by_the_next_cycle_after_its_day_is_activated() {
        use crate::tables::{DayCountItem, SkierDayItem};
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledTables::open(&dir.path().join("tables")).unwrap());
        let day = DayKey { resort: 1, season: 2025, day: 1 };
        // What the crash left: skier 8's first ride reached its item, not the count.
        sled.put_skier_days(&[
            SkierDayItem { skier: 7, key: day, vertical: 100, ids: vec![1, 2], version: 2, stamps: vec![Stamp::UNKNOWN; 2] },
            SkierDayItem { skier: 8, key: day, vertical: 50, ids: vec![3], version: 1, stamps: vec![Stamp::UNKNOWN] },
        ])
        .await
        .unwrap();
        sled.put_day_counts(&[DayCountItem { key: day, unique_skiers: 1, rides: 2, version: 2 }]).await.unwrap();

        let n = node_with(dir.path(), sled.clone(), sled.clone());
        n.registry.activate(day).await.unwrap();
        n.flusher.flush().await.unwrap();
        let count = || async { sled.get_day_count(day).await.unwrap().map(|c| (c.unique_skiers, c.rides)) };
        assert_eq!(count().await, Some((2, 3)), "the count rebuilt from the items");

        n.publisher.publish(ride(3, 1, 8)).await.unwrap(); // redelivered: already in skier 8's ids
        n.publisher.publish(ride(4, 1, 9)).await.unwrap();
        n.flusher.flush().await.unwrap();
        assert_eq!(count().await, Some((3, 4)));
        assert_eq!(sled.get_skier_day(8, day).await.unwrap().map(|d| d.vertical), Some(50));
    }

    /// The flusher's pacing, in tokio's paused clock (no real waiting, and every delay
    /// exact): while the tables fail, cycles back off 2·interval, 4·, … up to
    /// [`FAILED_FLUSH_CAP`] and ignore the size trigger (an outage must not become a retry
    /// storm); the first success brings back the interval, and a kick is obeyed again.
    #[actix_rt::test]
    async fn while_the_tables_fail_cycles_back_off_to_the_cap_and_ignore_kicks_then_the_interval_returns() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledTables::open(&dir.path().join("tables")).unwrap());
        let store = Arc::new(crate::tables::scripted::Scripted::new(sled.clone()));
        let n = node_with(dir.path(), sled.clone(), store.clone());
        n.publisher.publish(ride(1, 1, 7)).await.unwrap(); // a dirty day, so a cycle writes
        store.set_down(true);
        tokio::time::pause();

        let flusher = Arc::new(n.flusher);
        let stop = crate::bus::Stop::default();
        actix_rt::spawn(flusher.clone().run(Duration::from_secs(1), stop.clone()));
        let t0 = tokio::time::Instant::now();
        // The virtual second at which the flusher's figure `what` first reached `want`.
        let at = |what: fn(&FlushStats) -> u64, want: u64| {
            let flusher = flusher.clone();
            async move {
                while what(&flusher.stats()) < want {
                    assert!(t0.elapsed() < Duration::from_secs(600), "no cycle number {want} within 600 virtual seconds");
                    if flusher.lock.try_lock().is_err() {
                        // A cycle is under way and may wait on sled's own thread: keep the
                        // runtime busy so that the paused clock does not run on meanwhile.
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                (t0.elapsed().as_millis() as u64 + 500) / 1000
            }
        };
        let mut failed_at = Vec::new();
        for k in 1..=7 {
            failed_at.push(at(|s| s.failures, k).await);
            // Rides keep arriving past the size trigger: it must not shorten the back-off.
            flusher.progress.trigger.consumed(1_000_000, 1);
            flusher.progress.trigger.kick();
        }
        // After 1 s, then waits of 2, 4, 8, 16 and 30 s (the cap), and 30 s again.
        assert_eq!(failed_at, [1, 3, 7, 15, 31, 61, 91]);
        assert_eq!(flusher.stats().cycles, 7);

        store.set_down(false);
        assert_eq!(at(|s| s.cycles, 8).await, 121, "the next attempt keeps its back-off");
        assert_eq!(flusher.stats().failures, 7);
        // The outage's kicks were kept (as one): a second cycle follows at once, for what
        // came in meanwhile; then the interval.
        let mut later = Vec::new();
        for k in 9..=11 {
            later.push(at(|s| s.cycles, k).await);
        }
        assert_eq!(later, [121, 122, 123], "healthy again: the interval");
        let before = t0.elapsed();
        flusher.progress.trigger.kick();
        at(|s| s.cycles, 12).await;
        assert!(t0.elapsed() - before < Duration::from_millis(10), "a kick is obeyed once the cycles succeed");
        stop.stop();
        assert_eq!(sled.get_skier_day(7, DayKey { resort: 1, season: 2025, day: 1 }).await.unwrap().map(|d| d.vertical), Some(50));
    }

    /// Issue 13, item 7: resident state is bounded through an outage. Past the bound on
    /// unflushed rides the consumer takes no new batch (the embedded queue then fills and
    /// sheds); a successful flush moves the checkpoint and lets it go on.
    #[actix_rt::test]
    async fn past_the_bound_on_unflushed_rides_no_batch_is_taken_until_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let sled = Arc::new(SledTables::open(&dir.path().join("tables")).unwrap());
        let store = Arc::new(crate::tables::scripted::Scripted::new(sled.clone()));
        let n = node_bounded(dir.path(), sled.clone(), store.clone(), 2);
        store.set_down(true);
        n.publisher.publish(ride(1, 1, 7)).await.unwrap_err(); // the new day waits: the 5 s deadline
        n.publisher.publish(ride(2, 1, 7)).await.unwrap_err();
        assert_eq!(n.progress.view().unflushed_events, 2);
        let third = {
            let p = n.publisher.clone();
            actix_rt::spawn(async move { p.publish(ride(3, 1, 8)).await })
        };
        until("the consumer holding for memory", || n.progress.view().holding_for_memory).await;
        assert_eq!(n.progress.view().unflushed_events, 2, "no batch taken past the bound");
        store.set_down(false);
        until("the parked day applied", || n.progress.view().parked_rides == 0).await;
        n.flusher.flush().await.unwrap();
        assert!(matches!(third.await, Ok(Ok(()))), "taken once a flush made room");
        let day1 = DayKey { resort: 1, season: 2025, day: 1 };
        n.flusher.flush().await.unwrap();
        assert_eq!(sled.get_day_count(day1).await.unwrap().map(|c| (c.unique_skiers, c.rides)), Some((2, 3)));
        assert!(n.progress.view().memory_holds >= 1);
    }
}
