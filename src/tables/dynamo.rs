//! The production table store: the schema of [`super`] on DynamoDB (or DynamoDB Local).
//!
//! | table | key | attributes |
//! |---|---|---|
//! | `{prefix}SkierLiftRides` | PK `SkierID` (N), SK `SK` (S) = `SeasonID#DayID#Time#EventID`, event id as 16 lowercase hex digits | `ResortID`, `SeasonID`, `DayID`, `LiftID`, `Time`, `Vertical` (N), `EventID` (S) |
//! | `{prefix}LiftRideCounts` | PK `ResortSeasonDay` (S) = `ResortID#SeasonID#DayID` ([`DayKey`]'s `Display`) | `UniqueSkiers`, `Rides`, `Version` (N) |
//! | `{prefix}SkierDays` | PK `ResortSeasonDay` (S), SK `SkierID` (N) | `Vertical`, `Rides`, `Version` (N); `Ids` (B): the ride ids, u64 little-endian, 8 bytes each, absent when there are none; `Stamps` (B): each ride's `Time << 16 \| LiftID`, u32 little-endian, in the order of `Ids`, absent on items written before they were kept |
//! | index `BySkier` on `SkierDays` | PK `SkierID` (N), SK `ResortSeasonDay` (S) | projection INCLUDE `Vertical`, `Rides`, `Version` |
//! | `{prefix}Seasons` | PK `ResortID` (N), SK `SeasonID` (N) | none |
//!
//! Numbers in string keys are not zero-padded (as [`DayKey`]'s `Display` writes them), so
//! string sort keys order lexicographically; no reader depends on that order. An item is
//! at most 400 KB, which would bound `Ids` at about 50 000 rides per skier-day; the
//! aggregator stops at [`crate::domain::MAX_RIDES_PER_SKIER_DAY`] (16 KB of ids, 8 KB of stamps) first.
//! `Ids` are written sorted since the aggregator keeps them so; readers accept any order.
//!
//! All tables are PAY_PER_REQUEST. Reads:
//! - `get_*`: GetItem with `ConsistentRead`.
//! - `query_day`: strongly consistent Query on `SkierDays` by partition (paginated), so a
//!   reloaded aggregate never misses ids.
//! - `query_skier_resort`: Query on `BySkier` with `begins_with(ResortSeasonDay, "{resort}#")`
//!   (the `#` keeps resort 1 from matching resort 10); eventually consistent, and the items
//!   come back with empty `ids` because the index does not project them.
//! - `scan_*`: start-up only; `SkierDays` is scanned in [`SCAN_SEGMENTS`] parallel segments
//!   projecting only `SkierID`, `ResortSeasonDay` and `Vertical`.
//!
//! Writes:
//! - `put_skier_days` / `put_day_counts`: one conditional PutItem per item
//!   (`attribute_not_exists(Version) OR Version < :v`; BatchWriteItem cannot carry
//!   conditions). A failed condition counts as `stale`. Items of one call run concurrently;
//!   two items of the same key in one call race, and the higher version still wins.
//! - `put_rides`: BatchWriteItem, chunks of 25 run concurrently, duplicates (same skier and
//!   sort key) removed first since DynamoDB rejects a batch that names a key twice;
//!   unprocessed items are retried with backoff.
//! - `put_seasons`: plain PutItem. `sync`: a no-op, an acknowledged write is durable.
//!
//! Every write holds a permit of one [`Semaphore`] of `max_concurrency` shared by all
//! clones of a [`DynamoTables`]: the store's connection limit. Reads (GetItem, Query,
//! Scan) take permits of a second semaphore of the same size, so that a large flush never
//! makes a GET — or the load of a day whose first ride just arrived, which holds up the
//! consumer — wait behind it (measured: 5.4 s of lag when they shared one queue). A request keeps its permit through its retries (and a batch through its
//! unprocessed-item rounds), so a retry never queues behind the rest of a large write.
//! Multi-item writes return at the first item that fails after its retries, dropping the
//! others (some items may be written by then; the versions make the flusher's retry
//! safe). An item DynamoDB refuses for good (`ValidationException`, e.g. larger than
//! 400 KB) fails no call: it is reported in [`WriteReport::refused`] and the others are
//! written, so one item cannot stop every flush.
//!
//! Failures: the SDK's own retries are off; every call goes through one retry loop
//! (throttling, 5xx, timeouts, connection errors; exponential backoff with full jitter,
//! [`BACKOFF_BASE`]..[`BACKOFF_CAP`], at most [`MAX_ATTEMPTS`] attempts and no new attempt
//! after [`RETRY_BUDGET`]). With a connect timeout of 2 s and an attempt timeout of 5 s, a
//! dead endpoint fails a call with [`TableError::Unavailable`] in well under 30 s, and a
//! multi-item write fails as soon as its first item does. Items that do not decode give
//! [`TableError::Corrupt`].

use crate::cluster::Fence;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::operation::scan::builders::ScanFluentBuilder;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType, Projection,
    ProjectionType, PutRequest, ScalarAttributeType, TableStatus, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rand::Rng;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::{DayCountItem, SkierDayItem, Tables, WriteReport};
use crate::domain::{DayKey, RideEvent, Stamp};
use crate::error::TableError;

