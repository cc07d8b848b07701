//! Our operational endpoints, outside the SkiDataAPI paths: health and readiness for the
//! load balancer, Prometheus metrics, the OpenAPI document, and the admin views of the
//! actors, the WAL and the flusher, and of the cluster (its shard map and read forwarding).
//! Admin routes and metrics need the bearer token when one is configured: [`require_token`]
//! wraps every admin resource (see `http::admin_resource`), so a handler here never checks
//! it by hand.

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use serde::Serialize;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use super::{fresh_json, AppState};
use crate::error::ApiError;

type State = web::Data<AppState>;
type Reply = Result<HttpResponse, ApiError>;

/// The OpenAPI 3 document of every route, served as is.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The admin scope guard: every admin resource is wrapped in it, before routing reaches
/// the handler, so an admin route cannot forget the token.
pub async fn require_token<B: actix_web::body::MessageBody + 'static>(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::EitherBody<B>>, actix_web::Error> {
    let verdict = match req.app_data::<State>() {
        Some(state) => authorize(req.request(), state),
        // No state means a misconfigured App: fail closed.
        None => Err(ApiError::Unauthorized),
    };
    match verdict {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(e) => {
            let (req, _) = req.into_parts();
            let res = actix_web::ResponseError::error_response(&e);
            Ok(actix_web::dev::ServiceResponse::new(req, res).map_into_right_body())
        }
    }
}

/// Constant-time check of `Authorization: Bearer <token>` when a token is configured.
fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else { return Ok(()) };
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    let (a, b) = (given.as_bytes(), token.as_bytes());
    // Length is not secret; the bytes are compared without an early exit.
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(r#"{"status":"ok"}"#)
}

pub async fn ready(state: State) -> Reply {
    if state.ready.load(Ordering::Acquire) {
        Ok(HttpResponse::Ok().content_type("application/json").body(r#"{"status":"ready"}"#))
    } else {
        Err(ApiError::Unavailable { message: "Not ready: starting or shutting down".into(), retry_after_secs: 1 })
    }
}

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}

fn consumer(state: &AppState) -> Result<&crate::http::ConsumerNode, ApiError> {
    state.node.as_ref().ok_or_else(|| ApiError::BadRequest(format!("this node ({}) runs no consumer", state.roles)))
}

#[derive(Serialize)]
struct ActorsView {
    roles: String,
    registry: crate::actors::registry::RegistryStats,
    season_index_skiers: usize,
    actors: Vec<crate::actors::aggregator::ActorStats>,
}

pub async fn actors(state: State) -> Reply {
    let node = consumer(&state)?;
    fresh_json(&ActorsView {
        roles: state.roles.clone(),
        registry: node.registry.stats(),
        season_index_skiers: node.index.skiers(),
        actors: node.registry.actor_stats().await,
    })
}

#[derive(Serialize)]
struct WalView {
    roles: String,
    wal: Option<liftlog_wal::WalStats>,
    recovery: Option<liftlog_wal::RecoveryReport>,
    consumer: Option<crate::actors::consumer::ProgressView>,
    flusher: Option<crate::actors::flusher::FlushStats>,
    source: Option<serde_json::Value>,
    bus: Option<crate::bus::BusStats>,
}

pub async fn wal(state: State) -> Reply {
    let node = state.node.as_ref();
    fresh_json(&WalView {
        roles: state.roles.clone(),
        wal: node.map(|n| n.wal.stats()),
        recovery: node.map(|n| n.recovery.clone()),
        consumer: node.map(|n| n.progress.view()),
        flusher: node.map(|n| n.flusher.stats()),
        source: node.and_then(|n| n.source_stats.as_ref().map(|f| f())),
        bus: state.publisher.as_ref().map(|p| p.stats()),
    })
}

/// `GET /admin/cluster`: this node, its keeper (on consumer nodes), the shard map as it
/// last saw it, and how its reads were routed.
pub async fn cluster(state: State) -> Reply {
    let cluster =
        state.cluster.as_ref().ok_or_else(|| ApiError::BadRequest(format!("this node ({}) does not run in cluster mode", state.roles)))?;
    fresh_json(&cluster.view())
}

pub async fn flush(state: State) -> Reply {
    let report = consumer(&state)?.flusher.flush().await?;
    fresh_json(&report)
}

/// Prometheus text format, written by hand: a handful of gauges and counters do not
/// justify a metrics framework on the hot path.
pub async fn metrics(state: State) -> Reply {
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(out, "# HELP liftlog_{name} {help}\n# TYPE liftlog_{name} {kind}\nliftlog_{name} {value}");
    };
    let r = &state.requests;
    metric("http_responses_2xx_total", "counter", "Responses with a 2xx status.", r.status_2xx.load(Ordering::Relaxed) as f64);
    metric("http_responses_4xx_total", "counter", "Responses with a 4xx status.", r.status_4xx.load(Ordering::Relaxed) as f64);
    metric("http_responses_5xx_total", "counter", "Responses with a 5xx status.", r.status_5xx.load(Ordering::Relaxed) as f64);
    metric("http_shed_total", "counter", "Requests refused with 429/503 to shed load.", r.shed.load(Ordering::Relaxed) as f64);
    if let Some(bus) = state.publisher.as_ref().map(|p| p.stats()) {
        metric("bus_depth", "gauge", "Rides queued for the consumer.", bus.depth as f64);
        metric("bus_published_total", "counter", "Rides published and confirmed durable.", bus.published as f64);
        metric("bus_rejected_full_total", "counter", "Publishes refused because the bus was full.", bus.rejected_full as f64);
        metric("bus_confirm_timeouts_total", "counter", "Publishes not confirmed in time.", bus.timeouts as f64);
        if let Some(a) = &bus.admission {
            metric("admission_refill_rate", "gauge", "Token bucket refill now, rides/s (follows pressure).", a.refill_rate_now);
            metric("admission_rate_limited_total", "counter", "POSTs refused with 429 by the token bucket.", a.rate_limited_total as f64);
            let open = matches!(a.breaker, crate::bus::admission::BreakerState::Open) as u8 as f64;
            metric("breaker_open", "gauge", "1 while the write path's circuit breaker is open.", open);
            metric("breaker_opens_total", "counter", "Times the circuit breaker opened.", a.breaker_opens_total as f64);
        }
    }
    if let Some(node) = &state.node {
        node_metrics(node, &mut metric);
    }
    if let Some(cluster) = &state.cluster {
        let f = cluster.stats();
        metric("cluster_reads_local_total", "counter", "Day reads answered here as the shard's owner.", f.local as f64);
        metric("cluster_reads_forwarded_total", "counter", "Day reads answered by the owner on another node.", f.forwarded as f64);
        metric("cluster_reads_retried_total", "counter", "Second forwards after a 421 or a failed first one.", f.retried as f64);
        metric(
            "cluster_reads_tables_fallback_total",
            "counter",
            "Day reads answered from the tables: no owner answered.",
            f.tables_fallback as f64,
        );
        metric("cluster_forward_errors_total", "counter", "Forwards that failed (refused, timed out, unreadable).", f.errors as f64);
        metric("cluster_misdirected_total", "counter", "Forwarded reads refused with 421 (epoch not held here).", f.misdirected as f64);
    }
    metric("uptime_seconds", "gauge", "Seconds since start.", state.started.elapsed().as_secs_f64());
    let _ = writeln!(
        out,
        "# HELP liftlog_endpoint_requests_total Requests per public endpoint.\n# TYPE liftlog_endpoint_requests_total counter"
    );
    for (m, p, count, _) in r.per_endpoint() {
        let _ = writeln!(out, "liftlog_endpoint_requests_total{{method=\"{m}\",path=\"{p}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "# HELP liftlog_endpoint_seconds_total Time spent per public endpoint.\n# TYPE liftlog_endpoint_seconds_total counter"
    );
    for (m, p, _, secs) in r.per_endpoint() {
        let _ = writeln!(out, "liftlog_endpoint_seconds_total{{method=\"{m}\",path=\"{p}\"}} {secs}");
    }
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(out))
}

