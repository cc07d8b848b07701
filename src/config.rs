//! One typed configuration. Defaults live in `Default`; a TOML file (`--config`) overrides
//! them, `LIFTLOG_*` environment variables override the file, and flags override both.
//! Unknown keys in the file are rejected so that a typo never silently means a default.
//! `deploy/liftlog.toml` is the commented sample.

use clap::Args;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DurabilityPolicy {
    /// fsync once per batch, then acknowledge: a 201 survives a process or power loss.
    GroupCommit,
    /// Acknowledge without fsync: sled writes its buffer within ~500 ms, so a crash loses
    /// up to that much. For benchmarks that measure everything but the disk.
    NoSync,
}

/// What a process does. `all` is every role in one process (the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TableStore {
    /// sled trees in `data_dir/tables`: local to one process.
    Sled,
    /// DynamoDB (AWS, or DynamoDB Local with `dynamodb_endpoint`).
    Dynamodb,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the public HTTP listener.
    pub listen: SocketAddr,
    /// Where `/admin/*` and `/metrics` are served: an address of their own (the sample
    /// config and the systemd unit use loopback `127.0.0.1:9090`, so operators reach it on
    /// the host and the load balancer never exposes it), or `main`, the built-in default
    /// for a developer's single process, to serve them on the public listener
    /// (token-guarded if `admin_token` is set).
    pub admin_listen: String,
    /// Where the WAL (`wal/`) and the embedded tables (`tables/`) live.
    pub data_dir: PathBuf,
    /// A context path that clients prefix to every route (e.g. `/skiers-app`); empty = none.
    pub base_path: String,
    /// A TOML resort catalog; none = the default 10 resorts with 40 lifts each.
    pub catalog: Option<PathBuf>,
    /// HTTP worker threads; 0 = one per core.
    pub http_workers: usize,
    /// Largest accepted request body. A ride is ~30 bytes; 16 KiB leaves room for clients
    /// that pretty-print while keeping a flood of large bodies cheap to refuse.
    pub max_body_bytes: usize,
    /// Open connections per worker before new ones wait in the backlog.
    pub max_connections: usize,
    /// Keep-alive idle timeout, seconds.
    pub keep_alive_secs: u64,
    /// Time a client has to send its request head, ms; bounds slowloris-style clients.
    pub client_request_timeout_ms: u64,
    /// Bearer token for `/admin/*` and `/metrics`; none = open (bind admin to loopback).
    pub admin_token: Option<Secret>,
    /// Rides queued between the HTTP workers and the consumer; beyond it POSTs get 503.
    pub bus_capacity: usize,
    /// Longest a POST waits for its ride to become durable before answering 503.
    pub publish_deadline_ms: u64,
    /// Most rides per WAL record (one fsync).
    pub max_batch: usize,
    /// Bound on un-checkpointed WAL bytes: beyond it POSTs get 503 until the flusher
    /// catches up (the alarm for a table outage that lasts too long).
    pub wal_max_bytes: u64,
    pub durability: DurabilityPolicy,
    /// How often the flusher writes dirty aggregates and raw rides to the tables.
    pub flush_interval_ms: u64,
    /// Raw rides taken per actor per flush; aggregates never wait behind more than this.
    pub flush_rides_per_actor: usize,
    /// Size trigger: a flush starts early once this many rides arrived since the last.
    pub flush_after_rides: u64,
    /// Resident aggregator actors before idle ones are passivated.
    pub max_resident_days: usize,
    pub log_format: LogFormat,
    pub limits: Limits,
    /// Roles of this process; split roles need a broker and DynamoDB.
    pub roles: Vec<Role>,
    /// RabbitMQ URL (`amqp://` or `amqps://`); none = the embedded in-process bus.
    pub broker: Option<Secret>,
    /// Name prefix of the exchange and queues.
    pub amqp_prefix: String,
    /// Partition queues; each resort-day maps to one, so one consumer owns an aggregate.
    pub partitions: u16,
    /// Confirm-mode channels the publisher spreads over.
    pub publish_channels: usize,
    /// Unconfirmed publishes in flight before POSTs are shed with 503.
    pub max_in_flight: usize,
    /// Deliveries a consumer may hold unacked per partition (AMQP prefetch).
    pub prefetch: u16,
    /// Table store; `dynamodb_endpoint` implies `dynamodb`.
    pub tables: TableStore,
    /// DynamoDB endpoint override (DynamoDB Local); none = AWS's, from the standard config.
    pub dynamodb_endpoint: Option<String>,
    pub dynamodb_region: String,
    /// Prefix of every table name (one account, several deployments).
    pub table_prefix: String,
    /// Concurrent requests to the table store: the connection bound of the design.
    pub table_concurrency: usize,
    /// Create missing tables at start.
    pub create_tables: bool,
    /// Admission token bucket: base refill in rides/s (0 = off). The refill slows as the
    /// queue, the WAL or the flush lag approach their bounds, so load is shed with 429
    /// before the queue is full. High by default: it only bites under pressure.
    pub admission_rate: f64,
    /// Admission bucket size (burst).
    pub admission_burst: f64,
    /// Consecutive bus failures that open the write path's circuit breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one probe is let through, ms.
    pub breaker_open_ms: u64,
    /// Broker queue depth (all partitions) counted as "full" for admission.
    pub shed_queue_depth: u64,
    /// Flush lag counted as "full" for admission, seconds.
    pub shed_flush_lag_secs: u64,
    /// Free disk space kept in reserve on the data dir's filesystem: below it the WAL
    /// refuses rides (503) and the sled tables skip flushes, before sled ever meets a full
    /// disk (sled needs a restart after an I/O error; refusing early recovers by itself).
    pub min_free_disk_bytes: u64,
    /// When the consumer acks a batch: `wal` (after its fsync) or `table` (after the
    /// flusher wrote it; exact failover to a standby on another machine). See ADR 002.
    pub ack_after: crate::actors::consumer::AckAfter,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".parse().expect("valid default address"),
            admin_listen: "main".into(),
            data_dir: PathBuf::from("./data"),
            base_path: String::new(),
            catalog: None,
            http_workers: 0,
            max_body_bytes: 16 * 1024,
            max_connections: 25_000,
            keep_alive_secs: 75,
            client_request_timeout_ms: 5_000,
            admin_token: None,
            bus_capacity: 50_000,
            publish_deadline_ms: 10_000,
            max_batch: 8_192,
            wal_max_bytes: 2 * 1024 * 1024 * 1024,
            durability: DurabilityPolicy::GroupCommit,
            flush_interval_ms: 1_000,
            flush_rides_per_actor: 20_000,
            flush_after_rides: 50_000,
            max_resident_days: 8_192,
            log_format: LogFormat::Text,
            limits: Limits::default(),
            roles: vec![Role::All],
            broker: None,
            amqp_prefix: "liftlog".into(),
            partitions: 4,
            publish_channels: 4,
            max_in_flight: 8192,
            prefetch: 2000,
            tables: TableStore::Sled,
            dynamodb_endpoint: None,
            dynamodb_region: "us-east-1".into(),
            table_prefix: String::new(),
            table_concurrency: 16,
            create_tables: true,
            admission_rate: 100_000.0,
            admission_burst: 10_000.0,
            breaker_failures: 5,
            breaker_open_ms: 2_000,
            shed_queue_depth: 200_000,
            shed_flush_lag_secs: 120,
            min_free_disk_bytes: 128 * 1024 * 1024,
            ack_after: crate::actors::consumer::AckAfter::Wal,
        }
    }
}

