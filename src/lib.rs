//! Tern: a geo-distributed, fault-tolerant message broker.
//!
//! The tree follows a record's path: `net` receives it, `shard` owns it, `raft` replicates it
//! (to come), `log` stores it; `cluster` holds the metadata beside them.

pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod groups;
pub mod log;
pub mod net;
pub mod node;
pub mod proto;
pub mod raft;
pub mod shard;
pub mod types;
