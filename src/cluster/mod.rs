//! Cluster sharding: which consumer node owns which shard, under leases in DynamoDB that
//! double as fencing tokens (issue 12, ADR 005).
//!
//! A shard is one partition queue of [`crate::bus::amqp`] (`DayKey::partition(shards)`), so
//! a resort-day is in exactly one shard and the shard count is fixed per cluster (default
//! [`DEFAULT_SHARDS`]; it is recorded in the lease table and a node with another count
//! refuses to start).
//!
//! - [`lease`]: the `{prefix}ShardLeases` table: one row per shard (owner, endpoint, epoch,
//!   renewal counter), one heartbeat row per node, every write conditional. The
//!   [`lease::LeaseStore`] trait is what the keeper talks to, so that tests can stall or
//!   fake it.
//! - [`expiry`]: the expiry observer: a row is expired when its value has not changed for
//!   the lease duration on the observer's own monotonic clock.
//! - [`balance`]: the pure balancer: which shards to acquire and which to hand off.
//! - [`keeper`]: the async task that heartbeats, renews, self-fences, balances, and
//!   publishes [`keeper::ShardEvent`]s and the [`keeper::ShardMap`].
//! - [`fence`]: the epoch a data-table write carries and the condition that refuses a
//!   stale owner's write.
//! - [`forward`]: day-scoped reads through any node: answered locally by the shard's
//!   owner, forwarded to it (epoch-checked, 421 when it moved), or from the tables.
//! - [`map_watch`]: the [`keeper::ShardMap`] built from one scan (shared with the keeper),
//!   and the watcher that refreshes it on nodes without a keeper.
//!
//! Wired in cluster mode (`cluster.enabled`, ADR 005 "As wired"): `service` starts the
//! keeper, [`crate::actors::consumer::ClusterLink`] turns its events into subscriptions and
//! hand-offs, and the flusher writes under its fences ([`crate::actors::flusher::Flusher::with_fencing`]).

pub mod balance;
pub mod expiry;
pub mod fence;
pub mod forward;
pub mod keeper;
pub mod lease;
pub mod map_watch;

pub use balance::{plan, BalanceInput, Plan, ShardState};
pub use expiry::ExpiryObserver;
pub use fence::Fence;
pub use forward::{ClusterReads, ForwardStats, ReadCall, ReadSettings, Route};
pub use keeper::{HeldShard, KeeperConfig, KeeperHandle, KeeperStats, LeaseKeeper, LostReason, ShardEvent, ShardMap, ShardOwner};
pub use lease::{DynamoLeases, LeaseError, LeaseRow, LeaseStore, NodeRow, TableSnapshot};

/// A shard: the number of a partition queue, `0..shards`.
pub type ShardId = u16;

/// Shards of a cluster unless configured otherwise: about ten per expected consumer node.
pub const DEFAULT_SHARDS: u16 = 64;

/// A consumer node as the cluster knows it: a stable id (unique per running process;
/// reusing the id of a dead process is fine, its leases are then handed back) and the
/// base URL other nodes forward reads to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub endpoint: String,
}
