//! The RabbitMQ ceiling: raw lapin publishing with publisher confirms, persistent messages
//! of the same body liftlog publishes (a bincode ride), to fresh durable queues of one type.
//! `--channels` confirm-mode channels share `--in-flight` unconfirmed publishes; each
//! channel is driven by one task (publish, then keep its confirms in a window), so no lock
//! is needed around lapin's publish numbering. The queues are deleted afterwards.
//!
//! With `--liftlog-prefix P` it measures liftlog's own queues instead: the topology is
//! declared by liftlog's code (`bus::amqp::declare_topology`: quorum, single active
//! consumer, dead-letter exchange, delivery limit) for prefix P and `--queues` partitions,
//! every message goes through liftlog's rides exchange with the partition as routing key
//! (mandatory, as the write node publishes), one ride per message, and the queues are
//! purged afterwards (not deleted: the nodes started next use them). Run it before any
//! consumer subscribes.

use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::args::Args;
use liftlog::domain::RideEvent;

#[derive(Default)]
struct Count {
    acked: u64,
    nacked: u64,
    errors: u64,
    /// Confirm latency, µs, of every publish.
    hist: Option<hdrhistogram::Histogram<u64>>,
}

fn ride(rng: &mut impl Rng) -> RideEvent {
    let lift = rng.gen_range(1..=40u16);
    RideEvent {
        id: rng.gen(),
        resort: rng.gen_range(1..=10),
        season: 2025,
        day: rng.gen_range(1..=3),
        skier: rng.gen_range(1..=100_000),
        time: rng.gen_range(1..=360),
        lift,
        vertical: u32::from(lift) * 10,
    }
}

