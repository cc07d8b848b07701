//! The RabbitMQ bus: [`AmqpPublisher`] (publisher confirms) and [`AmqpSource`] (the
//! consumer side, acking after the WAL fsync), over lapin 4 on the tokio runtime.
//!
//! # Topology ([`declare_topology`], idempotent, declared by both ends at every connect)
//!
//! - exchange `{prefix}.rides`: direct, durable. A ride is routed with routing key
//!   `partition_of(event.key(), partitions)` as a decimal string ("0", "1", ...).
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

use async_trait::async_trait;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind};
use serde::Serialize;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::{Acker, Batch, BusStats, EventSource, Publisher, Stop};
use crate::domain::{DayKey, RideEvent};
use crate::error::PublishError;

/// The `content_type` of every ride message.
pub const CONTENT_TYPE: &str = "application/x-bincode";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const DEPTH_EVERY: Duration = Duration::from_secs(1);
const HEALTH_EVERY: Duration = Duration::from_millis(500);
const DEFAULT_HEARTBEAT_SECS: u16 = 10;
const POISON_LOG_EVERY: Duration = Duration::from_secs(10);

/// The `x-delivery-limit` of the partition queues (see the module doc).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 1_000_000;

/// Settings of the RabbitMQ bus.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost` (vhost `/` is `%2f`); `amqps://` for TLS.
    pub url: String,
    /// Names: exchange `{prefix}.rides`, queues `{prefix}.rides.{p}`, dead letters
    /// `{prefix}.dlx` → `{prefix}.rides.dead`.
    pub prefix: String,
    /// Partition queues (fixed per deployment; all nodes must agree).
    pub partitions: u16,
    /// Confirm-mode channels in the publisher's pool.
    pub publish_channels: usize,
    /// Unconfirmed publishes before `publish` answers `Overloaded`.
    pub max_in_flight: usize,
    /// Longest wait for a publisher confirm before `Timeout`.
    pub confirm_timeout: Duration,
    /// Unacked deliveries per partition consumer.
    pub prefetch: u16,
    /// `x-delivery-limit` declared on the partition queues (at most `i32::MAX`); 0 declares
    /// none, for queues declared by an older liftlog whose limit is set by a policy instead
    /// (RabbitMQ cannot change an existing queue's arguments; see the module doc).
    pub delivery_limit: u32,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        // The service's own defaults (config `[bus]`/`[bus.amqp]`), so that tests built on
        // `AmqpConfig::default()` exercise what a node actually runs.
        crate::config::Config::default().amqp_config("amqp://guest:guest@127.0.0.1:5672/%2f")
    }
}

impl std::fmt::Debug for AmqpConfig {
    /// Like a derived `Debug`, but without the password of the URL.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("publish_channels", &self.publish_channels)
            .field("max_in_flight", &self.max_in_flight)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("prefetch", &self.prefetch)
            .field("delivery_limit", &self.delivery_limit)
            .finish()
    }
}

/// The URL with its password (if any) replaced by `***`.
fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &rest[..colon], &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl AmqpConfig {
    fn partition_count(&self) -> u16 {
        self.partitions.max(1)
    }

    /// The direct exchange rides are published to.
    pub fn rides_exchange(&self) -> String {
        format!("{}.rides", self.prefix)
    }

    /// The queue of partition `p`.
    pub fn partition_queue(&self, p: u16) -> String {
        format!("{}.rides.{p}", self.prefix)
    }

    /// The dead-letter exchange of the partition queues.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// The queue that collects dead-lettered (undecodable) messages.
    pub fn dead_queue(&self) -> String {
        format!("{}.rides.dead", self.prefix)
    }
}

/// The partition of an aggregate key: xxh3-64 of the key's 8 bytes (resort u32, season
/// u16, day u16, little-endian) modulo `partitions` (0 counts as 1). Stable across
/// processes, versions and platforms: it decides which queue, and so which consumer, owns
/// a resort-day.
pub fn partition_of(key: &DayKey, partitions: u16) -> u16 {
    let mut bytes = [0u8; 8];
    bytes[..4].copy_from_slice(&key.resort.to_le_bytes());
    bytes[4..6].copy_from_slice(&key.season.to_le_bytes());
    bytes[6..].copy_from_slice(&key.day.to_le_bytes());
    (xxhash_rust::xxh3::xxh3_64(&bytes) % partitions.max(1) as u64) as u16
}

/// The message body of a ride: bincode 2, serde, standard configuration.
pub fn encode_event(event: &RideEvent) -> Vec<u8> {
    bincode::serde::encode_to_vec(event, bincode::config::standard()).expect("a RideEvent always encodes")
}

