//! Skier-season totals: a bounded cache of exact answers, sharded by skier so concurrent
//! updates and reads rarely meet (issue 13, item 4).
//!
//! It used to hold every skier, loaded by a full scan of the skier-day table at every
//! start: memory grew with each distinct skier a client invented, and an out-of-memory
//! came back at every restart. Now an entry is one (skier, resort) pair's per-season
//! totals, at most `capacity` of them, least recently used out first, and none at start:
//!
//! - a miss is computed exactly by the caller (`http::api`): the resident days of the
//!   resort from memory (they hold everything applied), every other day from the tables'
//!   by-skier query (a day that is not resident is entirely in the tables: only flushed
//!   days are passivated);
//! - an entry is then kept exact by the aggregators, which [`SeasonIndex::add`] every ride
//!   they count (never a duplicate), under their day's write lock. Adds for pairs that are
//!   not held are dropped: their next read computes them again.
//!
//! The one race is an add while a miss is being computed: the computation may or may not
//! include it. So a miss first registers the pair as loading ([`SeasonIndex::begin`]); an
//! add for a loading pair marks it, and a marked computation is answered but not kept
//! ([`SeasonIndex::finish`]). An unmarked one saw no counted ride of the pair during its
//! window, so it is exact from then on. Days moving between memory and the tables meanwhile
//! (activation, flush, passivation) change no total, and the caller reads the resident
//! days before the tables, so such a move is never missed (see `http::api::exact_totals`).
//!
//! Only the embedded node reads it: with a broker other consumers may count a skier's
//! rides, so there it holds nothing (capacity 0) and totals come from the tables.

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shards: far more than cores, so two writers rarely share one; a power of two, so the
/// shard is the low bits of the skier id.
const SHARDS: usize = 64;

/// Entries kept by [`SeasonIndex::new`] (the `actors.season_index_entries` default).
pub const DEFAULT_ENTRIES: usize = 262_144;

enum Entry {
    /// A miss is being computed; `changed` once a counted ride of the pair arrived meanwhile.
    Loading { changed: bool },
    /// Exact per-season totals (season, vertical), kept current by `add`.
    Ready { totals: Vec<(u16, u64)>, used: u64 },
}

type Shard = Mutex<FxHashMap<(u32, u32), Entry>>;

/// Proof that [`SeasonIndex::begin`] registered a pair, to hand to `finish`. Dropped
/// unfinished (the computation failed, or the request was dropped mid-way when its client
/// went away) it removes the registration: a loading entry is never evicted, so a leaked
/// one would hold a slot for good.
#[must_use]
pub struct Loading<'a> {
    index: &'a SeasonIndex,
    skier: u32,
    resort: u32,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let key = (self.skier, self.resort);
        let mut shard = self.index.shard(self.skier).lock();
        if matches!(shard.get(&key), Some(Entry::Loading { .. })) {
            shard.remove(&key);
        }
    }
}

