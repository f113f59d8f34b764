//! Tern records to protobuf records.

use crate::proto::v1 as pb;
use crate::shard::{Fetched, StartAt};
use crate::types::TimestampMs;

/// The committed, unexpired data records of a fetch, at most `max_records`; returns them and
/// the offset where the next fetch continues. Control records (Raft leader and membership
/// entries) take offsets but are never delivered.
pub fn records(
    topic: &str,
    partition: u32,
    f: &Fetched,
    max_records: usize,
) -> (Vec<pb::Record>, u64) {
    let now = TimestampMs::now();
    let mut out = Vec::new();
    let mut next = f.from;
    for batch in &f.batches {
        let control = batch.meta().control;
        for r in batch.records() {
            if r.offset < f.from || r.offset >= f.until {
                continue;
            }
            if out.len() >= max_records {
                return (out, next.0);
            }
            next = r.offset.plus(1);
            if control || r.is_expired(now) {
                continue;
            }
            out.push(pb::Record {
                topic: topic.to_string(),
                partition,
                offset: r.offset.0,
                timestamp_ms: r.timestamp.0,
                key: r.key.map(|k| batch.bytes().slice_ref(k)),
                headers: r
                    .headers()
                    .map(|(k, v)| pb::Header {
                        key: k.to_string(),
                        value: batch.bytes().slice_ref(v),
                    })
                    .collect(),
                value: batch.bytes().slice_ref(r.value),
            });
        }
    }
    (out, next.0)
}

/// A start position as the API spells it.
pub fn start_position(at: StartAt) -> pb::StartPosition {
    use pb::start_position::Position;
    let p = match at {
        StartAt::Earliest => Position::Earliest(true),
        StartAt::Latest => Position::Latest(true),
        StartAt::Offset(o) => Position::Offset(o.0),
        StartAt::Time(t) => Position::TimestampMs(t.0),
        StartAt::Last(n) => Position::Last(n),
    };
    pb::StartPosition { position: Some(p) }
}
