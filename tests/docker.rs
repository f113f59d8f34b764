//! The shipped Dockerfile and compose file, run for real on the machine's Docker engine: the
//! image builds (from the binary this test run compiled, on a base made from this machine's
//! libraries, since no registry can be reached), three nodes start under the shipped seccomp
//! profile with io_uring in use, a client outside the containers creates a topic, publishes and
//! subscribes, `docker kill` of the leader's container loses no acknowledged record, the
//! restarted container catches up, every node's /metrics passes promtool with the values
//! the load implies, and a leader cut off by `docker network disconnect` (a partition made
//! by the kernel) is replaced and, reconnected, catches up without losing anything.

mod node_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use node_support::cluster::{check_acked, read_all, record, Writer};
use node_support::tools::{http_get, sample, tool};
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tokio_stream::StreamExt;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} cannot run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The memlock limit the containers can have: unlimited as shipped, unless this machine's own
/// hard limit is lower (a Docker daemon cannot give a container more than it has; the CI
/// sandboxes hold 8 MiB).
fn memlock() -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(4))
        .unwrap_or("unlimited")
        .to_string();
    if hard == "unlimited" {
        "-1".into()
    } else {
        hard
    }
}

/// A compose project of the shipped deploy/compose.yaml, taken down with its volumes and image
/// when dropped.
struct Compose {
    project: String,
    image: String,
    env: Vec<(String, String)>,
}

impl Compose {
    fn command(&self) -> Command {
        // Debian's docker-compose (v1), else the compose plugin (v2).
        let mut cmd = if Command::new("docker-compose")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            Command::new("docker-compose")
        } else {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        };
        cmd.current_dir(Path::new(ROOT).join("deploy"))
            .args(["-p", &self.project])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        stdout(run(self.command().args(args)))
    }

    /// The host address a service's container port is published on.
    fn port(&self, service: &str, port: u16) -> String {
        self.run(&["port", service, &port.to_string()])
    }

    fn container(&self, service: &str) -> String {
        self.run(&["ps", "-q", service])
    }

    fn health(&self, service: &str) -> String {
        let id = self.container(service);
        stdout(run(Command::new("docker").args([
            "inspect",
            "-f",
            "{{.State.Health.Status}}",
            &id,
        ])))
    }

    fn wait_healthy(&self, service: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let h = self.health(service);
            if h == "healthy" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{service} is {h}; logs:\n{}",
                self.run(&["logs", "--tail", "50", service])
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        let _ = self
            .command()
            .args(["down", "-v", "--timeout", "5"])
            .output();
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.image])
            .output();
    }
}

/// Builds the image from the repository's Dockerfile: the binary this test run compiled,
/// stripped, on a base of this machine's loader and libraries.
fn build_image(tag: &str) {
    let staged = Path::new(ROOT).join("target/docker");
    std::fs::create_dir_all(&staged).unwrap();
    let bin = staged.join("tern");
    std::fs::copy(node_support::TERN, &bin).unwrap();
    run(Command::new("strip").arg(&bin));
    let base = format!("{tag}-base");
    run(
        Command::new(Path::new(ROOT).join("deploy/docker/base-image.sh"))
            .arg(&bin)
            .arg(&base),
    );
    run(Command::new("docker").current_dir(ROOT).args([
        "build",
        "-q",
        "--build-arg",
        &format!("BASE={base}"),
        "--build-arg",
        "BINARY=target/docker/tern",
        "-t",
        tag,
        ".",
    ]));
    let _ = Command::new("docker").args(["rmi", &base]).output();
}

fn scrape(admin: &str) -> String {
    let (code, body) = http_get(admin, "/metrics").expect("scrape");
    assert_eq!(code, 200, "{body}");
    body
}

