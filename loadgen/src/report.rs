//! The summary on stdout, the `--json` document and the `--csv` records.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::Path;

use serde_json::{json, Value};

use crate::load::Record;
use crate::reconcile::ReconcileReport;
use crate::stats::KindSummary;
use crate::{Outcome, RunReport};

fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

/// One run's summary, per kind of request in oha's shape: the summary block, the response-time
/// histogram and distribution (p10 to p99.99), the status-code distribution (one final answer
/// per request) and the error distribution; then what oha has no notion of: retries, the
/// answers of every attempt, connections and breaker openings.
pub fn format_run(run: &RunReport) -> String {
    let mut o = String::new();
    for s in &run.summaries {
        let _ = writeln!(o, "== {} ({})", s.kind.name(), run.label);
        let _ = writeln!(o, "Summary:");
        let _ = writeln!(o, "  Success rate:  {:.2}%", s.success_rate * 100.0);
        let _ = writeln!(o, "  Total:         {:.4} s", s.wall_s);
        let _ = writeln!(o, "  Slowest:       {} ms", ms(s.max_us as f64));
        let _ = writeln!(o, "  Fastest:       {} ms", ms(s.min_us as f64));
        let _ = writeln!(o, "  Average:       {} ms", ms(s.mean_us));
        let _ = writeln!(o, "  Requests/sec:  {:.2}", s.throughput);
        let _ = writeln!(o, "  Requests:      {} ({} successes, {} failures)", s.requests, s.successes, s.failures);
        let _ = writeln!(o, "  Attempts:      {} ({} retries, {} transport errors)", s.attempts, s.retries, s.transport_errors);
        if !s.histogram.is_empty() {
            let _ = writeln!(o, "\nResponse time histogram:");
            let most = s.histogram.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1);
            let labels: Vec<String> = s.histogram.iter().map(|(u, _)| ms(*u as f64)).collect();
            let counts: Vec<String> = s.histogram.iter().map(|(_, n)| format!("[{n}]")).collect();
            let (lw, cw) = (labels.iter().map(String::len).max().unwrap_or(0), counts.iter().map(String::len).max().unwrap_or(0));
            for ((label, count), (_, n)) in labels.iter().zip(&counts).zip(&s.histogram) {
                let bar = "■".repeat((*n as f64 / most as f64 * 32.0).ceil() as usize);
                let _ = writeln!(o, "  {label:>lw$} ms {count:<cw$} |{bar}");
            }
        }
        let _ = writeln!(o, "\nResponse time distribution:");
        for (name, us) in &s.percentiles {
            let pct = name.trim_start_matches('p').parse::<f64>().unwrap_or(0.0);
            let _ = writeln!(o, "  {pct:>6.2}% in {} ms", ms(*us as f64));
        }
        let _ = writeln!(o, "\nStatus code distribution:");
        if s.final_status.is_empty() {
            let _ = writeln!(o, "  (no answers)");
        }
        for (code, n) in &s.final_status {
            let _ = writeln!(o, "  [{code}] {n} responses");
        }
        if !s.errors.is_empty() {
            let _ = writeln!(o, "\nError distribution:");
            for (what, n) in &s.errors {
                let _ = writeln!(o, "  [{n}] {what}");
            }
        }
        let statuses: Vec<String> = s.status.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        let _ = writeln!(o, "\nAnswers of all attempts: {}", if statuses.is_empty() { "-".into() } else { statuses.join(", ") });
    }
    let _ = writeln!(o, "Connections: {}   breaker openings: {}\n", run.connections, run.breaker_openings);
    o
}

pub fn format_reconcile(r: &ReconcileReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "== reconciliation ({} rides acknowledged, {} of unknown outcome)", r.acked_rides, r.uncertain_rides);
    let _ = writeln!(o, "resort-days     {}/{} numSkiers as acknowledged", r.resort_days_ok, r.resort_days);
    let _ = writeln!(
        o,
        "skier-days      {}/{} verticals as acknowledged (a sample of the {} skier-days acknowledged)",
        r.skier_days_ok, r.skier_days_checked, r.skier_days_acked
    );
    if r.explained > 0 {
        let _ = writeln!(o, "explained       {} checks match only with rides of unknown outcome counted", r.explained);
    }
    if r.clean() {
        let _ = writeln!(o, "result          OK");
    } else {
        let _ = writeln!(o, "result          {} MISMATCHES (first 20):", r.mismatches.len());
        for m in r.mismatches.iter().take(20) {
            let _ = writeln!(o, "  {m}");
        }
        let _ = writeln!(
            o,
            "  (a service that already held rides of this season from an earlier run shows more than this run posted:\n   use a fresh data dir, another --season, or --run-season)"
        );
    }
    o
}

