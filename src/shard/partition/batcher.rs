//! Packs the records of one append call into batches, within the batch size limit. Records of
//! requests without a producer share batches; an idempotent producer's request gets batches of
//! its own, each stamped with the producer and the sequence of its first record.

use crate::log::{Batch, BatchBuilder, Record};
use crate::shard::request::{CoreError, ProducerSeq};
use crate::types::{ProducerId, Sequence};

/// A producer's sequence range in one batch: (producer, first, last).
pub(super) type SeqRange = (ProducerId, i32, i32);

/// Packs the records of one append call into batches. Records of requests without a producer
/// share batches; an idempotent producer's request gets batches of its own, each stamped with
/// the producer and the sequence number of its first record.
pub(super) struct Batcher {
    batch_max: usize,
    batches: Vec<Result<Batch, CoreError>>,
    /// Per batch: the sequence range it carries, if any.
    seqs: Vec<Option<SeqRange>>,
    builder: BatchBuilder,
    /// While a producer's request is being placed: its id, the sequence of the current batch's
    /// first record and of the next record (i64: the one after the last may pass i32::MAX).
    producer: Option<(ProducerId, i64, i64)>,
    /// The ranges of the producer's request being placed.
    ranges: Vec<SeqRange>,
}

impl Batcher {
    pub(super) fn new(batch_max: usize) -> Batcher {
        Batcher {
            batch_max,
            batches: Vec::new(),
            seqs: Vec::new(),
            builder: BatchBuilder::new(batch_max),
            producer: None,
            ranges: Vec::new(),
        }
    }

    pub(super) fn next_builder(&self) -> BatchBuilder {
        let b = BatchBuilder::new(self.batch_max);
        match self.producer {
            Some((id, _, next)) => b.producer(id, Sequence(next as i32)),
            None => b,
        }
    }

    /// Closes the current batch, if it has records.
    pub(super) fn seal(&mut self) {
        if self.builder.is_empty() {
            return;
        }
        let next = self.next_builder();
        let full = std::mem::replace(&mut self.builder, next);
        self.batches
            .push(full.finish().map_err(|e| CoreError::Log(e.into())));
        let range = self.producer.as_mut().map(|(id, first, next)| {
            let r = (*id, *first as i32, (*next - 1) as i32);
            *first = *next;
            r
        });
        self.ranges.extend(range);
        self.seqs.push(range);
    }

    /// The next records are an idempotent producer's, from sequence `ps.first`.
    pub(super) fn start_producer(&mut self, ps: &ProducerSeq) {
        self.seal();
        let first = ps.first.0 as i64;
        self.producer = Some((ps.id, first, first));
        self.builder = self.next_builder();
    }

    /// The producer's request is placed: answers the sequence ranges of its batches.
    pub(super) fn end_producer(&mut self) -> Vec<SeqRange> {
        self.seal();
        self.producer = None;
        self.builder = self.next_builder();
        std::mem::take(&mut self.ranges)
    }

    /// Places a record: (batch, index in it). The record fits an empty batch (checked).
    pub(super) fn push(&mut self, r: &Record) -> Result<(usize, u32), CoreError> {
        if self.builder.push(r).is_err() {
            self.seal();
            self.builder.push(r).map_err(|e| CoreError::Log(e.into()))?;
        }
        if let Some((_, _, next)) = &mut self.producer {
            *next += 1;
        }
        Ok((self.batches.len(), self.builder.record_count() - 1))
    }

    pub(super) fn finish(mut self) -> (Vec<Result<Batch, CoreError>>, Vec<Option<SeqRange>>) {
        self.seal();
        (self.batches, self.seqs)
    }
}
