//! Writes N records of 1000 × 24-byte events (one group-commit batch each,
//! one sync per record), reopens the WAL and times recovery and replay.
//!
//! ```text
//! cargo run --release -p liftlog-wal --example replay_bench -- [records] [dir]
//! ```
//! Defaults: 2000 records (2M events) in a temporary directory.

use std::time::Instant;

use liftlog_wal::{Durability, Wal, WalConfig};

const EVENTS_PER_RECORD: usize = 1000;
const EVENT_BYTES: usize = 24;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let records: u64 = match args.next() {
        Some(n) => n.parse()?,
        None => 2000,
    };
    let tmp = tempfile::tempdir()?;
    let dir = args.next().map(Into::into).unwrap_or_else(|| tmp.path().join("wal"));
    let cfg = WalConfig { dir, durability: Durability::GroupCommit, max_bytes: u64::MAX, min_free_bytes: 0, truncate_corrupt: false };

    // Event bytes vary per record so neither sled nor the CRC sees constant data.
    let mut payload = vec![0u8; EVENTS_PER_RECORD * EVENT_BYTES];
    let (wal, _) = Wal::open(cfg.clone())?;
    let first = wal.last_seq() + 1;
    let started = Instant::now();
    for r in 0..records {
        for (i, chunk) in payload.chunks_exact_mut(EVENT_BYTES).enumerate() {
            chunk[..8].copy_from_slice(&(r * EVENTS_PER_RECORD as u64 + i as u64).to_le_bytes());
            chunk[8..16].copy_from_slice(&r.to_le_bytes());
        }
        wal.append(&payload)?;
        wal.sync()?;
    }
    let write = started.elapsed();
    let stats = wal.stats();
    drop(wal);
    let events = records * EVENTS_PER_RECORD as u64;
    println!(
        "write:  {records} records ({events} events) in {:.3}s = {:.0} records/s, {:.0} events/s, {} fsyncs (last one took {:.0} µs)",
        write.as_secs_f64(),
        records as f64 / write.as_secs_f64(),
        events as f64 / write.as_secs_f64(),
        stats.fsyncs,
        stats.last_fsync_micros.unwrap_or(0) as f64,
    );

    let started = Instant::now();
    let (wal, report) = Wal::open(cfg)?;
    let open = started.elapsed();
    println!("open:   {:.3}s (validated {} records, truncated {})", open.as_secs_f64(), report.records, report.truncated_records);

    let started = Instant::now();
    let mut n = 0u64;
    let mut bytes = 0u64;
    let mut checksum = 0u64;
    for rec in wal.replay() {
        let rec = rec?;
        if rec.seq == first {
            assert_eq!(rec.payload.len(), EVENTS_PER_RECORD * EVENT_BYTES);
        }
        n += 1;
        bytes += rec.payload.len() as u64;
        // Touch the data so the replay cannot be optimised into nothing.
        checksum = checksum.wrapping_add(u64::from(rec.payload[rec.payload.len() - EVENT_BYTES]));
    }
    let replay = started.elapsed();
    let secs = replay.as_secs_f64();
    println!(
        "replay: {n} records, {bytes} bytes in {secs:.3}s = {:.0} records/s, {:.0} events/s, {:.1} MB/s (checksum {checksum})",
        n as f64 / secs,
        (n * EVENTS_PER_RECORD as u64) as f64 / secs,
        bytes as f64 / secs / 1e6,
    );
    let total = (open + replay).as_secs_f64();
    println!("recovery total (open + replay): {total:.3}s = {:.0} events/s", (n * EVENTS_PER_RECORD as u64) as f64 / total);
    Ok(())
}
