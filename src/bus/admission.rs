//! Admission control in front of the write path, as a [`Publisher`] wrapper:
//!
//! - a **token bucket** whose refill rate follows the pressure downstream — queue depth,
//!   WAL fill, flush lag. At low pressure it refills at `rate` and never bites; as the
//!   queue fills, refill slows and POSTs get `429` + `Retry-After` *before* the queue is
//!   full, so the requests that are accepted keep a bounded latency instead of all of them
//!   waiting behind a full queue;
//! - a **circuit breaker** that fails fast while the bus is unavailable: after
//!   `breaker_failures` consecutive unavailable/timeout answers it opens for
//!   `breaker_open_ms` and answers `503` at once, then lets one probe through (half-open).

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{BusStats, Publisher};
use crate::domain::RideEvent;
use crate::error::PublishError;
use crate::trace::RequestId;

/// How full things are downstream, each in 0.0 (idle) ..= 1.0 (at its bound).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Pressure {
    pub queue: f64,
    pub wal: f64,
    pub flush_lag: f64,
}

impl Pressure {
    /// Refill multiplier: 1 while every signal is under half its bound, then falling
    /// linearly to 0 at the bound. The worst signal decides.
    pub fn refill_factor(&self) -> f64 {
        let worst = self.queue.max(self.wal).max(self.flush_lag).clamp(0.0, 1.0);
        if worst <= 0.5 {
            1.0
        } else {
            (1.0 - worst) / 0.5
        }
    }
}

#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// Base refill, rides per second; 0 turns the bucket off.
    pub rate: f64,
    /// Bucket size: the burst accepted at once.
    pub burst: f64,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Clone, Debug, Serialize)]
pub struct AdmissionStats {
    pub rate: f64,
    pub refill_rate_now: f64,
    pub tokens: f64,
    pub pressure: Pressure,
    pub rate_limited_total: u64,
    pub breaker: BreakerState,
    pub breaker_opens_total: u64,
    pub breaker_rejected_total: u64,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

struct Breaker {
    state: BreakerState,
    failures: u32,
    opened_at: Instant,
    probe_in_flight: bool,
}

/// Reads the current pressure; built by the service from the bus, WAL and flusher.
pub type PressureFn = Box<dyn Fn() -> Pressure + Send + Sync>;

pub struct Admitted {
    inner: Arc<dyn Publisher>,
    cfg: AdmissionConfig,
    pressure: PressureFn,
    bucket: Mutex<Bucket>,
    breaker: Mutex<Breaker>,
    rate_limited: AtomicU64,
    breaker_opens: AtomicU64,
    breaker_rejected: AtomicU64,
}

impl Admitted {
    pub fn new(inner: Arc<dyn Publisher>, cfg: AdmissionConfig, pressure: PressureFn) -> Self {
        let now = Instant::now();
        Admitted {
            inner,
            bucket: Mutex::new(Bucket { tokens: cfg.burst, last: now }),
            breaker: Mutex::new(Breaker { state: BreakerState::Closed, failures: 0, opened_at: now, probe_in_flight: false }),
            cfg,
            pressure,
            rate_limited: AtomicU64::new(0),
            breaker_opens: AtomicU64::new(0),
            breaker_rejected: AtomicU64::new(0),
        }
    }

