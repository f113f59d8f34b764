//! Starts real `tern serve` processes on loopback (port 0) with temporary data directories.
#![allow(dead_code)]

pub mod cluster;
pub mod geo;
pub mod group;
pub mod tools;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tonic::transport::Channel;

pub const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// Longest a test waits for the answer to one call (the headers of a stream): a node that
/// stops answering fails the test with a timeout instead of hanging the whole suite.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A connection to a node whose calls each end within [`CALL_TIMEOUT`].
pub async fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("http://{addr}"))
        .expect("a node address")
        .connect_timeout(Duration::from_secs(10))
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
}

pub struct TestNode {
    child: Option<Child>,
    pub addr: String,
    /// The admin listener's address, when the node was given `--admin-listen`.
    pub admin: Option<String>,
    /// The Raft seeds' service's address, when the node was given `--compat-listen`.
    pub compat: Option<String>,
    pub dir: PathBuf,
}

impl TestNode {
    /// Starts a node on `dir` with 2 cores and waits until it listens.
    pub fn start(dir: &Path, extra: &[&str]) -> TestNode {
        Self::start_at(dir, "127.0.0.1:0", extra)
    }

    /// Starts a node listening on `listen` (a cluster member needs a port known in advance).
    pub fn start_at(dir: &Path, listen: &str, extra: &[&str]) -> TestNode {
        Self::start_logged(dir, listen, extra, None)
    }

    /// [`TestNode::start_at`], with the node's stderr (its log) going to `log` when given.
    pub fn start_logged(dir: &Path, listen: &str, extra: &[&str], log: Option<&Path>) -> TestNode {
        let mut cmd = Command::new(TERN);
        cmd.args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir);
        if !extra.contains(&"--cores") {
            cmd.args(["--cores", "2"]);
        }
        let mut child = cmd
            .args(extra)
            .env(
                "RUST_LOG",
                // TERN_TEST_LOG=info shows the nodes' logs when debugging a test.
                std::env::var("TERN_TEST_LOG").unwrap_or_else(|_| "warn,openraft=error".into()),
            )
            .stdout(Stdio::piped())
            .stderr(match log {
                Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("tern starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The admin and compat lines come first, when there are any.
                if let Some(a) = line.strip_prefix("tern admin listening on ") {
                    let _ = tx.send((Some(true), a.to_string()));
                } else if let Some(a) = line.strip_prefix("tern compat listening on ") {
                    let _ = tx.send((Some(false), a.to_string()));
                } else if let Some(a) = line.strip_prefix("tern listening on ") {
                    let _ = tx.send((None, a.to_string()));
                }
            }
        });
        let (mut admin, mut compat) = (None, None);
        let addr = loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((Some(true), a)) => admin = Some(a),
                Ok((Some(false), a)) => compat = Some(a),
                Ok((None, a)) => break a,
                Err(e) => {
                    let _ = child.kill();
                    panic!("tern did not start listening ({e}): see its stderr above");
                }
            }
        };
        TestNode {
            child: Some(child),
            addr,
            admin,
            compat,
            dir: dir.to_path_buf(),
        }
    }

    pub async fn client(&self) -> TernClient<Channel> {
        TernClient::new(channel(&self.addr).await.expect("connect"))
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits (bounded) for the node to exit on its own; its exit status, or `None` if it is
    /// still running after `max`.
    pub fn wait_exit(&mut self, max: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + max;
        let c = self.child.as_mut().unwrap();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no flush, no destructors.
    pub fn kill9(mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let mut c = self.child.take().unwrap();
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("tern did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `tern ARGS --server ADDR`: (success, stdout, stderr).
pub fn tern(addr: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TERN)
        .args(args)
        .args(["--server", addr])
        .output()
        .expect("tern runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn create_topic(c: &mut TernClient<Channel>, name: &str, partitions: u32) {
    c.create_topic(pb::CreateTopicRequest {
        name: name.into(),
        partitions,
        replication_factor: 1,
        config: None,
        placement: None,
        mirror_of: None,
    })
    .await
    .expect("create topic");
}

pub fn rec(key: Option<&str>, value: String) -> pb::PublishRecord {
    pb::PublishRecord {
        key: key.map(|k| Bytes::from(k.to_string())),
        value: Bytes::from(value),
        headers: vec![],
        partition: None,
        expiry_seconds: None,
    }
}

/// Every committed record of a partition, from offset 0, via Fetch.
pub async fn fetch_all(
    c: &mut TernClient<Channel>,
    topic: &str,
    partition: u32,
) -> Vec<pb::Record> {
    try_fetch_all(c, topic, partition).await.expect("fetch")
}

/// [`fetch_all`], returning the first failed Fetch's status instead of panicking (a node of a
/// cluster may not be ready yet).
pub async fn try_fetch_all(
    c: &mut TernClient<Channel>,
    topic: &str,
    partition: u32,
) -> Result<Vec<pb::Record>, tonic::Status> {
    try_fetch_from(c, topic, partition, 0).await
}

/// Every committed record of a partition from `from` on.
pub async fn try_fetch_from(
    c: &mut TernClient<Channel>,
    topic: &str,
    partition: u32,
    from: u64,
) -> Result<Vec<pb::Record>, tonic::Status> {
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let r = c
            .fetch(pb::FetchRequest {
                topic: topic.into(),
                partition,
                offset: at,
                max_records: 1000,
                max_bytes: 0,
                max_wait_ms: 0,
                raw_batches: false,
                topic_uid: 0,
            })
            .await?
            .into_inner();
        if r.records.is_empty() {
            if r.next_offset >= r.high_watermark {
                // At the end; or past it on a follower that has not yet received what another
                // replica served (its answer is that the offset is still arriving): nothing
                // more here now.
                return Ok(out);
            }
            // Only control records (which take offsets) were in the way: they must be skipped.
            assert!(r.next_offset > at, "fetch made no progress at {at}");
        }
        at = r.next_offset;
        out.extend(r.records);
    }
}

/// `tern certs create` into `dir`: the CA, nodes 1..=n, and the given clients.
pub fn certs(dir: &Path, nodes: usize, clients: &[&str]) {
    let ids: Vec<String> = (1..=nodes).map(|i| i.to_string()).collect();
    let mut args = vec!["certs", "create", "--dir"];
    let d = dir.to_str().unwrap();
    args.push(d);
    let ids = ids.join(",");
    if nodes > 0 {
        args.extend(["--node", &ids]);
    }
    let clients = clients.join(",");
    if !clients.is_empty() {
        args.extend(["--client", &clients]);
    }
    let out = std::process::Command::new(TERN)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tern certs create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
