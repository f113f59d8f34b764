//! Feeds arbitrary bytes to the readers of the small state files a node keeps on disk: the
//! CRC'd state file envelope, a Raft replica's durable state inside it, a replica's applied
//! checkpoint (with its producer table), and the metadata checkpoint. Each refuses bad bytes with an error; none panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::controller::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    let _ = tern::log::state_file::decode(data);
    let _ = tern::raft::store::check_state(data);
    let _ = tern::raft::store::check_checkpoint(data);
    let _ = Checkpoint::decode(data);
    // Past the envelope's CRC too: the same bytes wrapped as a valid state file.
    let mut file = b"TSTA".to_vec();
    file.extend_from_slice(&(data.len() as u32).to_le_bytes());
    file.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    file.extend_from_slice(data);
    if let Ok(payload) = tern::log::state_file::decode(&file) {
        assert_eq!(payload, data);
        let _ = tern::raft::store::check_state(payload);
    }
});
