//! The lease table `{prefix}ShardLeases`: one row per shard, one heartbeat row per node and
//! one row recording the shard count, all under one string key `LeaseKey`.
//!
//! | `LeaseKey` | attributes | written by |
//! |---|---|---|
//! | `shard#{n}` | `Owner` (S, absent when free), `Endpoint` (S, absent when free), `Epoch` (N), `Counter` (N) | [`LeaseStore::claim`], `renew`, `release` |
//! | `node#{id}` | `NodeId` (S), `Endpoint` (S), `Counter` (N) | [`LeaseStore::heartbeat`], `remove_node` |
//! | `meta` | `Shards` (N) | [`LeaseStore::create`], once per table |
//!
//! A shard that was never acquired has no row; it reads as free with epoch 0 and counter 0.
//! Every write to a shard row changes `(Epoch, Counter)` (that is how observers judge
//! expiry, see [`super::expiry`]), and every write is conditional on what the writer saw:
//! - claim (acquire a free shard or take over an expired lease): on the exact
//!   `(Owner, Epoch, Counter)` observed (absent attributes as `attribute_not_exists`);
//!   sets the owner and endpoint, `Epoch + 1` (the fencing token) and `Counter + 1`;
//! - renew: on `Owner = me AND Epoch = mine`; `Counter + 1`;
//! - release (cooperative hand-off): on `Owner = me AND Epoch = mine`; removes `Owner` and
//!   `Endpoint`, `Counter + 1`, and leaves `Epoch` so the next claim bumps it past ours.
//!
//! A failed condition is an answer (`Ok(false)`/`Ok(None)`), not an error. Requests are not
//! retried here: the keeper's next round is the retry, and its self-fence deadline bounds
//! how long it may keep trying. The table is small (shards + nodes, ~100 bytes a row), so
//! a strongly consistent Scan of it every second costs a few read units per node.

use crate::tables::dynamo::names::lease::*;
use crate::tables::dynamo::{n, s, ACTIVE_WAIT};
use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue, ScalarAttributeType, TableStatus,
};
use aws_sdk_dynamodb::Client;
use tracing::{debug, info};

use super::{NodeInfo, ShardId};
use crate::tables::dynamo::{DynamoConfig, DynamoTables};

type Item = HashMap<String, AttributeValue>;

/// Failures of the lease table.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// DynamoDB could not be reached, throttled, timed out or refused the request. The
    /// keeper keeps trying until its self-fence deadline.
    #[error("lease table unavailable: {0}")]
    Unavailable(String),
    /// A row did not decode: a bug or a foreign writer.
    #[error("corrupt lease row {key}: {detail}")]
    Corrupt { key: String, detail: String },
    /// The table was set up for another shard count; shards are partition queues and the
    /// count is fixed per cluster (ADR 005, "Changing the shard count").
    #[error("the lease table is set up for {table} shards, this node for {configured}")]
    ShardCountMismatch { table: u16, configured: u16 },
    /// A configuration that cannot work (zero shards, a bad node id).
    #[error("invalid lease configuration: {0}")]
    Config(String),
}

/// One shard's row as read.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LeaseRow {
    pub shard: ShardId,
    pub owner: Option<String>,
    pub endpoint: Option<String>,
    pub epoch: u64,
    pub counter: u64,
}

impl LeaseRow {
    /// A shard without a row.
    pub fn never_acquired(shard: ShardId) -> Self {
        LeaseRow { shard, owner: None, endpoint: None, epoch: 0, counter: 0 }
    }

    /// What observers compare to judge expiry: it changes on every write.
    pub fn version(&self) -> (u64, u64) {
        (self.epoch, self.counter)
    }
}

/// One node's heartbeat row.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeRow {
    pub id: String,
    pub endpoint: String,
    pub counter: u64,
}

/// The whole table: every shard (rows filled in for shards never acquired), every node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableSnapshot {
    pub shards: Vec<LeaseRow>,
    pub nodes: Vec<NodeRow>,
}

