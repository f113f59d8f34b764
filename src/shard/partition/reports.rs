//! A leader's durable reports to its far followers, and a follower's reads moved on by them
//! (the rule is `raft::early`'s).
//!
//! After each append of entries is secured on a replica: a leader notes what it now holds
//! durably, and its next append to each far follower carries it (`raft::network`). A report no
//! append carried within [`REPORT_LINGER`] (the last records of a burst) is sent on its own, a
//! one-way message in the next exchange to the peer. A follower counts the last report it has
//! with its own log when a report arrives and after each of its own appends is secured: either
//! may come first.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use openraft::type_config::alias::WatchReceiverOf;
use openraft_rt::watch::WatchReceiver;

use super::{wake, Waiters};
use crate::proto::internal as pb;
use crate::raft::early::{Durable, Reports};
use crate::raft::network::{far, report_from_wire, report_to_wire};
use crate::raft::store::{OnSecured, StoreHandle};
use crate::raft::transport::Transport;
use crate::raft::types::PartitionRaft;
use crate::types::CoreId;

/// How long a report waits for an append to carry it before it is sent on its own. Under
/// load the next append comes sooner; each report sent alone is one more message.
const REPORT_LINGER: Duration = Duration::from_millis(5);

/// How many more lingers a leader of more than three voters waits for its followers' answers
/// to let it tell a far follower more (see `on_secured`).
const LOOKS_AGAIN: usize = 3;

pub(super) type Metrics = WatchReceiverOf<PartitionRaft, openraft::RaftMetrics<PartitionRaft>>;

/// Where a leader's reports go.
#[derive(Clone)]
pub(super) struct Outbox {
    pub metrics: Metrics,
    pub transport: Arc<Transport>,
    pub core: CoreId,
    pub group: pb::Group,
    pub reports: Rc<Reports>,
}

/// What a replica does after each of its appends is secured.
pub(super) fn on_secured(out: Outbox, waiters: Waiters) -> OnSecured {
    Rc::new(move |store: &StoreHandle| {
        learn(store, &out.metrics, &waiters);
        // Nothing to report for a group with no far follower (one region), or as a follower.
        if !leading_far_noting_voters(&out) {
            return;
        }
        let Some(report) = store.leader_report() else {
            return;
        };
        out.reports.hold(report);
        if out.reports.due.replace(true) {
            return;
        }
        let out = out.clone();
        glommio::spawn_local(async move {
            // In a group of more than three voters a report names followers that answered;
            // an answer after the linger lets a follower be told more, so look again a few
            // times while one is behind.
            for _ in 0..=LOOKS_AGAIN {
                glommio::timer::sleep(REPORT_LINGER).await;
                send_untold(&out);
                if !out.reports.counts_others()
                    || !out.reports.some_behind(|v| far(&out.transport, v))
                {
                    break;
                }
            }
            out.reports.due.set(false);
        })
        .detach();
    })
}

/// Whether this replica leads its group and has a far follower; if so, the group's voters
/// (from the same view) go to its reports, which name voters in larger groups.
fn leading_far_noting_voters(out: &Outbox) -> bool {
    let m = out.metrics.borrow_watched();
    let membership = m.membership_config.membership();
    let leading_far = m.current_leader == Some(m.id)
        && membership
            .voter_ids()
            .any(|v| v != m.id && far(&out.transport, v));
    if leading_far {
        match membership.get_joint_config().as_slice() {
            [voters] => out.reports.set_voters(Some(voters)),
            _ => out.reports.set_voters(None),
        }
    }
    leading_far
}

/// Sends the report held to each far follower no append has told it to.
fn send_untold(out: &Outbox) {
    let Some(held) = out.reports.held() else {
        return;
    };
    let m = out.metrics.borrow_watched();
    let membership = m.membership_config.membership();
    for v in membership.voter_ids().filter(|v| *v != held.leader) {
        let Some(node) = membership.get_node(&v).filter(|_| far(&out.transport, v)) else {
            continue;
        };
        let Some(report) = out.reports.tell(v, held.term) else {
            continue;
        };
        let message = pb::RaftRequest {
            call_id: 0,
            group: Some(out.group.clone()),
            body: Some(pb::raft_request::Body::Durable(report_to_wire(report))),
            quiet: false,
        };
        // A full queue or a cut link: the next append tells the commit anyway.
        match out.transport.tell(out.core, v, &node.addr, message) {
            Ok(()) => crate::metrics::NODE.durable_reports.inc(),
            Err(_) => out.reports.forget(v),
        }
    }
}

/// A follower takes its leader's report and counts it.
pub(super) fn take(
    store: &StoreHandle,
    metrics: &Metrics,
    waiters: &Waiters,
    r: &pb::DurableReport,
) {
    let report: Durable = report_from_wire(r);
    store.take_report(report);
    learn(store, metrics, waiters);
}

/// Moves this follower's committed position by the last report, and wakes its readers if it
/// moved.
fn learn(store: &StoreHandle, metrics: &Metrics, waiters: &Waiters) {
    if !store.has_report() {
        return;
    }
    // The membership and the log end it was read with, from one view.
    let moved = {
        let m = metrics.borrow_watched();
        let voters = m.membership_config.membership().get_joint_config();
        store.commit_reported(voters, m.last_log_index.unwrap_or(0))
    };
    if moved.is_some() {
        crate::metrics::NODE.commits_reported.inc();
        wake(waiters);
    }
}
