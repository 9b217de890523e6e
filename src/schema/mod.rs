//! Data contracts on the wire: the Avro schemas in `schemas/` (compiled in) and the two framings
//! gridwatch reads and writes.
//!
//! Invariant: no byte of a payload is read before its length has been checked; a short, empty or
//! foreign payload is a [`FramingError`], never a panic. Plain Avro datums carry no schema id, so
//! their writer schema comes from configuration; Confluent-framed datums (magic byte 0, then a
//! 4-byte big-endian schema id) name their writer schema by id, resolved from configuration.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use serde::{Deserialize, Serialize};

pub mod fast;
pub mod records;

pub use records::{
    AnomalyEvent, BeyondBound, Channel, Contributor, Diverged, Flatline, Incident, IncidentStatus,
    Reading, Severity, ShapeError, SpatialNode, Spike,
};

/// Largest allocation a single Avro length prefix may ask for; a hostile payload claiming a
/// gigabyte string fails instead of exhausting memory.
pub const MAX_AVRO_ALLOCATION: usize = 16 * 1024 * 1024;

/// Avro schema text of a single reading.
pub const READING_AVSC: &str = include_str!("../../schemas/reading.avsc");
/// Avro schema text of a gateway batch of readings.
pub const READING_BATCH_AVSC: &str = include_str!("../../schemas/reading_batch.avsc");
/// Avro schema text of a spatial node record.
pub const SPATIAL_NODE_AVSC: &str = include_str!("../../schemas/spatial_node.avsc");
/// Avro schema text of an anomaly event.
pub const ANOMALY_EVENT_AVSC: &str = include_str!("../../schemas/anomaly_event.avsc");

/// Magic byte that opens a Confluent-framed message.
pub const CONFLUENT_MAGIC: u8 = 0;
/// Length of the Confluent header: magic byte plus 4-byte schema id.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// The record types gridwatch exchanges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Reading,
    ReadingBatch,
    SpatialNode,
    AnomalyEvent,
}

impl RecordKind {
    /// The compiled-in (reader) schema of this record type.
    pub fn schema(self) -> &'static Schema {
        static SCHEMAS: OnceLock<[Schema; 4]> = OnceLock::new();
        let all = SCHEMAS.get_or_init(|| {
            [
                READING_AVSC,
                READING_BATCH_AVSC,
                SPATIAL_NODE_AVSC,
                ANOMALY_EVENT_AVSC,
            ]
            .map(|text| Schema::parse_str(text).expect("compiled-in schemas are valid Avro"))
        });
        &all[self as usize]
    }
}

/// How payloads are framed on a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFormat {
    /// A bare Avro binary datum; the writer schema is configured.
    #[default]
    Plain,
    /// Confluent Schema Registry framing: `0x00`, 4-byte schema id, Avro datum.
    Confluent,
}

/// Why a payload's framing could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("empty payload")]
    Empty,
    #[error("payload of {len} bytes is shorter than the 5-byte Confluent header")]
    Short { len: usize },
    #[error("payload starts with byte {found:#04x}, not the Confluent magic byte 0x00")]
    BadMagic { found: u8 },
}

