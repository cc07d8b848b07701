//! A ride on the wire: the message body and properties, and what a delivery must look like
//! to be accepted (see the module doc of [`super`]).

use lapin::message::Delivery;

use crate::domain::RideEvent;

/// The `content_type` of every ride message.
pub const CONTENT_TYPE: &str = "application/x-bincode";

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

/// Checks and decodes one delivery (see the module doc for what is accepted).
pub(super) fn check_delivery(d: &Delivery) -> Result<RideEvent, String> {
    if let Some(ct) = d.properties.content_type() {
        if ct.as_str() != CONTENT_TYPE {
            return Err(format!("content type {:?}", ct.as_str()));
        }
    }
    let event = decode_event(&d.data)?;
    if let Some(mid) = d.properties.message_id() {
        if mid.as_str() != message_id(event.id) {
            return Err(format!("message_id {:?} does not match the ride id {:016x}", mid.as_str(), event.id));
        }
    }
    Ok(event)
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
}
