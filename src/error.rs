//! Error enums per layer and the one place where errors become HTTP responses.
//!
//! Lower layers ([`TableError`], [`PublishError`], the WAL's `WalError`) say what went
//! wrong in their own terms; [`ApiError`] is what a client sees, and its
//! `ResponseError` impl is the only mapping to status codes in the crate.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use std::fmt;

/// Failures of the table store (sled trees or DynamoDB).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The store could not be reached or refused the request after retries (network,
    /// throttling, disk). Reads answer 503; the flusher keeps the data dirty and retries.
    #[error("table store unavailable: {0}")]
    Unavailable(String),
    /// A stored item did not decode: a bug or a foreign writer. Logged loudly; the item is
    /// treated as absent by nobody — the caller fails the operation.
    #[error("corrupt item in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

/// Failures of publishing a ride to the bus: no 201. Two kinds, and the client must be
/// told which ([`PublishError::may_be_recorded`]): refused before the ride was handed over
/// (it is not recorded and a retry is safe even without a key), or handed over with no
/// answer in time (it may still be recorded: only a retry with the same `Idempotency-Key`
/// is safe).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// Not recorded: the bus is at its bound (queue full, WAL full, too many publishes in
    /// flight): shed load early.
    #[error("the service is at capacity")]
    Overloaded,
    /// Outcome unknown: the ride was handed over (queued for the WAL, published to the
    /// broker) and no confirm came within the deadline. It may still be recorded.
    #[error("the ride was not confirmed in time")]
    Timeout,
    /// Not recorded: refused before it was handed over (broker connection down, circuit
    /// open, ride returned as unroutable, the WAL refused the append).
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
    /// Outcome unknown: handed over, then something failed before a confirm (the WAL fsync
    /// after the append, the broker channel after the publish, a broker nack, which refuses
    /// responsibility without saying the ride is not stored).
    #[error("the ride's durability is unknown: {0}")]
    Uncertain(String),
    /// The service is shutting down and accepts no more rides.
    #[error("the service is shutting down")]
    ShuttingDown,
    /// The admission token bucket is empty: downstream pressure is high. `429`.
    #[error("too many rides right now")]
    RateLimited { retry_after_secs: u32 },
    /// Durable but refused when applied, for good (a full skier-day): `409`, no retry.
    #[error("{0}")]
    Refused(String),
}

impl PublishError {
    /// Whether the ride may have been recorded despite the error (see the type's doc).
    pub fn may_be_recorded(&self) -> bool {
        matches!(self, PublishError::Timeout | PublishError::Uncertain(_))
    }
}

/// What a POST of a ride that got no 201 tells the client about the ride, in the
/// `Ride-Outcome` header of its 503 (a keyless client needs it to know whether a retry is
/// safe; the status alone does not say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RideOutcome {
    /// Refused before it was handed over: not recorded, and nothing will record it.
    NotRecorded,
    /// Handed over without a confirm: it may have been recorded, or may still be.
    Unknown,
}

impl RideOutcome {
    /// The `Ride-Outcome` header's value.
    pub fn as_str(self) -> &'static str {
        match self {
            RideOutcome::NotRecorded => "not-recorded",
            RideOutcome::Unknown => "unknown",
        }
    }
}

/// The header carrying a [`RideOutcome`].
pub const RIDE_OUTCOME_HEADER: &str = "ride-outcome";