/// Flags of `liftlog serve`; each also reads `LIFTLOG_<NAME>` from the environment.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML config file (see deploy/liftlog.toml).
    #[arg(long, env = "LIFTLOG_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "LIFTLOG_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin listener address, or `main` for the public listener.
    #[arg(long, env = "LIFTLOG_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    #[arg(long, env = "LIFTLOG_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "LIFTLOG_BASE_PATH")]
    pub base_path: Option<String>,
    #[arg(long, env = "LIFTLOG_CATALOG")]
    pub catalog: Option<PathBuf>,
    #[arg(long, env = "LIFTLOG_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    #[arg(long, env = "LIFTLOG_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    #[arg(long, env = "LIFTLOG_BUS_CAPACITY")]
    pub bus_capacity: Option<usize>,
    #[arg(long, env = "LIFTLOG_WAL_MAX_BYTES")]
    pub wal_max_bytes: Option<u64>,
    #[arg(long, env = "LIFTLOG_DURABILITY", value_enum)]
    pub durability: Option<DurabilityPolicy>,
    #[arg(long, env = "LIFTLOG_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    #[arg(long, env = "LIFTLOG_MAX_RESIDENT_DAYS")]
    pub max_resident_days: Option<usize>,
    #[arg(long, env = "LIFTLOG_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Roles, comma separated: write, consume, read, all.
    #[arg(long = "role", env = "LIFTLOG_ROLE", value_enum, value_delimiter = ',')]
    pub roles: Option<Vec<Role>>,
    /// RabbitMQ URL, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long, env = "LIFTLOG_BROKER", hide_env_values = true)]
    pub broker: Option<Secret>,
    #[arg(long, env = "LIFTLOG_PARTITIONS")]
    pub partitions: Option<u16>,
    #[arg(long, env = "LIFTLOG_AMQP_PREFIX")]
    pub amqp_prefix: Option<String>,
    #[arg(long, env = "LIFTLOG_TABLES", value_enum)]
    pub tables: Option<TableStore>,
    #[arg(long, env = "LIFTLOG_DYNAMODB_ENDPOINT")]
    pub dynamodb_endpoint: Option<String>,
    #[arg(long, env = "LIFTLOG_TABLE_PREFIX")]
    pub table_prefix: Option<String>,
    #[arg(long, env = "LIFTLOG_ADMISSION_RATE")]
    pub admission_rate: Option<f64>,
    #[arg(long, env = "LIFTLOG_ACK_AFTER", value_enum)]
    pub ack_after: Option<crate::actors::consumer::AckAfter>,
    #[arg(long, env = "LIFTLOG_PREFETCH")]
    pub prefetch: Option<u16>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {e}", path.display()))
    }

    /// Defaults ← file ← environment ← flags (clap resolves the last two).
    pub fn resolve(args: &ServeArgs) -> Result<Self, String> {
        let mut c = match &args.config {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = &args.$f { c.$f = v.clone(); } )* };
        }
        over!(listen, admin_listen, data_dir, base_path, http_workers, bus_capacity, wal_max_bytes, durability, flush_interval_ms, max_resident_days, log_format, roles, partitions, amqp_prefix, tables, table_prefix, admission_rate, ack_after, prefetch);
        macro_rules! over_opt {
            ($($f:ident),*) => { $( if args.$f.is_some() { c.$f = args.$f.clone(); } )* };
        }
        over_opt!(catalog, admin_token, broker, dynamodb_endpoint);
        if c.dynamodb_endpoint.is_some() {
            c.tables = TableStore::Dynamodb;
        }
        c.base_path = normalize_base_path(&c.base_path)?;
        c.check()?;
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
        match self.admin_listen.as_str() {
            "main" => Ok(None),
            a => a.parse().map(Some).map_err(|e| format!("admin_listen {a:?}: {e} (an address, or \"main\")")),
        }
    }

    /// Combinations that cannot work, refused at start with the reason.
    fn check(&self) -> Result<(), String> {
        self.admin_addr()?;
        if self.roles.is_empty() {
            return Err("at least one role is needed".into());
        }
        let (write, consume) = (self.has_role(Role::Write), self.has_role(Role::Consume));
        if self.broker.is_none() && write != consume {
            return Err("the embedded bus lives in one process: a write role without consume (or the reverse) needs --broker".into());
        }
        if self.tables == TableStore::Sled && !consume {
            return Err("sled tables are local to the consuming process: a node without the consume role needs --tables dynamodb".into());
        }
        if self.partitions == 0 {
            return Err("partitions must be at least 1".into());
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
        return Err(format!("base_path {p:?} is not a plain path"));
    }
    Ok(format!("/{trimmed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_and_unknown_keys_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:9000\"\nbase_path = \"skiers-app/\"\n[limits]\nmax_day = 200\n").unwrap();
        let args = ServeArgs { config: Some(f.clone()), data_dir: Some("/x".into()), ..Default::default() };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.base_path, "/skiers-app");
        assert_eq!(c.limits.max_day, 200);
        assert_eq!(c.limits.max_time, 360);
        assert_eq!(c.data_dir, PathBuf::from("/x"));
        std::fs::write(&f, "lisen = \"127.0.0.1:9000\"\n").unwrap();
        let err = Config::resolve(&args).unwrap_err();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn sample_config_parses() {
        let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/liftlog.toml");
        Config::from_file(Path::new(sample)).expect("deploy/liftlog.toml must stay valid");
    }
}
