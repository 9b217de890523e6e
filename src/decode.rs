//! decode: Kafka payloads → validated readings.
//!
//! Invariant: a payload either decodes whole (every reading of a batch is returned, valid or
//! not, in payload order) or fails with a [`DecodeError`]; a reading is usable only after
//! [`validate`] accepts it. Nothing here panics on any input bytes, and nothing is dropped
//! silently: every error maps to a [`DeadLetterReason`] the caller counts and routes.

use serde::{Deserialize, Serialize};

use crate::schema::fast::{self, FastError, Readings};
use crate::schema::{
    Codec, CodecError, DeadLetterReason, Reading, RecordKind, SchemaIds, ShapeError, WireFormat,
    records, unframe_confluent,
};

/// What one message of a reading topic holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadKind {
    /// One `Reading` per message.
    #[default]
    Reading,
    /// One `ReadingBatch` per message.
    Batch,
}

/// A payload that could not be decoded. Final: retrying the same bytes gives the same error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message has no payload")]
    NoPayload,
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("decoded value has the wrong shape: {0}")]
    Shape(#[from] ShapeError),
    #[error("not a valid Avro datum for the writer schema: {0}")]
    Datum(#[from] FastError),
}

impl DecodeError {
    pub fn reason(&self) -> DeadLetterReason {
        DeadLetterReason::Undecodable
    }
}

/// A decoded reading that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidReading {
    #[error("empty node id")]
    EmptyNodeId,
    #[error("no channel values")]
    NoValues,
    #[error("channel `{channel}` has non-finite value {value}")]
    NonFinite { channel: String, value: f64 },
    /// Finite as a double, but beyond what the model's `f32` tensors can hold.
    #[error("channel `{channel}` has value {value}, beyond the f32 range of the model's input")]
    OutOfRange { channel: String, value: f64 },
}

impl InvalidReading {
    pub fn reason(&self) -> DeadLetterReason {
        DeadLetterReason::InvalidValue
    }
}

/// Turns payloads of the reading topics into readings. Datums written with the compiled-in
/// schemas take the direct decoder (`schema::fast`); any other writer schema the generic,
/// resolving one.
#[derive(Debug)]
pub struct Decoder {
    reading: Codec,
    batch: Codec,
    format: WireFormat,
    /// Plain datums of each kind are written with the compiled-in schema.
    plain_fast: (bool, bool),
    /// Confluent ids whose schema is the compiled-in `Reading` / `ReadingBatch`.
    fast_ids: (Vec<u32>, Vec<u32>),
}

impl Decoder {
    /// A decoder for `format`; for plain datums, optional writer schemas that differ from the
    /// compiled-in ones (older producers), and for Confluent framing the schema ids to resolve.
    pub fn new(
        format: WireFormat,
        reading_writer: Option<apache_avro::Schema>,
        batch_writer: Option<apache_avro::Schema>,
        ids: SchemaIds,
    ) -> Self {
        let compiled = |kind: RecordKind, writer: &Option<apache_avro::Schema>| {
            writer
                .as_ref()
                .is_none_or(|w| w.canonical_form() == kind.schema().canonical_form())
        };
        let plain_fast = (
            compiled(RecordKind::Reading, &reading_writer),
            compiled(RecordKind::ReadingBatch, &batch_writer),
        );
        let fast_ids = (
            ids.ids_of(RecordKind::Reading),
            ids.ids_of(RecordKind::ReadingBatch),
        );
        let mut reading = Codec::new(RecordKind::Reading, format).with_schema_ids(ids.clone());
        if let Some(schema) = reading_writer {
            reading = reading.with_plain_writer(schema);
        }
        let mut batch = Codec::new(RecordKind::ReadingBatch, format).with_schema_ids(ids);
        if let Some(schema) = batch_writer {
            batch = batch.with_plain_writer(schema);
        }
        Self {
            reading,
            batch,
            format,
            plain_fast,
            fast_ids,
        }
    }

