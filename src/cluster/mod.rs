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
pub use topic::{validate_topic_name, TopicSettings, TopicSpec, RECORD_BYTES_MAX, TOPIC_NAME_MAX};
