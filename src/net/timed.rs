//! Times every call (gRPC, and REST by route) by method and status code (`metrics::NODE.requests`), and wraps it in a
//! `tern::rpc` span (exported over OTLP when configured), as a tower layer under tonic. The time runs to the response's headers: a unary call's whole handling, and
//! a stream's opening. The code is the one in the headers (tonic answers an error with its
//! status there); a call answered with headers but no status has so far succeeded (OK).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;
use tracing::instrument::{Instrument, Instrumented};

use crate::metrics;

/// The layer: wraps each service in [`Timed`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TimedLayer;

impl<S> tower::Layer<S> for TimedLayer {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Timed<S> {
        Timed(inner)
    }
}

#[derive(Clone, Debug)]
pub struct Timed<S>(S);

impl<S, B, R> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TimedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let rpc = metrics::rpc_index(req.method().as_str(), path);
        let (service, method) = metrics::RPCS[rpc];
        // Made only when a layer takes it (the OTLP exporter): otherwise the level check is
        // all it costs, and the fields are not evaluated.
        let span = tracing::debug_span!(
            target: "tern::rpc",
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        TimedFuture {
            rpc,
            started: Instant::now(),
            inner: self.0.call(req).instrument(span),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct TimedFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        rpc: usize,
        started: Instant,
    }
}

impl<F, R, E> Future for TimedFuture<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let r = std::task::ready!(this.inner.as_mut().poll(cx));
        let code = match &r {
            Ok(resp) => match resp.extensions().get::<tonic::Code>() {
                // A REST answer says which gRPC code it stands for.
                Some(c) => *c as usize,
                None => status_code(resp.headers()),
            },
            Err(_) => 13, // INTERNAL: the transport failed the call
        };
        metrics::NODE
            .requests
            .observe(*this.rpc, code, this.started.elapsed());
        this.inner
            .span()
            .record("rpc.grpc.status_code", code as i64);
        Poll::Ready(r)
    }
}

/// The `grpc-status` of a response's headers; OK when there is none.
fn status_code(headers: &http::HeaderMap) -> usize {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_comes_from_grpc_status_or_is_ok() {
        let mut h = http::HeaderMap::new();
        assert_eq!(status_code(&h), 0);
        h.insert("grpc-status", http::HeaderValue::from_static("14"));
        assert_eq!(status_code(&h), 14);
        h.insert("grpc-status", http::HeaderValue::from_static("junk"));
        assert_eq!(status_code(&h), 0);
    }
}
