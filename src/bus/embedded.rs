//! The embedded bus: a bounded tokio channel from the HTTP workers to the consumer, each
//! ride carrying a oneshot that the consumer answers after the WAL fsync. Bounded so that
//! a slow disk turns into fast 503s rather than unbounded memory and timeouts.

use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

use super::{Acker, Batch, BusStats, EventSource, Publisher, Stop};
use crate::domain::RideEvent;
use crate::error::PublishError;
use crate::trace::{RequestId, RequestIds};

type Reply = oneshot::Sender<Result<(), PublishError>>;

struct Shared {
    /// Set by `close` (publisher) or the source's stop handle: the same thing here.
    closed: Stop,
    published: AtomicU64,
    rejected_full: AtomicU64,
    timeouts: AtomicU64,
}

pub struct EmbeddedPublisher {
    tx: mpsc::Sender<(RideEvent, RequestId, Reply)>,
    capacity: usize,
    /// How long a POST waits for its WAL batch before answering 503. Bounded so no request
    /// hangs behind a stuck disk.
    deadline: Duration,
    shared: Arc<Shared>,
}

pub struct EmbeddedSource {
    rx: mpsc::Receiver<(RideEvent, RequestId, Reply)>,
    shared: Arc<Shared>,
}

/// Creates the two ends. `capacity` is the queue bound (rides), `deadline` the longest a
/// publisher waits for durability.
pub fn channel(capacity: usize, deadline: Duration) -> (EmbeddedPublisher, EmbeddedSource) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(Shared {
        closed: Stop::default(),
        published: AtomicU64::new(0),
        rejected_full: AtomicU64::new(0),
        timeouts: AtomicU64::new(0),
    });
    (EmbeddedPublisher { tx, capacity, deadline, shared: shared.clone() }, EmbeddedSource { rx, shared })
}

#[async_trait]
impl Publisher for EmbeddedPublisher {
    async fn publish_for(&self, event: RideEvent, request: RequestId) -> Result<(), PublishError> {
        if self.shared.closed.is_stopped() {
            return Err(PublishError::ShuttingDown);
        }
        let (reply, answer) = oneshot::channel();
        self.tx.try_send((event, request, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.shared.rejected_full.fetch_add(1, Ordering::Relaxed);
                PublishError::Overloaded
            }
            mpsc::error::TrySendError::Closed(_) => PublishError::ShuttingDown,
        })?;
        match tokio::time::timeout(self.deadline, answer).await {
            Ok(Ok(result)) => {
                if result.is_ok() {
                    self.shared.published.fetch_add(1, Ordering::Relaxed);
                }
                result
            }
            // The consumer took the ride and dropped its answer: it may have reached the WAL.
            Ok(Err(_)) => Err(PublishError::Uncertain("the consumer stopped before answering".into())),
            // Still queued or being written: it may be recorded after this answer.
            Err(_) => {
                self.shared.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(PublishError::Timeout)
            }
        }
    }

    fn stats(&self) -> BusStats {
        BusStats {
            kind: "embedded",
            depth: self.capacity - self.tx.capacity(),
            capacity: self.capacity,
            published: self.shared.published.load(Ordering::Relaxed),
            rejected_full: self.shared.rejected_full.load(Ordering::Relaxed),
            timeouts: self.shared.timeouts.load(Ordering::Relaxed),
            admission: None,
        }
    }

    fn close(&self) {
        self.shared.closed.stop();
    }
}

struct ReplyAcker(Vec<Reply>);

#[async_trait]
impl Acker for ReplyAcker {
    async fn ack(self: Box<Self>) {
        for r in self.0 {
            let _ = r.send(Ok(())); // a client that gave up is fine: the ride is durable
        }
    }
    async fn nack(self: Box<Self>, error: PublishError) {
        for r in self.0 {
            let _ = r.send(Err(error.clone()));
        }
    }
    async fn ack_refusing(self: Box<Self>, refused: Vec<(usize, PublishError)>) {
        let mut refused = refused.into_iter().peekable();
        for (i, r) in self.0.into_iter().enumerate() {
            let answer = match refused.next_if(|(at, _)| *at == i) {
                Some((_, error)) => Err(error),
                None => Ok(()),
            };
            let _ = r.send(answer);
        }
    }
}

#[async_trait]
impl EventSource for EmbeddedSource {
    async fn next_batch(&mut self, max: usize) -> Option<Batch> {
        let first = loop {
            if self.shared.closed.is_stopped() {
                // Closed: hand out what is still queued, then end.
                match self.rx.try_recv() {
                    Ok(item) => break item,
                    Err(_) => return None,
                }
            }
            tokio::select! {
                item = self.rx.recv() => match item {
                    Some(item) => break item,
                    None => return None,
                },
                _ = self.shared.closed.stopped() => continue,
            }
        };
        let mut events = Vec::with_capacity(max.min(self.rx.len() + 1));
        let mut replies = Vec::with_capacity(events.capacity());
        let mut request_ids = RequestIds::for_logs();
        let mut next = Some(first);
        while let Some((e, id, r)) = next.take() {
            events.push(e);
            request_ids.push(&id);
            replies.push(r);
            if events.len() < max {
                next = self.rx.try_recv().ok();
            }
        }
        Some(Batch { events, request_ids, published_us: Vec::new(), acker: Box::new(ReplyAcker(replies)), epoch: 0, drained: Vec::new() })
    }

    fn stop_handle(&self) -> Stop {
        self.shared.closed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u64) -> RideEvent {
        RideEvent { id, resort: 1, season: 2025, day: 1, skier: 1, time: 1, lift: 1, vertical: 10 }
    }

    #[tokio::test]
    async fn full_queue_sheds_and_acks_reach_publishers() {
        let (p, mut s) = channel(2, Duration::from_secs(5));
        let p = Arc::new(p);
        let a = tokio::spawn({
            let p = p.clone();
            async move { p.publish(ev(1)).await }
        });
        let b = tokio::spawn({
            let p = p.clone();
            async move { p.publish(ev(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(p.publish(ev(3)).await, Err(PublishError::Overloaded)));
        let batch = s.next_batch(10).await.unwrap();
        assert_eq!(batch.events.len(), 2);
        batch.acker.ack().await;
        assert!(a.await.unwrap().is_ok());
        assert!(b.await.unwrap().is_ok());
        p.close();
        assert!(s.next_batch(10).await.is_none());
        assert!(matches!(p.publish(ev(4)).await, Err(PublishError::ShuttingDown)));
    }

    /// A POST that passes its deadline leaves its ride queued: the consumer still makes it
    /// durable after the 503, so the error must say "may have been recorded".
    #[tokio::test]
    async fn a_ride_past_its_deadline_is_still_recorded_later() {
        let (p, mut s) = channel(4, Duration::from_millis(30));
        let answer = p.publish(ev(7)).await;
        assert!(matches!(answer, Err(PublishError::Timeout)), "{answer:?}");
        assert!(answer.unwrap_err().may_be_recorded());
        let batch = s.next_batch(10).await.expect("the ride is still queued");
        assert_eq!(batch.events.iter().map(|e| e.id).collect::<Vec<_>>(), vec![7]);
        batch.acker.ack().await; // durable now: the client was told it may be
    }
}