    /// The datum to decode directly, when its writer schema is the compiled-in one.
    fn fast_datum<'p>(&self, kind: PayloadKind, payload: &'p [u8]) -> Option<&'p [u8]> {
        let (plain, ids) = match kind {
            PayloadKind::Reading => (self.plain_fast.0, &self.fast_ids.0),
            PayloadKind::Batch => (self.plain_fast.1, &self.fast_ids.1),
        };
        match self.format {
            WireFormat::Plain => plain.then_some(payload),
            WireFormat::Confluent => match unframe_confluent(payload) {
                Ok((id, datum)) if ids.contains(&id) => Some(datum),
                _ => None,
            },
        }
    }

    /// Decodes one message payload of a topic carrying `kind`.
    pub fn decode(
        &self,
        kind: PayloadKind,
        payload: Option<&[u8]>,
    ) -> Result<Vec<Reading>, DecodeError> {
        let mut out = Readings::default();
        self.decode_into(kind, payload, &mut out)?;
        Ok(out.into_vec())
    }

    /// [`Decoder::decode`] into `out`, whose memory is reused from one message to the next
    /// (no allocation per reading once warm). `out` holds the message's readings on success
    /// and none on failure.
    pub fn decode_into(
        &self,
        kind: PayloadKind,
        payload: Option<&[u8]>,
        out: &mut Readings,
    ) -> Result<(), DecodeError> {
        out.clear();
        self.decode_append(kind, payload, out)
    }

    /// [`Decoder::decode`], appended to `out` (the consuming loop's path, which gathers the
    /// readings of many messages in one buffer); on failure nothing is appended.
    pub fn decode_append(
        &self,
        kind: PayloadKind,
        payload: Option<&[u8]>,
        out: &mut Readings,
    ) -> Result<(), DecodeError> {
        let payload = payload.ok_or(DecodeError::NoPayload)?;
        if let Some(datum) = self.fast_datum(kind, payload) {
            if datum.is_empty() {
                return Err(CodecError::Avro("empty datum".into()).into());
            }
            match kind {
                PayloadKind::Reading => fast::read_reading_into(datum, out)?,
                PayloadKind::Batch => fast::read_batch_into(datum, out)?,
            }
            return Ok(());
        }
        let decoded = match kind {
            PayloadKind::Reading => {
                let value = self.reading.decode(payload)?;
                vec![Reading::from_value(&value)?]
            }
            PayloadKind::Batch => {
                let value = self.batch.decode(payload)?;
                records::batch_from_value(&value)?
            }
        };
        for reading in decoded {
            out.push(reading);
        }
        Ok(())
    }
}

/// Checks what the schema cannot: a node id, at least one value, and only finite values.
pub fn validate(reading: &Reading) -> Result<(), InvalidReading> {
    if reading.node_id.is_empty() {
        return Err(InvalidReading::EmptyNodeId);
    }
    if reading.values.is_empty() {
        return Err(InvalidReading::NoValues);
    }
    // One pass: NaN, ±inf and finite values beyond the f32 range.
    if let Some((channel, value)) =
        (reading.values.iter()).find(|(_, v)| v.is_nan() || v.abs() > f64::from(f32::MAX))
    {
        let (channel, value) = (channel.clone(), *value);
        return Err(if value.is_finite() {
            InvalidReading::OutOfRange { channel, value }
        } else {
            InvalidReading::NonFinite { channel, value }
        });
    }
    Ok(())
}

/// `[assemble] max_future`: the latest event time accepted, against the wall clock. The limit
/// last computed is kept: the clock only moves forward, so a reading under it is under the
/// limit now too, and the clock is read again only for one that is not (about once per
/// `max_future` in a steady stream, instead of once per message: a clock read cost a few
/// hundred nanoseconds on a virtual machine). Should the wall clock be stepped back, readings
/// up to that step further ahead pass until the kept limit is passed.
#[derive(Debug, Clone)]
pub struct FutureLimit {
    /// 0: no limit.
    max_ms: i64,
    limit_ms: i64,
}

