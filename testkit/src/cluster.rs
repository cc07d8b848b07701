//! A local liftlog cluster in the shape of the AWS stack (`deploy/aws/liftlog.yaml`), with
//! nginx standing in for the ALB:
//!
//! ```text
//! nginx 127.0.0.1:PORT ──POST──▶ write-1, write-2                      (least_conn)
//!                      └─GET───▶ every node (any node answers a GET)   (least_conn)
//! write-* ──publish──▶ RabbitMQ quorum queues {prefix}.rides.{0..P-1} (the shards)
//!                        └─▶ consume-1, consume-2, consume-3: each subscribes to the
//!                            shards it holds under a lease in {prefix}_ShardLeases
//! consume-* ──flush (fenced by the lease epoch)──▶ DynamoDB Local (tables {prefix}_*)
//! a GET on a node that does not own the day's shard is forwarded to its owner
//! ```
//!
//! That is cluster mode (`cluster.enabled`, ADR 005; [`Settings::sharding`], the default).
//! Without it the consumers run as before: single-active-consumer makes the first one
//! active on every queue, the others are hot standbys, and GETs go to the write and read
//! nodes, which answer them from the tables.
//!
//! Beyond the whole cluster's `up` and `down`, the functions a failure test needs act on
//! one node: [`Cluster::stop`] (SIGTERM or kill -9), [`Cluster::start`],
//! [`Cluster::pause`]/[`Cluster::resume`] (SIGSTOP/SIGCONT: a zombie owner),
//! [`Cluster::add`] (one more node of a role, e.g. a 4th consumer joining) and
//! [`Cluster::admin`] (a node's `/admin/cluster`, `/admin/wal`, ... as JSON).
//!
//! [`Cluster::up`] starts what is not running yet (idempotent): the services (unless they
//! are someone else's), the tables, the nodes in [`Cluster::nodes`] order (each waits for
//! `/ready`), then nginx. [`Cluster::down`] stops only what `up` started. The settings `up`
//! used are saved in `<dir>/cluster.env`, so that a later command (another `cargo xtask`
//! process) needs only the state dir.
//!
//! Ports: nginx on `port`; write nodes from `node_port` (port + 1), consumers from
//! node_port + 10, read nodes from node_port + 20; each node's admin listener 50 above.

use crate::net::http_status;
use crate::nginx::Nginx;
use crate::process::{self, log, warn, StateLock};
use crate::services::Services;
use crate::{repo_root, Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TAG: &str = "cluster";
const POLL: Duration = Duration::from_millis(200);
/// A node's own shutdown waits up to 30 s for in-flight requests, then flushes.
const STOP_WITHIN: Duration = Duration::from_secs(90);
/// nginx takes a failed node back only after `fail_timeout` (2 s, see `nginx::render`).
const BACK_IN_POOL: Duration = Duration::from_millis(2_200);
/// The settings file `up` writes and the other commands read.
const SAVED: &str = "cluster.env";
/// Marks that this cluster's `up` started the services (so its `down` stops them).
const SERVICES_MARK: &str = "services.started-by-cluster";

/// What a node does: the `--role` it runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Write,
    Consume,
    Read,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Write, Role::Consume, Role::Read];

    pub fn name(self) -> &'static str {
        match self {
            Role::Write => "write",
            Role::Consume => "consume",
            Role::Read => "read",
        }
    }

    /// The first port of the role, counted from `node_port`.
    fn offset(self) -> u16 {
        match self {
            Role::Write => 0,
            Role::Consume => 10,
            Role::Read => 20,
        }
    }
}

/// One node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `write-1`, `consume-2`, ...
    pub name: String,
    pub role: Role,
    /// Its public listener on 127.0.0.1.
    pub port: u16,
    /// Its admin listener on 127.0.0.1 (when the binary has `--admin-listen`).
    pub admin_port: u16,
}

/// How to stop a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: the ordered shutdown (drain, fsync, final flush); SIGKILL after 90 s.
    Term,
    /// SIGKILL (`kill -9`): no shutdown code runs.
    Kill,
}

/// How the cluster is made. [`Settings::new`] gives the defaults, [`Settings::from_env`]
/// reads the environment (or the settings saved by an earlier `up` in the same state dir).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// State dir: pids, logs, data dirs, nginx files (`LIFTLOG_CLUSTER_DIR`, `/tmp/liftlog-cluster`).
    pub dir: PathBuf,
    /// `bus.amqp.prefix`, and `tables.prefix` "<prefix>_" (`LIFTLOG_CLUSTER_PREFIX`, `cluster`).
    pub prefix: String,
    /// nginx listens on 127.0.0.1:port (`CLUSTER_PORT`, 9080).
    pub port: u16,
    /// The first node port (`CLUSTER_NODE_PORT`, port + 1).
    pub node_port: u16,
    /// Node counts per role, 1..=9 each (`CLUSTER_WRITERS`, `CLUSTER_CONSUMERS`, `CLUSTER_READERS`; 2 each).
    pub writers: u16,
    pub consumers: u16,
    pub readers: u16,
    /// Partition queues, the shards in cluster mode (`CLUSTER_PARTITIONS`, 12: a few per
    /// consumer, so that a join or a death moves some shards and keeps others put).
    pub partitions: u32,
    /// `flush.interval_ms` of the consumers (`CLUSTER_FLUSH_MS`, 1000).
    pub flush_ms: u64,
    /// `consumer.ack_after` of the consumers: `table`, `wal`, or None for the binary's
    /// default (`CLUSTER_ACK_AFTER`, `table`; set and empty means None).
    pub ack_after: Option<String>,
    /// Their `bus.amqp.prefetch` when `ack_after` is set (`CLUSTER_PREFETCH`, 20000).
    pub prefetch: u64,
    /// Extra flags for every node (`CLUSTER_NODE_ARGS`, split at whitespace).
    pub node_args: Vec<String>,
    /// `CLUSTER_BROKER`, `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub broker: String,
    /// `CLUSTER_DYNAMODB`, `http://127.0.0.1:${DYNAMODB_PORT:-8000}`.
    pub dynamodb: String,
    /// Bring the services up with the cluster (`CLUSTER_SERVICES=1`, the default); false:
    /// the broker and DynamoDB are someone else's.
    pub services: bool,
    /// The liftlog binary (`LIFTLOG_BIN`); None: `target/release/liftlog`, rebuilt when stale.
    pub bin: Option<PathBuf>,
    /// `RUST_LOG` of the nodes (`info`).
    pub node_log: String,
    /// Cluster mode (`CLUSTER_SHARDING=1`, the default): every node runs with
    /// `cluster.enabled`, its name as `cluster.node_id` and its own URL as
    /// `cluster.endpoint`; every consumer is active on the shards it holds, and nginx sends
    /// GETs to every node. 0: the single-active-consumer standby layout of before.
    pub sharding: bool,
    /// `cluster.lease_ms` in cluster mode (`CLUSTER_LEASE_MS`, 3000); the other lease
    /// timings follow from it (see [`lease_timings`]). Short, so that a test waits seconds
    /// for a dead owner's shards, not the production default's 10 s and more.
    pub lease_ms: u64,
    /// How long a process may take to become ready (`CLUSTER_TIMEOUT`, 60 s; not saved).
    pub timeout: Duration,
}

