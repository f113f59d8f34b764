//! Promoting a mirror topic to a normal, writable one (disaster recovery): three metadata
//! steps, each carried out by every node holding a replica, so a promotion interrupted by a
//! crash is finished by running it again.
//!
//! ```text
//! StopMirror   replicas stop taking batches from the source (`mirror::promote`)
//!              ── the node promoting waits until a majority of each partition's replicas
//!                 report they stopped, and takes the longest as the partition's cut
//! CutMirror    replicas short of the cut copy the rest from one that has it
//!              ── it waits until a majority of each partition's replicas end at the cut
//! PromoteMirror the topic is no longer a mirror: each replica reopens as a Raft group whose
//!              log continues from the cut (`raft::store::promote`); producers' sequences
//!              copied from the source carry over, so a retry is not written twice
//! ```
//!
//! What a promotion may lose is what the replicas had not copied from the source yet: the lag
//! they reported.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::propose::{propose, wait_applied, wait_metadata_leader};
use super::{ControllerError, Result};
use crate::broker::{Broker, Topic};
use crate::cluster::{Command, Cut};
use crate::proto::v1 as pb;
use crate::raft::types::NodeId;
use crate::types::Offset;

/// How long each step waits for the replicas.
const STEP_WAIT: Duration = Duration::from_secs(60);
/// How often it looks again.
const LOOK_EVERY: Duration = Duration::from_millis(200);
/// How long the cut waits for every replica to stop before a majority is enough: longer than
/// a pull in flight may take (its long poll and time limit, `mirror::PULL_SLACK`).
const ALL_WAIT: Duration = Duration::from_secs(15);

/// One replica of a mirror's partition, as its node reports it.
#[derive(Debug, Clone, Copy)]
struct Held {
    end: Offset,
    stopped: bool,
    last: (u64, u64),
}

/// Promotes the mirror `name`; answers the topic and each partition's cut. Promoting a topic
/// already promoted answers the same.
pub async fn promote_topic(broker: &Arc<Broker>, name: &str) -> Result<(Arc<Topic>, Vec<Offset>)> {
    wait_metadata_leader(broker).await?;
    let _admin = broker.admin.lock().await;
    let topic = broker.topic(name)?;
    let uid = topic.spec.uid;
    let cuts_of = |t: &Topic| t.spec.promotion.as_ref().and_then(|p| p.cuts.clone());
    if topic.spec.mirror.is_none() {
        return match cuts_of(&topic) {
            Some(cuts) => Ok((topic, cuts.iter().map(|c| c.end).collect())),
            None => Err(ControllerError::Precondition(format!(
                "topic {name:?} is not a mirror"
            ))),
        };
    }
    if !topic.spec.moving.is_empty() {
        return Err(ControllerError::Precondition(format!(
            "topic {name:?} has partitions being moved ({:?}); promote it once the moves are \
             done",
            topic.spec.moving.keys().collect::<Vec<_>>()
        )));
    }
    if topic.spec.promotion.is_none() {
        let cmd = Command::StopMirror {
            topic: name.to_string(),
            uid,
        };
        wait_applied(broker, propose(broker, &cmd).await?).await?;
        tracing::info!(
            topic = name,
            "promoting the mirror: its replicas stop pulling"
        );
    }
    let topic = broker.topic(name)?;
    let cuts = match cuts_of(&topic) {
        Some(cuts) => cuts,
        None => {
            // The longest log of the replicas that stopped: every replica's while they all
            // answer within `ALL_WAIT` (longer than a pull in flight can take), then a
            // majority's.
            let began = Instant::now();
            let cuts = wait_for(broker, &topic, "stop pulling", |p, held| {
                let stopped: Vec<&Held> = held.iter().filter(|h| h.stopped).collect();
                let replicas = topic.replicas(p).len();
                let enough = stopped.len() >= replicas
                    || (began.elapsed() >= ALL_WAIT && stopped.len() * 2 > replicas);
                let end = stopped.iter().map(|h| h.end).max().filter(|_| enough)?;
                // The stamps of the batch ending there, from a replica that holds it.
                let last = stopped
                    .iter()
                    .filter(|h| h.end == end)
                    .map(|h| h.last)
                    .find(|l| *l != (0, 0))
                    .unwrap_or_default();
                Some(Cut {
                    end,
                    term: last.0,
                    index: last.1,
                    replicas: topic.replicas(p).to_vec(),
                })
            })
            .await?;
            let cmd = Command::CutMirror {
                topic: name.to_string(),
                uid,
                cuts: cuts.clone(),
            };
            wait_applied(broker, propose(broker, &cmd).await?).await?;
            // The cuts that count are the applied ones (a promotion racing this one may have
            // decided first).
            let applied = cuts_of(&*broker.topic(name)?).ok_or_else(|| {
                ControllerError::Stalled(format!("promoting {name}: the cut was not recorded"))
            })?;
            tracing::info!(topic = name, ends = ?applied.iter().map(|c| c.end.0).collect::<Vec<_>>(), "promoting the mirror: each partition's cut decided");
            applied
        }
    };
    let topic = broker.topic(name)?;
    // A majority of each partition's replicas hold exactly the cut (the others are cut or
    // started at it when they reopen).
    wait_for(broker, &topic, "reach the cut", |p, held| {
        let at = held
            .iter()
            .filter(|h| cuts.get(p as usize).is_some_and(|c| h.end == c.end))
            .count();
        (at * 2 > topic.replicas(p).len()).then_some(())
    })
    .await?;
    let cmd = Command::PromoteMirror {
        topic: name.to_string(),
        uid,
    };
    wait_applied(broker, propose(broker, &cmd).await?).await?;
    tracing::info!(topic = name, "mirror promoted: the topic takes writes");
    let topic = broker.topic(name)?;
    Ok((topic, cuts.iter().map(|c| c.end).collect()))
}

