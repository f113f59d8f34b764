//! A topic's stored description and the validation of its name.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use super::placement::Placement;
use crate::types::{NodeId, Offset, TopicUid};

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
    /// Set on a mirror topic: the source it copies (read-only to producers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorOf>,
    /// Set once a mirror's promotion began, and kept: where each partition's copied log ends
    /// (a replica that was a mirror's is converted there when it next opens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promotion: Option<Promotion>,
}

/// A mirror's promotion: its replicas stopped pulling; then, once they agreed, the cut of
/// each partition.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Promotion {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuts: Option<Vec<Cut>>,
}

/// Where a promoted mirror's partition ends: the offset after its last copied record, and
/// the source's Raft stamps (term, index) of the batch that ends there ((0, 0) when none was
/// copied). Every replica continues its log from exactly this point.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cut {
    pub end: Offset,
    pub term: u64,
    pub index: u64,
    /// The partition's replicas when it was cut: the voters of the group it becomes.
    pub replicas: Vec<NodeId>,
}

/// The topic a mirror follows, in this cluster or another.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MirrorOf {
    pub topic: String,
    /// Nodes of the source's cluster, tried in turn.
    pub addresses: Vec<String>,
    /// The source topic's identity when the mirror was created (none from a source too old to
    /// say): a topic created again under its name is another, and is not copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_uid: Option<std::num::NonZeroU64>,
}

/// Most source addresses a mirror names.
pub const MIRROR_ADDRESSES_MAX: usize = 16;

impl MirrorOf {
    /// Checks the source: a valid topic name and 1 to [`MIRROR_ADDRESSES_MAX`] addresses of 1 to
    /// 255 printable characters.
    pub fn validate(&self) -> Result<(), ClusterError> {
        validate_topic_name(&self.topic)?;
        if self.addresses.is_empty() || self.addresses.len() > MIRROR_ADDRESSES_MAX {
            return Err(ClusterError::InvalidName(format!(
                "a mirror names 1 to {MIRROR_ADDRESSES_MAX} addresses of its source's nodes; \
                 {} given",
                self.addresses.len()
            )));
        }
        if let Some(a) = self.addresses.iter().find(|a| {
            a.is_empty() || a.len() > 255 || a.chars().any(|c| c.is_whitespace() || c.is_control())
        }) {
            return Err(ClusterError::InvalidName(format!(
                "mirror source address {a:?}: expected host:port (1 to 255 characters, no spaces)"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for MirrorOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.topic, self.addresses.join(","))
    }
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
