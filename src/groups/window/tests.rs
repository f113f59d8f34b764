//! The queue window against a model: random fetches, deliveries, acks, nacks, expiries,
//! members leaving and dead letters written, on a seed (printed; `TERN_SEED=<seed>` replays).
//! After every step the window must agree with the model; at the end every record is settled
//! exactly once (acked or dead-lettered) and the floor has passed them all.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::*;

const RECORDS: u64 = 400;
const MAX_DELIVERIES: u32 = 3;
const ROOM: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum M {
    Waiting,
    Out(MemberId),
    /// Failed its last delivery: waiting for the dead-letter write.
    Dead,
    Settled,
}

struct Model {
    state: BTreeMap<u64, M>,
    count: BTreeMap<u64, u32>,
    /// Offsets handed to the window so far.
    fetched: u64,
    dead_letters: BTreeSet<u64>,
    floor: u64,
}

fn record(offset: u64) -> pb::Record {
    pb::Record {
        topic: "q".into(),
        partition: 0,
        offset,
        value: bytes::Bytes::from(format!("r{offset}")),
        ..Default::default()
    }
}

fn takers(members: &BTreeSet<MemberId>) -> Vec<Taker> {
    members
        .iter()
        .map(|m| Taker {
            member: *m,
            room: ROOM,
            ack_wait: Duration::from_millis(100),
        })
        .collect()
}

impl Model {
    fn out(&self, member: MemberId) -> Vec<u64> {
        self.state
            .iter()
            .filter(|(_, s)| **s == M::Out(member))
            .map(|(o, _)| *o)
            .collect()
    }

    /// Every delivery out, held by a member or left by one that detached.
    fn all_out(&self) -> Vec<u64> {
        self.state
            .iter()
            .filter(|(_, s)| matches!(s, M::Out(_)))
            .map(|(o, _)| *o)
            .collect()
    }

    /// A failed delivery: waiting again, or a dead letter (which must be reported once).
    fn failed(&mut self, o: u64, dead: &[DeadLetter]) {
        let reported = dead.iter().any(|d| d.offset == o);
        if self.count[&o] >= MAX_DELIVERIES {
            assert!(
                reported,
                "{o} failed its last delivery without a dead letter"
            );
            assert!(self.dead_letters.insert(o), "{o} dead-lettered twice");
            self.state.insert(o, M::Dead);
        } else {
            assert!(
                !reported,
                "{o} dead-lettered after {} deliveries",
                self.count[&o]
            );
            self.state.insert(o, M::Waiting);
        }
    }

    fn check(&mut self, w: &Window, members: &BTreeSet<MemberId>) {
        for m in members {
            assert_eq!(w.in_flight(*m), self.out(*m).len() as u32, "member {m}");
        }
        let out = self
            .state
            .values()
            .filter(|s| matches!(s, M::Out(_)))
            .count();
        assert_eq!(w.out_of(0) as usize, out);
        if let Some(f) = w.floor(0) {
            assert!(
                f >= self.floor,
                "the floor went back from {} to {f}",
                self.floor
            );
            self.floor = f;
            for o in 0..f.min(self.fetched) {
                assert_eq!(self.state[&o], M::Settled, "{o} is below the floor {f}");
            }
            assert_eq!(w.progress(0).map(|p| p.floor), Some(f));
        }
    }
}

