//! The load engine: phases of workers, each worker one keep-alive connection sending requests
//! back to back (closed loop) or at scheduled times (open loop, `--rate`), with retries that
//! keep the Idempotency-Key, the circuit breaker, and per-worker statistics merged at the end.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::breaker::{Breaker, BreakerConfig};
use crate::cli::Range;
use crate::http::{push_u64, Conn, Target};
use crate::progress::{self, Bar, Goal, Live};
use crate::rng::Rng;
use crate::stats::{summarize, KindStats, KindSummary, OpKind, TransportError};

/// The parameter ranges requests draw from.
#[derive(Debug, Clone, Copy)]
pub struct Ranges {
    pub skiers: Range,
    pub resorts: Range,
    pub lifts: Range,
    pub days: Range,
    pub times: Range,
    pub season: u32,
}

#[derive(Debug, Clone)]
pub struct ClientOpts {
    pub ranges: Ranges,
    pub retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub timeout: Duration,
    /// Keep one record per request (for --csv and --plot).
    pub keep_records: bool,
    /// Keep the acknowledged rides (for --reconcile).
    pub keep_rides: bool,
    pub quiet: bool,
    pub seed: u64,
}

/// State shared by every run of one invocation.
pub struct Engine {
    pub target: Arc<Target>,
    pub opts: ClientOpts,
    pub breaker: Breaker,
    /// Time zero of CSV records and plots.
    pub epoch: Instant,
    /// Prefix of every Idempotency-Key of this invocation (unique per invocation).
    pub run_tag: String,
    /// Where the progress bars go; None when they are not drawn (-q, or stderr no terminal).
    pub bars: Option<indicatif::MultiProgress>,
}

impl Engine {
    pub fn new(target: Arc<Target>, opts: ClientOpts, breaker: BreakerConfig) -> Engine {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tag = (nanos as u64) ^ ((std::process::id() as u64) << 48) ^ opts.seed.rotate_left(17);
        let quiet = opts.quiet;
        let bars = progress::stderr_bars(quiet);
        let mut breaker = Breaker::new(breaker, quiet);
        if let Some(b) = &bars {
            breaker.print_above(b.clone());
        }
        Engine { target, opts, breaker, epoch: Instant::now(), run_tag: format!("{tag:016x}"), bars }
    }
}

/// What a run's workers send.
#[derive(Debug, Clone, Copy)]
pub enum Mix {
    Post,
    Read(OpKind),
    /// Reads (spread evenly over the three read endpoints) with this probability, else a ride.
    Mixed {
        read_ratio: f64,
    },
}

#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub workers: usize,
    /// Requests of the phase, spread evenly over its workers (None: until `duration`).
    pub total: Option<u64>,
    pub duration: Option<Duration>,
    /// Open loop at this many requests per second (for the whole phase).
    pub rate: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RunSpec {
    pub label: String,
    pub mix: Mix,
    pub phases: Vec<Phase>,
}

/// One request as the CSV and the plot see it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// Start (scheduled time in open loop), µs since the invocation began.
    pub start_us: u64,
    pub latency_us: u64,
    /// Final status (0: transport error).
    pub status: u16,
    pub kind: OpKind,
    pub attempts: u8,
}

/// A ride as posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ride {
    pub resort: u32,
    pub season: u32,
    pub day: u32,
    pub skier: u32,
    pub lift: u32,
    pub time: u32,
}

/// What workers gather; merged per run.
#[derive(Default)]
pub struct Collected {
    pub kinds: [Option<Box<KindStats>>; 4],
    pub records: Vec<Record>,
    /// Rides answered with 201.
    pub acked: Vec<Ride>,
    /// Rides that failed in the end but may have been stored (a transport error or a 5xx other
    /// than 503 on some attempt): reconciliation allows for them.
    pub uncertain: Vec<Ride>,
    pub connects: u64,
}

impl Collected {
    fn kind(&mut self, k: OpKind) -> &mut KindStats {
        self.kinds[k.index()].get_or_insert_with(|| Box::new(KindStats::new()))
    }

