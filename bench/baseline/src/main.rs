//! `liftlog-bench`: the ceilings that `scripts/bench.sh` measures liftlog against, and two
//! helpers of its own. One binary with subcommands (one link instead of six); each prints
//! its figures as one JSON line on stdout for the script.
//!
//! - [`bare_http`]: bare actix-web (GETs from a HashMap, POST parses and answers 201).
//! - [`amqp`]: raw lapin publish-with-confirm to fresh quorum or classic queues.
//! - [`sled_ceiling`]: fsync/s, sled batch + flush records/s, sled iteration records/s.
//! - [`dynamo`]: raw BatchWriteItem items/s and GetItem/s against DynamoDB (Local).
//! - [`lag`]: the 201-to-visible probe.
//! - [`watch`]: live-stream subscribers: their cost to the node and their update delay.
//! - [`wal_fill`]: writes rides straight into a data dir's WAL (large replay runs).
//! - [`report`]: turns the collected JSON into `bench/results/<date>.md`.

mod amqp;
mod args;
mod bare_http;
mod dynamo;
mod lag;
mod report;
mod sled_ceiling;
mod wal_fill;
mod watch;

const USAGE: &str = "usage: liftlog-bench <bare-http|amqp|amqp-cleanup|sled|dynamo|lag|watch|wal-fill|report> [--flag value ...]
  bare-http --listen 127.0.0.1:18080 --workers 2 --rides 200000
  amqp      --url amqp://guest:guest@127.0.0.1:5672/%2f --queue-type quorum|classic --queues 4 --channels 4 --in-flight 1000 --seconds 8
            [--liftlog-prefix P: liftlog's own partition queues, declared by its code, purged after]
  amqp-cleanup --url URL --prefix P --partitions 4
  sled      --dir /tmp/x --records 500000 --batch 1000 --fsync-seconds 1
  dynamo    --endpoint http://127.0.0.1:8000 --seconds 8 --concurrency 16
  lag       --post http://127.0.0.1:8081 --read http://127.0.0.1:8082 --rate 100 --seconds 15 --season 2031 --poll-us 500 [--cold]
  watch     --url http://127.0.0.1:8080 --pid P --subscribers 1000 --seconds 10 --hold 15 --probe-rate 20 --season 2041 [--ready-file F] [--stop-file G]
  wal-fill  --data-dir D --rides 30000000 --batch 128 --season 2025
  report    --dir JSON_DIR --out bench/results/DATE.md";

fn main() {
    let mut raw = std::env::args().skip(1);
    let cmd = raw.next().unwrap_or_default();
    let args = match args::Args::parse(raw) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let result = match cmd.as_str() {
        "bare-http" => bare_http::run(&args),
        "amqp" => amqp::run(&args),
        "amqp-cleanup" => amqp::cleanup(&args),
        "sled" => sled_ceiling::run(&args),
        "dynamo" => dynamo::run(&args),
        "lag" => lag::run(&args),
        "watch" => watch::run(&args),
        "wal-fill" => wal_fill::run(&args),
        "report" => report::run(&args),
        _ => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("liftlog-bench {cmd}: {e}");
        std::process::exit(1);
    }
}
