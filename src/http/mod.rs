//! The HTTP layer (actix-web): the public SkiDataAPI 2.0 in [`api`], our operational
//! endpoints in [`admin`], request accounting in [`stats`], the public listener's
//! connections (a deadline on every request head) in [`conn`]. The live view, ours beyond
//! the 2.0 API: its questions (leaders, lift activity, the day's summary) in [`live`], the
//! Server-Sent Events stream in [`stream`], the page in [`dashboard`].
//!
//! Handlers read the aggregators' state through the registry and publish rides through
//! the bus; they hold no state of their own. Errors are [`ApiError`]s, whose one mapping
//! to HTTP lives in `error.rs`.

pub mod admin;
pub mod api;
pub mod conn;
pub mod dashboard;
pub mod live;
pub mod stats;
pub mod stream;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::HeaderValue;
use actix_web::{http::header, web, HttpMessage, HttpRequest, HttpResponse};
use serde::Serialize;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::actors::consumer::Progress;
use crate::actors::flusher::Flusher;
use crate::actors::registry::Registry;
use crate::actors::season_index::SeasonIndex;
use crate::actors::seasons::SeasonBook;
use crate::bus::Publisher;
use crate::catalog::Catalog;
use crate::domain::Limits;
use crate::error::ApiError;
use crate::tables::Tables;
use crate::trace::{self, RequestId};
use liftlog_wal::{RecoveryReport, Wal};
use stats::RequestStats;
use tracing::Instrument;

/// Every route we serve: (method, path, under the base path?). The OpenAPI document must
/// list exactly these; a test holds both to it.
pub const ROUTES: &[(&str, &str, bool)] = &[
    ("GET", "/resorts", true),
    ("GET", "/resorts/{resortID}/seasons", true),
    ("POST", "/resorts/{resortID}/seasons", true),
    ("GET", "/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/skiers", true),
    ("GET", "/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/leaders", true),
    ("GET", "/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/lifts", true),
    ("GET", "/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/summary", true),
    ("GET", "/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/stream", true),
    ("GET", "/dashboard", true),
    ("POST", "/skiers/{resortID}/seasons/{seasonID}/days/{dayID}/skiers/{skierID}", true),
    ("GET", "/skiers/{resortID}/seasons/{seasonID}/days/{dayID}/skiers/{skierID}", true),
    ("GET", "/skiers/{skierID}/vertical", true),
    ("GET", "/statistics", true),
    ("GET", "/health", false),
    ("GET", "/ready", false),
    ("GET", "/metrics", false),
    ("GET", "/openapi.json", false),
    ("GET", "/admin/actors", false),
    ("GET", "/admin/wal", false),
    ("GET", "/admin/cluster", false),
    ("POST", "/admin/flush", false),
];

/// Everything the handlers use, shared by all workers.
pub struct AppState {
    pub catalog: Arc<Catalog>,
    pub limits: Limits,
    pub tables: Arc<dyn Tables>,
    /// Present on a node with the `write` role: where POSTed rides go.
    pub publisher: Option<Arc<dyn Publisher>>,
    /// Present on a node with the `consume` role: the actors reads are served from.
    pub node: Option<ConsumerNode>,
    /// Cluster mode: where a day-scoped GET is answered (this node as the shard's owner,
    /// the owner on another node, or the tables), see [`crate::cluster::forward`]. `None`
    /// off cluster mode: every read is answered here, as on a single node.
    pub cluster: Option<Arc<crate::cluster::ClusterReads>>,
    /// The roles this node runs, for error messages and the admin views.
    pub roles: String,
    pub requests: Arc<RequestStats>,
    /// The live streams' feeds and viewers ([`stream`]).
    pub live: Arc<stream::Hub>,
    pub max_body_bytes: usize,
    pub admin_token: Option<String>,
    /// False until replay finished and again once shutdown began: `/ready` for the ALB.
    pub ready: AtomicBool,
    pub started: Instant,
}