    pub fn merge(&mut self, mut o: Collected) {
        for k in OpKind::ALL {
            if let Some(s) = o.kinds[k.index()].take() {
                match &mut self.kinds[k.index()] {
                    Some(mine) => mine.merge(&s),
                    slot @ None => *slot = Some(s),
                }
            }
        }
        self.records.append(&mut o.records);
        self.acked.append(&mut o.acked);
        self.uncertain.append(&mut o.uncertain);
        self.connects += o.connects;
    }
}

pub struct RunResult {
    pub label: String,
    /// (µs since the invocation began, phase name) of each phase that ran.
    pub phase_starts: Vec<(u64, String)>,
    pub wall: Duration,
    pub collected: Collected,
    pub breaker_openings: u64,
}

impl RunResult {
    pub fn summaries(&self) -> Vec<KindSummary> {
        OpKind::ALL.iter().filter_map(|&k| self.collected.kinds[k.index()].as_ref().map(|s| summarize(k, s, self.wall))).collect()
    }
}

struct PhasePlan {
    start: Instant,
    tickets: AtomicU64,
    total: Option<u64>,
    deadline: Option<Instant>,
    rate: Option<f64>,
    mix: Mix,
}

/// Run the phases one after the other; returns the merged statistics.
pub async fn run(engine: &Arc<Engine>, spec: &RunSpec) -> RunResult {
    let start = Instant::now();
    let openings_before = engine.breaker.openings();
    let live = Arc::new(Live::default());
    let phase_no = Arc::new(AtomicUsize::new(0));
    let total: Option<u64> = spec.phases.iter().map(|p| p.total).sum();
    let duration: Option<Duration> = spec.phases.iter().map(|p| p.duration).sum();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let goal = match (total, duration) {
        (Some(t), _) => Some(Goal::Requests(t)),
        (None, Some(d)) => Some(Goal::Duration(d)),
        _ => None,
    };
    let progress = match (&engine.bars, goal) {
        (Some(bars), Some(goal)) => {
            let bar = Bar::new(bars, &spec.label, goal);
            let names: Vec<String> = spec.phases.iter().map(|p| p.name.clone()).collect();
            Some(tokio::spawn(progress(bar, names, phase_no.clone(), live.clone(), engine.clone(), stop_rx)))
        }
        _ => None,
    };

    let mut all = Collected::default();
    let mut worker_base = 0usize;
    let mut phase_starts = Vec::new();
    for (pi, phase) in spec.phases.iter().enumerate() {
        phase_no.store(pi, Ordering::Relaxed);
        if phase.workers == 0 || phase.total == Some(0) {
            continue;
        }
        let now = Instant::now();
        phase_starts.push((now.saturating_duration_since(engine.epoch).as_micros() as u64, phase.name.clone()));
        let plan = Arc::new(PhasePlan {
            start: now,
            tickets: AtomicU64::new(0),
            total: phase.total,
            deadline: phase.duration.map(|d| now + d),
            rate: phase.rate,
            mix: spec.mix,
        });
        let mut handles = Vec::with_capacity(phase.workers);
        for w in 0..phase.workers {
            let quota = phase.total.map(|t| t / phase.workers as u64 + u64::from((w as u64) < t % phase.workers as u64));
            handles.push(tokio::spawn(worker(engine.clone(), plan.clone(), worker_base + w, quota, live.clone())));
        }
        for h in handles {
            all.merge(h.await.expect("a load worker panicked"));
        }
        worker_base += phase.workers;
    }
    let wall = start.elapsed();
    let _ = stop_tx.send(());
    if let Some(p) = progress {
        let _ = p.await;
    }
    RunResult {
        label: spec.label.clone(),
        phase_starts,
        wall,
        collected: all,
        breaker_openings: engine.breaker.openings() - openings_before,
    }
}

struct Scratch {
    path: Vec<u8>,
    body: Vec<u8>,
    key: Vec<u8>,
}

