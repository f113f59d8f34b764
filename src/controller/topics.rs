//! Creating and deleting topics through the metadata group.

use std::sync::Arc;
use std::time::Duration;

use super::propose::{propose, wait_applied, wait_metadata_leader};
use super::{ControllerError, Result};
use crate::broker::{Broker, Topic};
use crate::cluster::{
    assign_replicas, Command, MirrorOf, Placement, Survival, TopicSettings, TopicSpec,
};
use crate::types::{TimestampMs, TopicUid};

/// How long creating a topic waits for its partitions here to know their leaders.
const LEADERS_WAIT: Duration = Duration::from_secs(10);

/// What a new topic is asked to be; the replication factor 0 takes the node's default, capped
/// at the nodes that can hold replicas.
pub struct NewTopic {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u32,
    pub settings: TopicSettings,
    pub placement: Placement,
    /// Set for a mirror topic: its source.
    pub mirror: Option<MirrorOf>,
}

/// Creates a topic through the metadata group; returns it once this node has applied it and
/// (bounded) its partitions here know their leaders.
pub async fn create_topic(broker: &Arc<Broker>, new: NewTopic) -> Result<Arc<Topic>> {
    wait_metadata_leader(broker).await?;
    let _admin = broker.admin.lock().await;
    let name = new.name;
    let state = broker.cluster();
    let nodes = state.placeable();
    let rf = match new.replication_factor {
        0 => broker
            .config
            .topic_defaults
            .replication_factor
            .min(nodes.len() as u32)
            .max(1),
        rf if rf as usize > nodes.len() => {
            return Err(ControllerError::Invalid(format!(
                "replication factor {rf} exceeds the number of nodes that can hold replicas \
                 ({}; `tern cluster status` lists them)",
                nodes.len()
            )))
        }
        rf => rf,
    };
    if state.topics.contains_key(&name) {
        return Err(ControllerError::TopicExists(name));
    }
    if state.topics.len() >= broker.config.max_topics {
        return Err(ControllerError::TooManyTopics(broker.config.max_topics));
    }
    let mut placement = new.placement;
    // Zone survival without a home region: the region of the node creating it (the client's
    // nearest, as it connected here).
    if placement.survival == Survival::Zone && placement.regions.is_empty() {
        placement.regions = vec![broker.config.region.clone()];
    }
    let replicas = assign_replicas(&nodes, new.partitions, rf, &placement)?;
    let uid = TopicUid(rand::random::<u64>() | 1);
    let spec = TopicSpec {
        name: name.clone(),
        uid,
        partitions: new.partitions,
        replication_factor: rf,
        settings: new.settings,
        replicas,
        created_ms: TimestampMs::now().0,
        moving: Default::default(),
        moved: Default::default(),
        placement,
        mirror: new.mirror,
        promotion: None,
    };
    let at = propose(broker, &Command::CreateTopic { spec }).await?;
    wait_applied(broker, at).await?;
    let topic = broker.topic(&name)?;
    if topic.spec.uid != uid {
        return Err(ControllerError::TopicExists(name));
    }
    // Replicated partitions elect their leaders in the background: wait (bounded) for them, so
    // a publish right after creation finds a leader.
    wait_for_leaders(broker, &topic).await;
    tracing::info!(topic = %name, partitions = new.partitions, replication_factor = rf, "topic created");
    Ok(topic)
}

/// Waits (bounded) until every partition this node holds knows a leader.
async fn wait_for_leaders(broker: &Broker, topic: &Topic) {
    let deadline = tokio::time::Instant::now() + LEADERS_WAIT;
    for p in 0..topic.spec.partitions {
        if !topic.on(broker.node_id(), p) {
            continue;
        }
        loop {
            match broker.replica_state(topic, p).await {
                // A mirror's replica has no leader: open is enough.
                Ok(s) if s.leader.is_some() || s.mirror.is_some() => break,
                _ if tokio::time::Instant::now() >= deadline => return,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// Deletes a topic through the metadata group; returns once this node has applied it.
pub async fn delete_topic(broker: &Arc<Broker>, name: &str) -> Result<()> {
    let _admin = broker.admin.lock().await;
    let topic = broker.topic(name)?;
    let at = propose(
        broker,
        &Command::DeleteTopic {
            name: name.to_string(),
            uid: topic.spec.uid,
        },
    )
    .await?;
    wait_applied(broker, at).await?;
    tracing::info!(topic = name, "topic deleted");
    Ok(())
}
