//! Removing records: tail truncation (Raft), deletion before an offset, and retention.

use super::*;
use crate::log::StateFile;

impl Log {
    /// Drops every record after `last_kept` (a Raft follower discarding a divergent tail).
    pub async fn truncate_after(&self, last_kept: Offset) -> Result<(), LogError> {
        self.truncate_from(last_kept.plus(1)).await
    }

    /// Drops every record at or after `first_dropped`, which must start a batch (or be the log
    /// end). Durable when this returns: a crash cannot bring the dropped records back.
    pub async fn truncate_from(&self, first_dropped: Offset) -> Result<(), LogError> {
        let inner = &self.inner;
        let _permit = lock(&inner.append_lock).await?;
        let next = {
            let st = inner.state.borrow();
            st.check_writable()?;
            if first_dropped < st.start() || first_dropped > st.next {
                return Err(LogError::OffsetOutOfRange {
                    requested: first_dropped,
                    start: st.start(),
                    end: st.next,
                });
            }
            if first_dropped < st.committed {
                return Err(LogError::BelowCommitted {
                    at: first_dropped,
                    committed: st.committed,
                });
            }
            st.next
        };
        if first_dropped == next {
            return Ok(());
        }
        self.wait_for(next, Wait::Written).await?;
        let _io = lock(&inner.io_lock).await?;
        let r = self.truncate_locked(first_dropped).await;
        if let Err(e) = &r {
            if !matches!(e, LogError::NotABatchBoundary(_)) {
                inner.poison(e);
            }
        }
        r
    }

    async fn truncate_locked(&self, first_dropped: Offset) -> Result<(), LogError> {
        let inner = &self.inner;
        // Find the byte position of the batch starting at `first_dropped`.
        let (idx, file, path, base, pos_hint, end) = {
            let st = inner.state.borrow();
            let i = st
                .segment_for(first_dropped)
                .expect("checked against start");
            let s = &st.segments[i];
            let rel = (first_dropped.0 - s.base.0) as u32;
            (
                i,
                s.file.clone(),
                s.path.clone(),
                s.base,
                s.index.position_for_offset(rel),
                s.written_size,
            )
        };
        let cut = if first_dropped == base {
            0
        } else {
            let mut r = SeqReader::new(file.clone(), path.clone(), pos_hint as u64, end, 64 << 10);
            loop {
                match r.next().await? {
                    Step::Batch { position, batch } => {
                        if batch.base_offset() == first_dropped {
                            break position;
                        }
                        if batch.base_offset() > first_dropped
                            || batch.last_offset() >= first_dropped
                        {
                            return Err(LogError::NotABatchBoundary(first_dropped));
                        }
                    }
                    Step::End => return Err(LogError::NotABatchBoundary(first_dropped)),
                    Step::Invalid { position, error } => {
                        return Err(LogError::Corrupt {
                            path: path.display().to_string(),
                            position,
                            reason: error.to_string(),
                        })
                    }
                }
            }
        };
        // From here bytes disappear. Readers must not go past the cut any more, and a read
        // already in flight must learn that the bytes under it moved (it checks the epoch when
        // it meets bytes that do not parse).
        {
            let mut st = inner.state.borrow_mut();
            st.truncations += 1;
            st.written = st.written.min(first_dropped);
            st.durable = st.durable.min(first_dropped);
            let seg = &mut st.segments[idx];
            seg.written_size = seg.written_size.min(cut);
        }
        // Later segments go first, newest first, each removal made durable, so a crash leaves a
        // contiguous prefix of segments.
        loop {
            let victim = {
                let st = inner.state.borrow();
                (st.segments.len() > idx + 1).then(|| st.segments.last().unwrap().path.clone())
            };
            let Some(vpath) = victim else { break };
            remove_segment_files(&vpath).await?;
            sync_dir(&inner.dir).await?;
            inner.state.borrow_mut().segments.pop();
        }
        // The containing segment becomes active again: its index files describe a longer
        // segment, so they go before the file shrinks.
        let sealed = inner.state.borrow().segments[idx].sealed;
        if sealed {
            segment::remove_index_files(&path).await?;
            sync_dir(&inner.dir).await?;
        }
        file.truncate(cut)
            .await
            .map_err(|e| LogError::io("truncating", &path, e))?;
        inner.fsync(&file, &path).await?;
        let scan =
            segment::scan(&file, &path, base, cut, inner.config.index_interval_bytes).await?;
        if scan.stopped.is_some() || scan.next_offset != first_dropped {
            return Err(LogError::Corrupt {
                path: path.display().to_string(),
                position: scan.valid_size,
                reason: "segment changed while truncating".into(),
            });
        }
        let seg = segment::from_scan(base, file, path, scan, false);
        let tail = load_tail(&seg).await?;
        let mut st = inner.state.borrow_mut();
        *st.active_mut() = seg;
        st.tail = tail;
        st.next = first_dropped;
        st.written = first_dropped;
        st.durable = st.durable.min(first_dropped);
        st.truncations += 1;
        st.fail_waiters_past(first_dropped);
        st.wake();
        Ok(())
    }

    /// Deletes whole segments whose records all lie before `offset` (and are committed).
    /// Returns how many were deleted. The active segment is never deleted.
    pub async fn delete_before(&self, offset: Offset) -> Result<usize, LogError> {
        let n = {
            let st = self.inner.state.borrow();
            let limit = offset.min(st.committed);
            let closed = &st.segments[..st.segments.len() - 1];
            closed.iter().take_while(|s| s.next_offset <= limit).count()
        };
        self.delete_front(n).await
    }

