//! POST /topics and DELETE /topics/{topic}.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::Problem;
use crate::net::call::Call;
use crate::net::service::TernService;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_server::Tern;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NewTopic {
    name: String,
    /// 0 or absent: the node's default.
    #[serde(default)]
    partitions: u32,
    #[serde(default)]
    replication_factor: u32,
    #[serde(default, deserialize_with = "policy")]
    retention_policy: Option<RetentionPolicy>,
}

/// The retention policy only as a JSON object (serde would take an array for a struct too).
fn policy<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<RetentionPolicy>, D::Error> {
    use serde::de::Error;
    match Option::<serde_json::Map<String, serde_json::Value>>::deserialize(d)? {
        None => Ok(None),
        Some(map) => serde_json::from_value(serde_json::Value::Object(map))
            .map(Some)
            .map_err(D::Error::custom),
    }
}

/// When whole segments are deleted: older than `retentionMs`, or while the partition stays
/// over `retentionBytes` (-1: never by that rule; absent: the node's default).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetentionPolicy {
    retention_ms: Option<i64>,
    retention_bytes: Option<i64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicOut {
    name: String,
    partitions: u32,
    replication_factor: u32,
    retention_policy: RetentionPolicy,
}

pub async fn create(
    State(tern): State<Arc<TernService>>,
    parts: Parts,
    body: super::Body,
) -> Result<Response, Problem> {
    let t: NewTopic = super::object(body)?;
    let call = Call::from_http(&parts);
    let retention = t.retention_policy.unwrap_or_default();
    let req = pb::CreateTopicRequest {
        name: t.name,
        partitions: t.partitions,
        replication_factor: t.replication_factor,
        config: Some(pb::TopicConfig {
            retention_ms: retention.retention_ms,
            retention_bytes: retention.retention_bytes,
            ..Default::default()
        }),
        placement: None,
        mirror_of: None,
    };
    let info = tern
        .create_topic(call.request(req))
        .await?
        .into_inner()
        .topic
        .unwrap_or_default();
    let config = info.config.unwrap_or_default();
    let out = TopicOut {
        name: info.name,
        partitions: info.partitions,
        replication_factor: info.replication_factor,
        retention_policy: RetentionPolicy {
            retention_ms: config.retention_ms,
            retention_bytes: config.retention_bytes,
        },
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

pub async fn delete(
    State(tern): State<Arc<TernService>>,
    Path(topic): Path<String>,
    parts: Parts,
) -> Result<StatusCode, Problem> {
    let call = Call::from_http(&parts);
    tern.delete_topic(call.request(pb::DeleteTopicRequest { name: topic }))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
