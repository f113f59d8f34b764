//! Self-healing replicas on real processes: a replica whose log is damaged cuts it, does not
//! vote until its peers have given back what it lost, and is caught up.

mod node_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use node_support::cluster::{read_all, record, Cluster};
use tern::proto::v1 as pb;

/// 32 records fill a segment (1 MiB, the least a topic may have), so a few hundred records
/// span several sealed segments.
const VALUE_BYTES: usize = 32 << 10;

/// One cluster at a time: two on the two cores of a test machine starve each other's elections.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The directory of partition 0 of `topic` under a node's data directory.
fn partition_dir(data: &Path, topic: &str) -> PathBuf {
    let topics = data.join("topics");
    let prefix = format!("{topic}.");
    let dir = std::fs::read_dir(&topics)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .unwrap_or_else(|| panic!("no directory for {topic} in {}", topics.display()))
        .path();
    dir.join("0")
}

/// The segment files of a partition, oldest first, with their base offsets.
fn segments(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = name.strip_suffix(".log")?.parse().ok()?;
            Some((base, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// One partition, three replicas, segments of 1 MiB.
async fn create_with_small_segments(cluster: &Cluster, topic: &str) {
    cluster
        .client(0)
        .await
        .create_topic(pb::CreateTopicRequest {
            name: topic.into(),
            partitions: 1,
            replication_factor: 3,
            config: Some(pb::TopicConfig {
                segment_bytes: Some(1 << 20),
                ..Default::default()
            }),
            placement: None,
            mirror_of: None,
        })
        .await
        .expect("create");
}

async fn publish_range(cluster: &Cluster, node: usize, topic: &str, from: usize, to: usize) {
    let mut c = cluster.client(node).await;
    for chunk in (from..to).collect::<Vec<_>>().chunks(10) {
        let records = chunk
            .iter()
            .map(|i| {
                let mut r = record(0, format!("{i:05}"));
                let mut v = r.value.to_vec();
                v.resize(VALUE_BYTES, b'.');
                r.value = v.into();
                r
            })
            .collect();
        let req = pb::PublishRequest {
            topic: topic.into(),
            records,
            ..Default::default()
        };
        // Again while nothing was written: no leader yet, or a node that just started.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.publish(req.clone()).await {
                Ok(_) => break,
                Err(s)
                    if s.code() == tonic::Code::Unavailable
                        && s.metadata().get("tern-unwritten").is_some()
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(s) => panic!("publish failed: {s:?}"),
            }
        }
    }
}

fn want(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut v = format!("{i:05}").into_bytes();
            v.resize(VALUE_BYTES, b'.');
            String::from_utf8(v).unwrap()
        })
        .collect()
}

/// The case Jepsen found in NATS: acknowledged writes live on a majority (A and B); a third
/// replica (C) lags; B's files are damaged so it loses the tail; A goes down. If B voted on its
/// cut log, B and C could elect a leader without the acknowledged tail and lose it. B must not
/// vote until it has those entries back, so there is no leader until A returns, and then
/// nothing acknowledged is missing anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_damaged_log_does_not_vote_until_it_has_caught_up() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3).await;
    create_with_small_segments(&cluster, "heal").await;
    let a = cluster.leader("heal", 0).await;
    let b = (a + 1) % 3;
    let lagging = (a + 2) % 3;
    publish_range(&cluster, a, "heal", 0, 100).await;
    // C everything up to 100 before it is cut off.
    assert_eq!(
        read_all(&mut cluster.client(lagging).await, "heal", 0, 100).await,
        want(100)
    );
    cluster
        .isolate(lagging, vec![a as u64 + 1, b as u64 + 1])
        .await;
    publish_range(&cluster, a, "heal", 100, 300).await;
    assert_eq!(
        read_all(&mut cluster.client(b).await, "heal", 0, 300).await,
        want(300)
    );

    // B goes down and one of its sealed segments past offset 150 loses its second half.
    cluster.kill9(b);
    let dir = partition_dir(&cluster.dirs[b], "heal");
    let segs = segments(&dir);
    let (_, victim) = segs[..segs.len() - 1]
        .iter()
        .rev()
        .find(|(base, _)| *base <= 150)
        .cloned()
        .expect("a sealed segment at or before offset 150");
    let len = std::fs::metadata(&victim).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    // A goes down; C hears from the others again; B comes back with its cut log.
    cluster.kill9(a);
    cluster.isolate(lagging, vec![]).await;
    cluster.start_node(b);
    // Neither B nor C may lead: C lacks the acknowledged tail, and B would need C's vote and C
    // B's. A publish must not be acknowledged while A is down.
    let mut probe = cluster.client(lagging).await;
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let mut req = tonic::Request::new(pb::PublishRequest {
            topic: "heal".into(),
            records: vec![record(0, "while-a-is-down".into())],
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(2));
        if let Ok(r) = probe.publish(req).await {
            panic!(
                "a leader without the acknowledged tail was elected and took a write: {:?}",
                r.into_inner()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A returns: a leader with everything is elected, B is caught up, and every replica holds
    // every acknowledged record, once, in order.
    cluster.start_node(a);
    publish_range(&cluster, a, "heal", 300, 310).await;
    for node in [a, b, lagging] {
        let got = read_all(&mut cluster.client(node).await, "heal", 0, 310).await;
        assert_eq!(got, want(310), "node {}", node + 1);
    }

    // B votes again once caught up: with A down for good, B and C elect a leader.
    cluster.kill9(a);
    publish_range(&cluster, b, "heal", 310, 320).await;
    for node in [b, lagging] {
        let got = read_all(&mut cluster.client(node).await, "heal", 0, 320).await;
        assert_eq!(got, want(320), "node {}", node + 1);
    }
}

/// A bit flipped inside a sealed segment of a running replica is found by a read: the read
/// fails (the bad bytes are never served), the replica reopens itself with its log cut at the
/// damage, and its peers give back the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_by_a_read_is_never_served_and_the_replica_heals() {
    let _serial = SERIAL.lock().await;
    flip_a_bit_and_heal(false).await;
}

/// The same flip in a stopped replica is found soon after it starts, with no read asking for
/// those records: the replica opens its sealed segments from their stamps files and verifies
/// their batches in the background, and the damage found there is cut and healed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_at_start_is_cut_and_the_replica_heals() {
    let _serial = SERIAL.lock().await;
    flip_a_bit_and_heal(true).await;
}

