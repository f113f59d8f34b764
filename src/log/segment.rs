//! One segment: an append-only file of batches named by its base offset, with its sparse index.
//!
//! ```text
//! data/<topic>/<partition>/
//!   00000000000000000000.log        batches, back to back
//!   00000000000000000000.index      sparse offset index (sealed segments only)
//!   00000000000000000000.timeindex  sparse time index (sealed segments only)
//!   00000000000000000000.stamps     every batch's offset, term, Raft index (sealed only)
//!   00000000000000004711.log        the active segment: index kept in memory
//! ```

use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::io::DmaFile;

use super::batch::{self, BatchError};
use super::error::LogError;
use super::index::{SegmentSummary, SparseIndex};
use super::io::{open_rw, read_small_file, remove_if_exists, write_small_file, SeqReader, Step};
use super::stamps::{Stamp, Stamps};
use crate::types::{Offset, TimestampMs};

/// The three file names of the segment starting at `base`.
pub fn file_name(base: Offset, ext: &str) -> String {
    format!("{:020}.{ext}", base.0)
}

/// Parses a segment file name (`<20 digits>.log`) into its base offset.
pub fn parse_log_name(name: &str) -> Option<Offset> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok().map(Offset)
}

pub struct Segment {
    pub base: Offset,
    pub file: Rc<DmaFile>,
    pub path: Rc<Path>,
    /// Bytes on disk that readers may read.
    pub written_size: u64,
    /// Bytes appended, including those still staged in memory: where the next batch goes.
    pub size: u64,
    /// The offset after the last appended record.
    pub next_offset: Offset,
    pub first_timestamp: Option<TimestampMs>,
    pub max_timestamp: TimestampMs,
    pub index: SparseIndex,
    /// Its batches' stamps while it is active (written as `.stamps` when it is sealed; empty
    /// after that).
    pub stamps: Stamps,
    /// Its index files exist on disk (it was sealed).
    pub sealed: bool,
}

impl Segment {
    pub fn index_path(&self, ext: &str) -> PathBuf {
        self.path.with_extension(ext)
    }

    /// The encoded `.stamps`, `.index` and `.timeindex` files of this segment, with their
    /// paths (the stamps first: whole index files are what make a segment sealed on open).
    pub fn index_files(&self) -> [(PathBuf, Vec<u8>); 3] {
        [
            (self.index_path("stamps"), self.stamps.encode()),
            (
                self.index_path("index"),
                self.index.encode_offset_file(&self.summary()),
            ),
            (self.index_path("timeindex"), self.index.encode_time_file()),
        ]
    }

    pub fn summary(&self) -> SegmentSummary {
        SegmentSummary {
            size: self.size,
            next_offset: self.next_offset,
            max_timestamp: self.max_timestamp,
        }
    }

    /// Records an appended batch at the current end.
    pub fn on_append(
        &mut self,
        stamp: Stamp,
        count: u32,
        len: usize,
        first: TimestampMs,
        max: TimestampMs,
    ) {
        let base = stamp.base;
        self.stamps.push(stamp);
        let rel = (base.0 - self.base.0) as u32;
        self.index
            .on_batch(rel, self.size as u32, self.max_timestamp);
        self.size += len as u64;
        self.next_offset = base.plus(count as u64);
        self.first_timestamp.get_or_insert(first);
        self.max_timestamp = self.max_timestamp.max(max);
    }

    pub fn is_empty(&self) -> bool {
        self.next_offset == self.base
    }
}

/// Writes a sealed segment's index files durably (from [`Segment::index_files`]).
pub async fn write_index_files(files: [(PathBuf, Vec<u8>); 3]) -> Result<(), LogError> {
    for (path, bytes) in files {
        write_small_file(&path, &bytes).await?;
    }
    Ok(())
}

/// Removes a segment's index files (it became active again, or it is being deleted).
pub async fn remove_index_files(log_path: &Path) -> Result<(), LogError> {
    remove_if_exists(&log_path.with_extension("index")).await?;
    remove_if_exists(&log_path.with_extension("timeindex")).await?;
    remove_if_exists(&log_path.with_extension("stamps")).await
}

/// The batch stamps of the sealed segment at `log_path` (from `base` to before `next`), from
/// its `.stamps` file: `None` when the file is missing or damaged (the segment's batches say
/// the same, read whole).
pub async fn read_stamps(
    log_path: &Path,
    base: Offset,
    next: Offset,
) -> Result<Option<Vec<Stamp>>, LogError> {
    let file = read_small_file(&log_path.with_extension("stamps")).await?;
    Ok(file.and_then(|f| super::stamps::decode(&f, base, next)))
}

