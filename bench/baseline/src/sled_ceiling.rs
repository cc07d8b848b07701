//! The disk ceilings, on the directory given (the same disk as the data dirs): raw
//! `fsync`s per second of a small append, sled batch-of-N + flush records/s, and sled
//! iteration records/s over what was written. Records are ride-sized (8-byte big-endian
//! key, 24-byte value), sled's page cache as liftlog's WAL sets it (64 MiB).

use std::io::Write;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::args::Args;

const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// `sled --dir D --records 500000 --batch 1000 --fsync-seconds 1`
pub fn run(args: &Args) -> Result<(), String> {
    let dir = std::path::PathBuf::from(args.string("dir", "/tmp/liftlog-bench-sled"));
    let records: u64 = args.get("records", 500_000);
    let batch: u64 = args.get("batch", 1000).max(1);
    let fsync_seconds: f64 = args.get("fsync-seconds", 1.0);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;

    // 1. fsync rate: 64-byte appends, each followed by fdatasync.
    let path = dir.join("fsync.bin");
    let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut fsyncs = 0u64;
    while started.elapsed() < Duration::from_secs_f64(fsync_seconds) {
        f.write_all(&[7u8; 64]).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        fsyncs += 1;
    }
    let fsync_rate = fsyncs as f64 / started.elapsed().as_secs_f64();
    drop(f);

    // 2. sled: batches of `batch` records, one flush (fsync) per batch.
    let db = sled::Config::new().path(dir.join("db")).cache_capacity(CACHE_BYTES).open().map_err(|e| e.to_string())?;
    let tree = db.open_tree("bench").map_err(|e| e.to_string())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let started = Instant::now();
    let mut key = 0u64;
    while key < records {
        let mut b = sled::Batch::default();
        for _ in 0..batch.min(records - key) {
            let value: [u8; 24] = rng.gen();
            b.insert(&key.to_be_bytes(), &value);
            key += 1;
        }
        tree.apply_batch(b).map_err(|e| e.to_string())?;
        db.flush().map_err(|e| e.to_string())?;
    }
    let write_s = started.elapsed().as_secs_f64();

    // 3. sled iteration over everything written (values touched, as a replay would).
    let started = Instant::now();
    let (mut n, mut sum) = (0u64, 0u64);
    for kv in tree.iter() {
        let (_, v) = kv.map_err(|e| e.to_string())?;
        sum = sum.wrapping_add(u64::from(v[0]));
        n += 1;
    }
    let iter_s = started.elapsed().as_secs_f64();
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        json!({
            "kind": "disk",
            "fsync_per_s": fsync_rate,
            "records": records, "batch": batch,
            "batch_flush_records_per_s": records as f64 / write_s,
            "iterated": n, "iterate_records_per_s": n as f64 / iter_s, "checksum": sum,
        })
    );
    Ok(())
}
