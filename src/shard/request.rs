//! What the network shard asks a core, and what the core answers.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;

use crate::log::{Batch, LogConfig, LogError, Positions, Record};
use crate::proto::internal as pb;
use crate::raft::types::{Member, NodeId};
use crate::types::{CoreId, Offset, ProducerId, RaftIndex, Sequence, TimestampMs, TopicUid};

/// A partition of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PartitionKey {
    pub topic: Arc<str>,
    pub partition: u32,
}

impl PartitionKey {
    /// The metadata group's key: no topic name can be empty.
    pub fn metadata() -> PartitionKey {
        PartitionKey {
            topic: "".into(),
            partition: 0,
        }
    }

    pub fn is_metadata(&self) -> bool {
        self.topic.is_empty()
    }
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_metadata() {
            return f.write_str("(metadata)");
        }
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Why a core could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("partition {0} is not on this core")]
    UnknownPartition(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("core {0} is overloaded: its mailbox stayed full")]
    Busy(CoreId),
    /// This replica does not lead the partition; nothing was written.
    #[error("not the partition leader (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotLeader { leader: Option<NodeId> },
    /// The leader changed while the records were being replicated: they may or may not be
    /// committed. A retry may duplicate them (idempotent producers will deduplicate).
    #[error("leader changed during the write; the records may or may not be committed (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    LeaderChanged { leader: Option<NodeId> },
    /// An earlier send of an idempotent producer's records is still being replicated: retry
    /// later, and the retry is answered with the offsets they got.
    #[error("an earlier send of these sequence numbers is still being replicated; retry")]
    InFlight,
    /// An idempotent producer's records do not continue its sequence in this partition.
    #[error("out-of-order sequence for producer {producer}: expected {expected}, got {got}")]
    OutOfOrder {
        producer: i64,
        expected: i64,
        got: i64,
    },
    /// The partition's Raft group failed.
    #[error("replication failed: {0}")]
    Raft(#[from] crate::raft::RaftError),
    /// A replica is opened with voters that do not include this node.
    #[error("{partition}: this node ({node}) is not among the voters")]
    NotAVoter { partition: String, node: NodeId },
    /// A replicated group on a node that has no transport to its peers.
    #[error("{0}: replicated, but this node has no transport")]
    NoTransport(String),
    /// Another incarnation of the topic is still open here (it is being closed).
    #[error("{0}: an older incarnation of the topic is still open")]
    OlderIncarnation(String),
    /// Something asked of a core did not finish in time (it goes on, or is retried).
    #[error("{what} did not finish within {after:?}")]
    TimedOut { what: &'static str, after: Duration },
    /// A follower too far behind its leader (or out of touch with it) to serve reads: read
    /// from another replica.
    #[error("this replica is {why}; read from another replica (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    Stale { leader: Option<NodeId>, why: String },
    /// A mirror's replica could not take what its source sent.
    #[error("mirror: {0}")]
    Mirror(String),
    /// Asked of a mirror's replica what only a Raft group does (it has none).
    #[error("{0} is a mirror's replica: it has no Raft group")]
    NoGroup(String),
}

impl CoreError {
    /// Whether nothing of the request was done: sending it again cannot duplicate anything.
    pub fn unwritten(&self) -> bool {
        matches!(
            self,
            CoreError::NotLeader { .. }
                | CoreError::Busy(_)
                | CoreError::UnknownPartition(_)
                | CoreError::Stale { .. }
        )
    }

    /// Whether the same request may succeed later (an election, a saturated core, a replica
    /// still opening, a node shutting down, an earlier send still in flight).
    pub fn retryable(&self) -> bool {
        match self {
            CoreError::NotLeader { .. }
            | CoreError::LeaderChanged { .. }
            | CoreError::Busy(_)
            | CoreError::UnknownPartition(_)
            | CoreError::ShuttingDown
            | CoreError::InFlight
            | CoreError::Stale { .. }
            | CoreError::TimedOut { .. } => true,
            CoreError::Log(e) => matches!(e, LogError::Closed),
            CoreError::OlderIncarnation(_) => true,
            CoreError::OutOfOrder { .. }
            | CoreError::Mirror(_)
            | CoreError::NoGroup(_)
            | CoreError::Raft(_)
            | CoreError::NotAVoter { .. }
            | CoreError::NoTransport(_) => false,
        }
    }
}

pub type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// An idempotent producer's records for one partition: its id and the sequence number of the
/// first record (the others follow it, one each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerSeq {
    pub id: ProducerId,
    pub first: Sequence,
}

