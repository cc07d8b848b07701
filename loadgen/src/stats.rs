//! Per-worker counters and HDR latency histograms, merged at the end into summaries.

use std::time::Duration;

use hdrhistogram::Histogram;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Post,
    SkierDay,
    ResortDay,
    Vertical,
}

impl OpKind {
    pub const ALL: [OpKind; 4] = [OpKind::Post, OpKind::SkierDay, OpKind::ResortDay, OpKind::Vertical];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Name in summaries, JSON and CSV.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Post => "POST ride",
            OpKind::SkierDay => "GET skier-day",
            OpKind::ResortDay => "GET resort-day",
            OpKind::Vertical => "GET vertical",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            OpKind::Post => "POST",
            OpKind::SkierDay => "GET-skier-day",
            OpKind::ResortDay => "GET-resort-day",
            OpKind::Vertical => "GET-vertical",
        }
    }

    /// Whether a status is a successful answer: 201 for a ride (clients count only 201);
    /// 200 for a read, and 404 too ("Data not found" for a skier without rides is an answer).
    pub fn is_success(self, status: u16) -> bool {
        match self {
            OpKind::Post => status == 201,
            _ => status == 200 || status == 404,
        }
    }
}

/// Status slots: index 0 counts transport errors (no HTTP answer: refused, reset, timeout).
const STATUS_SLOTS: usize = 600;

/// Why an attempt got no HTTP answer (the summary's error distribution, as oha's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TransportError {
    Timeout,
    Refused,
    Reset,
    /// The server closed the connection before the response ended.
    Closed,
    InvalidResponse,
    Other,
}

impl TransportError {
    pub const ALL: [TransportError; 6] = [
        TransportError::Timeout,
        TransportError::Refused,
        TransportError::Reset,
        TransportError::Closed,
        TransportError::InvalidResponse,
        TransportError::Other,
    ];

    pub fn of(e: &std::io::Error) -> TransportError {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::TimedOut => TransportError::Timeout,
            K::ConnectionRefused => TransportError::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => TransportError::Reset,
            K::UnexpectedEof => TransportError::Closed,
            K::InvalidData => TransportError::InvalidResponse,
            _ => TransportError::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TransportError::Timeout => "timeout",
            TransportError::Refused => "connection refused",
            TransportError::Reset => "connection reset",
            TransportError::Closed => "connection closed before the response ended",
            TransportError::InvalidResponse => "invalid response",
            TransportError::Other => "other I/O error",
        }
    }
}

/// The percentiles of the summaries (oha's set): (name, quantile).
pub const PERCENTILES: [(&str, f64); 9] = [
    ("p10", 0.10),
    ("p25", 0.25),
    ("p50", 0.50),
    ("p75", 0.75),
    ("p90", 0.90),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p99.9", 0.999),
    ("p99.99", 0.9999),
];

/// Bars of the summaries' response-time histogram (linear from fastest to slowest, as oha's).
pub const HISTOGRAM_BARS: usize = 11;

/// Counters of one kind of request.
pub struct KindStats {
    /// Latency per request (first attempt, or scheduled time in open loop, to final answer), µs.
    pub hist: Histogram<u64>,
    pub successes: u64,
    pub failures: u64,
    /// Attempts including retries.
    pub attempts: u64,
    /// Answers per status over all attempts; [0] = transport errors.
    pub status: Box<[u64; STATUS_SLOTS]>,
    /// Each request's final answer per status; [0] = ended on a transport error.
    pub final_status: Box<[u64; STATUS_SLOTS]>,
    /// Transport errors over all attempts, per [`TransportError`].
    pub errors: [u64; 6],
}

/// Latencies are recorded from 1 µs to 1 h at 3 significant digits (0.1 % resolution).
pub const HIST_MAX_US: u64 = 3_600_000_000;

impl KindStats {
    pub fn new() -> KindStats {
        KindStats {
            hist: Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds"),
            successes: 0,
            failures: 0,
            attempts: 0,
            status: Box::new([0; STATUS_SLOTS]),
            final_status: Box::new([0; STATUS_SLOTS]),
            errors: [0; 6],
        }
    }

