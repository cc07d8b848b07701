//! Recovery from torn and corrupted records: every truncation point and every
//! byte flip of every stored frame must be detected. Damage to the last
//! record(s) is a torn tail: recovery keeps exactly the records before it.
//! Damage with intact records after it is corruption of synced data: `open`
//! refuses (`WalError::Corrupt`) and changes nothing, unless the operator
//! override `truncate_corrupt` is set, which truncates as for a torn tail.

use std::fs;
use std::path::{Path, PathBuf};

use liftlog_wal::{frame, Durability, Wal, WalConfig, WalError};

const PAYLOADS: [&[u8]; 5] = [b"", b"x", b"seven b", b"twenty-four byte payload", b"a somewhat longer payload of forty-eight bytes!!"];

fn cfg(dir: &Path) -> WalConfig {
    WalConfig {
        dir: dir.to_path_buf(),
        durability: Durability::GroupCommit,
        max_bytes: 1 << 30,
        min_free_bytes: 0,
        truncate_corrupt: false,
    }
}

/// `cfg` with the operator override set.
fn cfg_override(dir: &Path) -> WalConfig {
    WalConfig { truncate_corrupt: true, ..cfg(dir) }
}

/// Opens without the override and expects the refusal, with what it reports.
fn expect_refused(dir: &Path, expected_seq: u64, intact_after: u64, ctx: &str) {
    match Wal::open(cfg(dir)) {
        Err(err @ WalError::Corrupt { .. }) if !err.to_string().contains("LIFTLOG_WAL__TRUNCATE_CORRUPT=true") => {
            panic!("{ctx}: the refusal does not say how to override it: {err}")
        }
        Err(WalError::Corrupt { expected_seq: e, intact_after: i, last_intact_seq, would_drop, .. }) => {
            assert_eq!((e, i), (expected_seq, intact_after), "{ctx}");
            assert_eq!(last_intact_seq, PAYLOADS.len() as u64, "{ctx}");
            assert!(would_drop >= intact_after, "{ctx}");
        }
        Err(other) => panic!("{ctx}: expected WalError::Corrupt, got {other}"),
        Ok((_, report)) => panic!("{ctx}: opened despite damage before the end: {report:?}"),
    }
}

