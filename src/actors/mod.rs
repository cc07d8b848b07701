//! The consume side: aggregator actors and what drives them.
//!
//! - [`aggregator`]: one actor per (resort, season, day); the single writer of that
//!   aggregate's state, which readers read through a shared lock.
//! - [`registry`]: key → actor handle; activates actors from the tables on demand and
//!   passivates idle, fully flushed ones past a limit.
//! - [`season_index`]: skier-sharded season totals, so a season query never fans out
//!   across days.
//! - [`seasons`]: which seasons exist per resort.
//! - [`consumer`]: bus → WAL (group commit) → actors → ack; WAL replay at start.
//! - [`flusher`]: dirty aggregates and raw rides → tables, then WAL checkpoint.
//! - [`progress`]: what those two share: the held acks, the flush trigger, the counters.

pub mod aggregator;
pub mod consumer;
pub mod flusher;
pub mod progress;
pub mod registry;
pub mod season_index;
pub mod seasons;

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds, for "last flush" style fields in the admin views.
pub fn unix_ms() -> u64 {
    unix_micros() / 1000
}

/// Wall-clock microseconds since the Unix epoch (0 for a clock before it): the publish stamp
/// of an AMQP message (`crate::metrics::applied_lag`).
pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}
