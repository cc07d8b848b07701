//! Test support: run the real `liftlog` binary as a child process in a temp dir and talk
//! HTTP to it.
#![allow(dead_code)]

pub mod leases;
pub mod proxy;
pub mod raw;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use liftlog::domain::DayKey;

pub struct Server {
    pub child: Child,
    pub base: String,
    /// The admin listener, when the server was given one of its own.
    pub admin: Option<String>,
    pub data_dir: PathBuf,
    args: Vec<String>,
}

impl Server {
    /// Starts `liftlog serve` on a free loopback port with `data_dir` and extra flags.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// Like `start`, with extra environment variables (fault injection).
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::start_logged(data_dir, extra, env, None)
    }

    /// Like `start_with_env`; with `log` = (file, filter), the node's log goes to that file at
    /// that `RUST_LOG` filter instead of this test's stderr.
    pub fn start_logged(data_dir: &Path, extra: &[&str], env: &[(&str, &str)], log: Option<(&Path, &str)>) -> Server {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // Tests reach the admin routes on the same port unless a test asks otherwise
        // (the default, a loopback port of its own, would collide between parallel tests).
        if !args.iter().any(|a| a == "--admin-listen") {
            args.extend(["--admin-listen".to_string(), "main".to_string()]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_liftlog"))
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(&args)
            .env("RUST_LOG", log.map_or_else(|| std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()), |(_, f)| f.to_string()))
            .stdout(Stdio::piped())
            .stderr(log.map_or_else(Stdio::inherit, |(path, _)| std::fs::File::create(path).expect("log file").into()))
            .spawn()
            .expect("spawn liftlog");
        let stdout = child.stdout.take().expect("stdout");
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read the listening line");
        let own_admin = args.windows(2).any(|w| w[0] == "--admin-listen" && w[1] != "main");
        let admin = own_admin.then(|| {
            let mut l = String::new();
            stdout.read_line(&mut l).expect("read the admin line");
            l.trim().strip_prefix("liftlog admin on ").unwrap_or_else(|| panic!("unexpected admin line {l:?}")).to_string()
        });
        let base =
            line.trim().strip_prefix("liftlog listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
        Server { child, base, admin, data_dir: data_dir.to_path_buf(), args }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        self.child.wait().ok().and_then(|s| s.code())
    }

    pub fn restart(&mut self) {
        let extra: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let fresh = Server::start(&self.data_dir, &extra);
        *self = fresh;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(15)).build()
}

/// Status and body of any request; transport errors are status 0.
pub fn call(agent: &ureq::Agent, method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, String) {
    let mut req = agent.request(method, url);
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let res = match body {
        Some(b) => req.send_string(b),
        None => req.call(),
    };
    match res {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(ureq::Error::Transport(t)) => {
            if std::env::var("TEST_VERBOSE").is_ok() {
                eprintln!("transport error on {method} {url}: {t}");
            }
            (0, String::new())
        }
    }
}

pub fn get(agent: &ureq::Agent, url: &str) -> (u16, String) {
    call(agent, "GET", url, &[], None)
}

/// A ride as a client sends it: the resort-day of its path, the skier, its body, and the
/// `Idempotency-Key` it is sent with (none when empty).
#[derive(Clone, Debug)]
pub struct Ride {
    pub at: DayKey,
    pub skier: u32,
    pub time: u16,
    pub lift: u16,
    pub key: String,
}

impl Ride {
    pub fn path(&self) -> String {
        let DayKey { resort, season, day } = self.at;
        format!("/skiers/{resort}/seasons/{season}/days/{day}/skiers/{}", self.skier)
    }
    pub fn body(&self) -> String {
        format!("{{\"time\":{},\"liftID\":{}}}", self.time, self.lift)
    }
    pub fn post(&self, agent: &ureq::Agent, base: &str) -> u16 {
        call(
            agent,
            "POST",
            &format!("{base}{}", self.path()),
            &[("Content-Type", "application/json"), ("Idempotency-Key", &self.key)],
            Some(&self.body()),
        )
        .0
    }
}

/// What the rides a client got 201 for must add up to (default catalog: vertical = lift × 10).
#[derive(Default)]
pub struct Expected {
    pub day_skiers: std::collections::BTreeMap<(u32, u16, u16), std::collections::BTreeSet<u32>>,
    pub skier_day: std::collections::BTreeMap<(u32, u16, u16, u32), u64>,
    pub skier_season: std::collections::BTreeMap<(u32, u32, u16), u64>,
}

impl Expected {
    pub fn from(rides: &[Ride]) -> Expected {
        let mut e = Expected::default();
        for r in rides {
            let (v, DayKey { resort, season, day }) = (r.lift as u64 * 10, r.at);
            e.day_skiers.entry((resort, season, day)).or_default().insert(r.skier);
            *e.skier_day.entry((resort, season, day, r.skier)).or_default() += v;
            *e.skier_season.entry((r.skier, resort, season)).or_default() += v;
        }
        e
    }

    /// Compares every figure with what the server answers; returns the mismatches.
    pub fn check(&self, agent: &ureq::Agent, base: &str) -> Vec<String> {
        let mut bad = Vec::new();
        for ((resort, season, day), skiers) in &self.day_skiers {
            let (code, body) = get(agent, &format!("{base}/resorts/{resort}/seasons/{season}/day/{day}/skiers"));
            let n = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["numSkiers"].as_u64());
            if code != 200 || n != Some(skiers.len() as u64) {
                bad.push(format!("day {resort}/{season}/{day}: got {code} {body}, want {}", skiers.len()));
            }
        }
        for ((resort, season, day, skier), v) in &self.skier_day {
            let (code, body) = get(agent, &format!("{base}/skiers/{resort}/seasons/{season}/days/{day}/skiers/{skier}"));
            if code != 200 || body.trim() != v.to_string() {
                bad.push(format!("skier-day {resort}/{season}/{day}/{skier}: got {code} {body}, want {v}"));
            }
        }
        for ((skier, resort, season), v) in &self.skier_season {
            let (code, body) = get(agent, &format!("{base}/skiers/{skier}/vertical?resort={resort}&season={season}"));
            let got = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["resorts"][0]["totalVert"].as_u64());
            if code != 200 || got != Some(*v) {
                bad.push(format!("season {skier}/{resort}/{season}: got {code} {body}, want {v}"));
            }
        }
        bad
    }
}

