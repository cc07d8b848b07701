//! The live stream: `GET /resorts/{resortID}/seasons/{seasonID}/day/{dayID}/stream`, Server-Sent
//! Events carrying the day's [`DaySummary`] whenever it changes (issue 14).
//!
//! One feed per watched day per node, shared by all its viewers: a task that reads the
//! summary every [`TICK`] (the actors' state, or the tables' every [`TABLES_TICK`] for a day
//! no actor here holds) and publishes it, if it changed, into a `watch` channel. So:
//! - updates are coalesced to at most two a second whatever the ride rate, and a feed
//!   costs one read per tick however many viewers it has;
//! - a slow viewer cannot hold memory or slow anything: the channel keeps only the newest
//!   summary, and the response is polled only as its socket drains, so a viewer that
//!   stopped reading simply skips to the newest summary when it resumes;
//! - in cluster mode every node serves the stream of every day: a feed on a node that does
//!   not own the day reads the owner's summary through the read forwarding every GET uses
//!   (ADR 005), so viewers scale with the read nodes; the owner serves one read per tick
//!   per node that watches the day, not one per viewer. (The issue suggested a fanout
//!   exchange; this needs no broker, works the same embedded and with RabbitMQ, and keeps
//!   the owner the only source of a day's figures.)
//!
//! Each event is the whole summary, with the day's ride count as its id. A reconnecting
//! browser sends `Last-Event-ID`; it gets the current summary at once unless it already
//! has that one. Since every event replaces the previous one, resuming can skip
//! intermediate states but can never leave a gap in what the page shows. A comment line
//! every [`HEARTBEAT`] keeps the connection alive through the ALB's idle timeout and lets
//! the browser notice a dead connection. At most `http.max_streams` viewers per node; past
//! that a 503 with `Retry-After` says so.

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use bytes::Bytes;
use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api::{day_key, Reply, State};
use super::live::{summary, DaySummary};
use super::AppState;
use crate::cluster::{ReadCall, Route};
use crate::domain::DayKey;
use crate::error::ApiError;

/// How often a feed reads a day held by an actor (its own or, in cluster mode, the owner's).
pub const TICK: Duration = Duration::from_millis(500);
/// How often a feed reads a day from the tables: a day no actor holds changes only when one
/// loads it, and a table query costs more than an actor read.
pub const TABLES_TICK: Duration = Duration::from_secs(2);
/// A comment line this often on an idle stream.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// What a browser waits before reconnecting (the stream's `retry:` field), ms.
const RECONNECT_MS: u64 = 2_000;

/// One summary, rendered once as an SSE event for every viewer.
pub struct Frame {
    /// The day's ride count: the event id.
    pub id: u64,
    pub event: Bytes,
}

/// A day's feed: the newest summary (none before the first read), shared by its viewers.
type Feed = Arc<watch::Sender<Option<Arc<Frame>>>>;
/// A viewer's end of a [`Feed`].
type Watcher = watch::Receiver<Option<Arc<Frame>>>;

/// The node's feeds and its viewer count.
pub struct Hub {
    feeds: Mutex<FxHashMap<DayKey, Feed>>,
    viewers: AtomicUsize,
    max_viewers: usize,
    /// Summaries published, for `/admin/actors`' live figures.
    frames: AtomicU64,
    /// Cancelled when the node shuts down: every stream ends (a browser reconnects to
    /// another node), so that the graceful stop does not wait on endless responses.
    closing: CancellationToken,
}

/// What `/admin/actors` shows of the live view.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct HubStats {
    pub viewers: usize,
    pub max_viewers: usize,
    pub feeds: usize,
    pub frames: u64,
}

impl Hub {
    pub fn new(max_viewers: usize) -> Self {
        Hub {
            feeds: Mutex::new(FxHashMap::default()),
            viewers: AtomicUsize::new(0),
            max_viewers,
            frames: AtomicU64::new(0),
            closing: CancellationToken::new(),
        }
    }

    /// Ends every stream and refuses new ones: the first step of the node's shutdown.
    pub fn close(&self) {
        self.closing.cancel();
    }

    pub fn stats(&self) -> HubStats {
        HubStats {
            viewers: self.viewers.load(Ordering::Relaxed),
            max_viewers: self.max_viewers,
            feeds: self.feeds.lock().len(),
            frames: self.frames.load(Ordering::Relaxed),
        }
    }

    /// A viewer's place, or `None` past the bound.
    fn admit(self: &Arc<Self>) -> Option<Seat> {
        let taken = self.viewers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_viewers).then_some(n + 1));
        taken.ok().map(|_| Seat(self.clone()))
    }

    /// The day's feed, started when it is the first viewer's. `start` runs the new feed.
    fn subscribe(&self, key: DayKey, start: impl FnOnce(Feed)) -> Watcher {
        let mut feeds = self.feeds.lock();
        if let Some(tx) = feeds.get(&key) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        feeds.insert(key, tx.clone());
        start(tx);
        rx
    }

    /// Ends the day's feed if nobody watches it: checked under the lock that subscribing
    /// takes, so a viewer arriving meanwhile keeps it.
    fn retire_if_unwatched(&self, key: DayKey) -> bool {
        let mut feeds = self.feeds.lock();
        match feeds.get(&key) {
            Some(tx) if tx.receiver_count() == 0 => {
                feeds.remove(&key);
                true
            }
            Some(_) => false,
            None => true,
        }
    }
}

