//! The registry: which aggregator actor owns which resort-day on this node.
//!
//! Actors are activated on demand by the consumer (the only caller of [`Registry::activate`],
//! so two activations of one key never race) by loading the day from the tables with one
//! query (and one get of its count, to repair a count a crash left stale), and passivated by the flusher when more than `max_resident` are held: the least
//! recently used ones whose state is entirely in the tables are dropped. A read for a day
//! that is not resident goes to the tables, which then hold all of it.

use parking_lot::RwLock;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::aggregator::{ActorStats, Applied, DayHandle};
use super::season_index::SeasonIndex;
use crate::domain::{DayKey, RideEvent};
use crate::error::TableError;
use crate::tables::Tables;

pub struct Registry {
    days: RwLock<FxHashMap<DayKey, DayHandle>>,
    tables: Arc<dyn Tables>,
    index: Arc<SeasonIndex>,
    /// Passivation starts above this many resident days. A season of 10 resorts is 3,660
    /// days, so the default keeps a whole season resident and passivation is for larger
    /// catalogs or long-running nodes.
    max_resident: usize,
    clock: AtomicU64,
    activations: AtomicU64,
    passivations: AtomicU64,
}

/// A day read from the tables, ready to become resident ([`Registry::install`]).
pub struct LoadedDay {
    key: DayKey,
    items: Vec<crate::tables::SkierDayItem>,
    count: Option<crate::tables::DayCountItem>,
}

/// Registry-wide counters for the admin view.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RegistryStats {
    pub resident: usize,
    pub max_resident: usize,
    pub activations: u64,
    pub passivations: u64,
}

impl Registry {
    pub fn new(tables: Arc<dyn Tables>, index: Arc<SeasonIndex>, max_resident: usize) -> Self {
        Registry {
            days: RwLock::new(FxHashMap::default()),
            tables,
            index,
            max_resident: max_resident.max(1),
            clock: AtomicU64::new(1),
            activations: AtomicU64::new(0),
            passivations: AtomicU64::new(0),
        }
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// The resident actor of a day, if any. The read path; never activates.
    pub fn resident(&self, key: &DayKey) -> Option<DayHandle> {
        let days = self.days.read();
        let h = days.get(key)?;
        h.last_touch.store(self.tick(), Ordering::Relaxed);
        Some(h.clone())
    }

    /// Makes sure the day's actor is resident, loading it from the tables if needed.
    pub async fn activate(&self, key: DayKey) -> Result<(), TableError> {
        if self.is_resident(&key) {
            return Ok(());
        }
        let loaded = self.load(key).await?;
        self.install(loaded);
        Ok(())
    }

    /// Whether the day has an actor here; unlike [`Self::resident`] it does not count as a use.
    pub fn is_resident(&self, key: &DayKey) -> bool {
        self.days.read().contains_key(key)
    }

    /// The table half of an activation: reads the day, touches nothing here. Split from
    /// [`Self::install`] so that the consumer can wait for a day's load while it goes on
    /// applying the resident days (issue 13, item 7); only the consumer installs, so two
    /// activations of one day still never race.
    pub fn load(&self, key: DayKey) -> impl std::future::Future<Output = Result<LoadedDay, TableError>> + Send + 'static {
        let tables = self.tables.clone();
        async move {
            // The count too, to repair one a crash left behind its items (DayState::from_items).
            let (items, count) = tokio::try_join!(tables.query_day(key), tables.get_day_count(key))?;
            Ok(LoadedDay { key, items, count })
        }
    }

    /// Starts the actor of a loaded day (on the caller's arbiter). A day that became
    /// resident meanwhile keeps its actor: its state is newer than the load.
    pub fn install(&self, day: LoadedDay) {
        let mut days = self.days.write();
        if days.contains_key(&day.key) {
            return;
        }
        let handle = DayHandle::start(day.key, day.items, day.count, self.index.clone(), self.tick());
        days.insert(day.key, handle);
        self.activations.fetch_add(1, Ordering::Relaxed);
    }

    /// The resident days of one resort, for an exact season total (see
    /// [`SeasonIndex`]); not a use for passivation.
    pub fn resident_of(&self, resort: u32) -> Vec<(DayKey, DayHandle)> {
        self.days.read().iter().filter(|(k, _)| k.resort == resort).map(|(k, h)| (*k, h.clone())).collect()
    }

    /// Hands a batch to the day's actor, which must be resident (see [`Self::activate`]).
    /// Enqueued under the read lock, so passivation (under the write lock) sees it; the
    /// future resolves once the actor applied the batch, or fails if the actor is dead.
    pub fn dispatch(
        &self,
        key: &DayKey,
        seq: u64,
        events: Vec<RideEvent>,
    ) -> Option<impl std::future::Future<Output = Result<Applied, actix::MailboxError>>> {
        let days = self.days.read();
        let h = days.get(key)?;
        h.last_touch.store(self.tick(), Ordering::Relaxed);
        Some(h.apply(seq, events))
    }

    /// Drops every resident day, flushed or not; returns how many. For a consumer whose
    /// partitions may have had another owner meanwhile (see `Consumer::run`): its days
    /// are reloaded from the tables on their next ride.
    pub fn clear(&self) -> usize {
        let dropped = std::mem::take(&mut *self.days.write()).len();
        self.passivations.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Drops the resident days `which` selects, flushed or not; returns how many. Cluster
    /// mode: the days of a shard handed off (flushed) or taken again (stale).
    pub fn drop_where(&self, which: impl Fn(&DayKey) -> bool) -> usize {
        let mut days = self.days.write();
        let before = days.len();
        days.retain(|k, _| !which(k));
        let dropped = before - days.len();
        self.passivations.fetch_add(dropped as u64, Ordering::Relaxed);
        dropped
    }

    /// Every resident day with its key.
    pub fn all_keyed(&self) -> Vec<(DayKey, DayHandle)> {
        self.days.read().iter().map(|(k, h)| (*k, h.clone())).collect()
    }

    pub fn all(&self) -> Vec<DayHandle> {
        self.days.read().values().cloned().collect()
    }

    /// Drops least recently used, fully flushed actors until at most `max_resident` remain.
    /// Returns how many were dropped; an actor stops once its last handle is gone.
    pub fn passivate_idle(&self) -> usize {
        let mut days = self.days.write();
        if days.len() <= self.max_resident {
            return 0;
        }
        let mut by_age: Vec<(u64, DayKey)> = days.iter().map(|(k, h)| (h.last_touch.load(Ordering::Relaxed), *k)).collect();
        by_age.sort_unstable();
        let excess = days.len() - self.max_resident;
        let mut dropped = 0;
        for (_, key) in by_age {
            if dropped == excess {
                break;
            }
            if days.get(&key).is_some_and(|h| h.passivatable()) {
                days.remove(&key);
                dropped += 1;
            }
        }
        self.passivations.fetch_add(dropped as u64, Ordering::Relaxed);
        if dropped > 0 {
            tracing::debug!(dropped, resident = days.len(), "passivated idle aggregators");
        }
        dropped
    }

    pub fn stats(&self) -> RegistryStats {
        RegistryStats {
            resident: self.days.read().len(),
            max_resident: self.max_resident,
            activations: self.activations.load(Ordering::Relaxed),
            passivations: self.passivations.load(Ordering::Relaxed),
        }
    }

    /// Every resident actor's counters (waits for each mailbox to drain to the ask).
    pub async fn actor_stats(&self) -> Vec<ActorStats> {
        let handles = self.all();
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            if let Some(s) = h.stats().await {
                out.push(s);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}
