//! The live view's questions (ours, outside SkiDataAPI 2.0; issue 14): a resort-day's
//! leaders, its lift activity, and the summary of both that the stream ([`super::stream`])
//! and the dashboard ([`super::dashboard`]) show.
//!
//! All of them are computed from the day's skier-days — each skier's vertical, ride ids and
//! ride stamps (time and lift) — the same state every SkiDataAPI count comes from: the
//! owning actor when the day is resident, else the tables' skier-days of the day, and in
//! cluster mode the shard's owner. So they are exact under retries, replays and crashes as
//! those counts are, and need no state or write of their own.

use actix_web::{web, HttpRequest};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::api::{day_key, day_route, stamped, Reply, State};
use super::{cached_json, AppState};
use crate::actors::aggregator::DayState;
use crate::cluster::Route;
use crate::domain::{DayKey, Stamp};
use crate::error::ApiError;
use crate::tables::SkierDayItem;

/// The most leaders one `GET .../leaders` returns, and how many without `limit`.
pub const MAX_LEADERS: usize = 100;
pub const DEFAULT_LEADERS: usize = 10;

/// Lift activity's bucket, minutes of the `time` field: the default and the bounds. 15 is
/// a lodge screen's natural grain; 1 lets an operator see a lift stop.
pub const DEFAULT_BUCKET_MINUTES: u16 = 15;
pub const MAX_BUCKET_MINUTES: u16 = 60;

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug, Clone)]
pub struct Leader {
    #[serde(rename = "skierID")]
    pub skier: u32,
    pub vertical: u64,
    pub rides: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DayLeaders {
    #[serde(rename = "numSkiers")]
    pub num_skiers: u64,
    pub leaders: Vec<Leader>,
}

/// One lift's rides of the day, per bucket of `time`: `buckets[i]` counts the rides with
/// `time` in `[1 + i·b, (i+1)·b]`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LiftBuckets {
    #[serde(rename = "liftID")]
    pub lift: u16,
    pub rides: u64,
    pub buckets: Vec<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LiftActivity {
    #[serde(rename = "bucketMinutes")]
    pub bucket_minutes: u16,
    /// Rides of the day, placed or not.
    pub rides: u64,
    /// Rides stored before their time and lift were kept (items of an older liftlog): in
    /// `rides`, in no bucket.
    #[serde(rename = "unplacedRides")]
    pub unplaced: u64,
    /// Lifts with at least one ride, by lift id; every one has the same number of buckets,
    /// enough for the day's last ride (at least `maxTime` / `bucketMinutes`).
    pub lifts: Vec<LiftBuckets>,
}

/// What the stream sends and the dashboard shows: the day's counts, its leaders and its
/// lift activity, from one read of the day.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DaySummary {
    #[serde(rename = "resortID")]
    pub resort: u32,
    #[serde(rename = "seasonID")]
    pub season: u16,
    #[serde(rename = "dayID")]
    pub day: u16,
    #[serde(rename = "numSkiers")]
    pub num_skiers: u64,
    pub rides: u64,
    pub leaders: Vec<Leader>,
    pub activity: LiftActivity,
}

/// The day's `limit` skiers with the most vertical, most first (ties: the lower skier id
/// first, so every node and every read gives the same list), and how many skiers the day has.
/// One pass over the day's skiers, then a sort of `limit`.
pub fn leaders_of(skiers: impl Iterator<Item = (u32, u64, u64)>, limit: usize) -> DayLeaders {
    let mut all: Vec<Leader> = skiers.map(|(skier, vertical, rides)| Leader { skier, vertical, rides }).collect();
    let num_skiers = all.len() as u64;
    let order = |a: &Leader, b: &Leader| b.vertical.cmp(&a.vertical).then(a.skier.cmp(&b.skier));
    if all.len() > limit {
        all.select_nth_unstable_by(limit, order);
        all.truncate(limit);
    }
    all.sort_unstable_by(order);
    DayLeaders { num_skiers, leaders: all }
}

