//! Settings of one partition log.

use std::time::Duration;

use super::error::LogError;

/// When an append completes relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// An append completes only after the fdatasync that covers it (group commit).
    Always,
    /// An append completes once written; an fdatasync runs every `interval`.
    Interval(Duration),
}

/// Settings of one partition log. Every field is a limit or a policy; the unit is last in the
/// name.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// Roll the active segment once it holds this many bytes.
    pub segment_bytes_max: u64,
    /// Roll once the incoming batch is this much newer than the segment's first record.
    pub segment_ms_max: u64,
    /// Bytes of log between two sparse index entries.
    pub index_interval_bytes: u32,
    pub fsync: FsyncPolicy,
    /// Delete closed segments whose newest record is older than this.
    pub retention_ms: Option<u64>,
    /// Delete the oldest closed segments while the log stays at least this large without them.
    pub retention_bytes: Option<u64>,
    /// How often the background task applies retention.
    pub retention_check_interval_ms: u64,
    /// Whether the log applies retention itself (a background task); `false` when its owner
    /// does (a Raft group, which must not delete records a replica still needs).
    pub retention_loop: bool,
    /// The largest batch one append accepts.
    pub batch_bytes_max: usize,
    /// Appended bytes waiting for their write; beyond this, appends wait (back-pressure).
    pub pending_bytes_max: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes_max: 128 << 20,
            segment_ms_max: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            fsync: FsyncPolicy::Always,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            retention_check_interval_ms: 60_000,
            retention_loop: true,
            batch_bytes_max: 16 << 20,
            pending_bytes_max: 32 << 20,
        }
    }
}

impl LogConfig {
    /// Checks the settings against each other; a log refuses to open with bad ones.
    pub fn validate(&self) -> Result<(), LogError> {
        if self.segment_bytes_max < 4096 || self.segment_bytes_max > u32::MAX as u64 {
            return Err(LogError::Config(format!(
                "segment_bytes_max {} must be within [4096, {}]",
                self.segment_bytes_max,
                u32::MAX
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(LogError::Config(
                "index_interval_bytes must be positive".into(),
            ));
        }
        if self.batch_bytes_max > super::batch::BATCH_LEN_MAX {
            return Err(LogError::Config(format!(
                "batch_bytes_max {} is over the format's limit {}",
                self.batch_bytes_max,
                super::batch::BATCH_LEN_MAX
            )));
        }
        if self.pending_bytes_max < self.batch_bytes_max {
            return Err(LogError::Config(
                "pending_bytes_max must be at least batch_bytes_max".into(),
            ));
        }
        if let FsyncPolicy::Interval(d) = self.fsync {
            if d.is_zero() {
                return Err(LogError::Config("fsync interval must be positive".into()));
            }
        }
        if self.retention_check_interval_ms == 0 {
            return Err(LogError::Config(
                "retention_check_interval_ms must be positive".into(),
            ));
        }
        Ok(())
    }
}