/// A viewer's place in the bound, given back when its response is dropped.
struct Seat(Arc<Hub>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.viewers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `GET .../day/{dayID}/stream`.
pub async fn resort_day_stream(req: HttpRequest, state: State, path: web::Path<(String, String, String)>) -> Reply {
    let (resort, season, day) = path.into_inner();
    let key = day_key(&state, &resort, &season, &day)?;
    if state.live.closing.is_cancelled() {
        return Err(ApiError::Unavailable { message: "this node is shutting down; reconnect to another".into(), retry_after_secs: 1 });
    }
    let seat = state.live.admit().ok_or_else(|| ApiError::Unavailable {
        message: format!("this node serves at most {} live streams; retry later or on another node", state.live.max_viewers),
        retry_after_secs: 5,
    })?;
    let resume = req.headers().get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let feed_state = state.clone();
    let mut rx = state.live.subscribe(key, move |tx| {
        actix_web::rt::spawn(run_feed(feed_state, key, tx));
    });
    // The current summary, if the feed has one, is the first thing sent.
    rx.mark_changed();
    let viewer = Viewer {
        rx,
        sent: resume,
        heartbeat: tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT),
        closing: state.live.closing.clone(),
        _seat: seat,
        greeted: false,
    };
    let body = futures_util::stream::unfold(viewer, |mut v| async move {
        let chunk = v.next().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), v))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        // nginx (our local cluster's balancer) buffers responses unless told not to.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// One viewer's side of a feed.
struct Viewer {
    rx: Watcher,
    /// The id of the last event this viewer has (sent here, or `Last-Event-ID`).
    sent: Option<u64>,
    heartbeat: tokio::time::Interval,
    closing: CancellationToken,
    _seat: Seat,
    greeted: bool,
}

impl Viewer {
    /// The next chunk to send; `None` ends the stream (shutdown).
    async fn next(&mut self) -> Option<Bytes> {
        if !self.greeted {
            self.greeted = true;
            return Some(Bytes::from(format!("retry: {RECONNECT_MS}\n: liftlog live stream\n\n")));
        }
        loop {
            tokio::select! {
                changed = self.rx.changed() => {
                    changed.ok()?;
                    let frame = self.rx.borrow_and_update().clone();
                    if let Some(frame) = frame.filter(|f| self.sent != Some(f.id)) {
                        self.sent = Some(frame.id);
                        self.heartbeat.reset();
                        return Some(frame.event.clone());
                    }
                }
                _ = self.heartbeat.tick() => return Some(Bytes::from_static(b": heartbeat\n\n")),
                _ = self.closing.cancelled() => return None,
            }
        }
    }
}

/// A day's feed: reads the summary each tick while anyone watches, publishes it when it
/// changed. Runs on the HTTP worker of its first viewer.
async fn run_feed(state: State, key: DayKey, tx: Feed) {
    let mut last: Option<DaySummary> = None;
    loop {
        if (tx.receiver_count() == 0 && state.live.retire_if_unwatched(key)) || state.live.closing.is_cancelled() {
            return;
        }
        let (read, from_actor) = read_summary(&state, key).await;
        match read {
            Ok(s) if last.as_ref() != Some(&s) => {
                match serde_json::to_string(&s) {
                    Ok(json) => {
                        let event = Bytes::from(format!("id: {}\nevent: day\ndata: {json}\n\n", s.rides));
                        tx.send_replace(Some(Arc::new(Frame { id: s.rides, event })));
                        state.live.frames.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(day = %key, cause = %e, "live summary not rendered"),
                }
                last = Some(s);
            }
            Ok(_) => {}
            // The next tick tries again; viewers keep the last summary meanwhile.
            Err(e) => tracing::debug!(day = %key, cause = %e, "live summary not read"),
        }
        tokio::time::sleep(if from_actor { TICK } else { TABLES_TICK }).await;
    }
}

/// The day's summary where a GET would read it, and whether an actor answered.
async fn read_summary(state: &AppState, key: DayKey) -> (Result<DaySummary, ApiError>, bool) {
    let split = |read: Result<(DaySummary, bool), ApiError>| match read {
        Ok((s, from_actor)) => (Ok(s), from_actor),
        Err(e) => (Err(e), false),
    };
    let Some(cluster) = &state.cluster else {
        return split(summary(state, key, None).await);
    };
    let path = format!("{}/resorts/{}/seasons/{}/day/{}/summary", state.requests.base_path(), key.resort, key.season, key.day);
    let headers = actix_web::http::header::HeaderMap::new();
    let route = match cluster.route_call(&ReadCall { path: &path, headers: &headers, request_id: None }, &key).await {
        Ok(route) => route,
        Err(e) => return (Err(e), false),
    };
    match route {
        Route::Owner(answer) => (owner_summary(answer).await, true),
        route => split(summary(state, key, Some(&route)).await),
    }
}

/// The owner's answer to the forwarded summary read.
async fn owner_summary(answer: HttpResponse) -> Result<DaySummary, ApiError> {
    let status = answer.status();
    let body =
        actix_web::body::to_bytes(answer.into_body()).await.map_err(|e| ApiError::Internal(format!("owner's summary unreadable: {e}")))?;
    if !status.is_success() {
        return Err(ApiError::Internal(format!("owner answered the summary read with {status}")));
    }
    serde_json::from_slice(&body).map_err(|e| ApiError::Internal(format!("owner's summary is not one: {e}")))
}
