//! Reads of a resort-day answered by the node that owns its shard, through any node
//! (issue 12, item 3; ADR 005, "Reads through any node").
//!
//! [`ClusterReads::route`] decides, for one day-scoped GET, where it is answered:
//! - **local**: this node's keeper gives a fence for the day's shard: the resident actor
//!   answers, or the tables for a day that is not resident (as on a single node);
//! - **owner**: the shard map names another live owner: the request goes to its endpoint
//!   (same path and query, `If-None-Match` passed through) with [`EPOCH_HEADER`] carrying
//!   the epoch the map shows and [`FORWARDED_HEADER`] naming this node. The owner answers
//!   only while its own fence has exactly that epoch, else `421 Misdirected Request`; on a
//!   421 this node waits for the next map and retries once;
//! - **tables**: the shard has no live owner (free, expired, being handed off, or the
//!   owner did not answer or refused twice): after waiting at most `forward_wait` for a
//!   map that shows one, the tables answer. They lag the owner by up to a flush interval,
//!   which the response says in [`SOURCE_HEADER`] (`tables; reason=...`).
//!
//! A request that carries [`FORWARDED_HEADER`] is answered locally or refused with 421,
//! never forwarded again: a map that is briefly wrong on two nodes cannot make a request
//! loop, and a client that sends the header itself gets the same rule (it may then see a
//! 421, which only it asked for).
//!
//! The forwarder is a pooled keep-alive HTTP/1 client (hyper-util's legacy client): the
//! nodes of one cluster talk over plain HTTP inside the VPC, and every endpoint is an
//! origin (`http://host:port`) to which the request's own path is appended. A dead owner
//! never becomes a 500: every failure of a forward (refused connection, timeout, a reset,
//! an unreadable answer) falls back as above.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::keeper::{KeeperHandle, KeeperStats, ShardMap, ShardOwner};
use super::{NodeInfo, ShardId};
use crate::domain::DayKey;
use crate::error::ApiError;
use crate::trace::RequestId;

/// The shard epoch the forwarder expects the owner to hold (a decimal `u64`).
pub const EPOCH_HEADER: &str = "liftlog-shard-epoch";
/// Marks a forwarded request, with the forwarding node's id as its value: such a request
/// is answered locally or refused with 421, never forwarded again.
pub const FORWARDED_HEADER: &str = "liftlog-forwarded-by";
/// Where a day-scoped GET was answered from: `local`, `owner; node=<id>`, or
/// `tables; reason=<why>` (see [`Fallback`]).
pub const SOURCE_HEADER: &str = "liftlog-read-source";

/// Request headers a forward passes on: the conditional one, so that a 304 works through
/// the forwarder.
const PASSED_ON: &[&str] = &["if-none-match"];
/// Response headers of the owner passed back unchanged: caching and content, and the
/// owner's `Retry-After` on its 503.
const PASSED_BACK: &[&str] = &["etag", "cache-control", "content-type", "retry-after"];
/// Largest owner answer read: a day's answers are a few dozen bytes; anything much larger
/// is not from a liftlog node and is treated as a failed forward.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Idle pooled connections per owner: a few per worker keep forwarded reads off the TCP
/// handshake; idle ones close after [`POOL_IDLE`], below actix's keep-alive on the owner
/// so that the owner rarely closes a connection the pool is about to reuse.
const POOL_IDLE_PER_HOST: usize = 16;
const POOL_IDLE: Duration = Duration::from_secs(4);

/// Where this node's fences come from: the lease keeper in production; tests give fixed
/// epochs.
pub trait LocalFences: Send + Sync + 'static {
    /// The epoch under which this node may answer for `shard` right now, if any.
    fn epoch(&self, shard: ShardId) -> Option<u64>;
    /// The keeper's state for the admin view.
    fn stats(&self) -> Option<KeeperStats> {
        None
    }
}

impl LocalFences for KeeperHandle {
    fn epoch(&self, shard: ShardId) -> Option<u64> {
        self.fence(shard).map(|f| f.epoch)
    }
    fn stats(&self) -> Option<KeeperStats> {
        Some(KeeperHandle::stats(self))
    }
}

/// Why a read was answered from the tables; the `reason` of [`SOURCE_HEADER`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// No scan of the lease table has succeeded yet.
    NoMap,
    /// The shard is free in the map.
    NoOwner,
    /// The map's owner has not renewed for a lease on our clock: probably dead.
    OwnerExpired,
    /// The map names this node, which holds no fence for it (a hand-off or a lost lease
    /// that the next scan will show).
    NotHeld,
    /// The owner did not answer in time, refused the connection, or answered garbage.
    OwnerUnreachable,
    /// The owner refused twice with 421: it no longer holds the epoch the map showed.
    Misdirected,
}

