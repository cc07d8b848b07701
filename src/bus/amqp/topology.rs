//! The exchanges, queues and bindings, declared by both ends at every connect (see the
//! module doc of [`super`], which also explains the delivery limit).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use super::connection::{connect, unavailable, AmqpError};
use super::AmqpConfig;
use crate::error::PublishError;

/// The `x-delivery-limit` of the partition queues (see the module doc).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 1_000_000;

fn quorum_args(cfg: &AmqpConfig, single_active: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(cfg.dead_letter_exchange().into()));
        if cfg.delivery_limit > 0 {
            let limit = i32::try_from(cfg.delivery_limit).unwrap_or(i32::MAX);
            args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
        }
    }
    args
}

/// Says what to do when a partition queue exists with another delivery limit (typically
/// none: declared by a liftlog from before the limit). Other errors pass unchanged.
fn explain_declare_error(cfg: &AmqpConfig, queue: &str, e: lapin::Error) -> AmqpError {
    let text = e.to_string();
    if !text.contains("x-delivery-limit") {
        return AmqpError::Broker(e);
    }
    let (prefix, limit) = (&cfg.prefix, cfg.delivery_limit.max(1));
    let declared = if cfg.delivery_limit == 0 { "none".to_string() } else { limit.to_string() };
    AmqpError::InequivalentQueue(format!(
        "queue {queue} exists with another x-delivery-limit than the one liftlog declares ({declared}; queues declared by an older \
         liftlog have none, and on RabbitMQ 4.x a queue without one dead-letters a ride after 20 redeliveries, where \
         nothing counts it). RabbitMQ cannot change an existing queue's arguments. Either keep the queues: set liftlog's \
         AMQP delivery_limit to 0 (it then declares none) and set the limit with a policy, e.g. `rabbitmqctl set_policy \
         {prefix}-rides '^{prefix}\\.rides\\.[0-9]+$' '{{\"delivery-limit\":{limit}}}' --apply-to queues` (mind other \
         policies on these queues: only one applies); or stop the writers, let the consumers drain the queues, delete \
         them and start again, so they are declared with the limit. RabbitMQ said: {text}"
    ))
}

pub(super) async fn declare_on(channel: &Channel, cfg: &AmqpConfig) -> Result<(), AmqpError> {
    let durable_exchange = ExchangeDeclareOptions { durable: true, ..Default::default() };
    let durable_queue = QueueDeclareOptions::durable();
    channel.exchange_declare(cfg.dead_letter_exchange().into(), ExchangeKind::Fanout, durable_exchange, FieldTable::default()).await?;
    channel.queue_declare(cfg.dead_queue().into(), durable_queue, quorum_args(cfg, false)).await?;
    channel
        .queue_bind(
            cfg.dead_queue().into(),
            cfg.dead_letter_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel.exchange_declare(cfg.rides_exchange().into(), ExchangeKind::Direct, durable_exchange, FieldTable::default()).await?;
    for p in 0..cfg.partition_count() {
        let queue = cfg.partition_queue(p);
        channel
            .queue_declare(queue.as_str().into(), durable_queue, quorum_args(cfg, true))
            .await
            .map_err(|e| explain_declare_error(cfg, &queue, e))?;
        channel
            .queue_bind(
                cfg.partition_queue(p).into(),
                cfg.rides_exchange().into(),
                p.to_string().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Declares the exchanges, queues and bindings (see the module doc). Idempotent; fails if
/// a queue exists with other arguments (e.g. a classic queue of the same name).
pub async fn declare_topology(cfg: &AmqpConfig) -> Result<(), PublishError> {
    let conn = connect(cfg, "topology").await.map_err(unavailable)?;
    let result = async {
        let channel = conn.create_channel().await?;
        declare_on(&channel, cfg).await?;
        Ok::<_, AmqpError>(channel.close(200, "OK".into()).await?)
    }
    .await;
    let _ = conn.close(200, "OK".into()).await;
    result.map_err(unavailable)
}

/// Sums the messages ready in the partition queues (passive declares), or per queue.
pub(super) async fn queue_depths(channel: &Channel, cfg: &AmqpConfig) -> Result<Vec<u64>, lapin::Error> {
    let mut depths = Vec::with_capacity(cfg.partition_count() as usize);
    for p in 0..cfg.partition_count() {
        let q =
            channel.queue_declare(cfg.partition_queue(p).into(), QueueDeclareOptions::durable().passive(), FieldTable::default()).await?;
        depths.push(q.message_count() as u64);
    }
    Ok(depths)
}
