//! The gRPC edge, on the network shard (a tokio runtime): tonic services that decode and
//! validate each call, hand it to the node's context (`broker`), the `controller` or the
//! `groups`, and turn their typed errors into statuses (`status.rs`, the one place). It also
//! serves gRPC server reflection (grpcurl needs no .proto file) and the standard health
//! service.
//!
//! ```text
//! net/
//!   mod.rs        the server: services, limits, the request-size answer
//!   service/      tern.v1.Tern, call by call
//!   compat/       the seeds' broker.Broker services, made of tern.v1 calls
//!   rest/         the REST API (HTTP/1.1, JSON, problems), made of tern.v1 calls
//!   call.rs       the caller, carried into those tern.v1 calls
//!   subscribe.rs  Subscribe streams (a follower per partition)
//!   auth.rs       who is calling (token, client certificate, forwarding node) and may they
//!   quota.rs      per-principal rates: slowed, then RESOURCE_EXHAUSTED
//!   peer.rs       tern.internal.v1.Peer: Raft traffic and proposals from other nodes
//!   validate.rs   client input, bounded and checked
//!   status.rs     every error as a gRPC status
//!   timed.rs      each call's latency by method and code (metrics)
//! ```

pub mod auth;
mod call;
mod compat;
mod peer;
pub mod quota;
mod rest;
mod service;
pub mod status;
mod subscribe;
mod timed;
mod validate;

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::broker::Broker;
use crate::groups::Groups;
use service::TernService;

use crate::proto::seed::broker_server::BrokerServer as SeedServer;
use crate::proto::thesis::broker_server::BrokerServer as ThesisServer;
use crate::proto::v1::tern_server::TernServer;

/// Serves the gRPC API on `listener` until `shutdown` resolves, then lets in-flight calls
/// finish (subscriptions are ended by the broker's closing signal).
///
/// `compat`, when given, serves the Raft seeds' `broker.Broker` (`compat::seed`) beside it.
pub async fn serve(
    broker: Arc<Broker>,
    groups: Arc<Groups>,
    auth: Arc<auth::Auth>,
    listener: TcpListener,
    compat: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let cfg = broker.config.clone();
    let tls = broker.tls.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TernServer<TernService>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(crate::proto::THESIS_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let peer = crate::proto::internal::peer_server::PeerServer::new(peer::PeerService {
        broker: broker.clone(),
    })
    .max_decoding_message_size(crate::raft::transport::MAX_MESSAGE_BYTES)
    .max_encoding_message_size(crate::raft::transport::MAX_MESSAGE_BYTES);
    let service = Arc::new(TernService {
        broker: broker.clone(),
        groups,
        auth,
    });
    let tern = TernServer::from_arc(service.clone())
        .max_decoding_message_size(cfg.max_request_bytes)
        .max_encoding_message_size(cfg.max_request_bytes.max(32 << 20));
    let thesis = ThesisServer::new(compat::thesis::ThesisService {
        tern: service.clone(),
    })
    .max_decoding_message_size(cfg.max_request_bytes);
    let seed = compat.map(|listener| {
        tokio::spawn(serve_seed(
            service.clone(),
            health_service.clone(),
            listener,
            shutdown.clone(),
        ))
    });
    let limit = cfg.max_request_bytes;
    // Both versions of reflection: grpcurl speaks v1, grpcio-reflection (1.85) and many other
    // clients still only v1alpha. REST (HTTP/1.1) shares the port: gRPC calls go by their
    // service's path, the rest to the REST routes or their fallback.
    let grpc = tonic::service::Routes::new(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(tern)
        .add_service(thesis)
        .add_service(peer);
    let routes = tonic::service::Routes::from(
        grpc.into_axum_router()
            .merge(rest::router(service))
            .fallback(rest::fallback),
    );
    tonic::transport::Server::builder()
        .accept_http1(true)
        .max_concurrent_streams(Some(cfg.max_concurrent_streams))
        .tcp_nodelay(true)
        .layer(timed::TimedLayer)
        .layer(tower::util::MapResponseLayer::new(
            move |r: tonic::codegen::http::Response<tonic::body::Body>| match r
                .extensions()
                .get::<tonic::Status>(
            ) {
                Some(s) if status::is_over_limit(s) => {
                    status::request_too_large(s, limit).into_http()
                }
                _ => r,
            },
        ))
        .add_routes(routes)
        // Our own accept loop (crate::tls): TLS handshakes off the loop, reloadable
        // certificates, a connection limit, and Nagle off (tonic's `tcp_nodelay` applies only
        // to listeners it creates; without it, small streamed responses waited for delayed
        // ACKs: end-to-end p50 was 18 ms at 1,000 records/s).
        .serve_with_incoming_shutdown(
            crate::tls::incoming(listener, tls, cfg.max_connections),
            shutdown,
        )
        .await?;
    if let Some(seed) = seed {
        seed.await??;
    }
    Ok(())
}

/// Serves the Raft seeds' `broker.Broker` on its own listener (its method paths are the thesis
/// service's), with reflection of its own and the health service, until `shutdown`.
async fn serve_seed<H: tonic_health::pb::health_server::Health>(
    tern: Arc<TernService>,
    health: tonic_health::pb::health_server::HealthServer<H>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let cfg = tern.broker.config.clone();
    let tls = tern.broker.tls.clone();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::SEED_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let seed = SeedServer::new(compat::seed::SeedService { tern })
        .max_decoding_message_size(cfg.max_request_bytes);
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(cfg.max_concurrent_streams))
        .layer(timed::TimedLayer)
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(seed)
        .serve_with_incoming_shutdown(
            crate::tls::incoming(listener, tls, cfg.max_connections),
            shutdown,
        )
        .await?;
    Ok(())
}