/// What a client sees. Each variant maps to exactly one status code in `status_code`.
#[derive(Debug)]
pub enum ApiError {
    /// 400: malformed id, out-of-range value, bad JSON, missing or mistyped field.
    BadRequest(String),
    /// 404 `Resort not found`: the resort is not in the catalog.
    ResortNotFound,
    /// 404 `Data not found`: no rides in the asked scope.
    DataNotFound,
    /// 404 for a path that is no endpoint of ours.
    NoSuchEndpoint,
    /// 405 with the methods the path does support.
    MethodNotAllowed(&'static str),
    /// 401: admin endpoint without the configured bearer token.
    Unauthorized,
    /// 413: body larger than the configured limit.
    PayloadTooLarge(usize),
    /// 415: a body with a non-JSON content type.
    UnsupportedMediaType,
    /// 503 + Retry-After: load shed, bus or store unavailable, shutting down.
    Unavailable { message: String, retry_after_secs: u32 },
    /// 409: the ride conflicts with what the skier-day already holds (it is full).
    Conflict(String),
    /// 503 + Retry-After + `Ride-Outcome`: a POSTed ride got no 201; the header and the
    /// message say whether it is not recorded or may have been.
    RideNotConfirmed { message: String, retry_after_secs: u32, outcome: RideOutcome },
    /// 421: a read forwarded by another cluster node (`Liftlog-Forwarded-By`) for a shard
    /// this node does not hold under the epoch it names; the forwarder waits for its next
    /// shard map and retries once, then answers from the tables (`cluster::forward`).
    Misdirected(String),
    /// 429 + Retry-After: admission control refused the request to keep latency bounded.
    TooManyRequests { message: String, retry_after_secs: u32 },
    /// 500: a bug of ours. Never produced by client input; logged where it happens.
    Internal(String),
}

#[derive(Serialize)]
struct Message<'a> {
    message: &'a str,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::BadRequest(m) | ApiError::Conflict(m) | ApiError::Misdirected(m) => f.write_str(m),
            ApiError::ResortNotFound => f.write_str("Resort not found"),
            ApiError::DataNotFound => f.write_str("Data not found"),
            ApiError::NoSuchEndpoint => f.write_str("No such endpoint; see /openapi.json for the API"),
            ApiError::MethodNotAllowed(allow) => write!(f, "Method not allowed here; use {allow}"),
            ApiError::Unauthorized => f.write_str("A valid bearer token is required"),
            ApiError::PayloadTooLarge(limit) => write!(f, "Request body larger than {limit} bytes"),
            ApiError::UnsupportedMediaType => f.write_str("Content-Type must be application/json"),
            ApiError::Unavailable { message, .. }
            | ApiError::TooManyRequests { message, .. }
            | ApiError::RideNotConfirmed { message, .. } => f.write_str(message),
            ApiError::Internal(m) => write!(f, "Internal error: {m}"),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::ResortNotFound | ApiError::DataNotFound | ApiError::NoSuchEndpoint => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. } | ApiError::RideNotConfirmed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let text = self.to_string();
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            ApiError::Unavailable { retry_after_secs, .. } | ApiError::TooManyRequests { retry_after_secs, .. } => {
                resp.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            ApiError::RideNotConfirmed { retry_after_secs, outcome, .. } => {
                resp.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
                resp.insert_header((RIDE_OUTCOME_HEADER, outcome.as_str()));
            }
            ApiError::MethodNotAllowed(allow) => {
                resp.insert_header((header::ALLOW, *allow));
            }
            ApiError::Unauthorized => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            _ => {}
        }
        resp.json(Message { message: &text })
    }
}

