//! A group's side of the network: openraft's `RaftNetworkV2` for one group, whose calls go
//! through the node's [`Transport`] (batched per peer), and the handling of a peer's message on
//! the core that owns its group.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;
use openraft::error::{RPCError, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};

use super::error::RaftError;
use super::store::LogSnapshot;
use super::transport::{Answer, Outgoing, Transport};
use super::types::{Member, NodeId, PartitionRaft, Vote};
use super::wire;
use crate::proto::internal as pb;
use crate::types::CoreId;

/// The network of one group on one core: makes a client per peer.
pub struct GroupNetwork {
    pub transport: Arc<Transport>,
    pub core: CoreId,
    pub group: pb::Group,
    /// Set by the replica while, as leader, it announces that its group goes quiet: its
    /// heartbeats then carry `quiet` (see `shard::partition::quiet`).
    pub quiet: Rc<Cell<bool>>,
    /// The least time an append carrying entries is given (the shortest election timeout).
    pub entries_ttl: std::time::Duration,
}

/// One group's client of one peer.
pub struct GroupClient {
    transport: Arc<Transport>,
    core: CoreId,
    group: pb::Group,
    target: NodeId,
    addr: String,
    quiet: Rc<Cell<bool>>,
    entries_ttl: std::time::Duration,
}

impl RaftNetworkFactory<PartitionRaft> for GroupNetwork {
    type Network = GroupClient;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> GroupClient {
        GroupClient {
            transport: self.transport.clone(),
            core: self.core,
            group: self.group.clone(),
            target,
            addr: node.addr.clone(),
            quiet: self.quiet.clone(),
            entries_ttl: self.entries_ttl,
        }
    }
}

/// The slowest transfer a call's time allows for: its bytes at this rate, on top of openraft's
/// limit (one heartbeat interval), which an append of a large batch cannot meet: a 12 MB batch
/// timed out at every try under a 50 ms heartbeat and never replicated (found by the tests'
/// large-record client on a debug build).
const TRANSFER_BYTES_PER_SEC_MIN: u64 = 4 << 20;

/// Extra time for a call carrying `bytes` of records.
fn transfer_time(bytes: usize) -> std::time::Duration {
    std::time::Duration::from_millis(bytes as u64 * 1000 / TRANSFER_BYTES_PER_SEC_MIN)
}

fn unreachable(e: RaftError) -> RPCError<PartitionRaft> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl GroupClient {
    async fn call(
        &self,
        body: pb::raft_request::Body,
        option: &RPCOption,
    ) -> Result<Bytes, RPCError<PartitionRaft>> {
        let payload_bytes = match &body {
            pb::raft_request::Body::Append(a) => a
                .entries
                .iter()
                .map(|e| match &e.payload {
                    Some(pb::entry::Payload::Batch(b)) => b.len(),
                    _ => 0,
                })
                .sum(),
            _ => 0,
        };
        let carries_entries =
            matches!(&body, pb::raft_request::Body::Append(a) if !a.entries.is_empty());
        // Only a heartbeat (an append without entries) announces quiet.
        let quiet = self.quiet.get()
            && matches!(&body, pb::raft_request::Body::Append(a) if a.entries.is_empty());
        let (tx, rx) = oneshot::channel();
        let out = Outgoing {
            core: self.core,
            message: pb::RaftRequest {
                call_id: 0,
                group: Some(self.group.clone()),
                body: Some(body),
                quiet,
            },
            reply: tx,
        };
        self.transport
            .send(self.target, &self.addr, out)
            .map_err(unreachable)?;
        // openraft gives an append one heartbeat interval. Entries are given at least the
        // shortest election timeout: across regions a round trip can be most of an interval
        // (or more), and an append timed out there is sent again and again while the write
        // waits (a 40 ms round trip under a 50 ms interval stalled writes on a loaded machine
        // for over 30 s). Waiting longer costs nothing: the follower's answer is what the
        // write needs, and a dead follower's replication stream is its own.
        let base = if carries_entries {
            option.hard_ttl().max(self.entries_ttl)
        } else {
            option.hard_ttl()
        };
        let ttl = base + transfer_time(payload_bytes);
        match glommio::timer::timeout(ttl, async { Ok(rx.await) }).await {
            Ok(Ok(Ok(bytes))) => Ok(bytes),
            Ok(Ok(Err(e))) => Err(unreachable(e)),
            Ok(Err(_)) => Err(unreachable(RaftError::ShuttingDown)),
            Err(_) => Err(unreachable(RaftError::Timeout {
                node: self.target,
                after: ttl,
            })),
        }
    }
}

