//! Opening segments: creation, sealed segments from their indexes, and recovery of the active
//! segment.

use super::*;
use glommio::io::DmaFile;

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
        stamps: Stamps::new(base),
        sealed: false,
    })
}

/// Damage that [`Log::open_repairing`] cut away: everything from the first byte it could not
/// trust to the end of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    /// The first offset dropped; the log now ends here.
    pub from: Offset,
    /// The highest Raft index stamped in a whole batch the log held before the cut, in the
    /// dropped part too: what this replica may have acknowledged (`None` when no batch says).
    pub last_raft_index: Option<u64>,
    /// The file where the damage is, and what was wrong.
    pub path: String,
    pub reason: String,
}

/// Damage found in a sealed segment: its first `valid_size` bytes are whole batches.
pub(super) struct Damage {
    path: String,
    valid_size: u64,
    reason: String,
    /// The segment is whole but does not continue the one before it (one is missing).
    gap: bool,
}

impl Damage {
    fn error(self) -> LogError {
        LogError::Corrupt {
            path: self.path,
            position: self.valid_size,
            reason: self.reason,
        }
    }
}

/// Opens the segments starting at `bases` (sorted), the last one as the active segment. A
/// damaged sealed segment, or a missing one (a gap in the offsets), is an error, unless
/// `repair`: then the log is cut at the first damage (the damaged segment keeps its whole
/// batches before it, and every later segment is deleted). The active segment's torn tail is
/// cut either way; when whole batches follow the bad bytes, they were not a torn write but
/// damage. Repairing, every cut of damage is first recorded in the repair marker (durable
/// before anything is cut, so a crash mid-cut cannot hide it from the log's owner, who clears
/// it once it has recorded it: `Log::repair_noted`), and what the marker holds is returned.
pub(super) async fn open_segments(
    dir: &Path,
    bases: &[Offset],
    config: &LogConfig,
    repair: bool,
) -> Result<(Vec<Segment>, Option<Repair>), LogError> {
    let mut segments: Vec<Segment> = Vec::with_capacity(bases.len().max(1));
    for (i, &base) in bases.iter().enumerate() {
        let last = i + 1 == bases.len();
        // A gap is seen from the names alone, before the segment after it is opened (and, if
        // it is the active one, recovered: its index must be counted before anything is cut).
        let gap = segments
            .last()
            .filter(|prev| base != prev.next_offset)
            .map(|prev| Damage {
                path: dir
                    .join(segment::file_name(base, "log"))
                    .display()
                    .to_string(),
                valid_size: 0,
                reason: format!(
                    "segment starts at offset {base} but the one before ends at {}",
                    prev.next_offset
                ),
                gap: true,
            });
        let damage = match gap {
            Some(d) => d,
            None if last => {
                segments.push(recover_active(dir, base, config, repair).await?);
                break;
            }
            None => match open_sealed(dir, base, config).await? {
                Ok(seg) => {
                    segments.push(seg);
                    continue;
                }
                Err(d) => d,
            },
        };
        if !repair {
            return Err(damage.error());
        }
        // `None`: no whole batch in the dropped part says (its owner then waits for a newer
        // term instead: see `raft::store`).
        let last_raft_index = last_raft_index_in(dir, &bases[i..], config).await?;
        write_repair_marker(dir, last_raft_index, &damage.reason).await?;
        for &later in &bases[i + 1..] {
            super::trim::remove_segment_files(&dir.join(segment::file_name(later, "log"))).await?;
        }
        let keep = if damage.gap {
            // The segment after the gap goes too; the one before it becomes active.
            super::trim::remove_segment_files(&dir.join(segment::file_name(base, "log"))).await?;
            segments.pop().expect("a gap has a segment before it").base
        } else {
            let (path, file, _) = segment::open_file(dir, base).await?;
            truncate_durably(&file, &path, damage.valid_size).await?;
            base
        };
        sync_dir(dir).await?;
        let seg = recover_active(dir, keep, config, repair).await?;
        tracing::warn!(
            segment = %damage.path,
            reason = %damage.reason,
            from = seg.next_offset.0,
            last_raft_index,
            "damaged log cut at the damage; the replica catches up from its peers"
        );
        segments.push(seg);
        break;
    }
    let end = segments.last().map_or(Offset::ZERO, |s| s.next_offset);
    let repaired = match repair {
        true => read_repair_marker(dir, end).await?,
        false => None,
    };
    Ok((segments, repaired))
}

