//! Wiring and lifecycle of one node: open what its roles need (tables, bus ends), rebuild
//! state on a consuming node (the seasons from the tables, then WAL replay into the
//! actors), start the consumer, the flusher and the HTTP server, and shut down in a fixed
//! order.
//!
//! Shutdown order (each step waits for the previous one): stop accepting HTTP and finish
//! in-flight requests → close the bus → the consumer drains what was queued (fsync per
//! batch, so every 201 already given is durable) → final flush to the tables and WAL
//! checkpoint → exit. The last two share a deadline (`flush.shutdown_timeout_ms`): with the
//! tables away the WAL keeps what could not be written, and the process still exits.

use actix_web::{middleware, web, App, HttpServer};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actors::consumer::{ClusterLink, Consumer, Progress};
use crate::actors::flusher::Flusher;
use crate::actors::registry::Registry;
use crate::actors::season_index::SeasonIndex;
use crate::actors::seasons::SeasonBook;
use crate::bus::admission::{Admitted, Pressure};
use crate::bus::amqp::{self, AmqpPublisher, AmqpSource};
use crate::bus::{embedded, EventSource, Publisher, Stop};
use crate::catalog::Catalog;
use crate::cluster::{DynamoLeases, KeeperHandle, LeaseKeeper};
use crate::config::{Config, Role, TableStore};
use crate::http::{self, stats::RequestStats, AppState, ConsumerNode};
use crate::tables::dynamo::DynamoTables;
use crate::tables::{sled_store::SledTables, Tables};
use liftlog_wal::Wal;

/// A started node. `addr` is the bound listener (useful with port 0).
pub struct Running {
    pub addr: SocketAddr,
    pub state: web::Data<AppState>,
    /// The admin listener's address when it has its own.
    pub admin_addr: Option<SocketAddr>,
    server: actix_web::dev::ServerHandle,
    server_task: tokio::task::JoinHandle<std::io::Result<()>>,
    admin: Option<(actix_web::dev::ServerHandle, tokio::task::JoinHandle<std::io::Result<()>>)>,
    consume: Option<ConsumeTasks>,
}

/// The background tasks of a consuming node.
struct ConsumeTasks {
    /// Ends the source (embedded bus: after draining what is queued, whose POSTs wait).
    source_stop: Stop,
    /// Stops the consumer between batches, leaving the source connected (broker mode).
    pause: Stop,
    /// Broker mode: the partitions must stay ours until the final flush is done.
    broker: bool,
    consumer_task: tokio::task::JoinHandle<Box<dyn EventSource>>,
    flusher_stop: Stop,
    flusher_task: tokio::task::JoinHandle<()>,
    /// Bound on the flusher's last cycles at shutdown (`flush.shutdown_timeout_ms`).
    final_flush: Duration,
    /// Cluster mode: the lease keeper, stopped (every shard handed off) before the rest.
    keeper: Option<KeeperHandle>,
}

async fn open_tables(config: &Config) -> anyhow::Result<Arc<dyn Tables>> {
    let tables: Arc<dyn Tables> = match config.tables.store {
        TableStore::Sled => Arc::new(SledTables::open(&config.data_dir.join("tables"))?),
        TableStore::Dynamodb => Arc::new(DynamoTables::connect(config.dynamo_config()).await?),
    };
    if config.tables.create {
        tables.create().await?;
    }
    Ok(tables)
}

/// Creates the tables of the configured store (`liftlog tables create`).
pub async fn create_tables(config: &Config) -> anyhow::Result<()> {
    let mut config = config.clone();
    config.tables.create = true;
    let tables = open_tables(&config).await?;
    tracing::info!(store = tables.name(), "tables ready");
    Ok(())
}

type SourceStatsFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The consume end of the bus: the source, its figures for the admin view, and in cluster
/// mode the handle that picks the partition queues it consumes.
struct SourceEnd {
    source: Box<dyn EventSource>,
    stats: Option<SourceStatsFn>,
    subscriptions: Option<amqp::Subscriptions>,
}

