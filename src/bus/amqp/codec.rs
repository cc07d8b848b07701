//! A ride on the wire: the message body and properties, and what a delivery must look like
//! to be accepted (see the module doc of [`super`]).

use lapin::message::Delivery;

use crate::domain::RideEvent;
use crate::trace::{AMQP_HEADER, LOG_MAX_BYTES};
use lapin::types::AMQPValue;

/// The `content_type` of a message holding one ride.
pub const CONTENT_TYPE: &str = "application/x-bincode";
/// The `content_type` of a message holding a batch of rides for one partition: a bincode
/// `Vec<RideEvent>`. Its `message_id` is a hash of the body, so a body that changed on the
/// way is refused like a single ride whose id does not match.
pub const CONTENT_TYPE_BATCH: &str = "application/x-liftlog-rides";

/// The message body of a ride: bincode 2, serde, standard configuration.
pub fn encode_event(event: &RideEvent) -> Vec<u8> {
    bincode::serde::encode_to_vec(event, bincode::config::standard()).expect("a RideEvent always encodes")
}

/// Decodes a message body; trailing bytes are an error (a body that merely starts like a
/// ride is not one).
pub fn decode_event(body: &[u8]) -> Result<RideEvent, String> {
    let (event, used): (RideEvent, usize) =
        bincode::serde::decode_from_slice(body, bincode::config::standard()).map_err(|e| e.to_string())?;
    if used != body.len() {
        return Err(format!("{} trailing bytes after the ride", body.len() - used));
    }
    Ok(event)
}

pub(super) fn message_id(id: u64) -> String {
    format!("{id:016x}")
}

/// The body of a batch of rides.
pub fn encode_batch(events: &[RideEvent]) -> Vec<u8> {
    bincode::serde::encode_to_vec(events, bincode::config::standard()).expect("rides always encode")
}

/// Decodes a batch body; trailing bytes and an empty batch are errors.
pub fn decode_batch(body: &[u8]) -> Result<Vec<RideEvent>, String> {
    let (events, used): (Vec<RideEvent>, usize) =
        bincode::serde::decode_from_slice(body, bincode::config::standard()).map_err(|e| e.to_string())?;
    if used != body.len() {
        return Err(format!("{} trailing bytes after the rides", body.len() - used));
    }
    if events.is_empty() {
        return Err("an empty batch".into());
    }
    Ok(events)
}

/// The `message_id` of a batch: its body's hash.
pub(super) fn batch_id(body: &[u8]) -> String {
    message_id(xxhash_rust::xxh3::xxh3_64(body))
}

/// The message header with the publish time, microseconds since the Unix epoch on the
/// writer's clock (`crate::metrics::applied_lag`). Not the AMQP `timestamp` property: that
/// one counts whole seconds.
pub(super) const PUBLISHED_HEADER: &str = "liftlog-published-us";

/// A delivery's header `name`, if it has one.
fn header<'a>(d: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    d.properties.headers().as_ref()?.inner().get(name)
}

/// A delivery's publish time ([`PUBLISHED_HEADER`]), if it has a usable one.
pub(super) fn published_us(d: &Delivery) -> Option<u64> {
    match header(d, PUBLISHED_HEADER)? {
        AMQPValue::LongLongInt(t) => u64::try_from(*t).ok(),
        AMQPValue::LongUInt(t) => Some(u64::from(*t)),
        _ => None,
    }
}

/// The request ids a delivery's header names (see [`crate::trace`]), "" without one. Only
/// logged, so a malformed header is ignored rather than refused: it cannot cost a ride.
pub(super) fn request_ids(d: &Delivery) -> String {
    match header(d, AMQP_HEADER) {
        Some(AMQPValue::LongString(s)) => {
            let s = String::from_utf8_lossy(s.as_bytes());
            // What a writer of ours sends; anything else is not echoed into our logs.
            let ours = s.len() <= LOG_MAX_BYTES && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
            if ours {
                s.into_owned()
            } else {
                String::new()
            }
        }
        _ => String::new(),
    }
}

/// Checks and decodes one delivery (see the module doc for what is accepted): one ride, or
/// a batch. Both formats are read, so writers and consumers can be upgraded in any order.
pub(super) fn check_delivery(d: &Delivery) -> Result<Vec<RideEvent>, String> {
    let ct = d.properties.content_type().as_ref().map(|c| c.as_str());
    if ct == Some(CONTENT_TYPE_BATCH) {
        if let Some(mid) = d.properties.message_id() {
            if mid.as_str() != batch_id(&d.data) {
                return Err(format!("message_id {:?} does not match the batch's hash", mid.as_str()));
            }
        }
        return decode_batch(&d.data);
    }
    if let Some(ct) = ct.filter(|c| *c != CONTENT_TYPE) {
        return Err(format!("content type {ct:?}"));
    }
    let event = decode_event(&d.data)?;
    if let Some(mid) = d.properties.message_id() {
        if mid.as_str() != message_id(event.id) {
            return Err(format!("message_id {:?} does not match the ride id {:016x}", mid.as_str(), event.id));
        }
    }
    Ok(vec![event])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_round_trips_and_refuses_garbage() {
        let e = RideEvent { id: u64::MAX - 3, resort: 9, season: 2025, day: 300, skier: 123_456, time: 359, lift: 40, vertical: 600 };
        assert_eq!(decode_event(&encode_event(&e)).unwrap(), e);
        let mut long = encode_event(&e);
        long.push(0);
        assert!(decode_event(&long).is_err());
        assert!(decode_event(b"not a ride").is_err());
        assert!(decode_event(&[0xff; 3]).is_err());
        assert!(decode_event(&[]).is_err());
        assert_eq!(message_id(255), "00000000000000ff");
    }

    #[test]
    fn batches_round_trip_and_refuse_garbage() {
        let rides: Vec<RideEvent> = (0..300u64)
            .map(|i| RideEvent { id: i, resort: 1, season: 2025, day: 2, skier: i as u32, time: 10, lift: 3, vertical: 30 })
            .collect();
        let body = encode_batch(&rides);
        assert_eq!(decode_batch(&body).unwrap(), rides);
        assert!(body.len() < 300 * 16, "{} bytes for 300 rides", body.len());
        let mut long = body.clone();
        long.push(0);
        assert!(decode_batch(&long).is_err());
        assert!(decode_batch(&encode_batch(&[])).is_err());
        // A single ride's body is not a batch, and the reverse.
        assert!(decode_batch(&encode_event(&rides[7])).is_err());
        assert!(decode_event(&body).is_err());
        assert_eq!(batch_id(&body), batch_id(&encode_batch(&rides)));
    }
}