    /// Takes a token, or says how long until one is due.
    fn take_token(&self) -> Result<(), u32> {
        if self.cfg.rate <= 0.0 {
            return Ok(());
        }
        let refill = self.cfg.rate * (self.pressure)().refill_factor();
        let mut b = self.bucket.lock();
        let now = Instant::now();
        b.tokens = (b.tokens + refill * now.duration_since(b.last).as_secs_f64()).min(self.cfg.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        // At zero refill (a full queue) ask for a second: pressure is re-read then.
        let wait = if refill > 0.0 { (1.0 - b.tokens) / refill } else { 1.0 };
        Err(wait.ceil().clamp(1.0, 30.0) as u32)
    }

    /// Whether the breaker lets this request through; marks a half-open probe.
    fn breaker_allows(&self) -> bool {
        let mut br = self.breaker.lock();
        match br.state {
            BreakerState::Closed => true,
            BreakerState::Open if br.opened_at.elapsed() >= self.cfg.breaker_open => {
                br.state = BreakerState::HalfOpen;
                br.probe_in_flight = true;
                true
            }
            BreakerState::Open => false,
            BreakerState::HalfOpen if !br.probe_in_flight => {
                br.probe_in_flight = true;
                true
            }
            BreakerState::HalfOpen => false,
        }
    }

    fn breaker_record(&self, result: &Result<(), PublishError>) {
        let failed = matches!(result, Err(PublishError::Unavailable(_) | PublishError::Uncertain(_) | PublishError::Timeout));
        let mut br = self.breaker.lock();
        br.probe_in_flight = false;
        if !failed {
            br.failures = 0;
            br.state = BreakerState::Closed;
            return;
        }
        br.failures += 1;
        if br.state == BreakerState::HalfOpen || br.failures >= self.cfg.breaker_failures {
            if br.state != BreakerState::Open {
                self.breaker_opens.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(failures = br.failures, "write path circuit opened: the bus is unavailable");
            }
            br.state = BreakerState::Open;
            br.opened_at = Instant::now();
        }
    }

    pub fn admission_stats(&self) -> AdmissionStats {
        let pressure = (self.pressure)();
        AdmissionStats {
            rate: self.cfg.rate,
            refill_rate_now: self.cfg.rate * pressure.refill_factor(),
            tokens: self.bucket.lock().tokens,
            pressure,
            rate_limited_total: self.rate_limited.load(Ordering::Relaxed),
            breaker: self.breaker.lock().state,
            breaker_opens_total: self.breaker_opens.load(Ordering::Relaxed),
            breaker_rejected_total: self.breaker_rejected.load(Ordering::Relaxed),
        }
    }
}

#[async_trait]
impl Publisher for Admitted {
    async fn publish_for(&self, event: RideEvent, request: RequestId) -> Result<(), PublishError> {
        if !self.breaker_allows() {
            self.breaker_rejected.fetch_add(1, Ordering::Relaxed);
            return Err(PublishError::Unavailable("the event bus is failing; the circuit is open".into()));
        }
        if let Err(retry_after_secs) = self.take_token() {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
            // Not a bus failure: release a half-open probe slot without judging the bus.
            self.breaker.lock().probe_in_flight = false;
            return Err(PublishError::RateLimited { retry_after_secs });
        }
        let result = self.inner.publish_for(event, request).await;
        self.breaker_record(&result);
        result
    }

    fn stats(&self) -> BusStats {
        let mut s = self.inner.stats();
        s.admission = Some(self.admission_stats());
        s
    }

    fn close(&self) {
        self.inner.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct Fake {
        fail: AtomicBool,
    }

    #[async_trait]
    impl Publisher for Fake {
        async fn publish_for(&self, _: RideEvent, _: RequestId) -> Result<(), PublishError> {
            if self.fail.load(Ordering::SeqCst) {
                Err(PublishError::Unavailable("down".into()))
            } else {
                Ok(())
            }
        }
        fn stats(&self) -> BusStats {
            BusStats::default()
        }
        fn close(&self) {}
    }

    fn ev() -> RideEvent {
        RideEvent { id: 1, resort: 1, season: 2025, day: 1, skier: 1, time: 1, lift: 1, vertical: 10 }
    }

    #[test]
    fn refill_follows_the_worst_pressure() {
        assert_eq!(Pressure { queue: 0.3, wal: 0.1, flush_lag: 0.0 }.refill_factor(), 1.0);
        assert!((Pressure { queue: 0.75, wal: 0.1, flush_lag: 0.0 }.refill_factor() - 0.5).abs() < 1e-9);
        assert_eq!(Pressure { queue: 0.1, wal: 1.0, flush_lag: 0.0 }.refill_factor(), 0.0);
    }

    #[tokio::test]
    async fn bucket_limits_under_pressure_and_breaker_opens_then_probes() {
        let fake = Arc::new(Fake { fail: AtomicBool::new(false) });
        let full = Arc::new(AtomicBool::new(false));
        let f = full.clone();
        let a = Admitted::new(
            fake.clone(),
            AdmissionConfig { rate: 1000.0, burst: 5.0, breaker_failures: 3, breaker_open: Duration::from_millis(100) },
            Box::new(move || Pressure { queue: if f.load(Ordering::SeqCst) { 1.0 } else { 0.0 }, ..Default::default() }),
        );
        // A full queue stops the refill: the burst is all that gets in.
        full.store(true, Ordering::SeqCst);
        let mut ok = 0;
        for _ in 0..20 {
            if a.publish(ev()).await.is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 5);
        assert!(matches!(a.publish(ev()).await, Err(PublishError::RateLimited { retry_after_secs: 1 })));
        full.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(a.publish(ev()).await.is_ok());

        // Three failures open the circuit; then requests fail without reaching the bus.
        fake.fail.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let _ = a.publish(ev()).await;
        }
        assert_eq!(a.admission_stats().breaker, BreakerState::Open);
        fake.fail.store(false, Ordering::SeqCst);
        assert!(matches!(a.publish(ev()).await, Err(PublishError::Unavailable(_))));
        assert_eq!(a.admission_stats().breaker_rejected_total, 1);
        // After the open period one probe goes through and closes it.
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(a.publish(ev()).await.is_ok());
        assert_eq!(a.admission_stats().breaker, BreakerState::Closed);
    }
}
