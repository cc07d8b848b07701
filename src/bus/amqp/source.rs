//! The source: one channel and consumer per partition queue, their deliveries forwarded in
//! order into one queue that `next_batch` drains, and a supervisor that reconnects (see the
//! module doc of [`super`]).

use async_trait::async_trait;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::acks::make_batch;
use super::codec::{check_delivery, published_us, request_ids};
use super::connection::{close_in_background, connect, unavailable, AmqpError, Reconnect};
use super::counters::{SourceCounters, SourceStats};
use super::topology::{declare_on, queue_depths};
use super::{AmqpConfig, DEPTH_EVERY};
use crate::bus::{Batch, EventSource, Stop};
use crate::domain::RideEvent;
use crate::error::PublishError;

/// One partition queue subscribed on one connection: its channel and consumer. Items and
/// ackers hold it (and through it the connection), so the channel stays open until the
/// last batch of it was settled.
pub(super) struct SrcPart {
    pub(super) part: u16,
    pub(super) channel: Channel,
    pub(super) consumer_tag: ShortString,
    /// The highest delivery tag settled on this channel (acked or nacked with `multiple`).
    pub(super) settled: tokio::sync::Mutex<u64>,
    /// Set when the subscription was closed (its shard handed off or lost): its acks are
    /// not sent, and its deliveries still queued are dropped.
    pub(super) closed: AtomicBool,
    pub(super) session: Arc<SrcSession>,
}

impl SrcPart {
    /// Whether its deliveries may still be handed out and acked.
    pub(super) fn live(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.session.dead.load(Ordering::Acquire)
    }

    fn close_channel(&self) {
        self.closed.store(true, Ordering::Release);
        let channel = self.channel.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if channel.status().connected() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), channel.close(200, "OK".into())).await;
                }
            });
        }
    }
}

/// One connection generation of the source.
pub(super) struct SrcSession {
    pub(super) generation: u64,
    conn: parking_lot::Mutex<Option<Arc<Connection>>>,
    /// Every channel opened on it, to close them with it.
    channels: parking_lot::Mutex<Vec<Channel>>,
    admin: Channel,
    /// Set when the connection was lost: its deliveries are not handed out any more and
    /// its acks are not sent.
    pub(super) dead: AtomicBool,
}

impl SrcSession {
    async fn open(cfg: &AmqpConfig, generation: u64) -> Result<Arc<SrcSession>, AmqpError> {
        let conn = connect(cfg, "consumer").await?;
        let admin = conn.create_channel().await?;
        let session = Arc::new(SrcSession {
            generation,
            conn: parking_lot::Mutex::new(Some(Arc::new(conn))),
            channels: parking_lot::Mutex::new(Vec::new()),
            admin: admin.clone(),
            dead: AtomicBool::new(false),
        });
        // Dropping `session` on a failure below closes what was opened.
        declare_on(&admin, cfg).await?;
        Ok(session)
    }