impl Expected {
    /// `check` from `threads` clients at once, each on a share of the figures.
    pub fn check_parallel(&self, base: &str, threads: usize) -> Vec<String> {
        let threads = threads.max(1);
        let mut parts: Vec<Expected> = (0..threads).map(|_| Expected::default()).collect();
        for (i, (k, v)) in self.day_skiers.iter().enumerate() {
            parts[i % threads].day_skiers.insert(*k, v.clone());
        }
        for (i, (k, v)) in self.skier_day.iter().enumerate() {
            parts[i % threads].skier_day.insert(*k, *v);
        }
        for (i, (k, v)) in self.skier_season.iter().enumerate() {
            parts[i % threads].skier_season.insert(*k, *v);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = parts.iter().map(|p| s.spawn(move || p.check(&agent(), base))).collect();
            handles.into_iter().flat_map(|h| h.join().expect("checker")).collect()
        })
    }

    /// Polls until the node answers every expected figure (reads are eventually
    /// consistent), then returns the mismatches left (empty on success). The day counts
    /// are a handful of requests: they are waited on first, and everything (thousands of
    /// requests, from `threads` clients) is checked only once they agree.
    pub fn settle(&self, base: &str, within: Duration, threads: usize) -> Vec<String> {
        let agent = agent();
        let started = std::time::Instant::now();
        let days = Expected { day_skiers: self.day_skiers.clone(), ..Default::default() };
        while !days.check(&agent, base).is_empty() && started.elapsed() < within {
            std::thread::sleep(Duration::from_millis(250));
        }
        loop {
            let bad = self.check_parallel(base, threads);
            if bad.is_empty() || started.elapsed() > within {
                return bad;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// A small deterministic PRNG so a failing run can be repeated from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `within`.
pub fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !cond() {
        assert!(started.elapsed() < within, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rides over 3 resorts × 3 days; keys `ride-{seed}-{i}`, so that rides of two seeds never
/// share a key.
pub fn random_rides(seed: u64, n: usize, skiers: u32) -> Vec<Ride> {
    random_rides_over(seed, n, skiers, 3)
}

/// [`random_rides`] over `days` days per resort.
pub fn random_rides_over(seed: u64, n: usize, skiers: u32, days: u16) -> Vec<Ride> {
    let mut rng = Rng(seed | 1);
    (0..n)
        .map(|i| Ride {
            at: DayKey { resort: rng.range(1, 3) as u32, season: 2025, day: rng.range(1, u64::from(days)) as u16 },
            skier: rng.range(1, skiers as u64) as u32,
            time: rng.range(1, 360) as u16,
            lift: rng.range(1, 40) as u16,
            key: format!("ride-{seed}-{i}"),
        })
        .collect()
}

/// The in-process tier: `service::start` on port 0, in a thread with an actix system of its
/// own, for the tests that need no kill or restart (the API and hostile-input cases). The
/// same flags as [`Server::start`] (parsed by the binary's own `ServeArgs`), the same `url`;
/// dropped, it shuts the node down in the fixed order and waits for it.
pub struct InProcess {
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    serve: liftlog::config::ServeArgs,
}

impl InProcess {
    pub fn start(data_dir: &Path, extra: &[&str]) -> InProcess {
        use clap::Parser as _;
        let mut argv = vec!["liftlog", "--listen", "127.0.0.1:0", "--data-dir", data_dir.to_str().expect("a UTF-8 temp dir")];
        if !extra.contains(&"--admin-listen") {
            argv.extend(["--admin-listen", "main"]);
        }
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("flags {extra:?}: {e}")).serve;
        // The environment is not read: a test's LIFTLOG_TEST_* variables are not config.
        let config = liftlog::config::Config::resolve_with_env(&args, Vec::new()).expect("config").config;
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let running = match liftlog::service::start(config).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = addr_tx.send(Err(format!("{e:#}")));
                        return;
                    }
                };
                let _ = addr_tx.send(Ok(running.addr));
                let _ = stopped.await;
                running.shutdown().await.expect("ordered shutdown");
            })
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30)).expect("the node started in time").expect("the node started");
        InProcess { base: format!("http://{addr}"), stop: Some(stop), thread: Some(thread) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One Server-Sent Events stream, read as a browser's EventSource would.
pub struct Sse {
    lines: std::io::BufReader<Box<dyn std::io::Read + Send + Sync>>,
}

impl Sse {
    /// Opens `url`; `Err((status, body))` when it is not a 200 stream.
    pub fn open(url: &str, last_event_id: Option<u64>) -> Result<Sse, (u16, String, Option<String>)> {
        // No overall timeout (the stream is endless), but a bound on every read: the
        // heartbeat comes every 15 s.
        let agent = ureq::AgentBuilder::new().timeout_read(std::time::Duration::from_secs(20)).build();
        let mut req = agent.get(url);
        if let Some(id) = last_event_id {
            req = req.set("Last-Event-ID", &id.to_string());
        }
        match req.call() {
            Ok(r) => {
                assert_eq!(r.header("content-type"), Some("text/event-stream"));
                assert_eq!(r.header("cache-control"), Some("no-store"));
                Ok(Sse { lines: std::io::BufReader::new(r.into_reader()) })
            }
            Err(ureq::Error::Status(code, r)) => {
                let retry = r.header("retry-after").map(str::to_string);
                Err((code, r.into_string().unwrap_or_default(), retry))
            }
            Err(e) => panic!("stream {url}: {e}"),
        }
    }

    /// The next `day` event as (id, summary); comments and the `retry:` line are skipped.
    pub fn next_day(&mut self) -> (u64, serde_json::Value) {
        use std::io::BufRead;
        let (mut id, mut data, mut event): (Option<u64>, Option<String>, Option<String>) = (None, None, None);
        loop {
            let mut line = String::new();
            assert!(self.lines.read_line(&mut line).expect("stream read") > 0, "stream ended");
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if let (Some(id), Some(data), Some("day")) = (id, data.take(), event.as_deref()) {
                    return (id, serde_json::from_str(&data).expect("event data is JSON"));
                }
                (id, event) = (None, None);
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse::<u64>().expect("numeric event id"));
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_string());
            }
        }
    }

    /// Whether the stream ends (EOF or a broken connection) within 100 more lines.
    pub fn ended(&mut self) -> bool {
        use std::io::BufRead;
        for _ in 0..100 {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        false
    }

    /// Reads day events until `done` holds for one (bounded: each read times out).
    pub fn until(&mut self, what: &str, mut done: impl FnMut(u64, &serde_json::Value) -> bool) -> (u64, serde_json::Value) {
        for _ in 0..200 {
            let (id, v) = self.next_day();
            if done(id, &v) {
                return (id, v);
            }
        }
        panic!("no event with {what} in 200 events");
    }
}
