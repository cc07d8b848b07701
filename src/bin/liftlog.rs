//! The `liftlog` command: `serve` runs a node; `tables create` prepares the table store.

use clap::{Parser, Subcommand};
use liftlog::config::{Config, ServeArgs};

/// mimalloc, not glibc's malloc: the write path allocates and frees many short-lived
/// buffers from several threads (sled's node copies, request bodies), which glibc served
/// with about a fifth of the POST path's CPU (issue 15's profile, `docs/capacity.md`). Its
/// memory per resident ride measured the same as glibc's once huge pages were off (see
/// Cargo.toml).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "liftlog", version, about = "Ski lift rides in, unique skiers and verticals out (SkiDataAPI 2.0)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (embedded back end by default: nothing else to install).
    Serve(ServeArgs),
    /// Manage the table store.
    Tables {
        #[command(subcommand)]
        action: TablesAction,
    },
}

#[derive(Subcommand)]
enum TablesAction {
    /// Create the tables if missing (idempotent), in the store the flags select.
    Create(ServeArgs),
}

/// The configuration, then logging as it says (its guard is dropped after the runtime: that
/// sends the last spans), then the loader's warnings (deprecated keys) through that logging.
fn resolve(args: &ServeArgs) -> anyhow::Result<(Config, liftlog::logging::Guard)> {
    let resolved = Config::resolve(args)?;
    let guard = liftlog::logging::init(&resolved.config.log)?;
    for w in &resolved.warnings {
        tracing::warn!("{w}");
    }
    Ok((resolved.config, guard))
}

/// Runs `work` on an actix system, then drops the system before the logging guard: spans
/// that end as the runtime's tasks are dropped are still recorded, and the guard sends them.
fn run<T>(logging: liftlog::logging::Guard, work: impl std::future::Future<Output = T>) -> T {
    let system = actix_rt::System::new();
    let result = system.block_on(work);
    drop(system);
    drop(logging);
    result
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let (config, logging) = resolve(&args)?;
            run(logging, async move {
                let running = liftlog::service::start(config).await?;
                // One line on stdout for scripts and tests that start us on port 0 (two with an
                // admin listener). Written without `println!`: a reader that closed the pipe
                // after the first line must not make the node panic on a broken pipe.
                use std::io::Write as _;
                let mut out = std::io::stdout();
                let _ = writeln!(out, "liftlog listening on http://{}", running.addr);
                if let Some(admin) = running.admin_addr {
                    let _ = writeln!(out, "liftlog admin on http://{admin}");
                }
                let _ = out.flush();
                liftlog::service::wait_for_signal().await;
                running.shutdown().await
            })
        }
        Command::Tables { action: TablesAction::Create(args) } => {
            let (config, logging) = resolve(&args)?;
            run(logging, liftlog::service::create_tables(&config))
        }
    }
}
