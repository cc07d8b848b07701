//! The dev harness of liftlog: the local backing services and a local cluster, as a library
//! that the tests call directly and that `cargo xtask` wraps in command lines.
//!
//! Why a crate and not scripts: the cluster tests used to shell out to a 600-line bash
//! script and parse its output; the same process management (pid files, readiness waits,
//! SIGTERM then SIGKILL, "stop only what we started") lived in three places. Here it is
//! written once, with typed errors, and the tests get values instead of text.
//!
//! - [`services`]: RabbitMQ (with the consistent-hash exchange plugin) and DynamoDB Local,
//!   installed when missing, started when not running, stopped only if we started them.
//! - [`cluster`]: nginx standing in for the ALB in front of write, consume and read nodes,
//!   in the shape of `deploy/aws/liftlog.yaml`.
//! - [`nginx`]: the cluster's nginx, its config rendered from `deploy/nginx/liftlog-cluster.conf`.
//!
//! Everything is loopback only, every wait is bounded, and every file the harness writes is
//! under a state dir of its own (`/tmp/liftlog-services`, `/tmp/liftlog-cluster` by default).
//! Progress lines go to stdout tagged `[services]`/`[cluster]`, warnings to stderr, as the
//! scripts did; what went wrong is returned as an [`Error`] that carries the log tail.

pub mod cluster;
mod net;
pub mod nginx;
mod process;
pub mod services;

use std::path::{Path, PathBuf};

/// What can go wrong in the harness. Each message says what was being done and, when a
/// process failed, ends with the last lines of its log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A setting (environment variable or saved cluster setting) has a value we refuse.
    #[error("{0}")]
    Setting(String),
    /// A node name that is not part of this cluster.
    #[error("no such node: {name} (try: {known})")]
    NoSuchNode { name: String, known: String },
    /// A command that needs a running cluster, and its state dir has none.
    #[error("the cluster is not up ({})", .0.display())]
    NotUp(PathBuf),
    /// A service, node or tool did not start, stop or answer as it must.
    #[error("{0}")]
    Failed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// A failure, with the last lines of the logs that explain it.
    pub(crate) fn failed(message: impl Into<String>, logs: &[&Path]) -> Error {
        let mut text = message.into();
        for log in logs {
            let tail = process::last_run(log, 25);
            if !tail.is_empty() {
                text.push_str(&format!("\n--- last lines of {} ---\n{tail}", log.display()));
            }
        }
        Error::Failed(text)
    }
}

/// The repository this harness belongs to (the nginx template, the sources the cluster's
/// release binary is built from).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}
