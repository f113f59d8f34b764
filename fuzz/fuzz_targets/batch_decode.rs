//! Feeds arbitrary bytes to the batch decoder: it must return an error or a batch whose records
//! iterate cleanly, and never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::log::batch::{validate, Batch};

fuzz_target!(|data: &[u8]| {
    let _ = validate(data);
    if let Ok(batch) = Batch::decode(bytes::Bytes::copy_from_slice(data)) {
        let n = batch.records().count();
        assert_eq!(n as u32, batch.record_count());
        for r in batch.records() {
            let _ = r.headers().count();
        }
    }
});