impl Fallback {
    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NoMap => "no-map",
            Fallback::NoOwner => "no-owner",
            Fallback::OwnerExpired => "owner-expired",
            Fallback::NotHeld => "not-held",
            Fallback::OwnerUnreachable => "owner-unreachable",
            Fallback::Misdirected => "misdirected",
        }
    }
}

/// Where one read is answered from.
#[derive(Debug)]
pub enum Route {
    /// This node holds the shard: its resident actor, else the tables.
    Local,
    /// The owner answered: pass its response on as is (it carries [`SOURCE_HEADER`]).
    Owner(HttpResponse),
    /// No owner answered: the tables only (a resident actor on this node is not the
    /// owner's and may be stale), and say why.
    Tables(Fallback),
}

impl Route {
    /// The [`SOURCE_HEADER`] value of a locally built answer.
    fn source(&self) -> Option<String> {
        match self {
            Route::Local => Some("local".into()),
            Route::Tables(why) => Some(format!("tables; reason={}", why.as_str())),
            Route::Owner(_) => None,
        }
    }

    /// Stamps [`SOURCE_HEADER`] on an answer this node built (an owner's answer has it).
    pub fn stamp(&self, mut resp: HttpResponse) -> HttpResponse {
        if let Some(v) = self.source().and_then(|v| HeaderValue::from_str(&v).ok()) {
            resp.headers_mut().insert(HeaderName::from_static(SOURCE_HEADER), v);
        }
        resp
    }
}

/// What routing a read needs of it: the path and query to forward, the headers (the
/// forwarding marks, and those passed on), the request id the owner logs it under.
pub struct ReadCall<'a> {
    pub path: &'a str,
    pub headers: &'a actix_web::http::header::HeaderMap,
    pub request_id: Option<RequestId>,
}

/// Counters of the read routing, for `/admin/cluster` and `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    local: AtomicU64,
    forwarded: AtomicU64,
    retried: AtomicU64,
    tables_fallback: AtomicU64,
    errors: AtomicU64,
    misdirected: AtomicU64,
}

/// A snapshot of [`ClusterReads`]' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ForwardStats {
    /// Reads answered by this node as the shard's owner (its own and forwarded ones).
    pub local: u64,
    /// Reads answered by another node's owner through this one.
    pub forwarded: u64,
    /// Second forwards, after a 421 or a failed first one.
    pub retried: u64,
    /// Reads answered from the tables because no owner answered.
    pub tables_fallback: u64,
    /// Forwards that failed: refused connection, timeout, unreadable answer.
    pub errors: u64,
    /// Forwarded reads this node refused with 421 (it did not hold the expected epoch).
    pub misdirected: u64,
}

/// How reads are routed; from `[cluster]` and the bus's partition count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadSettings {
    pub node: NodeInfo,
    /// The shard count (`bus.amqp.partitions`): which shard a day is in.
    pub shards: u16,
    /// Longest a read waits for a map that shows a live owner (`forward_wait_ms`).
    pub wait: Duration,
    /// Bound of one forward, from connecting to the last byte (`forward_timeout_ms`).
    pub timeout: Duration,
}

/// The read side of cluster mode: decides local / owner / tables for a day and forwards.
/// One per process, shared by every HTTP worker.
pub struct ClusterReads {
    settings: ReadSettings,
    map: watch::Receiver<Arc<ShardMap>>,
    fences: Option<Arc<dyn LocalFences>>,
    client: Client<HttpConnector, Empty<Bytes>>,
    /// Forwards run on a runtime of their own, rather than on the actix worker that took
    /// the request: pooled connections and their tasks then live on one runtime whichever
    /// worker dialled them. Not the service's main runtime either: that one thread also
    /// runs the publisher's batches and confirms on a write node and the consumer loop,
    /// flusher and keeper on a consumer node, and a forward queued behind them there
    /// (issue 12: nginx's upstream times of day GETs at 1k rides/s, K = 3, went from p90
    /// 53-85 ms per node to 18-30 ms with this thread).
    runtime: ForwardRuntime,
    counters: Counters,
}

impl std::fmt::Debug for ClusterReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterReads").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// `GET /admin/cluster`.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub node: NodeInfo,
    pub keeper: Option<KeeperStats>,
    pub map: ShardMap,
    pub forwarding: ForwardStats,
}

