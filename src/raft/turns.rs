//! The receiving side's order of each peer link's exchanges: a link has a few exchange calls in
//! flight, and one can overtake another on the way (a large one takes longer to arrive). Each
//! carries its link and number (`link`, `seq`); the receiver hands a link's exchanges to its
//! cores in that order, so a group's pipelined appends reach its Raft as they were sent
//! (`raft::network::Pipeline`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::types::NodeId;

/// How long an exchange waits for those sent before it on its link (see [`Turns::turn`]):
/// one lost on the way (its call failed) holds the next back this long, once.
pub(super) const TURN_WAIT: Duration = Duration::from_millis(50);
/// A link not heard from for this long is forgotten by [`Turns`].
const TURN_FORGET: Duration = Duration::from_secs(60);

/// The receiving side's order of each peer link's exchanges (see [`Turns::turn`]).
pub(super) struct Turns {
    links: Mutex<HashMap<(NodeId, u64), LinkTurns>>,
    moved: tokio::sync::Notify,
    /// How long an exchange waits for a missing one before it ([`TURN_WAIT`]).
    wait: Duration,
}

/// Where one peer link's exchanges are.
struct LinkTurns {
    /// The next `seq` to hand to the cores.
    next: u64,
    /// The exchanges that arrived and wait for their turn.
    waiting: std::collections::BTreeSet<u64>,
    /// Turns taken and not given up yet: an exchange handing its messages to the cores is
    /// not missing, and those after it wait for it however long it takes (its cores'
    /// mailboxes are bounded in time).
    holding: u32,
    /// When the link was last heard.
    at: Instant,
}

impl Turns {
    pub(super) fn new(wait: Duration) -> Turns {
        Turns {
            links: Mutex::default(),
            moved: tokio::sync::Notify::new(),
            wait,
        }
    }

    /// Waits until the exchanges sent before this one on its link (`seq` 1, 2, ... of link
    /// `link` from `from`) were handed to the cores; the exchange hands its messages to its
    /// cores while holding the returned turn. Exchanges overtake one another on the way (a few
    /// are in flight on a link, and a large one takes longer to arrive); in order, a group's
    /// pipelined appends reach its Raft as they were sent. One that does not arrive within
    /// `wait` (its call failed) is given up: the exchanges waiting go on in order without it
    /// (and it goes at once if it comes after all). `seq` 0 asks no order.
    pub(super) async fn turn(&self, from: NodeId, link: u64, seq: u64) -> Turn<'_> {
        if seq == 0 {
            return Turn {
                turns: self,
                from,
                link,
                seq,
            };
        }
        let key = (from, link);
        // Registered as waiting until this returns (or the caller gives up on it).
        let _waiting = Waiting {
            turns: self,
            key,
            seq,
        };
        {
            let mut links = self.links.lock().expect("turns lock");
            let now = Instant::now();
            if !links.contains_key(&key) {
                // A link seen for the first time starts where it is (this node may have
                // restarted under it); links gone quiet are forgotten.
                links.retain(|_, l| now.duration_since(l.at) < TURN_FORGET);
            }
            let l = links.entry(key).or_insert_with(|| LinkTurns {
                next: seq,
                waiting: Default::default(),
                holding: 0,
                at: now,
            });
            l.at = now;
            l.waiting.insert(seq);
        }
        let mut deadline = tokio::time::Instant::now() + self.wait;
        let mut waited = false;
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            {
                let mut links = self.links.lock().expect("turns lock");
                let l = links.get_mut(&key);
                if l.as_ref().is_none_or(|l| l.next >= seq) {
                    if let Some(l) = l {
                        l.holding += 1;
                    }
                    if waited {
                        crate::metrics::NODE.exchanges_reordered.inc();
                    }
                    return Turn {
                        turns: self,
                        from,
                        link,
                        seq,
                    };
                }
            }
            waited = true;
            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                // Nothing moved for a while: the exchange the link waits for is late or lost.
                // The first of those that arrived goes next (this one, or one before it).
                let mut links = self.links.lock().expect("turns lock");
                if let Some(l) = links.get_mut(&key).filter(|l| l.holding == 0) {
                    let first = l.waiting.first().copied().unwrap_or(seq);
                    if first > l.next {
                        l.next = first;
                        crate::metrics::NODE.exchanges_gone_ahead.inc();
                        tracing::debug!(node = %from, link, seq = first, "an exchange went ahead of an earlier one that did not arrive in time");
                    }
                }
                drop(links);
                self.moved.notify_waiters();
                deadline = tokio::time::Instant::now() + self.wait;
            }
        }
    }
}

/// An exchange waiting for its turn (see [`Turns::turn`]); no longer once dropped.
struct Waiting<'a> {
    turns: &'a Turns,
    key: (NodeId, u64),
    seq: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut links = self.turns.links.lock().expect("turns lock");
        if let Some(l) = links.get_mut(&self.key) {
            l.waiting.remove(&self.seq);
        }
    }
}

