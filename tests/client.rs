//! The Rust client crate (`client/`, `tern-client`) against real three-node clusters: its
//! idempotent producer through leader kills (every record acknowledged once, in order per
//! key), its subscription resuming on another node when its own dies, and its consumer and
//! queue group members.

mod node_support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use node_support::cluster::{create, Cluster};
use tern_client::{Client, ClientOptions, Producer, ProducerOptions, Record, Start};

fn options() -> ClientOptions {
    ClientOptions {
        request_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

/// Three nodes with `topic` (`partitions`, replication factor 3), and a client of them.
async fn cluster_with(topic: &str, partitions: u32) -> (Cluster, Client) {
    let cluster = Cluster::start(3).await;
    create(&mut cluster.client(0).await, topic, partitions, 3).await;
    let client = Client::connect(cluster.addrs.clone(), options())
        .await
        .unwrap();
    (cluster, client)
}

/// Reads `n` records from `sub` (at most 60 s): (partition, offset, value).
async fn take(sub: &mut tern_client::Subscription, n: usize) -> Vec<(u32, u64, String)> {
    let mut out = Vec::with_capacity(n);
    let read = async {
        while out.len() < n {
            let r = sub.next().await.expect("the subscription goes on").unwrap();
            out.push((
                r.partition,
                r.offset,
                String::from_utf8(r.value.to_vec()).unwrap(),
            ));
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .unwrap_or_else(|_| panic!("only {} records within 60 s", out.len()));
    out
}

/// Publishes the values `values` to `topic` (value i to partition i % `partitions`, or to
/// wherever the producer puts it when `partitions` is 0) and waits until each is acknowledged.
async fn send_values(
    producer: &Producer,
    topic: &str,
    values: std::ops::Range<usize>,
    partitions: u32,
) {
    let mut acks = Vec::new();
    for i in values {
        let mut r = Record::new(i.to_string());
        if partitions > 0 {
            r = r.partition(i as u32 % partitions);
        }
        acks.push(producer.send(topic, r).await.unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
}

#[test]
fn keys_are_placed_as_the_nodes_place_them() {
    for n in [1u32, 2, 3, 7, 64, 1000] {
        for k in 0..2000u32 {
            let key = format!("key-{k}");
            assert_eq!(
                tern_client::partition_for_key(key.as_bytes(), n),
                tern::shard::placement::partition_for_key(key.as_bytes(), n),
                "{key} of {n}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_writes_every_record_once_through_leader_kills() {
    writes_every_record_once_through_leader_kills(1).await;
}

/// The same with a full window: up to 8 requests per partition on their way when a leader
/// dies, all sent again in order to the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_producer_writes_every_record_once_through_leader_kills() {
    writes_every_record_once_through_leader_kills(8).await;
}

async fn writes_every_record_once_through_leader_kills(max_in_flight: usize) {
    let (mut cluster, client) = cluster_with("orders", 3).await;
    let producer = Producer::new(
        &client,
        ProducerOptions {
            linger: Duration::from_millis(2),
            max_buffered: 200,
            max_in_flight,
            ..ProducerOptions::default()
        },
    )
    .await
    .unwrap();
    // It sends until told to stop, after both kills: records are in flight through each.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let producer = producer.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acks = Vec::new();
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 1000 {
                let r = Record::new(i.to_string()).key(format!("k{}", i % 10));
                acks.push(producer.send("orders", r).await.unwrap());
                i += 1;
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            acks
        })
    };
    // Two leader kills while it sends: each leader of partition 0 in turn, restarted after.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let leader = cluster.leader("orders", 0).await;
        cluster.kill9(leader);
        tokio::time::sleep(Duration::from_millis(800)).await;
        cluster.start_node(leader);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acks = sender.await.unwrap();
    let n = acks.len();
    let mut written: HashMap<String, (u32, u64)> = HashMap::new();
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = tokio::time::timeout(Duration::from_secs(90), ack)
            .await
            .expect("acknowledged within 90 s")
            .unwrap_or_else(|e| panic!("record {i}: {e}"));
        written.insert(i.to_string(), (ack.partition, ack.offset));
    }
    producer.flush().await;
    // Everything reads back once, at the offset its acknowledgment gave, and each key's
    // records in the order they were sent.
    let mut sub = client.subscribe("orders", Start::Earliest).await.unwrap();
    let read = take(&mut sub, n).await;
    let mut seen: HashMap<String, (u32, u64)> = HashMap::new();
    let mut last_of_key: BTreeMap<usize, usize> = BTreeMap::new();
    for (p, offset, v) in &read {
        assert!(
            seen.insert(v.clone(), (*p, *offset)).is_none(),
            "record {v} read twice"
        );
        let i: usize = v.parse().unwrap();
        if let Some(before) = last_of_key.insert(i % 10, i) {
            assert!(before < i, "key k{}: {i} read after {before}", i % 10);
        }
    }
    assert_eq!(seen, written, "what was read is what was acknowledged");
    // Nothing more arrives: no duplicate was written after the acknowledgments.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .is_err(),
        "a record beyond the {n} acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_on_another_node_without_gaps_or_repeats() {
    let (mut cluster, client) = cluster_with("events", 2).await;
    for max_in_flight in [0, 9] {
        let refused = Producer::new(
            &client,
            ProducerOptions {
                max_in_flight,
                ..ProducerOptions::default()
            },
        )
        .await;
        assert!(
            matches!(refused, Err(tern_client::Error::Invalid(_))),
            "max_in_flight {max_in_flight} is refused"
        );
    }
    let producer = Producer::new(&client, ProducerOptions::default())
        .await
        .unwrap();
    send_values(&producer, "events", 0..500, 2).await;
    let mut sub = client.subscribe("events", Start::Earliest).await.unwrap();
    // From `latest`: it has read nothing when its node dies, and must still start at 500.
    let mut latest = client.subscribe("events", Start::Latest).await.unwrap();
    let mut read = take(&mut sub, 250).await;
    // The subscriptions read through the first node the client knows: node 1.
    cluster.kill9(0);
    send_values(&producer, "events", 500..1000, 2).await;
    read.extend(take(&mut sub, 750).await);
    let from_latest = take(&mut latest, 500).await;
    for (read, want) in [(&read, 0..1000), (&from_latest, 500..1000)] {
        // Each partition's values rise (they were sent in order), and each comes once.
        let mut last: BTreeMap<u32, usize> = BTreeMap::new();
        let mut values: Vec<usize> = Vec::new();
        for (p, _, v) in read {
            let v: usize = v.parse().unwrap();
            if let Some(before) = last.insert(*p, v) {
                assert!(before < v, "partition {p}: {v} after {before}");
            }
            values.push(v);
        }
        values.sort_unstable();
        assert_eq!(values, want.collect::<Vec<_>>(), "each record once");
    }
}

/// Over mTLS to a node that requires authentication: the client checks the node against the
/// cluster's CA, presents its certificate (its principal, a superuser here), creates a topic,
/// publishes and reads back. Without a client certificate, in plaintext, or trusting another
/// CA, it does not get in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_mtls_to_a_node_that_requires_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    node_support::certs(&dir, 1, &["ops"]);
    let other = tmp.path().join("other");
    node_support::certs(&other, 0, &["ops"]);
    let path = |d: &std::path::Path, f: &str| d.join(f).to_str().unwrap().to_string();
    let ca = path(&dir, "ca.pem");
    let node = node_support::TestNode::start(
        &tmp.path().join("n1"),
        &[
            "--node-id",
            "1",
            "--auth",
            "required",
            "--tls-cert",
            &path(&dir, "node-1.pem"),
            "--tls-key",
            &path(&dir, "node-1-key.pem"),
            "--tls-cluster-ca",
            &ca,
            "--tls-client-ca",
            &ca,
            "--superuser",
            "ops",
        ],
    );
    let tls = |d: &std::path::Path, with_cert: bool| {
        let cert = with_cert.then(|| (d.join("client-ops.pem"), d.join("client-ops-key.pem")));
        tern_client::Tls::from_files(d.join("ca.pem"), cert)
            .unwrap()
            .server_name("localhost")
    };
    let over = |tls: Option<tern_client::Tls>| ClientOptions { tls, ..options() };
    let client = Client::connect([node.addr.clone()], over(Some(tls(&dir, true))))
        .await
        .expect("connects over mTLS");
    client
        .node(&node.addr)
        .unwrap()
        .create_topic(tern_client::proto::CreateTopicRequest {
            name: "secure".into(),
            partitions: 1,
            ..Default::default()
        })
        .await
        .expect("the superuser creates a topic");
    let producer = Producer::new(&client, ProducerOptions::default())
        .await
        .unwrap();
    let mut acks = Vec::new();
    for i in 0..10 {
        acks.push(
            producer
                .send("secure", Record::new(format!("r{i}")))
                .await
                .unwrap(),
        );
    }
    let mut offsets = Vec::new();
    for a in acks {
        offsets.push(a.await.unwrap().offset);
    }
    let mut sub = client.subscribe("secure", Start::Earliest).await.unwrap();
    let got: Vec<(u64, String)> = take(&mut sub, 10)
        .await
        .into_iter()
        .map(|r| (r.1, r.2))
        .collect();
    let want: Vec<(u64, String)> = offsets
        .into_iter()
        .zip((0..10).map(|i| format!("r{i}")))
        .collect();
    assert_eq!(got, want);
    // Refused: no client certificate, plaintext, a client that trusts another CA (and
    // presents that CA's certificate).
    for (what, o) in [
        ("no client certificate", over(Some(tls(&dir, false)))),
        ("plaintext", over(None)),
        ("another CA", over(Some(tls(&other, true)))),
    ] {
        let r = Client::connect([node.addr.clone()], o).await;
        assert!(r.is_err(), "{what}: connected");
    }
}

/// A producer writing more partitions than a connection may carry streams: its streams spread
/// over several connections, and every record is acknowledged (with one connection, the
/// streams past the node's limit would wait for a place that never frees).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_writing_many_partitions_spreads_its_streams_over_connections() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_support::TestNode::start(dir.path(), &["--max-concurrent-streams", "16"]);
    let mut admin = tern::proto::v1::tern_client::TernClient::new(
        node_support::channel(&node.addr).await.unwrap(),
    );
    create(&mut admin, "wide", 40, 1).await;
    let client = Client::connect(
        [node.addr.clone()],
        ClientOptions {
            streams_per_connection: 8,
            ..options()
        },
    )
    .await
    .unwrap();
    // Records may not wait long for a stream: one that cannot get a place within the retry
    // time fails.
    let producer = Producer::new(
        &client,
        ProducerOptions {
            retry_for: Duration::from_secs(3),
            ..ProducerOptions::default()
        },
    )
    .await
    .unwrap();
    let mut acks = Vec::new();
    for i in 0..400u32 {
        let r = Record::new(i.to_string()).partition(i % 40);
        acks.push(producer.send("wide", r).await.unwrap());
    }
    let mut per_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (i, ack) in acks.into_iter().enumerate() {
        let ack = tokio::time::timeout(Duration::from_secs(30), ack)
            .await
            .unwrap_or_else(|_| panic!("record {i} acknowledged within 30 s"))
            .unwrap_or_else(|e| panic!("record {i}: {e}"));
        assert_eq!(ack.partition, i as u32 % 40);
        per_partition
            .entry(ack.partition)
            .or_default()
            .push(ack.offset);
    }
    for (p, offsets) in per_partition {
        // In order, one after another (a partition's log starts with control records).
        assert_eq!(offsets.len(), 10, "partition {p}");
        assert!(
            offsets.windows(2).all(|w| w[1] == w[0] + 1),
            "partition {p}: {offsets:?}"
        );
    }
}

/// A member's records: (partition, value), in the order `next` returned them.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(u32, usize)>>>;

/// Runs a group member until told to stop, keeping what it was given; closes it (committing
/// what it consumed) at the end.
fn member(
    client: &Client,
    group: &str,
    topic: &str,
) -> (
    Seen,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let seen: Seen = Default::default();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let (client, group, topic, out) = (
        client.clone(),
        group.to_string(),
        topic.to_string(),
        seen.clone(),
    );
    let task = tokio::spawn(async move {
        let mut m = client
            .join_group(&group, &topic, tern_client::GroupOptions::default())
            .await
            .unwrap();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                r = m.next() => {
                    let r = r.expect("the member goes on").unwrap();
                    let v = String::from_utf8(r.record.value.to_vec()).unwrap().parse().unwrap();
                    out.lock().unwrap().push((r.record.partition, v));
                }
            }
        }
        m.close().await.expect("the final commit is confirmed");
    });
    (seen, stop, task)
}

/// Two members of a consumer group share a topic's partitions; both join through node 1,
/// which is killed halfway: they join again through the others, and every record reaches the
/// group, each member sees each partition's records in order and none twice, and once they
/// close, the group's committed positions are the partitions' ends (a member joining later
/// gets nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_rejoin_through_another_node_and_commit_everything() {
    let (mut cluster, client) = cluster_with("work", 4).await;
    let producer = Producer::new(&client, ProducerOptions::default())
        .await
        .unwrap();
    send_values(&producer, "work", 0..400, 4).await;
    let (a, stop_a, task_a) = member(&client, "g", "work");
    let (b, stop_b, task_b) = member(&client, "g", "work");
    let union = |n: usize| {
        let (a, b) = (a.clone(), b.clone());
        async move {
            let got = || {
                let mut v: Vec<usize> = a
                    .lock()
                    .unwrap()
                    .iter()
                    .chain(b.lock().unwrap().iter())
                    .map(|(_, v)| *v)
                    .collect();
                v.sort_unstable();
                v.dedup();
                v.len()
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            while got() < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the group got {} of {n} records within 90 s",
                    got()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    union(200).await;
    cluster.kill9(0);
    send_values(&producer, "work", 400..800, 4).await;
    union(800).await;
    for (seen, what) in [(&a, "a"), (&b, "b")] {
        let mut last: BTreeMap<u32, usize> = BTreeMap::new();
        for (p, v) in seen.lock().unwrap().iter() {
            assert_eq!(
                *p as usize,
                v % 4,
                "member {what}: {v} came from partition {p}"
            );
            if let Some(before) = last.insert(*p, *v) {
                assert!(
                    before < *v,
                    "member {what}, partition {p}: {v} after {before}"
                );
            }
        }
    }
    let _ = stop_a.send(());
    let _ = stop_b.send(());
    task_a.await.unwrap();
    task_b.await.unwrap();
    // Everything is committed: a new member is given nothing.
    let mut late = client
        .join_group("g", "work", tern_client::GroupOptions::default())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(3), late.next()).await;
    assert!(
        got.is_err(),
        "a member joining after all was committed got {got:?}"
    );
}

/// Two workers of a queue group: a record rejected once is delivered again, every record is
/// acknowledged exactly by one worker in the end, and the workers' deliveries count up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_workers_ack_and_nack_through_the_client() {
    let (_cluster, client) = cluster_with("jobs", 2).await;
    let producer = Producer::new(&client, ProducerOptions::default())
        .await
        .unwrap();
    send_values(&producer, "jobs", 0..200, 0).await;
    let acked: std::sync::Arc<std::sync::Mutex<Vec<(usize, u32)>>> = Default::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let options = tern_client::GroupOptions {
            mode: tern_client::GroupMode::Queue,
            ..tern_client::GroupOptions::default()
        };
        let mut w = client.join_group("q", "jobs", options).await.unwrap();
        let acked = acked.clone();
        workers.push(tokio::spawn(async move {
            while let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), w.next()).await {
                let m = m.unwrap();
                let v: usize = String::from_utf8(m.record.value.to_vec())
                    .unwrap()
                    .parse()
                    .unwrap();
                if v % 10 == 0 && m.deliveries == 1 {
                    w.nack(&m, Duration::ZERO).await.unwrap();
                } else {
                    w.ack(&m).await.unwrap();
                    acked.lock().unwrap().push((v, m.deliveries));
                }
            }
            w.close().await.unwrap();
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let mut acked = acked.lock().unwrap().clone();
    acked.sort_unstable();
    let values: Vec<usize> = acked.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        values,
        (0..200).collect::<Vec<_>>(),
        "every record acknowledged once"
    );
    for (v, deliveries) in acked {
        let want = if v % 10 == 0 { 2 } else { 1 };
        assert_eq!(
            deliveries, want,
            "record {v}: acknowledged at delivery {deliveries}"
        );
    }
}

/// A bootstrap node that accepts connections and never answers (a hung process, a black
/// hole) does not keep the client from the others: the next one is asked while the first is
/// still waited for. The request timeout here is two minutes, which the client would sit out
/// if it asked one node at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_bootstrap_node_does_not_hold_up_reading_the_layout() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_support::TestNode::start(dir.path(), &[]);
    let mut admin = tern::proto::v1::tern_client::TernClient::new(
        node_support::channel(&node.addr).await.unwrap(),
    );
    create(&mut admin, "t", 1, 1).await;
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_addr = hung.local_addr().unwrap().to_string();
    // Accepts and holds every connection, answering nothing.
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let options = ClientOptions {
        request_timeout: Duration::from_secs(120),
        ..ClientOptions::default()
    };
    let client = tokio::time::timeout(
        Duration::from_secs(60),
        Client::connect([hung_addr, node.addr.clone()], options),
    )
    .await
    .expect("the client asked the second node while the first hung")
    .unwrap();
    assert_eq!(client.partitions("t").await.unwrap(), 1);
}