/// The bus ends this node needs: a publisher if it writes, a source if it consumes.
async fn open_bus(config: &Config) -> anyhow::Result<(Option<Arc<dyn Publisher>>, Option<SourceEnd>)> {
    let (write, consume) = (config.has_role(Role::Write), config.has_role(Role::Consume));
    match &config.bus.broker {
        None => {
            // Config::check guarantees write == consume here.
            let (p, s) = embedded::channel(config.bus.capacity, config.publish_deadline());
            Ok((Some(Arc::new(p)), Some(SourceEnd { source: Box::new(s), stats: None, subscriptions: None })))
        }
        Some(url) => {
            let amqp = config.amqp_config(url.expose());
            amqp::declare_topology(&amqp).await?;
            let publisher: Option<Arc<dyn Publisher>> =
                if write { Some(Arc::new(AmqpPublisher::connect(amqp.clone()).await?)) } else { None };
            let source = if consume {
                // Cluster mode: no queue until the keeper hands this node its shards.
                let source =
                    if config.cluster.enabled { AmqpSource::connect_sharded(amqp).await? } else { AmqpSource::connect(amqp).await? };
                let handle = source.stats_handle();
                let stats: SourceStatsFn = Arc::new(move || serde_json::to_value(handle.snapshot()).unwrap_or_default());
                let subscriptions = config.cluster.enabled.then(|| source.subscriptions());
                Some(SourceEnd { source: Box::new(source), stats: Some(stats), subscriptions })
            } else {
                None
            };
            Ok((publisher, source))
        }
    }
}

/// Opens the WAL, rebuilds state (the seasons from the tables, then the WAL replay into
/// the actors) and starts the consumer and the flusher.
async fn start_consumer(config: &Config, tables: Arc<dyn Tables>, end: SourceEnd) -> anyhow::Result<(ConsumerNode, ConsumeTasks)> {
    let SourceEnd { source, stats: source_stats, subscriptions } = end;
    let (wal, recovery) = Wal::open(config.wal_config())?;
    let wal = Arc::new(wal);
    tracing::info!(checkpoint = recovery.checkpoint, records = recovery.records, truncated = recovery.truncated_records, "WAL opened");

    // Season totals: a bounded cache that starts empty and computes misses exactly from the
    // tables and the resident days (issue 13, item 4). No scan at start: the full scan of
    // every skier-day made an out-of-memory caused by many distinct skiers come back at
    // every restart. With a broker it is never read (other consumers count rides too),
    // so it keeps nothing.
    let index_entries = if config.bus.broker.is_none() { config.actors.season_index_entries } else { 0 };
    let index = Arc::new(SeasonIndex::with_capacity(index_entries));
    let seasons = Arc::new(SeasonBook::default());
    for (resort, season) in tables.scan_seasons().await? {
        seasons.observe(resort, season, true);
    }

    let registry = Arc::new(Registry::new(tables.clone(), index.clone(), config.actors.max_resident_days));
    let progress = Arc::new(Progress::default());
    progress.dispatched_seq.store(wal.checkpoint(), Ordering::Release);
    let consumer = Consumer {
        wal: wal.clone(),
        registry: registry.clone(),
        seasons: seasons.clone(),
        progress: progress.clone(),
        max_batch: config.consumer.max_batch,
        abort_after_batches: fault("LIFTLOG_FAULT_ABORT_AFTER_WAL_BATCHES"),
        flush_after_rides: config.flush.after_rides,
        ack_after: config.consumer.ack_after,
    };
    progress.max_unflushed_rides.store(config.actors.max_unflushed_rides, Ordering::Relaxed);
    if config.cluster.enabled {
        // Not replayed: acks wait for the tables, so every record past the checkpoint holds
        // rides the broker still has and redelivers to whichever node owns their shard now
        // (replaying them here would apply rides of shards this node may never hold again).
        let last = wal.last_seq();
        if last > wal.checkpoint() {
            tracing::info!(
                from = wal.checkpoint() + 1,
                to = last,
                "cluster mode: the WAL's unacked tail is left to the broker's redelivery"
            );
            wal.set_checkpoint(last)?;
        }
        progress.dispatched_seq.store(last, Ordering::Release);
        progress.acks.sent_through(last);
    } else {
        consumer.replay().await?;
    }

    let disk_guard = (config.tables.store == TableStore::Sled && config.wal.min_free_disk_bytes > 0)
        .then(|| (config.data_dir.join("tables"), config.wal.min_free_disk_bytes / 4));
    let flusher =
        Flusher::new(registry.clone(), tables, wal.clone(), seasons.clone(), progress.clone(), config.flush.rides_per_actor, disk_guard)
            .with_abort_mid_flush(fault("LIFTLOG_FAULT_ABORT_MID_FLUSH"));
    let keeper = match subscriptions {
        Some(subscriptions) => {
            let shards = config.bus.amqp.partitions;
            let leases = DynamoLeases::connect(config.dynamo_config(), shards).await?;
            let (keeper, events) = LeaseKeeper::start(config.keeper_config(), Arc::new(leases)).await?;
            tracing::info!(node = %keeper.node().id, endpoint = %keeper.node().endpoint, shards, "cluster mode: lease keeper started");
            Some(ClusterLink { keeper, events, subscriptions, shards })
        }
        None => None,
    };
    let flusher = match &keeper {
        Some(link) => flusher.with_fencing(link.keeper.clone(), link.shards),
        None => flusher,
    };
    let flusher = Arc::new(flusher);
    let flusher_stop = Stop::default();
    let flusher_task = actix_rt::spawn(flusher.clone().run(Duration::from_millis(config.flush.interval_ms.max(10)), flusher_stop.clone()));
    let source_stop = source.stop_handle();
    let pause = Stop::default();
    // On the system arbiter: activating an aggregator starts an actix actor.
    let keeper_handle = keeper.as_ref().map(|link| link.keeper.clone());
    let consumer_task = actix_rt::spawn(consumer.run_with(source, pause.clone(), keeper));
    let index_complete = config.bus.broker.is_none();
    let node = ConsumerNode { registry, index, index_complete, seasons, wal, recovery, progress, flusher, source_stats };
    let broker = config.bus.broker.is_some();
    let final_flush = Duration::from_millis(config.flush.shutdown_timeout_ms);
    let tasks = ConsumeTasks { source_stop, pause, broker, consumer_task, flusher_stop, flusher_task, final_flush, keeper: keeper_handle };
    Ok((node, tasks))
}

