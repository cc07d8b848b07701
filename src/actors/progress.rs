//! What the consumer and the flusher share, in three named parts:
//!
//! - [`AckLedger`]: with `consumer.ack_after = "table"`, the batches durable in the WAL whose
//!   ack waits for the tables; the flusher sends them once its checkpoint covers them. The one
//!   place that decides when a held batch is acked.
//! - [`FlushTrigger`]: what wakes the flusher before its interval (rides consumed past
//!   `flush.after_rides`, a shard hand-off waiting for its flush).
//! - [`Progress`]: how far the consumer got and what holds the checkpoint back
//!   ([`Progress::checkpoint_limit`]), and the counters the admin views read
//!   ([`ProgressView`]).

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::bus::Acker;

/// Held acks, in WAL order (see the module doc).
#[derive(Default)]
pub struct AckLedger {
    held: parking_lot::Mutex<VecDeque<(u64, Box<dyn Acker>)>>,
    /// The checkpoint whose held acks were sent: a shard being handed off is released once
    /// this passes its last delivery's WAL record.
    acked_through: AtomicU64,
}

impl AckLedger {
    /// Holds the ack of the batch in WAL record `seq` until a checkpoint covers it. In WAL
    /// order: a parked batch is settled after later ones.
    pub fn hold(&self, seq: u64, acker: Box<dyn Acker>) {
        let mut held = self.held.lock();
        let at = held.iter().position(|(s, _)| *s > seq).unwrap_or(held.len());
        held.insert(at, (seq, acker));
    }

    /// Takes the held acks a checkpoint at `upto` covers, oldest first; the caller sends
    /// them, then calls [`Self::sent_through`].
    pub fn release(&self, upto: u64) -> Vec<Box<dyn Acker>> {
        let mut held = self.held.lock();
        let mut out = Vec::new();
        while held.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, acker)) = held.pop_front() {
                out.push(acker);
            }
        }
        out
    }

    /// Every ack held through `upto` was sent.
    pub fn sent_through(&self, upto: u64) {
        self.acked_through.fetch_max(upto, Ordering::AcqRel);
    }

    pub fn acked_through(&self) -> u64 {
        self.acked_through.load(Ordering::Acquire)
    }

    /// Drops every held ack unsent (their connection is gone, or their state was dropped:
    /// the broker redelivers them); returns how many.
    pub fn drop_all(&self) -> usize {
        std::mem::take(&mut *self.held.lock()).len()
    }

    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Wakes the flusher early (see the module doc).
#[derive(Default)]
pub struct FlushTrigger {
    /// Rides consumed since the flusher last ran.
    rides: AtomicU64,
    kick: tokio::sync::Notify,
}

impl FlushTrigger {
    /// `n` rides were consumed; past `after` the flusher is woken.
    pub fn consumed(&self, n: u64, after: u64) {
        if self.rides.fetch_add(n, Ordering::Relaxed) + n >= after {
            self.kick.notify_one();
        }
    }

    /// Wakes the flusher now (a hand-off waits for its flush).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// A cycle starts: what was consumed so far is in it.
    pub fn cycle_started(&self) {
        self.rides.store(0, Ordering::Relaxed);
    }

    pub async fn kicked(&self) {
        self.kick.notified().await
    }
}

