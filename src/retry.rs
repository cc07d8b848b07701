//! The one backoff of the code base: exponential, capped, optionally with full jitter.
//!
//! Every retry loop (broker reconnects, aggregator activation while the tables are down,
//! the flusher after a failed cycle, DynamoDB throttling) waits by a [`Backoff`], so that
//! their shape is the same and a test of it covers them all.

use std::time::Duration;

/// Delays of `start`, `2·start`, `4·start`, … up to `cap`; with jitter each delay is drawn
/// uniformly from `0..=ceiling` ("full jitter"), which spreads the retries of many clients
/// hitting one recovering service.
#[derive(Clone, Debug)]
pub struct Backoff {
    start: Duration,
    cap: Duration,
    ceiling: Duration,
    jitter: bool,
}

impl Backoff {
    /// Without jitter: for a single retrier (one reconnect loop, one flusher).
    pub fn new(start: Duration, cap: Duration) -> Self {
        Backoff { start, cap: cap.max(start), ceiling: start, jitter: false }
    }

    /// With full jitter: for many concurrent retriers of one shared service.
    pub fn jittered(start: Duration, cap: Duration) -> Self {
        Backoff { jitter: true, ..Self::new(start, cap) }
    }

    /// The next delay; the ceiling doubles for the call after.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.cap);
        if self.jitter {
            Duration::from_nanos(rand::random::<u64>() % (ceiling.as_nanos() as u64).saturating_add(1))
        } else {
            ceiling
        }
    }

    /// The delay the next call would start from (for logs: "retrying in …").
    pub fn ceiling(&self) -> Duration {
        self.ceiling
    }

    /// Back to `start`, after a success.
    pub fn reset(&mut self) {
        self.ceiling = self.start;
    }

    /// Waits the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let got: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(got, [100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_under_the_ceiling_and_varies() {
        let mut b = Backoff::jittered(Duration::from_millis(10), Duration::from_millis(80));
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            let ceiling = Duration::from_millis(10 << i.min(3));
            let d = b.next_delay();
            assert!(d <= ceiling, "attempt {i}: {d:?} > {ceiling:?}");
            seen.insert(d);
        }
        assert!(seen.len() > 50, "full jitter must spread the delays, got {} distinct", seen.len());
    }
}
