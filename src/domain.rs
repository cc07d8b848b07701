//! The ride domain: what a lift-ride event is, the keys that partition the data, the
//! validation rules of SkiDataAPI 2.0, and how an event id is derived.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::catalog::Catalog;
use crate::error::ApiError;

/// The aggregate key: one resort's day within a season. It is also the partition key on
/// the bus, so that exactly one consumer (and one actor) owns each aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DayKey {
    pub resort: u32,
    pub season: u16,
    pub day: u16,
}

impl DayKey {
    /// The shard (partition queue) that owns this resort-day: xxh3-64 of the key's 8 bytes
    /// (resort u32, season u16, day u16, little-endian) modulo `shards` (0 counts as 1).
    /// Stable across processes, versions and platforms: it decides which queue, and so
    /// which consumer node, owns a resort-day, so it is part of the deployment's data layout.
    pub fn partition(&self, shards: u16) -> u16 {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&self.resort.to_le_bytes());
        bytes[4..6].copy_from_slice(&self.season.to_le_bytes());
        bytes[6..].copy_from_slice(&self.day.to_le_bytes());
        (xxhash_rust::xxh3::xxh3_64(&bytes) % shards.max(1) as u64) as u16
    }
}

impl fmt::Display for DayKey {
    /// `ResortID#SeasonID#DayID`, the `LiftRideCounts` partition key of DESIGN.md.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}#{}", self.resort, self.season, self.day)
    }
}

/// One accepted lift ride. This is what the bus carries and what one WAL record holds a
/// batch of, so it is kept small and fixed-size (24 bytes of fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RideEvent {
    /// Unique per ride; equal for retries that carry the same `Idempotency-Key` (see
    /// [`event_id`]). Duplicates are dropped by the owning actor.
    pub id: u64,
    pub resort: u32,
    pub season: u16,
    pub day: u16,
    pub skier: u32,
    pub time: u16,
    pub lift: u16,
    /// Resolved from the catalog when the ride is accepted, so that replaying the log
    /// later gives the same verticals even if the catalog file changed meanwhile.
    pub vertical: u32,
}

impl RideEvent {
    pub fn key(&self) -> DayKey {
        DayKey { resort: self.resort, season: self.season, day: self.day }
    }
}

/// When and at which lift a counted ride happened, kept beside its id in the skier-day:
/// `time << 16 | lift`, 4 bytes a ride. Lift activity (rides per lift per time bucket) is
/// rebuilt from these, so it comes from the same items as every other count and is exact
/// under retries, replays and reloads as they are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Stamp(pub u32);

impl Stamp {
    /// A ride stored before stamps were kept: counted, but at no known time or lift.
    pub const UNKNOWN: Stamp = Stamp(u32::MAX);

    pub fn new(time: u16, lift: u16) -> Self {
        Stamp((u32::from(time) << 16) | u32::from(lift))
    }

    pub fn of(ride: &RideEvent) -> Self {
        Stamp::new(ride.time, ride.lift)
    }

    /// `(time, lift)`, `None` for [`Stamp::UNKNOWN`].
    pub fn time_lift(self) -> Option<(u16, u16)> {
        (self != Stamp::UNKNOWN).then_some(((self.0 >> 16) as u16, self.0 as u16))
    }
}

/// Most rides one skier-day may hold; a ride past it is refused (409) and changes nothing.
///
/// Why a bound at all: every counted ride keeps its 8-byte id in the skier-day (ADR 003), so
/// without one a single client sending keyless POSTs for one skier-day grows that item until
/// DynamoDB refuses it (400 KB, ~50,000 ids) and makes the day's dedup ever slower. Why 2,000:
/// a lift ride takes minutes and a ski day is at most 360 minutes (`max_time`), so a real
/// skier-day holds well under 100 rides; 2,000 is a ride every 11 seconds all day, which no
/// lift allows, while 2,000 ids (16 KB) keep the item at 4% of DynamoDB's item limit.
/// Not configurable yet: it protects the table format, so raising it needs thought, not a flag.
pub const MAX_RIDES_PER_SKIER_DAY: usize = 2_000;

/// Why a ride past [`MAX_RIDES_PER_SKIER_DAY`] was refused, for the client (409).
pub fn full_day_message(ride: &RideEvent) -> String {
    format!(
        "This skier-day is full: skier {} already has {MAX_RIDES_PER_SKIER_DAY} rides on day {} of season {} at resort {}, the most one skier-day may hold; this ride was not recorded",
        ride.skier, ride.day, ride.season, ride.resort
    )
}

/// Numeric ranges that API.md gives as defaults; configurable per deployment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Highest dayID (1-based). 366 covers leap years.
    pub max_day: u16,
    /// Highest ride time, in minutes since the lifts opened.
    pub max_time: u16,
    /// Highest skierID; 2^31-1 so that Java clients' `int` ids always fit.
    pub max_skier: u32,
    /// Lowest and highest accepted season year. Seasons are 4-digit years.
    pub min_season: u16,
    pub max_season: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_day: 366, max_time: 360, max_skier: i32::MAX as u32, min_season: 1000, max_season: 9999 }
    }
}

