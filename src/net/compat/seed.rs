//! The Raft seeds' `broker.Broker` (`proto/broker/seed/broker.proto`): subjects are topics of
//! one partition, and a record's `int32` id is its offset there.
//!
//! An `int32` names 2^31 - 1 records. A subject's topic may hold more (through `tern.v1`), but
//! this service cannot name them: a Publish whose record lands past that is OUT_OF_RANGE and
//! says at which offset the record was stored, and Fetch cannot ask for it.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::ensure_topic;
use crate::net::call::Call;
use crate::net::service::{BoxStream, TernService};
use crate::proto::seed;
use crate::proto::seed::broker_server::Broker;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_server::Tern;

/// How long a Fetch waits for this node's replica to catch up with a record the leader has
/// committed (a follower is a heartbeat behind): the long poll when the replica's end is the
/// id, and asking again, 50 ms apart, while its end is short of it.
const CATCH_UP_WAIT_MS: u32 = 2000;
const CATCH_UP_TRIES: u32 = 40;
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

pub struct SeedService {
    pub tern: Arc<TernService>,
}

impl SeedService {
    /// The subject's topic, which must have one partition (ids are offsets in it).
    fn one_partition(&self, subject: &str) -> Result<(), Status> {
        let t = self
            .tern
            .broker
            .topic(subject)
            .map_err(crate::net::status::from_broker)?;
        if t.spec.partitions != 1 {
            return Err(Status::failed_precondition(format!(
                "topic {subject:?} has {} partitions; this API's ids name records of a \
                 one-partition topic (use tern.v1 for it)",
                t.spec.partitions
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Broker for SeedService {
    async fn publish(
        &self,
        request: Request<seed::PublishRequest>,
    ) -> Result<Response<seed::PublishResponse>, Status> {
        let (call, r) = Call::split(request);
        let expiry_seconds = match r.expiration_seconds {
            0 => None,
            s if s < 0 => {
                return Err(Status::invalid_argument(format!(
                    "expirationSeconds {s}: use 0 (never) or a positive number of seconds"
                )))
            }
            s => Some(s as u32),
        };
        ensure_topic(&self.tern, &call, &r.subject).await?;
        self.one_partition(&r.subject)?;
        let record = pb::PublishRecord {
            value: r.body,
            partition: Some(0),
            expiry_seconds,
            ..Default::default()
        };
        let ack =
            crate::net::call::publish_one(&self.tern, &call, r.subject.clone(), record).await?;
        let id = i32::try_from(ack.offset).map_err(|_| {
            Status::out_of_range(format!(
                "the record was stored at offset {} of {:?}, past the 2147483647 records an \
                 int32 id can name; read it with tern.v1",
                ack.offset, r.subject
            ))
        })?;
        Ok(Response::new(seed::PublishResponse { id }))
    }

    type SubscribeStream = BoxStream<seed::MessageResponse>;

    async fn subscribe(
        &self,
        request: Request<seed::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.tern.caller(&request).await?;
        let (call, r) = Call::split(request);
        ensure_topic(&self.tern, &call, &r.subject).await?;
        self.one_partition(&r.subject)?;
        let add = vec![pb::TopicSubscription {
            topic: r.subject,
            from: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Latest(true)),
            }),
            partitions: vec![],
        }];
        let messages = super::subscribe(&self.tern, caller, add, |r| seed::MessageResponse {
            body: r.value,
        })
        .await?;
        Ok(Response::new(messages))
    }

    async fn fetch(
        &self,
        request: Request<seed::FetchRequest>,
    ) -> Result<Response<seed::MessageResponse>, Status> {
        if self.tern.broker.is_closing() {
            return Err(Status::unavailable("the node is shutting down"));
        }
        let (call, r) = Call::split(request);
        let unknown = || {
            Status::invalid_argument(format!(
                "no record with id {} in subject {:?} (never written, expired, or deleted by \
                 retention)",
                r.id, r.subject
            ))
        };
        if r.id < 0 {
            return Err(Status::invalid_argument(format!(
                "id {}: ids are 0 or more",
                r.id
            )));
        }
        match self.one_partition(&r.subject) {
            Err(s) if s.code() == Code::NotFound => return Err(unknown()),
            r => r?,
        }
        // The committed range as the leader has it: an id below its end was acknowledged, so
        // it is found even through a follower a heartbeat behind (which is waited for).
        let offsets = pb::ListOffsetsRequest {
            topic: r.subject.clone(),
            partitions: vec![0],
            position: None,
        };
        let range = self
            .tern
            .list_offsets(call.request(offsets))
            .await?
            .into_inner()
            .partitions
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("ListOffsets answered without the partition"))?;
        let id = r.id as u64;
        if id < range.start_offset || id >= range.end_offset {
            return Err(unknown());
        }
        let fetch = pb::FetchRequest {
            topic: r.subject.clone(),
            partition: 0,
            offset: id,
            max_records: 1,
            max_bytes: 0,
            // The leader has it: a follower at the id's offset waits for its commit.
            max_wait_ms: CATCH_UP_WAIT_MS,
            raw_batches: false,
            topic_uid: 0,
        };
        let mut attempts = 0;
        let records = loop {
            match self.tern.fetch(call.request(fetch.clone())).await {
                Ok(f) => break f.into_inner().records,
                // This node's replica has not committed it yet.
                Err(s) if s.code() == Code::OutOfRange && attempts < CATCH_UP_TRIES => {
                    attempts += 1;
                    tokio::time::sleep(CATCH_UP_WAIT).await;
                }
                Err(s) if matches!(s.code(), Code::OutOfRange | Code::NotFound) => {
                    return Err(unknown())
                }
                Err(s) => return Err(s),
            }
        };
        // A read from an expired (or control) offset returns the next record after it.
        match records.into_iter().next() {
            Some(rec) if rec.offset == id => {
                Ok(Response::new(seed::MessageResponse { body: rec.value }))
            }
            _ => Err(unknown()),
        }
    }
}