impl ApiError {
    /// The answer to a POSTed ride that got no 201. It says what is true: a ride refused
    /// before it was handed over is not recorded; one handed over without a confirm may
    /// have been (the 503 used to say "not recorded" for both, and keyless clients that
    /// believed it counted the ride twice on retry). `keyed`: the request carried an
    /// `Idempotency-Key`, so a retry with it counts once whatever happened.
    pub fn ride_not_confirmed(e: PublishError, keyed: bool) -> ApiError {
        if let PublishError::Refused(message) = e {
            return ApiError::Conflict(message);
        }
        if let PublishError::RateLimited { retry_after_secs } = e {
            return ApiError::TooManyRequests {
                message:
                    "Too many rides right now; the ride was not recorded; retry after the Retry-After delay with the same Idempotency-Key"
                        .into(),
                retry_after_secs,
            };
        }
        let retry_after_secs = match e {
            PublishError::Overloaded => 1,
            _ => 2,
        };
        let (outcome, message) = match (e.may_be_recorded(), keyed) {
            (false, _) => (
                RideOutcome::NotRecorded,
                format!("Ride not recorded: {e}; retry after the Retry-After delay (with the same Idempotency-Key, if you sent one)"),
            ),
            (true, true) => (
                RideOutcome::Unknown,
                format!("Ride may have been recorded: {e}; retry with the same Idempotency-Key, which counts it once either way"),
            ),
            (true, false) => (
                RideOutcome::Unknown,
                format!(
                    "Ride may have been recorded: {e}; this request had no Idempotency-Key, so a retry may count it twice: \
                     send a key (the same on every retry) to make retries safe"
                ),
            ),
        };
        ApiError::RideNotConfirmed { message, retry_after_secs, outcome }
    }
}

impl From<TableError> for ApiError {
    fn from(e: TableError) -> Self {
        tracing::warn!(cause = %e, "table read failed");
        ApiError::Unavailable { message: "Storage temporarily unavailable".into(), retry_after_secs: 2 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    /// Status, body and `Ride-Outcome` of the answer to a POSTed ride that failed with `e`.
    fn answer(e: PublishError, keyed: bool) -> (StatusCode, String, Option<String>) {
        let resp = ApiError::ride_not_confirmed(e, keyed).error_response();
        let status = resp.status();
        let outcome = resp.headers().get(RIDE_OUTCOME_HEADER).map(|v| v.to_str().unwrap().to_string());
        assert!(resp.headers().contains_key(header::RETRY_AFTER));
        let body = resp.into_body().try_into_bytes().unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap(), outcome)
    }

    /// A deadline or a confirm timeout answers while the ride is still on its way: it may
    /// well be recorded. Saying "not recorded" makes a keyless client post it again, and
    /// count it twice.
    #[test]
    fn a_timeout_says_the_ride_may_have_been_recorded() {
        let (_, body, outcome) = answer(PublishError::Timeout, true);
        assert!(!body.contains("not recorded"), "{body}");
        assert!(body.contains("may have been recorded"), "{body}");
        assert_eq!(outcome.as_deref(), Some("unknown"), "{body}");
    }

    #[test]
    fn refusals_before_hand_over_say_not_recorded() {
        for e in [PublishError::Overloaded, PublishError::Unavailable("no connection to RabbitMQ".into()), PublishError::ShuttingDown] {
            let (status, body, outcome) = answer(e.clone(), false);
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{e:?}");
            assert!(body.contains("Ride not recorded"), "{e:?}: {body}");
            assert_eq!(outcome.as_deref(), Some("not-recorded"), "{e:?}");
        }
        let (status, body, outcome) = answer(PublishError::RateLimited { retry_after_secs: 3 }, false);
        assert_eq!((status, outcome), (StatusCode::TOO_MANY_REQUESTS, None));
        assert!(body.contains("not recorded"), "{body}");
    }

    #[test]
    fn hand_over_without_confirm_says_unknown_and_warns_keyless_clients() {
        for e in [PublishError::Timeout, PublishError::Uncertain("WAL fsync failed after the append".into())] {
            let (status, keyed, outcome) = answer(e.clone(), true);
            assert_eq!((status, outcome.as_deref()), (StatusCode::SERVICE_UNAVAILABLE, Some("unknown")), "{e:?}");
            assert!(keyed.contains("may have been recorded") && keyed.contains("same Idempotency-Key"), "{keyed}");
            let (_, keyless, outcome) = answer(e.clone(), false);
            assert_eq!(outcome.as_deref(), Some("unknown"));
            assert!(keyless.contains("no Idempotency-Key") && keyless.contains("count it twice"), "{keyless}");
        }
    }
}
