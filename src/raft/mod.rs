//! Replication: openraft glue. A Raft group per partition on the core that
//! owns it, with the partition log as its Raft log.

pub mod rt;

pub use rt::GlommioRuntime;
pub mod store;
pub mod types;
