//! The one place where internal errors become gRPC statuses.
//!
//! What the client did wrong (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, OUT_OF_RANGE) is
//! kept apart from what the node cannot do now (RESOURCE_EXHAUSTED, UNAVAILABLE) and from
//! failures of the node itself (INTERNAL).

use tonic::Status;

use crate::cluster::ClusterError;
use crate::log::{BatchError, LogError};
use crate::raft::types::NodeId;
use crate::shard::CoreError;

/// Metadata on a status that says the request was not carried out at all, so sending it again
/// (to the same node or another) cannot write anything twice.
pub const UNWRITTEN: &str = "tern-unwritten";
/// Metadata naming the partition's leader (a node id), when the answering node knows it.
pub const LEADER: &str = "tern-leader";
/// Metadata on a peer's refusal of a node that was removed from the cluster.
pub use crate::raft::transport::REMOVED;

/// The refusal of a call from (or a registration of) a node removed from the cluster.
pub fn removed(node: NodeId) -> Status {
    let mut s = Status::failed_precondition(format!(
        "node {node} was removed from the cluster; a removed node id cannot join again"
    ));
    s.metadata_mut()
        .insert(REMOVED, tonic::metadata::MetadataValue::from_static("1"));
    s
}

/// Whether a status is a refusal of a removed node.
pub fn is_removed(s: &Status) -> bool {
    s.metadata().contains_key(REMOVED)
}

pub fn from_core(e: CoreError) -> Status {
    let unwritten = matches!(
        e,
        CoreError::NotLeader { .. } | CoreError::Busy(_) | CoreError::UnknownPartition(_)
    );
    let mut s = core_status(e);
    if unwritten {
        mark_unwritten(&mut s);
    }
    s
}

fn core_status(e: CoreError) -> Status {
    match e {
        // The broker checks that topic and partition exist before it asks a core: a core that
        // does not have it is still opening (or closing) this node's replica. Retry.
        CoreError::UnknownPartition(p) => Status::unavailable(format!(
            "the replica of {p} on this node is not open yet; retry"
        )),
        CoreError::ShuttingDown => Status::unavailable("the node is shutting down"),
        CoreError::Busy(core) => Status::resource_exhausted(format!(
            "core {core} is saturated (its mailbox stayed full); retry with backoff"
        )),
        CoreError::Log(e) => from_log(e),
        // Retryable: the status carries the leader (metadata `tern-leader`) when known.
        e @ (CoreError::NotLeader { leader } | CoreError::LeaderChanged { leader }) => {
            let mut s = Status::unavailable(e.to_string());
            if let Some(l) = leader {
                if let Ok(v) = l.to_string().parse() {
                    s.metadata_mut().insert(LEADER, v);
                }
            }
            s
        }
        e @ CoreError::InFlight => Status::unavailable(e.to_string()),
        e @ CoreError::OutOfOrder { .. } => Status::failed_precondition(e.to_string()),
        CoreError::Raft(m) => Status::internal(format!("replication failed: {m}")),
    }
}

/// What the metadata model refused: the caller's input, or a placement the nodes cannot take.
pub fn from_cluster(e: ClusterError) -> Status {
    match e {
        ClusterError::NotEnoughNodes { .. } => Status::failed_precondition(e.to_string()),
        ClusterError::InvalidName(_)
        | ClusterError::InvalidCommand(_)
        | ClusterError::CommandTooLarge { .. }
        | ClusterError::Malformed(_) => Status::invalid_argument(e.to_string()),
    }
}

/// Marks a status as "nothing was done": safe to send again.
pub fn mark_unwritten(s: &mut Status) {
    s.metadata_mut()
        .insert(UNWRITTEN, tonic::metadata::MetadataValue::from_static("1"));
}

/// Whether the request that got this status was not carried out (see [`UNWRITTEN`]).
pub fn unwritten(s: &Status) -> bool {
    s.metadata().contains_key(UNWRITTEN)
}

