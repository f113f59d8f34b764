//! Queue mode: the window of records a queue group hands out, per partition. Pure (the caller
//! gives the time and does the I/O), and tested by a seeded model test.
//!
//! Per partition, the window holds the records from the group's floor (every record below it
//! is settled: acked or dead-lettered) that are not settled yet, each `Ready` (from a time on),
//! `Out` to one member until a deadline, or `Dead` (being written to the dead-letter topic).
//! A delivery that is nacked, not acked in time, or whose member leaves fails: it is ready
//! again, or, once delivered `max_deliveries` times, dead-lettered. Settled offsets above the
//! floor are remembered until the floor passes them.
//!
//! ```text
//! fetched ─▶ Ready ─dispatch─▶ Out(member, deadline) ─ack─▶ settled
//!              ▲                 │ nack / ack-wait / member gone
//!              └──── count < max ┤
//!                                └ count = max ─▶ Dead ─written─▶ settled
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::assign::MemberId;
use crate::cluster::{Cursor, QUEUE_WINDOW_MAX};
use crate::proto::v1 as pb;

/// Records held per partition (delivered or waiting), and their bytes.
pub const WINDOW: usize = 1000;
/// The holder of deliveries whose member left keeping them (`detach`): no member has this id
/// (ids count up from 1).
const DETACHED: MemberId = 0;
pub const WINDOW_BYTES: usize = 8 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// May be delivered from this time on.
    Ready(Instant),
    Out {
        member: MemberId,
        deadline: Instant,
    },
    /// Being written to the dead-letter topic.
    Dead,
}

#[derive(Debug, Clone)]
struct Slot {
    record: pb::Record,
    count: u32,
    state: State,
    bytes: usize,
}

/// A queue group's view of one partition.
#[derive(Debug, Default)]
struct Part {
    /// Where the next fetch starts; `None` until known.
    next_fetch: Option<u64>,
    fetching: bool,
    /// Records from the floor on that are not settled.
    slots: BTreeMap<u64, Slot>,
    bytes: usize,
    /// Settled offsets above the floor.
    settled: BTreeSet<u64>,
    /// Delivery counts loaded from the metadata, for records not fetched yet.
    counts: HashMap<u64, u32>,
    /// Changed since its progress was last written down.
    dirty: bool,
}

impl Part {
    fn floor(&self) -> Option<u64> {
        self.slots.keys().next().copied().or(self.next_fetch)
    }

    fn settle(&mut self, offset: u64) -> bool {
        let before = self.floor();
        let Some(slot) = self.slots.remove(&offset) else {
            return false;
        };
        self.bytes -= slot.bytes;
        self.settled.insert(offset);
        if let Some(f) = self.floor() {
            self.settled = self.settled.split_off(&f);
        }
        debug_assert!(
            self.floor() >= before,
            "a queue's floor went back from {before:?} to {:?}",
            self.floor()
        );
        self.dirty = true;
        true
    }
}

/// A record on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: u32,
    pub offset: u64,
    pub record: pb::Record,
    pub deliveries: u32,
    pub why: &'static str,
}

/// What a queue group writes down of a partition: see `Command::QueueProgress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub floor: u64,
    pub settled: Vec<u64>,
    pub counts: Vec<(u64, u32)>,
}

/// A member that may be given records: its id, how many more it may hold, and how long it has
/// to ack each.
#[derive(Debug, Clone, Copy)]
pub struct Taker {
    pub member: MemberId,
    pub room: u32,
    pub ack_wait: Duration,
}

/// The windows of every partition of a queue group.
#[derive(Debug, Default)]
pub struct Window {
    parts: Vec<Part>,
    /// Deliveries each member holds.
    out: HashMap<MemberId, u32>,
    /// Rotates where deliveries start (fairness across members and partitions).
    turn: usize,
    /// A failed delivery is dead-lettered once it has been delivered this many times.
    max_deliveries: u32,
}

