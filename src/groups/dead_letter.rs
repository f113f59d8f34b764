//! Writing dead letters: a record that failed its last delivery goes to the group's
//! dead-letter topic (created on first use), with headers saying where it came from and why,
//! written as an idempotent producer so that a retried write lands once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::actor::Event;
use super::window::DeadLetter;
use super::{GroupError, Result};
use crate::broker::{Broker, BrokerError, Origin, Outgoing, Topic};
use crate::controller::{self, ControllerError, NewTopic};
use crate::log::{Header, Record, HEADERS_PER_RECORD_MAX};
use crate::shard::ProducerSeq;
use crate::types::{ProducerId, Sequence, TimestampMs};

/// Headers a dead letter carries beside the record's own.
const DLQ_HEADERS: usize = 6;
/// Room a dead letter needs beyond its record.
const DLQ_RECORD_SLACK: u32 = 64 << 10;
/// Longest wait between tries of a write.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Writes dead letters to the dead-letter topic, one at a time, as an idempotent producer: a
/// write that failed goes again with the same sequence number, so it lands once.
pub struct DeadLetterWriter {
    pub broker: Arc<Broker>,
    pub group: String,
    pub source: Arc<Topic>,
    pub dlq: String,
    pub producer: ProducerId,
    /// The next sequence number per dead-letter partition.
    pub sequences: HashMap<u32, i32>,
}

impl DeadLetterWriter {
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<DeadLetter>,
        events: mpsc::WeakSender<Event>,
    ) {
        while let Some(letter) = rx.recv().await {
            let (group, dlq) = (self.group.clone(), self.dlq.clone());
            let (partition, offset) = (letter.partition, letter.offset);
            let mut backoff = Duration::from_millis(100);
            loop {
                match self.write(&letter).await {
                    Ok(()) => break,
                    Err(e) if !retryable(&e) => {
                        // It can never be written (e.g. larger than the dead-letter topic takes).
                        tracing::error!(
                            group,
                            dlq,
                            partition,
                            offset,
                            "dead letter refused, record dropped: {e}"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(
                            group,
                            dlq,
                            partition,
                            offset,
                            "dead letter not written yet: {e}"
                        );
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        if events.upgrade().is_none() {
                            return;
                        }
                    }
                }
            }
            let Some(tx) = events.upgrade() else { return };
            let _ = tx.send(Event::DeadLettered { partition, offset }).await;
        }
    }

    /// The dead-letter topic, created (one partition, room for the source's largest record
    /// and the headers added to it) if it does not exist.
    async fn topic(&self) -> Result<Arc<Topic>> {
        match self.broker.topic(&self.dlq) {
            Err(BrokerError::NoTopic(_)) => {}
            r => return Ok(r?),
        }
        let broker = &self.broker;
        let mut settings = broker.config.topic_defaults.settings();
        settings.max_record_bytes = (self.source.spec.settings.max_record_bytes)
            .saturating_add(DLQ_RECORD_SLACK)
            .min(crate::cluster::RECORD_BYTES_MAX + DLQ_RECORD_SLACK);
        let new = NewTopic {
            name: self.dlq.clone(),
            partitions: 1,
            replication_factor: self.source.spec.replication_factor,
            settings,
            placement: self.source.spec.placement.clone(),
            mirror: None,
        };
        match controller::create_topic(broker, new).await {
            Err(ControllerError::TopicExists(_)) => Ok(broker.topic(&self.dlq)?),
            r => Ok(r?),
        }
    }

    async fn write(&mut self, letter: &DeadLetter) -> Result<()> {
        let topic = self.topic().await?;
        let rec = &letter.record;
        let dp = letter.partition % topic.spec.partitions;
        let seq = *self.sequences.entry(dp).or_insert(0);
        let mut headers: Vec<Header> = rec
            .headers
            .iter()
            .take(HEADERS_PER_RECORD_MAX - DLQ_HEADERS)
            .map(|h| Header {
                name: h.key.clone(),
                value: h.value.clone(),
            })
            .collect();
        for (name, value) in [
            ("tern-dlq-reason", letter.why.to_string()),
            ("tern-dlq-topic", rec.topic.clone()),
            ("tern-dlq-partition", rec.partition.to_string()),
            ("tern-dlq-offset", rec.offset.to_string()),
            ("tern-dlq-deliveries", letter.deliveries.to_string()),
            ("tern-dlq-group", self.group.clone()),
        ] {
            headers.push(Header {
                name: name.to_string(),
                value: Bytes::from(value),
            });
        }
        let record = Record {
            key: rec.key.clone(),
            value: rec.value.clone(),
            headers,
            timestamp: TimestampMs::now(),
            ttl_ms: None,
        };
        let pending = self
            .broker
            .submit(
                &topic,
                vec![Outgoing {
                    partition: Some(dp),
                    record,
                }],
                Some(ProducerSeq {
                    id: self.producer,
                    first: Sequence(seq),
                }),
                &Origin::default(),
            )
            .await?;
        pending.await?;
        self.sequences.insert(dp, seq + 1);
        Ok(())
    }
}

/// Whether a failed write may succeed later (else the record can never be written, e.g. it
/// is larger than the dead-letter topic takes: dropped).
fn retryable(e: &GroupError) -> bool {
    use crate::log::{BatchError, LogError};
    use crate::shard::CoreError;
    let refused = matches!(
        e,
        GroupError::Broker(BrokerError::Cluster(_))
            | GroupError::Broker(BrokerError::Core(CoreError::Log(
                LogError::BatchTooLarge { .. } | LogError::Batch(BatchError::TooLarge { .. })
            )))
            | GroupError::Controller(ControllerError::Invalid(_) | ControllerError::Cluster(_))
    );
    !refused
}