impl ClusterReads {
    /// The read routing of a node: `map` from its keeper (`KeeperHandle::map`) or, without
    /// one, from [`super::map_watch::spawn`]; `keeper` on consumer nodes. Call it on the
    /// service's tokio runtime (the map's and the keeper's tasks are there).
    pub fn new(config: &crate::config::Config, map: watch::Receiver<Arc<ShardMap>>, keeper: Option<KeeperHandle>) -> Self {
        let c = &config.cluster;
        let settings = ReadSettings {
            node: keeper.as_ref().map_or_else(|| config.cluster_node(), |k| k.node().clone()),
            shards: config.bus.amqp.partitions,
            wait: Duration::from_millis(c.forward_wait_ms),
            timeout: Duration::from_millis(c.forward_timeout_ms),
        };
        Self::with_fences(settings, map, keeper.map(|k| Arc::new(k) as Arc<dyn LocalFences>))
    }

    /// As [`ClusterReads::new`], from explicit settings and any source of fences.
    ///
    /// # Panics
    /// Outside a tokio runtime; start-up code only.
    pub fn with_fences(settings: ReadSettings, map: watch::Receiver<Arc<ShardMap>>, fences: Option<Arc<dyn LocalFences>>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.timeout));
        // Small requests and answers: do not wait for Nagle.
        connector.set_nodelay(true);
        let client =
            Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).pool_max_idle_per_host(POOL_IDLE_PER_HOST).build(connector);
        ClusterReads { settings, map, fences, client, runtime: ForwardRuntime::start(), counters: Counters::default() }
    }

    pub fn node(&self) -> &NodeInfo {
        &self.settings.node
    }

    pub fn stats(&self) -> ForwardStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ForwardStats {
            local: get(&c.local),
            forwarded: get(&c.forwarded),
            retried: get(&c.retried),
            tables_fallback: get(&c.tables_fallback),
            errors: get(&c.errors),
            misdirected: get(&c.misdirected),
        }
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            node: self.settings.node.clone(),
            keeper: self.fences.as_ref().and_then(|f| f.stats()),
            map: ShardMap::clone(&self.map.borrow()),
            forwarding: self.stats(),
        }
    }

    fn held(&self, shard: ShardId) -> Option<u64> {
        self.fences.as_ref().and_then(|f| f.epoch(shard))
    }

    /// Where the read `req` of day `key` is answered (see the module doc). Call it after
    /// the request's parameters were validated: a bad request is answered here, never
    /// forwarded. `Err` only for a forwarded request this node may not answer (421).
    pub async fn route(&self, req: &HttpRequest, key: &DayKey) -> Result<Route, ApiError> {
        let request_id = actix_web::HttpMessage::extensions(req).get::<RequestId>().cloned();
        let path = req.uri().path_and_query().map_or_else(|| req.uri().path(), |pq| pq.as_str());
        self.route_call(&ReadCall { path, headers: req.headers(), request_id }, key).await
    }

    /// [`Self::route`] for a read this node makes itself (the live view's feeds), or any
    /// read described by its parts.
    pub async fn route_call(&self, req: &ReadCall<'_>, key: &DayKey) -> Result<Route, ApiError> {
        let shard = key.partition(self.settings.shards);
        if req.headers.contains_key(FORWARDED_HEADER) {
            return self.answer_forwarded(req, shard);
        }
        let me = self.settings.node.id.as_str();
        // A clone sees the current map as seen; `changed()` then waits for the next scan.
        let mut map = self.map.clone();
        let mut forwards = 0u8;
        let mut failed: Vec<(String, u64)> = Vec::new();
        let mut reason = Fallback::NoMap;
        let mut waiting_until: Option<Instant> = None;
        loop {
            if self.held(shard).is_some() {
                self.counters.local.fetch_add(1, Ordering::Relaxed);
                return Ok(Route::Local);
            }
            let now = target(&map.borrow_and_update(), me, shard);
            match now {
                // An owner that did not answer is not asked again under the same epoch:
                // wait for a map that names another (or the same node, re-elected).
                Ok(owner) if failed.contains(&(owner.node.clone(), owner.epoch)) => {}
                Ok(owner) => {
                    if forwards > 0 {
                        self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    }
                    forwards += 1;
                    match self.forward(req, &owner, shard).await {
                        Forwarded::Answer(resp) => {
                            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                            return Ok(Route::Owner(resp));
                        }
                        Forwarded::Misdirected => reason = Fallback::Misdirected,
                        Forwarded::Failed => {
                            self.counters.errors.fetch_add(1, Ordering::Relaxed);
                            failed.push((owner.node.clone(), owner.epoch));
                            reason = Fallback::OwnerUnreachable;
                        }
                    }
                    if forwards >= 2 {
                        break;
                    }
                }
                Err(why) => reason = why,
            }
            // Wait (in all, at most `wait`) for the next map: the next scan shows a new
            // owner, a finished hand-off, or this node's own new lease.
            let until = *waiting_until.get_or_insert_with(|| Instant::now() + self.settings.wait);
            match tokio::time::timeout_at(until, map.changed()).await {
                Ok(Ok(())) => {}
                // Timed out, or the map's sender is gone (the keeper stopped).
                _ => break,
            }
        }
        self.counters.tables_fallback.fetch_add(1, Ordering::Relaxed);
        debug!(shard, day = %key, reason = reason.as_str(), "read answered from the tables");
        Ok(Route::Tables(reason))
    }

    /// A forwarded request: answered here only under exactly the epoch it expects.
    fn answer_forwarded(&self, req: &ReadCall<'_>, shard: ShardId) -> Result<Route, ApiError> {
        let expected = req.headers.get(EPOCH_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
        let held = self.held(shard);
        if let (Some(e), Some(h)) = (expected, held) {
            if e == h {
                self.counters.local.fetch_add(1, Ordering::Relaxed);
                return Ok(Route::Local);
            }
        }
        self.counters.misdirected.fetch_add(1, Ordering::Relaxed);
        let node = &self.settings.node.id;
        let holds = match held {
            Some(h) => format!("holds it at epoch {h}"),
            None => "does not hold it".into(),
        };
        let asked = match expected {
            Some(e) => format!("epoch {e}"),
            None => format!("no valid {EPOCH_HEADER} header"),
        };
        Err(ApiError::Misdirected(format!(
            "Forwarded read of shard {shard} with {asked}; this node ({node}) {holds}. A request marked {FORWARDED_HEADER} is never forwarded again"
        )))
    }

    /// One forward to `owner`, bounded by the timeout as a whole.
    async fn forward(&self, req: &ReadCall<'_>, owner: &ShardOwner, shard: ShardId) -> Forwarded {
        let _timed = crate::metrics::ForwardTimer::start();
        let url = format!("{}{}", owner.endpoint.trim_end_matches('/'), req.path);
        let mut builder = hyper::Request::get(url.as_str())
            .header(EPOCH_HEADER, owner.epoch.to_string())
            .header(FORWARDED_HEADER, self.settings.node.id.as_str());
        for &name in PASSED_ON {
            if let Some(v) = req.headers.get(name) {
                builder = builder.header(name, v.as_bytes());
            }
        }
        // The owner logs the read under the same request id (see crate::trace).
        if let Some(id) = req.request_id.as_ref().filter(|id| !id.is_empty()) {
            builder = builder.header(crate::trace::HEADER, id.as_str());
        }
        let request = match builder.body(Empty::<Bytes>::new()) {
            Ok(r) => r,
            Err(e) => {
                warn!(owner = %owner.node, endpoint = %owner.endpoint, cause = %e, "cannot forward to this endpoint");
                return Forwarded::Failed;
            }
        };
        let client = self.client.clone();
        let timeout = self.settings.timeout;
        let call = async move {
            let resp = client.request(request).await.map_err(|e| e.to_string())?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_ANSWER_BYTES).collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, String>((parts, body))
        };
        let task = self.runtime.handle().spawn(tokio::time::timeout(timeout, call));
        // If the client goes away, so does the forward.
        let _abort = AbortOnDrop(task.abort_handle());
        let answer = match task.await {
            Ok(Ok(Ok(answer))) => answer,
            Ok(Ok(Err(cause))) => {
                warn!(owner = %owner.node, shard, %url, %cause, "forwarded read failed");
                return Forwarded::Failed;
            }
            Ok(Err(_)) => {
                warn!(owner = %owner.node, shard, %url, timeout_ms = timeout.as_millis() as u64, "forwarded read timed out");
                return Forwarded::Failed;
            }
            Err(e) => {
                warn!(owner = %owner.node, shard, cause = %e, "forwarded read task failed");
                return Forwarded::Failed;
            }
        };
        let (parts, body) = answer;
        if parts.status.as_u16() == 421 {
            debug!(owner = %owner.node, shard, epoch = owner.epoch, "owner refused the forwarded read (421)");
            return Forwarded::Misdirected;
        }
        let Ok(status) = actix_web::http::StatusCode::from_u16(parts.status.as_u16()) else {
            return Forwarded::Failed;
        };
        let mut resp = HttpResponse::build(status);
        for &name in PASSED_BACK {
            if let Some(v) = parts.headers.get(name).and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok()) {
                resp.insert_header((HeaderName::from_static(name), v));
            }
        }
        let source = format!("owner; node={}", owner.node);
        if let Ok(v) = HeaderValue::from_str(&source) {
            resp.insert_header((HeaderName::from_static(SOURCE_HEADER), v));
        }
        Forwarded::Answer(resp.body(body))
    }
}

