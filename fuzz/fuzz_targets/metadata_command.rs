//! Feeds arbitrary bytes to the metadata command decoder, as a peer's Propose or a metadata
//! log record would bring them: decoding refuses or yields a command, and applying a decoded
//! command to an empty state and to a populated one never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::cluster::{ClusterState, Command};
use tern::raft::types::{Member, NodeId};

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = Command::decode(data) else {
        return;
    };
    let _ = cmd.validate();
    let mut empty = ClusterState::default();
    empty.apply(cmd.clone());
    // A state with nodes, so moves, removals and placements find targets.
    let mut busy = ClusterState::default();
    for (id, zone) in [(1, "z"), (2, "y"), (3, "x")] {
        busy.apply(Command::RegisterNode {
            id: NodeId(id),
            member: Member {
                addr: format!("n{id}:1"),
                region: "r".into(),
                zone: zone.into(),
                ..Member::default()
            },
        });
    }
    busy.apply(cmd.clone());
    busy.apply(cmd);
});
