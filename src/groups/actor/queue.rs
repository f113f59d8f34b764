//! Queue mode: records handed out from per-partition windows, acked, nacked and
//! dead-lettered, and the windows' progress written to the metadata.

use super::*;

impl Group {
    /// Rejects deliveries: delivered again after `delay`, or dead-lettered.
    pub(super) fn nack(&mut self, refs: &[(u32, u64)], delay: Duration) -> u32 {
        let (n, dead) = self.window.nack(refs, Instant::now() + delay);
        for letter in dead {
            self.dead_letter(letter);
        }
        n
    }

    pub(super) fn dead_letter(&mut self, letter: DeadLetter) {
        crate::metrics::NODE.dead_letters.inc();
        let tx = self.dead.get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let writer = DeadLetterWriter {
                broker: self.broker.clone(),
                group: self.key.0.clone(),
                source: self.topic.clone(),
                dlq: self
                    .settings
                    .as_ref()
                    .map_or_else(|| format!("{}.dlq", self.key.1), |s| s.dlq.clone()),
                producer: self.producer,
                sequences: HashMap::new(),
            };
            tokio::spawn(writer.run(rx, self.events.clone()));
            tx
        });
        // Bounded by the windows: each record is sent here once.
        let _ = tx.send(letter);
    }

    /// Queue mode: writes changed partitions' progress to the metadata.
    pub(super) async fn flush(&mut self) {
        if self.mode != Mode::Queue {
            return;
        }
        for p in self.window.dirty() {
            let Some(progress) = self.window.progress(p) else {
                continue;
            };
            let cmd = Command::QueueProgress {
                group: self.key.0.clone(),
                topic: self.key.1.clone(),
                uid: self.topic.spec.uid,
                partition: p,
                floor: Offset(progress.floor),
                settled: progress.settled.into_iter().map(Offset).collect(),
                counts: progress
                    .counts
                    .into_iter()
                    .map(|(o, n)| (Offset(o), n))
                    .collect(),
            };
            if !self.propose(&cmd).await {
                return;
            }
            self.window.written(p);
        }
    }

    /// Queue mode: fetches where windows have room; hands ready records to members with room.
    pub(super) fn dispatch(&mut self) {
        if self.mode != Mode::Queue || self.members.is_empty() {
            return;
        }
        for p in 0..self.topic.spec.partitions {
            self.fetch_more(p);
        }
        let now = Instant::now();
        let takers: Vec<Taker> = self
            .members
            .iter()
            .map(|(id, m)| Taker {
                member: *id,
                room: m.settings.max_in_flight,
                ack_wait: m.settings.ack_wait,
            })
            .collect();
        for (id, deliveries) in self.window.dispatch(now, &takers) {
            let m = self.members.get(&id).expect("a taker is a member");
            let mut full = false;
            for deliveries in by_message(deliveries, MESSAGE_BYTES_MAX) {
                let refs: Vec<(u32, u64)> = deliveries
                    .iter()
                    .filter_map(|d| d.record.as_ref().map(|r| (r.partition, r.offset)))
                    .collect();
                let msg = down(Down::Deliveries(pb::Deliveries {
                    deliveries,
                    ..Default::default()
                }));
                if full || m.out.try_send(msg).is_err() {
                    // Its stream is full or closed: they go to others.
                    full = true;
                    self.window.undeliver(id, &refs, now);
                }
            }
        }
    }

    /// Queue mode: fetches more of partition `p` if its window has room (one fetch at a time;
    /// the answer comes back as an event).
    pub(super) fn fetch_more(&mut self, p: u32) {
        let Some((at, room)) = self.window.want_fetch(p) else {
            return;
        };
        let broker = self.broker.clone();
        let topic = self.key.1.clone();
        let latest = self.settings.as_ref().is_some_and(|s| s.start_latest);
        let events = self.events.clone();
        tokio::spawn(async move {
            let at = match at {
                Some(a) => Ok(a),
                None => reader::start_offset(&broker, &topic, p, latest).await,
            };
            let result = match at {
                Ok(at) => reader::read(&broker, &topic, p, at, room, READ_WAIT).await,
                Err(e) => Err(e),
            };
            if result.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if let Some(tx) = events.upgrade() {
                let _ = tx
                    .send(Event::Fetched {
                        partition: p,
                        result,
                    })
                    .await;
            }
        });
    }
}
