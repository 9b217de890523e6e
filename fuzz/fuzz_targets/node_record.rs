//! Records of the spatial-node topic (key, then payload) applied to the registry: coordinates
//! of any value, unknown cells and mismatched keys must be errors, never panics.
#![no_main]

use gridwatch::registry::Registry;
use gridwatch::schema::WireFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let registry = Registry::new(h3o::Resolution::Eight, WireFormat::Plain);
    // First byte: key length (0xff: no key); then the key; the rest is the payload.
    let (key, payload) = match data.split_first() {
        Some((&0xff, rest)) => (None, rest),
        Some((&n, rest)) if (n as usize) <= rest.len() => {
            let (k, p) = rest.split_at(n as usize);
            (Some(k), p)
        }
        _ => (None, data),
    };
    let _ = registry.apply(key, Some(payload));
    if let Some(key) = key {
        let _ = registry.apply(Some(key), None);
    }
});
