//! Mirror topics on the network shard: each replica of a mirror on this node has a puller, a
//! task that long-polls the source partition for whole committed batches (`Fetch` with
//! `raw_batches`, through the source's public API, so the source may be another cluster) and
//! hands them to the replica's core (`shard::mirror`), which checks and appends them at the
//! source's offsets.
//!
//! ```text
//! source cluster ──Fetch(raw_batches, from = replica end)──▶ puller (tokio)
//!                                                              │ CoreRequest::Mirror
//!                                                              ▼
//!                                           core: check CRC + contiguity, append, fsync, commit
//! ```
//!
//! A puller asks from the replica's own end each time, so a restart of either side, a cut
//! link or a failed append resumes exactly where the replica stands: nothing is skipped or
//! copied twice. The only gap is one the source makes: records its retention deleted before
//! they were copied (counted in `tern_mirror_records_skipped`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tonic::transport::Channel;

use crate::broker::{Broker, BrokerError};
use crate::cluster::MirrorOf;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_client::TernClient;
use crate::shard::mirror::{Pulled, Upstream};
use crate::shard::{CoreRequest, PartitionKey};
use crate::tls::ClientTls;
use crate::types::{CoreId, NodeId, Offset};

/// How long one pull waits at the source for records past the replica's end.
const PULL_WAIT: Duration = Duration::from_millis(500);
/// Bytes asked for in one pull (the source answers at least one whole batch).
const PULL_BYTES: u32 = 4 << 20;
/// How much longer than its long poll a pull may take before it is abandoned.
const PULL_SLACK: Duration = Duration::from_secs(10);
/// Pause after a failed pull, doubling up to the most.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A replica pulled through that last heard from the source longer ago than this is passed by
/// for [`UPSTREAM_PASSED`]; so is one that cannot be pulled through.
const UPSTREAM_STALE: Duration = Duration::from_secs(3);
const UPSTREAM_PASSED: Duration = Duration::from_secs(10);
/// ... and one that answers without its progress (an older version) for this long.
const UPSTREAM_OLDER: Duration = Duration::from_secs(300);
/// How long asking a source about its topic may take.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a mirror's source could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror source address {0}")]
    BadAddress(String),
    #[error("the source has no topic {topic:?} ({address})")]
    NoSourceTopic { topic: String, address: String },
    #[error("no source node answered: {0}")]
    Unreachable(String),
    #[error("the source refused: {0}")]
    Refused(String),
    #[error("this node's credentials for mirror sources: {0}")]
    Credentials(String),
}

/// How this node reaches a mirror's source. By default as itself, with its own client TLS
/// (and certificate): right for a source in this cluster, whose nodes trust it. With any of
/// the `mirror_*` settings, as a client of another cluster: TLS trusting `mirror_tls_ca`, the
/// `mirror_tls_cert` if given, and the token in `mirror_token_file` if given; this node's own
/// certificate is then never presented.
#[derive(Clone, Default)]
pub struct Access {
    tls: Option<ClientTls>,
    /// `authorization` metadata for every call: `Bearer <token>`.
    bearer: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Access {
    /// This node's access to mirror sources, from its settings (files are read now).
    pub fn of(broker: &Broker) -> Result<Access, MirrorError> {
        let c = &broker.config;
        if !c.mirror_credentials() {
            return Ok(Access {
                tls: broker.client_tls(),
                bearer: None,
            });
        }
        let bad = |e: &dyn std::fmt::Display| MirrorError::Credentials(e.to_string());
        let tls = match &c.mirror_tls_ca {
            Some(ca) => Some(
                ClientTls::from_files(
                    ca,
                    c.mirror_tls_cert
                        .as_deref()
                        .zip(c.mirror_tls_key.as_deref()),
                    None,
                )
                .map_err(|e| bad(&e))?,
            ),
            None => None,
        };
        let bearer = match &c.mirror_token_file {
            // A token goes only over TLS to a source that proved itself with the CA given
            // (config validation asks for one): in the clear, any host named as a source by
            // whoever creates a mirror would receive it.
            Some(_) if tls.is_none() => {
                return Err(bad(&"mirror_token_file needs mirror_tls_ca"));
            }
            Some(f) => {
                let t = crate::config::read_token_file(f, "mirror token").map_err(|e| bad(&e))?;
                Some(
                    format!("Bearer {t}")
                        .parse()
                        .map_err(|_| bad(&"the mirror token must be printable ASCII"))?,
                )
            }
            None => None,
        };
        Ok(Access { tls, bearer })
    }

    /// A call to the source carrying this node's credentials for it, ended after `timeout`
    /// (a stream is given none: it lives as long as it is read).
    fn request<T>(&self, message: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut call = tonic::Request::new(message);
        if let Some(t) = timeout {
            call.set_timeout(t);
        }
        if let Some(b) = &self.bearer {
            call.metadata_mut()
                .insert(crate::proto::metadata::AUTHORIZATION, b.clone());
        }
        call
    }
}

/// A connection to a mirror's source: its nodes in turn, moving on after a failure.
struct Source {
    of: MirrorOf,
    access: Access,
    at: usize,
    client: Option<TernClient<Channel>>,
    /// The source does not serve FetchStream (an older version): pulled with Fetch.
    unary: bool,
}

/// `host:port` from an address given as `host:port`, `http://host:port` or
/// `https://host:port` (TLS follows the node's own settings either way).
fn host_port(address: &str) -> &str {
    address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address)
        .trim_end_matches('/')
}