/// An exchange's turn to hand its messages to the cores; dropping it gives the turn to the
/// next exchange of its link.
pub struct Turn<'a> {
    turns: &'a Turns,
    from: NodeId,
    link: u64,
    seq: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.seq == 0 {
            return;
        }
        let mut links = self.turns.links.lock().expect("turns lock");
        if let Some(l) = links.get_mut(&(self.from, self.link)) {
            l.next = l.next.max(self.seq.saturating_add(1));
            l.holding = l.holding.saturating_sub(1);
        }
        drop(links);
        self.turns.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Takes the turn of exchange `seq` of link 7 from node 2, notes it, and gives it up.
    async fn take(turns: Arc<Turns>, seq: u64, order: Arc<Mutex<Vec<u64>>>) {
        let turn = turns.turn(NodeId(2), 7, seq).await;
        order.lock().unwrap().push(seq);
        drop(turn);
    }

    #[tokio::test]
    async fn a_links_exchanges_reach_the_cores_in_the_order_sent_whatever_order_they_arrive_in() {
        let turns = Arc::new(Turns::new(Duration::from_secs(60)));
        let order = Arc::new(Mutex::new(Vec::new()));
        // The first exchange seen starts the link (wherever its numbering is).
        take(turns.clone(), 5, order.clone()).await;
        // 8, 7 and 6 arrive in that order: 8 and 7 wait for 6.
        let mut tasks = Vec::new();
        for seq in [8, 7] {
            tasks.push(tokio::spawn(take(turns.clone(), seq, order.clone())));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(*order.lock().unwrap(), vec![5]);
        tasks.push(tokio::spawn(take(turns.clone(), 6, order.clone())));
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![5, 6, 7, 8]);
        // Without a number, no order is asked.
        take(turns.clone(), 0, order.clone()).await;
        // Another link of the same node has its own order.
        drop(turns.turn(NodeId(2), 8, 100).await);
        drop(turns.turn(NodeId(2), 8, 101).await);
    }

    #[tokio::test]
    async fn an_exchange_lost_on_the_way_holds_the_next_back_once_and_comes_through_late() {
        let turns = Arc::new(Turns::new(Duration::from_millis(50)));
        let order = Arc::new(Mutex::new(Vec::new()));
        take(turns.clone(), 1, order.clone()).await;
        // 2 is late: 3 goes after the wait, and 4 does not wait for 2 again.
        take(turns.clone(), 3, order.clone()).await;
        let next = |turns: &Turns| turns.links.lock().unwrap()[&(NodeId(2), 7)].next;
        assert_eq!(
            next(&turns),
            4,
            "the link's next exchange is 4, not the missing 2"
        );
        take(turns.clone(), 4, order.clone()).await;
        // 2 comes through when it arrives.
        take(turns.clone(), 2, order.clone()).await;
        assert_eq!(*order.lock().unwrap(), vec![1, 3, 4, 2]);
    }

    #[tokio::test]
    async fn exchanges_waiting_behind_a_lost_one_go_on_in_their_own_order() {
        let turns = Arc::new(Turns::new(Duration::from_millis(50)));
        let order = Arc::new(Mutex::new(Vec::new()));
        take(turns.clone(), 4, order.clone()).await;
        // 5 is lost; 7 arrives, then 6: once 5 is given up, 6 goes before 7.
        let seven = tokio::spawn(take(turns.clone(), 7, order.clone()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let six = tokio::spawn(take(turns.clone(), 6, order.clone()));
        seven.await.unwrap();
        six.await.unwrap();
        assert_eq!(*order.lock().unwrap(), vec![4, 6, 7]);
    }

    #[tokio::test]
    async fn an_exchange_given_up_while_it_waits_does_not_let_the_next_skip_its_turn() {
        let turns = Arc::new(Turns::new(Duration::from_secs(60)));
        let order = Arc::new(Mutex::new(Vec::new()));
        take(turns.clone(), 1, order.clone()).await;
        // 3 waits for 2, and its call is dropped (the caller went away).
        let three = tokio::spawn(take(turns.clone(), 3, order.clone()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        three.abort();
        let _ = three.await;
        let next = |turns: &Turns| turns.links.lock().unwrap()[&(NodeId(2), 7)].next;
        assert_eq!(next(&turns), 2, "a dropped wait is not a turn taken");
        // An exchange handing its messages over is not skipped, however long it takes.
        let quick = Arc::new(Turns::new(Duration::from_millis(20)));
        drop(quick.turn(NodeId(2), 7, 1).await);
        let two = quick.turn(NodeId(2), 7, 2).await;
        let three = tokio::spawn({
            let quick = quick.clone();
            async move { drop(quick.turn(NodeId(2), 7, 3).await) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!three.is_finished(), "3 went while 2 held its turn");
        drop(two);
        three.await.unwrap();
        // A number at the end of the range does not overflow.
        drop(quick.turn(NodeId(2), 9, u64::MAX).await);
    }
}