/// The saved names of the settings, and the environment variables they come from.
const KEYS: [(&str, &str); 18] = [
    ("PREFIX", "LIFTLOG_CLUSTER_PREFIX"),
    ("PORT", "CLUSTER_PORT"),
    ("NODE_PORT", "CLUSTER_NODE_PORT"),
    ("WRITERS", "CLUSTER_WRITERS"),
    ("CONSUMERS", "CLUSTER_CONSUMERS"),
    ("READERS", "CLUSTER_READERS"),
    ("PARTITIONS", "CLUSTER_PARTITIONS"),
    ("FLUSH_MS", "CLUSTER_FLUSH_MS"),
    ("ACK_AFTER", "CLUSTER_ACK_AFTER"),
    ("PREFETCH", "CLUSTER_PREFETCH"),
    ("NODE_ARGS", "CLUSTER_NODE_ARGS"),
    ("BROKER", "CLUSTER_BROKER"),
    ("DYNAMODB", "CLUSTER_DYNAMODB"),
    ("SERVICES", "CLUSTER_SERVICES"),
    ("BIN", "LIFTLOG_BIN"),
    ("NODE_LOG", "RUST_LOG"),
    ("SHARDING", "CLUSTER_SHARDING"),
    ("LEASE_MS", "CLUSTER_LEASE_MS"),
];

