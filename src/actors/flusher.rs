//! The flusher: moves what the actors changed into the tables, then checkpoints the WAL.
//!
//! One cycle: read how far the consumer has dispatched, ask every actor for its dirty
//! snapshot (the mailbox order guarantees it includes everything dispatched before),
//! write aggregates first — seasons, skier-days, day counts — then a bounded slice of
//! raw rides, make the writes durable, tell the actors what was committed, and only then
//! move the WAL checkpoint. A failed cycle changes nothing: the actors keep their dirty
//! marks, the WAL keeps its records, and the next cycle tries again with backoff.

use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::consumer::Progress;
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
    pub checkpoint: u64,
    pub millis: u64,
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
    abort_mid_flush: Option<u64>,
    torn_cycles: std::sync::atomic::AtomicU64,
    /// One cycle at a time: the interval timer and `POST /admin/flush` share it.
    lock: tokio::sync::Mutex<()>,
    stats: parking_lot::Mutex<FlushStats>,
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
        }
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
        match &result {
            Ok(r) => {
                s.consecutive_failures = 0;
                s.skier_days_written += r.skier_days as u64;
                s.counts_written += r.counts as u64;
                s.rides_written += r.rides as u64;
                s.last_flush_unix_ms = Some(unix_ms());
                s.checkpoint = r.checkpoint;
                s.last_error = None;
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
        self.progress.unflushed_rides.store(0, Ordering::Relaxed);
        let upto = self.progress.dispatched_seq.load(Ordering::Acquire);
        let handles = self.registry.all();
        let mut snaps = Vec::with_capacity(handles.len());
        for h in handles {
            if let Some(s) = h.take_dirty(self.rides_per_actor).await {
                snaps.push((h, s));
            }
        }
        let seasons = self.seasons.take_dirty();
        if let Err(e) = self.write(&seasons, &snaps).await {
            self.seasons.restore_dirty(seasons);
            return Err(e);
        }
        let mut report = FlushReport::default();
        let mut checkpoint = upto;
        for (h, s) in &snaps {
            report.skier_days += s.skier_days.len();
            report.counts += s.count.is_some() as usize;
            report.rides += s.rides.len();
            if let Some(oldest) = s.oldest_left {
                checkpoint = checkpoint.min(oldest.saturating_sub(1));
            }
            h.committed(s);
        }
        let wal = self.wal.clone();
        tokio::task::spawn_blocking(move || wal.set_checkpoint(checkpoint))
            .await
            .map_err(|e| TableError::Unavailable(e.to_string()))?
            .map_err(|e| TableError::Unavailable(format!("WAL checkpoint: {e}")))?;
        report.checkpoint = checkpoint;
        self.progress.checkpointed(checkpoint);
        // AckAfter::Table: these batches are in the tables now.
        for acker in self.progress.release_acks(checkpoint) {
            acker.ack().await;
        }
        self.registry.passivate_idle();
        Ok(report)
    }

    async fn write(&self, seasons: &[(u32, u16)], snaps: &[(crate::actors::aggregator::DayHandle, crate::actors::aggregator::DirtySnapshot)]) -> Result<(), TableError> {
        if !seasons.is_empty() {
            self.tables.put_seasons(seasons).await?;
        }
        let mut stale = 0;
        let t0 = Instant::now();
        let days: Vec<_> = snaps.iter().flat_map(|(_, s)| s.skier_days.iter().cloned()).collect();
        for chunk in days.chunks(WRITE_CHUNK) {
            stale += self.tables.put_skier_days(chunk).await?.stale;
        }
        if let Some(n) = self.abort_mid_flush.filter(|_| !days.is_empty()) {
            if self.torn_cycles.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                self.tables.sync().await?;
                tracing::error!(skier_days = days.len(), "fault injection: aborting mid-flush; skier-days written, counts and raw rides not");
                std::process::abort();
            }
        }
        let counts: Vec<_> = snaps.iter().filter_map(|(_, s)| s.count.clone()).collect();
        for chunk in counts.chunks(WRITE_CHUNK) {
            stale += self.tables.put_day_counts(chunk).await?.stale;
        }
        let t1 = Instant::now();
        for (_, s) in snaps {
            for chunk in s.rides.chunks(WRITE_CHUNK) {
                self.tables.put_rides(chunk).await?;
            }
        }
        let t2 = Instant::now();
        self.tables.sync().await?;
        tracing::debug!(days = days.len(), aggregates_ms = (t1 - t0).as_millis() as u64, rides_ms = (t2 - t1).as_millis() as u64, sync_ms = t2.elapsed().as_millis() as u64, "flush phases");
        self.stats.lock().stale_skipped += stale as u64;
        Ok(())
    }

    /// Flushes every `interval`, or earlier when the consumer signals that many rides are
    /// waiting, until `stop` fires; failures back off up to 30 s (and ignore the size
    /// trigger meanwhile, so an outage does not turn into a retry storm).
    pub async fn run(self: Arc<Self>, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut wait = interval;
        loop {
            let healthy = wait == interval;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.progress.flush_kick.notified(), if healthy => {}
                _ = stop.changed() => break,
            }
            match self.flush().await {
                Ok(_) => wait = interval,
                Err(e) => {
                    wait = (wait * 2).min(Duration::from_secs(30));
                    tracing::warn!(cause = %e, retry_in_ms = wait.as_millis() as u64, "flush failed; WAL keeps the rides");
                }
            }
        }
    }
}
