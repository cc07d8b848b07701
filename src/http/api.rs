//! The public SkiDataAPI 2.0 handlers. Paths, status codes and field names are exact
//! (API.md); every client mistake is a 4xx with a message and changes nothing.

use actix_web::{http::header, web, HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;

use super::{cached_json, fresh_json, AppState};
use crate::cluster::Route;
use crate::domain::{parse_id, parse_resort, parse_season, validate_ride, DayKey, RideBody, RidePath, SeasonBody};
use crate::error::{ApiError, RideOutcome};
use crate::trace::{RequestId, RideId};
use tracing::Instrument;

pub(super) type State = web::Data<AppState>;
pub(super) type Reply = Result<HttpResponse, ApiError>;

/// Most `resort=` parameters of one season-vertical GET; each distinct one is a table query
/// (issue 13, item 8). API.md's catalog has 10 resorts; a dashboard asks for a few.
pub const MAX_RESORTS_PER_QUERY: usize = 16;

/// Longest `Idempotency-Key` we accept; a UUID is 36 bytes.
const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Deepest nesting of arrays and objects accepted in a body. A ride is one flat object;
/// serde_json bounds what it parses (128 levels) but skips an ignored extra field of any
/// depth, so without this `{"time":1,"liftID":1,"x":[[[[…]]]]}` would be accepted while the
/// same nesting in a known field is a 400.
pub const MAX_JSON_DEPTH: usize = 32;

/// Longest a client may take to send a request body once its head arrived. actix bounds
/// only the head (`client_request_timeout_ms`); without this a client that declares a
/// Content-Length and then stalls would hold its connection (and a handler) forever. A
/// body is at most `max_body_bytes` (16 KiB by default), so this asks ~3 KiB/s of the
/// slowest client; the same as the head's default bound.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Serialize)]
struct ResortEntry<'a> {
    #[serde(rename = "resortName")]
    name: &'a str,
    #[serde(rename = "resortID")]
    id: u32,
}

#[derive(Serialize)]
struct ResortsList<'a> {
    resorts: Vec<ResortEntry<'a>>,
}

pub async fn list_resorts(req: HttpRequest, state: State) -> Reply {
    let resorts = state.catalog.resorts().map(|r| ResortEntry { name: &r.name, id: r.id }).collect();
    cached_json(&req, &ResortsList { resorts })
}

#[derive(Serialize)]
struct SeasonsList {
    seasons: Vec<String>,
}

pub async fn list_seasons(req: HttpRequest, state: State, path: web::Path<String>) -> Reply {
    let resort = parse_resort(&path, &state.catalog)?;
    let seasons = match &state.node {
        Some(node) => node.seasons.seasons(resort),
        None => state.tables.query_seasons(resort).await?,
    };
    let seasons = seasons.into_iter().map(|s| s.to_string()).collect();
    cached_json(&req, &SeasonsList { seasons })
}

pub async fn create_season(req: HttpRequest, state: State, path: web::Path<String>, body: web::Payload) -> Reply {
    let resort = parse_resort(&path, &state.catalog)?;
    let body: SeasonBody = read_json(&req, body, state.max_body_bytes).await?;
    let season = parse_season("year", &body.year, &state.limits)?;
    // Idempotent, and a season that exists costs no write (issue 13, item 8): every call
    // used to write and fsync, so a client looping on one season kept the disk busy for
    // everyone. Only a new season is written, and new ones are few: resorts × seasons.
    if season_exists(&state, resort, season).await? {
        return Ok(HttpResponse::Created().finish());
    }
    // One season write at a time, waited for a bounded time: a flood of new seasons queues
    // here (and gets 503 past the wait) instead of becoming concurrent fsyncs.
    let _one = tokio::time::timeout(SEASON_WRITE_WAIT, SEASON_WRITES.acquire())
        .await
        .map_err(|_| ApiError::Unavailable { message: "season writes are busy; retry".into(), retry_after_secs: 1 })?
        .map_err(|_| ApiError::Internal("season write semaphore closed".into()))?;
    // Another request may have written it while this one waited.
    if season_exists(&state, resort, season).await? {
        return Ok(HttpResponse::Created().finish());
    }
    // Written through before the 201: a season is rare and must survive a crash.
    state.tables.put_seasons(&[(resort, season)]).await?;
    state.tables.sync().await?;
    if let Some(node) = &state.node {
        node.seasons.observe(resort, season, true);
    }
    Ok(HttpResponse::Created().finish())
}

