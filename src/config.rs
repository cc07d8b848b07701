//! The configuration: one typed tree of sections, one per subsystem (`[http]`, `[admin]`,
//! `[bus]`/`[bus.amqp]`, `[consumer]`, `[wal]`, `[flush]`, `[actors]`,
//! `[tables]`/`[tables.dynamodb]`, `[admission]`, `[limits]`, `[log]`), read by one loader:
//!
//! defaults (`Default` of each section) ← TOML file (`--config`) ← environment ← flags.
//!
//! Every key has an environment variable, derived from its path and never listed by hand:
//! `wal.max_bytes` is `LIFTLOG_WAL__MAX_BYTES`, `bus.amqp.prefetch` is
//! `LIFTLOG_BUS__AMQP__PREFETCH`, `data_dir` is `LIFTLOG_DATA_DIR`. Every key can also be set
//! on the command line with `--set wal.max_bytes=1000000`; a few common ones have flags of
//! their own (`--listen`, `--data-dir`, `--role`, `--broker`, …). All layers are merged as a
//! TOML tree before one deserialisation, so a new key costs one field with a default, one
//! line in `deploy/liftlog.toml` and one row in the README (tests compare both with the
//! types). Unknown keys are rejected in every layer, with the layer named, so a typo never
//! silently means a default.
//!
//! The flat keys of the previous release (`wal_max_bytes`, `LIFTLOG_WAL_MAX_BYTES`,
//! `--flush-interval-ms`) still work for one release and each use logs a warning that names
//! the new key: see [`LEGACY_KEYS`].

use clap::Args;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::actors::consumer::AckAfter;
use crate::domain::Limits;

/// A value that must not reach logs: an admin token, a broker URL with its password.
/// `Debug` prints a placeholder; the value is read with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// How the WAL makes a batch durable before its rides are acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityPolicy {
    /// fsync once per batch, then acknowledge: a 201 survives a process or power loss.
    GroupCommit,
    /// Acknowledge without fsync: sled writes its buffer within ~500 ms, so a crash loses
    /// up to that much. For benchmarks that measure everything but the disk.
    NoSync,
}

/// What a process does. `all` is every role in one process (the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// HTTP POST → bus (publish, 201 after the confirm).
    Write,
    /// Bus → WAL → aggregator actors → tables.
    Consume,
    /// HTTP GET from the tables (and from the actors when this process also consumes).
    Read,
    All,
}

/// Where the tables live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TableStore {
    /// sled trees in `data_dir/tables`: local to one process.
    Sled,
    /// DynamoDB (AWS, or DynamoDB Local with `tables.dynamodb.endpoint`).
    Dynamodb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// The whole configuration of one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Roles of this process; split roles need a broker and DynamoDB.
    pub roles: Vec<Role>,
    /// Where the WAL (`wal/`) and the embedded tables (`tables/`) live.
    pub data_dir: PathBuf,
    /// A TOML resort catalog; none = the default 10 resorts with 40 lifts each.
    pub catalog: Option<PathBuf>,
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub bus: BusConfig,
    pub consumer: ConsumerConfig,
    pub wal: WalSection,
    pub flush: FlushConfig,
    pub actors: ActorsConfig,
    pub tables: TablesConfig,
    pub admission: AdmissionSection,
    pub limits: Limits,
    pub cluster: ClusterSection,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            roles: vec![Role::All],
            data_dir: PathBuf::from("./data"),
            catalog: None,
            http: HttpConfig::default(),
            admin: AdminConfig::default(),
            log: LogConfig::default(),
            bus: BusConfig::default(),
            consumer: ConsumerConfig::default(),
            wal: WalSection::default(),
            flush: FlushConfig::default(),
            actors: ActorsConfig::default(),
            tables: TablesConfig::default(),
            admission: AdmissionSection::default(),
            limits: Limits::default(),
            cluster: ClusterSection::default(),
        }
    }
}

/// `[http]`: the public listener.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the public HTTP listener.
    pub listen: SocketAddr,
    /// A context path that clients prefix to every route (e.g. `/skiers-app`); empty = none.
    pub base_path: String,
    /// HTTP worker threads; 0 = one per core.
    pub workers: usize,
    /// Largest accepted request body. A ride is ~30 bytes; 16 KiB leaves room for clients
    /// that pretty-print while keeping a flood of large bodies cheap to refuse.
    pub max_body_bytes: usize,
    /// Open connections per worker before new ones wait in the backlog.
    pub max_connections: usize,
    /// Keep-alive idle timeout, seconds.
    pub keep_alive_secs: u64,
    /// Time a client has to send its request head, ms; bounds slowloris-style clients.
    pub client_request_timeout_ms: u64,
    /// Live streams (`.../stream`, the dashboard's) this node serves at once; past it a 503.
    /// Each holds a connection and a few KiB; the feeds behind them cost one read per
    /// watched day per tick, whatever the number of viewers.
    pub max_streams: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "0.0.0.0:8080".parse().expect("valid default address"),
            base_path: String::new(),
            workers: 0,
            max_body_bytes: 16 * 1024,
            max_connections: 25_000,
            keep_alive_secs: 75,
            client_request_timeout_ms: 5_000,
            max_streams: 2_048,
        }
    }
}

/// `[admin]`: `/admin/*` and `/metrics`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// An address of their own (the default, loopback: operators reach it on the host and a
    /// load balancer never exposes it), or `main` to serve them on the public listener.
    /// Admin on a non-loopback address needs `admin.token`: the node refuses to start
    /// otherwise, so no default leaves `POST /admin/flush` open to the internet.
    pub listen: String,
    /// Bearer token for `/admin/*` and `/metrics`; none = open (only allowed on loopback).
    pub token: Option<Secret>,
    /// Record the latency histograms of `/metrics` (`crate::metrics`). On by default: they
    /// are what p99 alerts read; off only to measure what they cost (`scripts/bench.sh`).
    pub histograms: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: "127.0.0.1:9090".into(), token: None, histograms: true }
    }
}

/// `[log]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json` (level via `RUST_LOG`).
    pub format: LogFormat,
    /// An OpenTelemetry collector's OTLP/HTTP base URL (`http://host:4318`): request spans
    /// are also sent there (`crate::logging`). Needs a build with the `otlp` feature; none =
    /// no export.
    pub otlp_endpoint: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, otlp_endpoint: None }
    }
}