#[test]
fn the_queue_window_agrees_with_a_model() {
    let seed: u64 = std::env::var("TERN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("queue window model: TERN_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = Window::new(1, &BTreeMap::new(), MAX_DELIVERIES);
    let mut model = Model {
        state: BTreeMap::new(),
        count: BTreeMap::new(),
        fetched: 0,
        dead_letters: BTreeSet::new(),
        floor: 0,
    };
    let mut members: BTreeSet<MemberId> = [1, 2].into();
    // Members that left holding their deliveries (`detach`): ids are never reused.
    let mut retired: BTreeSet<MemberId> = BTreeSet::new();
    let mut next_id: MemberId = 4;
    let start = Instant::now();
    let mut now = start;
    let mut step = 0;
    loop {
        step += 1;
        let settled = model.state.values().filter(|s| **s == M::Settled).count();
        if settled as u64 == RECORDS {
            break;
        }
        assert!(
            step < 200_000,
            "no progress: {settled} of {RECORDS} settled"
        );
        // Late in the run, members stop failing deliveries so that everything settles.
        let calm = step > 20_000;
        match rng.random_range(0..100) {
            0..=14 => {
                if let Some((from, max)) = w.want_fetch(0) {
                    let from = from.unwrap_or(0);
                    assert_eq!(from, model.fetched, "a fetch from the wrong place");
                    let n = (rng.random_range(1..60u64)).min(max as u64);
                    let until = (from + n).min(RECORDS);
                    let records = (from..until).map(record).collect();
                    w.fetched(0, records, until, now);
                    for o in from..until {
                        model.state.insert(o, M::Waiting);
                        model.count.insert(o, 0);
                    }
                    model.fetched = until;
                }
            }
            15..=39 => {
                for (m, deliveries) in w.dispatch(now, &takers(&members)) {
                    assert!(members.contains(&m));
                    for d in deliveries {
                        let o = d.record.as_ref().unwrap().offset;
                        assert_eq!(
                            model.state[&o],
                            M::Waiting,
                            "{o} delivered while {:?}",
                            model.state[&o]
                        );
                        let c = model.count.get_mut(&o).unwrap();
                        *c += 1;
                        assert_eq!(d.delivery_count, *c, "delivery count of {o}");
                        model.state.insert(o, M::Out(m));
                    }
                }
            }
            40..=64 => {
                // Acks come from anywhere: for members' deliveries and detached ones alike.
                let out = model.all_out();
                if let Some(&o) = out.get(rng.random_range(0..out.len().max(1))) {
                    assert_eq!(w.ack(&[(0, o)]), 1);
                    model.state.insert(o, M::Settled);
                    // A second ack of it is nothing.
                    assert_eq!(w.ack(&[(0, o)]), 0);
                }
            }
            65..=72 if !calm => {
                let out = model.all_out();
                if let Some(&o) = out.get(rng.random_range(0..out.len().max(1))) {
                    let delay = Duration::from_millis(rng.random_range(0..50));
                    let (n, dead) = w.nack(&[(0, o)], now + delay);
                    assert_eq!(n, 1);
                    model.failed(o, &dead);
                }
            }
            73..=84 => {
                now += Duration::from_millis(rng.random_range(0..60));
                let due: Vec<u64> = w
                    .held(|s| matches!(s, State::Out { deadline, .. } if deadline <= now))
                    .into_iter()
                    .map(|(_, o)| o)
                    .collect();
                let dead = w.expire(now);
                assert_eq!(
                    dead.len(),
                    due.iter()
                        .filter(|o| model.count[o] >= MAX_DELIVERIES)
                        .count()
                );
                for o in due {
                    model.failed(o, &dead);
                }
            }
            85..=88 if !calm => {
                let m = rng.random_range(1..=3);
                if retired.contains(&m) {
                    // Its id is never used again.
                } else if members.remove(&m) {
                    if retired.len() < 2 && rng.random_range(0..2) == 0 {
                        // Left by a Leave request keeping some deliveries: those stay out
                        // until acked or expired, the rest go back as if never delivered.
                        let held = model.out(m);
                        let keep: Vec<(u32, u64)> = held
                            .iter()
                            .filter(|_| rng.random_range(0..2) == 0)
                            .map(|o| (0, *o))
                            .collect();
                        w.leave_holding(m, Some(&keep), now);
                        for o in held {
                            if !keep.contains(&(0, o)) {
                                *model.count.get_mut(&o).unwrap() -= 1;
                                model.state.insert(o, M::Waiting);
                            }
                        }
                        retired.insert(m);
                        members.insert(next_id);
                        next_id += 1;
                    } else {
                        let held = model.out(m);
                        let dead = w.release(m, now);
                        for o in held {
                            model.failed(o, &dead);
                        }
                    }
                    assert_eq!(w.in_flight(m), 0);
                } else {
                    members.insert(m);
                }
            }
            89..=94 => {
                let pending: Vec<u64> = model
                    .state
                    .iter()
                    .filter(|(_, s)| **s == M::Dead)
                    .map(|(o, _)| *o)
                    .collect();
                if let Some(&o) = pending.first() {
                    w.dead_lettered(0, o);
                    model.state.insert(o, M::Settled);
                }
            }
            95..=99 if !calm => {
                // A member's stream was full: its latest deliveries come back undelivered.
                let m = rng.random_range(1..=3);
                let held = if members.contains(&m) {
                    model.out(m)
                } else {
                    vec![]
                };
                if let Some(&o) = held.last() {
                    w.undeliver(m, &[(0, o)], now);
                    *model.count.get_mut(&o).unwrap() -= 1;
                    model.state.insert(o, M::Waiting);
                }
            }
            _ => {
                if members.is_empty() {
                    members.insert(1);
                }
            }
        }
        model.check(&w, &members);
    }
    // Everything settled once: the floor is past every record, and nothing is busy.
    assert_eq!(w.floor(0), Some(RECORDS));
    assert_eq!(w.progress(0).unwrap().settled, Vec::<u64>::new());
    for o in &model.dead_letters {
        assert!(model.count[o] >= MAX_DELIVERIES, "{o} dead-lettered early");
    }
}

/// Positions kept in the metadata come back: the floor, what is settled above it, and the
/// delivery counts of records not fetched yet.
#[test]
fn a_new_coordinator_starts_from_the_saved_positions() {
    let saved = BTreeMap::from([(
        0,
        Cursor {
            offset: crate::types::Offset(10),
            settled: vec![crate::types::Offset(12)],
            counts: vec![(crate::types::Offset(11), 2)],
        },
    )]);
    let mut w = Window::new(2, &saved, 3);
    assert_eq!(w.want_fetch(0), Some((Some(10), (WINDOW - 1) as u32)));
    let now = Instant::now();
    w.fetched(0, (10..14).map(record).collect(), 14, now);
    let out = w.dispatch(
        now,
        &[Taker {
            member: 1,
            room: 10,
            ack_wait: Duration::from_secs(1),
        }],
    );
    let got: Vec<(u64, u32)> = out[0]
        .1
        .iter()
        .map(|d| (d.record.as_ref().unwrap().offset, d.delivery_count))
        .collect();
    // 12 was settled; 11 had been delivered twice.
    assert_eq!(got, vec![(10, 1), (11, 3), (13, 1)]);
    // Partition 1 was never written down: where it starts is not known yet.
    assert_eq!(w.want_fetch(1), Some((None, WINDOW as u32)));
}
