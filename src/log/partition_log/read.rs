//! Reads: batches from an offset up to a byte budget, and the offset for a timestamp.

use super::*;

/// How far a read may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadBound {
    /// Only records settled by replication: what consumers see.
    Committed,
    /// Everything written: what a Raft leader ships to followers.
    Written,
}

/// Batches read from the log.
#[derive(Clone, Debug, Default)]
pub struct ReadBatches {
    /// The offset the read asked for; the first batch may start before it.
    pub from: Offset,
    /// The read's bound (exclusive); the last batch may run past it when the bound falls
    /// inside a batch.
    pub until: Offset,
    pub batches: Vec<Batch>,
}

impl ReadBatches {
    /// Records in `[from, until)`, hiding those whose expiry has passed at `now`.
    pub fn records(&self, now: TimestampMs) -> impl Iterator<Item = RecordView<'_>> {
        let (from, until) = (self.from, self.until);
        self.batches
            .iter()
            .flat_map(|b| b.records())
            .filter(move |r| r.offset >= from && r.offset < until && !r.is_expired(now))
    }

    /// Where the next read continues: after the last batch, or at the bound if that batch runs
    /// past it (its later records were not readable yet).
    pub fn next_offset(&self) -> Offset {
        self.batches
            .last()
            .map_or(self.from, |b| b.last_offset().plus(1).min(self.until))
    }
}

impl Log {
    /// Reads whole batches from the one holding `from`, up to about `max_bytes` (at least one
    /// batch when any is available), never past `bound`. Every batch is CRC-checked; a corrupt
    /// one is an error, never returned.
    pub async fn read(
        &self,
        from: Offset,
        max_bytes: usize,
        bound: ReadBound,
    ) -> Result<ReadBatches, LogError> {
        let (limit, epoch) = {
            let st = self.inner.state.borrow();
            if from < st.start() || from > st.next {
                return Err(LogError::OffsetOutOfRange {
                    requested: from,
                    start: st.start(),
                    end: st.next,
                });
            }
            let limit = match bound {
                ReadBound::Committed => st.committed,
                ReadBound::Written => st.written,
            };
            (limit, st.truncations)
        };
        let mut out = ReadBatches {
            from,
            until: limit,
            batches: Vec::new(),
        };
        let mut bytes = 0usize;
        let mut cursor = from;
        'segments: while cursor < limit {
            let (file, path, base, pos, end) = {
                let st = self.inner.state.borrow();
                let Some(i) = st.segment_for(cursor) else {
                    let start = st.start();
                    return Err(LogError::OffsetOutOfRange {
                        requested: cursor,
                        start,
                        end: st.next,
                    });
                };
                let s = &st.segments[i];
                let rel = (cursor.0 - s.base.0).min(u32::MAX as u64) as u32;
                (
                    s.file.clone(),
                    s.path.clone(),
                    s.base,
                    s.index.position_for_offset(rel),
                    s.written_size,
                )
            };
            let chunk = max_bytes.saturating_sub(bytes);
            let mut r = SeqReader::new(file, path.clone(), pos as u64, end, chunk);
            let before = cursor;
            loop {
                match r.next().await? {
                    Step::End => break,
                    Step::Invalid { position, error } => {
                        if self.inner.state.borrow().truncations != epoch {
                            // A truncation cut the bytes under this read: what was read before
                            // it is still valid, the rest is gone.
                            break 'segments;
                        }
                        self.inner.damaged.replace(Some(path.clone()));
                        return Err(LogError::Corrupt {
                            path: path.display().to_string(),
                            position,
                            reason: error.to_string(),
                        });
                    }
                    Step::Batch { batch, .. } => {
                        if batch.last_offset() < cursor {
                            continue;
                        }
                        if batch.base_offset() >= limit {
                            break 'segments;
                        }
                        if !out.batches.is_empty() && bytes + batch.len() > max_bytes {
                            break 'segments;
                        }
                        bytes += batch.len();
                        cursor = batch.last_offset().plus(1);
                        out.batches.push(batch);
                        if bytes >= max_bytes {
                            break 'segments;
                        }
                    }
                }
            }
            if cursor == before {
                // Nothing readable in this segment beyond `cursor` (it was the base of an empty
                // active segment, or the segment shrank under us).
                tracing::trace!(segment = base.0, "read found nothing past {cursor}");
                break;
            }
        }
        Ok(out)
    }

    /// The first offset whose record has a timestamp at or after `ts`, among records below
    /// `bound`; `None` when every such record is older.
    pub async fn offset_for_timestamp(
        &self,
        ts: TimestampMs,
        bound: ReadBound,
    ) -> Result<Option<Offset>, LogError> {
        let (limit, candidates) = {
            let st = self.inner.state.borrow();
            let limit = match bound {
                ReadBound::Committed => st.committed,
                ReadBound::Written => st.written,
            };
            let c: Vec<_> = st
                .segments
                .iter()
                .filter(|s| s.max_timestamp >= ts && s.base < limit)
                .map(|s| {
                    (
                        s.file.clone(),
                        s.path.clone(),
                        s.index.position_for_timestamp(ts),
                        s.written_size,
                    )
                })
                .collect();
            (limit, c)
        };
        for (file, path, pos, end) in candidates {
            let mut r = SeqReader::new(file, path.clone(), pos as u64, end, 64 << 10);
            loop {
                match r.next().await? {
                    Step::End => break,
                    Step::Invalid { position, error } => {
                        self.inner.damaged.replace(Some(path.clone()));
                        return Err(LogError::Corrupt {
                            path: path.display().to_string(),
                            position,
                            reason: error.to_string(),
                        });
                    }
                    Step::Batch { batch, .. } => {
                        if batch.base_offset() >= limit {
                            return Ok(None);
                        }
                        if batch.meta().max_timestamp < ts {
                            continue;
                        }
                        if let Some(r) = batch
                            .records()
                            .find(|r| r.timestamp >= ts && r.offset < limit)
                        {
                            return Ok(Some(r.offset));
                        }
                    }
                }
            }
        }
        Ok(None)
    }
}
