//! Three replicas of one partition's Raft group on one glommio executor, wired by an in-memory
//! network that can cut a node off. Storage is the real partition log on disk.
//!
//! The test tries to break the guarantees: a leader is isolated while clients write to it, a
//! new leader takes over, the old one rejoins and must drop its divergent tail, and a replica
//! restarts from its files. Every acknowledged record must be on every replica, once, in order;
//! nothing unacknowledged may surface as committed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::error::{
    ForwardReason, NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft_rt::AsyncRuntime;
use tern::log::{BatchBuilder, Log, LogConfig, ReadBound, Record};
use tern::raft::group::{self, PartitionGroup};
use tern::raft::store::LogSnapshot;
use tern::raft::types::{EntryBatch, Member, NodeId, PartitionRaft, Vote};
use tern::raft::{GlommioRuntime, Timing};
use tern::types::{Offset, TimestampMs};

type Snap = openraft::alias::SnapshotOf<PartitionRaft, LogSnapshot>;

#[derive(Clone, Default)]
struct Router(Rc<RefCell<RouterInner>>);

#[derive(Default)]
struct RouterInner {
    groups: BTreeMap<NodeId, PartitionGroup>,
    isolated: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct Cut(String);
impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Cut {}

impl Router {
    fn target(
        &self,
        from: NodeId,
        to: NodeId,
    ) -> Result<PartitionGroup, Unreachable<PartitionRaft>> {
        let r = self.0.borrow();
        if r.isolated.contains(&from) || r.isolated.contains(&to) {
            return Err(Unreachable::new(&Cut(format!("{from} -> {to} is cut"))));
        }
        r.groups
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::new(&Cut(format!("node {to} is down"))))
    }
}

struct Net {
    from: NodeId,
    to: NodeId,
    router: Router,
}

impl RaftNetworkV2<PartitionRaft> for Net {
    type SnapshotData = LogSnapshot;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let t = self.router.target(self.from, self.to)?;
        t.append_entries(rpc)
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<PartitionRaft>,
        _option: RPCOption,
    ) -> Result<VoteResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let t = self.router.target(self.from, self.to)?;
        t.vote(rpc)
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<PartitionRaft>,
        _option: RPCOption,
    ) -> Result<VoteResponse<PartitionRaft>, RPCError<PartitionRaft>> {
        let t = self.router.target(self.from, self.to)?;
        t.pre_vote(rpc)
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snap,
        _cancel: impl Future<Output = ReplicationClosed> + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<PartitionRaft>, StreamingError<PartitionRaft>> {
        let t = self.router.target(self.from, self.to)?;
        t.install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))
    }
}

struct Factory {
    id: NodeId,
    router: Router,
}

impl RaftNetworkFactory<PartitionRaft> for Factory {
    type Network = Net;

    async fn new_client(&mut self, target: NodeId, _node: &Member) -> Net {
        Net {
            from: self.id,
            to: target,
            router: self.router.clone(),
        }
    }
}

struct Replica {
    id: NodeId,
    dir: tempfile::TempDir,
    log: Log,
    raft: PartitionGroup,
}

fn timing() -> Timing {
    Timing {
        heartbeat_ms: 50,
        election_min_ms: 300,
        election_max_ms: 600,
    }
}

async fn start(id: NodeId, dir: tempfile::TempDir, router: &Router) -> Replica {
    let log = Log::open(dir.path(), LogConfig::default()).await.unwrap();
    let config = group::config("test", timing()).unwrap();
    let factory = Factory {
        id,
        router: router.clone(),
    };
    let raft = group::start(id, config, factory, log.clone(), dir.path())
        .await
        .unwrap();
    router.0.borrow_mut().groups.insert(id, raft.clone());
    Replica { id, dir, log, raft }
}

async fn stop(r: Replica, router: &Router) -> tempfile::TempDir {
    router.0.borrow_mut().groups.remove(&r.id);
    r.raft.shutdown().await.unwrap();
    r.log.close().await.unwrap();
    r.dir
}

fn batch(value: &str) -> EntryBatch {
    let mut b = BatchBuilder::new(1 << 16);
    b.push(&Record {
        key: None,
        value: Bytes::copy_from_slice(value.as_bytes()),
        headers: Vec::new(),
        timestamp: TimestampMs::now(),
        ttl_ms: None,
    })
    .unwrap();
    EntryBatch(b.finish().unwrap())
}

/// The values of every committed data record, in offset order.
async fn committed_values(log: &Log) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = log.positions().start;
    loop {
        let read = match log.read(at, 1 << 20, ReadBound::Committed).await {
            Ok(r) => r,
            Err(e) => panic!(
                "reading {} at {at:?} ({:?}): {e}",
                log.dir().display(),
                log.positions()
            ),
        };
        if read.batches.is_empty() {
            return out;
        }
        for b in &read.batches {
            if b.meta().control {
                continue;
            }
            for r in b.records() {
                if r.offset < read.until {
                    out.push(String::from_utf8(r.value.to_vec()).unwrap());
                }
            }
        }
        at = read.next_offset();
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        GlommioRuntime::sleep(Duration::from_millis(20)).await;
    }
}

