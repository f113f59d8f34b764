//! The REST API (the system-design seed's), HTTP/1.1 and JSON on the main port beside gRPC:
//!
//! ```text
//! POST   /topics                      create          (topics.rs)
//! DELETE /topics/{topic}              delete
//! POST   /topics/{topic}/publish      publish         (records.rs)
//! GET    /topics/{topic}/subscribe    long poll, or Server-Sent Events; ?group= a queue group
//! POST   /topics/{topic}/ack          settle a group delivery; /nack fails it
//! GET    /openapi.json                the OpenAPI 3 description (openapi.json)
//! ```
//!
//! Each call is made of `tern.v1` calls in the caller's name (`Authorization: Bearer`, or the
//! client certificate), so authentication, ACLs, quotas, forwarding and metrics are those of
//! gRPC; errors are RFC 9457 problems with the same meaning (`problem.rs`).

mod problem;
mod records;
mod topics;

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::service::TernService;
pub use problem::Problem;

/// The OpenAPI 3 description of this API, served at `/openapi.json`.
const OPENAPI: &str = include_str!("openapi.json");

/// The REST routes, ending in `fallback` for anything else (gRPC's own answer for gRPC calls).
pub fn router(tern: Arc<TernService>) -> axum::Router {
    let body_max = tern.broker.config.max_request_bytes;
    axum::Router::new()
        .route("/topics", post(topics::create))
        .route("/topics/{topic}", delete(topics::delete))
        .route("/topics/{topic}/publish", post(records::publish))
        .route("/topics/{topic}/subscribe", get(records::subscribe))
        .route("/topics/{topic}/ack", post(records::ack))
        .route("/topics/{topic}/nack", post(records::nack))
        .route("/openapi.json", get(openapi))
        .method_not_allowed_fallback(|| async {
            Problem::new(
                tonic::Code::Unimplemented,
                "this path does not take that method (see /openapi.json)",
            )
            .with_status(405)
        })
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(tern)
}

/// What answers a path no route takes: gRPC's UNIMPLEMENTED to a gRPC call, a 404 problem to
/// anything else.
pub async fn fallback(request: axum::extract::Request) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented("").into_http::<axum::body::Body>();
    }
    Problem::new(
        tonic::Code::NotFound,
        format!("no such path: {} (see /openapi.json)", request.uri().path()),
    )
    .into_response()
}

/// A JSON body that could not be taken: 413 (too large), 415 (not declared JSON), else 400
/// (not JSON, wrong fields or values), as a problem.
fn rejected(e: JsonRejection) -> Problem {
    let p = Problem::bad_request(e.body_text());
    match e.status().as_u16() {
        s @ (413 | 415) => p.with_status(s),
        _ => p,
    }
}

/// A JSON request body: an object (not an array standing for a struct, as serde would take),
/// decoded into `T`.
type Body = Result<axum::Json<serde_json::Map<String, serde_json::Value>>, JsonRejection>;

fn object<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, Problem> {
    let axum::Json(map) = body.map_err(rejected)?;
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| Problem::bad_request(format!("the body: {e}")))
}

async fn openapi() -> Response {
    let mut r = OPENAPI.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// How bytes (keys, values, header values) are written in JSON: as UTF-8 text, or base64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Utf8,
    Base64,
}

impl Encoding {
    fn decode(self, what: &str, text: String) -> Result<bytes::Bytes, Problem> {
        match self {
            Encoding::Utf8 => Ok(text.into_bytes().into()),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map(Into::into)
                .map_err(|e| Problem::bad_request(format!("{what} is not base64: {e}"))),
        }
    }

    /// Bytes as text in this encoding, where they can be (UTF-8 text must be valid UTF-8).
    fn encode(self, bytes: &[u8]) -> Option<String> {
        match self {
            Encoding::Utf8 => std::str::from_utf8(bytes).ok().map(str::to_string),
            Encoding::Base64 => Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        }
    }
}
