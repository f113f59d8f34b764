//! `tern pub` and `tern sub`.

use std::io::BufRead;

use bytes::Bytes;
use clap::Args;
use tokio_stream::StreamExt;

use super::{status_error, ClientOpts};
use crate::proto::v1 as pb;

/// Lines per publish request when reading standard input.
const LINES_PER_REQUEST: usize = 500;

#[derive(Args)]
pub struct PubArgs {
    pub topic: String,
    /// The record's value; without it, every line of standard input is one record.
    pub value: Option<String>,
    /// Key of the record(s): records with one key go to one partition, in order.
    #[arg(long, short)]
    pub key: Option<String>,
    /// Partition to publish to (default: by key, or round robin).
    #[arg(long, short)]
    pub partition: Option<u32>,
    /// A header as NAME=VALUE; repeatable.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Hide the record from readers this many seconds after publishing.
    #[arg(long)]
    pub expiry_seconds: Option<u32>,
    #[command(flatten)]
    pub opts: ClientOpts,
}

#[derive(Args)]
pub struct SubArgs {
    pub topic: String,
    /// Where to start: earliest, latest, an offset, or @UNIX_MS (a time in ms).
    #[arg(long, default_value = "latest")]
    pub from: String,
    /// Stop after this many records.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Only these partitions (repeatable; default: all).
    #[arg(long, short)]
    pub partition: Vec<u32>,
    /// Join this consumer group: the group's members share the partitions, and each resumes
    /// where the group committed (printed records are committed every --commit-interval-ms
    /// and on exit). --from says where a partition without a committed offset starts.
    #[arg(long, conflicts_with = "queue")]
    pub group: Option<String>,
    /// Join this queue group: members share every partition's records one by one, and each
    /// record is acknowledged (see --ack).
    #[arg(long)]
    pub queue: Option<String>,
    /// Queue group: what to do with a record after printing it.
    #[arg(long, value_enum, default_value_t = super::group::AckMode::Print)]
    pub ack: super::group::AckMode,
    /// Queue group (--ack nack): redeliver rejected records after this long.
    #[arg(long, default_value_t = 0)]
    pub nack_delay_ms: u32,
    /// Queue group: a delivery not acknowledged within this is delivered again (0: 30000).
    #[arg(long, default_value_t = 0)]
    pub ack_wait_ms: u32,
    /// Queue group: deliveries before a record goes to the dead-letter topic (0: 5).
    #[arg(long, default_value_t = 0)]
    pub max_deliveries: u32,
    /// Queue group: the dead-letter topic (default TOPIC.dlq).
    #[arg(long)]
    pub dlq: Option<String>,
    /// Unacknowledged deliveries (queue) or records per message (group) at most (0: 100).
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: u32,
    /// The group drops this member when it hears nothing from it for this long (0: 10000).
    #[arg(long, default_value_t = 0)]
    pub session_timeout_ms: u32,
    /// Consumer group: how often printed positions are committed.
    #[arg(long, default_value_t = 1000)]
    pub commit_interval_ms: u64,
    /// Consumer group: let the node commit delivered positions this often instead (0: off).
    #[arg(long, default_value_t = 0)]
    pub auto_commit_ms: u32,
    #[command(flatten)]
    pub opts: ClientOpts,
}