/// `[bus]`: between the HTTP writers and the consumer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// RabbitMQ URL (`amqp://` or `amqps://`); none = the embedded in-process bus.
    pub broker: Option<Secret>,
    /// Embedded bus: rides queued between the HTTP workers and the consumer; beyond it
    /// POSTs get 503.
    pub capacity: usize,
    /// Longest a POST waits for its ride to become durable before answering 503: the
    /// embedded bus's deadline and the broker's publisher-confirm timeout alike.
    pub publish_deadline_ms: u64,
    pub amqp: AmqpSection,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig { broker: None, capacity: 50_000, publish_deadline_ms: 10_000, amqp: AmqpSection::default() }
    }
}

/// `[bus.amqp]`: RabbitMQ topology and flow control.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpSection {
    /// Name prefix of the exchange and queues.
    pub prefix: String,
    /// Partition queues; each resort-day maps to one, so one consumer owns an aggregate.
    pub partitions: u16,
    /// Confirm-mode channels the publisher spreads over.
    pub publish_channels: usize,
    /// Unconfirmed publishes in flight before POSTs are shed with 503.
    pub max_in_flight: usize,
    /// Deliveries a consumer may hold unacked per partition (AMQP prefetch).
    pub prefetch: u16,
    /// `x-delivery-limit` of the partition queues; 0 declares none. RabbitMQ 4.x quorum
    /// queues dead-letter a message after 20 deliveries by default, and nothing reads the
    /// dead letters: this is far above what crashes and lost connections can use up, so a
    /// ride that got its 201 is never moved aside (4.x's "unlimited", -1, is refused by 3.x).
    pub delivery_limit: u32,
    /// Most rides a write node packs into one message for one partition (1 = one message per
    /// ride). RabbitMQ's cost is per message, so this is what lifts POST throughput; each
    /// POST still answers 201 only after its message's confirm.
    pub batch_max_rides: usize,
    /// Most bytes of rides per message.
    pub batch_max_bytes: usize,
    /// Longest a ride waits for others of its partition before its message goes out, µs:
    /// added to a POST's latency at low rates, where no batch fills.
    pub batch_linger_us: u64,
}

impl Default for AmqpSection {
    fn default() -> Self {
        AmqpSection {
            prefix: "liftlog".into(),
            partitions: 4,
            publish_channels: 4,
            max_in_flight: 8192,
            prefetch: 2000,
            delivery_limit: crate::bus::amqp::DEFAULT_DELIVERY_LIMIT,
            batch_max_rides: 256,
            batch_max_bytes: 64 * 1024,
            batch_linger_us: 1_000,
        }
    }
}

/// `[consumer]`: bus → WAL → actors.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Most rides per WAL record (one fsync).
    pub max_batch: usize,
    /// When the consumer acks a batch: `wal` (after its fsync) or `table` (after the
    /// flusher wrote it; exact failover to a standby on another machine). See ADR 002.
    pub ack_after: AckAfter,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig { max_batch: 8_192, ack_after: AckAfter::Wal }
    }
}

/// `[wal]`: the write-ahead log in `data_dir/wal` (crate `liftlog-wal`, which stays free of
/// this file format: [`Config::wal_config`] hands it its own `WalConfig`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalSection {
    pub durability: DurabilityPolicy,
    /// Bound on un-checkpointed WAL bytes: beyond it POSTs get 503 until the flusher
    /// catches up (the alarm for a table outage that lasts too long).
    pub max_bytes: u64,
    /// Free disk space kept in reserve on the data dir's filesystem: below it the WAL
    /// refuses rides (503) and the sled tables skip flushes, before sled ever meets a full
    /// disk (sled needs a restart after an I/O error; refusing early recovers by itself).
    pub min_free_disk_bytes: u64,
    /// A corrupt record followed by intact ones is not a torn tail: the node refuses to start
    /// rather than delete acknowledged rides. `true` truncates at the corrupt record anyway
    /// (an operator's decision, for one start: set it, start, unset it).
    pub truncate_corrupt: bool,
}

impl Default for WalSection {
    fn default() -> Self {
        WalSection {
            durability: DurabilityPolicy::GroupCommit,
            max_bytes: 2 * 1024 * 1024 * 1024,
            min_free_disk_bytes: 128 * 1024 * 1024,
            truncate_corrupt: false,
        }
    }
}

/// `[flush]`: actors → tables, then the WAL checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushConfig {
    /// How often the flusher writes dirty aggregates and raw rides to the tables, ms.
    pub interval_ms: u64,
    /// Raw rides taken per actor per flush; aggregates never wait behind more than this.
    pub rides_per_actor: usize,
    /// Size trigger: a flush starts early once this many rides arrived since the last.
    pub after_rides: u64,
    /// Longest the final flush at shutdown may take, ms. Past it the node exits anyway:
    /// the WAL holds every acknowledged ride, and a table outage must not keep a SIGTERM
    /// waiting until systemd's SIGKILL (`TimeoutStopSec`).
    pub shutdown_timeout_ms: u64,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig { interval_ms: 1_000, rides_per_actor: 20_000, after_rides: 50_000, shutdown_timeout_ms: 10_000 }
    }
}

/// `[actors]`: the resident aggregator actors.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActorsConfig {
    /// Resident aggregator actors before idle ones are passivated.
    pub max_resident_days: usize,
    /// Rides the consumer holds that the tables may lack (WAL records not yet
    /// checkpointed); past it the consumer takes no new batch until a flush succeeds.
    /// Bounds resident memory through a table outage (~100 bytes a ride). 0: no bound.
    pub max_unflushed_rides: u64,
    /// Skier-resort season totals kept in memory (embedded mode); the others are computed
    /// from the tables and the resident days when asked. 0 keeps none.
    pub season_index_entries: usize,
}

impl Default for ActorsConfig {
    fn default() -> Self {
        ActorsConfig { max_resident_days: 8_192, max_unflushed_rides: 4_000_000, season_index_entries: 262_144 }
    }
}

/// `[tables]`: the table store.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TablesConfig {
    /// `sled` or `dynamodb`; `tables.dynamodb.endpoint` implies `dynamodb`.
    pub store: TableStore,
    /// Prefix of every table name (one account, several deployments).
    pub prefix: String,
    /// Concurrent requests to the table store: the connection bound of the design.
    pub concurrency: usize,
    /// Create missing tables at start.
    pub create: bool,
    pub dynamodb: DynamodbSection,
}

impl Default for TablesConfig {
    fn default() -> Self {
        TablesConfig { store: TableStore::Sled, prefix: String::new(), concurrency: 16, create: true, dynamodb: DynamodbSection::default() }
    }
}

