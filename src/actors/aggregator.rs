//! The aggregator actor of one resort-day: the only writer of that day's state.
//!
//! It applies batches of rides (already durable in the WAL) to its state: per skier the
//! ride ids and the day's vertical, hence the unique-skier count and the ride count.
//! Duplicate ids — client retries and broker redeliveries — are dropped here, so every
//! ride counts exactly once. Readers never message the actor: they take the read side of
//! the state's lock through a [`DayHandle`], which keeps GETs to a map lookup.
//! Flush bookkeeping (what changed since the last flush, raw rides not yet written) lives
//! in the same state so that the registry can tell whether an actor may be passivated.

use actix::prelude::*;
use parking_lot::RwLock;
use rustc_hash::FxHashMap;
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::season_index::SeasonIndex;
use super::unix_ms;
use crate::domain::{DayKey, RideEvent, Stamp, MAX_RIDES_PER_SKIER_DAY};
use crate::tables::{DayCountItem, SkierDayItem};

/// One skier's day. 56 bytes plus 12 per ride: the ids are what makes de-duplication exact
/// after a restart or a reload, and they cost less than a separate id set would; the
/// stamps (time and lift) are what lift activity is counted from.
#[derive(Clone, Debug, Default)]
pub struct SkierDay {
    /// A u64: a sum of rises. A u32 panicked (debug) or wrapped (release) once a stored
    /// vertical came near 4.29e9; with rises ≤ 3,000 m and the ride bound it stays far below.
    pub vertical: u64,
    /// Sorted, so a duplicate is found by binary search: a linear scan made a full day's
    /// dedup quadratic under the day's write lock. The order is not part of any stored
    /// format (stored items written in arrival order are sorted on load).
    pub ids: Vec<u64>,
    /// `stamps[i]` is the time and lift of ride `ids[i]`. Two vectors rather than one of
    /// pairs: a `(u64, u32)` pads to 16 bytes, these take 12.
    pub stamps: Vec<Stamp>,
}

impl SkierDay {
    fn contains(&self, id: u64) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    /// Inserts an id known to be absent, keeping the order. The move is at most
    /// [`MAX_RIDES_PER_SKIER_DAY`] × 12 bytes: cheaper than a hash set's memory per id.
    fn insert(&mut self, id: u64, stamp: Stamp) {
        let at = self.ids.partition_point(|x| *x < id);
        self.ids.insert(at, id);
        self.stamps.insert(at, stamp);
    }

    /// From a stored item (padded: one stamp per id), sorting ids that were stored in
    /// arrival order and keeping each stamp with its id.
    fn from_item(item: SkierDayItem) -> Self {
        let SkierDayItem { vertical, mut ids, mut stamps, .. } = item.padded();
        if !ids.is_sorted() {
            let mut pairs: Vec<(u64, Stamp)> = ids.into_iter().zip(stamps).collect();
            pairs.sort_unstable_by_key(|p| p.0);
            (ids, stamps) = pairs.into_iter().unzip();
        }
        SkierDay { vertical, ids, stamps }
    }

    /// This skier-day as a table item.
    pub fn to_item(&self, skier: u32, key: DayKey) -> SkierDayItem {
        SkierDayItem {
            skier,
            key,
            vertical: self.vertical,
            ids: self.ids.clone(),
            stamps: self.stamps.clone(),
            version: self.ids.len() as u64,
        }
    }
}

/// What one apply did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub applied: u64,
    pub duplicates: u64,
    /// Indexes (into the applied slice) of rides refused because their skier-day already
    /// holds [`MAX_RIDES_PER_SKIER_DAY`] rides. They change nothing and are in no table.
    pub refused: Vec<usize>,
}

