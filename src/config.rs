//! The node's configuration: one `Config`, layered as TOML file < `TERN_*` environment < flags.
//!
//! The flags (`tern serve --help`) are the reference; every flag has a `TERN_*` variable and a
//! key of the same name (with `_` for `-`) in the TOML file given by `--config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::log::{FsyncPolicy, LogConfig};

/// Everything a node needs to run. Defaults give a working single node with data in `./data`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Address clients are told to use for this node; defaults to the bound address.
    pub advertised_address: Option<String>,
    pub data_dir: PathBuf,
    pub node_id: u64,
    pub region: String,
    pub zone: String,
    /// Addresses this node advertises to other regions, `REGION=HOST:PORT` separated by commas
    /// (as Kafka's advertised listeners per network): nodes and clients of such a region reach
    /// this node there, through a regional gateway say. Others use the advertised address.
    pub region_addresses: String,
    /// Core executors (glommio, one per CPU, pinned); 0 means one per available CPU.
    pub cores: usize,
    /// Threads of the network shard (tokio).
    pub net_threads: usize,
    /// Requests a core's mailbox holds before senders wait.
    pub mailbox_capacity: usize,
    /// How long a request waits for room in a full mailbox before RESOURCE_EXHAUSTED.
    pub mailbox_wait_ms: u64,
    /// Largest gRPC message accepted.
    pub max_request_bytes: usize,
    pub max_records_per_request: usize,
    pub max_partitions_per_topic: u32,
    pub max_topics: usize,
    /// Concurrent HTTP/2 streams (calls) per client connection.
    pub max_concurrent_streams: u32,
    /// Partitions one subscription may follow at once.
    pub max_subscription_partitions: usize,
    /// Longest long-poll a Fetch may ask for.
    pub max_fetch_wait_ms: u64,
    /// Bytes of io_uring buffer memory per core executor (locked memory).
    pub io_memory_bytes: usize,
    /// Metadata commands applied between two checkpoints of the metadata state; after each,
    /// the metadata log is purged behind it (segments the checkpoint covers are deleted).
    pub metadata_snapshot_every: u64,
    /// Segment size of the metadata log: the purge deletes whole segments, so this bounds what
    /// the log keeps beyond the checkpoint.
    pub metadata_segment_bytes: u64,
    /// Raft entries a replica applies between two saves of its applied checkpoint (the
    /// applied position and idempotent producers); a restart re-applies at most this many.
    pub raft_checkpoint_entries: u64,
    /// Raft leader heartbeat interval.
    pub raft_heartbeat_ms: u64,
    /// Raft election timeout: a follower that hears no leader for a random time between 2/3 of
    /// this (the leader lease) and this starts an election.
    pub raft_election_timeout_ms: u64,
    /// Idle partitions' groups go quiet: no heartbeats until the next write, while the nodes'
    /// keepalives show the leader alive.
    pub raft_quiet: bool,
    /// The cluster's controller nodes, `ID=HOST:PORT` separated by commas (this node among
    /// them); empty runs this node alone. Every node of a cluster gets the same list.
    pub peers: String,
    /// `HOST:PORT` of any member of a running cluster this node joins (instead of `peers`):
    /// it registers there, receives the metadata log, and holds the replicas moved to it.
    pub join: String,
    /// How often each partition applies its topic's retention.
    pub retention_check_interval_ms: u64,
    /// Accept the `Peer.SetFault` test hook (cuts this node off from chosen peers). Never in
    /// production.
    pub fault_injection: bool,
    /// Defaults for topics created without explicit settings.
    pub topic_defaults: TopicDefaults,
    /// Client connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// The node's TLS certificate chain (PEM). With it, the node speaks only TLS, and nodes
    /// authenticate each other with certificates from `tls_cluster_ca`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed every node's certificate.
    pub tls_cluster_ca: Option<PathBuf>,
    /// The CA (PEM) that signs client certificates: when set, clients must present one.
    pub tls_client_ca: Option<PathBuf>,
    /// `none` (anyone who reaches the port may do anything) or `required` (every call needs a
    /// token or a client certificate, and ACLs decide what it may do).
    pub auth: String,
    /// A file holding the bootstrap token: whoever presents it is the superuser `admin`. (Or
    /// the `TERN_BOOTSTRAP_TOKEN` environment variable; never a flag's value, which `ps` shows.)
    pub bootstrap_token_file: Option<PathBuf>,
    /// How mirror topics reach a source in another cluster: over TLS trusting this CA (PEM)
    /// instead of this node's own settings. With any `mirror_*` setting, pulls never present
    /// this node's certificate (docs/geo.md, "Mirrors of another cluster").
    pub mirror_tls_ca: Option<PathBuf>,
    /// A client certificate and key (PEM) that mirror pulls present to the source (its common
    /// name is the mirror's principal there); needs `mirror_tls_ca`.
    pub mirror_tls_cert: Option<PathBuf>,
    pub mirror_tls_key: Option<PathBuf>,
    /// A file holding a token of the source cluster that mirror pulls present.
    pub mirror_token_file: Option<PathBuf>,
    /// Principals that may do anything (ACLs are not checked for them).
    pub superusers: Vec<String>,
    /// Where to export request spans over OTLP/gRPC (for example `http://jaeger:4317`); needs
    /// a binary built with the `otlp` cargo feature.
    pub otlp_endpoint: Option<String>,
    /// Take the node id from this machine's host name: 1 + the number after its last `-` (a
    /// Kubernetes StatefulSet pod's ordinal: pod `tern-0` is node 1).
    pub node_id_from_ordinal: bool,
    /// Where the admin HTTP listener serves `/metrics`, `/livez` and `/readyz` (off unless
    /// set; port 0 picks a free one). It has no authentication: keep it on a private network.
    pub admin_listen: Option<SocketAddr>,
    /// Partitions whose own series `/metrics` shows (the worst first: under-replicated, then
    /// by follower lag); 0 shows none. Totals always cover every partition.
    pub metrics_partitions: usize,
    /// Create a topic on its first publish or subscribe through the seeds' services (the
    /// clients written for them never create topics): one partition, the topic defaults
    /// otherwise. Needs the create right on the topic when authentication is on.
    pub auto_create_topics: bool,
    /// Where the Raft seeds' `broker.Broker` service listens (off unless set). It cannot share
    /// the main port: the thesis seed's service has the same method paths.
    pub compat_listen: Option<SocketAddr>,
}