/// `amqp --url URL --queue-type quorum|classic --queues 4 --channels 4 --in-flight 1000 --seconds 8 [--liftlog-prefix P]`
pub fn run(args: &Args) -> Result<(), String> {
    let url = args.string("url", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let queue_type = args.string("queue-type", "quorum");
    let queues: usize = args.get("queues", 1);
    let channels: usize = args.get("channels", 4);
    let in_flight: usize = args.get("in-flight", 1000);
    let seconds: f64 = args.get("seconds", 8.0);
    let prefix = args.string("prefix", &format!("liftlog-bench.{}", std::process::id()));
    let liftlog_prefix = args.string("liftlog-prefix", "");
    if queues == 0 || channels == 0 || in_flight < channels {
        return Err("need queues >= 1, channels >= 1, in-flight >= channels".into());
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let conn = Connection::connect(&url, ConnectionProperties::default().with_connection_name("liftlog-bench amqp".into()))
            .await
            .map_err(|e| format!("connecting {url}: {e}"))?;
        let admin = conn.create_channel().await.map_err(|e| e.to_string())?;
        // (exchange, routing key) of every queue, and the queue names.
        let (targets, names): (Vec<(String, String)>, Vec<String>) = if liftlog_prefix.is_empty() {
            let names: Vec<String> = (0..queues).map(|i| format!("{prefix}.{queue_type}.{i}")).collect();
            let mut qargs = FieldTable::default();
            qargs.insert("x-queue-type".into(), AMQPValue::LongString(queue_type.clone().into()));
            for n in &names {
                admin
                    .queue_declare(n.clone().into(), QueueDeclareOptions::durable(), qargs.clone())
                    .await
                    .map_err(|e| format!("declaring {n}: {e}"))?;
            }
            (names.iter().map(|n| (String::new(), n.clone())).collect(), names)
        } else {
            let mut config = liftlog::config::Config::default();
            config.bus.amqp.prefix = liftlog_prefix.clone();
            config.bus.amqp.partitions = u16::try_from(queues).map_err(|_| "--queues must fit in u16")?;
            let cfg = config.amqp_config(&url);
            liftlog::bus::amqp::declare_topology(&cfg).await.map_err(|e| format!("declaring liftlog's topology: {e}"))?;
            let parts = 0..config.bus.amqp.partitions;
            (parts.clone().map(|p| (cfg.rides_exchange(), p.to_string())).collect(), parts.map(|p| cfg.partition_queue(p)).collect())
        };
        let liftlog_queues = !liftlog_prefix.is_empty();
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let window = in_flight / channels;
        let mut tasks = Vec::new();
        for c in 0..channels {
            let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
            ch.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
            let targets = targets.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(c as u64 + 1);
                let mut count = Count { hist: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).ok(), ..Default::default() };
                let mut pending = FuturesUnordered::new();
                let mut i = c;
                let props = BasicProperties::default().with_delivery_mode(2).with_content_type("application/x-bincode".into());
                let settle = |r: (Instant, Result<Confirmation, lapin::Error>), count: &mut Count| {
                    match r.1 {
                        Ok(Confirmation::Ack(None)) => count.acked += 1,
                        Ok(_) => count.nacked += 1,
                        Err(_) => count.errors += 1,
                    }
                    if let Some(h) = count.hist.as_mut() {
                        let _ = h.record(r.0.elapsed().as_micros().max(1) as u64);
                    }
                };
                while Instant::now() < deadline {
                    while pending.len() >= window {
                        if let Some(r) = pending.next().await {
                            settle(r, &mut count);
                        }
                    }
                    let body = liftlog::bus::amqp::encode_event(&ride(&mut rng));
                    let (exchange, key) = &targets[i % targets.len()];
                    i += channels;
                    let sent = Instant::now();
                    let opts = BasicPublishOptions { mandatory: liftlog_queues, immediate: false };
                    match ch.basic_publish(exchange.clone().into(), key.clone().into(), opts, &body, props.clone()).await {
                        Ok(confirm) => pending.push(async move { (sent, confirm.await) }),
                        Err(_) => {
                            count.errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                while let Some(r) = pending.next().await {
                    settle(r, &mut count);
                }
                count
            }));
        }
        let mut total = Count { hist: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).ok(), ..Default::default() };
        for t in tasks {
            let c = t.await.map_err(|e| e.to_string())?;
            total.acked += c.acked;
            total.nacked += c.nacked;
            total.errors += c.errors;
            if let (Some(a), Some(b)) = (total.hist.as_mut(), c.hist.as_ref()) {
                let _ = a.add(b);
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let mut purged = 0u64;
        for n in &names {
            if liftlog_queues {
                purged += u64::from(
                    admin
                        .queue_purge(n.clone().into(), QueuePurgeOptions::default())
                        .await
                        .map_err(|e| format!("purging {n}: {e}"))?,
                );
            } else {
                let _ = admin.queue_delete(n.clone().into(), QueueDeleteOptions::default()).await;
            }
        }
        let _ = conn.close(200, "OK".into()).await;
        let h = total.hist.as_ref();
        let q = |p: f64| h.map_or(0, |h| h.value_at_quantile(p));
        println!(
            "{}",
            json!({
                "kind": "amqp-publish-confirm",
                "queue_type": queue_type, "queues": queues, "liftlog_queues": liftlog_queues, "purged": purged, "channels": channels, "in_flight": in_flight,
                "acked": total.acked, "nacked": total.nacked, "errors": total.errors,
                "seconds": elapsed, "rate": total.acked as f64 / elapsed,
                "confirm_latency_us": { "p50": q(0.5), "p99": q(0.99) },
            })
        );
        Ok(())
    })
}

/// `amqp-cleanup --url URL --prefix P --partitions 4`: deletes what a liftlog node with
/// `--amqp-prefix P` declared (names as in liftlog's `bus::amqp` topology), so that the
/// benchmark leaves nothing on a shared broker.
pub fn cleanup(args: &Args) -> Result<(), String> {
    let url = args.string("url", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let prefix = args.string("prefix", "");
    if prefix.is_empty() {
        return Err("--prefix is required".into());
    }
    let partitions: u16 = args.get("partitions", 4);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let conn = Connection::connect(&url, ConnectionProperties::default()).await.map_err(|e| format!("connecting {url}: {e}"))?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        let mut queues: Vec<String> = (0..partitions).map(|p| format!("{prefix}.rides.{p}")).collect();
        queues.push(format!("{prefix}.rides.dead"));
        let mut deleted = 0;
        for q in &queues {
            if ch.queue_delete(q.clone().into(), QueueDeleteOptions::default()).await.is_ok() {
                deleted += 1;
            }
        }
        for x in [format!("{prefix}.rides"), format!("{prefix}.dlx")] {
            let _ = ch.exchange_delete(x.into(), lapin::options::ExchangeDeleteOptions::default()).await;
        }
        let _ = conn.close(200, "OK".into()).await;
        println!("{}", json!({ "kind": "amqp-cleanup", "prefix": prefix, "queues_deleted": deleted }));
        Ok(())
    })
}