/// Decodes a message body; trailing bytes are an error (a body that merely starts like a
/// ride is not one).
pub fn decode_event(body: &[u8]) -> Result<RideEvent, String> {
    let (event, used): (RideEvent, usize) =
        bincode::serde::decode_from_slice(body, bincode::config::standard()).map_err(|e| e.to_string())?;
    if used != body.len() {
        return Err(format!("{} trailing bytes after the ride", body.len() - used));
    }
    Ok(event)
}

fn message_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Checks and decodes one delivery (see the module doc for what is accepted).
fn check_delivery(d: &Delivery) -> Result<RideEvent, String> {
    if let Some(ct) = d.properties.content_type() {
        if ct.as_str() != CONTENT_TYPE {
            return Err(format!("content type {:?}", ct.as_str()));
        }
    }
    let event = decode_event(&d.data)?;
    if let Some(mid) = d.properties.message_id() {
        if mid.as_str() != message_id(event.id) {
            return Err(format!("message_id {:?} does not match the ride id {:016x}", mid.as_str(), event.id));
        }
    }
    Ok(event)
}

fn unavailable(e: impl std::fmt::Display) -> PublishError {
    PublishError::Unavailable(format!("RabbitMQ: {e}"))
}

/// A failure of ours or lapin's, as text (lapin's `Error` cannot be built outside lapin).
#[derive(Debug)]
struct BusError(String);

impl From<lapin::Error> for BusError {
    fn from(e: lapin::Error) -> Self {
        BusError(e.to_string())
    }
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

async fn connect(cfg: &AmqpConfig, role: &str) -> Result<Connection, BusError> {
    let mut uri: AMQPUri = cfg.url.parse().map_err(|e| BusError(format!("bad AMQP URL: {e}")))?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    let name = format!("liftlog {role} {}.{}", cfg.prefix, std::process::id());
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(BusError(format!("no connection within {CONNECT_TIMEOUT:?}"))),
    }
}

fn quorum_args(cfg: &AmqpConfig, single_active: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(cfg.dead_letter_exchange().into()));
        if cfg.delivery_limit > 0 {
            let limit = i32::try_from(cfg.delivery_limit).unwrap_or(i32::MAX);
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
        }
    }
    args
}

/// Says what to do when a partition queue exists with another delivery limit (typically
/// none: declared by a liftlog from before the limit). Other errors pass unchanged.
fn explain_declare_error(cfg: &AmqpConfig, queue: &str, e: lapin::Error) -> BusError {
    let text = e.to_string();
    if !text.contains("x-delivery-limit") {
        return BusError(text);
    }
    let (prefix, limit) = (&cfg.prefix, cfg.delivery_limit.max(1));
    let declared = if cfg.delivery_limit == 0 { "none".to_string() } else { limit.to_string() };
    BusError(format!(
        "queue {queue} exists with another x-delivery-limit than the one liftlog declares ({declared}; queues declared by an older \
         liftlog have none, and on RabbitMQ 4.x a queue without one dead-letters a ride after 20 redeliveries, where \
         nothing counts it). RabbitMQ cannot change an existing queue's arguments. Either keep the queues: set liftlog's \
         AMQP delivery_limit to 0 (it then declares none) and set the limit with a policy, e.g. `rabbitmqctl set_policy \
         {prefix}-rides '^{prefix}\\.rides\\.[0-9]+$' '{{\"delivery-limit\":{limit}}}' --apply-to queues` (mind other \
         policies on these queues: only one applies); or stop the writers, let the consumers drain the queues, delete \
         them and start again, so they are declared with the limit. RabbitMQ said: {text}"
    ))
}

