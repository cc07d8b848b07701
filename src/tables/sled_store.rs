//! The embedded table store: the DynamoDB schema as sled trees in `<data-dir>/tables`.
//!
//! Keys are big-endian binary so that sled's ordered iteration gives the same prefix
//! queries DynamoDB's sort keys give. Values are bincode 2.
//!
//! Where sled runs: writes, whole-day and whole-table reads run on the blocking pool, since
//! they take as long as their size. The small reads — one item, one day count, one
//! skier's days at one resort, one resort's seasons — run on the calling HTTP worker
//! ([`small_read`]): they are bounded by one skier's or one resort's entries and are
//! almost always in sled's page cache, where they take microseconds, while the hop to the
//! blocking pool and back cost two context switches a request (a profile of wrk's vertical
//! GETs spent a third of the node's CPU switching, issue 15). A page-cache miss then costs
//! that worker one disk read.
//!
//! | tree | key | value |
//! |---|---|---|
//! | `skier_days_by_day` | resort u32, season u16, day u16, skier u32 | [`SkierDayItem`] |
//! | `skier_days_by_skier` | skier u32, resort u32, season u16, day u16 | empty (the index) |
//! | `day_counts` | resort u32, season u16, day u16 | [`DayCountItem`] |
//! | `rides` | skier u32, season u16, day u16, time u16, event id u64 | [`RideEvent`] |
//! | `seasons` | resort u32, season u16 | empty |
//!
//! Skier-day items are keyed by day: reloading an aggregate (`query_day`), the read that
//! must be complete, scans the items themselves. Only the by-skier view goes through an
//! index, written before its item, so a crash between the two leaves at worst an entry
//! whose item is missing, which readers skip. (Items keyed by skier with a by-day index
//! could lose the index entry of a written item; the reloaded aggregate then missed the
//! skier, and acknowledged rides were lost. tests/crash.rs found it.)
//!
//! No `sled::Batch` and no transaction anywhere: in sled 0.34 the first of either in a
//! process switches every later sled operation, the WAL's appends included, to a global
//! lock, which a batch holds exclusively while it applies. Nothing here needs them:
//! conditional writes compare versions under a single writer (the flusher), so a plain
//! read-compare-insert is enough, and the raw rides are idempotent.

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::Path;

use super::{DayCountItem, SkierDayItem, Tables, WriteReport};
use crate::domain::{DayKey, RideEvent};
use crate::error::TableError;

/// sled page cache for the embedded tables.
const TABLES_CACHE_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Clone)]
pub struct SledTables {
    db: sled::Db,
    /// The skier-day items, keyed by day (`day_skier_key`).
    days: sled::Tree,
    /// The by-skier index of `days` (`skier_day_key`), for a skier's season totals.
    by_skier: sled::Tree,
    day_counts: sled::Tree,
    rides: sled::Tree,
    seasons: sled::Tree,
}

fn unavailable(e: impl std::fmt::Display) -> TableError {
    TableError::Unavailable(e.to_string())
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, TableError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(unavailable)
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T, TableError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| TableError::Corrupt { table, detail: e.to_string() })
}

/// A skier-day value as stored before rides' stamps were kept (bincode has no optional
/// trailing fields, so the old layout is a type of its own).
#[derive(serde::Deserialize)]
struct SkierDayV1 {
    skier: u32,
    key: DayKey,
    vertical: u64,
    ids: Vec<u64>,
    version: u64,
}

/// A `SkierDays` value in either layout; old values get [`crate::domain::Stamp::UNKNOWN`]s.
fn decode_skier_day(bytes: &[u8]) -> Result<SkierDayItem, TableError> {
    match decode::<SkierDayItem>("SkierDays", bytes) {
        Ok(item) => Ok(item.padded()),
        Err(current) => match decode::<SkierDayV1>("SkierDays", bytes) {
            Ok(v1) => Ok(SkierDayItem {
                skier: v1.skier,
                key: v1.key,
                vertical: v1.vertical,
                ids: v1.ids,
                version: v1.version,
                stamps: Vec::new(),
            }
            .padded()),
            Err(_) => Err(current),
        },
    }
}

