//! Prometheus metrics: each component's stats type says once which of its fields are
//! metrics ([`Describe`], implemented in [`components`]), and `GET /metrics` renders every
//! component through it and the process's latency histograms ([`Histograms`]) with
//! `prometheus-client`, in the Prometheus text format (0.0.4). The JSON admin views
//! serialise the same stats structs, so a figure added to a struct and to its description
//! appears in both.
//!
//! Naming follows Prometheus: every series is `liftlog_*`, base units in the name
//! (`_seconds`, `_bytes`), counters end in `_total` (the encoder appends it), labels are
//! bounded (route template, method, status class; never an id).
//!
//! The histograms are process-wide (one node is one process in production; in-process
//! tests that start several nodes share them). `admin.histograms = false` turns their
//! recording off: each recording point then costs one relaxed load.

pub mod components;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::Instant;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every series' prefix.
pub const PREFIX: &str = "liftlog";

/// What a described field is to Prometheus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (reset at restart): `rate()` applies. Exposed with `_total`.
    Counter,
    /// Goes up and down, or is a position (a sequence number) rather than a count.
    Gauge,
}

/// One field of a stats struct as a metric: its name without the prefix, the unit suffix or
/// `_total`, and its value now.
#[derive(Clone, Debug)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Seconds or bytes: appended to the name (`flush_lag` + seconds = `flush_lag_seconds`).
    pub unit: Option<Unit>,
    pub value: f64,
}

impl Field {
    /// The series name as exposed, e.g. `liftlog_http_shed_total`.
    pub fn exposed_name(&self) -> String {
        let mut name = format!("{PREFIX}_{}", self.name);
        if let Some(unit) = &self.unit {
            name.push('_');
            name.push_str(unit.as_str());
        }
        if self.kind == Kind::Counter {
            name.push_str("_total");
        }
        name
    }
}

/// The fields of one scrape, in the order the components described them.
#[derive(Debug, Default)]
pub struct Fields(pub Vec<Field>);

impl Fields {
    pub fn counter(&mut self, name: &'static str, help: &'static str, value: impl Into<Num>) -> &mut Self {
        self.push(name, Kind::Counter, help, None, value.into().0)
    }
    pub fn gauge(&mut self, name: &'static str, help: &'static str, value: impl Into<Num>) -> &mut Self {
        self.push(name, Kind::Gauge, help, None, value.into().0)
    }
    pub fn gauge_in(&mut self, name: &'static str, unit: Unit, help: &'static str, value: impl Into<Num>) -> &mut Self {
        self.push(name, Kind::Gauge, help, Some(unit), value.into().0)
    }
    fn push(&mut self, name: &'static str, kind: Kind, help: &'static str, unit: Option<Unit>, value: f64) -> &mut Self {
        self.0.push(Field { name, kind, help, unit, value });
        self
    }
}

/// A number a stats struct holds (u64, usize, f64, bool), as the f64 the encoder writes.
/// Counts up to 2^53 are exact, far past any counter here.
pub struct Num(f64);
impl From<u64> for Num {
    fn from(v: u64) -> Self {
        Num(v as f64)
    }
}
impl From<usize> for Num {
    fn from(v: usize) -> Self {
        Num(v as f64)
    }
}
impl From<f64> for Num {
    fn from(v: f64) -> Self {
        Num(v)
    }
}
impl From<bool> for Num {
    fn from(v: bool) -> Self {
        Num(u8::from(v) as f64)
    }
}

/// A component's stats type: which of its fields are metrics, said once, next to the
/// figures the JSON admin views serialise.
pub trait Describe {
    fn describe(&self, out: &mut Fields);
}

impl Collector for Fields {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            match f.kind {
                Kind::Counter => {
                    let c = ConstCounter::new(f.value);
                    c.encode(encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), c.metric_type())?)?;
                }
                Kind::Gauge => {
                    let g = ConstGauge::new(f.value);
                    g.encode(encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), g.metric_type())?)?;
                }
            }
        }
        Ok(())
    }
}

