//! The RabbitMQ bus: [`AmqpPublisher`] (publisher confirms) and [`AmqpSource`] (the
//! consumer side, acking after the WAL fsync), over lapin 4 on the tokio runtime.
//!
//! # Topology ([`declare_topology`], idempotent, declared by both ends at every connect)
//!
//! - exchange `{prefix}.rides`: direct, durable. A ride is routed with routing key
//!   `event.key().partition(partitions)` ([`DayKey::partition`](crate::domain::DayKey::partition)) as a decimal string ("0", "1", ...).
//! - queues `{prefix}.rides.{p}` for `p in 0..partitions`: durable quorum queues
//!   (`x-queue-type: quorum`, replicated, fsynced before the confirm), with
//!   `x-single-active-consumer: true` (one consumer per partition at a time: a standby
//!   node takes over when the active one dies, so per-key order and the one-owner-per-
//!   aggregate rule hold across nodes), `x-dead-letter-exchange: {prefix}.dlx` and
//!   `x-delivery-limit: delivery_limit` (see below). Each is bound to `{prefix}.rides` with
//!   its partition number.
//! - exchange `{prefix}.dlx` (fanout, durable) bound to the quorum queue
//!   `{prefix}.rides.dead`: where undecodable messages go. Nothing consumes it; an operator
//!   inspects it.
//!
//! `partitions` is fixed per deployment: every node must use the same value (it is part of
//! the routing function). Growing it later is possible (new queues are declared) but keys
//! move between partitions, so per-key order is only guaranteed once the old queues drained.
//!
//! ## The delivery limit
//!
//! A quorum queue dead-letters a message returned more often than its delivery limit. On
//! RabbitMQ 4.x the default is 20 (3.x has none), and a ride in `{prefix}.rides.dead` got
//! its 201 and is never counted: nothing reads that queue. Our own consumer never requeues
//! in a loop (on a WAL failure it holds the batch unacked and pauses, see
//! [`crate::actors::consumer`]), so what remains to count are returns by a consumer that
//! died or lost its connection with up to `prefetch` rides unacked, all of which count
//! together, the innocent ones too (4.0-4.2 count every return; 4.3 stopped counting
//! `basic.nack` with requeue, but still counts a consumer that went away, rabbitmq-server
//! PR 15387). The limit is therefore declared as
//! [`DEFAULT_DELIVERY_LIMIT`] = 1,000,000: valid on 3.x and 4.x alike (4.x's "unlimited",
//! -1, is refused by 3.x, and one value everywhere survives an in-place 3.13 → 4.x upgrade),
//! and out of reach of any incident (a consumer crash-looping every 5 s for two months).
//! A ride that really cannot be consumed blocks its partition (visible: depth, flush lag)
//! rather than being silently moved aside.
//!
//! RabbitMQ refuses to redeclare an existing queue with other arguments
//! (`PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit'`), and queues declared by an
//! older liftlog have none: declaring then fails with an explanation of the two ways out
//! (keep the queues: `delivery_limit = 0` declares no limit, and a policy sets it; or drain
//! and delete them so they are declared anew). See [`AmqpConfig::delivery_limit`].
//!
//! # Message
//!
//! Body: bincode 2 (serde, standard config) of [`RideEvent`] ([`encode_event`]); properties:
//! `delivery_mode` 2 (persistent), `message_id` = the event id as 16 lowercase hex digits,
//! `content_type` `application/x-bincode`. A delivery is accepted only if its content type
//! is absent or ours, the body decodes with no trailing bytes, and the `message_id` (when
//! present) matches the decoded id; anything else is a poison message.
//!
//! A batch (see below) is one message of content type `application/x-liftlog-rides`
//! ([`CONTENT_TYPE_BATCH`]): bincode of a non-empty `Vec<RideEvent>` ([`encode_batch`]),
//! all of one partition, `message_id` the body's xxh3 as 16 hex digits. The source reads
//! both formats, so write and consume nodes can be upgraded in any order. A batch travels
//! through the source as one item, so a consumer batch never splits a message: the ack of
//! its delivery tag covers all its rides, which are then all in one WAL record.
//!
//! # Batched publishing ([`Batching`])
//!
//! RabbitMQ's cost is per message, not per byte: one ride per message capped POST at about
//! 0.3 of the broker's per-message publish+confirm ceiling. So rides bound for one
//! partition are gathered into one message: the ride that starts a partition's batch arms
//! a `linger` timer, the ride that fills it (`max_rides`, or `max_bytes`) sends it at once,
//! each from a task of its own (a client that goes away cannot take the others' message
//! with it). Every POST waits for the confirm of the message holding its ride, and gets
//! that message's outcome (201, or the same 503). `max_in_flight` still counts rides.
//! `depth` and the admin figures count messages.
//!
//! # Publisher
//!
//! One connection, `publish_channels` channels in confirm mode. `publish` takes a permit of
//! a `max_in_flight` semaphore without waiting (none free → [`PublishError::Overloaded`], a
//! fast 503), picks a channel round-robin and publishes with `mandatory`; many publishes
//! are in flight on a channel at once and the broker confirms them in windows (multiple
//! acks), so a request never waits for another request's round trip. The confirm is awaited
//! under `confirm_timeout` ([`PublishError::Timeout`]). An unroutable return, or a publish
//! whose frames never left, is [`PublishError::Unavailable`] (not recorded); a nack (the
//! broker refuses responsibility, without saying the ride is not stored) or a channel that
//! broke after the frames were sent is [`PublishError::Uncertain`] (outcome unknown). lapin numbers a publish (for its
//! confirm) and queues its frames in two steps that are not atomic together, so concurrent
//! publishes on one channel could get each other's confirm; a per-channel lock around that
//! first, synchronous step keeps numbering and wire order identical (it is not held while
//! waiting for the confirm).
//!
//! While the connection is down, `publish` fails at once with `Unavailable`; a background
//! task notices (a failed publish wakes it, otherwise it checks twice a second), logs the
//! outage once, reconnects with exponential backoff (100 ms doubling to 5 s) and swaps in a
//! new connection and channels, logging once more when it is back. The same task refreshes
//! `depth` (messages ready in the partition queues, passive `queue.declare`) every second.
//! `close()` makes later publishes answer [`PublishError::ShuttingDown`]; publishes already
//! in flight still get their confirm. The connection closes when the publisher is dropped
//! (after the last in-flight publish).
//!
//! # Source
//!
//! One channel per partition queue, `basic.qos(prefetch)` and one consumer on each; one task
//! per partition forwards that channel's deliveries, in order, into one shared tokio mpsc,
//! from which `next_batch` takes at least one and then what is ready, up to `max`.
//!
//! Ack policy: a batch is settled with one `basic.ack(max_tag, multiple)` per partition
//! channel (or `basic.nack(max_tag, multiple, requeue)` if the writer task fails; a WAL
//! failure holds the batch instead, see [`Acker::hold_on_wal_failure`]), which is exact
//! because a channel's deliveries enter the mpsc in tag order and batches are taken from its
//! head and settled in order, so every unsettled tag up to `max_tag` belongs to this batch
//! or an earlier, already settled one; a tag that is not above the last one settled on its
//! channel is never sent again, and acks meant for a channel of a lost connection are
//! dropped silently (the broker redelivers those rides; the consumer's id check drops
//! duplicates). Batches must therefore be settled one at a time, in the order they were
//! handed out, as [`crate::actors::consumer::Consumer::run`] does.
//!
//! A delivery that does not decode is rejected at once with `requeue=false` (so the broker
//! dead-letters it into `{prefix}.rides.dead`), counted, logged at most every 10 s, and is
//! not handed to the consumer; the reject is on the wire before any later delivery of that
//! channel is forwarded, so a later multiple-ack cannot cover it.
//!
//! When the connection (or any partition channel) is lost, the source marks that
//! connection's deliveries stale (`next_batch` drops them still queued: the broker
//! redelivers them), reconnects with backoff and consumes again. Each (re)connect is a new
//! lapin connection with new channels, so delivery tags of different generations never mix.
//!
//! Stop ([`EventSource::stop_handle`]): the consumers are cancelled (`basic.cancel`), the
//! deliveries that were already received are still handed out, then `next_batch` returns
//! `None`. The connection is closed once the last batch handed out was settled (its acker
//! holds the connection) or on drop. Dropping the source without acking returns every
//! unacked ride to its queue: they are redelivered to the next consumer.
//!
//! Heartbeats: unless the URL sets `heartbeat`, 10 s is asked for, so a silently dead TCP
//! connection is noticed within ~20 s; a broker that shuts down closes connections itself,
//! which is noticed at once.
//!
//! # Layout
//!
//! One file per concern: [`config`] (the settings), [`topology`] (exchanges, queues, the
//! delivery limit), [`codec`] (the message body and what a delivery must look like),
//! [`connection`] (connecting, the one reconnect loop both ends run, the typed setup
//! error), [`publisher`], [`source`], [`acks`] (settling a batch), [`counters`] (the
//! source's figures). Which partition owns a resort-day is the domain's
//! ([`crate::domain::DayKey::partition`]), not the transport's.

mod acks;
mod codec;
mod config;
mod connection;
mod counters;
mod publisher;
mod source;
mod topology;

pub use codec::{decode_batch, decode_event, encode_batch, encode_event, CONTENT_TYPE, CONTENT_TYPE_BATCH};
pub use config::{AmqpConfig, Batching};
pub use connection::AmqpError;
pub use counters::{SourceCounters, SourceStats};
pub use publisher::AmqpPublisher;
pub use source::{AmqpSource, Subscriptions};
pub use topology::{declare_topology, DEFAULT_DELIVERY_LIMIT};

use std::time::Duration;

/// How often both ends refresh the partition queues' depth (admission and the admin view).
const DEPTH_EVERY: Duration = Duration::from_secs(1);
