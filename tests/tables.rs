//! The table-store contract, written once and run against both stores: sled (always) and
//! DynamoDB Local (ignored by default; `scripts/test.sh` runs it with
//! `LIFTLOG_TEST_DYNAMODB` set). Plus DynamoDB-only checks: raw rides and pagination with
//! direct SDK queries, rough throughput figures, and outages that must fail in bounded time.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::{AttributeValue, Select};
use liftlog::domain::{DayKey, RideEvent, Stamp};
use liftlog::error::TableError;
use liftlog::tables::dynamo::{DynamoConfig, DynamoTables};
use liftlog::tables::sled_store::SledTables;
use liftlog::tables::{DayCountItem, SkierDayItem, Tables, WriteReport};

const IGNORE_MSG: &str = "set LIFTLOG_TEST_DYNAMODB to DynamoDB Local's URL (e.g. http://127.0.0.1:8000), or run scripts/test.sh";

fn key(resort: u32, season: u16, day: u16) -> DayKey {
    DayKey { resort, season, day }
}

/// A skier-day with a stamp (time, lift) derived from each id, so round trips check them too.
fn skier_day(skier: u32, key: DayKey, vertical: u64, ids: Vec<u64>, version: u64) -> SkierDayItem {
    let stamps = ids.iter().map(|id| Stamp::new((id % 360) as u16 + 1, (id % 40) as u16 + 1)).collect();
    SkierDayItem { skier, key, vertical, ids, version, stamps }
}

/// The fields the `BySkier` index gives back (its items have no ids).
fn without_ids(mut items: Vec<SkierDayItem>) -> Vec<(u32, DayKey, u64, u64)> {
    let mut v: Vec<_> = items.drain(..).map(|d| (d.skier, d.key, d.vertical, d.version)).collect();
    v.sort();
    v
}

fn sorted(mut items: Vec<SkierDayItem>) -> Vec<SkierDayItem> {
    items.sort_by_key(|d| (d.key, d.skier));
    items
}

/// Reads through the eventually consistent index may lag a write: poll a little.
async fn eventually<T: PartialEq + std::fmt::Debug, F: Future<Output = T>>(want: T, mut read: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = read().await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "still {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The 120 rides of skier 42 that `conformance` writes (plus duplicates in the same call).
fn rides_of_skier_42() -> Vec<RideEvent> {
    (0..120u64)
        .map(|i| RideEvent {
            id: 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 1),
            resort: 1 + (i % 2) as u32 * 9, // resorts 1 and 10
            season: 2025,
            day: 1 + (i / 40) as u16,
            skier: 42,
            time: (i * 3 % 360) as u16 + 1,
            lift: (i % 40) as u16 + 1,
            vertical: 100 + i as u32,
        })
        .collect()
}

/// Skier-days of the big day that `query_day` must page through: 300 items of ~4 KB, more
/// than DynamoDB's 1 MB page.
const BIG_DAY: DayKey = DayKey { resort: 2, season: 2025, day: 100 };
const BIG_DAY_SKIERS: u32 = 300;
const BIG_DAY_IDS: u64 = 500;

