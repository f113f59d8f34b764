//! Pulling through another replica of the mirror: in each region the first replica of a
//! partition pulls from the source and the others through it, so each batch crosses the WAN
//! once per region.

use std::time::Duration;

use super::source::ask;
use super::stream::{receive, Feed, Got};
use super::PULL_SLACK;
use crate::broker::Broker;
use crate::shard::mirror::{Pulled, Upstream};
use crate::types::{NodeId, Offset};

/// A replica pulled through that last heard from the source longer ago than this is passed by
/// for [`UPSTREAM_PASSED`]; so is one that cannot be pulled through.
pub(super) const UPSTREAM_STALE: Duration = Duration::from_secs(3);
pub(super) const UPSTREAM_PASSED: Duration = Duration::from_secs(10);
/// ... and one that answers without its progress (an older version) for this long.
pub(super) const UPSTREAM_OLDER: Duration = Duration::from_secs(300);

/// A replica of the mirror in this node's region listed before this one for the partition,
/// and heard from lately: this replica pulls through it instead of crossing to the source
/// (one copy of each batch crosses the WAN per region, not one per replica). None for the
/// first replica of a region, which pulls from the source. Always an earlier replica, so two
/// replicas never pull through each other.
pub(super) fn upstream(
    broker: &Broker,
    topic: &crate::broker::Topic,
    partition: u32,
) -> Option<NodeId> {
    let me = broker.node_id();
    let replicas = topic.replicas(partition);
    let mine = replicas.iter().position(|n| *n == me)?;
    let state = broker.cluster();
    let region = |n: &NodeId| state.nodes.get(n).map(|m| m.region.clone());
    let here = region(&me);
    replicas[..mine]
        .iter()
        .copied()
        .find(|n| region(n) == here && broker.heard_from(*n))
}

/// What the replica `node` of this mirror has from offset `from`, through a stream open to it
/// (opened now if the one open does not start there): its batches and its own progress from
/// the source. An error says why it cannot be used now.
pub(super) async fn next_via(
    broker: &Broker,
    node: NodeId,
    feed: &mut Option<Feed>,
    topic: &crate::broker::Topic,
    partition: u32,
    from: Offset,
) -> Result<Pulled, (String, Duration)> {
    let failed = |why: String| (why, UPSTREAM_PASSED);
    let mut open = match feed.take() {
        Some(Feed {
            via: Some(n),
            failed: Some(s),
            ..
        }) if n == node => return Err(failed(s.message().to_string())),
        Some(f) if f.via == Some(node) && f.from == from => f,
        _ => {
            // A pull answers at least one whole batch, which may be as large as the format
            // allows.
            let mut c = broker
                .peer_client(node)
                .map_err(|e| failed(e.to_string()))?
                .max_decoding_message_size(crate::log::batch::BATCH_LEN_MAX + (1 << 20));
            let req = ask(
                &topic.spec.name,
                partition,
                from,
                std::num::NonZeroU64::new(topic.spec.uid.0),
            );
            let call = broker.relay(req, &crate::broker::Origin::default());
            match tokio::time::timeout(PULL_SLACK, c.fetch_stream(call)).await {
                Ok(Ok(r)) => Feed {
                    answers: r.into_inner(),
                    from,
                    failed: None,
                    via: Some(node),
                },
                Ok(Err(s)) => return Err(failed(s.message().to_string())),
                Err(_) => return Err(failed("no answer".into())),
            }
        }
    };
    match receive(&mut open, from).await {
        Got::Answer(r) => {
            let Some(m) = r.mirror else {
                // An older version (or no longer a mirror's replica): not asked again soon.
                return Err((
                    "it answered without its progress from the source".into(),
                    UPSTREAM_OLDER,
                ));
            };
            if m.via == broker.node_id().0 {
                // Its view of the replica order differs from this node's (metadata applied at
                // different times): the two would wait on each other.
                return Err(failed("it pulls through this replica".into()));
            }
            *feed = Some(open);
            Ok(Pulled::Batches {
                batches: r.batches,
                source_start: Offset(r.start_offset),
                source_end: Offset(r.high_watermark),
                via: Some(Upstream {
                    node,
                    failing: !m.error.is_empty(),
                    caught_up: m.lag_records == 0,
                    source_end: Offset(m.source_end),
                    contact: m.contact_ms.map(Duration::from_millis),
                }),
            })
        }
        Got::Ended => Err(failed("it ended the stream".into())),
        Got::Refused(s) => Err(failed(s.message().to_string())),
        Got::Silent => Err(failed("no answer".into())),
    }
}