/// The body of `POST /skiers/...`: `{"time":217,"liftID":21}`. Unknown extra fields are
/// ignored on purpose: SkiDataAPI 1.x clients still send `waitTime`.
#[derive(Debug, Deserialize)]
pub struct RideBody {
    pub time: i64,
    #[serde(rename = "liftID")]
    pub lift_id: i64,
}

/// The body of `POST /resorts/{id}/seasons`: `{"year":"2025"}`.
#[derive(Debug, Deserialize)]
pub struct SeasonBody {
    pub year: String,
}

/// Parses a path or query id: ASCII digits only (no sign, no spaces: `str::parse` alone
/// would take `+7`), within `1..=max`. The message names the parameter so a client can
/// act on it.
pub fn parse_id(name: &str, raw: &str, max: u64) -> Result<u64, ApiError> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!("{name} must be a positive integer, got {:?}", truncate(raw))));
    }
    match raw.parse::<u64>() {
        Ok(value) if (1..=max).contains(&value) => Ok(value),
        // Only digits, so the parse failed on overflow: out of range like any too-large id.
        _ => Err(ApiError::BadRequest(format!("{name} must be between 1 and {max}, got {}", truncate(raw)))),
    }
}

/// Parses a season: exactly four ASCII digits within the configured years.
pub fn parse_season(name: &str, raw: &str, limits: &Limits) -> Result<u16, ApiError> {
    if raw.len() != 4 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::BadRequest(format!("{name} must be a 4-digit year, got {:?}", truncate(raw))));
    }
    let year: u16 = raw.parse().map_err(|_| ApiError::BadRequest(format!("{name} must be a 4-digit year")))?;
    if year < limits.min_season || year > limits.max_season {
        return Err(ApiError::BadRequest(format!("{name} must be between {} and {}, got {year}", limits.min_season, limits.max_season)));
    }
    Ok(year)
}

/// Parses and checks the resort id against the catalog: malformed → 400, unknown → 404.
pub fn parse_resort(raw: &str, catalog: &Catalog) -> Result<u32, ApiError> {
    let id = parse_id("resortID", raw, u32::MAX as u64)? as u32;
    if catalog.resort(id).is_none() {
        return Err(ApiError::ResortNotFound);
    }
    Ok(id)
}

/// Everything a ride POST carries, validated against the limits and the catalog.
pub struct RidePath<'a> {
    pub resort: &'a str,
    pub season: &'a str,
    pub day: &'a str,
    pub skier: &'a str,
}

/// Validates one ride and turns it into an event. `idempotency_key` is the client's header
/// if it sent one.
pub fn validate_ride(
    path: &RidePath<'_>,
    body: &RideBody,
    idempotency_key: Option<&[u8]>,
    catalog: &Catalog,
    limits: &Limits,
) -> Result<RideEvent, ApiError> {
    let resort_id = parse_resort(path.resort, catalog)?;
    let season = parse_season("seasonID", path.season, limits)?;
    let day = parse_id("dayID", path.day, limits.max_day as u64)? as u16;
    let skier = parse_id("skierID", path.skier, limits.max_skier as u64)? as u32;
    let resort = catalog.resort(resort_id).ok_or(ApiError::ResortNotFound)?;
    if body.time < 1 || body.time > limits.max_time as i64 {
        return Err(ApiError::BadRequest(format!("time must be between 1 and {}, got {}", limits.max_time, body.time)));
    }
    let lifts = resort.lifts.len() as i64;
    if body.lift_id < 1 || body.lift_id > lifts {
        return Err(ApiError::BadRequest(format!("liftID must be between 1 and {lifts} for resort {resort_id}, got {}", body.lift_id)));
    }
    let lift = body.lift_id as u16;
    let mut event = RideEvent {
        id: 0,
        resort: resort_id,
        season,
        day,
        skier,
        time: body.time as u16,
        lift,
        vertical: resort.lifts[(lift - 1) as usize],
    };
    event.id = event_id(&event, idempotency_key);
    Ok(event)
}

/// The event id. With an `Idempotency-Key`, it is a hash of the key *and* the ride, so a
/// retry of the same request is recognised as a duplicate while a client that reuses a key
/// for a different ride does not lose that ride. Without a key every POST is a new ride.
/// Duplicates are detected per skier-day, where a 64-bit id collides with probability
/// ~n²/2^65 for n rides of one skier in one day: nil in practice.
pub fn event_id(event: &RideEvent, idempotency_key: Option<&[u8]>) -> u64 {
    match idempotency_key {
        Some(key) => {
            let mut buf = Vec::with_capacity(key.len() + 24);
            buf.extend_from_slice(key);
            buf.extend_from_slice(&event.resort.to_le_bytes());
            buf.extend_from_slice(&event.season.to_le_bytes());
            buf.extend_from_slice(&event.day.to_le_bytes());
            buf.extend_from_slice(&event.skier.to_le_bytes());
            buf.extend_from_slice(&event.time.to_le_bytes());
            buf.extend_from_slice(&event.lift.to_le_bytes());
            xxhash_rust::xxh3::xxh3_64(&buf)
        }
        None => rand::random::<u64>(),
    }
}

