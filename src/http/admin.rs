//! Our operational endpoints, outside the SkiDataAPI paths: health and readiness for the
//! load balancer, Prometheus metrics, the OpenAPI document, and the admin views of the
//! actors, the WAL and the flusher, and of the cluster (its shard map and read forwarding).
//! Admin routes and metrics need the bearer token when one is configured: [`require_token`]
//! wraps every admin resource (see `http::admin_resource`), so a handler here never checks
//! it by hand.

use actix_web::{http::header, web, HttpRequest, HttpResponse};
use serde::Serialize;
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
    /// The live streams this node serves and the feeds behind them.
    live: crate::http::stream::HubStats,
    actors: Vec<crate::actors::aggregator::ActorStats>,
}

pub async fn actors(state: State) -> Reply {
    let node = consumer(&state)?;
    fresh_json(&ActorsView {
        roles: state.roles.clone(),
        registry: node.registry.stats(),
        season_index_skiers: node.index.skiers(),
        live: state.live.stats(),
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

/// Prometheus text format: every component's stats rendered through its description
/// (`metrics::components`) and the histograms, by `prometheus-client` (see [`crate::metrics`]).
pub async fn metrics(state: State) -> Reply {
    use crate::metrics::{components::Uptime, Describe};
    let bus = state.publisher.as_ref().map(|p| p.stats());
    let node = state.node.as_ref().map(|n| (n.progress.view(), n.wal.stats(), n.flusher.stats(), n.registry.stats()));
    let cluster = state.cluster.as_ref().map(|c| c.view());
    let uptime = Uptime(state.started.elapsed());
    let mut parts: Vec<&dyn Describe> = vec![state.requests.as_ref()];
    if let Some(b) = &bus {
        parts.push(b);
    }
    if let Some((progress, wal, flusher, registry)) = &node {
        parts.extend([progress as &dyn Describe, wal, flusher, registry]);
    }
    if let Some(c) = &cluster {
        parts.push(c);
    }
    parts.push(&uptime);
    Ok(HttpResponse::Ok().content_type(crate::metrics::CONTENT_TYPE).body(crate::metrics::render(&parts)))
}