    /// An attempt that got no answer, and why (its status 0 is counted by `count_status`).
    pub fn count_error(&mut self, e: TransportError) {
        self.errors[e as usize] += 1;
    }

    /// The answer a request ended with (0: a transport error), once per request.
    pub fn count_final(&mut self, status: u16) {
        self.final_status[(status as usize).min(STATUS_SLOTS - 1)] += 1;
    }

    pub fn count_status(&mut self, status: u16) {
        let i = (status as usize).min(STATUS_SLOTS - 1);
        self.status[i] += 1;
    }

    pub fn record(&mut self, latency: Duration, ok: bool, attempts: u32) {
        let us = (latency.as_micros() as u64).clamp(1, HIST_MAX_US);
        self.hist.record(us).expect("value within bounds");
        if ok {
            self.successes += 1;
        } else {
            self.failures += 1;
        }
        self.attempts += attempts as u64;
    }

    pub fn merge(&mut self, other: &KindStats) {
        self.hist.add(&other.hist).expect("same bounds");
        self.successes += other.successes;
        self.failures += other.failures;
        self.attempts += other.attempts;
        for (a, b) in self.status.iter_mut().zip(other.status.iter()) {
            *a += b;
        }
        for (a, b) in self.final_status.iter_mut().zip(other.final_status.iter()) {
            *a += b;
        }
        for (a, b) in self.errors.iter_mut().zip(other.errors.iter()) {
            *a += b;
        }
    }

    pub fn requests(&self) -> u64 {
        self.successes + self.failures
    }
}

impl Default for KindStats {
    fn default() -> Self {
        KindStats::new()
    }
}

