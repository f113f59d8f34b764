//! `tern serve`: flags and environment over the config file.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::config::Config;

/// Every setting can come from the TOML file (`--config`), a `TERN_*` variable, or a flag;
/// flags win over variables, variables over the file, the file over defaults.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML config file; keys are the flag names with '_' for '-' (docs/tern.example.toml).
    #[arg(long, env = "TERN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7070]; port 0 picks a free port.
    #[arg(long, env = "TERN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Export request spans over OTLP/gRPC to this collector (e.g. http://jaeger:4317); needs a
    /// build with `--features otlp` [default: off].
    #[arg(long, env = "TERN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Take the node id from the host name: 1 + the number after its last '-' (a StatefulSet
    /// pod's ordinal: tern-0 is node 1).
    #[arg(long, env = "TERN_NODE_ID_FROM_ORDINAL")]
    pub node_id_from_ordinal: bool,
    /// Admin HTTP listener for /metrics, /livez and /readyz [default: off]; port 0 picks a free
    /// port. Unauthenticated: keep it on a private network (docs/operations.md).
    #[arg(long, env = "TERN_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Partitions with their own series in /metrics, the worst first; 0: none [default: 1000].
    #[arg(long, env = "TERN_METRICS_PARTITIONS")]
    pub metrics_partitions: Option<usize>,
    /// Create topics on first use through the seeds' services (one partition) [default: true].
    #[arg(long, env = "TERN_AUTO_CREATE_TOPICS", value_name = "BOOL")]
    pub auto_create_topics: Option<bool>,
    /// Listener for the Raft seeds' broker.Broker service [default: off]; port 0 picks a free
    /// port (docs/api.md).
    #[arg(long, env = "TERN_COMPAT_LISTEN")]
    pub compat_listen: Option<SocketAddr>,
    /// Address clients are told to use for this node [default: the bound address].
    #[arg(long, env = "TERN_ADVERTISED_ADDRESS")]
    pub advertised_address: Option<String>,
    /// Data directory [default: ./data].
    #[arg(long, env = "TERN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// This node's id [default: 1].
    #[arg(long, env = "TERN_NODE_ID")]
    pub node_id: Option<u64>,
    /// Region label [default: local].
    #[arg(long, env = "TERN_REGION")]
    pub region: Option<String>,
    /// Zone label [default: local].
    #[arg(long, env = "TERN_ZONE")]
    pub zone: Option<String>,
    /// Addresses advertised to other regions, REGION=HOST:PORT separated by commas: nodes and
    /// clients there reach this node at that address (a regional gateway) [default: none].
    #[arg(
        long,
        env = "TERN_REGION_ADDRESSES",
        value_name = "REGION=HOST:PORT,..."
    )]
    pub region_addresses: Option<String>,
    /// Core executors, one pinned thread each [default: 0 = one per CPU].
    #[arg(long, env = "TERN_CORES")]
    pub cores: Option<usize>,
    /// Threads of the network shard [default: 1].
    #[arg(long, env = "TERN_NET_THREADS")]
    pub net_threads: Option<usize>,
    /// Requests a core's mailbox holds [default: 4096].
    #[arg(long, env = "TERN_MAILBOX_CAPACITY")]
    pub mailbox_capacity: Option<usize>,
    /// Wait for room in a full mailbox before RESOURCE_EXHAUSTED, in ms [default: 2000].
    #[arg(long, env = "TERN_MAILBOX_WAIT_MS")]
    pub mailbox_wait_ms: Option<u64>,
    /// Largest request accepted, in bytes [default: 16777216].
    #[arg(long, env = "TERN_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most records in one publish request [default: 10000].
    #[arg(long, env = "TERN_MAX_RECORDS_PER_REQUEST")]
    pub max_records_per_request: Option<usize>,
    /// Most partitions in one topic [default: 4096].
    #[arg(long, env = "TERN_MAX_PARTITIONS_PER_TOPIC")]
    pub max_partitions_per_topic: Option<u32>,
    /// Most topics on this node [default: 10000].
    #[arg(long, env = "TERN_MAX_TOPICS")]
    pub max_topics: Option<usize>,
    /// Concurrent calls per client connection [default: 1024].
    #[arg(long, env = "TERN_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Partitions one subscription may follow [default: 4096].
    #[arg(long, env = "TERN_MAX_SUBSCRIPTION_PARTITIONS")]
    pub max_subscription_partitions: Option<usize>,
    /// Longest long poll of a Fetch, in ms [default: 60000].
    #[arg(long, env = "TERN_MAX_FETCH_WAIT_MS")]
    pub max_fetch_wait_ms: Option<u64>,
    /// io_uring buffer memory per core, in bytes (locked memory) [default: 4194304].
    #[arg(long, env = "TERN_IO_MEMORY_BYTES")]
    pub io_memory_bytes: Option<usize>,
    /// Metadata commands applied between two checkpoints of the metadata state, after each
    /// of which the metadata log is purged [default: 10000].
    #[arg(long, env = "TERN_METADATA_SNAPSHOT_EVERY")]
    pub metadata_snapshot_every: Option<u64>,
    /// Segment size of the metadata log in bytes (the purge deletes whole segments)
    /// [default: 4194304].
    #[arg(long, env = "TERN_METADATA_SEGMENT_BYTES")]
    pub metadata_segment_bytes: Option<u64>,
    /// Raft entries a replica applies between two saves of its applied checkpoint; a restart
    /// re-applies at most this many [default: 4096].
    #[arg(long, env = "TERN_RAFT_CHECKPOINT_ENTRIES")]
    pub raft_checkpoint_entries: Option<u64>,
    /// Raft heartbeat interval in ms [default: 150].
    #[arg(long, env = "TERN_RAFT_HEARTBEAT_MS")]
    pub raft_heartbeat_ms: Option<u64>,
    /// Raft election timeout in ms: a follower that hears no leader for 2/3 of this (the
    /// leader lease) to this starts an election; at least 6 × the heartbeat [default: 1500].
    #[arg(long, env = "TERN_RAFT_ELECTION_TIMEOUT_MS")]
    pub raft_election_timeout_ms: Option<u64>,
    /// Let idle partitions' groups go quiet: no heartbeats until the next write; nodes tell
    /// each other they are alive instead (docs/cluster.md) [default: true].
    #[arg(long, env = "TERN_RAFT_QUIET", value_name = "BOOL")]
    pub raft_quiet: Option<bool>,
    /// The cluster's controller nodes, ID=HOST:PORT,... (this node among them; every node gets
    /// the same list). Without it the node runs alone.
    #[arg(long, env = "TERN_PEERS")]
    pub peers: Option<String>,
    /// Join a running cluster through any member, HOST:PORT (instead of --peers). The node
    /// registers and receives the replicas moved to it (`tern cluster rebalance`, `move`).
    /// Give --advertised-address so the others can reach it.
    #[arg(long, env = "TERN_JOIN")]
    pub join: Option<String>,
    /// How often each partition applies retention, in ms [default: 60000].
    #[arg(long, env = "TERN_RETENTION_CHECK_INTERVAL_MS")]
    pub retention_check_interval_ms: Option<u64>,
    /// Accept the Peer.SetFault test hook that cuts this node off from chosen peers. For tests
    /// only.
    #[arg(long, env = "TERN_FAULT_INJECTION", hide = true)]
    pub fault_injection: bool,
    /// Client connections open at once; more wait until one closes [default: 10000].
    #[arg(long, env = "TERN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// This node's TLS certificate (PEM; its common name is tern-node-<id>). Turns TLS on for
    /// clients and for the other nodes (docs/security.md).
    #[arg(long, env = "TERN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TERN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the nodes' certificates; nodes accept each other only with
    /// one.
    #[arg(long, env = "TERN_TLS_CLUSTER_CA")]
    pub tls_cluster_ca: Option<PathBuf>,
    /// The CA (PEM) of client certificates: clients must then present one (mutual TLS), and
    /// its common name is their principal.
    #[arg(long, env = "TERN_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// none | required: with required, every call needs a token or a client certificate, and
    /// ACLs decide what it may do (docs/security.md) [default: none].
    #[arg(long, env = "TERN_AUTH")]
    pub auth: Option<String>,
    /// A file holding the bootstrap token, whose bearer is the superuser `admin` (or set
    /// TERN_BOOTSTRAP_TOKEN).
    #[arg(long, env = "TERN_BOOTSTRAP_TOKEN_FILE")]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Mirrors of another cluster: reach its nodes over TLS trusting this CA (PEM), not with
    /// this node's own TLS settings (docs/geo.md).
    #[arg(long, env = "TERN_MIRROR_TLS_CA")]
    pub mirror_tls_ca: Option<PathBuf>,
    /// Mirrors of another cluster: the client certificate (PEM) to present there; with
    /// --mirror-tls-key and --mirror-tls-ca.
    #[arg(long, env = "TERN_MIRROR_TLS_CERT")]
    pub mirror_tls_cert: Option<PathBuf>,
    /// The private key of --mirror-tls-cert (PEM).
    #[arg(long, env = "TERN_MIRROR_TLS_KEY")]
    pub mirror_tls_key: Option<PathBuf>,
    /// Mirrors of another cluster: a file holding a token of that cluster to present there.
    #[arg(long, env = "TERN_MIRROR_TOKEN_FILE")]
    pub mirror_token_file: Option<PathBuf>,
    /// A principal that may do anything (repeat, or a comma-separated list).
    #[arg(long = "superuser", env = "TERN_SUPERUSERS", value_delimiter = ',')]
    pub superusers: Vec<String>,
    /// Partitions of a topic created without a count [default: 1].
    #[arg(long, env = "TERN_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<u32>,
    /// Replication factor of a topic created without one, capped at the number of nodes
    /// [default: 3, so min(3, nodes)].
    #[arg(long, env = "TERN_DEFAULT_REPLICATION_FACTOR")]
    pub default_replication_factor: Option<u32>,
    /// Default retention by age in ms, -1 forever [default: 604800000 = 7 days].
    #[arg(long, env = "TERN_DEFAULT_RETENTION_MS", allow_hyphen_values = true)]
    pub default_retention_ms: Option<i64>,
    /// Default retention by size per partition in bytes, -1 unlimited [default: -1].
    #[arg(long, env = "TERN_DEFAULT_RETENTION_BYTES", allow_hyphen_values = true)]
    pub default_retention_bytes: Option<i64>,
    /// Default fsync policy: always | interval [default: always].
    #[arg(long, env = "TERN_DEFAULT_FSYNC")]
    pub default_fsync: Option<String>,
    /// Default fsync interval under `interval`, in ms [default: 100].
    #[arg(long, env = "TERN_DEFAULT_FSYNC_INTERVAL_MS")]
    pub default_fsync_interval_ms: Option<u32>,
    /// Default largest record in bytes [default: 1048576].
    #[arg(long, env = "TERN_DEFAULT_MAX_RECORD_BYTES")]
    pub default_max_record_bytes: Option<u32>,
    /// Default segment size in bytes [default: 134217728].
    #[arg(long, env = "TERN_DEFAULT_SEGMENT_BYTES")]
    pub default_segment_bytes: Option<u64>,
}

