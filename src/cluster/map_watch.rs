//! The shard map for every node: [`MapBuilder`] turns one scan of the lease table into a
//! [`ShardMap`], judging expiry on this node's own monotonic clock, and [`spawn`] runs it
//! every `scan_interval` on nodes that have no keeper (roles without `consume`), which
//! must still know each shard's owner to forward reads to it.
//!
//! The keeper's balancer rounds build their map with the same [`MapBuilder`], so a node
//! with a keeper and one without judge a lease expired by the same rules (ADR 005, "Expiry
//! on the observer's own clock"): a row is expired once its `(epoch, counter)` has stood
//! unchanged for a lease duration since this node first saw it, and a node that just
//! started judges nothing expired for a whole lease.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::expiry::ExpiryObserver;
use super::keeper::{KeeperConfig, ShardMap, ShardOwner};
use super::lease::{LeaseError, LeaseStore, TableSnapshot};
use super::{NodeInfo, ShardId};

/// Remembers what earlier scans showed (the observers' first-seen times) and builds the
/// map of the next one.
#[derive(Debug)]
pub(crate) struct MapBuilder {
    leases: ExpiryObserver<ShardId, (u64, u64)>,
    nodes: ExpiryObserver<String, u64>,
    /// Scans observed so far; the map's generation.
    generation: u64,
}

/// One scan as this node judges it.
#[derive(Debug)]
pub(crate) struct Observed {
    pub map: ShardMap,
    /// Per shard row of the snapshot, in its order: expired on our clock.
    pub expired: Vec<bool>,
    /// Other nodes' heartbeat rows judged dead, with the counter seen (for the clean-up,
    /// which is conditional on it).
    pub dead: Vec<(String, u64)>,
    /// Other nodes whose heartbeat is live, with their counter.
    pub live_others: Vec<(String, u64)>,
    /// Other nodes seen for the first time in this scan (every node on the first scan).
    pub appeared: Vec<(String, u64)>,
}

