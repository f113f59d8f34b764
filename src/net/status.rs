//! The one place where errors become gRPC statuses.
//!
//! What the client did wrong (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, OUT_OF_RANGE) is
//! kept apart from what the node cannot do now (RESOURCE_EXHAUSTED, UNAVAILABLE) and from
//! failures of the node itself (INTERNAL). Tern's metadata goes on here too: `tern-leader`
//! (who leads), `tern-unwritten` (nothing was done: safe to resend), `tern-removed`,
//! `tern-offset-range`.

use tonic::Status;

use crate::broker::BrokerError;
use crate::cluster::ClusterError;
use crate::controller::ControllerError;
use crate::groups::GroupError;
use crate::log::{BatchError, LogError};
use crate::proto::metadata;
use crate::raft::types::NodeId;
use crate::raft::RaftError;
use crate::shard::CoreError;

fn insert(s: &mut Status, key: &'static str, value: String) {
    if let Ok(v) = value.parse() {
        s.metadata_mut().insert(key, v);
    }
}

/// The refusal of a call from (or a registration of) a node removed from the cluster.
pub fn removed(node: NodeId) -> Status {
    let mut s = Status::failed_precondition(format!(
        "node {node} was removed from the cluster; a removed node id cannot join again"
    ));
    insert(&mut s, metadata::REMOVED, "1".into());
    s
}

/// Whether a status is a refusal of a removed node.
pub fn is_removed(s: &Status) -> bool {
    s.metadata().contains_key(metadata::REMOVED)
}

/// Whether a status says nothing was done (safe to send the same request again).
pub fn is_unwritten(s: &Status) -> bool {
    s.metadata().contains_key(metadata::UNWRITTEN)
}