impl openraft::network::v2::RaftNetworkV2<PartitionRaft> for GroupClient {
    type SnapshotData = LogSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let body = pb::raft_request::Body::Append(wire::encode_append(&rpc));
        let bytes = self.call(body, &option).await?;
        wire::decode_append_response(&bytes).map_err(unreachable)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let body = pb::raft_request::Body::Vote(wire::encode_vote(&rpc));
        let bytes = self.call(body, &option).await?;
        wire::decode_vote_response(&bytes).map_err(unreachable)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let body = pb::raft_request::Body::PreVote(wire::encode_vote(&rpc));
        let bytes = self.call(body, &option).await?;
        wire::decode_vote_response(&bytes).map_err(unreachable)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let body = pb::raft_request::Body::TransferLeader(wire::encode_transfer_leader(&req));
        let bytes = self.call(body, &option).await?;
        wire::decode_transfer_leader_response(&bytes).map_err(unreachable)
    }

    /// A snapshot is its meta and end offset: the follower restarts its log there (records
    /// before it are what retention deleted) and the leader then sends it the entries after.
    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::alias::SnapshotOf<PartitionRaft, LogSnapshot>,
        _cancel: impl std::future::Future<Output = openraft::error::ReplicationClosed> + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<PartitionRaft>, StreamingError<PartitionRaft>> {
        let message = wire::SnapshotMessage {
            vote,
            meta: snapshot.meta,
            end: snapshot.snapshot.end.0,
        };
        let body = pb::raft_request::Body::InstallSnapshot(wire::encode_snapshot(&message));
        let failed = |e: RaftError| StreamingError::Unreachable(Unreachable::new(&e));
        let bytes = self.call(body, &option).await.map_err(|e| {
            failed(RaftError::Unreachable {
                node: self.target,
                why: e.to_string(),
            })
        })?;
        wire::decode_snapshot_response(&bytes).map_err(failed)
    }
}

fn stopped(e: impl std::fmt::Display) -> RaftError {
    RaftError::Stopped(e.to_string())
}

/// What a handled message means for the replica's election timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contact {
    /// Nothing: the timer runs on.
    None,
    /// A message from a leader this replica accepts: the timeout starts over.
    Leader,
    /// This replica granted a (pre-)vote: it holds back its own candidacy for a while, so the
    /// candidate can finish its round instead of splitting it.
    GrantedVote,
}

/// Handles one message from a peer on the core that owns its group; `contact` says what it
/// means for the election timer.
pub async fn handle(
    raft: &super::group::PartitionGroup,
    body: pb::raft_request::Body,
    contact: &mut Contact,
) -> Answer {
    let granted = |r: &openraft::raft::VoteResponse<PartitionRaft>| {
        if r.vote_granted {
            Contact::GrantedVote
        } else {
            Contact::None
        }
    };
    use pb::raft_request::Body;
    match body {
        Body::Append(a) => {
            let rpc = wire::decode_append(a)?;
            let r = raft.append_entries(rpc).await.map_err(stopped)?;
            if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                *contact = Contact::Leader;
            }
            Ok(wire::encode_append_response(&r))
        }
        Body::Vote(v) => {
            let rpc = wire::decode_vote(&v)?;
            let r = raft.vote(rpc).await.map_err(stopped)?;
            *contact = granted(&r);
            Ok(wire::encode_vote_response(&r))
        }
        Body::PreVote(v) => {
            let rpc = wire::decode_vote(&v)?;
            let r = raft.pre_vote(rpc).await.map_err(stopped)?;
            *contact = granted(&r);
            Ok(wire::encode_vote_response(&r))
        }
        Body::InstallSnapshot(b) => {
            let m = wire::decode_snapshot(&b)?;
            let snapshot = openraft::Snapshot {
                meta: m.meta,
                snapshot: LogSnapshot {
                    end: crate::types::Offset(m.end),
                },
            };
            let r = raft
                .install_full_snapshot(m.vote, snapshot)
                .await
                .map_err(stopped)?;
            *contact = Contact::Leader;
            Ok(wire::encode_snapshot_response(&r))
        }
        Body::TransferLeader(t) => {
            let rpc = wire::decode_transfer_leader(&t)?;
            let r = raft.handle_transfer_leader(rpc).await.map_err(stopped)?;
            // The leader is handing over: a new leader is on its way, so every replica gives
            // it a whole election timeout (the target campaigns at once; without this, its own
            // timer or another follower's could fire mid-transfer and start a second election).
            if r.is_ok() {
                *contact = Contact::Leader;
            }
            Ok(wire::encode_transfer_leader_response(&r))
        }
    }
}