/// Wraps the publisher in admission control whose pressure reads the bus, and the WAL and
/// flush lag when this process also consumes. Re-read at most every 5 ms: a POST should
/// not take the WAL's lock.
fn admit(config: &Config, publisher: Arc<dyn Publisher>, node: Option<&ConsumerNode>) -> Arc<dyn Publisher> {
    let queue_bound = match config.bus.broker {
        None => config.bus.capacity as f64,
        Some(_) => config.admission.shed_queue_depth as f64,
    };
    let lag_bound = config.admission.shed_flush_lag_secs.max(1) as f64;
    let bus = publisher.clone();
    let local = node.map(|n| (n.wal.clone(), n.progress.clone()));
    let cache = parking_lot::Mutex::new((Instant::now() - Duration::from_secs(1), Pressure::default()));
    let pressure = move || {
        let mut c = cache.lock();
        if c.0.elapsed() >= Duration::from_millis(5) {
            let mut p = Pressure { queue: bus.stats().depth as f64 / queue_bound.max(1.0), ..Default::default() };
            if let Some((wal, progress)) = &local {
                let w = wal.stats();
                p.wal = w.live_bytes as f64 / (w.max_bytes.max(1)) as f64;
                p.flush_lag = progress.flush_lag().as_secs_f64() / lag_bound;
            }
            *c = (Instant::now(), p);
        }
        c.1
    };
    Arc::new(Admitted::new(publisher, config.admission_config(), Box::new(pressure)))
}