/// Opens the file of the segment starting at `base` in `dir`, and its length.
pub async fn open_file(dir: &Path, base: Offset) -> Result<(Rc<Path>, Rc<DmaFile>, u64), LogError> {
    let path: Rc<Path> = dir.join(file_name(base, "log")).into();
    let file = Rc::new(open_rw(&path).await?);
    let len = file
        .file_size()
        .await
        .map_err(|e| LogError::io("sizing", &path, e))?;
    Ok((path, file, len))
}

/// What scanning a segment file found.
pub struct Scan {
    /// Bytes of valid, contiguous batches from the start of the file.
    pub valid_size: u64,
    pub next_offset: Offset,
    pub first_timestamp: Option<TimestampMs>,
    pub max_timestamp: TimestampMs,
    pub index: SparseIndex,
    pub stamps: Stamps,
    /// The Raft index stamped in the last valid batch (0 outside Raft).
    pub last_raft_index: Option<u64>,
    /// Why the scan stopped before `end`, and where.
    pub stopped: Option<(u64, String)>,
}

/// Scans batches from the start of the file up to byte `end`, verifying every CRC and that
/// offsets continue from `base` without gaps, and rebuilds the sparse index on the way.
pub async fn scan(
    file: &Rc<DmaFile>,
    path: &Rc<Path>,
    base: Offset,
    end: u64,
    index_interval_bytes: u32,
) -> Result<Scan, LogError> {
    let mut r = SeqReader::new(file.clone(), path.clone(), 0, end, 1 << 20);
    let mut out = Scan {
        valid_size: 0,
        next_offset: base,
        first_timestamp: None,
        max_timestamp: TimestampMs(i64::MIN),
        index: SparseIndex::new(index_interval_bytes),
        stamps: Stamps::new(base),
        last_raft_index: None,
        stopped: None,
    };
    loop {
        match r.next().await? {
            Step::End => break,
            Step::Invalid {
                position,
                error: BatchError::UnsupportedVersion(v),
            } => {
                // Its checksum is right: a whole batch another build wrote, not a torn write.
                // Recovery must not cut it (and everything after it) as damage.
                return Err(LogError::Corrupt {
                    path: path.display().to_string(),
                    position,
                    reason: format!(
                        "batch format version {v}, which this build (version {}) cannot read; \
                         refusing to open rather than discard it",
                        batch::VERSION
                    ),
                });
            }
            Step::Invalid { position, error } => {
                out.stopped = Some((position, error.to_string()));
                break;
            }
            Step::Batch { position, batch } => {
                let m = batch.meta();
                if m.base_offset != out.next_offset {
                    out.stopped = Some((
                        position,
                        format!(
                            "batch base offset {} where {} was expected",
                            m.base_offset, out.next_offset
                        ),
                    ));
                    break;
                }
                let rel = (m.base_offset.0 - base.0) as u32;
                out.index.on_batch(rel, position as u32, out.max_timestamp);
                out.stamps.push(Stamp {
                    base: m.base_offset,
                    term: m.term.0,
                    raft_index: m.raft_index,
                });
                out.first_timestamp.get_or_insert(m.first_timestamp);
                out.max_timestamp = out.max_timestamp.max(m.max_timestamp);
                out.next_offset = m.next_offset();
                out.valid_size = position + m.len as u64;
                out.last_raft_index = Some(m.raft_index);
            }
        }
    }
    Ok(out)
}

/// Builds a segment from a scan.
pub fn from_scan(
    base: Offset,
    file: Rc<DmaFile>,
    path: Rc<Path>,
    s: Scan,
    sealed: bool,
) -> Segment {
    Segment {
        base,
        file,
        path,
        written_size: s.valid_size,
        size: s.valid_size,
        next_offset: s.next_offset,
        first_timestamp: s.first_timestamp,
        max_timestamp: s.max_timestamp,
        index: s.index,
        stamps: s.stamps,
        sealed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(file_name(Offset(42), "log"), "00000000000000000042.log");
        assert_eq!(parse_log_name("00000000000000000042.log"), Some(Offset(42)));
        assert_eq!(parse_log_name("0000000000000000042.log"), None);
        assert_eq!(parse_log_name("00000000000000000042.index"), None);
        assert_eq!(parse_log_name("0000000000000000004x.log"), None);
        assert_eq!(parse_log_name("99999999999999999999.log"), None); // over u64
    }
}
