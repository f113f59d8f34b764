//! `tern pub` and `tern sub`.

use std::ffi::OsString;
use std::io::BufRead;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;

/// Records and bytes one request of `tern pub` carries at most.
const RECORDS_PER_REQUEST: usize = 500;
const BYTES_PER_REQUEST: usize = 512 << 10;
use super::{status_error, ClientOpts};

#[derive(Args)]
pub struct PubArgs {
    pub topic: String,
    /// The record's value; without it (and without --file), every line of standard input is
    /// one record (any bytes; the newline is not part of the record).
    #[arg(conflicts_with = "file")]
    pub value: Option<OsString>,
    /// Publish a whole file as one record ('-' for all of standard input).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Key of the record(s): records with one key go to one partition, in order.
    #[arg(long, short)]
    pub key: Option<String>,
    /// Partition to publish to (default: by key, or round robin).
    #[arg(long, short)]
    pub partition: Option<u32>,
    /// A header as NAME=VALUE; repeatable.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Hide the record from readers this many seconds after publishing.
    #[arg(long)]
    pub expiry_seconds: Option<u32>,
    /// Do not print each record's partition and offset.
    #[arg(long, short)]
    pub quiet: bool,
    /// How long to keep retrying a request that failed for a passing reason (an election, a
    /// node that went away), in ms; 0 fails at once. Retries never write a record twice.
    #[arg(long, default_value_t = 30_000)]
    pub retry_ms: u64,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// Where `tern pub` reads its records.
enum Source {
    Value(Bytes),
    File(PathBuf),
    Lines,
}

impl PubArgs {
    fn source(&self) -> Source {
        match (&self.value, &self.file) {
            (Some(v), _) => Source::Value(Bytes::from(v.clone().into_vec())),
            (None, Some(f)) => Source::File(f.clone()),
            (None, None) => Source::Lines,
        }
    }

    fn headers(&self) -> anyhow::Result<Vec<(String, Bytes)>> {
        self.headers
            .iter()
            .map(|h| match h.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Bytes::from(v.to_string()))),
                _ => anyhow::bail!("header {h:?} must be NAME=VALUE"),
            })
            .collect()
    }
}

fn print_ack(opts: &ClientOpts, topic: &str, a: tern_client::Ack) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = if opts.json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"topic": topic, "partition": a.partition, "offset": a.offset})
        )
    } else {
        writeln!(out, "{topic}/{}@{}", a.partition, a.offset)
    };
}