/// Season writes in flight (see `create_season`).
static SEASON_WRITES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
const SEASON_WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a season is durable already. A consuming node's book knows every season that
/// was written through or is in its WAL (a ride's season reaches the tables with the
/// flush that covers it); a write node without one asks the tables, a read, no fsync.
async fn season_exists(state: &AppState, resort: u32, season: u16) -> Result<bool, ApiError> {
    Ok(match &state.node {
        Some(node) => node.seasons.seasons(resort).contains(&season),
        None => state.tables.query_seasons(resort).await?.contains(&season),
    })
}

#[derive(Serialize)]
struct DaySkiers<'a> {
    /// The 2.0 API names the resort's name `time`; kept for compatibility.
    time: &'a str,
    #[serde(rename = "numSkiers")]
    num_skiers: u64,
}

pub async fn resort_day_skiers(req: HttpRequest, state: State, path: web::Path<(String, String, String)>) -> Reply {
    let (resort, season, day) = path.into_inner();
    let key = day_key(&state, &resort, &season, &day)?;
    let route = match day_route(&req, &state, &key).await? {
        Some(Route::Owner(answer)) => return Ok(answer),
        route => route,
    };
    let answer = async {
        let num_skiers = match state.resident_for(&key, route.as_ref()) {
            Some(h) => h.read(|d| d.unique_skiers() as u64),
            None => state.tables.get_day_count(key).await?.map_or(0, |c| c.unique_skiers),
        };
        let name = state.catalog.resort(key.resort).map_or("", |r| r.name.as_str());
        cached_json(&req, &DaySkiers { time: name, num_skiers })
    }
    .await;
    stamped(route, answer)
}

pub async fn post_ride(req: HttpRequest, state: State, path: web::Path<(String, String, String, String)>, body: web::Payload) -> Reply {
    let (resort, season, day, skier) = path.into_inner();
    let ride: RideBody = read_json(&req, body, state.max_body_bytes).await?;
    let key = match req.headers().get("idempotency-key") {
        Some(v) if v.len() > MAX_IDEMPOTENCY_KEY || v.is_empty() => {
            return Err(ApiError::BadRequest(format!("Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} bytes")))
        }
        Some(v) => Some(v.as_bytes()),
        None => None,
    };
    let path = RidePath { resort: &resort, season: &season, day: &day, skier: &skier };
    let event = validate_ride(&path, &ride, key, &state.catalog, &state.limits)?;
    let publisher = state.publisher.as_ref().ok_or_else(|| ApiError::RideNotConfirmed {
        message: format!("Ride not recorded: this node ({}) does not accept rides; send them to a write node", state.roles),
        retry_after_secs: 1,
        outcome: RideOutcome::NotRecorded,
    })?;
    // No `Warning` header on keyless answers: RFC 9111 obsoleted it and clients ignore it.
    // What a keyless client needs is on the 503s: `Ride-Outcome` says whether a retry is safe.
    let request_id = req.extensions().get::<RequestId>().cloned().unwrap_or_default();
    let ride = RideId(event.id);
    let published = publisher.publish_for(event, request_id).instrument(tracing::debug_span!("publish", %ride)).await;
    published.map_err(|e| ApiError::ride_not_confirmed(e, key.is_some()))?;
    tracing::debug!(%ride, "ride confirmed: 201");
    Ok(HttpResponse::Created().finish())
}

