//! Raft messages on the wire (`proto/tern/internal/v1/peer.proto`).
//!
//! Entries travel as what they are in the log: a normal entry is its stored record batch, byte
//! for byte (its checksum is verified on arrival, so a damaged batch is refused before Raft sees
//! it); blank and membership entries are small. The rest of each message (votes, log ids,
//! responses) is JSON of openraft's own serde forms: a few dozen bytes, and it follows openraft
//! across versions without a hand-written schema.

use bytes::Bytes;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::EntryPayload;
use serde::{Deserialize, Serialize};

use super::error::RaftError;
use super::types::{log_id, Entry, EntryBatch, LogId, PartitionRaft, SnapshotMeta, Vote};
use crate::log::Batch;
use crate::proto::internal as pb;

/// Entries one AppendEntries may carry when decoded from a peer.
pub const MAX_ENTRIES: usize = 4096;

#[derive(Serialize, Deserialize)]
struct AppendHead {
    vote: Vote,
    prev_log_id: Option<LogId>,
    leader_commit: Option<LogId>,
}

fn json<T: Serialize>(v: &T) -> Bytes {
    // Serializing these plain structs to a Vec cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

fn from_json<'a, T: Deserialize<'a>>(what: &'static str, b: &'a [u8]) -> Result<T, RaftError> {
    serde_json::from_slice(b).map_err(|e| RaftError::Malformed {
        what,
        error: e.to_string(),
    })
}

pub fn encode_append(rpc: &AppendEntriesRequest<PartitionRaft>) -> pb::AppendEntries {
    let head = AppendHead {
        vote: rpc.vote,
        prev_log_id: rpc.prev_log_id,
        leader_commit: rpc.leader_commit,
    };
    pb::AppendEntries {
        head: json(&head),
        entries: rpc.entries.iter().map(encode_entry).collect(),
        durable: None,
    }
}

fn encode_entry(e: &Entry) -> pb::Entry {
    use pb::entry::Payload;
    let payload = match &e.payload {
        EntryPayload::Normal(EntryBatch(b)) => Payload::Batch(b.bytes().clone()),
        EntryPayload::Blank => Payload::Blank(true),
        EntryPayload::Membership(m) => Payload::Membership(json(m)),
    };
    pb::Entry {
        term: e.log_id.leader_id.term,
        index: e.log_id.index,
        payload: Some(payload),
    }
}

pub fn decode_append(
    m: pb::AppendEntries,
) -> Result<AppendEntriesRequest<PartitionRaft>, RaftError> {
    if m.entries.len() > MAX_ENTRIES {
        return Err(RaftError::TooLarge(format!(
            "{} entries in one append; at most {MAX_ENTRIES}",
            m.entries.len()
        )));
    }
    let head: AppendHead = from_json("append head", &m.head)?;
    let entries = m
        .entries
        .into_iter()
        .map(decode_entry)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AppendEntriesRequest {
        vote: head.vote,
        prev_log_id: head.prev_log_id,
        entries,
        leader_commit: head.leader_commit,
    })
}

fn decode_entry(e: pb::Entry) -> Result<Entry, RaftError> {
    use pb::entry::Payload;
    let id = log_id(e.term, e.index);
    let payload = match e.payload {
        Some(Payload::Batch(b)) => {
            let batch = Batch::decode(b).map_err(|e| RaftError::Malformed {
                what: "damaged batch in an entry",
                error: e.to_string(),
            })?;
            if batch.meta().control {
                return Err(RaftError::Malformed {
                    what: "data entry",
                    error: "a data entry may not be a control batch".into(),
                });
            }
            EntryPayload::Normal(EntryBatch(batch))
        }
        Some(Payload::Blank(_)) => EntryPayload::Blank,
        Some(Payload::Membership(m)) => EntryPayload::Membership(from_json("membership", &m)?),
        None => {
            return Err(RaftError::Malformed {
                what: "entry",
                error: "no payload".into(),
            })
        }
    };
    Ok(Entry {
        log_id: id,
        payload,
    })
}

