//! `--reconcile`: after a post run, ask the service whether it counts what it acknowledged.
//! Every resort-day touched: numSkiers == distinct skiers acked for it. A sample of acked
//! skier-days: the skier's vertical that day == sum of liftID x vertical-per-lift over the acked
//! rides. Reads are eventually consistent, so a difference is read again until a deadline.
//! Rides that failed but may have been stored (transport error, 5xx) widen the accepted range.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::Range;
use crate::http::{Conn, Target};
use crate::load::{resort_day_path, skier_day_path, Ride};
use crate::rng::Rng;

#[derive(Debug, Clone)]
pub struct ReconcileOpts {
    pub vertical_per_lift: u64,
    pub sample: usize,
    pub wait: Duration,
    pub timeout: Duration,
    pub seed: u64,
    pub workers: usize,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReconcileReport {
    pub acked_rides: usize,
    pub uncertain_rides: usize,
    pub resort_days: usize,
    pub resort_days_ok: usize,
    pub skier_days_acked: usize,
    pub skier_days_checked: usize,
    pub skier_days_ok: usize,
    /// Checks that matched only once rides of unknown outcome are counted.
    pub explained: usize,
    /// Every mismatch, in check order.
    pub mismatches: Vec<String>,
}

impl ReconcileReport {
    pub fn clean(&self) -> bool {
        self.mismatches.is_empty()
    }
}

#[derive(Debug, Clone)]
enum Check {
    ResortDay { resort: u32, season: u32, day: u32, expect: u64, slack: u64 },
    SkierDay { resort: u32, season: u32, day: u32, skier: u32, rides: u32, expect: u64, slack: u64 },
}

enum Verdict {
    Ok,
    Explained,
    Mismatch(String),
}

type DayKey = (u32, u32, u32); // resort, season, day

pub async fn reconcile(target: Arc<Target>, acked: &[Ride], uncertain: &[Ride], o: &ReconcileOpts) -> ReconcileReport {
    let mut skiers: BTreeMap<DayKey, BTreeSet<u32>> = BTreeMap::new();
    let mut maybe_skiers: BTreeMap<DayKey, BTreeSet<u32>> = BTreeMap::new();
    let mut vert: BTreeMap<(DayKey, u32), (u64, u32)> = BTreeMap::new();
    let mut maybe_vert: BTreeMap<(DayKey, u32), u64> = BTreeMap::new();
    for r in acked {
        let k = (r.resort, r.season, r.day);
        skiers.entry(k).or_default().insert(r.skier);
        let v = vert.entry((k, r.skier)).or_default();
        v.0 += r.lift as u64 * o.vertical_per_lift;
        v.1 += 1;
    }
    for r in uncertain {
        let k = (r.resort, r.season, r.day);
        maybe_skiers.entry(k).or_default().insert(r.skier);
        *maybe_vert.entry((k, r.skier)).or_default() += r.lift as u64 * o.vertical_per_lift;
    }

    let mut checks = Vec::new();
    let days: BTreeSet<DayKey> = skiers.keys().chain(maybe_skiers.keys()).copied().collect();
    for k in &days {
        let sure = skiers.get(k).map(|s| s.len() as u64).unwrap_or(0);
        let slack = match (skiers.get(k), maybe_skiers.get(k)) {
            (Some(s), Some(m)) => m.difference(s).count() as u64,
            (None, Some(m)) => m.len() as u64,
            _ => 0,
        };
        checks.push(Check::ResortDay { resort: k.0, season: k.1, day: k.2, expect: sure, slack });
    }
    let n_days = checks.len();
    let mut keys: Vec<&(DayKey, u32)> = vert.keys().collect();
    let mut rng = Rng::new(o.seed ^ 0x5EED);
    let take = o.sample.min(keys.len());
    for i in 0..take {
        let j = i + rng.below((keys.len() - i) as u64) as usize;
        keys.swap(i, j);
    }
    keys.truncate(take);
    keys.sort();
    for key in keys {
        let ((resort, season, day), skier) = *key;
        let (expect, rides) = vert[key];
        let slack = maybe_vert.get(key).copied().unwrap_or(0);
        checks.push(Check::SkierDay { resort, season, day, skier, rides, expect, slack });
    }

    let checks = Arc::new(checks);
    let next = Arc::new(AtomicUsize::new(0));
    let verdicts: Arc<Mutex<Vec<Option<Verdict>>>> = Arc::new(Mutex::new((0..checks.len()).map(|_| None).collect()));
    let deadline = Instant::now() + o.wait;
    let mut handles = Vec::new();
    for _ in 0..o.workers.max(1).min(checks.len().max(1)) {
        let (target, checks, next, verdicts, timeout) = (target.clone(), checks.clone(), next.clone(), verdicts.clone(), o.timeout);
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(target);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = checks.get(i) else { break };
                let v = run_check(&mut conn, c, deadline, timeout).await;
                verdicts.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(v);
            }
        }));
    }
    for h in handles {
        let _ = h.await;
    }
    let verdicts = std::mem::take(&mut *verdicts.lock().unwrap_or_else(|e| e.into_inner()));
    let mut rep = ReconcileReport {
        acked_rides: acked.len(),
        uncertain_rides: uncertain.len(),
        resort_days: n_days,
        skier_days_acked: vert.len(),
        skier_days_checked: checks.len() - n_days,
        ..Default::default()
    };
    for (i, v) in verdicts.into_iter().enumerate() {
        let ok = match v {
            Some(Verdict::Ok) => true,
            Some(Verdict::Explained) => {
                rep.explained += 1;
                true
            }
            Some(Verdict::Mismatch(m)) => {
                rep.mismatches.push(m);
                false
            }
            None => {
                rep.mismatches.push(format!("check {i} did not run"));
                false
            }
        };
        if ok {
            if i < n_days {
                rep.resort_days_ok += 1;
            } else {
                rep.skier_days_ok += 1;
            }
        }
    }
    rep
}