/// The state of one resort-day, shared between its actor (writer) and readers.
pub struct DayState {
    pub key: DayKey,
    pub skiers: FxHashMap<u32, SkierDay>,
    pub rides: u64,
    /// Highest WAL sequence applied (this node's WAL; passivation compares it with what
    /// was dispatched).
    pub applied_seq: u64,
    /// Skiers changed since their last successful flush, with the WAL sequences of the
    /// first and of the latest such change. The latest is the mark that tells a flushed
    /// change from a newer one; the first is how far back the WAL must be kept while the
    /// item cannot be written (a refused item, a dead actor: see the flusher).
    dirty: FxHashMap<u32, Unflushed>,
    /// Sequence of the last change to the count, and of the last one flushed.
    count_changed: u64,
    count_flushed: u64,
    /// Raw rides not yet in `SkierLiftRides`, with their WAL sequence, oldest first.
    pending: VecDeque<PendingRide>,
}

/// A raw ride waiting for its flush, with the WAL record it came from. After a replay every
/// replayed ride waits here until the flusher has written it, so its size is the largest
/// part of a freshly started node's memory: 28 bytes instead of the 40 of `(u64,
/// RideEvent)`, because the day is the actor's own and the 64-bit fields are kept as halves,
/// which lets the struct align to 4 (issue 15: 30M rides replayed).
#[derive(Clone, Copy, Debug)]
struct PendingRide {
    seq: [u32; 2],
    id: [u32; 2],
    skier: u32,
    vertical: u32,
    time: u16,
    lift: u16,
}

fn halves(v: u64) -> [u32; 2] {
    [(v >> 32) as u32, v as u32]
}

fn whole([hi, lo]: [u32; 2]) -> u64 {
    (u64::from(hi) << 32) | u64::from(lo)
}

impl PendingRide {
    fn new(seq: u64, ev: &RideEvent) -> Self {
        PendingRide { seq: halves(seq), id: halves(ev.id), skier: ev.skier, vertical: ev.vertical, time: ev.time, lift: ev.lift }
    }

    fn seq(&self) -> u64 {
        whole(self.seq)
    }

    fn id(&self) -> u64 {
        whole(self.id)
    }

    /// The ride again, on its day.
    fn ride(&self, key: DayKey) -> RideEvent {
        RideEvent {
            id: self.id(),
            resort: key.resort,
            season: key.season,
            day: key.day,
            skier: self.skier,
            time: self.time,
            lift: self.lift,
            vertical: self.vertical,
        }
    }
}

impl DayState {
    /// Rebuilds a day from its stored skier-day items and its stored count (an
    /// activation).
    ///
    /// The skier-day items are the truth; the count is derived from them. The two are
    /// separate writes (separate items in DynamoDB, unsynced sled trees until the flush's
    /// fsync), so a crash between them can leave the count behind its items. Replaying
    /// the WAL then finds every ride already counted and would change nothing, leaving
    /// the stale count in the table for good. So a count that disagrees with the items
    /// is marked dirty here and the next flush rewrites it.
    pub fn from_items(key: DayKey, items: Vec<SkierDayItem>, stored: Option<&DayCountItem>) -> Self {
        let mut st = DayState {
            key,
            skiers: FxHashMap::default(),
            rides: 0,
            applied_seq: 0,
            dirty: FxHashMap::default(),
            count_changed: 0,
            count_flushed: 0,
            pending: VecDeque::new(),
        };
        for item in items {
            st.rides += item.ids.len() as u64;
            st.skiers.insert(item.skier, SkierDay::from_item(item));
        }
        let agrees = stored.map(|c| (c.unique_skiers, c.rides)) == Some((st.skiers.len() as u64, st.rides));
        if !agrees && !st.skiers.is_empty() {
            // Not a WAL sequence: the repair is owed to no record, and 1 is below every
            // sequence a later ride brings, which supersedes it.
            st.count_changed = 1;
        }
        st
    }

    pub fn unique_skiers(&self) -> usize {
        self.skiers.len()
    }

    /// True when everything this state holds is in the tables.
    pub fn is_clean(&self) -> bool {
        self.dirty.is_empty() && self.pending.is_empty() && self.count_changed <= self.count_flushed
    }

