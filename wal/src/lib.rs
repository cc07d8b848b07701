//! liftlog's write-ahead log for lift-ride events.
//!
//! # Durability policy
//!
//! The service batches incoming rides (group commit), appends **one** record
//! per batch with [`Wal::append`] / [`Wal::append_serde`], calls
//! [`Wal::sync`] **once** per batch and only then acknowledges the clients of
//! that batch. An appended record is *not* durable until a `sync` that started
//! after the append has returned `Ok`; one `sync` covers everything appended
//! before it, from any thread, so the cost of an fsync is shared by the whole
//! batch. With [`Durability::NoSync`] `sync` does nothing and data reaches
//! disk only through sled's background flusher (every ~500 ms), which is
//! acceptable for benchmarks only.
//!
//! Later a flusher writes the state derived from the records to the tables
//! and calls [`Wal::set_checkpoint`]`(seq)`: the checkpoint is made durable
//! first, then records `<= seq` are deleted, freeing space counted against
//! [`WalConfig::max_bytes`]. When live (un-checkpointed) data would exceed
//! that bound, `append` fails with [`WalError::Full`] so the service applies
//! backpressure instead of growing the log without limit.
//!
//! # Recovery procedure
//!
//! [`Wal::open`] reads the checkpoint, deletes any records `<= checkpoint`
//! left over from an interrupted deletion, then validates every record after
//! the checkpoint in sequence order: the key must be 8 bytes, the frame must
//! decode (version, exact length, CRC, see [`frame`]), the seq inside the
//! frame must equal the key, and the seqs must be exactly `checkpoint+1,
//! checkpoint+2, ...` with no gap. What happens to the first record that
//! fails any check depends on what follows it:
//!
//! * **A torn tail**: no *intact* record (8-byte key, frame that decodes, seq
//!   inside equal to the key) follows the first bad one. That is what a crash
//!   can leave (sled recovers a prefix of its operation log, so damage from a
//!   crash is always at the end, and only records that were never
//!   acknowledged are there under `GroupCommit`). The bad record and
//!   everything after it are deleted and `tracing::error!("WAL tail
//!   truncated")` reports how many records and bytes were dropped.
//! * **Damage before the end**: intact records follow the bad one (a flipped
//!   byte or a hole in the middle). No crash does that: the storage corrupted
//!   synced data, and the intact records after the damage hold rides that
//!   were acknowledged. `open` refuses with [`WalError::Corrupt`], leaving
//!   every record after the checkpoint as it was, unless
//!   [`WalConfig::truncate_corrupt`] (an operator override)
//!   is set; then it truncates from the first bad record as for a torn tail
//!   and reports the intact records it deleted in
//!   [`RecoveryReport::truncated_intact_records`].
//!
//! Either way a damaged record is never replayed and never skipped over, so
//! what is replayed is always a consistent prefix of what was appended. The
//! repair is flushed before `open` returns. The service
//! then replays [`Wal::replay`] (records after the checkpoint) and continues
//! appending at `last_seq + 1`; seqs of a dropped tail are reused, which is
//! safe because nothing downstream ever saw them.
//!
//! Dropping a `Wal` flushes sled, so a clean shutdown loses nothing even
//! without a final `sync`. sled releases its directory lock asynchronously
//! after a drop, so `open` waits up to 5 s for the lock before failing.

pub mod frame;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::{debug, error, info, warn};

const LOG_TREE: &str = "log";
/// sled page cache for the WAL (see `open_db`).
const WAL_CACHE_BYTES: u64 = 64 * 1024 * 1024;
const META_TREE: &str = "meta";
const CHECKPOINT_KEY: &[u8] = b"checkpoint";

/// How [`Wal::sync`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `sync()` calls `sled::Db::flush`, which writes every tree's pending
    /// data and fsyncs. Once it returns `Ok`, every record appended before
    /// the call survives a process or machine crash. Costs one fsync per call, so callers batch
    /// many rides into one record and one `sync` (group commit): latency per
    /// batch goes up by one fsync, throughput stays high.
    #[default]
    GroupCommit,
    /// `sync()` is a no-op. For benchmarks only: sled buffers writes in the
    /// process and its background flusher writes them every ~500 ms, so a
    /// process crash loses up to ~500 ms of *acknowledged* records (an OS
    /// crash or power loss possibly more). `set_checkpoint` still flushes.
    NoSync,
}