/// Rides per lift per `bucket` minutes, from every counted ride's stamp. One pass over the
/// day's rides; `max_time` sets the least number of buckets, so a morning's chart already
/// spans the whole day.
pub fn activity_of<'a>(stamps: impl Iterator<Item = &'a [Stamp]>, bucket: u16, max_time: u16) -> LiftActivity {
    let bucket = bucket.max(1);
    let mut per_lift: BTreeMap<u16, Vec<u64>> = BTreeMap::new();
    let (mut rides, mut unplaced) = (0u64, 0u64);
    let mut width = usize::from(max_time.div_ceil(bucket)).max(1);
    for stamp in stamps.flatten() {
        rides += 1;
        let Some((time, lift)) = stamp.time_lift() else {
            unplaced += 1;
            continue;
        };
        let at = usize::from(time.saturating_sub(1) / bucket);
        width = width.max(at + 1);
        let row = per_lift.entry(lift).or_default();
        if row.len() <= at {
            row.resize(at + 1, 0);
        }
        row[at] += 1;
    }
    let lifts = per_lift
        .into_iter()
        .map(|(lift, mut buckets)| {
            buckets.resize(width, 0);
            LiftBuckets { lift, rides: buckets.iter().sum(), buckets }
        })
        .collect();
    LiftActivity { bucket_minutes: bucket, rides, unplaced, lifts }
}

/// One day's skier-days, wherever they were read: what every question here is computed from.
pub enum Skiers<'a> {
    Resident(&'a DayState),
    Stored(&'a [SkierDayItem]),
}

impl Skiers<'_> {
    fn leaders(&self, limit: usize) -> DayLeaders {
        match self {
            Skiers::Resident(d) => leaders_of(d.skiers.iter().map(|(s, sd)| (*s, sd.vertical, sd.ids.len() as u64)), limit),
            Skiers::Stored(items) => leaders_of(items.iter().map(|i| (i.skier, i.vertical, i.ids.len() as u64)), limit),
        }
    }

    fn activity(&self, bucket: u16, max_time: u16) -> LiftActivity {
        match self {
            Skiers::Resident(d) => activity_of(d.skiers.values().map(|sd| sd.stamps.as_slice()), bucket, max_time),
            Skiers::Stored(items) => activity_of(items.iter().map(|i| i.stamps.as_slice()), bucket, max_time),
        }
    }

    fn summary(&self, key: DayKey, max_time: u16) -> DaySummary {
        let DayLeaders { num_skiers, leaders } = self.leaders(DEFAULT_LEADERS);
        let activity = self.activity(DEFAULT_BUCKET_MINUTES, max_time);
        DaySummary { resort: key.resort, season: key.season, day: key.day, num_skiers, rides: activity.rides, leaders, activity }
    }
}

