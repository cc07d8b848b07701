//! The DynamoDB ceiling, against the same endpoint as liftlog, each figure with
//! `--concurrency` requests in flight (liftlog's `table_concurrency` is 16):
//! - raw `BatchWriteItem` items/s: 25 ride-shaped items per call into a table keyed like
//!   `SkierLiftRides`, `UnprocessedItems` sent again (the flusher's raw-ride path);
//! - raw `GetItem`/s: strongly consistent, random keys among those written (the read node's
//!   skier-day and resort-day fallback);
//! - raw conditional `PutItem` items/s into a table shaped like `SkierDays` with its
//!   `BySkier` index (the flusher's aggregate path: a condition cannot ride in a batch);
//! - raw `Query`/s on that index with `begins_with` (the read node's vertical fallback).
//!
//! The client is built as liftlog's store builds it (rustls on ring, SDK retries off,
//! static dummy credentials). The tables are created fresh and deleted afterwards.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection, ProjectionType,
    PutRequest, ScalarAttributeType, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use serde_json::json;

use crate::args::Args;

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// Item `i` is derived from `i` alone, so the readers can rebuild any key written.
fn key_of(i: u64) -> (u64, String) {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let skier = h % 100_000 + 1;
    let day = (h >> 20) % 3 + 1;
    let time = (h >> 24) % 360 + 1;
    (skier, format!("2025#{day}#{time}#{i:016x}"))
}

fn item(i: u64) -> HashMap<String, AttributeValue> {
    let (skier, sk) = key_of(i);
    let lift = (i % 40) + 1;
    let mut m = HashMap::with_capacity(9);
    m.insert("SkierID".into(), n(skier));
    m.insert("SK".into(), s(sk));
    m.insert("ResortID".into(), n(i % 10 + 1));
    m.insert("SeasonID".into(), n(2025));
    m.insert("DayID".into(), n((i >> 3) % 3 + 1));
    m.insert("LiftID".into(), n(lift));
    m.insert("Time".into(), n((i >> 5) % 360 + 1));
    m.insert("Vertical".into(), n(lift * 10));
    m.insert("EventID".into(), s(format!("{i:016x}")));
    m
}

pub async fn client(endpoint: &str) -> Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring))
        .build_https();
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(2))
        .operation_attempt_timeout(Duration::from_secs(5))
        .build();
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(aws_config::Region::new("us-east-1"))
        .timeout_config(timeouts)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new("liftlog", "liftlog", None, None, "static"))
        .load()
        .await;
    Client::new(&sdk)
}

fn e(err: impl std::fmt::Debug) -> String {
    format!("{err:?}")
}