fn day_key_bytes(key: &DayKey) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&key.resort.to_be_bytes());
    b[4..6].copy_from_slice(&key.season.to_be_bytes());
    b[6..].copy_from_slice(&key.day.to_be_bytes());
    b
}

fn skier_day_key(skier: u32, key: &DayKey) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&skier.to_be_bytes());
    b[4..].copy_from_slice(&day_key_bytes(key));
    b
}

fn day_skier_key(key: &DayKey, skier: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&day_key_bytes(key));
    b[8..].copy_from_slice(&skier.to_be_bytes());
    b
}

fn ride_key(r: &RideEvent) -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..4].copy_from_slice(&r.skier.to_be_bytes());
    b[4..6].copy_from_slice(&r.season.to_be_bytes());
    b[6..8].copy_from_slice(&r.day.to_be_bytes());
    b[8..10].copy_from_slice(&r.time.to_be_bytes());
    b[10..].copy_from_slice(&r.id.to_be_bytes());
    b
}

/// A bounded read run where it is called (see the module doc).
fn small_read<T>(f: impl FnOnce() -> Result<T, TableError>) -> Result<T, TableError> {
    f()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, TableError> + Send + 'static) -> Result<T, TableError> {
    tokio::task::spawn_blocking(f).await.map_err(unavailable)?
}

impl SledTables {
    pub fn open(dir: &Path) -> Result<Self, TableError> {
        // Reads come from the actors; the tables are read on activation and fallback only,
        // so sled's 1 GiB default cache would mostly hold memory the actors need.
        let db = sled::Config::new().path(dir).cache_capacity(TABLES_CACHE_BYTES).open().map_err(unavailable)?;
        let t = SledTables {
            days: db.open_tree("skier_days_by_day").map_err(unavailable)?,
            by_skier: db.open_tree("skier_days_by_skier").map_err(unavailable)?,
            day_counts: db.open_tree("day_counts").map_err(unavailable)?,
            rides: db.open_tree("rides").map_err(unavailable)?,
            seasons: db.open_tree("seasons").map_err(unavailable)?,
            db,
        };
        t.migrate_skier_first_layout()?;
        Ok(t)
    }

    /// Data dirs written before 2026-11-28 keep the items keyed by skier in `skier_days`,
    /// with a by-day index in `day_skiers`. Their items are copied into the current
    /// layout, made durable, and only then are the old trees dropped; a crash before that
    /// repeats the copy, which writes the same values again.
    fn migrate_skier_first_layout(&self) -> Result<(), TableError> {
        if !self.db.tree_names().iter().any(|name| name.as_ref() == b"skier_days") {
            return Ok(());
        }
        let old = self.db.open_tree("skier_days").map_err(unavailable)?;
        let mut moved = 0u64;
        for kv in old.iter() {
            let (_, value) = kv.map_err(unavailable)?;
            let item = decode_skier_day(&value)?;
            self.by_skier.insert(skier_day_key(item.skier, &item.key), &[]).map_err(unavailable)?;
            self.days.insert(day_skier_key(&item.key, item.skier), value).map_err(unavailable)?;
            moved += 1;
        }
        self.db.flush().map_err(unavailable)?;
        for name in ["skier_days", "day_skiers"] {
            self.db.drop_tree(name).map_err(unavailable)?;
        }
        self.db.flush().map_err(unavailable)?;
        tracing::info!(items = moved, "sled tables: skier-day items moved to the by-day layout");
        Ok(())
    }

    /// Number of raw rides stored; for tests and the admin view.
    pub fn ride_count(&self) -> usize {
        self.rides.len()
    }
}

