//! The local cluster of the testkit (`testkit::cluster`: nginx as the ALB, 2 write nodes, 2 consumers
//! of which one is the hot standby, 2 read nodes, RabbitMQ, DynamoDB Local), driven
//! through nginx like a fleet of lift gates would: every POST carries an `Idempotency-Key`
//! and is retried with the same key on a 5xx or a broken connection.
//!
//! Each test brings up its own cluster (own state dir, queue/table prefix and ports), and a
//! drop guard always tears it down (`down --purge`), also when the test panics;
//! the node and nginx logs are printed first then. The tests run one at a time: the machine
//! has two cores and every cluster is seven processes.
//!
//! Scenarios:
//! - a write node killed with `kill -9` mid-run: nginx routes around it, the clients'
//!   retries succeed, the counts reconcile exactly;
//! - a rolling restart (SIGTERM, start, wait for `/ready`, next) of the write and read
//!   nodes under load loses nothing;
//! - the same for the consumers: the standby first, then the active one, whose partitions
//!   move to the other consumer. The cluster's consumers run with `consumer.ack_after = table`
//!   (`Settings::ack_after`), as consumers on separate machines must.
//!
//! - `kill -9` of the active consumer mid-run: the standby takes its partitions and the
//!   counts through nginx are exact with the dead node still down; then the dead node
//!   comes back (replaying its WAL) as the new standby, and they are still exact.

mod common;

use common::{agent, call, get, random_rides, wait_for, Expected, Ride};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use testkit::cluster::{self, Role, Settings, Stop};

static SERIAL: Mutex<()> = Mutex::new(());

// ------------------------------------------------------------------- cluster ---

/// A cluster of the testkit's, brought up for one test; dropping it runs `down --purge`.
struct Cluster {
    kit: cluster::Cluster,
    /// nginx, e.g. `http://127.0.0.1:23000`.
    base: String,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    fn up() -> Cluster {
        let tmp = tempfile::Builder::new().prefix("liftlog-cluster-").tempdir().expect("temp dir");
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let port = cluster::free_base_port().expect("a free range of ports");
        let mut settings = Settings::new(tmp.path().join("state"));
        settings.prefix = format!("c{nanos}");
        settings.port = port;
        settings.node_port = port + 1;
        settings.flush_ms = 200;
        settings.bin = Some(env!("CARGO_BIN_EXE_liftlog").into());
        settings.node_log = std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into());
        // Under scripts/test.sh the services are the test runner's: use them as they are.
        // Without it, the cluster starts them (and its `down` stops them again).
        if let (Ok(amqp), Ok(dynamodb)) = (std::env::var("LIFTLOG_TEST_AMQP"), std::env::var("LIFTLOG_TEST_DYNAMODB")) {
            (settings.services, settings.broker, settings.dynamodb) = (false, amqp, dynamodb);
        }
        let mut c = Cluster {
            kit: cluster::Cluster::new(settings).expect("cluster settings"),
            base: format!("http://127.0.0.1:{port}"),
            _tmp: tmp,
        };
        // The guard exists before `up`, so a half-started cluster is torn down too.
        c.must("up", |k| k.up());
        let s = c.kit.settings();
        eprintln!("cluster up at {} (state {}, prefix {})", c.base, s.dir.display(), s.prefix);
        c
    }

    /// Runs a cluster command that must succeed, and says how long it took.
    fn must(&mut self, what: &str, command: impl FnOnce(&mut cluster::Cluster) -> testkit::Result<()>) {
        let t = Instant::now();
        if let Err(e) = command(&mut self.kit) {
            panic!("cluster {what} failed: {e}");
        }
        eprintln!("cluster {what} ({:.1}s)", t.elapsed().as_secs_f64());
    }

    /// Every process's `/ready` (and the services', when the cluster brought them).
    fn status(&self) -> cluster::Status {
        self.kit.status().expect("cluster status")
    }

    /// The base URL of a node's `/admin/*` (its own listener, not through nginx).
    fn admin_url(&self, name: &str) -> String {
        self.kit.admin_url(name).unwrap_or_else(|e| panic!("admin url of {name}: {e}"))
    }

    fn nodes(&self, role: Role) -> Vec<String> {
        self.kit.nodes_of(role).into_iter().map(|n| n.name).collect()
    }

    /// The last lines of every node's and nginx's log, and the status table.
    fn diagnostics(&self) -> String {
        let mut text = String::new();
        let names = self.kit.nodes().into_iter().map(|n| n.name).chain(["nginx".to_string()]);
        for name in names {
            let log = self.kit.logs(&name, 40).unwrap_or_else(|e| e.to_string());
            text.push_str(&format!("----- {name} -----\n{log}\n"));
        }
        let status = self.kit.status().map_or_else(|e| e.to_string(), |s| s.to_string());
        text.push_str(&format!("----- status -----\n{status}\n"));
        text
    }
}