/// Reads standard input on its own thread, one record per line, as raw bytes.
fn read_lines() -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(RECORDS_PER_REQUEST * 4);
    std::thread::spawn(move || {
        let mut input = std::io::BufReader::with_capacity(1 << 16, std::io::stdin().lock());
        loop {
            let mut line = Vec::new();
            match input.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    if tx.blocking_send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

pub async fn publish(a: PubArgs) -> anyhow::Result<()> {
    let headers = a.headers()?;
    let (key, partition, expiry) = (a.key.clone(), a.partition, a.expiry_seconds);
    let record = move |value: Bytes| {
        let mut r = tern_client::Record::new(value);
        r.headers = headers.clone();
        r.key = key.clone().map(Bytes::from);
        r.partition = partition;
        r.expiry_seconds = expiry;
        r
    };
    let source = a.source();
    let lines_mode = !matches!(source, Source::Value(_));
    // A file is read whole before anything is sent: a read error publishes nothing.
    let file = match &source {
        Source::File(path) if path.as_os_str() == "-" => {
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut all)
                .map_err(|e| anyhow::anyhow!("reading standard input: {e}"))?;
            Some(Bytes::from(all))
        }
        Source::File(path) => {
            Some(Bytes::from(std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("reading {}: {e}", path.display())
            })?))
        }
        _ => None,
    };
    let client = a.opts.cluster_client().await?;
    let producer = tern_client::Producer::new(
        &client,
        tern_client::ProducerOptions {
            linger: Duration::from_millis(1),
            max_batch_records: RECORDS_PER_REQUEST,
            max_batch_bytes: BYTES_PER_REQUEST,
            retry_for: Duration::from_millis(a.retry_ms),
            ..tern_client::ProducerOptions::default()
        },
    )
    .await
    .map_err(client_error)?;
    // Acknowledgments are printed in the order the records were read. The first failure
    // stops the reading; what was sent before it is still waited for, and every record
    // acknowledged is printed and counted.
    let (acks, mut acks_rx) = tokio::sync::mpsc::channel::<tern_client::AckFuture>(4096);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let opts = a.opts.clone();
    let topic = a.topic.clone();
    let quiet = a.quiet;
    let printing = async move {
        let (mut n, mut failed, mut first) = (0u64, 0u64, None);
        while let Some(ack) = acks_rx.recv().await {
            match ack.await {
                Ok(ack) => {
                    n += 1;
                    if !quiet {
                        print_ack(&opts, &topic, ack);
                    }
                }
                Err(e) => {
                    failed += 1;
                    if first.is_none() {
                        first = Some(client_error(e));
                        let _ = stop.send(true);
                    }
                }
            }
        }
        (n, failed, first)
    };
    let topic = a.topic.clone();
    let reading = async move {
        let send = |value: Bytes| {
            let r = record(value);
            let (producer, acks, topic) = (&producer, &acks, &topic);
            async move {
                let ack = producer.send(topic, r).await.map_err(client_error)?;
                let _ = acks.send(ack).await;
                Ok::<(), anyhow::Error>(())
            }
        };
        let one = match (&source, file) {
            (Source::Value(v), _) => Some(v.clone()),
            (_, Some(f)) => Some(f),
            _ => None,
        };
        if let Some(value) = one {
            return send(value).await;
        }
        let mut lines = read_lines();
        loop {
            let line = tokio::select! {
                line = lines.recv() => line,
                _ = stopped.wait_for(|s| *s) => None,
            };
            let Some(line) = line else { break };
            let line = line.map_err(|e| anyhow::anyhow!("reading standard input: {e}"))?;
            send(Bytes::from(line)).await?;
        }
        Ok(())
    };
    let (read, (n, failed, first)) = tokio::join!(reading, printing);
    let topic = &a.topic;
    let error = first.or(read.err());
    if lines_mode || failed > 0 {
        let failed = if failed > 0 {
            format!("; {failed} failed (a failed record may or may not have been written)")
        } else {
            String::new()
        };
        eprintln!("published {n} records to {topic}{failed}");
    }
    match error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A failure of the client crate, worded as the CLI words a node's answer.
pub fn client_error(e: tern_client::Error) -> anyhow::Error {
    match e {
        tern_client::Error::Status(s) => status_error(s),
        tern_client::Error::NoTopic(t) => anyhow::anyhow!("NotFound: topic {t:?} does not exist"),
        e => anyhow::anyhow!("{e}"),
    }
}

#[derive(Args)]
pub struct SubArgs {
    pub topic: String,
    /// Where to start: earliest, latest, an offset, -N (the last N records of each
    /// partition), or @UNIX_MS (a time in ms). Default: latest (new records only); for a group
    /// or queue member, earliest (where a partition without a committed position starts).
    #[arg(long, allow_hyphen_values = true)]
    pub from: Option<String>,
    /// Stop after this many records.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Print only each record's value, as raw bytes, one per line (what `tern pub` reads).
    #[arg(long, conflicts_with = "json")]
    pub raw: bool,
    /// Only these partitions (repeatable; default: all).
    #[arg(long, short)]
    pub partition: Vec<u32>,
    /// Join this consumer group: the group's members share the partitions, and each resumes
    /// where the group committed (printed records are committed every --commit-interval-ms
    /// and on exit). --from says where a partition without a committed offset starts.
    #[arg(long, conflicts_with = "queue")]
    pub group: Option<String>,
    /// Join this queue group: members share every partition's records one by one, and each
    /// record is acknowledged (see --ack).
    #[arg(long)]
    pub queue: Option<String>,
    /// Queue group: what to do with a record after printing it.
    #[arg(long, value_enum, default_value_t = super::group::AckMode::Print)]
    pub ack: super::group::AckMode,
    /// Queue group (--ack nack): redeliver rejected records after this long.
    #[arg(long, default_value_t = 0)]
    pub nack_delay_ms: u32,
    /// Queue group: a delivery not acknowledged within this is delivered again (0: 30000).
    #[arg(long, default_value_t = 0)]
    pub ack_wait_ms: u32,
    /// Queue group: deliveries before a record goes to the dead-letter topic (0: 5).
    #[arg(long, default_value_t = 0)]
    pub max_deliveries: u32,
    /// Queue group: the dead-letter topic (default TOPIC.dlq).
    #[arg(long)]
    pub dlq: Option<String>,
    /// Unacknowledged deliveries (queue) or records per message (group) at most (0: 100).
    #[arg(long, default_value_t = 0)]
    pub max_in_flight: u32,
    /// The group drops this member when it hears nothing from it for this long (0: 10000).
    #[arg(long, default_value_t = 0)]
    pub session_timeout_ms: u32,
    /// Consumer group: how often printed positions are committed.
    #[arg(long, default_value_t = 1000)]
    pub commit_interval_ms: u64,
    /// Consumer group: let the node commit delivered positions this often instead (0: off).
    #[arg(long, default_value_t = 0)]
    pub auto_commit_ms: u32,
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `--from` as where a subscription starts.
fn start_position(from: &str) -> anyhow::Result<tern_client::Start> {
    use tern_client::Start;
    Ok(match from {
        "earliest" => Start::Earliest,
        "latest" => Start::Latest,
        s if s.starts_with('@') => {
            Start::Time(s[1..].parse().map_err(|_| {
                anyhow::anyhow!("--from {s}: expected @UNIX_MS, e.g. @1700000000000")
            })?)
        }
        s if s.starts_with('-') => match s[1..].parse::<u64>() {
            Ok(n) if n > 0 => Start::Last(n),
            _ => anyhow::bail!("--from {s}: -N starts N records before the end, N ≥ 1"),
        },
        s => Start::Offset(s.parse().map_err(|_| {
            anyhow::anyhow!("--from {s}: use earliest, latest, an offset, -N, or @UNIX_MS")
        })?),
    })
}

/// Prints a record: a line of text, or a JSON object; `deliveries` for queue deliveries.
pub fn print_record(
    opts: &ClientOpts,
    raw: bool,
    r: &tern_client::proto::Record,
    deliveries: Option<u32>,
) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if raw {
        let _ = out.write_all(&r.value);
        let _ = out.write_all(b"\n");
        return;
    }
    if opts.json {
        let headers: serde_json::Map<String, serde_json::Value> = r
            .headers
            .iter()
            .map(|h| (h.key.clone(), json_bytes(&h.value)))
            .collect();
        let mut v = serde_json::json!({
            "topic": r.topic, "partition": r.partition, "offset": r.offset,
            "timestamp_ms": r.timestamp_ms, "key": r.key.as_deref().map(json_bytes),
            "headers": headers, "value": json_bytes(&r.value),
        });
        if let Some(n) = deliveries {
            v["deliveries"] = n.into();
        }
        let _ = writeln!(out, "{v}");
    } else {
        let key = r
            .key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let _ = writeln!(
            out,
            "{}/{}@{}\t{}\t{}",
            r.topic,
            r.partition,
            r.offset,
            key.unwrap_or_default(),
            String::from_utf8_lossy(&r.value)
        );
    }
}

/// Bytes in JSON output: a string when they are UTF-8, else `{"base64": "..."}`.
fn json_bytes(b: &[u8]) -> serde_json::Value {
    use base64::Engine;
    match std::str::from_utf8(b) {
        Ok(s) => s.into(),
        Err(_) => serde_json::json!({
            "base64": base64::engine::general_purpose::STANDARD.encode(b)
        }),
    }
}

/// Follows the topic (or some partitions) through the client crate: from a node of
/// `--region` when given, and on through another node when that one goes away, each
/// partition from where it got to.
pub async fn subscribe(a: SubArgs) -> anyhow::Result<()> {
    if a.group.is_some() || a.queue.is_some() {
        return super::group::consume(a).await;
    }
    let from = start_position(a.from.as_deref().unwrap_or("latest"))?;
    if a.count == Some(0) {
        return Ok(());
    }
    let client = a.opts.cluster_client().await?;
    let mut sub = client
        .subscribe_partitions(&a.topic, &a.partition, from)
        .await
        .map_err(client_error)?;
    let mut seen = 0u64;
    while let Some(r) = sub.next().await {
        let r = r.map_err(client_error)?;
        print_record(&a.opts, a.raw, &r, None);
        seen += 1;
        if a.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}
