//! A group's side of the network: openraft's `RaftNetworkV2` for one group, whose calls go
//! through the node's [`Transport`] (batched per peer), and the handling of a peer's message on
//! the core that owns its group.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{RPCError, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendError,
    StreamAppendResult, TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};

use super::early;
use super::error::RaftError;
use super::store::LogSnapshot;
use super::transport::{Answer, Outgoing, Transport};
use super::types::{LogId, Member, NodeId, PartitionRaft, Vote};
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
    /// What this replica, as leader, holds durably, for appends to far followers to carry.
    pub reports: Rc<early::Reports>,
}

/// A follower at least this far away (its least round trip lately) is told what its leader
/// holds durably (see `raft::early`). A nearer one learns the commit from the leader's next
/// append soon enough.
pub const REPORT_ROUND_TRIP_MIN: std::time::Duration = std::time::Duration::from_millis(2);

/// Whether `target` is far enough to be told its leader's durable reports.
pub fn far(transport: &Transport, target: NodeId) -> bool {
    transport
        .pipelining_round_trip(target)
        .is_some_and(|rt| rt >= REPORT_ROUND_TRIP_MIN)
}

pub fn report_to_wire(d: early::Durable) -> pb::DurableReport {
    pb::DurableReport {
        leader: d.leader.0,
        term: d.term,
        index: d.index,
        also: d.also.iter().flatten().map(|n| n.0).collect(),
    }
}

/// A report as a follower takes it: holders past [`early::ALSO_MAX`] are not counted.
pub fn report_from_wire(r: &pb::DurableReport) -> early::Durable {
    let mut also = [None; early::ALSO_MAX];
    for (slot, n) in also.iter_mut().zip(&r.also) {
        *slot = Some(NodeId(*n));
    }
    early::Durable {
        leader: NodeId(r.leader),
        term: r.term,
        index: r.index,
        also,
    }
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
    reports: Rc<early::Reports>,
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
            reports: self.reports.clone(),
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

    async fn append(
        &self,
        rpc: &AppendEntriesRequest<PartitionRaft>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let mut append = wire::encode_append(rpc);
        // A leader holds a report only when it has a far follower: a near group's appends do
        // not look at round trips.
        let told = self
            .reports
            .held()
            .filter(|_| far(&self.transport, self.target))
            .and_then(|_| self.reports.tell(self.target, rpc.vote.leader_id().term));
        if let Some(d) = told {
            append.durable = Some(report_to_wire(d));
            crate::metrics::NODE.durable_reports.inc();
        }
        let body = pb::raft_request::Body::Append(append);
        let answer = self.call(body, option).await;
        if told.is_some() && answer.is_err() {
            self.reports.forget(self.target);
        }
        let response = wire::decode_append_response(&answer?).map_err(unreachable)?;
        // In a group of more than three voters, what this follower holds goes into the
        // leader's reports to the far ones (see `raft::early`).
        if self.reports.counts_others() {
            let held = match &response {
                AppendEntriesResponse::Success => last_log_id(rpc),
                AppendEntriesResponse::PartialSuccess(m) => *m,
                _ => None,
            };
            if let Some(h) = held {
                self.reports
                    .matched(self.target, rpc.vote.leader_id().term, h.index);
            }
        }
        Ok(response)
    }

    /// How many appends may be in flight to this follower now.
    fn window(&self) -> usize {
        appends_in_flight(self.transport.pipelining_round_trip(self.target))
    }

    /// One append of a pipeline: its result as openraft's stream wants it, and whether the
    /// stream must stop after it.
    async fn pipelined(
        &self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<(StreamAppendResult<PartitionRaft>, bool), RPCError<PartitionRaft>> {
        let prev = rpc.prev_log_id;
        let last = last_log_id(&rpc);
        let response = self.append(&rpc, &option).await?;
        stream_result(prev, last, response)
    }
}

/// The last entry an append leaves the follower's log matching the leader's at, if it is
/// taken: its last entry, or (without entries) the one before them.
fn last_log_id(rpc: &AppendEntriesRequest<PartitionRaft>) -> Option<LogId> {
    rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id)
}

