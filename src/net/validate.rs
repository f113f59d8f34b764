//! Validation of client input: every field bounded, every error saying what to fix.
//! Nothing is routed to a core until the whole request has passed.

use tonic::Status;

use crate::broker::{Outgoing, Topic};
use crate::cluster::{validate_topic_name, TopicSettings, RECORD_BYTES_MAX};
use crate::config::{Config, TopicDefaults};
use crate::log::{Header, Record, HEADERS_PER_RECORD_MAX};
use crate::proto::v1 as pb;
use crate::shard::{ProducerSeq, StartAt};
use crate::types::{Offset, ProducerId, Sequence, TimestampMs};

/// Longest expiry a record may ask for: ten years.
pub const EXPIRY_SECONDS_MAX: u32 = 10 * 365 * 24 * 3600;
/// Longest header name.
pub const HEADER_KEY_BYTES_MAX: usize = 1024;

/// Most records `StartPosition.last` may ask for.
pub const LAST_RECORDS_MAX: u64 = 100_000;

/// A start position (unset: latest).
pub fn start_at(from: Option<&pb::StartPosition>) -> Result<StartAt, Status> {
    use pb::start_position::Position;
    Ok(match from.and_then(|f| f.position) {
        None | Some(Position::Latest(_)) => StartAt::Latest,
        Some(Position::Earliest(_)) => StartAt::Earliest,
        Some(Position::Offset(o)) => StartAt::Offset(Offset(o)),
        Some(Position::TimestampMs(t)) => StartAt::Time(TimestampMs(t)),
        Some(Position::Last(n)) if (1..=LAST_RECORDS_MAX).contains(&n) => StartAt::Last(n),
        Some(Position::Last(n)) => {
            return Err(Status::invalid_argument(format!(
                "last {n}: ask for 1 to {LAST_RECORDS_MAX} records (or start from an offset)"
            )))
        }
    })
}

pub fn topic_name(name: &str) -> Result<(), Status> {
    validate_topic_name(name).map_err(super::status::from_cluster)
}

/// A CreateTopic request's placement, checked for shape (the controller checks that the nodes
/// can meet it).
pub fn placement(p: Option<&pb::Placement>) -> Result<crate::cluster::Placement, Status> {
    use crate::cluster::{Placement, Survival};
    let Some(p) = p else {
        return Ok(Placement::default());
    };
    let survival = match pb::Survival::try_from(p.survival) {
        Ok(pb::Survival::Unspecified) => Survival::Spread,
        Ok(pb::Survival::Zone) => Survival::Zone,
        Ok(pb::Survival::Region) => Survival::Region,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown survival goal {}",
                p.survival
            )))
        }
    };
    let placement = Placement {
        survival,
        regions: p.regions.clone(),
        leader_regions: p.leader_regions.clone(),
    };
    placement
        .validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(placement)
}

/// Resolves a CreateTopic request's settings against the node's defaults.
pub fn topic_settings(
    cfg: Option<&pb::TopicConfig>,
    d: &TopicDefaults,
) -> Result<TopicSettings, Status> {
    let bad = |m: String| Err(Status::invalid_argument(m));
    let c = cfg.cloned().unwrap_or_default();
    let retention_ms = match c.retention_ms.unwrap_or(d.retention_ms) {
        -1 => None,
        v if v > 0 => Some(v as u64),
        v => return bad(format!("retention_ms {v}: use a positive number of milliseconds, or -1 to keep records forever")),
    };
    let retention_bytes = match c.retention_bytes.unwrap_or(d.retention_bytes) {
        -1 => None,
        v if v > 0 => Some(v as u64),
        v => {
            return bad(format!(
                "retention_bytes {v}: use a positive size, or -1 for no limit"
            ))
        }
    };
    let interval = c.fsync_interval_ms.unwrap_or(d.fsync_interval_ms);
    let policy = match pb::FsyncPolicy::try_from(c.fsync_policy) {
        Ok(pb::FsyncPolicy::Unspecified) => d.fsync.clone(),
        Ok(pb::FsyncPolicy::Always) => "always".into(),
        Ok(pb::FsyncPolicy::Interval) => "interval".into(),
        Err(_) => return bad(format!("unknown fsync_policy {}", c.fsync_policy)),
    };
    let fsync_interval_ms = match policy.as_str() {
        "always" => None,
        _ if (1..=60_000).contains(&interval) => Some(interval),
        _ => return bad(format!("fsync_interval_ms {interval}: use 1 to 60000")),
    };
    let max_record_bytes = c.max_record_bytes.unwrap_or(d.max_record_bytes);
    if !(1..=RECORD_BYTES_MAX).contains(&max_record_bytes) {
        return bad(format!(
            "max_record_bytes {max_record_bytes}: use 1 to {RECORD_BYTES_MAX} (4 MiB less 128 KiB, \
             so any record can be read by a client with gRPC's default 4 MiB limit)"
        ));
    }
    let segment_bytes = c.segment_bytes.unwrap_or(d.segment_bytes);
    if !(1 << 20..=1 << 32).contains(&segment_bytes) {
        return bad(format!("segment_bytes {segment_bytes}: use 1 MiB to 4 GiB"));
    }
    Ok(TopicSettings {
        retention_ms,
        retention_bytes,
        fsync_interval_ms,
        max_record_bytes,
        segment_bytes,
    })
}

