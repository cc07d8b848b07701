//! Command line: `liftlog-load [post] | get | mixed`, every range and threshold a flag.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// An inclusive range of integers, written `LO-HI` (or a single value `N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub lo: u32,
    pub hi: u32,
}

impl FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Range, String> {
        let s = s.trim();
        let (lo, hi) = match s.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s, s),
        };
        let lo: u32 = lo.parse().map_err(|_| format!("`{s}` is not a range like 1-100 or a number"))?;
        let hi: u32 = hi.parse().map_err(|_| format!("`{s}` is not a range like 1-100 or a number"))?;
        if lo > hi {
            return Err(format!("range `{s}` is empty: the low end is above the high end"));
        }
        Ok(Range { lo, hi })
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

const ABOUT: &str =
    "Load client for SkiDataAPI 2.0 servers (liftlog and others): posts lift rides, reads them back, reports throughput and latency.";

const LONG_ABOUT: &str = "\
Load client for SkiDataAPI 2.0 servers (liftlog and others).

Without a subcommand it runs `post`: 200,000 lift rides, phase 1 with 32 workers x 1000 rides,
then the rest over --concurrency workers, each ride with its own Idempotency-Key (kept on retries).
`get` measures the read endpoints, `mixed` runs reads and writes together for --duration seconds.

Counting checks (`post --reconcile`) compare what the service answers with the rides it acknowledged
with 201 in this run. A service that already holds rides of the same season from an earlier run will
show more skiers than this run posted: start the server on a fresh data dir, or give each run its own
season (--season 2031, or --run-season to pick a season no resort has yet).";

#[derive(Parser, Debug, Clone)]
#[command(name = "liftlog-load", version, about = ABOUT, long_about = LONG_ABOUT, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Arguments of the default `post` run (when no subcommand is given).
    #[command(flatten)]
    pub post: PostArgs,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// POST lift rides (the default): phase 1 of 32 x 1000 rides, then the rest over --concurrency workers.
    Post(PostArgs),
    /// GET the read endpoints with random parameters, one summary per endpoint.
    Get(GetArgs),
    /// Reads and writes together for --duration seconds.
    Mixed(MixedArgs),
}

impl Cli {
    /// The command that will run (`post` with the top-level flags when none was named).
    pub fn resolved(&self) -> Command {
        self.command.clone().unwrap_or_else(|| Command::Post(self.post.clone()))
    }
}

