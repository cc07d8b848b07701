//! The source: one channel and consumer per partition queue, their deliveries forwarded in
//! order into one queue that `next_batch` drains, and a supervisor that reconnects (see the
//! module doc of [`super`]).

use async_trait::async_trait;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::acks::make_batch;
use super::codec::check_delivery;
use super::connection::{close_in_background, connect, unavailable, AmqpError, Reconnect};
use super::counters::{SourceCounters, SourceStats};
use super::topology::{declare_on, queue_depths};
use super::{AmqpConfig, DEPTH_EVERY};
use crate::bus::{Batch, EventSource, Stop};
use crate::domain::RideEvent;
use crate::error::PublishError;

pub(super) struct SrcPart {
    pub(super) channel: Channel,
    pub(super) consumer_tag: ShortString,
    /// The highest delivery tag settled on this channel (acked or nacked with `multiple`).
    pub(super) settled: tokio::sync::Mutex<u64>,
}

/// One connection generation of the source: its partition channels. Items and ackers hold
/// it, so the connection stays open until the last batch of it was settled.
pub(super) struct SrcSession {
    pub(super) generation: u64,
    conn: parking_lot::Mutex<Option<Connection>>,
    pub(super) parts: Vec<SrcPart>,
    admin: Channel,
    /// Set when the connection was lost: its deliveries are not handed out any more and
    /// its acks are not sent.
    pub(super) dead: AtomicBool,
}

impl SrcSession {
    async fn open(cfg: &AmqpConfig, generation: u64) -> Result<(Arc<SrcSession>, Vec<Consumer>), AmqpError> {
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
                .basic_consume(cfg.partition_queue(p).into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
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

/// A delivery on its way to the consumer: its rides (one, or a batch) travel together, so
/// a consumer batch never splits a message — its ack covers all of the message's rides, so
/// they must all be in the same WAL record.
pub(super) struct Item {
    pub(super) events: Vec<RideEvent>,
    pub(super) tag: u64,
    pub(super) part: u16,
    pub(super) session: Arc<SrcSession>,
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
        let supervisor = tokio::spawn(supervise_source(cfg, tx, stop.clone(), counters.clone(), Some((session, consumers))));
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
            let (mut stale, mut rides) = (0u64, 0usize);
            // Whole messages: a batch may pass `max` by the rest of one message.
            let mut next = Some(first);
            while let Some(item) = next.take() {
                if item.session.dead.load(Ordering::Acquire) {
                    stale += item.events.len() as u64;
                } else {
                    rides += item.events.len();
                    items.push(item);
                }
                if rides < max {
                    next = self.rx.try_recv().ok();
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
            Ok(events) => {
                let Some(session) = session.upgrade() else { return PumpEnd::Gone };
                if tx.send(Item { events, tag: delivery.delivery_tag, part, session }).await.is_err() {
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
    let mut reconnect = Reconnect::new("consumer", &cfg.prefix);
    loop {
        if stop.is_stopped() || tx.is_closed() {
            break;
        }
        let (session, consumers) = match first.take() {
            Some(s) => s,
            None => match reconnect.attempt(SrcSession::open(&cfg, generation + 1), Some(&stop)).await {
                Some(s) => {
                    generation += 1;
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    s
                }
                None => continue, // the loop's head sees a stop
            },
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
                let drained = tokio::time::timeout(Duration::from_secs(5), async { while pumps.join_next().await.is_some() {} }).await;
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
                reconnect.lost(&cause, "the broker redelivers what was not acked");
            }
        }
    }
    counters.connected.store(false, Ordering::Relaxed);
    // Dropping `tx` (and the pumps' clones, already gone) ends `next_batch` once drained.
}
