//! Capacity bound, checkpoints across restarts, group commit accounting,
//! serde payloads and concurrent appends.

use std::path::Path;
use std::sync::Arc;

use liftlog_wal::{frame, Durability, Wal, WalConfig, WalError};

fn open(dir: &Path, max_bytes: u64) -> Wal {
    open_with(dir, max_bytes, Durability::GroupCommit)
}

fn open_with(dir: &Path, max_bytes: u64, durability: Durability) -> Wal {
    Wal::open(WalConfig { dir: dir.to_path_buf(), durability, max_bytes, min_free_bytes: 0, truncate_corrupt: false }).unwrap().0
}

fn replay_seqs(wal: &Wal) -> Vec<u64> {
    wal.replay().map(|r| r.unwrap().seq).collect()
}

#[test]
fn full_until_checkpoint_frees_space() {
    let dir = tempfile::tempdir().unwrap();
    let frame_len = (frame::HEADER_LEN + 100) as u64;
    // Room for exactly three 100-byte records.
    let wal = open(dir.path(), 3 * frame_len);
    let payload = [7u8; 100];
    for seq in 1..=3 {
        assert_eq!(wal.append(&payload).unwrap(), seq);
    }
    assert_eq!(wal.stats().live_bytes, 3 * frame_len);
    match wal.append(&payload) {
        Err(WalError::Full { live_bytes, max_bytes }) => {
            assert_eq!(live_bytes, 3 * frame_len);
            assert_eq!(max_bytes, 3 * frame_len);
        }
        other => panic!("expected Full, got {other:?}"),
    }
    // A rejected append consumes no seq and writes nothing.
    assert_eq!(wal.last_seq(), 3);
    assert_eq!(replay_seqs(&wal), vec![1, 2, 3]);
    // At the limit even a tiny record is rejected.
    assert!(matches!(wal.append(&[1u8; 1]), Err(WalError::Full { .. })));

    wal.sync().unwrap();
    wal.set_checkpoint(2).unwrap();
    assert_eq!(wal.stats().live_bytes, frame_len);
    assert_eq!(wal.append(&payload).unwrap(), 4);
    assert_eq!(wal.append(&payload).unwrap(), 5);
    assert!(matches!(wal.append(&payload), Err(WalError::Full { .. })));
    assert_eq!(replay_seqs(&wal), vec![3, 4, 5]);

    // Live bytes are recomputed on reopen, so the bound holds across restarts.
    wal.sync().unwrap();
    drop(wal);
    let wal = open(dir.path(), 3 * frame_len);
    assert_eq!(wal.stats().live_bytes, 3 * frame_len);
    assert!(matches!(wal.append(&payload), Err(WalError::Full { .. })));
}

#[test]
fn oversized_record_is_full_even_when_empty() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), 10);
    assert!(matches!(wal.append(b"0123456789"), Err(WalError::Full { live_bytes: 0, max_bytes: 10 })));
    assert_eq!(wal.last_seq(), 0);
}

#[test]
fn checkpoint_survives_reopen_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    {
        let wal = open(dir.path(), u64::MAX);
        assert_eq!(wal.last_seq(), 0);
        assert_eq!(wal.checkpoint(), 0);
        for i in 0..10u8 {
            wal.append(&[i]).unwrap();
        }
        wal.sync().unwrap();
        wal.set_checkpoint(6).unwrap();
        assert_eq!(wal.checkpoint(), 6);
        assert_eq!(replay_seqs(&wal), vec![7, 8, 9, 10]);
    }
    let (wal, report) = Wal::open(WalConfig {
        dir: dir.path().to_path_buf(),
        durability: Durability::GroupCommit,
        max_bytes: u64::MAX,
        min_free_bytes: 0,
        truncate_corrupt: false,
    })
    .unwrap();
    assert_eq!(report.checkpoint, 6);
    assert_eq!(report.records, 4);
    assert_eq!(report.first_seq, Some(7));
    assert_eq!(report.last_seq, Some(10));
    assert_eq!(report.truncated_records, 0);
    assert_eq!(wal.checkpoint(), 6);
    let replayed: Vec<_> = wal.replay().map(Result::unwrap).collect();
    assert_eq!(replayed.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7, 8, 9, 10]);
    assert_eq!(replayed[0].payload, vec![6u8]);
    assert_eq!(wal.append(b"next").unwrap(), 11);

    // Checkpoint everything: the log is empty on disk, yet seqs continue.
    wal.sync().unwrap();
    wal.set_checkpoint(11).unwrap();
    assert_eq!(wal.replay().count(), 0);
    let s = wal.stats();
    assert_eq!((s.first_seq, s.last_seq, s.live_records, s.live_bytes), (None, None, 0, 0));
    drop(wal);
    let wal = open(dir.path(), u64::MAX);
    assert_eq!(wal.checkpoint(), 11);
    assert_eq!(wal.last_seq(), 11);
    assert_eq!(wal.replay().count(), 0);
    assert_eq!(wal.append(b"after all checkpointed").unwrap(), 12);
}

