//! One partition on its core: the log, the commit position, and the readers waiting for new
//! records.
//!
//! This is where a Raft group will sit (the replication issue): today an append is committed as
//! soon as the log has secured it under the topic's fsync policy (replication factor 1).

use std::cell::RefCell;
use std::time::{Duration, Instant};

use futures::channel::oneshot;
use futures::future::{select, Either};

use super::request::{AppendAck, CoreError, Fetched, PartitionKey, Reply};
use crate::log::batch::HEADER_LEN;
use crate::log::{Assign, BatchBuilder, Log, LogError, ReadBound, Record};
use crate::types::{Offset, Term};

pub struct Partition {
    pub key: PartitionKey,
    pub log: Log,
    /// Fetches waiting for the commit position to move.
    waiters: RefCell<Vec<oneshot::Sender<()>>>,
}

impl Partition {
    pub fn new(key: PartitionKey, log: Log) -> Self {
        Self {
            key,
            log,
            waiters: RefCell::new(Vec::new()),
        }
    }

    /// Appends the records of several requests that arrived together, as few batches as the
    /// batch size limit allows (normally one), sharing one fsync; then answers each request
    /// with its records' offsets.
    pub async fn append(&self, requests: Vec<(Vec<Record>, Reply<AppendAck>)>) {
        let batch_max = self.log.config().batch_bytes_max;
        // Build batches; remember which (batch, index) each record landed in.
        let mut batches = Vec::new();
        let mut builder = BatchBuilder::new(batch_max);
        let mut places: Vec<Vec<(usize, u32)>> = Vec::with_capacity(requests.len());
        let mut failed: Vec<Option<CoreError>> = vec![None; requests.len()];
        for (ri, (records, _)) in requests.iter().enumerate() {
            // A request with a record too large for any batch is refused whole, before any of
            // its records is placed: nothing of it is written.
            let biggest = records
                .iter()
                .map(Record::encoded_len_bound)
                .max()
                .unwrap_or(0);
            if HEADER_LEN + biggest > batch_max {
                failed[ri] = Some(CoreError::Log(LogError::BatchTooLarge {
                    len: HEADER_LEN + biggest,
                    max: batch_max,
                }));
                places.push(Vec::new());
                continue;
            }
            let mut p = Vec::with_capacity(records.len());
            for r in records {
                if builder.push(r).is_err() {
                    // Full: start the next batch. The record fits an empty one (checked above).
                    let full = std::mem::replace(&mut builder, BatchBuilder::new(batch_max));
                    batches.push(full.finish());
                    if let Err(e) = builder.push(r) {
                        failed[ri] = Some(CoreError::Log(e.into()));
                        break;
                    }
                }
                p.push((batches.len(), builder.record_count() - 1));
            }
            places.push(p);
        }
        if !builder.is_empty() {
            batches.push(builder.finish());
        }
        let batches: Vec<_> = batches
            .into_iter()
            .map(|b| b.map_err(|e| CoreError::Log(e.into())))
            .collect();
        // Issue every append at once: offsets are assigned in call order, one fsync covers all.
        let appends = batches.iter().map(|b| async {
            match b {
                Ok(b) => self
                    .log
                    .append(b, Assign::Next(Term(0)))
                    .await
                    .map_err(CoreError::from),
                Err(e) => Err(e.clone()),
            }
        });
        tracing::trace!(partition = %self.key, batches = batches.len(), "appending");
        let results = futures::future::join_all(appends).await;
        tracing::trace!(partition = %self.key, "appended");
        self.commit();
        for (ri, (_, reply)) in requests.into_iter().enumerate() {
            let answer = match failed[ri].take() {
                Some(e) => Err(e),
                None => places[ri]
                    .iter()
                    .map(|&(bi, i)| match &results[bi] {
                        Ok(a) => Ok(a.base.plus(i as u64)),
                        Err(e) => Err(e.clone()),
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(|offsets| AppendAck { offsets }),
            };
            let _ = reply.send(answer);
        }
    }

    /// Moves the commit position to what the fsync policy has secured and wakes waiting readers.
    /// With replication, Raft's commit index takes this role.
    pub fn commit(&self) {
        let secured = self.log.secured();
        if secured > self.log.positions().committed && self.log.set_committed(secured).is_ok() {
            for w in self.waiters.borrow_mut().drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Committed batches from `from`, waiting up to `max_wait` for some to arrive.
    pub async fn fetch(
        &self,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<Fetched, CoreError> {
        let deadline = Instant::now() + max_wait;
        loop {
            let p = self.log.positions();
            if from < p.start || from > p.committed {
                return Err(CoreError::Log(crate::log::LogError::OffsetOutOfRange {
                    requested: from,
                    start: p.start,
                    end: p.committed,
                }));
            }
            let now = Instant::now();
            if from < p.committed || now >= deadline {
                let r = self.log.read(from, max_bytes, ReadBound::Committed).await?;
                return Ok(Fetched {
                    batches: r.batches,
                    from,
                    until: r.until,
                    start: p.start,
                    high_watermark: p.committed,
                });
            }
            let (tx, rx) = oneshot::channel();
            if self.waiters.borrow().len() >= 64 {
                self.prune_waiters();
            }
            self.waiters.borrow_mut().push(tx);
            let timer = glommio::timer::sleep(deadline - now);
            futures::pin_mut!(timer);
            match select(rx, timer).await {
                Either::Left(_) | Either::Right(_) => {}
            }
        }
    }

    /// Wakes every waiting fetch (on close), so none outlives the log.
    pub fn wake_all(&self) {
        for w in self.waiters.borrow_mut().drain(..) {
            let _ = w.send(());
        }
    }

    /// Drops waiters whose fetch gave up (timed out), so idle partitions do not accumulate them.
    fn prune_waiters(&self) {
        self.waiters.borrow_mut().retain(|w| !w.is_canceled());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(len: usize) -> Record {
        Record {
            value: Bytes::from(vec![7u8; len]),
            ..Record::default()
        }
    }

    #[test]
    fn a_request_with_an_oversized_record_writes_nothing_of_itself() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .spawn(|| async {
                let dir = tempfile::tempdir().unwrap();
                let config = crate::log::LogConfig {
                    batch_bytes_max: 4096,
                    pending_bytes_max: 1 << 20,
                    retention_ms: None,
                    ..crate::log::LogConfig::default()
                };
                let log = Log::open(dir.path(), config).await.unwrap();
                let p = Partition::new(
                    PartitionKey {
                        topic: "t".into(),
                        partition: 0,
                    },
                    log,
                );
                let (ok_tx, ok_rx) = oneshot::channel();
                let (bad_tx, bad_rx) = oneshot::channel();
                // Together: a good request (3 records, spilling over two batches), then a
                // request whose second record fits no batch.
                p.append(vec![
                    (vec![rec(2000), rec(2000), rec(10)], ok_tx),
                    (vec![rec(10), rec(5000)], bad_tx),
                ])
                .await;
                let ok = ok_rx.await.unwrap().unwrap();
                assert_eq!(ok.offsets, vec![Offset(0), Offset(1), Offset(2)]);
                let bad = bad_rx.await.unwrap();
                assert!(
                    matches!(bad, Err(CoreError::Log(LogError::BatchTooLarge { .. }))),
                    "{bad:?}"
                );
                // Exactly the good request's records are stored and committed.
                let pos = p.log.positions();
                assert_eq!((pos.next, pos.committed), (Offset(3), Offset(3)));
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