/// The leader a status names (metadata `tern-leader`), if any.
pub fn leader_of(s: &Status) -> Option<NodeId> {
    s.metadata()
        .get(LEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Whether a call failed before it reached the other side (the connection could not be made).
pub fn never_sent(s: &Status) -> bool {
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// A status from a call to another node, as this node passes it on. The peer's own answers
/// pass unchanged; failures of the call itself (which carry the local error as their source:
/// no connection, a connection lost mid-call, a timeout) become UNAVAILABLE naming the node,
/// never UNKNOWN or CANCELLED. A call that never reached the node is marked unwritten.
pub fn from_peer(node: NodeId, s: Status) -> Status {
    if std::error::Error::source(&s).is_none() {
        return s;
    }
    if never_sent(&s) {
        let mut out = Status::unavailable(format!(
            "node {node} cannot be reached ({}); retry",
            s.message()
        ));
        mark_unwritten(&mut out);
        return out;
    }
    Status::unavailable(format!(
        "the call to node {node} failed midway ({}: {}); what it asked for may or may not \
         have been done",
        code_name(s.code()),
        s.message()
    ))
}

/// Whether tonic refused a request message over the size limit (before any handler ran).
pub fn is_over_limit(s: &Status) -> bool {
    s.code() == tonic::Code::OutOfRange && s.message().contains("decoded message length too large")
}

/// The answer to a request over `--max-request-bytes`, in place of tonic's own text.
pub fn request_too_large(s: &Status, limit: usize) -> Status {
    // tonic says "found N bytes, the limit is: M bytes".
    let found = s
        .message()
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    let size = found.map_or_else(String::new, |n| format!(" of {n} bytes"));
    Status::invalid_argument(format!(
        "the request message{size} is larger than this node accepts: at most {limit} bytes \
         (the node's --max-request-bytes); send fewer or smaller records per request"
    ))
}

/// A short name of a status code, for messages.
pub fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The partition's offset range an OUT_OF_RANGE status names: (start, end).
pub fn range_of(s: &Status) -> Option<(u64, u64)> {
    let v = s.metadata().get("tern-offset-range")?.to_str().ok()?;
    let (a, b) = v.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

pub fn from_log(e: LogError) -> Status {
    match e {
        LogError::OffsetOutOfRange {
            requested,
            start,
            end,
        } => {
            let mut s = Status::out_of_range(format!(
                "offset {requested} is outside the partition's range [{start}, {end}]"
            ));
            // The range, for clients that move into it (see `range_of`).
            if let Ok(v) = format!("{start}-{end}").parse() {
                s.metadata_mut().insert("tern-offset-range", v);
            }
            s
        }
        LogError::BatchTooLarge { len, max } => Status::invalid_argument(format!(
            "the records of one partition take {len} bytes in a request; the limit is {max}"
        )),
        LogError::Batch(BatchError::TooLarge { len, max }) => Status::invalid_argument(format!(
            "a record of {len} bytes exceeds the batch limit of {max}"
        )),
        LogError::Closed => Status::unavailable("the partition is closing"),
        other => Status::internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leadership error is retryable and names the leader, so a client can go there.
    #[test]
    fn leadership_errors_are_unavailable_and_name_the_leader() {
        let s = from_core(CoreError::NotLeader { leader: Some(3) });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get("tern-leader").unwrap(), "3");
        assert!(unwritten(&s), "nothing was written: safe to resend");
        let s = from_core(CoreError::LeaderChanged { leader: None });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().contains("may or may not be committed"),
            "{}",
            s.message()
        );
        assert!(s.metadata().get("tern-leader").is_none());
        assert!(
            !unwritten(&s),
            "may be committed: not safe to resend blindly"
        );
    }

    /// A peer's own answer passes unchanged; a status without a source is such an answer.
    #[test]
    fn a_peers_answer_passes_unchanged() {
        let s = from_peer(2, Status::not_found("no such topic"));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "no such topic");
    }
}
