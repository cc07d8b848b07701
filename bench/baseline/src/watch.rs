//! The live-stream probe: what N stream subscribers cost one node, and how late they see a
//! ride.
//!
//! Three phases on one fresh resort-day (`--season`, no one else's rides):
//! 1. `--seconds` with a probe only: one keep-alive connection POSTs rides to the day at
//!    `--probe-rate` (each to a new skier, sequentially: the k-th 201 means the day holds k
//!    rides). The node's CPU (utime + stime of `--pid`) and VmRSS are read at both ends.
//! 2. `--subscribers` SSE connections to the day's stream are opened and each waits for its
//!    first event; then `--seconds` more with the probe, CPU and VmRSS again. The
//!    differences, divided by the subscribers, are the per-subscriber cost; the update
//!    delay is, per subscriber and per probe ride k, the time from the k-th 201 to the first
//!    event whose id (the day's ride count) is at least k (0 when the event came first).
//! 3. up to `--hold` seconds more with everything running, after creating `--ready-file`,
//!    until `--stop-file` appears: the script runs its ingestion load meanwhile, and the
//!    delays of this phase are reported apart (under load).
//!
//! Prints one JSON object. Subscribers that were refused (503) or failed are counted, not
//! hidden; the run fails if fewer than all connected.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use liftlog_load::http::{Conn, Target};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::args::Args;

/// /proc/<pid>/stat's utime and stime are in USER_HZ, fixed at 100 on Linux.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) of a process so far.
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command (in parentheses, which may hold spaces): state is field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("unparsable /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).ok_or("unparsable /proc stat field");
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

fn rss_kib(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS".into())
}

/// What one subscriber saw: each event's id with its arrival.
type Seen = Vec<(u64, Instant)>;

enum Opened {
    Streaming(BufReader<TcpStream>),
    Refused,
}

async fn open(addr: &str, host: &str, path: &str) -> Result<Opened, String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.map_err(|e| e.to_string())?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("bad status line {line:?}"))?;
    loop {
        line.clear();
        if r.read_line(&mut line).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed in the head".into());
        }
        if line == "\r\n" {
            break;
        }
    }
    Ok(if status == 200 { Opened::Streaming(r) } else { Opened::Refused })
}

/// Reads a chunked SSE body until `stop`, recording every event id; `first` is told of the
/// first event.
async fn follow(
    mut r: BufReader<TcpStream>,
    seen: Arc<Mutex<Seen>>,
    first: tokio::sync::mpsc::Sender<()>,
    stop: Instant,
) -> Result<(), String> {
    let mut line = String::new();
    let mut chunk = Vec::new();
    let mut told = false;
    while Instant::now() < stop {
        line.clear();
        let left = stop.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.read_line(&mut line)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(0)) => return Err("stream closed".into()),
            Ok(Ok(_)) => {}
        }
        let size = usize::from_str_radix(line.trim(), 16).map_err(|_| format!("bad chunk size {line:?}"))?;
        if size == 0 {
            return Err("stream ended".into());
        }
        chunk.resize(size + 2, 0);
        r.read_exact(&mut chunk).await.map_err(|e| e.to_string())?;
        let at = Instant::now();
        for l in chunk[..size].split(|b| *b == b'\n') {
            if let Some(id) = l.strip_prefix(b"id: ").and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.trim().parse().ok()) {
                seen.lock().await.push((id, at));
                if !told {
                    told = true;
                    let _ = first.send(()).await;
                }
            }
        }
    }
    Ok(())
}

