//! Tern: a geo-distributed, fault-tolerant message broker.
//!
//! The tree follows a record's path: `net` receives it, `broker` routes it to the core that
//! owns its partition (or the node that leads it), `shard` owns it on that core, `raft`
//! replicates it, `log` stores it. Beside the path: `cluster` (the metadata model, pure),
//! `mirror` (mirror topics' pulls from their sources), `controller` (the metadata group at run
//! time), `groups` (consumer and queue groups), `node` (wiring) and `cli`. `metrics` holds the
//! counters the data path bumps, and `admin` serves them with the health endpoints. Imports point down this order only (checked by
//! `tests/layering.rs`):
//!
//! ```text
//! types, proto, metrics → tls → log → raft → shard → cluster → config → broker → mirror
//!   → controller → groups → net → admin → node → cli
//! ```

pub mod admin;
pub mod broker;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod groups;
pub mod log;
pub mod metrics;
pub mod mirror;
pub mod net;
pub mod node;
pub mod proto;
pub mod raft;
pub mod shard;
pub mod tls;
pub mod types;
