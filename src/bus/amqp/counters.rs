//! The source's figures: counted where they happen, read as one [`SourceStats`] view by the
//! admin endpoint.

use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An undecodable message is logged at most this often (a flood of them must not flood
/// the log).
const POISON_LOG_EVERY: Duration = Duration::from_secs(10);

/// Figures of an [`AmqpSource`] for the admin view.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStats {
    pub kind: &'static str,
    pub connected: bool,
    /// Deliveries received from the broker (including redeliveries and poison messages).
    pub deliveries: u64,
    /// Of which the broker flagged as redelivered.
    pub redelivered: u64,
    /// Rides acked after the WAL fsync.
    pub acked: u64,
    /// Rides nacked (requeued): only when the consumer's writer task failed (a WAL failure
    /// holds the batch instead).
    pub nacked: u64,
    /// Undecodable messages rejected into the dead-letter queue.
    pub dead_lettered: u64,
    /// Deliveries of a lost connection dropped before reaching the consumer (the broker
    /// redelivers them).
    pub stale_dropped: u64,
    /// Successful reconnects since `connect`.
    pub reconnects: u64,
    /// Messages ready (not yet delivered) per partition queue, refreshed every second;
    /// empty while unknown.
    pub queue_depths: Vec<u64>,
    /// Partition queues consumed now (all of them, or in cluster mode the shards held).
    pub subscribed: Vec<u16>,
}

/// The source's counters, shared with whoever shows them (see [`AmqpSource::stats_handle`]).
#[derive(Default)]
pub struct SourceCounters {
    pub(super) connected: AtomicBool,
    pub(super) deliveries: AtomicU64,
    pub(super) redelivered: AtomicU64,
    pub(super) acked: AtomicU64,
    pub(super) nacked: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) stale_dropped: AtomicU64,
    pub(super) reconnects: AtomicU64,
    pub(super) depths: parking_lot::Mutex<Vec<u64>>,
    pub(super) subscribed: parking_lot::Mutex<Vec<u16>>,
    poison_log: parking_lot::Mutex<Option<Instant>>,
    poison_unlogged: AtomicU64,
}

impl SourceCounters {
    pub fn snapshot(&self) -> SourceStats {
        SourceStats {
            kind: "amqp",
            connected: self.connected.load(Ordering::Relaxed),
            deliveries: self.deliveries.load(Ordering::Relaxed),
            redelivered: self.redelivered.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            nacked: self.nacked.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            stale_dropped: self.stale_dropped.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            queue_depths: self.depths.lock().clone(),
            subscribed: self.subscribed.lock().clone(),
        }
    }

    pub(super) fn poisoned(&self, queue: &str, tag: u64, why: &str) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        let mut last = self.poison_log.lock();
        if last.is_none_or(|t| t.elapsed() >= POISON_LOG_EVERY) {
            *last = Some(Instant::now());
            let suppressed = self.poison_unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(queue, delivery_tag = tag, cause = why, suppressed, "undecodable message dead-lettered");
        } else {
            self.poison_unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }
}
