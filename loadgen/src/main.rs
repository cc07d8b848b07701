use clap::Parser;
use liftlog_load::Cli;

fn main() {
    let cli = Cli::parse();
    let threads = cli.resolved().common().threads.max(1);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("liftlog-load: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    match rt.block_on(liftlog_load::execute(&cli)) {
        Ok(outcome) => std::process::exit(outcome.exit_code),
        Err(e) => {
            eprintln!("liftlog-load: {e}");
            std::process::exit(2);
        }
    }
}
