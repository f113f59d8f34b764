//! The metadata commands: each record of the metadata log is one, as JSON. Every command is
//! validated when proposed and again when applied (it may come from a peer), and bounded.

use serde::{Deserialize, Serialize};

use super::error::{invalid, ClusterError};
use super::offsets::QUEUE_WINDOW_MAX;
use super::security::{
    valid_cluster_id, valid_sha256_hex, validate_principal, validate_user_name, Acl, Quota, User,
    EVERYONE,
};
use super::topic::{validate_topic_name, TopicSpec};
use crate::raft::types::{Member, NodeId};
use crate::types::{Offset, TopicUid};

/// Largest encoded command accepted.
pub const COMMAND_MAX_BYTES: usize = 1 << 20;

/// A change to the cluster metadata: one record of the metadata log, as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// A node says where it is reachable and where it stands.
    RegisterNode {
        id: NodeId,
        member: Member,
    },
    /// Creates a topic unless one of that name exists.
    CreateTopic {
        spec: TopicSpec,
    },
    /// Deletes the topic of that name and incarnation, if it exists.
    DeleteTopic {
        name: String,
        uid: TopicUid,
    },
    /// Starts moving a partition's replicas to `target` (the first is the preferred leader),
    /// or redirects a move in progress. The partition's leader carries it out.
    MoveReplicas {
        topic: String,
        uid: TopicUid,
        partition: u32,
        target: Vec<NodeId>,
    },
    /// The partition's group now has exactly the move's target as voters: the move is done.
    FinishMove {
        topic: String,
        uid: TopicUid,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// A mirror's promotion begins: its replicas stop pulling from the source.
    StopMirror {
        topic: String,
        uid: TopicUid,
    },
    /// The promoting mirror's partitions end at these cuts (one per partition): replicas short
    /// of one copy the rest from a replica that has it, and longer ones are cut there.
    CutMirror {
        topic: String,
        uid: TopicUid,
        cuts: Vec<super::topic::Cut>,
    },
    /// The mirror is a normal, writable topic from now on: each replica reopens as a Raft
    /// group continuing from its partition's cut.
    PromoteMirror {
        topic: String,
        uid: TopicUid,
    },
    /// Takes a node out of the cluster, for good (its id is not reused): at once if it holds no
    /// replica, else it is marked draining, its replicas move away, and the metadata leader
    /// proposes this again once it holds none.
    RemoveNode {
        id: NodeId,
    },
    /// Issues an idempotent producer id: the command's offset in the metadata log plus one
    /// (unique, never reused, the same on every node). Applying it changes nothing.
    AllocateProducerId,
    /// A consumer group's committed offsets on a topic (of incarnation `uid`): per partition,
    /// the next offset to consume.
    CommitOffsets {
        group: String,
        topic: String,
        uid: TopicUid,
        offsets: Vec<(u32, Offset)>,
    },
    /// A queue group's progress on one partition: every record below `floor` is settled (acked
    /// or dead-lettered), and so are those at `settled` above it; `counts` are the delivery
    /// counts of records delivered and not settled yet.
    QueueProgress {
        group: String,
        topic: String,
        uid: TopicUid,
        partition: u32,
        floor: Offset,
        settled: Vec<Offset>,
        counts: Vec<(Offset, u32)>,
    },
    /// Names the cluster, once: the first metadata leader proposes it at bootstrap; later
    /// ones change nothing.
    InitCluster {
        id: String,
    },
    /// Adds a user (refused if the name is taken: a token is replaced by deleting the user).
    CreateUser {
        name: String,
        user: User,
    },
    DeleteUser {
        name: String,
    },
    AddAcl {
        acl: Acl,
    },
    RemoveAcl {
        acl: Acl,
    },
    /// Sets a principal's quota (or everyone's, `*`); an empty quota removes it.
    SetQuota {
        principal: String,
        quota: Quota,
    },
}

/// Bounds a command must respect: it may come from a peer, and every node applies it.
pub const PARTITIONS_MAX: u32 = 1 << 16;
pub const REPLICAS_MAX: u32 = 16;
/// Regions a node may advertise addresses to, or a topic may name.
pub const REGIONS_MAX: usize = 32;