/// Computes `f` over the day's skier-days on this route: the resident actor (under its read
/// lock, so the figures are of one moment), else the tables' skier-days of the day.
pub async fn with_skiers<R>(state: &AppState, key: DayKey, route: Option<&Route>, f: impl FnOnce(Skiers<'_>) -> R) -> Result<R, ApiError> {
    match state.resident_for(&key, route) {
        Some(h) => Ok(h.read(|d| f(Skiers::Resident(d)))),
        None => {
            let items = state.tables.query_day(key).await?;
            Ok(f(Skiers::Stored(&items)))
        }
    }
}

/// The day's summary on this route (see [`with_skiers`]), and whether an actor answered
/// (the stream reads the tables less often).
pub async fn summary(state: &AppState, key: DayKey, route: Option<&Route>) -> Result<(DaySummary, bool), ApiError> {
    let max_time = state.limits.max_time;
    with_skiers(state, key, route, |s| (s.summary(key, max_time), matches!(s, Skiers::Resident(_)))).await
}

/// A whole-number query parameter within `bounds`, or a 400 that says so.
fn bounded_param<T: std::str::FromStr + PartialOrd + Copy + std::fmt::Display>(
    req: &HttpRequest,
    name: &str,
    default: T,
    bounds: (T, T),
    unit: &str,
) -> Result<T, ApiError> {
    let mut value = default;
    for (k, v) in form_urlencoded::parse(req.query_string().as_bytes()) {
        if k == name {
            value =
                v.parse::<T>().ok().filter(|n| *n >= bounds.0 && *n <= bounds.1).ok_or_else(|| {
                    ApiError::BadRequest(format!("{name} must be a whole number{unit} from {} to {}", bounds.0, bounds.1))
                })?;
        }
    }
    Ok(value)
}

/// Runs a day-scoped read of ours: validate, route (cluster mode: the owner answers, or
/// this node from its actor or the tables), compute from the day's skier-days.
async fn day_read<T: Serialize>(req: &HttpRequest, state: &State, key: DayKey, compute: impl FnOnce(Skiers<'_>) -> T) -> Reply {
    let route = match day_route(req, state, &key).await? {
        Some(Route::Owner(answer)) => return Ok(answer),
        route => route,
    };
    let answer = async { cached_json(req, &with_skiers(state, key, route.as_ref(), compute).await?) }.await;
    stamped(route, answer)
}

/// `GET /resorts/{resortID}/seasons/{seasonID}/day/{dayID}/leaders[?limit=N]`: the day's
/// top skiers by vertical. A day without rides has no leaders.
pub async fn resort_day_leaders(req: HttpRequest, state: State, path: web::Path<(String, String, String)>) -> Reply {
    let (resort, season, day) = path.into_inner();
    let key = day_key(&state, &resort, &season, &day)?;
    let limit = bounded_param(&req, "limit", DEFAULT_LEADERS, (1, MAX_LEADERS), "")?;
    day_read(&req, &state, key, |s| s.leaders(limit)).await
}

/// `GET /resorts/{resortID}/seasons/{seasonID}/day/{dayID}/lifts[?bucket=M]`: rides per
/// lift per `M` minutes of the ride's `time` (default 15).
pub async fn resort_day_lifts(req: HttpRequest, state: State, path: web::Path<(String, String, String)>) -> Reply {
    let (resort, season, day) = path.into_inner();
    let key = day_key(&state, &resort, &season, &day)?;
    let bucket = bounded_param(&req, "bucket", DEFAULT_BUCKET_MINUTES, (1, MAX_BUCKET_MINUTES), " of minutes")?;
    let max_time = state.limits.max_time;
    day_read(&req, &state, key, |s| s.activity(bucket, max_time)).await
}

/// `GET /resorts/{resortID}/seasons/{seasonID}/day/{dayID}/summary`: what one stream event
/// carries, for a client that polls (and the feed of a node that does not own the day).
pub async fn resort_day_summary(req: HttpRequest, state: State, path: web::Path<(String, String, String)>) -> Reply {
    let (resort, season, day) = path.into_inner();
    let key = day_key(&state, &resort, &season, &day)?;
    let max_time = state.limits.max_time;
    day_read(&req, &state, key, |s| s.summary(key, max_time)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaders_are_the_most_vertical_first_ties_by_skier_id() {
        let day = [(5, 100, 2), (3, 300, 3), (9, 100, 1), (1, 50, 1), (7, 300, 4)];
        let top = leaders_of(day.into_iter(), 3);
        assert_eq!(top.num_skiers, 5);
        let got: Vec<(u32, u64, u64)> = top.leaders.iter().map(|l| (l.skier, l.vertical, l.rides)).collect();
        assert_eq!(got, [(3, 300, 3), (7, 300, 4), (5, 100, 2)]);
        // A limit above the day's skiers gives them all, in the same order.
        let all: Vec<u32> = leaders_of(day.into_iter(), 100).leaders.iter().map(|l| l.skier).collect();
        assert_eq!(all, [3, 7, 5, 9, 1]);
        assert!(leaders_of(std::iter::empty(), 10).leaders.is_empty());
    }

    #[test]
    fn activity_counts_each_ride_in_its_lifts_bucket() {
        let st = Stamp::new;
        let skier_a = [st(1, 3), st(15, 3), st(16, 3), st(360, 5)];
        let skier_b = [st(16, 5), Stamp::UNKNOWN];
        let a = activity_of([&skier_a[..], &skier_b[..]].into_iter(), 15, 360);
        assert_eq!((a.rides, a.unplaced, a.bucket_minutes), (6, 1, 15));
        let lifts: Vec<(u16, u64)> = a.lifts.iter().map(|l| (l.lift, l.rides)).collect();
        assert_eq!(lifts, [(3, 3), (5, 2)]);
        assert!(a.lifts.iter().all(|l| l.buckets.len() == 24), "360 minutes in 15-minute buckets");
        assert_eq!(&a.lifts[0].buckets[..2], &[2, 1], "times 1 and 15 share the first bucket, 16 starts the second");
        assert_eq!((a.lifts[1].buckets[1], a.lifts[1].buckets[23]), (1, 1));
        // A ride past max_time (a limit lowered after it was counted) widens every row.
        let late = [st(400, 3)];
        let a = activity_of([&late[..], &skier_b[..1]].into_iter(), 60, 360);
        assert!(a.lifts.iter().all(|l| l.buckets.len() == 7));
        assert_eq!(a.lifts[0].buckets[6], 1);
        assert_eq!(activity_of(std::iter::empty(), 15, 360).lifts, vec![]);
    }
}