/// What one forward came back with.
enum Forwarded {
    Answer(HttpResponse),
    Misdirected,
    Failed,
}

/// The forwarder's own runtime: one thread, which only dials owners and carries their
/// answers back (a few dozen bytes each), so it stays free while the service's main thread
/// is busy. If that thread cannot be started, forwards run on the caller's runtime (the
/// service's), as before, and a warning says so.
struct ForwardRuntime {
    own: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl ForwardRuntime {
    /// Call it on a tokio runtime (the fallback is the current one).
    fn start() -> Self {
        let built = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("liftlog-forward").enable_all().build();
        match built {
            Ok(runtime) => ForwardRuntime { handle: runtime.handle().clone(), own: Some(runtime) },
            Err(e) => {
                warn!(cause = %e, "cannot start the read forwarder's own thread; forwards share the service's runtime");
                ForwardRuntime { own: None, handle: tokio::runtime::Handle::current() }
            }
        }
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }
}

impl Drop for ForwardRuntime {
    /// Dropped from async code at shutdown, where a plain drop of a runtime panics; forwards
    /// still in flight then end (their callers, the HTTP workers, are stopping too).
    fn drop(&mut self) {
        if let Some(runtime) = self.own.take() {
            runtime.shutdown_background();
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The owner to forward `shard` to, or why there is none.
fn target(map: &ShardMap, me: &str, shard: ShardId) -> Result<ShardOwner, Fallback> {
    if map.generation == 0 {
        return Err(Fallback::NoMap);
    }
    match map.owner(shard) {
        None => Err(Fallback::NoOwner),
        Some(o) if o.expired => Err(Fallback::OwnerExpired),
        Some(o) if o.node == me => Err(Fallback::NotHeld),
        Some(o) if o.endpoint.is_empty() => Err(Fallback::OwnerUnreachable),
        Some(o) => Ok(o.clone()),
    }
}

#[cfg(test)]
mod tests {
    //! Real sockets: the owner is a liftlog app (the real handlers and its own
    //! `ClusterReads`) on an actix server bound to 127.0.0.1:0, the reader is another
    //! app called in-process, and the forward between them goes over TCP.
    use std::collections::HashMap;

    use actix_web::dev::{Service, ServiceResponse};
    use actix_web::{test, web, App};
    use parking_lot::Mutex;

    use super::*;
    use crate::http::AppState;
    use crate::tables::{sled_store::SledTables, DayCountItem, SkierDayItem, Tables};

    const SHARDS: u16 = 4;
    const DAY: DayKey = DayKey { resort: 1, season: 2025, day: 1 };
    const SKIERS: &str = "/resorts/1/seasons/2025/day/1/skiers";
    const VERTICAL: &str = "/skiers/1/seasons/2025/days/1/skiers/5";

    fn shard() -> ShardId {
        DAY.partition(SHARDS)
    }

    /// Fences set by the test, as a keeper would hold them.
    #[derive(Default)]
    struct Fixed(Mutex<HashMap<ShardId, u64>>);

    impl LocalFences for Fixed {
        fn epoch(&self, shard: ShardId) -> Option<u64> {
            self.0.lock().get(&shard).copied()
        }
    }

    fn map(owner: Option<ShardOwner>) -> Arc<ShardMap> {
        let mut shards = vec![None; SHARDS as usize];
        shards[shard() as usize] = owner;
        Arc::new(ShardMap { me: "a".into(), shards, nodes: Vec::new(), generation: 1 })
    }

    fn owned_by(node: &str, endpoint: &str, epoch: u64) -> Option<ShardOwner> {
        Some(ShardOwner { node: node.into(), endpoint: endpoint.into(), epoch, expired: false })
    }

    /// A node's state over its own tables, which hold `skiers` unique skiers for the day and
    /// a vertical of `skiers * 100` for skier 5, so that every answer shows who gave it.
    async fn node(dir: &tempfile::TempDir, name: &str, skiers: u64, cluster: Arc<ClusterReads>) -> web::Data<AppState> {
        let tables = Arc::new(SledTables::open(&dir.path().join(name)).unwrap());
        tables.put_day_counts(&[DayCountItem { key: DAY, unique_skiers: skiers, rides: skiers, version: 1 }]).await.unwrap();
        tables
            .put_skier_days(&[SkierDayItem {
                skier: 5,
                key: DAY,
                vertical: skiers * 100,
                ids: vec![1],
                version: 1,
                stamps: vec![crate::domain::Stamp::UNKNOWN],
            }])
            .await
            .unwrap();
        web::Data::new(AppState {
            catalog: Arc::new(crate::catalog::Catalog::default()),
            limits: crate::domain::Limits::default(),
            tables,
            publisher: None,
            node: None,
            cluster: Some(cluster),
            roles: "read".into(),
            requests: Arc::new(crate::http::stats::RequestStats::new("")),
            live: Arc::new(crate::http::stream::Hub::new(16)),
            max_body_bytes: 16 * 1024,
            admin_token: None,
            ready: true.into(),
            started: std::time::Instant::now(),
        })
    }

    fn reads(id: &str, map: watch::Receiver<Arc<ShardMap>>, fences: Arc<Fixed>, wait: Duration, timeout: Duration) -> Arc<ClusterReads> {
        let settings = ReadSettings { node: NodeInfo { id: id.into(), endpoint: String::new() }, shards: SHARDS, wait, timeout };
        Arc::new(ClusterReads::with_fences(settings, map, Some(fences)))
    }

    /// The owner "b": its app on a real listener; returns its endpoint and its fences.
    struct Owner {
        endpoint: String,
        fences: Arc<Fixed>,
        reads: Arc<ClusterReads>,
        _map: watch::Sender<Arc<ShardMap>>,
        server: actix_web::dev::ServerHandle,
    }

    async fn owner(dir: &tempfile::TempDir, epoch: u64) -> Owner {
        let fences = Arc::new(Fixed::default());
        fences.0.lock().insert(shard(), epoch);
        let (tx, rx) = watch::channel(map(None));
        let reads = reads("b", rx, fences.clone(), Duration::from_millis(100), Duration::from_secs(1));
        let state = node(dir, "b", 7, reads.clone()).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server =
            actix_web::HttpServer::new(move || App::new().app_data(state.clone()).configure(|c| crate::http::configure(c, "", false)))
                .workers(1)
                .disable_signals()
                .listen(listener)
                .unwrap()
                .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Owner { endpoint, fences, reads, _map: tx, server: handle }
    }

    async fn reader(
        dir: &tempfile::TempDir,
        name: &str,
        first: Arc<ShardMap>,
        wait: Duration,
        timeout: Duration,
    ) -> (
        impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
        Arc<ClusterReads>,
        Arc<Fixed>,
        watch::Sender<Arc<ShardMap>>,
    ) {
        let fences = Arc::new(Fixed::default());
        let (tx, rx) = watch::channel(first);
        let reads = reads("a", rx, fences.clone(), wait, timeout);
        let state = node(dir, name, 3, reads.clone()).await;
        let app = test::init_service(App::new().app_data(state).configure(|c| crate::http::configure(c, "", true))).await;
        (app, reads, fences, tx)
    }

    struct Answer {
        status: u16,
        source: String,
        etag: Option<String>,
        body: String,
    }

    async fn get(
        app: &impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error>,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = test::TestRequest::get().uri(uri);
        for &(k, v) in headers {
            req = req.insert_header((k, v));
        }
        let resp = test::call_service(app, req.to_request()).await;
        let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_string());
        let (status, source, etag) = (resp.status().as_u16(), header(SOURCE_HEADER).unwrap_or_default(), header("etag"));
        let cache = header("cache-control");
        let day_read = uri.starts_with("/resorts/") || uri.starts_with("/skiers/");
        if status == 200 && day_read {
            assert_eq!(cache.as_deref(), Some("public, max-age=1"), "caching headers pass through");
            assert_eq!(header("content-type").as_deref(), Some("application/json"));
        }
        let body = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
        Answer { status, source, etag, body }
    }

    const LONG: Duration = Duration::from_secs(10);

    #[actix_web::test]
    async fn reads_are_local_under_a_fence_forwarded_to_the_owner_and_refused_without_its_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let b = owner(&dir, 5).await;
        let (a, a_reads, a_fences, _tx) = reader(&dir, "a1", map(owned_by("b", &b.endpoint, 5)), LONG, LONG).await;

        // Forwarded: b's numbers, b's caching headers, and a 304 through the forwarder.
        let r = get(&a, SKIERS, &[]).await;
        assert_eq!((r.status, r.source.as_str()), (200, "owner; node=b"), "{}", r.body);
        assert!(r.body.contains(r#""numSkiers":7"#), "{}", r.body);
        let etag = r.etag.expect("an ETag from the owner");
        let r = get(&a, SKIERS, &[("If-None-Match", &etag)]).await;
        assert_eq!((r.status, r.source.as_str(), r.etag.as_deref()), (304, "owner; node=b", Some(etag.as_str())));
        let r = get(&a, VERTICAL, &[]).await;
        assert_eq!((r.status, r.source.as_str(), r.body.as_str()), (200, "owner; node=b", "700"));
        let r = get(&a, "/skiers/1/seasons/2025/days/1/skiers/6", &[]).await;
        assert_eq!((r.status, r.source.as_str()), (404, "owner; node=b"), "the owner's 404 passes through: {}", r.body);
        assert_eq!(a_reads.stats(), ForwardStats { forwarded: 4, ..ForwardStats::default() });
        assert_eq!(b.reads.stats(), ForwardStats { local: 4, ..ForwardStats::default() });

        // Bad input is answered by the node that got it, never forwarded.
        for bad in
            ["/resorts/1/seasons/2025/day/0/skiers", "/resorts/99/seasons/2025/day/1/skiers", "/skiers/1/seasons/2025/days/1/skiers/x"]
        {
            let r = get(&a, bad, &[]).await;
            assert!((400..500).contains(&r.status) && r.source.is_empty(), "{bad}: {} {}", r.status, r.body);
        }
        assert_eq!(b.reads.stats().local, 4, "nothing reached the owner");

        // Holding the fence itself, a answers from its own state and says so.
        a_fences.0.lock().insert(shard(), 6);
        let r = get(&a, SKIERS, &[]).await;
        assert_eq!((r.status, r.source.as_str()), (200, "local"));
        assert!(r.body.contains(r#""numSkiers":3"#), "{}", r.body);
        let r = get(&a, "/skiers/1/seasons/2025/days/1/skiers/6", &[]).await;
        assert_eq!((r.status, r.source.as_str()), (404, "local"), "a local 404 names its source too");

        // A marked request is served locally only under exactly the named epoch, and is
        // never forwarded (a holds 6; b, which the map names, is not asked).
        let marked = |epoch: &'static str| [(FORWARDED_HEADER, "x"), (EPOCH_HEADER, epoch)];
        let r = get(&a, SKIERS, &marked("6")).await;
        assert_eq!((r.status, r.source.as_str()), (200, "local"));
        for wrong in [&marked("5")[..], &marked("junk")[..], &[(FORWARDED_HEADER, "x")][..]] {
            let r = get(&a, SKIERS, wrong).await;
            assert_eq!(r.status, 421, "{wrong:?}: {}", r.body);
            assert!(r.body.contains("never forwarded again") && r.body.contains("holds it at epoch 6"), "{}", r.body);
        }
        a_fences.0.lock().clear();
        let r = get(&a, SKIERS, &marked("5")).await;
        assert!(r.status == 421 && r.body.contains("does not hold it"), "{}", r.body);
        assert_eq!(b.reads.stats().local, 4, "marked requests are not forwarded");
        let s = a_reads.stats();
        assert_eq!((s.local, s.misdirected, s.forwarded), (3, 4, 4), "{s:?}");

        // The admin view and the metrics show it.
        let r = get(&a, "/admin/cluster", &[]).await;
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["node"]["id"], "a");
        assert!(v["keeper"].is_null(), "a test node has no keeper");
        assert_eq!(v["map"]["shards"][shard() as usize]["node"], "b");
        assert_eq!(v["forwarding"]["forwarded"], 4);
        let r = get(&a, "/metrics", &[]).await;
        assert!(r.body.contains("liftlog_cluster_reads_forwarded_total 4"), "{}", r.body);
        b.server.stop(false).await;
    }

    /// Waits until `ok` holds, bounded: the owner's counters move on its own threads.
    async fn until(what: &str, ok: impl Fn() -> bool) {
        let started = Instant::now();
        while !ok() {
            assert!(started.elapsed() < LONG, "{what} within {LONG:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[actix_web::test]
    async fn a_421_waits_for_the_next_map_and_retries_once_then_the_tables_answer() {
        let dir = tempfile::tempdir().unwrap();
        let b = owner(&dir, 5).await;
        // a's map is behind: it still shows epoch 4.
        let (a, a_reads, _, tx) = reader(&dir, "a2", map(owned_by("b", &b.endpoint, 4)), LONG, LONG).await;
        let next_map = async {
            until("b refused once", || b.reads.stats().misdirected == 1).await;
            tx.send_replace(map(owned_by("b", &b.endpoint, 5)));
        };
        let (r, ()) = tokio::join!(get(&a, SKIERS, &[]), next_map);
        assert_eq!((r.status, r.source.as_str()), (200, "owner; node=b"), "{}", r.body);
        assert!(r.body.contains(r#""numSkiers":7"#));
        let s = a_reads.stats();
        assert_eq!((s.forwarded, s.retried, s.tables_fallback), (1, 1, 0), "{s:?}");

        // The next map still names an epoch b does not hold (b moved on to 6): one retry,
        // then the tables, saying why.
        b.fences.0.lock().insert(shard(), 6);
        let same_map = async {
            until("b refused again", || b.reads.stats().misdirected == 2).await;
            tx.send_replace(map(owned_by("b", &b.endpoint, 5)));
        };
        let (r, ()) = tokio::join!(get(&a, SKIERS, &[]), same_map);
        assert_eq!((r.status, r.source.as_str()), (200, "tables; reason=misdirected"), "{}", r.body);
        assert!(r.body.contains(r#""numSkiers":3"#), "a's tables: {}", r.body);
        assert_eq!(b.reads.stats().misdirected, 3, "exactly one retry");
        let s = a_reads.stats();
        assert_eq!((s.retried, s.tables_fallback, s.errors), (2, 1, 0), "{s:?}");
        b.server.stop(false).await;
    }

    #[actix_web::test]
    async fn without_a_live_owner_a_read_waits_for_one_at_most_the_wait_then_the_tables_answer() {
        let dir = tempfile::tempdir().unwrap();
        let b = owner(&dir, 5).await;
        let wait = Duration::from_millis(300);
        let (a, a_reads, _, tx) = reader(&dir, "a3", map(None), wait, LONG).await;
        let started = Instant::now();
        let r = get(&a, SKIERS, &[]).await;
        assert_eq!((r.status, r.source.as_str()), (200, "tables; reason=no-owner"));
        assert!(started.elapsed() >= wait, "waited {:?}", started.elapsed());
        tx.send_replace(Arc::new(ShardMap { generation: 0, ..(*map(None)).clone() }));
        assert_eq!(get(&a, SKIERS, &[]).await.source, "tables; reason=no-map");
        tx.send_replace(map(Some(ShardOwner { expired: true, ..owned_by("b", &b.endpoint, 5).unwrap() })));
        assert_eq!(get(&a, VERTICAL, &[]).await.source, "tables; reason=owner-expired");
        tx.send_replace(map(owned_by("a", "http://a", 5)));
        let r = get(&a, VERTICAL, &[]).await;
        assert_eq!((r.source.as_str(), r.body.as_str()), ("tables; reason=not-held", "300"));
        assert_eq!(a_reads.stats().tables_fallback, 4);

        // An owner that shows up while the read waits answers it. (join! polls the read
        // first, so it is waiting on the map when the new one is sent.)
        tx.send_replace(map(None));
        let (a2, _, _, tx2) = reader(&dir, "a4", map(None), LONG, LONG).await;
        let started = Instant::now();
        let (r, ()) = tokio::join!(get(&a2, SKIERS, &[]), async {
            tx2.send_replace(map(owned_by("b", &b.endpoint, 5)));
        });
        assert_eq!((r.status, r.source.as_str()), (200, "owner; node=b"));
        assert!(started.elapsed() < LONG);
        b.server.stop(false).await;
    }

    #[actix_web::test]
    async fn a_dead_owner_falls_back_to_the_tables_within_wait_plus_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (wait, timeout) = (Duration::from_millis(400), Duration::from_millis(600));
        // Slack for a loaded machine; the bound itself is wait + timeout.
        let slack = Duration::from_millis(500);

        // A closed port: refused at once, then the map is waited for, then the tables.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let (a, a_reads, _, _tx) = reader(&dir, "a5", map(owned_by("c", &closed, 9)), wait, timeout).await;
        let started = Instant::now();
        let r = get(&a, SKIERS, &[]).await;
        let took = started.elapsed();
        assert_eq!((r.status, r.source.as_str()), (200, "tables; reason=owner-unreachable"), "{}", r.body);
        assert!(r.body.contains(r#""numSkiers":3"#), "{}", r.body);
        assert!(took >= wait && took <= wait + timeout + slack, "took {took:?}");
        let s = a_reads.stats();
        assert_eq!((s.errors, s.tables_fallback, s.forwarded), (1, 1, 0), "one attempt at a dead owner, not two: {s:?}");

        // An owner that accepts the connection and never answers: the timeout bounds it.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_url = format!("http://{}", silent.local_addr().unwrap());
        let (a, _, _, _tx) = reader(&dir, "a6", map(owned_by("d", &silent_url, 9)), wait, timeout).await;
        let started = Instant::now();
        let r = get(&a, VERTICAL, &[]).await;
        let took = started.elapsed();
        assert_eq!((r.status, r.source.as_str(), r.body.as_str()), (200, "tables; reason=owner-unreachable", "300"));
        assert!(took >= timeout && took <= wait + timeout + slack, "took {took:?}");
        drop(silent);
    }
}
