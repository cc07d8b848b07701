//! Byte layout of one WAL record, as pure functions (no I/O) so the format
//! can be tested byte by byte.
//!
//! # On-disk format
//!
//! The WAL lives in a sled database in [`WalConfig::dir`](crate::WalConfig).
//! It has two trees:
//!
//! * `log`: one entry per record (in liftlog, one record = one group-commit
//!   batch of rides).
//!   * key: the record's sequence number as a `u64` **big-endian**, so sled's
//!     lexicographic key order is sequence order and `range()` scans replay in
//!     order.
//!   * value: a frame:
//!
//! ```text
//! +---------+-------------+--------------+--------------+-------------------+
//! | version | seq         | payload len  | crc32        | payload           |
//! | u8 = 1  | u64 LE      | u32 LE       | u32 LE       | `len` bytes       |
//! +---------+-------------+--------------+--------------+-------------------+
//!   byte 0    bytes 1..9    bytes 9..13    bytes 13..17   bytes 17..17+len
//! ```
//!
//!   The CRC (crc32fast, i.e. CRC-32/ISO-HDLC) covers the 8 seq bytes, the 4
//!   length bytes and the payload, in that order. The version byte is not
//!   covered: it is checked for equality instead, and an unknown version is
//!   rejected before anything else is interpreted. The seq is repeated inside
//!   the frame (it is already the key) so that a value written under the wrong
//!   key, or a key that got garbled, is detected rather than silently replayed
//!   out of order. A frame is valid only if its length is exactly
//!   `HEADER_LEN + len`: a short frame (torn write) and trailing garbage are
//!   both rejected.
//!
//! * `meta`:
//!   * `"checkpoint"` → `u64` LE: every record with `seq <= checkpoint` has
//!     been applied to the tables and may be (and eventually is) deleted.
//!     Absent means 0.
//!
//! There is no stored "next seq": records after the checkpoint are always a
//! contiguous run `checkpoint+1 ..= last`, and the checkpoint never exceeds
//! the last appended record, so the next sequence number is
//! `max(checkpoint, last) + 1` even when every record has been deleted.

use std::fmt;

/// The only frame version this crate reads and writes.
pub const FORMAT_VERSION: u8 = 1;

/// Bytes before the payload: version (1) + seq (8) + len (4) + crc (4).
pub const HEADER_LEN: usize = 1 + 8 + 4 + 4;

const SEQ_AT: usize = 1;
const LEN_AT: usize = 9;
const CRC_AT: usize = 13;

/// A decoded frame borrowing its payload from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub seq: u64,
    pub payload: &'a [u8],
}

/// Why a byte string is not a valid frame. Every variant means "this record
/// and everything after it cannot be trusted".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer bytes than the fixed header: a torn write.
    TooShort { len: usize },
    /// Version byte is not [`FORMAT_VERSION`].
    BadVersion { version: u8 },
    /// The frame length disagrees with the declared payload length
    /// (torn payload or trailing garbage).
    LengthMismatch { declared: u64, actual: u64 },
    /// The stored CRC does not match the recomputed one.
    Checksum { stored: u32, computed: u32 },
    /// Encode side: the payload does not fit a `u32` length field.
    PayloadTooLarge { len: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooShort { len } => {
                write!(f, "frame too short: {len} bytes, header needs {HEADER_LEN}")
            }
            FrameError::BadVersion { version } => {
                write!(f, "unknown frame version {version}, expected {FORMAT_VERSION}")
            }
            FrameError::LengthMismatch { declared, actual } => {
                write!(f, "frame payload length mismatch: header says {declared}, frame holds {actual}")
            }
            FrameError::Checksum { stored, computed } => write!(f, "frame crc mismatch: stored {stored:#010x}, computed {computed:#010x}"),
            FrameError::PayloadTooLarge { len } => {
                write!(f, "payload of {len} bytes exceeds the u32 frame length field")
            }
        }
    }
}

impl std::error::Error for FrameError {}

fn checksum(seq_bytes: &[u8], len_bytes: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(seq_bytes);
    h.update(len_bytes);
    h.update(payload);
    h.finalize()
}

/// Encodes `payload` as the frame for record `seq`.
pub fn encode(seq: u64, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.resize(HEADER_LEN, 0);
    buf.extend_from_slice(payload);
    seal(seq, &mut buf)?;
    Ok(buf)
}