/// The numbers printed and written for one kind of request.
#[derive(Debug, Clone, PartialEq)]
pub struct KindSummary {
    pub kind: OpKind,
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub attempts: u64,
    pub retries: u64,
    pub transport_errors: u64,
    pub wall_s: f64,
    /// Completed requests per second of wall time.
    pub throughput: f64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub min_us: u64,
    pub max_us: u64,
    /// (status, answers) over all attempts, transport errors excluded.
    pub status: Vec<(u16, u64)>,
    /// successes / requests (1 when there were none, as nothing failed).
    pub success_rate: f64,
    /// (name, µs) for each of [`PERCENTILES`].
    pub percentiles: Vec<(&'static str, u64)>,
    /// (status, requests) of each request's final answer, transport errors excluded: one
    /// per request, as oha counts (`status` counts every attempt).
    pub final_status: Vec<(u16, u64)>,
    /// (kind, attempts) of the transport errors, most frequent first.
    pub errors: Vec<(&'static str, u64)>,
    /// (upper bound µs, requests) of [`HISTOGRAM_BARS`] equal slices from fastest to slowest.
    pub histogram: Vec<(u64, u64)>,
}

/// Equal slices of [min, max] with the requests in each: (upper bound µs, requests).
fn linear_histogram(h: &Histogram<u64>, bars: usize) -> Vec<(u64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let (lo, hi) = (h.min(), h.max());
    // A range narrower than the bars gets fewer bars, 1 µs each.
    let width = ((hi - lo) as f64 / bars as f64).max(1.0);
    let bars = bars.min((hi - lo) as usize + 1);
    let mut counts = vec![0u64; bars];
    for v in h.iter_recorded() {
        let x = v.value_iterated_to().clamp(lo, hi);
        counts[(((x - lo) as f64 / width) as usize).min(bars - 1)] += v.count_at_value();
    }
    // A bar holds [lo + w i, lo + w (i + 1)): its highest whole µs is its upper bound.
    let upper = |i: usize| if i + 1 == bars { hi } else { (lo as f64 + width * (i + 1) as f64).ceil() as u64 - 1 };
    counts.into_iter().enumerate().map(|(i, n)| (upper(i), n)).collect()
}

pub fn summarize(kind: OpKind, s: &KindStats, wall: Duration) -> KindSummary {
    let wall_s = wall.as_secs_f64();
    let requests = s.requests();
    let empty = s.hist.is_empty();
    let q = |p: f64| if empty { 0 } else { s.hist.value_at_quantile(p) };
    KindSummary {
        kind,
        requests,
        successes: s.successes,
        failures: s.failures,
        attempts: s.attempts,
        retries: s.attempts.saturating_sub(requests),
        transport_errors: s.status[0],
        wall_s,
        throughput: if wall_s > 0.0 { requests as f64 / wall_s } else { 0.0 },
        mean_us: if empty { 0.0 } else { s.hist.mean() },
        p50_us: q(0.5),
        p99_us: q(0.99),
        p999_us: q(0.999),
        min_us: if empty { 0 } else { s.hist.min() },
        max_us: if empty { 0 } else { s.hist.max() },
        status: nonzero(&s.status[..]),
        success_rate: if requests > 0 { s.successes as f64 / requests as f64 } else { 1.0 },
        percentiles: PERCENTILES.iter().map(|&(name, p)| (name, q(p))).collect(),
        final_status: nonzero(&s.final_status[..]),
        errors: {
            let mut e: Vec<(&'static str, u64)> =
                TransportError::ALL.iter().map(|&k| (k.name(), s.errors[k as usize])).filter(|(_, n)| *n > 0).collect();
            e.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
            e
        },
        histogram: linear_histogram(&s.hist, HISTOGRAM_BARS),
    }
}

/// (status, count) of the slots above 0 that counted anything.
fn nonzero(slots: &[u64]) -> Vec<(u16, u64)> {
    slots.iter().enumerate().skip(1).filter(|(_, &n)| n > 0).map(|(code, &n)| (code as u16, n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: u64, b: u64) -> bool {
        // HDR with 3 significant digits: within 0.1 % (plus one unit for small values).
        (a as f64 - b as f64).abs() <= b as f64 * 0.001 + 1.0
    }

    #[test]
    fn summary_math_on_known_values() {
        let mut s = KindStats::new();
        for v in 1..=10_000u64 {
            s.record(Duration::from_micros(v), v % 100 != 0, if v % 100 == 0 { 6 } else { 1 });
            s.count_status(if v % 100 == 0 { 503 } else { 201 });
        }
        s.count_status(0);
        let sum = summarize(OpKind::Post, &s, Duration::from_secs(2));
        assert_eq!(sum.requests, 10_000);
        assert_eq!(sum.successes, 9_900);
        assert_eq!(sum.failures, 100);
        assert_eq!(sum.attempts, 9_900 + 600);
        assert_eq!(sum.retries, 500);
        assert_eq!(sum.transport_errors, 1);
        assert_eq!(sum.throughput, 5_000.0);
        assert!((sum.mean_us - 5_000.5).abs() < 5.0, "{}", sum.mean_us);
        assert!(close(sum.p50_us, 5_000), "{}", sum.p50_us);
        assert!(close(sum.p99_us, 9_900), "{}", sum.p99_us);
        assert!(close(sum.p999_us, 9_990), "{}", sum.p999_us);
        assert_eq!(sum.min_us, 1);
        assert!(close(sum.max_us, 10_000));
        assert_eq!(sum.status, vec![(201, 9_900), (503, 100)]);
    }

    #[test]
    fn oha_shaped_fields_on_known_values() {
        let mut s = KindStats::new();
        for v in 1..=10_000u64 {
            s.record(Duration::from_micros(v), v % 4 != 0, 1);
            s.count_final(if v % 4 == 0 { 503 } else { 201 });
        }
        s.count_error(TransportError::Timeout);
        s.count_error(TransportError::Reset);
        s.count_error(TransportError::Reset);
        let sum = summarize(OpKind::Post, &s, Duration::from_secs(1));
        assert_eq!(sum.success_rate, 0.75);
        let names: Vec<&str> = sum.percentiles.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["p10", "p25", "p50", "p75", "p90", "p95", "p99", "p99.9", "p99.99"]);
        for ((_, got), want) in sum.percentiles.iter().zip([1_000, 2_500, 5_000, 7_500, 9_000, 9_500, 9_900, 9_990, 9_999]) {
            assert!(close(*got, want), "{got} vs {want}");
        }
        assert_eq!(sum.final_status, vec![(201, 7_500), (503, 2_500)]);
        assert_eq!(sum.errors, vec![("connection reset", 2), ("timeout", 1)]);
        // 11 bars from the fastest to the slowest, holding every request, ~1/11 each.
        assert_eq!(sum.histogram.len(), HISTOGRAM_BARS);
        assert_eq!(sum.histogram.iter().map(|(_, n)| n).sum::<u64>(), 10_000);
        assert_eq!(sum.histogram.last().unwrap().0, sum.max_us);
        assert!(sum.histogram.iter().all(|(_, n)| (850..=970).contains(n)), "{:?}", sum.histogram);
        assert!(sum.histogram.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn transport_errors_are_told_apart() {
        use std::io::{Error, ErrorKind};
        assert_eq!(TransportError::of(&Error::new(ErrorKind::TimedOut, "x")), TransportError::Timeout);
        assert_eq!(TransportError::of(&Error::from(ErrorKind::ConnectionRefused)), TransportError::Refused);
        assert_eq!(TransportError::of(&Error::from(ErrorKind::BrokenPipe)), TransportError::Reset);
        assert_eq!(TransportError::of(&Error::from(ErrorKind::UnexpectedEof)), TransportError::Closed);
        assert_eq!(TransportError::of(&Error::from(ErrorKind::InvalidData)), TransportError::InvalidResponse);
        assert_eq!(TransportError::of(&Error::from(ErrorKind::PermissionDenied)), TransportError::Other);
    }

    #[test]
    fn a_narrow_histogram_has_no_empty_repeats() {
        let mut s = KindStats::new();
        for _ in 0..5 {
            s.record(Duration::from_micros(100), true, 1);
        }
        s.record(Duration::from_micros(102), true, 1);
        let sum = summarize(OpKind::Post, &s, Duration::from_secs(1));
        assert_eq!(sum.histogram, vec![(100, 5), (101, 0), (102, 1)]);
        assert!(summarize(OpKind::Post, &KindStats::new(), Duration::ZERO).histogram.is_empty());
    }

    #[test]
    fn merge_adds_up_and_empty_summarizes_to_zero() {
        let mut a = KindStats::new();
        let mut b = KindStats::new();
        a.record(Duration::from_micros(100), true, 1);
        b.record(Duration::from_millis(50), false, 6);
        b.count_status(0);
        b.count_error(TransportError::Refused);
        b.count_final(0);
        a.count_final(200);
        a.merge(&b);
        let s = summarize(OpKind::SkierDay, &a, Duration::from_secs(1));
        assert_eq!((s.requests, s.successes, s.failures, s.retries, s.transport_errors), (2, 1, 1, 5, 1));
        assert_eq!(s.min_us, 100);
        assert!(close(s.max_us, 50_000));
        assert_eq!(s.final_status, vec![(200, 1)], "a request that ended without an answer has no status");
        assert_eq!(s.errors, vec![("connection refused", 1)]);

        let e = summarize(OpKind::Vertical, &KindStats::new(), Duration::ZERO);
        assert_eq!((e.requests, e.p99_us, e.throughput), (0, 0, 0.0));
    }

    #[test]
    fn latencies_out_of_range_are_clamped_not_lost() {
        let mut s = KindStats::new();
        s.record(Duration::ZERO, true, 1);
        s.record(Duration::from_secs(7200), true, 1);
        let sum = summarize(OpKind::Post, &s, Duration::from_secs(1));
        assert_eq!(sum.requests, 2);
        assert_eq!(sum.min_us, 1);
        assert!(sum.max_us >= HIST_MAX_US);
    }

    #[test]
    fn what_counts_as_success() {
        assert!(OpKind::Post.is_success(201));
        assert!(!OpKind::Post.is_success(200));
        assert!(OpKind::SkierDay.is_success(404));
        assert!(!OpKind::ResortDay.is_success(503));
        assert!(!OpKind::Vertical.is_success(0));
    }
}