impl ServeArgs {
    /// The config file (or defaults), overridden by whatever the flags or environment set.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = v; } )* };
        }
        set!(
            listen,
            data_dir,
            node_id,
            region,
            zone,
            region_addresses,
            cores,
            net_threads,
            mailbox_capacity,
            mailbox_wait_ms,
            max_request_bytes,
            max_records_per_request,
            max_partitions_per_topic,
            max_topics,
            max_concurrent_streams,
            max_subscription_partitions,
            max_fetch_wait_ms,
            io_memory_bytes,
            metadata_snapshot_every,
            metadata_segment_bytes,
            raft_checkpoint_entries,
            raft_heartbeat_ms,
            raft_election_timeout_ms,
            peers,
            join,
            retention_check_interval_ms
        );
        if self.fault_injection {
            c.fault_injection = true;
        }
        if self.node_id_from_ordinal {
            c.node_id_from_ordinal = true;
        }
        set!(
            max_connections,
            auth,
            metrics_partitions,
            auto_create_topics,
            raft_quiet
        );
        if !self.superusers.is_empty() {
            c.superusers = self.superusers;
        }
        macro_rules! set_some {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { c.$field = Some(v); } )* };
        }
        set_some!(
            admin_listen,
            compat_listen,
            otlp_endpoint,
            advertised_address,
            tls_cert,
            tls_key,
            tls_cluster_ca,
            tls_client_ca,
            bootstrap_token_file,
            mirror_tls_ca,
            mirror_tls_cert,
            mirror_tls_key,
            mirror_token_file
        );
        let d = &mut c.topic_defaults;
        macro_rules! set_default {
            ($($flag:ident => $field:ident),*) => { $( if let Some(v) = self.$flag { d.$field = v; } )* };
        }
        set_default!(
            default_partitions => partitions,
            default_replication_factor => replication_factor,
            default_retention_ms => retention_ms,
            default_retention_bytes => retention_bytes,
            default_fsync => fsync,
            default_fsync_interval_ms => fsync_interval_ms,
            default_max_record_bytes => max_record_bytes,
            default_segment_bytes => segment_bytes
        );
        c.settle(crate::node::host_name().as_deref())?;
        c.validate()?;
        Ok(c)
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    let _tracing = init_tracing(&config)?;
    crate::node::run(config)
}

