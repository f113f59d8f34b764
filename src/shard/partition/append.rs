//! Appending: an append call's records become batches proposed to the group; each request is
//! answered with its records' offsets once committed and applied. Idempotent producers'
//! requests are checked against the committed producer table and the proposals in flight.

use std::collections::HashMap;
use std::time::Duration;

use openraft_rt::watch::WatchReceiver;

use super::batcher::Batcher;
use super::{from_write_error, Partition};
use crate::log::batch::HEADER_LEN;
use crate::log::{LogError, Record};
use crate::raft::producers::SeqCheck;
use crate::raft::types::{EntryBatch, PartitionRaft};
use crate::shard::request::{AppendAck, Appended, CoreError, ProducerSeq, Reply};
use crate::types::{Offset, ProducerId};

/// One append request as the core hands it over: records, idempotent producer, reply.
pub type AppendRequest = (Vec<Record>, Option<ProducerSeq>, Reply<Appended>);

impl Partition {
    /// Appends the records of several requests that arrived together, as few batches as the
    /// batch size limit allows (normally one), sharing one fsync; then answers each request
    /// with its records' offsets. A request refused whole because this replica does not lead
    /// gets its records back ([`Appended::NotLeader`]); one refused after part of it was
    /// proposed (its records spanned batches and leadership moved between them) gets
    /// `LeaderChanged`: part of it may be committed, so it must not be resent as if unwritten.
    ///
    /// An idempotent producer's request gets batches of its own, carrying its id and sequence
    /// numbers; it is first checked against the producer's committed batches and the ones
    /// still in flight: a retry of committed records is answered with their offsets and
    /// written again nowhere (see `raft::producers`).
    pub async fn append(&self, requests: Vec<AppendRequest>) {
        let batch_max = self.log.config().batch_bytes_max;
        self.renew_lease().await;
        let mut idempotent_ready = if requests.iter().any(|r| r.1.is_some()) {
            Some(self.idempotence_ready().await)
        } else {
            None
        };
        // A sequence gap is answered only by a leader that has just confirmed it leads, with
        // everything committed up to then applied: a leader cut off from its group (it hears
        // no one, and a newer leader has committed the producer's next batches) would
        // otherwise judge by a table that misses them, and refuse the producer for good.
        if matches!(idempotent_ready, Some(Ok(()))) && self.any_gap(&requests) {
            idempotent_ready = Some(self.confirm_leadership().await);
        }
        // Build batches; remember which (batch, index) each record landed in.
        let mut batcher = Batcher::new(batch_max);
        let mut places: Vec<Vec<(usize, u32)>> = Vec::with_capacity(requests.len());
        // Requests answered without writing: offsets of a retry already committed, or why not.
        let mut answered: Vec<Option<Result<Vec<Offset>, CoreError>>> =
            (0..requests.len()).map(|_| None).collect();
        for (ri, (records, producer, _)) in requests.iter().enumerate() {
            places.push(Vec::with_capacity(records.len()));
            // A request with a record too large for any batch is refused whole, before any of
            // its records is placed: nothing of it is written.
            let biggest = records
                .iter()
                .map(Record::encoded_len_bound)
                .max()
                .unwrap_or(0);
            if HEADER_LEN + biggest > batch_max {
                answered[ri] = Some(Err(CoreError::Log(LogError::BatchTooLarge {
                    len: HEADER_LEN + biggest,
                    max: batch_max,
                })));
                continue;
            }
            if let Some(ps) = producer {
                let check = match &idempotent_ready {
                    Some(Err(e)) => Err(e.clone()),
                    _ => self.check_sequences(ps, records.len(), true),
                };
                match check {
                    Ok(None) => batcher.start_producer(ps),
                    Ok(Some(offsets)) => {
                        answered[ri] = Some(Ok(offsets));
                        continue;
                    }
                    Err(e) => {
                        answered[ri] = Some(Err(e));
                        continue;
                    }
                }
            }
            for r in records {
                match batcher.push(r) {
                    Ok(place) => places[ri].push(place),
                    Err(e) => {
                        answered[ri] = Some(Err(e));
                        break;
                    }
                }
            }
            if producer.is_some() {
                // In flight from now on: a later request of this call (a retry through another
                // node, or the next of a pipelined stream) is checked against them.
                let mut pending = self.pending.borrow_mut();
                for (id, f, l) in batcher.end_producer() {
                    pending.entry(id).or_default().push((f, l));
                }
            }
        }
        let (batches, batch_seqs) = batcher.finish();
        // Writes wake a quiet group (their entries carry no `quiet`; the next beat heartbeats).
        self.wake_leader();
        // `pending` holds the idempotent batches until their writes end (whatever the outcome).
        // Propose every batch at once: Raft orders them as proposed, and one fsync covers all.
        let appends = batches.iter().map(|b| async {
            match b {
                Ok(b) => self
                    .raft
                    .client_write(EntryBatch(b.clone()))
                    .await
                    .map(|r| Offset(r.data.base))
                    .map_err(from_write_error),
                Err(e) => Err(e.clone()),
            }
        });
        tracing::trace!(partition = %self.key, batches = batches.len(), "appending");
        let results = futures::future::join_all(appends).await;
        tracing::trace!(partition = %self.key, "appended");
        if batch_seqs.iter().any(Option::is_some) {
            let mut pending = self.pending.borrow_mut();
            for (id, f, l) in batch_seqs.iter().flatten() {
                if let Some(v) = pending.get_mut(id) {
                    if let Some(i) = v.iter().position(|x| *x == (*f, *l)) {
                        v.remove(i);
                    }
                    if v.is_empty() {
                        pending.remove(id);
                    }
                }
            }
        }
        for (ri, (records, _, reply)) in requests.into_iter().enumerate() {
            if let Some(early) = answered[ri].take() {
                let answer = match early {
                    Ok(offsets) => Ok(Appended::Done(AppendAck { offsets })),
                    // Nothing of it was written: the caller may send it to the leader.
                    Err(CoreError::NotLeader { leader }) if places[ri].is_empty() => {
                        Ok(Appended::NotLeader { leader, records })
                    }
                    Err(e) => Err(e),
                };
                let _ = reply.send(answer);
                continue;
            }
            let outcomes = || places[ri].iter().map(|&(bi, _)| &results[bi]);
            let refused =
                |r: &Result<Offset, CoreError>| matches!(r, Err(CoreError::NotLeader { .. }));
            let answer = if !places[ri].is_empty() && outcomes().all(refused) {
                let leader = match outcomes().next() {
                    Some(Err(CoreError::NotLeader { leader })) => *leader,
                    _ => None,
                };
                Ok(Appended::NotLeader { leader, records })
            } else if let Some(Err(CoreError::NotLeader { leader })) =
                outcomes().find(|r| refused(r))
            {
                Err(CoreError::LeaderChanged { leader: *leader })
            } else {
                places[ri]
                    .iter()
                    .map(|&(bi, i)| match &results[bi] {
                        Ok(base) => Ok(base.plus(i as u64)),
                        Err(e) => Err(e.clone()),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|offsets| Appended::Done(AppendAck { offsets }))
            };
            let _ = reply.send(answer);
        }
    }

    /// Checks an idempotent request of `count` records against the producer's committed
    /// batches and those in flight: `None` to append it, the offsets of a retry already
    /// committed, or why it is refused.
    fn check_sequences(
        &self,
        ps: &ProducerSeq,
        count: usize,
        log: bool,
    ) -> Result<Option<Vec<Offset>>, CoreError> {
        let pending = self.pending.borrow();
        let mine = pending.get(&ps.id).map_or(&[][..], |v| &v[..]);
        match self
            .store
            .producers()
            .check(ps.id, ps.first, count as u32, mine)
        {
            SeqCheck::Append => Ok(None),
            SeqCheck::Duplicate(offsets) => {
                if !log {
                    return Ok(Some(offsets));
                }
                tracing::debug!(partition = %self.key, node = %self.raft.metrics().borrow_watched().id, producer = ps.id.0, first = ps.first.0, ?offsets, "retried sequences answered, not written again");
                Ok(Some(offsets))
            }
            SeqCheck::InFlight => Err(CoreError::InFlight),
            SeqCheck::OutOfOrder { expected } if !log => Err(CoreError::OutOfOrder {
                producer: ps.id.0,
                expected,
                got: ps.first.0 as i64,
            }),
            SeqCheck::OutOfOrder { expected } => {
                let m = self.raft.metrics().borrow_watched().clone();
                tracing::debug!(
                    partition = %self.key,
                    producer = ps.id.0,
                    first = ps.first.0,
                    expected,
                    node = %m.id,
                    term = m.current_term,
                    leader = ?m.current_leader,
                    last_applied = ?m.last_applied,
                    last_log = ?m.last_log_index,
                    pending = ?mine,
                    "out-of-order sequence"
                );
                Err(CoreError::OutOfOrder {
                    producer: ps.id.0,
                    expected,
                    got: ps.first.0 as i64,
                })
            }
        }
    }

    /// Whether an idempotent request of this call leaves a gap in its producer's sequences. A
    /// request continuing one earlier in the same call (a pipelined stream) is no gap, though
    /// the earlier one is not in flight yet: it is only looked up in the table otherwise.
    fn any_gap(&self, requests: &[AppendRequest]) -> bool {
        let mut ends: HashMap<ProducerId, i64> = HashMap::new();
        requests.iter().any(|(records, producer, _)| {
            let Some(ps) = producer else { return false };
            let end = ps.first.0 as i64 + records.len() as i64;
            let follows = ends.insert(ps.id, end) == Some(ps.first.0 as i64);
            !follows
                && matches!(
                    self.check_sequences(ps, records.len(), false),
                    Err(CoreError::OutOfOrder { .. })
                )
        })
    }

    /// Confirms with a quorum of the group that this replica still leads (Raft's ReadIndex),
    /// and waits until it has applied everything committed up to then; bounded by the
    /// election timeout. A replica that cannot is answered as not the leader: nothing is
    /// written, and the caller tries the partition's other replicas.
    async fn confirm_leadership(&self) -> Result<(), CoreError> {
        let not_leader = |raft: &crate::raft::group::PartitionGroup| {
            let m = raft.metrics().borrow_watched().clone();
            CoreError::NotLeader {
                leader: m.current_leader.filter(|l| *l != m.id),
            }
        };
        let confirm = self
            .raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex);
        let limit = glommio::timer::sleep(Duration::from_millis(self.timing.election_max_ms));
        futures::pin_mut!(confirm, limit);
        match futures::future::select(confirm, limit).await {
            futures::future::Either::Left((Ok(_), _)) => Ok(()),
            futures::future::Either::Left((Err(e), _)) => {
                tracing::debug!(partition = %self.key, error = %e, "leadership not confirmed before answering a sequence gap");
                Err(not_leader(&self.raft))
            }
            futures::future::Either::Right(_) => {
                tracing::debug!(partition = %self.key, "leadership not confirmed in time before answering a sequence gap");
                Err(not_leader(&self.raft))
            }
        }
    }

