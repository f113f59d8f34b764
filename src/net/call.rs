//! Who called, carried from a request of one API into the `tern.v1` calls it stands for (the
//! seeds' services, REST), so those run in the caller's name.

use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Code, Extensions, Request, Status};

use super::service::TernService;
use crate::proto::v1 as pb;
use crate::proto::v1::tern_server::Tern;

/// How long a publish through the seeds' services or REST is sent again while it is refused
/// unwritten (a topic just created whose leaders are still being elected, a leader change).
/// Those clients were not written to retry; a `tern.v1` client decides for itself.
const UNWRITTEN_RETRY: Duration = Duration::from_secs(10);
const UNWRITTEN_PAUSE: Duration = Duration::from_millis(50);

/// Who called, as tonic handed it over: metadata (credentials) and the connection's details
/// (client certificate). Inner calls are made in the caller's name.
#[derive(Clone)]
pub struct Call {
    metadata: MetadataMap,
    extensions: Extensions,
}

impl Call {
    pub fn split<T>(request: Request<T>) -> (Call, T) {
        let (metadata, extensions, message) = request.into_parts();
        (
            Call {
                metadata,
                extensions,
            },
            message,
        )
    }

    /// A `tern.v1` request in the caller's name.
    pub fn request<T>(&self, message: T) -> Request<T> {
        Request::from_parts(self.metadata.clone(), self.extensions.clone(), message)
    }

    /// The caller of an HTTP request (REST): its headers (`authorization`) and connection.
    pub fn from_http(parts: &axum::http::request::Parts) -> Call {
        Call {
            metadata: MetadataMap::from_headers(parts.headers.clone()),
            extensions: parts.extensions.clone(),
        }
    }
}

/// Publishes one record to `topic` in the caller's name, sending the request again (bounded)
/// while it is refused with nothing written, so a retry can neither lose nor duplicate it;
/// answers where it was stored.
pub async fn publish_one(
    tern: &TernService,
    call: &Call,
    topic: String,
    record: pb::PublishRecord,
) -> Result<pb::RecordAck, Status> {
    let req = pb::PublishRequest {
        topic,
        records: vec![record],
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + UNWRITTEN_RETRY;
    loop {
        match tern.publish(call.request(req.clone())).await {
            Ok(r) => {
                return r
                    .into_inner()
                    .acks
                    .into_iter()
                    .next()
                    .ok_or_else(|| Status::internal("the publish was answered without an ack"))
            }
            Err(s)
                if s.code() == Code::Unavailable
                    && super::status::is_unwritten(&s)
                    && tokio::time::Instant::now() + UNWRITTEN_PAUSE < deadline =>
            {
                tokio::time::sleep(UNWRITTEN_PAUSE).await;
            }
            Err(s) => return Err(s),
        }
    }
}
