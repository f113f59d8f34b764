//! The CLI's producer: an idempotent producer that retries.
//!
//! It gets a producer id from the node and numbers its records per partition, so the node
//! writes each record once however often a request is sent; that makes every failure that
//! may pass (an election, a dead leader, a node it cannot reach, a connection lost midway)
//! safe to retry. It routes records to partitions itself, as the node would (explicit
//! partition, hash of the key, or round robin per request), sends each partition's requests in
//! order, one at a time, and the partitions in parallel. When the node it talks to cannot be
//! reached it moves to another node of the cluster.
//!
//! ```text
//! records ─▶ chunks (≤ 500 records, ≤ 512 KiB, one partition) ─▶ partition worker ─┐
//!                                                               ─▶ partition worker ─┼▶ Publish
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{status_error, Client};
use crate::proto::v1 as pb;
use crate::shard::placement::partition_for_key;

/// Records and bytes one request carries at most.
pub const RECORDS_PER_REQUEST: usize = 500;
pub const BYTES_PER_REQUEST: usize = 512 << 10;
/// Requests queued per partition before the reader waits.
const QUEUED_PER_PARTITION: usize = 4;
/// Waits between retries.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The connection the workers share, and the nodes to move to when it fails.
struct Connection {
    nodes: Vec<String>,
    security: super::SecurityOpts,
    at: usize,
    client: Client,
}

/// A failure a retry may get past. Every request carries a producer id and sequence numbers,
/// so a retry of records that were written is answered with their offsets, not written again.
fn retryable(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(
        s.code(),
        Unavailable | ResourceExhausted | DeadlineExceeded | Aborted | Unknown | Cancelled
    )
}

pub struct Producer {
    conn: Arc<tokio::sync::Mutex<Connection>>,
    topic: String,
    partitions: u32,
    producer_id: u64,
    retry_for: Duration,
}

/// Routes records to partitions as the node would.
pub struct Router {
    topic: String,
    partitions: u32,
    next: u32,
}

/// One request's records, all for one partition.
pub struct Chunk {
    pub partition: u32,
    pub records: Vec<pb::PublishRecord>,
}

impl Producer {
    /// Learns the topic's partitions and the cluster's nodes, and gets a producer id.
    pub async fn start(
        mut client: Client,
        server: &str,
        security: &super::SecurityOpts,
        topic: &str,
        retry_for: Duration,
    ) -> anyhow::Result<Producer> {
        let t = client
            .describe_topic(pb::DescribeTopicRequest { name: topic.into() })
            .await
            .map_err(status_error)?
            .into_inner();
        let partitions = t.topic.map_or(0, |t| t.partitions);
        anyhow::ensure!(partitions > 0, "topic {topic:?} has no partitions");
        // Other nodes to go to if this one stops answering.
        let mut nodes = vec![server.to_string()];
        if let Ok(info) = client.cluster_info(pb::ClusterInfoRequest::default()).await {
            for n in info.into_inner().nodes {
                if !nodes.contains(&n.address) {
                    nodes.push(n.address);
                }
            }
        }
        let conn = Arc::new(tokio::sync::Mutex::new(Connection {
            nodes,
            security: security.clone(),
            at: 0,
            client,
        }));
        let producer_id = with_retries(
            &conn,
            retry_for,
            "getting a producer id",
            |mut c| async move { c.init_producer(pb::InitProducerRequest {}).await },
        )
        .await?
        .producer_id;
        Ok(Producer {
            conn,
            topic: topic.into(),
            partitions,
            producer_id,
            retry_for,
        })
    }

    pub fn router(&self) -> Router {
        Router {
            topic: self.topic.clone(),
            partitions: self.partitions,
            next: 0,
        }
    }
}

impl Router {
    /// The partition a request's records go to: the one given, the key's, or the next in turn.
    pub fn route(&mut self, partition: Option<u32>, key: Option<&[u8]>) -> anyhow::Result<u32> {
        match (partition, key) {
            (Some(p), _) if p < self.partitions => Ok(p),
            (Some(p), _) => anyhow::bail!(
                "partition {p} does not exist; topic {:?} has partitions 0 to {}",
                self.topic,
                self.partitions - 1
            ),
            (None, Some(k)) => Ok(partition_for_key(k, self.partitions)),
            (None, None) => {
                let p = self.next % self.partitions;
                self.next = self.next.wrapping_add(1);
                Ok(p)
            }
        }
    }
}