/// Asks the nodes holding replicas of `topic` what they hold until `decide` answers for every
/// partition (given the partition and its replicas that answered), or [`STEP_WAIT`] passes.
async fn wait_for<T>(
    broker: &Arc<Broker>,
    topic: &Topic,
    what: &str,
    decide: impl Fn(u32, &[Held]) -> Option<T>,
) -> Result<Vec<T>> {
    let deadline = Instant::now() + STEP_WAIT;
    loop {
        let held = holdings(broker, topic).await;
        let mut out = Vec::with_capacity(topic.spec.partitions as usize);
        let mut short = None;
        for p in 0..topic.spec.partitions {
            match decide(p, held.get(&p).map_or(&[][..], Vec::as_slice)) {
                Some(t) => out.push(t),
                None => {
                    short = Some(p);
                    break;
                }
            }
        }
        let Some(p) = short else { return Ok(out) };
        if Instant::now() >= deadline {
            return Err(ControllerError::Stalled(format!(
                "promoting {}: fewer than a majority of partition {p}'s replicas (nodes {:?}) \
                 answered that they {what} within {STEP_WAIT:?}; run the promotion again once \
                 more of them are up (it goes on from where it stopped)",
                topic.spec.name,
                topic.replicas(p)
            )));
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// What each replica of `topic` holds, per partition, from the nodes that answer (this one
/// from its own cores).
async fn holdings(broker: &Arc<Broker>, topic: &Topic) -> BTreeMap<u32, Vec<Held>> {
    let me = broker.node_id();
    let mut nodes: Vec<NodeId> = (0..topic.spec.partitions)
        .flat_map(|p| topic.replicas(p).to_vec())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    let asks = nodes.into_iter().map(|node| async move {
        if node == me {
            let mut out = Vec::new();
            for p in (0..topic.spec.partitions).filter(|p| topic.on(me, *p)) {
                if let Ok(s) = broker.replica_state(topic, p).await {
                    if let Some(m) = s.mirror {
                        out.push((
                            p,
                            Held {
                                end: s.positions.next,
                                stopped: m.stopped,
                                last: m.last.unwrap_or_default(),
                            },
                        ));
                    }
                }
            }
            return out;
        }
        let req = pb::DescribeTopicRequest {
            name: topic.spec.name.clone(),
        };
        let r = broker
            .call_peer(node, |mut c| {
                let mut call = tonic::Request::new(req);
                call.set_timeout(Duration::from_secs(5));
                async move { c.describe_topic(call).await }
            })
            .await;
        let Ok(r) = r else { return Vec::new() };
        r.partitions
            .into_iter()
            // A replica being moved to that node (still catching up) is not one of the
            // mirror's: it counts neither for "every replica stopped" nor for the cut.
            .filter(|p| p.local && topic.on(node, p.partition))
            .filter_map(|p| {
                let m = p.mirror?;
                Some((
                    p.partition,
                    Held {
                        end: Offset(p.end_offset),
                        stopped: m.stopped,
                        last: (m.last_term, m.last_index),
                    },
                ))
            })
            .collect()
    });
    let mut out: BTreeMap<u32, Vec<Held>> = BTreeMap::new();
    for (p, h) in futures::future::join_all(asks).await.into_iter().flatten() {
        out.entry(p).or_default().push(h);
    }
    out
}