/// Settings for [`Wal::open`].
#[derive(Debug, Clone)]
pub struct WalConfig {
    /// Directory of the sled database holding the log (created if missing).
    pub dir: PathBuf,
    pub durability: Durability,
    /// Bound on live (un-checkpointed) record bytes, counted as stored frame
    /// bytes (17-byte header + payload, sled's own overhead excluded). An
    /// append that would exceed it fails with [`WalError::Full`]. A single
    /// payload larger than this can never be appended.
    pub max_bytes: u64,
    /// Free space to keep on the WAL's filesystem: an append that would leave less fails
    /// with [`WalError::DiskLow`] before sled ever sees `ENOSPC` — sled treats an I/O error
    /// as fatal for the open database, so running the disk full would need a restart to
    /// recover, while refusing early recovers by itself once space returns. 0 = no check.
    pub min_free_bytes: u64,
    /// Operator override for damage before the end of the log (see the crate docs): `false`
    /// (the default) makes [`Wal::open`] refuse with [`WalError::Corrupt`], because
    /// truncating would delete intact records after the damage, acknowledged ones among
    /// them; `true` truncates anyway, from the first bad record, and the node starts without
    /// those rides. A torn tail is truncated either way.
    pub truncate_corrupt: bool,
}

/// One replayed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What [`Wal::open`] found and repaired.
#[derive(Debug, Clone, Serialize)]
pub struct RecoveryReport {
    /// Checkpoint read from disk (0 if never set).
    pub checkpoint: u64,
    /// Valid records after the checkpoint, i.e. what `replay` will yield.
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records deleted because they, or a record before them, were invalid.
    pub truncated_records: u64,
    /// Stored bytes (frame values) of those records.
    pub truncated_bytes: u64,
    /// Of the truncated records, how many were intact themselves and were deleted only
    /// because damage came before them (non-zero only under
    /// [`WalConfig::truncate_corrupt`]): rides that may have been acknowledged, lost.
    pub truncated_intact_records: u64,
}

/// Point-in-time counters, for metrics and the admin endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct WalStats {
    /// First live record (`checkpoint + 1`), `None` when nothing is live.
    pub first_seq: Option<u64>,
    /// Last live record, `None` when nothing is live.
    pub last_seq: Option<u64>,
    pub checkpoint: u64,
    /// Frame bytes of live records (what `max_bytes` bounds).
    pub live_bytes: u64,
    pub live_records: u64,
    /// Appends since open.
    pub appends: u64,
    /// Real fsyncs since open: `sync` calls under `GroupCommit` plus the flush
    /// done by each checkpoint advance.
    pub fsyncs: u64,
    pub last_fsync_unix_ms: Option<u64>,
    /// Duration of the last fsync.
    pub last_fsync_micros: Option<u64>,
    pub max_bytes: u64,
}

