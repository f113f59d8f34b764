//! Security on real processes: TLS and mutual TLS between nodes, the cluster id, tokens,
//! client certificates, ACLs on every node (forwarded calls too), certificate reload, and
//! quotas. Every refusal is checked to have changed nothing.

mod node_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use node_support::certs;
use node_support::cluster::{free_ports, TIMING};
use node_support::{TestNode, TERN};
use tern::proto::internal as ipb;
use tern::proto::v1 as pb;
use tern::proto::v1::tern_client::TernClient;
use tern::tls::certs::{Ca, Issued, Leaf};
use tern::tls::ClientTls;
use tern::types::NodeId;
use tonic::transport::Channel;
use tonic::{Code, Request};

const BOOTSTRAP: &str = "bootstrap-token-for-the-tests-0001";

/// Keeps these tests apart (each starts up to three nodes; together they starve two vCPUs);
/// `TERN_TEST_PARALLEL=1` lets them overlap, as in tests/membership.rs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> Option<std::sync::MutexGuard<'static, ()>> {
    match std::env::var_os("TERN_TEST_PARALLEL") {
        Some(_) => None,
        // A test that failed while holding it leaves it poisoned; the next may still run.
        None => Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner())),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A TLS channel to `addr` trusting `ca`, presenting `cert` (a `certs` name such as
/// `client-carol`) if given.
async fn tls_channel(
    addr: &str,
    ca: &Path,
    cert: Option<(PathBuf, PathBuf)>,
) -> Result<Channel, String> {
    let tls = ClientTls::from_files(
        ca,
        cert.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        Some("localhost".into()),
    )
    .map_err(|e| e.to_string())?;
    let ep = tern::tls::endpoint(addr).unwrap();
    tern::tls::connect(&ep, Some(&tls))
        .await
        .map_err(|e| tern::tls::describe(&e))
}

fn pair(dir: &Path, name: &str) -> Option<(PathBuf, PathBuf)> {
    Some((
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    ))
}

/// A request with a bearer token (or none).
fn req<T>(msg: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn publish_req(topic: &str, value: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        topic: topic.into(),
        records: vec![pb::PublishRecord {
            key: None,
            value: Bytes::from(value.to_string()),
            headers: vec![],
            partition: Some(0),
            expiry_seconds: None,
        }],
        ..Default::default()
    }
}

/// Three TLS nodes with auth required and the bootstrap token, in `dir`.
struct SecureCluster {
    _tmp: tempfile::TempDir,
    certs: PathBuf,
    addrs: Vec<String>,
    /// Kept so the nodes live as long as the cluster (dropping one stops it).
    _nodes: Vec<TestNode>,
}

impl SecureCluster {
    fn start(n: usize, extra: &[&str]) -> SecureCluster {
        let tmp = tempfile::tempdir().unwrap();
        let certs_dir = tmp.path().join("certs");
        certs(&certs_dir, n, &["carol"]);
        let token = tmp.path().join("bootstrap.token");
        std::fs::write(&token, BOOTSTRAP).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let ports = free_ports(n);
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let peers = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = (i + 1).to_string();
            let cert = certs_dir.join(format!("node-{id}.pem"));
            let key = certs_dir.join(format!("node-{id}-key.pem"));
            let ca = certs_dir.join("ca.pem");
            let mut args: Vec<&str> = vec![
                "--node-id",
                &id,
                "--auth",
                "required",
                "--bootstrap-token-file",
                token.to_str().unwrap(),
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
                "--tls-cluster-ca",
                ca.to_str().unwrap(),
            ];
            if n > 1 {
                args.extend(["--peers", &peers]);
                args.extend(TIMING);
            }
            args.extend(extra);
            nodes.push(TestNode::start_at(
                &tmp.path().join(format!("n{id}")),
                addr,
                &args,
            ));
        }
        SecureCluster {
            certs: certs_dir,
            _tmp: tmp,
            addrs,
            _nodes: nodes,
        }
    }

    fn ca(&self) -> PathBuf {
        self.certs.join("ca.pem")
    }

    async fn client(&self, i: usize) -> TernClient<Channel> {
        TernClient::new(tls_channel(&self.addrs[i], &self.ca(), None).await.unwrap())
    }

    /// Waits until every node knows every node, a metadata leader and the cluster id.
    async fn wait_formed(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut id = String::new();
        for i in 0..self.addrs.len() {
            loop {
                let mut c = self.client(i).await;
                if let Ok(r) = c
                    .cluster_info(req(pb::ClusterInfoRequest::default(), Some(BOOTSTRAP)))
                    .await
                {
                    let r = r.into_inner();
                    if r.nodes.len() == self.addrs.len()
                        && r.metadata_leader != 0
                        && r.ready
                        && !r.cluster_id.is_empty()
                    {
                        id = r.cluster_id;
                        break;
                    }
                }
                assert!(Instant::now() < deadline, "the cluster did not form");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        id
    }
}

/// Polls `f` until it returns true, for at most `max`; how long that took.
async fn eventually<F, Fut>(max: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < max, "{what}: not within {max:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// Waits until `check` holds on each node in turn; how long after `since` it held on each.
async fn held_on_every_node<F, Fut>(
    c: &SecureCluster,
    what: &str,
    since: Instant,
    check: F,
) -> Vec<Duration>
where
    F: Fn(TernClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut took = Vec::new();
    for i in 0..c.addrs.len() {
        let n = c.client(i).await;
        eventually(Duration::from_secs(5), what, || check(n.clone())).await;
        took.push(since.elapsed());
    }
    took
}

/// Partition 0's committed end as its leader knows it: the highest any replica reports (a
/// follower learns of a commit a heartbeat later).
async fn end_offset(c: &SecureCluster, topic: &str) -> u64 {
    let mut end = 0;
    for i in 0..c.addrs.len() {
        let r = c
            .client(i)
            .await
            .list_offsets(req(
                pb::ListOffsetsRequest {
                    topic: topic.into(),
                    partitions: vec![0],
                    position: None,
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap()
            .into_inner();
        end = end.max(r.partitions[0].end_offset);
    }
    end
}

#[test]
fn tokens_acls_and_forwarding_on_a_tls_cluster() {
    let _serial = serial();
    rt().block_on(async {
        let c = SecureCluster::start(3, &[]);
        let cluster_id = c.wait_formed().await;
        let mut admin = c.client(0).await;

        // No token, a wrong token: UNAUTHENTICATED, and nothing created.
        let create = |name: &str| pb::CreateTopicRequest {
            name: name.into(),
            partitions: 1,
            replication_factor: 3,
            ..Default::default()
        };
        let e = admin
            .create_topic(req(create("orders"), None))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = admin
            .create_topic(req(create("orders"), Some("tern_not-a-token")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = admin
            .create_topic(req(create("orders"), Some("Basic xyz")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");

        // A user without ACLs: PERMISSION_DENIED, nothing created.
        let alice = admin
            .create_user(req(
                pb::CreateUserRequest {
                    name: "alice".into(),
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap()
            .into_inner()
            .token;
        assert!(alice.starts_with("tern_") && alice.len() > 40);
        let e = admin
            .create_user(req(
                pb::CreateUserRequest {
                    name: "alice".into(),
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists);
        let e = admin
            .create_topic(req(create("orders"), Some(&alice)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let topics = admin
            .list_topics(req(pb::ListTopicsRequest {}, Some(BOOTSTRAP)))
            .await
            .unwrap()
            .into_inner()
            .topics;
        assert!(topics.is_empty(), "a refused create created {topics:?}");
        // Nor may alice manage users or ACLs.
        let e = admin
            .create_user(req(
                pb::CreateUserRequest {
                    name: "mallory".into(),
                },
                Some(&alice),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);

        admin
            .create_topic(req(create("orders"), Some(BOOTSTRAP)))
            .await
            .unwrap();
        // Every node holds a replica; the publish entering a follower is forwarded. (One
        // publish first, so the new leader's own entries are behind us.)
        admin
            .publish(req(publish_req("orders", "first"), Some(BOOTSTRAP)))
            .await
            .unwrap();
        let before = end_offset(&c, "orders").await;
        let publish_acl = pb::AclRequest {
            acl: Some(pb::Acl {
                principal: "alice".into(),
                resource: pb::ResourceType::Topic as i32,
                pattern: pb::PatternType::Prefix as i32,
                name: "ord".into(),
                operation: pb::AclOperation::Publish as i32,
                permission: pb::AclPermission::Allow as i32,
            }),
        };
        for i in 0..3 {
            let mut n = c.client(i).await;
            let e = n
                .publish(req(publish_req("orders", "denied"), Some(&alice)))
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "node {}: {e:?}", i + 1);
        }
        assert_eq!(
            end_offset(&c, "orders").await,
            before,
            "a refused publish wrote"
        );

        // Granted: every node lets alice publish, within a second or so.
        let changed = admin
            .add_acl(req(publish_acl.clone(), Some(BOOTSTRAP)))
            .await
            .unwrap()
            .into_inner()
            .changed;
        assert!(changed);
        let granted = Instant::now();
        let refused = |code: Code| {
            let alice = alice.clone();
            move |mut n: TernClient<Channel>| {
                let alice = alice.clone();
                async move {
                    matches!(
                        n.publish(req(publish_req("orders", "x"), Some(&alice))).await,
                        Err(e) if e.code() == code
                    )
                }
            }
        };
        let mut took = Vec::new();
        // The first publish that goes through on each node is one record.
        let grant = held_on_every_node(&c, "the grant", granted, |mut n| {
            let alice = alice.clone();
            async move {
                n.publish(req(publish_req("orders", "granted"), Some(&alice)))
                    .await
                    .is_ok()
            }
        })
        .await;
        took.push(("grant", grant));
        for i in 0..3 {
            // And one more, certain to go through this node (forwarded from two of them).
            c.client(i)
                .await
                .publish(req(publish_req("orders", "granted"), Some(&alice)))
                .await
                .unwrap();
        }
        assert_eq!(end_offset(&c, "orders").await, before + 6);
        // Subscribing was not granted.
        let e = admin
            .fetch(req(
                pb::FetchRequest {
                    topic: "orders".into(),
                    ..Default::default()
                },
                Some(&alice),
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = admin
            .fetch_stream(req(
                pb::FetchRequest {
                    topic: "orders".into(),
                    raw_batches: true,
                    ..Default::default()
                },
                Some(&alice),
            ))
            .await
            .expect_err("a stream of a topic alice may not read");
        assert_eq!(e.code(), Code::PermissionDenied);
        // A deny wins over the allow.
        let mut deny = publish_acl.clone();
        if let Some(a) = deny.acl.as_mut() {
            a.pattern = pb::PatternType::Literal as i32;
            a.name = "orders".into();
            a.permission = pb::AclPermission::Deny as i32;
        }
        admin
            .add_acl(req(deny.clone(), Some(BOOTSTRAP)))
            .await
            .unwrap();
        let denied = Instant::now();
        let deny_took = held_on_every_node(
            &c,
            "the deny",
            denied,
            refused(Code::PermissionDenied),
        )
        .await;
        took.push(("deny", deny_took));
        // Held: nothing more is written, through any node.
        let denied_at = end_offset(&c, "orders").await;
        for i in 0..3 {
            assert!(refused(Code::PermissionDenied)(c.client(i).await).await);
        }
        assert_eq!(end_offset(&c, "orders").await, denied_at);
        admin.remove_acl(req(deny, Some(BOOTSTRAP))).await.unwrap();
        // Revoked: refused on every node again.
        admin
            .remove_acl(req(publish_acl.clone(), Some(BOOTSTRAP)))
            .await
            .unwrap();
        let revoked = Instant::now();
        let revoke_took = held_on_every_node(
            &c,
            "the revocation",
            revoked,
            refused(Code::PermissionDenied),
        )
        .await;
        took.push(("revoke", revoke_took));
        let acls = admin
            .list_acls(req(pb::ListAclsRequest::default(), Some(BOOTSTRAP)))
            .await
            .unwrap()
            .into_inner()
            .acls;
        assert!(acls.is_empty(), "{acls:?}");
        assert_eq!(end_offset(&c, "orders").await, denied_at);

        // A subscription ends when its ACL is revoked, even while no record arrives.
        let mut sub_acl = publish_acl.clone();
        if let Some(a) = sub_acl.acl.as_mut() {
            a.operation = pb::AclOperation::Subscribe as i32;
        }
        admin
            .add_acl(req(sub_acl.clone(), Some(BOOTSTRAP)))
            .await
            .unwrap();
        let mut n2 = c.client(1).await;
        let first = pb::SubscribeRequest {
            add: vec![pb::TopicSubscription {
                topic: "orders".into(),
                from: Some(pb::StartPosition {
                    position: Some(pb::start_position::Position::Earliest(true)),
                }),
                partitions: vec![],
            }],
            remove: vec![],
        };
        // The grant reaches node 2 within milliseconds; a refused subscribe is retried.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stream = loop {
            match n2
                .subscribe(req(tokio_stream::iter(vec![first.clone()]), Some(&alice)))
                .await
            {
                Ok(s) => break s.into_inner(),
                Err(e) => assert!(Instant::now() < deadline, "the subscribe grant: {e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let records = stream.message().await.unwrap().unwrap().records;
        assert!(!records.is_empty());
        // Drain what is there, then wait idle in the long poll.
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(300), stream.message())
                .await
                .map(|m| m.transpose())
        {}
        admin
            .remove_acl(req(sub_acl, Some(BOOTSTRAP)))
            .await
            .unwrap();
        let revoked_sub = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the subscription went on after its ACL was revoked");
        let e = ended.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        took.push(("idle subscription ended", vec![revoked_sub.elapsed()]));

        // A deleted user's token stops working on every node.
        let who = admin
            .who_am_i(req(pb::WhoAmIRequest {}, Some(&alice)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(who.principal, "alice");
        assert!(!who.superuser && who.auth_required);
        admin
            .delete_user(req(
                pb::DeleteUserRequest {
                    name: "alice".into(),
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap();
        let deleted = Instant::now();
        let delete_took = held_on_every_node(&c, "the deletion", deleted, |mut n| {
            let alice = alice.clone();
            async move {
                matches!(
                    n.who_am_i(req(pb::WhoAmIRequest {}, Some(&alice))).await,
                    Err(e) if e.code() == Code::Unauthenticated
                )
            }
        })
        .await;
        took.push(("user deletion", delete_took));
        // Reported, not asserted: how long each change took to hold on nodes 1, 2 and 3 (upper
        // bounds: the nodes are checked one after another).
        eprintln!("security changes held on the three nodes after: {took:?}");

        // The peer service: without a node certificate nothing gets in.
        let exchange = |from: u64| ipb::ExchangeRequest {
            from,
            to: 1,
            messages: vec![],
            cluster: cluster_id.clone(),
            incarnation: 0,
            ..Default::default()
        };
        let propose = |from: u64| ipb::ProposeRequest {
            from,
            command: Bytes::from(
                serde_json::to_vec(&serde_json::json!({"op": "delete_user", "name": "x"})).unwrap(),
            ),
            forwarded: true,
            cluster: cluster_id.clone(),
        };
        // A TLS caller with no certificate, and one with a client certificate of the same CA.
        for cert in [None, pair(&c.certs, "client-carol")] {
            let ch = tls_channel(&c.addrs[0], &c.ca(), cert.clone())
                .await
                .unwrap();
            let mut p = ipb::peer_client::PeerClient::new(ch.clone());
            let e = p.exchange(exchange(2)).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{cert:?}: {e:?}");
            let e = p.propose(propose(2)).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{cert:?}: {e:?}");
            // Nor join: a registration sent to any member, as a joining node does.
            let join = ipb::ProposeRequest {
                from: 9,
                command: Bytes::from_static(
                    br#"{"op":"register_node","id":9,"member":{"addr":"127.0.0.1:1","region":"x","zone":"x"}}"#,
                ),
                forwarded: false,
                cluster: String::new(),
            };
            let e = p.propose(join).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{cert:?}: {e:?}");
            // Nor may it forward a call in someone else's name.
            let mut t = TernClient::new(ch);
            let mut r = req(publish_req("orders", "forged"), None);
            r.metadata_mut()
                .insert("tern-forwarded", "1".parse().unwrap());
            r.metadata_mut()
                .insert("tern-principal", "admin".parse().unwrap());
            let e = t.publish(r).await.unwrap_err();
            assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        }
        // Node 3's certificate calling as node 2.
        let ch = tls_channel(&c.addrs[0], &c.ca(), pair(&c.certs, "node-3"))
            .await
            .unwrap();
        let mut p = ipb::peer_client::PeerClient::new(ch);
        let e = p.exchange(exchange(2)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // A plaintext caller does not get past the handshake.
        let plain = Channel::from_shared(format!("http://{}", c.addrs[0]))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await;
        if let Ok(ch) = plain {
            let e = ipb::peer_client::PeerClient::new(ch)
                .exchange(exchange(2))
                .await
                .unwrap_err();
            assert_ne!(e.code(), Code::Ok);
        }
        // Nothing changed: one topic, no users, the same three nodes.
        let info = admin
            .cluster_info(req(pb::ClusterInfoRequest::default(), Some(BOOTSTRAP)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.nodes.len(), 3);
        assert_eq!(info.topics.len(), 1);
        assert_eq!(info.cluster_id, cluster_id);
    });
}

/// Writes an issued certificate as NAME.pem and NAME-key.pem in `dir`.
fn write_issued(dir: &Path, name: &str, i: &Issued) -> Option<(PathBuf, PathBuf)> {
    std::fs::write(dir.join(format!("{name}.pem")), &i.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), &i.key_pem).unwrap();
    pair(dir, name)
}

/// Whoever a node takes a TLS client with this certificate for, or why it could not ask.
async fn whoami(addr: &str, ca: &Path, cert: Option<(PathBuf, PathBuf)>) -> Result<String, String> {
    let ch = tls_channel(addr, ca, cert).await?;
    TernClient::new(ch)
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .map(|r| {
            let r = r.into_inner();
            if r.superuser {
                format!("{} (superuser)", r.principal)
            } else {
                r.principal
            }
        })
        .map_err(|e| format!("{e:?}"))
}

#[test]
fn client_certificates_map_to_principals_and_bad_ones_are_refused() {
    let _serial = serial();
    rt().block_on(async {
        // One node; clients must present a certificate from the client CA (a file of its own,
        // so the test can change it).
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        certs(&dir, 1, &["carol", "ops"]);
        let ca = dir.join("ca.pem");
        let client_ca = dir.join("client-ca.pem");
        std::fs::copy(&ca, &client_ca).unwrap();
        let node = TestNode::start(
            &tmp.path().join("n1"),
            &[
                "--node-id",
                "1",
                "--auth",
                "required",
                "--tls-cert",
                dir.join("node-1.pem").to_str().unwrap(),
                "--tls-key",
                dir.join("node-1-key.pem").to_str().unwrap(),
                "--tls-cluster-ca",
                ca.to_str().unwrap(),
                "--tls-client-ca",
                client_ca.to_str().unwrap(),
                "--superuser",
                "ops",
            ],
        );
        let addr = node.addr.clone();
        // A configured superuser, by its certificate.
        assert_eq!(
            whoami(&addr, &ca, pair(&dir, "client-ops")).await.unwrap(),
            "ops (superuser)"
        );

        // The certificate's common name is the principal.
        assert_eq!(
            whoami(&addr, &ca, pair(&dir, "client-carol"))
                .await
                .unwrap(),
            "carol"
        );
        // Without a certificate, with one of another CA, or an expired one: refused.
        assert!(whoami(&addr, &ca, None).await.is_err());
        let other = Ca::create("another CA", 30).unwrap();
        let dave = other.issue(&Leaf::Client { name: "dave" }, 0, 30).unwrap();
        let dave = write_issued(&dir, "dave", &dave);
        let e = whoami(&addr, &ca, dave.clone()).await.unwrap_err();
        assert!(!e.contains("dave"), "{e}");
        let ours = Ca::load(
            &std::fs::read_to_string(&ca).unwrap(),
            &std::fs::read_to_string(dir.join("ca-key.pem")).unwrap(),
        )
        .unwrap();
        let old = ours.issue(&Leaf::Client { name: "old" }, -10, 1).unwrap();
        let old = write_issued(&dir, "old", &old);
        assert!(
            whoami(&addr, &ca, old).await.is_err(),
            "an expired certificate got in"
        );
        // A node certificate of another CA cannot call the peer service either.
        let hosts = vec!["localhost".to_string()];
        let fake = other
            .issue(
                &Leaf::Node {
                    id: NodeId(2),
                    hosts: &hosts,
                },
                0,
                30,
            )
            .unwrap();
        let fake = write_issued(&dir, "fake-node-2", &fake);
        if let Ok(ch) = tls_channel(&addr, &ca, fake).await {
            let e = ipb::peer_client::PeerClient::new(ch)
                .exchange(ipb::ExchangeRequest {
                    from: 2,
                    to: 1,
                    ..Default::default()
                })
                .await
                .unwrap_err();
            assert_ne!(e.code(), Code::Ok);
        }
        // A client that trusts another CA does not accept the node.
        let other_ca = dir.join("other-ca.pem");
        std::fs::write(&other_ca, &other.cert_pem).unwrap();
        assert!(whoami(&addr, &other_ca, pair(&dir, "client-carol"))
            .await
            .is_err());

        // Reload without a restart: trust the other CA's clients too (the file changes).
        let both = format!(
            "{}{}",
            std::fs::read_to_string(&ca).unwrap(),
            other.cert_pem
        );
        std::fs::write(&client_ca, both).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match whoami(&addr, &ca, dave.clone()).await {
                Ok(p) => {
                    assert_eq!(p, "dave");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "not reloaded: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // And back, on SIGHUP.
        std::fs::copy(&ca, &client_ca).unwrap();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &node.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while whoami(&addr, &ca, dave.clone()).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "the old client CA is still trusted"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            whoami(&addr, &ca, pair(&dir, "client-carol"))
                .await
                .unwrap(),
            "carol"
        );
    });
}

#[test]
fn a_node_of_another_cluster_is_refused() {
    let _serial = serial();
    rt().block_on(async {
        let c = node_support::cluster::Cluster::start(3).await;
        // The first metadata leader names the cluster; every node learns the id and keeps it.
        let mut id = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..3 {
            loop {
                let r = c
                    .client(i)
                    .await
                    .cluster_info(pb::ClusterInfoRequest::default())
                    .await
                    .unwrap()
                    .into_inner();
                if !r.cluster_id.is_empty() {
                    assert!(
                        id.is_empty() || id == r.cluster_id,
                        "two ids in one cluster"
                    );
                    id = r.cluster_id;
                    break;
                }
                assert!(Instant::now() < deadline, "no cluster id");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        for d in &c.dirs {
            let kept = std::fs::read_to_string(d.join("cluster.id")).unwrap();
            assert_eq!(kept.trim(), id);
        }
        let ch = Channel::from_shared(format!("http://{}", c.addrs[0]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut p = ipb::peer_client::PeerClient::new(ch.clone());
        // Plaintext, and the right node ids, but another cluster's id: refused.
        let e = p
            .exchange(ipb::ExchangeRequest {
                from: 2,
                to: 1,
                messages: vec![],
                cluster: "0000-another-cluster".into(),
                incarnation: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("another-cluster"), "{e:?}");
        let e = p
            .propose(ipb::ProposeRequest {
                from: 2,
                command: Bytes::from_static(br#"{"op":"remove_node","id":3}"#),
                forwarded: true,
                cluster: "0000-another-cluster".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // A call forwarded from another cluster is refused too.
        let mut r = Request::new(pb::ListTopicsRequest {});
        r.metadata_mut()
            .insert("tern-forwarded", "1".parse().unwrap());
        r.metadata_mut()
            .insert("tern-cluster", "0000-another-cluster".parse().unwrap());
        let e = TernClient::new(ch).list_topics(r).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // Nothing changed: node 3 is still a member.
        let r = c
            .client(0)
            .await
            .cluster_info(pb::ClusterInfoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.nodes.len(), 3);
        assert!(r.nodes.iter().all(|n| !n.draining));

        // The id survives a restart in DATA_DIR/cluster.id, and is trusted before the node has
        // caught up: node 3 restarted with another cluster's id refuses this cluster's calls.
        let mut c = c;
        c.kill9(2);
        std::fs::write(c.dirs[2].join("cluster.id"), "0000-another-cluster").unwrap();
        c.start_node(2);
        let ch = Channel::from_shared(format!("http://{}", c.addrs[2]))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let e = ipb::peer_client::PeerClient::new(ch)
            .exchange(ipb::ExchangeRequest {
                from: 1,
                to: 3,
                messages: vec![],
                cluster: id.clone(),
                incarnation: 0,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("0000-another-cluster"), "{e:?}");
        // A file that does not hold an id stops the node at start, saying so.
        c.kill9(2);
        std::fs::write(c.dirs[2].join("cluster.id"), "Not An Id!").unwrap();
        let out = std::process::Command::new(TERN)
            .args([
                "serve",
                "--node-id",
                "3",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(&c.dirs[2])
            .args(["--peers", &c.peers])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not hold a cluster id"), "{err}");
    });
}

/// One node under `dir` with authentication required and the bootstrap token.
fn auth_node(dir: &Path) -> TestNode {
    let token = dir.join("t");
    std::fs::write(&token, BOOTSTRAP).unwrap();
    TestNode::start(
        &dir.join("n1"),
        &[
            "--node-id",
            "1",
            "--auth",
            "required",
            "--bootstrap-token-file",
            token.to_str().unwrap(),
        ],
    )
}

/// A new user `name`, a one-partition `topic`, and an ACL allowing the user `op` on it; the
/// user's token.
async fn user_with_topic(
    admin: &mut TernClient<Channel>,
    name: &str,
    topic: &str,
    op: pb::AclOperation,
) -> String {
    let token = admin
        .create_user(req(
            pb::CreateUserRequest { name: name.into() },
            Some(BOOTSTRAP),
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    admin
        .create_topic(req(
            pb::CreateTopicRequest {
                name: topic.into(),
                partitions: 1,
                ..Default::default()
            },
            Some(BOOTSTRAP),
        ))
        .await
        .unwrap();
    admin
        .add_acl(req(
            pb::AclRequest {
                acl: Some(pb::Acl {
                    principal: name.into(),
                    resource: pb::ResourceType::Topic as i32,
                    name: topic.into(),
                    operation: op as i32,
                    ..Default::default()
                }),
            },
            Some(BOOTSTRAP),
        ))
        .await
        .unwrap();
    token
}

#[test]
fn a_fetch_stream_is_held_to_its_consume_quota_and_says_it_is_alive_meanwhile() {
    let _serial = serial();
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let node = auth_node(tmp.path());
        let mut admin = node.client().await;
        let reader =
            user_with_topic(&mut admin, "reader", "big", pb::AclOperation::Subscribe).await;
        const QUOTA: u64 = 20_000;
        admin
            .set_quota(req(
                pb::SetQuotaRequest {
                    principal: "reader".into(),
                    quota: Some(pb::Quota {
                        consume_bytes_per_sec: Some(QUOTA),
                        ..Default::default()
                    }),
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap();
        let value = "v".repeat(10_000);
        for _ in 0..30 {
            admin
                .publish(req(publish_req("big", &value), Some(BOOTSTRAP)))
                .await
                .unwrap();
        }
        // 300 kB to read at 20 kB/s: one record per answer, the stream paused between them.
        let mut stream = admin
            .fetch_stream(req(
                pb::FetchRequest {
                    topic: "big".into(),
                    max_bytes: 10_000,
                    max_wait_ms: 200,
                    ..Default::default()
                },
                Some(&reader),
            ))
            .await
            .unwrap()
            .into_inner();
        let start = Instant::now();
        let (mut bytes, mut empty, mut next) = (0u64, 0u32, None::<u64>);
        while start.elapsed() < Duration::from_secs(4) {
            let r = tokio::time::timeout(Duration::from_secs(2), stream.message())
                .await
                .expect("an answer at least every long poll, paused or not")
                .expect("the stream goes on")
                .expect("the stream goes on");
            for rec in &r.records {
                assert!(next.is_none_or(|n| rec.offset >= n), "in order");
                next = Some(rec.offset + 1);
                bytes += rec.value.len() as u64;
            }
            empty += u32::from(r.records.is_empty());
        }
        let secs = start.elapsed().as_secs_f64();
        // One second of burst, the quota's rate since, and the answer that went over it.
        let most = QUOTA as f64 * (1.0 + secs) + 10_000.0;
        assert!(
            (bytes as f64) <= most,
            "{bytes} bytes in {secs:.1} s against a quota of {QUOTA}/s"
        );
        assert!(bytes >= 2 * 10_000, "the stream moved on: {bytes} bytes");
        assert!(
            empty >= 2,
            "paused by the quota, the stream answered empty meanwhile ({empty} times)"
        );
    });
}

#[test]
fn a_flooding_producer_is_held_to_its_quota() {
    let _serial = serial();
    rt().block_on(async {
        let tmp = tempfile::tempdir().unwrap();
        let node = auth_node(tmp.path());
        let mut admin = node.client().await;
        let mut tokens = Vec::new();
        for name in ["heavy", "light"] {
            tokens.push(user_with_topic(&mut admin, name, name, pb::AclOperation::Publish).await);
        }
        const QUOTA: u64 = 100_000;
        admin
            .set_quota(req(
                pb::SetQuotaRequest {
                    principal: "heavy".into(),
                    quota: Some(pb::Quota {
                        publish_bytes_per_sec: Some(QUOTA),
                        ..Default::default()
                    }),
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap();
        let quotas = admin
            .list_quotas(req(pb::ListQuotasRequest {}, Some(BOOTSTRAP)))
            .await
            .unwrap()
            .into_inner()
            .quotas;
        assert_eq!(quotas.len(), 1);

        // The light producer: 1,000 records/s, one at a time, alone and then beside the flood.
        let light = |secs: u64| {
            let c = node.client();
            let t = tokens[1].clone();
            async move {
                let c = c.await;
                let mut calls = tokio::task::JoinSet::new();
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while start.elapsed() < Duration::from_secs(secs) {
                    tick.tick().await;
                    let (mut c, t) = (c.clone(), t.clone());
                    calls.spawn(async move {
                        let t0 = Instant::now();
                        c.publish(req(publish_req("light", "x"), Some(&t)))
                            .await
                            .expect("the light producer is never throttled");
                        t0.elapsed()
                    });
                }
                let mut lat = calls.join_all().await;
                lat.sort();
                (lat.len(), lat[lat.len() * 99 / 100])
            }
        };
        let (alone_n, alone_p99) = light(2).await;

        const SECS: u64 = 4;
        let heavy_value = "h".repeat(10_000);
        let mut flood = Vec::new();
        for _ in 0..4 {
            let c = node.client().await;
            let t = tokens[0].clone();
            let v = heavy_value.clone();
            flood.push(tokio::spawn(async move {
                let mut c = c;
                let (mut accepted, mut refused) = (0u64, 0u64);
                let start = Instant::now();
                // 25 requests of 10 kB a second each: 1 MB/s in all, ten times the quota.
                let mut tick = tokio::time::interval(Duration::from_millis(40));
                while start.elapsed() < Duration::from_secs(SECS) {
                    tick.tick().await;
                    match c.publish(req(publish_req("heavy", &v), Some(&t))).await {
                        Ok(_) => accepted += 1,
                        Err(e) => {
                            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                            let ms: u64 = e
                                .metadata()
                                .get("retry-after-ms")
                                .expect("retry-after-ms")
                                .to_str()
                                .unwrap()
                                .parse()
                                .unwrap();
                            assert!(ms > 0);
                            refused += 1;
                        }
                    }
                }
                (accepted, refused)
            }));
        }
        let (flooded_n, flooded_p99) = light(SECS).await;
        let (mut accepted, mut refused) = (0, 0);
        for f in flood {
            let (a, r) = f.await.unwrap();
            accepted += a;
            refused += r;
        }
        let bytes = accepted * 10_000;
        // At most the quota over the run, one second of burst and the longest wait's worth.
        let most = QUOTA * SECS + QUOTA + QUOTA / 2 + 4 * 10_000;
        assert!(bytes <= most, "{bytes} bytes accepted; at most {most}");
        // Past the longest wait, calls are refused with a retry-after: 32 at once.
        let mut burst = Vec::new();
        for _ in 0..32 {
            let mut c = node.client().await;
            let t = tokens[0].clone();
            let v = heavy_value.clone();
            burst.push(tokio::spawn(async move {
                c.publish(req(publish_req("heavy", &v), Some(&t))).await
            }));
        }
        let mut burst_refused = 0;
        for b in burst {
            if let Err(e) = b.await.unwrap() {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(e.metadata().get("retry-after-ms").is_some(), "{e:?}");
                burst_refused += 1;
            }
        }
        assert!(burst_refused > 0, "32 requests at once, 6 s of quota, none refused");
        assert!(
            bytes >= QUOTA * SECS / 2,
            "only {bytes} bytes accepted in {SECS} s under a quota of {QUOTA}/s"
        );
        // Reported, not asserted (timing depends on the machine): see the closing note.
        eprintln!(
            "quota: heavy accepted {bytes} B in {SECS} s ({} B/s; quota {QUOTA}), {refused} \
             refused, the others slowed; {burst_refused} of 32 at once refused; light p99 alone {alone_p99:?} ({alone_n} records), beside the flood \
             {flooded_p99:?} ({flooded_n} records)",
            bytes / SECS
        );
    });
}

/// Fetches `topic`'s partition 0 from `c`'s node 0 until it holds `n` records (30 s at most).
async fn fetch_until(c: &SecureCluster, topic: &str, n: usize) -> Vec<pb::Record> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = c
            .client(0)
            .await
            .fetch(req(
                pb::FetchRequest {
                    topic: topic.into(),
                    max_bytes: 1 << 20,
                    ..Default::default()
                },
                Some(BOOTSTRAP),
            ))
            .await
            .map(|r| r.into_inner().records);
        if let Ok(records) = &got {
            if records.len() >= n {
                return records.clone();
            }
        }
        assert!(Instant::now() < deadline, "{topic}: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A mirror of a topic in another TLS cluster, with its own CA and `--auth required`: the
/// mirroring node trusts the source's CA (`--mirror-tls-ca`) and presents a token of the source
/// cluster (`--mirror-token-file`), never its own node certificate. The source's ACLs hold: a
/// token without `describe` and `subscribe` on the topic is refused and nothing is created;
/// once granted, the records are copied with their offsets, and later ones follow.
#[test]
fn a_mirror_of_another_tls_cluster_pulls_with_its_own_credentials() {
    let _serial = serial();
    rt().block_on(async {
        let source = SecureCluster::start(1, &[]);
        source.wait_formed().await;
        let mut s = source.client(0).await;
        s.create_topic(req(
            pb::CreateTopicRequest {
                name: "orders".into(),
                partitions: 1,
                replication_factor: 1,
                ..Default::default()
            },
            Some(BOOTSTRAP),
        ))
        .await
        .unwrap();
        for v in ["a", "b", "c"] {
            s.publish(req(publish_req("orders", v), Some(BOOTSTRAP)))
                .await
                .unwrap();
        }
        let token = s
            .create_user(req(
                pb::CreateUserRequest {
                    name: "dr-site".into(),
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap()
            .into_inner()
            .token;

        // The mirroring cluster: its own CA, and the source's CA and token for mirrors.
        let files = tempfile::tempdir().unwrap();
        let token_file = files.path().join("source.token");
        std::fs::write(&token_file, &token).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let source_ca = source.ca();
        let mirror = SecureCluster::start(
            1,
            &[
                "--mirror-tls-ca",
                source_ca.to_str().unwrap(),
                "--mirror-token-file",
                token_file.to_str().unwrap(),
            ],
        );
        mirror.wait_formed().await;
        let mut m = mirror.client(0).await;
        let create = pb::CreateTopicRequest {
            name: "orders-dr".into(),
            replication_factor: 1,
            mirror_of: Some(pb::MirrorOf {
                topic: "orders".into(),
                addresses: vec![source.addrs[0].clone()],
            }),
            ..Default::default()
        };

        // Not granted at the source yet: refused there, so refused here, and nothing created.
        let e = m
            .create_topic(req(create.clone(), Some(BOOTSTRAP)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("dr-site"), "{e:?}");
        let topics = m
            .list_topics(req(pb::ListTopicsRequest {}, Some(BOOTSTRAP)))
            .await
            .unwrap()
            .into_inner()
            .topics;
        assert!(topics.is_empty(), "a refused mirror created {topics:?}");

        for operation in [pb::AclOperation::Describe, pb::AclOperation::Subscribe] {
            s.add_acl(req(
                pb::AclRequest {
                    acl: Some(pb::Acl {
                        principal: "dr-site".into(),
                        resource: pb::ResourceType::Topic as i32,
                        pattern: pb::PatternType::Literal as i32,
                        name: "orders".into(),
                        operation: operation as i32,
                        permission: pb::AclPermission::Allow as i32,
                    }),
                },
                Some(BOOTSTRAP),
            ))
            .await
            .unwrap();
        }
        m.create_topic(req(create, Some(BOOTSTRAP)))
            .await
            .expect("create the mirror once granted");
        // The same records at the same offsets as at the source.
        let seen = |records: Vec<pb::Record>| -> Vec<(u64, Bytes)> {
            records.into_iter().map(|r| (r.offset, r.value)).collect()
        };
        let at_source = seen(fetch_until(&source, "orders", 3).await);
        let values: Vec<&Bytes> = at_source.iter().map(|(_, v)| v).collect();
        assert_eq!(values, ["a", "b", "c"]);
        assert_eq!(seen(fetch_until(&mirror, "orders-dr", 3).await), at_source);
        s.publish(req(publish_req("orders", "d"), Some(BOOTSTRAP)))
            .await
            .unwrap();
        let at_source = seen(fetch_until(&source, "orders", 4).await);
        assert_eq!(seen(fetch_until(&mirror, "orders-dr", 4).await), at_source);
    });
}