/// Splits a Confluent-framed payload into schema id and Avro datum.
pub fn unframe_confluent(payload: &[u8]) -> Result<(u32, &[u8]), FramingError> {
    match payload {
        [] => Err(FramingError::Empty),
        [magic, ..] if *magic != CONFLUENT_MAGIC => Err(FramingError::BadMagic { found: *magic }),
        [_, a, b, c, d, datum @ ..] => Ok((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        short => Err(FramingError::Short { len: short.len() }),
    }
}

/// Prepends the Confluent header for `schema_id` to `datum`.
pub fn frame_confluent(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + datum.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// Why a message or a reading was dead-lettered: the value of the `gridwatch.reason` header and
/// the `reason` label of the dead-letter counter. A closed set, so metric labels stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadLetterReason {
    /// The payload is not a valid datum of the configured schema and framing.
    Undecodable,
    /// A value is NaN or infinite, or the reading carries no value at all.
    InvalidValue,
    /// The node is not (or no longer) on the spatial-node topic.
    UnknownNode,
    /// The reading's step had already closed when it arrived.
    Late,
    /// The cell already holds the model's maximum number of nodes.
    CellFull,
    /// The reading would open a cell beyond `[assemble] max_cells`.
    CellLimit,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 6] = [
        DeadLetterReason::Undecodable,
        DeadLetterReason::InvalidValue,
        DeadLetterReason::UnknownNode,
        DeadLetterReason::Late,
        DeadLetterReason::CellFull,
        DeadLetterReason::CellLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::Undecodable => "undecodable",
            DeadLetterReason::InvalidValue => "invalid_value",
            DeadLetterReason::UnknownNode => "unknown_node",
            DeadLetterReason::Late => "late",
            DeadLetterReason::CellFull => "cell_full",
            DeadLetterReason::CellLimit => "cell_limit",
        }
    }
}

/// Names of the headers every dead-letter record carries.
pub mod dead_letter_headers {
    /// One of [`super::DeadLetterReason::as_str`].
    pub const REASON: &str = "gridwatch.reason";
    /// Human-readable detail of the error.
    pub const ERROR: &str = "gridwatch.error";
    pub const SOURCE_TOPIC: &str = "gridwatch.source.topic";
    pub const SOURCE_PARTITION: &str = "gridwatch.source.partition";
    pub const SOURCE_OFFSET: &str = "gridwatch.source.offset";
    /// Index of the reading within a `ReadingBatch`; absent for whole messages.
    pub const BATCH_INDEX: &str = "gridwatch.source.batch_index";
}

/// Why a payload could not be turned into an Avro value, or a value into a payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("unknown Confluent schema id {0}; add it to the configured schema ids")]
    UnknownSchemaId(u32),
    #[error("not a valid Avro datum for the writer schema: {0}")]
    Avro(String),
    #[error("{0} bytes left over after the datum: the writer schema does not match the payload")]
    TrailingBytes(usize),
}

/// Reads one Avro binary datum written with `writer`, resolved into `reader`. Every byte of
/// `datum` must belong to the value.
pub fn read_datum(writer: &Schema, reader: &Schema, datum: &[u8]) -> Result<Value, CodecError> {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    LIMIT.get_or_init(|| apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION));
    if datum.is_empty() {
        return Err(CodecError::Avro("empty datum".into()));
    }
    let mut cursor = std::io::Cursor::new(datum);
    let builder = GenericDatumReader::builder(writer);
    let datum_reader = if std::ptr::eq(writer, reader) {
        builder.build()
    } else {
        builder.reader_schema(reader).build()
    }
    .map_err(|e| CodecError::Avro(e.to_string()))?;
    let value = datum_reader
        .read_value(&mut cursor)
        .map_err(|e| CodecError::Avro(e.to_string()))?;
    let left = datum.len() - cursor.position() as usize;
    if left > 0 {
        return Err(CodecError::TrailingBytes(left));
    }
    Ok(value)
}

/// Writes one Avro binary datum of `schema`.
pub fn write_datum(schema: &Schema, value: &Value) -> Result<Vec<u8>, CodecError> {
    let writer = GenericDatumWriter::builder(schema)
        .build()
        .map_err(|e| CodecError::Avro(e.to_string()))?;
    let mut out = Vec::new();
    writer
        .write_value_ref(&mut out, value)
        .map_err(|e| CodecError::Avro(e.to_string()))?;
    Ok(out)
}

/// Reads and writes one record type in one wire format.
#[derive(Debug)]
pub struct Codec {
    kind: RecordKind,
    format: WireFormat,
    /// Writer schema of plain datums (the compiled-in schema unless configured).
    plain_writer: Option<Schema>,
    ids: SchemaIds,
    /// Schema id written in front of encoded Confluent payloads.
    write_id: u32,
}