/// WAL errors. Every variant says how the caller is expected to react.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// Appending would push live bytes past `max_bytes`; nothing was
    /// written. The caller applies backpressure: fail or retry the batch
    /// (e.g. HTTP 503 + Retry-After) and make sure the flusher runs and
    /// calls `set_checkpoint`, which frees space.
    #[error("WAL full: {live_bytes} live bytes, limit {max_bytes}")]
    Full { live_bytes: u64, max_bytes: u64 },
    /// The filesystem holding the WAL has less free space than
    /// [`WalConfig::min_free_bytes`]. Nothing was written; the caller answers
    /// 503 and the append succeeds again once space is freed.
    #[error("WAL disk nearly full: {free_bytes} bytes free, {reserve_bytes} kept in reserve")]
    DiskLow { free_bytes: u64, reserve_bytes: u64 },
    /// The storage layer (sled / filesystem) failed. After a failed `append`
    /// or `sync` the batch's durability is unknown: do not acknowledge it.
    /// A failing `sync` means the disk cannot be trusted; the service should
    /// stop accepting writes and restart (recovery then decides what
    /// survived) rather than retry and ack.
    #[error("WAL storage error: {0}")]
    Io(#[from] std::io::Error),
    /// A value could not be serialized, or a payload exceeds the 4 GiB frame
    /// limit. Nothing was written; this is a bug in the caller's data, so
    /// reject that batch and keep running.
    #[error("WAL encode error: {0}")]
    Encode(String),
    /// Stored bytes are not what was written (a record changed underneath a
    /// running WAL, a garbled checkpoint, or `decode::<T>` with the wrong
    /// type). Stop replay and refuse to start: silently skipping a record
    /// would lose or reorder rides. `open` repairs a corrupt *tail* itself;
    /// this error means something it cannot repair safely.
    #[error("WAL decode error: {0}")]
    Decode(String),
    /// [`Wal::open`] found a damaged record with intact records after it: not a torn tail
    /// but corruption of synced data, and truncating would delete the intact records,
    /// acknowledged ones among them. No record after the checkpoint was changed. The
    /// operator restores the WAL directory from a copy, or accepts the loss with
    /// [`WalConfig::truncate_corrupt`].
    #[error(
        "WAL damaged before its end in {dir}: expected record {expected_seq}, found {reason}; {intact_after} intact \
         record(s) follow it (up to seq {last_intact_seq}), which may hold acknowledged rides. Refusing to open: \
         truncating would delete {would_drop} record(s) from seq {expected_seq} on. Restore the directory from a copy, \
         or accept the loss with the operator override `truncate_corrupt` (liftlog: LIFTLOG_WAL__TRUNCATE_CORRUPT=true), \
         which truncates from the damage as for a torn tail"
    )]
    Corrupt {
        dir: String,
        /// The record that should have come next.
        expected_seq: u64,
        /// What was found instead.
        reason: String,
        /// Intact records after the damage.
        intact_after: u64,
        last_intact_seq: u64,
        /// Records (damaged and intact) that truncating would delete.
        would_drop: u64,
    },
}

impl From<sled::Error> for WalError {
    fn from(e: sled::Error) -> Self {
        WalError::Io(e.into())
    }
}

/// Mutable bookkeeping, guarded by one mutex so that seq assignment and the
/// sled insert happen in the same order (sled's crash recovery restores a
/// prefix of its operation log; inserting in seq order makes that a prefix of
/// the sequence too).
#[derive(Debug)]
struct State {
    next_seq: u64,
    checkpoint: u64,
    live_bytes: u64,
}

#[derive(Debug, Default)]
struct FsyncStats {
    last_unix_ms: Option<u64>,
    last_micros: Option<u64>,
}

/// The write-ahead log. `Send + Sync`; share it behind an `Arc`.
#[derive(Debug)]
pub struct Wal {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    durability: Durability,
    max_bytes: u64,
    /// Where the log lives and how much free space to keep there (see `WalConfig`).
    dir: PathBuf,
    min_free_bytes: u64,
    state: Mutex<State>,
    /// Serializes `set_checkpoint` calls without holding `state` during the
    /// checkpoint fsync (which would stall appends for its duration).
    checkpoint_lock: Mutex<()>,
    appends: AtomicU64,
    fsyncs: AtomicU64,
    fsync_stats: Mutex<FsyncStats>,
}

