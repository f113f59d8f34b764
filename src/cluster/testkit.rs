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
        ..Member::default()
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
        placement: Default::default(),
        mirror: None,
        promotion: None,
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

/// A state with something in every part (nodes, topics, a move, draining and removed nodes,
/// both kinds of group positions, users, ACLs, quotas, the cluster id).
pub fn busy_state() -> ClusterState {
    use crate::types::Offset;
    let mut t = topic("events", 2, vec![vec![1, 2], vec![2, 3]]);
    t.moving.insert(1, ids(&[3, 1]));
    t.moved.insert(1);
    let mut s = cluster(&[(1, "a"), (2, "b"), (3, "c")], vec![t]);
    s.draining.insert(NodeId(3));
    s.removed.insert(NodeId(9));
    s.cluster_id = Some("c-1".into());
    let mut queue = offsets::GroupOffsets {
        uid: TopicUid(7),
        queue: true,
        ..Default::default()
    };
    queue.partitions.insert(
        0,
        offsets::Cursor {
            offset: Offset(10),
            settled: vec![Offset(12)],
            counts: vec![(Offset(11), 3)],
        },
    );
    s.groups.insert(("q".into(), "events".into()), queue);
    s.groups.insert(
        ("g".into(), "events".into()),
        offsets::GroupOffsets::default(),
    );
    s.security.users.insert(
        "alice".into(),
        security::User {
            token_sha256: "ab".into(),
            created_ms: 5,
        },
    );
    s.security.acls.insert(security::Acl {
        principal: "alice".into(),
        resource: security::ResourceKind::Topic,
        pattern: security::PatternKind::Prefix,
        name: "ev".into(),
        operation: security::Operation::Publish,
        permission: security::Permission::Allow,
    });
    s.security.quotas.insert(
        "*".into(),
        security::Quota {
            requests_per_sec: Some(100),
            ..Default::default()
        },
    );
    s.security.users_version = 3;
    s
}