/// `watch --url http://127.0.0.1:18181 --pid P --subscribers 1000 --seconds 10 --hold 15 --probe-rate 20 --season 2041 --ready-file F --stop-file G`
pub fn run(args: &Args) -> Result<(), String> {
    let url = args.string("url", "http://127.0.0.1:8080");
    let pid: u32 = args.get("pid", 0);
    let subscribers: usize = args.get("subscribers", 1000);
    let seconds: f64 = args.get("seconds", 10.0);
    let hold: f64 = args.get("hold", 0.0);
    let probe_rate: f64 = args.get("probe-rate", 20.0);
    let season: u16 = args.get("season", 2041);
    let ready_file = args.string("ready-file", "");
    let stop_file = args.string("stop-file", "");
    if pid == 0 {
        return Err("--pid of the liftlog process is required".into());
    }
    let (resort, day) = (1u32, 1u16);
    let host = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let stream_path = format!("/resorts/{resort}/seasons/{season}/day/{day}/stream");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let target = Arc::new(Target::resolve(&url, "").await?);
        // The probe: sequential POSTs, each retried under its key until it is a 201.
        let acks: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let probe_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probe = {
            let (acks, stop, target) = (acks.clone(), probe_stop.clone(), target.clone());
            tokio::spawn(async move {
                let mut conn = Conn::new(target);
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / probe_rate));
                let mut failures = 0u64;
                let mut k = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tick.tick().await;
                    k += 1;
                    let path = format!("/skiers/{resort}/seasons/{season}/days/{day}/skiers/{k}");
                    let key = format!("watch-{season}-{k}");
                    loop {
                        match conn.request("POST", path.as_bytes(), Some(key.as_bytes()), Some(br#"{"time":100,"liftID":7}"#), Duration::from_secs(10)).await {
                            Ok(r) if r.status == 201 => break,
                            _ => failures += 1,
                        }
                        if failures > 1000 {
                            return failures;
                        }
                    }
                    acks.lock().await.push(Instant::now());
                }
                failures
            })
        };

        // Phase 1: the probe alone.
        let (cpu0, rss0, t0) = (cpu_seconds(pid)?, rss_kib(pid)?, Instant::now());
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let (cpu1, rss1, t1) = (cpu_seconds(pid)?, rss_kib(pid)?, Instant::now());

        // Phase 2: subscribers join.
        let stop = t1 + Duration::from_secs_f64(60.0 + 2.0 * seconds + hold);
        let (first_tx, mut first_rx) = tokio::sync::mpsc::channel(subscribers.max(1));
        let mut followers = Vec::with_capacity(subscribers);
        let mut refused = 0u64;
        let mut failed = 0u64;
        let addr = target.addr.to_string();
        for _ in 0..subscribers {
            match open(&addr, &host, &stream_path).await {
                Ok(Opened::Streaming(r)) => {
                    let seen: Arc<Mutex<Seen>> = Arc::default();
                    followers.push((seen.clone(), tokio::spawn(follow(r, seen, first_tx.clone(), stop))));
                }
                Ok(Opened::Refused) => refused += 1,
                Err(_) => failed += 1,
            }
        }
        drop(first_tx);
        let connected = followers.len();
        let mut greeted = 0;
        let joined_by = Instant::now() + Duration::from_secs(60);
        while greeted < connected {
            match tokio::time::timeout_at(joined_by.into(), first_rx.recv()).await {
                Ok(Some(())) => greeted += 1,
                _ => break,
            }
        }
        let joined = Instant::now();
        let me = std::process::id();
        let (cpu2, rss2, own2) = (cpu_seconds(pid)?, rss_kib(pid)?, cpu_seconds(me)?);
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let (cpu3, rss3, own3, t3) = (cpu_seconds(pid)?, rss_kib(pid)?, cpu_seconds(me)?, Instant::now());

        // Phase 3: held while the script loads the node.
        if !ready_file.is_empty() {
            std::fs::write(&ready_file, b"holding\n").map_err(|e| format!("{ready_file}: {e}"))?;
        }
        let hold_until = Instant::now() + Duration::from_secs_f64(hold);
        let stopped = || !stop_file.is_empty() && std::path::Path::new(&stop_file).exists();
        while Instant::now() < hold_until && !stopped() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t4 = Instant::now();
        probe_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let probe_failures = probe.await.map_err(|e| e.to_string())?;
        // The last probe rides need a tick or two to reach the streams.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let acks = acks.lock().await.clone();

        let mut idle = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| e.to_string())?;
        let mut loaded = idle.clone();
        let mut missed = 0u64;
        let mut events = 0u64;
        for (seen, _) in &followers {
            let seen = seen.lock().await;
            events += seen.len() as u64;
            for (i, acked) in acks.iter().enumerate() {
                let k = i as u64 + 1;
                let (hist, within) = if *acked >= joined && *acked < t3 {
                    (&mut idle, true)
                } else if *acked >= t3 && *acked < t4 {
                    (&mut loaded, true)
                } else {
                    (&mut idle, false)
                };
                if !within {
                    continue;
                }
                match seen.iter().find(|(id, _)| *id >= k) {
                    Some((_, at)) => {
                        let _ = hist.record(at.saturating_duration_since(*acked).as_micros().max(1) as u64);
                    }
                    None => missed += 1,
                }
            }
        }
        for (_, task) in &followers {
            task.abort();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let quantiles = |h: &Histogram<u64>| json!({ "n": h.len(), "p50": ms(h.value_at_quantile(0.5)), "p99": ms(h.value_at_quantile(0.99)), "max": ms(h.max()) });
        let per = |d: f64| if connected > 0 { d / connected as f64 } else { 0.0 };
        let cpu_without = (cpu1 - cpu0) / (t1 - t0).as_secs_f64();
        let cpu_with = (cpu3 - cpu2) / (t3 - joined).as_secs_f64();
        println!(
            "{}",
            json!({
                "kind": "watch", "url": url, "subscribers": subscribers, "connected": connected, "refused": refused, "failed": failed,
                "first_events": greeted, "events": events, "probe_rate": probe_rate, "probe_rides": acks.len(), "probe_failures": probe_failures,
                "missed": missed, "seconds": seconds, "hold": hold,
                "cpu_cores_without": cpu_without, "cpu_cores_with": cpu_with,
                "client_cpu_cores": (own3 - own2) / (t3 - joined).as_secs_f64(),
                "cpu_per_subscriber_pct_of_a_core": per(cpu_with - cpu_without) * 100.0,
                "rss_kib_without": rss1.max(rss0), "rss_kib_with": rss3.max(rss2),
                "rss_per_subscriber_kib": per(rss3.max(rss2) as f64 - rss1.max(rss0) as f64),
                "delay_ms_idle": quantiles(&idle), "delay_ms_loaded": quantiles(&loaded),
            })
        );
        if connected < subscribers || missed > 0 {
            return Err(format!("{connected} of {subscribers} subscribers connected ({refused} refused, {failed} failed), {missed} probe rides never seen"));
        }
        Ok(())
    })
}
