//! liftlog-load: the load client of the SkiDataAPI 2.0 (see `liftlog-load --help`).
//!
//! The binary is a thin `main`; everything runs through [`execute`], which tests call in-process.

pub mod breaker;
pub mod cli;
pub mod http;
pub mod load;
pub mod plot;
pub mod progress;
pub mod reconcile;
pub mod report;
pub mod rng;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

pub use cli::Cli;
use cli::{Command, Common, Endpoint};
use http::Target;
use load::{ClientOpts, Engine, Mix, Phase, Ranges, Record, RunSpec};
use reconcile::ReconcileReport;
use stats::{KindSummary, OpKind};

/// One run's numbers (a `get --endpoint all` has three runs).
#[derive(Debug, Clone)]
pub struct RunReport {
    pub label: String,
    pub wall: Duration,
    pub summaries: Vec<KindSummary>,
    pub breaker_openings: u64,
    pub connections: u64,
}

/// Everything an invocation found.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub mode: &'static str,
    pub target: String,
    pub season: u32,
    pub seed: u64,
    pub runs: Vec<RunReport>,
    pub reconcile: Option<ReconcileReport>,
    /// 0, or 1 when the reconciliation found mismatches.
    pub exit_code: i32,
}

impl Outcome {
    pub fn failures(&self) -> u64 {
        self.runs.iter().flat_map(|r| &r.summaries).map(|s| s.failures).sum()
    }
    pub fn successes(&self) -> u64 {
        self.runs.iter().flat_map(|r| &r.summaries).map(|s| s.successes).sum()
    }
}

fn validate(c: &Common) -> Result<(), String> {
    if let Some(r) = c.rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err("--rate must be a positive number of requests per second".into());
        }
    }
    if c.season > 9999 {
        return Err("--season must be a year of at most 4 digits".into());
    }
    if c.breaker_close_inflight > c.breaker_open_inflight || c.breaker_close_errors > c.breaker_open_errors {
        return Err("the breaker's close thresholds must not be above its open thresholds".into());
    }
    Ok(())
}