/// Opens everything this node's roles need and starts serving. Must run inside an actix
/// system.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let started = Instant::now();
    let catalog = Arc::new(match &config.catalog {
        Some(p) => Catalog::load(p).map_err(anyhow::Error::msg)?,
        None => Catalog::default(),
    });
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let tables = open_tables(&config).await?;
    let (publisher, source) = open_bus(&config).await?;
    let (node, consume) = match source {
        Some(end) => {
            let (node, tasks) = start_consumer(&config, tables.clone(), end).await?;
            (Some(node), Some(tasks))
        }
        None => (None, None),
    };

    let publisher = publisher.map(|p| admit(&config, p, node.as_ref()));
    let cluster = match config.cluster.enabled {
        false => None,
        true => {
            // The owners of the shards: the keeper's own map on a consumer node, a scan of
            // the lease table every `cluster.scan_ms` elsewhere.
            let keeper = consume.as_ref().and_then(|t| t.keeper.clone());
            let map = match &keeper {
                Some(k) => k.map(),
                None => {
                    let leases = DynamoLeases::connect(config.dynamo_config(), config.bus.amqp.partitions).await?;
                    crate::cluster::map_watch::spawn(Arc::new(leases), &config.keeper_config())
                }
            };
            Some(Arc::new(crate::cluster::ClusterReads::new(&config, map, keeper)))
        }
    };
    crate::metrics::set_enabled(config.admin.histograms);
    let state = web::Data::new(AppState {
        catalog,
        limits: config.limits.clone(),
        tables,
        publisher,
        node,
        cluster,
        roles: config.roles_label(),
        requests: Arc::new(RequestStats::new(&config.http.base_path)),
        live: Arc::new(crate::http::stream::Hub::new(config.http.max_streams)),
        max_body_bytes: config.http.max_body_bytes,
        admin_token: config.admin.token.as_ref().map(|t| t.expose().to_string()),
        ready: AtomicBool::new(false),
        started,
    });
    let admin_addr = config.admin_addr().map_err(anyhow::Error::msg)?;
    let base_path = config.http.base_path.clone();
    let app_state = state.clone();
    let admin_on_main = admin_addr.is_none();
    let http = &config.http;
    let workers = if http.workers == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { http.workers };
    // The public listener: actix-web's App on actix-http's HTTP/1 service, built by hand
    // (not `HttpServer`) so that each connection's stream is wrapped in `HeadDeadline`,
    // which times every request head, not only the first (see `http::conn`).
    let head_limit = Duration::from_millis(http.client_request_timeout_ms);
    let builder = actix_server::Server::build()
        .workers(workers)
        .max_concurrent_connections(http.max_connections)
        .backlog(4096)
        .shutdown_timeout(30)
        .disable_signals();
    let graceful = builder.graceful_shutdown_signal();
    let (keep_alive, client_request_timeout) = (Duration::from_secs(http.keep_alive_secs), head_limit);
    let listener = bind_listener(http.listen, 4096).with_context(|| format!("binding {}", http.listen))?;
    let addr = listener.local_addr().context("no bound address")?;
    let server = builder
        .listen("liftlog-http", listener, move || {
            let base_path = base_path.clone();
            let app = App::new()
                .app_data(app_state.clone())
                .wrap(middleware::from_fn(http::account))
                .configure(move |cfg| http::configure(cfg, &base_path, admin_on_main))
                .default_service(web::to(http::no_such_endpoint));
            let graceful = graceful.clone();
            let service = actix_http::HttpService::build()
                .graceful_shutdown_signal(move || {
                    // Idle keep-alive connections close at once when a graceful stop begins.
                    let graceful = graceful.clone();
                    async move { graceful.notified().await }
                })
                .keep_alive(keep_alive)
                .client_request_timeout(client_request_timeout)
                .client_disconnect_timeout(Duration::from_secs(1))
                .local_addr(addr)
                .finish(actix_service::map_config(app, |_| actix_web::dev::AppConfig::default()));
            use actix_service::ServiceFactoryExt as _;
            actix_service::fn_service(move |io: actix_rt::net::TcpStream| async move {
                let peer = io.peer_addr().ok();
                Ok::<_, actix_http::error::DispatchError>((
                    http::conn::HeadDeadline::new(io, head_limit),
                    actix_http::Protocol::Http1,
                    peer,
                ))
            })
            .and_then(service)
        })
        .with_context(|| format!("serving {}", http.listen))?;
    let server = server.run();
    let handle = server.handle();
    let server_task = actix_rt::spawn(server);
    let admin = match admin_addr {
        None => None,
        Some(at) => {
            let admin_state = state.clone();
            let admin = HttpServer::new(move || {
                App::new()
                    .app_data(admin_state.clone())
                    .configure(http::configure_admin)
                    .service(web::resource("/health").route(web::get().to(http::admin::health)))
                    .service(web::resource("/ready").route(web::get().to(http::admin::ready)))
                    .default_service(web::to(http::no_such_endpoint))
            })
            .workers(1)
            .disable_signals()
            .shutdown_timeout(5)
            .bind(at)
            .with_context(|| format!("binding the admin listener {at}"))?;
            let bound = *admin.addrs().first().context("no admin address")?;
            let admin = admin.run();
            Some((bound, admin.handle(), actix_rt::spawn(admin)))
        }
    };
    let admin_addr = admin.as_ref().map(|(a, _, _)| *a);
    let admin = admin.map(|(_, h, t)| (h, t));
    state.ready.store(true, Ordering::Release);
    tracing::info!(%addr, admin = ?admin_addr, roles = %state.roles, millis = started.elapsed().as_millis() as u64, "liftlog listening");
    Ok(Running { addr, admin_addr, state, server: handle, server_task, admin, consume })
}