/// The whole contract of [`Tables`] on a fresh store.
async fn conformance(t: Arc<dyn Tables>) {
    let name = t.name();
    // What every skier-day should hold afterwards, for the final scan.
    let mut model: BTreeMap<(u32, DayKey), SkierDayItem> = BTreeMap::new();

    // create: twice, idempotent.
    t.create().await.unwrap_or_else(|e| panic!("{name}: create: {e}"));
    t.create().await.unwrap_or_else(|e| panic!("{name}: second create: {e}"));

    // Empty reads of a fresh store.
    let d1 = key(1, 2025, 1);
    assert_eq!(t.get_skier_day(7, d1).await.unwrap(), None);
    assert_eq!(t.get_day_count(d1).await.unwrap(), None);
    assert!(t.query_day(d1).await.unwrap().is_empty());
    assert!(t.query_skier_resort(7, 1).await.unwrap().is_empty());
    assert!(t.query_seasons(1).await.unwrap().is_empty());
    assert!(t.scan_seasons().await.unwrap().is_empty());
    assert_eq!(t.put_skier_days(&[]).await.unwrap(), WriteReport::default());
    assert_eq!(t.put_day_counts(&[]).await.unwrap(), WriteReport::default());
    t.put_rides(&[]).await.unwrap();
    t.put_seasons(&[]).await.unwrap();

    // put_skier_days: first writes, including resort 10 (must never answer for resort 1),
    // extreme ids and an empty id list.
    let first = vec![
        skier_day(7, d1, 50, vec![1, 2, u64::MAX, 1 << 63, 0], 5),
        skier_day(7, key(1, 2025, 2), 30, vec![3], 5),
        skier_day(7, key(1, 2024, 9), 11, vec![4], 2),
        skier_day(8, d1, 10, vec![], 5),
        skier_day(7, key(10, 2025, 1), 1000, vec![5, 6], 5),
        skier_day(7, key(100, 2025, 1), 7, vec![7], 1),
        skier_day(70, d1, 3, vec![8], 1),
    ];
    let r = t.put_skier_days(&first).await.unwrap();
    assert_eq!(r, WriteReport { written: first.len(), stale: 0, ..Default::default() }, "{name}");
    for d in &first {
        model.insert((d.skier, d.key), d.clone());
    }
    for d in &first {
        assert_eq!(t.get_skier_day(d.skier, d.key).await.unwrap().as_ref(), Some(d), "{name}: round trip");
    }

    // Older and equal versions are stale, not errors, and change nothing.
    let r = t
        .put_skier_days(&[skier_day(7, d1, 999, vec![9], 4), skier_day(7, d1, 999, vec![9], 5), skier_day(8, d1, 1, vec![1], 0)])
        .await
        .unwrap();
    assert_eq!(r, WriteReport { written: 0, stale: 3, ..Default::default() }, "{name}");
    assert_eq!(t.get_skier_day(7, d1).await.unwrap().unwrap(), first[0]);

    // A newer version wins; mixed with a stale one in the same call.
    let newer = skier_day(7, d1, 80, vec![1, 2, u64::MAX, 1 << 63, 0, 11], 6);
    let r = t.put_skier_days(&[newer.clone(), skier_day(8, d1, 1, vec![], 5)]).await.unwrap();
    assert_eq!(r, WriteReport { written: 1, stale: 1, ..Default::default() }, "{name}");
    model.insert((7, d1), newer.clone());
    assert_eq!(t.get_skier_day(7, d1).await.unwrap(), Some(newer.clone()));

    // query_day: exactly that day's skiers, ids included.
    let want_d1 = sorted(model.values().filter(|d| d.key == d1).cloned().collect());
    assert_eq!(want_d1.len(), 3);
    assert_eq!(sorted(t.query_day(d1).await.unwrap()), want_d1, "{name}: query_day");
    assert!(t.query_day(key(1, 2025, 3)).await.unwrap().is_empty());

    // query_skier_resort: all of a skier's days at one resort; 1 must not match 10 or 100.
    let want =
        |skier: u32, resort: u32| without_ids(model.values().filter(|d| d.skier == skier && d.key.resort == resort).cloned().collect());
    for (skier, resort, days, vertical) in [(7, 1, 3, 80 + 30 + 11), (7, 10, 1, 1000), (7, 100, 1, 7), (8, 1, 1, 10)] {
        let w = want(skier, resort);
        assert_eq!(w.len(), days);
        assert_eq!(w.iter().map(|d| d.2).sum::<u64>(), vertical);
        let t = &t;
        eventually(w, || async move { without_ids(t.query_skier_resort(skier, resort).await.unwrap()) }).await;
    }
    assert!(t.query_skier_resort(7, 2).await.unwrap().is_empty());
    assert!(t.query_skier_resort(9, 1).await.unwrap().is_empty());

    // put_day_counts: same version rules, get_day_count.
    let c1 = DayCountItem { key: d1, unique_skiers: 3, rides: 8, version: 5 };
    let c10 = DayCountItem { key: key(10, 2025, 1), unique_skiers: 1, rides: 2, version: 5 };
    assert_eq!(t.put_day_counts(&[c1.clone(), c10.clone()]).await.unwrap(), WriteReport { written: 2, stale: 0, ..Default::default() });
    let older = DayCountItem { unique_skiers: 99, rides: 99, version: 4, ..c1.clone() };
    let equal = DayCountItem { unique_skiers: 99, rides: 99, version: 5, ..c1.clone() };
    assert_eq!(t.put_day_counts(&[older, equal]).await.unwrap(), WriteReport { written: 0, stale: 2, ..Default::default() });
    assert_eq!(t.get_day_count(d1).await.unwrap(), Some(c1.clone()));
    let c1b = DayCountItem { unique_skiers: 4, rides: 9, version: 6, ..c1 };
    assert_eq!(t.put_day_counts(std::slice::from_ref(&c1b)).await.unwrap(), WriteReport { written: 1, stale: 0, ..Default::default() });
    assert_eq!(t.get_day_count(d1).await.unwrap(), Some(c1b));
    assert_eq!(t.get_day_count(c10.key).await.unwrap(), Some(c10));
    assert_eq!(t.get_day_count(key(1, 2025, 2)).await.unwrap(), None);

    // put_rides: more than one batch of 25, duplicates within the call, and again (idempotent).
    let rides = rides_of_skier_42();
    let mut with_dups = rides.clone();
    with_dups.extend_from_slice(&rides[..10]);
    t.put_rides(&with_dups).await.unwrap_or_else(|e| panic!("{name}: put_rides: {e}"));
    t.put_rides(&rides).await.unwrap();

    // Seasons.
    t.put_seasons(&[(1, 2025), (1, 2024), (10, 2025)]).await.unwrap();
    t.put_seasons(&[(1, 2025)]).await.unwrap();
    assert_eq!(t.query_seasons(1).await.unwrap(), vec![2024, 2025]);
    assert_eq!(t.query_seasons(10).await.unwrap(), vec![2025]);
    assert!(t.query_seasons(2).await.unwrap().is_empty());
    assert_eq!(t.scan_seasons().await.unwrap(), vec![(1, 2024), (1, 2025), (10, 2025)]);

    // A day bigger than one DynamoDB page (1 MB), with neighbours that must not leak in.
    let big: Vec<SkierDayItem> = (0..BIG_DAY_SKIERS)
        .map(|s| {
            let ids = (0..BIG_DAY_IDS).map(|i| (u64::from(s) << 32) | i).collect();
            skier_day(1000 + s, BIG_DAY, u64::from(s) * 10, ids, 1)
        })
        .collect();
    let neighbours = [skier_day(1000, key(2, 2025, 10), 1, vec![1], 1), skier_day(1000, key(20, 2025, 100), 2, vec![2], 1)];
    let started = Instant::now();
    let r = t.put_skier_days(&big).await.unwrap();
    eprintln!("{name}: {} conditional puts of ~4 KB in {:?}", big.len(), started.elapsed());
    assert_eq!(r, WriteReport { written: big.len(), stale: 0, ..Default::default() });
    assert_eq!(t.put_skier_days(&neighbours).await.unwrap().written, 2);
    for d in big.iter().chain(&neighbours) {
        model.insert((d.skier, d.key), d.clone());
    }
    let started = Instant::now();
    let got = t.query_day(BIG_DAY).await.unwrap();
    eprintln!(
        "{name}: query_day of {} items ({} KB of ids) in {:?}",
        got.len(),
        got.len() as u64 * BIG_DAY_IDS * 8 / 1024,
        started.elapsed()
    );
    assert_eq!(got.len(), BIG_DAY_SKIERS as usize, "{name}: query_day must follow pages");
    assert!(sorted(got) == sorted(big.clone()), "{name}: query_day of the big day differs");

    // scan_season_totals sees every skier-day, with its latest vertical.
    let mut totals = Vec::new();
    t.scan_season_totals(&mut |skier, resort, season, vertical| totals.push((skier, resort, season, vertical))).await.unwrap();
    totals.sort_unstable();
    let mut want: Vec<_> = model.values().map(|d| (d.skier, d.key.resort, d.key.season, d.vertical)).collect();
    want.sort_unstable();
    assert_eq!(totals.len(), want.len(), "{name}: scan_season_totals count");
    assert!(totals == want, "{name}: scan_season_totals differs");

    t.sync().await.unwrap();
}

