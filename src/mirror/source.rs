//! A mirror's source: how this node reaches it (credentials, addresses in turn) and what one
//! pull from it comes to.

use std::time::Duration;

use tonic::transport::Channel;

use super::stream::{receive, Feed, Got};
use super::{PULL_BYTES, PULL_SLACK, PULL_WAIT};
use crate::broker::{Broker, BrokerError};
use crate::cluster::MirrorOf;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_client::TernClient;
use crate::shard::mirror::Pulled;
use crate::tls::ClientTls;
use crate::types::{NodeId, Offset};

/// How long asking a source about its topic may take.
pub(super) const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

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
pub(super) struct Source {
    of: MirrorOf,
    access: Access,
    at: usize,
    client: Option<TernClient<Channel>>,
    /// The source does not serve FetchStream (an older version): pulled with Fetch.
    unary: bool,
}

/// `host:port` from an address given as `host:port`, `http://host:port` or
/// `https://host:port` (TLS follows the node's own settings either way).
pub(super) fn host_port(address: &str) -> &str {
    address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address)
        .trim_end_matches('/')
}

impl Source {
    /// Starts at the source's address `first` (modulo their number).
    pub(super) fn new(of: MirrorOf, access: Access, first: usize) -> Source {
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
    pub(super) fn renew(&mut self, access: Access) {
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

/// Where the source partition's log starts, as its leader says (`ListOffsets` for the latest
/// position is answered by the leader).
pub(super) async fn leader_start(
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

/// What the source has from offset `from`: the next answer of the stream open to it if that
/// answer starts there, else of a stream opened now (by Fetch from a source without
/// FetchStream). A stream answers as soon as the source commits, so the records do not wait
/// for a pull to reach the source (a round trip across regions); and every long poll that
/// found nothing is answered, so a silent source is noticed.
pub(super) async fn next(
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
    let mut open = match feed.take() {
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

/// The request for what the source holds from `from` (of the source topic `uid`, if known).
pub(super) fn ask(
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
pub(super) fn answer(r: pb::FetchResponse) -> Pulled {
    Pulled::Batches {
        batches: r.batches,
        source_start: Offset(r.start_offset),
        source_end: Offset(r.high_watermark),
        via: None,
    }
}

/// A source node that did not answer in time: the next is tried.
pub(super) fn silent(source: &mut Source) -> Pulled {
    let address = source.address().to_string();
    source.next();
    Pulled::Failed(format!(
        "{address}: no answer within {} s",
        (PULL_WAIT + PULL_SLACK).as_secs()
    ))
}

/// One pull from the source, from offset `from`.
pub(super) async fn fetch(
    source: &mut Source,
    topic: &str,
    partition: u32,
    from: Offset,
) -> Pulled {
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
pub(super) async fn refused(
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