impl Window {
    /// Windows of `partitions` partitions, starting from the positions the metadata kept.
    pub fn new(partitions: usize, saved: &BTreeMap<u32, Cursor>, max_deliveries: u32) -> Window {
        let mut parts: Vec<Part> = (0..partitions).map(|_| Part::default()).collect();
        for (p, c) in saved {
            if let Some(part) = parts.get_mut(*p as usize) {
                part.next_fetch = Some(c.offset.0);
                part.settled = c.settled.iter().map(|o| o.0).collect();
                part.counts = c.counts.iter().map(|(o, n)| (o.0, *n)).collect();
            }
        }
        Window {
            parts,
            out: HashMap::new(),
            turn: 0,
            max_deliveries,
        }
    }

    /// The dead-letter policy of the members that joined last.
    pub fn set_max_deliveries(&mut self, max: u32) {
        self.max_deliveries = max;
    }

    /// Deliveries `member` holds.
    pub fn in_flight(&self, member: MemberId) -> u32 {
        self.out.get(&member).copied().unwrap_or(0)
    }

    /// Where every record below is settled, once known.
    pub fn floor(&self, p: u32) -> Option<u64> {
        self.parts.get(p as usize)?.floor()
    }

    /// Deliveries of partition `p` out to members.
    pub fn out_of(&self, p: u32) -> u32 {
        self.parts.get(p as usize).map_or(0, |part| {
            part.slots
                .values()
                .filter(|s| matches!(s.state, State::Out { .. }))
                .count() as u32
        })
    }

    /// Work that must not be dropped by stopping: progress not written, dead letters being
    /// written.
    /// Deliveries still out count too: a member that left may ack them (`detach`).
    pub fn busy(&self) -> bool {
        self.parts.iter().any(|p| {
            p.dirty
                || p.slots
                    .values()
                    .any(|s| matches!(s.state, State::Dead | State::Out { .. }))
        })
    }