pub fn encode_vote(rpc: &VoteRequest<PartitionRaft>) -> Bytes {
    json(rpc)
}

pub fn decode_vote(b: &[u8]) -> Result<VoteRequest<PartitionRaft>, RaftError> {
    from_json("vote request", b)
}

pub fn encode_append_response(r: &AppendEntriesResponse<PartitionRaft>) -> Bytes {
    json(r)
}

pub fn decode_append_response(b: &[u8]) -> Result<AppendEntriesResponse<PartitionRaft>, RaftError> {
    from_json("append response", b)
}

pub fn encode_vote_response(r: &VoteResponse<PartitionRaft>) -> Bytes {
    json(r)
}

pub fn decode_vote_response(b: &[u8]) -> Result<VoteResponse<PartitionRaft>, RaftError> {
    from_json("vote response", b)
}

/// A snapshot as it travels: it carries no records (see `install_snapshot` in peer.proto).
#[derive(Serialize, Deserialize)]
pub struct SnapshotMessage {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub end: u64,
}

pub fn encode_snapshot(m: &SnapshotMessage) -> Bytes {
    json(m)
}

pub fn decode_snapshot(b: &[u8]) -> Result<SnapshotMessage, RaftError> {
    from_json("snapshot", b)
}

pub fn encode_snapshot_response(r: &SnapshotResponse<PartitionRaft>) -> Bytes {
    json(r)
}

pub fn decode_snapshot_response(b: &[u8]) -> Result<SnapshotResponse<PartitionRaft>, RaftError> {
    from_json("snapshot response", b)
}

pub fn encode_transfer_leader(r: &TransferLeaderRequest<PartitionRaft>) -> Bytes {
    json(r)
}

pub fn decode_transfer_leader(b: &[u8]) -> Result<TransferLeaderRequest<PartitionRaft>, RaftError> {
    from_json("transfer-leader request", b)
}

pub fn encode_transfer_leader_response(r: &TransferLeaderResponse<PartitionRaft>) -> Bytes {
    json(r)
}

pub fn decode_transfer_leader_response(
    b: &[u8],
) -> Result<TransferLeaderResponse<PartitionRaft>, RaftError> {
    from_json("transfer-leader response", b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{BatchBuilder, Record};
    use crate::types::NodeId;
    use crate::types::{Offset, Term};

    fn batch(term: u64, index: u64) -> Batch {
        let mut b = BatchBuilder::new(1 << 16);
        b.push(&Record {
            value: Bytes::from_static(b"hello"),
            ..Record::default()
        })
        .unwrap();
        b.finish()
            .unwrap()
            .stamped_entry(Offset(7), Term(term), index)
    }

    #[test]
    fn append_round_trips_and_damage_is_refused() {
        let mut m = super::super::types::Membership::new_with_defaults(
            vec![[NodeId(1), NodeId(2), NodeId(3)].into()],
            [],
        );
        m = m.clone();
        let rpc = AppendEntriesRequest::<PartitionRaft> {
            vote: Vote::new_committed(3, NodeId(1)),
            prev_log_id: Some(log_id(2, 9)),
            entries: vec![
                Entry {
                    log_id: log_id(3, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: log_id(3, 11),
                    payload: EntryPayload::Normal(EntryBatch(batch(3, 11))),
                },
                Entry {
                    log_id: log_id(3, 12),
                    payload: EntryPayload::Membership(m),
                },
            ],
            leader_commit: Some(log_id(3, 10)),
        };
        let wire = encode_append(&rpc);
        let back = decode_append(wire.clone()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{rpc:?}"));

        // One flipped bit in a batch: refused, not handed to Raft.
        let mut bad = wire;
        if let Some(pb::entry::Payload::Batch(b)) = &mut bad.entries[1].payload {
            let mut v = b.to_vec();
            let last = v.len() - 1;
            v[last] ^= 1;
            *b = Bytes::from(v);
        }
        assert!(decode_append(bad)
            .unwrap_err()
            .to_string()
            .contains("damaged"));
        assert!(decode_vote(b"{").is_err());
    }
}