/// Logs to stderr (`RUST_LOG`, default `info,openraft=error`) and, with `otlp_endpoint`,
/// request spans to an OpenTelemetry collector. The spans (target `tern::rpc`, debug level)
/// are made only when something takes them: without the exporter they cost a relaxed load.
fn init_tracing(config: &Config) -> anyhow::Result<Tracing> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,openraft=error")),
        );
    let registry = tracing_subscriber::registry().with(fmt);
    let Some(endpoint) = &config.otlp_endpoint else {
        registry.init();
        return Ok(Tracing::default());
    };
    #[cfg(feature = "otlp")]
    {
        let (layer, otlp) = otlp::layer(endpoint, config)?;
        registry.with(layer).init();
        tracing::info!(endpoint, "exporting request spans over OTLP");
        Ok(Tracing { _otlp: Some(otlp) })
    }
    #[cfg(not(feature = "otlp"))]
    {
        drop(registry);
        anyhow::bail!(
            "--otlp-endpoint {endpoint}: this tern was built without the OTLP exporter \
             (cargo build --release --features otlp)"
        )
    }
}

/// Keeps the span exporter alive; flushes it when the node stops.
#[derive(Default)]
struct Tracing {
    #[cfg(feature = "otlp")]
    _otlp: Option<otlp::Otlp>,
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::Layer;