impl Settings {
    /// The defaults, with the state dir `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Settings {
        Settings::parse(dir.into(), &|_| None, None).expect("the defaults are valid")
    }

    /// The settings saved by `up` in `LIFTLOG_CLUSTER_DIR` if there are any, otherwise
    /// from the environment; `CLUSTER_TIMEOUT` always from the environment.
    pub fn from_env() -> Result<Settings> {
        let env = |name: &str| std::env::var(name).ok();
        let dir = env("LIFTLOG_CLUSTER_DIR").filter(|d| !d.is_empty()).unwrap_or_else(|| "/tmp/liftlog-cluster".into());
        let timeout = env("CLUSTER_TIMEOUT").filter(|t| !t.is_empty());
        if let Some(saved) = Settings::saved(Path::new(&dir), timeout.as_deref())? {
            return Ok(saved);
        }
        let lookup = |key: &str| {
            let var = KEYS.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)?;
            // An empty variable is the default, as `${VAR:-default}` was; except that an
            // empty CLUSTER_ACK_AFTER means the binary's default ack policy.
            env(var).filter(|v| key == "ACK_AFTER" || !v.is_empty())
        };
        Settings::parse(PathBuf::from(dir), &lookup, timeout.as_deref())
    }

    /// The settings an earlier `up` saved in `dir`, if any.
    pub fn saved(dir: &Path, timeout: Option<&str>) -> Result<Option<Settings>> {
        let path = dir.join(SAVED);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("read {}", path.display()))(e)),
        };
        let values: HashMap<&str, &str> = text.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split_once('=')).collect();
        let lookup = |key: &str| values.get(key).map(|v| v.to_string());
        Settings::parse(dir.to_path_buf(), &lookup, timeout).map(Some)
    }

    fn parse(dir: PathBuf, get: &dyn Fn(&str) -> Option<String>, timeout: Option<&str>) -> Result<Settings> {
        fn number<T: std::str::FromStr>(key: &str, value: Option<String>, default: T) -> Result<T> {
            let name = KEYS.iter().find(|(k, _)| *k == key).map_or(key, |(_, var)| *var);
            match value {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| Error::Setting(format!("{name} must be a number, got '{v}'"))),
            }
        }
        let port: u16 = number("PORT", get("PORT"), 9080)?;
        let ddb_port = std::env::var("DYNAMODB_PORT").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "8000".into());
        let s = Settings {
            prefix: get("PREFIX").unwrap_or_else(|| "cluster".into()),
            port,
            node_port: number("NODE_PORT", get("NODE_PORT"), port.saturating_add(1))?,
            writers: number("WRITERS", get("WRITERS"), 2)?,
            consumers: number("CONSUMERS", get("CONSUMERS"), 3)?,
            readers: number("READERS", get("READERS"), 2)?,
            partitions: number("PARTITIONS", get("PARTITIONS"), 12)?,
            flush_ms: number("FLUSH_MS", get("FLUSH_MS"), 1000)?,
            ack_after: match get("ACK_AFTER") {
                None => Some("table".into()),
                Some(a) if a.is_empty() => None,
                Some(a) => Some(a),
            },
            prefetch: number("PREFETCH", get("PREFETCH"), 20_000)?,
            node_args: get("NODE_ARGS").map(|a| a.split_whitespace().map(String::from).collect()).unwrap_or_default(),
            broker: get("BROKER").unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
            dynamodb: get("DYNAMODB").unwrap_or_else(|| format!("http://127.0.0.1:{ddb_port}")),
            services: get("SERVICES").is_none_or(|s| s == "1"),
            bin: get("BIN").filter(|b| !b.is_empty()).map(PathBuf::from),
            node_log: get("NODE_LOG").unwrap_or_else(|| "info".into()),
            sharding: get("SHARDING").is_none_or(|s| s == "1"),
            lease_ms: number("LEASE_MS", get("LEASE_MS"), 3_000)?,
            timeout: Duration::from_secs(number("CLUSTER_TIMEOUT", timeout.map(String::from), 60)?),
            dir,
        };
        s.validate()?;
        Ok(s)
    }

    /// Refuses what the cluster cannot be made of: a prefix that is not a queue and table
    /// name part, an unknown ack policy, node counts outside 1..=9, ports beyond 65535.
    pub fn validate(&self) -> Result<()> {
        let prefix_ok = !self.prefix.is_empty() && self.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !prefix_ok {
            return Err(Error::Setting(format!("LIFTLOG_CLUSTER_PREFIX must be letters, digits, '_', '.', '-': got '{}'", self.prefix)));
        }
        if let Some(a) = &self.ack_after {
            if a != "table" && a != "wal" {
                return Err(Error::Setting(format!("CLUSTER_ACK_AFTER must be table, wal or empty: got '{a}'")));
            }
        }
        if ![self.writers, self.consumers, self.readers].iter().all(|n| (1..=9).contains(n)) {
            return Err(Error::Setting("node counts must be 1..9 per role".into()));
        }
        if u32::from(self.node_port) + 20 + 8 + 50 > u32::from(u16::MAX) {
            return Err(Error::Setting(format!("CLUSTER_NODE_PORT {} leaves no room for the node and admin ports", self.node_port)));
        }
        if self.sharding && self.ack_after.as_deref() != Some("table") {
            return Err(Error::Setting("cluster mode (CLUSTER_SHARDING=1) needs CLUSTER_ACK_AFTER=table".into()));
        }
        if self.lease_ms < 600 {
            return Err(Error::Setting(format!("CLUSTER_LEASE_MS must be at least 600, got {}", self.lease_ms)));
        }
        if [&self.prefix, &self.broker, &self.dynamodb, &self.node_log].iter().any(|v| v.contains('\n')) {
            return Err(Error::Setting("settings cannot contain a newline".into()));
        }
        Ok(())
    }

    fn count(&self, role: Role) -> u16 {
        match role {
            Role::Write => self.writers,
            Role::Consume => self.consumers,
            Role::Read => self.readers,
        }
    }

    fn count_mut(&mut self, role: Role) -> &mut u16 {
        match role {
            Role::Write => &mut self.writers,
            Role::Consume => &mut self.consumers,
            Role::Read => &mut self.readers,
        }
    }

    /// The text of `cluster.env`.
    fn to_saved(&self) -> String {
        let bin = self.bin.as_ref().map(|b| b.display().to_string()).unwrap_or_default();
        let values = [
            self.prefix.clone(),
            self.port.to_string(),
            self.node_port.to_string(),
            self.writers.to_string(),
            self.consumers.to_string(),
            self.readers.to_string(),
            self.partitions.to_string(),
            self.flush_ms.to_string(),
            self.ack_after.clone().unwrap_or_default(),
            self.prefetch.to_string(),
            self.node_args.join(" "),
            self.broker.clone(),
            self.dynamodb.clone(),
            if self.services { "1" } else { "0" }.to_string(),
            bin,
            self.node_log.clone(),
            if self.sharding { "1" } else { "0" }.to_string(),
            self.lease_ms.to_string(),
        ];
        let mut text = String::from("# written by `cluster up`; read by the other cluster commands\n");
        for ((key, _), value) in KEYS.iter().zip(values) {
            text.push_str(&format!("{key}={value}\n"));
        }
        text
    }
}

/// The `[cluster]` timings of a node in cluster mode, from the lease alone, as
/// `(key, ms)`: renew every third of the lease and a request timeout of a sixth, so that
/// an owner survives one failed renewal before it fences itself a quarter lease before
/// expiry (the keeper refuses `renew + call_timeout > lease - margin` and
/// `call_timeout > renew`); a scan every sixth, so that an expiry is noticed soon after it
/// happens; a hand-off may take three leases before the keeper releases anyway. With the
/// default 3000: renew 1000, call timeout 500, margin 750, scan 500, hand-off 9000.
pub fn lease_timings(lease_ms: u64) -> [(&'static str, u64); 6] {
    [
        ("lease_ms", lease_ms),
        ("renew_ms", lease_ms / 3),
        ("scan_ms", lease_ms / 6),
        ("safety_margin_ms", lease_ms / 4),
        ("call_timeout_ms", lease_ms / 6),
        ("handoff_timeout_ms", lease_ms * 3),
    ]
}

/// One line of [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// A node name, or `nginx`.
    pub name: String,
    /// The node's role, `lb` for nginx.
    pub role: &'static str,
    pub port: u16,
    /// None: no process of ours runs.
    pub pid: Option<u32>,
    /// The status of its `/ready` (through nginx for nginx: the whole GET path); 0 if no
    /// answer. None when it is down.
    pub ready: Option<u16>,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.pid.is_some() && self.ready == Some(200)
    }
}