pub async fn skier_day_vertical(req: HttpRequest, state: State, path: web::Path<(String, String, String, String)>) -> Reply {
    let (resort, season, day, skier) = path.into_inner();
    let key = day_key(&state, &resort, &season, &day)?;
    let skier = parse_id("skierID", &skier, state.limits.max_skier as u64)? as u32;
    let route = match day_route(&req, &state, &key).await? {
        Some(Route::Owner(answer)) => return Ok(answer),
        route => route,
    };
    let answer = async {
        let vertical = match state.resident_for(&key, route.as_ref()) {
            Some(h) => h.read(|d| d.skiers.get(&skier).map(|s| s.vertical)),
            None => state.tables.get_skier_day(skier, key).await?.map(|i| i.vertical),
        };
        cached_json(&req, &vertical.ok_or(ApiError::DataNotFound)?)
    }
    .await;
    stamped(route, answer)
}

/// Where a day-scoped GET is answered, decided after its parameters were validated (a bad
/// request is answered by the node that got it, never forwarded). `None` off cluster mode.
pub(super) async fn day_route(req: &HttpRequest, state: &AppState, key: &DayKey) -> Result<Option<Route>, ApiError> {
    match &state.cluster {
        Some(cluster) => cluster.route(req, key).await.map(Some),
        None => Ok(None),
    }
}

/// A locally built answer with the cluster's `Liftlog-Read-Source` header. Errors are
/// turned into their one HTTP mapping here so that a 404 says its source too.
pub(super) fn stamped(route: Option<Route>, answer: Reply) -> Reply {
    match route {
        None => answer,
        Some(route) => Ok(route.stamp(answer.unwrap_or_else(|e| actix_web::ResponseError::error_response(&e)))),
    }
}

#[derive(Serialize)]
struct SeasonVertical {
    #[serde(rename = "seasonID")]
    season: String,
    #[serde(rename = "totalVert")]
    total: u64,
}

#[derive(Serialize)]
struct SkierVertical {
    resorts: Vec<SeasonVertical>,
}

/// `GET /skiers/{skierID}/vertical?resort=R[&resort=R2][&season=S]`: one entry per
/// season, summed over the asked resorts. In cluster mode it is not forwarded: a season
/// spans days in every shard, so no one node owns it, and it reads the tables' by-skier
/// index, as it already does with a broker (`index_complete` is false there).
pub async fn skier_vertical(req: HttpRequest, state: State, path: web::Path<String>) -> Reply {
    let skier = parse_id("skierID", &path, state.limits.max_skier as u64)? as u32;
    let mut resorts = Vec::new();
    let mut season = None;
    for (name, value) in form_urlencoded::parse(req.query_string().as_bytes()) {
        match name.as_ref() {
            // Each distinct resort costs a table query (issue 13, item 8): a bound on the
            // distinct ones, checked before any query is made. Repeats cost nothing (they
            // are one query) and stay legal, as they always were.
            "resort" => {
                let resort = parse_resort(&value, &state.catalog)?;
                if !resorts.contains(&resort) {
                    if resorts.len() == MAX_RESORTS_PER_QUERY {
                        return Err(ApiError::BadRequest(format!(
                            "at most {MAX_RESORTS_PER_QUERY} distinct resort parameters per request"
                        )));
                    }
                    resorts.push(resort);
                }
            }
            "season" if season.is_none() => season = Some(parse_season("season", &value, &state.limits)?),
            "season" => return Err(ApiError::BadRequest("season may be given at most once".into())),
            _ => {}
        }
    }
    if resorts.is_empty() {
        return Err(ApiError::BadRequest("the resort query parameter is required, e.g. ?resort=1".into()));
    }
    resorts.sort_unstable();
    resorts.dedup();
    let totals: BTreeMap<u16, u64> = match &state.node {
        Some(node) if node.index_complete => {
            let mut totals = BTreeMap::new();
            for resort in &resorts {
                let per = match node.index.cached(skier, *resort) {
                    Some(per) => per,
                    None => exact_totals(&state, node, skier, *resort).await?,
                };
                for (s, v) in per.into_iter().filter(|(s, _)| season.is_none_or(|x| x == *s)) {
                    *totals.entry(s).or_insert(0) += v;
                }
            }
            totals
        }
        _ => {
            // One Query per asked resort on the tables' by-skier index.
            let mut totals = BTreeMap::new();
            for resort in &resorts {
                for item in state.tables.query_skier_resort(skier, *resort).await? {
                    if season.is_none_or(|s| s == item.key.season) {
                        *totals.entry(item.key.season).or_insert(0) += item.vertical;
                    }
                }
            }
            totals
        }
    };
    if totals.is_empty() {
        return Err(ApiError::DataNotFound);
    }
    let resorts = totals.into_iter().map(|(s, total)| SeasonVertical { season: s.to_string(), total }).collect();
    cached_json(&req, &SkierVertical { resorts })
}