    /// The WAL sequence of the oldest change this state holds that the tables may lack:
    /// the WAL must be kept from there while the state cannot be flushed. `None` when
    /// everything is in the tables (a count change alone needs no WAL: activation rebuilds
    /// the count from the items, see [`Self::from_items`]).
    pub fn oldest_unflushed(&self) -> Option<u64> {
        let dirty = self.dirty.values().map(|m| m.first).min();
        let pending = self.pending.front().map(PendingRide::seq);
        dirty.into_iter().chain(pending).min()
    }

    /// Applies one WAL record's rides for this day. A duplicate changes no figure; it only
    /// queues its raw row again. A new ride for a skier-day that is full is refused and
    /// changes nothing at all, so that replaying the same WAL refuses it again.
    fn apply(&mut self, seq: u64, events: &[RideEvent], index: &SeasonIndex) -> Applied {
        let mut out = Applied::default();
        for (i, ev) in events.iter().enumerate() {
            // The registry routes by day; a ride of another day here would be stored under
            // this one's (PendingRide keeps no day of its own).
            debug_assert_eq!(ev.key(), self.key, "a ride dispatched to another day's actor");
            let day = self.skiers.entry(ev.skier).or_default();
            if day.contains(ev.id) {
                // Counted already, but its raw row may not be written: the skier-day
                // item that holds its id can reach the tables before the raw rides do,
                // and a crash in between (or a consumer that died with its WAL) leaves
                // only this copy — a WAL replay or a broker redelivery — to write it.
                // The write is idempotent (the key holds the id), so write it again.
                self.pending.push_back(PendingRide::new(seq, ev));
                out.duplicates += 1;
                continue;
            }
            if day.ids.len() >= MAX_RIDES_PER_SKIER_DAY {
                // Checked after the duplicate test: a retry of a counted ride is still
                // recognised (and answered 201) on a full day.
                out.refused.push(i);
                continue;
            }
            day.insert(ev.id, Stamp::of(ev));
            day.vertical += u64::from(ev.vertical);
            self.rides += 1;
            self.dirty.entry(ev.skier).and_modify(|m| m.last = seq).or_insert(Unflushed { first: seq, last: seq });
            self.pending.push_back(PendingRide::new(seq, ev));
            index.add(ev.skier, ev.resort, ev.season, u64::from(ev.vertical));
            out.applied += 1;
        }
        if out.applied > 0 {
            self.count_changed = seq;
        }
        self.applied_seq = self.applied_seq.max(seq);
        out
    }
}

/// A skier's unflushed changes: WAL sequences of the first and of the latest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyMark {
    pub skier: u32,
    pub first: u64,
    pub last: u64,
}

/// The value of [`DayState::dirty`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Unflushed {
    first: u64,
    last: u64,
}

/// What changed since the last flush, as table items.
///
/// Item versions are ride counts (a skier-day's ids, a day's rides): they only grow as
/// rides are added, whichever node adds them, so "stored version older" stays meaningful
/// when a partition moves to another consumer with another WAL. The WAL sequences in
/// `marks` are this node's bookkeeping only.
#[derive(Default)]
pub struct DirtySnapshot {
    pub skier_days: Vec<SkierDayItem>,
    /// One per item, in the same order: to clear exactly these marks once written, or to
    /// keep the WAL from `first` on while an item cannot be written.
    pub marks: Vec<DirtyMark>,
    pub count: Option<DayCountItem>,
    /// WAL sequence of the count change the snapshot holds.
    pub count_mark: Option<u64>,
    pub rides: Vec<RideEvent>,
    /// WAL sequence of the oldest raw ride left behind by the per-flush cap, if any: the
    /// WAL may not be checkpointed past it.
    pub oldest_left: Option<u64>,
}

/// Counters for `GET /admin/actors`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ActorStats {
    pub key: String,
    pub events_applied: u64,
    pub duplicates: u64,
    /// Rides refused because their skier-day was full ([`MAX_RIDES_PER_SKIER_DAY`]).
    pub rides_refused: u64,
    pub unique_skiers: usize,
    pub rides: u64,
    pub mailbox_depth: u64,
    pub dirty_skiers: usize,
    pub pending_rides: usize,
    pub applied_seq: u64,
    pub last_flush_unix_ms: Option<u64>,
    pub activated_unix_ms: u64,
}

