//! Consumer and queue groups' committed positions, as the metadata keeps them.

use std::collections::BTreeMap;

use crate::types::{Offset, TopicUid};

/// Groups (per group and topic) the metadata keeps offsets for.
pub const GROUPS_MAX: usize = 10_000;
/// Offsets above a queue group's floor it keeps track of, per partition.
pub const QUEUE_WINDOW_MAX: usize = 10_000;

/// A group's positions on one incarnation of a topic.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupOffsets {
    pub uid: TopicUid,
    /// Written by a queue group (else a stream-mode consumer group).
    pub queue: bool,
    pub partitions: BTreeMap<u32, Cursor>,
}

/// A group's position in one partition.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// The next offset to consume (queue mode: every record below it is settled).
    pub offset: Offset,
    /// Queue mode: settled offsets above `offset`.
    pub settled: Vec<Offset>,
    /// Queue mode: delivery counts of records delivered and not settled.
    pub counts: Vec<(Offset, u32)>,
}
