//! A node's checkpoint of the metadata state: the state every command below an offset built,
//! kept in one file beside the metadata log. The follower starts from it instead of replaying
//! the log from the beginning, and the log is purged behind it, so restart time and disk use
//! follow the state's size, not the cluster's history.
//!
//! ```text
//! DATA_DIR/metadata-state.json   {"version":1,"next":N,"state":{...}}   (replaced whole, synced)
//! DATA_DIR/metadata/             the metadata log: segments below N's go after each checkpoint
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterState;
use crate::types::Offset;

/// The checkpoint's file name under the data directory.
pub const FILE: &str = "metadata-state.json";
const VERSION: u32 = 1;
/// Largest checkpoint read back (the state's own bounds keep it far below).
pub const BYTES_MAX: u64 = 256 << 20;

/// The metadata state built by every command below `next`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: u32,
    pub next: Offset,
    pub state: ClusterState,
}

impl Checkpoint {
    pub fn new(next: Offset, state: ClusterState) -> Checkpoint {
        Checkpoint {
            version: VERSION,
            next,
            state,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the metadata state serializes")
    }

    /// Reads a checkpoint from bytes a disk or a peer gave: a clear error for anything else.
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() as u64 > BYTES_MAX {
            return Err(format!(
                "{} bytes; a checkpoint has at most {BYTES_MAX}",
                bytes.len()
            ));
        }
        let c: Checkpoint = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if c.version != VERSION {
            return Err(format!(
                "version {} (this node reads version {VERSION})",
                c.version
            ));
        }
        Ok(c)
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE)
}

/// The node's checkpoint, if it has one. A damaged one is an error: the metadata log behind
/// it may be purged, so starting without it would build a wrong state.
pub fn load(data_dir: &Path) -> Result<Option<Checkpoint>, String> {
    let p = path(data_dir);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", p.display())),
    };
    Checkpoint::decode(&bytes)
        .map(Some)
        .map_err(|e| format!("{} is not a metadata checkpoint: {e}", p.display()))
}

/// Replaces the checkpoint durably (written aside, synced, renamed, directory synced).
pub async fn save(data_dir: &Path, c: &Checkpoint) -> std::io::Result<()> {
    let p = path(data_dir);
    let bytes = c.encode();
    tokio::task::spawn_blocking(move || crate::broker::write_durably(&p, &bytes))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::testkit;

    #[test]
    fn a_state_survives_its_checkpoint_and_damage_is_refused() {
        let state = testkit::busy_state();
        let c = Checkpoint::new(Offset(1234), state.clone());
        let back = Checkpoint::decode(&c.encode()).unwrap();
        assert_eq!(back.state, state);
        assert_eq!(back.next, Offset(1234));
        let mut bytes = c.encode();
        bytes.truncate(bytes.len() / 2);
        assert!(Checkpoint::decode(&bytes).is_err());
        let other =
            String::from_utf8(c.encode())
                .unwrap()
                .replacen("\"version\":1", "\"version\":9", 1);
        assert!(Checkpoint::decode(other.as_bytes())
            .unwrap_err()
            .contains("version 9"));
    }

    #[test]
    fn load_reads_what_save_wrote_and_tells_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let c = Checkpoint::new(Offset(7), testkit::busy_state());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(save(dir.path(), &c)).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(c));
        std::fs::write(path(dir.path()), b"{\"version\":1,").unwrap();
        assert!(load(dir.path())
            .unwrap_err()
            .contains("not a metadata checkpoint"));
    }
}
