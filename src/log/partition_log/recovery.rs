//! Opening segments: creation, sealed segments from their indexes, and recovery of the active
//! segment.

use super::*;

/// Creates an empty segment file and makes its name durable.
pub(super) async fn create_segment(
    dir: &Path,
    base: Offset,
    config: &LogConfig,
) -> Result<Segment, LogError> {
    let (path, file, _) = segment::open_file(dir, base).await?;
    sync_dir(dir).await?;
    Ok(Segment {
        base,
        file,
        path,
        written_size: 0,
        size: 0,
        next_offset: base,
        first_timestamp: None,
        max_timestamp: TimestampMs(i64::MIN),
        index: SparseIndex::new(config.index_interval_bytes),
        sealed: false,
    })
}

/// Opens a sealed segment from its index files, or rebuilds them by scanning. A sealed segment
/// holds only whole, fsync'd batches, so damage in it is reported, not cut away.
pub(super) async fn open_sealed(
    dir: &Path,
    base: Offset,
    config: &LogConfig,
) -> Result<Segment, LogError> {
    let (path, file, len) = segment::open_file(dir, base).await?;
    let ipath = path.with_extension("index");
    let tpath = path.with_extension("timeindex");
    if let (Some(of), Some(tf)) = (
        read_small_file(&ipath).await?,
        read_small_file(&tpath).await?,
    ) {
        if let Some((index, summary)) =
            SparseIndex::decode_files(&of, &tf, config.index_interval_bytes, base, len)
        {
            if summary.size == len {
                return Ok(Segment {
                    base,
                    file,
                    path,
                    written_size: len,
                    size: len,
                    next_offset: summary.next_offset,
                    first_timestamp: None,
                    max_timestamp: summary.max_timestamp,
                    index,
                    sealed: true,
                });
            }
        }
    }
    tracing::warn!(segment = %path.display(), "index missing or damaged; rebuilding by scan");
    let scan = segment::scan(&file, &path, base, len, config.index_interval_bytes).await?;
    if let Some((position, reason)) = scan.stopped {
        return Err(LogError::Corrupt {
            path: path.display().to_string(),
            position,
            reason,
        });
    }
    let seg = segment::from_scan(base, file, path, scan, true);
    segment::write_index_files(seg.index_files()).await?;
    Ok(seg)
}

/// Recovers the active segment: keeps the longest valid prefix of batches, cuts the rest off
/// the file (a torn write, garbage, or zero padding), and makes the result durable.
pub(super) async fn recover_active(
    dir: &Path,
    base: Offset,
    config: &LogConfig,
) -> Result<Segment, LogError> {
    let (path, file, len) = segment::open_file(dir, base).await?;
    // Index files of the active segment are stale by definition (it was re-opened for writing
    // after a truncation, or a crash came between sealing it and creating the next one).
    segment::remove_index_files(&path).await?;
    let scan = segment::scan(&file, &path, base, len, config.index_interval_bytes).await?;
    if scan.valid_size < len {
        // Enough of the cut to tell zero padding (at most one block) from real damage.
        let look = (len - scan.valid_size).min(64 << 10) as usize;
        let dropped = read_exact(&file, &path, scan.valid_size, look).await?;
        let reason = scan.stopped.as_ref().map_or("", |(_, r)| r.as_str());
        if dropped.iter().any(|&b| b != 0) {
            tracing::warn!(
                segment = %path.display(),
                valid_bytes = scan.valid_size,
                dropped_bytes = len - scan.valid_size,
                next_offset = scan.next_offset.0,
                reason,
                "recovery dropped a torn or corrupt tail"
            );
        } else {
            tracing::debug!(segment = %path.display(), padding = len - scan.valid_size, "recovery cut zero padding");
        }
        file.truncate(scan.valid_size)
            .await
            .map_err(|e| LogError::io("truncating", &path, e))?;
    }
    // What is on disk now becomes the durable prefix.
    file.fdatasync()
        .await
        .map_err(|e| LogError::io("syncing", &path, e))?;
    sync_dir(dir).await?;
    Ok(segment::from_scan(base, file, path, scan, false))
}

/// Reads the bytes of the segment's last partial block, which the next write rewrites.
pub(super) async fn load_tail(seg: &Segment) -> Result<Vec<u8>, LogError> {
    let start = seg.file.align_down(seg.written_size);
    let len = (seg.written_size - start) as usize;
    let b = read_exact(&seg.file, &seg.path, start, len).await?;
    if b.len() != len {
        return Err(LogError::io(
            "reading",
            &seg.path,
            "short read of the tail block",
        ));
    }
    Ok(b.to_vec())
}