impl Producer {
    /// Sends the chunks from `chunks` (each partition's in order) and calls `acked` with each
    /// acknowledged request's acks. Returns the number of records acknowledged, or the first
    /// failure that retries could not get past (after which nothing more is sent).
    pub async fn run(
        &self,
        mut chunks: tokio::sync::mpsc::Receiver<Chunk>,
        acked: impl Fn(&[pb::RecordAck]) + Send + Sync + 'static,
    ) -> anyhow::Result<u64> {
        let acked = Arc::new(acked);
        let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel::<anyhow::Error>(1);
        let mut workers: Vec<Option<tokio::sync::mpsc::Sender<Vec<pb::PublishRecord>>>> =
            (0..self.partitions).map(|_| None).collect();
        let mut tasks = Vec::new();
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        loop {
            let chunk = tokio::select! {
                c = chunks.recv() => c,
                Some(e) = failed_rx.recv() => return Err(e),
            };
            let Some(chunk) = chunk else { break };
            let slot = &mut workers[chunk.partition as usize];
            let tx = slot.get_or_insert_with(|| {
                let (tx, rx) = tokio::sync::mpsc::channel(QUEUED_PER_PARTITION);
                let worker = Worker {
                    conn: self.conn.clone(),
                    topic: self.topic.clone(),
                    partition: chunk.partition,
                    producer_id: self.producer_id,
                    next_sequence: 0,
                    retry_for: self.retry_for,
                };
                let failed = failed_tx.clone();
                let acked = acked.clone();
                let total = total.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = worker.run(rx, &*acked, &total).await {
                        let _ = failed.send(e).await;
                    }
                }));
                tx
            });
            // A worker that stopped has reported why; that report ends the loop.
            let _ = tx.send(chunk.records).await;
        }
        drop(workers);
        drop(failed_tx);
        for t in tasks {
            let _ = t.await;
        }
        if let Ok(e) = failed_rx.try_recv() {
            return Err(e);
        }
        Ok(total.load(std::sync::atomic::Ordering::Acquire))
    }
}

/// Sends one partition's requests in order, one at a time.
struct Worker {
    conn: Arc<tokio::sync::Mutex<Connection>>,
    topic: String,
    partition: u32,
    producer_id: u64,
    next_sequence: u64,
    retry_for: Duration,
}

impl Worker {
    async fn run(
        mut self,
        mut rx: tokio::sync::mpsc::Receiver<Vec<pb::PublishRecord>>,
        acked: &(dyn Fn(&[pb::RecordAck]) + Send + Sync),
        total: &std::sync::atomic::AtomicU64,
    ) -> anyhow::Result<()> {
        while let Some(records) = rx.recv().await {
            let n = records.len() as u64;
            anyhow::ensure!(
                self.next_sequence + n <= i32::MAX as u64,
                "this producer numbered 2^31 records in partition {}: publish the rest with \
                 another `tern pub`",
                self.partition
            );
            let request = pb::PublishRequest {
                topic: self.topic.clone(),
                records: records
                    .into_iter()
                    .map(|mut r| {
                        r.partition = Some(self.partition);
                        r
                    })
                    .collect(),
                request_id: 0,
                producer_id: self.producer_id,
                sequence: self.next_sequence as u32,
            };
            let what = format!("publishing to {}/{}", self.topic, self.partition);
            let resp = with_retries(&self.conn, self.retry_for, &what, |mut c| {
                let request = request.clone();
                async move { c.publish(request).await }
            })
            .await?;
            self.next_sequence += n;
            total.fetch_add(resp.acks.len() as u64, std::sync::atomic::Ordering::AcqRel);
            acked(&resp.acks);
        }
        Ok(())
    }
}

/// Makes a call until it succeeds, fails for good, or `retry_for` has passed since the first
/// failure; moves to another node when this one cannot be reached.
async fn with_retries<T, F, Fut>(
    conn: &tokio::sync::Mutex<Connection>,
    retry_for: Duration,
    what: &str,
    call: F,
) -> anyhow::Result<T>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut deadline: Option<Instant> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        let client = conn.lock().await.client.clone();
        let status = match call(client).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) => s,
        };
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + retry_for);
        let text = format!("{:?}: {}", status.code(), status.message());
        if !retryable(&status) || Instant::now() >= deadline {
            return Err(anyhow::anyhow!("{what}: {text}"));
        }
        if backoff == BACKOFF_MIN {
            eprintln!("{what}: {text}; retrying for up to {retry_for:?}");
        }
        // The node itself could not be reached: move to another one.
        if crate::broker::never_sent(&status) {
            let mut c = conn.lock().await;
            if c.nodes.len() > 1 {
                c.at = (c.at + 1) % c.nodes.len();
                let addr = c.nodes[c.at].clone();
                if let Ok(client) = c.security.connect_lazy(&addr) {
                    eprintln!("{what}: trying node {addr}");
                    c.client = client;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
