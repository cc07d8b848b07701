//! Crash tests with the real binary: kill -9 at random moments while concurrent clients
//! post rides, restart, let the clients retry what was not acknowledged (same
//! Idempotency-Key, as a real client does), and check that every ride is counted exactly
//! once in every read and in the raw rides table. A keyless client posts alongside and
//! never retries: its 201s must count, its `not-recorded` 503s must not, and what it could
//! not know (a 503 `unknown`, or an answer the kill cut off) counts once or not at all.

mod common;

use common::{agent, random_rides, Expected, Rng, Server};
use liftlog::domain::RideEvent;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CLIENTS: usize = 8;

/// What the clients of a round count: POSTs begun and not yet answered, answered, and cut
/// off by the kill (begun before the killer raised `killing`, answered by no response).
#[derive(Default)]
struct Traffic {
    in_flight: AtomicUsize,
    answered: AtomicUsize,
    killing: AtomicBool,
    cut: AtomicUsize,
}

impl Traffic {
    fn post(&self, f: impl FnOnce() -> u16) -> u16 {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let before_kill = !self.killing.load(Ordering::SeqCst);
        let code = f();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.answered.fetch_add(1, Ordering::SeqCst);
        if code == 0 && before_kill {
            self.cut.fetch_add(1, Ordering::SeqCst);
        }
        code
    }
}

