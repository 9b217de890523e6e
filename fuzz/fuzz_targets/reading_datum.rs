//! A plain Avro `Reading` datum: the direct decoder must never panic, must accept exactly the bytes
//! apache-avro (the schema authority) accepts, and then give the same reading.
#![no_main]

use gridwatch::schema::{Codec, Reading, RecordKind, WireFormat, fast};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let direct = fast::read_reading(data);
    let codec = Codec::new(RecordKind::Reading, WireFormat::Plain);
    let generic = codec.decode(data).ok().and_then(|v| Reading::from_value(&v).ok());
    // Both ways (schema::fast's invariant): the direct decoder accepts exactly what apache-avro
    // accepts, and gives the same reading.
    match (&generic, &direct) {
        (Some(generic), Ok(direct)) => assert!(generic.same_bits(direct), "{generic:?} != {direct:?}"),
        (None, Err(_)) => {}
        _ => panic!("apache-avro {generic:?} vs direct {direct:?}"),
    }
});
