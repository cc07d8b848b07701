//! What a request costs the client: liftlog-load's hand-made HTTP/1.1 client against hyper's,
//! at the same concurrency, on the same server, with the same requests (issue 16: keep the
//! hand-made client only if it is measured cheaper than hyper's).
//!
//! ```sh
//! cargo run --release -p liftlog-load --example client_cost -- [CONCURRENCY] [REQUESTS] [ROUNDS]
//! ```
//!
//! The server is hyper's http1 server on 127.0.0.1 (a 201 with a small JSON body to every
//! request), on its own OS thread and single-threaded runtime. Each client runs on the main
//! thread's single-threaded runtime, as liftlog-load does by default (`--threads 1`), with
//! CONCURRENCY workers of one keep-alive connection each, sending the standard run's POST
//! (path, Idempotency-Key, JSON body; the answer's body read) back to back, REQUESTS in all.
//! The cost is the client thread's CPU time per request (/proc/thread-self/schedstat, ns),
//! since the server's share of the two cores is the same for every client; req/s is wall
//! clock. The clients take turns within each round, so a neighbour's load hits all of them;
//! the median of the rounds is printed.
//!
//! Clients: `hand-made` (liftlog_load::http::Conn), `hyper conn` (hyper::client::conn::http1,
//! one connection per worker: the same shape as the hand-made one) and `hyper-util Client`
//! (the pooled legacy client, what an application would usually take).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use liftlog_load::http::{push_u64, Conn, Target};

const PATH: &str = "/skiers/3/seasons/2025/days/1/skiers/4711";
const BODY: &[u8] = br#"{"time":217,"liftID":21}"#;
const TIMEOUT: Duration = Duration::from_secs(10);

/// This thread's CPU time so far, in ns (the first field of schedstat).
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat (Linux)");
    s.split_whitespace().next().and_then(|v| v.parse().ok()).expect("a number")
}

