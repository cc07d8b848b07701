//! Which seasons exist per resort. A season exists once created by POST or once the
//! first ride in it was accepted; new ones are persisted by the flusher (or, for POST,
//! before the 201).

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Default)]
pub struct SeasonBook {
    known: RwLock<BTreeMap<u32, BTreeSet<u16>>>,
    /// Seasons first seen in rides and not yet written to the tables.
    dirty: Mutex<Vec<(u32, u16)>>,
}

impl SeasonBook {
    /// Records a season; true when it was new. `persisted` says whether the caller has
    /// already written it to the tables (POST) or the flusher must (first ride).
    pub fn observe(&self, resort: u32, season: u16, persisted: bool) -> bool {
        if self.known.read().get(&resort).is_some_and(|s| s.contains(&season)) {
            return false;
        }
        let new = self.known.write().entry(resort).or_default().insert(season);
        if new && !persisted {
            self.dirty.lock().push((resort, season));
        }
        new
    }

    pub fn seasons(&self, resort: u32) -> Vec<u16> {
        self.known.read().get(&resort).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    pub fn take_dirty(&self) -> Vec<(u32, u16)> {
        std::mem::take(&mut *self.dirty.lock())
    }

    /// Puts back seasons whose write failed, so the next flush retries them.
    pub fn restore_dirty(&self, seasons: Vec<(u32, u16)>) {
        self.dirty.lock().extend(seasons);
    }
}
