//! The node's request logic on the network shard: topics, routing to the owning core, and
//! combining the cores' answers. gRPC types stay in `service.rs`; this speaks Tern's own types.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::Status;

use super::status::from_core;
use crate::cluster::{MetadataStore, TopicSettings, TopicSpec};
use crate::config::{log_config, Config};
use crate::log::{Positions, Record};
use crate::shard::placement::{core_for, partition_for_key};
use crate::shard::{CoreRequest, Fetched, PartitionKey, ReplicaSettings, Shards};
use crate::types::{Offset, TimestampMs};

/// A topic as the network shard sees it.
pub struct Topic {
    pub spec: TopicSpec,
    pub name: Arc<str>,
    /// Round-robin position for records without key or partition.
    next: AtomicU32,
}

impl Topic {
    pub fn key(&self, partition: u32) -> PartitionKey {
        PartitionKey {
            topic: self.name.clone(),
            partition,
        }
    }

    /// NOT_FOUND unless `partition` exists.
    pub fn check_partition(&self, partition: u32) -> Result<(), Status> {
        if partition < self.spec.partitions {
            return Ok(());
        }
        Err(Status::not_found(format!(
            "partition {partition} does not exist; topic {:?} has partitions 0 to {}",
            self.spec.name,
            self.spec.partitions - 1
        )))
    }

    pub fn core(&self, partition: u32) -> u32 {
        self.spec.cores[partition as usize]
    }
}

/// A record to publish, with its routing decided by the caller or not.
pub struct Outgoing {
    pub partition: Option<u32>,
    pub record: Record,
}

pub struct Broker {
    pub config: Config,
    pub shards: Shards,
    /// The address clients should use for this node.
    pub advertised: String,
    /// This node's identity in the partitions' Raft groups.
    replica: ReplicaSettings,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Serializes topic creation and deletion, and owns the metadata file.
    admin: tokio::sync::Mutex<MetadataStore>,
    /// Set when the node starts shutting down; long-lived calls (subscriptions) end on it.
    closing: tokio::sync::watch::Sender<bool>,
    /// Calls being served (not counting subscriptions), so shutdown can wait for them.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts one call as in flight until dropped.
pub struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Broker {
    /// Loads the metadata and opens every partition on its core.
    pub async fn start(
        config: Config,
        shards: Shards,
        advertised: String,
    ) -> anyhow::Result<Broker> {
        let data = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || MetadataStore::load(&data)).await??;
        let replica = ReplicaSettings {
            node_id: config.node_id,
            member: crate::raft::types::Member {
                addr: advertised.clone(),
                region: config.region.clone(),
                zone: config.zone.clone(),
            },
            timing: config.raft_timing(),
        };
        let broker = Broker {
            config,
            shards,
            advertised,
            replica,
            topics: RwLock::new(HashMap::new()),
            admin: tokio::sync::Mutex::new(store),
            closing: tokio::sync::watch::channel(false).0,
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        };
        let specs: Vec<TopicSpec> = broker.admin.lock().await.topics().cloned().collect();
        for mut spec in specs {
            // A restart with fewer cores moves the partitions of cores that no longer exist.
            let n = broker.shards.core_count();
            for (p, c) in spec.cores.iter_mut().enumerate() {
                if *c as usize >= n {
                    *c = core_for(&spec.name, p as u32, n).0;
                }
            }
            let topic = Arc::new(Topic {
                name: spec.name.clone().into(),
                spec,
                next: AtomicU32::new(0),
            });
            broker
                .open_partitions(&topic)
                .await
                .map_err(|s| anyhow::anyhow!("opening topic {}: {}", topic.name, s.message()))?;
            tracing::info!(topic = %topic.name, partitions = topic.spec.partitions, "topic loaded");
            broker.insert_topic(topic);
        }
        Ok(broker)
    }