/// Defaults applied to topic settings a CreateTopic request leaves unset.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    pub partitions: u32,
    /// Replicas of a topic created without a replication factor, capped at the number of
    /// nodes that can hold replicas (so min(3, nodes) by default).
    pub replication_factor: u32,
    /// -1 keeps records forever.
    pub retention_ms: i64,
    /// -1 means no size limit.
    pub retention_bytes: i64,
    /// `always` or `interval`.
    pub fsync: String,
    pub fsync_interval_ms: u32,
    pub max_record_bytes: u32,
    pub segment_bytes: u64,
}

impl TopicDefaults {
    /// The settings of a topic created without any given (the defaults are validated when
    /// the node starts).
    pub fn settings(&self) -> crate::cluster::TopicSettings {
        crate::cluster::TopicSettings {
            retention_ms: (self.retention_ms > 0).then_some(self.retention_ms as u64),
            retention_bytes: (self.retention_bytes > 0).then_some(self.retention_bytes as u64),
            fsync_interval_ms: (self.fsync == "interval").then_some(self.fsync_interval_ms),
            max_record_bytes: self.max_record_bytes,
            segment_bytes: self.segment_bytes,
        }
    }

    fn file_keys() -> Vec<String> {
        keys_of(&TopicDefaults::default())
    }
}

/// Keys whose default is unset (so a serialized default does not show them).
const OPTIONAL_KEYS: [&str; 13] = [
    "admin_listen",
    "compat_listen",
    "otlp_endpoint",
    "advertised_address",
    "bootstrap_token_file",
    "tls_cert",
    "tls_key",
    "tls_cluster_ca",
    "tls_client_ca",
    "mirror_tls_ca",
    "mirror_tls_cert",
    "mirror_tls_key",
    "mirror_token_file",
];

/// Settings for tests only: accepted in a file, never listed.
const HIDDEN_KEYS: [&str; 1] = ["fault_injection"];