fn record(a: &PubArgs, value: String) -> anyhow::Result<pb::PublishRecord> {
    let headers = a
        .headers
        .iter()
        .map(|h| match h.split_once('=') {
            Some((k, v)) => Ok(pb::Header {
                key: k.to_string(),
                value: Bytes::from(v.to_string()),
            }),
            None => anyhow::bail!("header {h:?} must be NAME=VALUE"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(pb::PublishRecord {
        key: a.key.clone().map(Bytes::from),
        value: Bytes::from(value),
        headers,
        partition: a.partition,
        expiry_seconds: a.expiry_seconds,
    })
}

fn print_acks(opts: &ClientOpts, topic: &str, acks: &[pb::RecordAck]) {
    for a in acks {
        if opts.json {
            println!(
                "{}",
                serde_json::json!({"topic": topic, "partition": a.partition, "offset": a.offset})
            );
        } else {
            println!("{topic}/{}@{}", a.partition, a.offset);
        }
    }
}

pub async fn publish(a: PubArgs) -> anyhow::Result<()> {
    let mut c = a.opts.connect().await?;
    if let Some(v) = a.value.clone() {
        let r = c
            .publish(pb::PublishRequest {
                topic: a.topic.clone(),
                records: vec![record(&a, v)?],
                request_id: 0,
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        print_acks(&a.opts, &a.topic, &r.acks);
        return Ok(());
    }
    // Standard input: read lines on a blocking thread, group what is available into requests,
    // and pipeline them over one PublishStream (the node keeps their order per partition).
    let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<String>(LINES_PER_REQUEST * 4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let (req_tx, req_rx) = tokio::sync::mpsc::channel::<pb::PublishRequest>(16);
    let topic = a.topic.clone();
    let mut responses = c
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let sender = async {
        let mut id = 0u64;
        while let Some(first) = line_rx.recv().await {
            let mut records = vec![record(&a, first)?];
            while records.len() < LINES_PER_REQUEST {
                match line_rx.try_recv() {
                    Ok(l) => records.push(record(&a, l)?),
                    Err(_) => break,
                }
            }
            id += 1;
            if req_tx
                .send(pb::PublishRequest {
                    topic: topic.clone(),
                    records,
                    request_id: id,
                    ..Default::default()
                })
                .await
                .is_err()
            {
                break;
            }
        }
        drop(req_tx);
        Ok::<u64, anyhow::Error>(id)
    };
    let receiver = async {
        let mut published = 0u64;
        let mut failures = 0u64;
        while let Some(r) = responses.next().await {
            let r = r.map_err(status_error)?;
            match r.error {
                Some(e) => {
                    failures += 1;
                    eprintln!("request {} failed: {}", r.request_id, e.message);
                }
                None => {
                    published += r.acks.len() as u64;
                    print_acks(&a.opts, &a.topic, &r.acks);
                }
            }
        }
        Ok::<(u64, u64), anyhow::Error>((published, failures))
    };
    let (sent, received) = tokio::join!(sender, receiver);
    sent?;
    let (published, failures) = received?;
    eprintln!("published {published} records to {}", a.topic);
    anyhow::ensure!(failures == 0, "{failures} publish requests failed");
    Ok(())
}

fn start_position(from: &str) -> anyhow::Result<pb::StartPosition> {
    use pb::start_position::Position;
    let p =
        match from {
            "earliest" => Position::Earliest(true),
            "latest" => Position::Latest(true),
            s if s.starts_with('@') => Position::TimestampMs(s[1..].parse().map_err(|_| {
                anyhow::anyhow!("--from {s}: expected @UNIX_MS, e.g. @1700000000000")
            })?),
            s => Position::Offset(s.parse().map_err(|_| {
                anyhow::anyhow!("--from {s}: use earliest, latest, an offset, or @UNIX_MS")
            })?),
        };
    Ok(pb::StartPosition { position: Some(p) })
}

/// Prints a record: a line of text, or a JSON object; `deliveries` for queue deliveries.
pub fn print_record(opts: &ClientOpts, r: &pb::Record, deliveries: Option<u32>) {
    let value = String::from_utf8_lossy(&r.value);
    let key = r
        .key
        .as_ref()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    if opts.json {
        let headers: serde_json::Map<String, serde_json::Value> = r
            .headers
            .iter()
            .map(|h| (h.key.clone(), String::from_utf8_lossy(&h.value).into()))
            .collect();
        let mut v = serde_json::json!({
            "topic": r.topic, "partition": r.partition, "offset": r.offset,
            "timestamp_ms": r.timestamp_ms, "key": key, "headers": headers, "value": value,
        });
        if let Some(n) = deliveries {
            v["deliveries"] = n.into();
        }
        println!("{v}");
    } else {
        println!(
            "{}/{}@{}\t{}\t{}",
            r.topic,
            r.partition,
            r.offset,
            key.unwrap_or_default(),
            value
        );
    }
}

pub async fn subscribe(a: SubArgs) -> anyhow::Result<()> {
    if a.group.is_some() || a.queue.is_some() {
        return super::group::consume(a).await;
    }
    let from = start_position(&a.from)?;
    let mut c = a.opts.connect().await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: a.topic.clone(),
            from: Some(from),
            partitions: a.partition.clone(),
        }],
        remove: vec![],
    })
    .await?;
    let mut stream = c
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status_error)?
        .into_inner();
    let mut seen = 0u64;
    if a.count == Some(0) {
        return Ok(());
    }
    while let Some(resp) = stream.next().await {
        let resp = resp.map_err(status_error)?;
        for r in resp.records {
            print_record(&a.opts, &r, None);
            seen += 1;
            if a.count.is_some_and(|n| seen >= n) {
                drop(tx);
                return Ok(());
            }
        }
    }
    drop(tx);
    Ok(())
}
