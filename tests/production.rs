//! The production back ends end to end: separate write, consume and read processes of the
//! real binary against a real RabbitMQ and DynamoDB Local (started by scripts/test.sh).
//! Each test uses its own queue and table prefix. They are `#[ignore]` so that a plain
//! `cargo test` without the services reports them as ignored; scripts/test.sh runs them.

mod common;

use common::proxy::Proxy;
use common::{agent, call, get, random_rides, wait_for, Expected, Ride, Server};
use liftlog::domain::DayKey;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The tests share one broker; one of them restarts it. Run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run scripts/test.sh, which starts the services"))
}

struct Backends {
    amqp: String,
    dynamodb: String,
    prefix: String,
}

impl Drop for Backends {
    /// Quorum queues outlive the test on a shared broker; remove this test's (best effort).
    fn drop(&mut self) {
        let queues = (0..4).map(|p| format!("{}.rides.{p}", self.prefix)).chain([format!("{}.rides.dead", self.prefix)]);
        for q in queues {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["-q", "delete_queue", &q])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Backends {
    fn new() -> Backends {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        Backends { amqp: env("LIFTLOG_TEST_AMQP"), dynamodb: env("LIFTLOG_TEST_DYNAMODB"), prefix: format!("t{nanos}") }
    }

    /// Flags for a node with `role`, tables at `dynamodb` (the real one unless a proxy).
    fn args(&self, role: &str, dynamodb: &str) -> Vec<String> {
        vec![
            "--role".into(),
            role.into(),
            "--broker".into(),
            self.amqp.clone(),
            "--set".into(),
            format!("bus.amqp.prefix={}", self.prefix),
            "--dynamodb-endpoint".into(),
            dynamodb.into(),
            "--set".into(),
            format!("tables.prefix={}_", self.prefix),
            "--set".into(),
            "flush.interval_ms=200".into(),
        ]
    }

    fn start(&self, dir: &std::path::Path, role: &str) -> Server {
        self.start_at(dir, role, &self.dynamodb.clone(), &[])
    }

    fn start_at(&self, dir: &std::path::Path, role: &str, dynamodb: &str, env: &[(&str, &str)]) -> Server {
        let args = self.args(role, dynamodb);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_with_env(dir, &args, env)
    }
}

/// Posts every ride from `threads` clients, retrying 503s with the same key until 201
/// (bounded); returns how many 503s were seen. Panics on anything else.
fn post_all(base: &str, rides: &[Ride], threads: usize, deadline: Duration) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let shed = Arc::new(AtomicUsize::new(0));
    let rides = Arc::new(rides.to_vec());
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (next, shed, rides, base) = (next.clone(), shed.clone(), rides.clone(), base.to_string());
            std::thread::spawn(move || {
                let agent = agent();
                let started = Instant::now();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = rides.get(i) else { return };
                    loop {
                        let t = Instant::now();
                        let code = r.post(&agent, &base);
                        assert!(t.elapsed() < Duration::from_secs(12), "a POST hung for {:?}", t.elapsed());
                        match code {
                            201 => break,
                            503 | 0 => {
                                shed.fetch_add(1, Ordering::Relaxed);
                                assert!(started.elapsed() < deadline, "ride {i} not accepted within {deadline:?}");
                                std::thread::sleep(Duration::from_millis(200));
                            }
                            other => panic!("ride {i}: unexpected status {other}"),
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client");
    }
    shed.load(Ordering::Relaxed)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// A day's lift activity in the model of 201s: lift → rides per 15-minute bucket of `time`.
fn lifts_model(rides: &[Ride], at: DayKey) -> std::collections::BTreeMap<u64, Vec<u64>> {
    let mut lifts = std::collections::BTreeMap::<u64, Vec<u64>>::new();
    for r in rides.iter().filter(|r| r.at == at) {
        lifts.entry(r.lift.into()).or_insert_with(|| vec![0; 24])[(usize::from(r.time) - 1) / 15] += 1;
    }
    lifts
}

/// `GET .../lifts` of a node, as [`lifts_model`] has it.
fn lifts_of(base: &str, at: DayKey) -> std::collections::BTreeMap<u64, Vec<u64>> {
    let (code, body) = get(&agent(), &format!("{base}/resorts/{}/seasons/{}/day/{}/lifts", at.resort, at.season, at.day));
    assert_eq!(code, 200, "{body}");
    json(&body)["lifts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["liftID"].as_u64().unwrap(), l["buckets"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).collect()))
        .collect()
}

#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn three_processes_ten_thousand_rides_exact_in_dynamodb_and_back_from_an_empty_disk() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut consumer = b.start(dirs[0].path(), "consume");
    let writer = b.start(dirs[1].path(), "write");
    let reader = b.start(dirs[2].path(), "read");

    // The README session, across three processes.
    let a = agent();
    let (code, _) = call(
        &a,
        "POST",
        &writer.url("/skiers/1/seasons/2025/days/1/skiers/7"),
        &[("Content-Type", "application/json")],
        Some(r#"{"time":10,"liftID":5}"#),
    );
    assert_eq!(code, 201);
    let first = Expected::from(&[Ride { at: DayKey { resort: 1, season: 2025, day: 1 }, skier: 7, time: 10, lift: 5, key: String::new() }]);
    assert!(first.settle(&consumer.base, Duration::from_secs(10), 1).is_empty(), "consumer actors");
    assert!(first.settle(&reader.base, Duration::from_secs(10), 1).is_empty(), "reader via DynamoDB");
    assert_eq!(get(&a, &reader.url("/resorts/1/seasons")).1, r#"{"seasons":["2025"]}"#);
    // A read node refuses rides with a reason, a write node reads from the tables.
    let (code, body) = call(
        &a,
        "POST",
        &reader.url("/skiers/1/seasons/2025/days/1/skiers/7"),
        &[("Content-Type", "application/json")],
        Some(r#"{"time":10,"liftID":5}"#),
    );
    assert_eq!(code, 503, "{body}");

    let rides = random_rides(42, 10_000, 3_000);
    let shed = post_all(&writer.base, &rides, 16, Duration::from_secs(120));
    eprintln!("10k rides posted, {shed} retries after 503");
    let mut all = rides.clone();
    all.push(Ride { at: DayKey { resort: 1, season: 2025, day: 1 }, skier: 7, time: 10, lift: 5, key: String::new() });
    let expected = Expected::from(&all);
    let bad = expected.settle(&reader.base, Duration::from_secs(60), 1);
    assert!(bad.is_empty(), "reader (DynamoDB): {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let bad = expected.settle(&consumer.base, Duration::from_secs(10), 1);
    assert!(bad.is_empty(), "consumer (actors): {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    // Lift activity (ours) from the actors and from DynamoDB's items agrees with the model,
    // and so does the live stream of a read node, which has only the tables.
    let days: Vec<DayKey> =
        expected.day_skiers.keys().take(3).map(|(resort, season, day)| DayKey { resort: *resort, season: *season, day: *day }).collect();
    for at in &days {
        let want = lifts_model(&all, *at);
        assert_eq!(lifts_of(&consumer.base, *at), want, "lifts of {at} from the consumer's actors");
        assert_eq!(lifts_of(&reader.base, *at), want, "lifts of {at} from DynamoDB");
        let path = format!("/resorts/{}/seasons/{}/day/{}/stream", at.resort, at.season, at.day);
        let (id, summary) = common::Sse::open(&reader.url(&path), None).expect("a stream").next_day();
        let rides = all.iter().filter(|r| r.at == *at).count() as u64;
        assert_eq!(
            (id, &summary["numSkiers"]),
            (rides, &serde_json::Value::from(expected.day_skiers[&(at.resort, at.season, at.day)].len())),
            "{summary}"
        );
    }

    // The tables themselves, read directly.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use liftlog::tables::Tables;
        let t = liftlog::tables::dynamo::DynamoTables::connect(liftlog::tables::dynamo::DynamoConfig {
            endpoint: Some(b.dynamodb.clone()),
            table_prefix: format!("{}_", b.prefix),
            ..Default::default()
        })
        .await
        .unwrap();
        for ((resort, season, day), skiers) in &expected.day_skiers {
            let key = DayKey { resort: *resort, season: *season, day: *day };
            let item = t.get_day_count(key).await.unwrap().expect("count item");
            assert_eq!(item.unique_skiers, skiers.len() as u64, "LiftRideCounts {key}");
        }
    });

    // Lose the consumer's disk entirely: state comes back from DynamoDB.
    consumer.kill9();
    let fresh = tempfile::tempdir().unwrap();
    consumer = b.start(fresh.path(), "consume");
    let bad = expected.settle(&consumer.base, Duration::from_secs(20), 1);
    assert!(bad.is_empty(), "consumer after an empty-disk restart: {:?}", &bad[..bad.len().min(5)]);
    for at in &days {
        assert_eq!(lifts_of(&consumer.base, *at), lifts_model(&all, *at), "lifts of {at} reloaded from DynamoDB");
    }
    // The README ride was posted without a key: its id is random, so it is recognised by its fields.
    let readme = |r: &liftlog::domain::RideEvent| (r.resort, r.day, r.skier, r.time, r.lift) == (1, 1, 7, 10, 5);
    let raw = common::raw::settle_with(&b.dynamodb, &format!("{}_", b.prefix), &rides, &readme, Duration::from_secs(60));
    assert!(raw.is_empty(), "SkierLiftRides: {} raw rides wrong, e.g. {:?}", raw.len(), &raw[..raw.len().min(5)]);
}

#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn consumer_killed_after_wal_fsync_before_ack_counts_each_ride_once() {
    if !cfg!(feature = "fault-injection") {
        panic!("this test needs the fault points: run it with --features fault-injection (scripts/test.sh does)");
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let (dc, dw) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // ABORT_AFTER_BATCHES moves the crash point for the long run (docs/reliability.md).
    let after = std::env::var("ABORT_AFTER_BATCHES").unwrap_or_else(|_| "5".into());
    let mut consumer = b.start_at(dc.path(), "consume", &b.dynamodb.clone(), &[("LIFTLOG_FAULT_ABORT_AFTER_WAL_BATCHES", &after)]);
    let writer = b.start(dw.path(), "write");
    let rides = random_rides(9, 3_000, 500);
    post_all(&writer.base, &rides, 8, Duration::from_secs(60));
    // The consumer aborted after its n-th WAL batch without acking it.
    let status = consumer.child.wait().unwrap();
    assert!(!status.success(), "the consumer should have aborted");
    consumer.restart();
    let expected = Expected::from(&rides);
    let bad = expected.settle(&consumer.base, Duration::from_secs(30), 1);
    assert!(bad.is_empty(), "{} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let raw = common::raw::settle(&b.dynamodb, &format!("{}_", b.prefix), &rides, Duration::from_secs(60));
    assert!(raw.is_empty(), "SkierLiftRides: {} raw rides wrong, e.g. {:?}", raw.len(), &raw[..raw.len().min(5)]);
    let (_, body) = get(&agent(), &consumer.url("/admin/actors"));
    let dups: u64 = json(&body)["actors"].as_array().unwrap().iter().map(|a| a["duplicates"].as_u64().unwrap()).sum();
    assert!(dups > 0, "the unacked batch must have been redelivered and dropped as duplicates: {body}");
}

#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn dynamodb_outage_during_ingest_keeps_accepting_and_catches_up_exactly() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let upstream = b.dynamodb.trim_start_matches("http://").parse().expect("DynamoDB endpoint as http://ip:port");
    let proxy = Proxy::start(upstream);
    let (dc, dw, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let consumer = b.start_at(dc.path(), "consume", &proxy.url(), &[]);
    let writer = b.start(dw.path(), "write");
    let reader = b.start(dr.path(), "read");
    let rides = random_rides(5, 3_000, 400);
    post_all(&writer.base, &rides[..1_000], 8, Duration::from_secs(60));
    proxy.down();
    let down_at = Instant::now();
    post_all(&writer.base, &rides[1_000..2_000], 8, Duration::from_secs(60));
    // Keep DynamoDB away for 30 s in all (OUTAGE_SECS to change), rides flowing throughout.
    let outage = Duration::from_secs(std::env::var("OUTAGE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30));
    std::thread::sleep(outage.saturating_sub(down_at.elapsed()).max(Duration::from_secs(2)));
    let (_, body) = get(&agent(), &consumer.url("/admin/wal"));
    let v = json(&body);
    assert!(v["flusher"]["failures"].as_u64().unwrap() > 0, "flushes must fail while DynamoDB is away: {body}");
    assert!(v["wal"]["live_bytes"].as_u64().unwrap() > 0, "the WAL holds the unflushed rides: {body}");
    proxy.up();
    post_all(&writer.base, &rides[2_000..], 8, Duration::from_secs(60));
    let expected = Expected::from(&rides);
    let bad = expected.settle(&reader.base, Duration::from_secs(90), 1);
    assert!(bad.is_empty(), "{} mismatches after the outage, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let raw = common::raw::settle(&b.dynamodb, &format!("{}_", b.prefix), &rides, Duration::from_secs(60));
    assert!(raw.is_empty(), "SkierLiftRides: {} raw rides wrong, e.g. {:?}", raw.len(), &raw[..raw.len().min(5)]);
}

#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn rabbitmq_restart_during_ingest_answers_503_then_recovers_losing_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let (dc, dw) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let consumer = b.start(dc.path(), "consume");
    let writer = b.start(dw.path(), "write");
    // Enough rides that posting spans the whole outage (a few seconds).
    let rides = random_rides(77, 20_000, 600);
    let services = testkit::services::Services::from_env().expect("services settings");
    let base = writer.base.clone();
    let posting = {
        let rides = rides.clone();
        std::thread::spawn(move || post_all(&base, &rides, 8, Duration::from_secs(180)))
    };
    // Stop the broker once rides are flowing (the writer's own count), not after a fixed time.
    common::wait_for("the writer's first 500 published rides", Duration::from_secs(60), || wal_figure(&writer, "bus", "published") >= 500);
    if let Err(e) = services.rabbitmq_stop() {
        panic!("rabbitmq-stop: {e}");
    }
    // While the broker is away the write path answers 503 fast.
    let a = agent();
    let t = Instant::now();
    let (code, body) = call(
        &a,
        "POST",
        &writer.url("/skiers/1/seasons/2025/days/2/skiers/1"),
        &[("Content-Type", "application/json")],
        Some(r#"{"time":1,"liftID":1}"#),
    );
    let outage_answer = (code, t.elapsed());
    std::thread::sleep(Duration::from_secs(2));
    if let Err(e) = services.rabbitmq_start() {
        panic!("rabbitmq-start: {e}");
    }
    let shed = posting.join().expect("posting thread");
    assert_eq!(outage_answer.0, 503, "during the outage: {body}");
    assert!(outage_answer.1 < Duration::from_secs(7), "the 503 took {:?}", outage_answer.1);
    eprintln!("{shed} retries during the broker restart");
    assert!(shed > 0, "the clients should have met the outage (503s) while posting");
    let expected = Expected::from(&rides);
    let bad = expected.settle(&consumer.base, Duration::from_secs(90), 1);
    assert!(bad.is_empty(), "{} mismatches after the broker restart, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let raw = common::raw::settle(&b.dynamodb, &format!("{}_", b.prefix), &rides, Duration::from_secs(60));
    assert!(raw.is_empty(), "SkierLiftRides: {} raw rides wrong, e.g. {:?}", raw.len(), &raw[..raw.len().min(5)]);
}

#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn active_consumer_killed_standby_takes_over_exactly_with_ack_after_table() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let with = |role: &str, extra: &[&str]| -> Vec<String> {
        let mut a = b.args(role, &b.dynamodb);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let policy = ["--set", "consumer.ack_after=table", "--set", "bus.amqp.prefetch=20000"];
    let start = |dir: &std::path::Path, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(dir, &args)
    };
    // The first consumer on the queues is the active one; the second waits as standby.
    let mut active = start(dirs[0].path(), with("consume", &policy));
    let standby = start(dirs[1].path(), with("consume", &policy));
    let writer = start(dirs[2].path(), with("write", &[]));
    let reader = start(dirs[3].path(), with("read", &[]));
    let rides = random_rides(123, 8_000, 900);
    let posting = {
        let (base, rides) = (writer.base.clone(), rides.clone());
        std::thread::spawn(move || post_all(&base, &rides, 8, Duration::from_secs(180)))
    };
    // Kill once the active consumer is applying (its own count), not after a fixed time.
    common::wait_for("the active consumer's first 1,000 applied rides", Duration::from_secs(60), || {
        wal_figure(&active, "consumer", "events") >= 1_000
    });
    active.kill9(); // its WAL is gone with it as far as the standby is concerned
    posting.join().expect("posting");
    let expected = Expected::from(&rides);
    let bad = expected.settle(&standby.base, Duration::from_secs(90), 1);
    assert!(bad.is_empty(), "standby actors: {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let bad = expected.settle(&reader.base, Duration::from_secs(60), 1);
    assert!(bad.is_empty(), "tables: {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let raw = common::raw::settle(&b.dynamodb, &format!("{}_", b.prefix), &rides, Duration::from_secs(60));
    assert!(raw.is_empty(), "SkierLiftRides: {} raw rides wrong, e.g. {:?}", raw.len(), &raw[..raw.len().min(5)]);
    let (_, body) = get(&agent(), &standby.url("/admin/wal"));
    let deliveries = json(&body)["source"]["deliveries"].as_u64().unwrap_or(0);
    assert!(deliveries > 0, "the standby must have taken over: {body}");
}

/// The torn flush of tests/crash.rs on DynamoDB: the consumer aborts once the skier-day
/// items are written and before the day counts and raw rides are. Its WAL replay finds
/// every ride counted already; the restarted consumer must still complete
/// `LiftRideCounts` and `SkierLiftRides`, which a read node and a scan then check.
#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn consumer_crash_mid_flush_still_completes_counts_and_raw_rides() {
    if !cfg!(feature = "fault-injection") {
        panic!("this test needs the fault points: run it with --features fault-injection (scripts/test.sh does)");
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let (dc, dw, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The consumer flushes only when asked, so the torn flush comes after the last ride.
    let mut args = b.args("consume", &b.dynamodb);
    let at = args.iter().position(|a| a == "flush.interval_ms=200").expect("flush setting");
    args[at] = "flush.interval_ms=600000".into();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut consumer = Server::start_with_env(dc.path(), &args, &[("LIFTLOG_FAULT_ABORT_MID_FLUSH", "1")]);
    let writer = b.start(dw.path(), "write");
    let rides = random_rides(77, 2_000, 300);
    post_all(&writer.base, &rides, 8, Duration::from_secs(60));
    let expected = Expected::from(&rides);
    // Everything applied in the actors (season totals come from the tables with a broker,
    // and nothing is flushed yet), so the torn flush holds every ride.
    let applied = Expected { skier_season: Default::default(), ..Expected::from(&rides) };
    let bad = applied.settle(&consumer.base, Duration::from_secs(30), 1);
    assert!(bad.is_empty(), "consumer actors before the crash: {:?}", &bad[..bad.len().min(5)]);
    let a = agent();
    assert_eq!(call(&a, "POST", &consumer.url("/admin/flush"), &[], None).0, 0, "the armed flush must abort");
    assert!(!consumer.child.wait().unwrap().success());

    consumer.restart(); // without the fault, still flushing only when asked
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let t = rt
        .block_on(liftlog::tables::dynamo::DynamoTables::connect(liftlog::tables::dynamo::DynamoConfig {
            endpoint: Some(b.dynamodb.clone()),
            table_prefix: format!("{}_", b.prefix),
            ..Default::default()
        }))
        .unwrap();
    let count_rides = || {
        rt.block_on(async {
            let (mut n, mut start) = (0usize, None);
            loop {
                let page = t
                    .client()
                    .scan()
                    .table_name(t.table_names()[0])
                    .select(aws_sdk_dynamodb::types::Select::Count)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .expect("scan SkierLiftRides");
                n += page.count() as usize;
                start = page.last_evaluated_key;
                if start.is_none() {
                    return n;
                }
            }
        })
    };
    // Raw rides go out a bounded slice per actor per flush: flush until all are there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = 0;
    while Instant::now() < deadline {
        let (code, body) = call(&a, "POST", &consumer.url("/admin/flush"), &[], None);
        assert_eq!(code, 200, "{body}");
        stored = count_rides();
        if stored >= rides.len() {
            break;
        }
    }
    assert_eq!(stored, rides.len(), "raw rides in SkierLiftRides");
    let reader = b.start(dr.path(), "read");
    let bad = expected.settle(&reader.base, Duration::from_secs(30), 1);
    assert!(bad.is_empty(), "read from the tables: {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

/// Closes a consumer process's broker connection from the broker's side, as a network
/// blip or missed heartbeats would: its partitions go to the standby at once, and the
/// consumer reconnects and queues up behind it.
fn close_consumer_connection(prefix: &str, os_pid: u32) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "--no-table-headers", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl list_connections");
    let text = String::from_utf8_lossy(&out.stdout);
    // The connection name is "liftlog consumer {prefix}.{pid}" (src/bus/amqp.rs `connect`).
    let name = format!("liftlog consumer {prefix}.{os_pid}\"");
    let conn = text
        .lines()
        .find(|l| l.contains(&name))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("no broker connection named {name} in:\n{text}"))
        .to_string();
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &conn, "liftlog test: connection lost"])
        .status()
        .expect("rabbitmqctl close_connection");
    assert!(closed.success(), "rabbitmqctl close_connection {conn} failed");
}

/// One figure of a node's `GET /admin/wal`, e.g. `("source", "reconnects")` (0 if absent).
fn wal_figure(node: &Server, section: &str, field: &str) -> u64 {
    let (_, body) = get(&agent(), &node.url("/admin/wal"));
    json(&body)[section][field].as_u64().unwrap_or(0)
}

/// Partitions that leave a live consumer and come back to it: A owns them, loses its
/// broker connection (B takes over and writes its rides to DynamoDB), then B loses its
/// own and they return to A. A's resident days are stale by then. Applying the next
/// rides on top of them loses rides: A's items carry as many rides as B's and lose to
/// them, or carry more and overwrite B's. So A must reload from the tables. Every figure
/// is checked in the tables after each phase.
#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn partitions_that_return_to_a_consumer_are_reloaded_from_the_tables() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let consume = |dir: &std::path::Path| {
        let mut args = b.args("consume", &b.dynamodb);
        args.extend(["--set", "consumer.ack_after=table", "--set", "bus.amqp.prefetch=20000"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(dir, &args)
    };
    let a = consume(dirs[0].path()); // first on the queues: the active one
    let sb = consume(dirs[1].path());
    let writer = b.start(dirs[2].path(), "write");
    let reader = b.start(dirs[3].path(), "read");
    // Few skiers, so that most skier-days get rides in every phase.
    let phases: Vec<Vec<Ride>> = (0..3u64).map(|i| random_rides(4_100 + i, 1_500, 200)).collect();
    let mut sent: Vec<Ride> = Vec::new();
    let run_phase = |i: usize, owner: &Server, sent: &mut Vec<Ride>| {
        let before = wal_figure(owner, "consumer", "events");
        post_all(&writer.base, &phases[i], 8, Duration::from_secs(120));
        sent.extend(phases[i].iter().cloned());
        let bad = Expected::from(sent).settle(&reader.base, Duration::from_secs(120), 2);
        assert!(bad.is_empty(), "phase {}: {} mismatches in the tables, e.g. {:?}", i + 1, bad.len(), &bad[..bad.len().min(5)]);
        let took = wal_figure(owner, "consumer", "events") - before;
        assert!(took >= phases[i].len() as u64, "phase {}: the expected owner applied {took} of {} rides", i + 1, phases[i].len());
    };

    run_phase(0, &a, &mut sent);
    close_consumer_connection(&b.prefix, a.child.id());
    wait_for("A reconnected", Duration::from_secs(30), || wal_figure(&a, "source", "reconnects") >= 1);
    run_phase(1, &sb, &mut sent);
    close_consumer_connection(&b.prefix, sb.child.id());
    wait_for("B reconnected", Duration::from_secs(30), || wal_figure(&sb, "source", "reconnects") >= 1);
    run_phase(2, &a, &mut sent);
    assert!(wal_figure(&a, "consumer", "ownership_resets") >= 1, "A must have dropped its stale days");
}

/// Issue 13, item 7, through the same proxy as the outage test above: while DynamoDB is
/// away the first rides of a NEW day arrive, whose aggregator cannot be loaded. They used
/// to stop the consumer's loop (activation retried in place), so no resident day of any
/// partition was applied until the tables came back, and a SIGTERM then waited for
/// systemd's SIGKILL. Now the new day waits in the WAL while the resident days go on
/// (checked on the consumer's own GETs, answered from its actors), a SIGTERM during the
/// outage exits within the final-flush bound, and a restart once the tables are back
/// counts every ride exactly once.
#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn dynamodb_outage_a_new_day_waits_while_resident_days_apply_and_sigterm_is_bounded() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let upstream = b.dynamodb.trim_start_matches("http://").parse().expect("DynamoDB endpoint as http://ip:port");
    let proxy = Proxy::start(upstream);
    let (dc, dw, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut consumer = b.start_at(dc.path(), "consume", &proxy.url(), &[]);
    let writer = b.start(dw.path(), "write");
    let reader = b.start(dr.path(), "read");
    // Days 1–3 of resorts 1–3 become resident before the outage.
    let before = random_rides(61, 900, 300);
    post_all(&writer.base, &before, 8, Duration::from_secs(60));
    // Season totals come from the tables with a broker: only the actors' figures here.
    let actors = |rides: &[Ride]| Expected { skier_season: Default::default(), ..Expected::from(rides) };
    let bad = actors(&before).settle(&consumer.base, Duration::from_secs(30), 1);
    assert!(bad.is_empty(), "before the outage: {:?}", &bad[..bad.len().min(5)]);

    proxy.down();
    // A new day (resort 1, day 100) during the outage: the broker confirms, the consumer
    // cannot load the day from the tables.
    let new_day: Vec<Ride> =
        random_rides(62, 200, 300).into_iter().map(|r| Ride { at: DayKey { resort: 1, day: 100, ..r.at }, ..r }).collect();
    post_all(&writer.base, &new_day, 4, Duration::from_secs(60));
    // Then more rides for the resident days, which must be applied meanwhile.
    let during = random_rides(63, 900, 300);
    post_all(&writer.base, &during, 8, Duration::from_secs(60));
    let mut resident = before.clone();
    resident.extend(during.iter().cloned());
    let bad = actors(&resident).settle(&consumer.base, Duration::from_secs(30), 1);
    assert!(bad.is_empty(), "resident days during the outage: {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert!(wal_figure(&consumer, "consumer", "parked_days") >= 1, "the new day must be waiting for the tables");
    // A flush retries a refused connection within its bounded budget before it counts as
    // failed: wait for the flusher's own figure rather than expect it at once.
    common::wait_for("a failed flush while DynamoDB is away", Duration::from_secs(90), || wal_figure(&consumer, "flusher", "failures") > 0);

    // SIGTERM during the outage: exits within the final-flush bound (10 s by default) plus
    // the HTTP drain, far below systemd's TimeoutStopSec (60 s in deploy/systemd).
    let t = Instant::now();
    let code = consumer.terminate();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(30), "SIGTERM during the outage took {took:?}");
    eprintln!("SIGTERM during the outage: exit {code:?} after {took:?}");

    // Tables back, consumer restarted on the same disk: nothing lost, nothing twice.
    proxy.up();
    consumer.restart();
    let mut all = resident;
    all.extend(new_day.iter().cloned());
    let bad = actors(&all).settle(&consumer.base, Duration::from_secs(90), 1);
    assert!(bad.is_empty(), "consumer after the restart: {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let bad = Expected::from(&all).settle(&reader.base, Duration::from_secs(90), 2);
    assert!(bad.is_empty(), "tables after the restart: {} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let raw = common::raw::settle(&b.dynamodb, &format!("{}_", b.prefix), &all, Duration::from_secs(60));
    assert!(raw.is_empty(), "SkierLiftRides: {} raw rides wrong, e.g. {:?}", raw.len(), &raw[..raw.len().min(5)]);
}

/// One ride followed across processes by its request id (issue 16 item 2): the write node
/// answers with the id the client sent and logs the request under it, the AMQP message
/// carries it, and the consumer's "WAL batch durable" line names it. A ride that came with
/// only a W3C `traceparent` is known by its trace id; one with neither gets an id of ours.
/// The consumer's publish → applied histogram counts the three messages.
#[test]
#[ignore = "needs RabbitMQ and DynamoDB Local: run scripts/test.sh"]
fn a_rides_request_id_reaches_the_write_nodes_and_the_consumers_logs() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let b = Backends::new();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs = tempfile::tempdir().unwrap();
    let (consume_log, write_log) = (logs.path().join("consume.log"), logs.path().join("write.log"));
    let filter = "warn,liftlog=debug";
    let start = |dir: &std::path::Path, role: &str, log: &std::path::Path| {
        let args = b.args(role, &b.dynamodb);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start_logged(dir, &args, &[], Some((log, filter)))
    };
    let consumer = start(dirs[0].path(), "consume", &consume_log);
    let writer = start(dirs[1].path(), "write", &write_log);

    let id = format!("gate-7:{}", b.prefix);
    let trace = format!("{:032x}", SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos());
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let post = |skier: u32, header: (&str, &str)| {
        let url = writer.url(&format!("/skiers/1/seasons/2025/days/1/skiers/{skier}"));
        let answer =
            agent().post(&url).set("Content-Type", "application/json").set(header.0, header.1).send_string(r#"{"time":10,"liftID":5}"#);
        let answer = answer.unwrap_or_else(|e| panic!("POST for skier {skier}: {e}"));
        assert_eq!(answer.status(), 201);
        answer.header("x-request-id").unwrap_or_else(|| panic!("no X-Request-Id on the 201 for skier {skier}")).to_string()
    };
    assert_eq!(post(71, ("X-Request-Id", &id)), id, "the client's id is echoed");
    assert_eq!(post(72, ("traceparent", &traceparent)), trace, "a traceparent's trace id is the request id");
    let made = post(73, ("Accept", "application/json"));
    assert!(made.len() == 16 && made.bytes().all(|c| c.is_ascii_hexdigit()), "an id of ours: {made:?}");

    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    let durable_lines = |log: &str| log.lines().filter(|l| l.contains("WAL batch durable")).map(str::to_string).collect::<Vec<_>>();
    wait_for("the consumer to log the three rides' WAL batches", Duration::from_secs(30), || {
        let lines = durable_lines(&read(&consume_log));
        [&id, &trace, &made].iter().all(|want| lines.iter().any(|l| l.contains(want.as_str())))
    });
    // The consumer's publish → applied histogram counts the three messages (recorded once
    // their batch is dispatched, which follows the durable line: waited for), with lags that
    // are plausible on one machine: above 0 (a stamp in the future, e.g. in the wrong unit,
    // counts 0) and below a minute.
    let applied_lag = || {
        let metrics = get(&agent(), &consumer.url("/metrics")).1;
        let value = |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok());
        (
            value("liftlog_consumer_applied_lag_seconds_count").unwrap_or(0.0),
            value("liftlog_consumer_applied_lag_seconds_sum").unwrap_or(0.0),
        )
    };
    wait_for("the consumer's applied-lag histogram to count three messages", Duration::from_secs(30), || applied_lag().0 >= 3.0);
    let (count, sum) = applied_lag();
    assert!(sum > 0.0 && sum / count < 60.0, "applied lag: count {count}, sum {sum} s");
    let write = read(&write_log);
    for want in [&id, &trace, &made] {
        let line = write.lines().find(|l| l.contains("ride confirmed") && l.contains(want.as_str()));
        assert!(line.is_some(), "the write node's 201 line carries the request id {want}:\n{write}");
    }
}
