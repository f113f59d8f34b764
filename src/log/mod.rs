//! The storage engine: one durable log per partition, on glommio's DMA files (O_DIRECT through
//! io_uring). See `docs/storage.md` for the format and the guarantees.
//!
//! ```text
//! Log ── segments ── Segment (.log + .index + .timeindex + .stamps)
//!  │                    └─ batches (batch.rs), sparse index (index.rs), stamps (stamps.rs)
//!  ├─ group commit, positions, truncation, retention (partition_log.rs, retention.rs)
//!  └─ StateFile: small atomically replaced state, e.g. Raft's vote (state_file.rs)
//! ```

pub mod batch;
pub mod config;
pub mod error;
pub mod index;
mod io;
mod partition_log;
pub mod retention;
mod segment;
pub mod stamps;
pub mod state_file;
mod varint;

pub use batch::{
    Batch, BatchBuilder, BatchError, BatchMeta, Header, Record, RecordView, HEADERS_PER_RECORD_MAX,
};
pub use config::{FsyncPolicy, LogConfig};
pub use error::LogError;
pub use partition_log::{
    Appended, Assign, Log, LogStats, Positions, ReadBatches, ReadBound, Repair, Secured,
    RESET_MARKER,
};
pub use state_file::StateFile;
