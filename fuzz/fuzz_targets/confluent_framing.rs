//! Confluent-framed payloads (magic byte, schema id, datum) through the reading decoder, as
//! both topic kinds, with ids for the compiled-in schemas (direct path) and for schemas that
//! take the resolving path: errors are fine, panics are not.
#![no_main]

use std::sync::LazyLock;

use gridwatch::decode::{Decoder, PayloadKind};
use gridwatch::schema::{RecordKind, SchemaIds, WireFormat, unframe_confluent};
use libfuzzer_sys::fuzz_target;

static DECODER: LazyLock<Decoder> = LazyLock::new(|| {
    let mut ids = SchemaIds::default();
    ids.insert(1, RecordKind::Reading.schema().clone());
    ids.insert(2, RecordKind::ReadingBatch.schema().clone());
    // A writer schema that differs from the compiled-in one (version 0 of `Reading`, without
    // `sequence`): the resolving path.
    let older = apache_avro_schema();
    ids.insert(3, older);
    Decoder::new(WireFormat::Confluent, None, None, ids)
});

fn apache_avro_schema() -> apache_avro::Schema {
    apache_avro::Schema::parse_str(
        r#"{"type":"record","name":"Reading","namespace":"io.gridwatch","fields":[
            {"name":"node_id","type":"string"},
            {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"values","type":{"type":"map","values":"double"}}]}"#,
    )
    .expect("schema")
}

fuzz_target!(|data: &[u8]| {
    let _ = unframe_confluent(data);
    let _ = DECODER.decode(PayloadKind::Reading, Some(data));
    let _ = DECODER.decode(PayloadKind::Batch, Some(data));
});