/// Progress shared with the flusher and the admin views.
#[derive(Default)]
pub struct Progress {
    /// Highest WAL sequence whose rides were all handed to their actors. The flusher may
    /// checkpoint up to here once it flushed what the actors hold.
    pub dispatched_seq: AtomicU64,
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub wal_failures: AtomicU64,
    pub last_batch_size: AtomicU64,
    pub fsync_micros_total: AtomicU64,
    pub replayed_records: AtomicU64,
    pub replayed_events: AtomicU64,
    pub replay_micros: AtomicU64,
    /// Times the resident days were dropped because the broker subscription was lost and
    /// taken again (`AckAfter::Table`; see `Consumer::run`).
    pub ownership_resets: AtomicU64,
    /// When the flusher runs early (the size trigger, a hand-off).
    pub trigger: FlushTrigger,
    /// When each WAL batch not yet checkpointed was written, and its rides, oldest first:
    /// the flush lag (age of the oldest ride not yet in the tables) is the age of the front
    /// entry.
    pub unflushed_batches: parking_lot::Mutex<std::collections::VecDeque<(u64, Instant, u64)>>,
    /// Rides in WAL records the checkpoint has not passed: what the resident actors hold
    /// that the tables may lack (pending raw rides, ids, dirty marks), plus parked rides.
    /// Past `Consumer::max_unflushed_rides` the consumer takes no new batch (issue 13, item 7).
    pub unflushed_events: AtomicU64,
    /// Times the consumer stopped taking batches because of that bound.
    pub memory_holds: AtomicU64,
    /// Whether it is holding now.
    pub holding_for_memory: std::sync::atomic::AtomicBool,
    /// Lowest WAL sequence with rides parked behind their day's activation (0: none). The
    /// checkpoint stays below it: those rides are only in the WAL until they are applied.
    pub parked_floor: AtomicU64,
    /// Rides and days parked behind an activation that the tables refuse for now.
    pub parked_rides: AtomicU64,
    pub parked_days: AtomicU64,
    /// Attempts to load a day from the tables that failed.
    pub activation_failures: AtomicU64,
    /// Bound on [`Self::unflushed_events`] (`actors.max_unflushed_rides`; 0: none, the
    /// default): past it the consumer takes no new batch until a flush lets the checkpoint
    /// move. A table outage otherwise grows resident state without a memory bound, since
    /// only a flushed day can be passivated. The embedded queue then fills and POSTs get
    /// 429, then 503 "not recorded"; a broker keeps the rides. Here rather than a field of
    /// `Consumer`, which tests build literally.
    pub max_unflushed_rides: AtomicU64,
    /// With `AckAfter::Table`: the acks that wait for the tables.
    pub acks: AckLedger,
    /// Lowest WAL sequence of a batch some actor did not apply because it was dead
    /// (0: none). The checkpoint stays below it until a restart replays the WAL.
    pub unapplied_floor: AtomicU64,
    /// Batches not acknowledged because an owning actor was dead.
    pub actor_failures: AtomicU64,
    /// Rides durable in the WAL but refused at apply (their skier-day was full).
    pub rides_refused: AtomicU64,
    /// Cluster mode: shards handed off after their flush and acks, and shards lost (their
    /// lease gone without a hand-off: all resident state dropped, everything unacked
    /// redelivered).
    pub shards_handed_off: AtomicU64,
    pub shards_lost: AtomicU64,
}

impl Progress {
    /// How far the WAL may be checkpointed as far as the consumer knows: what it dispatched,
    /// but never past a batch a dead actor did not apply (its rides are only in the WAL).
    /// Nor past rides parked behind their day's activation.
    pub fn checkpoint_limit(&self) -> u64 {
        let upto = self.dispatched_seq.load(Ordering::Acquire);
        let floors = [self.unapplied_floor.load(Ordering::Acquire), self.parked_floor.load(Ordering::Acquire)];
        floors.into_iter().filter(|f| *f > 0).fold(upto, |upto, floor| upto.min(floor - 1))
    }

    pub(super) fn note_unapplied(&self, seq: u64) {
        let _ = self.unapplied_floor.fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| (f == 0 || seq < f).then_some(seq));
    }
}

#[derive(Serialize)]
pub struct ProgressView {
    pub dispatched_seq: u64,
    pub batches: u64,
    pub events: u64,
    pub wal_failures: u64,
    pub last_batch_size: u64,
    pub mean_batch_size: f64,
    pub mean_fsync_micros: f64,
    pub replayed_records: u64,
    pub replayed_events: u64,
    pub replay_millis: u64,
    pub ownership_resets: u64,
    pub actor_failures: u64,
    pub unapplied_floor: u64,
    pub rides_refused: u64,
    /// Age of the oldest ride not yet in the tables, ms (0 when all are).
    pub flush_lag_ms: u64,
    pub unflushed_events: u64,
    pub max_unflushed_rides: u64,
    pub memory_holds: u64,
    pub holding_for_memory: bool,
    pub parked_rides: u64,
    pub parked_days: u64,
    pub parked_floor: u64,
    pub activation_failures: u64,
    pub shards_handed_off: u64,
    pub shards_lost: u64,
}