/// Runs `concurrency` workers for `seconds`, each calling `op(worker, call_number)` back to
/// back; an op returns the items it did (`Ok`) or an error. Returns (items, errors, seconds).
async fn timed<F, Fut>(concurrency: usize, seconds: f64, op: F) -> (u64, u64, f64)
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<u64, ()>> + Send,
{
    let items = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (op, items, errors) = (op.clone(), items.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                match op(w, i).await {
                    Ok(n) => items.fetch_add(n, Ordering::Relaxed),
                    Err(()) => errors.fetch_add(1, Ordering::Relaxed),
                };
                i += 1;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (items.load(Ordering::Relaxed), errors.load(Ordering::Relaxed), started.elapsed().as_secs_f64())
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

fn key(name: &str, t: KeyType) -> Result<KeySchemaElement, String> {
    KeySchemaElement::builder().attribute_name(name).key_type(t).build().map_err(e)
}

fn attr(name: &str, t: ScalarAttributeType) -> Result<AttributeDefinition, String> {
    AttributeDefinition::builder().attribute_name(name).attribute_type(t).build().map_err(e)
}

async fn create_tables(c: &Client, rides: &str, days: &str) -> Result<(), String> {
    use KeyType::{Hash, Range};
    use ScalarAttributeType::{N, S};
    c.create_table()
        .table_name(rides)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key("SkierID", Hash)?)
        .key_schema(key("SK", Range)?)
        .attribute_definitions(attr("SkierID", N)?)
        .attribute_definitions(attr("SK", S)?)
        .send()
        .await
        .map_err(|err| format!("creating {rides}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(err)))?;
    let by_skier = GlobalSecondaryIndex::builder()
        .index_name("BySkier")
        .key_schema(key("SkierID", Hash)?)
        .key_schema(key("ResortSeasonDay", Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::Include)
                .non_key_attributes("Vertical")
                .non_key_attributes("Rides")
                .non_key_attributes("Version")
                .build(),
        )
        .build()
        .map_err(e)?;
    c.create_table()
        .table_name(days)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key("ResortSeasonDay", Hash)?)
        .key_schema(key("SkierID", Range)?)
        .attribute_definitions(attr("ResortSeasonDay", S)?)
        .attribute_definitions(attr("SkierID", N)?)
        .global_secondary_indexes(by_skier)
        .send()
        .await
        .map_err(|err| format!("creating {days}: {}", aws_sdk_dynamodb::error::DisplayErrorContext(err)))?;
    Ok(())
}

/// `dynamo --endpoint http://127.0.0.1:8000 --seconds 8 --concurrency 16 --prefix P [--gsi-fill N]`
pub fn run(args: &Args) -> Result<(), String> {
    let endpoint = args.string("endpoint", "http://127.0.0.1:8000");
    let seconds: f64 = args.get("seconds", 8.0);
    let concurrency: usize = args.get("concurrency", 16);
    let prefix = args.string("prefix", &format!("bench{}_", std::process::id()));
    // Items written into the indexed table before its figures (diagnostics; 0 = none).
    let gsi_fill: u64 = args.get("gsi-fill", 0);
    let (rides, days) = (format!("{prefix}BenchRides"), format!("{prefix}BenchSkierDays"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let c = client(&endpoint).await;
        create_tables(&c, &rides, &days).await?;

        // 1. BatchWriteItem, 25 items per call, into the rides table.
        let next = Arc::new(AtomicU64::new(0));
        let (cl, table, nx) = (c.clone(), rides.clone(), next.clone());
        let (bw_items, bw_errors, bw_s) = timed(concurrency, seconds, move |_, _| {
            let (c, table, next) = (cl.clone(), table.clone(), nx.clone());
            async move {
                let first = next.fetch_add(25, Ordering::Relaxed);
                let mut requests: Vec<WriteRequest> = (first..first + 25)
                    .filter_map(|i| PutRequest::builder().set_item(Some(item(i))).build().ok())
                    .map(|p| WriteRequest::builder().put_request(p).build())
                    .collect();
                let mut done = 0;
                for _ in 0..8 {
                    let sent = requests.len() as u64;
                    let out = c.batch_write_item().request_items(table.clone(), requests.clone()).send().await.map_err(|_| ())?;
                    let left = out.unprocessed_items.and_then(|mut m| m.remove(&table)).unwrap_or_default();
                    done += sent - left.len() as u64;
                    requests = left;
                    if requests.is_empty() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(done)
            }
        })
        .await;
        let issued = next.load(Ordering::Relaxed).max(1);

        // 2. GetItem on random keys among those written.
        let (cl, table) = (c.clone(), rides.clone());
        let (gets, get_errors, get_s) = timed(concurrency, seconds, move |w, i| {
            let (c, table) = (cl.clone(), table.clone());
            async move {
                let x = xorshift((w as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (i + 1));
                let (skier, sk) = key_of(x % issued);
                c.get_item()
                    .table_name(&table)
                    .key("SkierID", n(skier))
                    .key("SK", s(sk))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|_| ())?;
                Ok(1)
            }
        })
        .await;

        // 2b. Optionally grow the indexed table first (BatchWriteItem, not timed), so that the
        // index Query below runs on a table as large as the one it is compared with.
        let filled = Arc::new(AtomicU64::new(0));
        if gsi_fill > 0 {
            let mut tasks = Vec::new();
            for w in 0..concurrency as u64 {
                let (c, table, filled) = (c.clone(), days.clone(), filled.clone());
                tasks.push(tokio::spawn(async move {
                    let mut i = w * 25;
                    while i < gsi_fill {
                        let mut requests: Vec<WriteRequest> = (i..(i + 25).min(gsi_fill))
                            .filter_map(|k| {
                                let x = xorshift(k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                                let mut m = HashMap::with_capacity(5);
                                m.insert("ResortSeasonDay".to_string(), s(format!("{}#2025#{}", x % 10 + 1, (x >> 8) % 3 + 1)));
                                m.insert("SkierID".to_string(), n((x >> 16) % 100_000 + 1));
                                m.insert("Vertical".to_string(), n((x >> 40) % 400 + 10));
                                m.insert("Rides".to_string(), n(1));
                                m.insert("Version".to_string(), n(1));
                                PutRequest::builder().set_item(Some(m)).build().ok()
                            })
                            .map(|p| WriteRequest::builder().put_request(p).build())
                            .collect();
                        // Keys may repeat within a batch (a ValidationException): keep the first.
                        let mut seen = std::collections::HashSet::new();
                        requests.retain(|r| {
                            let item = r.put_request().map(|p| p.item());
                            seen.insert(item.map(|m| format!("{:?}{:?}", m.get("ResortSeasonDay"), m.get("SkierID"))))
                        });
                        for _ in 0..8 {
                            let Ok(out) = c.batch_write_item().request_items(table.clone(), requests.clone()).send().await else {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            };
                            let left = out.unprocessed_items.and_then(|mut m| m.remove(&table)).unwrap_or_default();
                            filled.fetch_add((requests.len() - left.len()) as u64, Ordering::Relaxed);
                            requests = left;
                            if requests.is_empty() {
                                break;
                            }
                        }
                        i += concurrency as u64 * 25;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }

        // 3. Conditional PutItem, one skier-day per call, into the indexed table.
        let (cl, table) = (c.clone(), days.clone());
        let (puts, put_errors, put_s) = timed(concurrency, seconds, move |w, i| {
            let (c, table) = (cl.clone(), table.clone());
            async move {
                let x = xorshift((w as u64 + 7).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i + 1));
                let ids: Vec<u8> = x.to_le_bytes().to_vec();
                c.put_item()
                    .table_name(&table)
                    .item("ResortSeasonDay", s(format!("{}#2025#{}", x % 10 + 1, (x >> 8) % 3 + 1)))
                    .item("SkierID", n((x >> 16) % 100_000 + 1))
                    .item("Vertical", n((x >> 40) % 400 + 10))
                    .item("Rides", n(1))
                    .item("Version", n(i + 1))
                    .item("Ids", AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(ids)))
                    .condition_expression("attribute_not_exists(#v) OR #v < :v")
                    .expression_attribute_names("#v", "Version")
                    .expression_attribute_values(":v", n(i + 1))
                    .send()
                    .await
                    .map(|_| 1)
                    .or_else(|err| match err.as_service_error() {
                        Some(se) if se.is_conditional_check_failed_exception() => Ok(1),
                        _ => Err(()),
                    })
            }
        })
        .await;

        // 4. Query on the BySkier index, as the read node's vertical fallback does.
        let (cl, table) = (c.clone(), days.clone());
        let (queries, query_errors, query_s) = timed(concurrency, seconds, move |w, i| {
            let (c, table) = (cl.clone(), table.clone());
            async move {
                let x = xorshift((w as u64 + 3).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (i + 1));
                c.query()
                    .table_name(&table)
                    .index_name("BySkier")
                    .key_condition_expression("#s = :s AND begins_with(#k, :p)")
                    .expression_attribute_names("#s", "SkierID")
                    .expression_attribute_names("#k", "ResortSeasonDay")
                    .expression_attribute_values(":s", n(x % 100_000 + 1))
                    .expression_attribute_values(":p", s(format!("{}#", (x >> 20) % 10 + 1)))
                    .send()
                    .await
                    .map(|_| 1)
                    .map_err(|_| ())
            }
        })
        .await;

        for t in [&rides, &days] {
            let _ = c.delete_table().table_name(t).send().await;
        }
        println!(
            "{}",
            json!({
                "kind": "dynamodb",
                "endpoint": endpoint, "concurrency": concurrency, "seconds": seconds,
                "batch_write_items": bw_items, "batch_write_errors": bw_errors, "batch_write_items_per_s": bw_items as f64 / bw_s,
                "get_items": gets, "get_errors": get_errors, "get_items_per_s": gets as f64 / get_s,
                "conditional_put_items": puts, "conditional_put_errors": put_errors, "conditional_put_items_per_s": puts as f64 / put_s,
                "gsi_prefilled_items": filled.load(Ordering::Relaxed),
                "gsi_queries": queries, "gsi_query_errors": query_errors, "gsi_queries_per_s": queries as f64 / query_s,
            })
        );
        Ok(())
    })
}
