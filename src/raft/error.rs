//! What can go wrong in a partition's Raft group, its messages and its transport.

use crate::raft::types::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    #[error("heartbeat interval must be > 0 ms")]
    HeartbeatZero,
    #[error(
        "election timeout ({election_ms} ms) must be at least twice the heartbeat ({heartbeat_ms} ms)"
    )]
    ElectionTooShort { election_ms: u64, heartbeat_ms: u64 },
    #[error("election timeout max ({max_ms} ms) must exceed min ({min_ms} ms)")]
    ElectionRange { min_ms: u64, max_ms: u64 },
    /// openraft refused the configuration.
    #[error("raft config: {0}")]
    Config(String),
    /// The group's storage could not be opened (what the log or state file said).
    #[error("opening raft storage in {dir}: {error}")]
    Storage { dir: String, error: String },
    /// openraft stopped the group (a fatal error of its own, or storage failing under it).
    #[error("the raft group stopped: {0}")]
    Stopped(String),
    /// A peer's message could not be decoded.
    #[error("malformed {what}: {error}")]
    Malformed { what: &'static str, error: String },
    /// A peer's message is out of bounds.
    #[error("{0}")]
    TooLarge(String),
    /// A call to a peer did not get an answer.
    #[error("node {node} cannot be reached: {why}")]
    Unreachable { node: NodeId, why: String },
    #[error("node {node} did not answer within {after:?}")]
    Timeout {
        node: NodeId,
        after: std::time::Duration,
    },
    #[error("queue to node {node} is full")]
    QueueFull { node: NodeId },
    #[error("node {node} is cut off (fault injection)")]
    CutOff { node: NodeId },
    #[error("the transport is shutting down")]
    ShuttingDown,
    /// What the peer answered instead of a response (its own error, as text on the wire).
    #[error("{0}")]
    Remote(String),
    /// The receiving replica refuses the message (not open, another incarnation, joining).
    #[error("{0}")]
    Refused(String),
}