/// The consume side of a node, as the handlers see it.
pub struct ConsumerNode {
    pub registry: Arc<Registry>,
    pub index: Arc<SeasonIndex>,
    /// Whether `index` holds every ride: only when this process is the one consumer of
    /// every partition since it loaded (the embedded bus). With a broker, partitions can
    /// move between consumers (standby takeover), so season totals come from the tables.
    pub index_complete: bool,
    pub seasons: Arc<SeasonBook>,
    pub wal: Arc<Wal>,
    pub recovery: RecoveryReport,
    pub progress: Arc<Progress>,
    pub flusher: Arc<Flusher>,
    /// Broker-side consumer figures (RabbitMQ), when the source has them.
    pub source_stats: Option<Arc<dyn Fn() -> serde_json::Value + Send + Sync>>,
}

/// Registers the public routes (and, with `with_admin`, the admin ones) on an actix `App`.
pub fn configure(cfg: &mut web::ServiceConfig, base_path: &str, with_admin: bool) {
    // actix tries the resources in this order, matching each dynamic one with a regex
    // (~4 % of the POST path's CPU in a profile with the ride route seventh, under
    // regex-lite; the `regex` crate now, see Cargo.toml), so the routes a lift gate and a
    // dashboard hit most come first. The paths are disjoint: the order changes no answer.
    let mut scope = web::scope(base_path)
        .service(
            resource("/skiers/{resortID}/seasons/{seasonID}/days/{dayID}/skiers/{skierID}", "GET, POST")
                .route(web::post().to(api::post_ride))
                .route(web::get().to(api::skier_day_vertical)),
        )
        .service(resource("/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/skiers", "GET").route(web::get().to(api::resort_day_skiers)))
        .service(resource("/resorts", "GET").route(web::get().to(api::list_resorts)))
        .service(
            resource("/resorts/{resortID}/seasons", "GET, POST")
                .route(web::get().to(api::list_seasons))
                .route(web::post().to(api::create_season)),
        )
        .service(
            resource("/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/leaders", "GET").route(web::get().to(live::resort_day_leaders)),
        )
        .service(resource("/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/lifts", "GET").route(web::get().to(live::resort_day_lifts)))
        .service(
            resource("/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/summary", "GET").route(web::get().to(live::resort_day_summary)),
        )
        .service(
            resource("/resorts/{resortID}/seasons/{seasonID}/day/{dayID}/stream", "GET").route(web::get().to(stream::resort_day_stream)),
        )
        .service(resource("/dashboard", "GET").route(web::get().to(dashboard::page)))
        .service(resource("/skiers/{skierID}/vertical", "GET").route(web::get().to(api::skier_vertical)))
        .service(resource("/statistics", "GET").route(web::get().to(api::statistics)))
        .service(resource("/health", "GET").route(web::get().to(admin::health)))
        .service(resource("/ready", "GET").route(web::get().to(admin::ready)))
        .service(resource("/openapi.json", "GET").route(web::get().to(admin::openapi)));
    if with_admin {
        scope = scope.configure(configure_admin);
    }
    cfg.service(scope.default_service(web::to(no_such_endpoint)));
}

/// The operator routes: actors, WAL, cluster, flush, metrics. Served on the public listener only
/// when `admin_listen = "main"`; otherwise on their own (loopback by default) listener,
/// with health and readiness too so an agent on the host needs one port.
pub fn configure_admin(cfg: &mut web::ServiceConfig) {
    cfg.service(admin_resource("/metrics", "GET").route(web::get().to(admin::metrics)))
        .service(admin_resource("/admin/actors", "GET").route(web::get().to(admin::actors)))
        .service(admin_resource("/admin/wal", "GET").route(web::get().to(admin::wal)))
        .service(admin_resource("/admin/cluster", "GET").route(web::get().to(admin::cluster)))
        .service(admin_resource("/admin/flush", "POST").route(web::post().to(admin::flush)));
}

/// An admin resource: [`resource`] behind the token guard. The only way admin routes are
/// built, so a new one cannot be served without the token check.
fn admin_resource(
    path: &'static str,
    allow: &'static str,
) -> actix_web::Resource<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    resource(path, allow).wrap(actix_web::middleware::from_fn(admin::require_token))
}

/// The JSON 404 for paths outside every route (also outside the base path).
pub async fn no_such_endpoint() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NoSuchEndpoint)
}