    /// Opens a channel on partition queue `p` and starts consuming it.
    async fn subscribe(self: &Arc<Self>, cfg: &AmqpConfig, p: u16) -> Result<(Arc<SrcPart>, Consumer), AmqpError> {
        let conn = self.conn.lock().clone().ok_or(AmqpError::Closed)?;
        let channel = conn.create_channel().await?;
        self.channels.lock().push(channel.clone());
        channel.basic_qos(cfg.prefetch.max(1), BasicQosOptions { global: false }).await?;
        let tag = format!("liftlog-{}-g{}-p{p}", std::process::id(), self.generation);
        let consumer =
            channel.basic_consume(cfg.partition_queue(p).into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
        let part = Arc::new(SrcPart {
            part: p,
            channel,
            consumer_tag: consumer.tag(),
            settled: tokio::sync::Mutex::new(0),
            closed: AtomicBool::new(false),
            session: self.clone(),
        });
        Ok((part, consumer))
    }

    fn close_now(&self) {
        if let Some(conn) = self.conn.lock().take() {
            let mut channels = std::mem::take(&mut *self.channels.lock());
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

/// A delivery on its way to the consumer: its rides (one, or a batch) travel together, so
/// a consumer batch never splits a message — its ack covers all of the message's rides, so
/// they must all be in the same WAL record.
pub(super) struct Item {
    pub(super) events: Vec<RideEvent>,
    /// The message's [`crate::trace::AMQP_HEADER`], "" when it had none.
    pub(super) request_ids: String,
    /// The message's [`super::codec::PUBLISHED_HEADER`], when it had one.
    pub(super) published_us: Option<u64>,
    pub(super) tag: u64,
    pub(super) part: Arc<SrcPart>,
}

/// What the partition tasks and the supervisor send the consumer, in order.
pub(super) enum Feed {
    Delivery(Item),
    /// Every delivery of this shard's cancelled subscription was sent before this.
    Drained(u16),
}

/// Which partition queues the source consumes, changed at run time (cluster mode: the
/// shards this node holds, ADR 005). Cheap to clone.
#[derive(Clone)]
pub struct Subscriptions {
    tx: mpsc::UnboundedSender<Command>,
    /// The connection in use, so that [`Self::reset`] takes effect before it returns.
    current: Arc<parking_lot::Mutex<Option<Arc<SrcSession>>>>,
}

enum Command {
    Subscribe(u16),
    Cancel(u16),
    Close(u16),
    Reset(u16),
}

impl Subscriptions {
    /// Starts consuming partition queue `p` (now, or once connected).
    pub fn subscribe(&self, p: u16) {
        let _ = self.tx.send(Command::Subscribe(p));
    }

    /// Stops new deliveries of `p` (basic.cancel) but keeps its channel open for the acks of
    /// what was received; once every delivery received before the cancel is queued for the
    /// consumer, a batch carries `p` in [`Batch::drained`].
    pub fn cancel(&self, p: u16) {
        let _ = self.tx.send(Command::Cancel(p));
    }

    /// Closes `p`'s channel: what it delivered and was not acked goes back to the queue.
    pub fn close(&self, p: u16) {
        let _ = self.tx.send(Command::Close(p));
    }

    /// Gives `p` up without acking anything more, on any channel: the connection is marked
    /// lost at once (no delivery of it is handed out or acked after this returns) and
    /// opened again with the other subscriptions, so the broker redelivers everything
    /// unacked. Coarse on purpose: a lost lease is rare (a paused or cut-off node), and the
    /// consumer drops all its resident state with it (see `Consumer::run`).
    pub fn reset(&self, p: u16) {
        if let Some(session) = self.current.lock().as_ref() {
            session.dead.store(true, Ordering::Release);
        }
        let _ = self.tx.send(Command::Reset(p));
    }
}

/// Consumes the partition queues (see the module doc).
pub struct AmqpSource {
    rx: mpsc::Receiver<Feed>,
    stop: Stop,
    counters: Arc<SourceCounters>,
    subscriptions: Subscriptions,
    supervisor: JoinHandle<()>,
}

impl AmqpSource {
    /// Connects, declares the topology and starts consuming every partition queue (on the
    /// current tokio runtime). Fails if the broker is unreachable now.
    pub async fn connect(cfg: AmqpConfig) -> Result<Self, PublishError> {
        let all = (0..cfg.partition_count()).collect();
        Self::connect_with(cfg, all).await
    }

    /// Connects like [`Self::connect`] but consumes no queue until told to
    /// ([`Self::subscriptions`]): cluster mode, where a node consumes the shards it holds.
    pub async fn connect_sharded(cfg: AmqpConfig) -> Result<Self, PublishError> {
        Self::connect_with(cfg, BTreeSet::new()).await
    }

    async fn connect_with(cfg: AmqpConfig, wanted: BTreeSet<u16>) -> Result<Self, PublishError> {
        let session = SrcSession::open(&cfg, 1).await.map_err(unavailable)?;
        let mut first = Vec::new();
        for &p in &wanted {
            first.push(session.subscribe(&cfg, p).await.map_err(unavailable)?);
        }
        let counters = Arc::new(SourceCounters::default());
        counters.connected.store(true, Ordering::Relaxed);
        let capacity = cfg.partition_count() as usize * cfg.prefetch.max(1) as usize;
        let (tx, rx) = mpsc::channel(capacity);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let current = Arc::new(parking_lot::Mutex::new(Some(session.clone())));
        let subscriptions = Subscriptions { tx: cmd_tx, current: current.clone() };
        let stop = Stop::default();
        let sup = Supervisor { cfg, tx, stop: stop.clone(), counters: counters.clone(), wanted, current, commands: cmd_rx };
        let supervisor = tokio::spawn(sup.run(Some((session, first))));
        Ok(AmqpSource { rx, stop, counters, subscriptions, supervisor })
    }

    pub fn stats(&self) -> SourceStats {
        self.counters.snapshot()
    }

    /// The counters, to read them after the source was handed to the consumer.
    pub fn stats_handle(&self) -> Arc<SourceCounters> {
        self.counters.clone()
    }

    /// The handle that changes which queues are consumed.
    pub fn subscriptions(&self) -> Subscriptions {
        self.subscriptions.clone()
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
            let mut drained = Vec::new();
            let (mut stale, mut rides) = (0u64, 0usize);
            // Whole messages: a batch may pass `max` by the rest of one message. A drain
            // marker ends the batch, so the consumer knows which WAL record holds the last
            // of its shard's deliveries.
            let mut next = Some(first);
            while let Some(feed) = next.take() {
                match feed {
                    Feed::Drained(p) => {
                        drained.push(p);
                        break;
                    }
                    Feed::Delivery(item) if !item.part.live() => stale += item.events.len() as u64,
                    Feed::Delivery(item) => {
                        rides += item.events.len();
                        items.push(item);
                    }
                }
                if rides < max {
                    next = self.rx.try_recv().ok();
                }
            }
            if stale > 0 {
                self.counters.stale_dropped.fetch_add(stale, Ordering::Relaxed);
            }
            if items.is_empty() && drained.is_empty() {
                continue;
            }
            let mut batch = make_batch(items, self.counters.clone());
            batch.drained = drained;
            return Some(batch);
        }
    }

    fn stop_handle(&self) -> Stop {
        self.stop.clone()
    }
}

/// Why a partition task ended.
enum PumpEnd {
    /// The consumer was cancelled (by us, or by the broker).
    Cancelled,
    /// The channel or connection failed.
    Failed(String),
    /// The source is gone.
    Gone,
}

/// Forwards one partition channel's deliveries, in order, into the shared mpsc.
async fn pump(part: Arc<SrcPart>, queue: String, mut consumer: Consumer, tx: mpsc::Sender<Feed>, counters: Arc<SourceCounters>) -> PumpEnd {
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
            Ok(events) => {
                let request_ids = request_ids(&delivery);
                let item =
                    Item { events, request_ids, published_us: published_us(&delivery), tag: delivery.delivery_tag, part: part.clone() };
                if tx.send(Feed::Delivery(item)).await.is_err() {
                    return PumpEnd::Gone;
                }
            }
            Err(why) => {
                // Settled on the wire before any later delivery of this channel is forwarded.
                let rejected = part.channel.basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false }).await;
                if let Err(e) = rejected {
                    return PumpEnd::Failed(e.to_string());
                }
                counters.poisoned(&queue, delivery.delivery_tag, &why);
            }
        }
    }
    PumpEnd::Cancelled
}

