//! The cluster as the client knows it, and a connection per node.
//!
//! ```text
//! bootstrap ──ClusterInfo──▶ nodes (id → address, region), topics (partition → leader, replicas)
//! publish(topic, p) ──▶ leader's address ── UNAVAILABLE + tern-leader ──▶ note it, resend
//!                                        ── UNAVAILABLE, no hint ──▶ ask the cluster again
//! read(topic) ──▶ a node in the client's region (its replica serves), else any
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{retryable, Error};
use crate::layout::Layout;
use crate::proto::tern_client::TernClient;
use crate::proto::{self as pb};

/// A client of one node's API, with the configured credentials on every call.
pub type Grpc = TernClient<InterceptedService<Channel, Credentials>>;

/// How the client connects and what it says about itself.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The client's region: reads go to a node of it (whose replica serves them), and node
    /// addresses are those advertised to it. `None`: no preference.
    pub region: Option<String>,
    /// A bearer token for clusters that require authentication (`tern user create`).
    pub token: Option<String>,
    /// Connect over TLS (the nodes' `--tls-cert`), verifying the nodes against a CA and
    /// presenting a client certificate if the cluster asks for one (mTLS). `None`: plaintext.
    pub tls: Option<Tls>,
    /// Limit on establishing a connection to a node.
    pub connect_timeout: Duration,
    /// Limit on one call (a publish waits for a quorum's fsync).
    pub request_timeout: Duration,
    /// Long-lived streams (a producer keeps one per partition it writes) one connection to a
    /// node carries at most; more take more connections. Keep it under the nodes'
    /// `--max-concurrent-streams` (1,024 by default): streams beyond that wait for a place.
    pub streams_per_connection: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            region: None,
            token: None,
            tls: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            streams_per_connection: 256,
        }
    }
}

/// TLS towards the nodes: the CA that signed their certificates, a client certificate for
/// clusters that authenticate clients by certificate, and the name to check the nodes'
/// certificates against when it is not the host of their addresses.
///
/// ```no_run
/// # fn example() -> Result<(), tern_client::Error> {
/// use tern_client::{ClientOptions, Tls};
///
/// let tls = Tls::from_files("certs/ca.pem", Some(("certs/client-carol.pem", "certs/client-carol-key.pem")))?
///     .server_name("localhost");
/// let options = ClientOptions { tls: Some(tls), ..ClientOptions::default() };
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Tls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    server_name: Option<String>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Trust the CA certificate(s) in `ca_pem` (PEM).
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Tls {
        Tls {
            ca_pem: ca_pem.into(),
            identity: None,
            server_name: None,
        }
    }

    /// Reads the CA and, if given, a client certificate and its key (PEM files).
    pub fn from_files(
        ca: impl AsRef<std::path::Path>,
        cert_and_key: Option<(impl AsRef<std::path::Path>, impl AsRef<std::path::Path>)>,
    ) -> Result<Tls, Error> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))
        };
        let mut tls = Tls::new(read(ca.as_ref())?);
        if let Some((cert, key)) = cert_and_key {
            tls = tls.identity(read(cert.as_ref())?, read(key.as_ref())?);
        }
        Ok(tls)
    }

    /// Present this certificate chain and key (PEM) to the nodes.
    pub fn identity(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Tls {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Check the nodes' certificates against this name instead of their addresses' hosts.
    pub fn server_name(mut self, name: impl Into<String>) -> Tls {
        self.server_name = Some(name.into());
        self
    }

    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            c = c.domain_name(name.clone());
        }
        c
    }
}