    /// Applies retention at `now`: rolls an idle active segment that is older than
    /// `segment_ms_max`, then deletes closed segments past `retention_ms` or `retention_bytes`.
    pub async fn enforce_retention(&self, now: TimestampMs) -> Result<usize, LogError> {
        match self.retention_point(now).await? {
            Some(end) => self.delete_before(end).await,
            None => Ok(0),
        }
    }

    /// Where retention would cut the log at `now` (rolling an idle, old active segment first):
    /// the end of the last closed segment it would delete, if any. The log's owner decides when
    /// to delete (a Raft group first makes sure no replica still needs those records).
    pub async fn retention_point(&self, now: TimestampMs) -> Result<Option<Offset>, LogError> {
        let c = &self.inner.config;
        let idle_and_old = {
            let st = self.inner.state.borrow();
            let a = st.active();
            !a.is_empty()
                && a.first_timestamp
                    .is_some_and(|f| now.0.saturating_sub(f.0) >= c.segment_ms_max as i64)
        };
        if idle_and_old {
            self.roll().await?;
        }
        let n = {
            let st = self.inner.state.borrow();
            let closed: Vec<SegmentInfo> = st.segments[..st.segments.len() - 1]
                .iter()
                .map(|s| SegmentInfo {
                    size: s.size,
                    max_timestamp: s.max_timestamp,
                    next_offset: s.next_offset,
                })
                .collect();
            retention::segments_to_delete(
                &closed,
                st.active().size,
                st.committed,
                c.retention_ms,
                c.retention_bytes,
                now,
            )
        };
        let st = self.inner.state.borrow();
        Ok(n.checked_sub(1).map(|last| st.segments[last].next_offset))
    }

    /// Empties the log and starts it again, empty, at `start` (a Raft follower so far behind
    /// that the records it misses were deleted on the leader starts over where the leader's log
    /// begins). Durable when this returns: a marker file names the new start while the old
    /// segments go, and opening the log finishes an interrupted reset.
    pub async fn reset_to(&self, start: Offset) -> Result<(), LogError> {
        let inner = &self.inner;
        let _permit = lock(&inner.append_lock).await?;
        let next = {
            let st = inner.state.borrow();
            st.check_writable()?;
            st.next
        };
        self.wait_for(next, Wait::Written).await?;
        let _io = lock(&inner.io_lock).await?;
        let r = async {
            let marker = StateFile::new(&inner.dir, RESET_MARKER);
            marker.write(&start.0.to_le_bytes()).await?;
            let old: Vec<Rc<Path>> = inner
                .state
                .borrow()
                .segments
                .iter()
                .map(|s| s.path.clone())
                .collect();
            for path in &old {
                remove_segment_files(path).await?;
            }
            sync_dir(&inner.dir).await?;
            let seg = create_segment(&inner.dir, start, &inner.config).await?;
            {
                let mut st = inner.state.borrow_mut();
                st.segments = vec![seg];
                st.staged.clear();
                st.tail.clear();
                st.next = start;
                st.written = start;
                st.durable = start;
                st.committed = start;
                st.truncations += 1;
                st.fail_waiters_past(start);
                st.wake();
            }
            marker.remove().await
        }
        .await;
        if let Err(e) = &r {
            inner.poison(e);
        }
        r
    }
}

/// Names the offset a log is being reset to while its old segments are removed (a
/// [`StateFile`] in the log's directory holding the offset, little-endian).
pub const RESET_MARKER: &str = "reset";

/// Finishes a reset that a crash interrupted: removes every segment and starts the log at the
/// marker's offset. Returns whether there was one.
pub(super) async fn finish_reset(dir: &Path, config: &LogConfig) -> Result<bool, LogError> {
    let marker = StateFile::new(dir, RESET_MARKER);
    let Some(bytes) = marker.read().await? else {
        return Ok(false);
    };
    let start = Offset(u64::from_le_bytes(bytes.as_slice().try_into().map_err(
        |_| LogError::Corrupt {
            path: dir.join(RESET_MARKER).display().to_string(),
            position: 0,
            reason: "reset marker is not an offset".into(),
        },
    )?));
    let entries = std::fs::read_dir(dir).map_err(|e| LogError::io("listing", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LogError::io("listing", dir, e))?;
        if segment::parse_log_name(&entry.file_name().to_string_lossy()).is_some() {
            remove_segment_files(&entry.path()).await?;
        }
    }
    sync_dir(dir).await?;
    create_segment(dir, start, config).await?;
    marker.remove().await?;
    Ok(true)
}

impl Log {
    async fn delete_front(&self, n: usize) -> Result<usize, LogError> {
        if n == 0 {
            return Ok(0);
        }
        let _permit = lock(&self.inner.append_lock).await?;
        let mut deleted = 0;
        for _ in 0..n {
            // Readers holding the file keep reading; the name goes now.
            let seg = {
                let mut st = self.inner.state.borrow_mut();
                if st.segments.len() < 2 {
                    break;
                }
                st.stats.segments_deleted += 1;
                st.segments.remove(0)
            };
            tracing::info!(segment = %seg.path.display(), next_offset = seg.next_offset.0, "retention deletes segment");
            remove_segment_files(&seg.path).await?;
            deleted += 1;
        }
        sync_dir(&self.inner.dir).await?;
        Ok(deleted)
    }
}

pub(super) async fn retention_loop(weak: Weak<Inner>, every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let log = Log { inner };
        if let Err(e) = log.enforce_retention(TimestampMs::now()).await {
            tracing::warn!(dir = %log.dir().display(), error = %e, "retention failed");
        }
    }
}

pub(super) async fn remove_segment_files(log_path: &Path) -> Result<(), LogError> {
    segment::remove_index_files(log_path).await?;
    remove_if_exists(log_path).await
}
