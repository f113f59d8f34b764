//! Feeds arbitrary bytes to the node-to-node message decoders, as a peer's Exchange would
//! bring them: the protobuf envelope, then each Raft message body (append, vote, pre-vote,
//! snapshot, transfer-leader) and the replies. Each refuses or decodes; none panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tern::proto::internal as pb;
use tern::raft::wire;

fuzz_target!(|data: &[u8]| {
    // The raw bytes as every JSON-encoded body and reply.
    let _ = wire::decode_vote(data);
    let _ = wire::decode_snapshot(data);
    let _ = wire::decode_transfer_leader(data);
    let _ = wire::decode_append_response(data);
    let _ = wire::decode_vote_response(data);
    let _ = wire::decode_snapshot_response(data);
    let _ = wire::decode_transfer_leader_response(data);
    // And as an Exchange envelope whose messages are decoded as a node would.
    let Ok(x) = pb::ExchangeRequest::decode(data) else {
        return;
    };
    for m in x.messages {
        match m.body {
            Some(pb::raft_request::Body::Append(a)) => {
                let _ = wire::decode_append(a);
            }
            Some(pb::raft_request::Body::Vote(v)) | Some(pb::raft_request::Body::PreVote(v)) => {
                let _ = wire::decode_vote(&v);
            }
            Some(pb::raft_request::Body::InstallSnapshot(s)) => {
                let _ = wire::decode_snapshot(&s);
            }
            Some(pb::raft_request::Body::TransferLeader(t)) => {
                let _ = wire::decode_transfer_leader(&t);
            }
            None => {}
        }
    }
});
