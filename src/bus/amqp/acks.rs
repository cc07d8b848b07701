//! Settling a batch: one multiple-ack (or nack) per partition channel, in the order the
//! batches were handed out (see the module doc of [`super`]).

use async_trait::async_trait;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::counters::SourceCounters;
use super::source::{Item, SrcPart};
use crate::bus::{Acker, Batch};
use crate::error::PublishError;
use crate::trace::RequestIds;

pub(super) struct AckGroup {
    part: Arc<SrcPart>,
    max_tag: u64,
    count: u64,
}

pub(super) fn make_batch(items: Vec<Item>, counters: Arc<SourceCounters>) -> Batch {
    let mut groups: Vec<AckGroup> = Vec::new();
    let mut events = Vec::with_capacity(items.len());
    let mut request_ids = RequestIds::for_logs();
    let mut published_us = Vec::new();
    // A batch never mixes connections: a lost one's deliveries are dropped as stale
    // before the next connection is opened.
    let epoch = items.iter().map(|i| i.part.session.generation).max().unwrap_or(0);
    for item in items {
        let n = item.events.len() as u64;
        events.extend(item.events);
        request_ids.push_joined(&item.request_ids);
        published_us.extend(item.published_us);
        let found = groups.iter_mut().find(|g| Arc::ptr_eq(&g.part, &item.part));
        match found {
            Some(g) => {
                g.max_tag = g.max_tag.max(item.tag);
                g.count += n;
            }
            None => groups.push(AckGroup { part: item.part, max_tag: item.tag, count: n }),
        }
    }
    Batch { events, request_ids, published_us, acker: Box::new(AmqpAcker { groups, counters }), epoch, drained: Vec::new() }
}

struct AmqpAcker {
    groups: Vec<AckGroup>,
    counters: Arc<SourceCounters>,
}

impl AmqpAcker {
    async fn settle(self, ack: bool) {
        for g in &self.groups {
            if !g.part.live() {
                continue; // redelivered by the broker, on a new connection or to the shard's next owner
            }
            let part = &g.part;
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
                    generation = g.part.session.generation,
                    partition = g.part.part,
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