impl FutureLimit {
    /// `max` of zero accepts any event time.
    pub fn new(max: std::time::Duration) -> Self {
        Self {
            max_ms: i64::try_from(max.as_millis()).unwrap_or(i64::MAX),
            limit_ms: i64::MIN,
        }
    }

    /// Whether `event_time_ms` is at most `max` ahead of `now_ms()`, which is called only when
    /// the kept limit does not already say so.
    pub fn allows(&mut self, event_time_ms: i64, now_ms: impl FnOnce() -> i64) -> bool {
        if self.max_ms == 0 || event_time_ms <= self.limit_ms {
            return true;
        }
        self.limit_ms = now_ms().saturating_add(self.max_ms);
        event_time_ms <= self.limit_ms
    }
}

/// Milliseconds since the Unix epoch by the wall clock.
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{frame_confluent, write_datum};
    use apache_avro::Schema;

    #[test]
    fn the_future_limit_reads_the_clock_only_past_the_limit_it_kept() {
        use std::cell::Cell;
        let (now, reads) = (Cell::new(1_000), Cell::new(0));
        let clock = || {
            reads.set(reads.get() + 1);
            now.get()
        };
        use std::time::Duration;
        let mut limit = FutureLimit::new(Duration::from_millis(500));
        assert!(
            limit.allows(1_200, clock),
            "the first reading reads the clock"
        );
        assert!(limit.allows(1_500, clock) && limit.allows(900, clock));
        assert_eq!(
            reads.get(),
            1,
            "under the kept limit of 1500: no clock read"
        );
        assert!(!limit.allows(1_501, clock), "501 ms ahead of the clock");
        assert_eq!(reads.get(), 2, "past the kept limit: read again");
        now.set(2_000);
        assert!(
            limit.allows(2_400, clock),
            "the clock moved on; so did the limit"
        );
        assert_eq!(reads.get(), 3);
        let mut off = FutureLimit::new(Duration::ZERO);
        assert!(off.allows(i64::MAX, || unreachable!("no limit, no clock")));
    }

    fn reading(node: &str, t: i64, values: &[(&str, f64)]) -> Reading {
        Reading {
            node_id: node.into(),
            event_time_ms: t,
            values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            sequence: Some(3),
        }
    }

    fn plain() -> Decoder {
        Decoder::new(WireFormat::Plain, None, None, SchemaIds::default())
    }

    #[test]
    fn reading_round_trips_plain() {
        let r = reading("n1", 1_000, &[("pressure", 4.5), ("temperature", 61.0)]);
        let bytes = write_datum(RecordKind::Reading.schema(), &r.to_value()).unwrap();
        assert_eq!(
            plain().decode(PayloadKind::Reading, Some(&bytes)).unwrap(),
            vec![r]
        );
    }

    #[test]
    fn batch_round_trips_and_keeps_order() {
        let batch = vec![
            reading("b", 2_000, &[("current", 20.0)]),
            reading("a", 1_000, &[("current", f64::NAN)]),
        ];
        let bytes = write_datum(
            RecordKind::ReadingBatch.schema(),
            &records::batch_to_value(&batch),
        )
        .unwrap();
        let decoded = plain().decode(PayloadKind::Batch, Some(&bytes)).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0], batch[0]);
        // The invalid reading is returned so the caller can dead-letter it alone.
        assert!(matches!(
            validate(&decoded[1]),
            Err(InvalidReading::NonFinite { .. })
        ));
    }

    #[test]
    fn values_beyond_f32_are_invalid() {
        let huge = reading("a", 1_000, &[("current", -1e39)]);
        let err = validate(&huge).unwrap_err();
        assert!(matches!(err, InvalidReading::OutOfRange { .. }));
        assert_eq!(err.reason(), DeadLetterReason::InvalidValue);
        assert!(validate(&reading("a", 1_000, &[("current", f64::from(f32::MAX))])).is_ok());
    }

    #[test]
    fn older_writer_schema_resolves_into_current_reader() {
        // Version 0 of Reading had no `sequence` field.
        let v0 = Schema::parse_str(
            r#"{"type":"record","name":"Reading","namespace":"io.gridwatch","fields":[
                {"name":"node_id","type":"string"},
                {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
                {"name":"values","type":{"type":"map","values":"double"}}]}"#,
        )
        .unwrap();
        let value = apache_avro::types::Value::Record(vec![
            (
                "node_id".into(),
                apache_avro::types::Value::String("n7".into()),
            ),
            (
                "event_time".into(),
                apache_avro::types::Value::TimestampMillis(42),
            ),
            (
                "values".into(),
                apache_avro::types::Value::Map(
                    [(
                        "current".to_string(),
                        apache_avro::types::Value::Double(1.5),
                    )]
                    .into(),
                ),
            ),
        ]);
        let bytes = write_datum(&v0, &value).unwrap();
        // Plain: the writer schema is configured.
        let decoder = Decoder::new(
            WireFormat::Plain,
            Some(v0.clone()),
            None,
            SchemaIds::default(),
        );
        let decoded = decoder.decode(PayloadKind::Reading, Some(&bytes)).unwrap();
        assert_eq!(
            decoded,
            vec![Reading {
                node_id: "n7".into(),
                event_time_ms: 42,
                values: vec![("current".into(), 1.5)],
                sequence: None
            }]
        );
        // Confluent: the writer schema is found by id.
        let mut ids = SchemaIds::default();
        ids.insert(11, v0);
        let decoder = Decoder::new(WireFormat::Confluent, None, None, ids);
        let framed = frame_confluent(11, &bytes);
        assert_eq!(
            decoder.decode(PayloadKind::Reading, Some(&framed)).unwrap(),
            decoded
        );
        assert_eq!(
            decoder.decode(PayloadKind::Reading, Some(&frame_confluent(12, &bytes))),
            Err(DecodeError::Codec(CodecError::UnknownSchemaId(12)))
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let decoder = plain();
        let confluent = Decoder::new(WireFormat::Confluent, None, None, SchemaIds::default());
        let cases: [&[u8]; 6] = [
            b"",
            &[0x02],
            &[0xff; 3],
            &[0x02, b'a'],             // string then end of input
            &[0x7f, 0xff, 0xff, 0xff], // absurd length prefix
            b"{\"node_id\": \"json is not avro\"}",
        ];
        for payload in cases {
            for kind in [PayloadKind::Reading, PayloadKind::Batch] {
                assert!(decoder.decode(kind, Some(payload)).is_err(), "{payload:?}");
                assert!(
                    confluent.decode(kind, Some(payload)).is_err(),
                    "{payload:?}"
                );
            }
        }
        assert_eq!(
            decoder.decode(PayloadKind::Reading, None),
            Err(DecodeError::NoPayload)
        );
        // A lone zero byte is a valid, empty batch: nothing to use, nothing lost.
        assert_eq!(decoder.decode(PayloadKind::Batch, Some(&[0])), Ok(vec![]));
    }

    #[test]
    fn trailing_bytes_mean_a_schema_mismatch() {
        let r = reading("n1", 1, &[("current", 1.0)]);
        let mut bytes = write_datum(RecordKind::Reading.schema(), &r.to_value()).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            plain().decode(PayloadKind::Reading, Some(&bytes)),
            Err(DecodeError::Datum(FastError::Trailing(3)))
        );
    }

    #[test]
    fn validation_rejects_empty_and_non_finite() {
        assert_eq!(
            validate(&reading("", 1, &[("a", 1.0)])),
            Err(InvalidReading::EmptyNodeId)
        );
        assert_eq!(
            validate(&reading("n", 1, &[])),
            Err(InvalidReading::NoValues)
        );
        assert!(validate(&reading("n", 1, &[("a", f64::INFINITY)])).is_err());
        assert!(validate(&reading("n", 1, &[("a", -3.0)])).is_ok());
    }
}
