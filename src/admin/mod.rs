//! The admin HTTP listener (`--admin-listen`), for the machines that watch a node rather
//! than for clients: Prometheus metrics and the health probes that Docker and Kubernetes use.
//!
//! ```text
//! admin/
//!   mod.rs        the listener: /metrics, /livez, /readyz
//!   exposition.rs what a scrape reads (counters, each core's replicas, groups) and how it is
//!                 written in the Prometheus text format
//! ```
//!
//! - `/livez`: 200 while every core answers within [`LIVE_WAIT`] (a core stuck for that
//!   long serves nobody; restarting the process is the cure), else 503.
//! - `/readyz`: 200 once the node has caught up with the cluster metadata and serves, until
//!   it begins to shut down; else 503 with the reason.
//! - `/metrics`: Prometheus text format 0.0.4 (docs/operations.md lists every series).

mod exposition;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::groups::Groups;

/// How long a core may take to answer the liveness probe.
pub const LIVE_WAIT: Duration = Duration::from_secs(5);

/// Longest a scrape may take before it is answered 503 (Prometheus' default timeout is 10 s).
const SCRAPE_WAIT: Duration = Duration::from_secs(8);

#[derive(Clone)]
struct Admin {
    broker: Arc<Broker>,
    groups: Arc<Groups>,
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    broker: Arc<Broker>,
    groups: Arc<Groups>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(Admin { broker, groups });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn livez(State(a): State<Admin>) -> impl IntoResponse {
    match tokio::time::timeout(LIVE_WAIT, exposition::cores_answer(&a.broker)).await {
        Ok(Ok(())) => (StatusCode::OK, "ok\n".to_string()),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("a core did not answer within {LIVE_WAIT:?}\n"),
        ),
    }
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    let (code, why) = readiness(&a.broker);
    (code, format!("{why}\n"))
}

/// Whether the node is ready, and why (or why not).
fn readiness(broker: &Broker) -> (StatusCode, &'static str) {
    if broker.is_closing() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if !broker.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "catching up with the cluster metadata",
        )
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn metrics(State(a): State<Admin>) -> axum::response::Response {
    let limit = a.broker.config.metrics_partitions;
    let snapshot = match tokio::time::timeout(
        SCRAPE_WAIT,
        exposition::Snapshot::read(&a.broker, &a.groups, limit),
    )
    .await
    {
        Ok(s) => s,
        Err(_) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the cores did not answer within {SCRAPE_WAIT:?}\n"),
            )
                .into_response()
        }
    };
    match snapshot.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {e}\n"),
        )
            .into_response(),
    }
}
