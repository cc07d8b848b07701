//! End to end against the real server: start `target/debug/liftlog serve` on a free port with a
//! fresh data dir, post rides with the client in-process, reconcile, read every endpoint.
//!
//! Cargo does not build another package's binary for this test: the workspace build
//! (`cargo build --workspace --all-targets`, which scripts/test.sh runs first) provides it.
//! LIFTLOG_BIN overrides where to find it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use clap::Parser;
use liftlog_load::{execute, Cli};

struct Server {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

fn liftlog_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("LIFTLOG_BIN") {
        return PathBuf::from(p);
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target_dir.join("debug").join("liftlog");
    assert!(
        bin.exists(),
        "the liftlog server binary is missing at {}: build it first with `cargo build --workspace --all-targets` \
         (scripts/test.sh does), or point LIFTLOG_BIN at it",
        bin.display()
    );
    bin
}

fn start_server() -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("server.log");
    let mut cmd = Command::new(liftlog_binary());
    // Admin on the public (loopback) port: the default 127.0.0.1:9090 could be taken.
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "main", "--data-dir"])
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(&log).expect("log file")));
    // A stray environment must not turn this into a production-mode node.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LIFTLOG_") && k != "LIFTLOG_BIN" {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd.spawn().expect("start liftlog");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        for _ in lines {} // keep draining so the server never blocks on stdout
    });
    let mut server = Server { child, url: String::new(), log, _dir: dir };
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) => {
            let url = line.strip_prefix("liftlog listening on ").unwrap_or_else(|| panic!("unexpected first line: {line}"));
            server.url = url.trim().to_string();
        }
        Err(_) => panic!("liftlog printed no `listening on` line within 60 s; its log:\n{}", server.log_tail()),
    }
    server
}

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("liftlog-load").chain(args.iter().copied())).expect("valid arguments")
}

#[test]
fn posts_reconcile_and_reads_against_the_real_server() {
    let server = start_server();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("post.json");
    let csv = dir.path().join("post.csv");
    let svg = dir.path().join("post.svg");

    let post = cli(&[
        "post",
        "--base",
        &server.url,
        "--total",
        "3000",
        "--phase1-workers",
        "16",
        "--phase1-rides",
        "100",
        "--concurrency",
        "16",
        "--skiers",
        "1-500",
        "--reconcile",
        "--reconcile-sample",
        "500",
        "--quiet",
        "--seed",
        "7",
        "--json",
        json.to_str().unwrap(),
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let out = rt.block_on(execute(&post)).unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log_tail()));
    assert_eq!(out.failures(), 0, "server log:\n{}", server.log_tail());
    assert_eq!(out.successes(), 3000);
    let rec = out.reconcile.as_ref().expect("reconciliation ran");
    assert!(rec.clean(), "mismatches: {:#?}\nserver log:\n{}", rec.mismatches, server.log_tail());
    assert_eq!(rec.acked_rides, 3000);
    assert_eq!(rec.resort_days, 30, "10 resorts x 3 days");
    assert_eq!(rec.resort_days_ok, 30);
    assert!(rec.skier_days_checked == 500 && rec.skier_days_ok == 500);
    assert_eq!(out.exit_code, 0);

    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["runs"][0]["endpoints"][0]["successes"], 3000);
    assert_eq!(doc["runs"][0]["endpoints"][0]["status"]["201"], 3000);
    assert_eq!(doc["runs"][0]["endpoints"][0]["status_code_distribution"]["201"], 3000);
    assert_eq!(doc["runs"][0]["endpoints"][0]["summary"]["success_rate"], 1.0);
    assert!(doc["runs"][0]["endpoints"][0]["latency_percentiles_us"]["p99.99"].is_u64());
    assert_eq!(doc["reconcile"]["ok"], true);
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv_text.lines().count(), 3001);
    assert!(csv_text.lines().nth(1).unwrap().contains(",POST,"));
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("liftlog-load post: 3000 requests"), "{}", &plot[..200.min(plot.len())]);

    // A second run in the same season: the service still counts the skiers of the first run,
    // so numSkiers is above what this run acknowledged, and reconciliation must say so.
    let again = cli(&[
        "post",
        "--base",
        &server.url,
        "--total",
        "200",
        "--phase1-workers",
        "4",
        "--phase1-rides",
        "50",
        "--concurrency",
        "4",
        "--skiers",
        "1-500",
        "--reconcile",
        "--reconcile-sample",
        "50",
        "--reconcile-wait-ms",
        "300",
        "--quiet",
    ]);
    let out2 = rt.block_on(execute(&again)).unwrap();
    assert_eq!(out2.failures(), 0);
    let rec2 = out2.reconcile.as_ref().unwrap();
    assert!(!rec2.clean(), "a season with earlier rides must not reconcile cleanly");
    assert_eq!(out2.exit_code, 1);

    // --run-season picks a season nobody used: clean again.
    let fresh = cli(&[
        "post",
        "--base",
        &server.url,
        "--total",
        "300",
        "--phase1-workers",
        "4",
        "--phase1-rides",
        "50",
        "--concurrency",
        "8",
        "--reconcile",
        "--run-season",
        "--quiet",
    ]);
    let out3 = rt.block_on(execute(&fresh)).unwrap();
    assert_ne!(out3.season, 2025);
    assert!(out3.reconcile.as_ref().unwrap().clean(), "{:#?}", out3.reconcile);

    // Every read endpoint answers (200, or 404 for a skier without rides).
    let get = cli(&["get", "--base", &server.url, "--endpoint", "all", "-c", "8", "-n", "50", "--skiers", "1-500", "--quiet"]);
    let out4 = rt.block_on(execute(&get)).unwrap();
    assert_eq!(out4.runs.len(), 3);
    for r in &out4.runs {
        let s = &r.summaries[0];
        assert_eq!((s.requests, s.failures), (400, 0), "{}: {:?}", r.label, s.status);
        // 404 counts as an answer for a skier without rides, so it must not hide a broken
        // endpoint. Resort-day answers 200 always (0 skiers is an answer); a season vertical
        // at a random resort about half of the time here, a skier-day (a random skier on a
        // random day) about a fifth; a broken endpoint answers 404 to all.
        let ok = s.status.iter().find(|(code, _)| *code == 200).map_or(0, |(_, n)| *n);
        let least = match s.kind {
            liftlog_load::stats::OpKind::SkierDay => 20,
            liftlog_load::stats::OpKind::Vertical => 100,
            _ => 390,
        };
        assert!(ok >= least, "{} {:?}: only {ok} of 400 answered 200: {:?}", r.label, s.kind, s.status);
    }

    // Mixed, briefly.
    let mixed = cli(&["mixed", "--base", &server.url, "--duration", "1", "-c", "8", "--quiet"]);
    let out5 = rt.block_on(execute(&mixed)).unwrap();
    assert_eq!(out5.failures(), 0);
    assert!(out5.runs[0].summaries.iter().any(|s| s.kind == liftlog_load::stats::OpKind::Post));
}
