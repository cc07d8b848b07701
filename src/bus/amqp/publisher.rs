//! The publisher: confirm-mode channels, a bound on publishes in flight, and a supervisor
//! that reconnects and refreshes the queue depth (see the module doc of [`super`]).

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::task::JoinHandle;

use super::codec::{batch_id, encode_batch, encode_event, message_id, CONTENT_TYPE, CONTENT_TYPE_BATCH, PUBLISHED_HEADER};
use super::connection::{close_in_background, connect, first_poll_locked, unavailable, AmqpError, Reconnect};
use super::topology::{declare_on, queue_depths};
use super::{AmqpConfig, DEPTH_EVERY};
use crate::bus::{BusStats, Publisher};
use crate::domain::RideEvent;
use crate::error::PublishError;
use crate::trace::{RequestId, RequestIds, AMQP_HEADER};

/// How often the supervisor checks a connection nobody reported broken.
const HEALTH_EVERY: Duration = Duration::from_millis(500);

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
    async fn open(cfg: &AmqpConfig) -> Result<PubSession, AmqpError> {
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
        self.conn.as_ref().is_some_and(|c| c.status().connected()) && self.channels.iter().all(|c| c.channel.status().connected())
    }

    async fn admin_channel(&self) -> Result<Channel, AmqpError> {
        if let Some(ch) = self.admin.lock().as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let conn = self.conn.as_ref().ok_or(AmqpError::Closed)?;
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
            close_in_background(Box::new(conn), channels);
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
    /// Messages confirmed (a message holds one ride, or a batch of them).
    messages: AtomicU64,
    /// Rides waiting for their partition's next message, per partition.
    pending: Vec<parking_lot::Mutex<Pending>>,
}

/// The rides of one partition gathered for its next message, and who waits for its confirm.
#[derive(Default)]
struct Pending {
    rides: Vec<RideEvent>,
    request_ids: RequestIds,
    bytes: usize,
    waiters: Vec<oneshot::Sender<Result<(), PublishError>>>,
}

impl Pending {
    fn take(&mut self) -> Pending {
        std::mem::take(self)
    }
}

/// A ride's share of a batch body, for the byte cap: its bincode size is at most this.
const RIDE_BYTES_MAX: usize = 30;

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
            messages: AtomicU64::new(0),
            pending: (0..partitions).map(|_| parking_lot::Mutex::new(Pending::default())).collect(),
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

    /// Messages confirmed so far (with batching, fewer than rides).
    pub fn messages(&self) -> u64 {
        self.shared.messages.load(Ordering::Relaxed)
    }
}

impl PubShared {
    fn fail(&self, e: PublishError) -> Result<(), PublishError> {
        if matches!(e, PublishError::Unavailable(_) | PublishError::Uncertain(_)) {
            self.unavailable.fetch_add(1, Ordering::Relaxed);
        }
        Err(e)
    }