pub struct DayAggregator {
    state: Arc<RwLock<DayState>>,
    index: Arc<SeasonIndex>,
    queued: Arc<AtomicU64>,
    stats: ActorStats,
}

impl Actor for DayAggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // `do_send` ignores the bound anyway; this keeps the flusher's `send`s from
        // waiting behind a burst of replay batches.
        ctx.set_mailbox_capacity(1 << 16);
        tracing::debug!(key = %self.stats.key, "aggregator started");
    }
}

#[derive(Message)]
#[rtype(result = "Applied")]
struct Apply {
    seq: u64,
    events: Vec<RideEvent>,
}

impl Handler<Apply> for DayAggregator {
    type Result = MessageResult<Apply>;

    fn handle(&mut self, msg: Apply, _: &mut Self::Context) -> Self::Result {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        let out = self.state.write().apply(msg.seq, &msg.events, &self.index);
        self.stats.events_applied += out.applied;
        self.stats.duplicates += out.duplicates;
        if !out.refused.is_empty() {
            self.stats.rides_refused += out.refused.len() as u64;
            // One line per batch and day, not per ride: a client hammering a full day must
            // not flood the log.
            let skier = msg.events[out.refused[0]].skier;
            tracing::warn!(key = %self.stats.key, seq = msg.seq, refused = out.refused.len(), skier,
                bound = MAX_RIDES_PER_SKIER_DAY, "rides refused: their skier-day is full");
        }
        MessageResult(out)
    }
}

#[derive(Message)]
#[rtype(result = "DirtySnapshot")]
struct TakeDirty {
    max_rides: usize,
}

impl Handler<TakeDirty> for DayAggregator {
    type Result = MessageResult<TakeDirty>;