#[test]
fn checkpoint_never_moves_backwards_and_is_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), u64::MAX);
    for _ in 0..5 {
        wal.append(b"r").unwrap();
    }
    wal.set_checkpoint(3).unwrap();
    wal.set_checkpoint(1).unwrap();
    assert_eq!(wal.checkpoint(), 3);
    assert_eq!(replay_seqs(&wal), vec![4, 5]);
    // Beyond the log: clamped to last_seq so future seqs are never
    // "already checkpointed".
    wal.set_checkpoint(100).unwrap();
    assert_eq!(wal.checkpoint(), 5);
    assert_eq!(wal.append(b"r").unwrap(), 6);
    assert_eq!(replay_seqs(&wal), vec![6]);
}

#[test]
fn group_commit_one_fsync_for_a_thousand_appends() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), u64::MAX);
    let before = wal.stats();
    assert_eq!(before.fsyncs, 0);
    assert_eq!(before.last_fsync_unix_ms, None);
    assert_eq!(before.last_fsync_micros, None);
    for i in 0..1000u32 {
        assert_eq!(wal.append(&i.to_le_bytes()).unwrap(), u64::from(i) + 1);
    }
    wal.sync().unwrap();
    let s = wal.stats();
    assert_eq!(s.appends, 1000);
    assert_eq!(s.fsyncs, 1);
    assert!(s.last_fsync_unix_ms.is_some());
    assert!(s.last_fsync_micros.is_some());
    assert_eq!(s.live_records, 1000);
    assert_eq!(s.live_bytes, 1000 * (frame::HEADER_LEN as u64 + 4));
    assert_eq!((s.first_seq, s.last_seq), (Some(1), Some(1000)));
    drop(wal);

    let wal = open(dir.path(), u64::MAX);
    let replayed: Vec<_> = wal.replay().map(Result::unwrap).collect();
    assert_eq!(replayed.len(), 1000);
    for (i, r) in replayed.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(r.payload, (i as u32).to_le_bytes());
    }
    // Stats counters are per process.
    assert_eq!(wal.stats().fsyncs, 0);
}

#[test]
fn nosync_does_not_fsync_but_checkpoint_does() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open_with(dir.path(), u64::MAX, Durability::NoSync);
    wal.append(b"a").unwrap();
    wal.sync().unwrap();
    assert_eq!(wal.stats().fsyncs, 0);
    wal.set_checkpoint(1).unwrap();
    assert_eq!(wal.stats().fsyncs, 1);
    assert_eq!(Durability::default(), Durability::GroupCommit);
}

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Ride {
    skipass: u64,
    lift: u32,
    at_ms: i64,
}

#[test]
fn serde_roundtrip_and_decode_errors() {
    let dir = tempfile::tempdir().unwrap();
    let wal = open(dir.path(), u64::MAX);
    let batch: Vec<Ride> = (0..300).map(|i| Ride { skipass: 1_000_000 + i, lift: (i % 7) as u32, at_ms: -(i as i64) }).collect();
    let seq = wal.append_serde(&batch).unwrap();
    let rec = wal.replay().next().unwrap().unwrap();
    assert_eq!(rec.seq, seq);
    let back: Vec<Ride> = Wal::decode(&rec.payload).unwrap();
    assert_eq!(back, batch);
    // Same bytes as plain bincode 2 serde with the standard config.
    let direct = bincode::serde::encode_to_vec(&batch, bincode::config::standard()).unwrap();
    assert_eq!(rec.payload, direct);

    // Wrong type / garbage / trailing bytes are Decode errors, not panics.
    assert!(matches!(Wal::decode::<Vec<Ride>>(&[0xFF; 3]), Err(WalError::Decode(_))));
    let mut trailing = direct.clone();
    trailing.push(0);
    assert!(matches!(Wal::decode::<Vec<Ride>>(&trailing), Err(WalError::Decode(_))));
}

#[test]
fn concurrent_appends_get_unique_increasing_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Arc::new(open(dir.path(), u64::MAX));
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for i in 0..250u32 {
                    let mut p = vec![t];
                    p.extend_from_slice(&i.to_le_bytes());
                    seqs.push(wal.append(&p).unwrap());
                    if i % 50 == 0 {
                        wal.sync().unwrap();
                    }
                }
                seqs
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        let seqs = t.join().unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=1000).collect::<Vec<_>>());
    wal.sync().unwrap();
    assert_eq!(replay_seqs(&wal), (1..=1000).collect::<Vec<_>>());
}