    /// A leader whose group was quiet wakes it before writing: openraft refuses writes once
    /// the leader's lease (a quorum's acknowledgement within the longest election timeout) has
    /// run out, and a quiet leader sends nothing to renew it. One heartbeat round renews it;
    /// waited for at most an election timeout (if it fails, the write is refused as it would
    /// have been). A leader with a fresh lease goes on at once.
    pub(super) async fn renew_lease(&self) {
        if !self.quiet.allowed {
            return;
        }
        let lease = Duration::from_millis(self.timing.election_max_ms);
        let fresh = move |m: &openraft::RaftMetrics<PartitionRaft>| {
            m.last_quorum_acked
                .as_ref()
                .is_some_and(|at| at.elapsed() < lease / 2)
        };
        {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.current_leader != Some(m.id) || fresh(&m) {
                return;
            }
        }
        self.wake_leader();
        let _ = self.raft.trigger().heartbeat().await;
        let _ = self
            .raft
            .wait(Some(lease))
            .metrics(fresh, "a quiet leader renewed its lease")
            .await;
    }

    /// Whether this replica may check idempotent producers' sequences: it leads, and has
    /// applied every entry its log held when this leadership began (found the first time it is
    /// asked in a term), so its producer table holds every committed batch. Applying an entry
    /// of its own term is not enough: a leader restarted in the same term (openraft restores a
    /// leader from its own committed vote) re-applies its whole log, entries of that term
    /// included, and answered a retry of a committed batch as out of order while it did. A new
    /// leader is given a moment.
    async fn idempotence_ready(&self) -> Result<(), CoreError> {
        let m = self.raft.metrics().borrow_watched().clone();
        if m.current_leader != Some(m.id) {
            return Err(CoreError::NotLeader {
                leader: m.current_leader,
            });
        }
        let upto = match self.tenure.get() {
            Some((term, upto)) if term == m.current_term => upto,
            _ => {
                let upto = m.last_log_index.unwrap_or(0);
                self.tenure.set(Some((m.current_term, upto)));
                upto
            }
        };
        let term = m.current_term;
        let ready = move |m: &openraft::RaftMetrics<PartitionRaft>| {
            m.current_leader == Some(m.id)
                && m.current_term == term
                && m.last_applied.is_some_and(|l| l.index >= upto)
        };
        if ready(&m) {
            return Ok(());
        }
        self.raft
            .wait(Some(Duration::from_millis(2 * self.timing.election_max_ms)))
            .metrics(ready, "leader applied its log as of its leadership")
            .await
            .map(|_| ())
            .map_err(|_| CoreError::NotLeader {
                leader: self.raft.metrics().borrow_watched().current_leader,
            })
    }
}
