//! Errors over REST: RFC 9457 `application/problem+json`, with the meaning of the gRPC status
//! the same call would get (its name in `code`).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tonic::Code;

use crate::proto::metadata::RETRY_AFTER_MS;

#[derive(Debug, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    kind: &'static str,
    title: String,
    status: u16,
    detail: String,
    /// The gRPC status code's name (INVALID_ARGUMENT, NOT_FOUND, ...).
    code: &'static str,
    #[serde(skip)]
    retry_after_ms: Option<u64>,
    #[serde(skip)]
    grpc: Code,
}

/// The HTTP status standing for a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn code_name(code: Code) -> &'static str {
    crate::metrics::CODES
        .get(code as usize)
        .copied()
        .unwrap_or("UNKNOWN")
}

impl Problem {
    pub fn new(code: Code, detail: impl Into<String>) -> Problem {
        let status = http_status(code);
        Problem {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code_name(code),
            retry_after_ms: None,
            grpc: code,
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(Code::InvalidArgument, detail)
    }

    /// The same problem under another HTTP status (one no gRPC code stands for, such as 405).
    pub fn with_status(mut self, status: u16) -> Problem {
        self.status = status;
        self.title = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error")
            .to_string();
        self
    }
}

impl From<tonic::Status> for Problem {
    fn from(s: tonic::Status) -> Problem {
        let mut p = Problem::new(s.code(), s.message());
        p.retry_after_ms = s
            .metadata()
            .get(RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        p
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut r = (status, body).into_response();
        // For the request metrics (`net::timed`): the gRPC code this answer stands for.
        r.extensions_mut().insert(self.grpc);
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(ms) = self.retry_after_ms {
            // Retry-After is in whole seconds; the exact wait is in retry-after-ms, as on gRPC.
            h.insert(
                header::RETRY_AFTER,
                HeaderValue::from(ms.div_ceil(1000).max(1)),
            );
            h.insert(RETRY_AFTER_MS, HeaderValue::from(ms));
        }
        if self.status == 503 && self.retry_after_ms.is_none() {
            // The node cannot serve this now (an election, shutting down): ask again.
            h.insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        if self.status == 401 {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}