/// Read what the service says for a check: Ok(Some(n)), Ok(None) on 404 (nothing there), or
/// an error text.
async fn read_value(conn: &mut Conn, c: &Check, timeout: Duration) -> Result<u64, String> {
    let mut path = Vec::with_capacity(96);
    match *c {
        Check::ResortDay { resort, season, day, .. } => resort_day_path(&mut path, resort, season, day),
        Check::SkierDay { resort, season, day, skier, .. } => skier_day_path(&mut path, resort, season, day, skier),
    }
    let rep = conn.request("GET", &path, None, None, timeout).await.map_err(|e| format!("no answer ({e})"))?;
    let body = String::from_utf8_lossy(&conn.body).into_owned();
    match (rep.status, c) {
        (404, _) => Ok(0),
        (200, Check::ResortDay { .. }) => serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("numSkiers").and_then(|n| n.as_u64()))
            .ok_or_else(|| format!("200 without a numSkiers number: {body}")),
        (200, Check::SkierDay { .. }) => body.trim().parse::<u64>().map_err(|_| format!("200 without a bare integer: {body}")),
        (s, _) => Err(format!("status {s}: {}", body.chars().take(200).collect::<String>())),
    }
}

async fn run_check(conn: &mut Conn, c: &Check, deadline: Instant, timeout: Duration) -> Verdict {
    let (expect, slack) = match *c {
        Check::ResortDay { expect, slack, .. } | Check::SkierDay { expect, slack, .. } => (expect, slack),
    };
    let mut pause = Duration::from_millis(50);
    loop {
        let got = read_value(conn, c, timeout).await;
        match got {
            Ok(v) if v == expect => return Verdict::Ok,
            Ok(v) if slack > 0 && v > expect && v <= expect + slack => return Verdict::Explained,
            _ if Instant::now() < deadline => {
                tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            other => {
                let got = match other {
                    Ok(v) => v.to_string(),
                    Err(e) => e,
                };
                let range =
                    if slack > 0 { format!(" (up to {} with the rides of unknown outcome)", expect + slack) } else { String::new() };
                return Verdict::Mismatch(match *c {
                    Check::ResortDay { resort, season, day, .. } => format!(
                        "resort {resort} season {season} day {day}: numSkiers {got}, expected {expect}{range} distinct skiers acknowledged"
                    ),
                    Check::SkierDay { resort, season, day, skier, rides, .. } => format!(
                        "skier {skier} at resort {resort} season {season} day {day}: vertical {got}, expected {expect}{range} from {rides} acknowledged ride(s)"
                    ),
                });
            }
        }
    }
}

/// The first season at or after `from` that no resort in `resorts` lists yet.
pub async fn pick_unused_season(target: Arc<Target>, resorts: Range, from: u32, timeout: Duration) -> Result<u32, String> {
    let mut conn = Conn::new(target);
    let mut used = BTreeSet::new();
    for r in resorts.lo..=resorts.hi {
        let mut path = b"/resorts/".to_vec();
        crate::http::push_u64(&mut path, r as u64);
        path.extend_from_slice(b"/seasons");
        let rep = conn.request("GET", &path, None, None, timeout).await.map_err(|e| format!("GET /resorts/{r}/seasons: {e}"))?;
        if rep.status != 200 {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&conn.body).map_err(|e| format!("GET /resorts/{r}/seasons: {e}"))?;
        for s in v.get("seasons").and_then(|s| s.as_array()).into_iter().flatten() {
            let year = s.as_str().and_then(|y| y.parse::<u32>().ok()).or_else(|| s.as_u64().map(|y| y as u32));
            if let Some(y) = year {
                used.insert(y);
            }
        }
    }
    (from..=9999).find(|y| !used.contains(y)).ok_or_else(|| format!("no unused season between {from} and 9999"))
}
