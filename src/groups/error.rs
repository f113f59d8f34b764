//! What a group's members and callers are told when something cannot be done.

use crate::broker::BrokerError;
use crate::controller::ControllerError;

use super::Mode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GroupError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    /// A join or request the client got wrong.
    #[error("{0}")]
    Invalid(String),
    #[error("group {group:?} consumes {topic:?} in {mode:?} mode; members must all use that mode")]
    ModeMismatch {
        group: String,
        topic: String,
        mode: Mode,
    },
    #[error("this node coordinates {0} groups already")]
    TooManyGroups(usize),
    #[error("group {group:?} has {max} members already")]
    TooManyMembers { group: String, max: usize },
    #[error("the cluster keeps positions for {0} groups already")]
    PositionsFull(usize),
    /// The group's coordinator stopped (a leader change, the topic deleted, shutdown).
    #[error("the group coordinator stopped ({0}); join again")]
    Stopped(String),
    #[error("no metadata leader (the group coordinator) here right now; retry")]
    NoCoordinator,
    #[error("this node is no longer the group coordinator (metadata leader); join again")]
    NotCoordinator,
    #[error("the metadata group did not answer; retry")]
    MetadataSilent,
    #[error("already joined: a call joins one group once")]
    AlreadyJoined,
    #[error("session timeout: nothing heard from the member")]
    SessionTimeout,
    #[error("did not answer Revoke within the session timeout")]
    RevokeTimeout,
    #[error("the member's call closed")]
    CallClosed,
    #[error("group {0:?} has no members and no committed positions")]
    NoGroup(String),
}

pub type Result<T, E = GroupError> = std::result::Result<T, E>;