/// `[tables.dynamodb]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamodbSection {
    /// Endpoint override (DynamoDB Local); none = AWS's, from the standard config.
    pub endpoint: Option<String>,
    pub region: String,
}

impl Default for DynamodbSection {
    fn default() -> Self {
        DynamodbSection { endpoint: None, region: "us-east-1".into() }
    }
}

/// `[admission]`: load shedding on the write path.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSection {
    /// Token bucket base refill in rides/s (0 = off). The refill slows as the queue, the
    /// WAL or the flush lag approach their bounds, so load is shed with 429 before the
    /// queue is full. High by default: it only bites under pressure.
    pub rate: f64,
    /// Bucket size (burst).
    pub burst: f64,
    /// Consecutive bus failures that open the write path's circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe is let through, ms.
    pub breaker_open_ms: u64,
    /// Broker queue depth (all partitions) counted as "full" for admission.
    pub shed_queue_depth: u64,
    /// Flush lag counted as "full" for admission, seconds.
    pub shed_flush_lag_secs: u64,
}

impl Default for AdmissionSection {
    fn default() -> Self {
        AdmissionSection {
            rate: 100_000.0,
            burst: 10_000.0,
            breaker_failures: 5,
            breaker_open_ms: 2_000,
            shed_queue_depth: 200_000,
            shed_flush_lag_secs: 120,
        }
    }
}

/// `[cluster]`: shard ownership under leases in DynamoDB (issue 12, ADR 005). With it,
/// every consumer node consumes its share of the partition queues (the shards; their count
/// is `bus.amqp.partitions`), acks wait for the tables, and every node forwards a day's
/// reads to the node that owns its shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Cluster mode. Needs a broker and DynamoDB tables.
    pub enabled: bool,
    /// This node's id, unique among running nodes (a restarted node may reuse its id).
    /// Empty: `{host name}-{http port}`.
    pub node_id: String,
    /// The base URL other nodes forward reads to. Empty: `http://{host name}:{http port}`,
    /// or `http://{http.listen}` when that is a specific address.
    pub endpoint: String,
    /// How long an unchanged lease stands before another node may take the shard over.
    pub lease_ms: u64,
    /// Heartbeat and lease renewal period.
    pub renew_ms: u64,
    /// Lease table scan period: rebalancing rounds and the read-forwarding map's refresh.
    pub scan_ms: u64,
    /// An owner stops using a lease this long before another node may take it.
    pub safety_margin_ms: u64,
    /// Timeout of one lease table request.
    pub call_timeout_ms: u64,
    /// Longest a cooperative hand-off waits for this node to flush and ack the shard.
    pub handoff_timeout_ms: u64,
    /// Longest a read waits for a shard whose owner is changing before it is answered
    /// from the tables (with a header saying so).
    pub forward_wait_ms: u64,
    /// Timeout of one forwarded read.
    pub forward_timeout_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            enabled: false,
            node_id: String::new(),
            endpoint: String::new(),
            lease_ms: 10_000,
            renew_ms: 3_000,
            scan_ms: 1_000,
            safety_margin_ms: 2_000,
            call_timeout_ms: 2_000,
            handoff_timeout_ms: 30_000,
            forward_wait_ms: 1_500,
            forward_timeout_ms: 2_000,
        }
    }
}

/// Why a configuration was refused. Each names the layer and the key, so the operator
/// knows which line, variable or flag to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("flag {flag}: {message}")]
    Flag { flag: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The flat keys of the previous release and where each lives now. They are accepted for
/// one release — in the file, as `LIFTLOG_<FLAT_KEY>` and as the old flags — with a warning.
pub const LEGACY_KEYS: &[(&str, &str)] = &[
    ("listen", "http.listen"),
    ("base_path", "http.base_path"),
    ("http_workers", "http.workers"),
    ("max_body_bytes", "http.max_body_bytes"),
    ("max_connections", "http.max_connections"),
    ("keep_alive_secs", "http.keep_alive_secs"),
    ("client_request_timeout_ms", "http.client_request_timeout_ms"),
    ("admin_listen", "admin.listen"),
    ("admin_token", "admin.token"),
    ("log_format", "log.format"),
    ("broker", "bus.broker"),
    ("bus_capacity", "bus.capacity"),
    ("publish_deadline_ms", "bus.publish_deadline_ms"),
    ("amqp_prefix", "bus.amqp.prefix"),
    ("partitions", "bus.amqp.partitions"),
    ("publish_channels", "bus.amqp.publish_channels"),
    ("max_in_flight", "bus.amqp.max_in_flight"),
    ("prefetch", "bus.amqp.prefetch"),
    ("max_batch", "consumer.max_batch"),
    ("ack_after", "consumer.ack_after"),
    ("durability", "wal.durability"),
    ("wal_max_bytes", "wal.max_bytes"),
    ("min_free_disk_bytes", "wal.min_free_disk_bytes"),
    ("flush_interval_ms", "flush.interval_ms"),
    ("flush_rides_per_actor", "flush.rides_per_actor"),
    ("flush_after_rides", "flush.after_rides"),
    ("max_resident_days", "actors.max_resident_days"),
    ("tables", "tables.store"),
    ("table_prefix", "tables.prefix"),
    ("table_concurrency", "tables.concurrency"),
    ("create_tables", "tables.create"),
    ("dynamodb_endpoint", "tables.dynamodb.endpoint"),
    ("dynamodb_region", "tables.dynamodb.region"),
    ("admission_rate", "admission.rate"),
    ("admission_burst", "admission.burst"),
    ("breaker_failures", "admission.breaker_failures"),
    ("breaker_open_ms", "admission.breaker_open_ms"),
    ("shed_queue_depth", "admission.shed_queue_depth"),
    ("shed_flush_lag_secs", "admission.shed_flush_lag_secs"),
    // The old flag `--role` read `LIFTLOG_ROLE`.
    ("role", "roles"),
];

/// `LIFTLOG_*` variables that are not configuration keys: the test harness's and the
/// fault injection's. They are left alone instead of being refused as unknown keys.
const NOT_CONFIG_VARS: &[&str] = &[
    "LIFTLOG_CONFIG",
    "LIFTLOG_BIN",
    "LIFTLOG_CLUSTER_DIR",
    "LIFTLOG_CLUSTER_PREFIX",
    "LIFTLOG_STATE_DIR",
    "LIFTLOG_CACHE_DIR",
    "LIFTLOG_SERVICES_TIMEOUT",
];
const NOT_CONFIG_PREFIXES: &[&str] = &["LIFTLOG_FAULT_", "LIFTLOG_TEST_"];

/// Flags of `liftlog serve`: the config file, the few keys every deployment sets, and
/// `--set` for any other. Environment variables are read by [`Config::resolve`], not here.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML config file (see deploy/liftlog.toml); also `LIFTLOG_CONFIG`.
    #[arg(long, env = "LIFTLOG_CONFIG")]
    pub config: Option<PathBuf>,
    /// `http.listen`: the public listener.
    #[arg(long)]
    pub listen: Option<String>,
    /// `admin.listen`: the admin listener's address, or `main` for the public listener.
    #[arg(long)]
    pub admin_listen: Option<String>,
    /// `admin.token` (prefer LIFTLOG_ADMIN__TOKEN: a flag shows in `ps`).
    #[arg(long)]
    pub admin_token: Option<String>,
    /// `data_dir`.
    #[arg(long)]
    pub data_dir: Option<String>,
    /// `roles`, comma separated: write, consume, read, all.
    #[arg(long = "role")]
    pub roles: Option<String>,
    /// `bus.broker`: RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long)]
    pub broker: Option<String>,
    /// `tables.store`: sled or dynamodb.
    #[arg(long)]
    pub tables: Option<String>,
    /// `tables.dynamodb.endpoint` (implies `--tables dynamodb`).
    #[arg(long)]
    pub dynamodb_endpoint: Option<String>,
    /// Any key by its path, e.g. `--set flush.interval_ms=200` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,

    // The previous release's flags, kept for one release (hidden; each use warns).
    #[arg(long, hide = true)]
    pub base_path: Option<String>,
    #[arg(long, hide = true)]
    pub catalog: Option<String>,
    #[arg(long, hide = true)]
    pub http_workers: Option<String>,
    #[arg(long, hide = true)]
    pub bus_capacity: Option<String>,
    #[arg(long, hide = true)]
    pub wal_max_bytes: Option<String>,
    #[arg(long, hide = true)]
    pub durability: Option<String>,
    #[arg(long, hide = true)]
    pub flush_interval_ms: Option<String>,
    #[arg(long, hide = true)]
    pub max_resident_days: Option<String>,
    #[arg(long, hide = true)]
    pub log_format: Option<String>,
    #[arg(long, hide = true)]
    pub partitions: Option<String>,
    #[arg(long, hide = true)]
    pub amqp_prefix: Option<String>,
    #[arg(long, hide = true)]
    pub table_prefix: Option<String>,
    #[arg(long, hide = true)]
    pub admission_rate: Option<String>,
    #[arg(long, hide = true)]
    pub ack_after: Option<String>,
    #[arg(long, hide = true)]
    pub prefetch: Option<String>,
}

