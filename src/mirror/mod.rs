//! Mirror topics on the network shard: each replica of a mirror on this node has a puller, a
//! task that long-polls the source partition for whole committed batches (`Fetch` with
//! `raw_batches`, through the source's public API, so the source may be another cluster) and
//! hands them to the replica's core (`shard::mirror`), which checks and appends them at the
//! source's offsets.
//!
//! ```text
//! source cluster ──Fetch(raw_batches, from = replica end)──▶ puller (tokio)
//!                                                              │ CoreRequest::Mirror
//!                                                              ▼
//!                                           core: check CRC + contiguity, append, fsync, commit
//! ```
//!
//! A puller asks from the replica's own end each time, so a restart of either side, a cut
//! link or a failed append resumes exactly where the replica stands: nothing is skipped or
//! copied twice. The only gap is one the source makes: records its retention deleted before
//! they were copied (counted in `tern_mirror_records_skipped`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::Broker;
use crate::cluster::MirrorOf;
use crate::proto::v1 as pb;
use crate::shard::mirror::Pulled;
use crate::shard::{CoreRequest, PartitionKey};
use crate::types::{CoreId, Offset};

mod source;
mod stream;
mod through;

use source::{next, Source};
pub use source::{source_partitions, Access, MirrorError};
use stream::Feed;
use through::{next_via, upstream, UPSTREAM_PASSED, UPSTREAM_STALE};

/// How long one pull waits at the source for records past the replica's end.
const PULL_WAIT: Duration = Duration::from_millis(500);
/// Bytes asked for in one pull (the source answers at least one whole batch).
const PULL_BYTES: u32 = 4 << 20;
/// How much longer than its long poll a pull may take before it is abandoned.
const PULL_SLACK: Duration = Duration::from_secs(10);
/// Pause after a failed pull, doubling up to the most.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A running puller; dropping it stops the pulls.
pub struct Puller(tokio::task::AbortHandle);

impl Drop for Puller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts pulling partition `partition` of `of` into this node's replica `key` on `core`.
pub fn start(
    broker: Arc<Broker>,
    key: PartitionKey,
    core: CoreId,
    of: MirrorOf,
    partition: u32,
) -> Puller {
    let task = tokio::spawn(pull(broker, key, core, of, partition));
    Puller(task.abort_handle())
}

