//! Replication: openraft glue. A Raft group per partition on the core that owns it, with the
//! partition log as its Raft log.
//!
//! ```text
//! raft/
//!   rt.rs         openraft's runtime on glommio
//!   types.rs      the type configuration of a group (entries are record batches)
//!   group.rs      a group's configuration and start
//!   store/        the log storage and state machine over the partition log
//!   election.rs   when a follower starts an election (pure)
//!   early.rs      a follower's commit learned from its leader's durable reports (pure)
//!   network.rs    a group's calls to its peers, and a peer's message on its core
//!   transport.rs  every group's messages to a peer, batched over one connection
//!   wire.rs       Raft messages on the wire
//!   producers.rs  idempotent producers' committed batches
//!   error.rs      RaftError
//! ```

pub mod early;
pub mod election;
mod error;
pub mod group;
pub mod network;
pub mod producers;
pub mod rt;
pub mod store;
pub mod transport;
mod turns;
pub mod types;
pub mod wire;

pub use error::RaftError;
pub use group::{PartitionGroup, Timing};
pub use rt::GlommioRuntime;
pub use store::CHECKPOINT_ENTRIES;