/// Who this node is in a partition's Raft group.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub node_id: NodeId,
    pub member: Member,
    pub timing: crate::raft::Timing,
    /// Applied entries between two saves of a replica's applied checkpoint.
    pub checkpoint_entries: u64,
    /// How the group reaches its peers; `None` on a node that runs alone.
    pub transport: Option<Arc<crate::raft::transport::Transport>>,
    /// Whether idle groups go quiet (`--raft-quiet`).
    pub quiet: bool,
}

/// What a replica knows of its partition's group.
#[derive(Debug, Clone, Default)]
pub struct ReplicaState {
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    pub term: u64,
    /// Raft index of the last entry in this replica's log, and of the last one it has applied.
    pub last_index: Option<RaftIndex>,
    pub applied_index: Option<RaftIndex>,
    pub voters: Vec<NodeId>,
    /// Members that receive the log without voting.
    pub learners: Vec<NodeId>,
    /// On the leader: each follower's last replicated Raft index.
    pub matched: Vec<(NodeId, Option<RaftIndex>)>,
    /// On the leader: how long ago each follower last acknowledged it (`None`: never).
    pub heard: Vec<(NodeId, Option<std::time::Duration>)>,
    pub positions: Positions,
    /// Topic incarnation this replica belongs to.
    pub uid: TopicUid,
    /// On the leader: how long ago a quorum last acknowledged it (a leader cut off from the
    /// others keeps believing it leads; this ages).
    pub quorum_acked: Option<std::time::Duration>,
    /// The group is quiet: idle, without heartbeats (`shard::partition::quiet`).
    pub quiet: bool,
    /// A mirror's replica (no group): how far behind its source it is.
    pub mirror: Option<MirrorLag>,
}

/// How far a mirror's replica is behind its source (`shard::mirror`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MirrorLag {
    /// The source's committed end when it last answered (0: never).
    pub source_end: Offset,
    /// Offsets the source had committed that this replica does not hold.
    pub records: u64,
    /// How long since the source last answered while this replica held everything it had
    /// committed: how stale the replica may be (under the pull's long poll while it keeps up).
    pub since_caught_up: Duration,
    /// How long since the source last answered (`None`: never since the replica opened).
    pub contact: Option<Duration>,
    /// Why the last pull failed, if it did.
    pub error: Option<String>,
    /// The replica takes no more from its source (the mirror is being promoted).
    pub stopped: bool,
    /// The source's Raft stamps (term, index) of the last batch the replica holds.
    pub last: Option<(u64, u64)>,
    /// The other replica the last pull went through (`None`: the source itself).
    pub via: Option<crate::types::NodeId>,
}

/// Offsets given to the records of one append, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendAck {
    pub offsets: Vec<Offset>,
}

/// What an append came to, when it did not fail.
#[derive(Debug)]
pub enum Appended {
    /// Committed: the offsets its records got.
    Done(AppendAck),
    /// This replica does not lead the partition and wrote nothing of the request: its records
    /// come back, so the caller can send them to the leader without keeping a copy.
    NotLeader {
        leader: Option<NodeId>,
        records: Vec<Record>,
    },
}

impl Appended {
    /// The offsets, or `NotLeader` as an error (for callers that do not forward).
    pub fn into_result(self) -> Result<AppendAck, CoreError> {
        match self {
            Appended::Done(ack) => Ok(ack),
            Appended::NotLeader { leader, .. } => Err(CoreError::NotLeader { leader }),
        }
    }
}

/// Where a reader starts in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The first record still stored.
    Earliest,
    /// The end of what is committed: only records published from now on.
    Latest,
    /// This offset (not checked against the range: a read from it is).
    Offset(Offset),
    /// The first record stamped at or after this time (the end when there is none).
    Time(TimestampMs),
    /// The last this many data records (control records do not count).
    Last(u64),
}

/// A partition's committed range and a resolved start position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedOffsets {
    pub start: Offset,
    pub end: Offset,
    pub offset: Offset,
    /// When a follower answered a position relative to the end from its own view: its
    /// leader, whose answer is current.
    pub follower_of: Option<crate::types::NodeId>,
}

/// Committed batches read from a partition.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub batches: Vec<Batch>,
    /// The offset read from (the first batch may start before it): the one asked for, or
    /// past the batches of control records only that a long poll skipped.
    pub from: Offset,
    /// Records at or past this are not committed yet.
    pub until: Offset,
    pub start: Offset,
    pub high_watermark: Offset,
    /// Read from a mirror's replica: its progress from its source.
    pub mirror: Option<MirrorLag>,
}

