//! The event bus between the write path and the consumers, behind two traits: a
//! [`Publisher`] that returns only once a ride is durable, and an [`EventSource`] that
//! hands batches of deliveries to the consumer with an [`Acker`] for the batch.
//!
//! - [`embedded`]: a bounded in-process queue; "durable" means the consumer fsynced the
//!   WAL batch holding the ride.
//! - RabbitMQ (production): publisher confirms; the consumer acks after the WAL fsync.

pub mod admission;
pub mod amqp;
pub mod embedded;

use async_trait::async_trait;
use serde::Serialize;

use crate::domain::RideEvent;
use crate::error::PublishError;
use crate::trace::{RequestId, RequestIds};

/// Queue figures for the admin view and for load shedding.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BusStats {
    pub kind: &'static str,
    /// Rides waiting for the consumer.
    pub depth: usize,
    pub capacity: usize,
    pub published: u64,
    pub rejected_full: u64,
    pub timeouts: u64,
    /// Token bucket and circuit breaker in front of the bus, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admission: Option<admission::AdmissionStats>,
}

/// The write side. `publish` returns `Ok` only when the ride is durable: a 201 may follow.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes the ride of the request `request`, whose id travels with it to the
    /// consumer's log lines (see [`crate::trace`]).
    async fn publish_for(&self, event: RideEvent, request: RequestId) -> Result<(), PublishError>;
    /// A ride that no request id goes with (tests, tools).
    async fn publish(&self, event: RideEvent) -> Result<(), PublishError> {
        self.publish_for(event, RequestId::default()).await
    }
    fn stats(&self) -> BusStats;
    /// Stops accepting rides; rides already queued are still delivered and answered.
    fn close(&self);
}

/// The consume side: deliveries in arrival order, a batch at a time.
#[async_trait]
pub trait EventSource: Send + 'static {
    /// Waits for at least one delivery, then takes what is ready up to `max`.
    /// `None` once stopped (see [`Self::stop_handle`]) and drained.
    async fn next_batch(&mut self, max: usize) -> Option<Batch>;
    /// A handle that stops this source from another task: no new deliveries are taken,
    /// what was already received is still handed out, then `next_batch` returns `None`.
    fn stop_handle(&self) -> Stop;
}

/// A one-way stop signal shared between tasks: the code base's one stop mechanism, a
/// [`CancellationToken`](tokio_util::sync::CancellationToken) underneath, so that stops form
/// a tree ([`Stop::child`]): stopping a node's root stops every task below it, while the
/// ordered shutdown stops the children one by one.
#[derive(Clone, Default)]
pub struct Stop(tokio_util::sync::CancellationToken);

impl Stop {
    pub fn stop(&self) {
        self.0.cancel();
    }

    pub fn is_stopped(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once `stop` was called here or above (immediately if it already was).
    pub async fn stopped(&self) {
        self.0.cancelled().await
    }

    /// A stop of its own that also fires when this one does.
    pub fn child(&self) -> Stop {
        Stop(self.0.child_token())
    }
}

/// Deliveries handed to the consumer together, settled together.
pub struct Batch {
    pub events: Vec<RideEvent>,
    /// The request ids the rides came with, for the consumer's log lines only.
    pub request_ids: RequestIds,
    /// When each message of the batch was published, in microseconds since the Unix epoch
    /// on the write node's clock, for the publish → applied histogram; empty for the
    /// embedded bus (its 201 comes after the apply).
    pub published_us: Vec<u64>,
    pub acker: Box<dyn Acker>,
    /// The subscription the deliveries came through: the broker connection's generation
    /// (0 for the embedded bus, which has one for its lifetime). A new epoch means the
    /// subscription was lost and taken again, and the partitions may have had another
    /// owner in between: see [`crate::actors::consumer::Consumer::run`].
    pub epoch: u64,
    /// Shards whose cancelled subscription has no delivery left after this batch (cluster
    /// mode's hand-off, see [`amqp::Subscriptions::cancel`]); empty otherwise. A batch may
    /// carry only this, with no events.
    pub drained: Vec<u16>,
}

/// Settles a batch: `ack` once it is durable in the WAL, `nack` when it could not be made
/// durable (the publisher then answers 503, or the broker redelivers).
#[async_trait]
pub trait Acker: Send {
    async fn ack(self: Box<Self>);
    async fn nack(self: Box<Self>, error: PublishError);
    /// Acks a batch durable in the WAL some of whose rides (`(index in the batch, why)`)
    /// were refused when applied, e.g. for a full skier-day. A publisher that waits for its
    /// ride (the embedded bus) answers those with the error (a 409); a broker's publisher
    /// was confirmed long ago, so by default the batch is simply acked: the refused rides
    /// are dropped at apply, counted and logged there.
    async fn ack_refusing(self: Box<Self>, refused: Vec<(usize, PublishError)>) {
        let _ = refused;
        self.ack().await
    }

    /// Whether a batch the WAL refused should be held and written again later instead of
    /// nacked. A broker redelivers a nacked batch at once, and RabbitMQ 4.x dead-letters a
    /// ride nacked more often than the queue's delivery limit: a failing disk would move
    /// rides that got their 201 aside. Holding the batch unacked costs nothing there (the
    /// broker sends no more than the prefetch meanwhile). The embedded bus answers waiting
    /// clients with its nack, so it refuses at once (`false`, the default).
    fn hold_on_wal_failure(&self) -> bool {
        false
    }
}