/// One flag's assignment: the flag as given, the key path it sets, the raw value.
struct Assignment {
    flag: String,
    path: String,
    value: String,
}

impl ServeArgs {
    /// The assignments of every flag given, the `--set`s last, and the deprecation warnings.
    fn assignments(&self) -> Result<(Vec<Assignment>, Vec<String>), ConfigError> {
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        let current = [
            ("--listen", "http.listen", &self.listen),
            ("--admin-listen", "admin.listen", &self.admin_listen),
            ("--admin-token", "admin.token", &self.admin_token),
            ("--data-dir", "data_dir", &self.data_dir),
            ("--role", "roles", &self.roles),
            ("--broker", "bus.broker", &self.broker),
            ("--tables", "tables.store", &self.tables),
            ("--dynamodb-endpoint", "tables.dynamodb.endpoint", &self.dynamodb_endpoint),
        ];
        for (flag, path, value) in current {
            if let Some(v) = value {
                out.push(Assignment { flag: flag.to_string(), path: path.to_string(), value: v.clone() });
            }
        }
        let legacy = [
            ("--base-path", "http.base_path", &self.base_path),
            ("--catalog", "catalog", &self.catalog),
            ("--http-workers", "http.workers", &self.http_workers),
            ("--bus-capacity", "bus.capacity", &self.bus_capacity),
            ("--wal-max-bytes", "wal.max_bytes", &self.wal_max_bytes),
            ("--durability", "wal.durability", &self.durability),
            ("--flush-interval-ms", "flush.interval_ms", &self.flush_interval_ms),
            ("--max-resident-days", "actors.max_resident_days", &self.max_resident_days),
            ("--log-format", "log.format", &self.log_format),
            ("--partitions", "bus.amqp.partitions", &self.partitions),
            ("--amqp-prefix", "bus.amqp.prefix", &self.amqp_prefix),
            ("--table-prefix", "tables.prefix", &self.table_prefix),
            ("--admission-rate", "admission.rate", &self.admission_rate),
            ("--ack-after", "consumer.ack_after", &self.ack_after),
            ("--prefetch", "bus.amqp.prefetch", &self.prefetch),
        ];
        for (flag, path, value) in legacy {
            if let Some(v) = value {
                warnings.push(format!("flag {flag} is deprecated; use --set {path}={v} (or {})", env_var_of(path)));
                out.push(Assignment { flag: flag.to_string(), path: path.to_string(), value: v.clone() });
            }
        }
        for s in &self.set {
            let Some((k, v)) = s.split_once('=') else {
                return Err(ConfigError::Flag {
                    flag: format!("--set {s}"),
                    message: "expected KEY=VALUE, e.g. flush.interval_ms=200".into(),
                });
            };
            out.push(Assignment { flag: format!("--set {k}"), path: k.trim().to_string(), value: v.to_string() });
        }
        Ok((out, warnings))
    }
}

/// A resolved configuration and what the loader wants said once logging is up.
#[derive(Debug)]
pub struct Resolved {
    pub config: Config,
    /// Deprecated keys, variables and flags that were used, each naming its replacement.
    pub warnings: Vec<String>,
}

/// The environment variable of a key path: `bus.amqp.prefetch` → `LIFTLOG_BUS__AMQP__PREFETCH`.
pub fn env_var_of(path: &str) -> String {
    format!("LIFTLOG_{}", path.split('.').map(|s| s.to_ascii_uppercase()).collect::<Vec<_>>().join("__"))
}

/// The shape of the tree: every key with its default, Options included (as JSON null),
/// which is what a string from the environment or a flag is typed against.
fn schema() -> serde_json::Value {
    serde_json::to_value(Config::default()).expect("the config serialises")
}

fn schema_at<'a>(schema: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(schema, |node, seg| node.as_object()?.get(seg))
}