/// The route template a resource was registered with, kept as its data so the accounting
/// middleware reads it after routing instead of matching the path a second time (which
/// `match_pattern` does: ~6 % of CPU under load).
#[derive(Clone, Copy)]
struct RouteTemplate(&'static str);

/// A resource whose other methods get 405 with an `Allow` header.
fn resource(path: &'static str, allow: &'static str) -> actix_web::Resource {
    web::resource(path)
        .app_data(RouteTemplate(path))
        .default_service(web::to(move || async move { Err::<HttpResponse, _>(ApiError::MethodNotAllowed(allow)) }))
}

/// Wraps every request: its request id (a span around the handler, so that every log line
/// of the request carries it, and the `X-Request-Id` answer header; see [`crate::trace`]),
/// latency per endpoint, status counters.
pub async fn account<B: MessageBody>(
    req: ServiceRequest,
    next: actix_web::middleware::Next<B>,
) -> Result<ServiceResponse<B>, actix_web::Error> {
    let started = Instant::now();
    let header = |name: &str| req.headers().get(name).map(|v| v.as_bytes());
    let request_id = RequestId::of_request(header(trace::HEADER), header(trace::TRACEPARENT));
    let id_header = HeaderValue::from_str(request_id.as_str()).ok();
    let span = tracing::info_span!("request", id = %request_id);
    crate::logging::adopt_parent(&span, header(trace::TRACEPARENT));
    req.extensions_mut().insert(request_id);
    let stats = req.app_data::<web::Data<AppState>>().map(|s| s.requests.clone());
    let method = req.method().clone();
    // Java's HttpClient asks to upgrade to h2c on the first request of a connection to a
    // new host. We answer in HTTP/1.1; actix would then echo `Connection: upgrade` and drop
    // the connection silently, so a client that reuses it sees EOF. `Connection: close`
    // says so honestly; Java then remembers the host speaks HTTP/1.1 and keeps its next
    // connections alive without asking again.
    let upgrade_asked = req.head().upgrade();
    let mut res = next.call(req).instrument(span).await?;
    if let Some(v) = id_header {
        res.headers_mut().insert(header::HeaderName::from_static(trace::HEADER), v);
    }
    if upgrade_asked {
        res.response_mut().head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
    }
    if let Some(s) = stats {
        // The matched resource's data is on the request once it was routed.
        let template = res.request().app_data::<RouteTemplate>().map(|t| t.0);
        let endpoint = template.and_then(|t| RequestStats::endpoint_of(method.as_str(), t));
        let status = res.status().as_u16();
        s.record(endpoint, status, started.elapsed());
        crate::metrics::http_request(template.and_then(|t| crate::metrics::route_index(method.as_str(), t)), status, started);
    }
    Ok(res)
}

/// A JSON response with a weak ETag and a short cache lifetime, answering 304 when the
/// client already has this body. One second keeps dashboards cheap without hiding a ride
/// for longer than the visibility lag clients already accept.
pub fn cached_json<T: Serialize>(req: &HttpRequest, value: &T) -> Result<HttpResponse, ApiError> {
    let body = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    let etag = weak_etag(&body);
    if let Some(not_modified) = not_modified(req, &etag) {
        return Ok(not_modified);
    }
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header((header::ETAG, etag))
        .insert_header((header::CACHE_CONTROL, "public, max-age=1"))
        .body(body))
}

/// The weak ETag of a body: its hash, the one validator every cacheable answer carries.
pub fn weak_etag(body: &[u8]) -> String {
    format!("W/\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(body))
}

/// The 304 for a request whose `If-None-Match` is `etag`, if it is.
pub fn not_modified(req: &HttpRequest, etag: &str) -> Option<HttpResponse> {
    req.headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
        .then(|| HttpResponse::NotModified().insert_header((header::ETAG, etag)).finish())
}

/// A JSON response that must not be cached (admin views, statistics).
pub fn fresh_json<T: Serialize>(value: &T) -> Result<HttpResponse, ApiError> {
    let body = serde_json::to_vec(value).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(HttpResponse::Ok().content_type("application/json").insert_header((header::CACHE_CONTROL, "no-store")).body(body))
}
