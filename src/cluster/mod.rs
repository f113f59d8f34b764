//! The cluster metadata, as a pure model: commands, the state they build, and the decisions
//! taken from it (where replicas go, how to rebalance, what a node opens and closes, how a
//! node is drained). No I/O, no tokio, no tonic: `controller` runs it.
//!
//! The metadata is the log of the metadata Raft group (the controllers are its voters): each
//! record is a [`Command`], and every node replays the committed commands into the same
//! [`ClusterState`].
//!
//! ```text
//! cluster/
//!   command.rs    the commands, validated and bounded
//!   state.rs      ClusterState and how a command applies
//!   topic.rs      a topic's stored description, name rules
//!   offsets.rs    groups' committed positions
//!   placement.rs  replica lists of a new topic; who takes over a replica
//!   balance.rs    rebalancing moves
//!   plan.rs       a node's reconcile diff, a drain's next steps, the metadata group's members
//!   security.rs   users, ACLs and quotas; who may do what
//!   health.rs     when a partition is under-replicated
//!   error.rs      ClusterError
//! ```

mod balance;
mod command;
mod error;
pub mod health;
mod offsets;
mod placement;
pub mod plan;
pub mod security;
mod state;
#[cfg(test)]
pub(crate) mod testkit;
mod topic;

pub use balance::{rebalance, Move};
pub use command::{Command, COMMAND_MAX_BYTES, PARTITIONS_MAX, REGIONS_MAX, REPLICAS_MAX};
pub use error::ClusterError;
pub use offsets::{Cursor, GroupOffsets, GROUPS_MAX, QUEUE_WINDOW_MAX};
pub use placement::{assign_replicas, replacement, Placement, Survival};
pub use security::valid_cluster_id;
pub use state::ClusterState;
pub use topic::{
    validate_topic_name, Cut, MirrorOf, Promotion, TopicSettings, TopicSpec, RECORD_BYTES_MAX,
    TOPIC_NAME_MAX,
};

/// An idempotent producer's id: the metadata offset of the command that allocated it, plus
/// one, with 22 bits of a hash of the cluster's id above bit 40. Ids of two clusters then
/// differ (a promoted mirror carries its source cluster's producers, whose retries it must
/// recognise, beside producers of its own cluster); they stay below 2^62.
pub fn producer_id(cluster_id: &str, at: crate::types::Offset) -> u64 {
    // FNV-1a.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in cluster_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let tag = (h & ((1 << 22) - 1)) | 1;
    (tag << 40) | ((at.0 + 1) & ((1 << 40) - 1))
}

#[cfg(test)]
mod producer_id_tests {
    use super::producer_id;
    use crate::types::Offset;

    #[test]
    fn ids_differ_between_clusters_and_stay_in_range() {
        let a = producer_id("6f1c2a7e-0000-4000-8000-000000000001", Offset(7));
        let b = producer_id("6f1c2a7e-0000-4000-8000-000000000002", Offset(7));
        assert_ne!(a, b);
        assert_ne!(a, 0);
        assert!(a < 1 << 62 && b < 1 << 62);
        assert_eq!(a & ((1 << 40) - 1), 8);
        assert_ne!(
            producer_id("x", Offset(1)),
            producer_id("x", Offset(2)),
            "ids of one cluster differ by offset"
        );
    }
}