fn truncate(raw: &str) -> String {
    raw.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        let key = DayKey { resort: 7, season: 2025, day: 42 };
        let p = key.partition(4);
        assert!(p < 4);
        assert_eq!(p, key.partition(4));
        assert_eq!(key.partition(0), 0);
        assert_eq!(key.partition(1), 0);
        // Pinned: the routing function is part of the deployment's data layout.
        let bytes = [7u8, 0, 0, 0, 0xe9, 0x07, 42, 0];
        assert_eq!(p as u64, xxhash_rust::xxh3::xxh3_64(&bytes) % 4);
        let mut seen = [0usize; 4];
        for day in 1..=366 {
            seen[DayKey { resort: 1, season: 2025, day }.partition(4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    fn ride(resort: &'static str, season: &'static str, day: &'static str, skier: &'static str) -> RidePath<'static> {
        RidePath { resort, season, day, skier }
    }

    #[test]
    fn accepts_a_valid_ride_and_resolves_vertical() {
        let cat = Catalog::default();
        let ev =
            validate_ride(&ride("1", "2025", "1", "7"), &RideBody { time: 10, lift_id: 5 }, None, &cat, &Limits::default()).expect("valid");
        assert_eq!((ev.resort, ev.season, ev.day, ev.skier, ev.lift, ev.vertical), (1, 2025, 1, 7, 5, 50));
    }

    #[test]
    fn rejects_each_bad_field_with_its_name() {
        let cat = Catalog::default();
        let lim = Limits::default();
        let ok = RideBody { time: 10, lift_id: 5 };
        let cases: Vec<(RidePath<'static>, RideBody, &str)> = vec![
            (ride("x", "2025", "1", "7"), RideBody { ..ok }, "resortID"),
            (ride("1", "25", "1", "7"), RideBody { ..ok }, "seasonID"),
            (ride("1", "2025", "0", "7"), RideBody { ..ok }, "dayID"),
            (ride("1", "2025", "367", "7"), RideBody { ..ok }, "dayID"),
            (ride("1", "2025", "1", "2147483648"), RideBody { ..ok }, "skierID"),
            (ride("1", "2025", "1", "-3"), RideBody { ..ok }, "skierID"),
            (ride("1", "2025", "1", "+7"), RideBody { ..ok }, "skierID"),
            (ride("1", "2025", "1", " 7"), RideBody { ..ok }, "skierID"),
            (ride("1", "2025", "1", ""), RideBody { ..ok }, "skierID"),
            (ride("+1", "2025", "1", "7"), RideBody { ..ok }, "resortID"),
            (ride("1", "2025", "+1", "7"), RideBody { ..ok }, "dayID"),
            (ride("1", "2025", "1", "99999999999999999999999"), RideBody { ..ok }, "skierID"),
            (ride("1", "2025", "1", "7"), RideBody { time: 0, lift_id: 5 }, "time"),
            (ride("1", "2025", "1", "7"), RideBody { time: 361, lift_id: 5 }, "time"),
            (ride("1", "2025", "1", "7"), RideBody { time: 10, lift_id: 41 }, "liftID"),
        ];
        for (path, body, field) in cases {
            match validate_ride(&path, &body, None, &cat, &lim) {
                Err(ApiError::BadRequest(msg)) => assert!(msg.contains(field), "{msg} should name {field}"),
                other => panic!("expected 400 naming {field}, got {other:?}"),
            }
        }
        assert!(matches!(validate_ride(&ride("11", "2025", "1", "7"), &ok, None, &cat, &lim), Err(ApiError::ResortNotFound)));
    }

    #[test]
    fn idempotency_key_gives_stable_ids_per_ride() {
        let cat = Catalog::default();
        let lim = Limits::default();
        let b = RideBody { time: 10, lift_id: 5 };
        let p = ride("1", "2025", "1", "7");
        let a1 = validate_ride(&p, &b, Some(b"k1"), &cat, &lim).unwrap().id;
        let a2 = validate_ride(&p, &b, Some(b"k1"), &cat, &lim).unwrap().id;
        let other = validate_ride(&p, &RideBody { time: 11, lift_id: 5 }, Some(b"k1"), &cat, &lim).unwrap().id;
        assert_eq!(a1, a2);
        assert_ne!(a1, other);
        let r1 = validate_ride(&p, &b, None, &cat, &lim).unwrap().id;
        let r2 = validate_ride(&p, &b, None, &cat, &lim).unwrap().id;
        assert_ne!(r1, r2);
    }
}