/// Connect timeout of one HTTP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of one attempt of one request (connect, send, response).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts of one request (retryable errors) or of one batch's unprocessed items.
pub const MAX_ATTEMPTS: u32 = 8;
/// First backoff ceiling; doubles per attempt up to [`BACKOFF_CAP`]. Full jitter.
pub const BACKOFF_BASE: Duration = Duration::from_millis(20);
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// No retry starts once a request has been trying for this long.
pub const RETRY_BUDGET: Duration = Duration::from_secs(10);
/// How long `create` waits for tables and index to become ACTIVE.
pub const ACTIVE_WAIT: Duration = Duration::from_secs(120);
/// Parallel segments of the start-up scan of `SkierDays`.
pub const SCAN_SEGMENTS: i32 = 4;
/// Items per BatchWriteItem (DynamoDB's limit).
const BATCH_SIZE: usize = 25;

/// Every table, index and attribute name liftlog uses in DynamoDB, the data tables' and the
/// cluster's lease table's, in one place: the schema as it is on the wire (the fence attribute
/// every fenced item carries is `cluster::fence::EPOCH_ATTR`).
pub(crate) mod names {
    pub const RIDES: &str = "SkierLiftRides";
    pub const COUNTS: &str = "LiftRideCounts";
    pub const SKIER_DAYS: &str = "SkierDays";
    pub const SEASONS: &str = "Seasons";
    pub const BY_SKIER: &str = "BySkier";

    pub const A_SKIER: &str = "SkierID";
    pub const A_SK: &str = "SK";
    pub const A_RESORT: &str = "ResortID";
    pub const A_SEASON: &str = "SeasonID";
    pub const A_DAY: &str = "DayID";
    pub const A_LIFT: &str = "LiftID";
    pub const A_TIME: &str = "Time";
    pub const A_VERTICAL: &str = "Vertical";
    pub const A_EVENT: &str = "EventID";
    pub const A_RSD: &str = "ResortSeasonDay";
    pub const A_UNIQUE: &str = "UniqueSkiers";
    pub const A_RIDES: &str = "Rides";
    pub const A_VERSION: &str = "Version";
    pub const A_IDS: &str = "Ids";
    pub const A_STAMPS: &str = "Stamps";

    /// The lease table of the cluster (`cluster::lease`), without the prefix.
    pub mod lease {
        pub const TABLE: &str = "ShardLeases";
        pub const A_KEY: &str = "LeaseKey";
        pub const A_OWNER: &str = "Owner";
        pub const A_ENDPOINT: &str = "Endpoint";
        pub const A_EPOCH: &str = "Epoch";
        pub const A_COUNTER: &str = "Counter";
        pub const A_NODE: &str = "NodeId";
        pub const A_SHARDS: &str = "Shards";
        /// The key of the item that records the shard count.
        pub const META_KEY: &str = "meta";
    }
}
use names::*;

type Item = HashMap<String, AttributeValue>;

/// Where and how to reach DynamoDB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynamoConfig {
    /// `Some(url)` for DynamoDB Local or another endpoint (then, without
    /// `AWS_ACCESS_KEY_ID` in the environment, static dummy credentials are used);
    /// `None` for AWS with the default credential chain.
    pub endpoint: Option<String>,
    pub region: String,
    /// Prepended to every table name, e.g. `prod_`.
    pub table_prefix: String,
    /// Requests in flight at once, across all clones of the store.
    pub max_concurrency: usize,
}

impl Default for DynamoConfig {
    fn default() -> Self {
        DynamoConfig { endpoint: None, region: "us-east-1".into(), table_prefix: String::new(), max_concurrency: 16 }
    }
}

/// The DynamoDB table store. Cheap to clone; clones share the client and the permits.
#[derive(Clone)]
pub struct DynamoTables {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    permits: Semaphore,
    /// Permits for reads, apart from the writes' (see the module doc).
    read_permits: Semaphore,
    rides: String,
    counts: String,
    skier_days: String,
    seasons: String,
}

impl std::fmt::Debug for DynamoTables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoTables")
            .field("skier_days", &self.inner.skier_days)
            .field("available_permits", &self.inner.permits.available_permits())
            .finish_non_exhaustive()
    }
}

// ------------------------------------------------------------------ helpers ---

fn config_error(detail: impl std::fmt::Display) -> TableError {
    TableError::Unavailable(format!("dynamodb: {detail}"))
}

fn corrupt(table: &'static str, detail: impl Into<String>) -> TableError {
    TableError::Corrupt { table, detail: detail.into() }
}

/// A number attribute (also used by the lease table, `cluster::lease`).
pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A string attribute (also used by the lease table, `cluster::lease`).
pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// Parses a `ResortID#SeasonID#DayID` key; `None` unless it is exactly what
/// [`DayKey`]'s `Display` writes.
pub fn parse_day_key(text: &str) -> Option<DayKey> {
    let mut parts = text.split('#');
    let key = DayKey { resort: parts.next()?.parse().ok()?, season: parts.next()?.parse().ok()?, day: parts.next()?.parse().ok()? };
    (parts.next().is_none() && key.to_string() == text).then_some(key)
}

fn get_n<T: FromStr>(table: &'static str, item: &Item, name: &str) -> Result<T, TableError> {
    match item.get(name) {
        Some(AttributeValue::N(v)) => v.parse().map_err(|_| corrupt(table, format!("{name} = {v:?} is out of range"))),
        Some(other) => Err(corrupt(table, format!("{name} is not a number: {other:?}"))),
        None => Err(corrupt(table, format!("{name} missing"))),
    }
}

fn get_s<'a>(table: &'static str, item: &'a Item, name: &str) -> Result<&'a str, TableError> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Ok(v),
        Some(other) => Err(corrupt(table, format!("{name} is not a string: {other:?}"))),
        None => Err(corrupt(table, format!("{name} missing"))),
    }
}