    fn handle(&mut self, msg: TakeDirty, _: &mut Self::Context) -> Self::Result {
        let st = self.state.read();
        let key = st.key;
        let mut skier_days = Vec::with_capacity(st.dirty.len());
        let mut marks = Vec::with_capacity(st.dirty.len());
        for (skier, mark) in &st.dirty {
            if let Some(d) = st.skiers.get(skier) {
                skier_days.push(d.to_item(*skier, key));
                marks.push(DirtyMark { skier: *skier, first: mark.first, last: mark.last });
            }
        }
        let changed = st.count_changed > st.count_flushed;
        let count = changed.then(|| DayCountItem { key, unique_skiers: st.skiers.len() as u64, rides: st.rides, version: st.rides });
        let count_mark = changed.then_some(st.count_changed);
        let rides = st.pending.iter().take(msg.max_rides).map(|p| p.ride(key)).collect();
        let oldest_left = st.pending.get(msg.max_rides).map(PendingRide::seq);
        MessageResult(DirtySnapshot { skier_days, marks, count, count_mark, rides, oldest_left })
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Committed {
    skiers: Vec<(u32, u64)>,
    count_version: Option<u64>,
    rides: usize,
}

impl Handler<Committed> for DayAggregator {
    type Result = ();

    fn handle(&mut self, msg: Committed, _: &mut Self::Context) {
        let mut st = self.state.write();
        for (skier, version) in msg.skiers {
            // Only if unchanged since the snapshot; a newer change stays dirty.
            if st.dirty.get(&skier).is_some_and(|m| m.last == version) {
                st.dirty.remove(&skier);
            }
        }
        if let Some(v) = msg.count_version {
            st.count_flushed = st.count_flushed.max(v);
        }
        let n = msg.rides.min(st.pending.len());
        st.pending.drain(..n);
        self.stats.last_flush_unix_ms = Some(unix_ms());
    }
}

#[derive(Message)]
#[rtype(result = "ActorStats")]
struct GetStats;

impl Handler<GetStats> for DayAggregator {
    type Result = MessageResult<GetStats>;

    fn handle(&mut self, _: GetStats, _: &mut Self::Context) -> Self::Result {
        let st = self.state.read();
        let mut s = self.stats.clone();
        s.unique_skiers = st.skiers.len();
        s.rides = st.rides;
        s.dirty_skiers = st.dirty.len();
        s.pending_rides = st.pending.len();
        s.applied_seq = st.applied_seq;
        s.mailbox_depth = self.queued.load(Ordering::Relaxed);
        MessageResult(s)
    }
}

/// Stops the actor, or makes its handler panic (as the u32 vertical sum did): either way
/// its mailbox closes and queued and later messages fail. For the fail-closed tests only.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
struct Kill {
    panic: bool,
}

#[cfg(test)]
impl Handler<Kill> for DayAggregator {
    type Result = ();

    fn handle(&mut self, msg: Kill, ctx: &mut Self::Context) {
        if msg.panic {
            panic!("test: an aggregator handler panics");
        }
        ctx.stop();
    }
}

/// The typed, cheap-to-clone handle to one aggregator. Callers never see messages.
#[derive(Clone)]
pub struct DayHandle {
    addr: Addr<DayAggregator>,
    state: Arc<RwLock<DayState>>,
    /// Highest WAL sequence sent to the actor; passivation waits until it is applied.
    dispatched: Arc<AtomicU64>,
    /// Messages sent and not yet handled: the mailbox depth.
    queued: Arc<AtomicU64>,
    /// Logical clock of the last use, for least-recently-used passivation.
    pub(crate) last_touch: Arc<AtomicU64>,
}

impl DayHandle {
    /// Starts the actor for a day rebuilt from its table items. Must run inside an actix
    /// system (the consumer's arbiter).
    pub fn start(key: DayKey, items: Vec<SkierDayItem>, count: Option<DayCountItem>, index: Arc<SeasonIndex>, now: u64) -> Self {
        let state = Arc::new(RwLock::new(DayState::from_items(key, items, count.as_ref())));
        let queued = Arc::new(AtomicU64::new(0));
        let actor = DayAggregator {
            state: state.clone(),
            index,
            queued: queued.clone(),
            stats: ActorStats { key: key.to_string(), activated_unix_ms: unix_ms(), ..Default::default() },
        };
        DayHandle { addr: actor.start(), state, dispatched: Arc::new(AtomicU64::new(0)), queued, last_touch: Arc::new(AtomicU64::new(now)) }
    }

    /// Enqueues a batch at once (ordering with later calls is preserved); the returned
    /// future resolves when the actor has applied it, or with an error when the actor is
    /// dead (stopped, or a handler panicked) and so never will: the caller must then not
    /// acknowledge the batch (issue 13, item 6).
    pub fn apply(&self, seq: u64, events: Vec<RideEvent>) -> impl std::future::Future<Output = Result<Applied, MailboxError>> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.dispatched.fetch_max(seq, Ordering::AcqRel);
        self.addr.send(Apply { seq, events })
    }

    /// False once the actor is dead: its state can be read but will never change again.
    pub fn alive(&self) -> bool {
        self.addr.connected()
    }

    /// Read access to the state: the GET path.
    pub fn read<R>(&self, f: impl FnOnce(&DayState) -> R) -> R {
        f(&self.state.read())
    }

    pub async fn take_dirty(&self, max_rides: usize) -> Option<DirtySnapshot> {
        self.addr.send(TakeDirty { max_rides }).await.ok()
    }

    /// Tells the actor which snapshot reached the tables: all of it but the skier-days of
    /// `refused` (skiers whose item the store refused for good) and, if `count_refused`,
    /// the day count. Those stay dirty, so they are tried again and the day is never
    /// passivated with them (its state is then their only copy besides the WAL).
    pub fn committed(&self, snap: &DirtySnapshot, refused: &[u32], count_refused: bool) {
        let skiers = snap.marks.iter().filter(|m| !refused.contains(&m.skier)).map(|m| (m.skier, m.last)).collect();
        let count_version = snap.count_mark.filter(|_| !count_refused);
        self.addr.do_send(Committed { skiers, count_version, rides: snap.rides.len() });
    }

    /// Waits until everything sent before has been applied, then returns the counters.
    pub async fn stats(&self) -> Option<ActorStats> {
        self.addr.send(GetStats).await.ok()
    }

    /// Stops the actor, or panics it (see [`Kill`]), and waits until its mailbox is closed.
    #[cfg(test)]
    pub(crate) async fn kill(&self, panic: bool) {
        let _ = self.addr.send(Kill { panic }).await;
        while self.addr.connected() {
            tokio::task::yield_now().await;
        }
    }

    /// True when the actor holds nothing the tables lack and has no work queued: safe to
    /// drop. Called under the registry's write lock, so no new batch can slip in.
    pub fn passivatable(&self) -> bool {
        let st = self.state.read();
        // A dead actor may have dropped batches it never applied: dropping it would let a
        // fresh activation lose them, while keeping it holds the checkpoint (the flusher).
        self.alive()
            && self.queued.load(Ordering::Acquire) == 0
            && st.applied_seq >= self.dispatched.load(Ordering::Acquire)
            && st.is_clean()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: u64, skier: u32, vertical: u32) -> RideEvent {
        RideEvent { id, resort: 1, season: 2025, day: 1, skier, time: 1, lift: 1, vertical }
    }

    #[test]
    fn duplicates_count_once_and_flush_marks_follow_versions() {
        let idx = SeasonIndex::new();
        idx.prime(7, 1); // the index keeps only pairs it holds (issue 13, item 4)
        let key = DayKey { resort: 1, season: 2025, day: 1 };
        let mut st = DayState::from_items(key, vec![], None);
        let counts = |a: Applied| (a.applied, a.duplicates);
        assert_eq!(counts(st.apply(1, &[ev(1, 7, 50), ev(2, 7, 30), ev(1, 7, 50)], &idx)), (2, 1));
        assert_eq!(counts(st.apply(2, &[ev(2, 7, 30), ev(3, 8, 10)], &idx)), (1, 1));
        assert_eq!(st.unique_skiers(), 2);
        assert_eq!(st.rides, 3);
        assert_eq!(st.skiers[&7].vertical, 80);
        assert_eq!(idx.totals(7, &[1], None)[&2025], 80);
        assert!(!st.is_clean());

        // A reload from the written items keeps de-duplicating.
        let items: Vec<SkierDayItem> = st.skiers.iter().map(|(s, d)| d.to_item(*s, key)).collect();
        let idx2 = SeasonIndex::new();
        let count = DayCountItem { key, unique_skiers: 2, rides: 3, version: 3 };
        let mut again = DayState::from_items(key, items, Some(&count));
        assert!(again.is_clean());
        assert_eq!(counts(again.apply(3, &[ev(3, 8, 10), ev(4, 8, 10)], &idx2)), (1, 1));
        assert_eq!(again.rides, 4);
        assert_eq!(again.applied_seq, 3);
        // Versions are ride counts: node-independent and growing with every new ride.
        assert_eq!(again.skiers[&8].ids.len(), 2);
    }

    #[test]
    fn a_skier_day_holds_at_most_the_bound_and_a_refused_ride_changes_nothing() {
        use crate::domain::MAX_RIDES_PER_SKIER_DAY as MAX;
        let idx = SeasonIndex::new();
        idx.prime(7, 1); // the index keeps only pairs it holds (issue 13, item 4)
        let key = DayKey { resort: 1, season: 2025, day: 1 };
        let mut st = DayState::from_items(key, vec![], None);
        // One more distinct ride than the bound, in one batch, plus a retry of the first.
        let mut rides: Vec<RideEvent> = (1..=MAX as u64 + 1).map(|id| ev(id, 7, 10)).collect();
        rides.push(ev(1, 7, 10));
        let out = st.apply(1, &rides, &idx);
        assert_eq!((out.applied, out.duplicates, out.refused), (MAX as u64, 1, vec![MAX]));
        assert_eq!(st.rides, MAX as u64, "the skier-day must stop at the bound");
        assert_eq!(st.skiers[&7].ids.len(), MAX);
        assert_eq!(st.skiers[&7].vertical, MAX as u64 * 10);
        assert!(st.skiers[&7].ids.windows(2).all(|w| w[0] < w[1]), "ids stay sorted");
        assert_eq!(idx.totals(7, &[1], None)[&2025], MAX as u64 * 10, "a refused ride must not reach the season total");
        // The refused ride queues no raw row (it is in no table), the retry of a counted one does.
        assert_eq!(st.pending.len(), MAX + 1);
        assert!(st.pending.iter().all(|p| p.id() != MAX as u64 + 1));
        // Other skiers of the day are not affected.
        let _ = st.apply(2, &[ev(5_000, 8, 10)], &idx);
        assert_eq!((st.rides, st.unique_skiers()), (MAX as u64 + 1, 2));
    }

    #[test]
    fn ids_stored_in_arrival_order_still_deduplicate_after_a_reload() {
        let key = DayKey { resort: 1, season: 2025, day: 1 };
        // As items were written before the ids were kept sorted.
        let items = vec![SkierDayItem { skier: 7, key, vertical: 30, ids: vec![9, 2, 5], version: 3, stamps: vec![] }];
        let mut st = DayState::from_items(key, items, None);
        let out = st.apply(4, &[ev(2, 7, 10), ev(9, 7, 10), ev(5, 7, 10), ev(4, 7, 10)], &SeasonIndex::new());
        assert_eq!((out.applied, out.duplicates), (1, 3));
        assert_eq!(st.skiers[&7].ids, vec![2, 4, 5, 9]);
        assert_eq!(st.oldest_unflushed(), Some(4));
    }

    #[test]
    fn verticals_sum_past_u32_without_overflow() {
        let key = DayKey { resort: 1, season: 2025, day: 1 };
        // A stored skier-day near u32::MAX (its vertical is a u64 in the tables).
        let big = u32::MAX as u64 - 10;
        let items = vec![SkierDayItem { skier: 7, key, vertical: big, ids: vec![1], version: 1, stamps: vec![] }];
        let mut st = DayState::from_items(key, items, None);
        let _ = st.apply(2, &[ev(2, 7, 3_000), ev(3, 7, 3_000)], &SeasonIndex::new());
        assert_eq!(st.skiers[&7].vertical, big + 6_000);
    }

    #[test]
    fn a_count_behind_its_items_is_rewritten_after_activation() {
        let key = DayKey { resort: 1, season: 2025, day: 1 };
        let items = vec![
            SkierDayItem { skier: 7, key, vertical: 80, ids: vec![1, 2], version: 2, stamps: vec![] },
            SkierDayItem { skier: 8, key, vertical: 10, ids: vec![3], version: 1, stamps: vec![] },
        ];
        // A crash after the skier-days were written and before the count was: the count
        // item is missing, or holds an older figure.
        for stored in [None, Some(DayCountItem { key, unique_skiers: 1, rides: 2, version: 2 })] {
            let mut st = DayState::from_items(key, items.clone(), stored.as_ref());
            assert!(!st.is_clean(), "stale count {stored:?} must be flushed again");
            // Replaying the WAL finds only rides already counted: still dirty, and their
            // raw rows, which may be the part the crash lost, are queued again.
            let replayed = st.apply(5, &[ev(1, 7, 50), ev(3, 8, 10)], &SeasonIndex::new());
            assert_eq!((replayed.applied, replayed.duplicates), (0, 2));
            assert!(st.count_changed > st.count_flushed);
            assert_eq!(st.pending.iter().map(PendingRide::id).collect::<Vec<_>>(), vec![1, 3]);
            assert_eq!((st.rides, st.skiers[&7].vertical), (3, 80));
        }
        // An empty day has nothing to repair.
        assert!(DayState::from_items(key, vec![], None).is_clean());
    }
}
