//! Group commit: the flush and sync tasks that write staged batches and fsync them, and how a
//! failed write poisons the log.

use super::*;

impl Inner {
    pub(super) fn injected(&self, op: &'static str, path: &Path) -> Result<(), LogError> {
        if self.fail_next_io.replace(false) {
            return Err(LogError::io(op, path, "injected failure"));
        }
        Ok(())
    }

    pub(super) async fn fsync(
        &self,
        file: &glommio::io::DmaFile,
        path: &Path,
    ) -> Result<(), LogError> {
        self.injected("syncing", path)?;
        let started = std::time::Instant::now();
        file.fdatasync()
            .await
            .map_err(|e| LogError::io("syncing", path, e))?;
        crate::metrics::NODE.fsync.observe(started.elapsed());
        self.state.borrow_mut().stats.fsyncs += 1;
        Ok(())
    }

    /// After a failed write or fsync nothing can be assumed about what reached the disk: the
    /// log refuses every later append, and everyone waiting is told.
    pub(super) fn poison(&self, e: &LogError) {
        let mut st = self.state.borrow_mut();
        if st.poisoned.is_none() {
            tracing::error!(dir = %self.dir.display(), error = %e, "partition log poisoned");
            st.poisoned = Some(e.to_string());
        }
        let reason = LogError::Poisoned(st.poisoned.clone().unwrap_or_default());
        st.fail_waiters(&reason);
    }

    /// One group-commit round: everything staged goes out in one write (and, under `always`,
    /// one fdatasync). Returns whether there was anything to do.
    pub(super) async fn flush_round(&self) -> Result<bool, LogError> {
        let _io = lock(&self.io_lock).await?;
        let (file, path, tail, staged, pos, new_size, end) = {
            let mut st = self.state.borrow_mut();
            if st.staged.is_empty() || st.poisoned.is_some() {
                return Ok(false);
            }
            let a = st.active();
            let (file, path) = (a.file.clone(), a.path.clone());
            let pos = file.align_down(a.written_size);
            let new_size = a.written_size + st.staged.len() as u64;
            let tail = std::mem::take(&mut st.tail);
            let staged = std::mem::take(&mut st.staged);
            // The new partial last block, which the next round rewrites.
            let keep = (new_size - file.align_down(new_size)) as usize;
            st.tail = if keep <= staged.len() {
                staged[staged.len() - keep..].to_vec()
            } else {
                let from_tail = keep - staged.len();
                let mut t = tail[tail.len() - from_tail..].to_vec();
                t.extend_from_slice(&staged);
                t
            };
            (file, path, tail, staged, pos, new_size, st.next)
        };
        self.injected("writing", &path)?;
        write_all_at(&file, &path, &[&tail, &staged], pos).await?;
        {
            // Hand the buffer back so its capacity is reused by later appends.
            let mut st = self.state.borrow_mut();
            if st.staged.is_empty() {
                let mut staged = staged;
                staged.clear();
                st.staged = staged;
            }
        }
        {
            let mut st = self.state.borrow_mut();
            st.active_mut().written_size = new_size;
            st.written = end;
            st.stats.writes += 1;
            st.wake();
        }
        if let Some(s) = &self.sync_signal {
            // Full means a sync is already pending; it will cover this write too.
            let _ = s.try_send(());
        }
        if self.config.fsync == FsyncPolicy::Always {
            self.fsync(&file, &path).await?;
            let mut st = self.state.borrow_mut();
            st.durable = st.durable.max(end);
            st.wake();
        }
        Ok(true)
    }

    /// fdatasync of everything written so far (the `interval` policy's timer, and `flush`).
    pub(super) async fn sync_now(&self) -> Result<(), LogError> {
        let _io = lock(&self.io_lock).await?;
        let (file, path, target) = {
            let st = self.state.borrow();
            if st.durable >= st.written || st.poisoned.is_some() {
                return Ok(());
            }
            let a = st.active();
            (a.file.clone(), a.path.clone(), st.written)
        };
        let r = self.fsync(&file, &path).await;
        if let Err(e) = &r {
            self.poison(e);
            return r;
        }
        let mut st = self.state.borrow_mut();
        st.durable = st.durable.max(target);
        st.wake();
        Ok(())
    }
}

pub(super) async fn flush_loop(weak: Weak<Inner>, rx: local_channel::LocalReceiver<()>) {
    while rx.recv().await.is_some() {
        let Some(inner) = weak.upgrade() else { return };
        loop {
            match inner.flush_round().await {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    inner.poison(&e);
                    break;
                }
            }
        }
    }
}

/// Under `interval`: once data is written, waits one interval and fsyncs it. Sleeps without a
/// timer while nothing is waiting to be synced.
pub(super) async fn sync_loop(
    weak: Weak<Inner>,
    every: Duration,
    rx: local_channel::LocalReceiver<()>,
) {
    while rx.recv().await.is_some() {
        glommio::timer::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        let _ = inner.sync_now().await;
    }
}
