//! The `liftlog` command: `serve` runs a node; `tables create` prepares the table store.

use clap::{Parser, Subcommand};
use liftlog::config::{Config, LogFormat, ServeArgs};

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

/// Logs go to stderr. actix's HTTP/1 dispatcher logs every malformed request at ERROR,
/// which would let any client flood the log; it is silenced by default (RUST_LOG overrides).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,actix_server=warn,actix_http::h1::dispatcher=off"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// The configuration, then logging in its format, then the loader's warnings (deprecated
/// keys) through that logging.
fn resolve(args: &ServeArgs) -> anyhow::Result<Config> {
    let resolved = Config::resolve(args)?;
    init_logging(resolved.config.log.format);
    for w in &resolved.warnings {
        tracing::warn!("{w}");
    }
    Ok(resolved.config)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = resolve(&args)?;
            actix_rt::System::new().block_on(async move {
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
            let config = resolve(&args)?;
            actix_rt::System::new().block_on(liftlog::service::create_tables(&config))
        }
    }
}
