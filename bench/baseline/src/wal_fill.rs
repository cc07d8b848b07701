//! A direct WAL writer for the large replay/memory runs (`bench.sh --big`): appends rides
//! to `DATA_DIR/wal` exactly as liftlog's consumer does (one record = a bincode
//! `Vec<RideEvent>`, group-committed), with random rides in the standard ranges and
//! `--batch` rides per record (bench.sh passes the mean batch size the POST path produced,
//! so records look like real ones). No checkpoint is set, so the next `liftlog serve` on
//! this data dir replays every ride. Posting 30M rides over HTTP would take most of the
//! benchmark's time; what is measured afterwards (replay, resident memory) is the same.

use std::time::Instant;

use liftlog::domain::RideEvent;
use liftlog_wal::{Durability, Wal, WalConfig};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::args::Args;

/// `wal-fill --data-dir D --rides 30000000 --batch 128 --season 2025 --skiers 1-100000 --resorts 1-10 --days 1-3`
pub fn run(args: &Args) -> Result<(), String> {
    let dir = std::path::PathBuf::from(args.string("data-dir", "/tmp/liftlog-bench-wal"));
    let rides: u64 = args.get("rides", 1_000_000);
    let batch: usize = args.get("batch", 128).max(1);
    let season: u16 = args.get("season", 2025);
    let skiers = args.range("skiers", (1, 100_000));
    let resorts = args.range("resorts", (1, 10));
    let days = args.range("days", (1, 3));
    let lifts = args.range("lifts", (1, 40));
    let (wal, recovery) = Wal::open(WalConfig {
        dir: dir.join("wal"),
        durability: Durability::GroupCommit,
        max_bytes: u64::MAX / 2,
        min_free_bytes: 0,
        truncate_corrupt: false,
    })
    .map_err(|e| format!("opening the WAL in {}: {e}", dir.display()))?;
    if recovery.records > 0 {
        return Err(format!("{} already holds {} WAL records; give a fresh --data-dir", dir.display(), recovery.records));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.get("seed", 11));
    let started = Instant::now();
    let (mut written, mut records) = (0u64, 0u64);
    let mut events = Vec::with_capacity(batch);
    while written < rides {
        events.clear();
        for _ in 0..(batch as u64).min(rides - written) {
            let lift = rng.gen_range(lifts.0..=lifts.1) as u16;
            events.push(RideEvent {
                id: rng.gen(),
                resort: rng.gen_range(resorts.0..=resorts.1),
                season,
                day: rng.gen_range(days.0..=days.1) as u16,
                skier: rng.gen_range(skiers.0..=skiers.1),
                time: rng.gen_range(1..=360),
                lift,
                // The default catalog: lift n rises n x 10 m.
                vertical: u32::from(lift) * 10,
            });
        }
        wal.append_serde(&events).map_err(|e| e.to_string())?;
        written += events.len() as u64;
        records += 1;
        if records % 256 == 0 {
            wal.sync().map_err(|e| e.to_string())?;
        }
    }
    wal.sync().map_err(|e| e.to_string())?;
    let s = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({ "kind": "wal-fill", "rides": written, "records": records, "batch": batch, "seconds": s,
                "rides_per_s": written as f64 / s, "live_bytes": wal.stats().live_bytes })
    );
    Ok(())
}
