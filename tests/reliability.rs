//! Reliability under overload, shutdown and a full disk, with the real binary: whatever
//! happens, every ride that got its 201 is counted exactly once, and the service answers
//! with a status and `Retry-After` rather than failing or hanging.

mod common;

use common::{agent, random_rides, Expected, Ride, Server};
use liftlog::domain::{DayKey, RideEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// POSTs a ride and returns (status, Retry-After header). Transport errors are 0.
fn post(agent: &ureq::Agent, base: &str, r: &Ride) -> (u16, Option<String>) {
    let res = agent
        .post(&format!("{base}{}", r.path()))
        .set("Content-Type", "application/json")
        .set("Idempotency-Key", &r.key)
        .send_string(&r.body());
    match res {
        Ok(resp) => (resp.status(), resp.header("retry-after").map(str::to_string)),
        Err(ureq::Error::Status(code, resp)) => (code, resp.header("retry-after").map(str::to_string)),
        Err(_) => (0, None),
    }
}

/// Counts of what the clients saw.
#[derive(Default, Debug)]
struct Seen {
    created: usize,
    too_many: usize,
    unavailable: usize,
    transport: usize,
    other: Vec<u16>,
    missing_retry_after: usize,
}

/// Every thread takes rides from `todo` and posts each once; 201s go to `acked`.
fn hammer(base: &str, rides: &[Ride], threads: usize, acked: &Arc<Mutex<Vec<Ride>>>, stop: &Arc<AtomicBool>) -> Seen {
    let next = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let rides = Arc::new(rides.to_vec());
    let hs: Vec<_> = (0..threads)
        .map(|_| {
            let (next, seen, rides, acked, stop, base) =
                (next.clone(), seen.clone(), rides.clone(), acked.clone(), stop.clone(), base.to_string());
            std::thread::spawn(move || {
                let agent = agent();
                while !stop.load(Ordering::Relaxed) {
                    let Some(r) = rides.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
                    let (code, retry_after) = post(&agent, &base, r);
                    let mut s = seen.lock().unwrap();
                    match code {
                        201 => {
                            s.created += 1;
                            acked.lock().unwrap().push(r.clone());
                        }
                        429 => s.too_many += 1,
                        503 => s.unavailable += 1,
                        0 => s.transport += 1,
                        other => s.other.push(other),
                    }
                    if (code == 429 || code == 503) && retry_after.is_none() {
                        s.missing_retry_after += 1;
                    }
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap()
}

/// The raw rides (`SkierLiftRides`) of a stopped embedded node, read from its sled tables
/// (as tests/crash.rs does; sled releases its lock a little after the process is gone).
fn raw_rides(data_dir: &std::path::Path) -> Vec<RideEvent> {
    let path = data_dir.join("tables");
    let deadline = Instant::now() + Duration::from_secs(10);
    let db = loop {
        match sled::open(&path) {
            Ok(db) => break db,
            Err(e) if Instant::now() < deadline => {
                eprintln!("opening {}: {e}; retrying", path.display());
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    };
    let tree = db.open_tree("rides").unwrap();
    tree.iter()
        .map(|kv| {
            bincode::serde::decode_from_slice::<RideEvent, _>(&kv.unwrap().1, bincode::config::standard()).expect("decode a raw ride").0
        })
        .collect()
}

/// Every ride that got its 201 is in the raw rides table exactly once, field for field
/// (its id is the hash of its key and the ride), and nothing else is.
fn assert_raw_rides_are(data_dir: &std::path::Path, acked: &[Ride]) {
    let mut stored: BTreeMap<u64, Vec<RideEvent>> = BTreeMap::new();
    for r in raw_rides(data_dir) {
        stored.entry(r.id).or_default().push(r);
    }
    let mut bad = Vec::new();
    let keys: BTreeSet<&str> = acked.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys.len(), acked.len(), "the model holds a ride twice");
    for r in acked {
        let want = common::raw::row_of(r);
        match stored.remove(&want.id).as_deref() {
            Some([got]) if *got == want => {}
            other => bad.push(format!("ride {}: stored {other:?}, want {want:?}", r.key)),
        }
    }
    bad.extend(stored.values().flatten().map(|r| format!("a raw ride nobody got a 201 for: {r:?}")));
    assert!(bad.is_empty(), "{} raw-ride mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

fn config(dir: &std::path::Path, toml: &str) -> String {
    let path = dir.join("liftlog.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn overload_is_shed_with_429_and_retry_after_and_nothing_accepted_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    // Far more offered load (32 clients flat out) than admitted (100 rides/s): even on a
    // throttled shared machine, next to the full-disk test, the clients offer 500 req/s.
    let cfg = config(cfg_dir.path(), "admission_rate = 100.0\nadmission_burst = 50.0\nbus_capacity = 256\n");
    let mut s = Server::start(dir.path(), &["--config", &cfg]);
    let rides = random_rides(31, 6_000, 800);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let seen = hammer(&s.base, &rides, 32, &acked, &Arc::new(AtomicBool::new(false)));
    eprintln!("overload: {seen:?} in {:?}", started.elapsed());
    assert!(seen.too_many > seen.created, "most requests should be shed: {seen:?}");
    assert!(seen.created >= 50, "the burst and the refill are admitted: {seen:?}");
    assert_eq!((seen.transport, seen.other.len(), seen.missing_retry_after), (0, 0, 0), "{seen:?}");
    let acked = acked.lock().unwrap().clone();
    let a = agent();
    let bad = Expected::from(&acked).check(&a, &s.base);
    assert!(bad.is_empty(), "{:?}", &bad[..bad.len().min(5)]);
    s.kill9();
    s.restart();
    let bad = Expected::from(&acked).check(&a, &s.base);
    assert!(bad.is_empty(), "after restart: {:?}", &bad[..bad.len().min(5)]);
    assert_eq!(s.terminate(), Some(0));
    assert_raw_rides_are(dir.path(), &acked);
}

#[test]
fn sigterm_under_load_is_graceful_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Server::start(dir.path(), &["--set", "flush.interval_ms=100"]);
    let rides = random_rides(13, 40_000, 2_000);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let poster = {
        let (base, rides, acked, stop) = (s.base.clone(), rides.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || hammer(&base, &rides, 16, &acked, &stop))
    };
    // SIGTERM once rides are flowing (the clients' own count), not after a fixed time.
    common::wait_for("the first 300 acknowledged rides", Duration::from_secs(60), || acked.lock().unwrap().len() >= 300);
    assert_eq!(s.terminate(), Some(0), "SIGTERM must end in a clean exit");
    stop.store(true, Ordering::Relaxed);
    let seen = poster.join().unwrap();
    eprintln!("sigterm under load: {seen:?}");
    assert!(seen.created > 100, "{seen:?}");
    assert!(seen.other.is_empty(), "{seen:?}");
    s.restart();
    let acked = acked.lock().unwrap().clone();
    let bad = Expected::from(&acked).check(&agent(), &s.base);
    assert!(bad.is_empty(), "{} mismatches, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    assert_eq!(s.terminate(), Some(0));
    assert_raw_rides_are(dir.path(), &acked);
}

/// A small tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let ok =
            std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(at).status().unwrap();
        assert!(ok.success(), "mounting a tmpfs needs root");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root to mount a small tmpfs: run scripts/test.sh as root"]
fn full_disk_answers_503_keeps_the_wal_intact_and_recovers_when_space_returns() {
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("mnt");
    let fs = Tmpfs::mount(&mnt, "32m");
    let ballast = mnt.join("ballast");
    // 14 MiB left, 6 MiB of it the reserve: the WAL and the tables reach the reserve
    // within seconds even at a few hundred rides/s (a throttled machine).
    std::fs::write(&ballast, vec![7u8; 18 * 1024 * 1024]).unwrap();
    let cfg = config(outer.path(), "min_free_disk_bytes = 6291456\nflush_interval_ms = 200\n");
    let data = mnt.join("data");
    let mut s = Server::start(&data, &["--config", &cfg]);
    let rides = random_rides(17, 400_000, 5_000);
    let acked = Arc::new(Mutex::new(Vec::new()));
    // Post until the disk's reserve is reached and rides are refused for a while.
    let stop = Arc::new(AtomicBool::new(false));
    let probe = Ride { at: DayKey { resort: 1, season: 2025, day: 1 }, skier: 999_999, time: 1, lift: 1, key: "probe".into() };
    let watcher = {
        let (stop, base, probe) = (stop.clone(), s.base.clone(), probe.clone());
        std::thread::spawn(move || {
            let a = agent();
            let mut probe_acked = false;
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut refused_since: Option<Instant> = None;
            while Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
                let (code, _) = post(&a, &base, &probe);
                probe_acked |= code == 201;
                if code == 503 {
                    let since = *refused_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(2) {
                        break;
                    }
                } else {
                    refused_since = None;
                }
            }
            stop.store(true, Ordering::Relaxed);
            probe_acked
        })
    };
    let seen = hammer(&s.base, &rides[..rides.len() / 2], 8, &acked, &stop);
    if watcher.join().unwrap() {
        // The same key every time: it counts once, whenever it was first accepted.
        acked.lock().unwrap().push(probe);
    }
    eprintln!("filling the disk: {seen:?}");
    assert!(seen.unavailable > 0, "the full disk must be answered with 503: {seen:?}");
    assert!(seen.other.is_empty() && seen.missing_retry_after == 0, "{seen:?}");
    let a = agent();
    assert_eq!(common::get(&a, &s.url("/health")).0, 200, "the service stays up");

    // Space returns: rides are accepted again without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let more = &rides[rides.len() / 2..rides.len() / 2 + 500];
    let deadline = Instant::now() + Duration::from_secs(30);
    for r in more {
        loop {
            let (code, _) = post(&a, &s.base, r);
            if code == 201 {
                acked.lock().unwrap().push(r.clone());
                break;
            }
            assert!(Instant::now() < deadline, "rides still refused after space returned (last status {code})");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The WAL survived the full disk: a kill -9 and replay give exactly the acked rides.
    s.kill9();
    s.restart();
    let acked = acked.lock().unwrap().clone();
    let bad = Expected::from(&acked).check(&a, &s.base);
    assert!(bad.is_empty(), "{} mismatches after the full disk, e.g. {:?}", bad.len(), &bad[..bad.len().min(5)]);
    // A clean stop flushes every ride to the tables (the space is back).
    assert_eq!(s.terminate(), Some(0));
    assert_raw_rides_are(&data, &acked);
    drop(fs);
}
