//! `Committed` answers to a member whose stream is full: merged while one waits for room,
//! never dropped (a client that waits for its commit's answer would wait in vain).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::{down, Down, Out, SEND_WAIT};
use crate::proto::v1 as pb;

/// The answers held back for one member: at most one task sends at a time, and what comes
/// meanwhile is merged into one answer (the highest offset per partition: the answer to a
/// later commit of a partition covers an earlier one).
#[derive(Default)]
pub(super) struct HeldAnswers {
    sending: bool,
    held: BTreeMap<u32, u64>,
}

/// Sends a `Committed` answer for `offsets` down `out`: at once if there is room and nothing
/// is held, else merged into what a task sends once there is room (bounded by `SEND_WAIT`
/// per send; a member that reads nothing for that long loses what is held).
pub(super) fn send_committed(
    out: &Out,
    offsets: Vec<pb::PartitionOffset>,
    answers: &Arc<Mutex<HeldAnswers>>,
) {
    let mut a = answers.lock().unwrap_or_else(|e| e.into_inner());
    if a.sending {
        merge(&mut a.held, offsets);
        return;
    }
    let msg = down(Down::Committed(pb::Committed { offsets }));
    let Err(mpsc::error::TrySendError::Full(msg)) = out.try_send(msg) else {
        return;
    };
    a.sending = true;
    drop(a);
    let (out, answers) = (out.clone(), answers.clone());
    tokio::spawn(async move {
        let mut msg = msg;
        loop {
            let sent = tokio::time::timeout(SEND_WAIT, out.send(msg)).await;
            let mut a = answers.lock().unwrap_or_else(|e| e.into_inner());
            if !matches!(sent, Ok(Ok(()))) || a.held.is_empty() {
                a.held.clear();
                a.sending = false;
                return;
            }
            let offsets = std::mem::take(&mut a.held)
                .into_iter()
                .map(|(partition, offset)| pb::PartitionOffset { partition, offset })
                .collect();
            msg = down(Down::Committed(pb::Committed { offsets }));
        }
    });
}

fn merge(held: &mut BTreeMap<u32, u64>, offsets: Vec<pb::PartitionOffset>) {
    for o in offsets {
        let at = held.entry(o.partition).or_insert(o.offset);
        *at = (*at).max(o.offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(o: &[(u32, u64)]) -> Vec<pb::PartitionOffset> {
        o.iter()
            .map(|(partition, offset)| pb::PartitionOffset {
                partition: *partition,
                offset: *offset,
            })
            .collect()
    }

    /// The next answer on the stream, as (partition, offset); fails if none comes.
    async fn next(
        rx: &mut mpsc::Receiver<crate::groups::Result<pb::ConsumeResponse>>,
    ) -> Vec<(u32, u64)> {
        let m = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
            .await
            .expect("an answer comes")
            .expect("the stream is open");
        committed(m)
    }

    fn committed(m: crate::groups::Result<pb::ConsumeResponse>) -> Vec<(u32, u64)> {
        match m.unwrap().kind {
            Some(Down::Committed(c)) => c.offsets.iter().map(|o| (o.partition, o.offset)).collect(),
            other => panic!("not a Committed answer: {other:?}"),
        }
    }

    /// Three answers while the stream is full: the first waits for room, the other two are
    /// merged behind it (partition 0's highest of them, 6); none is lost, and each comes once.
    #[tokio::test]
    async fn answers_to_a_full_stream_are_merged_and_sent_not_dropped() {
        let (out, mut rx) = mpsc::channel(1);
        let answers = Arc::new(Mutex::new(HeldAnswers::default()));
        send_committed(&out, offsets(&[(0, 5)]), &answers);
        // The stream is full now.
        send_committed(&out, offsets(&[(0, 7)]), &answers);
        send_committed(&out, offsets(&[(1, 3), (0, 6)]), &answers);
        send_committed(&out, offsets(&[(2, 9)]), &answers);
        assert_eq!(next(&mut rx).await, [(0, 5)]);
        assert_eq!(next(&mut rx).await, [(0, 7)]);
        assert_eq!(next(&mut rx).await, [(0, 6), (1, 3), (2, 9)]);
        // All sent: the next answer goes straight in.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while answers.lock().unwrap().sending {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the sending task finishes");
        send_committed(&out, offsets(&[(4, 1)]), &answers);
        assert_eq!(committed(rx.try_recv().unwrap()), [(4, 1)]);
        assert!(rx.try_recv().is_err());
    }
}