fn node_metrics(node: &crate::http::ConsumerNode, metric: &mut impl FnMut(&str, &str, &str, f64)) {
    let p = node.progress.view();
    metric("consumer_batches_total", "counter", "WAL batches written by the consumer.", p.batches as f64);
    metric("consumer_events_total", "counter", "Rides consumed (duplicates included).", p.events as f64);
    metric("consumer_wal_failures_total", "counter", "Batches refused because the WAL write failed.", p.wal_failures as f64);
    metric("consumer_mean_batch_size", "gauge", "Mean rides per WAL batch.", p.mean_batch_size);
    metric("flush_lag_seconds", "gauge", "Age of the oldest ride not yet in the tables.", p.flush_lag_ms as f64 / 1000.0);
    let w = node.wal.stats();
    metric("wal_live_bytes", "gauge", "WAL bytes not yet checkpointed.", w.live_bytes as f64);
    metric("wal_max_bytes", "gauge", "WAL bound; POSTs get 503 beyond it.", w.max_bytes as f64);
    metric("wal_fsyncs_total", "counter", "WAL fsyncs.", w.fsyncs as f64);
    metric("wal_checkpoint", "gauge", "Highest WAL sequence known to be in the tables.", w.checkpoint as f64);
    metric("wal_last_seq", "gauge", "Highest WAL sequence written.", w.last_seq.unwrap_or(0) as f64);
    let f = node.flusher.stats();
    metric("flush_cycles_total", "counter", "Flush cycles run.", f.cycles as f64);
    metric("flush_failures_total", "counter", "Flush cycles that failed (table errors).", f.failures as f64);
    metric("flush_rides_written_total", "counter", "Raw rides written to the tables.", f.rides_written as f64);
    let g = node.registry.stats();
    metric("actors_resident", "gauge", "Aggregator actors resident.", g.resident as f64);
    metric("actors_passivated_total", "counter", "Aggregator actors passivated.", g.passivations as f64);
}