impl Running {
    /// The fixed shutdown order of the module docs.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!("shutdown: refusing new work");
        self.state.ready.store(false, Ordering::Release);
        // Live streams never end by themselves: end them first, or the graceful stop
        // would wait its whole timeout for them.
        self.state.live.close();
        self.server.stop(true).await;
        let _ = self.server_task.await;
        if let Some((handle, task)) = self.admin {
            handle.stop(true).await;
            let _ = task.await;
        }
        tracing::info!("shutdown: HTTP stopped");
        if let Some(p) = &self.state.publisher {
            p.close();
        }
        let (Some(tasks), Some(node)) = (self.consume, self.state.node.as_ref()) else {
            tracing::info!("shutdown complete");
            return Ok(());
        };
        if let Some(keeper) = &tasks.keeper {
            // Cluster mode: hand every shard off while the consumer and the flusher still run
            // (each is drained, flushed, acked, then released), so the next owners take over
            // at once instead of after a lease.
            tracing::info!("shutdown: handing the shards off");
            keeper.stop().await;
        }
        // Broker: stop between batches but keep the subscription, so a standby does not
        // take the partitions while this node still writes its last rides; it does once
        // the source is dropped after the final flush, and gets what was never applied.
        // Embedded: drain the queue, whose POSTs are waiting for their 201.
        if tasks.broker {
            tasks.pause.stop();
        } else {
            tasks.source_stop.stop();
        }
        let source = tasks.consumer_task.await.ok();
        // The flusher's cycle under way and the final flush share one deadline: with the
        // tables away each cycle can take as long as the store's client retries, and a
        // SIGTERM must end before systemd's SIGKILL (issue 13, item 7). Giving up loses
        // nothing: the checkpoint only moves after a successful cycle, so the WAL still
        // holds every ride the tables may lack, and the next start replays it.
        let deadline = tokio::time::Instant::now() + tasks.final_flush;
        tasks.flusher_stop.stop();
        let mut flusher_task = tasks.flusher_task;
        if tokio::time::timeout_at(deadline, &mut flusher_task).await.is_err() {
            flusher_task.abort();
        }
        tracing::info!("shutdown: consumer drained; final flush");
        let final_flush = async {
            let mut attempts = 0u32;
            loop {
                match node.flusher.flush().await {
                    Ok(r) => {
                        tracing::info!(checkpoint = r.checkpoint, rides = r.rides, "shutdown: flushed");
                        return;
                    }
                    Err(e) if attempts < 3 => {
                        attempts += 1;
                        tracing::warn!(cause = %e, "shutdown: final flush failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => {
                        // Nothing is lost: the WAL holds every acknowledged ride for the next start.
                        tracing::error!(cause = %e, "shutdown: tables unreachable; the WAL will be replayed at next start");
                        return;
                    }
                }
            }
        };
        if tokio::time::timeout_at(deadline, final_flush).await.is_err() {
            tracing::error!(
                bound_ms = tasks.final_flush.as_millis() as u64,
                "shutdown: the final flush did not finish in time; the WAL will be replayed at next start"
            );
        }
        node.wal.sync()?;
        drop(source);
        tracing::info!("shutdown complete");
        Ok(())
    }
}

/// A listening socket with a backlog of its own: `std::net::TcpListener::bind` fixes it at
/// 128, and a burst of connections beyond it would wait for SYN retries (or be refused)
/// instead of queueing for `http.max_connections` to let them in. `SO_REUSEADDR` so that a
/// restarted node binds its port again at once, as actix-web's own `bind` does.
fn bind_listener(addr: SocketAddr, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// A crash test's fault point, armed by an environment variable, in builds with the
/// `fault-injection` feature only (the test command's); `None` everywhere else.
fn fault(var: &str) -> Option<u64> {
    if cfg!(feature = "fault-injection") {
        std::env::var(var).ok().and_then(|v| v.parse().ok())
    } else {
        None
    }
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(cause = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
