//! Tern: a geo-distributed, fault-tolerant message broker.
//!
//! The tree follows a record's path: `net` receives it, `shard` owns it, `raft` replicates it,
//! `log` stores it.

pub mod log;
pub mod types;
