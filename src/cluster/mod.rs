//! Cluster metadata: topics, their settings and partition placement.
//!
//! On a single node the metadata lives in a file in the data directory, written atomically;
//! the replication issue moves it into the controller's Raft group.

mod metadata;
mod topic;

pub use metadata::MetadataStore;
pub use topic::{validate_topic_name, TopicSettings, TopicSpec, TOPIC_NAME_MAX};
