//! The 201-to-visible probe. At `--rate` probes per second (open loop), each probe takes a
//! skier no one else uses, checks on the read node that the skier-day is not there yet,
//! POSTs one ride to the write node and, from the moment the 201 arrives, polls the
//! skier-day on the read node every `--poll-us` until it answers 200. The lag is the
//! time from the 201 to that first 200 (the poll period bounds its resolution). Meant to
//! run next to a steady background load (bench.sh runs `liftlog-load post --rate`).
//!
//! `--cold`: every probe takes a day no one has used (season `--season + i / 30`, the 30
//! resort-days of the standard ranges in turn), and skips the first GET, so its POST is the
//! day's first ride: the figure includes the day's activation on its consumer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use liftlog_load::http::{Conn, Target};
use serde_json::json;

use crate::args::Args;

#[derive(Debug)]
enum Probe {
    Visible { lag_us: u64, post_us: u64 },
    PostFailed(u16),
    AlreadyThere,
    NeverVisible,
    Transport,
}

#[allow(clippy::too_many_arguments)]
async fn probe(
    post: Arc<Target>,
    read: Arc<Target>,
    i: u64,
    skier: u64,
    season: u16,
    poll: Duration,
    give_up: Duration,
    cold: bool,
) -> Probe {
    let resort = i % 10 + 1;
    let day = i % 3 + 1;
    let path = format!("/skiers/{resort}/seasons/{season}/days/{day}/skiers/{skier}");
    let timeout = Duration::from_secs(10);
    let mut reader = Conn::new(read);
    let mut writer = Conn::new(post);
    // Opens the read connection and checks the skier is new (not on a cold day: the GET
    // would reach the day before its first ride does).
    if !cold {
        match reader.request("GET", path.as_bytes(), None, None, timeout).await {
            Ok(r) if r.status == 404 => {}
            Ok(_) => return Probe::AlreadyThere,
            Err(_) => return Probe::Transport,
        }
    }
    let key = format!("lag-probe-{season}-{skier}");
    let sent = Instant::now();
    match writer.request("POST", path.as_bytes(), Some(key.as_bytes()), Some(br#"{"time":1,"liftID":1}"#), timeout).await {
        Ok(r) if r.status == 201 => {}
        Ok(r) => return Probe::PostFailed(r.status),
        Err(_) => return Probe::Transport,
    }
    let acked = Instant::now();
    let post_us = (acked - sent).as_micros() as u64;
    loop {
        match reader.request("GET", path.as_bytes(), None, None, timeout).await {
            Ok(r) if r.status == 200 => return Probe::Visible { lag_us: acked.elapsed().as_micros() as u64, post_us },
            Ok(_) => {}
            Err(_) => return Probe::Transport,
        }
        if acked.elapsed() > give_up {
            return Probe::NeverVisible;
        }
        tokio::time::sleep(poll).await;
    }
}

/// `lag --post http://127.0.0.1:8081 --read http://127.0.0.1:8082 --rate 100 --seconds 15 --season 2031`
pub fn run(args: &Args) -> Result<(), String> {
    let post_base = args.string("post", "http://127.0.0.1:8080");
    let read_base = args.string("read", &post_base);
    let rate: f64 = args.get("rate", 100.0);
    let seconds: f64 = args.get("seconds", 10.0);
    let season: u16 = args.get("season", 2031);
    let skier_base: u64 = args.get("skier-base", 2_000_000_000);
    let poll = Duration::from_micros(args.get("poll-us", 500));
    let give_up = Duration::from_millis(args.get("give-up-ms", 10_000));
    let label = args.string("label", "lag");
    let cold = args.string("cold", "false") == "true";
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let post = Arc::new(Target::resolve(&post_base, "").await?);
        let read = Arc::new(Target::resolve(&read_base, "").await?);
        let total = (rate * seconds).round() as u64;
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(total as usize);
        for i in 0..total {
            let at = started + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
            let (post, read) = (post.clone(), read.clone());
            let season = if cold { season.saturating_add((i / 30) as u16) } else { season };
            tasks.push(tokio::spawn(probe(post, read, i, skier_base + i, season, poll, give_up, cold)));
        }
        let mut lag = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| e.to_string())?;
        let mut post_lat = lag.clone();
        let (mut post_failed, mut already, mut never, mut transport) = (0u64, 0u64, 0u64, 0u64);
        for t in tasks {
            match t.await.map_err(|e| e.to_string())? {
                Probe::Visible { lag_us, post_us } => {
                    let _ = lag.record(lag_us.max(1));
                    let _ = post_lat.record(post_us.max(1));
                }
                Probe::PostFailed(status) => {
                    post_failed += 1;
                    eprintln!("lag probe: POST answered {status}");
                }
                Probe::AlreadyThere => already += 1,
                Probe::NeverVisible => never += 1,
                Probe::Transport => transport += 1,
            }
        }
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{}",
            json!({
                "kind": "lag", "label": label, "post": post_base, "read": read_base, "cold": cold,
                "rate": rate, "probes": total, "visible": lag.len(),
                "post_failed": post_failed, "already_there": already, "never_visible": never, "transport_errors": transport,
                "poll_us": poll.as_micros() as u64,
                "lag_ms": { "p50": ms(lag.value_at_quantile(0.5)), "p90": ms(lag.value_at_quantile(0.9)),
                            "p99": ms(lag.value_at_quantile(0.99)), "max": ms(lag.max()) },
                "post_ms": { "p50": ms(post_lat.value_at_quantile(0.5)), "p99": ms(post_lat.value_at_quantile(0.99)) },
            })
        );
        Ok(())
    })
}