/// The lease table's operations, as the keeper uses them. [`DynamoLeases`] is the real one;
/// tests wrap it to stall or fail requests.
#[async_trait]
pub trait LeaseStore: Send + Sync + 'static {
    /// The cluster's shard count.
    fn shards(&self) -> u16;
    /// Creates the table if missing and records the shard count, or checks it.
    async fn create(&self) -> Result<(), LeaseError>;
    /// Every row, strongly consistent.
    async fn snapshot(&self) -> Result<TableSnapshot, LeaseError>;
    /// Acquires a free shard or takes over an expired lease, conditional on the exact row
    /// `seen`. `Some(epoch)`: ours now, with that epoch; `None`: the row changed.
    async fn claim(&self, seen: &LeaseRow, me: &NodeInfo) -> Result<Option<u64>, LeaseError>;
    /// Bumps the counter if `me` still holds `shard` at `epoch`; `false` if not.
    async fn renew(&self, shard: ShardId, me: &str, epoch: u64) -> Result<bool, LeaseError>;
    /// Gives the shard up if `me` still holds it at `epoch`; `false` if not.
    async fn release(&self, shard: ShardId, me: &str, epoch: u64) -> Result<bool, LeaseError>;
    /// Writes `me`'s heartbeat row (endpoint, counter + 1).
    async fn heartbeat(&self, me: &NodeInfo) -> Result<(), LeaseError>;
    /// Deletes a node row: conditional on `seen_counter` (clean-up of a dead node's row,
    /// `false` if it beat since), or unconditional with `None` (a node leaving).
    async fn remove_node(&self, id: &str, seen_counter: Option<u64>) -> Result<bool, LeaseError>;
}

/// The lease table on DynamoDB (or DynamoDB Local).
#[derive(Clone, Debug)]
pub struct DynamoLeases {
    client: Client,
    table: String,
    shards: u16,
}

fn shard_key(shard: ShardId) -> AttributeValue {
    s(format!("shard#{shard}"))
}

fn node_key(id: &str) -> AttributeValue {
    s(format!("node#{id}"))
}

fn unavailable<E: std::error::Error + Send + Sync + 'static>(op: &str, e: SdkError<E>) -> LeaseError {
    LeaseError::Unavailable(format!("dynamodb {op}: {}", DisplayErrorContext(&e)))
}

fn corrupt(key: &str, detail: impl Into<String>) -> LeaseError {
    LeaseError::Corrupt { key: key.to_string(), detail: detail.into() }
}

fn get_n(key: &str, item: &Item, name: &str) -> Result<Option<u64>, LeaseError> {
    match item.get(name) {
        None => Ok(None),
        Some(AttributeValue::N(v)) => v.parse().map(Some).map_err(|_| corrupt(key, format!("{name} = {v:?}"))),
        Some(other) => Err(corrupt(key, format!("{name} is not a number: {other:?}"))),
    }
}

fn get_s(key: &str, item: &Item, name: &str) -> Result<Option<String>, LeaseError> {
    match item.get(name) {
        None => Ok(None),
        Some(AttributeValue::S(v)) => Ok(Some(v.clone())),
        Some(other) => Err(corrupt(key, format!("{name} is not a string: {other:?}"))),
    }
}

