//! Publishing: records go to their partitions (explicit, hash of the key, or round robin),
//! each partition's records to the core that owns it here, or to the node that leads it.
//!
//! ```text
//! submit ─ records by partition ─┬─ replica here ──▶ core mailbox ─▶ Raft ─▶ offsets
//!                                │                     └ not the leader ─┐
//!                                └─ no replica here ────────────────────┴▶ publish_elsewhere:
//!                                   the leader (asked of the replicas in turn), waiting out
//!                                   elections, one hop at most
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::peers::Origin;
use super::{Broker, BrokerError, Outgoing, Result, Topic};
use crate::log::Record;
use crate::proto::v1 as pb;
use crate::raft::types::NodeId;
use crate::shard::placement::partition_for_key;
use crate::shard::{Appended, CoreError, CoreRequest, ProducerSeq};
use crate::types::Offset;

/// How long a forwarded publish may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

impl Broker {
    /// Routes records to their partitions and returns the pending answer: (partition, offset)
    /// per record, in request order. Each record goes to its explicit partition, else the hash
    /// of its key, else round robin; records for one partition keep their order and become one
    /// batch. Requests submitted one after another are appended in that order per partition
    /// (what PublishStream relies on) while leadership stays put.
    ///
    /// A partition led by another node is forwarded to it (once: a relayed request is
    /// refused with the leader named instead, so a stale view cannot loop).
    ///
    /// An idempotent `producer`'s records all go to one partition (checked by the caller).
    pub async fn submit(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        records: Vec<Outgoing>,
        producer: Option<ProducerSeq>,
        origin: &Origin,
    ) -> Result<impl std::future::Future<Output = Result<Vec<(u32, Offset)>>> + use<>> {
        if let Some(m) = &topic.spec.mirror {
            return Err(BrokerError::Mirror {
                topic: topic.spec.name.clone(),
                of: m.to_string(),
            });
        }
        let n = topic.spec.partitions;
        let mut groups: Vec<(u32, Vec<usize>, Vec<Record>)> = Vec::new();
        let mut routes = Vec::with_capacity(records.len());
        let rr = topic.next.fetch_add(1, Ordering::Relaxed) % n;
        for (i, out) in records.into_iter().enumerate() {
            let p = match (out.partition, &out.record.key) {
                (Some(p), _) => p,
                (None, Some(k)) => partition_for_key(k, n),
                // Keyless records of one request stay together (one batch); successive
                // requests rotate over the partitions.
                (None, None) => rr,
            };
            let g = match groups.iter().position(|g| g.0 == p) {
                Some(g) => g,
                None => {
                    groups.push((p, Vec::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].1.push(i);
            groups[g].2.push(out.record);
            routes.push(p);
        }
        let me = self.node_id();
        let mut pending: Vec<futures::future::BoxFuture<'static, _>> =
            Vec::with_capacity(groups.len());
        for (p, idx, recs) in groups {
            let broker = self.clone();
            let topic = topic.clone();
            let origin = origin.clone();
            if !topic.on(me, p) {
                // No replica here: to the partition's leader (the preferred one first).
                pending.push(Box::pin(async move {
                    let r = broker
                        .publish_elsewhere(&topic, p, recs, producer, None, &origin)
                        .await;
                    (idx, r)
                }));
                continue;
            }
            let key = topic.key(p);
            let answer = self
                .shards
                .submit(topic.core(p), move |reply| CoreRequest::Append {
                    key,
                    records: recs,
                    producer,
                    reply,
                })
                .await?;
            pending.push(Box::pin(async move {
                let r = match answer.await {
                    Ok(Appended::Done(ack)) => Ok(ack.offsets),
                    // A node alone leads all its partitions: this is the moment of its start.
                    Ok(Appended::NotLeader { leader, .. }) if broker.alone() => {
                        Err(CoreError::NotLeader { leader }.into())
                    }
                    Ok(Appended::NotLeader { leader, records }) => {
                        broker
                            .publish_elsewhere(&topic, p, records, producer, leader, &origin)
                            .await
                    }
                    Err(e) => Err(e.into()),
                };
                (idx, r)
            }));
        }
        Ok(async move {
            let mut out = vec![(0u32, Offset(0)); routes.len()];
            for (idx, ack) in futures::future::join_all(pending).await {
                let offsets = ack?;
                if offsets.len() != idx.len() {
                    return Err(BrokerError::BadAnswer {
                        node: me,
                        what: format!("{} offsets for {} records", offsets.len(), idx.len()),
                    });
                }
                for (i, off) in idx.into_iter().zip(offsets) {
                    out[i] = (routes[i], off);
                }
            }
            Ok(out)
        })
    }

    /// Publishes records of one partition where its leader is, waiting (bounded, two election
    /// timeouts) through an election or a dead leader: appends here if this node leads,
    /// otherwise forwards to the leader it learns of (from its own replica, from `hint`, or
    /// from the answers of the partition's other replicas, tried in turn while none is known
    /// or reachable).
    ///
    /// An attempt that wrote nothing (a refusal because the node does not lead, a connection
    /// that could not be made) is simply made again elsewhere. An attempt that may have
    /// written (the leader changed mid-write, a connection lost midway) is made again only for
    /// an idempotent producer, whose retries the leader deduplicates; anyone else gets the
    /// error and decides. A request forwarded to this node is not forwarded again: it is
    /// appended here or refused with the leader named, so a stale view cannot loop.
    async fn publish_elsewhere(
        &self,
        topic: &Topic,
        p: u32,
        records: Vec<Record>,
        producer: Option<ProducerSeq>,
        mut hint: Option<NodeId>,
        origin: &Origin,
    ) -> Result<Vec<Offset>> {
        let me = self.node_id();
        let deadline = tokio::time::Instant::now() + self.leader_wait();
        let mut records = Some(records);
        let mut request: Option<pb::PublishRequest> = None;
        // Index into the replicas when asking them in turn.
        let mut turn = 0usize;
        // This node's replica refused although it named itself or no one as leader (it was
        // just removed from the group, or an election is on): ask the others.
        let mut local_stale = false;
        let mut last: Option<BrokerError> = None;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return Err(last.unwrap_or_else(|| BrokerError::NoLeader {
                    topic: topic.spec.name.clone(),
                    partition: p,
                    waited: self.leader_wait(),
                }));
            }
            let target = match hint.take() {
                Some(l) if l == me && topic.on(me, p) => Some(me),
                Some(l) if l != me => Some(l),
                _ if topic.on(me, p) && !local_stale => {
                    match self.replica_state(topic, p).await.map(|s| s.leader) {
                        Ok(Some(l)) => Some(l),
                        _ => None,
                    }
                }
                _ => {
                    let others: Vec<NodeId> = topic
                        .replicas_and_targets(p)
                        .into_iter()
                        .filter(|n| *n != me)
                        .collect();
                    let next = others.get(turn % others.len().max(1)).copied();
                    turn += 1;
                    next
                }
            };
            let Some(target) = target else {
                // No leader known yet: an election is on.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            if target == me {
                let key = topic.key(p);
                let recs = records
                    .take()
                    .expect("the records come back with every refusal");
                match self
                    .shards
                    .ask(topic.core(p), |reply| CoreRequest::Append {
                        key,
                        records: recs,
                        producer,
                        reply,
                    })
                    .await?
                {
                    Appended::Done(ack) => return Ok(ack.offsets),
                    Appended::NotLeader { leader, records: r } => {
                        records = Some(r);
                        local_stale = leader.is_none_or(|l| l == me);
                        hint = leader.filter(|l| *l != me);
                        last = Some(CoreError::NotLeader { leader }.into());
                        if hint.is_none() {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                continue;
            }
            if origin.relayed() {
                // One hop only: send the caller to the leader this node knows.
                return Err(CoreError::NotLeader {
                    leader: Some(target),
                }
                .into());
            }
            let req = request.get_or_insert_with(|| {
                publish_request(
                    &topic.spec.name,
                    p,
                    records.as_deref().unwrap_or(&[]),
                    producer,
                )
            });
            let mut call = self.relay(req.clone(), origin);
            call.set_timeout(FORWARD_TIMEOUT);
            match self
                .call_peer(target, |mut c| async move { c.publish(call).await })
                .await
            {
                Ok(resp) => {
                    crate::metrics::NODE
                        .publish_forwarded
                        .add(resp.acks.len() as u64);
                    return Ok(resp.acks.into_iter().map(|a| Offset(a.offset)).collect());
                }
                Err(e) if e.unwritten() || (producer.is_some() && e.retryable()) => {
                    hint = e.leader().filter(|l| *l != target);
                    if hint.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// How long a publish waits for a partition without a leader to elect one: twice the
    /// election timeout (an election starts within 4/3 of it).
    pub fn leader_wait(&self) -> Duration {
        Duration::from_millis(self.config.raft_election_timeout_ms * 2)
    }
}

/// The forwarded form of one partition's records (routed to that partition).
fn publish_request(
    topic: &str,
    partition: u32,
    records: &[Record],
    producer: Option<ProducerSeq>,
) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.to_string(),
        records: records
            .iter()
            .map(|r| pb::PublishRecord {
                key: r.key.clone(),
                value: r.value.clone(),
                headers: r
                    .headers
                    .iter()
                    .map(|h| pb::Header {
                        key: h.name.clone(),
                        value: h.value.clone(),
                    })
                    .collect(),
                partition: Some(partition),
                expiry_seconds: r.ttl_ms.map(|ms| ms.div_ceil(1000) as u32),
            })
            .collect(),
        request_id: 0,
        producer_id: producer.map_or(0, |p| p.id.0 as u64),
        sequence: producer.map_or(0, |p| p.first.0 as u32),
    }
}
