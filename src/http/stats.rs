//! Request accounting: per-endpoint latency for `/statistics`, and the HTTP counters of
//! `/metrics`. Lock-free: one set of atomics per endpoint template, found by a short
//! linear match on the route pattern actix already resolved.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// (method, template) of the public endpoints whose latency `/statistics` reports.
pub const PUBLIC_ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/resorts"),
    ("GET", "/resorts/{resortID}/seasons"),
    ("POST", "/resorts/{resortID}/seasons"),
    ("GET", "/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/skiers"),
    ("POST", "/skiers/{resortID}/seasons/{seasonID}/days/{dayID}/skiers/{skierID}"),
    ("GET", "/skiers/{resortID}/seasons/{seasonID}/days/{dayID}/skiers/{skierID}"),
    ("GET", "/skiers/{skierID}/vertical"),
    ("GET", "/statistics"),
];

#[derive(Default)]
struct Slot {
    count: AtomicU64,
    total_micros: AtomicU64,
    max_micros: AtomicU64,
}

/// Counters kept since start.
pub struct RequestStats {
    base_path: String,
    slots: Vec<Slot>,
    pub status_2xx: AtomicU64,
    pub status_4xx: AtomicU64,
    pub status_5xx: AtomicU64,
    pub shed: AtomicU64,
}

#[derive(Serialize)]
pub struct EndpointStat {
    #[serde(rename = "URL")]
    pub url: &'static str,
    pub operation: &'static str,
    pub mean: u64,
    pub max: u64,
}

#[derive(Serialize)]
pub struct Statistics {
    #[serde(rename = "endpointStats")]
    pub endpoint_stats: Vec<EndpointStat>,
}

impl RequestStats {
    /// The context path every public route is under (empty = none).
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    pub fn new(base_path: &str) -> Self {
        RequestStats {
            base_path: base_path.to_string(),
            slots: PUBLIC_ENDPOINTS.iter().map(|_| Slot::default()).collect(),
            status_2xx: AtomicU64::new(0),
            status_4xx: AtomicU64::new(0),
            status_5xx: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        }
    }

    /// Index of the endpoint a request matched, if it is a public one.
    pub fn endpoint(&self, method: &str, pattern: Option<&str>) -> Option<usize> {
        let pattern = pattern?.strip_prefix(self.base_path.as_str())?;
        Self::endpoint_of(method, pattern)
    }

    /// Index of a public endpoint by method and template (without the base path).
    pub fn endpoint_of(method: &str, template: &str) -> Option<usize> {
        PUBLIC_ENDPOINTS.iter().position(|(m, p)| *m == method && *p == template)
    }

    pub fn record(&self, endpoint: Option<usize>, status: u16, elapsed: Duration) {
        match status {
            200..=299 => &self.status_2xx,
            400..=499 => &self.status_4xx,
            _ if status >= 500 => &self.status_5xx,
            _ => return,
        }
        .fetch_add(1, Ordering::Relaxed);
        if status == 503 || status == 429 {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(slot) = endpoint.and_then(|i| self.slots.get(i)) {
            let us = elapsed.as_micros() as u64;
            slot.count.fetch_add(1, Ordering::Relaxed);
            slot.total_micros.fetch_add(us, Ordering::Relaxed);
            slot.max_micros.fetch_max(us, Ordering::Relaxed);
        }
    }

    /// Mean and max in whole milliseconds (the 2.0 API's integers), rounded up so that a
    /// sub-millisecond endpoint does not look unmeasured.
    pub fn statistics(&self) -> Statistics {
        let endpoint_stats = PUBLIC_ENDPOINTS
            .iter()
            .zip(&self.slots)
            .filter_map(|((method, url), slot)| {
                let count = slot.count.load(Ordering::Relaxed);
                (count > 0).then(|| EndpointStat {
                    url,
                    operation: method,
                    mean: (slot.total_micros.load(Ordering::Relaxed) / count).div_ceil(1000),
                    max: slot.max_micros.load(Ordering::Relaxed).div_ceil(1000),
                })
            })
            .collect();
        Statistics { endpoint_stats }
    }

    /// `(method, template, count, total seconds)` per endpoint, for Prometheus.
    pub fn per_endpoint(&self) -> impl Iterator<Item = (&'static str, &'static str, u64, f64)> + '_ {
        PUBLIC_ENDPOINTS
            .iter()
            .zip(&self.slots)
            .map(|((m, p), s)| (*m, *p, s.count.load(Ordering::Relaxed), s.total_micros.load(Ordering::Relaxed) as f64 / 1e6))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_by_template_under_a_base_path() {
        let s = RequestStats::new("/app");
        let ep = s.endpoint("GET", Some("/app/resorts"));
        assert_eq!(ep, Some(0));
        assert_eq!(s.endpoint("GET", Some("/resorts")), None);
        s.record(ep, 200, Duration::from_micros(1500));
        s.record(ep, 200, Duration::from_micros(500));
        let st = s.statistics();
        assert_eq!(st.endpoint_stats.len(), 1);
        assert_eq!((st.endpoint_stats[0].mean, st.endpoint_stats[0].max), (1, 2));
    }
}