async fn answer(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Read the body, as a real server must before it answers.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(Bytes::from_static(br#"{"message":"Write successful"}"#)));
    *resp.status_mut() = hyper::StatusCode::CREATED;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

/// The server, on its own thread and runtime; returns its address.
fn start_server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            loop {
                let (s, _) = l.accept().await.unwrap();
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), hyper::service::service_fn(answer))
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

/// The Idempotency-Key of request `i` of worker `w` (as liftlog-load builds them).
fn key(out: &mut Vec<u8>, w: usize, i: u64) {
    out.clear();
    out.extend_from_slice(b"0123456789abcdef-");
    push_u64(out, w as u64);
    out.push(b'-');
    push_u64(out, i);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Client {
    HandMade,
    HyperConn,
    HyperUtil,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::HandMade => "hand-made",
            Client::HyperConn => "hyper conn",
            Client::HyperUtil => "hyper-util Client",
        }
    }
}

async fn hand_made(target: Arc<Target>, w: usize, n: u64) -> u64 {
    let mut c = Conn::new(target);
    let mut k = Vec::with_capacity(48);
    let mut created = 0;
    for i in 0..n {
        key(&mut k, w, i);
        let r = c.request("POST", PATH.as_bytes(), Some(&k), Some(BODY), TIMEOUT).await.expect("an answer");
        created += u64::from(r.status == 201);
    }
    created
}

fn request(uri: &str, host: &HeaderValue, k: &[u8]) -> Request<Full<Bytes>> {
    let mut req = Request::new(Full::new(Bytes::from_static(BODY)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri.parse().expect("a valid URI");
    let h = req.headers_mut();
    h.insert(HOST, host.clone());
    h.insert(ACCEPT, HeaderValue::from_static("application/json"));
    h.insert("idempotency-key", HeaderValue::from_bytes(k).expect("a valid header value"));
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    req
}

async fn hyper_conn(addr: SocketAddr, w: usize, n: u64) -> u64 {
    let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = s.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await.expect("handshake");
    tokio::spawn(conn);
    let host = HeaderValue::from_str(&addr.to_string()).unwrap();
    let mut k = Vec::with_capacity(48);
    let mut created = 0;
    for i in 0..n {
        key(&mut k, w, i);
        let req = request(PATH, &host, &k);
        let resp = tokio::time::timeout(TIMEOUT, async {
            send.ready().await?;
            let resp = send.send_request(req).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        })
        .await
        .expect("in time")
        .expect("an answer");
        created += u64::from(resp == hyper::StatusCode::CREATED);
    }
    created
}

type UtilClient = hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn hyper_util(client: UtilClient, addr: SocketAddr, w: usize, n: u64) -> u64 {
    let uri = format!("http://{addr}{PATH}");
    let host = HeaderValue::from_str(&addr.to_string()).unwrap();
    let mut k = Vec::with_capacity(48);
    let mut created = 0;
    for i in 0..n {
        key(&mut k, w, i);
        let req = request(&uri, &host, &k);
        let status = tokio::time::timeout(TIMEOUT, async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            resp.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        })
        .await
        .expect("in time")
        .expect("an answer");
        created += u64::from(status == hyper::StatusCode::CREATED);
    }
    created
}

struct Measured {
    wall: Duration,
    cpu_ns: u64,
}

fn measure(client: Client, addr: SocketAddr, concurrency: usize, requests: u64) -> Measured {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let target = Arc::new(Target { addr, host: addr.to_string(), base_path: String::new() });
    let mut util = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    util.pool_max_idle_per_host(concurrency);
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let util: UtilClient = util.build(connector);
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    let created: u64 = rt.block_on(async {
        let mut hs = Vec::new();
        for w in 0..concurrency {
            let n = requests / concurrency as u64 + u64::from((w as u64) < requests % concurrency as u64);
            hs.push(match client {
                Client::HandMade => tokio::spawn(hand_made(target.clone(), w, n)),
                Client::HyperConn => tokio::spawn(hyper_conn(addr, w, n)),
                Client::HyperUtil => tokio::spawn(hyper_util(util.clone(), addr, w, n)),
            });
        }
        let mut sum = 0;
        for h in hs {
            sum += h.await.unwrap();
        }
        sum
    });
    let m = Measured { wall: t0.elapsed(), cpu_ns: thread_cpu_ns() - cpu0 };
    assert_eq!(created, requests, "{}: every request answered 201", client.name());
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: u64| args.get(i).map(|a| a.parse().expect("a number")).unwrap_or(d);
    let (concurrency, requests, rounds) = (arg(0, 64) as usize, arg(1, 100_000), arg(2, 3) as usize);
    let addr = start_server();
    let clients = [Client::HandMade, Client::HyperConn, Client::HyperUtil];
    // A short warm-up of each (connections, allocator, page cache), not counted.
    for c in clients {
        measure(c, addr, concurrency, (requests / 20).max(concurrency as u64));
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); clients.len()];
    for round in 0..rounds {
        // Rotate the order so no client always runs first.
        for j in 0..clients.len() {
            let i = (j + round) % clients.len();
            let m = measure(clients[i], addr, concurrency, requests);
            let (us_per_req, per_s) = (m.cpu_ns as f64 / 1000.0 / requests as f64, requests as f64 / m.wall.as_secs_f64());
            eprintln!("round {} {:<18} {:>8.2} µs CPU/request  {:>9.0} req/s", round + 1, clients[i].name(), us_per_req, per_s);
            results[i].0.push(us_per_req);
            results[i].1.push(per_s);
        }
    }
    println!("{concurrency} workers, {requests} POSTs per run, median of {rounds} rounds (client thread CPU; wall-clock req/s):");
    let base = median(results[0].0.clone());
    for (c, (cpu, rate)) in clients.iter().zip(results) {
        let cpu = median(cpu);
        println!("  {:<18} {:>7.2} µs CPU/request ({:>4.2}x hand-made)  {:>8.0} req/s", c.name(), cpu, cpu / base, median(rate));
    }
}
