//! Feeds arbitrary bytes to the batch decoder: it must return an error or a batch whose records
//! iterate cleanly, and never panic.
//!
//! Each input is tried twice: as is, and with its length and CRC fields patched to match, so
//! the fuzzer gets past the checksum and explores the header and record parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::log::batch::{validate, Batch};

fn check(data: &[u8]) {
    let _ = validate(data);
    if let Ok(batch) = Batch::decode(bytes::Bytes::copy_from_slice(data)) {
        let n = batch.records().count();
        assert_eq!(n as u32, batch.record_count());
        for r in batch.records() {
            let _ = r.headers().count();
            let _ = r.expires_at();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= tern::log::batch::HEADER_LEN && data.len() <= u32::MAX as usize {
        let mut b = data.to_vec();
        b[0..3].copy_from_slice(b"TRN");
        b[3] = tern::log::batch::VERSION;
        let len = b.len() as u32;
        b[4..8].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c::crc32c(&b[12..]);
        b[8..12].copy_from_slice(&crc.to_le_bytes());
        check(&b);
    }
});
