//! A topic as this node routes it: its stored description, and where each partition's
//! replica lives (which nodes; which core here).

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use super::{BrokerError, Result};
use crate::cluster::TopicSpec;
use crate::log::Record;
use crate::raft::types::NodeId;
use crate::shard::placement::core_for;
use crate::shard::PartitionKey;
use crate::types::CoreId;

pub struct Topic {
    pub spec: TopicSpec,
    pub name: Arc<str>,
    /// Cores of this node: where a partition's replica lives if this node holds one.
    cores: usize,
    /// Round-robin position for records without key or partition.
    pub(super) next: AtomicU32,
}

impl Topic {
    pub(super) fn new(spec: TopicSpec, cores: usize) -> Topic {
        Topic {
            name: spec.name.clone().into(),
            spec,
            cores,
            next: AtomicU32::new(0),
        }
    }

    pub fn key(&self, partition: u32) -> PartitionKey {
        PartitionKey {
            topic: self.name.clone(),
            partition,
        }
    }

    /// NOT_FOUND unless `partition` exists.
    pub fn check_partition(&self, partition: u32) -> Result<()> {
        if partition < self.spec.partitions {
            return Ok(());
        }
        Err(BrokerError::NoPartition {
            topic: self.spec.name.clone(),
            partition,
            last: self.spec.partitions - 1,
        })
    }

    /// The core that holds `partition` on this node (if this node holds it).
    pub fn core(&self, partition: u32) -> CoreId {
        core_for(&self.spec.name, partition, self.cores)
    }

    pub fn replicas(&self, partition: u32) -> &[NodeId] {
        self.spec
            .replicas
            .get(partition as usize)
            .map_or(&[], Vec::as_slice)
    }

    /// Whether `node` holds a replica of `partition`.
    pub fn on(&self, node: NodeId, partition: u32) -> bool {
        self.replicas(partition).contains(&node)
    }

    /// The partition's replicas and the nodes it is moving to (one of which may lead already).
    pub fn replicas_and_targets(&self, partition: u32) -> Vec<NodeId> {
        let mut all = self.replicas(partition).to_vec();
        for n in self.spec.moving.get(&partition).into_iter().flatten() {
            if !all.contains(n) {
                all.push(*n);
            }
        }
        all
    }
}

/// A record to publish, with its routing decided by the caller or not.
pub struct Outgoing {
    pub partition: Option<u32>,
    pub record: Record,
}