    /// Publishes `rides` (all of one partition) as one message and waits for its confirm;
    /// `request_ids` go in its [`AMQP_HEADER`].
    async fn send(&self, partition: u16, rides: &[RideEvent], request_ids: &RequestIds) -> Result<(), PublishError> {
        let Some(session) = self.session.read().clone() else {
            return self.fail(PublishError::Unavailable("no connection to RabbitMQ (reconnecting)".into()));
        };
        let pc = &session.channels[self.next_channel.fetch_add(1, Ordering::Relaxed) % session.channels.len()];
        if !pc.channel.status().connected() {
            self.broken.notify_one();
            return self.fail(PublishError::Unavailable("RabbitMQ channel closed (reconnecting)".into()));
        }
        let (body, props) = match rides {
            [one] => (
                encode_event(one),
                BasicProperties::default().with_content_type(CONTENT_TYPE.into()).with_message_id(message_id(one.id).into()),
            ),
            many => {
                let body = encode_batch(many);
                let id = batch_id(&body);
                (body, BasicProperties::default().with_content_type(CONTENT_TYPE_BATCH.into()).with_message_id(id.into()))
            }
        };
        let mut headers = FieldTable::default();
        headers.insert(PUBLISHED_HEADER.into(), AMQPValue::LongLongInt(crate::actors::unix_micros() as i64));
        if !request_ids.is_empty() {
            headers.insert(AMQP_HEADER.into(), AMQPValue::LongString(LongString::from(request_ids.to_string())));
        }
        let props = props.with_delivery_mode(2).with_headers(headers);
        let routing_key = self.routing_keys[partition as usize].clone();
        // Err(false, _): the frames never left, the rides are not recorded. Err(true, _):
        // they were sent and the confirm failed, so the broker may hold them.
        let confirmed = async {
            let publish = pc.channel.basic_publish(
                self.exchange.clone(),
                routing_key,
                BasicPublishOptions { mandatory: true, immediate: false },
                &body,
                props,
            );
            let confirm = first_poll_locked(&pc.order, publish).await.map_err(|e| (false, e))?;
            confirm.await.map_err(|e| (true, e))
        };
        let started = std::time::Instant::now();
        match tokio::time::timeout(self.cfg.confirm_timeout, confirmed).await {
            Ok(Ok(Confirmation::Ack(None))) => {
                crate::metrics::bus_confirm(started);
                self.published.fetch_add(rides.len() as u64, Ordering::Relaxed);
                self.messages.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(Ok(Confirmation::Ack(Some(returned)))) => self.fail(PublishError::Unavailable(format!(
                "RabbitMQ returned the ride as unroutable ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Ok(Ok(Confirmation::Nack(_))) => {
                self.fail(PublishError::Uncertain("RabbitMQ refused responsibility for the ride (nack)".into()))
            }
            Ok(Ok(Confirmation::NotRequested)) => self.fail(PublishError::Uncertain("published on a channel not in confirm mode".into())),
            Ok(Err((sent, e))) => {
                self.broken.notify_one();
                if sent {
                    self.fail(PublishError::Uncertain(format!("RabbitMQ channel failed after the publish: {e}")))
                } else {
                    self.fail(unavailable(e))
                }
            }
            Err(_) => {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(PublishError::Timeout)
            }
        }
    }

    /// Sends what `partition` has gathered (if anything) and answers its waiters.
    async fn flush_pending(self: Arc<Self>, partition: u16) {
        let batch = self.pending[partition as usize].lock().take();
        if batch.rides.is_empty() {
            return;
        }
        let result = self.send(partition, &batch.rides, &batch.request_ids).await;
        for w in batch.waiters {
            let _ = w.send(result.clone());
        }
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
    async fn publish_for(&self, event: RideEvent, request: RequestId) -> Result<(), PublishError> {
        let s = &self.shared;
        if s.closed.load(Ordering::Acquire) {
            return Err(PublishError::ShuttingDown);
        }
        let Ok(_permit) = s.permits.try_acquire() else {
            s.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(PublishError::Overloaded);
        };
        let partition = event.key().partition(s.routing_keys.len() as u16);
        let batching = s.cfg.batching;
        if batching.max_rides <= 1 {
            let mut ids = RequestIds::default();
            ids.push(&request);
            return s.send(partition, &[event], &ids).await;
        }
        // Gather: the ride that starts a partition's batch arms its linger timer, the ride
        // that fills it sends it at once. Both send from a task of their own, so a client
        // that goes away cannot take the other rides' message with it.
        let (tx, rx) = oneshot::channel();
        let (first, full) = {
            let mut p = s.pending[partition as usize].lock();
            p.rides.push(event);
            p.request_ids.push(&request);
            // The body's bytes; the ids in the header have a bound of their own (RequestIds).
            p.bytes += RIDE_BYTES_MAX;
            p.waiters.push(tx);
            (p.rides.len() == 1, p.rides.len() >= batching.max_rides || p.bytes + RIDE_BYTES_MAX > batching.max_bytes)
        };
        if full {
            tokio::spawn(s.clone().flush_pending(partition));
        } else if first {
            let shared = s.clone();
            tokio::spawn(async move {
                tokio::time::sleep(batching.linger).await;
                shared.flush_pending(partition).await;
            });
        }
        // The send has its own confirm timeout; this bound only guards against a task that
        // never answers (it cannot be cancelled, so it only could by a panic).
        match tokio::time::timeout(s.cfg.confirm_timeout + batching.linger + Duration::from_secs(1), rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => s.fail(PublishError::Uncertain("the publishing task ended without an answer".into())),
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
    let mut reconnect = None;
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
                let rc = reconnect.get_or_insert_with(|| Reconnect::new("publisher", &shared.cfg.prefix));
                rc.lost("no healthy session", "rides are refused (503) until it is back");
                shared.depth.store(0, Ordering::Relaxed);
                let cfg = shared.cfg.clone();
                drop(shared);
                if let Some(session) = rc.attempt(PubSession::open(&cfg), None).await {
                    let Some(shared) = weak.upgrade() else { return };
                    *shared.session.write() = Some(Arc::new(session));
                    shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    last_depth = None;
                }
            }
        }
    }
}