/// A member far behind (thousands of records delivered and waiting) commits what it took:
/// the confirmation comes behind the waiting deliveries, and the member reads ahead for it.
/// A member joining after it left goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_backlog_commits_what_it_took() {
    let (_cluster, client) = cluster_with("backlog", 1).await;
    let producer = Producer::new(&client, ProducerOptions::default())
        .await
        .unwrap();
    send_values(&producer, "backlog", 0..3000, 0).await;
    let options = tern_client::GroupOptions {
        commit_interval: None,
        max_in_flight: 1000,
        ..tern_client::GroupOptions::default()
    };
    let value = |m: tern_client::Message| -> usize {
        String::from_utf8(m.record.value.to_vec())
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut m = client
        .join_group("slow", "backlog", options.clone())
        .await
        .unwrap();
    for want in 0..10 {
        let got = tokio::time::timeout(Duration::from_secs(30), m.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(value(got), want);
    }
    // Let the deliveries pile up behind the member before it commits.
    tokio::time::sleep(Duration::from_secs(2)).await;
    m.commit().await.expect("the commit is confirmed");
    drop(m);
    let mut next = client.join_group("slow", "backlog", options).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), next.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        value(got),
        10,
        "the next member starts after what was committed"
    );
}

/// The nodes' admin listeners (started with `--admin-listen`), in node order.
fn admin_addrs(cluster: &Cluster) -> Vec<String> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            n.as_ref()
                .unwrap()
                .admin
                .clone()
                .expect("an admin listener")
        })
        .collect()
}