/// Cuts `file` to `len` bytes and fdatasyncs it.
async fn truncate_durably(file: &DmaFile, path: &Path, len: u64) -> Result<(), LogError> {
    file.truncate(len)
        .await
        .map_err(|e| LogError::io("truncating", path, e))?;
    file.fdatasync()
        .await
        .map_err(|e| LogError::io("syncing", path, e))
}

/// Names a cut made by a repairing open that its owner has not noted yet (a [`StateFile`]:
/// the highest Raft index found, little-endian, `u64::MAX` for none, then the reason).
pub const REPAIR_MARKER: &str = "repaired";

/// Records a cut in the repair marker, keeping the highest index of any cut not yet noted.
async fn write_repair_marker(
    dir: &Path,
    last_raft_index: Option<u64>,
    reason: &str,
) -> Result<(), LogError> {
    let before = read_repair_marker(dir, Offset::ZERO).await?;
    let index = match (before.as_ref().map(|r| r.last_raft_index), last_raft_index) {
        (Some(None), _) | (_, None) => None,
        (Some(Some(a)), Some(b)) => Some(a.max(b)),
        (None, b) => b,
    };
    let mut bytes = index.unwrap_or(u64::MAX).to_le_bytes().to_vec();
    match before {
        Some(b) => bytes.extend_from_slice(format!("{}; then {reason}", b.reason).as_bytes()),
        None => bytes.extend_from_slice(reason.as_bytes()),
    }
    bytes.truncate(64 << 10);
    crate::log::StateFile::new(dir, REPAIR_MARKER)
        .write(&bytes)
        .await
}

/// A cut a repairing open made that its owner has not noted yet, if any.
pub(super) async fn read_repair_marker(
    dir: &Path,
    from: Offset,
) -> Result<Option<Repair>, LogError> {
    let marker = crate::log::StateFile::new(dir, REPAIR_MARKER);
    let Some(bytes) = marker.read().await? else {
        return Ok(None);
    };
    let Some((index, reason)) = bytes.split_first_chunk::<8>() else {
        return Err(LogError::Corrupt {
            path: dir.join(REPAIR_MARKER).display().to_string(),
            position: 0,
            reason: "repair marker is shorter than a Raft index".into(),
        });
    };
    let index = u64::from_le_bytes(*index);
    Ok(Some(Repair {
        from,
        last_raft_index: (index != u64::MAX).then_some(index),
        path: dir.join(REPAIR_MARKER).display().to_string(),
        reason: String::from_utf8_lossy(reason).into_owned(),
    }))
}

