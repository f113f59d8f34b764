//! Subscriptions: one long-polling follower per partition, feeding one bounded stream.
//!
//! ```text
//! client ◀── bounded channel ◀── follow(topic, p0) ◀── Fetch(long poll) ── core
//!        ◀──                 ◀── follow(topic, p1) ◀── ...
//! client ──▶ control task: add / remove topics on the live subscription
//! ```
//!
//! A follower asks its core for committed records with a long poll: the core answers as soon
//! as a commit moves past the follower's offset, so new records arrive without a polling
//! interval. The channel to the client is bounded, so a slow client slows only its own
//! followers and never grows the node's memory.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::broker::{Broker, Topic};
use super::{convert, validate};
use crate::proto::v1 as pb;
use crate::types::{Offset, TimestampMs};

/// Responses buffered per subscription before followers wait for the client.
const CHANNEL_DEPTH: usize = 16;
/// How long one long poll waits on its core before asking again.
const LONG_POLL: Duration = Duration::from_secs(30);
/// Bytes one follower fetches at a time.
const FETCH_BYTES: usize = 1 << 20;
const FETCH_RECORDS: usize = 1000;

type Tx = tokio::sync::mpsc::Sender<Result<pb::SubscribeResponse, Status>>;

struct Subscription {
    broker: Arc<Broker>,
    tx: Tx,
    followers: HashMap<(String, u32), AbortHandle>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        for h in self.followers.values() {
            h.abort();
        }
    }
}

/// Starts a subscription from its first request; errors in it fail the call.
pub async fn start(
    broker: Arc<Broker>,
    mut inbound: Streaming<pb::SubscribeRequest>,
) -> Result<Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>, Status> {
    let first = inbound.message().await?.ok_or_else(|| {
        Status::invalid_argument("the subscription was closed before naming a topic")
    })?;
    if first.add.is_empty() {
        return Err(Status::invalid_argument(
            "the first subscribe request must add at least one topic",
        ));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(CHANNEL_DEPTH);
    let mut sub = Subscription {
        broker,
        tx: tx.clone(),
        followers: HashMap::new(),
    };
    sub.apply(first).await?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(status) = sub.apply(req).await {
                            let _ = sub.tx.send(Err(status)).await;
                            return;
                        }
                    }
                    // The client finished sending changes; the subscription goes on until the
                    // call is closed.
                    Ok(None) => {
                        sub.tx.closed().await;
                        return;
                    }
                    Err(_) => return,
                },
                _ = sub.tx.closed() => return,
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

impl Subscription {
    /// Applies one change request. On error nothing from this request is applied.
    async fn apply(&mut self, req: pb::SubscribeRequest) -> Result<(), Status> {
        // Resolve everything first, so a bad entry changes nothing.
        let mut starts: Vec<(Arc<Topic>, u32, Offset)> = Vec::new();
        for add in &req.add {
            let topic = self.broker.topic(&add.topic)?;
            let parts: Vec<u32> = if add.partitions.is_empty() {
                (0..topic.spec.partitions).collect()
            } else {
                add.partitions.clone()
            };
            for &p in &parts {
                topic.check_partition(p)?;
                let from = self.resolve(&topic, p, add.from.as_ref()).await?;
                starts.push((topic.clone(), p, from));
            }
        }
        for name in &req.remove {
            validate::topic_name(name)?;
        }
        let limit = self.broker.config.max_subscription_partitions;
        if self.followers.len() + starts.len() > limit {
            return Err(Status::invalid_argument(format!(
                "a subscription may follow at most {limit} partitions"
            )));
        }
        for name in &req.remove {
            self.followers.retain(|(t, _), h| {
                let keep = t != name;
                if !keep {
                    h.abort();
                }
                keep
            });
        }
        for (topic, p, from) in starts {
            let key = (topic.spec.name.clone(), p);
            if let Some(old) = self.followers.remove(&key) {
                old.abort();
            }
            let task = tokio::spawn(follow(self.broker.clone(), topic, p, from, self.tx.clone()));
            self.followers.insert(key, task.abort_handle());
        }
        Ok(())
    }

    async fn resolve(
        &self,
        topic: &Topic,
        p: u32,
        from: Option<&pb::StartPosition>,
    ) -> Result<Offset, Status> {
        use pb::start_position::Position;
        let position = from.and_then(|f| f.position);
        Ok(match position {
            None | Some(Position::Latest(_)) => self.broker.positions(topic, p).await?.committed,
            Some(Position::Earliest(_)) => self.broker.positions(topic, p).await?.start,
            Some(Position::Offset(o)) => Offset(o),
            Some(Position::TimestampMs(ts)) => {
                match self
                    .broker
                    .offset_for_timestamp(topic, p, TimestampMs(ts))
                    .await?
                {
                    Some(o) => o,
                    None => self.broker.positions(topic, p).await?.committed,
                }
            }
        })
    }
}

/// Streams one partition's committed records from `from` until the client goes away.
async fn follow(broker: Arc<Broker>, topic: Arc<Topic>, partition: u32, mut from: Offset, tx: Tx) {
    let mut closing = broker.closing();
    loop {
        let fetched = tokio::select! {
            f = broker.fetch(&topic, partition, from, FETCH_BYTES, LONG_POLL) => f,
            _ = tx.closed() => return,
            _ = until_true(&mut closing) => {
                let _ = tx.send(Err(Status::unavailable("the node is shutting down"))).await;
                return;
            }
        };
        match fetched {
            Ok(f) => {
                let (records, next) =
                    convert::records(&topic.spec.name, partition, &f, FETCH_RECORDS);
                from = Offset(next);
                if !records.is_empty()
                    && tx
                        .send(Ok(pb::SubscribeResponse { records }))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            Err(status) => {
                let _ = tx
                    .send(Err(Status::new(
                        status.code(),
                        format!("{}/{partition}: {}", topic.spec.name, status.message()),
                    )))
                    .await;
                return;
            }
        }
    }
}

/// Resolves once the watched flag is true (or its sender is gone).
async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}