impl Source {
    /// Starts at the source's address `first` (modulo their number).
    fn new(of: MirrorOf, access: Access, first: usize) -> Source {
        Source {
            at: first % of.addresses.len().max(1),
            of,
            access,
            client: None,
            unary: false,
        }
    }

    fn address(&self) -> &str {
        host_port(&self.of.addresses[self.at % self.of.addresses.len()])
    }

    fn client(&mut self) -> Result<TernClient<Channel>, MirrorError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let endpoint = crate::tls::endpoint(self.address()).map_err(MirrorError::BadAddress)?;
        // A pull answers at least one whole batch, which may be as large as the format allows.
        let c = TernClient::new(crate::tls::channel(&endpoint, self.access.tls.as_ref()))
            .max_decoding_message_size(crate::log::batch::BATCH_LEN_MAX + (1 << 20));
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Other credentials (read again after a failure): the next call connects with them.
    fn renew(&mut self, access: Access) {
        self.access = access;
        self.client = None;
    }

    /// The next node of the source, after a failure (asked for FetchStream again: the
    /// source's nodes may run different versions during an upgrade).
    fn next(&mut self) {
        self.at = (self.at + 1) % self.of.addresses.len();
        self.client = None;
        self.unary = false;
    }
}

/// The source topic's partition count and identity (none from a node too old to say), from
/// the first of its nodes that answers.
pub async fn source_partitions(
    broker: &Broker,
    of: &MirrorOf,
) -> Result<(u32, Option<std::num::NonZeroU64>), MirrorError> {
    let mut source = Source::new(of.clone(), Access::of(broker)?, 0);
    let mut last = None;
    for _ in 0..of.addresses.len() {
        let mut c = source.client()?;
        let call = source.access.request(
            pb::DescribeTopicRequest {
                name: of.topic.clone(),
            },
            Some(DESCRIBE_TIMEOUT),
        );
        match c.describe_topic(call).await {
            Ok(r) => {
                return r
                    .into_inner()
                    .topic
                    .map(|t| (t.partitions, std::num::NonZeroU64::new(t.uid)))
                    .ok_or_else(|| MirrorError::Refused("no topic in the answer".into()))
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Err(MirrorError::NoSourceTopic {
                    topic: of.topic.clone(),
                    address: source.address().to_string(),
                })
            }
            Err(s) if s.code() == tonic::Code::Unavailable => {
                last = Some(format!(
                    "{}: {}",
                    source.address(),
                    crate::tls::describe(&s)
                ));
                source.next();
            }
            Err(s) => {
                return Err(MirrorError::Refused(format!(
                    "{}: {:?}: {}",
                    source.address(),
                    s.code(),
                    s.message()
                )))
            }
        }
    }
    Err(MirrorError::Unreachable(last.unwrap_or_default()))
}

/// A running puller; dropping it stops the pulls.
pub struct Puller(tokio::task::AbortHandle);