async fn leader_among(replicas: &[&Replica]) -> NodeId {
    let mut found = NodeId(0);
    eventually("a leader", || {
        let ids: Vec<Option<NodeId>> = replicas
            .iter()
            .map(|r| r.raft.metrics().borrow_watched().current_leader)
            .collect();
        let candidates: BTreeSet<NodeId> = replicas.iter().map(|r| r.id).collect();
        let agreed = ids
            .first()
            .copied()
            .flatten()
            .filter(|l| ids.iter().all(|i| *i == Some(*l)) && candidates.contains(l));
        if let Some(l) = agreed {
            found = l;
        }
        async move { agreed.is_some() }
    })
    .await;
    found
}

/// A write through `raft`, which leads. A leader just elected takes writes only once a quorum
/// has acknowledged it (openraft's lease: `LeaseExpired` before the first acknowledgement), so
/// that refusal is waited out, for at most 5 s; any other error fails.
async fn write(raft: &PartitionGroup, value: &str) -> (u64, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match raft.client_write(batch(value)).await {
            Ok(resp) => return (resp.data.base, resp.data.end),
            Err(e)
                if e.forward_to_leader().is_some_and(|f| {
                    f.leader_id.is_none() && matches!(f.reason, ForwardReason::LeaseExpired)
                }) && std::time::Instant::now() < deadline =>
            {
                GlommioRuntime::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("write {value}: {e:?}"),
        }
    }
}

async fn converged(replicas: &[&Replica], acked: &[String]) {
    eventually("replicas to commit every acknowledged record", || {
        let logs: Vec<Log> = replicas.iter().map(|r| r.log.clone()).collect();
        let acked = acked.to_vec();
        async move {
            for log in &logs {
                if committed_values(log).await != acked {
                    return false;
                }
            }
            true
        }
    })
    .await;
}

use openraft_rt::WatchReceiver;

#[test]
fn replicas_agree_through_isolation_rejoin_and_restart() {
    GlommioRuntime::run(async {
        let router = Router::default();
        let mut replicas = Vec::new();
        for id in 1..=3u64 {
            replicas.push(start(NodeId(id), tempfile::tempdir().unwrap(), &router).await);
        }
        let members: BTreeMap<NodeId, Member> =
            (1..=3).map(|id| (NodeId(id), Member::default())).collect();
        replicas[0].raft.initialize(members).await.unwrap();

        // 1. Steady state: writes through the leader are acknowledged with consecutive offsets
        //    and reach every replica.
        let all: Vec<&Replica> = replicas.iter().collect();
        let l1 = leader_among(&all).await;
        let leader = &replicas[(l1.0 - 1) as usize];
        let mut acked = Vec::new();
        let mut last_end = None;
        for i in 0..30 {
            let v = format!("a{i}");
            let (base, end) = write(&leader.raft, &v).await;
            assert_eq!(end, base + 1);
            if let Some(prev) = last_end {
                assert!(base >= prev, "offsets go backwards: {base} after {prev}");
            }
            last_end = Some(end);
            acked.push(v);
        }
        converged(&all, &acked).await;

        // 2. Cut the leader off. Writes sent to it are appended to its log but never commit.
        router.0.borrow_mut().isolated.insert(l1);
        let old = leader.raft.clone();
        let mut stranded = Vec::new();
        for i in 0..5 {
            let raft = old.clone();
            stranded.push(glommio::spawn_local(async move {
                GlommioRuntime::timeout(
                    Duration::from_secs(3),
                    raft.client_write(batch(&format!("lost{i}"))),
                )
                .await
            }));
        }
        let rest: Vec<&Replica> = replicas.iter().filter(|r| r.id != l1).collect();
        let l2 = leader_among(&rest).await;
        assert_ne!(l1, l2);
        for i in 0..20 {
            let v = format!("b{i}");
            write(&replicas[(l2.0 - 1) as usize].raft, &v).await;
            acked.push(v);
        }
        converged(&rest, &acked).await;
        for t in stranded {
            let outcome = t.await;
            assert!(
                !matches!(outcome, Ok(Ok(_))),
                "a write to the isolated leader was acknowledged: {outcome:?}"
            );
        }
        let cut = &replicas[(l1.0 - 1) as usize];
        let p = cut.log.positions();
        assert!(
            p.next > p.committed,
            "the isolated leader should hold an uncommitted tail ({p:?})"
        );

        // 3. Heal: the old leader rejoins, drops its divergent tail and catches up.
        router.0.borrow_mut().isolated.clear();
        converged(&all, &acked).await;
        let leader_next = replicas[(l2.0 - 1) as usize].log.positions().next;
        eventually("the rejoined replica's log to match the leader's", || {
            let n = cut.log.positions().next;
            async move { n == leader_next }
        })
        .await;

        // 4. Restart a follower from its files while writes continue.
        let follower = replicas.iter().position(|r| r.id != l2).unwrap();
        let r = replicas.remove(follower);
        let id = r.id;
        let dir = stop(r, &router).await;
        for i in 0..10 {
            let v = format!("c{i}");
            let l = replicas.iter().find(|r| r.id == l2).unwrap();
            write(&l.raft, &v).await;
            acked.push(v);
        }
        replicas.push(start(id, dir, &router).await);
        let all: Vec<&Replica> = replicas.iter().collect();
        converged(&all, &acked).await;

        // Every replica holds the same bytes at the same offsets.
        let ends: Vec<Offset> = replicas
            .iter()
            .map(|r| r.log.positions().committed)
            .collect();
        assert!(ends.windows(2).all(|w| w[0] == w[1]), "{ends:?}");

        for r in replicas {
            stop(r, &router).await;
        }
    });
}
