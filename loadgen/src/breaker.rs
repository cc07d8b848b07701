//! Client-side circuit breaker: stop sending while too many requests are in flight or too
//! many recent attempts failed; resume once both are back under the (lower) close thresholds.
//! The gap between open and close thresholds keeps it from flapping.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub enabled: bool,
    pub open_inflight: usize,
    pub close_inflight: usize,
    pub open_error_rate: f64,
    pub close_error_rate: f64,
    /// Fewest attempts in the window before the error rate is trusted.
    pub min_samples: u64,
    pub window: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            open_inflight: 1000,
            close_inflight: 500,
            open_error_rate: 0.5,
            close_error_rate: 0.1,
            min_samples: 50,
            window: Duration::from_secs(1),
        }
    }
}

/// The decision alone, as a pure function: the next state (true = open) given the current one.
pub fn next_state(cfg: &BreakerConfig, open: bool, in_flight: usize, attempts: u64, errors: u64) -> bool {
    if !cfg.enabled {
        return false;
    }
    let rate = if attempts >= cfg.min_samples && attempts > 0 { errors as f64 / attempts as f64 } else { 0.0 };
    if !open {
        in_flight >= cfg.open_inflight || (attempts >= cfg.min_samples && rate >= cfg.open_error_rate)
    } else {
        !(in_flight <= cfg.close_inflight && rate <= cfg.close_error_rate)
    }
}

const SLOTS: usize = 10;

/// Attempts and errors over the last `window`, in ten slots that age out by time.
#[derive(Debug)]
pub struct ErrorWindow {
    slot_us: u64,
    slots: [(u64, u64, u64); SLOTS], // (slot number, attempts, errors)
}

impl ErrorWindow {
    pub fn new(window: Duration) -> ErrorWindow {
        ErrorWindow { slot_us: (window.as_micros() as u64 / SLOTS as u64).max(1), slots: [(u64::MAX, 0, 0); SLOTS] }
    }

    pub fn add(&mut self, at_us: u64, error: bool) {
        let n = at_us / self.slot_us;
        let s = &mut self.slots[(n % SLOTS as u64) as usize];
        if s.0 != n {
            *s = (n, 0, 0);
        }
        s.1 += 1;
        s.2 += error as u64;
    }

    /// (attempts, errors) in the window ending at `at_us`.
    pub fn totals(&self, at_us: u64) -> (u64, u64) {
        let n = at_us / self.slot_us;
        self.slots.iter().filter(|s| s.0 != u64::MAX && s.0 <= n && n - s.0 < SLOTS as u64).fold((0, 0), |(a, e), s| (a + s.1, e + s.2))
    }
}

/// The live breaker shared by all workers of a run.
pub struct Breaker {
    cfg: BreakerConfig,
    epoch: Instant,
    open: AtomicBool,
    pub in_flight: AtomicUsize,
    window: Mutex<ErrorWindow>,
    openings: AtomicU64,
    quiet: bool,
    /// The progress bars its messages go above (a plain line would be drawn over).
    bars: Option<indicatif::MultiProgress>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, quiet: bool) -> Breaker {
        let window = Mutex::new(ErrorWindow::new(cfg.window));
        Breaker {
            cfg,
            epoch: Instant::now(),
            open: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            window,
            openings: AtomicU64::new(0),
            quiet,
            bars: None,
        }
    }

    /// Print the open/close messages above these progress bars instead of on a plain line.
    pub fn print_above(&mut self, bars: indicatif::MultiProgress) {
        self.bars = Some(bars);
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub fn openings(&self) -> u64 {
        self.openings.load(Ordering::Relaxed)
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Count one finished attempt and re-evaluate.
    pub fn record(&self, error: bool) {
        if !self.cfg.enabled {
            return;
        }
        let now = self.now_us();
        let (attempts, errors) = {
            let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
            w.add(now, error);
            w.totals(now)
        };
        self.evaluate(attempts, errors);
    }

    fn evaluate(&self, attempts: u64, errors: u64) {
        let open = self.is_open();
        let in_flight = self.in_flight.load(Ordering::Relaxed);
        let next = next_state(&self.cfg, open, in_flight, attempts, errors);
        if next != open && self.open.compare_exchange(open, next, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            let rate = if attempts > 0 { errors as f64 * 100.0 / attempts as f64 } else { 0.0 };
            if next {
                self.openings.fetch_add(1, Ordering::Relaxed);
            }
            if !self.quiet {
                let msg = format!(
                    "breaker {} (in flight {in_flight}, errors {errors}/{attempts} = {rate:.0}% in the last {:?})",
                    if next { "OPEN: pausing requests" } else { "CLOSED: sending again" },
                    self.cfg.window
                );
                match &self.bars {
                    Some(b) => {
                        let _ = b.println(msg);
                    }
                    None => eprintln!("{msg}"),
                }
            }
        }
    }

    /// Wait while the breaker is open (re-checking as the error window ages).
    pub async fn admit(&self) {
        while self.is_open() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.now_us();
            let (a, e) = self.window.lock().unwrap_or_else(|e| e.into_inner()).totals(now);
            self.evaluate(a, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_in_flight_and_closes_below_the_lower_threshold() {
        let c = BreakerConfig { open_inflight: 100, close_inflight: 50, ..Default::default() };
        assert!(!next_state(&c, false, 99, 0, 0));
        assert!(next_state(&c, false, 100, 0, 0));
        // Hysteresis: between the thresholds it stays as it is.
        assert!(next_state(&c, true, 75, 0, 0));
        assert!(!next_state(&c, false, 75, 0, 0));
        assert!(!next_state(&c, true, 50, 0, 0));
    }

    #[test]
    fn opens_on_error_rate_only_with_enough_samples() {
        let c = BreakerConfig { open_error_rate: 0.5, close_error_rate: 0.1, min_samples: 50, ..Default::default() };
        assert!(!next_state(&c, false, 1, 10, 10), "too few samples");
        assert!(!next_state(&c, false, 1, 100, 49));
        assert!(next_state(&c, false, 1, 100, 50));
        assert!(next_state(&c, true, 1, 100, 20), "20% is above the close threshold");
        assert!(!next_state(&c, true, 1, 100, 10));
        assert!(!next_state(&c, true, 1, 0, 0), "an empty window closes it");
        let off = BreakerConfig { enabled: false, ..c };
        assert!(!next_state(&off, false, 1_000_000, 100, 100));
    }

    #[test]
    fn error_window_ages_out() {
        let mut w = ErrorWindow::new(Duration::from_secs(1));
        for i in 0..10 {
            w.add(i * 10_000, i % 2 == 0);
        }
        assert_eq!(w.totals(100_000), (10, 5));
        w.add(950_000, true);
        assert_eq!(w.totals(950_000), (11, 6));
        // 1.05 s later than the first batch: its slot (0-100 ms) has aged out.
        assert_eq!(w.totals(1_050_000), (1, 1));
        assert_eq!(w.totals(5_000_000), (0, 0));
    }

    #[tokio::test]
    async fn live_breaker_opens_then_closes_as_errors_age() {
        let cfg = BreakerConfig { min_samples: 10, window: Duration::from_millis(100), ..Default::default() };
        let b = Breaker::new(cfg, true);
        for _ in 0..10 {
            b.record(true);
        }
        assert!(b.is_open());
        assert_eq!(b.openings(), 1);
        tokio::time::timeout(Duration::from_secs(2), b.admit()).await.expect("closes once the errors aged out");
        assert!(!b.is_open());
    }
}