/// Every record's stored value, by key, read straight from sled.
fn raw_log(dir: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = sled_open(dir);
    let log = db.open_tree("log").unwrap();
    log.iter().map(|kv| kv.unwrap()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
}

/// sled releases its file lock asynchronously after a drop (see
/// `Wal::open`), so raw opens in these tests retry briefly too.
fn sled_open(dir: &Path) -> sled::Db {
    let mut tries = 0;
    loop {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(e) if tries < 500 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("open {}: {e}", dir.display()),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Writes PAYLOADS (seqs 1..=5) into a fresh WAL, optionally checkpoints, and
/// returns the closed directory plus each record's stored frame.
fn base_log(root: &Path, checkpoint: u64) -> (PathBuf, Vec<Vec<u8>>) {
    let dir = root.join("base");
    {
        let (wal, report) = Wal::open(cfg(&dir)).unwrap();
        assert_eq!(report.records, 0);
        for (i, p) in PAYLOADS.iter().enumerate() {
            assert_eq!(wal.append(p).unwrap(), i as u64 + 1);
        }
        wal.sync().unwrap();
        wal.set_checkpoint(checkpoint).unwrap();
    }
    let db = sled_open(&dir);
    let log = db.open_tree("log").unwrap();
    let frames: Vec<Vec<u8>> =
        (1..=PAYLOADS.len() as u64).map(|seq| log.get(frame::key(seq)).unwrap().map(|v| v.to_vec()).unwrap_or_default()).collect();
    drop(log);
    drop(db);
    (dir, frames)
}

/// Replaces (or, with `None`, removes) record `seq`'s stored value directly in
/// sled, bypassing the WAL.
fn tamper(dir: &Path, seq: u64, value: Option<&[u8]>) {
    let db = sled_open(dir);
    let log = db.open_tree("log").unwrap();
    match value {
        Some(v) => log.insert(frame::key(seq), v).unwrap(),
        None => log.remove(frame::key(seq)).unwrap(),
    };
    db.flush().unwrap();
}

/// Opens the tampered WAL and checks it recovered exactly records
/// `checkpoint+1 .. bad_seq`, reported the rest as truncated, and continues
/// the sequence at `bad_seq` durably.
///
/// `intact_dropped`: how many intact records after the damage the override
/// deletes (0 for a torn tail, which needs no override).
fn check_recovery(dir: &Path, checkpoint: u64, bad_seq: u64, dropped_bytes: u64, intact_dropped: u64, ctx: &str) {
    let n = PAYLOADS.len() as u64;
    let open_cfg = if intact_dropped > 0 { cfg_override(dir) } else { cfg(dir) };
    let (wal, report) = Wal::open(open_cfg).unwrap();
    assert_eq!(report.checkpoint, checkpoint, "{ctx}");
    assert_eq!(report.records, bad_seq - 1 - checkpoint, "{ctx}");
    assert_eq!(report.truncated_records, n - bad_seq + 1, "{ctx}");
    assert_eq!(report.truncated_bytes, dropped_bytes, "{ctx}");
    assert_eq!(report.truncated_intact_records, intact_dropped, "{ctx}");
    let expected_last = (bad_seq > checkpoint + 1).then_some(bad_seq - 1);
    assert_eq!(report.last_seq, expected_last, "{ctx}");
    let replayed: Vec<_> = wal.replay().map(|r| r.unwrap()).collect();
    let want: Vec<(u64, &[u8])> = (checkpoint + 1..bad_seq).map(|s| (s, PAYLOADS[s as usize - 1])).collect();
    let got: Vec<(u64, &[u8])> = replayed.iter().map(|r| (r.seq, &r.payload[..])).collect();
    assert_eq!(got, want, "{ctx}");
    assert_eq!(wal.last_seq(), bad_seq - 1, "{ctx}");

    assert_eq!(wal.append(b"after recovery").unwrap(), bad_seq, "{ctx}");
    wal.sync().unwrap();
    let replayed: Vec<_> = wal.replay().map(|r| r.unwrap()).collect();
    assert_eq!(replayed.len() as u64, bad_seq - checkpoint, "{ctx}");
    assert_eq!(replayed.last().unwrap().payload, b"after recovery", "{ctx}");

    // After a restart the repaired log holds exactly prefix + new record: the
    // dropped tail must not come back behind the reused seq.
    drop(wal);
    let (wal, report) = Wal::open(cfg(dir)).unwrap();
    assert_eq!(report.truncated_records, 0, "{ctx}");
    assert_eq!(report.last_seq, Some(bad_seq), "{ctx}");
    let again: Vec<_> = wal.replay().map(|r| r.unwrap()).collect();
    assert_eq!(again, replayed, "{ctx}");
}

fn run_every_offset(checkpoint: u64) -> usize {
    let root = tempfile::tempdir().unwrap();
    let (base, frames) = base_log(root.path(), checkpoint);
    let mut cases = 0;
    for (idx, original) in frames.iter().enumerate() {
        let seq = idx as u64 + 1;
        if seq <= checkpoint {
            // Deleted by the checkpoint; nothing to damage.
            assert!(original.is_empty());
            continue;
        }
        assert_eq!(original.len(), frame::HEADER_LEN + PAYLOADS[idx].len());
        for i in 0..original.len() {
            for (kind, damaged) in [
                ("truncate", original[..i].to_vec()),
                ("flip", {
                    let mut f = original.clone();
                    f[i] ^= 0xFF;
                    f
                }),
            ] {
                let dir = root.path().join(format!("case-{cases}"));
                copy_dir(&base, &dir);
                tamper(&dir, seq, Some(&damaged));
                let ctx = format!("{kind} seq {seq} at byte {i} (checkpoint {checkpoint})");
                let later: usize = frames[idx + 1..].iter().map(Vec::len).sum();
                let dropped = (damaged.len() + later) as u64;
                let intact_after = frames.len() as u64 - seq;
                if intact_after > 0 {
                    // Damage before the end: refused, and the refusal changes nothing.
                    let before = raw_log(&dir);
                    expect_refused(&dir, seq, intact_after, &ctx);
                    assert_eq!(raw_log(&dir), before, "{ctx}: the refusal changed the log");
                    expect_refused(&dir, seq, intact_after, &ctx);
                }
                check_recovery(&dir, checkpoint, seq, dropped, intact_after, &ctx);
                fs::remove_dir_all(&dir).unwrap();
                cases += 1;
            }
        }
    }
    cases
}

/// Damage to the last record at every byte is a torn tail, truncated without
/// the override; damage to any earlier record is refused, then truncated only
/// with the override.
#[test]
fn truncation_and_flip_at_every_byte_are_recovered_as_prefix() {
    let cases = run_every_offset(0);
    let bytes: usize = PAYLOADS.iter().map(|p| frame::HEADER_LEN + p.len()).sum();
    assert_eq!(cases, 2 * bytes);
}

#[test]
fn damage_after_a_checkpoint_keeps_checkpoint_and_prefix() {
    // Records 1 and 2 are checkpointed (deleted); damage in 3..=5.
    let cases = run_every_offset(2);
    assert!(cases > 0);
}

#[test]
fn torn_tail_of_several_records_is_truncated_without_the_override() {
    let root = tempfile::tempdir().unwrap();
    let (base, frames) = base_log(root.path(), 0);
    // The last two records both torn: nothing intact follows the damage.
    tamper(&base, 4, Some(&frames[3][..3]));
    tamper(&base, 5, Some(&frames[4][..frames[4].len() - 1]));
    let dropped = (3 + frames[4].len() - 1) as u64;
    check_recovery(&base, 0, 4, dropped, 0, "records 4 and 5 torn");
}

#[test]
fn gap_in_sequence_is_refused_then_truncated_with_the_override() {
    let root = tempfile::tempdir().unwrap();
    let (base, _) = base_log(root.path(), 0);
    tamper(&base, 3, None);
    // Records 4 and 5 are intact but follow a hole: no crash leaves that, and
    // truncating would delete them, so `open` refuses.
    expect_refused(&base, 3, 2, "record 3 missing");
    // The override truncates them: replaying them would skip record 3's rides.
    let (wal, report) = Wal::open(cfg_override(&base)).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.truncated_records, 2);
    assert_eq!(report.truncated_intact_records, 2);
    assert_eq!(wal.last_seq(), 2);
    drop(wal);
    // Reopen the repaired log: nothing more to truncate.
    let (_wal, report) = Wal::open(cfg(&base)).unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.truncated_records, 0);
}

#[test]
fn missing_first_record_after_checkpoint_is_a_gap() {
    let root = tempfile::tempdir().unwrap();
    let (base, _) = base_log(root.path(), 1);
    tamper(&base, 2, None);
    expect_refused(&base, 2, 3, "record 2 missing after checkpoint 1");
    let (wal, report) = Wal::open(cfg_override(&base)).unwrap();
    assert_eq!(report.records, 0);
    assert_eq!(report.truncated_records, 3);
    assert_eq!(wal.replay().count(), 0);
    // The checkpoint still anchors the sequence.
    assert_eq!(wal.append(b"next").unwrap(), 2);
}

#[test]
fn frame_under_wrong_key_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let (base, frames) = base_log(root.path(), 0);
    // A valid frame for seq 2 stored under key 3.
    tamper(&base, 3, Some(&frames[1]));
    let dropped = (frames[1].len() + frames[3].len() + frames[4].len()) as u64;
    expect_refused(&base, 3, 2, "frame of seq 2 under key 3");
    check_recovery(&base, 0, 3, dropped, 2, "frame of seq 2 under key 3");
}

