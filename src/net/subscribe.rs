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
//!
//! A follower reads from this node's replica when it has one, else from another replica over
//! the peer connection (the same long poll, one hop away). It looks the topic up again before
//! every read, so it follows the partition when its replicas move (to or away from this node)
//! and rides out elections and dead replicas by retrying; it ends the subscription with
//! NOT_FOUND when the topic is deleted (also when one of the same name was created since).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::auth::{Auth, Caller};
use super::status::from_broker;
use super::validate;
use crate::broker::{Broker, BrokerError, Read, Topic};
use crate::cluster::security::{Operation, ResourceKind};
use crate::proto::v1 as pb;
use crate::shard::StartAt;
use crate::types::Offset;

/// Partitions whose start positions one subscribe change asks for at once.
const START_ASKS_PARALLEL: usize = 32;
/// Responses buffered per subscription before followers wait for the client.
const CHANNEL_DEPTH: usize = 16;
/// How long one long poll waits on its core before asking again.
const LONG_POLL: Duration = Duration::from_secs(30);
/// Bytes one follower fetches at a time.
const FETCH_BYTES: usize = 1 << 20;
const FETCH_RECORDS: usize = 1000;
/// Waits between reads that failed for a passing reason (an election, a moving replica).
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

type Tx = tokio::sync::mpsc::Sender<Result<pb::SubscribeResponse, Status>>;