/// An append's answer as openraft's stream wants it (for an append of the entries after `prev`
/// up to `last`), and whether the stream must stop after it: a refusal, or a follower that
/// took only part of it.
fn stream_result(
    prev: Option<LogId>,
    last: Option<LogId>,
    response: AppendEntriesResponse<PartitionRaft>,
) -> Result<(StreamAppendResult<PartitionRaft>, bool), RPCError<PartitionRaft>> {
    // openraft's conversion takes a conflict's place from `prev` (and panics without one);
    // a follower cannot disagree about the log before its first entry.
    if response.is_conflict() && prev.is_none() {
        return Err(unreachable(RaftError::Remote(
            "a conflict at the start of the log".into(),
        )));
    }
    if response.is_conflict() {
        crate::metrics::NODE.append_conflicts.inc();
    }
    let partial = matches!(response, AppendEntriesResponse::PartialSuccess(m) if m != last);
    let result = response.into_stream_result(prev, last);
    let stop = partial || result.is_err();
    Ok((result, stop))
}

/// Appends one group has in flight to one follower: one, plus one per `APPEND_SPACING` of the
/// round trip to the follower's node (the least seen lately, so a peer stalled for a while does
/// not open the window), up to `APPENDS_IN_FLIGHT_MAX`. openraft makes an append
/// of everything the leader's log holds past the previous one as soon as it is submitted
/// (before the leader's own fsync), so with a window a record leaves at once instead of
/// waiting for the answer to the append on the wire (up to a round trip). A full window holds
/// the next append back; it then carries everything written meanwhile. Near peers get one at a
/// time: the wait is short there, and more, smaller appends cost CPU (replicated-max on one
/// machine: 38.8k records/s with one, 33.7k with eight; geo-sync at 40 ms: publish p99 87 ms
/// with one, 58 ms with 32).
const APPENDS_IN_FLIGHT_MAX: usize = 32;
const APPEND_SPACING: std::time::Duration = std::time::Duration::from_millis(2);
/// How often a pipeline looks at the round trip again.
const WINDOW_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// The appends in flight for a follower this far away (see `APPENDS_IN_FLIGHT_MAX`).
pub(super) fn appends_in_flight(round_trip: Option<std::time::Duration>) -> usize {
    let far = round_trip.map_or(0, |rt| rt.as_micros() / APPEND_SPACING.as_micros());
    (1 + far as usize).min(APPENDS_IN_FLIGHT_MAX)
}

type Pipelined<'s> =
    LocalBoxFuture<'s, Result<(StreamAppendResult<PartitionRaft>, bool), RPCError<PartitionRaft>>>;

/// Where a [`Pipeline`] sends its appends: a group's client of one follower (a fake in tests).
trait Sender<'s> {
    /// How many appends may be in flight now.
    fn window(&self) -> usize;
    fn send(&self, rpc: AppendEntriesRequest<PartitionRaft>) -> Pipelined<'s>;
}

struct ToFollower<'s> {
    client: &'s GroupClient,
    option: RPCOption,
}

impl<'s> Sender<'s> for ToFollower<'s> {
    fn window(&self) -> usize {
        self.client.window()
    }

    fn send(&self, rpc: AppendEntriesRequest<PartitionRaft>) -> Pipelined<'s> {
        Box::pin(self.client.pipelined(rpc, self.option.clone()))
    }
}