/// `tern_publish_records_total` of the node whose admin listener is `admin`: the records whose
/// publish entered the cluster there.
fn entered_at(admin: &str) -> u64 {
    node_support::tools::counter(admin, "tern_publish_records_total")
}

/// The node that leads partition 0 of `topic`, as `from` (0-based) sees it.
async fn leader_seen(c: &Cluster, from: usize, topic: &str) -> u64 {
    leader_seen_for(c, from, topic, 0).await
}

/// The node that leads `partition` of `topic`, as `from` (0-based) sees it (0: none).
async fn leader_seen_for(c: &Cluster, from: usize, topic: &str, partition: u32) -> u64 {
    let mut client = c.client(from).await;
    client
        .describe_topic(tern::proto::v1::DescribeTopicRequest { name: topic.into() })
        .await
        .map(|r| r.into_inner().partitions[partition as usize].leader)
        .unwrap_or(0)
}

/// A producer's stream stays open to a node that has stopped leading its partition (paused
/// through an election, then back as a follower): that node passes every request on without
/// an error, so nothing fails. The producer must move its stream to the new leader by itself:
/// its records then enter the cluster at the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_moves_its_stream_to_a_new_leader_that_no_error_named() {
    let cluster = Cluster::start_with(3, &["--admin-listen", "127.0.0.1:0"]).await;
    create(&mut cluster.client(0).await, "follow", 1, 3).await;
    let admins = admin_addrs(&cluster);
    let client = Client::connect(cluster.addrs.clone(), options())
        .await
        .unwrap();
    let producer = Producer::new(&client, ProducerOptions::default())
        .await
        .unwrap();
    let mut offsets = Vec::new();
    let send = |i: usize| {
        let producer = &producer;
        async move {
            producer
                .send("follow", Record::new(format!("r{i}")).partition(0))
                .await
                .unwrap()
                .await
                .expect("acknowledged")
                .offset
        }
    };
    for i in 0..10 {
        offsets.push(send(i).await);
    }
    let old = (0..3)
        .find(|i| entered_at(&admins[*i]) >= 10)
        .expect("the records entered at the leader");
    // Paused through an election: another node leads when it comes back.
    cluster.signal(old, libc::SIGSTOP);
    let other = (old + 1) % 3;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let new = loop {
        let l = leader_seen(&cluster, other, "follow").await;
        if l != 0 && l != old as u64 + 1 {
            break l as usize - 1;
        }
        assert!(std::time::Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.signal(old, libc::SIGCONT);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while leader_seen(&cluster, old, "follow").await != new as u64 + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "node {} never followed node {}",
            old + 1,
            new + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Records go on; within a bounded time they enter at the new leader.
    let before = entered_at(&admins[new]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut i = 10;
    while entered_at(&admins[new]) < before + 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the producer's records still enter at node {} (node {} leads)",
            old + 1,
            new + 1
        );
        offsets.push(send(i).await);
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every record once, in order.
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
}

/// In a cluster of more nodes than replicas, the node a client reads the layout from names
/// the leaders of its own replicas only. The client must learn the other partitions' leaders
/// from nodes that hold them: its producer then sends every partition's records to the
/// leader, and none pass through another node for good (a partition whose leader is not its
/// first replica shows it: that replica is where a client not knowing the leader sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_learns_the_leaders_of_partitions_its_bootstrap_node_does_not_hold() {
    use node_support::cluster::{publish_retrying, record};
    use tern::proto::v1 as pb;

    let cluster = Cluster::start_with(4, &["--admin-listen", "127.0.0.1:0"]).await;
    let admins = admin_addrs(&cluster);
    let mut first = cluster.client(0).await;
    create(&mut first, "wide", 8, 3).await;
    // Every partition has a leader.
    for p in 0..8 {
        let req = pb::PublishRequest {
            topic: "wide".into(),
            records: vec![record(p, "warm".into())],
            ..Default::default()
        };
        publish_retrying(&mut first, req).await;
    }
    let replicas: Vec<Vec<u64>> = first
        .describe_topic(pb::DescribeTopicRequest {
            name: "wide".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .partitions
        .into_iter()
        .map(|p| p.replicas)
        .collect();
    let elsewhere: Vec<u32> = (0..8)
        .filter(|p| !replicas[*p as usize].contains(&1))
        .collect();
    assert!(!elsewhere.is_empty(), "node 1 holds every partition");
    // The leader the nodes holding `p` name, but `skip` (0: none).
    let leader_named = |p: u32, skip: u64| {
        let holders = replicas[p as usize].clone();
        let cluster = &cluster;
        async move {
            for h in holders.into_iter().filter(|h| *h != skip) {
                match leader_seen_for(cluster, h as usize - 1, "wide", p).await {
                    0 => continue,
                    l => return l,
                }
            }
            0
        }
    };
    // Moves the leadership of one of them off its first replica: pause the leader through an
    // election.
    let moved = elsewhere[0];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let old = loop {
        match leader_named(moved, 0).await {
            0 => assert!(std::time::Instant::now() < deadline, "no leader"),
            l => break l,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.signal(old as usize - 1, libc::SIGSTOP);
    let new = loop {
        let l = leader_named(moved, old).await;
        if l != 0 && l != old {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.signal(old as usize - 1, libc::SIGCONT);
    // Back, the old leader follows the new one.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while leader_seen_for(&cluster, old as usize - 1, "wide", moved).await != new {
        assert!(
            std::time::Instant::now() < deadline,
            "node {old} never followed node {new}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every partition's holders agree on its leader (a node back from a pause may claim a
    // partition for a moment), so what the client learns is what they will say.
    let agreed = |p: u32| {
        let holders = replicas[p as usize].clone();
        let cluster = &cluster;
        async move {
            let mut seen = Vec::new();
            for h in holders {
                seen.push(leader_seen_for(cluster, h as usize - 1, "wide", p).await);
            }
            (seen[0] != 0 && seen.iter().all(|l| *l == seen[0])).then_some(seen[0])
        }
    };
    for p in 0..8 {
        while agreed(p).await.is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "partition {p}: its holders do not agree on a leader"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let client = Client::connect(vec![cluster.addrs[0].clone()], options())
        .await
        .unwrap();
    // The client knows every partition's leader, as a holder names it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for p in 0..8 {
        loop {
            let named = leader_named(p, 0).await;
            if named != 0 && client.leader("wide", p) == Some(named) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "partition {p}: the client knows {:?} as its leader, its holders name {named} \
                 (node 1 holds no replica of {elsewhere:?}; {moved} is led by node {new})",
                client.leader("wide", p)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let producer = Producer::new(&client, ProducerOptions::default())
        .await
        .unwrap();
    let send_all = |round: usize| {
        let producer = &producer;
        async move {
            for p in 0..8 {
                producer
                    .send("wide", Record::new(format!("r{round}")).partition(p))
                    .await
                    .unwrap()
                    .await
                    .expect("acknowledged");
            }
        }
    };
    let forwarded = || -> u64 {
        admins
            .iter()
            .map(|a| node_support::tools::counter(a, "tern_publish_forwarded_records_total"))
            .sum()
    };
    let leaders = || async {
        let mut v = Vec::new();
        for p in 0..8 {
            v.push(agreed(p).await);
        }
        v
    };
    for attempt in 1.. {
        let led = leaders().await;
        let before = forwarded();
        for round in 0..20 {
            send_all(round).await;
        }
        let passed = forwarded() - before;
        if passed == 0 {
            break;
        }
        // An election meanwhile (a loaded machine) leaves a stream at the old leader, which
        // forwards, until the producer's next look (10 s): measure again after it.
        let now = leaders().await;
        assert!(
            now != led && attempt < 3,
            "{passed} records were passed on to their leaders (leaders {led:?}, now {now:?}; \
             partition {moved} is led by node {new})"
        );
        tokio::time::sleep(Duration::from_secs(12)).await;
    }
}
