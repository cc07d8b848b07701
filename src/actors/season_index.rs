//! Skier-season totals, sharded by skier so concurrent updates and reads rarely meet.
//!
//! Kept complete on a consuming node: loaded from the tables at start, then updated by
//! the aggregators for every ride they count (never for a duplicate), so
//! `GET /skiers/{id}/vertical` is one map lookup. Shards are plain locked maps rather
//! than actors: an update is a few nanoseconds of work, less than a mailbox hop.

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::collections::BTreeMap;

/// One skier's total vertical at one resort in one season.
#[derive(Clone, Copy, Debug)]
struct SeasonTotal {
    resort: u32,
    season: u16,
    vertical: u64,
}

/// One shard: skier → that skier's totals (usually one or two entries).
type Shard = Mutex<FxHashMap<u32, Vec<SeasonTotal>>>;

pub struct SeasonIndex {
    /// A power of two, so the shard is the low bits of the skier id.
    shards: Box<[Shard]>,
}

impl SeasonIndex {
    /// 64 shards: far more than cores, so two writers rarely share one.
    pub fn new() -> Self {
        SeasonIndex { shards: (0..64).map(|_| Mutex::new(FxHashMap::default())).collect() }
    }

    fn shard(&self, skier: u32) -> &Shard {
        &self.shards[(skier as usize) & (self.shards.len() - 1)]
    }

    pub fn add(&self, skier: u32, resort: u32, season: u16, vertical: u64) {
        let mut shard = self.shard(skier).lock();
        let totals = shard.entry(skier).or_default();
        match totals.iter_mut().find(|t| t.resort == resort && t.season == season) {
            Some(t) => t.vertical += vertical,
            None => totals.push(SeasonTotal { resort, season, vertical }),
        }
    }

    /// Total vertical per season over the given resorts, optionally one season only.
    /// Empty when the skier has no rides in that scope.
    pub fn totals(&self, skier: u32, resorts: &[u32], season: Option<u16>) -> BTreeMap<u16, u64> {
        let shard = self.shard(skier).lock();
        let mut out = BTreeMap::new();
        if let Some(totals) = shard.get(&skier) {
            for t in totals.iter().filter(|t| resorts.contains(&t.resort) && season.is_none_or(|s| s == t.season)) {
                *out.entry(t.season).or_insert(0) += t.vertical;
            }
        }
        out
    }

    /// Number of skiers held; for the admin view.
    pub fn skiers(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

impl Default for SeasonIndex {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_per_season_over_the_asked_resorts() {
        let idx = SeasonIndex::new();
        idx.add(7, 1, 2025, 50);
        idx.add(7, 1, 2025, 30);
        idx.add(7, 2, 2025, 100);
        idx.add(7, 1, 2024, 5);
        idx.add(71, 1, 2025, 999); // same shard (71 & 63 == 7), other skier
        assert_eq!(idx.totals(7, &[1], None), BTreeMap::from([(2024, 5), (2025, 80)]));
        assert_eq!(idx.totals(7, &[1, 2], Some(2025)), BTreeMap::from([(2025, 180)]));
        assert!(idx.totals(7, &[3], None).is_empty());
        assert!(idx.totals(8, &[1], None).is_empty());
    }
}
