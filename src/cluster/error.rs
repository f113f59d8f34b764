//! What the metadata model refuses, and why.

/// Why a metadata command, name or placement is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// A topic or group name breaks the naming rules.
    #[error("{0}")]
    InvalidName(String),
    /// A command's fields are out of bounds or inconsistent.
    #[error("invalid metadata command: {0}")]
    InvalidCommand(String),
    #[error("metadata command of {len} bytes; at most {max}")]
    CommandTooLarge { len: usize, max: usize },
    #[error("malformed metadata command: {0}")]
    Malformed(String),
    /// Not enough nodes to place `rf` replicas apart.
    #[error("replication factor {rf} needs {rf} nodes; the cluster has {nodes}")]
    NotEnoughNodes { rf: u32, nodes: usize },
    /// A topic's placement cannot be met by the nodes there are (or is malformed).
    #[error("{0}")]
    Placement(String),
}

pub(super) fn invalid(why: impl Into<String>) -> ClusterError {
    ClusterError::InvalidCommand(why.into())
}
