//! Topics: create, delete, list, describe; and how partitions look from this node.

use std::sync::Arc;

use tonic::Status;

use crate::broker::{Broker, Topic};
use crate::controller::{self, NewTopic};
use crate::mirror::MirrorError;
use crate::net::status::{from_broker, from_cluster, from_controller};
use crate::net::validate;
use crate::proto::v1 as pb;

pub fn topic_info(t: &Topic) -> pb::TopicInfo {
    let s = &t.spec.settings;
    pb::TopicInfo {
        name: t.spec.name.clone(),
        partitions: t.spec.partitions,
        replication_factor: t.spec.replication_factor,
        config: Some(pb::TopicConfig {
            retention_ms: Some(s.retention_ms.map_or(-1, |v| v as i64)),
            retention_bytes: Some(s.retention_bytes.map_or(-1, |v| v as i64)),
            fsync_policy: match s.fsync_interval_ms {
                None => pb::FsyncPolicy::Always as i32,
                Some(_) => pb::FsyncPolicy::Interval as i32,
            },
            fsync_interval_ms: s.fsync_interval_ms,
            max_record_bytes: Some(s.max_record_bytes),
            segment_bytes: Some(s.segment_bytes),
        }),
        placement: Some(placement_info(&t.spec.placement)),
        mirror_of: t.spec.mirror.as_ref().map(|m| pb::MirrorOf {
            topic: m.topic.clone(),
            addresses: m.addresses.clone(),
        }),
        uid: t.spec.uid.0,
    }
}

pub fn placement_info(p: &crate::cluster::Placement) -> pb::Placement {
    use crate::cluster::Survival;
    pb::Placement {
        survival: match p.survival {
            Survival::Spread => pb::Survival::Unspecified,
            Survival::Zone => pb::Survival::Zone,
            Survival::Region => pb::Survival::Region,
        } as i32,
        regions: p.regions.clone(),
        leader_regions: p.leader_regions.clone(),
    }
}

/// Node ids as the API spells them.
fn ids(nodes: &[crate::types::NodeId]) -> Vec<u64> {
    nodes.iter().map(|n| n.0).collect()
}

/// Each partition as this node sees it (its replica's view, if it holds one).
pub async fn partitions(broker: &Broker, t: &Topic) -> Vec<pb::PartitionInfo> {
    let me = broker.node_id();
    let mut out = Vec::with_capacity(t.spec.partitions as usize);
    let mut states = broker.replica_states(t).await;
    for p in 0..t.spec.partitions {
        let mut info = pb::PartitionInfo {
            partition: p,
            leader: 0,
            replicas: ids(t.replicas(p)),
            start_offset: 0,
            end_offset: 0,
            core: t.core(p).0,
            local: false,
            term: 0,
            followers: Vec::new(),
            moving_to: t.spec.moving.get(&p).map_or_else(Vec::new, |m| ids(m)),
            quiet: false,
            mirror: None,
        };
        // A replica being moved here counts: its view shows how far it has caught up.
        if t.spec.holds(me, p) {
            // A replica still opening (just created, or being reconciled) reports no view.
            if let Some(s) = states.remove(&p) {
                info.leader = s.leader.map_or(0, |l| l.0);
                info.start_offset = s.positions.start.0;
                info.end_offset = s.positions.committed.0;
                info.local = true;
                info.term = s.term;
                info.quiet = s.quiet;
                info.mirror = s.mirror.as_ref().map(crate::broker::mirror_progress);
                info.followers = broker
                    .follower_lags(&s)
                    .into_iter()
                    .map(|(node, f, in_sync)| pb::ReplicaProgress {
                        node: node.0,
                        lag_entries: f.lag_entries,
                        matched: f.matched,
                        silent_ms: f.silent_for.map(|d| d.as_millis() as u64),
                        in_sync,
                    })
                    .collect();
            }
        }
        out.push(info);
    }
    out
}

pub async fn create(
    broker: &Arc<Broker>,
    r: pb::CreateTopicRequest,
) -> Result<pb::CreateTopicResponse, Status> {
    let cfg = &broker.config;
    validate::topic_name(&r.name)?;
    let settings = validate::topic_settings(r.config.as_ref(), &cfg.topic_defaults)?;
    let placement = validate::placement(r.placement.as_ref())?;
    let (partitions, mirror) = match r.mirror_of {
        None => (validate::partition_count(r.partitions, cfg)?, None),
        Some(m) => {
            let mut of = crate::cluster::MirrorOf {
                topic: m.topic,
                addresses: m.addresses,
                source_uid: None,
            };
            of.validate().map_err(from_cluster)?;
            // The source's partitions and identity, asked before anything is created here.
            let (n, uid) = crate::mirror::source_partitions(broker, &of)
                .await
                .map_err(from_mirror)?;
            of.source_uid = uid;
            if r.partitions != 0 && r.partitions != n {
                return Err(Status::invalid_argument(format!(
                    "a mirror has its source's partitions: {} has {n}, {} were asked",
                    of, r.partitions
                )));
            }
            (validate::partition_count(n, cfg)?, Some(of))
        }
    };
    let new = NewTopic {
        name: r.name,
        partitions,
        replication_factor: r.replication_factor,
        settings,
        placement,
        mirror,
    };
    let t = controller::create_topic(broker, new)
        .await
        .map_err(from_controller)?;
    Ok(pb::CreateTopicResponse {
        topic: Some(topic_info(&t)),
    })
}

pub async fn delete(broker: &Arc<Broker>, r: pb::DeleteTopicRequest) -> Result<(), Status> {
    broker.topic(&r.name).map_err(from_broker)?;
    controller::delete_topic(broker, &r.name)
        .await
        .map_err(from_controller)
}

pub async fn describe(
    broker: &Broker,
    r: pb::DescribeTopicRequest,
) -> Result<pb::DescribeTopicResponse, Status> {
    let t = broker.topic(&r.name).map_err(from_broker)?;
    Ok(pb::DescribeTopicResponse {
        topic: Some(topic_info(&t)),
        partitions: partitions(broker, &t).await,
    })
}

/// A mirror's source that cannot be used, as a status.
fn from_mirror(e: MirrorError) -> Status {
    match e {
        MirrorError::BadAddress(_) | MirrorError::NoSourceTopic { .. } => {
            Status::invalid_argument(e.to_string())
        }
        MirrorError::Unreachable(_) => Status::unavailable(e.to_string()),
        MirrorError::Refused(_) | MirrorError::Credentials(_) => {
            Status::failed_precondition(e.to_string())
        }
    }
}

pub async fn promote(
    broker: &Arc<Broker>,
    r: pb::PromoteTopicRequest,
) -> Result<pb::PromoteTopicResponse, Status> {
    validate::topic_name(&r.name)?;
    let (t, ends) = controller::promote_topic(broker, &r.name)
        .await
        .map_err(from_controller)?;
    Ok(pb::PromoteTopicResponse {
        topic: Some(topic_info(&t)),
        ends: ends.into_iter().map(|o| o.0).collect(),
    })
}