async fn declare_on(channel: &Channel, cfg: &AmqpConfig) -> Result<(), BusError> {
    let durable_exchange = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let durable_queue = QueueDeclareOptions::durable();
    channel
        .exchange_declare(
            cfg.dead_letter_exchange().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    channel.queue_declare(cfg.dead_queue().into(), durable_queue, quorum_args(cfg, false)).await?;
    channel
        .queue_bind(
            cfg.dead_queue().into(),
            cfg.dead_letter_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(cfg.rides_exchange().into(), ExchangeKind::Direct, durable_exchange, FieldTable::default())
        .await?;
    for p in 0..cfg.partition_count() {
        let queue = cfg.partition_queue(p);
        channel
            .queue_declare(queue.as_str().into(), durable_queue, quorum_args(cfg, true))
            .await
            .map_err(|e| explain_declare_error(cfg, &queue, e))?;
        channel
            .queue_bind(
                cfg.partition_queue(p).into(),
                cfg.rides_exchange().into(),
                p.to_string().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Declares the exchanges, queues and bindings (see the module doc). Idempotent; fails if
/// a queue exists with other arguments (e.g. a classic queue of the same name).
pub async fn declare_topology(cfg: &AmqpConfig) -> Result<(), PublishError> {
    let conn = connect(cfg, "topology").await.map_err(unavailable)?;
    let result = async {
        let channel = conn.create_channel().await?;
        declare_on(&channel, cfg).await?;
        Ok::<_, BusError>(channel.close(200, "OK".into()).await?)
    }
    .await;
    let _ = conn.close(200, "OK".into()).await;
    result.map_err(unavailable)
}

/// Sums the messages ready in the partition queues (passive declares), or per queue.
async fn queue_depths(channel: &Channel, cfg: &AmqpConfig) -> Result<Vec<u64>, lapin::Error> {
    let mut depths = Vec::with_capacity(cfg.partition_count() as usize);
    for p in 0..cfg.partition_count() {
        let q = channel
            .queue_declare(
                cfg.partition_queue(p).into(),
                QueueDeclareOptions::durable().passive(),
                FieldTable::default(),
            )
            .await?;
        depths.push(q.message_count() as u64);
    }
    Ok(depths)
}

/// Closes `channels`, then the connection, in the background. In this order because lapin
/// closes a dropped channel handle by itself, and that close failing on a connection that
/// is already closing is logged by lapin as a connection error; an explicitly closed
/// channel is not closed again. (Dropping the handles alone would close the connection
/// only once every channel handle, also lapin's internal ones, is gone.)
fn close_in_background(conn: Connection, channels: Vec<Channel>) {
    if !conn.status().connected() {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                for channel in channels.iter().filter(|c| c.status().connected()) {
                    let _ = channel.close(200, "OK".into()).await;
                }
                if conn.status().connected() {
                    let _ = conn.close(200, "OK".into()).await;
                }
            })
            .await;
        });
    }
}

/// Polls `fut` for the first time while holding `lock`, then without it. For lapin calls
/// whose synchronous prefix (up to queueing the frames) must not interleave with another
/// task's on the same channel.
async fn first_poll_locked<F: Future>(lock: &parking_lot::Mutex<()>, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| {
        let _guard = lock.lock();
        Poll::Ready(fut.as_mut().poll(cx))
    })
    .await;
    match first {
        Poll::Ready(out) => out,
        Poll::Pending => fut.await,
    }
}

/// Exponential backoff for reconnects.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_START)
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_CAP);
        d
    }
}

// ------------------------------------------------------------------ publisher ---

struct PubChannel {
    channel: Channel,
    /// Serialises the synchronous part of `basic_publish` (see the module doc).
    order: parking_lot::Mutex<()>,
}

/// One connection and its channels. Dropped (closing the connection) once replaced and no
/// publish uses it any more.
struct PubSession {
    conn: Option<Connection>,
    channels: Vec<PubChannel>,
    admin: parking_lot::Mutex<Option<Channel>>,
}

impl PubSession {
    async fn open(cfg: &AmqpConfig) -> Result<PubSession, BusError> {
        let conn = connect(cfg, "publisher").await?;
        let admin = conn.create_channel().await?;
        // Built up in place so that a failure half-way closes what was opened (Drop).
        let mut session = PubSession { conn: Some(conn), channels: Vec::new(), admin: parking_lot::Mutex::new(None) };
        *session.admin.lock() = Some(admin.clone());
        declare_on(&admin, cfg).await?;
        let conn = session.conn.as_ref().expect("just set");
        for _ in 0..cfg.publish_channels.max(1) {
            let channel = conn.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            session.channels.push(PubChannel { channel, order: parking_lot::Mutex::new(()) });
        }
        Ok(session)
    }

    fn healthy(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.status().connected())
            && self.channels.iter().all(|c| c.channel.status().connected())
    }

    async fn admin_channel(&self) -> Result<Channel, BusError> {
        if let Some(ch) = self.admin.lock().as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let conn = self.conn.as_ref().ok_or_else(|| BusError("closed".into()))?;
        let ch = conn.create_channel().await?;
        *self.admin.lock() = Some(ch.clone());
        Ok(ch)
    }
}

impl Drop for PubSession {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut channels: Vec<Channel> = self.channels.iter().map(|c| c.channel.clone()).collect();
            channels.extend(self.admin.lock().take());
            close_in_background(conn, channels);
        }
    }
}

