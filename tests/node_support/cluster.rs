//! A cluster of real `tern serve` processes on loopback, and a writer that checks what it
//! had acknowledged.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern::proto::internal as ipb;
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tonic::transport::Channel;

use super::TestNode;

/// Fast timings keep failover tests short (the defaults are 150 / 1500 ms).
pub const TIMING: [&str; 4] = [
    "--raft-heartbeat-ms",
    "50",
    "--raft-election-timeout-ms",
    "600",
];

/// Fields drop in order: the nodes are killed before their directories are removed (a node
/// whose files vanish under it panics in glommio, a noise that looked like a failure).
pub struct Cluster {
    pub nodes: Vec<Option<TestNode>>,
    pub dirs: Vec<PathBuf>,
    pub addrs: Vec<String>,
    pub peers: String,
    /// Flags every node gets besides the cluster's own.
    pub extra: Vec<String>,
    pub tmp: tempfile::TempDir,
}

/// Loopback ports for the nodes, outside the ephemeral range (see `tern_wan::ports`).
pub fn free_ports(n: usize) -> Vec<u16> {
    tern_wan::ports::free_ports(n).expect("free loopback ports")
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, &[]).await
    }

    /// A cluster whose nodes all get `extra` flags too.
    pub async fn start_with(n: usize, extra: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let ports = free_ports(n);
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let dirs = (0..n)
            .map(|i| tmp.path().join(format!("n{}", i + 1)))
            .collect();
        let mut c = Cluster {
            tmp,
            dirs,
            addrs,
            peers,
            nodes: (0..n).map(|_| None).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            c.start_node(i);
        }
        c.wait_formed().await;
        c
    }

    pub fn start_node(&mut self, i: usize) {
        self.start_node_logged(i, None)
    }

    /// [`Cluster::start_node`], with the node's log going to `log` when given.
    pub fn start_node_logged(&mut self, i: usize, log: Option<&std::path::Path>) {
        let id = (i + 1).to_string();
        let mut args = vec![
            "--node-id",
            &id,
            "--peers",
            &self.peers,
            "--fault-injection",
        ];
        args.extend(TIMING);
        args.extend(self.extra.iter().map(String::as_str));
        self.nodes[i] = Some(TestNode::start_logged(
            &self.dirs[i],
            &self.addrs[i],
            &args,
            log,
        ));
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.kill9();
        }
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`, …) to node `i`'s process.
    pub fn signal(&self, i: usize, signal: i32) {
        if let Some(pid) = self.nodes[i]
            .as_ref()
            .and_then(|n| n.child.as_ref())
            .map(|c| c.id())
        {
            // SAFETY: a plain kill(2) of our own child process.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    pub async fn client(&self, i: usize) -> TernClient<Channel> {
        self.nodes[i].as_ref().expect("node is up").client().await
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .collect()
    }

    /// Waits until every live node knows every node and a metadata leader.
    pub async fn wait_formed(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in self.live() {
            loop {
                let mut c = self.client(i).await;
                let seen = match c.cluster_info(pb::ClusterInfoRequest::default()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.nodes.len() == self.nodes.len() && r.metadata_leader != 0 {
                            break;
                        }
                        format!(
                            "knows nodes {:?}, metadata leader {}, controllers {:?}, ready {}",
                            r.nodes.iter().map(|n| n.id).collect::<Vec<_>>(),
                            r.metadata_leader,
                            r.controllers,
                            r.ready
                        )
                    }
                    Err(s) => format!("ClusterInfo failed: {s:?}"),
                };
                assert!(
                    Instant::now() < deadline,
                    "cluster did not form: node {} ({}) {seen}",
                    i + 1,
                    self.addrs[i]
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The leader of a partition that a majority of live nodes agree on, once there is one.
    pub async fn leader(&self, topic: &str, partition: u32) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut votes: HashMap<u64, usize> = HashMap::new();
            for i in self.live() {
                let mut c = self.client(i).await;
                if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await {
                    for t in r.into_inner().topics {
                        if t.topic != topic {
                            continue;
                        }
                        for p in t.partitions {
                            if p.partition == partition && p.local && p.leader != 0 {
                                *votes.entry(p.leader).or_default() += 1;
                            }
                        }
                    }
                }
            }
            let live = self.live();
            if let Some((&l, _)) = votes
                .iter()
                .find(|(l, n)| **n * 2 > live.len() && live.contains(&(**l as usize - 1)))
            {
                return l as usize - 1;
            }
            assert!(
                Instant::now() < deadline,
                "no leader for {topic}/{partition}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 30 s in all) until every node reads exactly `want` from `topic`/`partition`;
    /// `check` sees every read on the way (node index, values) and may fail the test.
    pub async fn wait_converged(
        &self,
        topic: &str,
        partition: u32,
        want: &[String],
        check: impl Fn(usize, &[String]),
    ) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in 0..self.addrs.len() {
            loop {
                let got =
                    read_all(&mut self.client(node).await, topic, partition, want.len()).await;
                check(node, &got);
                if got == want {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} never converged: {got:?}, want {want:?}",
                    node + 1
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// One publish through node `i`, bounded by `limit` (a write a cut-off leader takes can
    /// never commit), on a lazily connected channel.
    pub async fn publish_within(
        &self,
        i: usize,
        req: pb::PublishRequest,
        limit: Duration,
    ) -> Result<pb::PublishResponse, tonic::Status> {
        let mut c = TernClient::new(
            Channel::from_shared(format!("http://{}", self.addrs[i]))
                .unwrap()
                .connect_lazy(),
        );
        let mut req = tonic::Request::new(req);
        req.set_timeout(limit);
        c.publish(req).await.map(|r| r.into_inner())
    }

    pub async fn isolate(&self, i: usize, from: Vec<u64>) {
        set_fault(&self.addrs[i], from).await;
    }
}

/// Cuts the node at `addr` off from the nodes `from` (ids), at its transport (Peer.SetFault;
/// the node runs with --fault-injection); an empty list heals it.
pub async fn set_fault(addr: &str, from: Vec<u64>) {
    let ch = super::channel(addr).await.unwrap();
    ipb::peer_client::PeerClient::new(ch)
        .set_fault(ipb::SetFaultRequest { isolate_from: from })
        .await
        .expect("set fault");
}

pub async fn create(c: &mut TernClient<Channel>, name: &str, partitions: u32, rf: u32) {
    c.create_topic(pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: rf,
        config: None,
        placement: None,
        mirror_of: None,
    })
    .await
    .expect("create topic");
}

pub fn record(partition: u32, value: String) -> pb::PublishRecord {
    pb::PublishRecord {
        key: None,
        value: Bytes::from(value),
        headers: vec![],
        partition: Some(partition),
        expiry_seconds: None,
    }
}

/// Publishes, going again while the answer is that nothing was written because the partition
/// has no leader yet (an election under a loaded test machine); any other error fails.
pub async fn publish_retrying(c: &mut TernClient<Channel>, req: pb::PublishRequest) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.publish(req.clone()).await {
            Ok(_) => return,
            // Not the leader, no leader yet, a replica not open yet (a restarted node opens its
            // replicas a few at a time): nothing was written, so it goes again.
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && (s.message().contains("not the partition leader")
                        || s.metadata().contains_key("tern-unwritten"))
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("publish failed: {s:?}"),
        }
    }
}

pub fn values(records: &[pb::Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect()
}

/// Every committed record of a partition as one node serves it, once that node has caught up
/// to at least `min` data records (followers apply commits a moment after the leader; a
/// restarted node opens its replicas a moment after it starts serving).
/// Every record value of a partition, once at least `min` distinct values are there (or after
/// 30 s).
pub async fn read_all(c: &mut TernClient<Channel>, topic: &str, p: u32, min: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match super::try_fetch_all(c, topic, p).await {
            Ok(rs) => {
                let v = values(&rs);
                // Distinct values: a log with retried duplicates can reach `min` records while
                // a follower still misses the last acknowledged ones.
                let distinct = v.iter().collect::<std::collections::HashSet<_>>().len();
                if distinct >= min || Instant::now() > deadline {
                    return v;
                }
            }
            Err(s) => {
                assert!(Instant::now() < deadline, "fetch keeps failing: {s:?}");
                assert!(
                    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::NotFound),
                    "{s:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes sequence numbers one at a time through whichever node answers, retrying a
/// failed record (which may duplicate it); remembers what was acknowledged.
pub struct Writer {
    acked: Arc<Mutex<Vec<u64>>>,
    retries: Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn start(addrs: Vec<String>, topic: &'static str) -> Writer {
        Self::spawn(addrs, topic, false)
    }

    /// An idempotent producer: a producer id from InitProducer, sequence numbers from 0, and
    /// requests of 1 to 3 records; a failed request goes again unchanged (same sequences), so
    /// the broker must not write it twice.
    pub fn start_idempotent(addrs: Vec<String>, topic: &'static str) -> Writer {
        Self::spawn(addrs, topic, true)
    }

    fn spawn(addrs: Vec<String>, topic: &'static str, idempotent: bool) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let a = acked.clone();
        let retries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = retries.clone();
        let task = tokio::spawn(async move {
            let mut seq = 0u64;
            let mut target = 0usize;
            let mut producer_id = 0u64;
            while !*stop_rx.borrow() {
                let ch = Channel::from_shared(format!("http://{}", addrs[target % addrs.len()]))
                    .unwrap()
                    .connect_timeout(Duration::from_millis(200))
                    .timeout(Duration::from_secs(10))
                    .connect_lazy();
                let mut c = TernClient::new(ch);
                if idempotent && producer_id == 0 {
                    match c.init_producer(pb::InitProducerRequest {}).await {
                        Ok(r) => producer_id = r.into_inner().producer_id,
                        Err(_) => {
                            target += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                    assert!(producer_id > 0);
                }
                let n = if idempotent { 1 + seq % 3 } else { 1 };
                let mut req = tonic::Request::new(pb::PublishRequest {
                    topic: topic.into(),
                    records: (seq..seq + n).map(|s| record(0, s.to_string())).collect(),
                    request_id: 0,
                    producer_id,
                    sequence: if idempotent { seq as u32 } else { 0 },
                });
                req.set_timeout(Duration::from_secs(3));
                match c.publish(req).await {
                    Ok(r) => {
                        let acks = r.into_inner().acks;
                        assert_eq!(acks.len() as u64, n);
                        a.lock().unwrap().extend(seq..seq + n);
                        seq += n;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(s) => {
                        // Refused outright (not a failure to retry): the test is wrong.
                        assert!(
                            !matches!(
                                s.code(),
                                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
                            ),
                            "sequence {seq}: {s:?}"
                        );
                        // Try another node; the same records go again (without a producer id,
                        // a possible duplicate).
                        target += 1;
                        r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Writer {
            acked,
            retries,
            stop,
            task,
        }
    }

    /// Requests that failed and went again.
    pub fn retries(&self) -> usize {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until at least `n` records are acknowledged, failing with `what` if that takes
    /// longer than `within`.
    pub async fn wait_acked(&self, n: usize, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "{what} ({} of {n} acknowledged within {within:?})",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    pub async fn finish(self) -> Vec<u64> {
        self.stop.send_replace(true);
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged sequence number is present, and their first appearances are in
/// acknowledgment order; returns the number of duplicates.
pub fn check_acked(log: &[String], acked: &[u64]) -> usize {
    let mut first: HashMap<u64, usize> = HashMap::new();
    for (i, v) in log.iter().enumerate() {
        first.entry(v.parse().unwrap()).or_insert(i);
    }
    let mut last = None;
    for s in acked {
        let at = *first
            .get(s)
            .unwrap_or_else(|| panic!("acknowledged record {s} is lost"));
        assert!(last < Some(at), "record {s} is out of order");
        last = Some(at);
    }
    log.len() - first.len()
}

/// An idempotent producer's request: `values` to `partition` as producer `producer_id`, the first
/// with sequence `sequence`.
pub fn idem(
    topic: &str,
    partition: u32,
    producer_id: u64,
    sequence: u32,
    values: &[&str],
) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.into(),
        records: values
            .iter()
            .map(|v| record(partition, v.to_string()))
            .collect(),
        request_id: 0,
        producer_id,
        sequence,
    }
}

/// Publishes; the offsets the records were given.
pub async fn offsets(
    c: &mut TernClient<Channel>,
    req: pb::PublishRequest,
) -> Result<Vec<u64>, tonic::Status> {
    Ok(c.publish(req)
        .await?
        .into_inner()
        .acks
        .into_iter()
        .map(|a| a.offset)
        .collect())
}

/// [`offsets`], going again (for up to 30 s) while the node answers UNAVAILABLE (starting,
/// electing a leader, or an earlier send still in flight).
pub async fn offsets_retrying(c: &mut TernClient<Channel>, req: pb::PublishRequest) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match offsets(c, req.clone()).await {
            Ok(o) => return o,
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    }
}