fn kind_json(s: &KindSummary) -> Value {
    let status: serde_json::Map<String, Value> = s.status.iter().map(|(c, n)| (c.to_string(), json!(n))).collect();
    json!({
        "type": s.kind.name(),
        "requests": s.requests,
        "successes": s.successes,
        "failures": s.failures,
        "attempts": s.attempts,
        "retries": s.retries,
        "transport_errors": s.transport_errors,
        "wall_s": s.wall_s,
        "throughput_per_s": s.throughput,
        "latency_us": {
            "mean": s.mean_us, "p50": s.p50_us, "p99": s.p99_us, "p99_9": s.p999_us, "min": s.min_us, "max": s.max_us
        },
        "status": status,
        // oha's summary (in seconds, as oha's), percentiles, histogram and distributions,
        // beside the fields above that the bench scripts read.
        "success_rate": s.success_rate,
        "summary": {
            "success_rate": s.success_rate,
            "total_s": s.wall_s,
            "slowest_s": s.max_us as f64 / 1e6,
            "fastest_s": s.min_us as f64 / 1e6,
            "average_s": s.mean_us / 1e6,
            "requests_per_s": s.throughput,
        },
        "latency_percentiles_us": s.percentiles.iter().map(|(n, v)| (n.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "response_time_histogram_us": s.histogram.iter().map(|(upper, n)| json!({"upper": upper, "count": n})).collect::<Vec<_>>(),
        "status_code_distribution": s.final_status.iter().map(|(c, n)| (c.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "error_distribution": s.errors.iter().map(|(e, n)| (e.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
    })
}

pub fn to_json(out: &Outcome) -> Value {
    let runs: Vec<Value> = out
        .runs
        .iter()
        .map(|r| {
            json!({
                "label": r.label,
                "wall_s": r.wall.as_secs_f64(),
                "connections": r.connections,
                "breaker_openings": r.breaker_openings,
                "endpoints": r.summaries.iter().map(kind_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    let reconcile = out.reconcile.as_ref().map(|r| {
        json!({
            "ok": r.clean(),
            "acked_rides": r.acked_rides,
            "uncertain_rides": r.uncertain_rides,
            "resort_days": r.resort_days,
            "resort_days_ok": r.resort_days_ok,
            "skier_days_acked": r.skier_days_acked,
            "skier_days_checked": r.skier_days_checked,
            "skier_days_ok": r.skier_days_ok,
            "explained": r.explained,
            "mismatches": r.mismatches,
        })
    });
    json!({
        "tool": "liftlog-load",
        "mode": out.mode,
        "target": out.target,
        "season": out.season,
        "seed": out.seed,
        "runs": runs,
        "reconcile": reconcile,
    })
}

pub fn write_csv(path: &Path, records: &[Record]) -> io::Result<()> {
    let mut w = io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, "start_us,type,latency_us,status,attempts")?;
    for r in records {
        writeln!(w, "{},{},{},{},{}", r.start_us, r.kind.short(), r.latency_us, r.status, r.attempts)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stats::{summarize, KindStats, OpKind, TransportError};

    fn run() -> RunReport {
        let mut k = KindStats::new();
        for v in 1..=1000u64 {
            let ok = v % 10 != 0;
            k.record(Duration::from_micros(v * 10), ok, if ok { 1 } else { 2 });
            k.count_status(if ok { 201 } else { 503 });
            if !ok {
                k.count_status(0);
                k.count_error(TransportError::Timeout);
            }
            k.count_final(if ok { 201 } else { 503 });
        }
        RunReport {
            label: "post 1000 rides".into(),
            wall: Duration::from_secs(2),
            summaries: vec![summarize(OpKind::Post, &k, Duration::from_secs(2))],
            breaker_openings: 1,
            connections: 4,
        }
    }

    #[test]
    fn text_summary_has_oha_sections_in_order() {
        let text = format_run(&run());
        let sections = [
            "== POST ride (post 1000 rides)",
            "Summary:",
            "  Success rate:  90.00%",
            "  Total:         2.0000 s",
            "  Slowest:       10.00",
            "  Fastest:       0.010 ms",
            "  Average:       5.0",
            "  Requests/sec:  500.00",
            "  Requests:      1000 (900 successes, 100 failures)",
            "  Attempts:      1100 (100 retries, 100 transport errors)",
            "Response time histogram:",
            "Response time distribution:",
            "   10.00% in 1.000 ms",
            "   50.00% in 5.00",
            "   99.99% in 10.0",
            "Status code distribution:",
            "  [201] 900 responses",
            "  [503] 100 responses",
            "Error distribution:",
            "  [100] timeout",
            "Answers of all attempts: 201: 900, 503: 100",
            "Connections: 4   breaker openings: 1",
        ];
        let mut at = 0;
        for want in sections {
            let found = text[at..].find(want).unwrap_or_else(|| panic!("{want:?} missing (or out of order) in:\n{text}"));
            at += found + want.len();
        }
        // 11 histogram lines, each with a count and a bar.
        let hist: Vec<&str> = text.lines().skip_while(|l| *l != "Response time histogram:").skip(1).take_while(|l| !l.is_empty()).collect();
        assert_eq!(hist.len(), 11, "{hist:?}");
        assert!(hist.iter().all(|l| l.contains(" ms [") && l.contains("|■")), "{hist:?}");
        // All percentile lines: p10 .. p99.99.
        assert_eq!(text.lines().filter(|l| l.contains("% in ")).count(), 9);
    }

    #[test]
    fn json_keeps_the_old_fields_and_adds_oha_ones() {
        let out = Outcome {
            mode: "post",
            target: "http://127.0.0.1:1".into(),
            season: 2025,
            seed: 1,
            runs: vec![run()],
            reconcile: None,
            exit_code: 0,
        };
        let v = to_json(&out);
        let e = &v["runs"][0]["endpoints"][0];
        // What bench.sh, scale-bench.sh and bench/baseline read.
        assert_eq!(e["type"], "POST ride");
        assert_eq!(e["successes"], 900);
        assert_eq!(e["failures"], 100);
        assert_eq!(e["retries"], 100);
        assert_eq!(e["throughput_per_s"], 500.0);
        assert_eq!(e["wall_s"], 2.0);
        assert!(e["latency_us"]["p99"].as_u64().is_some_and(|p| (9_880..=9_920).contains(&p)), "{}", e["latency_us"]);
        assert!(e["latency_us"]["p50"].is_u64() && e["latency_us"]["p99_9"].is_u64());
        assert_eq!(e["status"]["503"], 100);
        assert_eq!(v["runs"][0]["wall_s"], 2.0);
        // The oha-shaped additions.
        assert_eq!(e["success_rate"], 0.9);
        assert_eq!(e["summary"]["success_rate"], 0.9);
        assert_eq!(e["summary"]["requests_per_s"], 500.0);
        assert_eq!(e["summary"]["fastest_s"], 0.00001);
        assert!(e["summary"]["slowest_s"].as_f64().is_some_and(|s| (0.00999..=0.01001).contains(&s)));
        let p = e["latency_percentiles_us"].as_object().unwrap();
        let keys: Vec<&str> = p.keys().map(String::as_str).collect();
        for k in ["p10", "p25", "p50", "p75", "p90", "p95", "p99", "p99.9", "p99.99"] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(p["p10"].as_u64() < p["p99.99"].as_u64());
        assert_eq!(e["status_code_distribution"]["201"], 900);
        assert_eq!(e["status_code_distribution"]["503"], 100);
        assert_eq!(e["error_distribution"]["timeout"], 100);
        let h = e["response_time_histogram_us"].as_array().unwrap();
        assert_eq!(h.len(), 11);
        assert_eq!(h.iter().map(|b| b["count"].as_u64().unwrap()).sum::<u64>(), 1000);
    }
}