/// One skier-day item larger than a DynamoDB item may be (60,000 ids, 480 KB), between two
/// ordinary ones in one call: the store must write the others and say which one it could
/// not hold, instead of failing the call (issue 13, item 1: that failure stopped every flush).
async fn an_item_the_store_cannot_hold_does_not_fail_the_others(t: Arc<dyn Tables>) -> WriteReport {
    let name = t.name();
    let day = key(3, 2025, 7);
    let items = [
        skier_day(1, day, 50, vec![11], 1),
        skier_day(2, day, 60_000 * 10, (1..=60_000).collect(), 60_000),
        skier_day(3, day, 70, vec![31], 1),
    ];
    let r = t.put_skier_days(&items).await.unwrap_or_else(|e| panic!("{name}: one item failed the whole call: {e}"));
    for skier in [1, 3] {
        assert_eq!(t.get_skier_day(skier, day).await.unwrap().as_ref(), Some(&items[skier as usize - 1]), "{name}: skier {skier}");
    }
    r
}

#[actix_rt::test]
async fn sled_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let t = SledTables::open(dir.path()).unwrap();
    conformance(Arc::new(t.clone())).await;
    assert_eq!(t.ride_count(), 120);
}

#[actix_rt::test]
async fn sled_holds_a_skier_day_dynamodb_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let r = an_item_the_store_cannot_hold_does_not_fail_the_others(Arc::new(SledTables::open(dir.path()).unwrap())).await;
    assert_eq!((r.written, r.refused.len()), (3, 0), "sled has no item size limit");
}

