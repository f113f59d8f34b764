//! Errors of the storage engine.

use super::batch::BatchError;
use crate::types::Offset;

/// What can go wrong in a partition log. Cloneable so that one failed write can fail every
/// append that was waiting on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("I/O error while {op} {path}: {message}")]
    Io {
        op: &'static str,
        path: String,
        message: String,
    },
    #[error("log is poisoned by an earlier failure and refuses writes: {0}")]
    Poisoned(String),
    #[error("log is closed")]
    Closed,
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error("batch of {len} bytes is over the limit of {max}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("offset {requested} is out of range [{start}, {end}]")]
    OffsetOutOfRange {
        requested: Offset,
        start: Offset,
        end: Offset,
    },
    #[error("batch base offset {got} does not follow the log end {expected}")]
    NonContiguous { expected: Offset, got: Offset },
    #[error("the log was truncated to end at {end} while this waited for records past it")]
    Truncated { end: Offset },
    #[error("cannot truncate at {0}: not a batch boundary")]
    NotABatchBoundary(Offset),
    #[error("cannot truncate at {at}: offsets below {committed} are committed")]
    BelowCommitted { at: Offset, committed: Offset },
    #[error("position {what} = {value} must be within [{low}, {high}]")]
    InvalidPosition {
        what: &'static str,
        value: Offset,
        low: Offset,
        high: Offset,
    },
    #[error("corrupt data in {path} at byte {position}: {reason}")]
    Corrupt {
        path: String,
        position: u64,
        reason: String,
    },
    #[error("invalid log configuration: {0}")]
    Config(String),
}

impl LogError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        LogError::Io {
            op,
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
