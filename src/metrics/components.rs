//! Which fields of each component's stats type are metrics: one [`Describe`] per type,
//! the same structs `/admin/wal`, `/admin/actors` and `/admin/cluster` serialise. Adding a
//! figure to `/metrics` is one line here. They live together in this file rather than
//! beside each struct so that the components' files (several owned by the WAL crate or
//! edited in parallel) stay free of exposition concerns; each block names its struct.
//!
//! Names kept as they were because the CloudWatch agent selects them
//! (`deploy/aws/liftlog.yaml`): `flush_lag_seconds`, `wal_live_bytes`,
//! `flush_failures_total`, `bus_depth`, `http_responses_5xx_total`, `http_shed_total`,
//! `actors_resident`. Series marked "Deprecated" are the old names of renamed ones, kept
//! for this release only.

use super::{Describe, Fields};
use crate::actors::consumer::ProgressView;
use crate::actors::flusher::FlushStats;
use crate::actors::registry::RegistryStats;
use crate::bus::admission::{AdmissionStats, BreakerState};
use crate::bus::BusStats;
use crate::cluster::forward::ClusterView;
use crate::http::stats::RequestStats;
use liftlog_wal::WalStats;
use prometheus_client::registry::Unit;
use std::sync::atomic::Ordering;

impl Describe for RequestStats {
    fn describe(&self, out: &mut Fields) {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        out.counter("http_responses_2xx", "Responses with a 2xx status.", get(&self.status_2xx))
            .counter("http_responses_4xx", "Responses with a 4xx status.", get(&self.status_4xx))
            .counter("http_responses_5xx", "Responses with a 5xx status.", get(&self.status_5xx))
            .counter("http_shed", "Requests refused with 429/503 to shed load.", get(&self.shed));
    }
}

impl Describe for BusStats {
    fn describe(&self, out: &mut Fields) {
        out.gauge("bus_depth", "Rides queued for the consumer (embedded) or in the broker's queues.", self.depth)
            .counter("bus_published", "Rides published and confirmed durable.", self.published)
            .counter("bus_rejected_full", "Publishes refused because the bus was full.", self.rejected_full)
            .counter("bus_confirm_timeouts", "Publishes not confirmed in time.", self.timeouts);
        if let Some(a) = &self.admission {
            a.describe(out);
        }
    }
}

impl Describe for AdmissionStats {
    fn describe(&self, out: &mut Fields) {
        out.gauge("admission_refill_rate", "Token bucket refill now, rides/s (follows pressure).", self.refill_rate_now)
            .counter("admission_rate_limited", "POSTs refused with 429 by the token bucket.", self.rate_limited_total)
            .gauge("breaker_open", "1 while the write path's circuit breaker is open.", matches!(self.breaker, BreakerState::Open))
            .counter("breaker_opens", "Times the circuit breaker opened.", self.breaker_opens_total)
            .counter("breaker_rejected", "POSTs refused with 503 while the breaker was open.", self.breaker_rejected_total);
    }
}

impl Describe for ProgressView {
    fn describe(&self, out: &mut Fields) {
        out.counter("consumer_batches", "WAL batches written by the consumer.", self.batches)
            .counter("consumer_events", "Rides consumed (duplicates included).", self.events)
            .counter("consumer_wal_failures", "Batches refused because the WAL write failed.", self.wal_failures)
            .counter("consumer_rides_refused", "Rides refused by their skier-day's bound (409).", self.rides_refused)
            .gauge_in("flush_lag", Unit::Seconds, "Age of the oldest ride not yet in the tables.", self.flush_lag_ms as f64 / 1000.0)
            .gauge("consumer_unflushed_rides", "Rides applied but not yet in the tables.", self.unflushed_events)
            .gauge("consumer_holding_for_memory", "1 while the consumer takes no batch: too many unflushed rides.", self.holding_for_memory)
            .gauge("consumer_parked_rides", "Rides waiting for their day's actor to activate.", self.parked_rides)
            .gauge(
                "consumer_mean_batch_size",
                "Deprecated (one release): use liftlog_consumer_batch_rides. Mean rides per WAL batch since start.",
                self.mean_batch_size,
            );
    }
}

