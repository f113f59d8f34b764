//! Geo-distribution on real processes, regions apart through `tern-wan` delay lines: reads
//! served in the reader's region (measured in bytes crossing the WAN), readers moving off a
//! stale or dead follower, leadership returning to its pinned region, and a region cut or
//! nodes killed under load losing nothing of a region-survival topic, nor anything a follower
//! served.

mod node_support;

use std::time::{Duration, Instant};

use node_support::cluster::{check_acked, Writer};
use node_support::geo::{create_placed, GeoCluster};
use node_support::group::{join_req, GroupMember};
use tern::proto::v1 as pb;
use tern::proto::v1::consume_response::Kind as Down;

const RTT: Duration = Duration::from_millis(40);

/// Waits until node `want` leads partition 0 of `topic` (the first election may land
/// elsewhere; leader pinning moves it within about 10 s once the follower has been in sync
/// that long, which a loaded machine can delay: CI once took over 60 s).
async fn wait_leader(c: &GeoCluster, topic: &str, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.leader_now(topic, 0).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "node {} did not come to lead {topic}",
            want + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn region_survival(leaders: &[&str]) -> pb::Placement {
    pb::Placement {
        survival: pb::Survival::Region as i32,
        regions: vec![],
        leader_regions: leaders.iter().map(|r| r.to_string()).collect(),
    }
}

/// A fetch of partition 0 of `topic` from `at`, waiting up to `wait_ms` for records.
fn fetch_at(topic: &str, at: u64, wait_ms: u32) -> pb::FetchRequest {
    pb::FetchRequest {
        topic: topic.into(),
        partition: 0,
        offset: at,
        max_records: 1000,
        max_bytes: 1 << 20,
        max_wait_ms: wait_ms,
        raw_batches: false,
        topic_uid: 0,
    }
}

/// Reads partition 0 from `from` until `n` records came; returns their values and the bytes of
/// the responses' records.
async fn read_n(
    c: &mut pb::tern_client::TernClient<tonic::transport::Channel>,
    topic: &str,
    n: usize,
) -> (Vec<String>, u64) {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut at = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        assert!(Instant::now() < deadline, "read {} of {n}", out.len());
        let r = match c.fetch(fetch_at(topic, at, 500)).await {
            Ok(r) => r.into_inner(),
            // A replica between leaders (an election on a loaded machine) says so; a client
            // asks again.
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(s) => panic!("fetch: {s:?}"),
        };
        for rec in &r.records {
            bytes += rec.value.len() as u64;
            out.push(String::from_utf8(rec.value[..8].to_vec()).unwrap());
        }
        at = r.next_offset;
    }
    (out, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_in_a_region_is_served_by_its_replica() {
    let c = GeoCluster::start(&["a", "b", "c"], RTT).await;
    // ClusterInfo asked for region b gives b's way to every node.
    let mut b = c.client(1).await;
    let info = b
        .cluster_info(pb::ClusterInfoRequest { region: "b".into() })
        .await
        .unwrap()
        .into_inner();
    for n in &info.nodes {
        let i = n.id as usize - 1;
        assert_eq!(n.address, c.addr_from("b", i), "{n:?}");
        assert_eq!(n.region, c.regions[i]);
    }
    let mut a = c.client(0).await;
    let t = create_placed(&mut a, "geo", 1, 3, region_survival(&["a"])).await;
    assert_eq!(t.placement.unwrap().survival, pb::Survival::Region as i32);
    // 8 MB through the leader's region.
    let n = 800;
    publish_numbered(&mut a, "geo", n, 10 << 10, false).await;
    // Once b's replica has them all, a reader in b reads them from it: almost nothing crosses.
    wait_caught_up(&mut b, "geo", n).await;
    let before = c.mesh.wan_bytes();
    let started = Instant::now();
    let (got, read) = read_n(&mut b, "geo", n).await;
    let local = c.mesh.wan_bytes() - before;
    let took = started.elapsed();
    let want: Vec<String> = (0..n).map(|i| format!("{i:08}")).collect();
    assert_eq!(got, want, "every record, in order");
    // The same read from the leader in a, by a client in b: all of it crosses.
    let mut far = c.client_from("b", 0).await;
    let before = c.mesh.wan_bytes();
    let (got, _) = read_n(&mut far, "geo", n).await;
    let remote = c.mesh.wan_bytes() - before;
    assert_eq!(got, want);
    eprintln!(
        "read {read} B: {local} B crossed the WAN from b's replica, {remote} B from a's leader"
    );
    // Heartbeats and the metadata keep crossing meanwhile (tens of KB a second among three
    // regions, more on a loaded machine where the read is slow); the records do not. Read from
    // the leader, every byte read crosses.
    assert!(
        local * 4 < read,
        "{local} B crossed in {took:?} for {read} B read in-region"
    );
    assert!(
        remote >= read,
        "{remote} B crossed for {read} B read across"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_returns_to_the_pinned_region_once_it_is_back() {
    let mut c = GeoCluster::start(&["a", "b", "c"], RTT).await;
    let mut a = c.client(0).await;
    let placement = pb::Placement {
        leader_regions: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    create_placed(&mut a, "pinned", 1, 3, placement).await;
    wait_leader(&c, "pinned", 0).await;
    c.kill9(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let elsewhere = loop {
        if let Some(l) = c.leader_now("pinned", 0).await {
            break l;
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(elsewhere, 0);
    // Led from c, it goes to b, the next preferred region, once b has been in sync a while.
    wait_leader(&c, "pinned", 1).await;
    c.start_node(0);
    let back = Instant::now();
    let deadline = back + Duration::from_secs(60);
    while c.leader_now("pinned", 0).await != Some(0) {
        assert!(Instant::now() < deadline, "leadership did not return to a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "leadership back in a {:?} after it restarted",
        back.elapsed()
    );
    // And it stays: no flapping. (`None`: the replicas' answers did not agree on a leader in
    // that instant, e.g. a describe timed out on a loaded machine; never another leader.)
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = c.leader_now("pinned", 0).await;
        assert!(matches!(now, None | Some(0)), "leadership moved to {now:?}");
    }
}

/// Publishes `n` records to partition 0 of `topic` in requests of 20: values are the record's
/// number in 8 digits, padded to `size` bytes; `keyed` adds the key `k<i>` and a header
/// `n=<i>`.
async fn publish_numbered(
    c: &mut pb::tern_client::TernClient<tonic::transport::Channel>,
    topic: &str,
    n: usize,
    size: usize,
    keyed: bool,
) {
    for chunk in 0..(n / 20) {
        let records = (0..20)
            .map(|k| {
                let i = chunk * 20 + k;
                let mut v = format!("{i:08}").into_bytes();
                v.resize(size, b'x');
                let headers = match keyed {
                    true => vec![pb::Header {
                        key: "n".into(),
                        value: i.to_string().into_bytes().into(),
                    }],
                    false => vec![],
                };
                pb::PublishRecord {
                    partition: Some(0),
                    key: keyed.then(|| format!("k{i}").into_bytes().into()),
                    headers,
                    value: v.into(),
                    ..Default::default()
                }
            })
            .collect();
        c.publish(pb::PublishRequest {
            topic: topic.into(),
            records,
            ..Default::default()
        })
        .await
        .expect("publish");
    }
}

/// Waits (30 s at most) until the node `c` talks to holds a replica of partition 0 of `topic`
/// with at least `n` records.
async fn wait_caught_up(
    c: &mut pb::tern_client::TernClient<tonic::transport::Channel>,
    topic: &str,
    n: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = c
            .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
            .await
            .unwrap()
            .into_inner();
        if d.partitions[0].local && d.partitions[0].end_offset >= n as u64 {
            return;
        }
        assert!(Instant::now() < deadline, "the replica did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A group member's records, as (value, key, header) of each, and the bytes of their values;
/// acks each message's deliveries in queue mode.
async fn consume_n(
    m: &mut GroupMember,
    n: usize,
    queue: bool,
) -> (Vec<(String, String, String)>, u64) {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        assert!(Instant::now() < deadline, "consumed {} of {n}", out.len());
        let d = match m.next(Duration::from_secs(1)).await {
            Some(Ok(Down::Deliveries(d))) => d,
            Some(Ok(_)) | None => continue,
            Some(Err(s)) => panic!("consume: {s:?}"),
        };
        let mut refs = Vec::new();
        for r in d.deliveries.iter().filter_map(|d| d.record.as_ref()) {
            bytes += r.value.len() as u64;
            let key = String::from_utf8(r.key.clone().unwrap_or_default().to_vec()).unwrap();
            let header = r
                .headers
                .iter()
                .map(|h| format!("{}={}", h.key, String::from_utf8_lossy(&h.value)))
                .collect::<Vec<_>>()
                .join(",");
            out.push((
                String::from_utf8(r.value[..8].to_vec()).unwrap(),
                key,
                header,
            ));
            refs.push((r.partition, r.offset));
        }
        if queue {
            m.ack(&refs).await;
        }
    }
    (out, bytes)
}

/// Group and queue members read from their region's replica: a member whose call enters a
/// node in another region than its coordinator (the metadata leader) gets its records read
/// there, not carried across the WAN (the proxies' byte counters), in order and whole (value,
/// key, headers); joined through the coordinator's own node instead, every byte crosses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_get_their_records_from_their_regions_replica() {
    let c = GeoCluster::start(&["a", "b", "c"], RTT).await;
    let mut a = c.client(0).await;
    create_placed(&mut a, "gq", 1, 3, region_survival(&["a"])).await;
    // 3.2 MB, keyed, with a header.
    let n = 400;
    publish_numbered(&mut a, "gq", n, 8 << 10, true).await;
    let want: Vec<(String, String, String)> = (0..n)
        .map(|i| (format!("{i:08}"), format!("k{i}"), format!("n={i}")))
        .collect();
    // The member's node: one in another region than the coordinator.
    let info = a
        .cluster_info(pb::ClusterInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let coordinator = info.metadata_leader as usize - 1;
    let m = (coordinator + 1) % 3;
    let region = c.regions[m].clone();
    let mut near = c.client(m).await;
    wait_caught_up(&mut near, "gq", n).await;
    for (group, mode) in [("g", pb::GroupMode::Stream), ("q", pb::GroupMode::Queue)] {
        let queue = mode == pb::GroupMode::Queue;
        let before = c.mesh.wan_bytes();
        let started = Instant::now();
        let mut member = GroupMember::join(&c.addrs[m], join_req(group, "gq", mode))
            .await
            .expect("join");
        let (got, read) = consume_n(&mut member, n, queue).await;
        let local = c.mesh.wan_bytes() - before;
        let took = started.elapsed();
        member.leave().await;
        assert_eq!(got, want, "{mode:?}: every record, whole, in order");
        // The same through the coordinator's node, from the member's region: all crosses.
        let before = c.mesh.wan_bytes();
        let mut far = GroupMember::join(
            &c.addr_from(&region, coordinator),
            join_req(&format!("{group}-far"), "gq", mode),
        )
        .await
        .expect("join far");
        let (got, _) = consume_n(&mut far, n, queue).await;
        let remote = c.mesh.wan_bytes() - before;
        far.leave().await;
        assert_eq!(got, want);
        eprintln!(
            "{mode:?}: {read} B consumed; {local} B crossed the WAN from {region}'s replica, {remote} B from the coordinator"
        );
        // Heartbeats, the metadata and the group's coordination keep crossing; the records do
        // not.
        assert!(
            local * 4 < read,
            "{mode:?}: {local} B crossed in {took:?} for {read} B consumed in {region}"
        );
        assert!(remote >= read, "{mode:?}: {remote} B crossed for {read} B");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_moves_off_a_stale_then_a_dead_follower_without_gaps() {
    // Node 4 (region b) holds no replica: it relays reads to the nearest, node 2 (also b).
    let mut c = GeoCluster::start(&["a", "b", "c", "b"], RTT).await;
    let mut a = c.client(0).await;
    let placement = pb::Placement {
        leader_regions: vec!["a".into()],
        ..Default::default()
    };
    create_placed(&mut a, "follow", 1, 3, placement).await;
    a.move_partition(pb::MovePartitionRequest {
        topic: "follow".into(),
        partition: 0,
        replicas: vec![1, 2, 3],
    })
    .await
    .expect("move");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d = a
            .describe_topic(pb::DescribeTopicRequest {
                name: "follow".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let p = &d.partitions[0];
        if p.replicas == [1, 2, 3] && p.moving_to.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "move did not finish: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_leader(&c, "follow", 0).await;
    let writer = Writer::start_idempotent(vec![c.addrs[0].clone()], "follow");
    let mut reader = c.client(3).await;
    // Node 4 holds no replica: it must have applied the topic's creation before it can serve.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader
        .describe_topic(pb::DescribeTopicRequest {
            name: "follow".into(),
        })
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "node 4 never learned the topic");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: "follow".into(),
            from: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Earliest(true)),
            }),
            partitions: vec![],
        }],
        remove: vec![],
    })
    .await
    .unwrap();
    let mut stream = reader
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut got: Vec<u64> = Vec::new();
    // Reads until a record acknowledged after `mark` arrives (bounded).
    async fn until_past(
        stream: &mut tonic::Streaming<pb::SubscribeResponse>,
        got: &mut Vec<u64>,
        past: usize,
        what: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() <= past {
            let msg = tokio::time::timeout_at(deadline.into(), stream.message())
                .await
                .unwrap_or_else(|_| panic!("{what}: stuck at {} records", got.len()))
                .expect("stream")
                .expect("open");
            for r in msg.records {
                got.push(
                    String::from_utf8(r.value.to_vec())
                        .unwrap()
                        .parse()
                        .unwrap(),
                );
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    until_past(&mut stream, &mut got, writer.acked(), "before").await;
    // Node 2 stops hearing its leader: it goes stale and the reader moves on.
    c.isolate(1, vec![1]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    until_past(&mut stream, &mut got, writer.acked(), "node 2 stale").await;
    c.isolate(1, vec![]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    until_past(&mut stream, &mut got, writer.acked(), "node 2 healed").await;
    // Node 2 dies: the reader moves again.
    c.kill9(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    until_past(&mut stream, &mut got, writer.acked(), "node 2 dead").await;
    let acked = writer.finish().await;
    until_past(&mut stream, &mut got, acked.len() - 1, "the end").await;
    // Every acknowledged record once, in order, nothing skipped or repeated.
    let want: Vec<u64> = (0..got.len() as u64).collect();
    assert_eq!(got, want, "no gap, no repeat, in order");
    assert!(acked.iter().all(|s| (*s as usize) < got.len()));
}

/// Reads partition 0 of `topic` from the node `c` talks to (its own replica, as a reader in
/// its region does) until told to stop: (offset, value) of every record it was served.
fn reader(
    c: pb::tern_client::TernClient<tonic::transport::Channel>,
    topic: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<(u64, String)>> {
    reader_counting(c, topic, stop, Default::default())
}

/// [`reader`], counting the records served so far in `count`.
fn reader_counting(
    mut c: pb::tern_client::TernClient<tonic::transport::Channel>,
    topic: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
    count: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<(u64, String)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut at = 0u64;
        while !*stop.borrow() {
            match c.fetch(fetch_at(topic, at, 200)).await {
                Ok(r) => {
                    let r = r.into_inner();
                    for rec in r.records {
                        seen.push((rec.offset, String::from_utf8_lossy(&rec.value).into()));
                    }
                    count.store(seen.len(), std::sync::atomic::Ordering::Relaxed);
                    at = r.next_offset.max(at);
                }
                // Without a leader (the cut), a replica may refuse or relay in vain: again.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        seen
    })
}

/// A region cut under load: nothing acknowledged is lost, and nothing b's replica served its
/// readers is lost or changed either. b serves a record once it and the leader hold it (the
/// leader's durable reports, `raft::early`), before the leader's next append says it is
/// committed; cutting the leader's region then is where a wrong count would show, as records
/// served that the next leader does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_cut_under_load_loses_nothing_of_a_region_survival_topic() {
    let c = GeoCluster::start(&["a", "b", "c"], RTT).await;
    let mut a = c.client(0).await;
    create_placed(&mut a, "survive", 1, 3, region_survival(&["a"])).await;
    wait_leader(&c, "survive", 0).await;
    // Producers in b, publishing to b's node (forwarded to the leader) or, failing that, c's.
    let writer = Writer::start_idempotent(vec![c.addrs[1].clone(), c.addr_from("b", 2)], "survive");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let read = reader(c.client(1).await, "survive", stopped);
    // Some records acknowledged before the cut (a loaded machine may take more than a moment).
    writer
        .wait_acked(
            20,
            Duration::from_secs(30),
            "nothing acknowledged before the cut",
        )
        .await;
    let before_cut = writer.acked();
    // The leader reported what it holds to its far followers, and b's replica let its readers
    // read by that (data partitions only: the metadata's group does not report).
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.counter(1, "tern_raft_commits_reported_total") == 0 {
        let reports = c.counter(0, "tern_raft_durable_reports_total");
        assert!(
            Instant::now() < deadline,
            "b never committed by a report ({reports} sent)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c.counter(0, "tern_raft_durable_reports_total") > 0);
    c.mesh.cut_region("a");
    let cut = Instant::now();
    // The leader's region is gone: b and c elect one and acknowledge again.
    writer
        .wait_acked(
            before_cut + 11,
            Duration::from_secs(30),
            "no acknowledgements after the cut",
        )
        .await;
    eprintln!("acknowledging again {:?} after the cut", cut.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.mesh.heal_region("a");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = writer.finish().await;
    let _ = stop.send(true);
    let served = read.await.unwrap();
    assert_held_where_served(&c, "survive", &acked, &served).await;
    eprintln!(
        "b served {} records; {} committed by reports",
        served.len(),
        c.counter(1, "tern_raft_commits_reported_total")
    );
}

/// Every replica of partition 0 of `topic` holds every acknowledged record once, and every
/// record `served` (by one replica to its reader) at the offset it was served at; what was
/// served is in order, without a record between two served ones (offsets of control entries
/// hold no record). Waits (bounded) for replicas to catch up.
async fn assert_held_where_served(
    c: &GeoCluster,
    topic: &'static str,
    acked: &[u64],
    served: &[(u64, String)],
) {
    assert!(!served.is_empty(), "the replica served nothing");
    let last_served = served.last().map_or(0, |(o, _)| *o);
    for i in 0..c.nodes.len() {
        let mut r = c.client(i).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let log = loop {
            let log = node_support::cluster::read_all(&mut r, topic, 0, acked.len()).await;
            if log.len() >= acked.len() || Instant::now() > deadline {
                break log;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let dups = check_acked(&log, acked);
        assert_eq!(dups, 0, "node {} has duplicates", i + 1);
        let held: std::collections::BTreeMap<u64, String> = loop {
            let held: std::collections::BTreeMap<u64, String> =
                node_support::try_fetch_all(&mut r, topic, 0)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|rec| (rec.offset, String::from_utf8_lossy(&rec.value).into()))
                    .collect();
            if held.range(last_served..).next().is_some() || Instant::now() > deadline {
                break held;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for (offset, value) in served {
            assert_eq!(
                held.get(offset),
                Some(value),
                "node {} does not hold what was served at {offset}",
                i + 1
            );
        }
        for w in served.windows(2) {
            let skipped = held.range(w[0].0 + 1..w[1].0).count();
            assert!(
                w[0].0 < w[1].0 && skipped == 0,
                "served {:?} after {:?} ({skipped} records between)",
                w[1],
                w[0]
            );
        }
    }
}

/// Waits (at most `secs`) until `writer` has 20 more records acknowledged.
async fn ack_20_more(writer: &Writer, secs: u64, what: &str) {
    writer
        .wait_acked(writer.acked() + 20, Duration::from_secs(secs), what)
        .await;
}

/// Waits until a reader counting in `served` has been served `n` records.
async fn wait_served(served: &std::sync::atomic::AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while served.load(std::sync::atomic::Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "{what}: b served nothing more");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until node `i` has moved a committed position by a leader's durable report.
async fn wait_reported(c: &GeoCluster, i: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.counter(i, "tern_raft_commits_reported_total") == 0 {
        assert!(
            Instant::now() < deadline,
            "{what}: node {} never committed by a report",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// b's replica serves records by its leader's durable reports (`raft::early`), before the
/// leader's next append says they are committed. Under load, with b's reader reading
/// throughout, b's node is killed -9 and started again (its committed position starts over
/// from its checkpoint), then the leader's (a new leader is elected without it, and it comes
/// back as a follower). Nothing acknowledged is lost, and every record b served is held by
/// every node where b served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_serving_by_reports_and_its_leader_killed_and_restarted_lose_nothing_served() {
    let mut c = GeoCluster::start(&["a", "b", "c"], RTT).await;
    let mut a = c.client(0).await;
    create_placed(&mut a, "restarts", 1, 3, region_survival(&["a"])).await;
    wait_leader(&c, "restarts", 0).await;
    // Producers in a, publishing to a's node or, failing that, c's.
    let load = Load::start(
        &c,
        "restarts",
        vec![c.addrs[0].clone(), c.addr_from("a", 2)],
        1,
    )
    .await;
    wait_reported(&c, 1, "at first").await;
    // b dies and comes back; its reader waits meanwhile, then reads on from b.
    c.kill9(1);
    ack_20_more(&load.writer, 30, "while b is down").await;
    c.start_node(1);
    wait_reported(&c, 1, "restarted").await;
    let served_before = load.served.load(std::sync::atomic::Ordering::Relaxed);
    ack_20_more(&load.writer, 30, "b back").await;
    wait_served(&load.served, served_before + 1, "b restarted").await;
    // The leader dies: b and c elect one (producers go on through c) and a comes back. (b's
    // restart may have moved the leadership: pinning brings it back to a first.)
    wait_leader(&c, "restarts", 0).await;
    let (acked, served) = load.kill_the_leader_and_check(&mut c).await;
    eprintln!("b served {served} records of {acked} acknowledged");
}

/// Idempotent producers of partition 0 of a topic, and a reader of one node's replica
/// counting what it is served.
struct Load {
    topic: &'static str,
    writer: Writer,
    stop: tokio::sync::watch::Sender<bool>,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    read: tokio::task::JoinHandle<Vec<(u64, String)>>,
}

impl Load {
    /// Producers publishing through `writers` (the first that takes them) and a reader on
    /// node `reader`; returns once 20 records are acknowledged.
    async fn start(
        c: &GeoCluster,
        topic: &'static str,
        writers: Vec<String>,
        reader: usize,
    ) -> Load {
        let writer = Writer::start_idempotent(writers, topic);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let read = reader_counting(c.client(reader).await, topic, stopped, served.clone());
        writer
            .wait_acked(20, Duration::from_secs(30), "nothing acknowledged")
            .await;
        Load {
            topic,
            writer,
            stop,
            served,
            read,
        }
    }

    /// Kills the leader, node 1, under load (a new leader is elected without it) and starts
    /// it again; then stops the load and checks that every node holds every acknowledged
    /// record once, and every record the reader was served where it was served. Returns how
    /// many records were acknowledged and served.
    async fn kill_the_leader_and_check(self, c: &mut GeoCluster) -> (usize, usize) {
        c.kill9(0);
        ack_20_more(
            &self.writer,
            60,
            "no acknowledgements after the leader died",
        )
        .await;
        let served_before = self.served.load(std::sync::atomic::Ordering::Relaxed);
        wait_served(&self.served, served_before + 1, "the leader killed").await;
        c.start_node(0);
        ack_20_more(&self.writer, 60, "after the leader is back").await;
        let acked = self.writer.finish().await;
        let _ = self.stop.send(true);
        let served = self.read.await.unwrap();
        assert_held_where_served(c, self.topic, &acked, &served).await;
        (acked.len(), served.len())
    }
}

/// Five voters over three regions (a a b b c): the leader and b's follower are not a majority,
/// so the leader's reports name the near follower that answered too (`raft::early`), and b's
/// replica serves by them. Under load, with b's reader reading throughout, the leader is
/// killed -9 (a new one is elected among the other four) and comes back. Nothing
/// acknowledged is lost, and every record b served is held by every node where b served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_five_voters_serves_by_reports_naming_the_other_holders_and_loses_nothing() {
    let mut c = GeoCluster::start(&["a", "a", "b", "b", "c"], RTT).await;
    let mut a = c.client(0).await;
    create_placed(&mut a, "five", 1, 5, region_survival(&["a"])).await;
    wait_leader(&c, "five", 0).await;
    let load = Load::start(&c, "five", vec![c.addrs[0].clone(), c.addrs[1].clone()], 2).await;
    wait_reported(&c, 2, "with five voters").await;
    let (acked, served) = load.kill_the_leader_and_check(&mut c).await;
    eprintln!(
        "b served {served} records of {acked} acknowledged; {} committed by reports",
        c.counter(2, "tern_raft_commits_reported_total")
    );
}

/// The CLI on a geo cluster: `--region` finds a node of the region through any node, topics
/// are created with a placement and describe it, and placements the nodes cannot meet are
/// refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_picks_a_node_in_its_region_and_places_topics() {
    let c = GeoCluster::start(&["a", "b", "c"], RTT).await;
    let via_a = c.addrs[0].clone();
    let run = |args: Vec<String>| {
        let server = via_a.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node_support::tern(&server, &args)
        })
    };
    let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    // Asked through a's address, the status comes from b's node: it gives node 1 (in a) at the
    // address a advertises to b, its proxy.
    let (ok, out, err) = run(args("cluster status --json --region b")).await.unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let n1 = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == 1)
        .unwrap();
    assert_eq!(n1["address"], c.addr_from("b", 0), "{v}");
    assert_eq!(n1["region"], "a");
    let (ok, _, err) = run(args("cluster status --region nowhere")).await.unwrap();
    assert!(!ok);
    assert!(err.contains("no node in region \"nowhere\""), "{err}");
    // A topic placed by the CLI, as describe shows it.
    let (ok, _, err) = run(args(
        "topic create placed --replication-factor 3 --survival region --leader-regions b,a --region c",
    ))
    .await
    .unwrap();
    assert!(ok, "{err}");
    let (ok, out, err) = run(args("topic describe placed --json")).await.unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["placement"]["survival"], "region", "{v}");
    assert_eq!(
        v["placement"]["leader_regions"],
        serde_json::json!(["b", "a"])
    );
    // The preferred leader is b's node.
    assert_eq!(v["partition_info"][0]["replicas"][0], 2, "{v}");
    // What the nodes cannot meet, or what makes no sense, is refused with the reason.
    let (ok, _, err) = run(args(
        "topic create two --replication-factor 2 --survival region --regions a,b",
    ))
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("at least 3 regions"), "{err}");
    let (ok, _, err) = run(args(
        "topic create odd --replication-factor 3 --regions a --leader-regions b",
    ))
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("not among the topic's regions"), "{err}");
    let (ok, _, err) = run(args(
        "topic create home --replication-factor 3 --survival zone --regions a",
    ))
    .await
    .unwrap();
    assert!(!ok, "one node in a: three replicas cannot be placed there");
    assert!(
        err.contains("needs 3 nodes in the topic's regions"),
        "{err}"
    );
    // Nothing refused was created.
    let (ok, out, _) = run(args("topic list --json")).await.unwrap();
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "{out}");
}