impl Drop for Puller {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts pulling partition `partition` of `of` into this node's replica `key` on `core`.
pub fn start(
    broker: Arc<Broker>,
    key: PartitionKey,
    core: CoreId,
    of: MirrorOf,
    partition: u32,
) -> Puller {
    let task = tokio::spawn(pull(broker, key, core, of, partition));
    Puller(task.abort_handle())
}

async fn pull(broker: Arc<Broker>, key: PartitionKey, core: CoreId, of: MirrorOf, partition: u32) {
    // Made once the replica is ready to pull (a promotion needs no credentials for the
    // source), and its credentials read again after every failed pull (rotated files).
    let mut source: Option<Source> = None;
    let mut backoff = BACKOFF_MIN;
    let mut end: Option<Offset> = None;
    let mut reported: Option<String> = None;
    let mut feed: Option<Feed> = None;
    // The stream to the replica pulled through (`feed` stays the source's).
    let mut via_feed: Option<Feed> = None;
    // Pulls go to the source directly until then (the replica to pull through failed).
    let mut direct_until: Option<Instant> = None;
    tracing::info!(partition = %key, source = %of, "mirroring");
    loop {
        if broker.is_closing() {
            return;
        }
        // A promotion takes over: no more pulls from the source.
        match broker.topic(&key.topic) {
            Ok(t) if t.spec.mirror.is_none() => return,
            Ok(t) if t.spec.promotion.is_some() => {
                // The streams are not read again.
                drop(feed.take());
                drop(via_feed.take());
                promote(&broker, &key, core, partition).await;
                return;
            }
            _ => {}
        }
        let from = match end {
            Some(e) => e,
            None => match replica_end(&broker, &key, core).await {
                Ok(end) => end,
                Err(e) => {
                    tracing::debug!(partition = %key, error = %e, "mirror replica not ready");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        // Through an earlier replica in this region, when there is one that works.
        let via = broker
            .topic(&key.topic)
            .ok()
            .filter(|_| direct_until.is_none_or(|t| Instant::now() >= t))
            .and_then(|t| upstream(&broker, &t, partition).map(|n| (n, t)));
        if let Some((node, topic)) = via {
            match next_via(&broker, node, &mut via_feed, &topic, partition, from).await {
                Ok(pulled) => {
                    // Through the other replica from now on: the source's stream goes.
                    feed = None;
                    // A replica that has not heard from the source lately, or whose own pulls
                    // fail, is passed by: this one may reach the source when it does not.
                    if let Pulled::Batches { via: Some(up), .. } = &pulled {
                        if up.contact.is_none_or(|c| c > UPSTREAM_STALE) || up.failing {
                            direct_until = Some(Instant::now() + UPSTREAM_PASSED);
                        }
                    }
                    match take(&broker, &key, core, pulled).await {
                        Ok(p) => {
                            end = Some(p.next);
                            backoff = BACKOFF_MIN;
                        }
                        Err(e) => {
                            end = None;
                            via_feed = None;
                            tracing::debug!(partition = %key, error = %e, "mirror replica did not take a pull");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                Err((why, pass)) => {
                    // The source's stream, if open, is kept: the pulls go on from it.
                    tracing::debug!(partition = %key, %node, error = %why, "cannot pull through another replica; pulling from the source");
                    via_feed = None;
                    direct_until = Some(Instant::now() + pass);
                }
            }
            continue;
        }
        via_feed = None;
        let src = match source.as_mut() {
            Some(s) => s,
            None => match Access::of(&broker) {
                // Each replica of each partition starts at another source node: the source's
                // work of serving the mirror is spread over its nodes (a node serves from its
                // own replica when it has one).
                Ok(a) => {
                    let me = broker.node_id();
                    let replica = broker
                        .topic(&key.topic)
                        .ok()
                        .and_then(|t| t.replicas(partition).iter().position(|n| *n == me));
                    let first = replica.unwrap_or(me.0 as usize) + partition as usize;
                    source.insert(Source::new(of.clone(), a, first))
                }
                Err(e) => {
                    let why = e.to_string();
                    if reported.as_ref() != Some(&why) {
                        tracing::error!(partition = %key, source = %of, error = %why, "mirror cannot pull");
                        reported = Some(why);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        let pulled = next(src, &mut feed, &of.topic, partition, from).await;
        let failed = match &pulled {
            Pulled::Failed(why) => {
                // Credentials rotated in place are picked up by the next pull.
                feed = None;
                match Access::of(&broker) {
                    Ok(a) => src.renew(a),
                    Err(_) => source = None,
                }
                Some(why.clone())
            }
            _ => None,
        };
        let failed = match take(&broker, &key, core, pulled).await {
            Ok(p) => {
                end = Some(p.next);
                failed
            }
            Err(e) => {
                // Ask the replica where it stands before the next pull; what the stream
                // answered since is not what it needs.
                end = None;
                feed = None;
                Some(e.to_string())
            }
        };
        match failed {
            Some(why) => {
                if reported.as_ref() != Some(&why) {
                    tracing::warn!(partition = %key, source = %of, error = %why, "mirror pull failed; retrying");
                    reported = Some(why);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            None => {
                if reported.take().is_some() {
                    tracing::info!(partition = %key, source = %of, "mirror pulling again");
                }
                backoff = BACKOFF_MIN;
            }
        }
    }
}

/// Where this node's replica `key` (on `core`) ends.
async fn replica_end(
    broker: &Broker,
    key: &PartitionKey,
    core: CoreId,
) -> Result<Offset, crate::shard::CoreError> {
    let ask = |reply| CoreRequest::Positions {
        key: key.clone(),
        reply,
    };
    Ok(broker.shards.ask(core, ask).await?.next)
}

/// Hands what a pull came to to the replica `key`; answers its log's positions after.
async fn take(
    broker: &Broker,
    key: &PartitionKey,
    core: CoreId,
    pulled: Pulled,
) -> Result<crate::log::Positions, crate::shard::CoreError> {
    let ask = |reply| CoreRequest::Mirror {
        key: key.clone(),
        pulled,
        reply,
    };
    broker.shards.ask(core, ask).await
}

/// How often a replica being promoted looks at its progress towards the cut.
const PROMOTION_STEP: Duration = Duration::from_millis(200);

/// A replica's part in its mirror's promotion (see `controller::promote`): it stops taking
/// batches from the source, then, once the partition's cut is decided, copies what it lacks
/// up to the cut from another replica of the mirror (a replica holding more is cut when it
/// reopens as a Raft group). Ends when the topic stops being a mirror (the replica reopens).
async fn promote(broker: &Arc<Broker>, key: &PartitionKey, core: CoreId, partition: u32) {
    let mut stopped = false;
    loop {
        if broker.is_closing() {
            return;
        }
        let Ok(topic) = broker.topic(&key.topic) else {
            return;
        };
        if topic.spec.mirror.is_none() {
            return;
        }
        let cut = topic
            .spec
            .promotion
            .as_ref()
            .and_then(|p| p.cuts.as_ref())
            .and_then(|c| c.get(partition as usize).cloned());
        let pulled = match (stopped, cut) {
            (false, _) => Some(Pulled::Stop),
            (true, None) => None,
            (true, Some(cut)) => {
                let end = replica_end(broker, key, core).await.unwrap_or(cut.end);
                match end < cut.end {
                    true => copy(broker, &topic, partition, end, cut.end).await,
                    false => None,
                }
            }
        };
        if let Some(pulled) = pulled {
            match take(broker, key, core, pulled).await {
                Ok(_) => stopped = true,
                Err(e) => {
                    tracing::debug!(partition = %key, error = %e, "promotion step failed; retrying")
                }
            }
        }
        tokio::time::sleep(PROMOTION_STEP).await;
    }
}

/// Batches `[from, upto)` of a mirror's partition from another replica of it (the nearest that
/// answers), for a replica short of its promotion's cut.
async fn copy(
    broker: &Arc<Broker>,
    topic: &crate::broker::Topic,
    partition: u32,
    from: Offset,
    upto: Offset,
) -> Option<Pulled> {
    let req = pb::FetchRequest {
        topic: topic.spec.name.clone(),
        partition,
        offset: from.0,
        max_bytes: PULL_BYTES,
        raw_batches: true,
        ..Default::default()
    };
    for node in broker.nearest_first(topic.replicas(partition)) {
        let r = broker
            .call_peer(node, |mut c| {
                let mut call = broker.relay(req.clone(), &crate::broker::Origin::default());
                call.set_timeout(PULL_SLACK);
                async move { c.fetch(call).await }
            })
            .await;
        match r {
            Ok(r) if !r.batches.is_empty() => {
                return Some(Pulled::Copied {
                    batches: r.batches,
                    upto,
                })
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(%node, error = %e, "copying towards the promotion's cut"),
        }
    }
    None
}

/// Where the source partition's log starts, as its leader says (`ListOffsets` for the latest
/// position is answered by the leader).
async fn leader_start(
    c: &mut TernClient<Channel>,
    access: &Access,
    topic: &str,
    partition: u32,
) -> Option<u64> {
    let call = access.request(
        pb::ListOffsetsRequest {
            topic: topic.to_string(),
            partitions: vec![partition],
            position: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Latest(true)),
            }),
        },
        Some(PULL_SLACK),
    );
    let r = c.list_offsets(call).await.ok()?.into_inner();
    let p = r
        .partitions
        .into_iter()
        .find(|p| p.partition == partition)?;
    // `leader` set: a follower answered from its own view.
    (p.leader == 0).then_some(p.start_offset)
}

/// A FetchStream open to the source, and the offset its next answer starts at.
struct Feed {
    answers: tonic::Streaming<pb::FetchResponse>,
    from: Offset,
    /// How the stream ended after the answers last taken.
    failed: Option<tonic::Status>,
    /// Opened to another replica of the mirror (this cluster's node), not to the source.
    via: Option<NodeId>,
}

/// Answers of a stream taken in together, at most: those that arrived while the replica took
/// the previous ones in go to it as one append (one fsync).
const DRAIN_ANSWERS: usize = 64;

/// What the source has from offset `from`: the next answer of the stream open to it if that
/// answer starts there, else of a stream opened now (by Fetch from a source without
/// FetchStream). A stream answers as soon as the source commits, so the records do not wait
/// for a pull to reach the source (a round trip across regions); and every long poll that
/// found nothing is answered, so a silent source is noticed.
async fn next(
    source: &mut Source,
    feed: &mut Option<Feed>,
    topic: &str,
    partition: u32,
    from: Offset,
) -> Pulled {
    if source.unary {
        return fetch(source, topic, partition, from).await;
    }
    let mut c = match source.client() {
        Ok(c) => c,
        Err(e) => return Pulled::Failed(e.to_string()),
    };
    let open = match feed.take() {
        Some(Feed {
            failed: Some(s),
            via: None,
            ..
        }) => return refused(source, &mut c, s, topic, partition, from).await,
        Some(f) if f.via.is_none() && f.from == from => f,
        _ => {
            let call = source
                .access
                .request(ask(topic, partition, from, source.of.source_uid), None);
            match tokio::time::timeout(PULL_SLACK, c.fetch_stream(call)).await {
                Ok(Ok(r)) => Feed {
                    answers: r.into_inner(),
                    from,
                    failed: None,
                    via: None,
                },
                Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => {
                    tracing::info!(
                        source = source.address(),
                        "the mirror's source has no FetchStream: pulling with Fetch"
                    );
                    source.unary = true;
                    return fetch(source, topic, partition, from).await;
                }
                Ok(Err(s)) => return refused(source, &mut c, s, topic, partition, from).await,
                Err(_) => return silent(source),
            }
        }
    };
    let mut open = open;
    match receive(&mut open, from).await {
        Got::Answer(r) => {
            *feed = Some(open);
            answer(r)
        }
        Got::Ended => Pulled::Failed(format!("{}: the source ended the stream", source.address())),
        Got::Refused(s) => refused(source, &mut c, s, topic, partition, from).await,
        Got::Silent => silent(source),
    }
}

/// What an open stream gave.
enum Got {
    /// An answer, with those that had arrived after it merged in.
    Answer(pb::FetchResponse),
    Ended,
    Refused(tonic::Status),
    /// Nothing within the long poll and its slack.
    Silent,
}

/// The next answer of the stream `open` (which continues at `from`), and those already
/// arrived after it, as one: they go to the replica as one append (one fsync).
async fn receive(open: &mut Feed, from: Offset) -> Got {
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

/// A replica of the mirror in this node's region listed before this one for the partition,
/// and heard from lately: this replica pulls through it instead of crossing to the source
/// (one copy of each batch crosses the WAN per region, not one per replica). None for the
/// first replica of a region, which pulls from the source. Always an earlier replica, so two
/// replicas never pull through each other.
fn upstream(broker: &Broker, topic: &crate::broker::Topic, partition: u32) -> Option<NodeId> {
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
async fn next_via(
    broker: &Broker,
    node: NodeId,
    feed: &mut Option<Feed>,
    topic: &crate::broker::Topic,
    partition: u32,
    from: Offset,
) -> Result<Pulled, (String, Duration)> {
    let failed = |why: String| (why, UPSTREAM_PASSED);
    let open = match feed.take() {
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
    let mut open = open;
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

/// The request for what the source holds from `from` (of the source topic `uid`, if known).
fn ask(
    topic: &str,
    partition: u32,
    from: Offset,
    uid: Option<std::num::NonZeroU64>,
) -> pb::FetchRequest {
    pb::FetchRequest {
        topic: topic.to_string(),
        topic_uid: uid.map_or(0, |u| u.get()),
        partition,
        offset: from.0,
        max_bytes: PULL_BYTES,
        max_wait_ms: PULL_WAIT.as_millis() as u32,
        raw_batches: true,
        ..Default::default()
    }
}

/// A source's answer as the replica takes it.
fn answer(r: pb::FetchResponse) -> Pulled {
    Pulled::Batches {
        batches: r.batches,
        source_start: Offset(r.start_offset),
        source_end: Offset(r.high_watermark),
        via: None,
    }
}

/// A source node that did not answer in time: the next is tried.
fn silent(source: &mut Source) -> Pulled {
    let address = source.address().to_string();
    source.next();
    Pulled::Failed(format!(
        "{address}: no answer within {} s",
        (PULL_WAIT + PULL_SLACK).as_secs()
    ))
}

/// One pull from the source, from offset `from`.
async fn fetch(source: &mut Source, topic: &str, partition: u32, from: Offset) -> Pulled {
    let mut c = match source.client() {
        Ok(c) => c,
        Err(e) => return Pulled::Failed(e.to_string()),
    };
    let call = source.access.request(
        ask(topic, partition, from, source.of.source_uid),
        Some(PULL_WAIT + PULL_SLACK),
    );
    match c.fetch(call).await {
        Ok(r) => answer(r.into_inner()),
        Err(s) => refused(source, &mut c, s, topic, partition, from).await,
    }
}

/// What the source's refusal `s` of a pull from `from` comes to.
async fn refused(
    source: &mut Source,
    c: &mut TernClient<Channel>,
    s: tonic::Status,
    topic: &str,
    partition: u32,
    from: Offset,
) -> Pulled {
    let address = source.address().to_string();
    let e = BrokerError::from_peer(NodeId(0), s);
    match e.range() {
        // The source deleted what this replica would copy next, if its leader says so
        // too (a source follower restarted from a snapshot starts later than its
        // leader's log).
        Some((start, end)) if from.0 < start && start <= end => {
            match leader_start(c, &source.access, topic, partition).await {
                Some(s) if s > from.0 => Pulled::Restart {
                    source_start: Offset(s),
                    source_end: Offset(end.max(s)),
                },
                _ => {
                    source.next();
                    Pulled::Failed(format!(
                        "{address}: a replica of the source no longer holds offset {}, \
                         but its leader does (or could not be asked); asking again",
                        from.0
                    ))
                }
            }
        }
        Some((_, end)) => Pulled::Failed(format!(
            "the source ({address}) answered that the partition ends at offset {end}, \
             before this mirror's end {} (a source replica behind its leader, or a \
             source that lost records or was created again); nothing is copied",
            from.0
        )),
        None => {
            if e.retryable() {
                source.next();
            }
            Pulled::Failed(format!("{address}: {e}"))
        }
    }
}