/// Every node and nginx, and the services when the cluster brought them.
#[derive(Debug, Clone)]
pub struct Status {
    pub rows: Vec<Row>,
    pub services: Option<crate::services::Status>,
}

impl Status {
    /// True if every process runs and is ready.
    pub fn ok(&self) -> bool {
        self.rows.iter().all(Row::ok) && self.services.as_ref().is_none_or(|s| s.ok())
    }

    pub fn row(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.name == name)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<10} {:<8} {:<6} {:<8} READY", "NODE", "ROLE", "PORT", "PID")?;
        for r in &self.rows {
            let pid = r.pid.map_or_else(|| "-".into(), |p| p.to_string());
            let ready = r.ready.map_or_else(|| "down".into(), |c| format!("{c:03}"));
            writeln!(f, "{:<10} {:<8} {:<6} {:<8} {ready}", r.name, r.role, r.port, pid)?;
        }
        if let Some(s) = &self.services {
            writeln!(f, "{s}")?;
        }
        Ok(())
    }
}

/// A local cluster: its settings, and the node processes this value started (reaped when
/// they stop, so that none is left a zombie in a long-running test process).
pub struct Cluster {
    settings: Settings,
    children: HashMap<String, Child>,
    /// Whether the binary has `--admin-listen` (it runs binaries older than that flag).
    admin_listener: OnceLock<bool>,
}

impl Cluster {
    /// A cluster with these settings (nothing is started yet).
    pub fn new(settings: Settings) -> Result<Cluster> {
        settings.validate()?;
        Ok(Cluster { settings, children: HashMap::new(), admin_listener: OnceLock::new() })
    }

