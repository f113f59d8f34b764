//! Quotas: per principal and per node, token buckets for publish bytes, consume bytes and
//! requests, with rates from the metadata (`tern quota set`).
//!
//! A call over its quota is first **slowed**: it waits until the principal's earlier use is
//! paid off, up to [`MAX_DELAY`], before it does any work (as Kafka's throttle time does, but
//! on the broker's side, so clients that know nothing of quotas are held too). A principal
//! further behind than that is answered RESOURCE_EXHAUSTED with `retry-after-ms`: waiting
//! longer would hold a call, its memory and a connection's stream slot for each flooding
//! request, and a clear refusal tells the client what is wrong. Either way the throttled
//! call waits before it reaches a core, so a heavy producer does not fill the queues a light
//! one goes through.
//!
//! Consume bytes are known only after a read: they are charged then, and the next read waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Status;

use super::auth::Caller;
use crate::broker::Broker;
use crate::cluster::security::Quota;
use crate::proto::metadata::RETRY_AFTER_MS;

/// Longest a call waits for its principal's quota before it is refused.
pub const MAX_DELAY: Duration = Duration::from_millis(500);
/// Principals tracked at once; idle ones are forgotten first.
const PRINCIPALS_MAX: usize = 10_000;
/// A principal unseen this long is forgotten (its buckets are full again anyway).
const IDLE: Duration = Duration::from_secs(60);

/// What a call costs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub requests: u64,
    pub publish_bytes: u64,
    pub consume_bytes: u64,
}

struct Bucket {
    /// Per second.
    rate: f64,
    /// May go negative: debt the next calls wait for.
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        Bucket {
            rate: rate as f64,
            // One second of burst.
            tokens: rate as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.rate);
        self.at = now;
    }

    /// How long a call must wait for the debt before it.
    fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

struct Buckets {
    quota: Quota,
    publish: Option<Bucket>,
    consume: Option<Bucket>,
    requests: Option<Bucket>,
    seen: Instant,
}

impl Buckets {
    fn new(quota: Quota, now: Instant) -> Buckets {
        let b = |r: Option<u64>| r.map(|r| Bucket::new(r, now));
        Buckets {
            quota,
            publish: b(quota.publish_bytes_per_sec),
            consume: b(quota.consume_bytes_per_sec),
            requests: b(quota.requests_per_sec),
            seen: now,
        }
    }

    fn all(&mut self) -> impl Iterator<Item = &mut Bucket> {
        [&mut self.publish, &mut self.consume, &mut self.requests]
            .into_iter()
            .flatten()
    }
}

#[derive(Default)]
pub struct Quotas {
    principals: Mutex<HashMap<Arc<str>, Buckets>>,
}

impl Quotas {
    /// Admits a call: waits out its principal's debt (up to [`MAX_DELAY`]) and charges `cost`;
    /// RESOURCE_EXHAUSTED when the debt is longer. Free for callers without a quota, and for
    /// calls relayed from another node (charged where they came in).
    /// `cost` is asked only when a quota applies, so calls without one count no bytes.
    pub async fn admit(
        &self,
        broker: &Broker,
        caller: &Caller,
        cost: impl FnOnce() -> Cost,
    ) -> Result<(), Status> {
        let wait = self.charge(broker, caller, cost, true)?;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Charges what a call used once it is known (bytes read); the principal's next calls wait.
    pub fn used(&self, broker: &Broker, caller: &Caller, cost: impl FnOnce() -> Cost) {
        let _ = self.charge(broker, caller, cost, false);
    }

    /// Charges one read of a stream (`cost`: its request and the bytes it returned); answers
    /// how long the stream should pause to stay within the principal's quotas.
    pub fn read_wait(
        &self,
        broker: &Broker,
        caller: &Caller,
        cost: impl FnOnce() -> Cost,
    ) -> Duration {
        // The wait counts this read's own cost: the stream pauses before its next read.
        self.used(broker, caller, cost);
        self.charge(broker, caller, Cost::default, false)
            .unwrap_or(MAX_DELAY)
    }

    /// Charges what a read stream (Subscribe, Consume) just returned; answers how long it should
    /// pause to stay within the principal's consume quota, this read's bytes included.
    pub fn consume_wait(
        &self,
        broker: &Broker,
        caller: &Caller,
        bytes: impl FnOnce() -> u64,
    ) -> Duration {
        self.read_wait(broker, caller, || Cost {
            consume_bytes: bytes(),
            ..Cost::default()
        })
    }

    fn charge(
        &self,
        broker: &Broker,
        caller: &Caller,
        cost: impl FnOnce() -> Cost,
        admit: bool,
    ) -> Result<Duration, Status> {
        if caller.relayed {
            return Ok(Duration::ZERO);
        }
        let Some(p) = &caller.principal else {
            return Ok(Duration::ZERO);
        };
        let state = broker.cluster();
        let Some(quota) = state.security.quota_of(p).copied() else {
            return Ok(Duration::ZERO);
        };
        let now = Instant::now();
        let mut map = self.principals.lock().expect("quota lock");
        if !map.contains_key(p) && map.len() >= PRINCIPALS_MAX {
            map.retain(|_, b| now.saturating_duration_since(b.seen) < IDLE);
            if map.len() >= PRINCIPALS_MAX {
                map.clear();
            }
        }
        let b = map
            .entry(p.clone())
            .or_insert_with(|| Buckets::new(quota, now));
        if b.quota != quota {
            *b = Buckets::new(quota, now);
        }
        b.seen = now;
        let wait = b.all().map(|x| x.wait(now)).max().unwrap_or_default();
        if admit && wait > MAX_DELAY {
            crate::metrics::NODE.quota_refused.inc();
            let retry = wait - MAX_DELAY;
            let mut s = Status::resource_exhausted(format!(
                "principal {p:?} is over its quota on this node; retry in {} ms",
                retry.as_millis().max(1)
            ));
            if let Ok(v) = retry.as_millis().max(1).to_string().parse() {
                s.metadata_mut().insert(RETRY_AFTER_MS, v);
            }
            return Err(s);
        }
        let cost = cost();
        for (bucket, n) in [
            (&mut b.publish, cost.publish_bytes),
            (&mut b.consume, cost.consume_bytes),
            (&mut b.requests, cost.requests),
        ] {
            if let Some(bucket) = bucket {
                bucket.tokens -= n as f64;
            }
        }
        if !wait.is_zero() {
            crate::metrics::NODE.quota_delayed.inc();
        }
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_a_rate_and_pays_off_debt() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, t0);
        assert_eq!(b.wait(t0), Duration::ZERO);
        b.tokens -= 300.0; // 200 in debt: two seconds
        let w = b.wait(t0);
        assert!(w > Duration::from_millis(1990) && w <= Duration::from_secs(2));
        let w = b.wait(t0 + Duration::from_secs(1));
        assert!(w > Duration::from_millis(990) && w <= Duration::from_secs(1));
        assert_eq!(b.wait(t0 + Duration::from_secs(3)), Duration::ZERO);
        // Never more than one second of burst.
        assert_eq!(b.tokens, 100.0);
    }
}
