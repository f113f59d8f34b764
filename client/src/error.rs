use std::time::Duration;

/// What a call of this crate can fail with.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// The node refused the call for a reason a retry cannot change (a bad argument, a
    /// missing topic, a denied permission), or a retryable one past the time to retry.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(tonic::Status),
    /// No node of the cluster answered.
    #[error("no node answered (tried {tried}): {last}")]
    Unreachable { tried: String, last: String },
    /// The topic does not exist (as far as the cluster says).
    #[error("topic {0:?} does not exist")]
    NoTopic(String),
    /// The call was given something invalid; nothing was sent.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Retried for as long as allowed; the last failure. For a publish, the records may or
    /// may not have been written.
    #[error("gave up after {after:?}: {last}")]
    GaveUp { after: Duration, last: String },
    /// The producer or subscription was closed (dropped) before the answer came.
    #[error("closed")]
    Closed,
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Error {
        Error::Status(s)
    }
}

/// A failure a retry may get past: the node could not serve now (an election, a node down,
/// a full core), or the call's fate is unknown (a lost connection, a timeout). Publishes carry
/// a producer id and sequence numbers, so resending after an unknown fate writes nothing twice.
pub(crate) fn retryable(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        s.code(),
        Unavailable | ResourceExhausted | DeadlineExceeded | Aborted | Unknown | Cancelled
    )
}

/// Status metadata naming the node that leads the partition.
pub(crate) const LEADER: &str = "tern-leader";
/// Status metadata saying nothing of the request was written.
pub(crate) const UNWRITTEN: &str = "tern-unwritten";

/// The node a status says leads the partition (metadata `tern-leader`).
pub(crate) fn leader_hint(s: &tonic::Status) -> Option<u64> {
    s.metadata().get(LEADER)?.to_str().ok()?.parse().ok()
}
