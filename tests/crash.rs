//! Crash tests with the real binary: kill -9 at random moments while concurrent clients
//! post rides, restart, let the clients retry what was not acknowledged (same
//! Idempotency-Key, as a real client does), and check that every ride is counted exactly
//! once in every read.

mod common;

use common::{agent, random_rides, Expected, Rng, Server};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const CLIENTS: usize = 8;

/// Posts `todo` (indices into `rides`) from CLIENTS threads until done or the server dies;
/// marks every 201 in `acked`. Also re-sends every tenth ride that was already acked, which
/// must not count twice.
fn post_round(base: &str, rides: &Arc<Vec<common::Ride>>, acked: &Arc<Vec<AtomicBool>>, todo: Vec<usize>, stop: &Arc<AtomicBool>) -> usize {
    let queue = Arc::new(Mutex::new(todo));
    let sent = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (queue, rides, acked, stop, sent, base) = (queue.clone(), rides.clone(), acked.clone(), stop.clone(), sent.clone(), base.to_string());
            std::thread::spawn(move || {
                let agent = agent();
                loop {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let Some(i) = queue.lock().unwrap().pop() else { return };
                    let code = rides[i].post(&agent, &base);
                    sent.fetch_add(1, Ordering::Relaxed);
                    match code {
                        201 => acked[i].store(true, Ordering::SeqCst),
                        0 => return, // the server is gone; the ride stays un-acked
                        503 => {}
                        other => panic!("ride {i} got {other}"),
                    }
                    if i % 10 == 0 && acked[i].load(Ordering::SeqCst) {
                        let again = rides[i].post(&agent, &base);
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

#[test]
fn kill9_at_random_moments_loses_nothing_and_counts_nothing_twice() {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    let kills: usize = std::env::var("CRASH_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    // Enough rides that traffic is still flowing at every kill (about 1,500 per round).
    let n_rides: usize = std::env::var("CRASH_RIDES").ok().and_then(|s| s.parse().ok()).unwrap_or(6_000);
    eprintln!("crash test seed {seed} (CRASH_SEED to repeat), {kills} kills, {n_rides} rides");
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    // A short flush interval so that checkpoints and WAL truncation happen during the run.
    let mut server = Server::start(dir.path(), &["--flush-interval-ms", "40"]);
    let rides = Arc::new(random_rides(seed, n_rides, 300));
    let acked: Arc<Vec<AtomicBool>> = Arc::new((0..rides.len()).map(|_| AtomicBool::new(false)).collect());

    for round in 0..kills + 20 {
        let todo: Vec<usize> = (0..rides.len()).filter(|i| !acked[*i].load(Ordering::SeqCst)).collect();
        if todo.is_empty() && round > kills {
            break;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let killer = (round < kills).then(|| {
            let pid = server.child.id();
            let after = Duration::from_millis(rng.range(50, 400));
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(after);
                let _ = std::process::Command::new("kill").arg("-9").arg(pid.to_string()).status();
                stop.store(true, Ordering::Relaxed);
            })
        });
        let started = Instant::now();
        let sent = post_round(&server.base, &rides, &acked, todo, &stop);
        if let Some(k) = killer {
            k.join().unwrap();
        }
        let n_acked = acked.iter().filter(|a| a.load(Ordering::SeqCst)).count();
        eprintln!("round {round}: sent {sent} in {:?}, acked so far {n_acked}/{}", started.elapsed(), rides.len());
        server.kill9();
        server.restart();
    }
    assert!(acked.iter().all(|a| a.load(Ordering::SeqCst)), "every ride must get its 201 eventually");
    eprintln!("all {} rides acknowledged after {kills} kills; reconciling", rides.len());

    let expected = Expected::from(&rides);
    let agent = agent();
    let bad = expected.check(&agent, &server.base);
    assert!(bad.is_empty(), "{} mismatches after crashes (seed {seed}), first: {:?}", bad.len(), &bad[..bad.len().min(5)]);

    // And once more after a final kill: state rebuilt from tables + WAL only.
    server.kill9();
    server.restart();
    let bad = expected.check(&agent, &server.base);
    assert!(bad.is_empty(), "{} mismatches after the final restart (seed {seed}): {:?}", bad.len(), &bad[..bad.len().min(5)]);
}

/// A crash in the middle of a flush, at the worst point: the skier-day items are durable,
/// the day counts and raw rides are not. The WAL still holds the rides, but replaying it
/// finds every one already counted (their ids are in the skier-day items). The restarted
/// node must still write the missing counts and raw rows, so that after the WAL is
/// checkpointed and the days are read from the tables alone, nothing is missing.
#[test]
fn a_flush_torn_between_skier_days_and_counts_is_completed_after_restart() {
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

    // Every raw ride is in SkierLiftRides once (its key holds the ride's id).
    let tables = sled::open(dir.path().join("tables")).unwrap();
    let stored = tables.open_tree("rides").unwrap().len();
    assert_eq!(stored, rides.len(), "raw rides in the table");
}
