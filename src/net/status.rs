//! The one place where internal errors become gRPC statuses.
//!
//! What the client did wrong (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, OUT_OF_RANGE) is
//! kept apart from what the node cannot do now (RESOURCE_EXHAUSTED, UNAVAILABLE) and from
//! failures of the node itself (INTERNAL).

use tonic::Status;

use crate::log::{BatchError, LogError};
use crate::shard::CoreError;

pub fn from_core(e: CoreError) -> Status {
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
                    s.metadata_mut().insert("tern-leader", v);
                }
            }
            s
        }
        e @ CoreError::InFlight => Status::unavailable(e.to_string()),
        e @ CoreError::OutOfOrder { .. } => Status::failed_precondition(e.to_string()),
        CoreError::Raft(m) => Status::internal(format!("replication failed: {m}")),
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
        let s = from_core(CoreError::LeaderChanged { leader: None });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().contains("may or may not be committed"),
            "{}",
            s.message()
        );
        assert!(s.metadata().get("tern-leader").is_none());
    }
}
