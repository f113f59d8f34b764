//! What the network shard asks a core, and what the core answers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::channel::oneshot;

use crate::log::{Batch, LogConfig, LogError, Positions, Record};
use crate::types::{Offset, TimestampMs};

/// A partition of a topic.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PartitionKey {
    pub topic: Arc<str>,
    pub partition: u32,
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
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
    Busy(u32),
    /// This replica does not lead the partition; nothing was written.
    #[error("not the partition leader (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    NotLeader { leader: Option<u64> },
    /// The leader changed while the records were being replicated: they may or may not be
    /// committed. A retry may duplicate them (idempotent producers will deduplicate).
    #[error("leader changed during the write; the records may or may not be committed (leader: {})", leader.map_or("unknown".to_string(), |l| format!("node {l}")))]
    LeaderChanged { leader: Option<u64> },
    /// The partition's Raft group failed and stopped.
    #[error("replication failed: {0}")]
    Raft(String),
}

pub type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// Who this node is in a partition's Raft group.
#[derive(Debug, Clone)]
pub struct ReplicaSettings {
    pub node_id: crate::raft::types::NodeId,
    pub member: crate::raft::types::Member,
    pub timing: crate::raft::Timing,
}

/// Offsets given to the records of one append, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendAck {
    pub offsets: Vec<Offset>,
}

/// Committed batches read from a partition.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub batches: Vec<Batch>,
    /// The offset asked for (the first batch may start before it).
    pub from: Offset,
    /// Records at or past this are not committed yet.
    pub until: Offset,
    pub start: Offset,
    pub high_watermark: Offset,
}

pub enum CoreRequest {
    /// Opens (creating if needed) the log of a partition this core owns.
    Open {
        key: PartitionKey,
        dir: PathBuf,
        config: LogConfig,
        replica: ReplicaSettings,
        reply: Reply<()>,
    },
    /// Closes a partition's log (before its files are deleted).
    Close { key: PartitionKey, reply: Reply<()> },
    Append {
        key: PartitionKey,
        records: Vec<Record>,
        reply: Reply<AppendAck>,
    },
    /// Committed batches from `from`; waits up to `max_wait` when there are none yet.
    Fetch {
        key: PartitionKey,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
        reply: Reply<Fetched>,
    },
    Positions {
        key: PartitionKey,
        reply: Reply<Positions>,
    },
    OffsetForTimestamp {
        key: PartitionKey,
        timestamp: TimestampMs,
        reply: Reply<Option<Offset>>,
    },
    /// Flushes and closes every log, then stops the core.
    Shutdown { reply: Reply<()> },
}