impl Command {
    /// Checks a command's shape. An invalid command is refused when proposed and, should one
    /// be in the log anyway, skipped by every node alike when applied.
    pub fn validate(&self) -> Result<(), ClusterError> {
        match self {
            Command::RegisterNode { id, member } => {
                if id.0 == 0 {
                    return Err(invalid("node id 0"));
                }
                if member.addr.is_empty() || member.addr.len() > 255 {
                    return Err(invalid("node address must be 1 to 255 bytes"));
                }
                if member.region.len() > 64 || member.zone.len() > 64 {
                    return Err(invalid("region and zone are at most 64 bytes"));
                }
                if member.region_addrs.len() > REGIONS_MAX
                    || member
                        .region_addrs
                        .iter()
                        .any(|(r, a)| r.is_empty() || r.len() > 64 || a.is_empty() || a.len() > 255)
                {
                    return Err(invalid(format!(
                        "at most {REGIONS_MAX} region addresses, each a region of 1 to 64 bytes and an address of 1 to 255"
                    )));
                }
                Ok(())
            }
            Command::CreateTopic { spec } => {
                validate_topic_name(&spec.name)?;
                spec.placement.validate()?;
                if let Some(m) = &spec.mirror {
                    m.validate()?;
                }
                if !(1..=PARTITIONS_MAX).contains(&spec.partitions) {
                    return Err(invalid(format!("{} partitions", spec.partitions)));
                }
                if !(1..=REPLICAS_MAX).contains(&spec.replication_factor) {
                    return Err(invalid(format!(
                        "replication factor {}",
                        spec.replication_factor
                    )));
                }
                if spec.replicas.len() != spec.partitions as usize {
                    return Err(invalid("one replica list per partition"));
                }
                for r in &spec.replicas {
                    let mut d = r.clone();
                    d.sort_unstable();
                    d.dedup();
                    if d.len() != r.len() || r.len() != spec.replication_factor as usize {
                        return Err(invalid(format!("replica list {r:?}")));
                    }
                }
                let s = &spec.settings;
                if s.max_record_bytes == 0 || s.segment_bytes < 1 << 20 {
                    return Err(invalid("bad topic settings"));
                }
                Ok(())
            }
            Command::DeleteTopic { name, .. }
            | Command::StopMirror { topic: name, .. }
            | Command::PromoteMirror { topic: name, .. } => validate_topic_name(name),
            Command::CutMirror { topic, cuts, .. } => {
                validate_topic_name(topic)?;
                if cuts.is_empty() || cuts.len() > PARTITIONS_MAX as usize {
                    return Err(invalid(format!("{} cuts", cuts.len())));
                }
                if cuts
                    .iter()
                    .any(|c| c.replicas.is_empty() || c.replicas.len() > REPLICAS_MAX as usize)
                {
                    return Err(invalid("a cut names 1 to REPLICAS_MAX replicas"));
                }
                Ok(())
            }
            Command::MoveReplicas {
                topic,
                partition,
                target: replicas,
                ..
            }
            | Command::FinishMove {
                topic,
                partition,
                replicas,
                ..
            } => {
                validate_topic_name(topic)?;
                if *partition >= PARTITIONS_MAX {
                    return Err(invalid(format!("partition {partition}")));
                }
                let mut d = replicas.clone();
                d.sort_unstable();
                d.dedup();
                if d.is_empty()
                    || d.len() != replicas.len()
                    || d.len() > REPLICAS_MAX as usize
                    || d.contains(&NodeId(0))
                {
                    return Err(invalid(format!(
                        "replica list {replicas:?}: 1 to {REPLICAS_MAX} distinct node ids"
                    )));
                }
                Ok(())
            }
            Command::RemoveNode { id } => {
                if id.0 == 0 {
                    return Err(invalid("node id 0"));
                }
                Ok(())
            }
            Command::AllocateProducerId => Ok(()),
            Command::InitCluster { id } => {
                if valid_cluster_id(id) {
                    Ok(())
                } else {
                    Err(invalid(format!("cluster id {id:?}")))
                }
            }
            Command::CreateUser { name, user } => {
                validate_user_name(name)?;
                if !valid_sha256_hex(&user.token_sha256) {
                    return Err(invalid("a user's token hash is 64 lowercase hex digits"));
                }
                Ok(())
            }
            Command::DeleteUser { name } => validate_user_name(name),
            Command::AddAcl { acl } | Command::RemoveAcl { acl } => acl.validate(),
            Command::SetQuota { principal, quota } => {
                if principal != EVERYONE {
                    validate_principal(principal)?;
                }
                quota.validate()
            }
            Command::CommitOffsets {
                group,
                topic,
                offsets,
                ..
            } => {
                validate_topic_name(group)
                    .map_err(|e| ClusterError::InvalidName(format!("group name: {e}")))?;
                validate_topic_name(topic)?;
                if offsets.len() > PARTITIONS_MAX as usize
                    || offsets.iter().any(|(p, _)| *p >= PARTITIONS_MAX)
                {
                    return Err(invalid("offsets of unknown partitions"));
                }
                Ok(())
            }
            Command::QueueProgress {
                group,
                topic,
                partition,
                floor,
                settled,
                counts,
                ..
            } => {
                validate_topic_name(group)
                    .map_err(|e| ClusterError::InvalidName(format!("group name: {e}")))?;
                validate_topic_name(topic)?;
                if *partition >= PARTITIONS_MAX {
                    return Err(invalid(format!("partition {partition}")));
                }
                if settled.len() > QUEUE_WINDOW_MAX
                    || counts.len() > QUEUE_WINDOW_MAX
                    || settled.iter().any(|o| o < floor)
                    || counts.iter().any(|(o, _)| o < floor)
                {
                    return Err(invalid("queue progress out of bounds"));
                }
                Ok(())
            }
        }
    }

    /// Whether applying it can change which partitions a node should hold (group positions
    /// and producer ids cannot).
    pub fn places_partitions(&self) -> bool {
        !matches!(
            self,
            Command::CommitOffsets { .. }
                | Command::QueueProgress { .. }
                | Command::AllocateProducerId
                | Command::InitCluster { .. }
                | Command::CreateUser { .. }
                | Command::DeleteUser { .. }
                | Command::AddAcl { .. }
                | Command::RemoveAcl { .. }
                | Command::SetQuota { .. }
        )
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Command, ClusterError> {
        if b.len() > COMMAND_MAX_BYTES {
            return Err(ClusterError::CommandTooLarge {
                len: b.len(),
                max: COMMAND_MAX_BYTES,
            });
        }
        serde_json::from_slice(b).map_err(|e| ClusterError::Malformed(e.to_string()))
    }
}