#[actix_rt::test]
#[ignore = "needs DynamoDB Local: run scripts/test.sh"]
async fn dynamodb_reports_an_item_it_cannot_hold_and_writes_the_others() {
    let endpoint = std::env::var("LIFTLOG_TEST_DYNAMODB").unwrap_or_else(|_| panic!("{IGNORE_MSG}"));
    let t = dynamo(&endpoint, &unique_prefix(), 16).await;
    t.create().await.unwrap();
    let r = an_item_the_store_cannot_hold_does_not_fail_the_others(Arc::new(t.clone())).await;
    assert_eq!(r.written, 2);
    assert_eq!(r.refused.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1], "{r:?}");
    assert!(r.refused[0].1.contains("size"), "the reason is DynamoDB's: {r:?}");
    assert!(t.get_skier_day(2, key(3, 2025, 7)).await.unwrap().is_none());
    delete_tables(&t).await;
}

/// Cluster mode's fencing on the real write path (ADR 005): the new owner's epoch wins over
/// a stale owner's higher version, and the stale owner's later writes are refused whatever
/// their version, while within one epoch the version rule still holds.
#[actix_rt::test]
#[ignore = "needs DynamoDB Local: run scripts/test.sh"]
async fn dynamodb_fenced_writes_refuse_a_stale_owner() {
    let endpoint = std::env::var("LIFTLOG_TEST_DYNAMODB").unwrap_or_else(|_| panic!("{IGNORE_MSG}"));
    let t = dynamo(&endpoint, &unique_prefix(), 16).await;
    t.create().await.unwrap();
    let k = key(4, 2025, 9);
    let item = |vertical: u64, version: u64| skier_day(7, k, vertical, (1..=version).collect(), version);
    let count = |skiers: u64, version: u64| DayCountItem { key: k, unique_skiers: skiers, rides: version, version };
    // The old owner (epoch 3) wrote 5 rides; the new owner (epoch 4) loaded only 4 of them
    // from an earlier flush and writes its state with version 4: the epoch wins.
    assert_eq!(t.put_skier_days_fenced(&[item(500, 5)], &[3]).await.unwrap().written, 1);
    assert_eq!(t.put_day_counts_fenced(&[count(1, 5)], &[3]).await.unwrap().written, 1);
    assert_eq!(t.put_skier_days_fenced(&[item(400, 4)], &[4]).await.unwrap().written, 1, "a newer epoch must win");
    assert_eq!(t.put_day_counts_fenced(&[count(1, 4)], &[4]).await.unwrap().written, 1);
    // The zombie's late write, even with a higher version, is refused.
    let late = t.put_skier_days_fenced(&[item(900, 9)], &[3]).await.unwrap();
    assert_eq!((late.written, late.stale), (0, 1), "{late:?}");
    assert_eq!(t.put_day_counts_fenced(&[count(2, 9)], &[3]).await.unwrap().written, 0);
    // Within the new epoch, versions still order the writes.
    assert_eq!(t.put_skier_days_fenced(&[item(300, 3)], &[4]).await.unwrap().stale, 1);
    assert_eq!(t.put_skier_days_fenced(&[item(600, 6)], &[4]).await.unwrap().written, 1);
    let stored = t.get_skier_day(7, k).await.unwrap().unwrap();
    assert_eq!((stored.vertical, stored.version), (600, 6));
    assert_eq!(t.get_day_count(k).await.unwrap().map(|c| c.version), Some(4));
    delete_tables(&t).await;
}