async fn worker(engine: Arc<Engine>, plan: Arc<PhasePlan>, id: usize, quota: Option<u64>, live: Arc<Live>) -> Collected {
    let mut conn = Conn::new(engine.target.clone());
    let mut rng = Rng::new(engine.opts.seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut out = Collected::default();
    let mut s = Scratch { path: Vec::with_capacity(128), body: Vec::with_capacity(64), key: Vec::with_capacity(48) };
    let mut i = 0u64;
    loop {
        let scheduled = if let Some(rate) = plan.rate {
            let t = plan.tickets.fetch_add(1, Ordering::Relaxed);
            if plan.total.is_some_and(|tot| t >= tot) {
                break;
            }
            let at = plan.start + Duration::from_secs_f64(t as f64 / rate);
            if plan.deadline.is_some_and(|d| at >= d) {
                break;
            }
            if at > Instant::now() {
                tokio::time::sleep_until(at.into()).await;
            }
            Some(at)
        } else {
            if quota.is_some_and(|q| i >= q) || plan.deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            None
        };
        let kind = match plan.mix {
            Mix::Post => OpKind::Post,
            Mix::Read(k) => k,
            Mix::Mixed { read_ratio } => {
                if rng.unit() < read_ratio {
                    [OpKind::SkierDay, OpKind::ResortDay, OpKind::Vertical][rng.below(3) as usize]
                } else {
                    OpKind::Post
                }
            }
        };
        one_request(&engine, &mut conn, &mut rng, &mut out, &mut s, &live, kind, scheduled, id, i).await;
        i += 1;
        live.done.fetch_add(1, Ordering::Relaxed);
    }
    out.connects = conn.connects;
    out
}

/// Appends `/{name}/{value}` for each pair, then `tail`: the API's paths are all of that shape.
fn push_path(out: &mut Vec<u8>, segments: &[(&[u8], u32)], tail: &[u8]) {
    for (name, value) in segments {
        out.push(b'/');
        out.extend_from_slice(name);
        out.push(b'/');
        push_u64(out, u64::from(*value));
    }
    out.extend_from_slice(tail);
}

/// Ride-path `/skiers/{resort}/seasons/{season}/days/{day}/skiers/{skier}`.
pub fn skier_day_path(out: &mut Vec<u8>, resort: u32, season: u32, day: u32, skier: u32) {
    push_path(out, &[(b"skiers", resort), (b"seasons", season), (b"days", day), (b"skiers", skier)], b"");
}

/// `/resorts/{resort}/seasons/{season}/day/{day}/skiers`.
pub fn resort_day_path(out: &mut Vec<u8>, resort: u32, season: u32, day: u32) {
    push_path(out, &[(b"resorts", resort), (b"seasons", season), (b"day", day)], b"/skiers");
}

/// The delay before retry number `retry` (1-based): base x 2^(retry-1), capped, times a jitter
/// in [0.5, 1.5); a Retry-After (seconds) lengthens it, up to the cap.
pub fn backoff_delay(base: Duration, max: Duration, retry: u32, jitter01: f64, retry_after_s: Option<u64>) -> Duration {
    let exp = base.saturating_mul(1u32 << (retry.saturating_sub(1)).min(20)).min(max);
    let d = exp.mul_f64(0.5 + jitter01);
    match retry_after_s {
        Some(s) => d.max(Duration::from_secs(s).min(max)),
        None => d,
    }
}

#[allow(clippy::too_many_arguments)]
async fn one_request(
    engine: &Engine,
    conn: &mut Conn,
    rng: &mut Rng,
    out: &mut Collected,
    s: &mut Scratch,
    live: &Live,
    kind: OpKind,
    scheduled: Option<Instant>,
    worker: usize,
    i: u64,
) {
    let o = &engine.opts;
    let r = &o.ranges;
    let ride = Ride {
        resort: rng.in_range(r.resorts),
        season: r.season,
        day: rng.in_range(r.days),
        skier: rng.in_range(r.skiers),
        lift: rng.in_range(r.lifts),
        time: rng.in_range(r.times),
    };
    s.path.clear();
    let mut method = "GET";
    let mut post = false;
    match kind {
        OpKind::Post | OpKind::SkierDay => {
            skier_day_path(&mut s.path, ride.resort, ride.season, ride.day, ride.skier);
            if kind == OpKind::Post {
                method = "POST";
                post = true;
                s.body.clear();
                s.body.extend_from_slice(b"{\"time\":");
                push_u64(&mut s.body, ride.time as u64);
                s.body.extend_from_slice(b",\"liftID\":");
                push_u64(&mut s.body, ride.lift as u64);
                s.body.push(b'}');
                s.key.clear();
                s.key.extend_from_slice(engine.run_tag.as_bytes());
                s.key.push(b'-');
                push_u64(&mut s.key, worker as u64);
                s.key.push(b'-');
                push_u64(&mut s.key, i);
            }
        }
        OpKind::ResortDay => resort_day_path(&mut s.path, ride.resort, ride.season, ride.day),
        OpKind::Vertical => {
            s.path.extend_from_slice(b"/skiers/");
            push_u64(&mut s.path, ride.skier as u64);
            s.path.extend_from_slice(b"/vertical?resort=");
            push_u64(&mut s.path, ride.resort as u64);
            s.path.extend_from_slice(b"&season=");
            push_u64(&mut s.path, ride.season as u64);
        }
    }

    let t0 = scheduled.unwrap_or_else(Instant::now);
    let mut attempts = 0u32;
    let mut ambiguous = false;
    let mut status;
    let stats_ok;
    loop {
        engine.breaker.admit().await;
        attempts += 1;
        engine.breaker.in_flight.fetch_add(1, Ordering::Relaxed);
        let res = conn.request(method, &s.path, post.then_some(&s.key[..]), post.then_some(&s.body[..]), o.timeout).await;
        engine.breaker.in_flight.fetch_sub(1, Ordering::Relaxed);
        let retry_after = match res {
            Ok(rep) => {
                status = rep.status;
                rep.retry_after
            }
            Err(e) => {
                status = 0;
                out.kind(kind).count_error(TransportError::of(&e));
                None
            }
        };
        let ok = kind.is_success(status);
        out.kind(kind).count_status(status);
        engine.breaker.record(!ok);
        if ok {
            stats_ok = true;
            break;
        }
        live.error_answers.fetch_add(1, Ordering::Relaxed);
        if status == 0 || (status >= 500 && status != 503) {
            ambiguous = true;
        }
        if attempts > o.retries {
            stats_ok = false;
            live.failed.fetch_add(1, Ordering::Relaxed);
            break;
        }
        tokio::time::sleep(backoff_delay(o.backoff, o.backoff_max, attempts, rng.unit(), retry_after)).await;
    }
    let latency = t0.elapsed();
    out.kind(kind).record(latency, stats_ok, attempts);
    out.kind(kind).count_final(status);
    if o.keep_records {
        out.records.push(Record {
            start_us: t0.saturating_duration_since(engine.epoch).as_micros() as u64,
            latency_us: latency.as_micros() as u64,
            status,
            kind,
            attempts: attempts.min(255) as u8,
        });
    }
    if post && o.keep_rides {
        if stats_ok {
            out.acked.push(ride);
        } else if ambiguous {
            out.uncertain.push(ride);
        }
    }
}

/// Redraw the run's bar from the workers' counters until the run ends.
async fn progress(
    mut bar: Bar,
    phases: Vec<String>,
    phase_no: Arc<AtomicUsize>,
    live: Arc<Live>,
    engine: Arc<Engine>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    // indicatif draws at most 20 times a second; reading the counters 10 times is enough.
    let every = Duration::from_millis(100);
    let mut tick = tokio::time::interval(every);
    loop {
        let stopped = tokio::select! {
            _ = &mut stop => true,
            _ = tick.tick() => false,
        };
        let phase = phases.get(phase_no.load(Ordering::Relaxed)).map(String::as_str).unwrap_or("");
        bar.update(&live, phase, engine.breaker.is_open());
        if stopped {
            break;
        }
    }
    bar.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn backoff_doubles_caps_and_honours_retry_after() {
        let (b, m) = (Duration::from_millis(10), Duration::from_millis(100));
        assert_eq!(backoff_delay(b, m, 1, 0.5, None), Duration::from_millis(10));
        assert_eq!(backoff_delay(b, m, 2, 0.5, None), Duration::from_millis(20));
        assert_eq!(backoff_delay(b, m, 3, 0.5, None), Duration::from_millis(40));
        assert_eq!(backoff_delay(b, m, 9, 0.5, None), Duration::from_millis(100));
        assert_eq!(backoff_delay(b, m, 1, 0.0, None), Duration::from_millis(5));
        assert_eq!(backoff_delay(b, m, 1, 0.5, Some(60)), Duration::from_millis(100));
        assert_eq!(backoff_delay(b, Duration::from_secs(5), 1, 0.5, Some(1)), Duration::from_secs(1));
    }

    #[test]
    fn paths() {
        let mut p = Vec::new();
        skier_day_path(&mut p, 3, 2025, 1, 99);
        assert_eq!(p, b"/skiers/3/seasons/2025/days/1/skiers/99");
        p.clear();
        resort_day_path(&mut p, 10, 2025, 3);
        assert_eq!(p, b"/resorts/10/seasons/2025/day/3/skiers");
    }

    /// A server that answers each request from a script: `Some(status)` or `None` (close the
    /// connection without an answer), recording each request's Idempotency-Key.
    async fn scripted_server(script: Vec<Option<u16>>) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            let mut keys = Vec::new();
            let mut script = script.into_iter();
            'conns: loop {
                let (mut sock, _) = l.accept().await.unwrap();
                let mut buf = Vec::new();
                loop {
                    // Read one request (head plus Content-Length body).
                    let mut chunk = [0u8; 4096];
                    let (head_len, body_len) = loop {
                        let mut headers = [httparse::EMPTY_HEADER; 32];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                            let mut len = 0;
                            for h in req.headers.iter() {
                                if h.name.eq_ignore_ascii_case("content-length") {
                                    len = std::str::from_utf8(h.value).unwrap().parse().unwrap();
                                }
                                if h.name.eq_ignore_ascii_case("idempotency-key") {
                                    keys.push(String::from_utf8(h.value.to_vec()).unwrap());
                                }
                            }
                            break (n, len);
                        }
                        let n = sock.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            continue 'conns;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    };
                    while buf.len() < head_len + body_len {
                        let n = sock.read(&mut chunk).await.unwrap();
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    buf.drain(..head_len + body_len);
                    match script.next() {
                        Some(Some(status)) => {
                            let extra = if status == 503 { "Retry-After: 0\r\n" } else { "" };
                            let resp = format!("HTTP/1.1 {status} X\r\n{extra}Content-Length: 0\r\n\r\n");
                            sock.write_all(resp.as_bytes()).await.unwrap();
                        }
                        Some(None) => continue 'conns, // drop the connection unanswered
                        None => return keys,
                    }
                    if script.len() == 0 {
                        return keys;
                    }
                }
            }
        });
        (addr, h)
    }

    fn engine_for(addr: std::net::SocketAddr, keep: bool) -> Arc<Engine> {
        let target = Arc::new(Target { addr, host: addr.to_string(), base_path: String::new() });
        let r = |lo, hi| Range { lo, hi };
        let opts = ClientOpts {
            ranges: Ranges { skiers: r(1, 10), resorts: r(1, 2), lifts: r(1, 40), days: r(1, 3), times: r(1, 360), season: 2025 },
            retries: 5,
            backoff: Duration::from_millis(1),
            backoff_max: Duration::from_millis(20),
            timeout: Duration::from_secs(5),
            keep_records: keep,
            keep_rides: keep,
            quiet: true,
            seed: 1,
        };
        Arc::new(Engine::new(target, opts, BreakerConfig { enabled: false, ..Default::default() }))
    }

    fn one_post() -> RunSpec {
        RunSpec {
            label: "t".into(),
            mix: Mix::Post,
            phases: vec![Phase { name: "p".into(), workers: 1, total: Some(1), duration: None, rate: None }],
        }
    }

    #[tokio::test]
    async fn retries_keep_the_idempotency_key() {
        let (addr, server) = scripted_server(vec![Some(503), Some(503), Some(201)]).await;
        let engine = engine_for(addr, true);
        let res = run(&engine, &one_post()).await;
        let keys = server.await.unwrap();
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys.iter().all(|k| k == &keys[0]), "same key on every attempt: {keys:?}");
        assert!(keys[0].starts_with(&engine.run_tag));
        let s = &res.summaries()[0];
        assert_eq!((s.successes, s.failures, s.attempts, s.retries), (1, 0, 3, 2));
        assert_eq!(s.status, vec![(201, 1), (503, 2)]);
        assert_eq!(s.final_status, vec![(201, 1)], "one final answer per request");
        assert!(s.errors.is_empty());
        assert_eq!(res.collected.acked.len(), 1);
        assert_eq!(res.collected.records[0].status, 201);
        assert_eq!(res.collected.records[0].attempts, 3);
    }

    #[tokio::test]
    async fn a_dropped_connection_is_retried_with_the_same_key_on_a_new_one() {
        let (addr, server) = scripted_server(vec![None, Some(201)]).await;
        let engine = engine_for(addr, true);
        let res = run(&engine, &one_post()).await;
        let keys = server.await.unwrap();
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_eq!(keys[0], keys[1]);
        let s = &res.summaries()[0];
        assert_eq!((s.successes, s.transport_errors), (1, 1));
        assert_eq!(s.errors, vec![("connection closed before the response ended", 1)]);
        assert_eq!(s.final_status, vec![(201, 1)]);
        assert_eq!(res.collected.connects, 2);
    }

    #[tokio::test]
    async fn gives_up_after_the_retries_and_marks_the_ride_uncertain() {
        let (addr, server) = scripted_server(vec![Some(500); 6]).await;
        let engine = engine_for(addr, true);
        let res = run(&engine, &one_post()).await;
        assert_eq!(server.await.unwrap().len(), 6, "1 attempt + 5 retries");
        let s = &res.summaries()[0];
        assert_eq!((s.successes, s.failures, s.attempts), (0, 1, 6));
        assert!(res.collected.acked.is_empty());
        assert_eq!(res.collected.uncertain.len(), 1);
    }

    #[tokio::test]
    async fn keys_differ_between_rides() {
        let (addr, server) = scripted_server(vec![Some(201); 4]).await;
        let engine = engine_for(addr, false);
        let spec = RunSpec {
            label: "t".into(),
            mix: Mix::Post,
            phases: vec![Phase { name: "p".into(), workers: 1, total: Some(4), duration: None, rate: None }],
        };
        let res = run(&engine, &spec).await;
        let mut keys = server.await.unwrap();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 4);
        assert_eq!(res.summaries()[0].successes, 4);
        assert!(res.collected.records.is_empty(), "no records unless asked");
    }

    #[tokio::test]
    async fn open_loop_latency_counts_from_the_schedule() {
        // 5 requests at 100/s: the run takes ~40 ms and every latency is measured from its slot.
        let (addr, server) = scripted_server(vec![Some(201); 5]).await;
        let engine = engine_for(addr, true);
        let spec = RunSpec {
            label: "t".into(),
            mix: Mix::Post,
            phases: vec![Phase { name: "p".into(), workers: 2, total: Some(5), duration: None, rate: Some(100.0) }],
        };
        let res = run(&engine, &spec).await;
        server.await.unwrap();
        assert!(res.wall >= Duration::from_millis(40), "{:?}", res.wall);
        let mut starts: Vec<u64> = res.collected.records.iter().map(|r| r.start_us).collect();
        starts.sort();
        for w in starts.windows(2) {
            let gap = w[1] - w[0];
            assert!((9_000..=11_000).contains(&gap), "slots 10 ms apart: {starts:?}");
        }
    }
}