/// A connection just opened, with its subscriptions started.
type Opened = (Arc<SrcSession>, Vec<(Arc<SrcPart>, Consumer)>);

/// Runs the source's connections: partition tasks, subscription changes, depth refresh,
/// reconnects, stop.
struct Supervisor {
    cfg: AmqpConfig,
    tx: mpsc::Sender<Feed>,
    stop: Stop,
    counters: Arc<SourceCounters>,
    /// The partitions to consume (on every connection).
    wanted: BTreeSet<u16>,
    current: Arc<parking_lot::Mutex<Option<Arc<SrcSession>>>>,
    commands: mpsc::UnboundedReceiver<Command>,
}

/// The live subscriptions of one connection.
#[derive(Default)]
struct Live {
    parts: BTreeMap<u16, Arc<SrcPart>>,
    /// Partitions cancelled by us whose task has not ended yet.
    cancelling: BTreeSet<u16>,
    /// Partitions cancelled and drained: the channel stays open for acks until closed.
    cancelled: BTreeSet<u16>,
    pumps: JoinSet<(u16, PumpEnd)>,
}

impl Supervisor {
    fn start_pump(&self, live: &mut Live, part: Arc<SrcPart>, consumer: Consumer) {
        let p = part.part;
        live.parts.insert(p, part.clone());
        let (queue, tx, counters) = (self.cfg.partition_queue(p), self.tx.clone(), self.counters.clone());
        live.pumps.spawn(async move { (p, pump(part, queue, consumer, tx, counters).await) });
        self.publish_subscribed(live);
    }

