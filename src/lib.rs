//! liftlog records ski lift rides and answers SkiDataAPI 2.0 questions about them: unique
//! skiers per resort-day, a skier's vertical per day and per season.
//!
//! The data path: HTTP POST → validate → [`bus`] → [`actors::consumer`] (WAL group commit,
//! then the owning aggregator actor) → 201; the [`actors::flusher`] moves state into the
//! [`tables`] and checkpoints the WAL; GETs read the actors' state and fall back to the
//! tables for days that are not resident.
//!
//! Module map:
//! - [`config`]: the configuration, one section per subsystem (defaults ← file ← env ← flags).
//! - [`catalog`]: resorts and their lifts' vertical rise.
//! - [`cluster`]: shard leases in DynamoDB, fencing epochs, the balancer and the lease keeper.
//! - [`domain`]: ride events, aggregate keys, validation, event ids.
//! - [`error`]: error enums per layer and the one mapping to HTTP.
//! - [`bus`]: publisher/consumer traits and the embedded in-process bus.
//! - [`actors`]: aggregator actors, registry, season index, consumer, flusher.
//! - [`tables`]: the table-store trait and its sled implementation.
//! - [`http`]: public API, admin endpoints, request statistics, OpenAPI document.
//! - [`service`]: wiring, start-up (replay) and ordered shutdown.
//! - [`retry`]: the one backoff every retry loop waits by.
//! - `liftlog_wal` (crate `wal/`): the write-ahead log.

pub mod actors;
pub mod bus;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod retry;
pub mod service;
pub mod tables;
