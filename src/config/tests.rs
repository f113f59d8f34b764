//! The node's settings: defaults, TOML, flags and their validation.

use super::*;

#[test]
fn defaults_are_valid_and_round_trip_through_toml() {
    let c = Config::default();
    c.validate().unwrap();
    let text = toml::to_string(&c).unwrap();
    let back = Config::from_toml(&text).unwrap();
    assert_eq!(back, c);
}

#[test]
fn unknown_keys_are_rejected() {
    let e = Config::from_toml("listn = \"1.2.3.4:5\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"listn\"") && e.contains("listen"), "{e}");
    assert!(
        !e.contains("fault_injection"),
        "a hidden key is listed: {e}"
    );
    let c = Config::from_toml("node_id = 7\n[topic_defaults]\npartitions = 3").unwrap();
    assert_eq!((c.node_id, c.topic_defaults.partitions), (7, 3));
    assert!(Config::from_toml("[topic_defaults]\npartitons = 3").is_err());
}

/// The flat form: the flag names of the topic defaults, as `serve --help` says.
#[test]
fn topic_defaults_may_be_flat_keys() {
    let c = Config::from_toml("default_partitions = 3\ndefault_fsync = \"interval\"").unwrap();
    assert_eq!(c.topic_defaults.partitions, 3);
    assert_eq!(c.topic_defaults.fsync, "interval");
    let twice = "default_partitions = 3\n[topic_defaults]\npartitions = 4";
    assert!(Config::from_toml(twice).is_err());
}

/// The example file the repository ships parses, and sets what it says.
#[test]
fn the_example_file_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/tern.example.toml");
    let c = Config::from_file(&path).unwrap();
    c.validate().unwrap();
}

#[test]
fn settle_takes_the_ordinal_and_picks_controller_or_joiner() {
    let peers = "1=tern-0.tern:7070,2=tern-1.tern:7070,3=tern-2.tern:7070";
    let both = |host: &str| {
        let mut c = Config {
            node_id_from_ordinal: true,
            peers: peers.into(),
            join: "tern-0.tern:7070".into(),
            ..Config::default()
        };
        c.settle(Some(host)).map(|()| c)
    };
    let c = both("tern-2").unwrap();
    assert_eq!(
        (c.node_id, c.peers.as_str(), c.join.as_str()),
        (3, peers, "")
    );
    c.validate().unwrap();
    let c = both("tern-3").unwrap();
    assert_eq!((c.node_id, c.peers.as_str()), (4, ""));
    assert_eq!(c.join, "tern-0.tern:7070");
    c.validate().unwrap();
    let e = both("tern").unwrap_err().to_string();
    assert!(e.contains("does not end in -N"), "{e}");
    assert!(both("tern-x").is_err());
    // Without the flag, the id stays and both lists together are refused.
    let mut c = Config {
        node_id: 7,
        ..Config::default()
    };
    c.settle(Some("tern-0")).unwrap();
    assert_eq!(c.node_id, 7);
}

#[test]
fn join_and_retention_interval_are_validated() {
    let ok = Config {
        join: "10.0.0.1:7070".into(),
        ..Config::default()
    };
    ok.validate().unwrap();
    assert!(ok.clustered());
    for bad in [
        Config {
            join: "10.0.0.1".into(),
            ..Config::default()
        },
        Config {
            join: "10.0.0.1:7070".into(),
            peers: "1=a:1".into(),
            ..Config::default()
        },
        Config {
            retention_check_interval_ms: 10,
            ..Config::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    assert!(!Config::default().clustered());
}

#[test]
fn peers_parse_and_bad_lists_are_refused() {
    let c = Config {
        node_id: 2,
        peers: "1=a:1, 2=b:2,3=[::1]:3".into(),
        ..Config::default()
    };
    let m = c.peer_map().unwrap();
    assert_eq!(m.len(), 3);
    assert_eq!(m[&crate::types::NodeId(3)], "[::1]:3");
    for bad in [
        "1=a:1,3=c:3",
        "x=a:1,2=b:2",
        "2=b",
        "2=b:2,2=c:3",
        "0=a:1,2=b:2",
    ] {
        let c = Config {
            node_id: 2,
            peers: bad.into(),
            ..Config::default()
        };
        assert!(c.validate().is_err(), "{bad}");
    }
}

#[test]
fn fsync_names() {
    assert_eq!(parse_fsync("always", 0).unwrap(), FsyncPolicy::Always);
    assert!(parse_fsync("interval", 0).is_err());
    assert!(parse_fsync("sometimes", 10).is_err());
}

/// The election timeout may be as short as the documented 6 × the heartbeat (a shorter one
/// is refused with that rule), whatever the heartbeat.
#[test]
fn an_election_timeout_of_six_heartbeats_is_accepted() {
    for heartbeat in [50, 100, 150, 500] {
        let at = |election| Config {
            raft_heartbeat_ms: heartbeat,
            raft_election_timeout_ms: election,
            ..Config::default()
        };
        at(6 * heartbeat).validate().unwrap();
        let e = at(6 * heartbeat - 1).validate().unwrap_err().to_string();
        assert!(e.contains("at least 6 × raft_heartbeat_ms"), "{e}");
    }
}

/// Mirror credentials for another cluster: a certificate needs its key and the source's CA, a
/// token needs the CA (it is never sent in the clear); the CA alone is valid.
#[test]
fn mirror_credentials_are_checked_together() {
    let with = |toml: &str| {
        Config::from_toml(toml)
            .and_then(|c| c.validate().map(|()| c))
            .map_err(|e| e.to_string())
    };
    let c = with("mirror_tls_ca = \"ca.pem\"").unwrap();
    assert!(c.mirror_credentials());
    let e = with("mirror_token_file = \"t\"").unwrap_err();
    assert!(e.contains("mirror_token_file needs mirror_tls_ca"), "{e}");
    assert!(
        with("mirror_tls_ca = \"ca.pem\"\nmirror_token_file = \"t\"")
            .unwrap()
            .mirror_credentials()
    );
    assert!(!Config::default().mirror_credentials());
    let e = with("mirror_tls_ca = \"ca.pem\"\nmirror_tls_cert = \"c.pem\"").unwrap_err();
    assert!(e.contains("go together"), "{e}");
    let e = with("mirror_tls_cert = \"c.pem\"\nmirror_tls_key = \"k.pem\"").unwrap_err();
    assert!(e.contains("needs mirror_tls_ca"), "{e}");
    with("mirror_tls_ca = \"ca.pem\"\nmirror_tls_cert = \"c.pem\"\nmirror_tls_key = \"k.pem\"")
        .unwrap();
}
