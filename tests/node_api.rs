//! The single-node broker through its gRPC API, on real `tern serve` processes.

mod node_support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use node_support::{create_topic, fetch_all, rec, TestNode};
use tern::proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Code;

#[tokio::test]
async fn publish_and_read_back_across_partitions_and_cores_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    create_topic(&mut c, "orders", 8).await;
    // 40 keys × 50 records, published in batches of 100 records.
    let mut acked: HashMap<(u32, u64), String> = HashMap::new();
    let mut per_key_offsets: HashMap<String, Vec<(u32, u64)>> = HashMap::new();
    for b in 0..20 {
        let records: Vec<_> = (0..100)
            .map(|i| {
                let n = b * 100 + i;
                rec(Some(&format!("key-{}", n % 40)), format!("v{n}"))
            })
            .collect();
        let resp = c
            .publish(pb::PublishRequest {
                topic: "orders".into(),
                records: records.clone(),
                request_id: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.acks.len(), 100);
        for (r, a) in records.iter().zip(resp.acks) {
            let v = String::from_utf8(r.value.to_vec()).unwrap();
            let k = String::from_utf8(r.key.clone().unwrap().to_vec()).unwrap();
            assert!(
                acked.insert((a.partition, a.offset), v).is_none(),
                "offset given twice"
            );
            per_key_offsets
                .entry(k)
                .or_default()
                .push((a.partition, a.offset));
        }
    }
    // A key always lands on one partition, at increasing offsets.
    for (k, offs) in &per_key_offsets {
        assert!(
            offs.iter().all(|o| o.0 == offs[0].0),
            "{k} spread over partitions"
        );
        assert!(offs.windows(2).all(|w| w[1].1 > w[0].1), "{k} out of order");
    }
    // Every partition reads back exactly what was acknowledged, offsets dense from 0.
    let mut total = 0;
    let describe = c
        .describe_topic(pb::DescribeTopicRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let cores: std::collections::HashSet<u32> =
        describe.partitions.iter().map(|p| p.core).collect();
    assert_eq!(cores.len(), 2, "8 partitions spread over both cores");
    for p in 0..8 {
        let recs = fetch_all(&mut c, "orders", p).await;
        assert!(
            recs.windows(2).all(|w| w[0].offset < w[1].offset),
            "offsets increase"
        );
        for r in &recs {
            assert_eq!(
                acked.get(&(p, r.offset)).map(String::as_str),
                Some(std::str::from_utf8(&r.value).unwrap())
            );
        }
        // The end offset is past the last record (control records also take offsets).
        assert_eq!(
            describe.partitions[p as usize].end_offset,
            recs.last().unwrap().offset + 1
        );
        total += recs.len();
    }
    assert_eq!(total, 2000);
}

#[tokio::test]
async fn live_subscriber_receives_records_published_after_it_subscribed() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    create_topic(&mut c, "a", 3).await;
    create_topic(&mut c, "b", 2).await;
    // Old records that a subscription from `latest` must not see.
    c.publish(pb::PublishRequest {
        topic: "a".into(),
        records: vec![rec(None, "old".into())],
        request_id: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: "a".into(),
            from: None,
            partitions: vec![],
        }],
        remove: vec![],
    })
    .await
    .unwrap();
    let mut sub = node
        .client()
        .await
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let publish = |topic: &'static str, v: &str| {
        let mut c = c.clone();
        let v = v.to_string();
        async move {
            c.publish(pb::PublishRequest {
                topic: topic.into(),
                records: vec![rec(Some(&v), v.clone())],
                request_id: 0,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    };
    publish("a", "new-1").await;
    publish("a", "new-2").await;
    let mut got = next_values(&mut sub, 2).await;
    got.sort();
    assert_eq!(
        got,
        vec![("a".into(), "new-1".into()), ("a".into(), "new-2".into())]
    );
    // Add topic b from earliest on the live subscription, remove a.
    publish("b", "b-early").await;
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: "b".into(),
            from: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Earliest(true)),
            }),
            partitions: vec![],
        }],
        remove: vec!["a".into()],
    })
    .await
    .unwrap();
    assert_eq!(
        next_values(&mut sub, 1).await,
        vec![("b".into(), "b-early".into())]
    );
    publish("a", "after-remove").await;
    publish("b", "b-late").await;
    assert_eq!(
        next_values(&mut sub, 1).await,
        vec![("b".into(), "b-late".into())]
    );
    // An unknown topic added later ends the subscription with NOT_FOUND.
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: "nope".into(),
            from: None,
            partitions: vec![],
        }],
        remove: vec![],
    })
    .await
    .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn kill_9_after_acks_then_restart_keeps_every_acked_record_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Vec<(u32, u64, String)> = Vec::new();
    {
        let node = TestNode::start(dir.path(), &[]);
        let mut c = node.client().await;
        create_topic(&mut c, "t", 4).await;
        // Publishers keep going while the node is killed; only acknowledged records count.
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for w in 0..4 {
            let mut c = c.clone();
            let ack_tx = ack_tx.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let v = format!("w{w}-{i}");
                    let r = c
                        .publish(pb::PublishRequest {
                            topic: "t".into(),
                            records: vec![rec(Some(&format!("w{w}")), v.clone())],
                            request_id: 0,
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(r) => {
                            let a = r.into_inner().acks[0];
                            let _ = ack_tx.send((a.partition, a.offset, v));
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        drop(ack_tx);
        tokio::time::sleep(Duration::from_millis(800)).await;
        node.kill9();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        while let Some(a) = ack_rx.recv().await {
            acked.push(a);
        }
    }
    assert!(
        acked.len() > 20,
        "only {} acks before the kill",
        acked.len()
    );
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    for p in 0..4 {
        let recs = fetch_all(&mut c, "t", p).await;
        let mut last_seen: HashMap<String, u64> = HashMap::new();
        for r in &recs {
            let v = String::from_utf8(r.value.to_vec()).unwrap();
            let (w, i) = v.split_once('-').unwrap();
            let i: u64 = i.parse().unwrap();
            if let Some(prev) = last_seen.insert(w.to_string(), i) {
                assert!(i > prev, "partition {p}: {v} after {w}-{prev}");
            }
        }
        for (ap, off, v) in acked.iter().filter(|a| a.0 == p) {
            let r = recs
                .iter()
                .find(|r| r.offset == *off)
                .unwrap_or_else(|| panic!("acked {ap}/{off} lost"));
            assert_eq!(
                std::str::from_utf8(&r.value).unwrap(),
                v,
                "offset {off} holds another record"
            );
        }
    }
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--max-partitions-per-topic",
            "16",
            "--max-records-per-request",
            "100",
        ],
    );
    let mut c = node.client().await;
    let create = |name: &str, partitions: u32, rf: u32, config: Option<pb::TopicConfig>| {
        pb::CreateTopicRequest {
            name: name.into(),
            partitions,
            replication_factor: rf,
            config,
            placement: None,
            mirror_of: None,
        }
    };
    let e = expect_err(c.create_topic(create("bad name", 1, 1, None)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("letters, digits"), "{}", e.message());
    let e = expect_err(c.create_topic(create(&"x".repeat(250), 1, 1, None)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = expect_err(c.create_topic(create("t", 17, 1, None)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("1 to 16"), "{}", e.message());
    let e = expect_err(c.create_topic(create("t", 1, 3, None)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("replication factor 3"),
        "{}",
        e.message()
    );
    let bad_cfg = pb::TopicConfig {
        retention_ms: Some(-5),
        ..Default::default()
    };
    let e = expect_err(c.create_topic(create("t", 1, 1, Some(bad_cfg))).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    let small = pb::TopicConfig {
        max_record_bytes: Some(100),
        ..Default::default()
    };
    c.create_topic(create("t", 2, 1, Some(small)))
        .await
        .unwrap();
    let e = expect_err(c.create_topic(create("t", 2, 1, None)).await);
    assert_eq!(e.code(), Code::AlreadyExists);
    // Nothing above created anything else.
    let topics = c
        .list_topics(pb::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(
        topics.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        vec!["t"]
    );

    let publish = |records: Vec<pb::PublishRecord>| pb::PublishRequest {
        topic: "t".into(),
        records,
        request_id: 0,
        ..Default::default()
    };
    let e = expect_err(
        c.publish(pb::PublishRequest {
            topic: "nope".into(),
            records: vec![rec(None, "x".into())],
            request_id: 0,
            ..Default::default()
        })
        .await,
    );
    assert_eq!(e.code(), Code::NotFound);
    let e = expect_err(c.publish(publish(vec![])).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    // One bad record among good ones: the whole request is refused, nothing is written.
    let mut records: Vec<_> = (0..5).map(|i| rec(None, format!("ok{i}"))).collect();
    records.push(rec(None, "y".repeat(101)));
    let e = expect_err(c.publish(publish(records)).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("record 5"), "{}", e.message());
    let mut wrong_partition = rec(None, "x".into());
    wrong_partition.partition = Some(2);
    let e = expect_err(
        c.publish(publish(vec![rec(None, "fine".into()), wrong_partition]))
            .await,
    );
    assert_eq!(e.code(), Code::NotFound);
    let e = expect_err(
        c.publish(publish(
            (0..101).map(|i| rec(None, i.to_string())).collect(),
        ))
        .await,
    );
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut expiring = rec(None, "x".into());
    expiring.expiry_seconds = Some(0);
    let e = expect_err(c.publish(publish(vec![expiring])).await);
    assert_eq!(e.code(), Code::InvalidArgument);
    for p in 0..2 {
        assert!(
            fetch_all(&mut c, "t", p).await.is_empty(),
            "partition {p} was written to"
        );
    }
    // Fetch bounds.
    let fetch = |partition: u32, offset: u64| pb::FetchRequest {
        topic: "t".into(),
        partition,
        offset,
        max_records: 0,
        max_bytes: 0,
        max_wait_ms: 0,
        raw_batches: false,
        topic_uid: 0,
    };
    let e = expect_err(c.fetch(fetch(0, 5)).await);
    assert_eq!(e.code(), Code::OutOfRange);
    let e = expect_err(c.fetch(fetch(9, 0)).await);
    assert_eq!(e.code(), Code::NotFound);
    let e = expect_err(
        c.delete_topic(pb::DeleteTopicRequest {
            name: "nope".into(),
        })
        .await,
    );
    assert_eq!(e.code(), Code::NotFound);
    // A request over the node's size limit is refused before it is decoded, with a message
    // that names the limit and the flag.
    let huge = vec![rec(None, "z".repeat(90)); 100];
    let big = pb::PublishRequest {
        topic: "t".into(),
        records: huge,
        request_id: 0,
        ..Default::default()
    };
    let node2_dir = tempfile::tempdir().unwrap();
    let node2 = TestNode::start(node2_dir.path(), &["--max-request-bytes", "4096"]);
    let mut c2 = node2.client().await;
    let e = expect_err(c2.publish(big).await);
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("4096") && e.message().contains("--max-request-bytes"),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_flooded_mailbox_neither_loses_records_nor_hangs() {
    let dir = tempfile::tempdir().unwrap();
    // One core with a mailbox of 2 requests, waiting at most 20 ms for room.
    let node = TestNode::start(
        dir.path(),
        &[
            "--cores",
            "1",
            "--mailbox-capacity",
            "2",
            "--mailbox-wait-ms",
            "20",
        ],
    );
    let mut c = node.client().await;
    create_topic(&mut c, "flood", 4).await;
    let mut tasks = Vec::new();
    for w in 0..200u32 {
        let mut c = node.client().await;
        tasks.push(tokio::spawn(async move {
            let mut records: Vec<_> = (0..20).map(|i| rec(None, format!("{w}-{i}"))).collect();
            for r in &mut records {
                r.partition = Some(w % 4);
            }
            c.publish(pb::PublishRequest {
                topic: "flood".into(),
                records,
                request_id: 0,
                ..Default::default()
            })
            .await
        }));
    }
    let mut ok = Vec::new();
    let mut exhausted = 0;
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("no hang")
            .unwrap()
        {
            Ok(r) => ok.push(r.into_inner()),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("retry"), "{}", s.message());
                exhausted += 1;
            }
        }
    }
    eprintln!(
        "{} accepted, {exhausted} refused with RESOURCE_EXHAUSTED",
        ok.len()
    );
    assert!(!ok.is_empty());
    let mut stored = 0;
    for p in 0..4 {
        let recs = fetch_all(&mut c, "flood", p).await;
        stored += recs.len();
        for resp in &ok {
            for a in resp.acks.iter().filter(|a| a.partition == p) {
                assert!(
                    recs.iter().any(|r| r.offset == a.offset),
                    "acked record lost"
                );
            }
        }
    }
    // Refused requests wrote nothing: exactly the accepted records are stored.
    assert_eq!(stored, ok.len() * 20);
}

#[tokio::test]
async fn publish_stream_keeps_request_order_per_partition() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    create_topic(&mut c, "s", 2).await;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    for id in 1..=200u64 {
        tx.send(pb::PublishRequest {
            topic: "s".into(),
            records: vec![rec(Some("same-key"), format!("m{id}"))],
            request_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // One bad request in the middle is answered with an error; the stream goes on.
    tx.send(pb::PublishRequest {
        topic: "missing".into(),
        records: vec![rec(None, "x".into())],
        request_id: 999,
        ..Default::default()
    })
    .await
    .unwrap();
    drop(tx);
    let mut out = c
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut by_id = HashMap::new();
    while let Some(r) = out.next().await {
        let r = r.unwrap();
        by_id.insert(r.request_id, r);
    }
    assert_eq!(by_id.len(), 201);
    assert_eq!(
        by_id[&999].error.as_ref().unwrap().code,
        Code::NotFound as i32
    );
    let offsets: Vec<u64> = (1..=200).map(|id| by_id[&id].acks[0].offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "request order kept: {offsets:?}"
    );
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero_and_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(
        dir.path(),
        &[
            "--default-fsync",
            "interval",
            "--default-fsync-interval-ms",
            "60000",
        ],
    );
    let mut c = node.client().await;
    create_topic(&mut c, "t", 1).await;
    for i in 0..50 {
        c.publish(pb::PublishRequest {
            topic: "t".into(),
            records: vec![rec(None, format!("r{i}"))],
            request_id: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let status = node.terminate();
    assert!(status.success(), "exit status {status:?}");
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    let recs = fetch_all(&mut c, "t", 0).await;
    assert_eq!(recs.len(), 50);
    assert_eq!(&recs[49].value[..], b"r49");
    let t = c
        .describe_topic(pb::DescribeTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        t.topic.unwrap().config.unwrap().fsync_policy,
        pb::FsyncPolicy::Interval as i32
    );
}

#[tokio::test]
async fn fetch_long_polls_until_a_record_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    create_topic(&mut c, "lp", 1).await;
    let mut c2 = c.clone();
    let waiter = tokio::spawn(async move {
        c2.fetch(pb::FetchRequest {
            topic: "lp".into(),
            partition: 0,
            offset: 0,
            max_records: 10,
            max_bytes: 0,
            max_wait_ms: 20_000,
            raw_batches: false,
            topic_uid: 0,
        })
        .await
        .unwrap()
        .into_inner()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "fetch waits for data");
    c.publish(pb::PublishRequest {
        topic: "lp".into(),
        records: vec![pb::PublishRecord {
            key: None,
            value: Bytes::from_static(b"wake"),
            headers: vec![pb::Header {
                key: "h".into(),
                value: Bytes::from_static(b"1"),
            }],
            partition: Some(0),
            expiry_seconds: None,
        }],
        request_id: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("woken by the commit")
        .unwrap();
    assert_eq!(r.records.len(), 1);
    assert_eq!(&r.records[0].value[..], b"wake");
    assert_eq!(r.records[0].headers[0].key, "h");
    assert_eq!(r.next_offset, r.records[0].offset + 1);
}

#[tokio::test]
async fn fetch_stream_answers_each_commit_in_order_and_each_empty_poll() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    create_topic(&mut c, "fs", 2).await;
    let ask = |topic: &str, partition: u32, offset: u64, raw_batches: bool| pb::FetchRequest {
        topic: topic.into(),
        partition,
        offset,
        max_wait_ms: 150,
        raw_batches,
        ..Default::default()
    };
    // Refused before the stream starts.
    let e = c
        .fetch_stream(ask("nope", 0, 0, false))
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c.fetch_stream(ask("fs", 2, 0, false)).await.err().unwrap();
    assert!(
        matches!(e.code(), Code::NotFound | Code::InvalidArgument),
        "{e:?}"
    );
    // A topic other than the one asked for (created again under its name) is refused.
    let uid = c
        .describe_topic(pb::DescribeTopicRequest { name: "fs".into() })
        .await
        .unwrap()
        .into_inner()
        .topic
        .unwrap()
        .uid;
    assert_ne!(uid, 0);
    let other = pb::FetchRequest {
        topic_uid: uid.wrapping_add(1),
        ..ask("fs", 0, 0, true)
    };
    let e = c.fetch(other.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = c.fetch_stream(other).await.err().unwrap();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let same = pb::FetchRequest {
        topic_uid: uid,
        ..ask("fs", 0, 0, true)
    };
    c.fetch(same).await.expect("the topic asked for");
    // An offset past the end ends the stream with the range to move into.
    let mut past = c
        .fetch_stream(ask("fs", 0, 1_000, false))
        .await
        .unwrap()
        .into_inner();
    let e = tokio::time::timeout(Duration::from_secs(10), past.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    let range = e
        .metadata()
        .get("tern-offset-range")
        .unwrap()
        .to_str()
        .unwrap();
    let (start, end) = range.split_once('-').unwrap();
    let (start, end): (u64, u64) = (start.parse().unwrap(), end.parse().unwrap());
    assert!(start <= end && end < 1_000, "{range}");

    let mut records = c
        .fetch_stream(ask("fs", 0, 0, false))
        .await
        .unwrap()
        .into_inner();
    let mut raw = c
        .fetch_stream(ask("fs", 0, 0, true))
        .await
        .unwrap()
        .into_inner();
    // Nothing yet: each long poll is answered, empty, with where the partition ends.
    // (Control entries may take the first offsets: skipped, never delivered.)
    for _ in 0..2 {
        let r = next_answer(&mut records).await;
        assert!(r.records.is_empty() && r.batches.is_empty(), "{r:?}");
        assert_eq!(r.high_watermark, end, "{r:?}");
        assert!(r.next_offset <= end, "{r:?}");
    }
    let mut seen = Vec::new();
    let mut raw_end = 0;
    for round in 0..3u32 {
        for i in 0..4u32 {
            let value = format!("r{round}-{i}");
            c.publish(pb::PublishRequest {
                topic: "fs".into(),
                records: vec![pb::PublishRecord {
                    value: Bytes::from(value),
                    partition: Some(0),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let want = (round as usize + 1) * 4;
        while seen.len() < want {
            let r = next_answer(&mut records).await;
            assert!(r.batches.is_empty());
            for rec in &r.records {
                seen.push((rec.offset, String::from_utf8(rec.value.to_vec()).unwrap()));
            }
            if let Some(last) = r.records.last() {
                assert_eq!(r.next_offset, last.offset + 1);
            }
        }
        while raw_end < seen.last().unwrap().0 + 1 {
            let r = next_answer(&mut raw).await;
            assert!(r.records.is_empty());
            assert_eq!(r.next_offset > raw_end, !r.batches.is_empty(), "{r:?}");
            raw_end = r.next_offset;
        }
    }
    let values: Vec<String> = seen.iter().map(|(_, v)| v.clone()).collect();
    let sent: Vec<String> = (0..3)
        .flat_map(|r| (0..4).map(move |i| format!("r{r}-{i}")))
        .collect();
    assert_eq!(values, sent, "every record once, in order");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "offsets rise: {seen:?}"
    );
    // Nothing in the other partition: its stream only says it is alive.
    let mut other = c
        .fetch_stream(ask("fs", 1, 0, false))
        .await
        .unwrap()
        .into_inner();
    let r = next_answer(&mut other).await;
    assert!(r.records.is_empty(), "{r:?}");
    assert!(r.high_watermark <= end, "{r:?}");
}

async fn next_answer(s: &mut tonic::Streaming<pb::FetchResponse>) -> pb::FetchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an answer in time")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn reflection_and_health_services_answer() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let url = format!("http://{}", node.addr);
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "tern.v1.Tern".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reflection answer");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"tern.v1.Tern"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    // The thesis seed's service is on this port; the node-to-node protocol is not listed.
    assert!(names.contains(&"broker.Broker"), "{names:?}");
    assert!(
        !names.iter().any(|n| n.starts_with("tern.internal")),
        "{names:?}"
    );
}

fn expect_err<T>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    match r {
        Ok(_) => panic!("expected an error status"),
        Err(e) => e,
    }
}

type Sub = tonic::Streaming<pb::SubscribeResponse>;

/// Waits (bounded) for `n` records and returns (topic, value) pairs.
async fn next_values(sub: &mut Sub, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a record arrives within 10 s")
            .expect("stream open")
            .expect("no error");
        got.extend(
            r.records
                .into_iter()
                .map(|r| (r.topic, String::from_utf8(r.value.to_vec()).unwrap())),
        );
    }
    got
}

/// A steady trickle of small publishes from several clients, the load that exposed lost
/// cross-thread wake-ups (a core asleep with requests in its mailbox). Every publish must be
/// answered promptly; the bound is generous (5 s) so only a stall fails it.
#[tokio::test]
async fn a_steady_trickle_of_publishes_never_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    create_topic(&mut c, "trickle", 6).await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut c = node.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..150 {
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.publish(pb::PublishRequest {
                        topic: "trickle".into(),
                        records: vec![rec(None, format!("{w}-{i}"))],
                        request_id: 0,
                        ..Default::default()
                    }),
                )
                .await;
                assert!(
                    r.is_ok(),
                    "publish {w}-{i} unanswered for 5 s: the node stalled"
                );
                r.unwrap().unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut total = 0;
    for p in 0..6 {
        total += fetch_all(&mut c, "trickle", p).await.len();
    }
    assert_eq!(total, 600);
}

#[tokio::test]
async fn subscribe_from_a_timestamp_and_expired_records_are_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    create_topic(&mut c, "ts", 1).await;
    let publish = |v: &str, expiry: Option<u32>| {
        let mut c = c.clone();
        let mut r = rec(None, v.to_string());
        r.expiry_seconds = expiry;
        async move {
            c.publish(pb::PublishRequest {
                topic: "ts".into(),
                records: vec![r],
                request_id: 0,
                ..Default::default()
            })
            .await
            .unwrap();
        }
    };
    publish("before", None).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cutoff = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish("after-1", None).await;
    publish("short-lived", Some(1)).await;
    publish("after-2", None).await;
    // From the cutoff: the records published after it, nothing before.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: "ts".into(),
            from: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::TimestampMs(cutoff)),
            }),
            partitions: vec![],
        }],
        remove: vec![],
    })
    .await
    .unwrap();
    let mut sub = c
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let got: Vec<String> = next_values(&mut sub, 3)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(got, vec!["after-1", "short-lived", "after-2"]);
    // Once its second has passed, the short-lived record is no longer returned.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let values: Vec<String> = fetch_all(&mut c, "ts", 0)
        .await
        .iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect();
    assert_eq!(values, vec!["before", "after-1", "after-2"]);
}

#[tokio::test]
async fn restart_with_fewer_cores_and_recreating_a_deleted_topic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let node = TestNode::start(dir.path(), &["--cores", "2"]);
        let mut c = node.client().await;
        create_topic(&mut c, "moves", 8).await;
        create_topic(&mut c, "gone", 2).await;
        let d = c
            .describe_topic(pb::DescribeTopicRequest {
                name: "moves".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            d.partitions.iter().any(|p| p.core == 1),
            "some partitions start on core 1"
        );
        for i in 0..80 {
            let mut r = rec(None, format!("m{i}"));
            r.partition = Some(i % 8);
            c.publish(pb::PublishRequest {
                topic: "moves".into(),
                records: vec![r],
                request_id: 0,
                ..Default::default()
            })
            .await
            .unwrap();
        }
        c.publish(pb::PublishRequest {
            topic: "gone".into(),
            records: vec![rec(None, "old".into())],
            request_id: 0,
            ..Default::default()
        })
        .await
        .unwrap();
        c.delete_topic(pb::DeleteTopicRequest {
            name: "gone".into(),
        })
        .await
        .unwrap();
        create_topic(&mut c, "gone", 2).await;
        for p in 0..2 {
            assert!(
                fetch_all(&mut c, "gone", p).await.is_empty(),
                "a recreated topic starts empty"
            );
        }
        assert!(node.terminate().success());
    }
    // One core now: the partitions of core 1 move to core 0, their files stay where they are.
    let node = TestNode::start(dir.path(), &["--cores", "1"]);
    let mut c = node.client().await;
    let d = c
        .describe_topic(pb::DescribeTopicRequest {
            name: "moves".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(d.partitions.iter().all(|p| p.core == 0));
    for p in 0..8u32 {
        let values: Vec<String> = fetch_all(&mut c, "moves", p)
            .await
            .iter()
            .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
            .collect();
        let want: Vec<String> = (0..10).map(|k| format!("m{}", k * 8 + p)).collect();
        assert_eq!(values, want, "partition {p}");
    }
}

/// More partitions than a node opens in one metadata step (it opens a bounded number per step
/// and comes back for the rest): every one opens and takes a record, also after a restart, and
/// the node says it is ready only once all are open.
#[tokio::test]
async fn a_topic_with_more_partitions_than_one_open_step_opens_whole() {
    const N: u32 = 300;
    let dir = tempfile::tempdir().unwrap();
    let check = |addr: String| async move {
        let mut c = tern::proto::v1::tern_client::TernClient::new(
            node_support::channel(&addr).await.unwrap(),
        );
        for p in 0..N {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let r = c
                    .publish(pb::PublishRequest {
                        topic: "wide".into(),
                        records: vec![pb::PublishRecord {
                            partition: Some(p),
                            ..rec(None, format!("p{p}"))
                        }],
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(r) => {
                        assert_eq!(r.into_inner().acks[0].partition, p);
                        break;
                    }
                    Err(s) => {
                        assert_eq!(s.code(), tonic::Code::Unavailable, "partition {p}: {s:?}");
                        assert!(std::time::Instant::now() < deadline, "partition {p}: {s:?}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    };
    {
        let node = TestNode::start(dir.path(), &[]);
        let mut c = node.client().await;
        create_topic(&mut c, "wide", N).await;
        check(node.addr.clone()).await;
        node.kill9();
    }
    let node = TestNode::start(dir.path(), &[]);
    let mut c = node.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = c
            .cluster_info(pb::ClusterInfoRequest::default())
            .await
            .unwrap()
            .into_inner();
        if info.ready {
            let t = info.topics.iter().find(|t| t.topic == "wide").unwrap();
            let open = t.partitions.iter().filter(|p| p.local).count();
            assert_eq!(open, N as usize, "ready with {open} of {N} partitions open");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check(node.addr.clone()).await;
    for p in [0, N / 2, N - 1] {
        let recs = fetch_all(&mut c, "wide", p).await;
        assert_eq!(recs.len(), 2, "partition {p}: {recs:?}");
    }
}
