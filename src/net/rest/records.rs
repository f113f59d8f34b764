//! Publish, subscribe (long poll or Server-Sent Events; alone or in a queue group), ack, nack.
//!
//! A message's id names where it lives, `<partition>-<offset>`; a delivery from a queue group
//! also names the group, `<partition>-<offset>-<group>`, so that an ack needs nothing else.
//! A group poll joins the queue group and leaves (a `Leave` request) holding exactly the
//! deliveries it answers with: they stay out until acked (from any node) or their ack wait
//! passes, after which they are redelivered, and dead-lettered after `max_deliveries`; what
//! else was dispatched to it goes back to others as never delivered.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};

use super::{object, Body, Encoding, Problem};
use crate::net::call::Call;
use crate::net::service::{BoxStream, TernService};
use crate::proto::v1 as pb;
use crate::proto::v1::consume_response::Kind as Down;
use crate::proto::v1::tern_server::Tern;

/// Messages one poll returns at most, by default and at most.
const MAX_DEFAULT: u32 = 100;
const MAX_MAX: u32 = 1000;
/// How long a poll waits for a first message, by default and at most.
const WAIT_DEFAULT_MS: u64 = 1000;
const WAIT_MAX_MS: u64 = 30_000;
/// How often a group subscription over SSE tells the coordinator it is there.
const HEARTBEAT: Duration = Duration::from_secs(3);
/// How long a group poll waits, after answering, for its leave to reach the coordinator.
const LEAVE_WAIT: Duration = Duration::from_secs(5);
/// Requests a REST member's Consume call buffers (join, heartbeats, leave).
const MEMBER_REQUESTS: usize = 8;
/// An SSE comment line this often keeps proxies from closing an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishBody {
    key: Option<String>,
    value: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    encoding: Encoding,
    partition: Option<u32>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    message_id: String,
    partition: u32,
    offset: u64,
}