fn unique_prefix() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("t{nanos}_{}_", std::process::id())
}

async fn dynamo(endpoint: &str, prefix: &str, max_concurrency: usize) -> DynamoTables {
    let cfg =
        DynamoConfig { endpoint: Some(endpoint.to_string()), table_prefix: prefix.to_string(), max_concurrency, ..DynamoConfig::default() };
    DynamoTables::connect(cfg).await.expect("connect")
}

/// Counts a skier's raw rides with a direct Query (the trait has no read of rides).
async fn count_rides(t: &DynamoTables, skier: u32) -> i64 {
    let [rides, ..] = t.table_names();
    let mut count = 0i64;
    let mut start = None;
    loop {
        let out = t
            .client()
            .query()
            .table_name(rides)
            .key_condition_expression("SkierID = :s")
            .expression_attribute_values(":s", AttributeValue::N(skier.to_string()))
            .select(Select::Count)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("count rides");
        count += i64::from(out.count);
        start = out.last_evaluated_key;
        if start.is_none() {
            return count;
        }
    }
}

async fn delete_tables(t: &DynamoTables) {
    for name in t.table_names() {
        if let Err(e) = t.client().delete_table().table_name(name).send().await {
            eprintln!("cleanup: delete {name}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(&e));
        }
    }
}

#[actix_rt::test]
#[ignore = "needs DynamoDB Local: run scripts/test.sh"]
async fn dynamodb_conforms() {
    let endpoint = std::env::var("LIFTLOG_TEST_DYNAMODB").unwrap_or_else(|_| panic!("{IGNORE_MSG}"));
    let prefix = unique_prefix();
    let t = dynamo(&endpoint, &prefix, 16).await;
    let started = Instant::now();
    conformance(Arc::new(t.clone())).await;
    eprintln!("dynamodb: conformance suite in {:?}", started.elapsed());

    // Raw rides: 120 distinct keys despite duplicates and a second put, every attribute stored.
    assert_eq!(count_rides(&t, 42).await, 120);
    let [rides_table, _, skier_days_table, _] = t.table_names();
    let ride = rides_of_skier_42()[7];
    let stored = t
        .client()
        .get_item()
        .table_name(rides_table)
        .key("SkierID", AttributeValue::N("42".into()))
        .key("SK", AttributeValue::S(liftlog::tables::dynamo::ride_sort_key(&ride)))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .expect("ride stored");
    let n = |a: &str| stored.get(a).and_then(|v| v.as_n().ok()).cloned().unwrap_or_default();
    assert_eq!(n("ResortID"), ride.resort.to_string());
    assert_eq!(n("LiftID"), ride.lift.to_string());
    assert_eq!(n("Vertical"), ride.vertical.to_string());
    assert_eq!(n("Time"), ride.time.to_string());
    assert_eq!(stored.get("EventID").and_then(|v| v.as_s().ok()), Some(&format!("{:016x}", ride.id)));

    // The big day really spans more than one page, so query_day did paginate.
    let first_page = t
        .client()
        .query()
        .table_name(skier_days_table)
        .key_condition_expression("ResortSeasonDay = :k")
        .expression_attribute_values(":k", AttributeValue::S(BIG_DAY.to_string()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    assert!(first_page.last_evaluated_key.is_some(), "the big day fits one page: pagination not exercised");
    eprintln!("dynamodb: first page of the big day holds {} of {BIG_DAY_SKIERS} items", first_page.count);

    // Rough throughput (not asserted): conditional puts and batch writes.
    let n_days = 2000u32;
    let days: Vec<SkierDayItem> =
        (0..n_days).map(|s| skier_day(5000 + s, key(3, 2025, 1 + (s % 7) as u16), 100, vec![1, 2, 3, 4, 5], 1)).collect();
    let started = Instant::now();
    let r = t.put_skier_days(&days).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(r.written, n_days as usize);
    eprintln!("dynamodb: {n_days} conditional PutItem in {secs:.2} s = {:.0}/s (max_concurrency 16)", f64::from(n_days) / secs);
    let started = Instant::now();
    let r = t.put_skier_days(&days).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(r.stale, n_days as usize);
    eprintln!("dynamodb: {n_days} stale conditional PutItem in {secs:.2} s = {:.0}/s", f64::from(n_days) / secs);

    let n_rides = 10_000u64;
    let rides: Vec<RideEvent> = (0..n_rides)
        .map(|i| RideEvent {
            id: i.wrapping_mul(0x2545_f491_4f6c_dd1d),
            resort: 3,
            season: 2025,
            day: 1,
            skier: 100_000 + (i % 500) as u32,
            time: (i % 360) as u16 + 1,
            lift: (i % 40) as u16 + 1,
            vertical: 300,
        })
        .collect();
    let started = Instant::now();
    t.put_rides(&rides).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!("dynamodb: {n_rides} rides by BatchWriteItem in {secs:.2} s = {:.0} items/s", n_rides as f64 / secs);

    let started = Instant::now();
    let mut seen = 0usize;
    t.scan_season_totals(&mut |_, _, _, _| seen += 1).await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!("dynamodb: scan_season_totals of {seen} skier-days in {secs:.2} s = {:.0} items/s", seen as f64 / secs);

    let started = Instant::now();
    for s in 0..200u32 {
        assert!(t.get_skier_day(5000 + s, key(3, 2025, 1 + (s % 7) as u16)).await.unwrap().is_some());
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("dynamodb: 200 sequential GetItem in {secs:.2} s = {:.1} ms each", secs * 1000.0 / 200.0);

    delete_tables(&t).await;
}

/// Asserts that a write to a dead endpoint fails with `Unavailable` in bounded time.
async fn assert_fails_in_bounded_time(t: &DynamoTables, what: &str) {
    let items: Vec<SkierDayItem> = (0..200).map(|s| skier_day(s, key(1, 2025, 1), 1, vec![1], 1)).collect();
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), t.put_skier_days(&items))
        .await
        .unwrap_or_else(|_| panic!("{what}: put_skier_days still hanging after 60 s"));
    let elapsed = started.elapsed();
    eprintln!("{what}: put_skier_days of 200 items failed after {elapsed:?}: {result:?}");
    assert!(matches!(result, Err(TableError::Unavailable(_))), "{what}: {result:?}");
    assert!(elapsed < Duration::from_secs(30), "{what}: took {elapsed:?}");

    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(60), t.get_day_count(key(1, 2025, 1))).await.expect("get hangs");
    assert!(matches!(result, Err(TableError::Unavailable(_))), "{what}: {result:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[actix_rt::test]
#[ignore = "DynamoDB client outage test; run scripts/test.sh"]
async fn dynamodb_closed_port_fails_fast() {
    // Port 9 (discard) is closed: every connection is refused.
    let t = dynamo("http://127.0.0.1:9", &unique_prefix(), 16).await;
    assert_fails_in_bounded_time(&t, "closed port").await;
    let started = Instant::now();
    assert!(matches!(t.create().await, Err(TableError::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[actix_rt::test]
#[ignore = "DynamoDB client outage test (about 20 s); run scripts/test.sh"]
async fn dynamodb_silent_endpoint_times_out() {
    // A listener that never accepts: the kernel completes the handshake, nobody answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let t = dynamo(&url, &unique_prefix(), 4).await;
    assert_fails_in_bounded_time(&t, "silent endpoint").await;
    drop(listener);
}

/// A scripted HTTP endpoint: answers the n-th request with the n-th `(status, body)` and
/// records every request body. Each response closes its connection.
struct FakeDynamo {
    url: String,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeDynamo {
    fn start(script: Vec<(u16, String)>) -> FakeDynamo {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = bodies.clone();
        std::thread::spawn(move || {
            for (status, body) in script {
                let Ok((stream, _)) = listener.accept() else { return };
                let mut reader = BufReader::new(stream);
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut request = vec![0u8; length];
                if reader.read_exact(&mut request).is_err() {
                    return;
                }
                seen.lock().unwrap().push(String::from_utf8_lossy(&request).into_owned());
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = reader.get_mut().write_all(response.as_bytes());
            }
        });
        FakeDynamo { url, bodies }
    }

    fn requests(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

fn aws_error(kind: &str) -> String {
    format!(r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{kind}","message":"scripted"}}"#)
}

#[actix_rt::test]
async fn dynamodb_client_retries_throttling_5xx_and_unprocessed_items() {
    // GetItem: a 500, a throttle, then the item.
    let item = r#"{"Item":{"ResortSeasonDay":{"S":"1#2025#1"},"UniqueSkiers":{"N":"3"},"Rides":{"N":"8"},"Version":{"N":"5"}}}"#;
    let fake =
        FakeDynamo::start(vec![(500, aws_error("InternalServerError")), (400, aws_error("ThrottlingException")), (200, item.to_string())]);
    let t = dynamo(&fake.url, "fake_", 4).await;
    let got = t.get_day_count(key(1, 2025, 1)).await.unwrap();
    assert_eq!(got, Some(DayCountItem { key: key(1, 2025, 1), unique_skiers: 3, rides: 8, version: 5 }));
    assert_eq!(fake.requests().len(), 3);

    // A stored item that does not decode is Corrupt, not Unavailable.
    let fake = FakeDynamo::start(vec![(200, r#"{"Item":{"ResortSeasonDay":{"S":"1#2025"}}}"#.to_string())]);
    let t = dynamo(&fake.url, "fake_", 4).await;
    let got = t.get_day_count(key(1, 2025, 1)).await;
    assert!(matches!(got, Err(TableError::Corrupt { table: "LiftRideCounts", .. })), "{got:?}");

    // A validation error is not retried.
    let fake = FakeDynamo::start(vec![(400, aws_error("ValidationException")), (200, "{}".into())]);
    let t = dynamo(&fake.url, "fake_", 4).await;
    let got = t.get_day_count(key(1, 2025, 1)).await;
    assert!(matches!(&got, Err(TableError::Unavailable(m)) if m.contains("ValidationException")), "{got:?}");
    assert_eq!(fake.requests().len(), 1);

    // A failed condition is `stale`; a throttle before it is retried.
    let fake = FakeDynamo::start(vec![
        (400, aws_error("ProvisionedThroughputExceededException")),
        (400, aws_error("ConditionalCheckFailedException")),
    ]);
    let t = dynamo(&fake.url, "fake_", 4).await;
    let r = t.put_skier_days(&[skier_day(7, key(1, 2025, 1), 5, vec![1], 3)]).await.unwrap();
    assert_eq!(r, WriteReport { written: 0, stale: 1, ..Default::default() });
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[1].contains("attribute_not_exists(#v) OR #v < :v"), "{}", requests[1]);

    // BatchWriteItem: the unprocessed ride is sent again, alone.
    let rides: Vec<RideEvent> = rides_of_skier_42().into_iter().take(3).collect();
    let left = format!(
        r#"{{"UnprocessedItems":{{"fake_SkierLiftRides":[{{"PutRequest":{{"Item":{{"SkierID":{{"N":"42"}},"SK":{{"S":"{}"}}}}}}}}]}}}}"#,
        liftlog::tables::dynamo::ride_sort_key(&rides[1])
    );
    let fake = FakeDynamo::start(vec![(200, left), (200, r#"{"UnprocessedItems":{}}"#.into())]);
    let t = dynamo(&fake.url, "fake_", 4).await;
    t.put_rides(&rides).await.unwrap();
    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].matches("PutRequest").count(), 3);
    assert_eq!(requests[1].matches("PutRequest").count(), 1);
}
