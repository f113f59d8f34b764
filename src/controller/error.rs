//! What changing the cluster metadata can fail with.

use std::time::Duration;

use crate::broker::BrokerError;
use crate::cluster::ClusterError;
use crate::raft::types::NodeId;
use crate::shard::CoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// No metadata leader with a quorum: `voters` are the controllers, `unreachable` those this
    /// node cannot reach.
    #[error(
        "the cluster has no metadata leader: its controllers (nodes {}) elect one once a \
         majority of them is up and they reach each other{}. Start the missing nodes, or wait \
         for them with `tern cluster wait`",
        list(voters),
        if unreachable.is_empty() { String::new() } else {
            format!("; node {me} cannot reach nodes {}", list(unreachable))
        }
    )]
    NoMetadataLeader {
        me: NodeId,
        voters: Vec<NodeId>,
        unreachable: Vec<NodeId>,
    },
    #[error(
        "node {node} is still catching up with the cluster metadata (it just started or \
         joined); retry"
    )]
    CatchingUp { node: NodeId },
    #[error(
        "the metadata change at offset {offset} was not applied on this node within {waited:?}"
    )]
    NotApplied { offset: u64, waited: Duration },
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("the cluster holds its limit of {0} topics")]
    TooManyTopics(usize),
    #[error("node {0} was removed from the cluster; a removed node id cannot join again")]
    Removed(NodeId),
    #[error("node {0} is not in the cluster")]
    UnknownNode(NodeId),
    #[error("user {0:?} already exists (delete it first to issue a new token)")]
    UserExists(String),
    #[error("there is no user {0:?}")]
    UnknownUser(String),
    /// The metadata holds its limit of something (users, ACLs, quotas).
    #[error("{0}")]
    Full(String),
    /// The request cannot be carried out as asked (a wrong replica list).
    #[error("{0}")]
    Invalid(String),
    /// The cluster is not in a state that allows it (a node being removed, too few nodes left).
    #[error("{0}")]
    Precondition(String),
    /// Not enough of the cluster answered in time to go on; retrying may succeed.
    #[error("{0}")]
    Stalled(String),
    /// A registration sent through the member at `addr` (whose id is not known yet) failed.
    #[error("joining through {addr}: {why}")]
    Through {
        addr: String,
        why: String,
        removed: bool,
    },
}

fn list(ids: &[NodeId]) -> String {
    ids.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<CoreError> for ControllerError {
    fn from(e: CoreError) -> Self {
        ControllerError::Broker(e.into())
    }
}

impl ControllerError {
    /// Whether nothing was changed, so asking again cannot change anything twice.
    pub fn unwritten(&self) -> bool {
        match self {
            ControllerError::Broker(e) => e.unwritten(),
            ControllerError::NoMetadataLeader { .. } | ControllerError::CatchingUp { .. } => true,
            _ => false,
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        match self {
            ControllerError::Broker(e) => e.retryable(),
            ControllerError::NoMetadataLeader { .. }
            | ControllerError::CatchingUp { .. }
            | ControllerError::NotApplied { .. }
            | ControllerError::Stalled(_) => true,
            ControllerError::Through { removed, .. } => !removed,
            _ => false,
        }
    }

    /// Whether this says the asking node was removed from the cluster.
    pub fn removed(&self) -> bool {
        match self {
            ControllerError::Removed(_) => true,
            ControllerError::Through { removed, .. } => *removed,
            ControllerError::Broker(BrokerError::Peer(p)) => p.removed,
            _ => false,
        }
    }
}

pub type Result<T, E = ControllerError> = std::result::Result<T, E>;
