//! liftlog records ski lift rides and answers SkiDataAPI 2.0 questions about them: unique
//! skiers per resort-day, a skier's vertical per day and per season.
//!
//! The data path: HTTP POST → validate → [`bus`] → [`actors::consumer`] (WAL group commit,
//! then the owning aggregator actor) → 201; the [`actors::flusher`] moves state into the
//! [`tables`] and checkpoints the WAL; GETs read the actors' state and fall back to the
//! tables for days that are not resident. `docs/architecture.md` walks each path through
//! the code; `docs/adr/` says why it is built so.
//!
//! Module map:
//! - [`config`]: the configuration, one section per subsystem (defaults ← file ← env ← flags).
//! - [`catalog`]: resorts and their lifts' vertical rise.
//! - [`cluster`]: cluster mode's shard leases in DynamoDB, fencing epochs, the balancer, the
//!   lease keeper and read forwarding (ADR 005); the consumer follows the keeper through
//!   [`actors::consumer::ClusterLink`].
//! - [`domain`]: ride events, aggregate keys and the shard that owns each
//!   (`DayKey::partition`), validation, event ids.
//! - [`error`]: error enums per layer and the one mapping to HTTP.
//! - [`bus`]: publisher/consumer traits, the embedded in-process bus, RabbitMQ
//!   ([`bus::amqp`]: one folder by concern, batched publishing) and admission control.
//! - [`actors`]: aggregator actors, registry, season index, consumer, flusher.
//! - [`tables`]: the table-store trait, its sled and DynamoDB implementations.
//! - [`http`]: public API, admin endpoints (behind one token guard), request statistics,
//!   the OpenAPI document, the listener's per-head deadline ([`http::conn`]); the live view
//!   beyond the 2.0 API: leaders and lift activity ([`http::live`]), the Server-Sent Events
//!   stream ([`http::stream`]), the dashboard page ([`http::dashboard`]).
//! - [`metrics`]: `/metrics`: each stats type's description (which fields are metrics) and
//!   the latency histograms, rendered with `prometheus-client`.
//! - [`service`]: wiring, start-up (replay) and ordered shutdown.
//! - [`retry`]: the one backoff every retry loop waits by.
//! - [`trace`]: request ids, from the HTTP request through the bus into the consumer's logs.
//! - [`logging`]: where log lines and spans go: stderr (text or JSON) and, with the `otlp`
//!   feature, an OpenTelemetry collector.
//! - `liftlog_wal` (crate `wal/`): the write-ahead log.

pub mod actors;
pub mod bus;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod domain;
pub mod error;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod retry;
pub mod service;
pub mod tables;
pub mod trace;