    /// The cluster [`Settings::from_env`] describes.
    pub fn from_env() -> Result<Cluster> {
        Cluster::new(Settings::from_env()?)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The entry point, e.g. `http://127.0.0.1:9080`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.settings.port)
    }

    /// True once `up` saved its settings (until `down`).
    pub fn is_up(&self) -> bool {
        self.settings.dir.join(SAVED).is_file()
    }

    /// The nodes in start order: consumers first (in cluster mode they share out the
    /// shards before rides arrive; without it the first one to attach is the active
    /// consumer of every partition), then writers, then readers.
    pub fn nodes(&self) -> Vec<Node> {
        [Role::Consume, Role::Write, Role::Read].into_iter().flat_map(|role| self.nodes_of(role)).collect()
    }

    /// The nodes of one role, in order.
    pub fn nodes_of(&self, role: Role) -> Vec<Node> {
        (1..=self.settings.count(role))
            .map(|i| {
                let port = self.settings.node_port + role.offset() + i - 1;
                Node { name: format!("{}-{i}", role.name()), role, port, admin_port: port + 50 }
            })
            .collect()
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<Node> {
        let all = self.nodes();
        all.iter().find(|n| n.name == name).cloned().ok_or_else(|| Error::NoSuchNode {
            name: name.to_string(),
            known: all.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(" "),
        })
    }

    /// The base URL of a node's public listener.
    pub fn node_url(&self, name: &str) -> Result<String> {
        Ok(format!("http://127.0.0.1:{}", self.node(name)?.port))
    }

    /// The base URL of a node's `/admin/*` and `/metrics`: its own loopback listener when
    /// the binary has `--admin-listen`, its public one otherwise.
    pub fn admin_url(&self, name: &str) -> Result<String> {
        let node = self.node(name)?;
        let port = if self.has_admin_listener()? { node.admin_port } else { node.port };
        Ok(format!("http://127.0.0.1:{port}"))
    }

    /// The last `lines` lines of a node's log, or nginx's error log for `nginx`.
    pub fn logs(&self, name: &str, lines: usize) -> Result<String> {
        let path =
            if name == "nginx" { self.nginx().dir.join("error.log") } else { self.node_dir(&self.node(name)?.name).join("node.log") };
        if !path.is_file() {
            return Err(Error::Failed(format!("no log at {}", path.display())));
        }
        Ok(process::tail(&path, lines))
    }

    /// Starts everything that is not running yet and waits until it is ready.
    pub fn up(&mut self) -> Result<()> {
        let _lock = self.lock()?;
        Nginx::install(&self.settings.dir)?;
        self.services_up()?;
        self.resolve_binary()?;
        self.save()?;
        self.create_tables()?;
        for node in self.nodes() {
            self.start_node(&node)?;
        }
        self.start_nginx()?;
        log(TAG, format!("up: {} (state: {}, prefix: {})", self.url(), self.settings.dir.display(), self.settings.prefix));
        Ok(())
    }

    /// Stops only what `up` started: nginx, the nodes (writers and readers first, then the
    /// consumers, standbys before the active one, each with its final flush), and the
    /// services if `up` had to start them. `purge` also deletes the cluster's queues on the
    /// broker and its state dir.
    pub fn down(&mut self, purge: bool) -> Result<()> {
        let _lock = self.lock()?;
        let dir = self.settings.dir.clone();
        if !self.is_up() {
            log(TAG, format!("nothing was started in {}", dir.display()));
            if purge {
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Ok(());
        }
        self.nginx().stop();
        let nodes = self.nodes();
        let mut result = Ok(());
        let order = nodes.iter().filter(|n| n.role != Role::Consume).chain(nodes.iter().rev().filter(|n| n.role == Role::Consume));
        for node in order {
            // One node that does not die must not leave the others running.
            if let Err(e) = self.stop_node(node, Stop::Term) {
                warn(TAG, &e);
                result = Err(e);
            }
        }
        if purge {
            self.purge_queues();
        }
        self.services_down();
        process::remove(&dir.join(SAVED));
        if purge {
            let _ = std::fs::remove_dir_all(&dir);
            log(TAG, format!("down: stopped and purged {}", dir.display()));
        } else {
            log(TAG, format!("down: stopped (data dirs and logs kept in {})", dir.display()));
        }
        result
    }

    /// One line per node and nginx with its `/ready` answer, and the services'.
    pub fn status(&self) -> Result<Status> {
        if !self.is_up() {
            return Err(Error::NotUp(self.settings.dir.clone()));
        }
        let mut rows: Vec<Row> = self
            .nodes()
            .into_iter()
            .map(|n| {
                let pid = self.node_pid(&n);
                let ready = pid.map(|_| http_status(&format!("http://127.0.0.1:{}/ready", n.port), Duration::from_secs(2)));
                Row { name: n.name, role: n.role.name(), port: n.port, pid, ready }
            })
            .collect();
        let pid = self.nginx().pid();
        // /ready through nginx reaches a read node: the whole GET path answers.
        let ready = pid.map(|_| http_status(&format!("{}/ready", self.url()), Duration::from_secs(2)));
        rows.push(Row { name: "nginx".into(), role: "lb", port: self.settings.port, pid, ready });
        let services = if self.settings.services { Some(Services::from_env()?.status()?) } else { None };
        Ok(Status { rows, services })
    }

    /// Stops one node (SIGTERM and wait, or SIGKILL).
    pub fn stop(&mut self, name: &str, how: Stop) -> Result<()> {
        let node = self.node(name)?;
        let _lock = self.lock_up()?;
        self.stop_node(&node, how)
    }

    /// Starts one node again (same port, same data dir), waits for `/ready` and for nginx
    /// to take it back.
    pub fn start(&mut self, name: &str) -> Result<()> {
        let node = self.node(name)?;
        let _lock = self.lock_up()?;
        self.start_node(&node)?;
        self.back_in_pool();
        Ok(())
    }

    /// Stop (SIGTERM), then start: a rolling restart is this, node by node.
    pub fn restart(&mut self, name: &str) -> Result<()> {
        let node = self.node(name)?;
        let _lock = self.lock_up()?;
        self.stop_node(&node, Stop::Term)?;
        self.start_node(&node)?;
        self.back_in_pool();
        Ok(())
    }

    /// Freezes one node with SIGSTOP: it keeps its sockets and its leases' rows but runs
    /// no code, as a long GC pause or a stalled VM would. [`Cluster::resume`] thaws it.
    pub fn pause(&mut self, name: &str) -> Result<()> {
        self.signal_node(name, "STOP")
    }

    /// SIGCONT to a node frozen by [`Cluster::pause`].
    pub fn resume(&mut self, name: &str) -> Result<()> {
        self.signal_node(name, "CONT")
    }

    /// Adds one more node of `role` (the next number, e.g. `consume-4`), starts it, waits for
    /// `/ready` and reloads nginx so that it gets its share of requests; the count is saved,
    /// so later commands and `down` know it. Returns the node.
    pub fn add(&mut self, role: Role) -> Result<Node> {
        let _lock = self.lock_up()?;
        if self.settings.count(role) >= 9 {
            return Err(Error::Setting(format!("{} nodes: at most 9", role.name())));
        }
        *self.settings.count_mut(role) += 1;
        let node = self.nodes_of(role).pop().expect("a node of the role just counted");
        self.save()?;
        self.start_node(&node)?;
        self.start_nginx()?;
        Ok(node)
    }

    /// `GET <admin url><path>` of a node (e.g. `/admin/cluster`, `/admin/wal`) as JSON,
    /// within 5 s. Err if the node does not answer 200 with JSON (down, frozen, or a binary
    /// without that route).
    pub fn admin(&self, name: &str, path: &str) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.admin_url(name)?);
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
        let body = match agent.get(&url).call() {
            Ok(r) => r.into_string().map_err(Error::io(format!("read {url}")))?,
            Err(ureq::Error::Status(code, _)) => return Err(Error::Failed(format!("{name}: GET {path}: {code}"))),
            Err(ureq::Error::Transport(t)) => return Err(Error::Failed(format!("{name}: GET {path}: {t}"))),
        };
        serde_json::from_str(&body).map_err(|e| Error::Failed(format!("{name}: GET {path}: not JSON ({e})")))
    }

    // ----------------------------------------------------------------- helpers ---

    fn signal_node(&mut self, name: &str, signal: &str) -> Result<()> {
        let node = self.node(name)?;
        let _lock = self.lock_up()?;
        let pid = self.node_pid(&node).ok_or_else(|| Error::Failed(format!("{name}: not running")))?;
        log(TAG, format!("{name}: SIG{signal} {pid}"));
        if !process::signal(pid, signal) {
            return Err(Error::Failed(format!("{name}: kill -s {signal} {pid} failed")));
        }
        Ok(())
    }

    fn lock(&self) -> Result<StateLock> {
        StateLock::take(&self.settings.dir, "cluster command")
    }

    /// The lock of a command on one node, which needs a cluster that is up and its binary.
    fn lock_up(&mut self) -> Result<StateLock> {
        let lock = self.lock()?;
        if !self.is_up() {
            return Err(Error::NotUp(self.settings.dir.clone()));
        }
        if self.settings.bin.is_none() {
            self.resolve_binary()?;
        }
        Ok(lock)
    }

    fn save(&self) -> Result<()> {
        let path = self.settings.dir.join(SAVED);
        let tmp = path.with_extension("env.tmp");
        std::fs::write(&tmp, self.settings.to_saved()).map_err(Error::io(format!("write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(Error::io(format!("rename {}", tmp.display())))
    }

    fn bin(&self) -> Result<&Path> {
        self.settings.bin.as_deref().ok_or_else(|| Error::NotUp(self.settings.dir.clone()))
    }

    fn has_admin_listener(&self) -> Result<bool> {
        let bin = self.bin()?;
        Ok(*self.admin_listener.get_or_init(|| {
            let help = Command::new(bin).args(["serve", "--help"]).stdin(Stdio::null()).stderr(Stdio::null()).output();
            help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--admin-listen"))
        }))
    }

    /// The binary to run: `bin` if set, else `target/release/liftlog`, built with
    /// `cargo build --release -p liftlog --locked` when missing or older than its sources.
    fn resolve_binary(&mut self) -> Result<()> {
        if let Some(bin) = &self.settings.bin {
            use std::os::unix::fs::PermissionsExt as _;
            let executable = bin.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
            return if executable { Ok(()) } else { Err(Error::Setting(format!("LIFTLOG_BIN={} is not an executable", bin.display()))) };
        }
        let root = repo_root();
        let target = std::env::var("CARGO_TARGET_DIR").ok().filter(|t| !t.is_empty()).map_or_else(|| root.join("target"), |t| root.join(t));
        let bin = target.join("release/liftlog");
        let sources = ["src", "wal/src", "Cargo.toml", "Cargo.lock", "wal/Cargo.toml"].map(|p| root.join(p));
        let built = bin.metadata().and_then(|m| m.modified()).ok();
        if built.is_some_and(|t| !sources.iter().any(|s| newer_than(s, t))) {
            log(TAG, format!("binary: {} (up to date)", bin.display()));
        } else {
            log(TAG, "binary: cargo build --release -p liftlog");
            let ok = process::command("cargo").args(["build", "--release", "-p", "liftlog", "--locked"]).current_dir(&root).status();
            if !ok.is_ok_and(|s| s.success()) {
                return Err(Error::Failed("cargo build failed".into()));
            }
        }
        self.settings.bin = Some(bin);
        Ok(())
    }

    fn create_tables(&self) -> Result<()> {
        let s = &self.settings;
        let bin = self.bin()?;
        log(TAG, format!("tables: {} tables create (prefix {}_)", bin.display(), s.prefix));
        let log_path = s.dir.join("tables-create.log");
        let mut cmd = Command::new(bin);
        cmd.args(["tables", "create", "--dynamodb-endpoint", &s.dynamodb, "--set", &format!("tables.prefix={}_", s.prefix), "--data-dir"])
            .arg(s.dir.join("tables-create"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        if !process::logged(&mut cmd, &log_path)? {
            return Err(Error::failed("tables create failed", &[&log_path]));
        }
        Ok(())
    }

    fn services_up(&self) -> Result<()> {
        let s = &self.settings;
        if !s.services {
            log(TAG, format!("services: CLUSTER_SERVICES=0, using {} and {} as they are", s.broker, s.dynamodb));
            return Ok(());
        }
        let services = Services::from_env()?;
        let mark = s.dir.join(SERVICES_MARK);
        let before = services.status().ok();
        if mark.is_file() {
            log(TAG, "services: started by an earlier 'up' of this cluster");
            services.up()
        } else if before.as_ref().is_some_and(|st| st.ok()) {
            log(TAG, "services: RabbitMQ and DynamoDB Local already running (down leaves them)");
            Ok(())
        } else {
            services.up()?;
            // Ours to stop only if neither was running: `services down` stops whatever its
            // state dir started, and a DynamoDB Local another run started there (seen as
            // down by a status check that lost a race on a loaded machine) must outlive us.
            if before.is_some_and(|st| !st.rabbitmq_up && !st.dynamodb_up) {
                std::fs::write(&mark, "").map_err(Error::io(format!("write {}", mark.display())))
            } else {
                log(TAG, "services: partly running before 'up' (down leaves them)");
                Ok(())
            }
        }
    }

    fn services_down(&self) {
        let mark = self.settings.dir.join(SERVICES_MARK);
        if !mark.is_file() {
            log(TAG, "services: not started by this cluster; left running");
            return;
        }
        log(TAG, "services: this cluster started them; services down");
        if let Err(e) = Services::from_env().and_then(|s| s.down()) {
            warn(TAG, format!("services down failed: {e}"));
        }
        process::remove(&mark);
    }

    /// Deletes the cluster's quorum queues on a local broker (they outlive the nodes).
    fn purge_queues(&self) {
        let prefix = &self.settings.prefix;
        if process::tool("rabbitmqctl").is_none() {
            warn(TAG, format!("rabbitmqctl not found: queues {prefix}.rides.* left on the broker"));
            return;
        }
        let queues = (0..self.settings.partitions).map(|p| format!("{prefix}.rides.{p}")).chain([format!("{prefix}.rides.dead")]);
        for q in queues {
            process::quietly(process::command("rabbitmqctl").args(["-q", "delete_queue", &q]));
        }
        log(
            TAG,
            format!("purge: deleted queues {prefix}.rides.{{0..{}}} and {prefix}.rides.dead", self.settings.partitions.saturating_sub(1)),
        );
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        self.settings.dir.join("nodes").join(name)
    }

    /// The pid of a node this cluster started, if it is alive.
    fn node_pid(&self, node: &Node) -> Option<u32> {
        let dir = self.node_dir(&node.name);
        let pid = process::read_pid(&dir.join("pid"))?;
        (process::pid_alive(pid) && process::cmdline_has(pid, &dir.join("data").display().to_string())).then_some(pid)
    }

    fn ready(&self, node: &Node) -> bool {
        http_status(&format!("http://127.0.0.1:{}/ready", node.port), Duration::from_secs(2)) == 200
    }

    /// The flags of a node: the same for every process of the cluster but role, port and
    /// data dir.
    fn node_args(&self, node: &Node) -> Result<Vec<String>> {
        let s = &self.settings;
        let data = self.node_dir(&node.name).join("data").display().to_string();
        let mut args: Vec<String> = [
            "serve",
            "--role",
            node.role.name(),
            "--listen",
            &format!("127.0.0.1:{}", node.port),
            "--data-dir",
            &data,
            "--broker",
            &s.broker,
            "--dynamodb-endpoint",
            &s.dynamodb,
            "--set",
            &format!("bus.amqp.prefix={}", s.prefix),
            "--set",
            &format!("tables.prefix={}_", s.prefix),
            "--set",
            &format!("bus.amqp.partitions={}", s.partitions),
            "--set",
            &format!("flush.interval_ms={}", s.flush_ms),
        ]
        .map(String::from)
        .into();
        if self.has_admin_listener()? {
            args.extend(["--admin-listen".into(), format!("127.0.0.1:{}", node.admin_port)]);
        }
        // Consumers ack after the tables hold a batch (ack_after = table): the standby on
        // the same queues takes over exactly without the active one's WAL, as on separate
        // machines. Acks then wait up to a flush interval, so the prefetch is raised to keep
        // rides flowing.
        if let (Role::Consume, Some(ack_after)) = (node.role, &s.ack_after) {
            args.extend([
                "--set".into(),
                format!("consumer.ack_after={ack_after}"),
                "--set".into(),
                format!("bus.amqp.prefetch={}", s.prefetch),
            ]);
        }
        if s.sharding {
            let mut set = |key: &str, value: String| args.extend(["--set".into(), format!("cluster.{key}={value}")]);
            set("enabled", "true".into());
            set("node_id", node.name.clone());
            set("endpoint", format!("http://127.0.0.1:{}", node.port));
            for (key, ms) in lease_timings(s.lease_ms) {
                set(key, ms.to_string());
            }
        }
        args.extend(s.node_args.iter().cloned());
        Ok(args)
    }

    fn start_node(&mut self, node: &Node) -> Result<()> {
        let name = &node.name;
        if let Some(pid) = self.node_pid(node) {
            log(TAG, format!("{name}: already running (pid {pid}, :{})", node.port));
            return Ok(());
        }
        // A child of ours that died (kill -9) is reaped here at the latest.
        if let Some(mut old) = self.children.remove(name) {
            let _ = old.try_wait();
        }
        for url in [format!("http://127.0.0.1:{}", node.port), self.admin_url(name)?] {
            if http_status(&format!("{url}/health"), Duration::from_secs(2)) != 0 {
                let port = url.rsplit(':').next().unwrap_or_default();
                return Err(Error::Failed(format!("{name}: {port} is taken by a process this cluster did not start")));
            }
        }
        let dir = self.node_dir(name);
        process::mkdir(&dir.join("data"))?;
        let pid_file = dir.join("pid");
        process::remove(&pid_file);
        let args = self.node_args(node)?;
        let bin = self.bin()?.to_path_buf();
        let log_path = dir.join("node.log");
        let file = process::append(&log_path)?;
        {
            use std::io::Write as _;
            let _ = writeln!(&file, "\n=== {}: {} {}", process::timestamp(), bin.display(), args.join(" "));
        }
        let (out, err) = process::both(&file)?;
        // A process group of its own: it outlives the command that started it, and a
        // Ctrl-C meant for that command does not reach it.
        let child = {
            use std::os::unix::process::CommandExt as _;
            Command::new(&bin)
                .args(&args)
                .env("RUST_LOG", &self.settings.node_log)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| Error::failed(format!("{name}: did not start: {e}"), &[&log_path]))?
        };
        let pid = child.id();
        self.children.insert(name.clone(), child);
        process::write_pid(&pid_file, pid)?;
        let deadline = Instant::now() + self.settings.timeout;
        while !self.ready(node) {
            if !process::pid_alive(pid) {
                return Err(Error::failed(format!("{name}: exited during start-up (log: {})", log_path.display()), &[&log_path]));
            }
            if Instant::now() >= deadline {
                return Err(Error::failed(
                    format!(
                        "{name}: not ready on :{} after {}s (pid {pid} left running; log: {})",
                        node.port,
                        self.settings.timeout.as_secs(),
                        log_path.display()
                    ),
                    &[&log_path],
                ));
            }
            std::thread::sleep(POLL);
        }
        log(TAG, format!("{name}: ready on http://127.0.0.1:{} (pid {pid}, {})", node.port, node.role.name()));
        Ok(())
    }

    fn stop_node(&mut self, node: &Node, how: Stop) -> Result<()> {
        let name = &node.name;
        let pid_file = self.node_dir(name).join("pid");
        let Some(pid) = self.node_pid(node) else {
            process::remove(&pid_file);
            log(TAG, format!("{name}: not running"));
            return Ok(());
        };
        let signal = match how {
            Stop::Kill => {
                log(TAG, format!("{name}: kill -9 {pid}"));
                "KILL"
            }
            Stop::Term => {
                log(TAG, format!("{name}: SIGTERM {pid}"));
                "TERM"
            }
        };
        // A node frozen with SIGSTOP acts on SIGTERM only once it runs again (SIGKILL
        // needs no help).
        let frozen = process::pid_stopped(pid);
        if !process::stop_pid_resuming(TAG, name, pid, signal, frozen, STOP_WITHIN) {
            return Err(Error::Failed(format!("{name}: pid {pid} does not die")));
        }
        if let Some(mut child) = self.children.remove(name) {
            let _ = child.wait();
        }
        process::remove(&pid_file);
        log(TAG, format!("{name}: stopped"));
        Ok(())
    }

    fn nginx(&self) -> Nginx {
        Nginx { dir: self.settings.dir.join("nginx"), port: self.settings.port, timeout: self.settings.timeout }
    }

    /// Renders nginx's config for the nodes there are now and starts it (or reloads it).
    /// POSTs go to the write nodes; GETs to the write nodes (the template puts them in the
    /// GET pool itself) and the read nodes, and in cluster mode to the consumers too: every
    /// node answers a GET from the owner of the day's shard.
    fn start_nginx(&self) -> Result<()> {
        let ports = |role| self.nodes_of(role).iter().map(|n| n.port).collect::<Vec<_>>();
        let mut get_ports = ports(Role::Read);
        if self.settings.sharding {
            get_ports.splice(0..0, ports(Role::Consume));
        }
        self.nginx().start(&ports(Role::Write), &get_ports)
    }

    /// nginx takes a node that failed back only after its fail_timeout (2 s): a rolling
    /// restart that moved on earlier could find every node of a pool marked down (502).
    /// This is the local twin of waiting for the ALB's healthy threshold.
    fn back_in_pool(&self) {
        if self.nginx().pid().is_some() {
            std::thread::sleep(BACK_IN_POOL);
        }
    }
}

/// True if `path`, or any file under it, was modified after `t`.
fn newer_than(path: &Path, t: SystemTime) -> bool {
    let Ok(meta) = path.metadata() else {
        return false;
    };
    if meta.modified().is_ok_and(|m| m > t) {
        return true;
    }
    meta.is_dir() && std::fs::read_dir(path).is_ok_and(|entries| entries.filter_map(|e| e.ok()).any(|e| newer_than(&e.path(), t)))
}

/// A base port P for a cluster such that P (nginx), the node ports from P+1 and their
/// admin ports (50 above) are all free on 127.0.0.1: for tests that each bring up a
/// cluster of their own. In 20000..32700, below Linux's ephemeral range (32768..): a port
/// found free there can be taken by any outgoing connection on the machine before the
/// node binds it (a write node exited at start-up once in four runs of the cluster tests
/// with its base at 33700, the machine shared with other test runs).
pub fn free_base_port() -> Result<u16> {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    for attempt in 0..200u128 {
        let base = 20_000 + ((seed / 1000 + attempt * 7919) % 127) as u16 * 100;
        if (0..80).all(|i| free(base + i)) {
            return Ok(base);
        }
    }
    Err(Error::Failed("no free range of 80 ports found".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_start_consumers_first_and_take_the_documented_ports() {
        let c = Cluster::new(Settings::new("/tmp/x")).unwrap();
        let names: Vec<String> = c.nodes().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["consume-1", "consume-2", "consume-3", "write-1", "write-2", "read-1", "read-2"]);
        let port = |n: &str| c.node(n).unwrap().port;
        assert_eq!((port("write-1"), port("write-2"), port("consume-1"), port("read-2")), (9081, 9082, 9091, 9102));
        assert_eq!(c.node("read-1").unwrap().admin_port, 9151);
        let err = c.node("write-3").unwrap_err().to_string();
        assert!(err.contains("no such node: write-3") && err.contains("consume-1"), "{err}");
        assert!(c.node("nginx").is_err() && c.node("write-").is_err());
    }

    #[test]
    fn saved_settings_read_back_as_they_were() {
        let dir = std::env::temp_dir().join(format!("testkit-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = Settings::new(&dir);
        s.prefix = "c123".into();
        s.port = 23000;
        s.node_port = 23001;
        s.ack_after = None;
        s.sharding = false;
        s.lease_ms = 6_000;
        s.node_args = vec!["--set".into(), "http.workers=2".into()];
        s.bin = Some("/bin/true".into());
        s.services = false;
        std::fs::write(dir.join(SAVED), s.to_saved()).unwrap();
        let back = Settings::saved(&dir, None).unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn bad_settings_are_refused_with_their_name() {
        let bad = |s: Settings| s.validate().unwrap_err().to_string();
        assert!(bad(Settings { prefix: "a b".into(), ..Settings::new("/d") }).contains("LIFTLOG_CLUSTER_PREFIX"));
        assert!(bad(Settings { ack_after: Some("never".into()), ..Settings::new("/d") }).contains("CLUSTER_ACK_AFTER"));
        assert!(bad(Settings { writers: 10, ..Settings::new("/d") }).contains("1..9"));
        assert!(bad(Settings { node_port: 65_500, ..Settings::new("/d") }).contains("CLUSTER_NODE_PORT"));
        assert!(bad(Settings { ack_after: Some("wal".into()), ..Settings::new("/d") }).contains("CLUSTER_SHARDING"));
        assert!(bad(Settings { lease_ms: 100, ..Settings::new("/d") }).contains("CLUSTER_LEASE_MS"));
        let lookup = |k: &str| (k == "PORT").then(|| "90x".to_string());
        let err = Settings::parse("/d".into(), &lookup, None).unwrap_err().to_string();
        assert_eq!(err, "CLUSTER_PORT must be a number, got '90x'");
    }

    #[test]
    fn cluster_mode_gives_each_node_its_id_endpoint_and_timings_the_keeper_accepts() {
        let mut c = Cluster::new(Settings { bin: Some("/bin/true".into()), ..Settings::new("/tmp/x") }).unwrap();
        c.admin_listener.set(true).unwrap();
        let node = c.node("consume-2").unwrap();
        let args = c.node_args(&node).unwrap().join(" ");
        for want in ["cluster.enabled=true", "cluster.node_id=consume-2", "cluster.endpoint=http://127.0.0.1:9092", "cluster.lease_ms=3000"]
        {
            assert!(args.contains(want), "{want} missing in {args}");
        }
        assert!(args.contains("consumer.ack_after=table") && args.contains("bus.amqp.partitions=12"), "{args}");
        for lease in [600, 3_000, 10_000] {
            let t: HashMap<&str, u64> = lease_timings(lease).into_iter().collect();
            assert!(t["renew_ms"] + t["call_timeout_ms"] <= lease - t["safety_margin_ms"], "{lease}: {t:?}");
            assert!(t["call_timeout_ms"] <= t["renew_ms"] && t["scan_ms"] > 0, "{lease}: {t:?}");
        }
        c.settings.sharding = false;
        let args = c.node_args(&node).unwrap().join(" ");
        assert!(!args.contains("cluster."), "{args}");
    }
}