fn promtool_passes(text: &str) {
    use std::io::Write;
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn client(addr: &str) -> TernClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TernClient::connect(format!("http://{addr}")).await {
            Ok(c) => return c,
            Err(e) => assert!(Instant::now() < deadline, "{addr}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader of `topic`/0 as a node with a replica reports it (node ids are 1, 2, 3).
async fn leader(c: &mut TernClient<tonic::transport::Channel>, topic: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = c.cluster_info(pb::ClusterInfoRequest::default()).await {
            let l = r
                .into_inner()
                .topics
                .iter()
                .filter(|t| t.topic == topic)
                .flat_map(|t| t.partitions.iter())
                .find(|p| p.partition == 0 && p.local)
                .map_or(0, |p| p.leader);
            if l != 0 {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "no leader for {topic}/0");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_cluster_runs_with_io_uring_survives_docker_kill_and_exports_metrics() {
    let id = std::process::id();
    let image = format!("tern:test-{id}");
    build_image(&image);
    // The image is small, runs as the non-root user, and checks its own readiness.
    let inspect = |f: &str| {
        stdout(run(
            Command::new("docker").args(["image", "inspect", "-f", f, &image])
        ))
    };
    let size: u64 = inspect("{{.Size}}").parse().unwrap();
    assert!(size < 100 << 20, "image of {size} bytes");
    assert_eq!(inspect("{{.Config.User}}"), "65532:65532");
    assert!(inspect("{{.Config.Healthcheck.Test}}").contains("readyz"));

    let mut env = vec![
        ("TERN_IMAGE".to_string(), image.clone()),
        ("TERN_MEMLOCK".to_string(), memlock()),
    ];
    for n in 1..=3 {
        env.push((format!("TERN_PUBLISH_{n}"), "127.0.0.1:".into()));
        env.push((format!("TERN_ADMIN_{n}"), "127.0.0.1:".into()));
    }
    let compose = Compose {
        project: format!("terntest{id}"),
        image,
        env,
    };
    compose.run(&["up", "-d", "--no-build", "node1", "node2", "node3"]);
    let services = ["node1", "node2", "node3"];
    for s in services {
        compose.wait_healthy(s);
    }
    for s in services {
        let logs = compose.run(&["logs", s]);
        assert!(logs.contains("io_uring in use"), "{s}:\n{logs}");
    }
    let addrs: Vec<String> = services.iter().map(|s| compose.port(s, 7070)).collect();
    let admins: Vec<String> = services.iter().map(|s| compose.port(s, 9644)).collect();

    // A client outside the containers: create, publish, subscribe.
    let mut c = client(&addrs[0]).await;
    c.create_topic(pb::CreateTopicRequest {
        name: "dk".into(),
        partitions: 1,
        replication_factor: 3,
        config: None,
        placement: None,
        mirror_of: None,
    })
    .await
    .expect("create topic");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SubscribeRequest {
        add: vec![pb::TopicSubscription {
            topic: "dk".into(),
            from: Some(pb::StartPosition {
                position: Some(pb::start_position::Position::Earliest(true)),
            }),
            partitions: vec![],
        }],
        remove: vec![],
    })
    .await
    .unwrap();
    let mut sub = client(&addrs[1])
        .await
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("subscribe")
        .into_inner();
    for i in 0..20 {
        node_support::cluster::publish_retrying(
            &mut c,
            pb::PublishRequest {
                topic: "dk".into(),
                records: vec![record(0, format!("first-{i}"))],
                ..Default::default()
            },
        )
        .await;
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, sub.next())
            .await
            .expect("subscribed records arrive")
            .expect("stream open")
            .expect("no error");
        got.extend(node_support::cluster::values(&r.records));
    }
    let want: Vec<String> = (0..20).map(|i| format!("first-{i}")).collect();
    assert_eq!(got, want);
    drop((sub, tx));

    // `docker kill` the leader's container while an idempotent producer writes through every
    // node: writing resumes, and nothing acknowledged is lost or written twice.
    let led = leader(&mut c, "dk").await;
    let victim = services[led as usize - 1];
    let writer = Writer::start_idempotent(addrs.clone(), "dk");
    writer
        .wait_acked(50, Duration::from_secs(60), "writer stuck before the kill")
        .await;
    run(Command::new("docker").args(["kill", &compose.container(victim)]));
    let before = writer.acked();
    writer
        .wait_acked(
            before + 50,
            Duration::from_secs(60),
            "publishing did not resume after the leader's container was killed",
        )
        .await;
    let acked = writer.finish().await;
    let survivor = (0..3).find(|i| *i != led as usize - 1).unwrap();
    let mut s = client(&addrs[survivor]).await;
    let log: Vec<String> = read_all(&mut s, "dk", 0, 20 + acked.len())
        .await
        .into_iter()
        .filter(|v| !v.starts_with("first-"))
        .collect();
    assert_eq!(check_acked(&log, &acked), 0, "duplicates");

    // The killed container comes back and catches up: its own replica has every record.
    compose.run(&["start", victim]);
    compose.wait_healthy(victim);
    let back = led as usize - 1;
    // A restarted container gets new ephemeral host ports.
    let mut admins = admins;
    admins[back] = compose.port(victim, 9644);
    let mut r = client(&compose.port(victim, 7070)).await;
    let log: Vec<String> = read_all(&mut r, "dk", 0, 20 + acked.len())
        .await
        .into_iter()
        .filter(|v| !v.starts_with("first-"))
        .collect();
    assert_eq!(
        check_acked(&log, &acked),
        0,
        "duplicates on the restarted node"
    );

    // Metrics from every container: valid, and what the load implies; the partition is fully
    // replicated again once the restarted follower is back in sync.
    let records = (20 + acked.len()) as f64;
    let labels = [("topic", "dk"), ("partition", "0")];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let texts: Vec<String> = admins.iter().map(|a| scrape(a)).collect();
        let led: Vec<&String> = texts
            .iter()
            .filter(|t| sample(t, "tern_partition_under_replicated", &labels).is_some())
            .collect();
        if led.len() == 1 && sample(led[0], "tern_partition_under_replicated", &labels) == Some(0.0)
        {
            for t in &texts {
                promtool_passes(t);
                assert_eq!(sample(t, "tern_partition_replicas", &labels), Some(3.0));
            }
            let hw = sample(led[0], "tern_partition_high_watermark", &labels).unwrap();
            // Offsets count Raft's own entries too: a few per leader term.
            assert!(
                hw >= records && hw <= records + 20.0,
                "high watermark {hw} for {records} records"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "dk/0 not led by one node, in sync:\n{}",
            texts.join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Latency of the publishes the survivors took (the writer moves on from a node whose
    // publish failed, so which survivor took them depends on the failover's timing).
    let texts: Vec<String> = (0..3)
        .filter(|i| *i != back)
        .map(|i| scrape(&admins[i]))
        .collect();
    let publishes: f64 = texts
        .iter()
        .map(|text| {
            sample(
                text,
                "tern_request_duration_seconds_count",
                &[("method", "Publish"), ("code", "OK")],
            )
            .unwrap_or(0.0)
                + sample(
                    text,
                    "tern_request_duration_seconds_count",
                    &[("method", "InitProducer"), ("code", "OK")],
                )
                .unwrap_or(0.0)
        })
        .sum();
    assert!(publishes > 0.0, "{}", texts.join("\n----\n"));

    // A partition made by the kernel, not by Tern's fault-injection hook: the leader's
    // container is disconnected from the cluster's private network (its traffic to peers
    // and clients alike goes nowhere) while an idempotent producer writes through the other
    // two. They elect a leader and acknowledge more; reconnected, the old leader steps down
    // and catches up, and every node holds every acknowledged record exactly once, in order.
    let mut addrs = addrs;
    addrs[back] = compose.port(victim, 7070);
    let mut c = client(&addrs[survivor]).await;
    c.create_topic(pb::CreateTopicRequest {
        name: "dkp".into(),
        partitions: 1,
        replication_factor: 3,
        config: None,
        placement: None,
        mirror_of: None,
    })
    .await
    .expect("create topic dkp");
    let led = leader(&mut c, "dkp").await as usize - 1;
    let majority: Vec<String> = (0..3)
        .filter(|i| *i != led)
        .map(|i| addrs[i].clone())
        .collect();
    let writer = Writer::start_idempotent(majority.clone(), "dkp");
    writer
        .wait_acked(
            50,
            Duration::from_secs(60),
            "writer stuck before the partition",
        )
        .await;
    let network = format!("{}_tern", compose.project);
    let cut = compose.container(services[led]);
    run(Command::new("docker").args(["network", "disconnect", &network, &cut]));
    let before = writer.acked();
    writer
        .wait_acked(
            before + 50,
            Duration::from_secs(60),
            "the majority did not go on writing while the leader was cut off",
        )
        .await;
    let mut m = client(&majority[0]).await;
    let new_leader = leader(&mut m, "dkp").await as usize - 1;
    assert_ne!(
        new_leader, led,
        "the cut-off node still leads for the majority"
    );
    // Back under its service name, which its peers know it by.
    run(Command::new("docker").args([
        "network",
        "connect",
        "--alias",
        services[led],
        &network,
        &cut,
    ]));
    let acked = writer.finish().await;
    // Its host port mapping does not come back with the network; its address on the
    // cluster's network is reachable from the host.
    let ip = stdout(run(Command::new("docker").args([
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        &cut,
    ])));
    addrs[led] = format!("{ip}:7070");
    for (i, addr) in addrs.iter().enumerate() {
        let mut r = client(addr).await;
        let log = read_all(&mut r, "dkp", 0, acked.len()).await;
        assert_eq!(check_acked(&log, &acked), 0, "duplicates on node {}", i + 1);
    }
}