    fn took_back(&mut self, member: MemberId) {
        if let Some(n) = self.out.get_mut(&member) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.out.remove(&member);
            }
        }
    }

    /// Settles deliveries; answers how many were outstanding.
    pub fn ack(&mut self, refs: &[(u32, u64)]) -> u32 {
        let mut n = 0;
        for &(p, o) in refs {
            let Some(part) = self.parts.get_mut(p as usize) else {
                continue;
            };
            let holder = match part.slots.get(&o).map(|s| s.state) {
                Some(State::Out { member, .. }) => Some(member),
                Some(State::Ready(_)) => None,
                _ => continue,
            };
            if part.settle(o) {
                n += 1;
                if let Some(h) = holder {
                    self.took_back(h);
                }
            }
        }
        n
    }

    /// Rejects deliveries: each is delivered again from `at` (or dead-lettered); answers how
    /// many were out.
    pub fn nack(&mut self, refs: &[(u32, u64)], at: Instant) -> (u32, Vec<DeadLetter>) {
        let mut n = 0;
        let mut dead = Vec::new();
        for &(p, o) in refs {
            let out = self
                .parts
                .get(p as usize)
                .and_then(|part| part.slots.get(&o))
                .is_some_and(|s| matches!(s.state, State::Out { .. }));
            if out {
                dead.extend(self.fail(p, o, "nacked", at));
                n += 1;
            }
        }
        (n, dead)
    }

    /// A delivery failed: ready again from `at`, or dead-lettered once it has been delivered
    /// `max_deliveries` times.
    fn fail(&mut self, p: u32, o: u64, why: &'static str, at: Instant) -> Option<DeadLetter> {
        let max = self.max_deliveries;
        let part = &mut self.parts[p as usize];
        let slot = part.slots.get_mut(&o)?;
        part.dirty = true;
        let holder = match slot.state {
            State::Out { member, .. } => Some(member),
            _ => None,
        };
        let letter = if slot.count >= max {
            slot.state = State::Dead;
            Some(DeadLetter {
                partition: p,
                offset: o,
                record: slot.record.clone(),
                deliveries: slot.count,
                why,
            })
        } else {
            slot.state = State::Ready(at);
            None
        };
        if let Some(h) = holder {
            self.took_back(h);
        }
        letter
    }

    /// A member left: the deliveries it held fail (ready again at once).
    pub fn release(&mut self, member: MemberId, now: Instant) -> Vec<DeadLetter> {
        let held: Vec<(u32, u64)> =
            self.held(|s| matches!(s, State::Out { member: m, .. } if m == member));
        held.into_iter()
            .filter_map(|(p, o)| self.fail(p, o, "the member holding it left", now))
            .collect()
    }

    /// A member left holding on to its deliveries: they stay out until acked, nacked or their
    /// deadline passes, held by no member (no release of a member touches them again).
    pub fn detach(&mut self, member: MemberId) {
        self.out.remove(&member);
        for part in &mut self.parts {
            for slot in part.slots.values_mut() {
                if let State::Out {
                    member: m,
                    deadline,
                } = slot.state
                {
                    if m == member {
                        slot.state = State::Out {
                            member: DETACHED,
                            deadline,
                        };
                    }
                }
            }
        }
    }

    /// A member leaves keeping `hold` (or all it holds): those stay out (`detach`); the rest go
    /// back as if never delivered (it never handed them on).
    pub fn leave_holding(&mut self, member: MemberId, hold: Option<&[(u32, u64)]>, now: Instant) {
        if let Some(hold) = hold {
            let keep: BTreeSet<(u32, u64)> = hold.iter().copied().collect();
            let back: Vec<(u32, u64)> = self
                .held(|s| matches!(s, State::Out { member: m, .. } if m == member))
                .into_iter()
                .filter(|r| !keep.contains(r))
                .collect();
            self.undeliver(member, &back, now);
        }
        self.detach(member);
    }

    /// Deliveries not acked within their member's `ack_wait` fail.
    pub fn expire(&mut self, now: Instant) -> Vec<DeadLetter> {
        let late = self.held(|s| matches!(s, State::Out { deadline, .. } if deadline <= now));
        late.into_iter()
            .filter_map(|(p, o)| self.fail(p, o, "not acked within ack_wait", now))
            .collect()
    }

    fn held(&self, which: impl Fn(State) -> bool) -> Vec<(u32, u64)> {
        let mut v = Vec::new();
        for (pi, part) in self.parts.iter().enumerate() {
            for (o, s) in &part.slots {
                if which(s.state) {
                    v.push((pi as u32, *o));
                }
            }
        }
        v
    }

    /// Hands ready records to members with room, round robin (one record to each member with
    /// room per pass, partitions taken in turn); returns each member's deliveries.
    pub fn dispatch(
        &mut self,
        now: Instant,
        takers: &[Taker],
    ) -> Vec<(MemberId, Vec<pb::Delivery>)> {
        let np = self.parts.len();
        let mut batches: Vec<(MemberId, Vec<pb::Delivery>)> = Vec::new();
        if takers.is_empty() || np == 0 {
            return batches;
        }
        let mut room: Vec<u32> = takers
            .iter()
            .map(|t| t.room.saturating_sub(self.in_flight(t.member)))
            .collect();
        let mut progress = true;
        while progress {
            progress = false;
            for k in 0..takers.len() {
                let i = (self.turn + k) % takers.len();
                if room[i] == 0 {
                    continue;
                }
                let found = (0..np).find_map(|j| {
                    let p = (self.turn + j) % np;
                    self.parts[p]
                        .slots
                        .iter()
                        .find(|(_, s)| matches!(s.state, State::Ready(at) if at <= now))
                        .map(|(o, _)| (p, *o))
                });
                let Some((p, o)) = found else { break };
                let t = takers[i];
                let part = &mut self.parts[p];
                let slot = part.slots.get_mut(&o).expect("found above");
                // A first delivery is not written down (a successor that does not know of it
                // delivers the record again as its first).
                part.dirty |= slot.count > 0;
                if slot.count > 0 {
                    crate::metrics::NODE.redeliveries.inc();
                }
                slot.count += 1;
                slot.state = State::Out {
                    member: t.member,
                    deadline: now + t.ack_wait,
                };
                *self.out.entry(t.member).or_default() += 1;
                room[i] -= 1;
                let delivery = pb::Delivery {
                    record: Some(slot.record.clone()),
                    delivery_count: slot.count,
                };
                match batches.iter_mut().find(|(m, _)| *m == t.member) {
                    Some((_, v)) => v.push(delivery),
                    None => batches.push((t.member, vec![delivery])),
                }
                progress = true;
            }
        }
        self.turn = self.turn.wrapping_add(1);
        batches
    }

    /// Deliveries that could not be sent to `member` (its stream was full or closed): they
    /// are ready again at once, as if never delivered.
    pub fn undeliver(&mut self, member: MemberId, refs: &[(u32, u64)], now: Instant) {
        for &(p, o) in refs {
            let Some(slot) = self
                .parts
                .get_mut(p as usize)
                .and_then(|part| part.slots.get_mut(&o))
            else {
                continue;
            };
            if matches!(slot.state, State::Out { member: m, .. } if m == member) {
                slot.count = slot.count.saturating_sub(1);
                slot.state = State::Ready(now);
                self.took_back(member);
            }
        }
    }

    /// Whether partition `p` should fetch more (its window has room and nothing is being
    /// fetched); if so it counts as fetching, and this answers where from (`None`: where
    /// the partition starts is not known yet) and how many records at most.
    pub fn want_fetch(&mut self, p: u32) -> Option<(Option<u64>, u32)> {
        let part = self.parts.get_mut(p as usize)?;
        let held = part.slots.len() + part.settled.len();
        if part.fetching || held >= WINDOW || part.bytes >= WINDOW_BYTES {
            return None;
        }
        part.fetching = true;
        Some((part.next_fetch, (WINDOW - held) as u32))
    }

    /// A fetch of partition `p` failed: it may be tried again.
    pub fn fetch_failed(&mut self, p: u32) {
        if let Some(part) = self.parts.get_mut(p as usize) {
            part.fetching = false;
        }
    }

    /// Records fetched from partition `p`, and where the next fetch continues.
    pub fn fetched(&mut self, p: u32, records: Vec<pb::Record>, next_offset: u64, now: Instant) {
        let Some(part) = self.parts.get_mut(p as usize) else {
            return;
        };
        part.fetching = false;
        let from = part.next_fetch.unwrap_or(0);
        for rec in records {
            if rec.offset < from || part.settled.contains(&rec.offset) {
                continue;
            }
            let bytes = rec.value.len() + rec.key.as_ref().map_or(0, |k| k.len()) + 64;
            let count = part.counts.remove(&rec.offset).unwrap_or(0);
            part.bytes += bytes;
            let offset = rec.offset;
            part.slots.insert(
                offset,
                Slot {
                    record: rec,
                    count,
                    state: State::Ready(now),
                    bytes,
                },
            );
        }
        if part.next_fetch.is_none() {
            // Where a new group starts: written down with the first progress.
            part.dirty = true;
        }
        if next_offset > from || part.next_fetch.is_none() {
            part.next_fetch = Some(next_offset.max(from));
        }
        if let Some(f) = part.floor() {
            part.settled = part.settled.split_off(&f);
            part.counts.retain(|o, _| *o >= f);
        }
    }

    /// A dead letter of partition `p` is written: its record is settled.
    pub fn dead_lettered(&mut self, p: u32, offset: u64) {
        if let Some(part) = self.parts.get_mut(p as usize) {
            part.settle(offset);
        }
    }

    /// Partitions whose progress changed since it was last written down.
    pub fn dirty(&self) -> Vec<u32> {
        (0..self.parts.len() as u32)
            .filter(|p| self.parts[*p as usize].dirty)
            .collect()
    }

    /// What to write down of partition `p` (`None` until its floor is known).
    pub fn progress(&self, p: u32) -> Option<Progress> {
        let part = self.parts.get(p as usize)?;
        let floor = part.floor()?;
        Some(Progress {
            floor,
            settled: part
                .settled
                .iter()
                .copied()
                .take(QUEUE_WINDOW_MAX)
                .collect(),
            counts: part
                .slots
                .iter()
                .filter(|(_, s)| s.count > 1 || matches!(s.state, State::Ready(_)))
                .map(|(o, s)| (*o, s.count))
                .take(QUEUE_WINDOW_MAX)
                .collect(),
        })
    }

    /// Partition `p`'s progress is written down.
    pub fn written(&mut self, p: u32) {
        if let Some(part) = self.parts.get_mut(p as usize) {
            part.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests;
