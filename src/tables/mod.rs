//! The table store behind one trait: the schema of DESIGN.md, implemented on sled trees
//! (embedded mode, [`sled_store`]) and on DynamoDB (production mode).
//!
//! Tables (logical schema, the same in both stores):
//! - `SkierLiftRides`: every ride; PK SkierID, SK `SeasonID#DayID#Time#EventID`.
//! - `LiftRideCounts`: per resort-day aggregate; PK `ResortID#SeasonID#DayID`; unique
//!   skiers, rides, version.
//! - `SkierDays`: projection per skier-day; PK `ResortID#SeasonID#DayID`, SK SkierID;
//!   vertical, rides, the ride ids seen (for exact de-duplication after a reload) with each
//!   ride's time and lift (lift activity), version.
//!   Keyed by day so that an aggregate reloads with one strongly consistent Query (a GSI
//!   would be eventually consistent, and a stale reload could drop ids); the index
//!   `BySkier` (PK SkierID, SK `ResortID#SeasonID#DayID`, projecting vertical) answers a
//!   skier's season totals, where eventual consistency is what reads promise anyway.
//! - `Seasons`: PK ResortID, SK SeasonID.
//!
//! Every request-path read is one get or one query, never a scan; the only scan loads
//! the skier-season totals at start-up.

pub mod dynamo;
#[cfg(test)]
pub mod scripted;
pub mod sled_store;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{DayKey, RideEvent, Stamp};
use crate::error::TableError;

/// One skier's day at one resort: an absolute value, written with its version — the
/// number of rides it holds, which only grows, whichever consumer node writes it — so
/// that a stale flush can never overwrite a newer one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkierDayItem {
    pub skier: u32,
    pub key: DayKey,
    pub vertical: u64,
    /// Ids of the rides counted, so a duplicate is recognised even after the aggregate
    /// was passivated and reloaded. Rides of the day = `ids.len()`.
    pub ids: Vec<u64>,
    pub version: u64,
    /// Each ride's time and lift, in the order of `ids` (one per id). Items written before
    /// stamps were kept have none: the stores' decoders pad them with [`Stamp::UNKNOWN`]
    /// ([`SkierDayItem::padded`]), so `stamps.len() == ids.len()` for every item read.
    pub stamps: Vec<Stamp>,
}

impl SkierDayItem {
    /// Gives every id a stamp: [`Stamp::UNKNOWN`] for ids stored without one.
    pub fn padded(mut self) -> Self {
        self.stamps.resize(self.ids.len(), Stamp::UNKNOWN);
        self
    }
}

/// The `LiftRideCounts` item of one resort-day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayCountItem {
    pub key: DayKey,
    pub unique_skiers: u64,
    pub rides: u64,
    pub version: u64,
}

/// What a conditional batch write did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteReport {
    pub written: usize,
    /// Items skipped because the stored version was already as new: a retried flush or a
    /// stale owner. Not an error.
    pub stale: usize,
    /// Items the store refused for good, as (index in the call's items, why): an item it
    /// cannot hold (DynamoDB: larger than 400 KB). Reported instead of failing the call so
    /// that one such item cannot stop the writes of every other (issue 13, item 1); a
    /// retry would fail the same way. Failures that may pass (an outage, throttling)
    /// still fail the call.
    pub refused: Vec<(usize, String)>,
}

/// One sink for the flusher and one source for the read fallback.
#[async_trait]
pub trait Tables: Send + Sync + 'static {
    /// A short name for logs and metrics (`sled`, `dynamodb`).
    fn name(&self) -> &'static str;
    /// Creates the tables if they do not exist. Idempotent.
    async fn create(&self) -> Result<(), TableError>;
    /// Conditional on each stored version being older than the item's. An item the store
    /// cannot hold is reported in [`WriteReport::refused`]; the others are written.
    async fn put_skier_days(&self, items: &[SkierDayItem]) -> Result<WriteReport, TableError>;
    /// Conditional on each stored version being older than the item's.
    async fn put_day_counts(&self, items: &[DayCountItem]) -> Result<WriteReport, TableError>;
    /// [`Self::put_skier_days`] under lease epochs (cluster mode, ADR 005): `epochs[i]` is
    /// the epoch of the shard `items[i]` belongs to; a store that fences stamps it on the
    /// item and refuses a write whose epoch is older than the stored one. Stores that do
    /// not (sled, which is one node's own) write as `put_skier_days`; cluster mode accepts
    /// only DynamoDB (`Config::check`).
    async fn put_skier_days_fenced(&self, items: &[SkierDayItem], epochs: &[u64]) -> Result<WriteReport, TableError> {
        let _ = epochs;
        self.put_skier_days(items).await
    }
    /// [`Self::put_day_counts`] under lease epochs, as [`Self::put_skier_days_fenced`].
    async fn put_day_counts_fenced(&self, items: &[DayCountItem], epochs: &[u64]) -> Result<WriteReport, TableError> {
        let _ = epochs;
        self.put_day_counts(items).await
    }
    /// Raw rides; idempotent because the key holds the event id.
    async fn put_rides(&self, rides: &[RideEvent]) -> Result<(), TableError>;
    async fn put_seasons(&self, seasons: &[(u32, u16)]) -> Result<(), TableError>;
    /// Makes every write before it durable (sled: flush + fsync; DynamoDB: already is).
    async fn sync(&self) -> Result<(), TableError>;

    async fn get_day_count(&self, key: DayKey) -> Result<Option<DayCountItem>, TableError>;
    async fn get_skier_day(&self, skier: u32, key: DayKey) -> Result<Option<SkierDayItem>, TableError>;
    /// All of a skier's days at one resort (one Query on the `BySkier` index). The items'
    /// `ids` may be empty: the index does not project them, and readers need only vertical.
    async fn query_skier_resort(&self, skier: u32, resort: u32) -> Result<Vec<SkierDayItem>, TableError>;
    /// All skier-days of one resort-day (one Query on the by-day index): an aggregate's
    /// whole state when it is activated again.
    async fn query_day(&self, key: DayKey) -> Result<Vec<SkierDayItem>, TableError>;
    async fn query_seasons(&self, resort: u32) -> Result<Vec<u16>, TableError>;
    /// Every (resort, season) known. Start-up only.
    async fn scan_seasons(&self) -> Result<Vec<(u32, u16)>, TableError>;
    /// Every skier-day as (skier, resort, season, vertical). Start-up only: it rebuilds
    /// the in-memory skier-season totals.
    async fn scan_season_totals(&self, sink: &mut (dyn FnMut(u32, u32, u16, u64) + Send)) -> Result<(), TableError>;
}