fn get_day_key(table: &'static str, item: &Item) -> Result<DayKey, TableError> {
    let text = get_s(table, item, A_RSD)?;
    parse_day_key(text).ok_or_else(|| corrupt(table, format!("{A_RSD} = {text:?} is not ResortID#SeasonID#DayID")))
}

fn pack_ids(ids: &[u64]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_le_bytes()).collect()
}

fn pack_stamps(stamps: &[Stamp]) -> Vec<u8> {
    stamps.iter().flat_map(|s| s.0.to_le_bytes()).collect()
}

/// A binary attribute of fixed-width little-endian values (`Ids`, `Stamps`): empty when
/// absent, corrupt when not binary or not a whole number of `N`-byte values.
fn unpack_le<const N: usize, T>(table: &'static str, item: &Item, name: &str, value: impl Fn([u8; N]) -> T) -> Result<Vec<T>, TableError> {
    match item.get(name) {
        None => Ok(Vec::new()),
        Some(AttributeValue::B(blob)) => {
            let bytes = blob.as_ref();
            if bytes.len() % N != 0 {
                return Err(corrupt(table, format!("{name} has {} bytes, not a multiple of {N}", bytes.len())));
            }
            Ok(bytes.chunks_exact(N).map(|c| value(c.try_into().expect("chunks_exact gives N bytes"))).collect())
        }
        Some(other) => Err(corrupt(table, format!("{name} is not binary: {other:?}"))),
    }
}

fn skier_day_to_item(d: &SkierDayItem) -> Item {
    let mut item = Item::with_capacity(6);
    item.insert(A_RSD.into(), s(d.key.to_string()));
    item.insert(A_SKIER.into(), n(d.skier));
    item.insert(A_VERTICAL.into(), n(d.vertical));
    item.insert(A_RIDES.into(), n(d.ids.len()));
    item.insert(A_VERSION.into(), n(d.version));
    if !d.ids.is_empty() {
        item.insert(A_IDS.into(), AttributeValue::B(Blob::new(pack_ids(&d.ids))));
    }
    if !d.stamps.is_empty() {
        item.insert(A_STAMPS.into(), AttributeValue::B(Blob::new(pack_stamps(&d.stamps))));
    }
    item
}

/// A `SkierDays` item, from the base table or (without `Ids`) from the index.
fn skier_day_from_item(item: &Item) -> Result<SkierDayItem, TableError> {
    Ok(SkierDayItem {
        skier: get_n(SKIER_DAYS, item, A_SKIER)?,
        key: get_day_key(SKIER_DAYS, item)?,
        vertical: get_n(SKIER_DAYS, item, A_VERTICAL)?,
        ids: unpack_le(SKIER_DAYS, item, A_IDS, u64::from_le_bytes)?,
        version: get_n(SKIER_DAYS, item, A_VERSION)?,
        // Absent on items written before stamps were kept (and on the index's items).
        stamps: unpack_le(SKIER_DAYS, item, A_STAMPS, |b| Stamp(u32::from_le_bytes(b)))?,
    }
    .padded())
}

fn day_count_to_item(c: &DayCountItem) -> Item {
    let mut item = Item::with_capacity(4);
    item.insert(A_RSD.into(), s(c.key.to_string()));
    item.insert(A_UNIQUE.into(), n(c.unique_skiers));
    item.insert(A_RIDES.into(), n(c.rides));
    item.insert(A_VERSION.into(), n(c.version));
    item
}

fn day_count_from_item(item: &Item) -> Result<DayCountItem, TableError> {
    Ok(DayCountItem {
        key: get_day_key(COUNTS, item)?,
        unique_skiers: get_n(COUNTS, item, A_UNIQUE)?,
        rides: get_n(COUNTS, item, A_RIDES)?,
        version: get_n(COUNTS, item, A_VERSION)?,
    })
}

/// The sort key of a ride: `SeasonID#DayID#Time#EventID`.
pub fn ride_sort_key(r: &RideEvent) -> String {
    format!("{}#{}#{}#{:016x}", r.season, r.day, r.time, r.id)
}

fn ride_to_item(r: &RideEvent) -> Item {
    let mut item = Item::with_capacity(9);
    item.insert(A_SKIER.into(), n(r.skier));
    item.insert(A_SK.into(), s(ride_sort_key(r)));
    item.insert(A_RESORT.into(), n(r.resort));
    item.insert(A_SEASON.into(), n(r.season));
    item.insert(A_DAY.into(), n(r.day));
    item.insert(A_LIFT.into(), n(r.lift));
    item.insert(A_TIME.into(), n(r.time));
    item.insert(A_VERTICAL.into(), n(r.vertical));
    item.insert(A_EVENT.into(), s(format!("{:016x}", r.id)));
    item
}

/// Throttling, server errors, timeouts and connection failures are worth another attempt;
/// validation errors, missing tables and failed conditions are not.
fn retryable<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    match e {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(d) => !d.is_user(),
        SdkError::ServiceError(ctx) => {
            matches!(
                e.code(),
                Some(
                    "ThrottlingException"
                        | "ProvisionedThroughputExceededException"
                        | "RequestLimitExceeded"
                        | "LimitExceededException"
                        | "InternalServerError"
                        | "ServiceUnavailable"
                )
            ) || ctx.raw().status().is_server_error()
        }
        _ => false,
    }
}

/// The outcome of one conditional put.
enum Put {
    Written,
    Stale,
    Refused(String),
}

