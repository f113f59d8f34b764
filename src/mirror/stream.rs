//! A mirror's open `FetchStream` (to the source or to another replica of the mirror) and how
//! its answers are taken in.

use futures::{FutureExt, StreamExt};

use super::{PULL_BYTES, PULL_SLACK, PULL_WAIT};
use crate::proto::v1 as pb;
use crate::types::{NodeId, Offset};

/// A FetchStream open to the source or to another replica of the mirror, and the offset its
/// next answer starts at.
pub(super) struct Feed {
    pub(super) answers: tonic::Streaming<pb::FetchResponse>,
    pub(super) from: Offset,
    /// How the stream ended after the answers last taken.
    pub(super) failed: Option<tonic::Status>,
    /// Opened to another replica of the mirror (this cluster's node), not to the source.
    pub(super) via: Option<NodeId>,
}

/// Answers of a stream taken in together, at most: those that arrived while the replica took
/// the previous ones in go to it as one append (one fsync).
pub(super) const DRAIN_ANSWERS: usize = 64;

/// What an open stream gave.
pub(super) enum Got {
    /// An answer, with those that had arrived after it merged in.
    Answer(pb::FetchResponse),
    Ended,
    Refused(tonic::Status),
    /// Nothing within the long poll and its slack.
    Silent,
}

/// The next answer of the stream `open` (which continues at `from`), and those already
/// arrived after it, as one: they go to the replica as one append (one fsync).
pub(super) async fn receive(open: &mut Feed, from: Offset) -> Got {
    match tokio::time::timeout(PULL_WAIT + PULL_SLACK, open.answers.message()).await {
        Ok(Ok(Some(mut r))) => {
            let mut bytes: usize = r.batches.iter().map(|b| b.len()).sum();
            for _ in 1..DRAIN_ANSWERS {
                if bytes >= PULL_BYTES as usize {
                    break;
                }
                match open.answers.next().now_or_never() {
                    Some(Some(Ok(more))) => {
                        bytes += more.batches.iter().map(|b| b.len()).sum::<usize>();
                        r.batches.extend(more.batches);
                        r.next_offset = more.next_offset;
                        r.high_watermark = r.high_watermark.max(more.high_watermark);
                        r.start_offset = more.start_offset;
                        if more.mirror.is_some() {
                            r.mirror = more.mirror;
                        }
                    }
                    Some(Some(Err(s))) => {
                        open.failed = Some(s);
                        break;
                    }
                    Some(None) | None => break,
                }
            }
            open.from = Offset(r.next_offset.max(from.0));
            Got::Answer(r)
        }
        Ok(Ok(None)) => Got::Ended,
        Ok(Err(s)) => Got::Refused(s),
        Err(_) => Got::Silent,
    }
}