/// Renders one scrape: the histograms (when recorded) and every described component.
pub fn render(components: &[&dyn Describe]) -> String {
    let mut fields = Fields::default();
    for c in components {
        c.describe(&mut fields);
    }
    let mut registry = Registry::with_prefix(PREFIX);
    if enabled() {
        HISTOGRAMS.register(&mut registry);
    }
    registry.register_collector(Box::new(fields));
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// `admin.histograms`: whether the recording points below record.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Latency buckets, seconds: 50 µs (a GET from memory) to 10 s (the confirm deadline).
const LATENCY: &[f64] = &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Flush cycles: 1 ms (nothing dirty) to a minute (a DynamoDB outage's retries).
const FLUSH: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Publish → apply across nodes: 0.5 ms (a warm consumer) to 5 minutes (a backlog after an
/// outage).
const LAG: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Rides per WAL batch: powers of two up to `consumer.max_batch`'s default.
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0];

/// Status classes, the only status label: bounded, and what alerts are written on.
const CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

type Labels = [(&'static str, &'static str); 3];
type Requests = Family<Labels, Histogram, fn() -> Histogram>;

/// The process's histograms. Each is one mutex over its buckets; the HTTP family's series
/// are looked up once per (route, method, class) and kept, so a request never hashes its
/// labels.
pub struct Histograms {
    requests: Requests,
    /// One slot per `http::ROUTES` entry (and one for everything else) × status class.
    request_slots: Vec<OnceLock<Histogram>>,
    confirm: Histogram,
    fsync: Histogram,
    batch: Histogram,
    flush: Histogram,
    forward: Histogram,
    applied_lag: Histogram,
}

pub static HISTOGRAMS: LazyLock<Histograms> = LazyLock::new(|| Histograms {
    requests: Family::new_with_constructor(|| Histogram::new(LATENCY.iter().copied())),
    request_slots: (0..(crate::http::ROUTES.len() + 1) * CLASSES.len()).map(|_| OnceLock::new()).collect(),
    confirm: Histogram::new(LATENCY.iter().copied()),
    fsync: Histogram::new(LATENCY.iter().copied()),
    batch: Histogram::new(BATCH.iter().copied()),
    flush: Histogram::new(FLUSH.iter().copied()),
    forward: Histogram::new(LATENCY.iter().copied()),
    applied_lag: Histogram::new(LAG.iter().copied()),
});

impl Histograms {
    fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "http_request_duration",
            "HTTP requests by route template, method and status class, from routing to the response.",
            Unit::Seconds,
            self.requests.clone(),
        );
        r.register_with_unit(
            "bus_confirm_duration",
            "RabbitMQ publish to its confirm, per message (a message holds one ride or a batch).",
            Unit::Seconds,
            self.confirm.clone(),
        );
        r.register_with_unit(
            "wal_fsync_duration",
            "WAL fsync of one consumer batch (the group commit).",
            Unit::Seconds,
            self.fsync.clone(),
        );
        r.register("consumer_batch_rides", "Rides per consumer batch (one WAL record, one fsync).", self.batch.clone());
        r.register_with_unit("flush_duration", "Flush cycles, successful or not.", Unit::Seconds, self.flush.clone());
        r.register_with_unit(
            "cluster_forward_duration",
            "Day reads forwarded to the shard's owner, per attempt, until its answer or failure.",
            Unit::Seconds,
            self.forward.clone(),
        );
        r.register_with_unit(
            "consumer_applied_lag",
            "From the write node's publish of a message (its 201s follow the broker's confirm) to the \
             consumer's apply of its rides, per message; across nodes, so clock skew is in it.",
            Unit::Seconds,
            self.applied_lag.clone(),
        );
    }

    /// One HTTP request. `route` indexes `http::ROUTES` (None: no route matched, or not
    /// this method).
    fn request(&self, route: Option<usize>, status: u16, secs: f64) {
        let class = match status {
            200..=299 => 0,
            300..=399 => 1,
            400..=499 => 2,
            500..=599 => 3,
            _ => return,
        };
        let routes = crate::http::ROUTES;
        let r = route.filter(|&i| i < routes.len()).unwrap_or(routes.len());
        let h = self.request_slots[r * CLASSES.len() + class].get_or_init(|| {
            let (method, route) = routes.get(r).map_or(("other", "unmatched"), |(m, p, _)| (*m, *p));
            self.requests.get_or_create_owned(&[("method", method), ("route", route), ("status", CLASSES[class])])
        });
        h.observe(secs);
    }
}

/// The index in `http::ROUTES` of a request's method and matched template.
pub fn route_index(method: &str, template: &str) -> Option<usize> {
    crate::http::ROUTES.iter().position(|(m, p, _)| *m == method && *p == template)
}