impl Describe for WalStats {
    fn describe(&self, out: &mut Fields) {
        out.gauge_in("wal_live", Unit::Bytes, "WAL bytes not yet checkpointed.", self.live_bytes)
            .gauge_in("wal_max", Unit::Bytes, "WAL bound; POSTs get 503 beyond it.", self.max_bytes)
            .gauge("wal_live_records", "WAL records not yet checkpointed.", self.live_records)
            .counter("wal_appends", "WAL records appended since start.", self.appends)
            .counter("wal_fsyncs", "WAL fsyncs since start.", self.fsyncs)
            .gauge("wal_checkpoint_sequence", "Highest WAL sequence known to be in the tables.", self.checkpoint)
            .gauge("wal_last_sequence", "Highest live WAL sequence (0 when nothing is live).", self.last_seq.unwrap_or(0))
            .gauge("wal_checkpoint", "Deprecated (one release): use liftlog_wal_checkpoint_sequence.", self.checkpoint)
            .gauge("wal_last_seq", "Deprecated (one release): use liftlog_wal_last_sequence.", self.last_seq.unwrap_or(0));
    }
}

impl Describe for FlushStats {
    fn describe(&self, out: &mut Fields) {
        out.counter("flush_cycles", "Flush cycles run.", self.cycles)
            .counter("flush_failures", "Flush cycles that failed (table errors).", self.failures)
            .gauge("flush_consecutive_failures", "Flush cycles failed in a row (0 after a success).", self.consecutive_failures)
            .counter("flush_rides_written", "Raw rides written to the tables.", self.rides_written)
            .counter("flush_skier_days_written", "Skier-day items written to the tables.", self.skier_days_written)
            .counter("flush_counts_written", "Day count items written to the tables.", self.counts_written)
            .counter("flush_items_refused", "Items the table store refused for good.", self.items_refused);
    }
}

impl Describe for RegistryStats {
    fn describe(&self, out: &mut Fields) {
        out.gauge("actors_resident", "Aggregator actors resident.", self.resident)
            .gauge("actors_max_resident", "Resident actors before idle ones are passivated.", self.max_resident)
            .counter("actors_activations", "Aggregator actors activated (loaded).", self.activations)
            .counter("actors_passivated", "Aggregator actors passivated.", self.passivations);
    }
}

impl Describe for ClusterView {
    fn describe(&self, out: &mut Fields) {
        let f = &self.forwarding;
        out.counter("cluster_reads_local", "Day reads answered here as the shard's owner.", f.local)
            .counter("cluster_reads_forwarded", "Day reads answered by the owner on another node.", f.forwarded)
            .counter("cluster_reads_retried", "Second forwards after a 421 or a failed first one.", f.retried)
            .counter("cluster_reads_tables_fallback", "Day reads answered from the tables: no owner answered.", f.tables_fallback)
            .counter("cluster_forward_errors", "Forwards that failed (refused, timed out, unreadable).", f.errors)
            .counter("cluster_misdirected", "Forwarded reads refused with 421 (epoch not held here).", f.misdirected)
            .gauge("cluster_shards", "Shards (partition queues) of the cluster.", self.map.shards.len())
            .gauge("cluster_shards_owned", "Shards with an owner in this node's last map.", self.map.shards.iter().flatten().count())
            .gauge("cluster_live_nodes", "Live nodes in this node's last map.", self.map.nodes.len());
        if let Some(k) = &self.keeper {
            out.gauge("cluster_shards_held", "Shards this node holds a lease on.", k.held.len())
                .counter("cluster_lease_renew_failures", "Lease renewals that failed.", k.renew_failures)
                .counter("cluster_shards_acquired", "Shards this node acquired (free or handed off).", k.acquired)
                .counter("cluster_shards_taken_over", "Expired shards this node took over.", k.taken_over);
        }
    }
}

/// Figures of the process itself.
pub struct Uptime(pub std::time::Duration);