/// An error that belongs to the item, so that every retry fails the same way and the
/// other items of the call are unaffected: a `ValidationException` on a PutItem (the item
/// is larger than 400 KB, or an attribute is malformed) or an item collection past its
/// limit. Unlike a missing table or bad credentials, which fail every item alike.
fn refused_item<E: ProvideErrorMetadata>(e: &SdkError<E>) -> bool {
    matches!(e, SdkError::ServiceError(_)) && matches!(e.code(), Some("ValidationException" | "ItemCollectionSizeLimitExceededException"))
}

/// Runs the futures concurrently and returns their outputs (in completion order), or the
/// first error as soon as it happens, dropping the rest. (`try_join_all` would hold an
/// error back until every earlier future finished.)
async fn all_ok<T, F: Future<Output = Result<T, TableError>>>(futures: impl IntoIterator<Item = F>) -> Result<Vec<T>, TableError> {
    let mut pending: FuturesUnordered<F> = futures.into_iter().collect();
    let mut out = Vec::with_capacity(pending.len());
    while let Some(result) = pending.next().await {
        out.push(result?);
    }
    Ok(out)
}

/// Full jitter: uniform in `0..=min(cap, base * 2^(attempt-1))`.
fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(BACKOFF_CAP);
    let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

fn key_element(name: &str, key_type: KeyType) -> Result<KeySchemaElement, TableError> {
    KeySchemaElement::builder().attribute_name(name).key_type(key_type).build().map_err(config_error)
}

fn attribute(name: &str, ty: ScalarAttributeType) -> Result<AttributeDefinition, TableError> {
    AttributeDefinition::builder().attribute_name(name).attribute_type(ty).build().map_err(config_error)
}

struct TableSpec {
    name: String,
    label: &'static str,
    keys: Vec<KeySchemaElement>,
    attributes: Vec<AttributeDefinition>,
    index: Option<GlobalSecondaryIndex>,
}

// ---------------------------------------------------------------- the store ---