/// Adds the bearer token to every call.
#[derive(Clone, Default)]
pub struct Credentials {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.authorization {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// A stream's place on one of [`Client::stream_node`]'s connections.
pub(crate) struct StreamSlot {
    inner: Arc<Inner>,
    addr: String,
    index: usize,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut pool = self.inner.streams.lock().unwrap();
        if let Some((_, n)) = pool
            .get_mut(&self.addr)
            .and_then(|conns| conns.get_mut(self.index))
        {
            *n = n.saturating_sub(1);
        }
    }
}

/// Shortest time between two reads of the cluster's layout caused by failures.
const REFRESH_MIN: Duration = Duration::from_millis(200);
/// How long a read of the layout waits for a node's answer before asking the next one too.
const LAYOUT_HEDGE: Duration = Duration::from_millis(300);
/// HTTP/2 pings on idle connections, and how long one may go unanswered.
const KEEPALIVE: Duration = Duration::from_secs(10);
/// Nodes a read of the layout asks at most, beyond the one that answered it, for the leaders
/// of partitions that node holds no replica of.
const FILL_NODES: usize = 16;
/// How long a node asked for leaders by [`Client::fill_leaders`] has to answer.
const FILL_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection to a Tern cluster. Cheap to clone; clones share connections and what is known
/// of the cluster.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) options: ClientOptions,
    credentials: Credentials,
    bootstrap: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    /// Per node: connections for long-lived streams, and how many each carries.
    streams: Mutex<HashMap<String, Vec<(Channel, usize)>>>,
    layout: Mutex<Layout>,
    /// One read of the layout at a time; when the last one ended.
    refreshing: tokio::sync::Mutex<Option<Instant>>,
    /// A background read of the layout ([`Client::refresh_soon`]) is queued or running.
    refresh_queued: std::sync::atomic::AtomicBool,
    /// The fill of leaders of the last read of the layout ([`Client::fill_leaders`]).
    filling: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Client {
    /// Connects to the cluster through the first of `bootstrap` (host:port) that answers, and
    /// reads its layout.
    pub async fn connect<I, S>(bootstrap: I, options: ClientOptions) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let bootstrap: Vec<String> = bootstrap.into_iter().map(Into::into).collect();
        if bootstrap.is_empty() {
            return Err(Error::Invalid("no bootstrap address".into()));
        }
        let credentials = match &options.token {
            None => Credentials::default(),
            Some(t) => {
                let t = t.trim();
                if t.is_empty() {
                    return Err(Error::Invalid("the token is empty".into()));
                }
                let value = format!("Bearer {t}").parse().map_err(|_| {
                    Error::Invalid("the token has characters a header cannot carry".into())
                })?;
                Credentials {
                    authorization: Some(value),
                }
            }
        };
        let client = Client {
            inner: Arc::new(Inner {
                options,
                credentials,
                bootstrap,
                channels: Mutex::default(),
                streams: Mutex::default(),
                layout: Mutex::default(),
                refreshing: tokio::sync::Mutex::new(None),
                refresh_queued: std::sync::atomic::AtomicBool::new(false),
                filling: Mutex::new(None),
            }),
        };
        client.read_layout(true).await?;
        Ok(client)
    }