impl Describe for Uptime {
    fn describe(&self, out: &mut Fields) {
        out.gauge_in("uptime", Unit::Seconds, "Seconds since start.", self.0.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{render, Field};

    #[test]
    fn every_described_field_appears_in_the_exposition() {
        let requests = RequestStats::new("");
        let wal = WalStats {
            first_seq: None,
            last_seq: Some(7),
            checkpoint: 5,
            live_bytes: 10,
            live_records: 2,
            appends: 7,
            fsyncs: 7,
            last_fsync_unix_ms: None,
            last_fsync_micros: None,
            max_bytes: 100,
        };
        let flush = FlushStats::default();
        let registry = RegistryStats { resident: 3, max_resident: 8, activations: 4, passivations: 1 };
        let parts: [&dyn Describe; 5] = [&requests, &wal, &flush, &registry, &Uptime(std::time::Duration::from_secs(2))];
        let text = render(&parts);
        let mut fields = Fields::default();
        parts.iter().for_each(|p| p.describe(&mut fields));
        assert!(fields.0.len() > 20);
        for f in &fields.0 {
            let name = Field::exposed_name(f);
            assert!(text.lines().any(|l| l.split([' ', '{']).next() == Some(name.as_str())), "{name} missing:\n{text}");
        }
        // The names the CloudWatch agent selects (deploy/aws/liftlog.yaml) stay as they were.
        for kept in [
            "liftlog_wal_live_bytes",
            "liftlog_flush_failures_total",
            "liftlog_actors_resident",
            "liftlog_http_shed_total",
            "liftlog_http_responses_5xx_total",
        ] {
            assert!(text.contains(&format!("\n{kept} ")), "{kept} missing:\n{text}");
        }
    }
}

#[cfg(test)]
mod deploy_files {
    use super::*;
    use crate::metrics::{render, Fields, HISTOGRAM_FAMILIES};

    /// Every series a node can export: every component described with figures that make
    /// each optional part present, plus the histogram families and their suffixes.
    fn exported() -> Vec<String> {
        let mut f = Fields::default();
        RequestStats::new("").describe(&mut f);
        let admission = AdmissionStats {
            rate: 1.0,
            refill_rate_now: 1.0,
            tokens: 1.0,
            pressure: crate::bus::admission::Pressure { queue: 0.0, wal: 0.0, flush_lag: 0.0 },
            rate_limited_total: 0,
            breaker: BreakerState::Closed,
            breaker_opens_total: 0,
            breaker_rejected_total: 0,
        };
        BusStats { kind: "x", depth: 0, capacity: 0, published: 0, rejected_full: 0, timeouts: 0, admission: Some(admission) }
            .describe(&mut f);
        FlushStats::default().describe(&mut f);
        RegistryStats { resident: 0, max_resident: 0, activations: 0, passivations: 0 }.describe(&mut f);
        Uptime(std::time::Duration::ZERO).describe(&mut f);
        let mut names: Vec<String> = f.0.iter().map(|x| x.exposed_name()).collect();
        // Components whose stats need a running node: their names from the source text of
        // their descriptions (ProgressView, WalStats, ClusterView incl. the keeper's part).
        let src = include_str!("components.rs");
        for block in ["impl Describe for ProgressView", "impl Describe for WalStats", "impl Describe for ClusterView"] {
            let body = &src[src.find(block).unwrap()..];
            let body = &body[..body.find("\n}\n").unwrap()];
            for (kind, rest) in body.split(".counter(\"").skip(1).map(|r| ("c", r)).chain(body.split(".gauge(\"").skip(1).map(|r| ("g", r)))
            {
                let name = &rest[..rest.find('"').unwrap()];
                names.push(format!("liftlog_{name}{}", if kind == "c" { "_total" } else { "" }));
            }
            for rest in body.split(".gauge_in(\"").skip(1) {
                let name = &rest[..rest.find('"').unwrap()];
                let unit = if rest.contains("Unit::Seconds") && rest.find("Unit::Seconds") < rest.find("Unit::Bytes").or(Some(usize::MAX)) {
                    "seconds"
                } else {
                    "bytes"
                };
                names.push(format!("liftlog_{name}_{unit}"));
            }
        }
        for h in HISTOGRAM_FAMILIES {
            names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{h}{s}")));
        }
        let _ = render(&[]);
        names
    }

    #[test]
    fn deploy_files_name_only_exported_metrics() {
        let exported = exported();
        assert!(exported.iter().any(|n| n == "liftlog_flush_lag_seconds"), "{exported:?}");
        assert!(exported.iter().any(|n| n == "liftlog_wal_live_bytes"), "{exported:?}");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut checked = 0;
        for file in ["grafana/liftlog.json", "prometheus/liftlog-rules.yaml"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            for (i, _) in text.match_indices("liftlog_") {
                let name: String = text[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                // A file name or the dashboard's own uid, not a series.
                if name == "liftlog_" {
                    continue;
                }
                assert!(exported.contains(&name), "{file} names {name}, which liftlog does not export");
                checked += 1;
            }
        }
        assert!(checked > 15, "only {checked} names checked");
    }
}
