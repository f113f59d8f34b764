//! Small durable state of a partition (Raft's vote and the like): replaced atomically, and kept
//! twice.
//!
//! Write: the new contents go to `<name>.tmp`, which is fdatasync'd and renamed over `<name>`;
//! then the same for the copy `<name>.copy`; then the directory is fsync'd. After a crash each
//! file holds either the old or the new contents, never a mix. Each file carries a CRC, so
//! damage is caught, not read as a default. A damaged or missing file is read from the other
//! and rewritten from it (a replica whose vote were lost could vote twice in one term); only
//! when both are damaged is the state reported corrupt.

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
    copy: PathBuf,
    tmp: PathBuf,
    /// The largest payload written.
    limit: usize,
}

/// What reading one of the two files found.
enum Found {
    Missing,
    Damaged(&'static str),
    Good(Vec<u8>),
}

impl StateFile {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self::with_limit(dir, name, STATE_BYTES_MAX)
    }

    /// A state file whose payload may be up to `limit` bytes.
    pub fn with_limit(dir: &Path, name: &str, limit: usize) -> Self {
        Self {
            dir: dir.to_path_buf(),
            path: dir.join(name),
            copy: dir.join(format!("{name}.copy")),
            tmp: dir.join(format!("{name}.tmp")),
            limit,
        }
    }

    async fn find(path: &Path) -> Result<Found, LogError> {
        Ok(match read_small_file(path).await? {
            None => Found::Missing,
            Some(buf) => match decode(&buf) {
                Ok(payload) => Found::Good(payload.to_vec()),
                Err(reason) => Found::Damaged(reason),
            },
        })
    }

    /// The last contents written, or `None` if it was never written. Where the two files
    /// disagree, the main file wins if it is whole (a crash between the two renames leaves the
    /// newer contents there); the other one is rewritten to match before this returns.
    pub async fn read(&self) -> Result<Option<Vec<u8>>, LogError> {
        let main = Self::find(&self.path).await?;
        let copy = Self::find(&self.copy).await?;
        let (payload, repair) = match (main, copy) {
            (Found::Missing, Found::Missing) => return Ok(None),
            (Found::Good(m), Found::Good(c)) => {
                let differ = m != c;
                (m, differ)
            }
            (Found::Good(m), Found::Missing) => {
                // Written by a build without the copy, or a crash before the copy's rename.
                (m, true)
            }
            (Found::Good(m), Found::Damaged(reason)) => {
                tracing::warn!(file = %self.copy.display(), reason, "state file copy damaged; rewriting it from the main file");
                (m, true)
            }
            (main, Found::Good(c)) => {
                let what = match main {
                    Found::Damaged(reason) => reason,
                    _ => "missing",
                };
                tracing::warn!(file = %self.path.display(), reason = what, "state file damaged; restoring it from its copy");
                (c, true)
            }
            (Found::Damaged(reason), _) | (Found::Missing, Found::Damaged(reason)) => {
                return Err(LogError::Corrupt {
                    path: self.path.display().to_string(),
                    position: 0,
                    reason: format!("{reason}, and its copy is damaged or missing too"),
                })
            }
        };
        if repair {
            self.write(&payload).await?;
        }
        Ok(Some(payload))
    }

    /// Replaces the contents durably; when this returns, a crash cannot bring back the old ones.
    pub async fn write(&self, payload: &[u8]) -> Result<(), LogError> {
        if payload.len() > self.limit {
            return Err(LogError::Config(format!(
                "state of {} bytes is over {}",
                payload.len(),
                self.limit
            )));
        }
        let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        buf.extend_from_slice(payload);
        for target in [&self.path, &self.copy] {
            write_small_file(&self.tmp, &buf).await?;
            glommio::io::rename(&self.tmp, target)
                .await
                .map_err(|e| LogError::io("renaming", &self.tmp, e))?;
        }
        sync_dir(&self.dir).await
    }

    /// Removes the state (both files and any temporary one) durably.
    pub async fn remove(&self) -> Result<(), LogError> {
        remove_if_exists(&self.tmp).await?;
        remove_if_exists(&self.path).await?;
        remove_if_exists(&self.copy).await?;
        sync_dir(&self.dir).await
    }

    /// Removes a temporary file left by a crash mid-write.
    pub async fn clean(&self) -> Result<(), LogError> {
        remove_if_exists(&self.tmp).await
    }
}

/// fsyncs a directory, making creations, renames and removals in it durable.
/// The payload of a state file's bytes, or why they are not one (header, length, CRC).
pub fn decode(buf: &[u8]) -> Result<&[u8], &'static str> {
    if buf.len() < HEADER_LEN || buf[0..4] != MAGIC {
        return Err("bad header");
    }
    let len = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let payload = buf
        .get(HEADER_LEN..HEADER_LEN.saturating_add(len))
        .ok_or("shorter than its length")?;
    if crc32c::crc32c(payload) != crc {
        return Err("CRC mismatch");
    }
    Ok(payload)
}

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