/// The Raft index of the last whole batch in the segments starting at `bases`, newest first.
async fn last_raft_index_in(
    dir: &Path,
    bases: &[Offset],
    config: &LogConfig,
) -> Result<Option<u64>, LogError> {
    for &base in bases.iter().rev() {
        let (path, file, len) = segment::open_file(dir, base).await?;
        let scan = segment::scan(&file, &path, base, len, config.index_interval_bytes).await?;
        let later = whole_batches_after(&file, &path, &scan, len).await?;
        if let Some(i) = later.max(scan.last_raft_index) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// Looks past the point where a scan stopped for whole batches (a valid CRC) that continue the
/// offsets: there are none after a torn write, which ends a file. The highest Raft index among
/// them, if any.
async fn whole_batches_after(
    file: &Rc<DmaFile>,
    path: &Rc<Path>,
    scan: &segment::Scan,
    len: u64,
) -> Result<Option<u64>, LogError> {
    const WINDOW: u64 = 1 << 20;
    let mut found = None;
    let mut at = scan.valid_size + 1;
    while at + (batch::HEADER_LEN as u64) <= len {
        let window = read_exact(file, path, at, (len - at).min(WINDOW) as usize).await?;
        let mut i = 0;
        while let Some(hit) = window[i..].windows(3).position(|w| w == b"TRN") {
            let q = at + (i + hit) as u64;
            i += hit + 1;
            let Ok(need) = batch::peek_len(&window[i - 1..]) else {
                continue;
            };
            if q + need as u64 > len {
                continue;
            }
            let bytes = read_exact(file, path, q, need).await?;
            if let Ok(m) = batch::validate(&bytes) {
                // A batch of this log continues it: its offset and Raft index are past the
                // cut by no more than the bytes between could hold (a batch a client put
                // inside a record's value could claim any index; it must not count).
                let gap = q - scan.valid_size;
                let plausible = m.base_offset >= scan.next_offset
                    && m.base_offset.0 - scan.next_offset.0 <= gap
                    && scan.last_raft_index.is_none_or(|last| {
                        m.raft_index > last
                            && m.raft_index - last <= gap / batch::HEADER_LEN as u64 + 1
                    });
                if plausible {
                    found = found.max(Some(m.raft_index));
                }
            }
        }
        // Overlap by a header so a magic split across two windows is seen.
        at += window.len().saturating_sub(batch::HEADER_LEN).max(1) as u64;
    }
    Ok(found)
}

/// Opens a sealed segment from its index files, or rebuilds them by scanning. A sealed segment
/// holds only whole, fsync'd batches, so damage in it is reported (to be cut only by a
/// repairing open), not cut away.
async fn open_sealed(
    dir: &Path,
    base: Offset,
    config: &LogConfig,
) -> Result<Result<Segment, Damage>, LogError> {
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
                return Ok(Ok(Segment {
                    base,
                    file,
                    path,
                    written_size: len,
                    size: len,
                    next_offset: summary.next_offset,
                    first_timestamp: None,
                    max_timestamp: summary.max_timestamp,
                    index,
                    stamps: Stamps::new(base),
                    sealed: true,
                }));
            }
        }
    }
    tracing::warn!(segment = %path.display(), "index missing or damaged; rebuilding by scan");
    let scan = segment::scan(&file, &path, base, len, config.index_interval_bytes).await?;
    if let Some((position, reason)) = scan.stopped {
        return Ok(Err(Damage {
            path: path.display().to_string(),
            valid_size: position,
            reason,
            gap: false,
        }));
    }
    let seg = segment::from_scan(base, file, path, scan, true);
    segment::write_index_files(seg.index_files()).await?;
    Ok(Ok(seg))
}

/// Recovers the active segment: keeps the longest valid prefix of batches, cuts the rest off
/// the file (a torn write, garbage, or zero padding), and makes the result durable. When
/// `repair` and whole batches follow the bad bytes (damage, not a torn write), the cut is first
/// recorded in the repair marker with the highest Raft index among them.
pub(super) async fn recover_active(
    dir: &Path,
    base: Offset,
    config: &LogConfig,
    repair: bool,
) -> Result<Segment, LogError> {
    let (path, file, len) = segment::open_file(dir, base).await?;
    // Index files of the active segment are stale by definition (it was re-opened for writing
    // after a truncation, or a crash came between sealing it and creating the next one).
    segment::remove_index_files(&path).await?;
    let scan = segment::scan(&file, &path, base, len, config.index_interval_bytes).await?;
    if scan.valid_size < len {
        let reason = scan.stopped.as_ref().map_or("", |(_, r)| r.as_str());
        if repair {
            if let Some(raft_index) = whole_batches_after(&file, &path, &scan, len).await? {
                write_repair_marker(
                    dir,
                    Some(raft_index.max(scan.last_raft_index.unwrap_or(0))),
                    &format!(
                        "{}: {reason} at byte {}, with whole batches after it",
                        path.display(),
                        scan.valid_size
                    ),
                )
                .await?;
            }
        }
        // Enough of the cut to tell zero padding (at most one block) from real damage.
        let look = (len - scan.valid_size).min(64 << 10) as usize;
        let dropped = read_exact(&file, &path, scan.valid_size, look).await?;
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