/// Poisoning is ignored: `State` is only mutated after the fallible sled call
/// succeeded, so a panic elsewhere cannot leave it half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long `open` waits for sled's file lock before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Opens the sled database, waiting up to [`LOCK_WAIT`] for its file lock.
///
/// Why: dropping a sled `Db` does not release the lock synchronously; sled's
/// background I/O threads hold the file a little longer, so reopening in the
/// same process right after a drop (a restart of the WAL in tests or in an
/// in-process supervisor) can fail spuriously. A lock held by another live
/// process still fails, just after the wait.
fn open_db(dir: &Path) -> Result<sled::Db, WalError> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut backoff = Duration::from_millis(1);
    loop {
        // The WAL is written once and read only at start-up: a small page cache is
        // enough, and sled's 1 GiB default would be memory taken from the actors.
        match sled::Config::new().path(dir).cache_capacity(WAL_CACHE_BYTES).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") && Instant::now() < deadline => {
                debug!(dir = %dir.display(), error = %e, "WAL directory locked; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Deletes `keys` one remove at a time, never as a `sled::Batch`: in sled 0.34 the first
/// batch or transaction in a process switches every later sled operation (the appends
/// included) to a global lock, and a batch holds that lock exclusively while it applies.
/// No WAL deletion needs atomicity: a crash midway leaves leftovers that `open` handles.
fn remove_all(tree: &sled::Tree, keys: Vec<sled::IVec>) -> Result<(), WalError> {
    for k in keys {
        tree.remove(k)?;
    }
    Ok(())
}

fn read_checkpoint(meta: &sled::Tree) -> Result<u64, WalError> {
    match meta.get(CHECKPOINT_KEY)? {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_ref())
            .map(u64::from_le_bytes)
            .map_err(|_| WalError::Decode(format!("checkpoint value has {} bytes, expected 8", v.len()))),
    }
}

impl Wal {
    /// Opens (or creates) the log in `cfg.dir` and runs recovery (see the
    /// crate docs): leftovers `<= checkpoint` are deleted, the first invalid
    /// record after the checkpoint and everything after it are deleted when
    /// they are a torn tail; damage with intact records after it is
    /// [`WalError::Corrupt`] unless [`WalConfig::truncate_corrupt`] is set.
    pub fn open(cfg: WalConfig) -> Result<(Wal, RecoveryReport), WalError> {
        let started = Instant::now();
        let db = open_db(&cfg.dir)?;
        let log = db.open_tree(LOG_TREE)?;
        let meta = db.open_tree(META_TREE)?;
        let checkpoint = read_checkpoint(&meta)?;

        // A crash between the checkpoint flush and the deletion (or an
        // unflushed deletion) leaves applied records behind; they are garbage.
        // Iterating the whole prefix (not just 8-byte keys) also removes any
        // garbled key that sorts before the first live record.
        let after_cp = checkpoint.checked_add(1).map(frame::key);
        let stale_iter = match after_cp {
            Some(k) => log.range(..k),
            None => log.iter(),
        };
        let stale: Vec<sled::IVec> = stale_iter.map(|item| item.map(|(k, _)| k)).collect::<Result<_, _>>()?;
        let stale_records = stale.len() as u64;
        if stale_records > 0 {
            remove_all(&log, stale)?;
            info!(stale_records, checkpoint, "deleted WAL records at or below checkpoint");
        }

        let mut expected = checkpoint.saturating_add(1);
        let mut records = 0u64;
        let mut live_bytes = 0u64;
        let mut truncate: Vec<sled::IVec> = Vec::new();
        let mut truncated_bytes = 0u64;
        let mut first_bad: Option<(Vec<u8>, String)> = None;
        // Intact records at or after the first bad one: none means a torn tail.
        let (mut intact_after, mut last_intact_seq) = (0u64, 0u64);
        let live_iter = match after_cp {
            Some(k) => log.range(k..),
            None => log.range(frame::key(u64::MAX)..frame::key(u64::MAX)),
        };
        for item in live_iter {
            let (k, v) = item?;
            if first_bad.is_none() {
                match validate(&k, &v, expected) {
                    Ok(_) => {
                        records += 1;
                        live_bytes += v.len() as u64;
                        expected += 1;
                        continue;
                    }
                    Err(reason) => first_bad = Some((k.to_vec(), reason)),
                }
            }
            // The first bad record counts too: after a hole it is intact itself.
            if let Some(seq) = intact(&k, &v) {
                intact_after += 1;
                last_intact_seq = seq;
            }
            truncated_bytes += v.len() as u64;
            truncate.push(k);
        }
        let truncated_records = truncate.len() as u64;
        if let Some((_, reason)) = first_bad.as_ref().filter(|_| intact_after > 0 && !cfg.truncate_corrupt) {
            error!(
                expected_seq = expected,
                intact_after,
                last_intact_seq,
                would_drop = truncated_records,
                reason = %reason,
                "WAL damaged before its end; refusing to open (operator override: truncate_corrupt)"
            );
            return Err(WalError::Corrupt {
                dir: cfg.dir.display().to_string(),
                expected_seq: expected,
                reason: reason.clone(),
                intact_after,
                last_intact_seq,
                would_drop: truncated_records,
            });
        }
        let truncated_intact_records = intact_after;
        if let Some((bad_key, reason)) = &first_bad {
            if truncated_intact_records > 0 {
                error!(
                    truncated_intact_records,
                    last_intact_seq, "WAL damaged before its end: intact records truncated by the operator override"
                );
            }
            error!(
                truncated_records,
                truncated_bytes,
                expected_seq = expected,
                bad_key = ?frame::seq_of_key(bad_key),
                reason = %reason,
                "WAL tail truncated"
            );
            // A crash midway leaves a gap at or before the first bad record, which the
            // next open truncates from again.
            remove_all(&log, truncate)?;
        }
        if first_bad.is_some() || stale_records > 0 {
            // Make the repair durable before new records reuse the freed
            // seqs, so a crash cannot resurrect the bad tail next to them.
            db.flush()?;
        }

        let last_valid = expected - 1;
        let report = RecoveryReport {
            checkpoint,
            records,
            first_seq: (records > 0).then_some(checkpoint + 1),
            last_seq: (records > 0).then_some(last_valid),
            truncated_records,
            truncated_bytes,
            truncated_intact_records,
        };
        info!(
            dir = %cfg.dir.display(),
            checkpoint,
            records,
            live_bytes,
            first_seq = ?report.first_seq,
            last_seq = ?report.last_seq,
            truncated_records,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "WAL opened"
        );
        let wal = Wal {
            db,
            log,
            meta,
            durability: cfg.durability,
            max_bytes: cfg.max_bytes,
            dir: cfg.dir.clone(),
            min_free_bytes: cfg.min_free_bytes,
            state: Mutex::new(State {
                // `last_valid >= checkpoint`, so after everything was
                // checkpointed and deleted the sequence still continues.
                next_seq: last_valid.saturating_add(1),
                checkpoint,
                live_bytes,
            }),
            checkpoint_lock: Mutex::new(()),
            appends: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_stats: Mutex::new(FsyncStats::default()),
        };
        Ok((wal, report))
    }

    /// Appends one record and returns its seq (strictly increasing, starting
    /// at 1). **Not durable until [`Wal::sync`]** returns.
    pub fn append(&self, payload: &[u8]) -> Result<u64, WalError> {
        let mut buf = Vec::with_capacity(frame::HEADER_LEN + payload.len());
        buf.resize(frame::HEADER_LEN, 0);
        buf.extend_from_slice(payload);
        self.append_frame(buf)
    }

    /// Serializes `value` with bincode 2 (serde, `config::standard()`) and
    /// appends it; read it back with [`Wal::decode`].
    pub fn append_serde<T: Serialize>(&self, value: &T) -> Result<u64, WalError> {
        // Serialize straight behind the reserved header: no second copy of a
        // batch that may be tens of kilobytes.
        let mut buf = vec![0u8; frame::HEADER_LEN];
        bincode::serde::encode_into_std_write(value, &mut buf, bincode::config::standard()).map_err(|e| WalError::Encode(e.to_string()))?;
        self.append_frame(buf)
    }

    /// `buf` = reserved header + payload.
    fn append_frame(&self, mut buf: Vec<u8>) -> Result<u64, WalError> {
        let frame_len = buf.len() as u64;
        if self.min_free_bytes > 0 {
            if let Some(free_bytes) = free_space(&self.dir) {
                if free_bytes < self.min_free_bytes.saturating_add(frame_len) {
                    return Err(WalError::DiskLow { free_bytes, reserve_bytes: self.min_free_bytes });
                }
            }
        }
        let mut st = lock(&self.state);
        if st.live_bytes.saturating_add(frame_len) > self.max_bytes {
            debug!(live_bytes = st.live_bytes, frame_len, max_bytes = self.max_bytes, "WAL full");
            return Err(WalError::Full { live_bytes: st.live_bytes, max_bytes: self.max_bytes });
        }
        let seq = st.next_seq;
        frame::seal(seq, &mut buf).map_err(|e| WalError::Encode(e.to_string()))?;
        self.log.insert(frame::key(seq), buf)?;
        st.next_seq += 1;
        st.live_bytes += frame_len;
        drop(st);
        self.appends.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// Makes everything appended so far durable with one fsync (group
    /// commit). Deliberately does not take the append lock: appends from
    /// other threads continue during the fsync and are covered by the next
    /// `sync`. A no-op under [`Durability::NoSync`].
    pub fn sync(&self) -> Result<(), WalError> {
        match self.durability {
            Durability::NoSync => Ok(()),
            Durability::GroupCommit => self.fsync(),
        }
    }

    fn fsync(&self) -> Result<(), WalError> {
        let started = Instant::now();
        let bytes = self.db.flush().map_err(|e| {
            error!(error = %e, "WAL fsync failed");
            WalError::from(e)
        })?;
        let micros = started.elapsed().as_micros() as u64;
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).ok();
        let mut fs = lock(&self.fsync_stats);
        fs.last_unix_ms = now_ms;
        fs.last_micros = Some(micros);
        drop(fs);
        debug!(bytes, micros, "WAL fsync");
        Ok(())
    }

    /// Records that everything `<= seq` has been applied to the tables.
    /// The checkpoint is durable (flushed, in every durability mode) before
    /// this returns; then records `<= seq` are deleted and their bytes stop
    /// counting against `max_bytes`. Lower or equal values are ignored (the
    /// checkpoint never moves backwards); a value beyond `last_seq()` is
    /// clamped to it, because a checkpoint past the log would make the next
    /// appended seqs look already-applied after a restart.
    pub fn set_checkpoint(&self, seq: u64) -> Result<(), WalError> {
        let _serial = lock(&self.checkpoint_lock);
        let (current, last) = {
            let st = lock(&self.state);
            (st.checkpoint, st.next_seq - 1)
        };
        if seq <= current {
            debug!(requested = seq, checkpoint = current, "checkpoint not advanced");
            return Ok(());
        }
        let target = if seq > last {
            warn!(requested = seq, last_seq = last, "checkpoint beyond last record; clamped");
            last
        } else {
            seq
        };
        if target <= current {
            return Ok(());
        }
        self.meta.insert(CHECKPOINT_KEY, &target.to_le_bytes())?;
        // Durable before deleting: if deletions reached disk without the
        // checkpoint, recovery would see a gap and truncate live records.
        self.fsync()?;
        lock(&self.state).checkpoint = target;

        // Records <= target are never written again (seqs only grow), so the
        // deletion needs no lock; if it fails or is lost in a crash, `open`
        // deletes the leftovers.
        let mut freed_bytes = 0u64;
        let mut doomed: Vec<sled::IVec> = Vec::new();
        for item in self.log.range(..=frame::key(target)) {
            let (k, v) = item?;
            freed_bytes += v.len() as u64;
            doomed.push(k);
        }
        let freed_records = doomed.len() as u64;
        remove_all(&self.log, doomed)?;
        let live_bytes = {
            let mut st = lock(&self.state);
            st.live_bytes = st.live_bytes.saturating_sub(freed_bytes);
            st.live_bytes
        };
        debug!(checkpoint = target, freed_records, freed_bytes, live_bytes, "WAL checkpoint");
        Ok(())
    }

    /// Current checkpoint (0 if never set).
    pub fn checkpoint(&self) -> u64 {
        lock(&self.state).checkpoint
    }

    /// Seq of the last appended record; 0 if nothing was ever appended.
    /// Not reset by checkpointing.
    pub fn last_seq(&self) -> u64 {
        lock(&self.state).next_seq - 1
    }

    /// Records after the checkpoint, in seq order, as of this call (records
    /// appended while iterating are not included). Each record's frame is
    /// verified again; after the first `Err` the iterator ends. Meant for
    /// startup: a concurrent `set_checkpoint` may delete records under the
    /// iterator, which then reports a gap as `Decode`.
    pub fn replay(&self) -> impl Iterator<Item = Result<Record, WalError>> + '_ {
        let (checkpoint, next_seq) = {
            let st = lock(&self.state);
            (st.checkpoint, st.next_seq)
        };
        let start = checkpoint.saturating_add(1);
        let mut expected = start;
        let mut failed = false;
        self.log.range(frame::key(start)..frame::key(next_seq.max(start))).map_while(move |item| {
            if failed {
                return None;
            }
            let result = item.map_err(WalError::from).and_then(|(k, v)| {
                let f = validate(&k, &v, expected).map_err(WalError::Decode)?;
                Ok(Record { seq: f.seq, payload: f.payload.to_vec() })
            });
            match &result {
                Ok(_) => expected += 1,
                Err(e) => {
                    error!(expected_seq = expected, error = %e, "WAL replay failed");
                    failed = true;
                }
            }
            Some(result)
        })
    }

    /// Decodes a payload written by [`Wal::append_serde`] (bincode 2 serde,
    /// `config::standard()`). Trailing bytes are an error: a payload holds
    /// exactly one value.
    pub fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, WalError> {
        let (value, used) =
            bincode::serde::decode_from_slice::<T, _>(payload, bincode::config::standard()).map_err(|e| WalError::Decode(e.to_string()))?;
        if used != payload.len() {
            return Err(WalError::Decode(format!(
                "{} trailing bytes after value ({} of {} used)",
                payload.len() - used,
                used,
                payload.len()
            )));
        }
        Ok(value)
    }

    pub fn stats(&self) -> WalStats {
        let (checkpoint, last, live_bytes) = {
            let st = lock(&self.state);
            (st.checkpoint, st.next_seq - 1, st.live_bytes)
        };
        let fs = lock(&self.fsync_stats);
        let live = last > checkpoint;
        WalStats {
            first_seq: live.then_some(checkpoint + 1),
            last_seq: live.then_some(last),
            checkpoint,
            live_bytes,
            live_records: last.saturating_sub(checkpoint),
            appends: self.appends.load(Ordering::Relaxed),
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            last_fsync_unix_ms: fs.last_unix_ms,
            last_fsync_micros: fs.last_micros,
            max_bytes: self.max_bytes,
        }
    }
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`; `None` when
/// the platform or the call cannot say (then no check is made).
pub fn free_space(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// The seq of a stored `(key, frame)` pair that is sound on its own (8-byte key, frame that
/// decodes, seq inside equal to the key), whatever comes before it.
fn intact(key: &[u8], value: &[u8]) -> Option<u64> {
    let seq = frame::seq_of_key(key)?;
    frame::decode(value).ok().filter(|f| f.seq == seq).map(|_| seq)
}

/// Checks one stored `(key, frame)` pair that should be record `expected`.
/// Returns a human-readable reason on failure (logged, and used as `Decode`).
fn validate<'a>(key: &[u8], value: &'a [u8], expected: u64) -> Result<frame::Frame<'a>, String> {
    let Some(key_seq) = frame::seq_of_key(key) else {
        return Err(format!("key of {} bytes, expected 8", key.len()));
    };
    if key_seq != expected {
        return Err(format!("sequence gap: expected seq {expected}, found {key_seq}"));
    }
    let f = frame::decode(value).map_err(|e| format!("seq {key_seq}: {e}"))?;
    if f.seq != key_seq {
        return Err(format!("frame seq {} stored under key {key_seq}", f.seq));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Wal>();
    }
}