/// Fills in the header of `buf`, whose first [`HEADER_LEN`] bytes are
/// reserved and whose remaining bytes are the payload.
///
/// Exists so a serializer can write straight into the frame buffer
/// (`append_serde`) instead of encoding to a temporary and copying it.
///
/// # Panics
/// Never; a `buf` shorter than the header is reported as `TooShort`.
pub fn seal(seq: u64, buf: &mut [u8]) -> Result<(), FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::TooShort { len: buf.len() });
    }
    let payload_len = buf.len() - HEADER_LEN;
    let len = u32::try_from(payload_len).map_err(|_| FrameError::PayloadTooLarge { len: payload_len })?;
    let (header, payload) = buf.split_at_mut(HEADER_LEN);
    header[0] = FORMAT_VERSION;
    header[SEQ_AT..LEN_AT].copy_from_slice(&seq.to_le_bytes());
    header[LEN_AT..CRC_AT].copy_from_slice(&len.to_le_bytes());
    let crc = checksum(&header[SEQ_AT..LEN_AT], &header[LEN_AT..CRC_AT], payload);
    header[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes and verifies a frame. Does not compare the seq with the key: the
/// caller knows the key.
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, FrameError> {
    if bytes.len() < HEADER_LEN {
        return Err(FrameError::TooShort { len: bytes.len() });
    }
    let version = bytes[0];
    if version != FORMAT_VERSION {
        return Err(FrameError::BadVersion { version });
    }
    let seq_bytes = &bytes[SEQ_AT..LEN_AT];
    let len_bytes = &bytes[LEN_AT..CRC_AT];
    let crc_bytes = &bytes[CRC_AT..HEADER_LEN];
    let declared = u64::from(u32::from_le_bytes(to_array(len_bytes)));
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if declared != actual {
        return Err(FrameError::LengthMismatch { declared, actual });
    }
    let payload = &bytes[HEADER_LEN..];
    let stored = u32::from_le_bytes(to_array(crc_bytes));
    let computed = checksum(seq_bytes, len_bytes, payload);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok(Frame { seq: u64::from_le_bytes(to_array(seq_bytes)), payload })
}

/// Key under which record `seq` is stored in the `log` tree.
pub fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Inverse of [`key`]; `None` for a key that is not 8 bytes (never written by
/// this crate, so it is treated as corruption).
pub fn seq_of_key(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

// Callers pass fixed ranges of exactly N bytes inside a slice whose length
// was already checked against HEADER_LEN, so this cannot panic; it replaces
// `try_into().unwrap()` in library code.
fn to_array<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_exact() {
        let f = encode(0x0102_0304_0506_0708, b"abc").unwrap();
        assert_eq!(f.len(), HEADER_LEN + 3);
        assert_eq!(f[0], 1);
        assert_eq!(&f[1..9], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&f[9..13], &[3, 0, 0, 0]);
        let mut h = crc32fast::Hasher::new();
        h.update(&f[1..13]);
        h.update(b"abc");
        assert_eq!(&f[13..17], &h.finalize().to_le_bytes());
        assert_eq!(&f[17..], b"abc");
    }

    #[test]
    fn roundtrip_including_empty_payload() {
        for payload in [&b""[..], b"x", &[0xAB; 1000][..]] {
            let f = encode(42, payload).unwrap();
            let d = decode(&f).unwrap();
            assert_eq!(d.seq, 42);
            assert_eq!(d.payload, payload);
        }
    }

    #[test]
    fn every_truncation_and_flip_is_rejected() {
        let f = encode(7, b"hello wal").unwrap();
        for i in 0..f.len() {
            assert!(decode(&f[..i]).is_err(), "truncated at {i} accepted");
            for bit in 0..8 {
                let mut g = f.clone();
                g[i] ^= 1 << bit;
                // A flip in the seq field still passes if it is a valid frame
                // for a different seq only when the CRC also matches, which
                // it cannot for a single-bit error.
                assert!(decode(&g).is_err(), "flip byte {i} bit {bit} accepted");
            }
        }
        let mut longer = f.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(FrameError::LengthMismatch { .. })));
    }

    #[test]
    fn specific_errors() {
        assert_eq!(decode(&[]), Err(FrameError::TooShort { len: 0 }));
        let mut f = encode(1, b"p").unwrap();
        f[0] = 2;
        assert_eq!(decode(&f), Err(FrameError::BadVersion { version: 2 }));
        let mut f = encode(1, b"p").unwrap();
        f[17] ^= 0xFF;
        assert!(matches!(decode(&f), Err(FrameError::Checksum { .. })));
    }

    #[test]
    fn keys_sort_in_seq_order() {
        assert!(key(255) < key(256));
        assert!(key(1) < key(u64::MAX));
        assert_eq!(seq_of_key(&key(999)), Some(999));
        assert_eq!(seq_of_key(b"short"), None);
    }
}
