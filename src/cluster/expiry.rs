//! Lease expiry as an observer sees it, on its own clock.
//!
//! Hosts' wall clocks disagree and jump, so no row carries a time. Instead every write to
//! a row changes its value (a renewal bumps the counter, an owner change bumps the epoch),
//! and an observer remembers when *it* first saw each value, on its monotonic clock
//! (`tokio::time::Instant`). A row is expired for this observer when its value has stayed
//! the same for `lease_duration` since then. An observer that starts, or sees a row for the
//! first time, waits a whole lease duration before it considers that row expired.
//!
//! Why this is safe against the owner's self-fence: the owner stops using a lease at
//! `sent + lease_duration - safety_margin` on its clock, where `sent` is when it sent its
//! last successful renewal. DynamoDB applied that renewal after `sent`, and an observer saw
//! the new value after that, so the observer's expiry (`first_seen + lease_duration`) comes
//! at least `safety_margin` after the owner stopped, as long as the two clocks run at about
//! the same rate (drift is parts per million; the margin is for scheduling delays).
//!
//! The observer is pure: callers pass `now`, so tests need no paused runtime.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Remembers, per key, the last value seen and when this observer first saw it.
#[derive(Debug)]
pub struct ExpiryObserver<K, V> {
    lease_duration: Duration,
    seen: HashMap<K, (V, Instant)>,
}

impl<K: Eq + Hash + Clone, V: Eq + Clone> ExpiryObserver<K, V> {
    pub fn new(lease_duration: Duration) -> Self {
        ExpiryObserver { lease_duration, seen: HashMap::new() }
    }

    pub fn lease_duration(&self) -> Duration {
        self.lease_duration
    }

    /// Records that `key` has `value` at `now`; returns whether the row is expired, i.e.
    /// the same value has been seen since at least `lease_duration` ago.
    pub fn observe(&mut self, key: &K, value: &V, now: Instant) -> bool {
        match self.seen.get_mut(key) {
            Some((old, since)) if old == value => now.saturating_duration_since(*since) >= self.lease_duration,
            Some(entry) => {
                *entry = (value.clone(), now);
                false
            }
            None => {
                self.seen.insert(key.clone(), (value.clone(), now));
                false
            }
        }
    }

    /// Whether `key` has been observed (and not forgotten).
    pub fn knows(&self, key: &K) -> bool {
        self.seen.contains_key(key)
    }

    /// Whether `key` is expired at `now` with the value last observed (false if never seen).
    pub fn is_expired(&self, key: &K, now: Instant) -> bool {
        self.seen.get(key).is_some_and(|(_, since)| now.saturating_duration_since(*since) >= self.lease_duration)
    }

    /// When the last observed value of `key` expires unless it changes.
    pub fn expires_at(&self, key: &K) -> Option<Instant> {
        self.seen.get(key).map(|(_, since)| *since + self.lease_duration)
    }

    /// Forgets keys that are no longer in the table (a deleted node row), so that a row
    /// that comes back is judged from scratch.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.seen.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    #[test]
    fn unchanged_value_expires_after_the_lease_on_the_observers_clock() {
        let t0 = Instant::now();
        let mut o = ExpiryObserver::new(LEASE);
        assert!(!o.observe(&1u16, &(5u64, 7u64), t0));
        assert!(!o.observe(&1, &(5, 7), t0 + Duration::from_secs(9)));
        assert!(!o.is_expired(&1, t0 + LEASE - Duration::from_millis(1)));
        assert!(o.is_expired(&1, t0 + LEASE));
        assert!(o.observe(&1, &(5, 7), t0 + LEASE));
        assert_eq!(o.expires_at(&1), Some(t0 + LEASE));
    }

    #[test]
    fn a_renewal_or_an_owner_change_restarts_the_clock() {
        let t0 = Instant::now();
        let mut o = ExpiryObserver::new(LEASE);
        o.observe(&1u16, &(5u64, 7u64), t0);
        // a renewal (counter) seen late still restarts from when *we* saw it
        assert!(!o.observe(&1, &(5, 8), t0 + Duration::from_secs(9)));
        assert!(!o.observe(&1, &(5, 8), t0 + Duration::from_secs(18)));
        assert!(o.observe(&1, &(5, 8), t0 + Duration::from_secs(19)));
        // a new owner (epoch) is a new value too, even with an equal counter
        assert!(!o.observe(&1, &(6, 8), t0 + Duration::from_secs(20)));
    }

    #[test]
    fn a_fresh_observer_waits_a_whole_lease_whatever_the_row_says() {
        // An observer that starts late cannot know how long the value stood before: it
        // assumes it was just written. Keys are independent.
        let t0 = Instant::now();
        let mut o = ExpiryObserver::new(LEASE);
        o.observe(&1u16, &1u64, t0);
        o.observe(&2u16, &1u64, t0 + Duration::from_secs(5));
        assert!(o.is_expired(&1, t0 + LEASE));
        assert!(!o.is_expired(&2, t0 + LEASE));
        assert!(!o.is_expired(&3, t0 + LEASE * 100));
        o.retain(|k| *k != 1);
        assert!(!o.is_expired(&1, t0 + LEASE * 100));
        assert!(!o.observe(&1, &1, t0 + LEASE * 100));
    }

    #[test]
    fn the_owners_self_fence_comes_before_any_observers_expiry() {
        // Owner sends its last successful renewal at `sent`; DynamoDB applies it later; an
        // observer sees it later still. The owner stops at sent + lease - margin.
        let margin = Duration::from_secs(2);
        let sent = Instant::now();
        for seen_after in [Duration::ZERO, Duration::from_millis(1), Duration::from_secs(3)] {
            let mut o = ExpiryObserver::new(LEASE);
            o.observe(&0u16, &(1u64, 42u64), sent + seen_after);
            let owner_stops = sent + LEASE - margin;
            assert!(!o.is_expired(&0, owner_stops));
            assert!(!o.is_expired(&0, owner_stops + margin - Duration::from_millis(1) + seen_after));
        }
    }
}
