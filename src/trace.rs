//! Following one ride across processes: its request id.
//!
//! Every HTTP request gets one: the client's `X-Request-Id`, else the trace id of a W3C
//! `traceparent`, else one made here. It is a field of the request's span, so every log line
//! the request writes carries it; the answer echoes it in `X-Request-Id`; a forwarded read
//! sends it on to the shard's owner; and a POSTed ride carries it through the bus (the AMQP
//! header [`AMQP_HEADER`]) to the consumer, whose WAL-batch log lines list the ids of the
//! rides they hold. Nothing here is stored: the WAL and the tables hold rides, not ids.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The request header a client may set, and the answer header that echoes it.
pub const HEADER: &str = "x-request-id";
/// The W3C trace-context header; its trace id is the request id when no `X-Request-Id` came.
pub const TRACEPARENT: &str = "traceparent";
/// The AMQP message header with the request ids of the message's rides, in body order,
/// separated by commas (ids never hold one, see [`RequestId::accept`]).
pub const AMQP_HEADER: &str = "liftlog-request-ids";
/// The longest id taken from a client; a longer one is replaced by one of ours rather than
/// refused: a tracing header must never cost a client its ride.
pub const MAX_LEN: usize = 64;

/// One request's id. Cheap to clone (shared); empty for rides that came without one (an
/// older writer, a test, the WAL replay).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestId(Option<Arc<str>>);

impl RequestId {
    /// The id a request is known by: the client's, when it is usable, else a new one.
    pub fn of_request(x_request_id: Option<&[u8]>, traceparent: Option<&[u8]>) -> RequestId {
        x_request_id
            .and_then(RequestId::accept)
            .or_else(|| traceparent.and_then(trace_id).and_then(RequestId::accept))
            .unwrap_or_else(RequestId::make)
    }

    /// A client's id, if it is 1 to [`MAX_LEN`] characters of letters, digits and `-_.:/+=@`
    /// (what request ids and trace ids are made of): nothing that could break a log line, a
    /// header or the comma-separated AMQP header.
    pub fn accept(raw: &[u8]) -> Option<RequestId> {
        let ok = |b: &u8| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b);
        if raw.is_empty() || raw.len() > MAX_LEN || !raw.iter().all(ok) {
            return None;
        }
        std::str::from_utf8(raw).ok().map(|s| RequestId(Some(s.into())))
    }

    /// A new id: 16 hex digits, unique within the process (a counter) and, with a seed
    /// drawn at start, across processes and restarts.
    pub fn make() -> RequestId {
        static SEED: OnceLock<u64> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(rand::random);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        RequestId(Some(format!("{:016x}", xxhash_rust::xxh3::xxh3_64_with_seed(&n.to_le_bytes(), seed)).into()))
    }

    /// The id, or "" when there is none.
    pub fn as_str(&self) -> &str {
        self.0.as_deref().unwrap_or("")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A ride's event id as log lines show it (16 hex digits, as in the AMQP `message_id`);
/// formatted only when a line is written.
#[derive(Clone, Copy, Debug)]
pub struct RideId(pub u64);

impl fmt::Display for RideId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The trace id of a `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), when it is well formed
/// and not all zeros (which the W3C spec calls invalid).
fn trace_id(raw: &[u8]) -> Option<&[u8]> {
    let mut parts = raw.split(|b| *b == b'-');
    let (_version, id) = (parts.next()?, parts.next()?);
    let hex = id.len() == 32 && id.iter().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    (hex && id.iter().any(|b| *b != b'0')).then_some(id)
}

/// The request ids of a batch of rides, for its log lines: comma-separated, in ride order,
/// rides without one left out, and at most [`RequestIds::MAX_BYTES`]: an AMQP message's
/// headers must fit in one frame (RabbitMQ's `frame_max`, 128 KiB by default), whatever the
/// batch size is set to. Ids past the bound are left out of the logs, never the ride.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestIds(String);

impl RequestIds {
    pub const MAX_BYTES: usize = 32 * 1024;

    pub fn push(&mut self, id: &RequestId) {
        self.push_joined(id.as_str());
    }

    /// Appends ids that are already comma-separated (an AMQP message's header).
    pub fn push_joined(&mut self, ids: &str) {
        if ids.is_empty() || self.0.len() + ids.len() + 1 > Self::MAX_BYTES {
            return;
        }
        if !self.0.is_empty() {
            self.0.push(',');
        }
        self.0.push_str(ids);
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for RequestIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_id_is_kept_when_usable_and_replaced_when_not() {
        assert_eq!(RequestId::of_request(Some(b"gate-3:ride/42"), None).as_str(), "gate-3:ride/42");
        for bad in [&b""[..], b"has space", b"a,b", b"line\nbreak", &[b'x'; MAX_LEN + 1]] {
            let id = RequestId::of_request(Some(bad), None);
            assert_eq!(id.as_str().len(), 16, "{bad:?} is replaced by one of ours");
            assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn a_traceparent_gives_its_trace_id_unless_x_request_id_came_too() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(RequestId::of_request(None, Some(tp)).as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(RequestId::of_request(Some(b"mine"), Some(tp)).as_str(), "mine");
        let zeros = b"00-00000000000000000000000000000000-00f067aa0ba902b7-01";
        let upper = b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        for bad in [&zeros[..], upper, b"00-abc-def-01", b"garbage"] {
            assert_eq!(RequestId::of_request(None, Some(bad)).as_str().len(), 16, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn made_ids_differ() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| RequestId::make().to_string()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn a_batchs_ids_are_joined_in_order_without_the_missing_ones() {
        let mut ids = RequestIds::default();
        ids.push(&RequestId::accept(b"a").unwrap());
        ids.push(&RequestId::default());
        ids.push_joined("b,c");
        ids.push_joined("");
        assert_eq!(ids.as_str(), "a,b,c");
        let long = RequestId::accept(&[b'x'; MAX_LEN]).unwrap();
        for _ in 0..RequestIds::MAX_BYTES {
            ids.push(&long);
        }
        assert!(ids.len() <= RequestIds::MAX_BYTES, "bounded: {}", ids.len());
    }
}
