//! Three-node clusters of real `tern serve` processes on loopback: replication, forwarding,
//! failover under load (kill -9), restarts, and a leader cut off from its peers.

mod node_support;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use node_support::TestNode;
use tern::proto::internal as ipb;
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tonic::transport::Channel;

/// Fast timings keep failover tests short (the defaults are 150 / 1500 ms).
const TIMING: [&str; 4] = [
    "--raft-heartbeat-ms",
    "50",
    "--raft-election-timeout-ms",
    "600",
];

struct Cluster {
    _tmp: tempfile::TempDir,
    dirs: Vec<PathBuf>,
    addrs: Vec<String>,
    peers: String,
    nodes: Vec<Option<TestNode>>,
}

/// Free loopback ports from the OS (bound, then released for the nodes to take).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
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
            _tmp: tmp,
            dirs,
            addrs,
            peers,
            nodes: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            c.start_node(i);
        }
        c.wait_formed().await;
        c
    }

    fn start_node(&mut self, i: usize) {
        let id = (i + 1).to_string();
        let mut args = vec![
            "--node-id",
            &id,
            "--peers",
            &self.peers,
            "--fault-injection",
        ];
        args.extend(TIMING);
        self.nodes[i] = Some(TestNode::start_at(&self.dirs[i], &self.addrs[i], &args));
    }

    fn kill9(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.kill9();
        }
    }

    async fn client(&self, i: usize) -> TernClient<Channel> {
        self.nodes[i].as_ref().expect("node is up").client().await
    }

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].is_some())
            .collect()
    }

    /// Waits until every live node knows every node and a metadata leader.
    async fn wait_formed(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in self.live() {
            loop {
                let mut c = self.client(i).await;
                if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest {}).await {
                    let r = r.into_inner();
                    if r.nodes.len() == self.nodes.len() && r.metadata_leader != 0 {
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "cluster did not form");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The leader of a partition that a majority of live nodes agree on, once there is one.
    async fn leader(&self, topic: &str, partition: u32) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut votes: HashMap<u64, usize> = HashMap::new();
            for i in self.live() {
                let mut c = self.client(i).await;
                if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest {}).await {
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

    async fn isolate(&self, i: usize, from: Vec<u64>) {
        let ch = Channel::from_shared(format!("http://{}", self.addrs[i]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        ipb::peer_client::PeerClient::new(ch)
            .set_fault(ipb::SetFaultRequest { isolate_from: from })
            .await
            .expect("set fault");
    }
}

async fn create(c: &mut TernClient<Channel>, name: &str, partitions: u32, rf: u32) {
    c.create_topic(pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: rf,
        config: None,
    })
    .await
    .expect("create topic");
}

fn record(partition: u32, value: String) -> pb::PublishRecord {
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
async fn publish_retrying(c: &mut TernClient<Channel>, req: pb::PublishRequest) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match c.publish(req.clone()).await {
            Ok(_) => return,
            Err(s)
                if s.code() == tonic::Code::Unavailable
                    && s.message().contains("not the partition leader")
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(s) => panic!("publish failed: {s:?}"),
        }
    }
}

fn values(records: &[pb::Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect()
}

/// Every committed record of a partition as one node serves it, once that node has caught up
/// to at least `min` data records (followers apply commits a moment after the leader; a
/// restarted node opens its replicas a moment after it starts serving).
async fn read_all(c: &mut TernClient<Channel>, topic: &str, p: u32, min: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match node_support::try_fetch_all(c, topic, p).await {
            Ok(rs) => {
                let v = values(&rs);
                if v.len() >= min || Instant::now() > deadline {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_publish_and_subscribe_through_any_node() {
    let cluster = Cluster::start(3).await;
    // Created through node 2, replicated on all three.
    create(&mut cluster.client(1).await, "orders", 3, 3).await;
    let mut expected: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for i in 0..30u32 {
        let p = i % 3;
        let v = format!("r{i}");
        let mut c = cluster.client((i % 3) as usize).await;
        let req = pb::PublishRequest {
            topic: "orders".into(),
            records: vec![record(p, v.clone())],
            request_id: 0,
        };
        publish_retrying(&mut c, req).await;
        expected.entry(p).or_default().push(v);
    }
    // Every node serves every partition with the same records in the same order.
    for node in 0..3 {
        let mut c = cluster.client(node).await;
        for (p, want) in &expected {
            let got = read_all(&mut c, "orders", *p, want.len()).await;
            assert_eq!(&got, want, "node {} partition {p}", node + 1);
        }
    }
    // Same offsets everywhere (followers store the leader's batches byte for byte).
    let offsets = |rs: Vec<pb::Record>| rs.into_iter().map(|r| r.offset).collect::<Vec<_>>();
    let a = offsets(
        node_support::try_fetch_all(&mut cluster.client(0).await, "orders", 1)
            .await
            .unwrap(),
    );
    let b = offsets(
        node_support::try_fetch_all(&mut cluster.client(2).await, "orders", 1)
            .await
            .unwrap(),
    );
    assert_eq!(a, b);

    // A subscription through node 3 delivers everything, in order per partition.
    let mut c = cluster.client(2).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: "orders".into(),
            from: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Earliest(true)),
            }),
            partitions: vec![],
        }],
        remove: vec![],
    })
    .await
    .unwrap();
    let mut stream = c
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut got: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.values().map(Vec::len).sum::<usize>() < 30 {
        let msg = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("subscription delivers within 20 s")
            .unwrap()
            .unwrap();
        for r in msg.records {
            got.entry(r.partition)
                .or_default()
                .push(String::from_utf8(r.value.to_vec()).unwrap());
        }
    }
    assert_eq!(got, expected);

    // Replication factor 1: each partition lives on one node; the others forward to it.
    create(&mut cluster.client(0).await, "single", 3, 1).await;
    let info = cluster
        .client(0)
        .await
        .describe_topic(pb::DescribeTopicRequest {
            name: "single".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut owners: Vec<u64> = info.partitions.iter().map(|p| p.replicas[0]).collect();
    assert!(info.partitions.iter().all(|p| p.replicas.len() == 1));
    owners.sort();
    assert_eq!(owners, vec![1, 2, 3], "one partition per node");
    for p in 0..3u32 {
        let owner = info.partitions[p as usize].replicas[0] as usize - 1;
        let other = (owner + 1) % 3;
        let req = pb::PublishRequest {
            topic: "single".into(),
            records: vec![record(p, format!("s{p}"))],
            request_id: 0,
        };
        publish_retrying(&mut cluster.client(other).await, req).await;
        let third = (owner + 2) % 3;
        let got = read_all(&mut cluster.client(third).await, "single", p, 1).await;
        assert_eq!(got, vec![format!("s{p}")], "fetch forwarded to the owner");
    }
    // Topic deletion goes through the metadata group: gone on every node.
    cluster
        .client(2)
        .await
        .delete_topic(pb::DeleteTopicRequest {
            name: "single".into(),
        })
        .await
        .unwrap();
    for node in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = cluster
                .client(node)
                .await
                .list_topics(pb::ListTopicsRequest {})
                .await
                .unwrap()
                .into_inner();
            if r.topics.iter().all(|t| t.name != "single") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} still lists the topic",
                node + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Publishes sequence numbers one at a time through whichever node answers, retrying a
/// failed record (which may duplicate it); remembers what was acknowledged.
struct Writer {
    acked: Arc<Mutex<Vec<u64>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(addrs: Vec<String>, topic: &'static str) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let a = acked.clone();
        let task = tokio::spawn(async move {
            let mut seq = 0u64;
            let mut target = 0usize;
            while !*stop_rx.borrow() {
                let ch = Channel::from_shared(format!("http://{}", addrs[target % addrs.len()]))
                    .unwrap()
                    .connect_timeout(Duration::from_millis(200))
                    .connect_lazy();
                let mut c = TernClient::new(ch);
                let mut req = tonic::Request::new(pb::PublishRequest {
                    topic: topic.into(),
                    records: vec![record(0, seq.to_string())],
                    request_id: 0,
                });
                req.set_timeout(Duration::from_secs(3));
                match c.publish(req).await {
                    Ok(_) => {
                        a.lock().unwrap().push(seq);
                        seq += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(_) => {
                        // Try another node; the same record goes again (a possible duplicate).
                        target += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        Writer { acked, stop, task }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<u64> {
        self.stop.send_replace(true);
        self.task.await.unwrap();
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged sequence number is present, and their first appearances are in
/// acknowledgment order; returns the number of duplicates.
fn check_acked(log: &[String], acked: &[u64]) -> usize {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_the_leader_under_load_repeatedly_then_restart_all() {
    let mut cluster = Cluster::start(3).await;
    create(&mut cluster.client(0).await, "load", 1, 3).await;
    let writer = Writer::start(cluster.addrs.clone(), "load");
    let mut longest = Duration::ZERO;
    for round in 0..3 {
        // Some load before the kill.
        let before = writer.acked();
        while writer.acked() < before + 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let leader = cluster.leader("load", 0).await;
        let at_kill = writer.acked();
        let killed = Instant::now();
        cluster.kill9(leader);
        // A new leader takes publishes within seconds.
        let deadline = Instant::now() + Duration::from_secs(20);
        while writer.acked() < at_kill + 10 {
            assert!(
                Instant::now() < deadline,
                "round {round}: no acks for 20 s after killing node {}",
                leader + 1
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        longest = longest.max(killed.elapsed());
        eprintln!(
            "round {round}: killed node {}, acks resumed within {:?}",
            leader + 1,
            killed.elapsed()
        );
        cluster.start_node(leader);
    }
    let acked = writer.finish().await;
    eprintln!(
        "{} records acknowledged; longest gap {longest:?}",
        acked.len()
    );

    // Every acknowledged record on every node, in order.
    for node in 0..3 {
        let log = read_all(&mut cluster.client(node).await, "load", 0, acked.len()).await;
        let dups = check_acked(&log, &acked);
        eprintln!(
            "node {}: {} records, {dups} duplicates",
            node + 1,
            log.len()
        );
    }

    // kill -9 all three at once, restart them: everything acknowledged is still there.
    for i in 0..3 {
        cluster.kill9(i);
    }
    for i in 0..3 {
        cluster.start_node(i);
    }
    cluster.wait_formed().await;
    cluster.leader("load", 0).await;
    for node in 0..3 {
        let log = read_all(&mut cluster.client(node).await, "load", 0, acked.len()).await;
        check_acked(&log, &acked);
    }
    // And it takes writes again.
    let req = pb::PublishRequest {
        topic: "load".into(),
        records: vec![record(0, u64::MAX.to_string())],
        request_id: 0,
    };
    publish_retrying(&mut cluster.client(1).await, req).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_cannot_commit_and_rejoins_dropping_its_tail() {
    let cluster = Cluster::start(3).await;
    create(&mut cluster.client(0).await, "cut", 1, 3).await;
    let publish = |node: usize, v: &str| {
        let v = v.to_string();
        let addr = cluster.addrs[node].clone();
        async move {
            let mut c = TernClient::new(
                Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy(),
            );
            let mut req = tonic::Request::new(pb::PublishRequest {
                topic: "cut".into(),
                records: vec![record(0, v)],
                request_id: 0,
            });
            req.set_timeout(Duration::from_secs(3));
            c.publish(req).await
        }
    };
    for i in 0..10 {
        publish(0, &format!("a{i}")).await.expect("healthy publish");
    }
    let leader = cluster.leader("cut", 0).await;
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    cluster
        .isolate(leader, others.iter().map(|i| *i as u64 + 1).collect())
        .await;
    // The cut-off leader takes the write into its log but can never commit it alone.
    let stranded = publish(leader, "stranded").await;
    assert!(stranded.is_err(), "an isolated node acknowledged a write");
    // The majority elects a leader and goes on.
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.len() < 20 {
        let v = format!("b{}", acked.len());
        if publish(others[acked.len() % 2], &v).await.is_ok() {
            acked.push(v);
        } else {
            assert!(
                Instant::now() < deadline,
                "the majority did not take writes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Heal: the old leader rejoins, drops its uncommitted tail and catches up.
    cluster.isolate(leader, vec![]).await;
    let want: Vec<String> = (0..10)
        .map(|i| format!("a{i}"))
        .chain(acked.iter().cloned())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in 0..3 {
        loop {
            let got = read_all(&mut cluster.client(node).await, "cut", 0, want.len()).await;
            assert!(
                !got.contains(&"stranded".to_string()),
                "node {}: the uncommitted write survived",
                node + 1
            );
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never converged: {got:?}",
                node + 1
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