/// Every key path of the schema, sections excluded: `http.listen`, `limits.max_day`, ….
pub fn key_paths() -> Vec<String> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<String>) {
        if let Some(map) = v.as_object() {
            for (k, child) in map {
                let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                if child.is_object() {
                    walk(&path, child, out);
                } else {
                    out.push(path);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk("", &schema(), &mut out);
    out
}

/// A string from the environment or a flag, typed by the key's default: numbers and
/// booleans parsed, `roles` split at commas, strings (and unset Options) kept as they are.
fn typed_value(schema: &serde_json::Value, path: &str, raw: &str) -> Result<toml::Value, String> {
    let Some(default) = schema_at(schema, path) else {
        return Err(format!("`{path}` is not a configuration key"));
    };
    let raw_t = raw.trim();
    Ok(match default {
        serde_json::Value::Object(_) => return Err(format!("`{path}` is a section; set one of its keys")),
        serde_json::Value::Bool(_) => {
            toml::Value::Boolean(raw_t.parse().map_err(|_| format!("`{path}` expects true or false, got {raw:?}"))?)
        }
        serde_json::Value::Number(n) if n.is_f64() => {
            toml::Value::Float(raw_t.parse().map_err(|_| format!("`{path}` expects a number, got {raw:?}"))?)
        }
        serde_json::Value::Number(_) => {
            toml::Value::Integer(raw_t.parse().map_err(|_| format!("`{path}` expects an integer, got {raw:?}"))?)
        }
        serde_json::Value::Array(_) => toml::Value::Array(
            raw.split(',').map(|s| toml::Value::String(s.trim().to_string())).filter(|v| v.as_str() != Some("")).collect(),
        ),
        serde_json::Value::String(_) | serde_json::Value::Null => toml::Value::String(raw.to_string()),
    })
}

/// Sets `path` in the tree, creating sections on the way.
fn set_path(tree: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut segs: Vec<&str> = path.split('.').collect();
    let last = segs.pop().expect("split yields one segment at least");
    let mut node = tree;
    for seg in segs {
        let entry = node.entry(seg.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| format!("`{seg}` in `{path}` is set to a value, not a section"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

/// Unknown keys of a tree, by path, against the schema.
fn unknown_keys(schema: &serde_json::Value, tree: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in tree {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match schema_at(schema, &path) {
            None => out.push(path),
            Some(serde_json::Value::Object(_)) => match v.as_table() {
                Some(t) => unknown_keys(schema, t, &path, out),
                None => out.push(format!("{path} (a section, given a value)")),
            },
            Some(_) => {}
        }
    }
}

/// The file's flat keys of the previous release moved to their sections, with a warning
/// each. `tables = "sled"` is the old key, `[tables]` the new section.
fn migrate_legacy_file_keys(tree: &mut toml::Table, warnings: &mut Vec<String>) -> Result<(), String> {
    for (old, new) in LEGACY_KEYS {
        let is_legacy = match tree.get(*old) {
            None => false,
            Some(v) => !v.is_table(),
        };
        if !is_legacy {
            continue;
        }
        let value = tree.remove(*old).expect("checked above");
        warnings
            .push(format!("config key `{old}` is deprecated; write `{new}` (section [{}])", new.rsplit_once('.').map_or("", |(s, _)| s)));
        set_path(tree, new, value)?;
    }
    Ok(())
}

impl Config {
    /// A config file alone over the defaults (no environment, no flags).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let mut warnings = Vec::new();
        let tree = Self::file_tree(path, &mut warnings)?;
        Self::finish(tree)
    }

    fn file_tree(path: &Path, warnings: &mut Vec<String>) -> Result<toml::Table, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let file_err = |message: String| ConfigError::File { path: path.into(), message };
        let mut tree: toml::Table = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        migrate_legacy_file_keys(&mut tree, warnings).map_err(file_err)?;
        let mut unknown = Vec::new();
        unknown_keys(&schema(), &tree, "", &mut unknown);
        if !unknown.is_empty() {
            return Err(file_err(format!("unknown key(s): {}", unknown.join(", "))));
        }
        Ok(tree)
    }

    /// Defaults ← file ← environment ← flags, then the checks of combinations that cannot
    /// work. Warnings (deprecated keys) come back for the caller to log.
    pub fn resolve(args: &ServeArgs) -> Result<Resolved, ConfigError> {
        Self::resolve_with_env(args, std::env::vars())
    }

    /// [`Config::resolve`] with the environment given (tests).
    pub fn resolve_with_env(args: &ServeArgs, env: impl IntoIterator<Item = (String, String)>) -> Result<Resolved, ConfigError> {
        let mut warnings = Vec::new();
        let mut tree = match &args.config {
            Some(p) => Self::file_tree(p, &mut warnings)?,
            None => toml::Table::new(),
        };
        let schema = schema();

        // Environment: legacy flat names first, so that a new-style variable for the same
        // key wins when both are set. Sorted, so the outcome never depends on env order.
        let mut env: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with("LIFTLOG_")).collect();
        env.sort();
        let mut new_style = Vec::new();
        for (var, value) in env {
            if NOT_CONFIG_VARS.contains(&var.as_str()) || NOT_CONFIG_PREFIXES.iter().any(|p| var.starts_with(p)) {
                continue;
            }
            let key = var["LIFTLOG_".len()..].to_ascii_lowercase();
            let path = key.replace("__", ".");
            // `LIFTLOG_TABLES=dynamodb` is the old flat key, not the `[tables]` section.
            if schema_at(&schema, &path).is_some_and(|v| !v.is_object()) {
                new_style.push((var, path, value));
                continue;
            }
            match LEGACY_KEYS.iter().find(|(old, _)| *old == key) {
                Some((_, new)) => {
                    warnings.push(format!("environment variable {var} is deprecated; use {}", env_var_of(new)));
                    let v = typed_value(&schema, new, &value).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
                    set_path(&mut tree, new, v).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
                }
                None => {
                    return Err(ConfigError::Env {
                        var,
                        message: format!(
                            "`{path}` is not a configuration key (sections join with a double underscore: LIFTLOG_WAL__MAX_BYTES)"
                        ),
                    })
                }
            }
        }
        for (var, path, value) in new_style {
            let v = typed_value(&schema, &path, &value).map_err(|message| ConfigError::Env { var: var.clone(), message })?;
            set_path(&mut tree, &path, v).map_err(|message| ConfigError::Env { var, message })?;
        }

        let (flags, flag_warnings) = args.assignments()?;
        warnings.extend(flag_warnings);
        for Assignment { flag, path, value } in flags {
            let v = typed_value(&schema, &path, &value).map_err(|message| ConfigError::Flag { flag: flag.clone(), message })?;
            set_path(&mut tree, &path, v).map_err(|message| ConfigError::Flag { flag, message })?;
        }
        let config = Self::finish(tree)?;
        Ok(Resolved { config, warnings })
    }

    fn finish(tree: toml::Table) -> Result<Self, ConfigError> {
        let mut c: Config =
            toml::Value::Table(tree).try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        if c.tables.dynamodb.endpoint.is_some() {
            c.tables.store = TableStore::Dynamodb;
        }
        c.http.base_path = normalize_base_path(&c.http.base_path).map_err(ConfigError::Invalid)?;
        c.check().map_err(ConfigError::Invalid)?;
        Ok(c)
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r == role || *r == Role::All)
    }

    /// The roles as written on the command line, e.g. `write,read`.
    pub fn roles_label(&self) -> String {
        let names: Vec<&str> = self
            .roles
            .iter()
            .map(|r| match r {
                Role::Write => "write",
                Role::Consume => "consume",
                Role::Read => "read",
                Role::All => "all",
            })
            .collect();
        names.join(",")
    }

    /// The admin listener's address; `None` = on the public listener.
    pub fn admin_addr(&self) -> Result<Option<SocketAddr>, String> {
        match self.admin.listen.as_str() {
            "main" => Ok(None),
            a => a.parse().map(Some).map_err(|e| format!("admin.listen {a:?}: {e} (an address, or \"main\")")),
        }
    }

    /// The broker's publisher-confirm timeout and the embedded bus's deadline: one key, so
    /// the two bus ends cannot drift apart.
    pub fn publish_deadline(&self) -> Duration {
        Duration::from_millis(self.bus.publish_deadline_ms)
    }

    /// The RabbitMQ settings of the bus ends, for the broker at `url`.
    pub fn amqp_config(&self, url: &str) -> crate::bus::amqp::AmqpConfig {
        let a = &self.bus.amqp;
        crate::bus::amqp::AmqpConfig {
            url: url.to_string(),
            prefix: a.prefix.clone(),
            partitions: a.partitions,
            publish_channels: a.publish_channels,
            max_in_flight: a.max_in_flight,
            confirm_timeout: self.publish_deadline(),
            prefetch: a.prefetch,
            delivery_limit: a.delivery_limit,
            batching: crate::bus::amqp::Batching {
                max_rides: a.batch_max_rides.max(1),
                max_bytes: a.batch_max_bytes.max(64),
                linger: Duration::from_micros(a.batch_linger_us),
            },
        }
    }

    pub fn dynamo_config(&self) -> crate::tables::dynamo::DynamoConfig {
        crate::tables::dynamo::DynamoConfig {
            endpoint: self.tables.dynamodb.endpoint.clone(),
            region: self.tables.dynamodb.region.clone(),
            table_prefix: self.tables.prefix.clone(),
            max_concurrency: self.tables.concurrency,
        }
    }

    pub fn wal_config(&self) -> liftlog_wal::WalConfig {
        liftlog_wal::WalConfig {
            dir: self.data_dir.join("wal"),
            durability: match self.wal.durability {
                DurabilityPolicy::GroupCommit => liftlog_wal::Durability::GroupCommit,
                DurabilityPolicy::NoSync => liftlog_wal::Durability::NoSync,
            },
            max_bytes: self.wal.max_bytes,
            min_free_bytes: self.wal.min_free_disk_bytes,
            truncate_corrupt: self.wal.truncate_corrupt,
        }
    }

    pub fn admission_config(&self) -> crate::bus::admission::AdmissionConfig {
        let a = &self.admission;
        crate::bus::admission::AdmissionConfig {
            rate: a.rate,
            burst: a.burst.max(1.0),
            breaker_failures: a.breaker_failures.max(1),
            breaker_open: Duration::from_millis(a.breaker_open_ms),
        }
    }

    /// This node as the cluster knows it (`cluster.node_id`, `cluster.endpoint`, or their
    /// defaults from the host name and the HTTP port).
    pub fn cluster_node(&self) -> crate::cluster::NodeInfo {
        let host = || {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "localhost".into())
        };
        let port = self.http.listen.port();
        let id = match self.cluster.node_id.as_str() {
            "" => format!("{}-{port}", host()),
            id => id.to_string(),
        };
        let endpoint = match self.cluster.endpoint.as_str() {
            "" if self.http.listen.ip().is_unspecified() => format!("http://{}:{port}", host()),
            "" => format!("http://{}", self.http.listen),
            e => e.trim_end_matches('/').to_string(),
        };
        crate::cluster::NodeInfo { id, endpoint }
    }

    /// The lease keeper's timings (`[cluster]`).
    pub fn keeper_config(&self) -> crate::cluster::KeeperConfig {
        let c = &self.cluster;
        let ms = Duration::from_millis;
        crate::cluster::KeeperConfig {
            lease_duration: ms(c.lease_ms),
            renew_interval: ms(c.renew_ms),
            scan_interval: ms(c.scan_ms),
            safety_margin: ms(c.safety_margin_ms),
            call_timeout: ms(c.call_timeout_ms),
            handoff_timeout: ms(c.handoff_timeout_ms),
            ..crate::cluster::KeeperConfig::new(self.cluster_node())
        }
    }

    /// Combinations that cannot work, or that would be unsafe, refused at start with the
    /// reason.
    fn check(&self) -> Result<(), String> {
        let admin = self.admin_addr()?;
        if self.admin.token.is_none() {
            // Admin can flush, and shows every resident day: never open beyond the host.
            let exposed = match admin {
                None => (!self.http.listen.ip().is_loopback()).then_some(self.http.listen),
                Some(a) => (!a.ip().is_loopback()).then_some(a),
            };
            if let Some(at) = exposed {
                return Err(format!(
                    "admin routes would be served without a token on {at}, which is not a loopback address: set admin.token \
                     (LIFTLOG_ADMIN__TOKEN), or put admin.listen on a loopback address such as 127.0.0.1:9090"
                ));
            }
        }
        if self.roles.is_empty() {
            return Err("at least one role is needed".into());
        }
        let (write, consume) = (self.has_role(Role::Write), self.has_role(Role::Consume));
        if self.bus.broker.is_none() && write != consume {
            return Err("the embedded bus lives in one process: a write role without consume (or the reverse) needs --broker".into());
        }
        if self.tables.store == TableStore::Sled && !consume {
            return Err("sled tables are local to the consuming process: a node without the consume role needs --tables dynamodb".into());
        }
        if self.bus.amqp.partitions == 0 {
            return Err("bus.amqp.partitions must be at least 1".into());
        }
        if self.cluster.enabled {
            // A read-only node needs no broker: it finds owners in the lease table.
            if (self.bus.broker.is_none() && (write || consume)) || self.tables.store != TableStore::Dynamodb {
                return Err("cluster.enabled needs a broker (bus.broker) on write and consume nodes, and DynamoDB tables (tables.store = \"dynamodb\")".into());
            }
            if consume && self.consumer.ack_after != AckAfter::Table {
                return Err(
                    "cluster.enabled needs consumer.ack_after = \"table\": a shard's next owner finds every acked ride in the tables"
                        .into(),
                );
            }
            if consume {
                self.keeper_config().validate().map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

/// `skiers-app/` → `/skiers-app`; empty stays empty.
fn normalize_base_path(p: &str) -> Result<String, String> {
    let trimmed = p.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.contains(|c: char| c.is_whitespace() || c == '?' || c == '#' || c == '{') {
        return Err(format!("http.base_path {p:?} is not a plain path"));
    }
    Ok(format!("/{trimmed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn loopback() -> ServeArgs {
        ServeArgs { listen: Some("127.0.0.1:0".into()), ..Default::default() }
    }

    #[test]
    fn cluster_mode_is_refused_without_what_it_needs() {
        let resolve = |pairs: &[(&str, &str)]| Config::resolve_with_env(&loopback(), env(pairs)).map(|r| r.config);
        let broker = ("LIFTLOG_BUS__BROKER", "amqp://u:p@127.0.0.1:5672/%2f");
        let dynamo = ("LIFTLOG_TABLES__DYNAMODB__ENDPOINT", "http://127.0.0.1:8000");
        let on = ("LIFTLOG_CLUSTER__ENABLED", "true");
        let table = ("LIFTLOG_CONSUMER__ACK_AFTER", "table");
        let err = |r: Result<Config, ConfigError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(resolve(&[on, dynamo, table])).contains("broker"));
        assert!(err(resolve(&[on, broker, table])).contains("DynamoDB"));
        assert!(err(resolve(&[on, broker, dynamo])).contains("ack_after"));
        assert!(err(resolve(&[on, broker, dynamo, table, ("LIFTLOG_CLUSTER__RENEW_MS", "9000")])).contains("renew_interval"));
        let c = resolve(&[on, broker, dynamo, table, ("LIFTLOG_CLUSTER__NODE_ID", "c-1")]).unwrap();
        assert_eq!(c.cluster_node(), crate::cluster::NodeInfo { id: "c-1".into(), endpoint: format!("http://{}", c.http.listen) });
        // A read-only node finds the owners in the lease table: no broker needed.
        let read = resolve(&[on, dynamo, ("LIFTLOG_ROLES", "read")]);
        assert!(read.is_ok(), "{}", err(read));
    }

    #[test]
    fn file_then_flags_and_unknown_keys_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[http]\nlisten = \"127.0.0.1:9000\"\nbase_path = \"skiers-app/\"\n[limits]\nmax_day = 200\n").unwrap();
        let args = ServeArgs { config: Some(f.clone()), data_dir: Some("/x".into()), ..Default::default() };
        let c = Config::resolve_with_env(&args, no_env()).unwrap().config;
        assert_eq!(c.http.listen.port(), 9000);
        assert_eq!(c.http.base_path, "/skiers-app");
        assert_eq!(c.limits.max_day, 200);
        assert_eq!(c.limits.max_time, 360);
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        std::fs::write(&f, "[http]\nlisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::resolve_with_env(&args, no_env()).unwrap_err().to_string();
        assert!(err.contains("http.lisen"), "{err}");
    }

    #[test]
    fn every_key_has_an_environment_variable() {
        // Each key, set through its variable to a value that differs from the default,
        // must come out changed: no key is left without a variable.
        let defaults = schema();
        for path in key_paths() {
            let default = schema_at(&defaults, &path).unwrap().clone();
            let value = match (&path[..], &default) {
                ("roles", _) => "consume".to_string(),
                ("http.listen", _) => "127.0.0.1:1234".to_string(),
                ("admin.listen", _) => "127.0.0.1:1235".to_string(),
                ("log.format", _) => "json".to_string(),
                ("wal.durability", _) => "no-sync".to_string(),
                ("consumer.ack_after", _) => "table".to_string(),
                ("tables.store", _) => "dynamodb".to_string(),
                ("http.base_path", _) => "/ctx".to_string(),
                (_, serde_json::Value::Bool(b)) => (!b).to_string(),
                (_, serde_json::Value::Number(n)) if n.is_f64() => "7.5".to_string(),
                (_, serde_json::Value::Number(_)) => "7".to_string(),
                _ => "http://127.0.0.1:1/x".to_string(),
            };
            let mut vars = vec![(env_var_of(&path), value)];
            // A consume-only node needs a broker and DynamoDB: give both unless under test.
            if path != "bus.broker" {
                vars.push(("LIFTLOG_BUS__BROKER".into(), "amqp://u:p@127.0.0.1:5672/%2f".into()));
            }
            if path != "tables.dynamodb.endpoint" {
                vars.push(("LIFTLOG_TABLES__DYNAMODB__ENDPOINT".into(), "http://127.0.0.1:8000".into()));
            }
            // cluster.enabled needs acks after the tables.
            if path == "cluster.enabled" {
                vars.push(("LIFTLOG_CONSUMER__ACK_AFTER".into(), "table".into()));
            }
            let r = Config::resolve_with_env(&ServeArgs::default(), vars.clone()).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(r.warnings.is_empty(), "{path}: {:?}", r.warnings);
            let got = serde_json::to_value(&r.config).unwrap();
            assert_ne!(schema_at(&got, &path), Some(&default), "{path} was not changed by {}", env_var_of(&path));
        }
    }

    #[test]
    fn legacy_flat_variable_works_with_a_warning() {
        // The defect of the previous release: LIFTLOG_MAX_BODY_BYTES was silently ignored.
        let r = Config::resolve_with_env(&loopback(), env(&[("LIFTLOG_MAX_BODY_BYTES", "100")])).unwrap();
        assert_eq!(r.config.http.max_body_bytes, 100);
        assert!(r.warnings.iter().any(|w| w.contains("LIFTLOG_HTTP__MAX_BODY_BYTES")), "{:?}", r.warnings);
        let r = Config::resolve_with_env(&loopback(), env(&[("LIFTLOG_HTTP__MAX_BODY_BYTES", "200"), ("LIFTLOG_MAX_BODY_BYTES", "100")]))
            .unwrap();
        assert_eq!(r.config.http.max_body_bytes, 200, "the new-style variable wins");
    }

    #[test]
    fn unknown_or_malformed_variables_are_refused_with_their_name() {
        let err = Config::resolve_with_env(&loopback(), env(&[("LIFTLOG_WAL__MAX_BYTE", "1")])).unwrap_err().to_string();
        assert!(err.contains("LIFTLOG_WAL__MAX_BYTE"), "{err}");
        let err = Config::resolve_with_env(&loopback(), env(&[("LIFTLOG_WAL__MAX_BYTES", "lots")])).unwrap_err().to_string();
        assert!(err.contains("LIFTLOG_WAL__MAX_BYTES") && err.contains("integer"), "{err}");
        // Harness and fault-injection variables are not configuration.
        Config::resolve_with_env(
            &loopback(),
            env(&[("LIFTLOG_TEST_AMQP", "x"), ("LIFTLOG_FAULT_ABORT_MID_FLUSH", "1"), ("LIFTLOG_BIN", "x")]),
        )
        .unwrap();
    }

    #[test]
    fn legacy_file_keys_and_flags_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("old.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9000\"\nwal_max_bytes = 4096\ntables = \"sled\"\nprefetch = 10\n").unwrap();
        let args = ServeArgs { config: Some(f), flush_interval_ms: Some("250".into()), ..Default::default() };
        let r = Config::resolve_with_env(&args, no_env()).unwrap();
        assert_eq!(r.config.http.listen.port(), 9000);
        assert_eq!(r.config.wal.max_bytes, 4096);
        assert_eq!(r.config.bus.amqp.prefetch, 10);
        assert_eq!(r.config.flush.interval_ms, 250);
        assert_eq!(r.warnings.len(), 5, "{:?}", r.warnings);
    }

    #[test]
    fn layers_in_order_and_set_reaches_any_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[flush]\ninterval_ms = 100\nafter_rides = 5\n[bus.amqp]\nprefetch = 3\n").unwrap();
        let args = ServeArgs {
            config: Some(f),
            listen: Some("127.0.0.1:0".into()),
            set: vec!["flush.after_rides=9".into(), "limits.max_day=100".into()],
            ..Default::default()
        };
        let c = Config::resolve_with_env(&args, env(&[("LIFTLOG_FLUSH__INTERVAL_MS", "200"), ("LIFTLOG_FLUSH__AFTER_RIDES", "7")]))
            .unwrap()
            .config;
        assert_eq!(c.flush.interval_ms, 200, "env over file");
        assert_eq!(c.flush.after_rides, 9, "flag over env");
        assert_eq!(c.bus.amqp.prefetch, 3, "file over default");
        assert_eq!(c.limits.max_day, 100);
        let bad = ServeArgs { set: vec!["flush.nope=1".into()], ..loopback() };
        assert!(Config::resolve_with_env(&bad, no_env()).unwrap_err().to_string().contains("flush.nope"));
    }

    #[test]
    fn admin_is_never_open_beyond_loopback_without_a_token() {
        // The default: admin on its own loopback listener, public listener on 0.0.0.0.
        let c = Config::resolve_with_env(&ServeArgs::default(), no_env()).unwrap().config;
        assert_eq!(c.admin_addr().unwrap(), Some("127.0.0.1:9090".parse().unwrap()));
        let public_main = ServeArgs { admin_listen: Some("main".into()), ..Default::default() };
        let err = Config::resolve_with_env(&public_main, no_env()).unwrap_err().to_string();
        assert!(err.contains("admin.token"), "{err}");
        let public_admin = ServeArgs { admin_listen: Some("0.0.0.0:9090".into()), ..Default::default() };
        assert!(Config::resolve_with_env(&public_admin, no_env()).is_err());
        let with_token = ServeArgs { admin_listen: Some("main".into()), admin_token: Some("t0ken".into()), ..Default::default() };
        Config::resolve_with_env(&with_token, no_env()).unwrap();
        let loopback_main = ServeArgs { admin_listen: Some("main".into()), ..loopback() };
        Config::resolve_with_env(&loopback_main, no_env()).unwrap();
    }

    #[test]
    fn both_bus_ends_share_one_deadline() {
        // The drift of the previous release: AmqpConfig defaulted to a 5 s confirm timeout
        // while the service used 10 s, so tests exercised a default the service never ran.
        let c = Config::default();
        let from_service = c.amqp_config("amqp://x");
        assert_eq!(from_service.confirm_timeout, c.publish_deadline());
        assert_eq!(crate::bus::amqp::AmqpConfig::default().confirm_timeout, c.publish_deadline());
        assert_eq!(crate::bus::amqp::AmqpConfig::default().prefetch, c.bus.amqp.prefetch);
        assert_eq!(crate::tables::dynamo::DynamoConfig::default(), c.dynamo_config());
    }

    #[test]
    fn sample_config_is_the_defaults_written_out() {
        // deploy/liftlog.toml says its values are the defaults: every key is in it (Options
        // as comments), with the default value, and nothing else.
        let sample = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/liftlog.toml"));
        let c = Config::from_file(sample).expect("deploy/liftlog.toml must stay valid");
        assert_eq!(serde_json::to_value(&c).unwrap(), schema(), "deploy/liftlog.toml must hold the defaults");
        let text = std::fs::read_to_string(sample).unwrap();
        let mut section = String::new();
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines() {
            let l = line.trim_start_matches('#').trim();
            if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                section = s.to_string();
            } else if let Some((k, _)) = l.split_once(" = ") {
                if k.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                    seen.insert(if section.is_empty() { k.to_string() } else { format!("{section}.{k}") });
                }
            }
        }
        let keys: std::collections::BTreeSet<String> = key_paths().into_iter().collect();
        let missing: Vec<_> = keys.difference(&seen).collect();
        assert!(missing.is_empty(), "deploy/liftlog.toml lacks {missing:?}");
    }

    #[test]
    fn readme_table_lists_every_key() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        let missing: Vec<String> = key_paths().into_iter().filter(|k| !readme.contains(&format!("`{k}`"))).collect();
        assert!(missing.is_empty(), "README.md's configuration table lacks {missing:?}");
    }
}