/// openraft's stream of appends to one follower, sent without waiting for the answers of
/// those before (up to [`appends_in_flight`]); the answers come out in the order sent. The
/// transport delivers a link's exchanges to the follower's core in order (`Transport::turn`),
/// so the follower's Raft takes the appends in order; one that overtakes another anyway is
/// refused as a conflict, and openraft starts a new stream from what the follower has (safe,
/// at the cost of a round trip).
struct Pipeline<'s, S, T> {
    sender: T,
    input: S,
    in_flight: FuturesOrdered<Pipelined<'s>>,
    /// How many may be in flight, and when that was worked out.
    window: usize,
    window_at: std::time::Instant,
    input_done: bool,
    /// The last entry the follower acknowledged on this stream.
    acked: Option<LogId>,
    /// An error, a refusal or a partial answer was given out: the stream ends (openraft
    /// starts another from what the follower has), and the answers still on their way are
    /// dropped.
    stopped: bool,
}

impl<'s, S, T: Sender<'s>> Pipeline<'s, S, T> {
    fn new(sender: T, input: S) -> Self {
        Pipeline {
            window: sender.window(),
            window_at: std::time::Instant::now(),
            sender,
            input,
            in_flight: FuturesOrdered::new(),
            input_done: false,
            acked: None,
            stopped: false,
        }
    }
}

