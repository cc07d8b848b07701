//! The shard lease table (`{prefix}ShardLeases`, ADR 005) of a cluster, read straight from
//! DynamoDB: who owns which shard under which epoch, and which nodes heartbeat. The
//! cluster tests judge ownership from it, the one record every keeper writes to, and check
//! each node's own view against it.

use liftlog::cluster::{DynamoLeases, LeaseStore, TableSnapshot};
use liftlog::tables::dynamo::DynamoConfig;

/// A connection to one cluster's lease table, with the runtime its requests run on.
pub struct Leases {
    rt: tokio::runtime::Runtime,
    store: DynamoLeases,
}

impl Leases {
    pub fn connect(endpoint: &str, table_prefix: &str, shards: u16) -> Leases {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cfg = DynamoConfig { endpoint: Some(endpoint.into()), table_prefix: table_prefix.into(), ..Default::default() };
        let store = rt.block_on(DynamoLeases::connect(cfg, shards)).expect("connect to the lease table");
        Leases { rt, store }
    }

    /// Every row, strongly consistent; None if the table cannot be read (not created yet).
    pub fn snapshot(&self) -> Option<TableSnapshot> {
        self.rt.block_on(self.store.snapshot()).ok()
    }

    /// Each shard's `(owner, epoch)`, None for a free one.
    pub fn owners(&self) -> Option<Vec<Option<(String, u64)>>> {
        Some(self.snapshot()?.shards.into_iter().map(|r| r.owner.map(|o| (o, r.epoch))).collect())
    }
}