    fn publish_subscribed(&self, live: &Live) {
        *self.counters.subscribed.lock() = live.parts.keys().filter(|p| !live.cancelled.contains(p)).copied().collect();
    }

    /// Applies a subscription change; `Err` = the connection must be opened again.
    async fn command(&mut self, session: &Arc<SrcSession>, live: &mut Live, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::Subscribe(p) => {
                self.wanted.insert(p);
                if live.parts.contains_key(&p) && !live.cancelled.contains(&p) && !live.cancelling.contains(&p) {
                    return Ok(());
                }
                if let Some(old) = live.parts.remove(&p) {
                    old.close_channel();
                }
                live.cancelled.remove(&p);
                live.cancelling.remove(&p);
                let (part, consumer) = session.subscribe(&self.cfg, p).await.map_err(|e| e.to_string())?;
                self.start_pump(live, part, consumer);
                tracing::info!(partition = p, "consuming partition queue");
            }
            Command::Cancel(p) => {
                self.wanted.remove(&p);
                match live.parts.get(&p) {
                    Some(part) if !live.cancelled.contains(&p) && live.cancelling.insert(p) => {
                        let cancel = part.channel.basic_cancel(part.consumer_tag.clone(), BasicCancelOptions::default());
                        match tokio::time::timeout(Duration::from_secs(5), cancel).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Err(format!("cancelling partition {p}: {e}")),
                            Err(_) => return Err(format!("cancelling partition {p}: no answer within 5 s")),
                        }
                    }
                    Some(_) => {}
                    // Not subscribed (yet): nothing was delivered, so it is drained.
                    None => self.drained(p).await,
                }
            }
            Command::Close(p) => {
                self.wanted.remove(&p);
                live.cancelling.remove(&p);
                live.cancelled.remove(&p);
                if let Some(part) = live.parts.remove(&p) {
                    part.close_channel();
                    tracing::info!(partition = p, "partition queue given up; its channel closed");
                }
                self.publish_subscribed(live);
            }
            Command::Reset(p) => {
                self.wanted.remove(&p);
                return Err(format!("partition {p} lost: every subscription is opened again"));
            }
        }
        Ok(())
    }

    async fn drained(&self, p: u16) {
        let _ = self.tx.send(Feed::Drained(p)).await;
    }

    async fn run(mut self, mut first: Option<Opened>) {
        let mut generation = 1u64;
        let mut reconnect = Reconnect::new("consumer", &self.cfg.prefix);
        loop {
            if self.stop.is_stopped() || self.tx.is_closed() {
                break;
            }
            let (session, parts) = match first.take() {
                Some(s) => s,
                None => {
                    let (cfg, wanted) = (self.cfg.clone(), self.wanted.clone());
                    let open = async move {
                        let session = SrcSession::open(&cfg, generation + 1).await?;
                        let mut parts = Vec::new();
                        for p in wanted {
                            parts.push(session.subscribe(&cfg, p).await?);
                        }
                        Ok::<_, AmqpError>((session, parts))
                    };
                    match reconnect.attempt(open, Some(&self.stop)).await {
                        Some(s) => {
                            generation += 1;
                            self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                            s
                        }
                        None => continue, // the loop's head sees a stop
                    }
                }
            };
            *self.current.lock() = Some(session.clone());
            self.counters.connected.store(true, Ordering::Relaxed);
            let mut live = Live::default();
            for (part, consumer) in parts {
                self.start_pump(&mut live, part, consumer);
            }

            let mut depth_tick = tokio::time::interval(DEPTH_EVERY);
            depth_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let cause = loop {
                // Lost already (`Subscriptions::reset`): open again at once.
                if session.dead.load(Ordering::Acquire) {
                    while let Ok(cmd) = self.commands.try_recv() {
                        self.apply_offline(cmd).await;
                    }
                    break Some("subscriptions reset".to_string());
                }
                tokio::select! {
                    _ = self.stop.stopped() => break None,
                    Some(cmd) = self.commands.recv() => {
                        if let Err(e) = self.command(&session, &mut live, cmd).await {
                            break Some(e);
                        }
                    }
                    Some(ended) = live.pumps.join_next(), if !live.pumps.is_empty() => {
                        match ended {
                            Ok((p, PumpEnd::Cancelled)) if live.cancelling.remove(&p) => {
                                live.cancelled.insert(p);
                                self.publish_subscribed(&live);
                                self.drained(p).await;
                            }
                            // A subscription closed by us ends quietly.
                            Ok((p, _)) if !live.parts.contains_key(&p) => {}
                            Ok((_, PumpEnd::Failed(e))) => break Some(e),
                            Ok((_, PumpEnd::Cancelled)) => break Some("consumer cancelled by the broker".to_string()),
                            Ok((_, PumpEnd::Gone)) => break Some("source dropped".to_string()),
                            Err(e) => break Some(format!("partition task failed: {e}")),
                        }
                    }
                    _ = depth_tick.tick() => {
                        let depths = tokio::time::timeout(DEPTH_EVERY, queue_depths(&session.admin, &self.cfg)).await;
                        *self.counters.depths.lock() = depths.ok().and_then(Result::ok).unwrap_or_default();
                    }
                }
            };

            match cause {
                None => {
                    // Stopped: no new deliveries; what was received is still handed out.
                    for part in live.parts.values() {
                        let cancel = part.channel.basic_cancel(part.consumer_tag.clone(), BasicCancelOptions::default());
                        let _ = tokio::time::timeout(Duration::from_secs(5), cancel).await;
                    }
                    let drained =
                        tokio::time::timeout(Duration::from_secs(5), async { while live.pumps.join_next().await.is_some() {} }).await;
                    if drained.is_err() {
                        live.pumps.abort_all();
                    }
                    break;
                }
                Some(cause) => {
                    session.dead.store(true, Ordering::Release);
                    *self.current.lock() = None;
                    self.counters.connected.store(false, Ordering::Relaxed);
                    self.counters.depths.lock().clear();
                    self.counters.subscribed.lock().clear();
                    live.pumps.abort_all();
                    session.close_now();
                    if self.tx.is_closed() {
                        break;
                    }
                    reconnect.lost(&cause, "the broker redelivers what was not acked");
                }
            }
        }
        self.counters.connected.store(false, Ordering::Relaxed);
        // Dropping `tx` (and the pumps' clones, already gone) ends `next_batch` once drained.
    }

    /// A subscription change while no connection is open: only the wanted set changes (a
    /// cancel is drained at once, as nothing is delivered meanwhile).
    async fn apply_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe(p) => {
                self.wanted.insert(p);
            }
            Command::Cancel(p) => {
                self.wanted.remove(&p);
                self.drained(p).await;
            }
            Command::Close(p) | Command::Reset(p) => {
                self.wanted.remove(&p);
            }
        }
    }
}