impl Drop for Cluster {
    /// Tears the cluster down first and reports afterwards: writing to stderr can fail (a
    /// closed pipe), and a panic here while the test panics would abort before `down`.
    fn drop(&mut self) {
        use std::io::Write as _;
        let diagnostics = std::thread::panicking().then(|| self.diagnostics());
        let down = self.kit.down(true);
        let mut err = std::io::stderr().lock();
        if let Some(text) = diagnostics {
            let _ = writeln!(err, "{text}");
        }
        if let Err(e) = down {
            let _ = writeln!(err, "cluster down --purge failed: {e}");
        }
    }
}

// ---------------------------------------------------------------------- load ---

/// Counters of a load run, shared with the threads.
#[derive(Default)]
struct LoadStats {
    /// Rides handed to a client thread (each one is posted until 201).
    next: AtomicUsize,
    /// Rides acknowledged with 201.
    accepted: AtomicUsize,
    /// Answers that made a client retry, by kind.
    retried_5xx: AtomicUsize,
    retried_transport: AtomicUsize,
}

/// Posts one ride until it gets 201: the same `Idempotency-Key` on every attempt, a retry
/// after any 5xx or transport error. Panics on any other status or after `deadline`.
fn post_until_accepted(agent: &ureq::Agent, base: &str, ride: &Ride, stats: &LoadStats, deadline: Duration) {
    let started = Instant::now();
    loop {
        match ride.post(agent, base) {
            201 => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                return;
            }
            0 => stats.retried_transport.fetch_add(1, Ordering::Relaxed),
            code @ 500..=599 => {
                if std::env::var("TEST_VERBOSE").is_ok() {
                    eprintln!("{} {}: {code}, retrying", ride.key, ride.path());
                }
                stats.retried_5xx.fetch_add(1, Ordering::Relaxed)
            }
            other => panic!("{} {}: unexpected status {other}", ride.key, ride.path()),
        };
        assert!(started.elapsed() < deadline, "{} not accepted within {deadline:?}", ride.key);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `threads` clients posting `rides` in order through `base` until they run out or `stop`
/// is set, each pausing `pace` between rides. The rides accepted are exactly
/// `rides[..stats.next]` once every thread has been joined.
fn start_load(
    base: &str,
    rides: Arc<Vec<Ride>>,
    threads: usize,
    pace: Duration,
    stop: Arc<AtomicBool>,
    stats: Arc<LoadStats>,
) -> Vec<JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let (rides, stop, stats, base) = (rides.clone(), stop.clone(), stats.clone(), base.to_string());
            std::thread::spawn(move || {
                let agent = agent();
                while !stop.load(Ordering::Relaxed) {
                    let i = stats.next.fetch_add(1, Ordering::Relaxed);
                    let Some(ride) = rides.get(i) else { return };
                    post_until_accepted(&agent, &base, ride, &stats, Duration::from_secs(60));
                    if !pace.is_zero() {
                        std::thread::sleep(pace);
                    }
                }
            })
        })
        .collect()
}