/// One skier's exact per-season totals at one resort on the embedded node, for a pair the
/// season index does not hold (see [`crate::actors::season_index`]): the resident days
/// from memory, every other day from the tables' by-skier query. The resident days are
/// read first: a day that is passivated after that read was flushed before it, so the
/// query finds it; one that is activated after it is in the tables all the same.
async fn exact_totals(state: &AppState, node: &super::ConsumerNode, skier: u32, resort: u32) -> Result<Vec<(u16, u64)>, ApiError> {
    let loading = node.index.begin(skier, resort);
    let computed = async {
        let mut per: BTreeMap<u16, u64> = BTreeMap::new();
        let mut resident = rustc_hash::FxHashSet::default();
        for (key, h) in node.registry.resident_of(resort) {
            resident.insert(key);
            if let Some(v) = h.read(|d| d.skiers.get(&skier).map(|s| s.vertical)) {
                *per.entry(key.season).or_insert(0) += v;
            }
        }
        for item in state.tables.query_skier_resort(skier, resort).await? {
            if !resident.contains(&item.key) {
                *per.entry(item.key.season).or_insert(0) += item.vertical;
            }
        }
        Ok::<_, ApiError>(per.into_iter().collect::<Vec<_>>())
    }
    .await;
    // A failure drops the registration with its guard (as a dropped request does).
    if let (Ok(per), Some(l)) = (&computed, loading) {
        node.index.finish(l, per);
    }
    computed
}

pub async fn statistics(state: State) -> Reply {
    fresh_json(&state.requests.statistics())
}

impl AppState {
    /// The resident aggregator of a day, on a consuming node.
    fn resident(&self, key: &DayKey) -> Option<crate::actors::aggregator::DayHandle> {
        self.node.as_ref().and_then(|n| n.registry.resident(key))
    }

    /// The aggregator a day's read may use on this route: none when the read falls back to
    /// the tables, since this node does not own the shard and a day still resident here
    /// (from before a hand-off) may be behind the owner's.
    pub(super) fn resident_for(&self, key: &DayKey, route: Option<&Route>) -> Option<crate::actors::aggregator::DayHandle> {
        match route {
            Some(Route::Tables(_)) => None,
            _ => self.resident(key),
        }
    }
}

pub(super) fn day_key(state: &AppState, resort: &str, season: &str, day: &str) -> Result<DayKey, ApiError> {
    Ok(DayKey {
        resort: parse_resort(resort, &state.catalog)?,
        season: parse_season("seasonID", season, &state.limits)?,
        day: parse_id("dayID", day, state.limits.max_day as u64)? as u16,
    })
}