impl Codec {
    /// A codec whose writer schema is the compiled-in one.
    pub fn new(kind: RecordKind, format: WireFormat) -> Self {
        Self {
            kind,
            format,
            plain_writer: None,
            ids: SchemaIds::default(),
            write_id: 1,
        }
    }

    /// Plain datums were written with `schema` (an older or newer version of the record).
    pub fn with_plain_writer(mut self, schema: Schema) -> Self {
        self.plain_writer = Some(schema);
        self
    }

    /// Confluent schema ids this codec resolves when reading.
    pub fn with_schema_ids(mut self, ids: SchemaIds) -> Self {
        self.ids = ids;
        self
    }

    /// The schema id put in front of Confluent payloads this codec writes.
    pub fn with_write_id(mut self, id: u32) -> Self {
        self.write_id = id;
        self
    }

    /// Decodes a payload into a value of the compiled-in (reader) schema.
    pub fn decode(&self, payload: &[u8]) -> Result<Value, CodecError> {
        let reader = self.kind.schema();
        match self.format {
            WireFormat::Plain => {
                let writer = self.plain_writer.as_ref().unwrap_or(reader);
                read_datum(writer, reader, payload)
            }
            WireFormat::Confluent => {
                let (id, datum) = unframe_confluent(payload)?;
                let writer = self.ids.get(id).ok_or(CodecError::UnknownSchemaId(id))?;
                read_datum(writer, reader, datum)
            }
        }
    }

    /// Encodes a value of the compiled-in schema.
    pub fn encode(&self, value: &Value) -> Result<Vec<u8>, CodecError> {
        let datum = write_datum(self.kind.schema(), value)?;
        Ok(match self.format {
            WireFormat::Plain => datum,
            WireFormat::Confluent => frame_confluent(self.write_id, &datum),
        })
    }
}

/// Writer schemas known by Confluent schema id, loaded from the files configuration names.
#[derive(Debug, Default, Clone)]
pub struct SchemaIds {
    by_id: BTreeMap<u32, Schema>,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaLoadError {
    #[error("cannot read schema file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("schema file {path} is not valid Avro: {source}")]
    Parse {
        path: String,
        source: Box<apache_avro::Error>,
    },
}

/// Reads and parses one `.avsc` file.
pub fn load_schema_file(path: &Path) -> Result<Schema, SchemaLoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| SchemaLoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Schema::parse_str(&text).map_err(|source| SchemaLoadError::Parse {
        path: path.display().to_string(),
        source: Box::new(source),
    })
}

impl SchemaIds {
    /// Loads every `id -> file` pair.
    pub fn load(files: &BTreeMap<u32, std::path::PathBuf>) -> Result<Self, SchemaLoadError> {
        let by_id = files
            .iter()
            .map(|(id, path)| Ok((*id, load_schema_file(path)?)))
            .collect::<Result<_, SchemaLoadError>>()?;
        Ok(Self { by_id })
    }

    pub fn insert(&mut self, id: u32, schema: Schema) {
        self.by_id.insert(id, schema);
    }

    pub fn get(&self, id: u32) -> Option<&Schema> {
        self.by_id.get(&id)
    }

