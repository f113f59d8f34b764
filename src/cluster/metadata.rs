//! The single-node metadata store: every topic, in `data/meta/topics.json`.
//!
//! Written atomically (temporary file, fsync, rename, fsync of the directory), so a crash leaves
//! either the old or the new contents. Called from the network shard through `spawn_blocking`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::topic::TopicSpec;

const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    topics: Vec<TopicSpec>,
}

/// The topics of this node, loaded from and saved to the data directory.
pub struct MetadataStore {
    dir: PathBuf,
    topics: BTreeMap<String, TopicSpec>,
}

impl MetadataStore {
    /// Loads the metadata of `data_dir`, or starts empty when there is none.
    pub fn load(data_dir: &Path) -> anyhow::Result<MetadataStore> {
        let dir = data_dir.join("meta");
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        let path = dir.join("topics.json");
        let topics = match std::fs::read(&path) {
            Ok(bytes) => {
                let d: OnDisk = serde_json::from_slice(&bytes)
                    .map_err(|e| anyhow::anyhow!("metadata {} is damaged: {e}", path.display()))?;
                anyhow::ensure!(
                    d.version == FORMAT_VERSION,
                    "metadata {} has version {}; this build reads {FORMAT_VERSION}",
                    path.display(),
                    d.version
                );
                d.topics.into_iter().map(|t| (t.name.clone(), t)).collect()
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
        };
        Ok(MetadataStore { dir, topics })
    }

    pub fn topics(&self) -> impl Iterator<Item = &TopicSpec> {
        self.topics.values()
    }

    pub fn get(&self, name: &str) -> Option<&TopicSpec> {
        self.topics.get(name)
    }

    /// Adds a topic and saves; on error nothing changes.
    pub fn insert(&mut self, spec: TopicSpec) -> anyhow::Result<()> {
        let old = self.topics.insert(spec.name.clone(), spec.clone());
        if let Err(e) = self.save() {
            match old {
                Some(o) => self.topics.insert(o.name.clone(), o),
                None => self.topics.remove(&spec.name),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes a topic and saves; on error nothing changes.
    pub fn remove(&mut self, name: &str) -> anyhow::Result<Option<TopicSpec>> {
        let Some(old) = self.topics.remove(name) else {
            return Ok(None);
        };
        if let Err(e) = self.save() {
            self.topics.insert(old.name.clone(), old);
            return Err(e);
        }
        Ok(Some(old))
    }

    fn save(&self) -> anyhow::Result<()> {
        let d = OnDisk {
            version: FORMAT_VERSION,
            topics: self.topics.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec_pretty(&d)?;
        let tmp = self.dir.join("topics.json.tmp");
        let path = self.dir.join("topics.json");
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::TopicSettings;

    fn spec(name: &str) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions: 2,
            replication_factor: 1,
            settings: TopicSettings {
                retention_ms: None,
                retention_bytes: Some(10),
                fsync_interval_ms: None,
                max_record_bytes: 100,
                segment_bytes: 1 << 20,
            },
            cores: vec![0, 1],
            created_ms: 5,
        }
    }

    #[test]
    fn persists_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetadataStore::load(dir.path()).unwrap();
        m.insert(spec("a")).unwrap();
        m.insert(spec("b")).unwrap();
        m.remove("a").unwrap();
        let m = MetadataStore::load(dir.path()).unwrap();
        let names: Vec<_> = m.topics().map(|t| t.name.clone()).collect();
        assert_eq!(names, vec!["b"]);
        assert_eq!(m.get("b"), Some(&spec("b")));
    }

    #[test]
    fn damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("meta")).unwrap();
        std::fs::write(dir.path().join("meta/topics.json"), b"{not json").unwrap();
        assert!(MetadataStore::load(dir.path()).is_err());
    }
}