async fn flip_a_bit_and_heal(restart: bool) {
    let topic = if restart {
        "flip-stopped"
    } else {
        "flip-running"
    };
    // Restarting, a checkpoint after every entry: the restart then re-reads no entry it had
    // applied, so only the background verification reads the damaged segment.
    let mut cluster = if restart {
        Cluster::start_with(3, &["--raft-checkpoint-entries", "1"]).await
    } else {
        Cluster::start(3).await
    };
    create_with_small_segments(&cluster, topic).await;
    let leader = cluster.leader(topic, 0).await;
    let f = (leader + 1) % 3;
    publish_range(&cluster, leader, topic, 0, 200).await;
    assert_eq!(
        read_all(&mut cluster.client(f).await, topic, 0, 200).await,
        want(200)
    );
    if restart {
        cluster.kill9(f);
    }
    let dir = partition_dir(&cluster.dirs[f], topic);
    let segs = segments(&dir);
    // Restarting, the last sealed segment: the restart's own reads (the entries after the
    // checkpoint, openraft's search for term changes from the first entry) do not reach it.
    let (_, victim) = segs[if restart { segs.len() - 2 } else { 1 }].clone();
    assert!(
        victim.with_extension("index").exists(),
        "the segment is sealed"
    );
    let original = std::fs::read(&victim).unwrap();
    let at = original.len() / 2;
    let mut bytes = original.clone();
    bytes[at] ^= 0x10;
    std::fs::write(&victim, bytes).unwrap();
    // Waits until the flipped byte is gone from F's files (cut there, or written again from
    // the leader's copy), failing with `what` after `within`.
    let healed = |within: Duration, what: String| {
        let (victim, original) = (&victim, &original);
        async move {
            let deadline = Instant::now() + within;
            loop {
                let now = std::fs::read(victim).unwrap_or_default();
                if now.get(at).is_none_or(|b| *b == original[at]) {
                    return;
                }
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    if restart {
        cluster.start_node(f);
        // Nobody reads from F yet: its background verification must find the damage.
        healed(
            Duration::from_secs(60),
            format!(
                "node {}'s verification did not find and heal the damage within 60 s",
                f + 1
            ),
        )
        .await;
    }

    // Reads from F: an error while it repairs, never a record that is not what was written.
    let mut client = cluster.client(f).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut refused = 0;
    loop {
        match node_support::try_fetch_all(&mut client, topic, 0).await {
            Ok(rs) => {
                let got = node_support::cluster::values(&rs);
                assert!(
                    want(200).starts_with(&got),
                    "node {} served records that were not written",
                    f + 1
                );
                if got.len() == 200 {
                    break;
                }
            }
            Err(s) => {
                refused += 1;
                assert!(
                    matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::NotFound
                            | tonic::Code::DataLoss
                            | tonic::Code::Internal
                    ),
                    "{s:?}"
                )
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {} did not heal within 60 s",
            f + 1
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("reads refused while the replica repaired: {refused}");
    // The flipped byte is gone from F's files: the segment was cut there and written again
    // from the leader's copy (a replica that only forwarded its reads would still hold it).
    healed(
        Duration::from_secs(30),
        format!("node {} still holds the damaged byte", f + 1),
    )
    .await;
}
