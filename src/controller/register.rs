//! A node's registration: its address and labels in the metadata. A node of a cluster
//! registers in the background until the metadata group has a leader that takes it, and says
//! now and then what it waits for; a removed node learns here that it was removed.

use std::sync::Arc;
use std::time::Duration;

use super::propose::{no_metadata_leader, propose, propose_through, wait_applied};
use super::{ControllerError, Result};
use crate::broker::Broker;
use crate::cluster::Command;
use crate::raft::types::Member;

/// When a node that cannot register yet first says why, and how often after that.
const REPORT_FIRST: Duration = Duration::from_secs(5);
const REPORT_EVERY: Duration = Duration::from_secs(15);
/// How long between registration attempts.
const RETRY: Duration = Duration::from_millis(300);

/// Registers in the background until it is done; a removed node stops.
pub fn spawn(broker: Arc<Broker>, member: Member) {
    tokio::spawn(async move {
        let started = tokio::time::Instant::now();
        let mut next_report = started + REPORT_FIRST;
        loop {
            match register(&broker, &member).await {
                Ok(()) => break,
                Err(e) if e.removed() => {
                    broker.stop_for(broker.removed_message());
                    return;
                }
                Err(e) if !e.retryable() => {
                    tracing::error!(error = %e, "this node cannot register");
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "registration not done yet");
                    if tokio::time::Instant::now() >= next_report {
                        next_report += REPORT_EVERY;
                        let why = match broker.metadata_leader().await {
                            None => no_metadata_leader(&broker).await.to_string(),
                            Some(l) => format!("the metadata leader (node {l}) answered: {e}"),
                        };
                        tracing::info!(
                            waited_s = started.elapsed().as_secs(),
                            "waiting to register in the cluster metadata: {why}"
                        );
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = broker.closed() => return,
            }
        }
        tracing::info!("this node is registered in the cluster metadata");
    });
}

/// Records this node's address and labels in the metadata, unless they are there already. A
/// node that knows no metadata leader yet (one joining a cluster, or a controller whose peers
/// just started) sends its registration through the member it was told to join, or through
/// the other controllers; once registered, the metadata leader makes it a learner of the
/// metadata group and it receives the metadata log.
pub async fn register(broker: &Arc<Broker>, member: &Member) -> Result<()> {
    let me = broker.node_id();
    let state = broker.cluster();
    if state.removed.contains(&me) {
        return Err(ControllerError::Removed(me));
    }
    if state.nodes.get(&me) == Some(member) {
        return Ok(());
    }
    let cmd = Command::RegisterNode {
        id: me,
        member: member.clone(),
    };
    // A joined node that restarts may know a leader (from its vote) but no address for it
    // (its metadata replica catches up only once the leader reaches it, which may need this
    // very registration if its address changed): then it goes through the join address.
    let direct = match broker.metadata_leader().await {
        Some(_) => propose(broker, &cmd).await,
        None => Err(no_metadata_leader(broker).await),
    };
    let at = match direct {
        Ok(at) => at,
        Err(e) if e.removed() => return Err(e),
        Err(e) => {
            let join = &broker.config.join;
            let via: Vec<String> = if !join.is_empty() {
                vec![join.clone()]
            } else {
                broker
                    .controllers
                    .iter()
                    .filter(|(id, _)| **id != me)
                    .map(|(_, a)| a.clone())
                    .collect()
            };
            let mut last = e;
            let mut done = None;
            for addr in via {
                match propose_through(broker, &addr, &cmd).await {
                    Ok(at) => {
                        done = Some(at);
                        break;
                    }
                    Err(e) if e.removed() => return Err(e),
                    Err(e) => last = e,
                }
            }
            done.ok_or(last)?
        }
    };
    wait_applied(broker, at).await?;
    if broker.cluster().removed.contains(&me) {
        return Err(ControllerError::Removed(me));
    }
    Ok(())
}
