//! Model-based test: random sequences of append / sync / checkpoint / reopen
//! against a plain in-memory model of what the WAL must hold.

use std::path::Path;

use liftlog_wal::{Durability, Wal, WalConfig};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<u8>),
    Sync,
    /// Checkpoint at `raw % (last_seq + 1)`: covers 0, already-checkpointed
    /// (ignored) and current values.
    Checkpoint(u64),
    /// Drop the WAL and open it again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Op::Append),
        2 => Just(Op::Sync),
        2 => any::<u64>().prop_map(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Default)]
struct Model {
    /// Records after the checkpoint, in order.
    live: Vec<(u64, Vec<u8>)>,
    checkpoint: u64,
    last_seq: u64,
    /// Highest seq known to be durable (sync or checkpoint flush).
    synced: u64,
}

fn open(dir: &Path) -> (Wal, liftlog_wal::RecoveryReport) {
    Wal::open(WalConfig {
        dir: dir.to_path_buf(),
        durability: Durability::GroupCommit,
        max_bytes: u64::MAX,
        min_free_bytes: 0,
        truncate_corrupt: false,
    })
    .unwrap()
}

fn replayed(wal: &Wal) -> Vec<(u64, Vec<u8>)> {
    wal.replay()
        .map(|r| {
            let r = r.unwrap();
            (r.seq, r.payload)
        })
        .collect()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (mut wal, report) = open(dir.path());
    prop_assert_eq!(report.records, 0);
    let mut m = Model::default();
    for op in ops {
        match op {
            Op::Append(p) => {
                let seq = wal.append(&p).unwrap();
                prop_assert_eq!(seq, m.last_seq + 1);
                m.last_seq = seq;
                m.live.push((seq, p));
            }
            Op::Sync => {
                wal.sync().unwrap();
                m.synced = m.last_seq;
            }
            Op::Checkpoint(raw) => {
                let seq = raw % (m.last_seq + 1);
                wal.set_checkpoint(seq).unwrap();
                if seq > m.checkpoint {
                    m.checkpoint = seq;
                    m.live.retain(|(s, _)| *s > seq);
                    // The checkpoint flush makes every earlier append durable.
                    m.synced = m.last_seq;
                }
            }
            Op::Reopen => {
                drop(wal);
                let (w, report) = open(dir.path());
                wal = w;
                let got = replayed(&wal);
                // Unsynced records may or may not survive a clean drop, but
                // whatever survives is a prefix including every synced record.
                prop_assert!(got.len() <= m.live.len());
                prop_assert_eq!(&got[..], &m.live[..got.len()]);
                let synced_live = m.live.iter().filter(|(s, _)| *s <= m.synced).count();
                prop_assert!(got.len() >= synced_live, "lost synced records");
                prop_assert_eq!(report.truncated_records, 0);
                prop_assert_eq!(report.checkpoint, m.checkpoint);
                prop_assert_eq!(report.records, got.len() as u64);
                m.live = got;
                m.last_seq = m.live.last().map_or(m.checkpoint, |(s, _)| *s);
                m.synced = m.last_seq;
            }
        }
        // Invariants after every step.
        prop_assert_eq!(wal.checkpoint(), m.checkpoint);
        prop_assert_eq!(wal.last_seq(), m.last_seq);
        let got = replayed(&wal);
        prop_assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1));
        prop_assert_eq!(&got, &m.live);
        let s = wal.stats();
        prop_assert_eq!(s.live_records, m.live.len() as u64);
        let bytes: usize = m.live.iter().map(|(_, p)| p.len() + liftlog_wal::frame::HEADER_LEN).sum();
        prop_assert_eq!(s.live_bytes, bytes as u64);
        prop_assert_eq!(s.first_seq, m.live.first().map(|r| r.0));
        prop_assert_eq!(s.last_seq, m.live.last().map(|r| r.0));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn wal_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