    /// A gRPC client of the node at `addr` (connections are made once and shared).
    pub fn node(&self, addr: &str) -> Result<Grpc, Error> {
        let mut channels = self.inner.channels.lock().unwrap();
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = self.channel(addr)?;
                channels.insert(addr.to_string(), c.clone());
                c
            }
        };
        Ok(TernClient::with_interceptor(
            channel,
            self.inner.credentials.clone(),
        ))
    }

    /// A gRPC client of the node at `addr` for one long-lived stream, on a connection that
    /// carries at most [`ClientOptions::streams_per_connection`] of them (a node serves a bounded number of
    /// streams per connection, and a producer writing many partitions keeps one per
    /// partition); the slot is freed when the returned [`StreamSlot`] is dropped.
    pub(crate) fn stream_node(&self, addr: &str) -> Result<(Grpc, StreamSlot), Error> {
        let mut pool = self.inner.streams.lock().unwrap();
        let conns = pool.entry(addr.to_string()).or_default();
        let most = self.inner.options.streams_per_connection.max(1);
        let index = match conns.iter().position(|(_, n)| *n < most) {
            Some(i) => i,
            None => {
                conns.push((self.channel(addr)?, 0));
                conns.len() - 1
            }
        };
        conns[index].1 += 1;
        let grpc =
            TernClient::with_interceptor(conns[index].0.clone(), self.inner.credentials.clone());
        Ok((
            grpc,
            StreamSlot {
                inner: self.inner.clone(),
                addr: addr.to_string(),
                index,
            },
        ))
    }

    /// A new connection (made on first use) to the node at `addr`.
    fn channel(&self, addr: &str) -> Result<Channel, Error> {
        let o = &self.inner.options;
        let scheme = if o.tls.is_some() { "https" } else { "http" };
        let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Error::Invalid(format!("address {addr:?}: {e}")))?;
        if let Some(tls) = &o.tls {
            e = e
                .tls_config(tls.config())
                .map_err(|e| Error::Invalid(format!("TLS settings: {e}")))?;
        }
        let c = e
            .connect_timeout(o.connect_timeout)
            .timeout(o.request_timeout)
            .tcp_nodelay(true)
            // A subscription's stream must notice a node that went silent (a cut
            // network, a frozen machine), not only one that closed its connection.
            .http2_keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE)
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(c)
    }

    /// The nodes to ask about the cluster: those known, then the bootstrap addresses.
    fn candidates(&self) -> Vec<String> {
        // The nodes of the client's region first, then the others, then the bootstrap list.
        let mut v = self.read_nodes();
        for b in &self.inner.bootstrap {
            if !v.contains(b) {
                v.push(b.clone());
            }
        }
        v
    }

    /// Reads the cluster's layout (ClusterInfo) from the first node that answers and has
    /// caught up with the cluster's metadata (a node just restarted may not know the topics
    /// yet). The nodes are asked in turn, the next one as soon as one fails and otherwise
    /// [`LAYOUT_HEDGE`] after the last was asked: a node that is down or hangs delays a read by
    /// that, not by the connect or request timeout.
    /// The leaders the answering node does not know are asked of other nodes in the
    /// background ([`Client::fill_leaders`]); with `wait_fill`, for up to [`LAYOUT_HEDGE`]
    /// before returning (a first read, which a publish is about to use).
    async fn read_layout(&self, wait_fill: bool) -> Result<(), Error> {
        let mut last = String::from("no node to ask");
        let candidates = self.candidates();
        let mut next = candidates.iter();
        let mut asking = tokio::task::JoinSet::new();
        let region = self.inner.options.region.clone().unwrap_or_default();
        let ask = |asking: &mut tokio::task::JoinSet<_>, addr: &String| {
            let (client, addr, region) = (self.clone(), addr.clone(), region.clone());
            asking.spawn(async move {
                let answer = match client.node(&addr) {
                    Ok(mut c) => c
                        .cluster_info(pb::ClusterInfoRequest { region })
                        .await
                        .map(tonic::Response::into_inner)
                        .map_err(|s| format!("{addr}: {}", s.message())),
                    Err(e) => Err(e.to_string()),
                };
                (addr, answer)
            });
        };
        loop {
            if asking.is_empty() {
                match next.next() {
                    Some(addr) => ask(&mut asking, addr),
                    None => break,
                }
            }
            let more = next.len() > 0;
            tokio::select! {
                done = asking.join_next() => {
                    let Some(Ok((addr, answer))) = done else { continue };
                    match answer {
                        Ok(info) if info.ready => {
                            let answered = info.node_id;
                            let generation = self.inner.layout.lock().unwrap().learn(info);
                            // Nodes name the leaders of their own replicas only: ask the
                            // holders of the rest (what comes later is learnt in the
                            // background). A fill of an earlier read is no longer wanted.
                            let fill =
                                tokio::spawn(self.clone().fill_leaders(answered, generation));
                            let earlier = self
                                .inner
                                .filling
                                .lock()
                                .unwrap()
                                .replace(fill.abort_handle());
                            if let Some(earlier) = earlier {
                                earlier.abort();
                            }
                            if wait_fill {
                                let _ = tokio::time::timeout(LAYOUT_HEDGE, fill).await;
                            }
                            return Ok(());
                        }
                        Ok(_) => last = format!("{addr}: not caught up with the cluster yet"),
                        Err(e) => last = e,
                    }
                    if let Some(addr) = next.next() {
                        ask(&mut asking, addr);
                    }
                }
                _ = tokio::time::sleep(LAYOUT_HEDGE), if more => {
                    if let Some(addr) = next.next() {
                        ask(&mut asking, addr);
                    }
                }
            }
        }
        Err(Error::Unreachable {
            tried: candidates.join(", "),
            last,
        })
    }

    /// Asks nodes holding replicas of the partitions whose leader the read of the layout of
    /// `generation` did not name (a node names the leaders of its own replicas only), and
    /// notes the leaders they name. Holders in the client's region are asked first; a
    /// partition whose holder did not answer is asked of another in a second round. At most
    /// [`FILL_NODES`] nodes in all, each given [`FILL_TIMEOUT`].
    async fn fill_leaders(self, answered: u64, generation: u64) {
        let region = self.inner.options.region.clone().unwrap_or_default();
        let mut asked: Vec<u64> = vec![answered];
        for _round in 0..2 {
            let asks = {
                let layout = self.inner.layout.lock().unwrap();
                if layout.generation != generation {
                    return;
                }
                layout.fill_asks(&asked, &region, FILL_NODES)
            };
            if asks.is_empty() {
                return;
            }
            let mut asking = tokio::task::JoinSet::new();
            for (id, addr) in asks {
                asked.push(id);
                let (client, region) = (self.clone(), region.clone());
                asking.spawn(async move {
                    let mut c = client.node(&addr).ok()?;
                    let call = c.cluster_info(pb::ClusterInfoRequest { region });
                    let info = tokio::time::timeout(FILL_TIMEOUT, call)
                        .await
                        .ok()?
                        .ok()?
                        .into_inner();
                    // A node that has not caught up with the metadata may not know the
                    // topics' current replicas.
                    (info.node_id == id && info.ready).then_some(info)
                });
            }
            while let Some(answer) = asking.join_next().await {
                if let Ok(Some(info)) = answer {
                    let mut layout = self.inner.layout.lock().unwrap();
                    layout.learn_leaders(&info, generation);
                }
            }
        }
    }

    /// Reads the layout again, unless another task just did (at most every 200 ms).
    pub(crate) async fn refresh(&self) {
        self.refresh_within(REFRESH_MIN).await
    }

    /// Reads the layout again unless it was read within `age`.
    pub(crate) async fn refresh_within(&self, age: Duration) {
        let mut last = self.inner.refreshing.lock().await;
        if last.is_some_and(|t| t.elapsed() < age) {
            return;
        }
        let _ = self.read_layout(false).await;
        *last = Some(Instant::now());
    }

    /// The number of partitions of `topic`; asks the cluster if it is not known yet.
    pub async fn partitions(&self, topic: &str) -> Result<u32, Error> {
        if let Some(n) = self.known_partitions(topic) {
            return Ok(n);
        }
        self.read_layout(true).await?;
        self.known_partitions(topic)
            .ok_or_else(|| Error::NoTopic(topic.to_string()))
    }

    fn known_partitions(&self, topic: &str) -> Option<u32> {
        let layout = self.inner.layout.lock().unwrap();
        layout.topics.get(topic).map(|p| p.len() as u32)
    }

    /// The id of the node that leads `topic`/`partition` as far as this client knows (from
    /// the nodes holding its replicas, or from a node that named it when it refused a
    /// request): where its producers send the partition's records. `None`: not known yet.
    /// (ClusterInfo names the leader only of the partitions the answering node holds a
    /// replica of; the client asks the holders of the others after each read of the layout.)
    pub fn leader(&self, topic: &str, partition: u32) -> Option<u64> {
        self.inner.layout.lock().unwrap().leader(topic, partition)
    }

    /// Where a publish to `topic`/`partition` goes: its leader, else a replica (which
    /// forwards), else any node; with the node's id (0: any node).
    pub(crate) fn leader_addr(&self, topic: &str, partition: u32) -> Option<(u64, String)> {
        let layout = self.inner.layout.lock().unwrap();
        let p = layout.topics.get(topic)?.get(partition as usize);
        let ids = p
            .map(|p| {
                std::iter::once(p.leader)
                    .chain(p.replicas.iter().copied())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        ids.iter()
            .find_map(|id| layout.nodes.get(id).map(|(a, _)| (*id, a.clone())))
            .or_else(|| layout.nodes.values().next().map(|(a, _)| (0, a.clone())))
    }

    /// Reads the layout again in the background unless it was read within `age`, or a read
    /// started this way is still on its way (so slow reads do not pile up).
    pub(crate) fn refresh_soon(&self, age: Duration) {
        if self
            .inner
            .refresh_queued
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let client = self.clone();
        tokio::spawn(async move {
            client.refresh_within(age).await;
            client
                .inner
                .refresh_queued
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// A node `failed` did not serve `topic`/`partition`: the leader it named, if any, is
    /// noted; else the layout is read again.
    pub(crate) async fn failed(&self, topic: &str, partition: u32, status: &tonic::Status) {
        if let Some(l) = crate::error::leader_hint(status) {
            // Named now, by a node that knows: a fill's answer does not replace it.
            if self.inner.layout.lock().unwrap().hint(topic, partition, l) {
                return;
            }
        }
        if retryable(status) {
            self.refresh().await;
        }
    }

    /// The nodes to read from, best first: those of the client's region, then the others.
    pub(crate) fn read_nodes(&self) -> Vec<String> {
        let layout = self.inner.layout.lock().unwrap();
        let mut nodes: Vec<&(String, String)> = layout.nodes.values().collect();
        if let Some(r) = &self.inner.options.region {
            nodes.sort_by_key(|(_, region)| region != r);
        }
        let mut v: Vec<String> = nodes.into_iter().map(|(a, _)| a.clone()).collect();
        if v.is_empty() {
            v = self.inner.bootstrap.clone();
        }
        v
    }

    /// Asks the cluster for a producer id (retrying through other nodes while it cannot
    /// answer).
    pub(crate) async fn init_producer(&self, retry_for: Duration) -> Result<u64, Error> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut k = 0;
        loop {
            let nodes = self.read_nodes();
            let addr = &nodes[k % nodes.len()];
            k += 1;
            let s = match self
                .node(addr)?
                .init_producer(pb::InitProducerRequest {})
                .await
            {
                Ok(r) => return Ok(r.into_inner().producer_id),
                Err(s) if retryable(&s) => s,
                Err(s) => return Err(Error::Status(s)),
            };
            if start.elapsed() >= retry_for {
                return Err(Error::GaveUp {
                    after: start.elapsed(),
                    last: s.message().to_string(),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}