/// Posts `todo` (indices into `rides`) from CLIENTS threads until done or the server dies;
/// marks every 201 in `acked`. Also re-sends every tenth ride that was already acked, which
/// must not count twice.
fn post_round(
    base: &str,
    rides: &Arc<Vec<common::Ride>>,
    acked: &Arc<Vec<AtomicBool>>,
    todo: Vec<usize>,
    stop: &Arc<AtomicBool>,
    traffic: &Arc<Traffic>,
) -> usize {
    let queue = Arc::new(Mutex::new(todo));
    let sent = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (queue, rides, acked, stop, sent, base, traffic) =
                (queue.clone(), rides.clone(), acked.clone(), stop.clone(), sent.clone(), base.to_string(), traffic.clone());
            std::thread::spawn(move || {
                let agent = agent();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(i) = queue.lock().unwrap().pop() else { return };
                    let code = traffic.post(|| rides[i].post(&agent, &base));
                    sent.fetch_add(1, Ordering::Relaxed);
                    match code {
                        201 => acked[i].store(true, Ordering::SeqCst),
                        0 => return, // the server is gone; the ride stays un-acked
                        503 => {}
                        other => panic!("ride {i} got {other}"),
                    }
                    if i % 10 == 0 && acked[i].load(Ordering::SeqCst) {
                        let again = traffic.post(|| rides[i].post(&agent, &base));
                        assert!(again == 201 || again == 0 || again == 503, "retry of ride {i} got {again}");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    sent.load(Ordering::Relaxed)
}

/// The keyless client's rides: each one a skier-day of its own, so that each reads back
/// alone (resort 4, day 10, skiers from 10,001: none of the keyed rides' days or skiers).
const KEYLESS_RESORT: u32 = 4;
const KEYLESS_DAY: u16 = 10;
const KEYLESS_LIFT: u16 = 7;

fn keyless_skier(n: usize) -> u32 {
    10_001 + n as u32
}

/// What a keyless client knows of its ride from the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// 201: counted, exactly once.
    Counted,
    /// 503 `Ride-Outcome: not-recorded`: not counted.
    NotCounted,
    /// 503 `Ride-Outcome: unknown`, or no answer (the kill cut it off): once or not at all.
    Maybe,
}

/// Posts one new keyless ride after another until `stop` or the server is gone; never
/// retries (a keyless retry may count twice). Appends what it learnt of each to `log`.
fn keyless_client(base: String, next: Arc<AtomicUsize>, log: Arc<Mutex<Vec<Known>>>, stop: Arc<AtomicBool>, traffic: Arc<Traffic>) {
    let agent = agent();
    while !stop.load(Ordering::Relaxed) {
        let n = next.fetch_add(1, Ordering::SeqCst);
        // Pushed before the POST, so that a ride in flight is in the log whatever happens.
        let mut held = log.lock().unwrap();
        assert_eq!(held.len(), n, "one keyless client at a time");
        held.push(Known::Maybe);
        drop(held);
        let url = format!("{base}/skiers/{KEYLESS_RESORT}/seasons/2025/days/{KEYLESS_DAY}/skiers/{}", keyless_skier(n));
        let mut outcome = None;
        let code = traffic.post(|| {
            let res =
                agent.post(&url).set("Content-Type", "application/json").send_string(&format!(r#"{{"time":100,"liftID":{KEYLESS_LIFT}}}"#));
            let (known, code) = match res {
                Ok(r) if r.status() == 201 => (Known::Counted, 201),
                Err(ureq::Error::Status(503, r)) => match r.header("Ride-Outcome") {
                    Some("not-recorded") => (Known::NotCounted, 503),
                    Some("unknown") => (Known::Maybe, 503),
                    other => panic!("keyless ride {n}: a 503 without a valid Ride-Outcome ({other:?})"),
                },
                Err(ureq::Error::Transport(_)) => (Known::Maybe, 0),
                other => panic!("keyless ride {n}: {other:?}"),
            };
            outcome = Some(known);
            code
        });
        log.lock().unwrap()[n] = outcome.unwrap();
        if code == 0 {
            return; // the server is gone
        }
    }
}

/// The raw rides (`SkierLiftRides`) of a stopped embedded node, read from its sled tables.
fn raw_rides(data_dir: &Path) -> Vec<RideEvent> {
    let db = sled_open_retrying(&data_dir.join("tables"));
    let tree = db.open_tree("rides").unwrap();
    tree.iter()
        .map(|kv| {
            let (_, v) = kv.expect("read a raw ride");
            bincode::serde::decode_from_slice::<RideEvent, _>(&v, bincode::config::standard()).expect("decode a raw ride").0
        })
        .collect()
}

/// Compares the raw rides table with the model: every keyed ride that got its 201 is there
/// exactly once, field for field, and besides them only rides of `other` (which says,
/// for a raw ride not keyed, whether it may be there). Returns the mismatches.
fn reconcile_raw(stored: &[RideEvent], keyed: &[common::Ride], mut other: impl FnMut(&RideEvent) -> bool) -> Vec<String> {
    let mut bad = Vec::new();
    let mut by_id: BTreeMap<u64, Vec<&RideEvent>> = BTreeMap::new();
    for r in stored {
        by_id.entry(r.id).or_default().push(r);
    }
    for r in keyed {
        let want = common::raw::row_of(r);
        match by_id.remove(&want.id).as_deref() {
            Some([got]) if **got == want => {}
            Some(got) => bad.push(format!("ride {}: stored as {got:?}, want {want:?}", r.key)),
            None => bad.push(format!("ride {} ({want:?}) is not in the raw rides", r.key)),
        }
    }
    for r in by_id.into_values().flatten() {
        if !other(r) {
            bad.push(format!("a raw ride nobody got a 201 for: {r:?}"));
        }
    }
    bad
}

#[test]
fn kill9_at_random_moments_loses_nothing_and_counts_nothing_twice() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    let kills: usize = std::env::var("CRASH_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    // Enough rides that traffic is still flowing at every kill: a kill comes after at most
    // 400 answers of its round, so 8 kills take at most 3,200 of the 6,000.
    let n_rides: usize = std::env::var("CRASH_RIDES").ok().and_then(|s| s.parse().ok()).unwrap_or(6_000);
    eprintln!("crash test seed {seed} (CRASH_SEED to repeat), {kills} kills, {n_rides} rides");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    // A short flush interval so that checkpoints and WAL truncation happen during the run.
    let mut server = Server::start(dir.path(), &["--flush-interval-ms", "40"]);
    let rides = Arc::new(random_rides(seed, n_rides, 300));
    let acked: Arc<Vec<AtomicBool>> = Arc::new((0..rides.len()).map(|_| AtomicBool::new(false)).collect());
    let keyless_next = Arc::new(AtomicUsize::new(0));
    let keyless: Arc<Mutex<Vec<Known>>> = Arc::default();

    for round in 0..kills + 20 {
        let todo: Vec<usize> = (0..rides.len()).filter(|i| !acked[*i].load(Ordering::SeqCst)).collect();
        if todo.is_empty() && round > kills {
            break;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let traffic = Arc::new(Traffic::default());
        let keyless_thread = {
            let (base, next, log, stop, traffic) =
                (server.base.clone(), keyless_next.clone(), keyless.clone(), stop.clone(), traffic.clone());
            std::thread::spawn(move || keyless_client(base, next, log, stop, traffic))
        };
        let started = Instant::now();
        let clients = {
            let (base, rides, acked, stop, traffic) = (server.base.clone(), rides.clone(), acked.clone(), stop.clone(), traffic.clone());
            std::thread::spawn(move || post_round(&base, &rides, &acked, todo, &stop, &traffic))
        };
        // The kill comes after a random number of answers in this round (the clients' own
        // count, not a time: a slow machine moves the kill, not its place in the traffic),
        // straight from this thread (`Child::kill` is the kill(2) call: no `kill` process
        // to start while the node answers what was in flight), and records how many POSTs
        // were in flight at that moment.
        let at_kill = (round < kills).then(|| {
            let after = rng.range(20, 400) as usize;
            let deadline = Instant::now() + Duration::from_secs(120);
            while traffic.answered.load(Ordering::SeqCst) < after && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            traffic.killing.store(true, Ordering::SeqCst);
            let in_flight = traffic.in_flight.load(Ordering::SeqCst);
            let _ = server.child.kill();
            stop.store(true, Ordering::Relaxed);
            (after, in_flight)
        });
        let sent = clients.join().expect("clients");
        stop.store(true, Ordering::Relaxed);
        keyless_thread.join().expect("keyless client");
        let n_acked = acked.iter().filter(|a| a.load(Ordering::SeqCst)).count();
        let cut = traffic.cut.load(Ordering::SeqCst);
        eprintln!(
            "round {round}: sent {sent} in {:?}, acked so far {n_acked}/{}, kill after {at_kill:?} (answers, in flight), {cut} POSTs cut off",
            started.elapsed(),
            rides.len()
        );
        if let Some((after, in_flight)) = at_kill {
            assert!(traffic.answered.load(Ordering::SeqCst) >= after, "round {round}: the clients ran out of rides before the kill");
            // A POST begun before the kill and never answered was in flight when it landed:
            // a kill between bursts (no traffic, or only after the clients finished) has none.
            assert!(
                in_flight > 0 && cut > 0,
                "round {round}: the kill -9 landed with no request in flight ({in_flight} begun, {cut} cut off): it tested nothing"
            );
        }
        server.kill9();
        server.restart();
    }
    assert!(acked.iter().all(|a| a.load(Ordering::SeqCst)), "every ride must get its 201 eventually");
    let known = keyless.lock().unwrap().clone();
    let count = |k: Known| known.iter().filter(|x| **x == k).count();
    eprintln!(
        "all {} rides acknowledged after {kills} kills; keyless: {} counted, {} not, {} maybe; reconciling",
        rides.len(),
        count(Known::Counted),
        count(Known::NotCounted),
        count(Known::Maybe)
    );
    assert!(count(Known::Counted) > 0, "the keyless client got no 201: it tested nothing");

    let expected = Expected::from(&rides);
    let agent = agent();
    let bad = expected.check(&agent, &server.base);
    assert!(bad.is_empty(), "{} mismatches after crashes (seed {seed}), first: {:?}", bad.len(), &bad[..bad.len().min(5)]);
    let keyless_counted = |server: &Server| -> Vec<bool> {
        let read: Vec<bool> = known
            .iter()
            .enumerate()
            .map(|(n, k)| {
                let (code, body) = common::get(
                    &agent,
                    &server.url(&format!("/skiers/{KEYLESS_RESORT}/seasons/2025/days/{KEYLESS_DAY}/skiers/{}", keyless_skier(n))),
                );
                let counted = match (code, body.trim()) {
                    (200, v) if v == (KEYLESS_LIFT as u64 * 10).to_string() => true,
                    (404, _) => false,
                    other => panic!("keyless ride {n} ({k:?}) reads {other:?}: counted more than once, or a failed read"),
                };
                match (k, counted) {
                    (Known::Counted, false) => panic!("keyless ride {n} got its 201 and is not counted"),
                    (Known::NotCounted, true) => panic!("keyless ride {n} was answered not-recorded and is counted"),
                    _ => counted,
                }
            })
            .collect();
        // The day's skier count agrees, and lies within the bounds the answers set.
        let (code, body) = common::get(&agent, &server.url(&format!("/resorts/{KEYLESS_RESORT}/seasons/2025/day/{KEYLESS_DAY}/skiers")));
        let n = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["numSkiers"].as_u64())
            .unwrap_or_else(|| panic!("{code} {body}"));
        let (lo, hi) = (count(Known::Counted), count(Known::Counted) + count(Known::Maybe));
        assert!((lo..=hi).contains(&(n as usize)), "keyless day counts {n} skiers, outside {lo}..={hi}");
        assert_eq!(n as usize, read.iter().filter(|c| **c).count(), "the day count and the skier-days disagree");
        read
    };
    let counted = keyless_counted(&server);
    eprintln!(
        "keyless: {} of the {} maybe rides counted",
        counted.iter().zip(&known).filter(|(c, k)| **c && **k == Known::Maybe).count(),
        count(Known::Maybe)
    );

    // And once more after a final kill: state rebuilt from tables + WAL only. A ride that
    // may or may not have counted has been decided, for good.
    server.kill9();
    server.restart();
    let bad = expected.check(&agent, &server.base);
    assert!(bad.is_empty(), "{} mismatches after the final restart (seed {seed}): {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert_eq!(keyless_counted(&server), counted, "a keyless ride changed its count across a restart");

    // The raw rides: a clean stop flushes everything and checkpoints the WAL; then the
    // table holds each keyed ride once and exactly the keyless rides that count.
    assert_eq!(server.terminate(), Some(0));
    let stored = raw_rides(dir.path());
    let keyless_skiers: BTreeSet<u32> = counted.iter().enumerate().filter(|(_, c)| **c).map(|(n, _)| keyless_skier(n)).collect();
    let mut keyless_rows: BTreeMap<u32, usize> = BTreeMap::new();
    let bad = reconcile_raw(&stored, &rides, |r| {
        let ok = r.resort == KEYLESS_RESORT && r.day == KEYLESS_DAY && r.lift == KEYLESS_LIFT && keyless_skiers.contains(&r.skier);
        *keyless_rows.entry(r.skier).or_default() += ok as usize;
        ok
    });
    assert!(bad.is_empty(), "{} raw-ride mismatches (seed {seed}): {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert!(keyless_rows.values().all(|n| *n == 1), "a keyless ride stored twice: {:?}", keyless_rows.iter().find(|(_, n)| **n != 1));
    assert_eq!(stored.len(), rides.len() + keyless_skiers.len(), "raw rides in the table");
}

/// A crash in the middle of a flush, at the worst point: the skier-day items are durable,
/// the day counts and raw rides are not. The WAL still holds the rides, but replaying it
/// finds every one already counted (their ids are in the skier-day items). The restarted
/// node must still write the missing counts and raw rows, so that after the WAL is
/// checkpointed and the days are read from the tables alone, nothing is missing.
#[test]
#[cfg_attr(not(feature = "fault-injection"), ignore = "needs --features fault-injection (scripts/test.sh)")]
fn a_flush_torn_between_skier_days_and_counts_is_completed_after_restart() {
    if !cfg!(feature = "fault-injection") {
        panic!("this test needs the fault points: run it with --features fault-injection (scripts/test.sh does)");
    }
    let dir = tempfile::tempdir().unwrap();
    // Flushes only when asked, so the torn one is the one this test triggers.
    let quiet = ["--flush-interval-ms", "600000"];
    let mut server = Server::start_with_env(dir.path(), &quiet, &[("LIFTLOG_FAULT_ABORT_MID_FLUSH", "1")]);
    let rides = random_rides(7, 400, 60);
    let agent = agent();
    for r in &rides {
        assert_eq!(r.post(&agent, &server.base), 201);
    }
    let (code, _) = common::call(&agent, "POST", &server.url("/admin/flush"), &[], None);
    assert_eq!(code, 0, "the armed flush must abort the process");
    let _ = server.child.wait();

    // Restart without the fault; replay finds only duplicates. Flush, then stop cleanly
    // (final flush and WAL checkpoint), and start again: every day is now read from the
    // tables, since the empty WAL activates none.
    server.restart();
    let (code, body) = common::call(&agent, "POST", &server.url("/admin/flush"), &[], None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(server.terminate(), Some(0));
    server.restart();
    let expected = Expected::from(&rides);
    let bad = expected.check(&agent, &server.base);
    assert!(bad.is_empty(), "{} mismatches read from the tables: {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert_eq!(server.terminate(), Some(0));

    // Every raw ride is in SkierLiftRides once, field for field, and nothing else is.
    let bad = reconcile_raw(&raw_rides(dir.path()), &rides, |_| false);
    assert!(bad.is_empty(), "{} raw-ride mismatches: {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

/// A WAL record damaged in the middle (intact, acknowledged records after it) is storage
/// corruption, not a crash: the node must refuse to start and say how to override, rather
/// than truncate the acknowledged rides after the damage. With the operator override it
/// starts, and `/admin/wal` says how many intact records it dropped.
#[test]
fn a_corrupt_wal_record_in_the_middle_stops_the_node_unless_overridden() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = ["--flush-interval-ms", "600000"];
    let mut server = Server::start(dir.path(), &quiet);
    let agent = agent();
    // One at a time: each ride is a WAL record of its own.
    let rides = random_rides(11, 6, 6);
    for r in &rides {
        assert_eq!(r.post(&agent, &server.base), 201);
    }
    server.kill9();

    // Flip one payload byte of record 2: its CRC fails, records 3.. are intact.
    {
        let db = sled_open_retrying(&dir.path().join("wal"));
        let log = db.open_tree("log").unwrap();
        assert!(log.len() >= 4, "expected a WAL record per ride, found {}", log.len());
        let mut frame = log.get(2u64.to_be_bytes()).unwrap().expect("record 2").to_vec();
        let last = frame.len() - 1;
        frame[last] ^= 0xFF;
        log.insert(2u64.to_be_bytes(), frame).unwrap();
        db.flush().unwrap();
    }

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_liftlog"))
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "main", "--data-dir"])
        .arg(dir.path())
        .args(quiet)
        .env("RUST_LOG", "error")
        .env_remove("LIFTLOG_WAL__TRUNCATE_CORRUPT")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run liftlog");
    // A node that starts anyway keeps running: give it a bounded time to refuse.
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node started on a WAL damaged in the middle (still running after 30 s)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node exited 0 on a WAL damaged in the middle; stderr: {stderr}");
    assert!(stderr.contains("LIFTLOG_WAL__TRUNCATE_CORRUPT=true"), "the refusal must name the override: {stderr}");

    let mut server = Server::start_with_env(dir.path(), &quiet, &[("LIFTLOG_WAL__TRUNCATE_CORRUPT", "true")]);
    let (code, body) = common::get(&agent, &server.url("/admin/wal"));
    assert_eq!(code, 200, "{body}");
    let wal: serde_json::Value = serde_json::from_str(&body).unwrap();
    let recovery = &wal["recovery"];
    assert_eq!(recovery["records"], 1, "{body}");
    assert_eq!(recovery["truncated_intact_records"].as_u64(), Some(rides.len() as u64 - 2), "{body}");
    // What the override keeps is the record before the damage, the first ride, and only
    // that: after a clean stop (flush) it is the one raw ride in the table.
    assert_eq!(server.terminate(), Some(0));
    let bad = reconcile_raw(&raw_rides(dir.path()), &rides[..1], |_| false);
    assert!(bad.is_empty(), "raw rides after the override: {bad:?}");
}

/// sled releases its lock a little after the process is gone.
fn sled_open_retrying(path: &std::path::Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if Instant::now() < deadline => {
                eprintln!("opening {}: {e}; retrying", path.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }
}

/// Issue 13 item 5: a POST that passes its publish deadline is answered 503 while its ride
/// is still queued for the WAL, and the ride is recorded after the answer. The 503 used to
/// say "Ride not recorded", and a keyless client that believed it posted the ride again and
/// counted it twice. Now `Ride-Outcome: unknown` and the message say what is true, and a
/// `not-recorded` answer (here: the circuit breaker, open after consecutive timeouts) is
/// one whose ride really is absent.
#[test]
fn a_503_says_whether_the_ride_may_have_been_recorded_and_is_right() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("liftlog.toml");
    // Shorter than one WAL fsync: most POSTs answer before their ride is durable.
    std::fs::write(&config, "publish_deadline_ms = 1\n").unwrap();
    let mut server = Server::start(&dir.path().join("data"), &["--config", config.to_str().unwrap()]);
    let agent = agent();
    let (mut created, mut unknown, mut refused) = (Vec::new(), Vec::new(), Vec::new());
    // Until enough POSTs passed the deadline (how many do depends on the disk's fsync time).
    for skier in 1..=20_000u32 {
        if unknown.len() >= 10 {
            break;
        }
        let url = server.url(&format!("/skiers/1/seasons/2025/days/1/skiers/{skier}"));
        // Keyless, as the clients the issue is about.
        match agent.post(&url).set("Content-Type", "application/json").send_string(r#"{"time":10,"liftID":5}"#) {
            Ok(r) if r.status() == 201 => created.push(skier),
            Err(ureq::Error::Status(503, r)) => {
                let outcome = r.header("Ride-Outcome").map(str::to_string);
                let body = r.into_string().unwrap_or_default();
                match outcome.as_deref() {
                    Some("unknown") => {
                        assert!(body.contains("may have been recorded") && body.contains("count it twice"), "{body}");
                        unknown.push(skier);
                    }
                    Some("not-recorded") => {
                        assert!(body.contains("Ride not recorded"), "{body}");
                        refused.push(skier);
                    }
                    other => panic!("a 503 to a POSTed ride without a valid Ride-Outcome ({other:?}): {body}"),
                }
            }
            other => panic!("skier {skier}: {other:?}"),
        }
    }
    eprintln!("1 ms deadline: {} created, {} unknown, {} not recorded", created.len(), unknown.len(), refused.len());
    assert!(!unknown.is_empty(), "no POST passed its 1 ms deadline: nothing was tested");
    let vertical = |skier: u32| common::get(&agent, &server.url(&format!("/skiers/1/seasons/2025/days/1/skiers/{skier}")));
    // "unknown" was right to warn: those rides were recorded after the 503 (a keyless retry
    // would have counted them twice).
    common::wait_for("the rides answered 'unknown' to be counted", Duration::from_secs(20), || {
        unknown.iter().chain(&created).all(|&s| vertical(s) == (200, "50".to_string()))
    });
    for &skier in &refused {
        assert_eq!(vertical(skier).0, 404, "skier {skier}'s ride was answered 'not recorded' but is counted");
    }
    // The raw rides agree: one row for each ride created or answered 'unknown' (every one
    // of those is counted, above), none for a refused one, nothing else.
    assert_eq!(server.terminate(), Some(0));
    let stored = raw_rides(&dir.path().join("data"));
    let want: BTreeSet<u32> = created.iter().chain(&unknown).copied().collect();
    let got: Vec<u32> = stored.iter().map(|r| r.skier).collect();
    assert_eq!(got.len(), want.len(), "raw rides: {} stored for {} rides counted", got.len(), want.len());
    assert_eq!(got.iter().copied().collect::<BTreeSet<u32>>(), want, "raw rides of other skiers than the counted ones");
    assert!(
        stored.iter().all(|r| (r.resort, r.day, r.time, r.lift, r.vertical) == (1, 1, 10, 5, 50)),
        "a raw ride that differs from its POST"
    );
}
