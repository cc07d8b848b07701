//! Where log lines and spans go: stderr, as text or JSON (`log.format`), and, when
//! `log.otlp_endpoint` is set in a build with the `otlp` cargo feature, the spans also to an
//! OpenTelemetry collector over OTLP/HTTP (protobuf).
//!
//! The export is off by default and, without the feature, not compiled at all: the default
//! build's hot path carries no OpenTelemetry layer. With it, a request span continues the
//! client's trace when the request had a W3C `traceparent` ([`adopt_parent`]), and its
//! `id` field is the request id of [`crate::trace`], so a trace backend finds a ride by
//! either. Spans are sent in batches from the exporter's own thread; the [`Guard`] sends what
//! is left when the process ends, so the last requests before a SIGTERM are not lost.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{ConfigError, LogConfig, LogFormat};

/// actix's HTTP/1 dispatcher logs every malformed request at ERROR, which would let any
/// client flood the log; it is silenced unless `RUST_LOG` says otherwise.
const DEFAULT_FILTER: &str = "info,actix_server=warn,actix_http::h1::dispatcher=off";

/// Keeps the span exporter alive; dropped at the end of `main`, after the runtime, it sends
/// the spans still batched (waiting at most 3 s for the collector) and stops the exporter's
/// thread.
#[must_use = "dropping the guard stops the span export"]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            // Bounded: a collector that hangs must not hold the node's exit for long; what
            // it has not taken by then is lost, as the process is going anyway.
            if let Err(e) = p.shutdown_with_timeout(std::time::Duration::from_secs(3)) {
                eprintln!("liftlog: sending the last spans to the OTLP collector failed: {e}");
            }
        }
    }
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Installs the process's subscriber. Call once, before any runtime starts (the OTLP
/// exporter's blocking HTTP client must be built outside one).
pub fn init(config: &LogConfig) -> Result<Guard, ConfigError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let mut layers: Vec<BoxedLayer> = vec![match config.format {
        LogFormat::Json => stderr.json().boxed(),
        LogFormat::Text => stderr.boxed(),
    }];
    let guard = match config.otlp_endpoint.as_deref() {
        None => Guard {
            #[cfg(feature = "otlp")]
            provider: None,
        },
        Some(endpoint) => otlp::layer(endpoint, &mut layers)?,
    };
    tracing_subscriber::registry().with(layers).with(filter).init();
    Ok(guard)
}

/// Makes `span` a child of the client's trace, when the request came with a usable
/// `traceparent`. Without the `otlp` feature there is no trace to continue: nothing happens.
#[inline]
pub fn adopt_parent(span: &tracing::Span, traceparent: Option<&[u8]>) {
    #[cfg(feature = "otlp")]
    otlp::adopt_parent(span, traceparent);
    #[cfg(not(feature = "otlp"))]
    let _ = (span, traceparent);
}

/// The endpoint is the collector's base URL (`http://host:4318`, OTLP/HTTP's port), as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is; traces go to its `/v1/traces`. Only `http://`: the
/// exporter is built without TLS, as collectors run as an agent or sidecar next to the node.
fn traces_url(endpoint: &str) -> Result<String, ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid(format!("log.otlp_endpoint {endpoint:?}: {why}"));
    let rest = endpoint.strip_prefix("http://").ok_or_else(|| invalid("must be an http:// URL (the exporter has no TLS)"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(invalid("has no host"));
    }
    Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
}

#[cfg(not(feature = "otlp"))]
mod otlp {
    use super::{BoxedLayer, ConfigError, Guard};

    pub fn layer(endpoint: &str, _: &mut Vec<BoxedLayer>) -> Result<Guard, ConfigError> {
        super::traces_url(endpoint)?;
        Err(ConfigError::Invalid("log.otlp_endpoint is set, but this build has no OTLP exporter: build with `--features otlp`".into()))
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::Layer;

    use super::{BoxedLayer, ConfigError, Guard};

    pub fn layer(endpoint: &str, layers: &mut Vec<BoxedLayer>) -> Result<Guard, ConfigError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(super::traces_url(endpoint)?)
            .build()
            .map_err(|e| ConfigError::Invalid(format!("log.otlp_endpoint {endpoint:?}: {e}")))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("liftlog").build())
            .build();
        let tracer = provider.tracer("liftlog");
        layers.push(tracing_opentelemetry::layer().with_tracer(tracer).boxed());
        Ok(Guard { provider: Some(provider) })
    }

    pub fn adopt_parent(span: &tracing::Span, traceparent: Option<&[u8]>) {
        let Some(value) = traceparent.and_then(|v| std::str::from_utf8(v).ok()) else { return };
        let carrier = std::collections::HashMap::from([(crate::trace::TRACEPARENT.to_string(), value.to_string())]);
        // A malformed header gives an empty context, and the span starts a trace of its own.
        let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_the_collectors_base_url_over_http() {
        assert_eq!(traces_url("http://127.0.0.1:4318").unwrap(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(traces_url("http://collector:4318/").unwrap(), "http://collector:4318/v1/traces");
        for bad in ["https://collector:4318", "collector:4318", "http://", "http:// x"] {
            let e = traces_url(bad).unwrap_err().to_string();
            assert!(e.contains("log.otlp_endpoint"), "{bad}: {e}");
        }
    }

    // Runs in a default `cargo test`; the test command builds with the feature and tests the
    // export itself (tests/api.rs, `request_spans_reach_an_otlp_collector_in_the_clients_trace`).
    #[cfg(not(feature = "otlp"))]
    #[test]
    fn a_build_without_the_exporter_refuses_the_key_instead_of_ignoring_it() {
        let e = otlp::layer("http://127.0.0.1:4318", &mut Vec::new()).err().expect("refused").to_string();
        assert!(e.contains("--features otlp"), "{e}");
    }
}
