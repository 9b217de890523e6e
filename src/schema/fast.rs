//! A direct decoder for `Reading` and `ReadingBatch` datums written with the compiled-in
//! schemas: bytes to readings without building generic Avro values (the hot path).
//!
//! Invariant: for every byte string, [`read_reading`] and [`read_batch`] return exactly what the
//! generic path (`apache-avro` with the compiled-in schema, then `Reading::from_value`) returns,
//! or fail where it fails (checked by property tests). Every length and count is checked against
//! the bytes left before it is used, so hostile input cannot make it allocate or read beyond the
//! payload. apache-avro stays the schema authority: payloads written with any other writer
//! schema take the generic path, with schema resolution.

use super::records::Reading;

/// Why a datum did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FastError {
    #[error("datum ends early, in {0}")]
    Truncated(&'static str),
    #[error("varint longer than 10 bytes in {0}")]
    BadVarint(&'static str),
    #[error("negative or oversized length {1} in {0}")]
    BadLength(&'static str, i64),
    #[error("invalid UTF-8 in {0}")]
    BadUtf8(&'static str),
    #[error("union index {0} for `sequence` is not 0 (null) or 1 (long)")]
    BadUnion(i64),
    #[error("{0} bytes left over after the datum")]
    Trailing(usize),
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn long(&mut self, what: &'static str) -> Result<i64, FastError> {
        let mut value: u64 = 0;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.buf = &self.buf[i + 1..];
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        if self.buf.len() < 10 {
            Err(FastError::Truncated(what))
        } else {
            Err(FastError::BadVarint(what))
        }
    }

    fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], FastError> {
        let len = self.long(what)?;
        if len < 0 || len as u64 > self.buf.len() as u64 {
            return if len < 0 {
                Err(FastError::BadLength(what, len))
            } else {
                Err(FastError::Truncated(what))
            };
        }
        let (head, tail) = self.buf.split_at(len as usize);
        self.buf = tail;
        Ok(head)
    }

    fn string(&mut self, what: &'static str) -> Result<&'a str, FastError> {
        std::str::from_utf8(self.bytes(what)?).map_err(|_| FastError::BadUtf8(what))
    }

    fn double(&mut self, what: &'static str) -> Result<f64, FastError> {
        let Some((head, tail)) = self.buf.split_first_chunk::<8>() else {
            return Err(FastError::Truncated(what));
        };
        self.buf = tail;
        Ok(f64::from_le_bytes(*head))
    }

    /// The item count of the next block of an array or map; 0 ends it. A negative count is
    /// followed by the block's byte size, which is read and ignored.
    fn block(&mut self, what: &'static str, min_item_bytes: usize) -> Result<usize, FastError> {
        let count = self.long(what)?;
        let count = if count < 0 {
            self.long(what)?;
            count
                .checked_neg()
                .ok_or(FastError::BadLength(what, count))?
        } else {
            count
        };
        // Every item takes at least `min_item_bytes`: a larger count cannot be honest.
        if count as u64 > (self.buf.len() / min_item_bytes.max(1)) as u64 {
            return Err(FastError::BadLength(what, count));
        }
        Ok(count as usize)
    }

    /// Reads one reading into `out`, reusing its strings' and vector's memory: after the first
    /// few messages, decoding allocates nothing.
    fn reading_into(&mut self, out: &mut Reading) -> Result<(), FastError> {
        let node_id = self.string("node_id")?;
        out.node_id.clear();
        out.node_id.push_str(node_id);
        out.event_time_ms = self.long("event_time")?;
        let mut used = 0;
        loop {
            // A map entry is a key (at least its length byte) and an 8-byte double.
            let count = self.block("values", 9)?;
            if count == 0 {
                break;
            }
            for _ in 0..count {
                let raw = self.bytes("values")?;
                // A sensor sends the same channels message after message: a key equal to one
                // the buffer already holds is valid UTF-8 and is neither checked nor copied.
                let held = out.values.iter().position(|(k, _)| k.as_bytes() == raw);
                let fresh = match held {
                    Some(_) => None,
                    None => {
                        Some(std::str::from_utf8(raw).map_err(|_| FastError::BadUtf8("values"))?)
                    }
                };
                let value = self.double("values")?;
                match held {
                    // Avro maps keep the last value of a repeated key, as the generic path does.
                    Some(i) if i < used => out.values[i].1 = value,
                    Some(i) => {
                        out.values.swap(used, i);
                        out.values[used].1 = value;
                        used += 1;
                    }
                    None => {
                        let key = fresh.expect("a key not held was checked above");
                        match out.values.get_mut(used) {
                            Some(entry) => {
                                entry.0.clear();
                                entry.0.push_str(key);
                                entry.1 = value;
                            }
                            None => out.values.push((key.to_owned(), value)),
                        }
                        used += 1;
                    }
                }
            }
        }
        out.values.truncate(used);
        out.values.sort_by(|a, b| a.0.cmp(&b.0));
        out.sequence = match self.long("sequence") {
            // apache-avro reads a union whose index is cut off by the end of the datum as its
            // first branch (null here); so does this decoder, to accept exactly what it accepts.
            Err(FastError::Truncated(_)) => {
                self.buf = &[];
                None
            }
            Err(error) => return Err(error),
            Ok(0) => None,
            Ok(1) => Some(self.long("sequence")?),
            Ok(other) => return Err(FastError::BadUnion(other)),
        };
        Ok(())
    }

    fn finish(&self) -> Result<(), FastError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(FastError::Trailing(n)),
        }
    }
}

/// Decoded readings kept from one message to the next, so that their memory is reused.
#[derive(Debug, Default)]
pub struct Readings {
    items: Vec<Reading>,
    len: usize,
}

impl Readings {
    /// The readings of the last decode.
    pub fn as_slice(&self) -> &[Reading] {
        &self.items[..self.len]
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// How many readings it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` readings; the slots after them stay for later decodes.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The readings of the last decode, owned.
    pub fn into_vec(mut self) -> Vec<Reading> {
        self.items.truncate(self.len);
        self.items
    }

    /// A slot for one more reading, holding whatever an earlier decode left there.
    fn next_slot(&mut self) -> &mut Reading {
        if self.len == self.items.len() {
            self.items.push(Reading::default());
        }
        self.len += 1;
        &mut self.items[self.len - 1]
    }

    /// Appends a reading decoded elsewhere (the generic path).
    pub fn push(&mut self, reading: Reading) {
        *self.next_slot() = reading;
    }
}

/// One `Reading` datum.
pub fn read_reading(datum: &[u8]) -> Result<Reading, FastError> {
    let mut out = Readings::default();
    read_reading_into(datum, &mut out)?;
    Ok(out.items.swap_remove(0))
}

/// One `ReadingBatch` datum.
pub fn read_batch(datum: &[u8]) -> Result<Vec<Reading>, FastError> {
    let mut out = Readings::default();
    read_batch_into(datum, &mut out)?;
    Ok(out.into_vec())
}

/// [`read_reading`], appended to `out` (nothing appended on failure).
pub fn read_reading_into(datum: &[u8], out: &mut Readings) -> Result<(), FastError> {
    read_into(datum, out, |cursor, out| {
        cursor.reading_into(out.next_slot())
    })
}

/// [`read_batch`], appended to `out` (nothing appended on failure).
pub fn read_batch_into(datum: &[u8], out: &mut Readings) -> Result<(), FastError> {
    read_into(datum, out, |cursor, out| {
        loop {
            // A reading takes at least 4 bytes: node id length, event time, map end, union index.
            let count = cursor.block("readings", 4)?;
            if count == 0 {
                return Ok(());
            }
            for _ in 0..count {
                cursor.reading_into(out.next_slot())?;
            }
        }
    })
}

/// Runs `read` over the whole of `datum`, appending to `out`; on failure `out` holds what it
/// held before, not the readings read before the fault.
fn read_into(
    datum: &[u8],
    out: &mut Readings,
    read: impl FnOnce(&mut Cursor<'_>, &mut Readings) -> Result<(), FastError>,
) -> Result<(), FastError> {
    let before = out.len();
    let mut cursor = Cursor { buf: datum };
    let decoded = read(&mut cursor, out).and_then(|()| cursor.finish());
    if decoded.is_err() {
        out.truncate(before);
    }
    decoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{RecordKind, read_datum, records, write_datum};
    use proptest::prelude::*;

    fn generic_reading(bytes: &[u8]) -> Option<Reading> {
        let schema = RecordKind::Reading.schema();
        let value = read_datum(schema, schema, bytes).ok()?;
        Reading::from_value(&value).ok()
    }

    fn generic_batch(bytes: &[u8]) -> Option<Vec<Reading>> {
        let schema = RecordKind::ReadingBatch.schema();
        let value = read_datum(schema, schema, bytes).ok()?;
        records::batch_from_value(&value).ok()
    }

    fn arb_reading() -> impl Strategy<Value = Reading> {
        (
            "[a-z0-9/-]{0,12}",
            any::<i64>(),
            prop::collection::btree_map("[a-z_]{1,10}", any::<f64>(), 0..6),
            any::<Option<i64>>(),
        )
            .prop_map(|(node_id, event_time_ms, values, sequence)| Reading {
                node_id,
                event_time_ms,
                values: values.into_iter().collect(),
                sequence,
            })
    }

    proptest! {
        #[test]
        fn well_formed_datums_decode_like_the_generic_path(readings in prop::collection::vec(arb_reading(), 0..8)) {
            for r in &readings {
                let bytes = write_datum(RecordKind::Reading.schema(), &r.to_value()).unwrap();
                let fast = read_reading(&bytes).unwrap();
                prop_assert!(fast.same_bits(&generic_reading(&bytes).unwrap()));
                prop_assert!(fast.same_bits(r));
            }
            let bytes = write_datum(RecordKind::ReadingBatch.schema(), &records::batch_to_value(&readings)).unwrap();
            let fast = read_batch(&bytes).unwrap();
            let generic = generic_batch(&bytes).unwrap();
            prop_assert_eq!(fast.len(), generic.len());
            prop_assert!(fast.iter().zip(&generic).all(|(a, b)| a.same_bits(b)));
        }

        #[test]
        fn a_reused_buffer_decodes_like_a_fresh_one(
            batches in prop::collection::vec(prop::collection::vec(arb_reading(), 0..6), 1..5),
            garbage in prop::collection::vec(any::<u8>(), 0..32),
        ) {
            // Batches of different sizes, channel sets and node ids, and failed decodes in
            // between, all appended to one buffer, cleared now and then: it holds exactly what
            // fresh decodes of the same datums hold.
            let mut reused = Readings::default();
            for (round, readings) in batches.iter().enumerate() {
                if round % 2 == 0 {
                    reused.clear();
                }
                let before = reused.len();
                let bytes = write_datum(RecordKind::ReadingBatch.schema(), &records::batch_to_value(readings)).unwrap();
                read_batch_into(&bytes, &mut reused).unwrap();
                let fresh = read_batch(&bytes).unwrap();
                prop_assert_eq!(reused.len() - before, fresh.len());
                prop_assert!(reused.as_slice()[before..].iter().zip(&fresh).all(|(a, b)| a.same_bits(b)));
                let before = reused.len();
                if read_batch_into(&garbage, &mut reused).is_err() {
                    prop_assert_eq!(reused.len(), before);
                }
                for r in readings {
                    let bytes = write_datum(RecordKind::Reading.schema(), &r.to_value()).unwrap();
                    read_reading_into(&bytes, &mut reused).unwrap();
                    prop_assert_eq!(reused.len(), before + 1);
                    prop_assert!(reused.as_slice()[before].same_bits(r));
                    reused.truncate(before);
                }
            }
        }

        #[test]
        fn any_bytes_fail_where_the_generic_path_fails(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            match (read_reading(&bytes), generic_reading(&bytes)) {
                (Ok(a), Some(b)) => prop_assert!(a.same_bits(&b)),
                (Err(_), None) => {}
                (fast, generic) => prop_assert!(false, "fast {:?} vs generic {:?}", fast, generic),
            }
            match (read_batch(&bytes), generic_batch(&bytes)) {
                (Ok(a), Some(b)) => prop_assert!(a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.same_bits(y))),
                (Err(_), None) => {}
                (fast, generic) => prop_assert!(false, "fast {:?} vs generic {:?}", fast, generic),
            }
        }

        #[test]
        fn truncations_and_corruptions_of_real_datums_agree(r in arb_reading(), cut in 0usize..200, flip in 0usize..200, bit in 0u8..8) {
            let bytes = write_datum(RecordKind::Reading.schema(), &r.to_value()).unwrap();
            let mut variants = vec![bytes[..cut.min(bytes.len())].to_vec()];
            let mut flipped = bytes.clone();
            if !flipped.is_empty() {
                let i = flip % flipped.len();
                flipped[i] ^= 1 << bit;
            }
            variants.push(flipped);
            for v in variants {
                match (read_reading(&v), generic_reading(&v)) {
                    (Ok(a), Some(b)) => prop_assert!(a.same_bits(&b)),
                    (Err(_), None) => {}
                    (fast, generic) => prop_assert!(false, "{:?}: fast {:?} vs generic {:?}", v, fast, generic),
                }
            }
        }
    }

    #[test]
    fn hostile_lengths_are_errors() {
        // A string claiming 2^62 bytes.
        assert!(read_reading(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
        // A batch claiming a billion readings in four bytes.
        assert!(matches!(
            read_batch(&[0x80, 0xa8, 0xd6, 0xb9, 0x07]),
            Err(FastError::BadLength(..))
        ));
        assert_eq!(read_batch(&[]), Err(FastError::Truncated("readings")));
        assert_eq!(read_batch(&[0]), Ok(vec![]));
    }
}
