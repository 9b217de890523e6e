//! A plain Avro `ReadingBatch` datum: the direct decoder must never panic, must accept exactly the
//! bytes apache-avro accepts, and then give the same readings.
#![no_main]

use gridwatch::schema::{Codec, RecordKind, WireFormat, fast, records};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let direct = fast::read_batch(data);
    let codec = Codec::new(RecordKind::ReadingBatch, WireFormat::Plain);
    let generic = codec
        .decode(data)
        .ok()
        .and_then(|v| records::batch_from_value(&v).ok());
    // Both ways (schema::fast's invariant): the direct decoder accepts exactly what apache-avro
    // accepts, and gives the same readings.
    match (&generic, &direct) {
        (Some(generic), Ok(direct)) => {
            assert_eq!(generic.len(), direct.len());
            for (a, b) in generic.iter().zip(direct) {
                assert!(a.same_bits(b), "{a:?} != {b:?}");
            }
        }
        (None, Err(_)) => {}
        _ => panic!("apache-avro {generic:?} vs direct {direct:?}"),
    }
});