/// The keys a value serializes to (a struct's field names).
fn keys_of(v: &impl Serialize) -> Vec<String> {
    match toml::Value::try_from(v) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

impl Default for TopicDefaults {
    fn default() -> Self {
        Self {
            partitions: 1,
            replication_factor: 3,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            fsync: "always".into(),
            fsync_interval_ms: 100,
            max_record_bytes: 1 << 20,
            segment_bytes: 128 << 20,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".parse().expect("valid address"),
            advertised_address: None,
            data_dir: PathBuf::from("./data"),
            node_id: 1,
            region: "local".into(),
            zone: "local".into(),
            region_addresses: String::new(),
            cores: 0,
            net_threads: 1,
            mailbox_capacity: 4096,
            mailbox_wait_ms: 2000,
            max_request_bytes: 16 << 20,
            max_records_per_request: 10_000,
            max_partitions_per_topic: 4096,
            max_topics: 10_000,
            max_concurrent_streams: 1024,
            max_subscription_partitions: 4096,
            max_fetch_wait_ms: 60_000,
            io_memory_bytes: 4 << 20,
            metadata_snapshot_every: 10_000,
            metadata_segment_bytes: 4 << 20,
            raft_heartbeat_ms: 150,
            raft_election_timeout_ms: 1_500,
            raft_quiet: true,
            raft_checkpoint_entries: crate::raft::CHECKPOINT_ENTRIES,
            peers: String::new(),
            join: String::new(),
            retention_check_interval_ms: 60_000,
            fault_injection: false,
            topic_defaults: TopicDefaults::default(),
            max_connections: 10_000,
            otlp_endpoint: None,
            node_id_from_ordinal: false,
            admin_listen: None,
            metrics_partitions: 1_000,
            auto_create_topics: true,
            compat_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_cluster_ca: None,
            tls_client_ca: None,
            auth: "none".into(),
            bootstrap_token_file: None,
            mirror_tls_ca: None,
            mirror_tls_cert: None,
            mirror_tls_key: None,
            mirror_token_file: None,
            superusers: Vec::new(),
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors (a typo must not be silently ignored).
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// Parses a config file's text. Its keys are the flag names of `tern serve` with `_` for
    /// `-`; the topic defaults go either flat (`default_partitions = 3`, as the flags) or in a
    /// `[topic_defaults]` table without the prefix (`partitions = 3`).
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let mut table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        let known = Config::file_keys();
        let known_defaults = TopicDefaults::file_keys();
        let flat: Vec<String> = table
            .keys()
            .filter(|k| {
                k.strip_prefix("default_")
                    .is_some_and(|f| known_defaults.contains(&f.to_string()))
            })
            .cloned()
            .collect();
        if !flat.is_empty() {
            let mut defaults = match table.remove("topic_defaults") {
                None => toml::Table::new(),
                Some(toml::Value::Table(t)) => t,
                Some(_) => anyhow::bail!("topic_defaults must be a table"),
            };
            for k in flat {
                let field = k["default_".len()..].to_string();
                let v = table.remove(&k).expect("listed above");
                anyhow::ensure!(
                    defaults.insert(field.clone(), v).is_none(),
                    "{k} is given twice: as {k} and as topic_defaults.{field}"
                );
            }
            table.insert("topic_defaults".into(), toml::Value::Table(defaults));
        }
        for k in table.keys() {
            let listed: Vec<&str> = known
                .iter()
                .map(String::as_str)
                .filter(|k| !HIDDEN_KEYS.contains(k))
                .collect();
            anyhow::ensure!(
                known.contains(k),
                "unknown key {k:?}; the keys are the `tern serve` flag names with '_' for '-': \
                 {}",
                listed.join(", ")
            );
        }
        if let Some(toml::Value::Table(d)) = table.get("topic_defaults") {
            for k in d.keys() {
                anyhow::ensure!(
                    known_defaults.contains(k),
                    "unknown key topic_defaults.{k:?}; known: {}",
                    known_defaults.join(", ")
                );
            }
        }
        table.try_into().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// The keys a config file may hold at its top level.
    fn file_keys() -> Vec<String> {
        let mut keys = keys_of(&Config::default());
        // `None` by default, so not serialized.
        keys.extend(OPTIONAL_KEYS.map(String::from));
        keys.sort();
        keys
    }
    /// Core count after applying the default (all available CPUs).
    pub fn core_count(&self) -> usize {
        if self.cores > 0 {
            self.cores
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Raft election and heartbeat timing, as openraft takes them.
    ///
    /// A follower grants votes only once openraft's leader lease (its longest election
    /// timeout) has passed since it last heard a leader; the core's timer (`raft::election`)
    /// starts an election after the lease plus a random part as wide as the range. With min and
    /// max at E/3 and 2E/3 of `raft_election_timeout_ms` (E), a follower that hears no leader
    /// starts an election after 2E/3 to E (1–1.5 s with the 1.5 s default). (Setting min/max to
    /// E and 2E meant 3E to 4E: 4.5–6 s of unavailability after a leader died.)
    pub fn raft_timing(&self) -> crate::raft::Timing {
        let e = self.raft_election_timeout_ms;
        crate::raft::Timing {
            heartbeat_ms: self.raft_heartbeat_ms,
            election_min_ms: e / 3,
            election_max_ms: e * 2 / 3,
        }
    }

    /// The parsed `peers`: node id → address. Checks that this node is among them.
    /// `region_addresses` as a map from region to address.
    pub fn region_address_map(&self) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
        let mut map = std::collections::BTreeMap::new();
        for item in self
            .region_addresses
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (region, addr) = item.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("region address {item:?} is not REGION=HOST:PORT")
            })?;
            let (region, addr) = (region.trim(), addr.trim());
            anyhow::ensure!(
                !region.is_empty() && region.len() <= 64,
                "region address {item:?}: the region must be 1 to 64 bytes"
            );
            anyhow::ensure!(
                addr.len() <= 255
                    && addr
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "region address {item:?}: the address must be HOST:PORT"
            );
            anyhow::ensure!(
                map.insert(region.to_string(), addr.to_string()).is_none(),
                "region {region} is given two addresses"
            );
        }
        anyhow::ensure!(
            map.len() <= crate::cluster::REGIONS_MAX,
            "at most {} region addresses",
            crate::cluster::REGIONS_MAX
        );
        Ok(map)
    }

    pub fn peer_map(
        &self,
    ) -> anyhow::Result<std::collections::BTreeMap<crate::types::NodeId, String>> {
        let mut map = std::collections::BTreeMap::new();
        for item in self
            .peers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (id, addr) = item
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("peer {item:?} is not ID=HOST:PORT"))?;
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("peer {item:?}: the id must be a positive integer"))?;
            anyhow::ensure!(id > 0, "peer {item:?}: node ids start at 1");
            let addr = addr.trim();
            anyhow::ensure!(
                addr.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "peer {item:?}: the address must be HOST:PORT"
            );
            anyhow::ensure!(
                map.insert(crate::types::NodeId(id), addr.to_string())
                    .is_none(),
                "peer id {id} is listed twice"
            );
        }
        if !map.is_empty() {
            anyhow::ensure!(
                map.contains_key(&crate::types::NodeId(self.node_id)),
                "this node's id ({}) is not among the peers ({})",
                self.node_id,
                self.peers
            );
            anyhow::ensure!(map.len() <= 64, "at most 64 controller nodes");
        }
        Ok(map)
    }

    pub fn mailbox_wait(&self) -> Duration {
        Duration::from_millis(self.mailbox_wait_ms)
    }

    /// Whether every call must be authenticated (and authorized).
    pub fn auth_required(&self) -> bool {
        self.auth == "required"
    }

    /// Settles what depends on where the node runs, before [`Config::validate`]: the node id
    /// from the host name's ordinal (`node_id_from_ordinal`), and, when both `peers` and
    /// `join` are given (one command line for every pod of a StatefulSet), whether this node
    /// is a controller (its id is in `peers`) or joins through `join`.
    pub fn settle(&mut self, host_name: Option<&str>) -> anyhow::Result<()> {
        if self.node_id_from_ordinal {
            let host = host_name.ok_or_else(|| {
                anyhow::anyhow!("node_id_from_ordinal: this machine's host name is unknown")
            })?;
            let ordinal: u64 = host
                .rsplit_once('-')
                .and_then(|(_, n)| n.parse().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "node_id_from_ordinal: host name {host:?} does not end in -N (a \
                         StatefulSet pod's ordinal)"
                    )
                })?;
            anyhow::ensure!(
                ordinal < u64::MAX,
                "node_id_from_ordinal: ordinal too large"
            );
            self.node_id = ordinal + 1;
        }
        if !self.peers.is_empty() && !self.join.is_empty() {
            // peer_map refuses a list without this node; that is exactly the joiner's case.
            let listed = self.peers.split(',').any(|item| {
                item.split_once('=')
                    .is_some_and(|(id, _)| id.trim().parse() == Ok(self.node_id))
            });
            if listed {
                self.join.clear();
            } else {
                self.peers.clear();
            }
        }
        Ok(())
    }

    /// Whether this node runs with others (as a controller, or joining a cluster).
    pub fn clustered(&self) -> bool {
        !self.peers.is_empty() || !self.join.is_empty()
    }

    /// The TLS files, if TLS is configured: the certificate, its key and the cluster CA go
    /// together; a client CA needs them.
    pub fn tls_files(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_cluster_ca) {
            (None, None, None) => {
                anyhow::ensure!(
                    self.tls_client_ca.is_none(),
                    "tls_client_ca needs TLS: give tls_cert, tls_key and tls_cluster_ca too"
                );
                Ok(None)
            }
            (Some(cert), Some(key), Some(ca)) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                cluster_ca: ca.clone(),
                client_ca: self.tls_client_ca.clone(),
            })),
            _ => anyhow::bail!(
                "TLS needs all of tls_cert, tls_key and tls_cluster_ca (the CA that signed the \
                 nodes' certificates; nodes always authenticate each other when TLS is on; it \
                 may be the same file as tls_client_ca)"
            ),
        }
    }

    /// Whether mirror pulls go as a client of another cluster (any `mirror_*` setting given)
    /// rather than as this node.
    pub fn mirror_credentials(&self) -> bool {
        self.mirror_tls_ca.is_some()
            || self.mirror_tls_cert.is_some()
            || self.mirror_tls_key.is_some()
            || self.mirror_token_file.is_some()
    }

    /// Checks values against each other; the node refuses to start with a bad config.
    pub fn validate(&self) -> anyhow::Result<()> {
        let tls = self.tls_files()?;
        anyhow::ensure!(
            self.mirror_tls_cert.is_some() == self.mirror_tls_key.is_some(),
            "mirror_tls_cert and mirror_tls_key go together"
        );
        anyhow::ensure!(
            self.mirror_tls_cert.is_none() || self.mirror_tls_ca.is_some(),
            "mirror_tls_cert needs mirror_tls_ca (the CA of the source cluster's nodes)"
        );
        anyhow::ensure!(
            self.mirror_token_file.is_none() || self.mirror_tls_ca.is_some(),
            "mirror_token_file needs mirror_tls_ca: a token is sent to a mirror's source only \
             over TLS, to a source that proves itself with that CA"
        );
        anyhow::ensure!(
            matches!(self.auth.as_str(), "none" | "required"),
            "auth must be none or required, not {:?}",
            self.auth
        );
        anyhow::ensure!(
            !(self.auth_required() && self.clustered() && tls.is_none()),
            "auth required in a cluster needs TLS (tls_cert, tls_key, tls_cluster_ca): without \
             it any host could pose as a node, send Raft messages and forward calls in anyone's \
             name (docs/security.md)"
        );
        anyhow::ensure!(self.superusers.len() <= 64, "at most 64 superusers");
        for s in &self.superusers {
            crate::cluster::security::validate_principal(s)
                .map_err(|e| anyhow::anyhow!("superusers: {e}"))?;
        }
        if let Some(e) = &self.otlp_endpoint {
            anyhow::ensure!(
                (e.starts_with("http://") || e.starts_with("https://")) && e.len() > 8,
                "otlp_endpoint {e:?}: give a URL such as http://collector:4317"
            );
        }
        anyhow::ensure!(
            self.metrics_partitions <= 1_000_000,
            "metrics_partitions must be at most 1000000"
        );
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.max_connections),
            "max_connections must be within 1..=1000000"
        );
        anyhow::ensure!(
            (100..=86_400_000).contains(&self.retention_check_interval_ms),
            "retention_check_interval_ms must be within 100..=86400000"
        );
        anyhow::ensure!(
            self.peers.is_empty() || self.join.is_empty(),
            "give either peers (this node is a controller) or join (it joins a running cluster), not both"
        );
        if !self.join.is_empty() {
            anyhow::ensure!(
                self.join
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "join {:?}: the address must be HOST:PORT",
                self.join
            );
        }
        anyhow::ensure!(self.core_count() <= 1024, "cores must be at most 1024");
        anyhow::ensure!(
            (1..=64).contains(&self.net_threads),
            "net_threads must be within 1..=64"
        );
        anyhow::ensure!(
            self.mailbox_capacity >= 1,
            "mailbox_capacity must be positive"
        );
        anyhow::ensure!(
            self.max_request_bytes >= 1024,
            "max_request_bytes must be at least 1024"
        );
        anyhow::ensure!(
            self.max_records_per_request >= 1,
            "max_records_per_request must be positive"
        );
        anyhow::ensure!(
            self.max_partitions_per_topic >= 1,
            "max_partitions_per_topic must be positive"
        );
        anyhow::ensure!(
            (10..=10_000_000).contains(&self.metadata_snapshot_every),
            "metadata_snapshot_every ({}) must be within 10..=10000000",
            self.metadata_snapshot_every
        );
        anyhow::ensure!(
            (1..=10_000_000).contains(&self.raft_checkpoint_entries),
            "raft_checkpoint_entries ({}) must be within 1..=10000000",
            self.raft_checkpoint_entries
        );
        anyhow::ensure!(
            ((64 << 10)..=(1 << 30)).contains(&self.metadata_segment_bytes),
            "metadata_segment_bytes ({}) must be within 64 KiB..=1 GiB",
            self.metadata_segment_bytes
        );
        anyhow::ensure!(
            self.raft_election_timeout_ms >= 6 * self.raft_heartbeat_ms.max(1),
            "raft_election_timeout_ms ({}) must be at least 6 × raft_heartbeat_ms ({})",
            self.raft_election_timeout_ms,
            self.raft_heartbeat_ms
        );
        self.raft_timing()
            .validate()
            .map_err(|e| anyhow::anyhow!("raft timing: {e}"))?;
        anyhow::ensure!(
            self.raft_election_timeout_ms <= 60_000,
            "raft_election_timeout_ms must be at most 60000"
        );
        anyhow::ensure!(
            !self.region.is_empty() && !self.zone.is_empty(),
            "region and zone must not be empty"
        );
        anyhow::ensure!(
            self.region.len() <= 64 && self.zone.len() <= 64,
            "region and zone are at most 64 bytes"
        );
        anyhow::ensure!(
            self.max_partitions_per_topic <= crate::cluster::PARTITIONS_MAX,
            "max_partitions_per_topic must be at most {}",
            crate::cluster::PARTITIONS_MAX
        );
        anyhow::ensure!(self.node_id > 0, "node_id must be at least 1");
        self.peer_map()?;
        self.region_address_map()?;
        let d = &self.topic_defaults;
        anyhow::ensure!(
            (1..=self.max_partitions_per_topic).contains(&d.partitions),
            "topic_defaults.partitions must be within 1..=max_partitions_per_topic"
        );
        anyhow::ensure!(
            (1..=crate::cluster::REPLICAS_MAX).contains(&d.replication_factor),
            "topic_defaults.replication_factor must be within 1..={}",
            crate::cluster::REPLICAS_MAX
        );
        parse_fsync(&d.fsync, d.fsync_interval_ms)?;
        Ok(())
    }
}

