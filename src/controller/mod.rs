//! The metadata group at run time, on every node: proposes metadata commands, follows the
//! committed metadata log, keeps the node's partitions in line with it, and carries out moves
//! and removals. The decisions themselves are pure functions in `cluster`.
//!
//! ```text
//! CreateTopic (any node) ── propose ──▶ metadata leader (local core 0, or Peer.Propose to it)
//!                                        │ committed by a quorum of controllers
//! every node: follower ── long-poll Fetch on the metadata log ──▶ ClusterState.apply
//!                                        └─▶ reconcile: open / close partitions on its cores
//! every node: mover ── moves it leads; on the metadata leader, members and drains
//! ```
//!
//! The metadata group is an ordinary partition (key [`PartitionKey::metadata`], on core 0)
//! whose records are JSON commands; every node replays them into the same state.
//!
//! ```text
//! controller/
//!   mod.rs        start: open the metadata group, follow it, register
//!   propose.rs    commands through the leader; waiting for them to apply here
//!   register.rs   this node's registration
//!   follower.rs   applying the committed metadata
//!   reconcile.rs  opening and closing this node's partitions
//!   mover.rs      moves, the metadata group's members, drains
//!   pinning.rs    leader pinning: leadership back to the preferred regions
//!   topics.rs     create and delete topics
//!   admin.rs      move, remove-node, rebalance
//!   security.rs   users, ACLs and quotas
//!   error.rs      ControllerError
//! ```

mod admin;
pub mod checkpoint;
mod error;
mod follower;
mod mover;
mod pinning;
mod promote;
mod propose;
mod reconcile;
mod register;
mod security;
mod topics;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use admin::{move_partition, rebalance, remove_node, REBALANCE_MOVES_MAX};
pub use error::{ControllerError, Result};
pub use promote::promote_topic;
pub use propose::{
    handle_propose, no_metadata_leader, propose, propose_local, wait_applied, wait_metadata_leader,
};
pub use security::{change_acl, create_user, delete_user, set_quota};
pub use topics::{create_topic, delete_topic, NewTopic};

use crate::broker::Broker;
use crate::cluster::TopicSettings;
use crate::raft::types::{Member, NodeId};
use crate::shard::request::OpenPartition;
use crate::shard::{CoreRequest, PartitionKey};

/// The metadata group's log: never deleted by retention, always fsync'd.
fn meta_settings(config: &crate::config::Config) -> TopicSettings {
    TopicSettings {
        retention_ms: None,
        retention_bytes: None,
        fsync_interval_ms: None,
        max_record_bytes: crate::cluster::COMMAND_MAX_BYTES as u32,
        segment_bytes: config.metadata_segment_bytes,
    }
}

/// Opens the metadata group, starts the follower and the mover, and registers this node. A
/// node running alone returns once it has replayed the metadata and opened its partitions; a
/// node of a cluster does that in the background (its peers need it to serve first).
pub async fn start(broker: Arc<Broker>) -> anyhow::Result<()> {
    let member = broker.member().clone();
    let voters: BTreeMap<NodeId, Member> = broker
        .controllers
        .iter()
        .map(|(id, addr)| {
            // Every controller initializes the group with the same membership, so it holds
            // only what every node knows from its flags: ids and addresses.
            let m = if broker.alone() {
                member.clone()
            } else {
                Member {
                    addr: addr.clone(),
                    ..Member::default()
                }
            };
            (*id, m)
        })
        .collect();
    let key = PartitionKey::metadata();
    broker
        .shards
        .ask(broker.shards.core_of(&key), |reply| CoreRequest::Open {
            open: Box::new(OpenPartition {
                key: key.clone(),
                uid: crate::types::TopicUid(0),
                dir: broker.config.data_dir.join("metadata"),
                config: broker.config.log_config(&meta_settings(&broker.config)),
                replica: broker.replica.clone(),
                voters,
                first: None,
                mirror: false,
                promoted: None,
            }),
            reply,
        })
        .await
        .map_err(|e| anyhow::anyhow!("opening the metadata group: {e}"))?;
    let mut follower = follower::Follower::new(broker.clone())
        .map_err(|e| anyhow::anyhow!("reading the metadata checkpoint: {e}"))?;
    mover::spawn(broker.clone());
    if broker.alone() {
        let opened = follower
            .replay()
            .await
            .map_err(|e| anyhow::anyhow!("replaying the metadata: {e}"))?;
        anyhow::ensure!(
            opened,
            "some partitions could not be opened (see the log above)"
        );
        tokio::spawn(follower.run());
        register::register(&broker, &member)
            .await
            .map_err(|e| anyhow::anyhow!("registering this node: {e}"))?;
    } else {
        tokio::spawn(follower.run());
        register::spawn(broker.clone(), member);
    }
    Ok(())
}