impl Progress {
    pub fn view(&self) -> ProgressView {
        let batches = self.batches.load(Ordering::Relaxed);
        let events = self.events.load(Ordering::Relaxed);
        let per = |x: u64| if batches == 0 { 0.0 } else { x as f64 / batches as f64 };
        ProgressView {
            dispatched_seq: self.dispatched_seq.load(Ordering::Relaxed),
            batches,
            events,
            wal_failures: self.wal_failures.load(Ordering::Relaxed),
            last_batch_size: self.last_batch_size.load(Ordering::Relaxed),
            mean_batch_size: per(events),
            mean_fsync_micros: per(self.fsync_micros_total.load(Ordering::Relaxed)),
            replayed_records: self.replayed_records.load(Ordering::Relaxed),
            replayed_events: self.replayed_events.load(Ordering::Relaxed),
            replay_millis: self.replay_micros.load(Ordering::Relaxed) / 1000,
            ownership_resets: self.ownership_resets.load(Ordering::Relaxed),
            actor_failures: self.actor_failures.load(Ordering::Relaxed),
            unapplied_floor: self.unapplied_floor.load(Ordering::Relaxed),
            rides_refused: self.rides_refused.load(Ordering::Relaxed),
            flush_lag_ms: self.flush_lag().as_millis() as u64,
            unflushed_events: self.unflushed_events.load(Ordering::Relaxed),
            max_unflushed_rides: self.max_unflushed_rides.load(Ordering::Relaxed),
            memory_holds: self.memory_holds.load(Ordering::Relaxed),
            holding_for_memory: self.holding_for_memory.load(Ordering::Relaxed),
            parked_rides: self.parked_rides.load(Ordering::Relaxed),
            parked_days: self.parked_days.load(Ordering::Relaxed),
            parked_floor: self.parked_floor.load(Ordering::Relaxed),
            activation_failures: self.activation_failures.load(Ordering::Relaxed),
            shards_handed_off: self.shards_handed_off.load(Ordering::Relaxed),
            shards_lost: self.shards_lost.load(Ordering::Relaxed),
        }
    }

    pub fn flush_lag(&self) -> Duration {
        self.unflushed_batches.lock().front().map_or(Duration::ZERO, |(_, at, _)| at.elapsed())
    }

    /// Forgets the batches a checkpoint now covers.
    pub fn checkpointed(&self, upto: u64) {
        let mut q = self.unflushed_batches.lock();
        while q.front().is_some_and(|(seq, _, _)| *seq <= upto) {
            if let Some((_, _, rides)) = q.pop_front() {
                self.unflushed_events.fetch_sub(rides, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn unflushed(&self, seq: u64, at: Instant, rides: u64) {
        self.unflushed_batches.lock().push_back((seq, at, rides));
        self.unflushed_events.fetch_add(rides, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// An acker that records its batch's WAL sequence when acked.
    struct Note(u64, Arc<parking_lot::Mutex<Vec<u64>>>);

    #[async_trait::async_trait]
    impl Acker for Note {
        async fn ack(self: Box<Self>) {
            self.1.lock().push(self.0);
        }
        async fn nack(self: Box<Self>, _: crate::error::PublishError) {}
    }

    /// `ack_after = table`: an ack waits for a checkpoint that covers its batch, and acks
    /// go out in WAL order even when a parked batch settles after later ones.
    #[tokio::test]
    async fn held_acks_go_out_in_wal_order_and_only_once_the_checkpoint_covers_them() {
        let ledger = AckLedger::default();
        let sent = Arc::new(parking_lot::Mutex::new(Vec::new()));
        for seq in [3, 5, 4, 9] {
            ledger.hold(seq, Box::new(Note(seq, sent.clone())));
        }
        for acker in ledger.release(4) {
            acker.ack().await;
        }
        ledger.sent_through(4);
        assert_eq!((sent.lock().clone(), ledger.len(), ledger.acked_through()), (vec![3, 4], 2, 4));
        ledger.sent_through(2); // never backwards
        assert_eq!(ledger.acked_through(), 4);
        assert_eq!(ledger.drop_all(), 2);
        assert!(ledger.release(100).is_empty() && ledger.is_empty());
    }

    /// The checkpoint never passes what was not dispatched, a batch a dead actor did not
    /// apply, nor rides parked behind their day's activation.
    #[test]
    fn the_checkpoint_limit_stays_below_every_floor() {
        let p = Progress::default();
        p.dispatched_seq.store(20, Ordering::Release);
        assert_eq!(p.checkpoint_limit(), 20);
        p.parked_floor.store(12, Ordering::Release);
        assert_eq!(p.checkpoint_limit(), 11);
        p.note_unapplied(15);
        p.note_unapplied(9);
        p.note_unapplied(17); // the lowest floor stays
        assert_eq!(p.checkpoint_limit(), 8);
    }
}
