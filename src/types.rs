//! Newtypes for the ids and positions that cross module boundaries.
//!
//! A bare `u64` could be an offset, a term, a byte position or a count; these types make the
//! compiler tell them apart.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The position of one record in a partition: the first record is offset 0, and every record
/// appended after it takes the next offset. Offsets are never reused. Serialized as the bare
/// number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Offset(pub u64);

impl Offset {
    pub const ZERO: Offset = Offset(0);

    /// The offset `n` records after this one.
    pub fn plus(self, n: u64) -> Offset {
        Offset(self.0 + n)
    }

    /// The offset before this one, or `None` at offset 0.
    pub fn prev(self) -> Option<Offset> {
        self.0.checked_sub(1).map(Offset)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A Raft term (the leader epoch that wrote a batch). Zero until replication stamps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

/// Milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimestampMs(pub i64);

impl TimestampMs {
    /// The wall clock now. A clock before 1970 reads as 0.
    pub fn now() -> TimestampMs {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        TimestampMs(ms)
    }
}

/// An idempotent producer's id, issued by the broker. `ProducerId::NONE` marks batches from
/// producers that did not ask for idempotence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProducerId(pub i64);

impl ProducerId {
    pub const NONE: ProducerId = ProducerId(-1);
}

/// The sequence number of the first record of a batch, per (producer, partition).
/// `Sequence::NONE` when the producer is not idempotent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sequence(pub i32);

impl Sequence {
    pub const NONE: Sequence = Sequence(-1);
}

/// A core executor of this node (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CoreId(pub u32);

impl fmt::Display for CoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A node of the cluster (1 and up; 0 stands for "none" only where the API says so). Its
/// serialized form is the bare number, so stored metadata and Raft memberships read the same
/// as before the type existed.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for NodeId {
    fn from(id: u64) -> Self {
        NodeId(id)
    }
}

impl std::str::FromStr for NodeId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(NodeId)
    }
}

/// Printed as the bare number: lists of nodes read `[1, 2, 3]` in logs and messages.
impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One incarnation of a topic name: a topic deleted and created again is another topic, with
/// other files and other Raft groups. Serialized as the bare number.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct TopicUid(pub u64);

impl fmt::Display for TopicUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The index of an entry in a Raft log (not an offset: one entry is a whole batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RaftIndex(pub u64);

impl fmt::Display for RaftIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The cluster's id: chosen once, when the cluster is bootstrapped, and kept in the metadata
/// (and in `DATA_DIR/cluster.id`). Every call between nodes carries it, and a node refuses
/// calls from another cluster. Empty until this node has learned it.
#[derive(Debug, Default)]
pub struct ClusterId(std::sync::OnceLock<String>);

impl ClusterId {
    /// The id, or `""` while unknown.
    pub fn get(&self) -> &str {
        self.0.get().map_or("", String::as_str)
    }

    /// Learns the id; `Err` with the id already known if it is another one.
    pub fn learn(&self, id: &str) -> Result<(), String> {
        if id.is_empty() {
            return Ok(());
        }
        let known = self.0.get_or_init(|| id.to_string());
        if known == id {
            Ok(())
        } else {
            Err(known.clone())
        }
    }

    /// Whether a call that says it comes from cluster `other` comes from another cluster (an
    /// empty id is a node that does not know its cluster yet: one joining, or one of a cluster
    /// being bootstrapped).
    pub fn foreign(&self, other: &str) -> bool {
        let me = self.get();
        !me.is_empty() && !other.is_empty() && me != other
    }
}