impl<'s, S, T> Stream for Pipeline<'s, S, T>
where
    S: Stream<Item = AppendEntriesRequest<PartitionRaft>> + Unpin,
    T: Sender<'s> + Unpin,
{
    type Item = Result<StreamAppendResult<PartitionRaft>, RPCError<PartitionRaft>>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.stopped {
            return Poll::Ready(None);
        }
        if this.window_at.elapsed() >= WINDOW_REFRESH {
            this.window = this.sender.window();
            this.window_at = std::time::Instant::now();
        }
        while !this.input_done && this.in_flight.len() < this.window.max(1) {
            match this.input.poll_next_unpin(cx) {
                Poll::Ready(Some(rpc)) => this.in_flight.push_back(this.sender.send(rpc)),
                Poll::Ready(None) => this.input_done = true,
                Poll::Pending => break,
            }
        }
        match this.in_flight.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok((result, stop)))) => {
                this.stopped = stop;
                match &result {
                    Ok(Some(m)) => this.acked = this.acked.max(Some(*m)),
                    // Refused for lacking an entry the follower has acknowledged on this
                    // stream: the append overtook the one before it on the way (the
                    // follower's log did not go back). The stream ends where the follower is,
                    // and openraft goes on from there; given to it, the conflict would read
                    // as a follower whose log went backwards, and it would search for the
                    // match again and send entries the follower has.
                    Err(StreamAppendError::Conflict(at))
                        if this.acked.is_some_and(|a| at.index <= a.index) =>
                    {
                        return Poll::Ready(None);
                    }
                    _ => {}
                }
                Poll::Ready(Some(Ok(result)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.stopped = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) if this.input_done => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
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
        self.append(&rpc, &option).await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<PartitionRaft>, RPCError<PartitionRaft>>>,
            RPCError<PartitionRaft>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<PartitionRaft>>
            + openraft::OptionalSend
            + Unpin
            + 'static,
    {
        let client: &'s GroupClient = self;
        Box::pin(async move {
            let pipeline: BoxStream<'s, _> =
                Box::pin(Pipeline::new(ToFollower { client, option }, input));
            Ok(pipeline)
        })
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
        // Taken by the partition before it gets here (`Partition::handle`); nothing to answer.
        Body::Durable(_) => Ok(Bytes::new()),
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::task::{Context, Poll};

    use openraft::entry::RaftEntry;

    use super::*;
    use crate::raft::types::{log_id, Entry};

    #[test]
    fn a_report_keeps_its_named_holders_on_the_wire_and_takes_at_most_three() {
        let mut d = early::Durable {
            leader: NodeId(1),
            term: 4,
            index: 9,
            ..Default::default()
        };
        assert_eq!(report_from_wire(&report_to_wire(d)), d);
        d.also = [Some(NodeId(3)), Some(NodeId(5)), None];
        let wire = report_to_wire(d);
        assert_eq!(wire.also, [3, 5]);
        assert_eq!(report_from_wire(&wire), d);
        // A peer naming more than a report holds: the first three are kept, nothing fails.
        let many = pb::DurableReport {
            also: vec![2, 3, 4, 5, 6],
            ..wire
        };
        assert_eq!(
            report_from_wire(&many).also,
            [Some(NodeId(2)), Some(NodeId(3)), Some(NodeId(4))]
        );
    }

    /// A follower that answers when the test says, and notes what it was sent.
    #[derive(Default)]
    struct Follower {
        window: usize,
        waiting: RefCell<Vec<(u64, oneshot::Sender<AppendEntriesResponse<PartitionRaft>>)>>,
    }

    impl<'s> Sender<'s> for &'s Follower {
        fn window(&self) -> usize {
            self.window
        }

        fn send(&self, rpc: AppendEntriesRequest<PartitionRaft>) -> Pipelined<'s> {
            let (tx, rx) = oneshot::channel();
            let prev = rpc.prev_log_id;
            let last = rpc.entries.last().map(|e| e.log_id).or(prev);
            self.waiting
                .borrow_mut()
                .push((last.expect("entries").index, tx));
            Box::pin(async move { stream_result(prev, last, rx.await.expect("answered")) })
        }
    }

    impl Follower {
        /// Answers the append that ends at `index`.
        fn answer(&self, index: u64, response: AppendEntriesResponse<PartitionRaft>) {
            let mut w = self.waiting.borrow_mut();
            let at = w.iter().position(|(i, _)| *i == index).expect("sent");
            let _ = w.remove(at).1.send(response);
        }

        fn sent(&self) -> Vec<u64> {
            self.waiting.borrow().iter().map(|(i, _)| *i).collect()
        }
    }

    /// Appends of one entry each: indexes 1..=n, term 1.
    fn appends(n: u64) -> Vec<AppendEntriesRequest<PartitionRaft>> {
        appends_from(1, n)
    }

    /// Appends of one entry each: indexes first..=last, term 1.
    fn appends_from(first: u64, last: u64) -> Vec<AppendEntriesRequest<PartitionRaft>> {
        (first..=last)
            .map(|i| AppendEntriesRequest {
                vote: Vote::new_committed(1, NodeId(1)),
                prev_log_id: (i > 1).then(|| log_id(1, i - 1)),
                leader_commit: None,
                entries: vec![Entry::new_blank(log_id(1, i))],
            })
            .collect()
    }

    fn poll<S: Stream + Unpin>(s: &mut S) -> Poll<Option<S::Item>> {
        s.poll_next_unpin(&mut Context::from_waker(futures::task::noop_waker_ref()))
    }

    fn acked(
        p: Poll<Option<Result<StreamAppendResult<PartitionRaft>, RPCError<PartitionRaft>>>>,
    ) -> u64 {
        match p {
            Poll::Ready(Some(Ok(Ok(Some(m))))) => m.index,
            other => panic!("expected an acknowledgment, got {other:?}"),
        }
    }

    #[test]
    fn a_pipeline_keeps_its_window_full_and_gives_the_answers_in_the_order_sent() {
        let follower = Follower {
            window: 3,
            ..Default::default()
        };
        let mut p = Pipeline::new(&follower, futures::stream::iter(appends(6)));
        assert!(poll(&mut p).is_pending());
        assert_eq!(follower.sent(), vec![1, 2, 3], "three in flight, not more");
        // The third and second are answered first: nothing comes out before the first.
        follower.answer(3, AppendEntriesResponse::Success);
        follower.answer(2, AppendEntriesResponse::Success);
        assert!(poll(&mut p).is_pending());
        assert_eq!(follower.sent(), vec![1], "no room until an answer is taken");
        follower.answer(1, AppendEntriesResponse::Success);
        assert_eq!(acked(poll(&mut p)), 1);
        assert_eq!(acked(poll(&mut p)), 2);
        assert_eq!(acked(poll(&mut p)), 3);
        // Room is refilled as answers are taken (one per poll here).
        assert_eq!(follower.sent(), vec![4, 5]);
        assert!(poll(&mut p).is_pending());
        assert_eq!(follower.sent(), vec![4, 5, 6]);
        for i in 4..=6 {
            follower.answer(i, AppendEntriesResponse::Success);
        }
        assert_eq!(
            (4..=6).map(|_| acked(poll(&mut p))).collect::<Vec<_>>(),
            vec![4, 5, 6]
        );
        // The input is done and everything answered: the stream ends.
        assert!(matches!(poll(&mut p), Poll::Ready(None)));
    }

    #[test]
    fn a_refused_append_ends_the_pipeline_and_the_answers_after_it_are_dropped() {
        let follower = Follower {
            window: 4,
            ..Default::default()
        };
        // The follower lacks entry 4 (its log ends before, or differs there).
        let mut p = Pipeline::new(&follower, futures::stream::iter(appends_from(5, 12)));
        assert!(poll(&mut p).is_pending());
        follower.answer(5, AppendEntriesResponse::Conflict);
        follower.answer(6, AppendEntriesResponse::Conflict);
        match poll(&mut p) {
            Poll::Ready(Some(Ok(Err(StreamAppendError::Conflict(at))))) => {
                assert_eq!(at, log_id(1, 4))
            }
            other => panic!("expected the conflict, got {other:?}"),
        }
        // Nothing after a refusal: openraft starts again from what the follower has.
        assert!(matches!(poll(&mut p), Poll::Ready(None)));
        assert!(matches!(poll(&mut p), Poll::Ready(None)));
    }

    #[test]
    fn an_append_that_overtook_an_acknowledged_one_ends_the_stream_without_a_conflict() {
        let follower = Follower {
            window: 4,
            ..Default::default()
        };
        let mut p = Pipeline::new(&follower, futures::stream::iter(appends(8)));
        assert!(poll(&mut p).is_pending());
        // 3 reached the follower before 2 and was refused; 2 was then taken.
        follower.answer(1, AppendEntriesResponse::Success);
        follower.answer(2, AppendEntriesResponse::Success);
        follower.answer(3, AppendEntriesResponse::Conflict);
        assert_eq!(acked(poll(&mut p)), 1);
        assert_eq!(acked(poll(&mut p)), 2);
        // The follower has what the refused append needed: the stream ends at 2 (openraft
        // goes on from there) instead of reporting a log that went back.
        assert!(matches!(poll(&mut p), Poll::Ready(None)));
        assert!(matches!(poll(&mut p), Poll::Ready(None)));
    }

    #[test]
    fn a_conflict_before_the_first_entry_is_an_error_not_a_panic() {
        let r = stream_result(None, Some(log_id(1, 1)), AppendEntriesResponse::Conflict);
        assert!(r.is_err());
        let (r, stop) = stream_result(
            Some(log_id(1, 1)),
            Some(log_id(1, 5)),
            AppendEntriesResponse::PartialSuccess(Some(log_id(1, 3))),
        )
        .unwrap();
        assert_eq!(r.unwrap(), Some(log_id(1, 3)));
        assert!(stop, "a partial answer ends the stream");
    }

    #[test]
    fn a_follower_further_away_gets_more_appends_in_flight() {
        let ms = std::time::Duration::from_millis;
        // Unknown or near: one at a time (openraft's sequential replication).
        assert_eq!(appends_in_flight(None), 1);
        assert_eq!(appends_in_flight(Some(ms(1))), 1);
        assert_eq!(appends_in_flight(Some(ms(40))), 21);
        assert_eq!(appends_in_flight(Some(ms(1000))), APPENDS_IN_FLIGHT_MAX);
    }
}
