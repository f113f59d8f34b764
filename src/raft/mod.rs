//! Replication: openraft glue. A Raft group per partition on the core that owns it, with the
//! partition log as its Raft log.

pub mod election;
mod error;
pub mod group;
pub mod network;
pub mod producers;
pub mod rt;
pub mod store;
pub mod transport;
pub mod types;
pub mod wire;

pub use error::RaftError;
pub use group::{PartitionGroup, Timing};
pub use rt::GlommioRuntime;