    /// Marks a call in flight for as long as the guard lives.
    pub fn track(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    /// Waits until no call is in flight, or `grace` has passed; returns whether all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + grace;
        while self.in_flight.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Tells long-lived calls to end: the node is shutting down.
    pub fn begin_shutdown(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once the node starts shutting down.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    fn partition_dir(&self, topic: &str, partition: u32) -> PathBuf {
        self.config
            .data_dir
            .join("topics")
            .join(topic)
            .join(partition.to_string())
    }

    async fn open_partitions(&self, topic: &Topic) -> Result<(), Status> {
        let config = log_config(&topic.spec.settings);
        let opens = (0..topic.spec.partitions).map(|p| {
            let dir = self.partition_dir(&topic.name, p);
            let key = topic.key(p);
            let config = config.clone();
            let replica = self.replica.clone();
            self.shards
                .ask(topic.core(p), move |reply| CoreRequest::Open {
                    key,
                    dir,
                    config,
                    replica,
                    reply,
                })
        });
        for r in futures::future::join_all(opens).await {
            r.map_err(from_core)?;
        }
        Ok(())
    }

    fn insert_topic(&self, topic: Arc<Topic>) {
        self.topics
            .write()
            .expect("topic map lock")
            .insert(topic.spec.name.clone(), topic);
    }

    /// The topic named `name`: INVALID_ARGUMENT for a malformed name, NOT_FOUND for none.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, Status> {
        super::validate::topic_name(name)?;
        self.topics
            .read()
            .expect("topic map lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("topic {name:?} does not exist")))
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        let mut v: Vec<_> = self
            .topics
            .read()
            .expect("topic map lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Creates a topic: the metadata is saved first (it is the source of truth on restart),
    /// then every partition's log is created on its core.
    pub async fn create_topic(
        &self,
        name: String,
        partitions: u32,
        replication_factor: u32,
        settings: TopicSettings,
    ) -> Result<Arc<Topic>, Status> {
        let mut store = self.admin.lock().await;
        if store.get(&name).is_some() {
            return Err(Status::already_exists(format!(
                "topic {name:?} already exists"
            )));
        }
        if store.topics().count() >= self.config.max_topics {
            return Err(Status::resource_exhausted(format!(
                "this node holds its limit of {} topics",
                self.config.max_topics
            )));
        }
        let n = self.shards.core_count();
        let spec = TopicSpec {
            cores: (0..partitions).map(|p| core_for(&name, p, n).0).collect(),
            name,
            partitions,
            replication_factor,
            settings,
            created_ms: TimestampMs::now().0,
        };
        tokio::task::block_in_place(|| store.insert(spec.clone()))
            .map_err(|e| Status::internal(format!("saving metadata: {e}")))?;
        drop(store);
        let topic = Arc::new(Topic {
            name: spec.name.clone().into(),
            spec,
            next: AtomicU32::new(0),
        });
        self.open_partitions(&topic).await?;
        self.insert_topic(topic.clone());
        tracing::info!(topic = %topic.name, partitions, "topic created");
        Ok(topic)
    }

    /// Deletes a topic: it disappears from the metadata first, then its logs are closed and its
    /// files removed.
    pub async fn delete_topic(&self, name: &str) -> Result<(), Status> {
        let mut store = self.admin.lock().await;
        let topic = self.topic(name)?;
        tokio::task::block_in_place(|| store.remove(name))
            .map_err(|e| Status::internal(format!("saving metadata: {e}")))?;
        self.topics.write().expect("topic map lock").remove(name);
        for p in 0..topic.spec.partitions {
            let key = topic.key(p);
            self.shards
                .ask(topic.core(p), |reply| CoreRequest::Close { key, reply })
                .await
                .map_err(from_core)?;
        }
        let dir = self.config.data_dir.join("topics").join(name);
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("removing the topic's files: {e}")))?;
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    /// Publishes records and waits for their offsets. See [`Broker::submit`].
    pub async fn publish(
        &self,
        topic: &Topic,
        records: Vec<Outgoing>,
    ) -> Result<Vec<(u32, Offset)>, Status> {
        self.submit(topic, records).await?.await
    }

    /// Routes records to their cores and returns the pending answer: (partition, offset) per
    /// record, in request order. Each record goes to its explicit partition, else the hash of
    /// its key, else round robin; records for one partition keep their order and become one
    /// batch. Requests submitted one after another are appended in that order per partition
    /// (what PublishStream relies on).
    pub async fn submit(
        &self,
        topic: &Topic,
        records: Vec<Outgoing>,
    ) -> Result<impl std::future::Future<Output = Result<Vec<(u32, Offset)>, Status>> + use<>, Status>
    {
        let n = topic.spec.partitions;
        let mut groups: Vec<(u32, Vec<usize>, Vec<Record>)> = Vec::new();
        let mut routes = Vec::with_capacity(records.len());
        let rr = topic.next.fetch_add(1, Ordering::Relaxed) % n;
        for (i, out) in records.into_iter().enumerate() {
            let p = match (out.partition, &out.record.key) {
                (Some(p), _) => p,
                (None, Some(k)) => partition_for_key(k, n),
                // Keyless records of one request stay together (one batch); successive
                // requests rotate over the partitions.
                (None, None) => rr,
            };
            let g = match groups.iter().position(|g| g.0 == p) {
                Some(g) => g,
                None => {
                    groups.push((p, Vec::new(), Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].1.push(i);
            groups[g].2.push(out.record);
            routes.push(p);
        }
        let mut pending = Vec::with_capacity(groups.len());
        for (p, idx, recs) in groups {
            let key = topic.key(p);
            let answer = self
                .shards
                .submit(topic.core(p), |reply| CoreRequest::Append {
                    key,
                    records: recs,
                    reply,
                })
                .await
                .map_err(from_core)?;
            pending.push(async move { (idx, answer.await) });
        }
        Ok(async move {
            let mut out = vec![(0u32, Offset(0)); routes.len()];
            for (idx, ack) in futures::future::join_all(pending).await {
                let ack = ack.map_err(from_core)?;
                for (i, off) in idx.into_iter().zip(ack.offsets) {
                    out[i] = (routes[i], off);
                }
            }
            Ok(out)
        })
    }

    pub async fn fetch(
        &self,
        topic: &Topic,
        partition: u32,
        from: Offset,
        max_bytes: usize,
        max_wait: Duration,
    ) -> Result<Fetched, Status> {
        let key = topic.key(partition);
        self.shards
            .ask(topic.core(partition), |reply| CoreRequest::Fetch {
                key,
                from,
                max_bytes,
                max_wait,
                reply,
            })
            .await
            .map_err(from_core)
    }

    pub async fn positions(&self, topic: &Topic, partition: u32) -> Result<Positions, Status> {
        let key = topic.key(partition);
        self.shards
            .ask(topic.core(partition), |reply| CoreRequest::Positions {
                key,
                reply,
            })
            .await
            .map_err(from_core)
    }

    pub async fn offset_for_timestamp(
        &self,
        topic: &Topic,
        partition: u32,
        timestamp: TimestampMs,
    ) -> Result<Option<Offset>, Status> {
        let key = topic.key(partition);
        self.shards
            .ask(topic.core(partition), |reply| {
                CoreRequest::OffsetForTimestamp {
                    key,
                    timestamp,
                    reply,
                }
            })
            .await
            .map_err(from_core)
    }
}