impl MapBuilder {
    pub fn new(lease_duration: Duration) -> Self {
        MapBuilder { leases: ExpiryObserver::new(lease_duration), nodes: ExpiryObserver::new(lease_duration), generation: 0 }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Observes `snapshot` at `now` and builds its map. `me_live`: list `me` among the
    /// live nodes (a keeper that is not leaving; a node without a keeper has no heartbeat
    /// and is nobody's forwarding target).
    pub fn observe(&mut self, me: &NodeInfo, snapshot: &TableSnapshot, now: Instant, me_live: bool) -> Observed {
        self.generation += 1;
        let mut nodes = Vec::new();
        let mut dead = Vec::new();
        let mut live_others = Vec::new();
        let mut appeared = Vec::new();
        for node in &snapshot.nodes {
            if node.id == me.id {
                continue;
            }
            if !self.nodes.knows(&node.id) {
                appeared.push((node.id.clone(), node.counter));
            }
            if self.nodes.observe(&node.id, &node.counter, now) {
                dead.push((node.id.clone(), node.counter));
                continue;
            }
            nodes.push(NodeInfo { id: node.id.clone(), endpoint: node.endpoint.clone() });
            live_others.push((node.id.clone(), node.counter));
        }
        // A deleted row that comes back (a node restarted under its id) is judged afresh.
        let present: HashSet<&str> = snapshot.nodes.iter().map(|n| n.id.as_str()).collect();
        self.nodes.retain(|id| present.contains(id.as_str()));
        if me_live {
            nodes.push(me.clone());
        }
        nodes.sort();

        let mut expired = Vec::with_capacity(snapshot.shards.len());
        let mut shards = Vec::with_capacity(snapshot.shards.len());
        for row in &snapshot.shards {
            let gone = self.leases.observe(&row.shard, &row.version(), now);
            expired.push(gone);
            shards.push(row.owner.as_ref().map(|owner| ShardOwner {
                node: owner.clone(),
                endpoint: row.endpoint.clone().unwrap_or_default(),
                epoch: row.epoch,
                expired: gone,
            }));
        }
        Observed { map: ShardMap { me: me.id.clone(), shards, nodes, generation: self.generation }, expired, dead, live_others, appeared }
    }
}

/// Starts the map watcher for a node without a keeper: a consistent scan of the lease
/// table every `cfg.scan_interval` (each bounded by `cfg.call_timeout`), judged with
/// `cfg.lease_duration`, published on the returned channel. It starts from an empty map
/// (generation 0); a failed scan keeps the last map (whose owners then age: a forwarder
/// finds out by a refused or failed forward and falls back to the tables). The task ends
/// when every receiver is dropped. It does not create the lease table: the consumer nodes
/// do, and until then every scan fails and the map stays empty.
///
/// Call it on the tokio runtime that should run the task.
pub fn spawn(store: Arc<dyn LeaseStore>, cfg: &KeeperConfig) -> watch::Receiver<Arc<ShardMap>> {
    let (tx, rx) = watch::channel(Arc::new(ShardMap { me: cfg.node.id.clone(), ..ShardMap::default() }));
    let node = cfg.node.clone();
    let (lease, scan, timeout) = (cfg.lease_duration, cfg.scan_interval, cfg.call_timeout);
    tokio::spawn(async move {
        info!(node = %node.id, scan_ms = scan.as_millis() as u64, "shard map watcher started");
        let mut builder = MapBuilder::new(lease);
        let mut tick = tokio::time::interval(scan);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Logged on the first failure and on recovery, not once a second while DynamoDB is down.
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => break,
            }
            let scanned = match tokio::time::timeout(timeout, store.snapshot()).await {
                Ok(r) => r,
                Err(_) => Err(LeaseError::Unavailable(format!("no answer within {timeout:?}"))),
            };
            match scanned {
                Ok(snapshot) => {
                    if std::mem::take(&mut failing) {
                        info!(node = %node.id, "lease table scans succeed again");
                    }
                    let observed = builder.observe(&node, &snapshot, Instant::now(), false);
                    debug!(node = %node.id, generation = observed.map.generation, "shard map refreshed");
                    tx.send_replace(Arc::new(observed.map));
                }
                Err(e) if !failing => {
                    failing = true;
                    warn!(node = %node.id, cause = %e, "lease table scan failed; keeping the last shard map");
                }
                Err(_) => {}
            }
        }
        debug!(node = %node.id, "shard map watcher stopped: no readers left");
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::lease::{DynamoLeases, LeaseRow, NodeRow};
    use crate::tables::dynamo::DynamoConfig;
    use std::time::{SystemTime, UNIX_EPOCH};

    const SHARDS: u16 = 4;

    fn me() -> NodeInfo {
        NodeInfo { id: "reader".into(), endpoint: "http://reader".into() }
    }

    fn snapshot(rows: Vec<LeaseRow>, nodes: &[(&str, u64)]) -> TableSnapshot {
        TableSnapshot {
            shards: rows,
            nodes: nodes.iter().map(|&(id, counter)| NodeRow { id: id.into(), endpoint: format!("http://{id}"), counter }).collect(),
        }
    }

    fn owned(shard: ShardId, owner: &str, epoch: u64, counter: u64) -> LeaseRow {
        LeaseRow { shard, owner: Some(owner.into()), endpoint: Some(format!("http://{owner}")), epoch, counter }
    }

    /// The rules on a clock we pass in: nothing is expired before a whole lease has passed
    /// since a value was first seen; a change of value starts the wait over.
    #[test]
    fn expiry_is_judged_from_when_this_node_first_saw_each_value() {
        let lease = Duration::from_secs(10);
        let mut b = MapBuilder::new(lease);
        let t0 = Instant::now();
        let rows = |c: u64| vec![owned(0, "a", 1, c), LeaseRow::never_acquired(1)];
        let first = b.observe(&me(), &snapshot(rows(5), &[("a", 7)]), t0, false);
        assert_eq!(first.map.generation, 1);
        assert_eq!(first.map.owner(0), Some(&ShardOwner { node: "a".into(), endpoint: "http://a".into(), epoch: 1, expired: false }));
        assert_eq!(first.map.owner(1), None, "free");
        assert_eq!(first.map.nodes, vec![NodeInfo { id: "a".into(), endpoint: "http://a".into() }], "the reader is not listed");
        assert_eq!(first.appeared, vec![("a".to_string(), 7)]);
        // a renews (counter 6) but its heartbeat stands still.
        let later = b.observe(&me(), &snapshot(rows(6), &[("a", 7)]), t0 + lease, false);
        assert!(!later.map.owner(0).unwrap().expired, "renewed at t0 + lease: a new value");
        assert_eq!(later.dead, vec![("a".to_string(), 7)], "heartbeat unchanged for a lease");
        assert!(later.map.nodes.is_empty() && later.appeared.is_empty());
        let stale = b.observe(&me(), &snapshot(rows(6), &[]), t0 + lease * 2, false);
        assert!(stale.map.owner(0).unwrap().expired, "the renewal seen at t0 + lease, unchanged since");
        // (A free row that never changes reads as expired too; nobody owns it to care.)
        assert_eq!(stale.expired, vec![true, true]);
        assert_eq!(stale.map.generation, 3);
        // The node row was deleted; if it comes back it is judged from scratch.
        let back = b.observe(&me(), &snapshot(rows(6), &[("a", 7)]), t0 + lease * 3, false);
        assert_eq!((back.appeared.len(), back.dead.len(), back.map.nodes.len()), (1, 0, 1));
    }

    async fn store(prefix: &str) -> DynamoLeases {
        let endpoint = std::env::var("LIFTLOG_TEST_DYNAMODB").expect("needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)");
        let cfg =
            DynamoConfig { endpoint: Some(endpoint), table_prefix: prefix.to_string(), max_concurrency: 4, ..DynamoConfig::default() };
        DynamoLeases::connect(cfg, SHARDS).await.unwrap()
    }

    /// Waits for a map that satisfies `ok`, bounded.
    async fn until(rx: &mut watch::Receiver<Arc<ShardMap>>, within: Duration, what: &str, ok: impl Fn(&ShardMap) -> bool) -> Arc<ShardMap> {
        let found = tokio::time::timeout(within, rx.wait_for(|m| ok(m))).await.ok().and_then(Result::ok).map(|m| m.clone());
        found.unwrap_or_else(|| panic!("no map with {what} within {within:?}; last: {:?}", rx.borrow()))
    }

    /// Against DynamoDB Local: the watcher shows claims and releases as the keepers make
    /// them, and judges a lease whose owner stopped renewing expired after a lease on its
    /// own clock.
    #[tokio::test]
    #[ignore = "needs DynamoDB Local (LIFTLOG_TEST_DYNAMODB)"]
    async fn the_watcher_follows_the_lease_table_and_judges_a_silent_owner_expired() {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let prefix = format!("mapwatch{nanos}_");
        let owner = store(&prefix).await;
        owner.create().await.unwrap();
        let cfg = KeeperConfig {
            lease_duration: Duration::from_millis(1500),
            scan_interval: Duration::from_millis(100),
            call_timeout: Duration::from_millis(1000),
            ..KeeperConfig::new(me())
        };
        let mut rx = spawn(Arc::new(store(&prefix).await), &cfg);
        assert_eq!(rx.borrow().generation, 0, "empty until the first scan");
        let m = until(&mut rx, Duration::from_secs(10), "a first scan", |m| m.generation >= 1).await;
        assert_eq!(m.shards, vec![None; SHARDS as usize], "every shard free");
        assert_eq!(m.me, "reader");

        // A node heartbeats and claims shard 2.
        let b = NodeInfo { id: "b".into(), endpoint: "http://b:8080".into() };
        owner.heartbeat(&b).await.unwrap();
        let epoch = owner.claim(&LeaseRow::never_acquired(2), &b).await.unwrap().expect("a free shard");
        let claimed_at = Instant::now();
        let m = until(&mut rx, Duration::from_secs(10), "b owning 2", |m| m.owner(2).is_some()).await;
        assert_eq!(m.owner(2), Some(&ShardOwner { node: "b".into(), endpoint: "http://b:8080".into(), epoch, expired: false }));
        assert_eq!(m.nodes, vec![b.clone()]);
        assert_eq!(m.counts(), [("b", 1)].into_iter().collect());

        // b renews no more: after a lease on the watcher's clock the owner is expired,
        // never before (the watcher first saw this value after the claim was applied).
        let m = until(&mut rx, Duration::from_secs(10), "2 expired", |m| m.owner(2).is_some_and(|o| o.expired)).await;
        assert!(claimed_at.elapsed() >= cfg.lease_duration, "expired after {:?}", claimed_at.elapsed());
        assert!(m.nodes.is_empty(), "b's heartbeat is as old: b is no live node");

        // A renewal makes it live again; a release frees it.
        assert!(owner.renew(2, "b", epoch).await.unwrap());
        until(&mut rx, Duration::from_secs(10), "2 renewed", |m| m.owner(2).is_some_and(|o| !o.expired)).await;
        assert!(owner.release(2, "b", epoch).await.unwrap());
        until(&mut rx, Duration::from_secs(10), "2 free", |m| m.owner(2).is_none()).await;

        // Dropping the last receiver ends the task (nothing to assert but that it does not hang).
        drop(rx);
    }
}