/// The node a status names as the leader (metadata `tern-leader`).
pub fn leader_of(s: &Status) -> Option<NodeId> {
    s.metadata()
        .get(metadata::LEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Marks a status as "nothing was done": safe to send again.
pub fn mark_unwritten(s: &mut Status) {
    insert(s, metadata::UNWRITTEN, "1".into());
}

pub fn from_broker(e: BrokerError) -> Status {
    let unwritten = e.unwritten();
    let leader = e.leader();
    let mut s = match e {
        BrokerError::Core(e) => return from_core(e),
        BrokerError::Cluster(e) => from_cluster(e),
        BrokerError::Peer(p) => {
            let mut s = Status::new(p.code, p.message);
            if p.removed {
                insert(&mut s, metadata::REMOVED, "1".into());
            }
            if let Some((a, b)) = p.range {
                insert(&mut s, metadata::OFFSET_RANGE, format!("{a}-{b}"));
            }
            s
        }
        e @ (BrokerError::NoTopic(_) | BrokerError::NoPartition { .. }) => {
            Status::not_found(e.to_string())
        }
        e @ (BrokerError::NotReady { .. }
        | BrokerError::NoReplica { .. }
        | BrokerError::NoLeader { .. }
        | BrokerError::NoAddress { .. }
        | BrokerError::Unreachable { .. }
        | BrokerError::Midway { .. }
        | BrokerError::ShuttingDown) => Status::unavailable(e.to_string()),
        e @ BrokerError::BadAnswer { .. } => Status::internal(e.to_string()),
        e @ BrokerError::Mirror { .. } => Status::failed_precondition(e.to_string()),
    };
    if unwritten {
        mark_unwritten(&mut s);
    }
    if let Some(l) = leader {
        insert(&mut s, metadata::LEADER, l.to_string());
    }
    s
}

pub fn from_controller(e: ControllerError) -> Status {
    let unwritten = e.unwritten();
    let mut s = match e {
        ControllerError::Broker(e) => return from_broker(e),
        ControllerError::Cluster(e) => from_cluster(e),
        ControllerError::Removed(node) => return removed(node),
        e @ ControllerError::Through { removed: true, .. } => {
            let mut s = Status::failed_precondition(e.to_string());
            insert(&mut s, metadata::REMOVED, "1".into());
            s
        }
        e @ (ControllerError::NoMetadataLeader { .. }
        | ControllerError::CatchingUp { .. }
        | ControllerError::NotApplied { .. }
        | ControllerError::Stalled(_)
        | ControllerError::Through { .. }) => Status::unavailable(e.to_string()),
        e @ ControllerError::TopicExists(_) => Status::already_exists(e.to_string()),
        e @ ControllerError::TooManyTopics(_) => Status::resource_exhausted(e.to_string()),
        e @ (ControllerError::UnknownNode(_) | ControllerError::UnknownUser(_)) => {
            Status::not_found(e.to_string())
        }
        e @ ControllerError::UserExists(_) => Status::already_exists(e.to_string()),
        e @ ControllerError::Full(_) => Status::resource_exhausted(e.to_string()),
        e @ ControllerError::Invalid(_) => Status::invalid_argument(e.to_string()),
        e @ ControllerError::Precondition(_) => Status::failed_precondition(e.to_string()),
    };
    if unwritten {
        mark_unwritten(&mut s);
    }
    s
}

pub fn from_group(e: GroupError) -> Status {
    match e {
        GroupError::Broker(e) => from_broker(e),
        GroupError::Controller(e) => from_controller(e),
        e @ GroupError::Invalid(_) => Status::invalid_argument(e.to_string()),
        e @ (GroupError::ModeMismatch { .. } | GroupError::AlreadyJoined) => {
            Status::failed_precondition(e.to_string())
        }
        e @ (GroupError::TooManyGroups(_)
        | GroupError::TooManyMembers { .. }
        | GroupError::PositionsFull(_)) => Status::resource_exhausted(e.to_string()),
        e @ (GroupError::Stopped(_)
        | GroupError::NoCoordinator
        | GroupError::NotCoordinator
        | GroupError::MetadataSilent
        | GroupError::CallClosed) => Status::unavailable(e.to_string()),
        e @ (GroupError::SessionTimeout | GroupError::RevokeTimeout) => {
            Status::deadline_exceeded(e.to_string())
        }
        e @ GroupError::NoGroup(_) => Status::not_found(e.to_string()),
    }
}

pub fn from_core(e: CoreError) -> Status {
    let unwritten = e.unwritten();
    let mut s = match e {
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
        e @ (CoreError::NotLeader { leader }
        | CoreError::LeaderChanged { leader }
        | CoreError::Stale { leader, .. }) => {
            let mut s = Status::unavailable(e.to_string());
            if let Some(l) = leader {
                insert(&mut s, metadata::LEADER, l.to_string());
            }
            s
        }
        e @ CoreError::InFlight => Status::unavailable(e.to_string()),
        e @ CoreError::OutOfOrder { .. } => Status::failed_precondition(e.to_string()),
        // The group stopped under the request (its replica closed for a move, a repair or a
        // shutdown), or a peer did not answer: transient, another replica or a retry serves
        // it. Whether the write landed is unknown, so no `tern-unwritten`: idempotent
        // producers resend safely.
        e @ CoreError::Raft(
            RaftError::Stopped(_)
            | RaftError::Unreachable { .. }
            | RaftError::Timeout { .. }
            | RaftError::QueueFull { .. }
            | RaftError::CutOff { .. }
            | RaftError::ShuttingDown,
        ) => Status::unavailable(e.to_string()),
        e @ (CoreError::Raft(_) | CoreError::NotAVoter { .. } | CoreError::NoTransport(_)) => {
            Status::internal(e.to_string())
        }
        e @ CoreError::OlderIncarnation(_) => Status::unavailable(e.to_string()),
        e @ CoreError::TimedOut { .. } => Status::unavailable(e.to_string()),
        e @ (CoreError::Mirror(_) | CoreError::NoGroup(_)) => {
            Status::failed_precondition(e.to_string())
        }
    };
    if unwritten {
        mark_unwritten(&mut s);
    }
    s
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
            // The range, for clients that move into it.
            insert(&mut s, metadata::OFFSET_RANGE, format!("{start}-{end}"));
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

/// What the metadata model refused: the caller's input, or a placement the nodes cannot take.
pub fn from_cluster(e: ClusterError) -> Status {
    match e {
        ClusterError::NotEnoughNodes { .. } | ClusterError::Placement(_) => {
            Status::failed_precondition(e.to_string())
        }
        ClusterError::InvalidName(_)
        | ClusterError::InvalidCommand(_)
        | ClusterError::CommandTooLarge { .. }
        | ClusterError::Malformed(_) => Status::invalid_argument(e.to_string()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::NodeId;

    /// A leadership error is retryable and names the leader, so a client can go there.
    #[test]
    fn leadership_errors_are_unavailable_and_name_the_leader() {
        let s = from_core(CoreError::NotLeader {
            leader: Some(NodeId(3)),
        });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get("tern-leader").unwrap(), "3");
        assert!(
            s.metadata().contains_key(metadata::UNWRITTEN),
            "nothing was written: safe to resend"
        );
        let s = from_core(CoreError::LeaderChanged { leader: None });
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().contains("may or may not be committed"),
            "{}",
            s.message()
        );
        assert!(s.metadata().get("tern-leader").is_none());
        assert!(
            !s.metadata().contains_key(metadata::UNWRITTEN),
            "may be committed: not safe to resend blindly"
        );
    }

    /// A group that stopped under a request (a replica closed by a move) is retryable, without
    /// a promise that nothing was written; a bug-class Raft error stays INTERNAL.
    #[test]
    fn a_stopped_group_is_unavailable() {
        let s = from_core(CoreError::Raft(RaftError::Stopped("closed".into())));
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(!s.metadata().contains_key(metadata::UNWRITTEN));
        let s = from_core(CoreError::Raft(RaftError::Storage {
            dir: "d".into(),
            error: "e".into(),
        }));
        assert_eq!(s.code(), tonic::Code::Internal);
    }

    /// A peer's own answer passes through a node unchanged: code, message and metadata.
    #[test]
    fn a_peers_answer_passes_through() {
        let mut peer = Status::unavailable("not the partition leader (leader: node 2)");
        insert(&mut peer, metadata::LEADER, "2".into());
        mark_unwritten(&mut peer);
        let e = BrokerError::from_peer(NodeId(3), peer);
        assert_eq!(e.leader(), Some(NodeId(2)));
        assert!(e.unwritten());
        let s = from_broker(e);
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "not the partition leader (leader: node 2)");
        assert_eq!(s.metadata().get("tern-leader").unwrap(), "2");
        let s = from_broker(BrokerError::from_peer(
            NodeId(2),
            Status::not_found("no such topic"),
        ));
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(s.message(), "no such topic");
    }

    /// A call that never reached a node is UNAVAILABLE, names the node, and is safe to resend.
    #[tokio::test]
    async fn a_node_that_cannot_be_reached_is_named() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let mut c = crate::proto::v1::tern_client::TernClient::new(channel);
        let s = c
            .list_topics(crate::proto::v1::ListTopicsRequest {})
            .await
            .unwrap_err();
        let e = BrokerError::from_peer(NodeId(7), s);
        assert!(
            matches!(
                e,
                BrokerError::Unreachable {
                    node: NodeId(7),
                    ..
                }
            ),
            "{e:?}"
        );
        let s = from_broker(e);
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(
            s.message().contains("node 7 cannot be reached"),
            "{}",
            s.message()
        );
        assert!(s.metadata().contains_key(metadata::UNWRITTEN));
    }
}
