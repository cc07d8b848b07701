//! The fencing token a data-table write carries (ADR 005, "The fencing contract").
//!
//! Every item the flusher writes for a shard carries the epoch of the lease under which it
//! was written, in the attribute [`EPOCH_ATTR`]. A write is conditional on the stored epoch
//! being absent or not newer than the writer's, so once the new owner has written an item
//! (with its higher epoch) a stale owner's write of that item fails with
//! ConditionalCheckFailed, however late it arrives.
//!
//! The epoch and the existing item version compare as one pair, epoch first: a new owner's
//! first write of an item must win over a stale owner's write with a *higher* version (the
//! stale owner may have applied rides the new owner has not been redelivered yet), and
//! within one epoch the version keeps a retried older flush from overwriting a newer one.
//! [`Fence::versioned_condition`] is that condition; [`Fence::condition`] is the epoch
//! fragment alone for items without a version.
//!
//! A fence alone does not make an ack safe: the consumer acks a batch only if, *after* the
//! flush that covers it returned, the keeper still gives out a fence for the shard
//! ([`super::KeeperHandle::fence`]), which it stops doing at its self-fence deadline.

use aws_sdk_dynamodb::types::AttributeValue;

use super::ShardId;

/// The item attribute holding the writer's epoch.
pub const EPOCH_ATTR: &str = "LeaseEpoch";

/// Placeholders used in the expressions; chosen not to collide with the flusher's own
/// (`#v`, `:v`).
pub const EPOCH_NAME: &str = "#fence_epoch";
pub const EPOCH_VALUE: &str = ":fence_epoch";

/// The right to write a shard's items under one lease epoch. Obtained from the keeper
/// while the lease is held (and not past its self-fence deadline).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Fence {
    pub shard: ShardId,
    pub epoch: u64,
}

impl Fence {
    /// `attribute_not_exists(#fence_epoch) OR #fence_epoch <= :fence_epoch`: the item was
    /// never written under a lease, or last written under this epoch or an older one.
    pub fn condition() -> String {
        format!("(attribute_not_exists({EPOCH_NAME}) OR {EPOCH_NAME} <= {EPOCH_VALUE})")
    }

    /// The fence and an item version (`version_name`, `version_value`, e.g. `#v`, `:v`)
    /// compared as `(epoch, version)`: a newer epoch always wins, the same epoch needs a
    /// newer version. Items written before fencing (no epoch) keep the version rule alone.
    pub fn versioned_condition(version_name: &str, version_value: &str) -> String {
        let version_newer = format!("(attribute_not_exists({version_name}) OR {version_name} < {version_value})");
        format!(
            "((attribute_not_exists({EPOCH_NAME}) AND {version_newer}) OR {EPOCH_NAME} < {EPOCH_VALUE} \
             OR ({EPOCH_NAME} = {EPOCH_VALUE} AND {version_newer}))"
        )
    }

    /// The expression attribute name binding: `(#fence_epoch, LeaseEpoch)`.
    pub fn name_binding() -> (&'static str, &'static str) {
        (EPOCH_NAME, EPOCH_ATTR)
    }

    /// The expression attribute value binding: `(:fence_epoch, N epoch)`.
    pub fn value_binding(&self) -> (&'static str, AttributeValue) {
        (EPOCH_VALUE, AttributeValue::N(self.epoch.to_string()))
    }

    /// The attribute to store on the item: `(LeaseEpoch, N epoch)`.
    pub fn item_attribute(&self) -> (&'static str, AttributeValue) {
        (EPOCH_ATTR, AttributeValue::N(self.epoch.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_name_the_placeholders_they_bind() {
        assert_eq!(Fence::condition(), "(attribute_not_exists(#fence_epoch) OR #fence_epoch <= :fence_epoch)");
        let c = Fence::versioned_condition("#v", ":v");
        assert!(c.contains("#fence_epoch < :fence_epoch") && c.contains("#v < :v"), "{c}");
        let f = Fence { shard: 3, epoch: 7 };
        assert_eq!(f.value_binding(), (":fence_epoch", AttributeValue::N("7".into())));
        assert_eq!(f.item_attribute(), ("LeaseEpoch", AttributeValue::N("7".into())));
        assert_eq!(Fence::name_binding(), ("#fence_epoch", "LeaseEpoch"));
    }
}
