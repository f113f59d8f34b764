//! The openraft type configuration of a partition's Raft group.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::rt::GlommioRuntime;
use crate::log::Batch;

pub use crate::types::NodeId;

/// What the cluster knows of a node: where to reach it and where it stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// host:port of its internal (and public) gRPC endpoint.
    pub addr: String,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    /// Addresses this node advertises to nodes and clients of other regions (by region), as
    /// Kafka's advertised listeners per network: traffic from such a region goes through its
    /// gateway (or, in the WAN simulator, its delaying proxy). Others use `addr`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub region_addrs: std::collections::BTreeMap<String, String>,
}

impl Member {
    /// The address a node or client in `region` reaches this node at.
    pub fn addr_for(&self, region: &str) -> &str {
        self.region_addrs.get(region).unwrap_or(&self.addr)
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if !self.region.is_empty() || !self.zone.is_empty() {
            write!(f, " ({}/{})", self.region, self.zone)?;
        }
        Ok(())
    }
}

/// The application data of a Raft entry: one record batch. On the leader it arrives unstamped
/// from the broker; the log stamps offsets, term and Raft index into it as it is written, and
/// that stamped form is what followers receive and store (byte for byte the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryBatch(pub Batch);

impl fmt::Display for EntryBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch({} records, {} bytes)",
            self.0.record_count(),
            self.0.len()
        )
    }
}

impl Serialize for EntryBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0.bytes())
    }
}

impl<'de> Deserialize<'de> for EntryBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<u8> = serde::Deserialize::deserialize(d)?;
        Batch::decode(Bytes::from(v))
            .map(EntryBatch)
            .map_err(serde::de::Error::custom)
    }
}

/// What applying a normal entry answers its proposer: the offsets its records got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryOffsets {
    /// Offset of the first record.
    pub base: u64,
    /// One past the last record.
    pub end: u64,
}

openraft::declare_raft_types!(
    /// The Raft types of a partition group (and, later, of the metadata group).
    pub PartitionRaft:
        D = EntryBatch,
        R = EntryOffsets,
        NodeId = NodeId,
        Node = Member,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
        AsyncRuntime = GlommioRuntime,
);

pub type LogId = openraft::alias::LogIdOf<PartitionRaft>;
pub type Vote = openraft::alias::VoteOf<PartitionRaft>;
pub type Entry = openraft::alias::EntryOf<PartitionRaft>;
pub type Payload = openraft::alias::EntryPayloadOf<PartitionRaft>;
pub type Membership = openraft::Membership<NodeId, Member>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<PartitionRaft>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<PartitionRaft>;

/// A log id from its term and index.
pub fn log_id(term: u64, index: u64) -> LogId {
    LogId::new_term_index(term, index)
}
