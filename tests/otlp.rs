//! Request spans over OTLP. Built with `--features otlp` (as the README's test command does),
//! a node exports a span per call to a small OTLP/gRPC receiver this test runs, with the method
//! and status code, under the service name `tern`. Built without it, `--otlp-endpoint` is
//! refused at start with the way to get it.

mod node_support;

#[cfg(not(feature = "otlp"))]
#[test]
fn without_the_feature_an_otlp_endpoint_is_refused_with_the_way_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(node_support::TERN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .args(["--otlp-endpoint", "http://127.0.0.1:4317"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--features otlp"), "{err}");
}

#[cfg(feature = "otlp")]
mod with_otlp {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use tern::proto::v1 as pb;

    use super::node_support::TestNode;

    #[derive(Clone, Default)]
    struct Receiver(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_call_is_a_span_at_the_collector() {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("http://{addr}");
        let node = TestNode::start(dir.path(), &["--otlp-endpoint", &endpoint]);
        let mut c = node.client().await;
        super::node_support::create_topic(&mut c, "traced", 1).await;
        c.publish(pb::PublishRequest {
            topic: "traced".into(),
            records: vec![super::node_support::rec(None, "v".into())],
            ..Default::default()
        })
        .await
        .expect("publish");
        let missing = c
            .describe_topic(pb::DescribeTopicRequest {
                name: "missing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(missing.code(), tonic::Code::NotFound);
        // A graceful stop flushes what the batch exporter holds.
        assert!(node.terminate().success());

        let deadline = Instant::now() + Duration::from_secs(20);
        let spans = loop {
            let got = receiver.0.lock().unwrap().clone();
            let spans: Vec<_> = got
                .iter()
                .flat_map(|r| r.resource_spans.iter())
                .flat_map(|rs| {
                    let resource = rs.resource.clone().unwrap_or_default();
                    rs.scope_spans
                        .iter()
                        .flat_map(|ss| ss.spans.iter())
                        .map(move |s| (resource.clone(), s.clone()))
                })
                .collect();
            if spans.iter().any(|(_, s)| s.name == "tern.v1.Tern/Publish")
                || Instant::now() > deadline
            {
                break spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let find = |name: &str| {
            spans
                .iter()
                .find(|(_, s)| s.name == name)
                .unwrap_or_else(|| {
                    panic!(
                        "no span {name}; got {:?}",
                        spans.iter().map(|(_, s)| &s.name).collect::<Vec<_>>()
                    )
                })
        };
        let (resource, publish) = find("tern.v1.Tern/Publish");
        assert_eq!(
            attr(&resource.attributes, "service.name"),
            Some(&Value::StringValue("tern".into()))
        );
        assert_eq!(
            attr(&resource.attributes, "service.instance.id"),
            Some(&Value::StringValue("1".into()))
        );
        assert_eq!(
            attr(&publish.attributes, "rpc.method"),
            Some(&Value::StringValue("Publish".into()))
        );
        assert_eq!(
            attr(&publish.attributes, "rpc.grpc.status_code"),
            Some(&Value::IntValue(0))
        );
        assert!(publish.end_time_unix_nano >= publish.start_time_unix_nano);
        let (_, describe) = find("tern.v1.Tern/DescribeTopic");
        assert_eq!(
            attr(&describe.attributes, "rpc.grpc.status_code"),
            Some(&Value::IntValue(5)),
            "NOT_FOUND"
        );
        find("tern.v1.Tern/CreateTopic");
        server.abort();
    }
}
