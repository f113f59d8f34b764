//! Cluster metadata: nodes, topics, their settings and where each partition's replicas live.
//!
//! The metadata is the log of the metadata Raft group (all controller nodes are its voters):
//! each record is a [`Command`], and every node replays the committed commands into the same
//! [`ClusterState`], then reconciles its local partitions with it (see `net/controller.rs`).

mod state;
mod topic;

pub use state::{
    assign_replicas, rebalance, replacement, ClusterState, Command, Cursor, GroupOffsets, Move,
    COMMAND_MAX_BYTES, GROUPS_MAX, PARTITIONS_MAX, QUEUE_WINDOW_MAX, REPLICAS_MAX,
};
pub use topic::{validate_topic_name, TopicSettings, TopicSpec, TOPIC_NAME_MAX};