/// Records one HTTP request (the accounting middleware).
pub fn http_request(route: Option<usize>, status: u16, started: Instant) {
    if enabled() {
        HISTOGRAMS.request(route, status, started.elapsed().as_secs_f64());
    }
}

/// Records one publish → confirm wait (the RabbitMQ publisher).
pub fn bus_confirm(started: Instant) {
    if enabled() {
        HISTOGRAMS.confirm.observe(started.elapsed().as_secs_f64());
    }
}

/// Records one WAL fsync and the batch it made durable (the consumer).
pub fn wal_fsync(started: Instant, rides: usize) {
    if enabled() {
        HISTOGRAMS.fsync.observe(started.elapsed().as_secs_f64());
        HISTOGRAMS.batch.observe(rides as f64);
    }
}

/// Records one flush cycle (the flusher).
pub fn flush_cycle(started: Instant) {
    if enabled() {
        HISTOGRAMS.flush.observe(started.elapsed().as_secs_f64());
    }
}

/// Records, for each message of a consumer batch just applied, how long ago its write node
/// published it (`published_us`: microseconds since the Unix epoch, the writer's clock). A
/// writer's clock ahead of ours counts as 0, not as a negative lag.
pub fn applied_lag(published_us: &[u64]) {
    if enabled() && !published_us.is_empty() {
        let now = crate::actors::unix_micros();
        for &t in published_us {
            HISTOGRAMS.applied_lag.observe(now.saturating_sub(t) as f64 / 1e6);
        }
    }
}

/// Times one forwarded read (cluster mode) until it is dropped, whichever way the forward
/// returns.
pub struct ForwardTimer(Instant);

impl ForwardTimer {
    pub fn start() -> Self {
        ForwardTimer(Instant::now())
    }
}

impl Drop for ForwardTimer {
    fn drop(&mut self) {
        if enabled() {
            HISTOGRAMS.forward.observe(self.0.elapsed().as_secs_f64());
        }
    }
}

/// The histogram families `/metrics` carries while recording, as exposed (without the
/// `_bucket`/`_sum`/`_count` suffixes): for the dashboard lint and the tests.
pub const HISTOGRAM_FAMILIES: &[&str] = &[
    "liftlog_http_request_duration_seconds",
    "liftlog_bus_confirm_duration_seconds",
    "liftlog_wal_fsync_duration_seconds",
    "liftlog_consumer_batch_rides",
    "liftlog_flush_duration_seconds",
    "liftlog_cluster_forward_duration_seconds",
    "liftlog_consumer_applied_lag_seconds",
];

#[cfg(test)]
mod tests {
    use super::*;

    struct Two;
    impl Describe for Two {
        fn describe(&self, out: &mut Fields) {
            out.counter("things", "Things done.", 3u64).gauge_in("lag", Unit::Seconds, "A lag.", 1.5);
        }
    }

    #[test]
    fn described_fields_render_under_their_exposed_names() {
        let text = render(&[&Two]);
        let mut f = Fields::default();
        Two.describe(&mut f);
        let names: Vec<_> = f.0.iter().map(Field::exposed_name).collect();
        assert_eq!(names, ["liftlog_things_total", "liftlog_lag_seconds"]);
        assert!(text.contains("# TYPE liftlog_things_total counter\nliftlog_things_total 3"), "{text}");
        assert!(text.contains("# TYPE liftlog_lag_seconds gauge\nliftlog_lag_seconds 1.5"), "{text}");
    }

    #[test]
    fn a_request_lands_in_its_route_method_and_class() {
        let route = route_index("GET", "/resorts");
        assert!(route.is_some());
        HISTOGRAMS.request(route, 200, 0.0003);
        HISTOGRAMS.request(None, 404, 0.0001);
        let text = render(&[]);
        assert!(
            text.contains(r#"liftlog_http_request_duration_seconds_bucket{method="GET",route="/resorts",status="2xx",le="0.0005"}"#),
            "{text}"
        );
        assert!(text.contains(r#"liftlog_http_request_duration_seconds_count{method="other",route="unmatched",status="4xx"}"#), "{text}");
        for family in HISTOGRAM_FAMILIES {
            assert!(text.contains(&format!("# TYPE {family} histogram")), "{family} missing:\n{text}");
        }
    }
}