/// What opening a partition's replica needs.
#[derive(Clone)]
pub struct OpenPartition {
    pub key: PartitionKey,
    /// The topic's incarnation (a topic deleted and created again is another group).
    pub uid: TopicUid,
    pub dir: PathBuf,
    pub config: LogConfig,
    pub replica: ReplicaSettings,
    /// The group's voters, used when the group is new. Empty: this replica joins an existing
    /// group (it was added to it by a move) and waits for the leader to bring it in as a learner.
    pub voters: BTreeMap<NodeId, Member>,
    /// Of a new group's voters, the one that campaigns first (`cluster::plan::Open::first`);
    /// the others wait longer before their first election, so a new group is not split
    /// between candidates. `None`: every voter waits the same.
    pub first: Option<NodeId>,
    /// A mirror topic's replica: a log without a Raft group, filled by pulls (`shard::mirror`).
    pub mirror: bool,
    /// The topic is a promoted mirror: where its partition's copied log ends, and the voters
    /// of the group it becomes. A replica that was the mirror's is converted once
    /// (`raft::store::promote`) before its group starts.
    pub promoted: Option<(crate::raft::store::Promoted, BTreeMap<NodeId, Member>)>,
}

/// The membership a group's leader is asked to reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberTarget {
    /// Exactly these nodes vote.
    pub voters: BTreeMap<NodeId, Member>,
    /// These nodes receive the log without voting; other learners are dropped.
    pub learners: BTreeMap<NodeId, Member>,
}

/// How far a group got towards its target membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberProgress {
    /// The group's membership is the target.
    Done,
    /// A new voter is still catching up as a learner: ask again later.
    CatchingUp { node: NodeId, behind: u64 },
}

pub enum CoreRequest {
    /// Opens (creating if needed) the log of a partition this core owns.
    Open {
        open: Box<OpenPartition>,
        reply: Reply<()>,
    },
    /// Closes a partition's log (before its files are deleted).
    Close { key: PartitionKey, reply: Reply<()> },
    Append {
        key: PartitionKey,
        records: Vec<Record>,
        /// Set for an idempotent producer: retries of committed sequences are not written again.
        producer: Option<ProducerSeq>,
        reply: Reply<Appended>,
    },
    /// Committed batches from `from`; waits up to `max_wait` when there are none yet.
    Fetch {
        key: PartitionKey,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
        /// Refuse (`Stale`) on a follower too far behind its leader: a client's read, which
        /// may go to another replica (the node's own metadata reads do not ask this).
        fresh: bool,
        /// Every batch as stored, control ones too (a mirror's pull), rather than waiting past
        /// batches of control records only.
        whole: bool,
        reply: Reply<Fetched>,
    },
    Positions {
        key: PartitionKey,
        reply: Reply<Positions>,
    },
    /// Purges the group's log behind a snapshot at the last entry that ends at or before
    /// `before` (the metadata log, once a checkpoint covers it).
    Compact {
        key: PartitionKey,
        before: crate::types::Offset,
        reply: Reply<()>,
    },
    /// The partition's committed range, and where a start position falls in it.
    ListOffsets {
        key: PartitionKey,
        at: StartAt,
        reply: Reply<ListedOffsets>,
    },
    /// Raft messages from a peer for groups on this core; one reply per message.
    Raft {
        messages: Vec<(PartitionKey, u64, pb::RaftRequest)>,
        reply: Reply<Vec<pb::RaftReply>>,
    },
    /// The state of a replica's group.
    Replica {
        key: PartitionKey,
        reply: Reply<ReplicaState>,
    },
    /// The states of several replicas' groups on the core, in the order asked (`None`: not
    /// open here), in one round trip (ClusterInfo of a topic of many partitions).
    Replicas {
        keys: Vec<PartitionKey>,
        reply: Reply<Vec<Option<ReplicaState>>>,
    },
    /// The state of every replica on the core, at most `limit` of them (metrics).
    States {
        limit: usize,
        reply: Reply<Vec<(PartitionKey, ReplicaState)>>,
    },
    /// Hands the leadership of every group this core leads to its most caught-up follower
    /// (before a graceful shutdown); answers how many transfers were asked.
    HandOff { reply: Reply<usize> },
    /// Asks a group this core leads to hand leadership to `to`; answers whether it asked.
    TransferLeader {
        key: PartitionKey,
        to: NodeId,
        reply: Reply<bool>,
    },
    /// Moves a group towards a membership; only its leader can.
    Members {
        key: PartitionKey,
        target: MemberTarget,
        reply: Reply<MemberProgress>,
    },
    /// Takes what a mirror's replica pulled from its source; answers the log's positions.
    Mirror {
        key: PartitionKey,
        pulled: crate::shard::mirror::Pulled,
        reply: Reply<Positions>,
    },
    /// Runs a closure on the core (how the network shard completes the core's own futures:
    /// glommio 0.9 loses wake-ups from other threads).
    Run(Box<dyn FnOnce() + Send>),
    /// Flushes and closes every log, then stops the core.
    Shutdown { reply: Reply<()> },
}