    use crate::config::Config;

    /// The exporter, and the runtime its gRPC client runs on (the node's own runtime starts
    /// later and is busy with clients).
    pub struct Otlp {
        provider: SdkTracerProvider,
        _runtime: tokio::runtime::Runtime,
    }

    impl Drop for Otlp {
        fn drop(&mut self) {
            if let Err(e) = self.provider.shutdown() {
                eprintln!("flushing spans to the OTLP collector failed: {e}");
            }
        }
    }

    pub fn layer<S>(endpoint: &str, config: &Config) -> anyhow::Result<(impl Layer<S>, Otlp)>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tern-otlp")
            .enable_all()
            .build()?;
        let exporter = runtime.block_on(async {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
        })?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("tern")
            .with_attribute(opentelemetry::KeyValue::new(
                "service.instance.id",
                config.node_id.to_string(),
            ))
            .with_attribute(opentelemetry::KeyValue::new(
                "cloud.region",
                config.region.clone(),
            ))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("tern");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                Targets::new()
                    .with_target("tern::rpc", tracing::Level::DEBUG)
                    .with_target("tern", tracing::Level::INFO),
            );
        Ok((
            layer,
            Otlp {
                provider,
                _runtime: runtime,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tern.toml");
        std::fs::write(
            &file,
            "node_id = 4\nregion = \"eu\"\n[topic_defaults]\npartitions = 6\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            region: Some("us".into()),
            default_fsync: Some("interval".into()),
            ..ServeArgs::default()
        };
        let c = args.resolve().unwrap();
        assert_eq!((c.node_id, c.region.as_str()), (4, "us"));
        assert_eq!(c.topic_defaults.partitions, 6);
        assert_eq!(c.topic_defaults.fsync, "interval");
    }

    #[test]
    fn bad_values_are_refused() {
        let args = ServeArgs {
            default_fsync: Some("sometimes".into()),
            ..ServeArgs::default()
        };
        assert!(args.resolve().is_err());
        // An election timeout must leave room for two heartbeats, and is bounded.
        for (heartbeat, election) in [(150, 300), (150, 899), (0, 1500), (150, 120_000)] {
            let args = ServeArgs {
                raft_heartbeat_ms: Some(heartbeat),
                raft_election_timeout_ms: Some(election),
                ..ServeArgs::default()
            };
            let err = args.resolve().err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains("raft")),
                "heartbeat {heartbeat} / election {election}: {err:?}"
            );
        }
    }
}