    /// The ids whose schema is `kind`'s compiled-in schema (same canonical form).
    pub fn ids_of(&self, kind: RecordKind) -> Vec<u32> {
        let canonical = kind.schema().canonical_form();
        self.by_id
            .iter()
            .filter(|(_, schema)| schema.canonical_form() == canonical)
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiled_in_schemas_parse() {
        for kind in [
            RecordKind::Reading,
            RecordKind::ReadingBatch,
            RecordKind::SpatialNode,
            RecordKind::AnomalyEvent,
        ] {
            assert!(matches!(kind.schema(), Schema::Record(_)), "{kind:?}");
        }
    }

    #[test]
    fn events_round_trip_with_and_without_an_incident_flatlines_spikes_or_divergences() {
        let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain);
        let mut event = AnomalyEvent::sample("line-1", 16_000);
        for incident in [
            None,
            Some(Incident {
                incident_id: "i".into(),
                status: IncidentStatus::Close,
                opened_at_ms: 12_000,
                windows: 3,
                peak_score: 40.0,
            }),
        ] {
            event.incident = incident;
            let bytes = codec.encode(&event.to_value()).unwrap();
            let back = AnomalyEvent::from_value(&codec.decode(&bytes).unwrap()).unwrap();
            assert_eq!(back, event);
        }
        let round_trip = |event: &AnomalyEvent| {
            let bytes = codec.encode(&event.to_value()).unwrap();
            AnomalyEvent::from_value(&codec.decode(&bytes).unwrap()).unwrap()
        };
        event.flatlined = vec![Flatline {
            node_id: "n".into(),
            channel: "current".into(),
            value: 3.25,
        }];
        assert_eq!(round_trip(&event), event);
        event.spikes = vec![Spike {
            node_id: "n".into(),
            channel: "current".into(),
            at_ms: 9_000,
            value: 80.5,
            before: 20.0,
            after: 21.5,
        }];
        assert_eq!(round_trip(&event), event);
        event.diverged = vec![Diverged {
            node_id: "n".into(),
            channel: "speed".into(),
            level: -14.5,
            usual: 2.0,
            deviation: 1.25,
        }];
        assert_eq!(round_trip(&event), event);
        let beyond = |value, bound| {
            vec![BeyondBound {
                node_id: "n".into(),
                channel: "speed".into(),
                value,
                bound,
            }]
        };
        event.below_floor = beyond(21.5, 58.0);
        assert_eq!(round_trip(&event), event);
        event.above_ceiling = beyond(81.5, 68.0);
        assert_eq!(round_trip(&event), event);
    }

    #[test]
    fn an_event_written_before_peak_at_existed_reads_as_none() {
        // The event schema as it was before contributors had `peak_at`.
        let mut json: serde_json::Value = serde_json::from_str(ANOMALY_EVENT_AVSC).unwrap();
        let contributors = (json["fields"].as_array_mut().unwrap().iter_mut())
            .find(|f| f["name"] == "contributors")
            .unwrap();
        let fields = contributors["type"]["items"]["fields"]
            .as_array_mut()
            .unwrap();
        fields.retain(|f| f["name"] != "peak_at");
        let old = Schema::parse_str(&json.to_string()).unwrap();
        let mut value = AnomalyEvent::sample("line-1", 16_000).to_value();
        if let Value::Record(fields) = &mut value {
            for (name, field) in fields.iter_mut() {
                if let (true, Value::Array(items)) = (name == "contributors", field) {
                    for item in items {
                        if let Value::Record(c) = item {
                            c.retain(|(n, _)| n != "peak_at");
                        }
                    }
                }
            }
        }
        let bytes = write_datum(&old, &value).unwrap();
        let codec = Codec::new(RecordKind::AnomalyEvent, WireFormat::Plain).with_plain_writer(old);
        let event = AnomalyEvent::from_value(&codec.decode(&bytes).unwrap()).unwrap();
        assert_eq!(event.contributors[0].peak_at_ms, None);
        assert_eq!(event.contributors[0].node_id, "n1");
    }

    #[test]
    fn confluent_round_trip() {
        let framed = frame_confluent(0x01020304, b"datum");
        assert_eq!(&framed[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(unframe_confluent(&framed), Ok((0x01020304, &b"datum"[..])));
        // A header with an empty datum is well-framed; the Avro decoder judges the datum.
        assert_eq!(unframe_confluent(&[0, 0, 0, 0, 9]), Ok((9, &b""[..])));
    }

    #[test]
    fn confluent_rejects_empty_short_and_foreign_payloads() {
        assert_eq!(unframe_confluent(&[]), Err(FramingError::Empty));
        for len in 1..CONFLUENT_HEADER_LEN {
            let payload = vec![0u8; len];
            assert_eq!(
                unframe_confluent(&payload),
                Err(FramingError::Short { len })
            );
        }
        assert_eq!(
            unframe_confluent(&[7, 0, 0, 0, 1, 2]),
            Err(FramingError::BadMagic { found: 7 })
        );
    }
}
