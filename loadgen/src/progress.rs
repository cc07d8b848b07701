//! The progress bar on stderr (indicatif): requests done of the run's total (or seconds of its
//! duration), the rate, the ETA and the errors so far.
//!
//! Shown only on a terminal and without `-q`: the bench runs the client with `-q` and its
//! stderr in a log file, where a redrawn bar would be noise.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Counters the workers bump as requests end; the bar reads them.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests finished (successful or not).
    pub done: AtomicU64,
    /// Requests that failed in the end (after their retries).
    pub failed: AtomicU64,
    /// Attempts answered with an error status or with no answer (retried or not).
    pub error_answers: AtomicU64,
}

/// Whether to draw the bar at all.
pub fn wanted(quiet: bool, stderr_is_terminal: bool) -> bool {
    !quiet && stderr_is_terminal
}

/// The bars' home for an invocation: `Some` when they are to be drawn on stderr.
pub fn stderr_bars(quiet: bool) -> Option<MultiProgress> {
    wanted(quiet, std::io::stderr().is_terminal()).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// What a run counts towards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    Requests(u64),
    Duration(Duration),
}

/// One run's bar.
pub struct Bar {
    bar: ProgressBar,
    goal: Goal,
    start: Instant,
    /// (when, done) at the start of the rate window: the rate shown is over the last second
    /// (indicatif's {per_sec} prints four decimals of a smoothed rate).
    window: (Instant, u64),
    rate: f64,
}

impl Bar {
    pub fn new(bars: &MultiProgress, label: &str, goal: Goal) -> Bar {
        let (len, template) = match goal {
            // indicatif's ETA follows the position: requests here.
            Goal::Requests(n) => (n, "{prefix} [{bar:30.cyan/blue}] {human_pos}/{human_len} ETA {eta} | {msg}".to_string()),
            // The position is milliseconds here, so its ETA is the time left.
            Goal::Duration(d) => (
                d.as_millis() as u64,
                format!("{{prefix}} [{{bar:30.cyan/blue}}] {{elapsed}}/{}s ETA {{eta}} | {{msg}}", d.as_secs_f64().ceil()),
            ),
        };
        let style = ProgressStyle::with_template(&template).expect("a valid template").progress_chars("=> ");
        let bar = bars.add(ProgressBar::new(len.max(1)).with_style(style).with_prefix(label.to_string()));
        let now = Instant::now();
        Bar { bar, goal, start: now, window: (now, 0), rate: 0.0 }
    }

    /// Redraw from the counters; `phase` names the running phase.
    pub fn update(&mut self, live: &Live, phase: &str, breaker_open: bool) {
        let now = Instant::now();
        let done = live.done.load(Ordering::Relaxed);
        let failed = live.failed.load(Ordering::Relaxed);
        let errors = live.error_answers.load(Ordering::Relaxed);
        let dt = now.duration_since(self.window.0);
        if dt >= Duration::from_secs(1) {
            self.rate = (done - self.window.1) as f64 / dt.as_secs_f64();
            self.window = (now, done);
        } else if self.rate == 0.0 && now > self.start {
            // The first second: the average so far.
            self.rate = done as f64 / now.duration_since(self.start).as_secs_f64();
        }
        let mut msg = match self.goal {
            Goal::Requests(_) => {
                self.bar.set_position(done);
                format!("{:.0} req/s, ", self.rate)
            }
            Goal::Duration(d) => {
                self.bar.set_position(now.duration_since(self.start).min(d).as_millis() as u64);
                format!("{done} done, {:.0} req/s, ", self.rate)
            }
        };
        msg.push_str(&status_message(failed, errors, phase, breaker_open));
        self.bar.set_message(msg);
    }

    /// Leave the bar's last state on the screen (as it is: a run that stopped short of its
    /// goal must not show a full bar).
    pub fn finish(&self) {
        self.bar.abandon();
    }
}

/// The bar's message: errors so far, the phase, the breaker when open.
pub fn status_message(failed: u64, error_answers: u64, phase: &str, breaker_open: bool) -> String {
    let mut m = format!("errors: {failed} failed, {error_answers} error answers");
    if !phase.is_empty() {
        m.push_str(" [");
        m.push_str(phase);
        m.push(']');
    }
    if breaker_open {
        m.push_str(" breaker OPEN");
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::InMemoryTerm;

    #[test]
    fn hidden_when_quiet_or_not_a_terminal() {
        assert!(wanted(false, true));
        assert!(!wanted(true, true));
        assert!(!wanted(false, false));
        assert!(!wanted(true, false));
    }

    #[test]
    fn the_message_names_errors_phase_and_breaker() {
        assert_eq!(status_message(0, 0, "", false), "errors: 0 failed, 0 error answers");
        assert_eq!(
            status_message(2, 7, "phase 2: 128 workers", true),
            "errors: 2 failed, 7 error answers [phase 2: 128 workers] breaker OPEN"
        );
    }

    fn term_bars() -> (InMemoryTerm, MultiProgress) {
        let term = InMemoryTerm::new(4, 200);
        let bars = MultiProgress::with_draw_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        (term, bars)
    }

    #[test]
    fn a_request_run_shows_count_rate_eta_and_errors() {
        let (term, bars) = term_bars();
        let mut bar = Bar::new(&bars, "post 1000 rides", Goal::Requests(1000));
        let live = Live::default();
        live.done.store(250, Ordering::Relaxed);
        live.failed.store(3, Ordering::Relaxed);
        live.error_answers.store(9, Ordering::Relaxed);
        bar.update(&live, "phase 1: 32 workers", false);
        bar.finish();
        let screen = term.contents();
        for part in ["post 1000 rides [=======>", "] 250/1,000 ETA ", " req/s, errors: 3 failed, 9 error answers [phase 1: 32 workers]"] {
            assert!(screen.contains(part), "{part:?} not in {screen:?}");
        }
    }

    #[test]
    fn a_duration_run_shows_time_rate_and_errors() {
        let (term, bars) = term_bars();
        let mut bar = Bar::new(&bars, "mixed", Goal::Duration(Duration::from_secs(30)));
        let live = Live::default();
        live.done.store(42, Ordering::Relaxed);
        bar.update(&live, "", true);
        bar.finish();
        let screen = term.contents();
        for part in ["mixed [", "/30s ETA ", "| 42 done, ", " req/s, errors: 0 failed, 0 error answers breaker OPEN"] {
            assert!(screen.contains(part), "{part:?} not in {screen:?}");
        }
    }
}