pub struct SeasonIndex {
    shards: Box<[Shard]>,
    /// Entries per shard (0: the index keeps nothing).
    per_shard: usize,
    clock: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

/// Figures for the admin view.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SeasonIndexStats {
    pub entries: usize,
    pub capacity: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl SeasonIndex {
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_ENTRIES)
    }

    /// Keeps at most about `entries` pairs (rounded up to a multiple of the shard count).
    pub fn with_capacity(entries: usize) -> Self {
        SeasonIndex {
            shards: (0..SHARDS).map(|_| Mutex::new(FxHashMap::default())).collect(),
            per_shard: entries.div_ceil(SHARDS),
            clock: AtomicU64::new(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    fn shard(&self, skier: u32) -> &Shard {
        &self.shards[(skier as usize) & (SHARDS - 1)]
    }

    /// A counted ride. Called by the aggregator under its day's write lock, so that a
    /// reader who registered the pair before it sees either the ride in the day or a mark.
    pub fn add(&self, skier: u32, resort: u32, season: u16, vertical: u64) {
        let mut shard = self.shard(skier).lock();
        match shard.get_mut(&(skier, resort)) {
            Some(Entry::Ready { totals, .. }) => match totals.iter_mut().find(|(s, _)| *s == season) {
                Some((_, v)) => *v += vertical,
                None => totals.push((season, vertical)),
            },
            Some(Entry::Loading { changed }) => *changed = true,
            None => {}
        }
    }

    /// The pair's exact per-season totals, if held.
    pub fn cached(&self, skier: u32, resort: u32) -> Option<Vec<(u16, u64)>> {
        let mut shard = self.shard(skier).lock();
        match shard.get_mut(&(skier, resort)) {
            Some(Entry::Ready { totals, used }) => {
                *used = self.clock.fetch_add(1, Ordering::Relaxed);
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(totals.clone())
            }
            _ => None,
        }
    }

    /// Registers a miss about to be computed. `None` when the result is not to be kept
    /// (capacity 0, or another reader is computing the pair already).
    pub fn begin(&self, skier: u32, resort: u32) -> Option<Loading<'_>> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        if self.per_shard == 0 {
            return None;
        }
        let mut shard = self.shard(skier).lock();
        if shard.contains_key(&(skier, resort)) {
            return None;
        }
        shard.insert((skier, resort), Entry::Loading { changed: false });
        Some(Loading { index: self, skier, resort })
    }

    /// Keeps a computed miss unless a counted ride came in meanwhile; evicts the least
    /// recently used entry of the shard past its share of the capacity.
    pub fn finish(&self, loading: Loading<'_>, totals: &[(u16, u64)]) {
        let key = (loading.skier, loading.resort);
        // Settled here, under the shard lock its drop would take again.
        std::mem::forget(loading);
        let mut shard = self.shard(key.0).lock();
        if !matches!(shard.get(&key), Some(Entry::Loading { changed: false })) {
            shard.remove(&key);
            return;
        }
        let used = self.clock.fetch_add(1, Ordering::Relaxed);
        shard.insert(key, Entry::Ready { totals: totals.to_vec(), used });
        while shard.len() > self.per_shard {
            // A scan of one shard (capacity / 64 entries), only when a miss is kept.
            let oldest = shard.iter().filter_map(|(k, e)| match e {
                Entry::Ready { used, .. } => Some((*used, *k)),
                Entry::Loading { .. } => None,
            });
            let Some((_, victim)) = oldest.min() else { break };
            shard.remove(&victim);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Number of pairs held; for the admin view.
    pub fn skiers(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn stats(&self) -> SeasonIndexStats {
        SeasonIndexStats {
            entries: self.skiers(),
            capacity: self.per_shard * SHARDS,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Test helper: holds a pair as exact with no rides (true for a skier nobody saw yet),
    /// so that later adds are kept.
    #[cfg(test)]
    pub fn prime(&self, skier: u32, resort: u32) {
        if let Some(l) = self.begin(skier, resort) {
            self.finish(l, &[]);
        }
    }

    /// Test helper: the per-season totals over `resorts` of the pairs held.
    #[cfg(test)]
    pub fn totals(&self, skier: u32, resorts: &[u32], season: Option<u16>) -> std::collections::BTreeMap<u16, u64> {
        let mut out = std::collections::BTreeMap::new();
        for r in resorts {
            for (s, v) in self.cached(skier, *r).unwrap_or_default() {
                if season.is_none_or(|x| x == s) {
                    *out.entry(s).or_insert(0) += v;
                }
            }
        }
        out
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
    use std::collections::BTreeMap;

    #[test]
    fn sums_per_season_over_the_asked_resorts_for_the_pairs_it_holds() {
        let idx = SeasonIndex::new();
        for (skier, resort) in [(7, 1), (7, 2), (71, 1)] {
            idx.prime(skier, resort);
        }
        idx.add(7, 1, 2025, 50);
        idx.add(7, 1, 2025, 30);
        idx.add(7, 2, 2025, 100);
        idx.add(7, 1, 2024, 5);
        idx.add(71, 1, 2025, 999); // same shard (71 & 63 == 7), other skier
        idx.add(8, 1, 2025, 1); // not held: dropped, its next read computes it
        assert_eq!(idx.totals(7, &[1], None), BTreeMap::from([(2024, 5), (2025, 80)]));
        assert_eq!(idx.totals(7, &[1, 2], Some(2025)), BTreeMap::from([(2025, 180)]));
        assert!(idx.totals(7, &[3], None).is_empty());
        assert_eq!(idx.cached(8, 1), None);
    }

    /// The bound: distinct skiers beyond the capacity evict the least recently used, so
    /// memory stays flat however many skiers a client invents.
    #[test]
    fn holds_at_most_its_capacity_least_recently_used_out_first() {
        let idx = SeasonIndex::with_capacity(SHARDS * 2);
        for skier in 0..100_000u32 {
            let l = idx.begin(skier, 1).expect("a new pair registers");
            idx.finish(l, &[(2025, u64::from(skier))]);
            if skier == 64 {
                // Skier 0 shares skier 64's shard and is used again: it outlives skier 128.
                assert!(idx.cached(0, 1).is_some());
            }
        }
        assert!(idx.skiers() <= SHARDS * 2, "{}", idx.skiers());
        assert_eq!(idx.cached(99_999, 1), Some(vec![(2025, 99_999)]));
        assert!(idx.stats().evictions >= 100_000 - SHARDS as u64 * 2);
    }

    /// An add while a miss is computed may or may not be in the computation: it is
    /// answered but not kept, and the next read computes it again.
    #[test]
    fn a_miss_that_raced_an_add_is_not_kept() {
        let idx = SeasonIndex::new();
        let l = idx.begin(7, 1).unwrap();
        assert!(idx.begin(7, 1).is_none(), "one computation per pair is kept");
        idx.add(7, 1, 2025, 50);
        idx.finish(l, &[(2025, 0)]);
        assert_eq!(idx.cached(7, 1), None);
        let l = idx.begin(7, 1).unwrap();
        idx.finish(l, &[(2025, 50)]);
        idx.add(7, 1, 2025, 10);
        assert_eq!(idx.cached(7, 1), Some(vec![(2025, 60)]));
        // A computation dropped unfinished leaves nothing behind.
        drop(idx.begin(8, 1).unwrap());
        assert!(idx.begin(8, 1).is_some(), "the registration went with its guard");
        // Capacity 0 (a broker node) keeps nothing.
        assert!(SeasonIndex::with_capacity(0).begin(7, 1).is_none());
    }
}
