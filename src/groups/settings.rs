//! A member's settings, validated from its `JoinGroup`, and the bounds on what members send.

use std::time::Duration;

use super::{GroupError, GroupKey, Mode, Result};
use crate::broker::Broker;
use crate::cluster::validate_topic_name;
use crate::proto::v1 as pb;

/// Deliveries per Ack/Nack request.
pub const REFS_MAX: usize = 10_000;
/// Messages a member's stream buffers beyond its in-flight records.
const OUT_SLACK: usize = 16;
/// Longest nack delay.
const NACK_DELAY_MAX_MS: u32 = 3_600_000;

/// A member's settings (validated `JoinGroup`).
#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub session: Duration,
    pub max_in_flight: u32,
    pub start_latest: bool,
    pub auto_commit: Option<Duration>,
    pub ack_wait: Duration,
    pub max_deliveries: u32,
    pub dlq: String,
}

impl Settings {
    /// Capacity of the member's stream: its in-flight records (one message each at most) and
    /// some control messages.
    pub fn out_capacity(&self, mode: Mode) -> usize {
        match mode {
            Mode::Queue => self.max_in_flight as usize + OUT_SLACK,
            Mode::Stream => OUT_SLACK,
        }
    }
}

/// A group name follows the rules of topic names.
pub fn group_name(name: &str) -> Result<()> {
    validate_topic_name(name).map_err(|e| GroupError::Invalid(format!("group name: {e}")))
}

/// Checks a JoinGroup; answers its group, mode and settings.
pub fn validate_join(broker: &Broker, j: pb::JoinGroup) -> Result<(GroupKey, Mode, Settings)> {
    let bad = |m: String| Err(GroupError::Invalid(m));
    group_name(&j.group)?;
    let topic = broker.topic(&j.topic)?;
    let mode = match pb::GroupMode::try_from(j.mode) {
        Ok(pb::GroupMode::Stream) => Mode::Stream,
        Ok(pb::GroupMode::Queue) => Mode::Queue,
        _ => return bad("mode: use GROUP_MODE_STREAM or GROUP_MODE_QUEUE".into()),
    };
    if j.member_name.len() > 256 {
        return bad("member_name is at most 256 bytes".into());
    }
    let session = match j.session_timeout_ms {
        0 => 10_000,
        v @ 1000..=300_000 => v,
        v => return bad(format!("session_timeout_ms {v}: use 1000 to 300000")),
    };
    let max_in_flight = match j.max_in_flight {
        0 => 100,
        v @ 1..=10_000 => v,
        v => return bad(format!("max_in_flight {v}: use 1 to 10000")),
    };
    let auto_commit = match j.auto_commit_interval_ms {
        0 => None,
        v @ 100..=3_600_000 => Some(Duration::from_millis(v as u64)),
        v => {
            return bad(format!(
                "auto_commit_interval_ms {v}: use 100 to 3600000, or 0"
            ))
        }
    };
    let ack_wait = match j.ack_wait_ms {
        0 => 30_000,
        v @ 100..=3_600_000 => v,
        v => return bad(format!("ack_wait_ms {v}: use 100 to 3600000")),
    };
    let max_deliveries = match j.max_deliveries {
        0 => 5,
        v @ 1..=1000 => v,
        v => return bad(format!("max_deliveries {v}: use 1 to 1000")),
    };
    let dlq = if j.dead_letter_topic.is_empty() {
        format!("{}.dlq", topic.spec.name)
    } else {
        j.dead_letter_topic
    };
    validate_topic_name(&dlq)
        .map_err(|e| GroupError::Invalid(format!("dead_letter_topic: {e}")))?;
    if dlq == topic.spec.name {
        return bad("the dead-letter topic must not be the topic itself".into());
    }
    Ok((
        (j.group, topic.spec.name.clone()),
        mode,
        Settings {
            name: j.member_name,
            session: Duration::from_millis(session as u64),
            max_in_flight,
            start_latest: j.start_latest,
            auto_commit,
            ack_wait: Duration::from_millis(ack_wait as u64),
            max_deliveries,
            dlq,
        },
    ))
}

/// Checks Ack/Nack references.
pub fn validate_refs(
    group: &str,
    topic: &str,
    refs: &[pb::DeliveryRef],
) -> Result<Vec<(u32, u64)>> {
    group_name(group)?;
    validate_topic_name(topic).map_err(|e| GroupError::Invalid(e.to_string()))?;
    if refs.len() > REFS_MAX {
        return Err(GroupError::Invalid(format!(
            "{} deliveries in one request; the limit is {REFS_MAX}",
            refs.len()
        )));
    }
    Ok(delivery_refs(refs))
}

/// (partition, offset) of at most [`REFS_MAX`] deliveries.
pub fn delivery_refs(refs: &[pb::DeliveryRef]) -> Vec<(u32, u64)> {
    refs.iter()
        .take(REFS_MAX)
        .map(|r| (r.partition, r.offset))
        .collect()
}

/// Encoded bytes of deliveries one message to a member carries (a larger record goes alone),
/// so that no message passes gRPC's default 4 MiB receive limit: records are at most
/// `crate::cluster::RECORD_BYTES_MAX`.
pub const MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Splits deliveries, in order, into messages of at most `budget` encoded bytes each, a
/// delivery larger than that alone.
pub fn by_message(deliveries: Vec<pb::Delivery>, budget: usize) -> Vec<Vec<pb::Delivery>> {
    use prost::Message;
    let mut out: Vec<Vec<pb::Delivery>> = Vec::new();
    let mut bytes = 0;
    for d in deliveries {
        let len = d.encoded_len();
        let size = 1 + prost::length_delimiter_len(len) + len;
        match out.last_mut() {
            Some(last) if bytes + size <= budget => last.push(d),
            _ => {
                out.push(vec![d]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    out
}

/// A nack's redelivery delay, capped at an hour.
pub fn nack_delay(ms: u32) -> Duration {
    Duration::from_millis(ms.min(NACK_DELAY_MAX_MS) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(offset: u64, value_bytes: usize) -> pb::Delivery {
        pb::Delivery {
            record: Some(pb::Record {
                topic: "t".into(),
                offset,
                value: vec![7u8; value_bytes].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn deliveries_split_into_messages_within_the_budget_in_order() {
        use prost::Message;
        let budget = 10_000;
        let sizes = [100, 3_000, 4_000, 2_500, 20_000, 10, 9_000, 9_000, 1];
        let ds: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| delivery(i as u64, n))
            .collect();
        let messages = by_message(ds, budget);
        let offsets: Vec<u64> = messages
            .iter()
            .flatten()
            .map(|d| d.record.as_ref().unwrap().offset)
            .collect();
        assert_eq!(offsets, (0..sizes.len() as u64).collect::<Vec<_>>());
        for m in &messages {
            let encoded = pb::Deliveries {
                deliveries: m.clone(),
                ..Default::default()
            }
            .encoded_len();
            assert!(
                encoded <= budget || m.len() == 1,
                "{} deliveries in {encoded} bytes",
                m.len()
            );
        }
        // The 20,000-byte one alone; 9,000 and 9,000 not together.
        assert!(messages
            .iter()
            .any(|m| m.len() == 1 && m[0].record.as_ref().unwrap().offset == 4));
        let counts: Vec<usize> = messages.iter().map(Vec::len).collect();
        assert_eq!(counts, [4, 1, 2, 2]);
        assert!(by_message(vec![], budget).is_empty());
    }
}
