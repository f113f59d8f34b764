//! The thesis seed's `broker.Broker` (`proto/broker/thesis/broker.proto`): Publish to a topic,
//! Subscribe to several topics each from a start time.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::ensure_topic;
use crate::net::call::Call;
use crate::net::service::{BoxStream, TernService};
use crate::proto::thesis as seed;
use crate::proto::thesis::broker_server::Broker;
use crate::proto::v1 as pb;

/// Start times at or above this are Unix milliseconds, below it Unix seconds (10^11 seconds is
/// the year 5138; 10^11 milliseconds is 1973).
const MILLIS_FROM: i64 = 100_000_000_000;

pub struct ThesisService {
    pub tern: Arc<TernService>,
}

/// Where a record lives, as the seed's string id: `<topic>/<partition>@<offset>`.
pub fn record_id(topic: &str, partition: u32, offset: u64) -> String {
    format!("{topic}/{partition}@{offset}")
}

/// A subscription's start time as a start position: 0 the earliest record, negative new
/// records only, else Unix seconds (or milliseconds, see [`MILLIS_FROM`]).
pub fn start_at(time: i64) -> pb::StartPosition {
    use pb::start_position::Position;
    let position = match time {
        0 => Position::Earliest(true),
        t if t < 0 => Position::Latest(true),
        t if t >= MILLIS_FROM => Position::TimestampMs(t),
        t => Position::TimestampMs(t * 1000),
    };
    pb::StartPosition {
        position: Some(position),
    }
}

fn message(r: pb::Record) -> seed::MessageResponse {
    seed::MessageResponse {
        id: record_id(&r.topic, r.partition, r.offset),
        timestamp: r.timestamp_ms,
        topic: r.topic,
        body: r.value,
    }
}

#[tonic::async_trait]
impl Broker for ThesisService {
    async fn publish(
        &self,
        request: Request<seed::PublishRequest>,
    ) -> Result<Response<seed::PublishResponse>, Status> {
        let (call, r) = Call::split(request);
        ensure_topic(&self.tern, &call, &r.topic).await?;
        let record = pb::PublishRecord {
            value: r.body,
            ..Default::default()
        };
        let ack = crate::net::call::publish_one(&self.tern, &call, r.topic.clone(), record).await?;
        Ok(Response::new(seed::PublishResponse {
            id: record_id(&r.topic, ack.partition, ack.offset),
        }))
    }

    type SubscribeStream = BoxStream<seed::MessageResponse>;

    async fn subscribe(
        &self,
        request: Request<seed::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.tern.caller(&request).await?;
        let (call, r) = Call::split(request);
        if r.topics.is_empty() {
            return Err(Status::invalid_argument(
                "a subscription needs at least one topic (topics: a map of topic to start time)",
            ));
        }
        let mut add = Vec::with_capacity(r.topics.len());
        for (topic, time) in r.topics {
            ensure_topic(&self.tern, &call, &topic).await?;
            add.push(pb::TopicSubscription {
                topic,
                from: Some(start_at(time)),
                partitions: vec![],
            });
        }
        let messages = super::subscribe(&self.tern, caller, add, message).await?;
        Ok(Response::new(messages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::start_position::Position;

    #[test]
    fn start_times_read_as_seconds_or_milliseconds() {
        let at = |t| start_at(t).position.unwrap();
        assert_eq!(at(0), Position::Earliest(true));
        assert_eq!(at(-1), Position::Latest(true));
        assert_eq!(at(i64::MIN), Position::Latest(true));
        assert_eq!(at(1_700_000_000), Position::TimestampMs(1_700_000_000_000));
        assert_eq!(
            at(1_700_000_000_000),
            Position::TimestampMs(1_700_000_000_000)
        );
        assert_eq!(
            at(MILLIS_FROM - 1),
            Position::TimestampMs((MILLIS_FROM - 1) * 1000)
        );
        assert_eq!(at(i64::MAX), Position::TimestampMs(i64::MAX));
    }
}
