//! The settings of the RabbitMQ bus ends. A node builds them from its configuration
//! (`[bus]`/`[bus.amqp]`, [`crate::config::Config::amqp_config`]); `Default` is that
//! configuration's default, so a test on `AmqpConfig::default()` runs what a node runs.

use std::time::Duration;

/// Settings of the RabbitMQ bus.
#[derive(Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost` (vhost `/` is `%2f`); `amqps://` for TLS.
    pub url: String,
    /// Names: exchange `{prefix}.rides`, queues `{prefix}.rides.{p}`, dead letters
    /// `{prefix}.dlx` → `{prefix}.rides.dead`.
    pub prefix: String,
    /// Partition queues (fixed per deployment; all nodes must agree).
    pub partitions: u16,
    /// Confirm-mode channels in the publisher's pool.
    pub publish_channels: usize,
    /// Unconfirmed publishes before `publish` answers `Overloaded`.
    pub max_in_flight: usize,
    /// Longest wait for a publisher confirm before `Timeout`.
    pub confirm_timeout: Duration,
    /// Unacked deliveries per partition consumer.
    pub prefetch: u16,
    /// `x-delivery-limit` declared on the partition queues (at most `i32::MAX`); 0 declares
    /// none, for queues declared by an older liftlog whose limit is set by a policy instead
    /// (RabbitMQ cannot change an existing queue's arguments; see the module doc).
    pub delivery_limit: u32,
    /// How rides bound for one partition are packed into one message (see [`Batching`]).
    pub batching: Batching,
}

/// Rides for one partition published as one message: RabbitMQ's cost is per message, not
/// per byte, so one confirm for many rides is what lets the write path approach, and pass,
/// the broker's per-message ceiling. Each POST still answers only after the confirm of the
/// message that holds its ride.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batching {
    /// Most rides per message; 1 publishes every ride alone (the single-ride format).
    pub max_rides: usize,
    /// Most body bytes per message (a ride is ~25 bytes encoded).
    pub max_bytes: usize,
    /// Longest a ride waits for others before its message goes out anyway.
    pub linger: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        // The service's own defaults (config `[bus]`/`[bus.amqp]`), so that tests built on
        // `AmqpConfig::default()` exercise what a node actually runs.
        crate::config::Config::default().amqp_config("amqp://guest:guest@127.0.0.1:5672/%2f")
    }
}

impl std::fmt::Debug for AmqpConfig {
    /// Like a derived `Debug`, but without the password of the URL.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("publish_channels", &self.publish_channels)
            .field("max_in_flight", &self.max_in_flight)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("prefetch", &self.prefetch)
            .field("delivery_limit", &self.delivery_limit)
            .field("batching", &self.batching)
            .finish()
    }
}

/// The URL with its password (if any) replaced by `***`.
pub(super) fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &rest[..colon], &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl AmqpConfig {
    pub(super) fn partition_count(&self) -> u16 {
        self.partitions.max(1)
    }

    /// The direct exchange rides are published to.
    pub fn rides_exchange(&self) -> String {
        format!("{}.rides", self.prefix)
    }

    /// The queue of partition `p`.
    pub fn partition_queue(&self, p: u16) -> String {
        format!("{}.rides.{p}", self.prefix)
    }

    /// The dead-letter exchange of the partition queues.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// The queue that collects dead-lettered (undecodable) messages.
    pub fn dead_queue(&self) -> String {
        format!("{}.rides.dead", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        assert_eq!(redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(redact("amqp://host/%2f"), "amqp://host/%2f");
    }
}
