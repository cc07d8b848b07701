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

pub fn format_run(run: &RunReport) -> String {
    let mut o = String::new();
    for s in &run.summaries {
        let _ = writeln!(o, "== {} ({})", s.kind.name(), run.label);
        let _ = writeln!(o, "successes       {}", s.successes);
        let _ = writeln!(o, "failures        {}", s.failures);
        let _ = writeln!(o, "wall time       {:.3} s", s.wall_s);
        let _ = writeln!(o, "throughput      {:.0} req/s", s.throughput);
        let _ = writeln!(
            o,
            "latency ms      mean {}  p50 {}  p99 {}  p99.9 {}  min {}  max {}",
            ms(s.mean_us),
            ms(s.p50_us as f64),
            ms(s.p99_us as f64),
            ms(s.p999_us as f64),
            ms(s.min_us as f64),
            ms(s.max_us as f64)
        );
        let _ = writeln!(o, "attempts        {} ({} retries, {} transport errors)", s.attempts, s.retries, s.transport_errors);
        let statuses: Vec<String> = s.status.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        let _ = writeln!(o, "status counts   {}", if statuses.is_empty() { "-".into() } else { statuses.join(", ") });
    }
    let _ = writeln!(o, "connections     {}   breaker openings {}", run.connections, run.breaker_openings);
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
