//! The geo workloads' parts: where clients connect by region, placement and leader pinning,
//! mirrors, the loss of a region, and the replay from the earliest offset.

use super::*;

/// Where producers and consumers connect: with a region, only its nodes (they forward to
/// leaders elsewhere; a client that failed over to another region's node would stall there
/// when that region is cut off, as it would across a real WAN).
pub(crate) async fn routes(c: &cluster::Cluster, s: &Settings) -> anyhow::Result<run::Routes> {
    async fn side(
        c: &cluster::Cluster,
        region: Option<&str>,
    ) -> anyhow::Result<(Vec<String>, usize)> {
        let Some(region) = region else {
            return Ok((c.addrs.clone(), c.addrs.len()));
        };
        if c.mesh.is_some() {
            let local = c.regions.iter().filter(|r| *r == region).count();
            let mut addrs = c.addrs_from(Some(region));
            addrs.truncate(local);
            return Ok((addrs, local));
        }
        // Running nodes: ask one for the nodes of the region, as advertised to it.
        let first = c
            .addrs
            .first()
            .ok_or_else(|| anyhow::anyhow!("no node address"))?;
        let mut admin = run::connect(first).await?;
        let info = admin
            .cluster_info(pb::ClusterInfoRequest {
                region: region.to_string(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("ClusterInfo from {first}: {}", e.message()))?
            .into_inner();
        let mut nodes = info.nodes;
        nodes.retain(|n| !n.draining);
        nodes.sort_by_key(|n| n.region != region);
        let local = nodes.iter().filter(|n| n.region == region).count();
        anyhow::ensure!(local > 0, "no node of the cluster is in region {region}");
        Ok((
            nodes.into_iter().take(local).map(|n| n.address).collect(),
            local,
        ))
    }
    let (producers, producers_local) = side(c, s.producer_region.as_deref()).await?;
    let (consumers, consumers_local) = side(c, s.consumer_region.as_deref()).await?;
    Ok(run::Routes {
        producers,
        producers_local,
        consumers,
        consumers_local,
    })
}

/// geo-regional: a mirror of each topic, placed in `region` (zone survival there) and
/// following the topic through the nodes of the producers' region as `region` reaches them;
/// answers the mirrors' names, once each has a replica caught up.
pub(crate) async fn mirror_topics(
    s: &Settings,
    routes: &run::Routes,
    topics: &[String],
    region: &str,
    cluster: &std::sync::Arc<tokio::sync::Mutex<cluster::Cluster>>,
) -> anyhow::Result<Vec<String>> {
    let addr = routes
        .consumers
        .first()
        .ok_or_else(|| anyhow::anyhow!("no node in region {region}"))?;
    let sources = cluster
        .lock()
        .await
        .addrs_of_from(s.producer_region.as_deref(), region);
    let mut admin = run::connect(addr).await?;
    let mut mirrors = Vec::new();
    for t in topics {
        let name = format!("{t}-mirror");
        admin
            .create_topic(pb::CreateTopicRequest {
                name: name.clone(),
                replication_factor: s.replication_factor,
                placement: Some(pb::Placement {
                    survival: pb::Survival::Zone as i32,
                    regions: vec![region.to_string()],
                    leader_regions: Vec::new(),
                }),
                mirror_of: Some(pb::MirrorOf {
                    topic: t.clone(),
                    addresses: sources.clone(),
                }),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow::anyhow!("creating mirror {name}: {}", e.message()))?;
        mirrors.push(name);
    }
    eprintln!(
        "loadgen: {} mirror(s) in region {region}, pulling through {}",
        mirrors.len(),
        sources.join(",")
    );
    Ok(mirrors)
}

/// What region-loss-regional measured: the lag the mirrors reported just before they were
/// promoted (per partition, its best replica's), and how long the promotion took.
pub(crate) struct Loss {
    pub(crate) lag_records: u64,
    pub(crate) lag_ms: u64,
    /// How long before the region was lost the mirrors' sources last answered (the longest of
    /// the best replicas'): records acknowledged in that window, and on their way, are not in
    /// the reported lag.
    pub(crate) silent_before_loss_ms: u64,
    pub(crate) promoted_in: Duration,
}

/// region-loss-regional: after `after`, kills every node of `region` (the source topics'
/// region, lost for good), waits a moment for the mirrors' replicas to notice, reads the lag
/// they report through `via` (the mirrors' region), and promotes every mirror.
pub(crate) async fn lose_region(
    cluster: std::sync::Arc<tokio::sync::Mutex<cluster::Cluster>>,
    region: String,
    after: Duration,
    via: Vec<String>,
    mirrors: Vec<String>,
) -> anyhow::Result<Loss> {
    tokio::time::sleep(after).await;
    {
        let mut c = cluster.lock().await;
        let lost: Vec<usize> = (0..c.regions.len())
            .filter(|i| c.regions[*i] == region)
            .collect();
        for i in &lost {
            c.kill9(*i).await;
        }
        eprintln!("loadgen: region {region} lost: nodes {lost:?} killed");
    }
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Per mirror partition, the replica that holds the most (the cut is the longest log):
    // its lag is what a promotion loses.
    // (end, lag in records, lag in ms, silent before the loss) of the replica holding most.
    let mut best: BTreeMap<(String, u32), (u64, u64, u64, u64)> = BTreeMap::new();
    for addr in &via {
        let Ok(mut c) = run::connect(addr).await else {
            continue;
        };
        for m in &mirrors {
            let Ok(d) = c
                .describe_topic(pb::DescribeTopicRequest { name: m.clone() })
                .await
            else {
                continue;
            };
            let since_loss = killed_at.elapsed().as_millis() as u64;
            for p in d.into_inner().partitions {
                let Some(g) = p.mirror.filter(|_| p.local) else {
                    continue;
                };
                let silent = g.contact_ms.unwrap_or(0).saturating_sub(since_loss);
                let end = g.source_end.saturating_sub(g.lag_records);
                let e = best
                    .entry((m.clone(), p.partition))
                    .or_insert((0, u64::MAX, 0, 0));
                if e.1 == u64::MAX || end > e.0 {
                    *e = (end, g.lag_records, g.lag_ms, silent);
                }
            }
        }
    }
    let lag_records = best.values().map(|v| v.1).sum();
    let lag_ms = best.values().map(|v| v.2).max().unwrap_or(0);
    let silent_before_loss_ms = best.values().map(|v| v.3).max().unwrap_or(0);
    let started = Instant::now();
    let addr = via
        .first()
        .ok_or_else(|| anyhow::anyhow!("no node to promote through"))?;
    for m in &mirrors {
        loop {
            let mut c = run::connect(addr).await?;
            match c
                .promote_topic(pb::PromoteTopicRequest { name: m.clone() })
                .await
            {
                Ok(_) => break,
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    eprintln!("loadgen: promoting {m}: {}; again", e.message());
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => anyhow::bail!("promoting {m}: {}", e.message()),
            }
        }
    }
    let promoted_in = started.elapsed();
    eprintln!(
        "loadgen: {} mirror(s) promoted in {promoted_in:?}; they reported {lag_records} records behind (at most {lag_ms} ms)",
        mirrors.len()
    );
    Ok(Loss {
        lag_records,
        lag_ms,
        silent_before_loss_ms,
        promoted_in,
    })
}

pub(crate) fn placement(s: &Settings) -> Option<pb::Placement> {
    let survival = match s.survival.as_deref() {
        Some("zone") => pb::Survival::Zone,
        Some("region") => pb::Survival::Region,
        _ => pb::Survival::Unspecified,
    };
    if survival == pb::Survival::Unspecified && s.leader_regions.is_empty() {
        return None;
    }
    Some(pb::Placement {
        survival: survival as i32,
        // Zone survival's home region: the producers'.
        regions: match survival {
            pb::Survival::Zone => s.producer_region.iter().cloned().collect(),
            _ => Vec::new(),
        },
        leader_regions: s.leader_regions.clone(),
    })
}

/// Waits (bounded) until every partition's leader is in the topic's first leader region.
pub(crate) async fn wait_pinned(
    admin: &mut tern::cli::Client,
    topics: &[String],
    s: &Settings,
    cluster: &std::sync::Arc<tokio::sync::Mutex<cluster::Cluster>>,
) {
    let regions = cluster.lock().await.regions.clone();
    let Some(want) = s.leader_regions.first() else {
        return;
    };
    if regions.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut settled = true;
        for t in topics {
            match admin
                .cluster_info(pb::ClusterInfoRequest::default())
                .await
                .map(|r| r.into_inner())
            {
                Ok(info) => {
                    for tp in info.topics.iter().filter(|tp| &tp.topic == t) {
                        for p in &tp.partitions {
                            let leader_region = regions.get((p.leader as usize).wrapping_sub(1));
                            if p.leader == 0 || leader_region != Some(want) {
                                settled = false;
                            }
                        }
                    }
                }
                Err(_) => settled = false,
            }
        }
        if settled {
            eprintln!("loadgen: every leader is in region {want}");
            return;
        }
        if tokio::time::Instant::now() > deadline {
            eprintln!("loadgen: leaders not all in region {want} after 60 s; running anyway");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// geo-replay: one consumer in its region reads every partition from the earliest offset to
/// the end; what it read, how long it took, and what crossed between regions meanwhile.
pub(crate) async fn replay(
    s: &Settings,
    routes: &run::Routes,
    topics: &[String],
    cluster: &std::sync::Arc<tokio::sync::Mutex<cluster::Cluster>>,
) -> anyhow::Result<(Vec<String>, serde_json::Value)> {
    let addr = routes
        .consumers
        .first()
        .ok_or_else(|| anyhow::anyhow!("no node address"))?;
    let mut c = run::connect(addr).await?;
    let wan_before = cluster.lock().await.wan_bytes();
    let started = std::time::Instant::now();
    let (mut records, mut bytes) = (0u64, 0u64);
    for t in topics {
        for p in 0..s.partitions {
            let end = c
                .list_offsets(pb::ListOffsetsRequest {
                    topic: t.clone(),
                    partitions: vec![p],
                    position: Some(pb::StartPosition {
                        position: Some(pb::start_position::Position::Latest(true)),
                    }),
                })
                .await
                .map_err(|e| anyhow::anyhow!("ListOffsets: {}", e.message()))?
                .into_inner()
                .partitions
                .first()
                .map_or(0, |o| o.end_offset);
            let mut at = 0u64;
            while at < end {
                let r = c
                    .fetch(pb::FetchRequest {
                        topic: t.clone(),
                        partition: p,
                        offset: at,
                        max_records: 10_000,
                        max_bytes: 4 << 20,
                        max_wait_ms: 1000,
                        raw_batches: false,
                        topic_uid: 0,
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("replay fetch: {}", e.message()))?
                    .into_inner();
                for rec in &r.records {
                    records += 1;
                    bytes += (rec.value.len() + rec.key.as_ref().map_or(0, |k| k.len())) as u64;
                }
                at = r.next_offset.max(at);
            }
        }
    }
    let took = started.elapsed();
    let wan = cluster.lock().await.wan_bytes() - wan_before;
    let share = wan as f64 / bytes.max(1) as f64 * 100.0;
    let lines = vec![
        String::new(),
        format!(
            "replay          {records} records ({:.1} MB) read from the earliest offset through {addr} in {:.2} s ({:.1} MB/s)",
            bytes as f64 / 1e6,
            took.as_secs_f64(),
            bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
        ),
        format!(
            "replay wan      {:.2} MB crossed between regions meanwhile: {share:.3}% of the bytes read",
            wan as f64 / 1e6
        ),
    ];
    let json = serde_json::json!({
        "records": records, "bytes": bytes, "seconds": took.as_secs_f64(),
        "wan_bytes": wan, "wan_share_percent": share,
    });
    Ok((lines, json))
}