/// Joins the clients and returns the rides they got 201 for.
fn finish_load(handles: Vec<JoinHandle<()>>, rides: &[Ride], stats: &LoadStats) -> Vec<Ride> {
    for h in handles {
        h.join().expect("a client thread panicked");
    }
    let n = stats.next.load(Ordering::Relaxed).min(rides.len());
    assert_eq!(stats.accepted.load(Ordering::Relaxed), n, "every ride handed out must end with a 201");
    rides[..n].to_vec()
}

// -------------------------------------------------------------- reconciling ---

/// Every figure through nginx and every raw ride in `SkierLiftRides` against the rides
/// that got a 201.
fn assert_exact(c: &Cluster, accepted: &[Ride], what: &str) {
    assert_exact_with_down(c, accepted, what, &[]);
}

/// [`assert_exact`] while the consumers named in `down` are stopped on purpose.
fn assert_exact_with_down(c: &Cluster, accepted: &[Ride], what: &str, down: &[&str]) {
    let expected = &Expected::from(accepted);
    let drained = wait_drained(c, what, down);
    let t = Instant::now();
    let bad = expected.settle(&c.base, Duration::from_secs(30), 4);
    assert!(
        bad.is_empty(),
        "{what}: {} mismatches through nginx once the consumers had drained, e.g. {:#?}\nconsumers:\n{}",
        bad.len(),
        &bad[..bad.len().min(8)],
        flusher_report(c)
    );
    let s = c.kit.settings();
    let raw = common::raw::settle(&s.dynamodb, &format!("{}_", s.prefix), accepted, Duration::from_secs(60));
    assert!(raw.is_empty(), "{what}: {} raw rides wrong in SkierLiftRides, e.g. {:#?}", raw.len(), &raw[..raw.len().min(8)]);
    eprintln!(
        "{what}: exact through nginx and in SkierLiftRides ({} resort-days, {} skier-days, {} skier-seasons; drained in {drained:.1}s, then settled in {:.1}s)",
        expected.day_skiers.len(),
        expected.skier_day.len(),
        expected.skier_season.len(),
        t.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------- consumers ---

/// A node's `GET /admin/wal` (None if it does not answer).
fn admin_wal(agent: &ureq::Agent, node_url: &str) -> Option<serde_json::Value> {
    let (code, body) = get(agent, &format!("{node_url}/admin/wal"));
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// `source.deliveries` of a consumer node (None if unreachable).
fn deliveries(agent: &ureq::Agent, node_url: &str) -> Option<u64> {
    admin_wal(agent, node_url)?["source"]["deliveries"].as_u64()
}

/// Where a consumer node stands: (rides waiting in its partition queues, rides received
/// but not yet dispatched, age of its oldest ride not yet in the tables in ms); None if
/// its admin endpoint does not answer.
fn consumer_backlog(agent: &ureq::Agent, node_url: &str) -> Option<(u64, u64, u64)> {
    let v = admin_wal(agent, node_url)?;
    let num = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let queued = v["source"]["queue_depths"].as_array().map_or(0, |d| d.iter().map(num).sum());
    // Every delivery ends as a dispatched ride, a stale one dropped after a reconnect (the
    // broker redelivers it) or a dead letter.
    let settled = num(&v["consumer"]["events"]) + num(&v["source"]["stale_dropped"]) + num(&v["source"]["dead_lettered"]);
    let undispatched = num(&v["source"]["deliveries"]).saturating_sub(settled);
    Some((queued, undispatched, num(&v["consumer"]["flush_lag_ms"])))
}

/// Waits until every consumer has taken all rides from its queues, dispatched them and
/// written them to the tables (twice in a row, 1 s apart); returns the seconds it took.
/// The consumers in `down` are stopped on purpose and not asked.
///
/// Convergence comes from the consumers' own progress figures, not from a fixed timeout
/// on the reads: a slow machine (a debug build flushing to DynamoDB Local on two shared
/// cores) needs longer to catch up after a takeover, and a mismatch seen while a consumer
/// is still flushing says nothing. The exactness check that follows is strict.
fn wait_drained(c: &Cluster, what: &str, down: &[&str]) -> f64 {
    const WITHIN: Duration = Duration::from_secs(300);
    let agent = agent();
    let urls: Vec<String> = c.nodes(Role::Consume).iter().filter(|n| !down.contains(&n.as_str())).map(|n| c.admin_url(n)).collect();
    let started = Instant::now();
    let mut quiet = 0;
    loop {
        let backlog: Vec<Option<(u64, u64, u64)>> = urls.iter().map(|u| consumer_backlog(&agent, u)).collect();
        let idle = backlog.iter().all(|b| matches!(b, Some((0, 0, 0))));
        quiet = if idle { quiet + 1 } else { 0 };
        if quiet >= 2 {
            return started.elapsed().as_secs_f64();
        }
        assert!(
            started.elapsed() < WITHIN,
            "{what}: the consumers did not drain within {WITHIN:?}: (queued, undispatched, flush lag ms) = {backlog:?}\nconsumers:\n{}",
            flusher_report(c)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The flusher's figures of every consumer (`GET /admin/wal`), one line each: what a
/// mismatch after a takeover needs to be understood (`stale_skipped`, `counts_written`).
fn flusher_report(c: &Cluster) -> String {
    let agent = agent();
    c.nodes(Role::Consume)
        .into_iter()
        .map(|n| {
            let (code, body) = get(&agent, &format!("{}/admin/wal", c.admin_url(&n)));
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            format!("{n}: {code} deliveries={} flusher={}", v["source"]["deliveries"], v["flusher"])
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The consumer that owns the partitions right now: the only one whose deliveries grow.
/// Needs rides flowing (load running); panics if it cannot tell within 20 s (no load, or
/// the partitions split across consumers).
fn active_consumer(c: &Cluster) -> String {
    let agent = agent();
    let nodes: Vec<(String, String)> = c.nodes(Role::Consume).into_iter().map(|n| (c.admin_url(&n), n)).collect();
    let started = Instant::now();
    let mut before: Vec<Option<u64>> = nodes.iter().map(|(u, _)| deliveries(&agent, u)).collect();
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now: Vec<Option<u64>> = nodes.iter().map(|(u, _)| deliveries(&agent, u)).collect();
        let grew: Vec<&str> = nodes
            .iter()
            .zip(before.iter().zip(&now))
            .filter(|(_, (b, n))| matches!((b, n), (Some(b), Some(n)) if n > b))
            .map(|((_, name), _)| name.as_str())
            .collect();
        if grew.len() == 1 {
            return grew[0].to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "cannot tell the active consumer: {grew:?} took deliveries ({now:?})");
        before = now;
    }
}

// ------------------------------------------------------------------- tests ---

/// The README session, through nginx: POSTs reach a write node, GETs a read node (which
/// reads DynamoDB, once the consumer flushed).
fn readme_session(c: &Cluster) -> Ride {
    let a = agent();
    let ride = Ride { resort: 1, season: 2025, day: 1, skier: 7, time: 10, lift: 5, key: "gate-3-000123".into() };
    assert_eq!(ride.post(&a, &c.base), 201, "README POST through nginx");
    let expected = Expected::from(std::slice::from_ref(&ride));
    assert!(expected.settle(&c.base, Duration::from_secs(20), 4).is_empty(), "README GETs through nginx");
    assert_eq!(get(&a, &format!("{}/skiers/1/seasons/2025/days/1/skiers/7", c.base)), (200, "50".into()));
    assert_eq!(
        get(&a, &format!("{}/resorts/1/seasons/2025/day/1/skiers", c.base)),
        (200, r#"{"time":"Alpine Meadows","numSkiers":1}"#.into())
    );
    assert_eq!(
        get(&a, &format!("{}/skiers/7/vertical?resort=1", c.base)),
        (200, r#"{"resorts":[{"seasonID":"2025","totalVert":50}]}"#.into())
    );
    let (code, body) = call(
        &a,
        "POST",
        &format!("{}/skiers/1/seasons/2025/days/1/skiers/7", c.base),
        &[("Content-Type", "application/json")],
        Some(r#"{"time":10,"liftID":99}"#),
    );
    assert_eq!((code, body.as_str()), (400, r#"{"message":"liftID must be between 1 and 40 for resort 1, got 99"}"#));
    // The same gate retrying the same ride: counted once.
    assert_eq!(ride.post(&a, &c.base), 201);
    // Operator endpoints are not reachable through the load balancer.
    assert_eq!(get(&a, &format!("{}/admin/wal", c.base)).0, 403);
    assert_eq!(get(&a, &format!("{}/metrics", c.base)).0, 403);
    ride
}

#[test]
#[ignore = "needs RabbitMQ, DynamoDB Local and nginx: run scripts/test.sh"]
fn write_node_killed_mid_run_nginx_routes_around_it_and_counts_are_exact() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut c = Cluster::up();
    let first = readme_session(&c);

    let rides = Arc::new(random_rides(7001, 3_000, 1_000));
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_load(&c.base, rides.clone(), 8, Duration::from_millis(2), stop, stats.clone());
    wait_for("1000 rides accepted", Duration::from_secs(60), || stats.accepted.load(Ordering::Relaxed) >= 1_000);
    c.must("stop write-1 --kill", |k| k.stop("write-1", Stop::Kill));
    let at_kill = stats.accepted.load(Ordering::Relaxed);
    let mut accepted = finish_load(clients, &rides, &stats);
    assert!(at_kill < rides.len(), "the kill must land mid-run (all {} rides were in already)", rides.len());
    eprintln!(
        "{} rides accepted through nginx, write-1 killed after {at_kill}; clients retried {} times after a 5xx, {} after a transport error",
        accepted.len(),
        stats.retried_5xx.load(Ordering::Relaxed),
        stats.retried_transport.load(Ordering::Relaxed)
    );
    let status = c.status();
    assert!(!status.ok() && status.row("write-1").is_some_and(|r| r.pid.is_none()), "status must show write-1 down:\n{status}");

    accepted.push(first);
    assert_exact(&c, &accepted, "after kill -9 of write-1");

    c.must("start write-1", |k| k.start("write-1"));
    let status = c.status();
    assert!(status.ok(), "every node ready again:\n{status}");
    eprintln!("write-node loss: {:.1}s in all", started.elapsed().as_secs_f64());
}

/// Restarts `nodes` one after the other under load through nginx, waiting for some rides
/// to be accepted between two restarts; returns the rides accepted.
fn rolling_restart_under_load(c: &mut Cluster, seed: u64, nodes: impl Fn(&Cluster) -> Vec<String>) -> Vec<Ride> {
    let rides = Arc::new(random_rides(seed, 200_000, 2_000));
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    // ~6 clients pausing 10 ms: a few hundred rides per second, steady through the restarts.
    let clients = start_load(&c.base, rides.clone(), 6, Duration::from_millis(10), stop.clone(), stats.clone());
    let accepted = || stats.accepted.load(Ordering::Relaxed);
    wait_for("the first 200 rides", Duration::from_secs(60), || accepted() >= 200);
    let order = nodes(c);
    for name in order {
        let before = accepted();
        c.must(&format!("restart {name}"), |k| k.restart(&name));
        let during = accepted() - before;
        wait_for(&format!("100 rides after restarting {name}"), Duration::from_secs(60), || accepted() >= before + during + 100);
        eprintln!("{name} restarted; {during} rides accepted while it restarted, {} so far", accepted());
    }
    stop.store(true, Ordering::Relaxed);
    let accepted = finish_load(clients, &rides, &stats);
    eprintln!(
        "{} rides accepted; clients retried {} times after a 5xx, {} after a transport error",
        accepted.len(),
        stats.retried_5xx.load(Ordering::Relaxed),
        stats.retried_transport.load(Ordering::Relaxed)
    );
    accepted
}

#[test]
#[ignore = "needs RabbitMQ, DynamoDB Local and nginx: run scripts/test.sh"]
fn rolling_restart_of_write_and_read_nodes_under_load_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut c = Cluster::up();
    let accepted = rolling_restart_under_load(&mut c, 7002, |c| [c.nodes(Role::Read), c.nodes(Role::Write)].concat());
    assert_exact(&c, &accepted, "after a rolling restart of the write and read nodes");
    let status = c.status();
    assert!(status.ok(), "every node ready:\n{status}");
    eprintln!("rolling restart (write, read): {:.1}s in all", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "needs RabbitMQ, DynamoDB Local and nginx: run scripts/test.sh"]
fn rolling_restart_of_the_consumers_under_load_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut c = Cluster::up();
    let accepted = rolling_restart_under_load(&mut c, 7003, |c| {
        // The standby first (nothing moves), then the active one: its partitions move to
        // the other consumer, which carries on from the tables.
        let active = active_consumer(c);
        let mut order: Vec<String> = c.nodes(Role::Consume).into_iter().filter(|n| *n != active).collect();
        order.push(active.clone());
        eprintln!("active consumer: {active}; restart order {order:?}");
        order
    });
    assert_exact(&c, &accepted, "after a rolling restart of the consumers");
    let status = c.status();
    assert!(status.ok(), "every node ready:\n{status}");
    eprintln!("rolling restart (consumers): {:.1}s in all", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "needs RabbitMQ, DynamoDB Local and nginx: run scripts/test.sh"]
fn active_consumer_killed_mid_run_the_standby_takes_over_and_counts_are_exact() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let mut c = Cluster::up();
    let rides = Arc::new(random_rides(7004, 200_000, 2_000));
    let stats = Arc::new(LoadStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_load(&c.base, rides.clone(), 6, Duration::from_millis(10), stop.clone(), stats.clone());
    let accepted = || stats.accepted.load(Ordering::Relaxed);
    wait_for("the first 500 rides", Duration::from_secs(60), || accepted() >= 500);
    let active = active_consumer(&c);
    let standby = c.nodes(Role::Consume).into_iter().find(|n| *n != active).expect("a standby consumer");
    let taken_before = deliveries(&agent(), &c.admin_url(&standby)).unwrap_or(0);
    c.must(&format!("stop {active} --kill"), |k| k.stop(&active, Stop::Kill));
    let at_kill = accepted();
    wait_for("1000 rides after the kill", Duration::from_secs(120), || accepted() >= at_kill + 1_000);
    stop.store(true, Ordering::Relaxed);
    let accepted = finish_load(clients, &rides, &stats);
    eprintln!("{} rides accepted; {active} killed (kill -9) after {at_kill}", accepted.len());
    let taken = deliveries(&agent(), &c.admin_url(&standby)).unwrap_or(0);
    assert!(taken > taken_before, "{standby} must have taken the partitions over: deliveries {taken_before} -> {taken}");

    assert_exact_with_down(&c, &accepted, &format!("with {active} killed and {standby} the owner"), &[active.as_str()]);
    // The dead node comes back with its WAL (replayed into days loaded from the tables)
    // and queues up as the standby: nothing it replays may change a figure.
    c.must(&format!("start {active}"), |k| k.start(&active));
    assert_exact(&c, &accepted, &format!("after {active} came back"));
    let status = c.status();
    assert!(status.ok(), "every node ready:\n{status}");
    eprintln!("active consumer kill -9: {:.1}s in all", started.elapsed().as_secs_f64());
}
