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

/// The request ids of a batch of rides: comma-separated, in ride order, rides without one
/// left out, and bounded. Ids past the bound are left out of the header and the logs, never
/// the ride, and the list then ends in `+N` (N ids left out), so that a search of the logs
/// for one of them is not a false "never reached the consumer".
///
/// Two bounds. [`RequestIds::default`] is a message header's: AMQP may split a body over
/// frames but never a header, and RabbitMQ lets `frame_max` go down to 4 KiB, so a header
/// holds at most [`HEADER_MAX_BYTES`]: 2 KiB, a hundred or so of our ids, whatever the batch
/// size. [`RequestIds::for_logs`] is a consumer batch's, which joins many messages' headers
/// for its log lines only: [`LOG_MAX_BYTES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestIds {
    ids: String,
    cap: usize,
    left_out: u64,
}

/// The most id bytes a message header carries (see [`RequestIds`]).
pub const HEADER_MAX_BYTES: usize = 2 * 1024;
/// The most id bytes a consumer batch's log lines carry, and the longest header a consumer
/// takes from a message.
pub const LOG_MAX_BYTES: usize = 32 * 1024;

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds { ids: String::new(), cap: HEADER_MAX_BYTES, left_out: 0 }
    }
}

impl RequestIds {
    pub fn for_logs() -> Self {
        RequestIds { cap: LOG_MAX_BYTES, ..RequestIds::default() }
    }

    pub fn push(&mut self, id: &RequestId) {
        self.push_joined(id.as_str());
    }

    /// Appends ids that are already comma-separated (an AMQP message's header, which may end
    /// in its own `+N`).
    pub fn push_joined(&mut self, ids: &str) {
        if ids.is_empty() {
            return;
        }
        // Room for the list, its comma, and a `+N` marker should later ids not fit.
        if self.ids.len() + ids.len() + 1 + MARKER_MAX > self.cap {
            self.left_out += ids.split(',').map(|id| id.strip_prefix('+').and_then(|n| n.parse().ok()).unwrap_or(1)).sum::<u64>();
            return;
        }
        if !self.ids.is_empty() {
            self.ids.push(',');
        }
        self.ids.push_str(ids);
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.left_out == 0
    }
}

/// `,+` and a u64's digits.
const MARKER_MAX: usize = 22;

impl fmt::Display for RequestIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.ids)?;
        match (self.left_out, self.ids.is_empty()) {
            (0, _) => Ok(()),
            (n, true) => write!(f, "+{n}"),
            (n, false) => write!(f, ",+{n}"),
        }
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
        assert_eq!(ids.to_string(), "a,b,c");
    }

    #[test]
    fn ids_past_the_bound_are_counted_not_carried() {
        let long = RequestId::accept(&[b'x'; MAX_LEN]).unwrap();
        let mut header = RequestIds::default();
        for _ in 0..1000 {
            header.push(&long);
        }
        let text = header.to_string();
        assert!(text.len() <= HEADER_MAX_BYTES, "a header's bound: {}", text.len());
        let kept = text.split(',').filter(|id| !id.starts_with('+')).count();
        assert_eq!(text.rsplit(',').next().unwrap(), format!("+{}", 1000 - kept), "{text}");
        // A consumer joining such headers adds up their markers with its own.
        let mut logs = RequestIds::for_logs();
        for _ in 0..40 {
            logs.push_joined(&text);
        }
        let joined = logs.to_string();
        assert!(joined.len() <= LOG_MAX_BYTES);
        let carried = joined.split(',').filter(|id| !id.starts_with('+')).count() as u64;
        let counted: u64 = joined.split(',').filter_map(|id| id.strip_prefix('+')?.parse::<u64>().ok()).sum();
        assert_eq!(carried + counted, 40_000, "every id is carried or counted: {carried} + {counted}");
    }
}
