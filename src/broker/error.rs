//! What the node context answers when it cannot do what it was asked: typed, so callers decide
//! by fields (is it retryable? was nothing written? who leads?) and `net` alone turns it into a
//! gRPC status.

use std::time::Duration;

use crate::cluster::ClusterError;
use crate::raft::types::NodeId;
use crate::shard::CoreError;

/// Another node's own answer to a call this node made on a client's behalf, as it arrived:
/// its code and message, and what its metadata said.
#[derive(Debug, Clone)]
pub struct PeerAnswer {
    pub node: NodeId,
    pub code: tonic::Code,
    pub message: String,
    pub leader: Option<NodeId>,
    /// The peer did nothing of the request.
    pub unwritten: bool,
    /// The peer refuses this node: it was removed from the cluster.
    pub removed: bool,
    /// OUT_OF_RANGE: the partition's range there.
    pub range: Option<(u64, u64)>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// A malformed topic or group name, or a refused metadata command.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("topic {0:?} does not exist")]
    NoTopic(String),
    #[error("partition {partition} does not exist; topic {topic:?} has partitions 0 to {last}")]
    NoPartition {
        topic: String,
        partition: u32,
        last: u32,
    },
    /// The node started a moment ago and has not caught up with the metadata: a topic it does
    /// not know may exist.
    #[error("node {node} is still loading the cluster metadata (it just started); retry")]
    NotReady { node: NodeId },
    #[error(
        "node {node} holds no replica of {topic}/{partition} (its replicas are on nodes \
         {replicas:?}); retry"
    )]
    NoReplica {
        node: NodeId,
        topic: String,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// What a core of this node answered.
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(
        "{topic}/{partition} has no leader that this node could reach within {waited:?}; retry"
    )]
    NoLeader {
        topic: String,
        partition: u32,
        waited: Duration,
    },
    #[error("node {node} has no known address")]
    NoAddress { node: NodeId },
    /// A call to another node never reached it.
    #[error("node {node} cannot be reached ({why}); retry")]
    Unreachable { node: NodeId, why: String },
    /// A call to another node failed after it was sent: it may or may not have been done.
    #[error(
        "the call to node {node} failed midway ({why}); what it asked for may or may not have \
         been done"
    )]
    Midway { node: NodeId, why: String },
    /// Another node's answer, passed on as it came.
    #[error("{}", .0.message)]
    Peer(PeerAnswer),
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A node answered something that cannot be (a bug somewhere): never retried.
    #[error("node {node} answered {what}")]
    BadAnswer { node: NodeId, what: String },
    /// A write to a mirror topic: it takes records only from its source until promoted.
    #[error(
        "topic {topic:?} is a mirror of {of} and takes no writes; \
         `tern topic promote {topic}` makes it writable"
    )]
    Mirror { topic: String, of: String },
}

impl BrokerError {
    /// The partition's leader, when the error names one.
    pub fn leader(&self) -> Option<NodeId> {
        match self {
            BrokerError::Core(CoreError::NotLeader { leader })
            | BrokerError::Core(CoreError::LeaderChanged { leader })
            | BrokerError::Core(CoreError::Stale { leader, .. }) => *leader,
            BrokerError::Peer(p) => p.leader,
            _ => None,
        }
    }

    /// Whether nothing of the request was done, so sending it again cannot duplicate.
    pub fn unwritten(&self) -> bool {
        match self {
            BrokerError::Core(e) => e.unwritten(),
            BrokerError::Peer(p) => p.unwritten,
            BrokerError::NotReady { .. }
            | BrokerError::NoReplica { .. }
            | BrokerError::NoLeader { .. }
            | BrokerError::NoAddress { .. }
            | BrokerError::Unreachable { .. } => true,
            _ => false,
        }
    }

    /// Whether the same request may succeed later or elsewhere (safe to retry only when
    /// [`unwritten`](Self::unwritten), or for an idempotent producer).
    pub fn retryable(&self) -> bool {
        use tonic::Code;
        match self {
            BrokerError::Core(e) => e.retryable(),
            BrokerError::Peer(p) => matches!(
                p.code,
                Code::Unavailable
                    | Code::ResourceExhausted
                    | Code::DeadlineExceeded
                    | Code::Aborted
            ),
            BrokerError::NotReady { .. }
            | BrokerError::NoReplica { .. }
            | BrokerError::NoLeader { .. }
            | BrokerError::NoAddress { .. }
            | BrokerError::Unreachable { .. }
            | BrokerError::Midway { .. }
            | BrokerError::ShuttingDown => true,
            _ => false,
        }
    }

    /// The partition's offset range, when the error is about an offset outside it.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            BrokerError::Core(CoreError::Log(crate::log::LogError::OffsetOutOfRange {
                start,
                end,
                ..
            })) => Some((start.0, end.0)),
            BrokerError::Peer(p) => p.range,
            _ => None,
        }
    }

    /// Whether the topic (or partition) is not there.
    pub fn not_found(&self) -> bool {
        match self {
            BrokerError::NoTopic(_) | BrokerError::NoPartition { .. } => true,
            BrokerError::Peer(p) => p.code == tonic::Code::NotFound,
            _ => false,
        }
    }
}

/// What a call from a node-side task (not a client call) returns.
pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
