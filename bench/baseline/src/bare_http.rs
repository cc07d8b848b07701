//! The bare actix-web ceiling: liftlog's four API routes on the same number of workers,
//! GETs answered from read-only in-memory `HashMap`s filled at start with random rides in
//! the standard ranges (so the share of 404s matches a liftlog node loaded the same way),
//! and a POST that parses the ride JSON and answers 201 with nothing else done. What
//! actix-web, serde_json and the kernel cost per request, and nothing of ours.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Deserialize;

use crate::args::Args;

/// (resort, season, day)
type DayKey = (u32, u16, u16);

struct Data {
    skier_days: HashMap<(DayKey, u32), u64>,
    day_counts: HashMap<DayKey, u64>,
    /// (skier, resort, season) → total vertical.
    verticals: HashMap<(u32, u32, u16), u64>,
}

#[derive(Deserialize)]
#[allow(dead_code)] // parsed to cost what liftlog's parse costs; not used further
struct Ride {
    time: u32,
    #[serde(rename = "liftID")]
    lift: u32,
}

fn fill(rides: u64, season: u16, skiers: (u32, u32), seed: u64) -> Data {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut skier_days = HashMap::new();
    let mut verticals = HashMap::new();
    let mut day_skiers: HashMap<DayKey, HashSet<u32>> = HashMap::new();
    for _ in 0..rides {
        let resort = rng.gen_range(1..=10u32);
        let day = rng.gen_range(1..=3u16);
        let skier = rng.gen_range(skiers.0..=skiers.1);
        let vertical = u64::from(rng.gen_range(1..=40u32)) * 10;
        let key = (resort, season, day);
        *skier_days.entry((key, skier)).or_insert(0) += vertical;
        *verticals.entry((skier, resort, season)).or_insert(0) += vertical;
        day_skiers.entry(key).or_default().insert(skier);
    }
    let day_counts = day_skiers.into_iter().map(|(k, s)| (k, s.len() as u64)).collect();
    Data { skier_days, day_counts, verticals }
}

fn json(body: String) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(body)
}

fn not_found() -> HttpResponse {
    HttpResponse::NotFound().content_type("application/json").body(r#"{"message":"Data not found"}"#)
}

async fn skier_day(data: web::Data<Arc<Data>>, path: web::Path<(u32, u16, u16, u32)>) -> HttpResponse {
    let (resort, season, day, skier) = path.into_inner();
    match data.skier_days.get(&((resort, season, day), skier)) {
        Some(v) => json(v.to_string()),
        None => not_found(),
    }
}

async fn resort_day(data: web::Data<Arc<Data>>, path: web::Path<(u32, u16, u16)>) -> HttpResponse {
    let (resort, season, day) = path.into_inner();
    let n = data.day_counts.get(&(resort, season, day)).copied().unwrap_or(0);
    json(format!(r#"{{"time":"Resort {resort}","numSkiers":{n}}}"#))
}

async fn vertical(req: HttpRequest, data: web::Data<Arc<Data>>, path: web::Path<u32>) -> HttpResponse {
    let skier = path.into_inner();
    let (mut resort, mut season) = (None, None);
    for pair in req.query_string().split('&') {
        match pair.split_once('=') {
            Some(("resort", v)) => resort = v.parse::<u32>().ok(),
            Some(("season", v)) => season = v.parse::<u16>().ok(),
            _ => {}
        }
    }
    let (Some(resort), Some(season)) = (resort, season) else {
        return HttpResponse::BadRequest().content_type("application/json").body(r#"{"message":"resort and season"}"#);
    };
    match data.verticals.get(&(skier, resort, season)) {
        Some(v) => json(format!(r#"{{"resorts":[{{"seasonID":"{season}","totalVert":{v}}}]}}"#)),
        None => not_found(),
    }
}

async fn post_ride(body: web::Bytes) -> HttpResponse {
    match serde_json::from_slice::<Ride>(&body) {
        Ok(_) => HttpResponse::Created().finish(),
        Err(e) => HttpResponse::BadRequest().content_type("application/json").body(format!(r#"{{"message":"{e}"}}"#)),
    }
}

/// `bare-http --listen 127.0.0.1:18080 --workers 2 --rides 200000 --season 2025 --skiers 1-100000`
pub fn run(args: &Args) -> Result<(), String> {
    let listen = args.string("listen", "127.0.0.1:18080");
    let workers: usize = args.get("workers", std::thread::available_parallelism().map_or(2, |n| n.get()));
    let rides: u64 = args.get("rides", 200_000);
    let season: u16 = args.get("season", 2025);
    let skiers = args.range("skiers", (1, 100_000));
    let data = Arc::new(fill(rides, season, skiers, args.get("seed", 1)));
    let max_connections: usize = args.get("max-connections", 25_000);
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(data.clone()))
                .route("/skiers/{r}/seasons/{s}/days/{d}/skiers/{k}", web::get().to(skier_day))
                .route("/skiers/{r}/seasons/{s}/days/{d}/skiers/{k}", web::post().to(post_ride))
                .route("/resorts/{r}/seasons/{s}/day/{d}/skiers", web::get().to(resort_day))
                .route("/skiers/{k}/vertical", web::get().to(vertical))
        })
        .workers(workers)
        .max_connections(max_connections)
        .backlog(4096)
        .bind(&listen)
        .map_err(|e| format!("binding {listen}: {e}"))?;
        println!("bare-http listening on http://{listen} ({workers} workers)");
        server.run().await.map_err(|e| e.to_string())
    })
}