struct PubShared {
    cfg: AmqpConfig,
    exchange: ShortString,
    routing_keys: Vec<ShortString>,
    permits: Semaphore,
    session: parking_lot::RwLock<Option<Arc<PubSession>>>,
    next_channel: AtomicUsize,
    closed: AtomicBool,
    /// Woken by a publish that found the connection broken.
    broken: Notify,
    published: AtomicU64,
    rejected_full: AtomicU64,
    timeouts: AtomicU64,
    unavailable: AtomicU64,
    reconnects: AtomicU64,
    depth: AtomicU64,
}

/// Publishes rides to RabbitMQ and returns once the broker confirmed them (see the module
/// doc). Cheap to share behind an `Arc`; `publish` may be called from any tokio runtime.
pub struct AmqpPublisher {
    shared: Arc<PubShared>,
    supervisor: JoinHandle<()>,
}

impl AmqpPublisher {
    /// Connects, declares the topology and starts the background reconnect/depth task
    /// (on the current tokio runtime). Fails if the broker is unreachable now.
    pub async fn connect(cfg: AmqpConfig) -> Result<Self, PublishError> {
        let session = PubSession::open(&cfg).await.map_err(unavailable)?;
        let partitions = cfg.partition_count();
        let shared = Arc::new(PubShared {
            exchange: cfg.rides_exchange().into(),
            routing_keys: (0..partitions).map(|p| p.to_string().into()).collect(),
            permits: Semaphore::new(cfg.max_in_flight.max(1)),
            session: parking_lot::RwLock::new(Some(Arc::new(session))),
            next_channel: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            broken: Notify::new(),
            published: AtomicU64::new(0),
            rejected_full: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            depth: AtomicU64::new(0),
            cfg,
        });
        let supervisor = tokio::spawn(supervise_publisher(Arc::downgrade(&shared)));
        Ok(AmqpPublisher { shared, supervisor })
    }

    /// True while a healthy broker connection is installed.
    pub fn connected(&self) -> bool {
        self.shared.session.read().as_ref().is_some_and(|s| s.healthy())
    }

    /// Successful reconnects since `connect`.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Publishes that failed as `Unavailable` or `Uncertain` (broker down, nack, unroutable,
    /// channel broken).
    pub fn unavailable_count(&self) -> u64 {
        self.shared.unavailable.load(Ordering::Relaxed)
    }

    fn fail(&self, e: PublishError) -> Result<(), PublishError> {
        if matches!(e, PublishError::Unavailable(_) | PublishError::Uncertain(_)) {
            self.shared.unavailable.fetch_add(1, Ordering::Relaxed);
        }
        Err(e)
    }
}

impl Drop for AmqpPublisher {
    fn drop(&mut self) {
        self.supervisor.abort();
        // In-flight publishes hold their session; the connection closes after them.
        self.shared.session.write().take();
    }
}