impl Command {
    pub fn common(&self) -> &Common {
        match self {
            Command::Post(a) => &a.common,
            Command::Get(a) => &a.common,
            Command::Mixed(a) => &a.common,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Base URL of the service (http only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub base: String,
    /// Deployment context path put before every API path, e.g. /skiers-app.
    #[arg(long, default_value = "")]
    pub base_path: String,

    /// skierID range.
    #[arg(long, default_value = "1-100000", value_name = "LO-HI")]
    pub skiers: Range,
    /// resortID range.
    #[arg(long, default_value = "1-10", value_name = "LO-HI")]
    pub resorts: Range,
    /// liftID range.
    #[arg(long, default_value = "1-40", value_name = "LO-HI")]
    pub lifts: Range,
    /// dayID range.
    #[arg(long, default_value = "1-3", value_name = "LO-HI")]
    pub days: Range,
    /// Ride time range (minutes since opening).
    #[arg(long, default_value = "1-360", value_name = "LO-HI")]
    pub times: Range,
    /// seasonID of every ride and read. Use a season of its own per run (or a fresh data dir) when you reconcile.
    #[arg(long, default_value_t = 2025)]
    pub season: u32,

    /// Open loop: schedule requests at this fixed rate (req/s) and measure latency from the
    /// scheduled time (no coordinated omission). Without it, each worker sends back to back.
    #[arg(long, value_name = "REQ_PER_S")]
    pub rate: Option<f64>,

    /// Retries per request on 4xx/5xx/transport errors (same Idempotency-Key every time).
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// First retry delay; doubles per retry, with jitter.
    #[arg(long, default_value_t = 10)]
    pub backoff_ms: u64,
    /// Longest retry delay (also caps a Retry-After header).
    #[arg(long, default_value_t = 2000)]
    pub backoff_max_ms: u64,
    /// Per-attempt timeout.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,

    /// Circuit breaker opens (stops sending) at this many requests in flight...
    #[arg(long, default_value_t = 1000)]
    pub breaker_open_inflight: usize,
    /// ...and closes again at or below this many.
    #[arg(long, default_value_t = 500)]
    pub breaker_close_inflight: usize,
    /// Circuit breaker opens when this share of recent attempts failed (0..1)...
    #[arg(long, default_value_t = 0.5)]
    pub breaker_open_errors: f64,
    /// ...and closes again at or below this share.
    #[arg(long, default_value_t = 0.1)]
    pub breaker_close_errors: f64,
    /// Fewest attempts in the window before the error rate counts.
    #[arg(long, default_value_t = 50)]
    pub breaker_min_samples: u64,
    /// Length of the "recent" error-rate window.
    #[arg(long, default_value_t = 1000)]
    pub breaker_window_ms: u64,
    /// Never open the circuit breaker.
    #[arg(long)]
    pub no_breaker: bool,

    /// Client runtime threads (1 = a single-threaded runtime, the cheapest per request).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write one record per request: start_us (since the run began), type, latency_us, status, attempts.
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Write an SVG: throughput and p50/p99 latency over time, and a latency histogram.
    /// The file is written to the path as given (name it .svg).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar on stderr (it is drawn only when stderr is a terminal anyway).
    #[arg(long, short)]
    pub quiet: bool,
    /// Seed of the random parameters (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct PostArgs {
    #[command(flatten)]
    pub common: Common,
    /// Rides to post in all.
    #[arg(long, short = 'n', default_value_t = 200_000)]
    pub total: u64,
    /// Workers of phase 1.
    #[arg(long, default_value_t = 32)]
    pub phase1_workers: usize,
    /// Rides per phase-1 worker.
    #[arg(long, default_value_t = 1000)]
    pub phase1_rides: u64,
    /// Workers of phase 2 (the remaining rides).
    #[arg(long, short = 'c', default_value_t = 128)]
    pub concurrency: usize,

    /// After the run, check the service's counts against the rides acknowledged with 201.
    #[arg(long)]
    pub reconcile: bool,
    /// Acknowledged skier-days whose vertical is checked.
    #[arg(long, default_value_t = 2000)]
    pub reconcile_sample: usize,
    /// How long reads may lag behind the writes before a difference counts as a mismatch.
    #[arg(long, default_value_t = 5000)]
    pub reconcile_wait_ms: u64,
    /// Vertical metres per lift number (the default catalog: lift n rises n x 10 m).
    #[arg(long, default_value_t = 10)]
    pub vertical_per_lift: u64,
    /// Use the first season at or after --season that no resort in --resorts has yet.
    #[arg(long)]
    pub run_season: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Endpoint {
    /// GET /skiers/{resort}/seasons/{season}/days/{day}/skiers/{skier}
    SkierDay,
    /// GET /resorts/{resort}/seasons/{season}/day/{day}/skiers
    ResortDay,
    /// GET /skiers/{skier}/vertical?resort=R&season=S
    Vertical,
    /// The three, one after the other.
    All,
}

#[derive(Args, Debug, Clone)]
pub struct GetArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, value_enum, default_value = "all")]
    pub endpoint: Endpoint,
    /// Concurrent workers.
    #[arg(long, short = 'c', default_value_t = 128)]
    pub concurrency: usize,
    /// Requests per worker and endpoint.
    #[arg(long, short = 'n', default_value_t = 500)]
    pub requests: u64,
}

#[derive(Args, Debug, Clone)]
pub struct MixedArgs {
    #[command(flatten)]
    pub common: Common,
    /// Share of requests that are reads (spread over the three read endpoints).
    #[arg(long, default_value_t = 0.9)]
    pub read_ratio: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Concurrent workers.
    #[arg(long, short = 'c', default_value_t = 128)]
    pub concurrency: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!("1-100000".parse::<Range>().unwrap(), Range { lo: 1, hi: 100000 });
        assert_eq!("2025".parse::<Range>().unwrap(), Range { lo: 2025, hi: 2025 });
        assert!("5-1".parse::<Range>().is_err());
        assert!("a-3".parse::<Range>().is_err());
    }

    #[test]
    fn no_subcommand_means_post_with_defaults() {
        let cli = Cli::try_parse_from(["liftlog-load"]).unwrap();
        let Command::Post(p) = cli.resolved() else { panic!("not post") };
        assert_eq!(p.total, 200_000);
        assert_eq!((p.phase1_workers, p.phase1_rides, p.concurrency), (32, 1000, 128));
        assert_eq!(p.common.skiers, Range { lo: 1, hi: 100000 });
        assert_eq!(p.common.season, 2025);

        let cli = Cli::try_parse_from(["liftlog-load", "--total", "10", "--reconcile"]).unwrap();
        let Command::Post(p) = cli.resolved() else { panic!("not post") };
        assert!(p.reconcile && p.total == 10);

        let cli = Cli::try_parse_from(["liftlog-load", "get", "--endpoint", "resort-day", "-n", "3"]).unwrap();
        let Command::Get(g) = cli.resolved() else { panic!("not get") };
        assert_eq!((g.endpoint, g.requests, g.concurrency), (Endpoint::ResortDay, 3, 128));
    }
}