impl DynamoTables {
    /// Builds the client. Makes no request: an unreachable endpoint shows up on the first
    /// call (usually [`Tables::create`]).
    pub async fn connect(cfg: DynamoConfig) -> Result<Self, TableError> {
        if cfg.max_concurrency == 0 {
            return Err(config_error("max_concurrency must be at least 1"));
        }
        if cfg.region.is_empty() {
            return Err(config_error("region must not be empty"));
        }
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .region(aws_config::Region::new(cfg.region.clone()))
            .timeout_config(timeouts)
            // One retry loop, ours (see the module doc), instead of two nested ones.
            .retry_config(aws_config::retry::RetryConfig::disabled());
        if let Some(endpoint) = &cfg.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                // DynamoDB Local accepts any key made of letters and digits.
                loader =
                    loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new("liftlog", "liftlog", None, None, "static"));
            }
        }
        let sdk = loader.load().await;
        let p = &cfg.table_prefix;
        info!(endpoint = cfg.endpoint.as_deref().unwrap_or("aws"), region = %cfg.region, prefix = %p,
            max_concurrency = cfg.max_concurrency, "dynamodb table store configured");
        Ok(DynamoTables {
            inner: Arc::new(Inner {
                client: Client::new(&sdk),
                permits: Semaphore::new(cfg.max_concurrency.min(Semaphore::MAX_PERMITS)),
                read_permits: Semaphore::new(cfg.max_concurrency.min(Semaphore::MAX_PERMITS)),
                rides: format!("{p}{RIDES}"),
                counts: format!("{p}{COUNTS}"),
                skier_days: format!("{p}{SKIER_DAYS}"),
                seasons: format!("{p}{SEASONS}"),
            }),
        })
    }

    /// The SDK client, for admin tools and tests.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The four table names with the prefix: rides, counts, skier-days, seasons.
    pub fn table_names(&self) -> [&str; 4] {
        let i = &self.inner;
        [&i.rides, &i.counts, &i.skier_days, &i.seasons]
    }

    /// One request with retries, holding one permit throughout (see [`Self::retrying`]).
    async fn call<T, E, F, Fut>(&self, table: &'static str, op: &'static str, attempt: F) -> Result<T, TableError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let _permit = self.permit().await?;
        self.retrying(table, op, attempt).await
    }

    async fn permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, TableError> {
        self.inner.permits.acquire().await.map_err(|_| TableError::Unavailable("dynamodb: the store is closed".into()))
    }

    /// Like [`Self::call`] for a read: its permit comes from the reads' own semaphore.
    async fn read<T, E, F, Fut>(&self, table: &'static str, op: &'static str, attempt: F) -> Result<T, TableError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let _permit =
            self.inner.read_permits.acquire().await.map_err(|_| TableError::Unavailable("dynamodb: the store is closed".into()))?;
        self.retrying(table, op, attempt).await
    }

    /// One request with retries; the caller holds a permit. `attempt` builds and sends the
    /// request (and may turn an expected service error, such as a failed condition, into
    /// an `Ok`).
    ///
    /// The permit stays held during backoff: a request that is retrying keeps its place
    /// instead of queueing behind every other item of a large write, so a dead endpoint
    /// fails the first items within [`RETRY_BUDGET`] (plus one attempt) and with them the
    /// whole call; under throttling it also lowers the request rate, as it should.
    async fn retrying<T, E, F, Fut>(&self, table: &'static str, op: &'static str, mut attempt: F) -> Result<T, TableError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let mut n = 1;
        loop {
            let e = match attempt().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            if n < MAX_ATTEMPTS && retryable(&e) && started.elapsed() < RETRY_BUDGET {
                let delay = backoff(n);
                warn!(table, op, attempt = n, delay_ms = delay.as_millis() as u64, cause = %DisplayErrorContext(&e),
                    "dynamodb retry");
                tokio::time::sleep(delay).await;
                n += 1;
                continue;
            }
            let gave_up = if retryable(&e) { format!(" (gave up after {n} attempts)") } else { String::new() };
            warn!(table, op, attempts = n, cause = %DisplayErrorContext(&e), "dynamodb request failed");
            return Err(TableError::Unavailable(format!("dynamodb {op} on {table}: {}{gave_up}", DisplayErrorContext(&e))));
        }
    }

    /// Conditional put: written, stale (the stored version is as new), or refused for good.
    /// With `epoch` (cluster mode) the item carries it and the condition compares
    /// `(epoch, version)`, epoch first (ADR 005, [`Fence::versioned_condition`]): a stale
    /// owner's write fails once the new owner wrote the item.
    async fn put_versioned(
        &self,
        table: &'static str,
        name: &str,
        mut item: Item,
        version: u64,
        epoch: Option<u64>,
    ) -> Result<Put, TableError> {
        if let Some(epoch) = epoch {
            let (attr, value) = Fence { shard: 0, epoch }.item_attribute();
            item.insert(attr.to_string(), value);
        }
        self.call(table, "PutItem", || {
            let mut request = self
                .inner
                .client
                .put_item()
                .table_name(name)
                .set_item(Some(item.clone()))
                .expression_attribute_names("#v", A_VERSION)
                .expression_attribute_values(":v", n(version));
            request = match epoch {
                None => request.condition_expression("attribute_not_exists(#v) OR #v < :v"),
                Some(epoch) => {
                    let (name, attr) = Fence::name_binding();
                    let (value, v) = Fence { shard: 0, epoch }.value_binding();
                    request
                        .condition_expression(Fence::versioned_condition("#v", ":v"))
                        .expression_attribute_names(name, attr)
                        .expression_attribute_values(value, v)
                }
            };
            async move {
                match request.send().await {
                    Ok(_) => Ok(Put::Written),
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(Put::Stale),
                    Err(e) if refused_item(&e) => {
                        warn!(table, cause = %DisplayErrorContext(&e), "dynamodb refused an item for good");
                        Ok(Put::Refused(format!("dynamodb PutItem on {table}: {}", e.meta().message().unwrap_or("ValidationException"))))
                    }
                    Err(e) => Err(e),
                }
            }
        })
        .await
    }

    async fn put_all_versioned(
        &self,
        table: &'static str,
        name: &str,
        items: impl Iterator<Item = (Item, u64, Option<u64>)>,
    ) -> Result<WriteReport, TableError> {
        let puts = items
            .enumerate()
            .map(|(i, (item, version, epoch))| async move { Ok((i, self.put_versioned(table, name, item, version, epoch).await?)) });
        let mut report = WriteReport::default();
        for (i, put) in all_ok(puts).await? {
            match put {
                Put::Written => report.written += 1,
                Put::Stale => report.stale += 1,
                Put::Refused(why) => report.refused.push((i, why)),
            }
        }
        report.refused.sort_unstable();
        debug!(table, written = report.written, stale = report.stale, refused = report.refused.len(), "dynamodb conditional puts");
        Ok(report)
    }

    /// One BatchWriteItem of at most 25 puts, re-sending unprocessed items with backoff.
    async fn write_batch(&self, table: &'static str, name: &str, mut requests: Vec<WriteRequest>) -> Result<(), TableError> {
        let _permit = self.permit().await?;
        let mut round = 1;
        loop {
            let out = self
                .retrying(table, "BatchWriteItem", || self.inner.client.batch_write_item().request_items(name, requests.clone()).send())
                .await?;
            let left = out.unprocessed_items.and_then(|mut m| m.remove(name)).unwrap_or_default();
            if left.is_empty() {
                return Ok(());
            }
            if round >= MAX_ATTEMPTS {
                warn!(table, attempts = round, unprocessed = left.len(), "dynamodb batch write gave up");
                return Err(TableError::Unavailable(format!(
                    "dynamodb BatchWriteItem on {table}: {} items still unprocessed after {round} attempts",
                    left.len()
                )));
            }
            let delay = backoff(round);
            warn!(table, attempt = round, unprocessed = left.len(), delay_ms = delay.as_millis() as u64, "dynamodb batch write retry");
            tokio::time::sleep(delay).await;
            requests = left;
            round += 1;
        }
    }

    /// Every item of a query, following `LastEvaluatedKey`.
    async fn query_all(&self, table: &'static str, query: QueryFluentBuilder) -> Result<Vec<Item>, TableError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        let mut pages = 0u32;
        loop {
            let page = self.read(table, "Query", || query.clone().set_exclusive_start_key(start.clone()).send()).await?;
            pages += 1;
            out.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        debug!(table, pages, items = out.len(), "dynamodb query");
        Ok(out)
    }

    /// One page of one segment of a scan: (segment, items, next start key).
    async fn scan_page(
        &self,
        table: &'static str,
        scan: ScanFluentBuilder,
        segment: i32,
        start: Option<Item>,
    ) -> Result<(i32, Vec<Item>, Option<Item>), TableError> {
        let page = self.read(table, "Scan", || scan.clone().set_exclusive_start_key(start.clone()).send()).await?;
        let next = page.last_evaluated_key.filter(|k| !k.is_empty());
        Ok((segment, page.items.unwrap_or_default(), next))
    }

    /// Every item of a table, in `segments` parallel segments, handed to `each` page by
    /// page as pages arrive.
    async fn scan_all(
        &self,
        table: &'static str,
        scan: ScanFluentBuilder,
        segments: i32,
        each: &mut (dyn FnMut(&Item) -> Result<(), TableError> + Send),
    ) -> Result<(), TableError> {
        let segment_scan = |segment: i32| {
            if segments > 1 {
                scan.clone().segment(segment).total_segments(segments)
            } else {
                scan.clone()
            }
        };
        let mut pending = FuturesUnordered::new();
        for segment in 0..segments.max(1) {
            pending.push(self.scan_page(table, segment_scan(segment), segment, None));
        }
        let mut items = 0usize;
        while let Some(page) = pending.next().await {
            let (segment, page, next) = page?;
            items += page.len();
            for item in &page {
                each(item)?;
            }
            if let Some(start) = next {
                pending.push(self.scan_page(table, segment_scan(segment), segment, Some(start)));
            }
        }
        info!(table, items, segments, "dynamodb scan done");
        Ok(())
    }

    fn table_specs(&self) -> Result<Vec<TableSpec>, TableError> {
        use KeyType::{Hash, Range};
        use ScalarAttributeType::{N, S};
        let i = &self.inner;
        let by_skier = GlobalSecondaryIndex::builder()
            .index_name(BY_SKIER)
            .key_schema(key_element(A_SKIER, Hash)?)
            .key_schema(key_element(A_RSD, Range)?)
            .projection(
                Projection::builder()
                    .projection_type(ProjectionType::Include)
                    .non_key_attributes(A_VERTICAL)
                    .non_key_attributes(A_RIDES)
                    .non_key_attributes(A_VERSION)
                    .build(),
            )
            .build()
            .map_err(config_error)?;
        Ok(vec![
            TableSpec {
                name: i.rides.clone(),
                label: RIDES,
                keys: vec![key_element(A_SKIER, Hash)?, key_element(A_SK, Range)?],
                attributes: vec![attribute(A_SKIER, N)?, attribute(A_SK, S)?],
                index: None,
            },
            TableSpec {
                name: i.counts.clone(),
                label: COUNTS,
                keys: vec![key_element(A_RSD, Hash)?],
                attributes: vec![attribute(A_RSD, S)?],
                index: None,
            },
            TableSpec {
                name: i.skier_days.clone(),
                label: SKIER_DAYS,
                keys: vec![key_element(A_RSD, Hash)?, key_element(A_SKIER, Range)?],
                attributes: vec![attribute(A_RSD, S)?, attribute(A_SKIER, N)?],
                index: Some(by_skier),
            },
            TableSpec {
                name: i.seasons.clone(),
                label: SEASONS,
                keys: vec![key_element(A_RESORT, Hash)?, key_element(A_SEASON, Range)?],
                attributes: vec![attribute(A_RESORT, N)?, attribute(A_SEASON, N)?],
                index: None,
            },
        ])
    }

    /// CreateTable; an existing table (ResourceInUseException) is fine.
    async fn create_table(&self, spec: &TableSpec) -> Result<(), TableError> {
        let created = self
            .call(spec.label, "CreateTable", || {
                let request = self
                    .inner
                    .client
                    .create_table()
                    .table_name(&spec.name)
                    .billing_mode(BillingMode::PayPerRequest)
                    .set_key_schema(Some(spec.keys.clone()))
                    .set_attribute_definitions(Some(spec.attributes.clone()))
                    .set_global_secondary_indexes(spec.index.clone().map(|i| vec![i]));
                async move {
                    match request.send().await {
                        Ok(_) => Ok(true),
                        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => Ok(false),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        if created {
            info!(table = %spec.name, "dynamodb table created");
        } else {
            debug!(table = %spec.name, "dynamodb table exists");
        }
        Ok(())
    }

    /// Polls DescribeTable until the table and its indexes are ACTIVE.
    async fn wait_active(&self, spec: &TableSpec) -> Result<(), TableError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let out = self.call(spec.label, "DescribeTable", || self.inner.client.describe_table().table_name(&spec.name).send()).await?;
            let table = out.table.as_ref();
            let status = table.and_then(|t| t.table_status().cloned());
            let indexes_active =
                table.is_some_and(|t| t.global_secondary_indexes().iter().all(|i| i.index_status() == Some(&IndexStatus::Active)));
            if status == Some(TableStatus::Active) && indexes_active {
                return Ok(());
            }
            if started.elapsed() >= ACTIVE_WAIT {
                return Err(TableError::Unavailable(format!(
                    "dynamodb table {} not ACTIVE after {:?} (status {status:?}, indexes active: {indexes_active})",
                    spec.name, ACTIVE_WAIT
                )));
            }
            debug!(table = %spec.name, ?status, indexes_active, "waiting for dynamodb table");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}

#[async_trait]
impl Tables for DynamoTables {
    fn name(&self) -> &'static str {
        "dynamodb"
    }

    async fn create(&self) -> Result<(), TableError> {
        let specs = self.table_specs()?;
        all_ok(specs.iter().map(|spec| async move {
            self.create_table(spec).await?;
            self.wait_active(spec).await
        }))
        .await?;
        Ok(())
    }

    async fn put_skier_days(&self, items: &[SkierDayItem]) -> Result<WriteReport, TableError> {
        let name = self.inner.skier_days.as_str();
        self.put_all_versioned(SKIER_DAYS, name, items.iter().map(|d| (skier_day_to_item(d), d.version, None))).await
    }

    async fn put_day_counts(&self, items: &[DayCountItem]) -> Result<WriteReport, TableError> {
        let name = self.inner.counts.as_str();
        self.put_all_versioned(COUNTS, name, items.iter().map(|c| (day_count_to_item(c), c.version, None))).await
    }

    async fn put_skier_days_fenced(&self, items: &[SkierDayItem], epochs: &[u64]) -> Result<WriteReport, TableError> {
        let name = self.inner.skier_days.as_str();
        let items = items.iter().zip(epochs).map(|(d, e)| (skier_day_to_item(d), d.version, Some(*e)));
        self.put_all_versioned(SKIER_DAYS, name, items).await
    }

    async fn put_day_counts_fenced(&self, items: &[DayCountItem], epochs: &[u64]) -> Result<WriteReport, TableError> {
        let name = self.inner.counts.as_str();
        let items = items.iter().zip(epochs).map(|(c, e)| (day_count_to_item(c), c.version, Some(*e)));
        self.put_all_versioned(COUNTS, name, items).await
    }

    async fn put_rides(&self, rides: &[RideEvent]) -> Result<(), TableError> {
        let name = self.inner.rides.as_str();
        let mut seen = HashSet::with_capacity(rides.len());
        let mut requests = Vec::with_capacity(rides.len());
        for r in rides {
            if !seen.insert((r.skier, ride_sort_key(r))) {
                continue; // the same key twice in one batch is a ValidationException
            }
            let put = PutRequest::builder().set_item(Some(ride_to_item(r))).build().map_err(config_error)?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        let chunks: Vec<Vec<WriteRequest>> = requests.chunks(BATCH_SIZE).map(<[WriteRequest]>::to_vec).collect();
        all_ok(chunks.into_iter().map(|chunk| self.write_batch(RIDES, name, chunk))).await?;
        Ok(())
    }

    async fn put_seasons(&self, seasons: &[(u32, u16)]) -> Result<(), TableError> {
        let name = self.inner.seasons.as_str();
        all_ok(seasons.iter().map(|&(resort, season)| {
            self.call(SEASONS, "PutItem", move || {
                self.inner.client.put_item().table_name(name).item(A_RESORT, n(resort)).item(A_SEASON, n(season)).send()
            })
        }))
        .await?;
        Ok(())
    }

    async fn sync(&self) -> Result<(), TableError> {
        Ok(()) // an acknowledged DynamoDB write is already durable
    }

    async fn get_day_count(&self, key: DayKey) -> Result<Option<DayCountItem>, TableError> {
        let out = self
            .read(COUNTS, "GetItem", || {
                self.inner.client.get_item().table_name(&self.inner.counts).key(A_RSD, s(key.to_string())).consistent_read(true).send()
            })
            .await?;
        out.item.as_ref().map(day_count_from_item).transpose()
    }

    async fn get_skier_day(&self, skier: u32, key: DayKey) -> Result<Option<SkierDayItem>, TableError> {
        let out = self
            .read(SKIER_DAYS, "GetItem", || {
                self.inner
                    .client
                    .get_item()
                    .table_name(&self.inner.skier_days)
                    .key(A_RSD, s(key.to_string()))
                    .key(A_SKIER, n(skier))
                    .consistent_read(true)
                    .send()
            })
            .await?;
        out.item.as_ref().map(skier_day_from_item).transpose()
    }

    async fn query_skier_resort(&self, skier: u32, resort: u32) -> Result<Vec<SkierDayItem>, TableError> {
        let query = self
            .inner
            .client
            .query()
            .table_name(&self.inner.skier_days)
            .index_name(BY_SKIER)
            .key_condition_expression("#s = :s AND begins_with(#k, :p)")
            .expression_attribute_names("#s", A_SKIER)
            .expression_attribute_names("#k", A_RSD)
            .expression_attribute_values(":s", n(skier))
            .expression_attribute_values(":p", s(format!("{resort}#")));
        self.query_all(SKIER_DAYS, query).await?.iter().map(skier_day_from_item).collect()
    }

    async fn query_day(&self, key: DayKey) -> Result<Vec<SkierDayItem>, TableError> {
        let query = self
            .inner
            .client
            .query()
            .table_name(&self.inner.skier_days)
            .consistent_read(true)
            .key_condition_expression("#k = :k")
            .expression_attribute_names("#k", A_RSD)
            .expression_attribute_values(":k", s(key.to_string()));
        self.query_all(SKIER_DAYS, query).await?.iter().map(skier_day_from_item).collect()
    }

    async fn query_seasons(&self, resort: u32) -> Result<Vec<u16>, TableError> {
        let query = self
            .inner
            .client
            .query()
            .table_name(&self.inner.seasons)
            .consistent_read(true)
            .key_condition_expression("#r = :r")
            .expression_attribute_names("#r", A_RESORT)
            .expression_attribute_values(":r", n(resort));
        self.query_all(SEASONS, query).await?.iter().map(|item| get_n(SEASONS, item, A_SEASON)).collect()
    }

    async fn scan_seasons(&self) -> Result<Vec<(u32, u16)>, TableError> {
        let scan = self.inner.client.scan().table_name(&self.inner.seasons).consistent_read(true);
        let mut out = Vec::new();
        self.scan_all(SEASONS, scan, 1, &mut |item| {
            out.push((get_n(SEASONS, item, A_RESORT)?, get_n(SEASONS, item, A_SEASON)?));
            Ok(())
        })
        .await?;
        out.sort_unstable(); // the order the sled store gives
        Ok(out)
    }

    async fn scan_season_totals(&self, sink: &mut (dyn FnMut(u32, u32, u16, u64) + Send)) -> Result<(), TableError> {
        let scan = self
            .inner
            .client
            .scan()
            .table_name(&self.inner.skier_days)
            .consistent_read(true)
            .projection_expression("#s, #k, #v")
            .expression_attribute_names("#s", A_SKIER)
            .expression_attribute_names("#k", A_RSD)
            .expression_attribute_names("#v", A_VERTICAL);
        self.scan_all(SKIER_DAYS, scan, SCAN_SEGMENTS, &mut |item| {
            let skier = get_n(SKIER_DAYS, item, A_SKIER)?;
            let key = get_day_key(SKIER_DAYS, item)?;
            sink(skier, key.resort, key.season, get_n(SKIER_DAYS, item, A_VERTICAL)?);
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_keys_parse_back_exactly() {
        let key = DayKey { resort: 10, season: 2025, day: 366 };
        assert_eq!(parse_day_key(&key.to_string()), Some(key));
        for bad in ["", "1", "1#2", "1#2#3#4", "1#2#x", "+1#2#3", "01#2#3", "1#70000#3", "1##3", "-1#2#3"] {
            assert_eq!(parse_day_key(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn ids_round_trip_and_bad_lengths_are_corrupt() {
        let ids = vec![0, 1, u64::MAX, 1 << 63, 0x0123_4567_89ab_cdef];
        let stamps = vec![Stamp::new(1, 1), Stamp::new(360, 40), Stamp::UNKNOWN, Stamp(0), Stamp::new(9, 2)];
        let d = SkierDayItem { skier: 7, key: DayKey { resort: 1, season: 2025, day: 1 }, vertical: 9, ids, version: 3, stamps };
        assert_eq!(skier_day_from_item(&skier_day_to_item(&d)).unwrap(), d);
        // An item written before stamps were kept reads with unknown ones.
        let mut old = skier_day_to_item(&d);
        old.remove(A_STAMPS);
        assert_eq!(skier_day_from_item(&old).unwrap().stamps, vec![Stamp::UNKNOWN; 5]);
        let mut bad = skier_day_to_item(&d);
        bad.insert(A_STAMPS.into(), AttributeValue::B(Blob::new(vec![1, 2, 3])));
        assert!(matches!(skier_day_from_item(&bad), Err(TableError::Corrupt { table: SKIER_DAYS, .. })));
        let empty = SkierDayItem { ids: vec![], stamps: vec![], ..d.clone() };
        let item = skier_day_to_item(&empty);
        assert!(!item.contains_key(A_IDS));
        assert_eq!(skier_day_from_item(&item).unwrap(), empty);
        let mut bad = skier_day_to_item(&d);
        bad.insert(A_IDS.into(), AttributeValue::B(Blob::new(vec![1, 2, 3])));
        assert!(matches!(skier_day_from_item(&bad), Err(TableError::Corrupt { table: SKIER_DAYS, .. })));
        bad.insert(A_IDS.into(), s("x"));
        assert!(matches!(skier_day_from_item(&bad), Err(TableError::Corrupt { .. })));
        let mut bad = skier_day_to_item(&d);
        bad.insert(A_RSD.into(), s("1#2"));
        assert!(matches!(skier_day_from_item(&bad), Err(TableError::Corrupt { .. })));
        let mut bad = skier_day_to_item(&d);
        bad.insert(A_VERTICAL.into(), n("-5"));
        assert!(matches!(skier_day_from_item(&bad), Err(TableError::Corrupt { .. })));
    }

    #[test]
    fn ride_sort_key_has_sixteen_hex_digits() {
        let r = RideEvent { id: 0xab, resort: 1, season: 2025, day: 3, skier: 7, time: 42, lift: 5, vertical: 50 };
        assert_eq!(ride_sort_key(&r), "2025#3#42#00000000000000ab");
    }

    /// The ceilings as documented, written out rather than recomputed with the formula
    /// under test (the test this replaces did that, and passed a backoff that always
    /// returned zero): 20 ms doubling per attempt to the 2 s cap. Full jitter: the draws
    /// reach close to each ceiling and spread below it.
    #[test]
    fn backoff_doubles_from_20_ms_to_the_2_s_cap_with_full_jitter() {
        let ceilings_ms = [
            (0, 20),
            (1, 20),
            (2, 40),
            (3, 80),
            (4, 160),
            (5, 320),
            (6, 640),
            (7, 1280),
            (8, 2000),
            (9, 2000),
            (40, 2000),
            (u32::MAX, 2000),
        ];
        for (attempt, ceiling_ms) in ceilings_ms {
            let draws: Vec<u64> = (0..400).map(|_| backoff(attempt).as_millis() as u64).collect();
            let (max, min) = (*draws.iter().max().unwrap(), *draws.iter().min().unwrap());
            let distinct = draws.iter().collect::<std::collections::BTreeSet<_>>().len();
            assert!(max <= ceiling_ms, "attempt {attempt}: {max} ms over the {ceiling_ms} ms ceiling");
            // 400 uniform draws: the chance that none is in the top 10% is 0.9^400, about 1e-18.
            assert!(max * 10 >= ceiling_ms * 9, "attempt {attempt}: at most {max} ms, the ceiling is {ceiling_ms} ms");
            assert!(min * 10 <= ceiling_ms, "attempt {attempt}: never below {min} ms: no full jitter");
            assert!(distinct >= (ceiling_ms as usize / 2).min(100), "attempt {attempt}: only {distinct} distinct delays");
        }
    }
}
