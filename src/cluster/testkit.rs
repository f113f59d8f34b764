//! Shared by the metadata model's tests: nodes, topics and states built by commands.

use super::*;
use crate::raft::types::{Member, NodeId};
use crate::types::TopicUid;

/// Node ids from numbers.
pub fn ids(n: &[u64]) -> Vec<NodeId> {
    n.iter().copied().map(NodeId).collect()
}

pub fn member(region: &str, zone: &str) -> Member {
    Member {
        addr: "x:1".into(),
        region: region.into(),
        zone: zone.into(),
    }
}

pub fn topic(name: &str, partitions: u32, replicas: Vec<Vec<u64>>) -> TopicSpec {
    let replicas: Vec<Vec<NodeId>> = replicas.iter().map(|r| ids(r)).collect();
    TopicSpec {
        name: name.into(),
        uid: TopicUid(7),
        partitions,
        replication_factor: replicas[0].len() as u32,
        settings: crate::cluster::TopicSettings {
            retention_ms: None,
            retention_bytes: None,
            fsync_interval_ms: None,
            max_record_bytes: 10,
            segment_bytes: 1 << 20,
        },
        replicas,
        created_ms: 0,
        moving: Default::default(),
        moved: Default::default(),
    }
}

pub fn cluster(nodes: &[(u64, &str)], topics: Vec<TopicSpec>) -> ClusterState {
    let mut s = ClusterState::default();
    for (id, region) in nodes {
        s.apply(Command::RegisterNode {
            id: NodeId(*id),
            member: member(region, "z"),
        });
    }
    for spec in topics {
        s.apply(Command::CreateTopic { spec });
    }
    s
}

/// The state after the moves started and finished.
pub fn carried_out(s: &ClusterState, moves: &[Move]) -> ClusterState {
    let mut after = s.clone();
    for m in moves {
        after.apply(m.command());
        after.apply(Command::FinishMove {
            topic: m.topic.clone(),
            uid: m.uid,
            partition: m.partition,
            replicas: m.to.clone(),
        });
    }
    after
}