pub async fn publish(
    State(tern): State<Arc<TernService>>,
    Path(topic): Path<String>,
    parts: Parts,
    body: Body,
) -> Result<Json<Published>, Problem> {
    let b: PublishBody = object(body)?;
    let call = Call::from_http(&parts);
    let key = b.key.map(|k| b.encoding.decode("key", k)).transpose()?;
    let value = b.encoding.decode("value", b.value)?;
    let mut headers = Vec::with_capacity(b.headers.len());
    for (k, v) in b.headers {
        let value = b.encoding.decode("a header value", v)?;
        headers.push(pb::Header { key: k, value });
    }
    let record = pb::PublishRecord {
        key,
        value,
        headers,
        partition: b.partition,
        expiry_seconds: None,
    };
    let ack = crate::net::call::publish_one(&tern, &call, topic, record).await?;
    Ok(Json(Published {
        message_id: message_id(ack.partition, ack.offset, None),
        partition: ack.partition,
        offset: ack.offset,
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SubscribeQuery {
    group: Option<String>,
    offset: Option<String>,
    partition: Option<u32>,
    max: Option<u32>,
    wait_ms: Option<u64>,
    ack_wait_ms: Option<u32>,
    max_deliveries: Option<u32>,
    #[serde(default)]
    encoding: Encoding,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    message_id: String,
    partition: u32,
    offset: u64,
    /// Unix milliseconds.
    timestamp: i64,
    key: Option<String>,
    value: String,
    headers: BTreeMap<String, String>,
    /// How `key`, `value` and header values are written: as asked, or base64 when asked for
    /// UTF-8 and they are not valid UTF-8.
    encoding: Encoding,
    /// In a group: 1 on the first delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_count: Option<u32>,
}

/// `<partition>-<offset>`, or `<partition>-<offset>-<group>` for a group's delivery.
fn message_id(partition: u32, offset: u64, group: Option<&str>) -> String {
    match group {
        Some(g) => format!("{partition}-{offset}-{g}"),
        None => format!("{partition}-{offset}"),
    }
}

/// (partition, offset, group) of a message id: decimal numbers without leading zeros (a
/// partition of at most 9 digits, an offset of at most 19), and a group name.
fn parse_message_id(id: &str) -> Option<(u32, u64, Option<&str>)> {
    fn number<T: std::str::FromStr>(s: &str, digits_max: usize) -> Option<T> {
        let ok = (1..=digits_max).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        ok.then(|| s.parse().ok()).flatten()
    }
    let mut it = id.splitn(3, '-');
    let partition = number(it.next()?, 9)?;
    let offset = number(it.next()?, 19)?;
    let group = it.next();
    if group.is_some_and(|g| crate::cluster::validate_topic_name(g).is_err()) {
        return None;
    }
    Some((partition, offset, group))
}

fn message(r: pb::Record, asked: Encoding, group: Option<&str>, count: Option<u32>) -> Message {
    let all = |e: Encoding| -> Option<(Option<String>, String, BTreeMap<String, String>)> {
        let key = match &r.key {
            Some(k) => Some(e.encode(k)?),
            None => None,
        };
        let mut headers = BTreeMap::new();
        for h in &r.headers {
            headers.insert(h.key.clone(), e.encode(&h.value)?);
        }
        Some((key, e.encode(&r.value)?, headers))
    };
    let (encoding, (key, value, headers)) = match all(asked) {
        Some(text) => (asked, text),
        None => (
            Encoding::Base64,
            all(Encoding::Base64).expect("base64 encodes anything"),
        ),
    };
    Message {
        message_id: message_id(r.partition, r.offset, group),
        partition: r.partition,
        offset: r.offset,
        timestamp: r.timestamp_ms,
        key,
        value,
        headers,
        encoding,
        delivery_count: count,
    }
}

/// Where a subscription without a group starts in each partition it reads.
fn start_at(offset: Option<&str>) -> Result<pb::StartPosition, Problem> {
    use pb::start_position::Position;
    let position = match offset.unwrap_or("earliest") {
        "earliest" => Position::Earliest(true),
        "latest" => Position::Latest(true),
        n => Position::Offset(n.parse().map_err(|_| {
            Problem::bad_request(format!(
                "offset {n:?}: use earliest, latest or a number of 0 or more"
            ))
        })?),
    };
    Ok(pb::StartPosition {
        position: Some(position),
    })
}

pub async fn subscribe(
    State(tern): State<Arc<TernService>>,
    Path(topic): Path<String>,
    parts: Parts,
    query: Result<Query<SubscribeQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let max = q.max.unwrap_or(MAX_DEFAULT);
    if !(1..=MAX_MAX).contains(&max) {
        return Err(Problem::bad_request(format!(
            "max {max}: use 1 to {MAX_MAX}"
        )));
    }
    let wait = q.wait_ms.unwrap_or(WAIT_DEFAULT_MS);
    if wait > WAIT_MAX_MS {
        return Err(Problem::bad_request(format!(
            "waitMs {wait}: use 0 to {WAIT_MAX_MS}"
        )));
    }
    let sse = parts
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let call = Call::from_http(&parts);
    let caller = tern.caller(&call.request(())).await?;
    let encoding = q.encoding;
    let group = match q.group {
        Some(group) => group,
        None => {
            if q.ack_wait_ms.is_some() || q.max_deliveries.is_some() {
                return Err(Problem::bad_request(
                    "ackWaitMs and maxDeliveries apply to a group subscription (group=...)",
                ));
            }
            let add = pb::TopicSubscription {
                topic,
                from: Some(start_at(q.offset.as_deref())?),
                partitions: q.partition.into_iter().collect(),
            };
            let records = crate::net::subscribe::once(
                tern.broker.clone(),
                tern.auth.clone(),
                caller,
                vec![add],
            )
            .await?;
            let messages: BoxStream<Vec<Message>> = Box::pin(records.map(move |r| {
                r.map(|batch| {
                    batch
                        .records
                        .into_iter()
                        .map(|r| message(r, encoding, None, None))
                        .collect()
                })
            }));
            if sse {
                return Ok(sse_response(messages));
            }
            let mut messages = messages;
            let got = poll(&mut messages, max as usize, Duration::from_millis(wait)).await?;
            return Ok(Json(got).into_response());
        }
    };
    if q.partition.is_some() {
        return Err(Problem::bad_request(
            "partition does not apply to a group subscription: the group hands out records \
             from every partition",
        ));
    }
    let start_latest = match q.offset.as_deref() {
        None | Some("earliest") => false,
        Some("latest") => true,
        Some(o) => {
            return Err(Problem::bad_request(format!(
                "offset {o:?}: a group starts where it left off, else at earliest or latest"
            )))
        }
    };
    let join = pb::JoinGroup {
        group: group.clone(),
        topic,
        mode: pb::GroupMode::Queue as i32,
        member_name: "rest".into(),
        max_in_flight: max,
        start_latest,
        ack_wait_ms: q.ack_wait_ms.unwrap_or(0),
        max_deliveries: q.max_deliveries.unwrap_or(0),
        ..Default::default()
    };
    let (member, mut messages) = queue_member(&tern, caller, join, encoding, group).await?;
    if sse {
        // The stream owns the member: when the client goes away, the member leaves holding
        // all it was sent (the client may ack any of it later).
        let mut member = member;
        member.hold_all_on_drop = true;
        let messages: BoxStream<Vec<Message>> = Box::pin(messages.map(move |m| {
            let _member = &member;
            m
        }));
        return Ok(sse_response(messages));
    }
    let got = poll(&mut messages, max as usize, Duration::from_millis(wait)).await;
    // Leave holding exactly what this poll answers with; whatever else was dispatched to the
    // member goes back to others as never delivered. The answer waits until the coordinator
    // has taken the leave (it then ends the member's stream), so it is not lost on the way.
    let hold = got
        .as_ref()
        .map(|ms| {
            ms.iter()
                .map(|m| pb::DeliveryRef {
                    partition: m.partition,
                    offset: m.offset,
                })
                .collect()
        })
        .unwrap_or_default();
    member.leave(hold);
    let _ = tokio::time::timeout(LEAVE_WAIT, async {
        while messages.next().await.is_some() {}
    })
    .await;
    Ok(Json(got?).into_response())
}

/// Server-Sent Events: each message an event (its id the message id); a failure ends the
/// stream with an `error` event carrying the problem.
fn sse_response(messages: BoxStream<Vec<Message>>) -> Response {
    let events = messages
        .scan(false, |ended, r| {
            let out = match r {
                _ if *ended => None,
                Ok(ms) => Some(ms.iter().map(event).collect::<Vec<_>>()),
                Err(s) => {
                    *ended = true;
                    let problem = serde_json::to_string(&Problem::from(s)).unwrap_or_default();
                    Some(vec![Event::default().event("error").data(problem)])
                }
            };
            futures::future::ready(out)
        })
        .flat_map(futures::stream::iter)
        .map(Ok::<_, Infallible>);
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

fn event(m: &Message) -> Event {
    Event::default()
        .id(m.message_id.clone())
        .data(serde_json::to_string(m).unwrap_or_default())
}

/// A long poll: waits up to `wait` for the first messages, then takes what else is ready, up
/// to `max`.
async fn poll(
    messages: &mut BoxStream<Vec<Message>>,
    max: usize,
    wait: Duration,
) -> Result<Vec<Message>, Problem> {
    let mut got = match tokio::time::timeout(wait, messages.next()).await {
        Err(_) | Ok(None) => return Ok(vec![]),
        Ok(Some(r)) => r?,
    };
    while got.len() < max {
        match messages.next().now_or_never() {
            Some(Some(Ok(more))) => got.extend(more),
            _ => break,
        }
    }
    got.truncate(max);
    Ok(got)
}

type Requests = tokio::sync::mpsc::Sender<Result<pb::ConsumeRequest, tonic::Status>>;

/// A REST queue-group member's side of its Consume call: its requests (the join, heartbeats,
/// and a Leave at the end). Dropped without [`QueueMember::leave`], it leaves holding all it
/// was sent (`hold_all_on_drop`: an event stream whose client went away) or nothing (a poll
/// cancelled before it answered handed nothing on).
struct QueueMember {
    requests: Option<Requests>,
    hold_all_on_drop: bool,
}

fn leave_request(hold: Vec<pb::DeliveryRef>, hold_all: bool) -> pb::ConsumeRequest {
    pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Leave(pb::Leave {
            hold,
            hold_all,
        })),
    }
}

impl QueueMember {
    /// Leaves the group holding `hold`.
    fn leave(mut self, hold: Vec<pb::DeliveryRef>) {
        if let Some(tx) = self.requests.take() {
            let _ = tx.try_send(Ok(leave_request(hold, false)));
        }
    }
}

impl Drop for QueueMember {
    fn drop(&mut self) {
        if let Some(tx) = self.requests.take() {
            let _ = tx.try_send(Ok(leave_request(vec![], self.hold_all_on_drop)));
        }
    }
}

/// Joins a queue group; answers the member (heartbeating until it leaves) and its deliveries.
async fn queue_member(
    tern: &Arc<TernService>,
    caller: crate::net::auth::Caller,
    join: pb::JoinGroup,
    encoding: Encoding,
    group: String,
) -> Result<(QueueMember, BoxStream<Vec<Message>>), Problem> {
    let (tx, rx) = tokio::sync::mpsc::channel(MEMBER_REQUESTS);
    tx.try_send(Ok(pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Join(join)),
    }))
    .map_err(|_| Problem::new(tonic::Code::Internal, "the join did not fit its channel"))?;
    // Heartbeats while the member's sender lives (a weak one here does not keep it open).
    let weak = tx.downgrade();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            let Some(tx) = weak.upgrade() else { return };
            let beat = pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Heartbeat(pb::Heartbeat {})),
            };
            if tx.send(Ok(beat)).await.is_err() {
                return;
            }
        }
    });
    let member = QueueMember {
        requests: Some(tx),
        hold_all_on_drop: false,
    };
    let down = crate::net::service::consume::consume(
        tern.broker.clone(),
        tern.groups.clone(),
        tern.auth.clone(),
        caller,
        tokio_stream::wrappers::ReceiverStream::new(rx),
        false,
    )
    .await?;
    let messages = down.filter_map(move |r| {
        let out = match r {
            Ok(pb::ConsumeResponse {
                kind: Some(Down::Deliveries(d)),
            }) => Some(Ok(d
                .deliveries
                .into_iter()
                .filter_map(|d| {
                    let count = d.delivery_count;
                    d.record
                        .map(|r| message(r, encoding, Some(&group), Some(count)))
                })
                .collect())),
            Ok(_) => None,
            Err(s) => Some(Err(s)),
        };
        futures::future::ready(out)
    });
    Ok((member, Box::pin(messages)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AckBody {
    message_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NackBody {
    message_id: String,
    /// Redeliver after this long (0: at once).
    #[serde(default)]
    delay_ms: u32,
}

fn settle_ref(id: &str) -> Result<(String, pb::DeliveryRef), Problem> {
    let Some((partition, offset, group)) = parse_message_id(id) else {
        return Err(Problem::bad_request(format!(
            "messageId {id:?} is not <partition>-<offset>-<group>"
        )));
    };
    let Some(group) = group else {
        return Err(Problem::bad_request(format!(
            "messageId {id:?} names no group: only deliveries from a group subscription \
             (group=...) are acked"
        )));
    };
    Ok((group.to_string(), pb::DeliveryRef { partition, offset }))
}

/// Settles a group delivery: 200 if it was out, 409 if not (already acked, redelivered to
/// another member, or never delivered).
pub async fn ack(
    State(tern): State<Arc<TernService>>,
    Path(topic): Path<String>,
    parts: Parts,
    body: Body,
) -> Result<Response, Problem> {
    let s: AckBody = object(body)?;
    let (group, r) = settle_ref(&s.message_id)?;
    let call = Call::from_http(&parts);
    let req = pb::AckRequest {
        group,
        topic,
        deliveries: vec![r],
    };
    let acked = tern.ack(call.request(req)).await?.into_inner().acked;
    settled(acked, &s.message_id)
}

/// Fails a group delivery now (redelivered after `delayMs`, or dead-lettered after its last
/// delivery).
pub async fn nack(
    State(tern): State<Arc<TernService>>,
    Path(topic): Path<String>,
    parts: Parts,
    body: Body,
) -> Result<Response, Problem> {
    let s: NackBody = object(body)?;
    let (group, r) = settle_ref(&s.message_id)?;
    let call = Call::from_http(&parts);
    let req = pb::NackRequest {
        group,
        topic,
        deliveries: vec![r],
        delay_ms: s.delay_ms,
    };
    let nacked = tern.nack(call.request(req)).await?.into_inner().nacked;
    settled(nacked, &s.message_id)
}

fn settled(n: u32, id: &str) -> Result<Response, Problem> {
    if n == 0 {
        return Err(Problem::new(
            tonic::Code::FailedPrecondition,
            format!(
                "{id} is not out: already acked, redelivered after its ack wait, or never \
                 delivered"
            ),
        ));
    }
    Ok((StatusCode::OK, Json(serde_json::json!({ "messageId": id }))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_round_trip() {
        assert_eq!(parse_message_id("3-17"), Some((3, 17, None)));
        assert_eq!(
            parse_message_id(&message_id(0, 5, Some("billing-eu.v2"))),
            Some((0, 5, Some("billing-eu.v2")))
        );
        for bad in [
            "",
            "3",
            "3-",
            "-3-4",
            "x-1",
            "1-y",
            "1-2-",
            "1--2",
            "01-2",
            "1-02",
            "1-2-..",
            "1234567890-1",
            "1-2-a/b",
        ] {
            assert_eq!(parse_message_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_come_as_base64() {
        let r = pb::Record {
            value: vec![0xff, 0x00].into(),
            key: Some("k".into()),
            ..Default::default()
        };
        let m = message(r, Encoding::Utf8, None, None);
        assert_eq!(m.encoding, Encoding::Base64);
        assert_eq!(m.value, "/wA=");
        assert_eq!(m.key.as_deref(), Some("aw=="));
    }
}