/// Run the command: load, summaries on stdout, files asked for, reconciliation.
pub async fn execute(cli: &Cli) -> Result<Outcome, String> {
    let cmd = cli.resolved();
    let c = cmd.common().clone();
    validate(&c)?;
    let target = Arc::new(Target::resolve(&c.base, &c.base_path).await?);
    let url = target.url();
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(target.addr)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("cannot connect to {url}: {e} (is the server running?)")),
        Err(_) => return Err(format!("cannot connect to {url}: no answer within 5 s")),
    }
    let seed = c
        .seed
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    let timeout = Duration::from_millis(c.timeout_ms.max(1));

    let mut season = c.season;
    if let Command::Post(p) = &cmd {
        if p.run_season {
            season = reconcile::pick_unused_season(target.clone(), c.resorts, c.season, timeout).await?;
            eprintln!("using season {season} (no resort in {} has it yet)", c.resorts);
        }
    }
    let reconcile_wanted = matches!(&cmd, Command::Post(p) if p.reconcile);
    let opts = ClientOpts {
        ranges: Ranges { skiers: c.skiers, resorts: c.resorts, lifts: c.lifts, days: c.days, times: c.times, season },
        retries: c.retries,
        backoff: Duration::from_millis(c.backoff_ms),
        backoff_max: Duration::from_millis(c.backoff_max_ms.max(c.backoff_ms)),
        timeout,
        keep_records: c.csv.is_some() || c.plot.is_some(),
        keep_rides: reconcile_wanted,
        quiet: c.quiet,
        seed,
    };
    let breaker = breaker::BreakerConfig {
        enabled: !c.no_breaker,
        open_inflight: c.breaker_open_inflight.max(1),
        close_inflight: c.breaker_close_inflight,
        open_error_rate: c.breaker_open_errors,
        close_error_rate: c.breaker_close_errors,
        min_samples: c.breaker_min_samples,
        window: Duration::from_millis(c.breaker_window_ms.max(10)),
    };
    let engine = Arc::new(Engine::new(target.clone(), opts, breaker));

    let (mode, specs): (&'static str, Vec<RunSpec>) = match &cmd {
        Command::Post(p) => {
            let p1 = (p.phase1_workers as u64 * p.phase1_rides).min(p.total);
            let rate = c.rate;
            let phases = vec![
                Phase {
                    name: format!("phase 1: {} workers", p.phase1_workers),
                    workers: p.phase1_workers.max(1),
                    total: Some(p1),
                    duration: None,
                    rate,
                },
                Phase {
                    name: format!("phase 2: {} workers", p.concurrency),
                    workers: p.concurrency.max(1),
                    total: Some(p.total - p1),
                    duration: None,
                    rate,
                },
            ];
            ("post", vec![RunSpec { label: format!("post {} rides", p.total), mix: Mix::Post, phases }])
        }
        Command::Get(g) => {
            let kinds: Vec<OpKind> = match g.endpoint {
                Endpoint::SkierDay => vec![OpKind::SkierDay],
                Endpoint::ResortDay => vec![OpKind::ResortDay],
                Endpoint::Vertical => vec![OpKind::Vertical],
                Endpoint::All => vec![OpKind::SkierDay, OpKind::ResortDay, OpKind::Vertical],
            };
            let specs = kinds
                .into_iter()
                .map(|k| RunSpec {
                    label: format!("get: {} workers x {}", g.concurrency, g.requests),
                    mix: Mix::Read(k),
                    phases: vec![Phase {
                        name: format!("{} workers", g.concurrency),
                        workers: g.concurrency.max(1),
                        total: Some(g.concurrency as u64 * g.requests),
                        duration: None,
                        rate: c.rate,
                    }],
                })
                .collect();
            ("get", specs)
        }
        Command::Mixed(m) => {
            if !(0.0..=1.0).contains(&m.read_ratio) {
                return Err("--read-ratio must be between 0 and 1".into());
            }
            if !(m.duration > 0.0 && m.duration.is_finite()) {
                return Err("--duration must be a positive number of seconds".into());
            }
            let phases = vec![Phase {
                name: format!("{} workers", m.concurrency),
                workers: m.concurrency.max(1),
                total: None,
                duration: Some(Duration::from_secs_f64(m.duration)),
                rate: c.rate,
            }];
            let label = format!("mixed {:.0}% reads for {} s", m.read_ratio * 100.0, m.duration);
            ("mixed", vec![RunSpec { label, mix: Mix::Mixed { read_ratio: m.read_ratio }, phases }])
        }
    };

    let mut runs = Vec::new();
    let mut records: Vec<Record> = Vec::new();
    let mut acked = Vec::new();
    let mut marks: Vec<(u64, String)> = Vec::new();
    let mut uncertain = Vec::new();
    for spec in &specs {
        let mut res = load::run(&engine, spec).await;
        let rep = RunReport {
            label: res.label.clone(),
            wall: res.wall,
            summaries: res.summaries(),
            breaker_openings: res.breaker_openings,
            connections: res.collected.connects,
        };
        print!("{}", report::format_run(&rep));
        if specs.len() > 1 {
            marks.extend(
                res.phase_starts.first().map(|(t, _)| (*t, rep.summaries.first().map(|s| s.kind.name()).unwrap_or("").to_string())),
            );
        } else {
            marks.extend(res.phase_starts.iter().skip(1).cloned());
        }
        records.append(&mut res.collected.records);
        acked.append(&mut res.collected.acked);
        uncertain.append(&mut res.collected.uncertain);
        runs.push(rep);
    }

    let mut reconcile_report = None;
    if let Command::Post(p) = &cmd {
        if p.reconcile {
            let ro = reconcile::ReconcileOpts {
                vertical_per_lift: p.vertical_per_lift,
                sample: p.reconcile_sample,
                wait: Duration::from_millis(p.reconcile_wait_ms),
                timeout,
                seed,
                workers: 16,
            };
            let r = reconcile::reconcile(target.clone(), &acked, &uncertain, &ro).await;
            print!("{}", report::format_reconcile(&r));
            reconcile_report = Some(r);
        }
    }

    let exit_code = if reconcile_report.as_ref().is_some_and(|r| !r.clean()) { 1 } else { 0 };
    let outcome = Outcome { mode, target: url, season, seed, runs, reconcile: reconcile_report, exit_code };

    if let Some(path) = &c.json {
        let text = serde_json::to_string_pretty(&report::to_json(&outcome)).expect("JSON of plain values");
        std::fs::write(path, text + "\n").map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &c.csv {
        records.sort_by_key(|r| r.start_us);
        report::write_csv(path, &records).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &c.plot {
        // The file is an SVG whatever it is called: say so when the name suggests otherwise
        // (a viewer that trusts the extension would not show it).
        if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")) {
            eprintln!("note: --plot writes SVG; {} does not end in .svg", path.display());
        }
        let title = format!("liftlog-load {mode}: {} requests", records.len());
        plot::write(path, &records, &title, &marks).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(outcome)
}