#[test]
fn frame_under_wrong_key_at_the_end_is_a_torn_tail() {
    let root = tempfile::tempdir().unwrap();
    let (base, frames) = base_log(root.path(), 0);
    tamper(&base, 5, Some(&frames[3]));
    check_recovery(&base, 0, 5, frames[3].len() as u64, 0, "frame of seq 4 under key 5");
}

#[test]
fn leftovers_at_or_below_checkpoint_are_deleted_on_open() {
    let root = tempfile::tempdir().unwrap();
    let (base, frames) = base_log(root.path(), 3);
    // Simulate a crash between the checkpoint flush and the deletion.
    tamper(&base, 2, Some(&frames[1]));
    tamper(&base, 3, Some(&frames[2]));
    let (wal, report) = Wal::open(cfg(&base)).unwrap();
    assert_eq!(report.checkpoint, 3);
    assert_eq!(report.records, 2);
    assert_eq!(report.truncated_records, 0);
    let seqs: Vec<u64> = wal.replay().map(|r| r.unwrap().seq).collect();
    assert_eq!(seqs, vec![4, 5]);
    drop(wal);
    let db = sled_open(&base);
    let log = db.open_tree("log").unwrap();
    assert_eq!(log.len(), 2, "stale records were not deleted");
}

#[test]
fn garbled_key_is_treated_as_corruption() {
    let root = tempfile::tempdir().unwrap();
    let (base, _) = base_log(root.path(), 0);
    {
        let db = sled_open(&base);
        let log = db.open_tree("log").unwrap();
        // 9-byte key sorting between seq 3 and seq 4.
        let mut k = frame::key(3).to_vec();
        k.push(0);
        log.insert(k, b"junk".to_vec()).unwrap();
        db.flush().unwrap();
    }
    // Records 4 and 5 are intact after the junk: refused.
    match Wal::open(cfg(&base)) {
        Err(WalError::Corrupt { expected_seq: 4, intact_after: 2, last_intact_seq: 5, would_drop: 3, .. }) => {}
        other => panic!("expected the refusal, got {:?}", other.map(|(_, r)| r)),
    }
    let (wal, report) = Wal::open(cfg_override(&base)).unwrap();
    assert_eq!(report.records, 3);
    assert_eq!(report.truncated_records, 3); // the junk + 4 + 5
    assert_eq!(report.truncated_intact_records, 2);
    assert_eq!(wal.append(b"x").unwrap(), 4);
}