#[async_trait]
impl Publisher for AmqpPublisher {
    async fn publish(&self, event: RideEvent) -> Result<(), PublishError> {
        let s = &*self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(PublishError::ShuttingDown);
        }
        let Ok(_permit) = s.permits.try_acquire() else {
            s.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(PublishError::Overloaded);
        };
        let Some(session) = s.session.read().clone() else {
            return self.fail(PublishError::Unavailable("no connection to RabbitMQ (reconnecting)".into()));
        };
        let pc = &session.channels[s.next_channel.fetch_add(1, Ordering::Relaxed) % session.channels.len()];
        if !pc.channel.status().connected() {
            s.broken.notify_one();
            return self.fail(PublishError::Unavailable("RabbitMQ channel closed (reconnecting)".into()));
        }
        let body = encode_event(&event);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(message_id(event.id).into());
        let routing_key = s.routing_keys[partition_of(&event.key(), s.routing_keys.len() as u16) as usize].clone();
        // Err(false, _): the frames never left, the ride is not recorded. Err(true, _): they
        // were sent and the confirm failed, so the broker may hold it.
        let confirmed = async {
            let publish = pc.channel.basic_publish(
                s.exchange.clone(),
                routing_key,
                BasicPublishOptions { mandatory: true, immediate: false },
                &body,
                props,
            );
            let confirm = first_poll_locked(&pc.order, publish).await.map_err(|e| (false, e))?;
            confirm.await.map_err(|e| (true, e))
        };
        match tokio::time::timeout(s.cfg.confirm_timeout, confirmed).await {
            Ok(Ok(Confirmation::Ack(None))) => {
                s.published.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Ok(Confirmation::Ack(Some(returned)))) => self.fail(PublishError::Unavailable(format!(
                "RabbitMQ returned the ride as unroutable ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Ok(Confirmation::Nack(_))) => {
                self.fail(PublishError::Uncertain("RabbitMQ refused responsibility for the ride (nack)".into()))
            }
            Ok(Ok(Confirmation::NotRequested)) => {
                self.fail(PublishError::Uncertain("published on a channel not in confirm mode".into()))
            }
            Ok(Err((sent, e))) => {
                s.broken.notify_one();
                if sent {
                    self.fail(PublishError::Uncertain(format!("RabbitMQ channel failed after the publish: {e}")))
                } else {
                    self.fail(unavailable(e))
                }
            }
            Err(_) => {
                s.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(PublishError::Timeout)
            }
        }
    }

    fn stats(&self) -> BusStats {
        let s = &*self.shared;
        BusStats {
            kind: "amqp",
            depth: s.depth.load(Ordering::Relaxed) as usize,
            capacity: s.cfg.max_in_flight,
            published: s.published.load(Ordering::Relaxed),
            rejected_full: s.rejected_full.load(Ordering::Relaxed),
            timeouts: s.timeouts.load(Ordering::Relaxed),
            admission: None,
        }
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }
}

/// Watches the connection, reconnects, refreshes the depth. Ends when the publisher is
/// dropped (it only holds a weak reference between rounds).
async fn supervise_publisher(weak: Weak<PubShared>) {
    let mut last_depth: Option<Instant> = None;
    let mut outage: Option<Instant> = None;
    let mut backoff = Backoff::new();
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let session = shared.session.read().clone();
        match session.filter(|s| s.healthy()) {
            Some(session) => {
                if last_depth.is_none_or(|t| t.elapsed() >= DEPTH_EVERY) {
                    last_depth = Some(Instant::now());
                    let depth = match session.admin_channel().await {
                        Ok(ch) => tokio::time::timeout(DEPTH_EVERY, queue_depths(&ch, &shared.cfg)).await.ok(),
                        Err(_) => None,
                    };
                    let total = depth.and_then(Result::ok).map(|d| d.iter().sum::<u64>()).unwrap_or(0);
                    shared.depth.store(total, Ordering::Relaxed);
                }
                drop(session);
                let since = last_depth.map_or(DEPTH_EVERY, |t| t.elapsed());
                let wait = HEALTH_EVERY.min(DEPTH_EVERY.saturating_sub(since));
                tokio::select! {
                    _ = shared.broken.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            None => {
                // Broken (or never replaced): drop it so publishes fail fast, then reconnect.
                shared.session.write().take();
                if outage.is_none() {
                    outage = Some(Instant::now());
                    tracing::warn!(
                        prefix = %shared.cfg.prefix,
                        "RabbitMQ connection lost; rides are refused (503) until it is back; reconnecting"
                    );
                }
                shared.depth.store(0, Ordering::Relaxed);
                let cfg = shared.cfg.clone();
                drop(shared);
                match PubSession::open(&cfg).await {
                    Ok(session) => {
                        let Some(shared) = weak.upgrade() else { return };
                        *shared.session.write() = Some(Arc::new(session));
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        let down_ms = outage.take().map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
                        tracing::info!(prefix = %cfg.prefix, down_ms, "RabbitMQ publisher reconnected");
                        backoff = Backoff::new();
                        last_depth = None;
                    }
                    Err(e) => {
                        tracing::debug!(cause = %e, "RabbitMQ publisher reconnect failed");
                        tokio::time::sleep(backoff.next()).await;
                    }
                }
            }
        }
    }
}

// --------------------------------------------------------------------- source ---

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
}

/// The source's counters, shared with whoever shows them (see [`AmqpSource::stats_handle`]).
#[derive(Default)]
pub struct SourceCounters {
    connected: AtomicBool,
    deliveries: AtomicU64,
    redelivered: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    dead_lettered: AtomicU64,
    stale_dropped: AtomicU64,
    reconnects: AtomicU64,
    depths: parking_lot::Mutex<Vec<u64>>,
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
        }
    }

    fn poisoned(&self, queue: &str, tag: u64, why: &str) {
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

struct SrcPart {
    channel: Channel,
    consumer_tag: ShortString,
    /// The highest delivery tag settled on this channel (acked or nacked with `multiple`).
    settled: tokio::sync::Mutex<u64>,
}

/// One connection generation of the source: its partition channels. Items and ackers hold
/// it, so the connection stays open until the last batch of it was settled.
struct SrcSession {
    generation: u64,
    conn: parking_lot::Mutex<Option<Connection>>,
    parts: Vec<SrcPart>,
    admin: Channel,
    /// Set when the connection was lost: its deliveries are not handed out any more and
    /// its acks are not sent.
    dead: AtomicBool,
}

impl SrcSession {
    async fn open(cfg: &AmqpConfig, generation: u64) -> Result<(Arc<SrcSession>, Vec<Consumer>), BusError> {
        let conn = connect(cfg, "consumer").await?;
        let admin = conn.create_channel().await?;
        // Built up in place so that a failure half-way closes what was opened (Drop).
        let mut session = SrcSession {
            generation,
            conn: parking_lot::Mutex::new(Some(conn)),
            parts: Vec::new(),
            admin: admin.clone(),
            dead: AtomicBool::new(false),
        };
        declare_on(&admin, cfg).await?;
        let mut consumers = Vec::new();
        for p in 0..cfg.partition_count() {
            let channel = session.conn.get_mut().as_ref().expect("just set").create_channel().await?;
            channel.basic_qos(cfg.prefetch.max(1), BasicQosOptions { global: false }).await?;
            let tag = format!("liftlog-{}-g{generation}-p{p}", std::process::id());
            let consumer = channel
                .basic_consume(
                    cfg.partition_queue(p).into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            session.parts.push(SrcPart { channel, consumer_tag: consumer.tag(), settled: tokio::sync::Mutex::new(0) });
            consumers.push(consumer);
        }
        Ok((Arc::new(session), consumers))
    }

    fn close_now(&self) {
        if let Some(conn) = self.conn.lock().take() {
            let mut channels: Vec<Channel> = self.parts.iter().map(|p| p.channel.clone()).collect();
            channels.push(self.admin.clone());
            close_in_background(conn, channels);
        }
    }
}

impl Drop for SrcSession {
    fn drop(&mut self) {
        self.close_now();
    }
}

/// A delivery on its way to the consumer.
struct Item {
    event: RideEvent,
    tag: u64,
    part: u16,
    session: Arc<SrcSession>,
}

/// Consumes the partition queues (see the module doc).
pub struct AmqpSource {
    rx: mpsc::Receiver<Item>,
    stop: Stop,
    counters: Arc<SourceCounters>,
    supervisor: JoinHandle<()>,
}

impl AmqpSource {
    /// Connects, declares the topology and starts consuming (on the current tokio
    /// runtime). Fails if the broker is unreachable now.
    pub async fn connect(cfg: AmqpConfig) -> Result<Self, PublishError> {
        let (session, consumers) = SrcSession::open(&cfg, 1).await.map_err(unavailable)?;
        let counters = Arc::new(SourceCounters::default());
        counters.connected.store(true, Ordering::Relaxed);
        let capacity = cfg.partition_count() as usize * cfg.prefetch.max(1) as usize;
        let (tx, rx) = mpsc::channel(capacity);
        let stop = Stop::default();
        let supervisor =
            tokio::spawn(supervise_source(cfg, tx, stop.clone(), counters.clone(), Some((session, consumers))));
        Ok(AmqpSource { rx, stop, counters, supervisor })
    }

    pub fn stats(&self) -> SourceStats {
        self.counters.snapshot()
    }

    /// The counters, to read them after the source was handed to the consumer.
    pub fn stats_handle(&self) -> Arc<SourceCounters> {
        self.counters.clone()
    }
}

impl Drop for AmqpSource {
    fn drop(&mut self) {
        // Aborting the supervisor drops its partition tasks; the connection closes once
        // the items still queued here and the outstanding ackers are gone. Unacked
        // deliveries go back to their queues.
        self.supervisor.abort();
    }
}

#[async_trait]
impl EventSource for AmqpSource {
    async fn next_batch(&mut self, max: usize) -> Option<Batch> {
        let max = max.max(1);
        loop {
            let first = self.rx.recv().await?;
            let mut items = Vec::with_capacity(max.min(self.rx.len() + 1));
            let mut stale = 0u64;
            let mut take = |item: Item, items: &mut Vec<Item>| {
                if item.session.dead.load(Ordering::Acquire) {
                    stale += 1;
                } else {
                    items.push(item);
                }
            };
            take(first, &mut items);
            while items.len() < max {
                match self.rx.try_recv() {
                    Ok(item) => take(item, &mut items),
                    Err(_) => break,
                }
            }
            if stale > 0 {
                self.counters.stale_dropped.fetch_add(stale, Ordering::Relaxed);
            }
            if items.is_empty() {
                continue;
            }
            return Some(make_batch(items, self.counters.clone()));
        }
    }

    fn stop_handle(&self) -> Stop {
        self.stop.clone()
    }
}

struct AckGroup {
    session: Arc<SrcSession>,
    part: u16,
    max_tag: u64,
    count: u64,
}

fn make_batch(items: Vec<Item>, counters: Arc<SourceCounters>) -> Batch {
    let mut groups: Vec<AckGroup> = Vec::new();
    let mut events = Vec::with_capacity(items.len());
    // A batch never mixes connections: a lost one's deliveries are dropped as stale
    // before the next connection is opened.
    let epoch = items.iter().map(|i| i.session.generation).max().unwrap_or(0);
    for item in items {
        events.push(item.event);
        let found = groups.iter_mut().find(|g| g.part == item.part && Arc::ptr_eq(&g.session, &item.session));
        match found {
            Some(g) => {
                g.max_tag = g.max_tag.max(item.tag);
                g.count += 1;
            }
            None => groups.push(AckGroup { session: item.session, part: item.part, max_tag: item.tag, count: 1 }),
        }
    }
    Batch { events, acker: Box::new(AmqpAcker { groups, counters }), epoch }
}

struct AmqpAcker {
    groups: Vec<AckGroup>,
    counters: Arc<SourceCounters>,
}

impl AmqpAcker {
    async fn settle(self, ack: bool) {
        for g in &self.groups {
            if g.session.dead.load(Ordering::Acquire) {
                continue; // redelivered by the broker on a new connection
            }
            let part = &g.session.parts[g.part as usize];
            let mut settled = part.settled.lock().await;
            if g.max_tag <= *settled {
                continue; // already covered by an earlier multiple ack/nack
            }
            *settled = g.max_tag;
            let sent = if ack {
                part.channel.basic_ack(g.max_tag, BasicAckOptions { multiple: true }).await
            } else {
                part.channel.basic_nack(g.max_tag, BasicNackOptions { multiple: true, requeue: true }).await
            };
            match sent {
                Ok(()) => {
                    let counter = if ack { &self.counters.acked } else { &self.counters.nacked };
                    counter.fetch_add(g.count, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(
                    generation = g.session.generation,
                    partition = g.part,
                    cause = %e,
                    "settling a batch on a lost channel; the broker redelivers it"
                ),
            }
        }
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(self: Box<Self>) {
        self.settle(true).await;
    }

    async fn nack(self: Box<Self>, error: PublishError) {
        tracing::debug!(cause = %error, "batch nacked; RabbitMQ requeues it");
        self.settle(false).await;
    }

    /// Every nack costs each ride of the batch one of its deliveries (module doc: the
    /// delivery limit); holding the batch unacked costs none.
    fn hold_on_wal_failure(&self) -> bool {
        true
    }
}

/// Why a partition task ended.
enum PumpEnd {
    /// The consumer was cancelled (by us on stop, or by the broker).
    Cancelled,
    /// The channel or connection failed.
    Failed(String),
    /// The source or its session is gone.
    Gone,
}

/// Forwards one partition channel's deliveries, in order, into the shared mpsc.
async fn pump(
    part: u16,
    queue: String,
    mut consumer: Consumer,
    channel: Channel,
    session: Weak<SrcSession>,
    tx: mpsc::Sender<Item>,
    counters: Arc<SourceCounters>,
) -> PumpEnd {
    use futures_util::StreamExt;
    while let Some(next) = consumer.next().await {
        let delivery = match next {
            Ok(d) => d,
            Err(e) => return PumpEnd::Failed(e.to_string()),
        };
        counters.deliveries.fetch_add(1, Ordering::Relaxed);
        if delivery.redelivered {
            counters.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        match check_delivery(&delivery) {
            Ok(event) => {
                let Some(session) = session.upgrade() else { return PumpEnd::Gone };
                if tx.send(Item { event, tag: delivery.delivery_tag, part, session }).await.is_err() {
                    return PumpEnd::Gone;
                }
            }
            Err(why) => {
                // Settled on the wire before any later delivery of this channel is forwarded.
                let rejected = channel.basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false }).await;
                if let Err(e) = rejected {
                    return PumpEnd::Failed(e.to_string());
                }
                counters.poisoned(&queue, delivery.delivery_tag, &why);
            }
        }
    }
    PumpEnd::Cancelled
}

/// Runs the source's connections: partition tasks, depth refresh, reconnects, stop.
async fn supervise_source(
    cfg: AmqpConfig,
    tx: mpsc::Sender<Item>,
    stop: Stop,
    counters: Arc<SourceCounters>,
    mut first: Option<(Arc<SrcSession>, Vec<Consumer>)>,
) {
    let mut generation = 1u64;
    let mut backoff = Backoff::new();
    let mut outage: Option<Instant> = None;
    loop {
        if stop.is_stopped() || tx.is_closed() {
            break;
        }
        let (session, consumers) = match first.take() {
            Some(s) => s,
            None => {
                let opened = tokio::select! {
                    r = SrcSession::open(&cfg, generation + 1) => r,
                    _ = stop.stopped() => break,
                };
                match opened {
                    Ok(s) => {
                        generation += 1;
                        counters.reconnects.fetch_add(1, Ordering::Relaxed);
                        let down_ms = outage.take().map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
                        tracing::info!(prefix = %cfg.prefix, generation, down_ms, "RabbitMQ consumer reconnected");
                        backoff = Backoff::new();
                        s
                    }
                    Err(e) => {
                        tracing::debug!(cause = %e, "RabbitMQ consumer reconnect failed");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next()) => {}
                            _ = stop.stopped() => break,
                        }
                        continue;
                    }
                }
            }
        };
        counters.connected.store(true, Ordering::Relaxed);

        let mut pumps = JoinSet::new();
        for (p, consumer) in consumers.into_iter().enumerate() {
            pumps.spawn(pump(
                p as u16,
                cfg.partition_queue(p as u16),
                consumer,
                session.parts[p].channel.clone(),
                Arc::downgrade(&session),
                tx.clone(),
                counters.clone(),
            ));
        }

        let mut depth_tick = tokio::time::interval(DEPTH_EVERY);
        depth_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let cause = loop {
            tokio::select! {
                _ = stop.stopped() => break None,
                ended = pumps.join_next() => {
                    break Some(match ended {
                        Some(Ok(PumpEnd::Failed(e))) => e,
                        Some(Ok(PumpEnd::Cancelled)) => "consumer cancelled by the broker".to_string(),
                        Some(Ok(PumpEnd::Gone)) => "source dropped".to_string(),
                        Some(Err(e)) => format!("partition task failed: {e}"),
                        None => "no partitions".to_string(),
                    });
                }
                _ = depth_tick.tick() => {
                    let depths = tokio::time::timeout(DEPTH_EVERY, queue_depths(&session.admin, &cfg)).await;
                    *counters.depths.lock() = depths.ok().and_then(Result::ok).unwrap_or_default();
                }
            }
        };

        match cause {
            None => {
                // Stopped: no new deliveries; what was received is still handed out.
                for part in &session.parts {
                    let cancel = part.channel.basic_cancel(part.consumer_tag.clone(), BasicCancelOptions::default());
                    let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
                }
                let drained =
                    tokio::time::timeout(Duration::from_secs(5), async { while pumps.join_next().await.is_some() {} })
                        .await;
                if drained.is_err() {
                    pumps.abort_all();
                }
                break;
            }
            Some(cause) => {
                session.dead.store(true, Ordering::Release);
                counters.connected.store(false, Ordering::Relaxed);
                counters.depths.lock().clear();
                pumps.abort_all();
                session.close_now();
                if tx.is_closed() {
                    break;
                }
                if outage.is_none() {
                    outage = Some(Instant::now());
                    tracing::warn!(prefix = %cfg.prefix, %cause, "RabbitMQ consumer connection lost; reconnecting");
                }
            }
        }
    }
    counters.connected.store(false, Ordering::Relaxed);
    // Dropping `tx` (and the pumps' clones, already gone) ends `next_batch` once drained.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        let key = DayKey { resort: 7, season: 2025, day: 42 };
        let p = partition_of(&key, 4);
        assert!(p < 4);
        assert_eq!(p, partition_of(&key, 4));
        assert_eq!(partition_of(&key, 0), 0);
        assert_eq!(partition_of(&key, 1), 0);
        // Pinned: the routing function is part of the deployment's data layout.
        let bytes = [7u8, 0, 0, 0, 0xe9, 0x07, 42, 0];
        assert_eq!(p as u64, xxhash_rust::xxh3::xxh3_64(&bytes) % 4);
        let mut seen = [0usize; 4];
        for day in 1..=366 {
            seen[partition_of(&DayKey { resort: 1, season: 2025, day }, 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn codec_round_trips_and_refuses_garbage() {
        let e = RideEvent {
            id: u64::MAX - 3,
            resort: 9,
            season: 2025,
            day: 300,
            skier: 123_456,
            time: 359,
            lift: 40,
            vertical: 600,
        };
        assert_eq!(decode_event(&encode_event(&e)).unwrap(), e);
        let mut long = encode_event(&e);
        long.push(0);
        assert!(decode_event(&long).is_err());
        assert!(decode_event(b"not a ride").is_err());
        assert!(decode_event(&[0xff; 3]).is_err());
        assert!(decode_event(&[]).is_err());
        assert_eq!(message_id(255), "00000000000000ff");
    }

    #[test]
    fn redacts_password() {
        assert_eq!(redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
    }
}
