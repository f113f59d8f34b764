//! Stream mode: partitions assigned to members, each read by a reader task, and the offsets
//! members commit.

use super::*;

impl Group {
    /// A member's offsets for partitions it consumes (others are ignored).
    pub(super) fn accept_offsets(
        &self,
        member: MemberId,
        offsets: &[pb::PartitionOffset],
    ) -> Vec<(u32, u64)> {
        if self.mode != Mode::Stream {
            return Vec::new();
        }
        offsets
            .iter()
            .filter(|o| self.owner.get(o.partition as usize) == Some(&Some(member)))
            .map(|o| (o.partition, o.offset))
            .collect()
    }

    /// Writes offsets to the metadata; answers the member once they are replicated.
    pub(super) async fn commit(&mut self, member: MemberId, offsets: Vec<(u32, u64)>) {
        if offsets.is_empty() {
            return;
        }
        let changed: Vec<(u32, u64)> = offsets
            .iter()
            .copied()
            .filter(|(p, o)| self.committed[*p as usize] != Some(*o))
            .collect();
        if !changed.is_empty() {
            let cmd = Command::CommitOffsets {
                group: self.key.0.clone(),
                topic: self.key.1.clone(),
                uid: self.topic.spec.uid,
                offsets: changed.iter().map(|(p, o)| (*p, Offset(*o))).collect(),
            };
            if !self.propose(&cmd).await {
                return;
            }
            for (p, o) in changed {
                self.committed[p as usize] = Some(o);
            }
        }
        if let Some(m) = self.members.get(&member) {
            let offsets = offsets
                .into_iter()
                .map(|(partition, offset)| pb::PartitionOffset { partition, offset })
                .collect();
            answers::send_committed(&m.out, offsets, &m.answers);
        }
    }

    /// Stream mode: spreads the partitions over the members (see `assign`).
    pub(super) fn rebalance(&mut self) {
        if self.mode != Mode::Stream || self.members.is_empty() {
            return;
        }
        let revoking: BTreeSet<u32> = self.revoking.keys().copied().collect();
        let members: BTreeSet<MemberId> = self.members.keys().copied().collect();
        let changes = assign::rebalance(&self.owner, &revoking, &members);
        for (m, p) in changes.revoke {
            self.revoke(m, p);
        }
        for (m, p) in changes.assign {
            self.assign(m, p);
        }
    }

    pub(super) fn revoke(&mut self, member: MemberId, p: u32) {
        let Some(m) = self.members.get_mut(&member) else {
            return;
        };
        let reader = m.stop_reader(p);
        self.revoking.insert(p, Instant::now());
        let out = m.out.clone();
        // After every record of it the reader queued for the member: the reader is stopped
        // first (an abort takes effect at its next await, so wait for it to end).
        tokio::spawn(async move {
            if let Some(r) = reader {
                let _ = r.await;
            }
            let _ = out
                .send(down(Down::Revoke(pb::Revoke {
                    partitions: vec![p],
                })))
                .await;
        });
    }

    pub(super) fn assign(&mut self, member: MemberId, p: u32) {
        let Some(m) = self.members.get_mut(&member) else {
            return;
        };
        assert!(
            self.owner[p as usize].is_none(),
            "partition {p} assigned while member {:?} owns it",
            self.owner[p as usize]
        );
        self.owner[p as usize] = Some(member);
        // Unknown (nothing to auto-commit) until the reader knows where it starts.
        let delivered = Arc::new(AtomicU64::new(NOT_STARTED));
        let reader = StreamReader {
            broker: self.broker.clone(),
            topic: self.key.1.clone(),
            partition: p,
            start: self.committed[p as usize],
            latest: m.settings.start_latest,
            max_records: m.settings.max_in_flight,
            out: m.out.clone(),
            delivered: delivered.clone(),
        };
        let task = tokio::spawn(reader.run());
        m.readers.insert(p, (task, delivered));
    }
}