/// Reads a JSON body: 415 for a non-JSON content type (a missing one is taken as JSON,
/// as older clients omit it), 413 past the limit, 400 with serde's words otherwise.
pub async fn read_json<T: DeserializeOwned>(req: &HttpRequest, mut payload: web::Payload, limit: usize) -> Result<T, ApiError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !(mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))) {
            return Err(ApiError::UnsupportedMediaType);
        }
    }
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    let read = async {
        let mut body = web::BytesMut::with_capacity(declared.unwrap_or(64).min(limit));
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("could not read the request body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    // On timeout the handler answers while the body is unread, so actix closes the
    // connection after the response: the stalled client frees its slot.
    let body = actix_rt::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| ApiError::BadRequest(format!("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs())))??;
    let Some(first) = body.iter().find(|b| !b.is_ascii_whitespace()) else {
        return Err(ApiError::BadRequest("the request body is empty; a JSON object is expected".into()));
    };
    // serde's derived structs also take a sequence (`[10,5]` as time 10, lift 5): a body in
    // the wrong shape must not become a ride by position.
    if *first != b'{' {
        return Err(ApiError::BadRequest("the request body must be a JSON object".into()));
    }
    if nesting_depth(&body) > MAX_JSON_DEPTH {
        return Err(ApiError::BadRequest(format!("the request body nests deeper than {MAX_JSON_DEPTH} levels")));
    }
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::BadRequest(format!("invalid request body: {e}")),
        _ => ApiError::BadRequest(format!("the request body is not valid JSON: {e}")),
    })
}

/// The deepest nesting of `[`/`{` in a JSON text, outside strings. Only a bound: malformed
/// JSON is left to the parser.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::nesting_depth;
    use crate::tables::{sled_store::SledTables, Tables};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    /// Issue 13, item 8: `POST /resorts/{id}/seasons` wrote and fsynced on every call, so a
    /// client repeating one request kept the disk busy for everyone. It is idempotent now:
    /// a season that exists answers 201 without a write; only a new one is written.
    #[actix_web::test]
    async fn creating_an_existing_season_again_writes_and_fsyncs_nothing() {
        use actix_web::{test, web, App};
        let dir = tempfile::tempdir().unwrap();
        let tables = Arc::new(crate::tables::scripted::Scripted::new(Arc::new(SledTables::open(&dir.path().join("t")).unwrap())));
        let state = web::Data::new(super::AppState {
            catalog: Arc::new(crate::catalog::Catalog::default()),
            limits: crate::domain::Limits::default(),
            tables: tables.clone(),
            publisher: None,
            node: None,
            cluster: None,
            roles: "write".into(),
            requests: Arc::new(crate::http::stats::RequestStats::new("")),
            live: Arc::new(crate::http::stream::Hub::new(16)),
            max_body_bytes: 16 * 1024,
            admin_token: None,
            ready: true.into(),
            started: std::time::Instant::now(),
        });
        let app = test::init_service(App::new().app_data(state).configure(|c| crate::http::configure(c, "", false))).await;
        for year in ["2025", "2025", "2026", "2025"].into_iter().chain(std::iter::repeat_n("2025", 100)) {
            let req = test::TestRequest::post()
                .uri("/resorts/1/seasons")
                .insert_header(("Content-Type", "application/json"))
                .set_payload(format!(r#"{{"year":"{year}"}}"#))
                .to_request();
            assert_eq!(test::call_service(&app, req).await.status(), 201);
        }
        assert_eq!(tables.season_writes.load(Ordering::SeqCst), 2, "one write per new season");
        assert_eq!(tables.syncs.load(Ordering::SeqCst), 2, "one fsync per new season");
        assert_eq!(tables.query_seasons(1).await.unwrap(), vec![2025, 2026]);
    }

    #[test]
    fn nesting_depth_skips_strings_and_escapes() {
        assert_eq!(nesting_depth(br#"{"time":10,"liftID":5}"#), 1);
        assert_eq!(nesting_depth(br#"{"a":[{"b":[]}],"c":{}}"#), 4);
        assert_eq!(nesting_depth(br#"{"a":"[[[{{{","b":"\"[[["}"#), 1);
        assert_eq!(nesting_depth(br#"{"a":"\\","b":[[1]]}"#), 3);
        assert_eq!(nesting_depth(b"[[[[["), 5);
        assert_eq!(nesting_depth(b"10"), 0);
    }
}
