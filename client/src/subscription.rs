//! Subscriptions that resume where they stopped.
//!
//! ```text
//! subscribe(topic, start) ─▶ task: Subscribe on the nearest node ─▶ records ─▶ channel ─▶ next()
//!                                  │ remembers each partition's next offset
//!                                  └ call ends or fails ─▶ Subscribe on the next node, each
//!                                    partition from its next offset (the others from start)
//! ```
//!
//! Records come in offset order within each partition, each once: after a resume, a record
//! below a partition's next offset (the node sent it again) is dropped.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::client::Client;
use crate::error::{retryable, Error};
use crate::proto as pb;

/// Where a subscription starts in partitions it has not read yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Earliest,
    Latest,
    Offset(u64),
    /// The first record at or after this time (ms since the epoch).
    Time(i64),
    /// The last N records of each partition (N ≥ 1), fixed when the subscription starts.
    Last(u64),
}

impl Start {
    fn position(self) -> pb::StartPosition {
        use pb::start_position::Position;
        pb::StartPosition {
            position: Some(match self {
                Start::Earliest => Position::Earliest(true),
                Start::Latest => Position::Latest(true),
                Start::Offset(o) => Position::Offset(o),
                Start::Time(t) => Position::TimestampMs(t),
                Start::Last(n) => Position::Last(n),
            }),
        }
    }
}

/// Records buffered between the subscription's task and `next`.
const BUFFER: usize = 16;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the start offsets of a subscription from `Latest` are asked for.
const OFFSETS_RETRY: Duration = Duration::from_secs(30);

/// The records of a topic, in order per partition; see [`Client::subscribe`].
pub struct Subscription {
    rx: mpsc::Receiver<Result<pb::Record, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// The next record; `None` once the subscription has ended (after an error it returned).
    pub async fn next(&mut self) -> Option<Result<pb::Record, Error>> {
        self.rx.recv().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Follows every partition of `topic` from `start`, through a node of the client's
    /// region when there is one (its replica serves the reads). When the call ends (its node
    /// died, the connection broke) the subscription opens again on the next node, every
    /// partition from where it got to: nothing is skipped or repeated. It ends with an error
    /// the cluster gives for good (the topic deleted, access denied).
    pub async fn subscribe(&self, topic: &str, start: Start) -> Result<Subscription, Error> {
        self.subscribe_partitions(topic, &[], start).await
    }

    /// As [`Client::subscribe`], for some of the topic's partitions (all when `partitions`
    /// is empty).
    pub async fn subscribe_partitions(
        &self,
        topic: &str,
        partitions: &[u32],
        start: Start,
    ) -> Result<Subscription, Error> {
        if start == Start::Last(0) {
            return Err(Error::Invalid("Start::Last(n) needs n ≥ 1".into()));
        }
        let count = self.partitions(topic).await?;
        let partitions: Vec<u32> = if partitions.is_empty() {
            (0..count).collect()
        } else {
            let mut v = partitions.to_vec();
            v.sort_unstable();
            v.dedup();
            if let Some(p) = v.iter().find(|p| **p >= count) {
                return Err(Error::Invalid(format!(
                    "topic {topic:?} has {count} partitions; there is no partition {p}"
                )));
            }
            v
        };
        // "Latest" and "the last N" are where each partition ends now: asked again at a
        // resume they would skip what came meanwhile, so they are fixed as offsets first.
        let next = match start {
            Start::Latest | Start::Last(_) => self.offsets_now(topic, &partitions, start).await?,
            _ => HashMap::new(),
        };
        let (tx, rx) = mpsc::channel(BUFFER);
        let task = tokio::spawn(follow(
            self.clone(),
            topic.to_string(),
            partitions,
            start,
            next,
            tx,
        ));
        Ok(Subscription { rx, task })
    }

    /// Where `start` falls in each partition of `topic` now (ListOffsets, retried through
    /// other nodes for up to 30 s while it cannot be answered).
    async fn offsets_now(
        &self,
        topic: &str,
        partitions: &[u32],
        start: Start,
    ) -> Result<HashMap<u32, u64>, Error> {
        let began = std::time::Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut k = 0;
        loop {
            let nodes = self.read_nodes();
            let addr = &nodes[k % nodes.len()];
            k += 1;
            let req = pb::ListOffsetsRequest {
                topic: topic.to_string(),
                partitions: partitions.to_vec(),
                position: Some(start.position()),
            };
            let status = match self.node(addr) {
                Err(e) => tonic::Status::unavailable(e.to_string()),
                Ok(mut c) => match c.list_offsets(req).await {
                    Ok(r) => {
                        return Ok(r
                            .into_inner()
                            .partitions
                            .into_iter()
                            .map(|p| (p.partition, p.offset))
                            .collect())
                    }
                    Err(s) => s,
                },
            };
            if !retryable(&status) {
                return Err(Error::Status(status));
            }
            if began.elapsed() >= OFFSETS_RETRY {
                return Err(Error::GaveUp {
                    after: began.elapsed(),
                    last: status.message().to_string(),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

async fn follow(
    client: Client,
    topic: String,
    partitions: Vec<u32>,
    start: Start,
    // Each partition's next offset: where it was fixed at the start, or after the last record
    // delivered.
    mut next: HashMap<u32, u64>,
    tx: mpsc::Sender<Result<pb::Record, Error>>,
) {
    let mut k = 0usize;
    let mut backoff = BACKOFF_MIN;
    loop {
        let nodes = client.read_nodes();
        let addr = nodes[k % nodes.len()].clone();
        let add: Vec<pb::TopicSubscription> = partitions
            .iter()
            .map(|&p| pb::TopicSubscription {
                topic: topic.clone(),
                from: Some(match next.get(&p) {
                    Some(o) => Start::Offset(*o).position(),
                    None => start.position(),
                }),
                partitions: vec![p],
            })
            .collect();
        let first = pb::SubscribeRequest {
            add,
            remove: Vec::new(),
        };
        // The request stream stays open (closing it would end the subscription).
        let (_keep, requests) = mpsc::channel::<pb::SubscribeRequest>(1);
        let requests = tokio_stream::iter([first])
            .chain(tokio_stream::wrappers::ReceiverStream::new(requests));
        let status = match client.node(&addr) {
            Err(e) => tonic::Status::unavailable(e.to_string()),
            Ok(mut c) => match c.subscribe(requests).await {
                Err(s) => s,
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    let mut ended = tonic::Status::unavailable("the subscription's call ended");
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(r) => {
                                backoff = BACKOFF_MIN;
                                for rec in r.records {
                                    let want = next.get(&rec.partition).copied();
                                    if want.is_some_and(|w| rec.offset < w) {
                                        continue;
                                    }
                                    next.insert(rec.partition, rec.offset + 1);
                                    if tx.send(Ok(rec)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(s) => {
                                ended = s;
                                break;
                            }
                        }
                    }
                    ended
                }
            },
        };
        if !retryable(&status) {
            let _ = tx.send(Err(Error::Status(status))).await;
            return;
        }
        if tx.is_closed() {
            return;
        }
        client.refresh().await;
        k += 1;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