/// Parses an fsync policy name.
pub fn parse_fsync(name: &str, interval_ms: u32) -> anyhow::Result<FsyncPolicy> {
    match name {
        "always" => Ok(FsyncPolicy::Always),
        "interval" if interval_ms > 0 => Ok(FsyncPolicy::Interval(Duration::from_millis(
            interval_ms as u64,
        ))),
        "interval" => anyhow::bail!("fsync interval must be positive"),
        other => anyhow::bail!("unknown fsync policy {other:?}: use \"always\" or \"interval\""),
    }
}

impl Config {
    /// The log settings of a partition of a topic with these stored settings, on this node.
    pub fn log_config(&self, settings: &crate::cluster::TopicSettings) -> LogConfig {
        LogConfig {
            segment_bytes_max: settings.segment_bytes,
            fsync: match settings.fsync_interval_ms {
                None => FsyncPolicy::Always,
                Some(ms) => FsyncPolicy::Interval(Duration::from_millis(ms as u64)),
            },
            retention_ms: settings.retention_ms,
            retention_bytes: settings.retention_bytes,
            retention_check_interval_ms: self.retention_check_interval_ms,
            batch_bytes_max: 16 << 20,
            pending_bytes_max: 32 << 20,
            ..LogConfig::default()
        }
    }
}

#[cfg(test)]
mod tests;

/// A token from a file (`what` names it in errors), trimmed; warns if others may read it.
pub fn read_token_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("{what} file {}: {e}", path.display()))?;
    anyhow::ensure!(
        meta.len() <= 4096,
        "{what} file {} is larger than 4 KiB",
        path.display()
    );
    {
        use std::os::unix::fs::PermissionsExt;
        // Said once per file: a mirror's token is read again after every failed pull.
        static WARNED: std::sync::Mutex<Vec<std::path::PathBuf>> =
            std::sync::Mutex::new(Vec::new());
        if meta.permissions().mode() & 0o077 != 0 {
            let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
            if !warned.iter().any(|p| p == path) {
                warned.push(path.to_path_buf());
                tracing::warn!(path = %path.display(), "the {what} file is readable by other users (chmod 600 it)");
            }
        }
    }
    let s = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{what} file {}: {e}", path.display()))?;
    Ok(s.trim().to_string())
}
