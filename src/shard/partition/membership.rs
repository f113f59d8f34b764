//! Moving a group towards a target membership, on its leader: new nodes join as learners,
//! the voters change by joint consensus once the new ones have caught up, unwanted learners go.

use openraft_rt::watch::WatchReceiver;

use super::{from_write_error, Partition};
use crate::raft::types::NodeId;
use crate::shard::request::{CoreError, MemberProgress, MemberTarget};

/// A new voter is added once it is at most this many entries behind the leader.
const CATCH_UP_ENTRIES: u64 = 256;

impl Partition {
    /// Moves the group one step towards `target` (on its leader): adds missing nodes as
    /// learners; once every new voter has caught up, changes the voters (openraft's joint
    /// consensus, committed by the old and the new majority); then drops learners not wanted.
    /// Safe to repeat, also by a new leader after a change was interrupted: each step compares
    /// the group's current membership with the target.
    pub async fn change_members(&self, target: MemberTarget) -> Result<MemberProgress, CoreError> {
        use openraft::ChangeMembers;
        use std::collections::BTreeSet;
        if target.voters.is_empty() {
            return Err(CoreError::Raft(crate::raft::RaftError::Refused(format!(
                "{}: a group needs a voter",
                self.key
            ))));
        }
        let metrics = self.raft.metrics().borrow_watched().clone();
        if metrics.current_leader != Some(metrics.id) {
            return Err(CoreError::NotLeader {
                leader: metrics.current_leader,
            });
        }
        let membership = metrics.membership_config.membership().clone();
        self.renew_lease().await;
        // 1. Every wanted node receives the log.
        for (id, member) in target.voters.iter().chain(&target.learners) {
            if membership.get_node(id).is_none() {
                self.raft
                    .add_learner(*id, member.clone(), false)
                    .await
                    .map_err(from_write_error)?;
            }
        }
        // 2. New voters must have caught up first: a lagging one would stall commits while
        //    the joint configuration needs it.
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let wanted: BTreeSet<NodeId> = target.voters.keys().copied().collect();
        let joint = membership.get_joint_config().len() > 1;
        if voters != wanted || joint {
            let last = metrics.last_log_index.unwrap_or(0);
            let matched = |id: &NodeId| {
                metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned().flatten())
                    .map(|l| l.index)
            };
            for id in wanted.difference(&voters) {
                // A learner that has accepted nothing yet is not caught up, however short the
                // log (its replica may not even be open yet).
                let behind = matched(id).map(|m| last.saturating_sub(m));
                match behind {
                    Some(b) if b <= CATCH_UP_ENTRIES => {}
                    _ => {
                        return Ok(MemberProgress::CatchingUp {
                            node: *id,
                            behind: behind.unwrap_or(last + 1),
                        })
                    }
                }
            }
            tracing::info!(partition = %self.key, from = ?voters, to = ?wanted, "changing voters");
            self.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(wanted.clone()), false)
                .await
                .map_err(from_write_error)?;
        }
        // 3. Learners nobody wants any more.
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .clone();
        let stale: BTreeSet<NodeId> = membership
            .learner_ids()
            .filter(|id| !wanted.contains(id) && !target.learners.contains_key(id))
            .collect();
        if !stale.is_empty() {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(stale), false)
                .await
                .map_err(from_write_error)?;
        }
        Ok(MemberProgress::Done)
    }
}
