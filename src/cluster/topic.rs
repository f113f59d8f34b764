//! A topic's stored description and the validation of its name.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::placement::Placement;
use crate::types::{NodeId, TopicUid};

/// Longest topic name (as Kafka).
pub const TOPIC_NAME_MAX: usize = 249;

/// Checks a topic name: 1 to 249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), ClusterError> {
    let bad = |why: String| Err(ClusterError::InvalidName(why));
    if name.is_empty() {
        return bad("topic name must not be empty".into());
    }
    if name.len() > TOPIC_NAME_MAX {
        return bad(format!(
            "topic name is {} characters; the limit is {TOPIC_NAME_MAX}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return bad("topic name must not be \".\" or \"..\"".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(format!(
            "topic name contains {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Resolved settings of a topic.
/// The largest `max_record_bytes` a new topic may have: 4 MiB less 128 KiB, so that any record
/// (also as a dead letter, which adds up to 64 KiB of headers), with its framing, fits in one
/// response under gRPC's default 4 MiB receive limit (reads hold responses to the client's
/// `max_bytes` record by record, and a record larger than that comes alone).
pub const RECORD_BYTES_MAX: u32 = (4 << 20) - (128 << 10);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicSettings {
    /// `None` keeps records forever.
    pub retention_ms: Option<u64>,
    /// `None`: no size limit.
    pub retention_bytes: Option<u64>,
    /// `None`: fsync before acknowledging (`always`); `Some(ms)`: `interval`.
    pub fsync_interval_ms: Option<u32>,
    pub max_record_bytes: u32,
    pub segment_bytes: u64,
}

/// A topic as stored in the metadata.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    /// This incarnation of the name: a topic deleted and created again is another topic, with
    /// other files and other Raft groups.
    pub uid: TopicUid,
    pub partitions: u32,
    pub replication_factor: u32,
    pub settings: TopicSettings,
    /// The nodes holding each partition's replicas; the first is the preferred leader.
    pub replicas: Vec<Vec<NodeId>>,
    pub created_ms: i64,
    /// Partitions being moved, and the replicas they are moving to. The nodes of both lists
    /// hold the partition until the move finishes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub moving: BTreeMap<u32, Vec<NodeId>>,
    /// Partitions whose replicas changed since the topic was created: a replica of these never
    /// initializes the group from the replica list (the group's log says who its members are).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub moved: BTreeSet<u32>,
    /// Where replicas and leaders go: survival goal, regions, leader regions.
    #[serde(default, skip_serializing_if = "Placement::is_default")]
    pub placement: Placement,
}

impl TopicSpec {
    /// Whether `node` holds (or is receiving) a replica of partition `p`.
    pub fn holds(&self, node: NodeId, p: u32) -> bool {
        self.replicas
            .get(p as usize)
            .is_some_and(|r| r.contains(&node))
            || self.moving.get(&p).is_some_and(|r| r.contains(&node))
    }

    /// The directory (under the data directory's `topics/`) of this incarnation's files.
    pub fn dir_name(&self) -> String {
        format!("{}.{}", self.name, self.uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "orders", "A-b_c.d", "0", &"x".repeat(249)] {
            assert!(validate_topic_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a b", "a/b", "é", &"x".repeat(250), "a\0"] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
    }
}
