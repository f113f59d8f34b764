//! Small durable state of a partition (Raft's vote and the like): replaced atomically.
//!
//! Write: the new contents go to `<name>.tmp`, which is fdatasync'd, renamed over `<name>`, and
//! the directory is fsync'd, so after a crash the file holds either the old or the new contents,
//! never a mix. Each file carries a CRC, so damage is reported, not read as a default.

use std::path::{Path, PathBuf};

use glommio::io::Directory;

use super::error::LogError;
use super::io::{read_small_file, remove_if_exists, write_small_file};

const MAGIC: [u8; 4] = *b"TSTA";
const HEADER_LEN: usize = 12;
/// Small state only; larger payloads belong in the log.
pub const STATE_BYTES_MAX: usize = 1 << 20;

/// One small durable file in a directory.
pub struct StateFile {
    dir: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            path: dir.join(name),
            tmp: dir.join(format!("{name}.tmp")),
        }
    }

    /// The last contents written, or `None` if it was never written.
    pub async fn read(&self) -> Result<Option<Vec<u8>>, LogError> {
        let Some(buf) = read_small_file(&self.path).await? else {
            return Ok(None);
        };
        let corrupt = |reason: &str| LogError::Corrupt {
            path: self.path.display().to_string(),
            position: 0,
            reason: reason.to_string(),
        };
        if buf.len() < HEADER_LEN || buf[0..4] != MAGIC {
            return Err(corrupt("bad header"));
        }
        let len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(buf[8..12].try_into().unwrap());
        let payload = buf
            .get(HEADER_LEN..HEADER_LEN + len)
            .ok_or_else(|| corrupt("shorter than its length"))?;
        if crc32c::crc32c(payload) != crc {
            return Err(corrupt("CRC mismatch"));
        }
        Ok(Some(payload.to_vec()))
    }

    /// Replaces the contents durably; when this returns, a crash cannot bring back the old ones.
    pub async fn write(&self, payload: &[u8]) -> Result<(), LogError> {
        if payload.len() > STATE_BYTES_MAX {
            return Err(LogError::Config(format!(
                "state of {} bytes is over {STATE_BYTES_MAX}",
                payload.len()
            )));
        }
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        write_small_file(&self.tmp, &buf).await?;
        glommio::io::rename(&self.tmp, &self.path)
            .await
            .map_err(|e| LogError::io("renaming", &self.tmp, e))?;
        sync_dir(&self.dir).await
    }

    /// Removes a temporary file left by a crash mid-write.
    pub async fn clean(&self) -> Result<(), LogError> {
        remove_if_exists(&self.tmp).await
    }
}

/// fsyncs a directory, making creations, renames and removals in it durable.
pub async fn sync_dir(dir: &Path) -> Result<(), LogError> {
    let d = Directory::open(dir)
        .await
        .map_err(|e| LogError::io("opening directory", dir, e))?;
    d.sync()
        .await
        .map_err(|e| LogError::io("syncing directory", dir, e))?;
    let _ = d.close().await;
    Ok(())
}