/// The conditional write of a versioned table: stores `item` under `key` unless the
/// stored item's version is already as new. Returns whether it was written.
fn put_if_newer<T: Serialize + DeserializeOwned>(
    tree: &sled::Tree,
    table: &'static str,
    key: &[u8],
    item: &T,
    version: impl Fn(&T) -> u64,
) -> Result<bool, TableError> {
    if let Some(stored) = tree.get(key).map_err(unavailable)? {
        if version(&decode::<T>(table, &stored)?) >= version(item) {
            return Ok(false);
        }
    }
    tree.insert(key, encode(item)?).map_err(unavailable)?;
    Ok(true)
}

#[async_trait]
impl Tables for SledTables {
    fn name(&self) -> &'static str {
        "sled"
    }

    async fn create(&self) -> Result<(), TableError> {
        Ok(()) // trees are created by open()
    }

    async fn put_skier_days(&self, items: &[SkierDayItem]) -> Result<WriteReport, TableError> {
        let me = self.clone();
        let items = items.to_vec();
        blocking(move || {
            let mut report = WriteReport::default();
            for item in &items {
                // The index entry first (see the module doc), and even for a stale item,
                // so that an entry lost with an older write is mended by the next one.
                me.by_skier.insert(skier_day_key(item.skier, &item.key), &[]).map_err(unavailable)?;
                if put_if_newer(&me.days, "SkierDays", &day_skier_key(&item.key, item.skier), item, |i| i.version)? {
                    report.written += 1;
                } else {
                    report.stale += 1;
                }
            }
            Ok(report)
        })
        .await
    }

    async fn put_day_counts(&self, items: &[DayCountItem]) -> Result<WriteReport, TableError> {
        let me = self.clone();
        let items = items.to_vec();
        blocking(move || {
            let mut report = WriteReport::default();
            for item in &items {
                if put_if_newer(&me.day_counts, "LiftRideCounts", &day_key_bytes(&item.key), item, |i| i.version)? {
                    report.written += 1;
                } else {
                    report.stale += 1;
                }
            }
            Ok(report)
        })
        .await
    }

    async fn put_rides(&self, rides: &[RideEvent]) -> Result<(), TableError> {
        let me = self.clone();
        let rides = rides.to_vec();
        blocking(move || {
            // One insert each, not a `sled::Batch` (see the module doc): a ride is
            // idempotent on its own, the batch's atomicity buys nothing.
            for r in &rides {
                me.rides.insert(ride_key(r), encode(r)?).map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn put_seasons(&self, seasons: &[(u32, u16)]) -> Result<(), TableError> {
        let me = self.clone();
        let seasons = seasons.to_vec();
        blocking(move || {
            for (resort, season) in seasons {
                let mut k = [0u8; 6];
                k[..4].copy_from_slice(&resort.to_be_bytes());
                k[4..].copy_from_slice(&season.to_be_bytes());
                me.seasons.insert(k, &[]).map_err(unavailable)?;
            }
            Ok(())
        })
        .await
    }

    async fn sync(&self) -> Result<(), TableError> {
        self.db.flush_async().await.map(|_| ()).map_err(unavailable)
    }

    async fn get_day_count(&self, key: DayKey) -> Result<Option<DayCountItem>, TableError> {
        small_read(|| match self.day_counts.get(day_key_bytes(&key)).map_err(unavailable)? {
            Some(v) => decode("LiftRideCounts", &v).map(Some),
            None => Ok(None),
        })
    }

    async fn get_skier_day(&self, skier: u32, key: DayKey) -> Result<Option<SkierDayItem>, TableError> {
        small_read(|| match self.days.get(day_skier_key(&key, skier)).map_err(unavailable)? {
            Some(v) => decode_skier_day(&v).map(Some),
            None => Ok(None),
        })
    }

    async fn query_skier_resort(&self, skier: u32, resort: u32) -> Result<Vec<SkierDayItem>, TableError> {
        small_read(|| {
            let mut prefix = [0u8; 8];
            prefix[..4].copy_from_slice(&skier.to_be_bytes());
            prefix[4..].copy_from_slice(&resort.to_be_bytes());
            let mut out = Vec::new();
            for kv in self.by_skier.scan_prefix(prefix) {
                let (k, _) = kv.map_err(unavailable)?;
                let key = DayKey {
                    resort: u32::from_be_bytes([k[4], k[5], k[6], k[7]]),
                    season: u16::from_be_bytes([k[8], k[9]]),
                    day: u16::from_be_bytes([k[10], k[11]]),
                };
                // An entry whose item never landed (a crash between the two writes).
                if let Some(v) = self.days.get(day_skier_key(&key, skier)).map_err(unavailable)? {
                    out.push(decode_skier_day(&v)?);
                }
            }
            Ok(out)
        })
    }

    async fn query_day(&self, key: DayKey) -> Result<Vec<SkierDayItem>, TableError> {
        let me = self.clone();
        blocking(move || {
            me.days.scan_prefix(day_key_bytes(&key)).map(|kv| kv.map_err(unavailable).and_then(|(_, v)| decode_skier_day(&v))).collect()
        })
        .await
    }

    async fn query_seasons(&self, resort: u32) -> Result<Vec<u16>, TableError> {
        small_read(|| {
            self.seasons
                .scan_prefix(resort.to_be_bytes())
                .map(|kv| kv.map_err(unavailable).map(|(k, _)| u16::from_be_bytes([k[4], k[5]])))
                .collect()
        })
    }

    async fn scan_seasons(&self) -> Result<Vec<(u32, u16)>, TableError> {
        let me = self.clone();
        blocking(move || {
            me.seasons
                .iter()
                .map(|kv| {
                    kv.map_err(unavailable).map(|(k, _)| (u32::from_be_bytes([k[0], k[1], k[2], k[3]]), u16::from_be_bytes([k[4], k[5]])))
                })
                .collect()
        })
        .await
    }

    async fn scan_season_totals(&self, sink: &mut (dyn FnMut(u32, u32, u16, u64) + Send)) -> Result<(), TableError> {
        // Runs once at start-up before anything else touches the store, so iterating
        // on this thread is acceptable and avoids shipping the sink to the pool.
        for kv in self.days.iter() {
            let (_, v) = kv.map_err(unavailable)?;
            let item = decode_skier_day(&v)?;
            sink(item.skier, item.key.resort, item.key.season, item.vertical);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Stamp;

    #[test]
    fn skier_days_stored_before_stamps_read_with_unknown_ones() {
        #[derive(Serialize)]
        struct V1 {
            skier: u32,
            key: DayKey,
            vertical: u64,
            ids: Vec<u64>,
            version: u64,
        }
        let key = DayKey { resort: 1, season: 2025, day: 3 };
        let old = encode(&V1 { skier: 7, key, vertical: 40, ids: vec![5, 9], version: 2 }).unwrap();
        let read = decode_skier_day(&old).unwrap();
        assert_eq!((read.ids, read.stamps), (vec![5, 9], vec![Stamp::UNKNOWN; 2]));
        let now = item(7, 3, 40, 2);
        assert_eq!(decode_skier_day(&encode(&now).unwrap()).unwrap(), now);
        assert!(decode_skier_day(&[1, 2, 3]).is_err());
    }

    fn item(skier: u32, day: u16, vertical: u64, version: u64) -> SkierDayItem {
        SkierDayItem {
            skier,
            key: DayKey { resort: 1, season: 2025, day },
            vertical,
            ids: vec![version],
            version,
            stamps: vec![Stamp::new(7, 3)],
        }
    }

    #[actix_rt::test]
    async fn versions_guard_against_stale_writes_and_queries_follow_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let t = SledTables::open(dir.path()).unwrap();
        let r = t.put_skier_days(&[item(7, 1, 50, 5), item(7, 2, 30, 5), item(8, 1, 10, 5)]).await.unwrap();
        assert_eq!(r, WriteReport { written: 3, stale: 0, ..Default::default() });
        let r = t.put_skier_days(&[item(7, 1, 20, 4)]).await.unwrap();
        assert_eq!(r, WriteReport { written: 0, stale: 1, ..Default::default() });
        assert_eq!(t.get_skier_day(7, DayKey { resort: 1, season: 2025, day: 1 }).await.unwrap().unwrap().vertical, 50);
        let days = t.query_skier_resort(7, 1).await.unwrap();
        assert_eq!(days.iter().map(|d| d.vertical).sum::<u64>(), 80);
        let day1 = t.query_day(DayKey { resort: 1, season: 2025, day: 1 }).await.unwrap();
        let mut skiers: Vec<u32> = day1.iter().map(|d| d.skier).collect();
        skiers.sort();
        assert_eq!(skiers, vec![7, 8]);
        let mut totals = Vec::new();
        t.scan_season_totals(&mut |s, r, y, v| totals.push((s, r, y, v))).await.unwrap();
        assert_eq!(totals.len(), 3);
    }

    #[actix_rt::test]
    async fn an_index_entry_without_its_item_is_skipped_and_a_lost_one_is_mended() {
        let dir = tempfile::tempdir().unwrap();
        let t = SledTables::open(dir.path()).unwrap();
        let key = DayKey { resort: 1, season: 2025, day: 1 };
        // A crash between the two writes of a first flush: the index entry only.
        t.by_skier.insert(skier_day_key(9, &key), &[]).unwrap();
        assert!(t.query_skier_resort(9, 1).await.unwrap().is_empty());
        assert!(t.query_day(key).await.unwrap().is_empty());
        // An item whose index entry was lost: the day still has it, and rewriting it
        // (stale, same version) puts the entry back.
        let item = item(8, 1, 70, 3);
        t.days.insert(day_skier_key(&key, 8), encode(&item).unwrap()).unwrap();
        assert_eq!(t.query_day(key).await.unwrap(), vec![item.clone()]);
        assert!(t.query_skier_resort(8, 1).await.unwrap().is_empty());
        let r = t.put_skier_days(std::slice::from_ref(&item)).await.unwrap();
        assert_eq!(r, WriteReport { written: 0, stale: 1, ..Default::default() });
        assert_eq!(t.query_skier_resort(8, 1).await.unwrap(), vec![item]);
    }

    #[actix_rt::test]
    async fn a_data_dir_in_the_skier_first_layout_is_migrated_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let items = [item(7, 1, 50, 5), item(7, 2, 30, 2), item(8, 1, 10, 1)];
        {
            // The layout before 2026-11-28, written as that code wrote it.
            let db = sled::open(dir.path()).unwrap();
            let (old, old_index) = (db.open_tree("skier_days").unwrap(), db.open_tree("day_skiers").unwrap());
            for i in &items {
                old.insert(skier_day_key(i.skier, &i.key), encode(i).unwrap()).unwrap();
                old_index.insert(day_skier_key(&i.key, i.skier), &[]).unwrap();
            }
            db.flush().unwrap();
        }
        let t = SledTables::open(dir.path()).unwrap();
        let day1 = DayKey { resort: 1, season: 2025, day: 1 };
        assert_eq!(t.query_day(day1).await.unwrap(), vec![items[0].clone(), items[2].clone()]);
        assert_eq!(t.query_skier_resort(7, 1).await.unwrap(), vec![items[0].clone(), items[1].clone()]);
        assert!(!t.db.tree_names().iter().any(|n| n.as_ref() == b"skier_days" || n.as_ref() == b"day_skiers"));
        drop(t);
        // Opening again finds nothing left to move and the same items.
        let t = SledTables::open(dir.path()).unwrap();
        assert_eq!(t.query_day(day1).await.unwrap().len(), 2);
    }
}
