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

/// Failures of publishing a ride to the bus. All of them mean "not accepted": the client
/// gets a 503 with `Retry-After` and should retry with the same `Idempotency-Key`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    /// The bus is at its bound (queue full, WAL full, broker slow): shed load early.
    #[error("the service is at capacity")]
    Overloaded,
    /// The broker or the consumer did not confirm within the deadline.
    #[error("the ride was not confirmed in time")]
    Timeout,
    /// The broker connection is down or the WAL refused the write.
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
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
            ApiError::BadRequest(m) | ApiError::Conflict(m) => f.write_str(m),
            ApiError::ResortNotFound => f.write_str("Resort not found"),
            ApiError::DataNotFound => f.write_str("Data not found"),
            ApiError::NoSuchEndpoint => f.write_str("No such endpoint; see /openapi.json for the API"),
            ApiError::MethodNotAllowed(allow) => write!(f, "Method not allowed here; use {allow}"),
            ApiError::Unauthorized => f.write_str("A valid bearer token is required"),
            ApiError::PayloadTooLarge(limit) => write!(f, "Request body larger than {limit} bytes"),
            ApiError::UnsupportedMediaType => f.write_str("Content-Type must be application/json"),
            ApiError::Unavailable { message, .. } | ApiError::TooManyRequests { message, .. } => f.write_str(message),
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
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
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

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        if let PublishError::Refused(message) = e {
            return ApiError::Conflict(message);
        }
        if let PublishError::RateLimited { retry_after_secs } = e {
            return ApiError::TooManyRequests {
                message: "Too many rides right now; retry after the Retry-After delay with the same Idempotency-Key".into(),
                retry_after_secs,
            };
        }
        let retry_after_secs = match e {
            PublishError::Overloaded => 1,
            _ => 2,
        };
        ApiError::Unavailable { message: format!("Ride not recorded: {e}; retry with the same Idempotency-Key"), retry_after_secs }
    }
}

impl From<TableError> for ApiError {
    fn from(e: TableError) -> Self {
        tracing::warn!(cause = %e, "table read failed");
        ApiError::Unavailable { message: "Storage temporarily unavailable".into(), retry_after_secs: 2 }
    }
}