struct Subscription {
    broker: Arc<Broker>,
    auth: Arc<Auth>,
    caller: Arc<Caller>,
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

/// Starts a subscription from its first request; errors in it fail the call. `inbound` is
/// the client's stream of changes (tern.v1), or a single request (the seeds' services).
pub async fn start(
    broker: Arc<Broker>,
    auth: Arc<Auth>,
    caller: Caller,
    mut inbound: impl Stream<Item = Result<pb::SubscribeRequest, Status>> + Send + Unpin + 'static,
) -> Result<Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>, Status> {
    let first = inbound.next().await.transpose()?.ok_or_else(|| {
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
        auth,
        caller: Arc::new(caller),
        tx: tx.clone(),
        followers: HashMap::new(),
    };
    sub.apply(first).await?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => {
                        if let Err(status) = sub.apply(req).await {
                            let _ = sub.tx.send(Err(status)).await;
                            return;
                        }
                    }
                    // The client finished sending changes; the subscription goes on until the
                    // call is closed.
                    None => {
                        sub.tx.closed().await;
                        return;
                    }
                    Some(Err(_)) => return,
                },
                _ = sub.tx.closed() => return,
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// A subscription that adds `add` and changes no more (the seeds' services, REST).
pub async fn once(
    broker: Arc<Broker>,
    auth: Arc<Auth>,
    caller: Caller,
    add: Vec<pb::TopicSubscription>,
) -> Result<Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>, Status> {
    let change = pb::SubscribeRequest {
        add,
        remove: vec![],
    };
    start(broker, auth, caller, futures::stream::iter([Ok(change)])).await
}

impl Subscription {
    /// Applies one change request. On error nothing from this request is applied.
    async fn apply(&mut self, req: pb::SubscribeRequest) -> Result<(), Status> {
        // Resolve everything first, so a bad entry changes nothing; positions other than an
        // offset are asked of the partitions (at their leaders) a few at a time.
        let mut asks: Vec<(Arc<Topic>, u32, StartAt)> = Vec::new();
        for add in &req.add {
            self.auth.authorize(
                &self.broker,
                &self.caller,
                ResourceKind::Topic,
                &add.topic,
                Operation::Subscribe,
            )?;
            let topic = self.broker.topic(&add.topic).map_err(from_broker)?;
            let at = validate::start_at(add.from.as_ref())?;
            let parts: Vec<u32> = if add.partitions.is_empty() {
                (0..topic.spec.partitions).collect()
            } else {
                add.partitions.clone()
            };
            for &p in &parts {
                topic.check_partition(p).map_err(from_broker)?;
                asks.push((topic.clone(), p, at));
            }
        }
        let origin = self.caller.origin();
        let broker = &self.broker;
        let starts: Vec<(Arc<Topic>, u32, Offset)> = futures::stream::iter(asks)
            .map(|(topic, p, at)| {
                let origin = origin.clone();
                async move {
                    let from = match at {
                        StartAt::Offset(o) => o,
                        at => {
                            broker
                                .list_offsets(&topic, p, at, &origin)
                                .await
                                .map_err(from_broker)?
                                .offset
                        }
                    };
                    Ok::<_, Status>((topic, p, from))
                }
            })
            .buffered(START_ASKS_PARALLEL)
            .try_collect()
            .await?;
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
            let task = tokio::spawn(follow(
                Follower {
                    broker: self.broker.clone(),
                    auth: self.auth.clone(),
                    caller: self.caller.clone(),
                },
                topic,
                p,
                from,
                self.tx.clone(),
            ));
            self.followers.insert(key, task.abort_handle());
        }
        Ok(())
    }
}

/// Whether a read that failed this way may succeed later (a replica not open yet or gone, an
/// election, an overloaded core, a replica behind the offset the subscriber reached, a
/// deletion seen elsewhere first).
fn transient(e: &BrokerError, from: Offset) -> bool {
    // A deletion another replica's node applied first: the next look at the topic here says
    // whether it is gone.
    e.retryable() || e.not_found() || e.range().is_some_and(|(_, end)| from.0 > end)
}

/// What a partition's follower needs besides the partition: the node, and whom it reads for.
struct Follower {
    broker: Arc<Broker>,
    auth: Arc<Auth>,
    caller: Arc<Caller>,
}

/// Streams one partition's committed records from `from` until the client goes away, the node
/// shuts down, the topic is deleted, or the caller may no longer read it (an ACL revoked).
async fn follow(f: Follower, topic: Arc<Topic>, partition: u32, mut from: Offset, tx: Tx) {
    let Follower {
        broker,
        auth,
        caller,
    } = f;
    let origin = caller.origin();
    let mut closing = broker.closing();
    let name = topic.spec.name.clone();
    let uid = topic.spec.uid;
    let mut backoff = RETRY_MIN;
    loop {
        // The topic as the metadata has it now: its replicas may have moved.
        let topic = match broker.topic(&name) {
            Ok(t) if t.spec.uid == uid => t,
            Err(BrokerError::NotReady { .. }) => topic.clone(),
            _ => {
                let _ = tx
                    .send(Err(Status::not_found(format!(
                        "topic {name:?} was deleted; this subscription to it ends"
                    ))))
                    .await;
                return;
            }
        };
        if let Err(status) = auth.authorize(
            &broker,
            &caller,
            ResourceKind::Topic,
            &name,
            Operation::Subscribe,
        ) {
            let _ = tx.send(Err(status)).await;
            return;
        }
        let read = Read {
            from,
            max_records: FETCH_RECORDS,
            max_bytes: FETCH_BYTES,
            max_wait: LONG_POLL,
            raw: false,
        };
        let fetched = tokio::select! {
            f = broker.read(&topic, partition, read, &origin) => f,
            // A revoked ACL ends an idle subscription too, not only at its next read.
            status = revoked(&broker, &auth, &caller, &name) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
            _ = tx.closed() => return,
            _ = until_true(&mut closing) => {
                let _ = tx.send(Err(Status::unavailable("the node is shutting down"))).await;
                return;
            }
        };
        match fetched {
            Ok(r) => {
                backoff = RETRY_MIN;
                from = Offset(r.next_offset.max(from.0));
                if !caller.relayed {
                    super::service::count_read(&r.records);
                }
                let pause = auth
                    .quotas
                    .consume_wait(&broker, &caller, || super::service::read_bytes(&r.records));
                if !r.records.is_empty()
                    && tx
                        .send(Ok(pb::SubscribeResponse { records: r.records }))
                        .await
                        .is_err()
                {
                    return;
                }
                if !pause.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = tx.closed() => return,
                    }
                }
            }
            Err(e) if transient(&e, from) => {
                tracing::debug!(topic = %name, partition, error = %e, "subscription read: retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = tx.closed() => return,
                }
                backoff = (backoff * 2).min(RETRY_MAX);
            }
            Err(e) => {
                let status = from_broker(e);
                let _ = tx
                    .send(Err(Status::new(
                        status.code(),
                        format!("{name}/{partition}: {}", status.message()),
                    )))
                    .await;
                return;
            }
        }
    }
}

/// Resolves, with the refusal, once the metadata no longer lets the caller subscribe to the
/// topic (it is checked again whenever this node applies a metadata change); never while it
/// does, or when authentication is off.
pub(in crate::net) async fn revoked(
    broker: &Broker,
    auth: &Auth,
    caller: &Caller,
    topic: &str,
) -> Status {
    let mut applied = broker.applied.subscribe();
    loop {
        if let Err(status) = auth.authorize(
            broker,
            caller,
            ResourceKind::Topic,
            topic,
            Operation::Subscribe,
        ) {
            return status;
        }
        if caller.superuser || applied.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Resolves once the watched flag is true (or its sender is gone).
pub(in crate::net) async fn until_true(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await;
}