pub fn partition_count(partitions: u32, cfg: &Config) -> Result<u32, Status> {
    let p = if partitions == 0 {
        cfg.topic_defaults.partitions
    } else {
        partitions
    };
    if p > cfg.max_partitions_per_topic {
        return Err(Status::invalid_argument(format!(
            "{p} partitions: a topic may have 1 to {}",
            cfg.max_partitions_per_topic
        )));
    }
    Ok(p)
}

/// Checks a Publish request's idempotent producer fields: the producer id and the sequence
/// number of its first record, with every record naming the same partition (sequence numbers
/// count per partition, so the producer must know which one its records go to).
pub fn producer(req: &pb::PublishRequest) -> Result<Option<ProducerSeq>, Status> {
    if req.producer_id == 0 {
        if req.sequence != 0 {
            return Err(Status::invalid_argument(
                "sequence is set but producer_id is not: get a producer id from InitProducer",
            ));
        }
        return Ok(None);
    }
    let id = i64::try_from(req.producer_id)
        .map_err(|_| Status::invalid_argument("producer_id is out of range"))?;
    let last = req.sequence as u64 + req.records.len().max(1) as u64 - 1;
    if last > i32::MAX as u64 {
        return Err(Status::invalid_argument(format!(
            "sequence {} + {} records passes {}: start a new producer id",
            req.sequence,
            req.records.len(),
            i32::MAX
        )));
    }
    let partition = req.records.first().and_then(|r| r.partition);
    if partition.is_none() || req.records.iter().any(|r| r.partition != partition) {
        return Err(Status::invalid_argument(
            "an idempotent request (producer_id set) names the same partition on every record",
        ));
    }
    Ok(Some(ProducerSeq {
        id: ProducerId(id),
        first: Sequence(req.sequence as i32),
    }))
}

/// Checks a Publish request and turns its records into log records.
pub fn publish(
    req: pb::PublishRequest,
    topic: &Topic,
    cfg: &Config,
) -> Result<Vec<Outgoing>, Status> {
    if req.records.is_empty() {
        return Err(Status::invalid_argument(
            "a publish request needs at least one record",
        ));
    }
    if req.records.len() > cfg.max_records_per_request {
        return Err(Status::invalid_argument(format!(
            "{} records in one request; the limit is {}",
            req.records.len(),
            cfg.max_records_per_request
        )));
    }
    let max = topic.spec.settings.max_record_bytes as usize;
    let now = TimestampMs::now();
    let mut out = Vec::with_capacity(req.records.len());
    for (i, r) in req.records.into_iter().enumerate() {
        if let Some(p) = r.partition {
            topic
                .check_partition(p)
                .map_err(|e| Status::not_found(format!("record {i}: {e}")))?;
        }
        if r.headers.len() > HEADERS_PER_RECORD_MAX {
            return Err(Status::invalid_argument(format!(
                "record {i} has {} headers; the limit is {HEADERS_PER_RECORD_MAX}",
                r.headers.len()
            )));
        }
        let size = r.key.as_ref().map_or(0, |k| k.len())
            + r.value.len()
            + r.headers
                .iter()
                .map(|h| h.key.len() + h.value.len())
                .sum::<usize>();
        if size > max {
            return Err(Status::invalid_argument(format!(
                "record {i} is {size} bytes (key + value + headers); topic {:?} accepts at most {max}",
                topic.spec.name
            )));
        }
        if let Some(h) = r
            .headers
            .iter()
            .find(|h| h.key.is_empty() || h.key.len() > HEADER_KEY_BYTES_MAX)
        {
            return Err(Status::invalid_argument(format!(
                "record {i}: header keys must be 1 to {HEADER_KEY_BYTES_MAX} bytes, got {}",
                h.key.len()
            )));
        }
        let ttl_ms = match r.expiry_seconds {
            None => None,
            Some(0) => return Err(Status::invalid_argument(format!("record {i}: expiry_seconds must be positive"))),
            Some(s) if s > EXPIRY_SECONDS_MAX => {
                return Err(Status::invalid_argument(format!(
                    "record {i}: expiry_seconds {s} is over the limit of {EXPIRY_SECONDS_MAX} (ten years)"
                )))
            }
            Some(s) => Some(s as u64 * 1000),
        };
        out.push(Outgoing {
            partition: r.partition,
            record: Record {
                key: r.key,
                value: r.value,
                headers: r
                    .headers
                    .into_iter()
                    .map(|h| Header {
                        name: h.key,
                        value: h.value,
                    })
                    .collect(),
                timestamp: now,
                ttl_ms,
            },
        });
    }
    Ok(out)
}
