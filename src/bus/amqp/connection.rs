//! Connecting to RabbitMQ, the one reconnect loop both bus ends run, and the typed error of
//! setting either up.

use lapin::uri::AMQPUri;
use lapin::{Channel, Connection, ConnectionProperties};
use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use super::AmqpConfig;
use crate::bus::Stop;
use crate::error::PublishError;
use crate::retry::Backoff;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: 100 ms doubling to 5 s, no jitter (one loop per bus end per node).
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Asked for unless the URL sets `heartbeat`: a silently dead TCP connection is noticed
/// within ~20 s.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Why connecting or declaring failed.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("bad AMQP URL: {0}")]
    BadUrl(String),
    #[error("no connection within {0:?}")]
    ConnectTimeout(Duration),
    /// A queue exists with arguments other than ours; the text says what to do.
    #[error("{0}")]
    InequivalentQueue(String),
    #[error("the connection is closed")]
    Closed,
    #[error(transparent)]
    Broker(#[from] lapin::Error),
}

impl From<AmqpError> for PublishError {
    /// A bus end that cannot be set up: the ride is refused before it was handed over.
    fn from(e: AmqpError) -> Self {
        unavailable(e)
    }
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> PublishError {
    PublishError::Unavailable(format!("RabbitMQ: {e}"))
}

pub(super) async fn connect(cfg: &AmqpConfig, role: &str) -> Result<Connection, AmqpError> {
    let mut uri: AMQPUri = cfg.url.parse().map_err(AmqpError::BadUrl)?;
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
    }
    let name = format!("liftlog {role} {}.{}", cfg.prefix, std::process::id());
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, props)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(AmqpError::ConnectTimeout(CONNECT_TIMEOUT)),
    }
}

/// The reconnect loop's state, the same for the publisher and the source: the backoff, an
/// outage logged once when it starts and once when it ends, and how long it lasted.
pub(super) struct Reconnect {
    role: &'static str,
    prefix: String,
    backoff: Backoff,
    outage: Option<Instant>,
}

impl Reconnect {
    pub(super) fn new(role: &'static str, prefix: &str) -> Self {
        Reconnect { role, prefix: prefix.to_string(), backoff: Backoff::new(BACKOFF_START, BACKOFF_CAP), outage: None }
    }

    /// The connection was lost (`cause`); `meanwhile` says what that means for clients.
    /// Logged once per outage.
    pub(super) fn lost(&mut self, cause: &str, meanwhile: &str) {
        if self.outage.is_none() {
            self.outage = Some(Instant::now());
            tracing::warn!(role = self.role, prefix = %self.prefix, cause, meanwhile, "RabbitMQ connection lost; reconnecting");
        }
    }

    /// One attempt to open a new session. On failure it waits the next backoff delay and
    /// gives `None`; also `None`, at once, when `stop` fires first.
    pub(super) async fn attempt<T>(&mut self, open: impl Future<Output = Result<T, AmqpError>>, stop: Option<&Stop>) -> Option<T> {
        let never = Stop::default();
        let stop = stop.unwrap_or(&never);
        let opened = tokio::select! {
            r = open => r,
            _ = stop.stopped() => return None,
        };
        match opened {
            Ok(session) => {
                let down_ms = self.outage.take().map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
                tracing::info!(role = self.role, prefix = %self.prefix, down_ms, "RabbitMQ reconnected");
                self.backoff.reset();
                Some(session)
            }
            Err(e) => {
                tracing::debug!(role = self.role, cause = %e, "RabbitMQ reconnect failed");
                tokio::select! {
                    _ = self.backoff.wait() => {}
                    _ = stop.stopped() => {}
                }
                None
            }
        }
    }
}

/// Closes `channels`, then the connection, in the background. In this order because lapin
/// closes a dropped channel handle by itself, and that close failing on a connection that
/// is already closing is logged by lapin as a connection error; an explicitly closed
/// channel is not closed again. (Dropping the handles alone would close the connection
/// only once every channel handle, also lapin's internal ones, is gone.)
pub(super) fn close_in_background(conn: impl std::ops::Deref<Target = Connection> + Send + Sync + 'static, channels: Vec<Channel>) {
    if !conn.status().connected() {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                for channel in channels.iter().filter(|c| c.status().connected()) {
                    let _ = channel.close(200, "OK".into()).await;
                }
                if conn.status().connected() {
                    let _ = conn.close(200, "OK".into()).await;
                }
            })
            .await;
        });
    }
}

/// Polls `fut` for the first time while holding `lock`, then without it. For lapin calls
/// whose synchronous prefix (up to queueing the frames) must not interleave with another
/// task's on the same channel.
pub(super) async fn first_poll_locked<F: Future>(lock: &parking_lot::Mutex<()>, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| {
        let _guard = lock.lock();
        Poll::Ready(fut.as_mut().poll(cx))
    })
    .await;
    match first {
        Poll::Ready(out) => out,
        Poll::Pending => fut.await,
    }
}
