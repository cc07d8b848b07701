//! A [`Tables`] for in-process tests: a real store underneath, with counters and faults
//! turned on and off by the test — the store refusing one skier's items (as DynamoDB
//! refuses an item over 400 KB), or every call failing (an outage).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::{DayCountItem, SkierDayItem, TableError, Tables, WriteReport};
use crate::domain::{DayKey, RideEvent};

/// No skier's items are refused.
const NOBODY: u32 = u32::MAX;

pub struct Scripted {
    inner: Arc<dyn Tables>,
    /// Skier whose skier-day items are refused for good (reported in `WriteReport::refused`).
    refused_skier: AtomicU32,
    /// Every call fails as `Unavailable` while set.
    down: AtomicBool,
    pub syncs: AtomicU64,
    pub season_writes: AtomicU64,
}

impl Scripted {
    pub fn new(inner: Arc<dyn Tables>) -> Self {
        Scripted { inner, refused_skier: AtomicU32::new(NOBODY), down: AtomicBool::new(false), syncs: 0.into(), season_writes: 0.into() }
    }

    /// Refuse `skier`'s skier-day items from now on (`None`: refuse nothing).
    pub fn refuse_skier(&self, skier: Option<u32>) {
        self.refused_skier.store(skier.unwrap_or(NOBODY), Ordering::Relaxed);
    }

    /// Every call fails while `down` is set.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
    }

    fn up(&self) -> Result<(), TableError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(TableError::Unavailable("scripted outage".into()));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Tables for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }
    async fn create(&self) -> Result<(), TableError> {
        self.up()?;
        self.inner.create().await
    }
    async fn put_skier_days(&self, items: &[SkierDayItem]) -> Result<WriteReport, TableError> {
        self.up()?;
        let refused = self.refused_skier.load(Ordering::Relaxed);
        let ok: Vec<SkierDayItem> = items.iter().filter(|d| d.skier != refused).cloned().collect();
        let mut r = self.inner.put_skier_days(&ok).await?;
        r.refused = items
            .iter()
            .enumerate()
            .filter(|(_, d)| d.skier == refused)
            .map(|(i, _)| (i, "Item size has exceeded the maximum allowed size".to_string()))
            .collect();
        Ok(r)
    }
    async fn put_day_counts(&self, items: &[DayCountItem]) -> Result<WriteReport, TableError> {
        self.up()?;
        self.inner.put_day_counts(items).await
    }
    async fn put_rides(&self, rides: &[RideEvent]) -> Result<(), TableError> {
        self.up()?;
        self.inner.put_rides(rides).await
    }
    async fn put_seasons(&self, seasons: &[(u32, u16)]) -> Result<(), TableError> {
        self.up()?;
        self.season_writes.fetch_add(1, Ordering::SeqCst);
        self.inner.put_seasons(seasons).await
    }
    async fn sync(&self) -> Result<(), TableError> {
        self.up()?;
        self.syncs.fetch_add(1, Ordering::SeqCst);
        self.inner.sync().await
    }
    async fn get_day_count(&self, key: DayKey) -> Result<Option<DayCountItem>, TableError> {
        self.up()?;
        self.inner.get_day_count(key).await
    }
    async fn get_skier_day(&self, skier: u32, key: DayKey) -> Result<Option<SkierDayItem>, TableError> {
        self.up()?;
        self.inner.get_skier_day(skier, key).await
    }
    async fn query_skier_resort(&self, skier: u32, resort: u32) -> Result<Vec<SkierDayItem>, TableError> {
        self.up()?;
        self.inner.query_skier_resort(skier, resort).await
    }
    async fn query_day(&self, key: DayKey) -> Result<Vec<SkierDayItem>, TableError> {
        self.up()?;
        self.inner.query_day(key).await
    }
    async fn query_seasons(&self, resort: u32) -> Result<Vec<u16>, TableError> {
        self.up()?;
        self.inner.query_seasons(resort).await
    }
    async fn scan_seasons(&self) -> Result<Vec<(u32, u16)>, TableError> {
        self.up()?;
        self.inner.scan_seasons().await
    }
    async fn scan_season_totals(&self, sink: &mut (dyn FnMut(u32, u32, u16, u64) + Send)) -> Result<(), TableError> {
        self.up()?;
        self.inner.scan_season_totals(sink).await
    }
}
