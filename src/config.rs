//! One typed configuration. Defaults live in `Default`; a TOML file (`--config`) overrides
//! them, `LIFTLOG_*` environment variables override the file, and flags override both.
//! Unknown keys in the file are rejected so that a typo never silently means a default.
//! `deploy/liftlog.toml` is the commented sample.

use clap::Args;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::domain::Limits;

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
    pub admin_token: Option<String>,
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
    /// Resident aggregator actors before idle ones are passivated.
    pub max_resident_days: usize,
    pub log_format: LogFormat,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".parse().expect("valid default address"),
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
            max_resident_days: 8_192,
            log_format: LogFormat::Text,
            limits: Limits::default(),
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
    #[arg(long, env = "LIFTLOG_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "LIFTLOG_BASE_PATH")]
    pub base_path: Option<String>,
    #[arg(long, env = "LIFTLOG_CATALOG")]
    pub catalog: Option<PathBuf>,
    #[arg(long, env = "LIFTLOG_HTTP_WORKERS")]
    pub http_workers: Option<usize>,
    #[arg(long, env = "LIFTLOG_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
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
        over!(listen, data_dir, base_path, http_workers, bus_capacity, wal_max_bytes, durability, flush_interval_ms, max_resident_days, log_format);
        if args.catalog.is_some() {
            c.catalog = args.catalog.clone();
        }
        if args.admin_token.is_some() {
            c.admin_token = args.admin_token.clone();
        }
        c.base_path = normalize_base_path(&c.base_path)?;
        Ok(c)
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
