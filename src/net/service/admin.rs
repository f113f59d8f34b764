//! The cluster: ClusterInfo, MovePartition, Rebalance, RemoveNode.

use std::sync::Arc;

use tonic::Status;

use super::topics::partitions;
use crate::broker::Broker;
use crate::cluster::REPLICAS_MAX;
use crate::controller::{self, REBALANCE_MOVES_MAX};
use crate::net::status::from_controller;
use crate::proto::v1 as pb;
use crate::types::NodeId;

/// The cluster as this node knows it; node addresses as advertised to `region` (empty: this
/// node's region).
pub async fn cluster_info(broker: &Broker, region: &str) -> pb::ClusterInfoResponse {
    let region = match region {
        "" => broker.config.region.as_str(),
        r => r,
    };
    // Read before the partitions are: a node that turns ready meanwhile would otherwise say
    // so next to partitions listed while it was still opening them (CI saw "ready" with 298
    // of 300 open).
    let ready = broker.is_ready();
    let mut topics = Vec::new();
    for t in broker.topics() {
        topics.push(pb::TopicPartitions {
            topic: t.spec.name.clone(),
            partitions: partitions(broker, &t).await,
        });
    }
    let state = broker.cluster();
    let nodes = state
        .nodes
        .iter()
        .map(|(id, m)| pb::NodeInfo {
            id: id.0,
            address: m.addr_for(region).to_string(),
            region: m.region.clone(),
            zone: m.zone.clone(),
            draining: state.draining.contains(id),
        })
        .collect();
    pb::ClusterInfoResponse {
        nodes,
        topics,
        node_id: broker.node_id().0,
        metadata_leader: broker.metadata_leader().await.map_or(0, |l| l.0),
        ready,
        controllers: broker
            .metadata_replica()
            .await
            .map(|m| m.voters.iter().map(|v| v.0).collect())
            .unwrap_or_default(),
        cluster_id: broker.cluster_id.get().to_string(),
    }
}

pub async fn move_partition(
    broker: &Arc<Broker>,
    r: pb::MovePartitionRequest,
) -> Result<pb::MovePartitionResponse, Status> {
    if r.replicas.len() > REPLICAS_MAX as usize {
        return Err(Status::invalid_argument(format!(
            "at most {REPLICAS_MAX} replicas"
        )));
    }
    let target = r.replicas.into_iter().map(NodeId).collect();
    let changed = controller::move_partition(broker, &r.topic, r.partition, target)
        .await
        .map_err(from_controller)?;
    Ok(pb::MovePartitionResponse {
        unchanged: !changed,
    })
}

pub async fn rebalance(
    broker: &Arc<Broker>,
    r: pb::RebalanceRequest,
) -> Result<pb::RebalanceResponse, Status> {
    let max = match r.max_moves {
        0 => REBALANCE_MOVES_MAX,
        n => n as usize,
    };
    let moves = controller::rebalance(broker, max)
        .await
        .map_err(from_controller)?
        .into_iter()
        .map(|m| pb::PartitionMove {
            topic: m.topic,
            partition: m.partition,
            from: m.from.iter().map(|n| n.0).collect(),
            to: m.to.iter().map(|n| n.0).collect(),
        })
        .collect();
    Ok(pb::RebalanceResponse { moves })
}

pub async fn remove_node(broker: &Arc<Broker>, r: pb::RemoveNodeRequest) -> Result<(), Status> {
    controller::remove_node(broker, NodeId(r.node_id))
        .await
        .map_err(from_controller)
}