impl DynamoLeases {
    /// An update of a shard's row by its owner: conditional on (owner = me, epoch = mine),
    /// bumping the renewal counter (`update` must use `#o`, `#c` and `:one`; `names` binds
    /// any other names it uses). `Ok(false)`: the condition failed, someone else holds it.
    async fn owner_update(
        &self,
        shard: ShardId,
        me: &str,
        epoch: u64,
        update: &str,
        names: &[(&str, &str)],
        what: &'static str,
    ) -> Result<bool, LeaseError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(A_KEY, shard_key(shard))
            .update_expression(update)
            .condition_expression("#o = :me AND #e = :e")
            .expression_attribute_names("#o", A_OWNER)
            .expression_attribute_names("#e", A_EPOCH)
            .expression_attribute_names("#c", A_COUNTER)
            .expression_attribute_values(":me", s(me))
            .expression_attribute_values(":e", n(epoch))
            .expression_attribute_values(":one", n(1));
        for (name, attribute) in names {
            request = request.expression_attribute_names(*name, *attribute);
        }
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(false),
            Err(e) => Err(unavailable(what, e)),
        }
    }

    /// Uses an existing client (e.g. [`DynamoTables::client`], so the process has one
    /// connection pool). Makes no request.
    pub fn new(client: Client, table_prefix: &str, shards: u16) -> Result<Self, LeaseError> {
        if shards == 0 {
            return Err(LeaseError::Config("shards must be at least 1".into()));
        }
        Ok(DynamoLeases { client, table: format!("{table_prefix}{TABLE}"), shards })
    }

    /// Builds a client the way the table store does (timeouts, TLS, DynamoDB Local
    /// credentials) and uses it.
    pub async fn connect(cfg: DynamoConfig, shards: u16) -> Result<Self, LeaseError> {
        let prefix = cfg.table_prefix.clone();
        let tables = DynamoTables::connect(cfg).await.map_err(|e| LeaseError::Unavailable(e.to_string()))?;
        Self::new(tables.client().clone(), &prefix, shards)
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    async fn create_table(&self) -> Result<(), LeaseError> {
        let key = KeySchemaElement::builder()
            .attribute_name(A_KEY)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| LeaseError::Config(e.to_string()))?;
        let attribute = AttributeDefinition::builder()
            .attribute_name(A_KEY)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(|e| LeaseError::Config(e.to_string()))?;
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key)
            .attribute_definitions(attribute)
            .send()
            .await;
        match created {
            Ok(_) => info!(table = %self.table, "lease table created"),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => {
                debug!(table = %self.table, "lease table exists");
            }
            Err(e) => return Err(unavailable("CreateTable", e)),
        }
        let started = std::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let out = self.client.describe_table().table_name(&self.table).send().await.map_err(|e| unavailable("DescribeTable", e))?;
            let status = out.table.and_then(|t| t.table_status);
            if status == Some(TableStatus::Active) {
                return Ok(());
            }
            if started.elapsed() >= ACTIVE_WAIT {
                return Err(LeaseError::Unavailable(format!("{} not ACTIVE after {ACTIVE_WAIT:?}: {status:?}", self.table)));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// Records the shard count on first use; later nodes must agree with it.
    async fn check_meta(&self) -> Result<(), LeaseError> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(A_KEY, s(META_KEY))
            .item(A_SHARDS, n(self.shards))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", A_KEY)
            .send()
            .await;
        match put {
            Ok(_) => return Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => {}
            Err(e) => return Err(unavailable("PutItem", e)),
        }
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(A_KEY, s(META_KEY))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| unavailable("GetItem", e))?;
        let item = out.item.unwrap_or_default();
        let table = get_n(META_KEY, &item, A_SHARDS)?.ok_or_else(|| corrupt(META_KEY, "Shards missing"))?;
        let table = u16::try_from(table).map_err(|_| corrupt(META_KEY, format!("Shards = {table}")))?;
        if table != self.shards {
            return Err(LeaseError::ShardCountMismatch { table, configured: self.shards });
        }
        Ok(())
    }

    fn parse(&self, item: &Item, out: &mut TableSnapshot) -> Result<(), LeaseError> {
        let key = get_s("?", item, A_KEY)?.ok_or_else(|| corrupt("?", "LeaseKey missing"))?;
        if let Some(number) = key.strip_prefix("shard#") {
            let shard: ShardId = number.parse().map_err(|_| corrupt(&key, "bad shard number"))?;
            if shard >= self.shards {
                return Ok(()); // cannot happen with the meta check; not ours to judge
            }
            out.shards[shard as usize] = LeaseRow {
                shard,
                owner: get_s(&key, item, A_OWNER)?,
                endpoint: get_s(&key, item, A_ENDPOINT)?,
                epoch: get_n(&key, item, A_EPOCH)?.unwrap_or(0),
                counter: get_n(&key, item, A_COUNTER)?.unwrap_or(0),
            };
        } else if key.starts_with("node#") {
            out.nodes.push(NodeRow {
                id: get_s(&key, item, A_NODE)?.ok_or_else(|| corrupt(&key, "NodeId missing"))?,
                endpoint: get_s(&key, item, A_ENDPOINT)?.unwrap_or_default(),
                counter: get_n(&key, item, A_COUNTER)?.unwrap_or(0),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl LeaseStore for DynamoLeases {
    fn shards(&self) -> u16 {
        self.shards
    }

    async fn create(&self) -> Result<(), LeaseError> {
        self.create_table().await?;
        self.check_meta().await
    }

    async fn snapshot(&self) -> Result<TableSnapshot, LeaseError> {
        let mut out = TableSnapshot { shards: (0..self.shards).map(LeaseRow::never_acquired).collect(), nodes: Vec::new() };
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| unavailable("Scan", e))?;
            for item in page.items() {
                self.parse(item, &mut out)?;
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn claim(&self, seen: &LeaseRow, me: &NodeInfo) -> Result<Option<u64>, LeaseError> {
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(A_KEY, shard_key(seen.shard))
            .update_expression("SET #o = :me, #p = :p, #e = :ne, #c = :nc")
            .expression_attribute_names("#o", A_OWNER)
            .expression_attribute_names("#p", A_ENDPOINT)
            .expression_attribute_names("#e", A_EPOCH)
            .expression_attribute_names("#c", A_COUNTER)
            .expression_attribute_values(":me", s(&me.id))
            .expression_attribute_values(":p", s(&me.endpoint))
            .expression_attribute_values(":ne", n(seen.epoch + 1))
            .expression_attribute_values(":nc", n(seen.counter + 1))
            .return_values(ReturnValue::None);
        // The exact row seen; a row never written has none of the attributes.
        let mut conditions = Vec::with_capacity(3);
        match &seen.owner {
            Some(owner) => {
                conditions.push("#o = :so");
                request = request.expression_attribute_values(":so", s(owner));
            }
            None => conditions.push("attribute_not_exists(#o)"),
        }
        if seen.epoch == 0 {
            conditions.push("attribute_not_exists(#e)");
        } else {
            conditions.push("#e = :se");
            request = request.expression_attribute_values(":se", n(seen.epoch));
        }
        if seen.counter == 0 {
            conditions.push("attribute_not_exists(#c)");
        } else {
            conditions.push("#c = :sc");
            request = request.expression_attribute_values(":sc", n(seen.counter));
        }
        match request.condition_expression(conditions.join(" AND ")).send().await {
            Ok(_) => Ok(Some(seen.epoch + 1)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(None),
            Err(e) => Err(unavailable("UpdateItem (claim)", e)),
        }
    }

    async fn renew(&self, shard: ShardId, me: &str, epoch: u64) -> Result<bool, LeaseError> {
        self.owner_update(shard, me, epoch, "SET #c = #c + :one", &[], "UpdateItem (renew)").await
    }

    async fn release(&self, shard: ShardId, me: &str, epoch: u64) -> Result<bool, LeaseError> {
        self.owner_update(shard, me, epoch, "REMOVE #o, #p SET #c = #c + :one", &[("#p", A_ENDPOINT)], "UpdateItem (release)").await
    }

    async fn heartbeat(&self, me: &NodeInfo) -> Result<(), LeaseError> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key(A_KEY, node_key(&me.id))
            .update_expression("SET #n = :n, #p = :p ADD #c :one")
            .expression_attribute_names("#n", A_NODE)
            .expression_attribute_names("#p", A_ENDPOINT)
            .expression_attribute_names("#c", A_COUNTER)
            .expression_attribute_values(":n", s(&me.id))
            .expression_attribute_values(":p", s(&me.endpoint))
            .expression_attribute_values(":one", n(1))
            .send()
            .await
            .map_err(|e| unavailable("UpdateItem (heartbeat)", e))?;
        Ok(())
    }

    async fn remove_node(&self, id: &str, seen_counter: Option<u64>) -> Result<bool, LeaseError> {
        let mut request = self.client.delete_item().table_name(&self.table).key(A_KEY, node_key(id));
        if let Some(counter) = seen_counter {
            request = request
                .condition_expression("#c = :c")
                .expression_attribute_names("#c", A_COUNTER)
                .expression_attribute_values(":c", n(counter));
        }
        match request.send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(false),
            Err(e) => Err(unavailable("DeleteItem (node)", e)),
        }
    }
}