async fn pull(broker: Arc<Broker>, key: PartitionKey, core: CoreId, of: MirrorOf, partition: u32) {
    // Made once the replica is ready to pull (a promotion needs no credentials for the
    // source), and its credentials read again after every failed pull (rotated files).
    let mut source: Option<Source> = None;
    let mut backoff = BACKOFF_MIN;
    let mut end: Option<Offset> = None;
    let mut reported: Option<String> = None;
    let mut feed: Option<Feed> = None;
    // The stream to the replica pulled through (`feed` stays the source's).
    let mut via_feed: Option<Feed> = None;
    // Pulls go to the source directly until then (the replica to pull through failed).
    let mut direct_until: Option<Instant> = None;
    tracing::info!(partition = %key, source = %of, "mirroring");
    loop {
        if broker.is_closing() {
            return;
        }
        // A promotion takes over: no more pulls from the source.
        match broker.topic(&key.topic) {
            Ok(t) if t.spec.mirror.is_none() => return,
            Ok(t) if t.spec.promotion.is_some() => {
                // The streams are not read again.
                drop(feed.take());
                drop(via_feed.take());
                promote(&broker, &key, core, partition).await;
                return;
            }
            _ => {}
        }
        let from = match end {
            Some(e) => e,
            None => match replica_end(&broker, &key, core).await {
                Ok(end) => end,
                Err(e) => {
                    tracing::debug!(partition = %key, error = %e, "mirror replica not ready");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        // Through an earlier replica in this region, when there is one that works.
        let via = broker
            .topic(&key.topic)
            .ok()
            .filter(|_| direct_until.is_none_or(|t| Instant::now() >= t))
            .and_then(|t| upstream(&broker, &t, partition).map(|n| (n, t)));
        if let Some((node, topic)) = via {
            match next_via(&broker, node, &mut via_feed, &topic, partition, from).await {
                Ok(pulled) => {
                    // Through the other replica from now on: the source's stream goes.
                    feed = None;
                    // A replica that has not heard from the source lately, or whose own pulls
                    // fail, is passed by: this one may reach the source when it does not.
                    if let Pulled::Batches { via: Some(up), .. } = &pulled {
                        if up.contact.is_none_or(|c| c > UPSTREAM_STALE) || up.failing {
                            direct_until = Some(Instant::now() + UPSTREAM_PASSED);
                        }
                    }
                    match take(&broker, &key, core, pulled).await {
                        Ok(p) => {
                            end = Some(p.next);
                            backoff = BACKOFF_MIN;
                        }
                        Err(e) => {
                            end = None;
                            via_feed = None;
                            tracing::debug!(partition = %key, error = %e, "mirror replica did not take a pull");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                Err((why, pass)) => {
                    // The source's stream, if open, is kept: the pulls go on from it.
                    tracing::debug!(partition = %key, %node, error = %why, "cannot pull through another replica; pulling from the source");
                    via_feed = None;
                    direct_until = Some(Instant::now() + pass);
                }
            }
            continue;
        }
        via_feed = None;
        let src = match source.as_mut() {
            Some(s) => s,
            None => match Access::of(&broker) {
                // Each replica of each partition starts at another source node: the source's
                // work of serving the mirror is spread over its nodes (a node serves from its
                // own replica when it has one).
                Ok(a) => {
                    let me = broker.node_id();
                    let replica = broker
                        .topic(&key.topic)
                        .ok()
                        .and_then(|t| t.replicas(partition).iter().position(|n| *n == me));
                    let first = replica.unwrap_or(me.0 as usize) + partition as usize;
                    source.insert(Source::new(of.clone(), a, first))
                }
                Err(e) => {
                    let why = e.to_string();
                    if reported.as_ref() != Some(&why) {
                        tracing::error!(partition = %key, source = %of, error = %why, "mirror cannot pull");
                        reported = Some(why);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        let pulled = next(src, &mut feed, &of.topic, partition, from).await;
        let failed = match &pulled {
            Pulled::Failed(why) => {
                // Credentials rotated in place are picked up by the next pull.
                feed = None;
                match Access::of(&broker) {
                    Ok(a) => src.renew(a),
                    Err(_) => source = None,
                }
                Some(why.clone())
            }
            _ => None,
        };
        let failed = match take(&broker, &key, core, pulled).await {
            Ok(p) => {
                end = Some(p.next);
                failed
            }
            Err(e) => {
                // Ask the replica where it stands before the next pull; what the stream
                // answered since is not what it needs.
                end = None;
                feed = None;
                Some(e.to_string())
            }
        };
        match failed {
            Some(why) => {
                if reported.as_ref() != Some(&why) {
                    tracing::warn!(partition = %key, source = %of, error = %why, "mirror pull failed; retrying");
                    reported = Some(why);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            None => {
                if reported.take().is_some() {
                    tracing::info!(partition = %key, source = %of, "mirror pulling again");
                }
                backoff = BACKOFF_MIN;
            }
        }
    }
}

/// Where this node's replica `key` (on `core`) ends.
async fn replica_end(
    broker: &Broker,
    key: &PartitionKey,
    core: CoreId,
) -> Result<Offset, crate::shard::CoreError> {
    let ask = |reply| CoreRequest::Positions {
        key: key.clone(),
        reply,
    };
    Ok(broker.shards.ask(core, ask).await?.next)
}

/// Hands what a pull came to to the replica `key`; answers its log's positions after.
async fn take(
    broker: &Broker,
    key: &PartitionKey,
    core: CoreId,
    pulled: Pulled,
) -> Result<crate::log::Positions, crate::shard::CoreError> {
    let ask = |reply| CoreRequest::Mirror {
        key: key.clone(),
        pulled,
        reply,
    };
    broker.shards.ask(core, ask).await
}

/// How often a replica being promoted looks at its progress towards the cut.
const PROMOTION_STEP: Duration = Duration::from_millis(200);

/// A replica's part in its mirror's promotion (see `controller::promote`): it stops taking
/// batches from the source, then, once the partition's cut is decided, copies what it lacks
/// up to the cut from another replica of the mirror (a replica holding more is cut when it
/// reopens as a Raft group). Ends when the topic stops being a mirror (the replica reopens).
async fn promote(broker: &Arc<Broker>, key: &PartitionKey, core: CoreId, partition: u32) {
    let mut stopped = false;
    loop {
        if broker.is_closing() {
            return;
        }
        let Ok(topic) = broker.topic(&key.topic) else {
            return;
        };
        if topic.spec.mirror.is_none() {
            return;
        }
        let cut = topic
            .spec
            .promotion
            .as_ref()
            .and_then(|p| p.cuts.as_ref())
            .and_then(|c| c.get(partition as usize).cloned());
        let pulled = match (stopped, cut) {
            (false, _) => Some(Pulled::Stop),
            (true, None) => None,
            (true, Some(cut)) => {
                let end = replica_end(broker, key, core).await.unwrap_or(cut.end);
                match end < cut.end {
                    true => copy(broker, &topic, partition, end, cut.end).await,
                    false => None,
                }
            }
        };
        if let Some(pulled) = pulled {
            match take(broker, key, core, pulled).await {
                Ok(_) => stopped = true,
                Err(e) => {
                    tracing::debug!(partition = %key, error = %e, "promotion step failed; retrying")
                }
            }
        }
        tokio::time::sleep(PROMOTION_STEP).await;
    }
}

/// Batches `[from, upto)` of a mirror's partition from another replica of it (the nearest that
/// answers), for a replica short of its promotion's cut.
async fn copy(
    broker: &Arc<Broker>,
    topic: &crate::broker::Topic,
    partition: u32,
    from: Offset,
    upto: Offset,
) -> Option<Pulled> {
    let req = pb::FetchRequest {
        topic: topic.spec.name.clone(),
        partition,
        offset: from.0,
        max_bytes: PULL_BYTES,
        raw_batches: true,
        ..Default::default()
    };
    for node in broker.nearest_first(topic.replicas(partition)) {
        let r = broker
            .call_peer(node, |mut c| {
                let mut call = broker.relay(req.clone(), &crate::broker::Origin::default());
                call.set_timeout(PULL_SLACK);
                async move { c.fetch(call).await }
            })
            .await;
        match r {
            Ok(r) if !r.batches.is_empty() => {
                return Some(Pulled::Copied {
                    batches: r.batches,
                    upto,
                })
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(%node, error = %e, "copying towards the promotion's cut"),
        }
    }
    None
}
