//! The seeds' services, for clients written against them, run unchanged:
//!
//! ```text
//! compat/
//!   thesis.rs  broker.Broker of the thesis seed (topics, start times), on the main port
//!   seed.rs    broker.Broker of the Raft seeds (subjects, int32 ids, expiry), on
//!              --compat-listen: it has the same method paths with other messages
//! ```
//!
//! Each call becomes the `tern.v1` calls it stands for, made through [`TernService`] with the
//! caller's own metadata and connection, so authentication, ACLs, quotas, forwarding to
//! leaders and metrics are exactly those of `tern.v1`. Their clients never create topics, so a
//! topic is created on first use when the node allows it (`--auto-create-topics`).

pub mod seed;
pub mod thesis;

use std::sync::Arc;

use tonic::{Code, Status};

use super::call::Call;
use super::service::TernService;
use super::status::from_broker;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_server::Tern;

/// Topics created on first use have one partition, so the seeds' order (per topic, per
/// subject) is the partition's.
const AUTO_CREATED_PARTITIONS: u32 = 1;

/// Makes sure `topic` exists: creates it with one partition if it does not and the node
/// creates topics on first use (the caller needs the create right, as for CreateTopic).
async fn ensure_topic(tern: &Arc<TernService>, call: &Call, topic: &str) -> Result<(), Status> {
    let missing = match tern.broker.topic(topic) {
        Ok(_) => return Ok(()),
        Err(e) if e.not_found() && tern.broker.config.auto_create_topics => e,
        Err(e) => return Err(from_broker(e)),
    };
    let create = pb::CreateTopicRequest {
        name: topic.to_string(),
        partitions: AUTO_CREATED_PARTITIONS,
        ..Default::default()
    };
    match tern.create_topic(call.request(create)).await {
        Ok(_) => Ok(()),
        // Created by another call meanwhile.
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) if s.code() == Code::PermissionDenied => Err(Status::permission_denied(format!(
            "{missing}, and creating it on first use needs the create right on it: {}",
            s.message()
        ))),
        Err(s) => Err(s),
    }
}

/// A subscription made of one request that adds `add`, each record as `f` makes it (a failure
/// passed on, ending the stream).
async fn subscribe<T: Send + 'static>(
    tern: &TernService,
    caller: crate::net::auth::Caller,
    add: Vec<pb::TopicSubscription>,
    f: impl Fn(pb::Record) -> T + Send + 'static,
) -> Result<crate::net::service::BoxStream<T>, Status> {
    use futures::StreamExt;
    let records =
        crate::net::subscribe::once(tern.broker.clone(), tern.auth.clone(), caller, add).await?;
    Ok(Box::pin(records.flat_map(move |r| {
        futures::stream::iter(match r {
            Ok(batch) => batch.records.into_iter().map(|r| Ok(f(r))).collect(),
            Err(status) => vec![Err(status)],
        })
    })))
}
