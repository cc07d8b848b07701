//! The raw rides (`SkierLiftRides`) of a production-mode deployment, read straight from
//! DynamoDB, compared with the model of what got a 201: each ride there exactly once, with
//! its fields, and nothing else. Aggregates alone can be right while raw rows are missing or
//! doubled, so every kill test checks both.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use liftlog::domain::{event_id, RideEvent};
use liftlog::tables::dynamo::{DynamoConfig, DynamoTables};

use super::Ride;

/// The row a keyed ride must have: its id is a hash of its `Idempotency-Key` and the ride;
/// its vertical is the default catalog's (lift n rises n × 10 m).
pub fn row_of(r: &Ride) -> RideEvent {
    let mut e = RideEvent {
        id: 0,
        resort: r.at.resort,
        season: r.at.season,
        day: r.at.day,
        skier: r.skier,
        time: r.time,
        lift: r.lift,
        vertical: r.lift as u32 * 10,
    };
    e.id = event_id(&e, Some(r.key.as_bytes()));
    e
}

/// Every row of `{prefix}SkierLiftRides`, decoded.
pub fn dynamodb_rows(endpoint: &str, table_prefix: &str) -> Vec<RideEvent> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let t = DynamoTables::connect(DynamoConfig {
            endpoint: Some(endpoint.into()),
            table_prefix: table_prefix.into(),
            ..Default::default()
        })
        .await
        .expect("connect to DynamoDB");
        let (mut rows, mut start) = (Vec::new(), None);
        loop {
            let page =
                t.client().scan().table_name(t.table_names()[0]).set_exclusive_start_key(start).send().await.expect("scan SkierLiftRides");
            for item in page.items() {
                let num = |k: &str| item.get(k).and_then(|v| v.as_n().ok()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(u64::MAX);
                let id = item.get("EventID").and_then(|v| v.as_s().ok()).and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0);
                rows.push(RideEvent {
                    id,
                    resort: num("ResortID") as u32,
                    season: num("SeasonID") as u16,
                    day: num("DayID") as u16,
                    skier: num("SkierID") as u32,
                    time: num("Time") as u16,
                    lift: num("LiftID") as u16,
                    vertical: num("Vertical") as u32,
                });
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                return rows;
            }
        }
    })
}

/// The mismatches between `rows` and the keyed rides that got a 201 (none = exact); a row of
/// no keyed ride is one only if `keyless` does not claim it (a keyless ride's id is random).
pub fn mismatches(rows: &[RideEvent], acked: &[Ride], keyless: &dyn Fn(&RideEvent) -> bool) -> Vec<String> {
    let mut by_id: BTreeMap<u64, Vec<&RideEvent>> = BTreeMap::new();
    for r in rows {
        by_id.entry(r.id).or_default().push(r);
    }
    let mut bad = Vec::new();
    let mut want: BTreeMap<u64, RideEvent> = BTreeMap::new();
    for r in acked {
        let w = row_of(r);
        want.insert(w.id, w);
    }
    for (id, w) in &want {
        match by_id.remove(id).as_deref() {
            Some([got]) if **got == *w => {}
            Some(got) => bad.push(format!("ride {id:016x}: stored as {got:?}, want {w:?}")),
            None => bad.push(format!("ride {id:016x} ({w:?}) is not in SkierLiftRides")),
        }
    }
    for r in by_id.into_values().flatten() {
        if !keyless(r) {
            bad.push(format!("a raw ride nobody got a 201 for: {r:?}"));
        }
    }
    bad
}

/// Waits until `SkierLiftRides` matches the model (raw rides go out a bounded slice per
/// actor per flush, so they may trail the aggregates), up to `within`; the mismatches of the
/// last look otherwise.
pub fn settle(endpoint: &str, table_prefix: &str, acked: &[Ride], within: Duration) -> Vec<String> {
    settle_with(endpoint, table_prefix, acked, &|_| false, within)
}

/// [`settle`] with keyless rides that may be there too (see [`mismatches`]).
pub fn settle_with(
    endpoint: &str,
    table_prefix: &str,
    acked: &[Ride],
    keyless: &dyn Fn(&RideEvent) -> bool,
    within: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let bad = mismatches(&dynamodb_rows(endpoint, table_prefix), acked, keyless);
        // Only missing rows can still arrive; a wrong or unexpected row never leaves.
        let only_missing = bad.iter().all(|m| m.contains("is not in SkierLiftRides"));
        if bad.is_empty() || !only_missing || Instant::now() >= deadline {
            return bad;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
