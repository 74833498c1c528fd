//! One trace per grant, received and decoded by a real OTLP/HTTP endpoint in the test
//! (opentelemetry-proto + prost), with a canary, the agent token and the device code searched for
//! in every span attribute.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};
use tracing_subscriber::layer::SubscriberExt;

use crate::harness::{Backend, TestApp};
use crate::idp::{Login, TestIdp};
use crate::mcp_clients::connect;
use crate::runners::{Pki, TestRunner};

#[derive(Debug, Clone)]
pub(crate) struct ReceivedSpan {
    pub(crate) name: String,
    pub(crate) trace_id: String,
    pub(crate) span_id: String,
    pub(crate) parent_span_id: String,
    pub(crate) attributes: BTreeMap<String, String>,
}

pub(crate) type Metrics = Arc<Mutex<Vec<String>>>;

/// An OTLP/HTTP endpoint that decodes the traces and metrics it receives.
pub(crate) async fn receiver() -> (String, Arc<Mutex<Vec<ReceivedSpan>>>, Metrics) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let metrics: Metrics = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
    let metric_sink = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = metric_sink.clone();
                async move {
                    let request =
                        ExportMetricsServiceRequest::decode(body).expect("valid OTLP protobuf");
                    for resource in request.resource_metrics {
                        for scope in resource.scope_metrics {
                            sink.lock()
                                .unwrap()
                                .extend(scope.metrics.into_iter().map(|m| m.name));
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        )
        .route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let request =
                        ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                let attributes = span
                                    .attributes
                                    .iter()
                                    .map(|kv| {
                                        let value =
                                            match kv.value.as_ref().and_then(|v| v.value.clone()) {
                                                Some(AnyValue::StringValue(s)) => s,
                                                Some(AnyValue::IntValue(i)) => i.to_string(),
                                                Some(AnyValue::BoolValue(b)) => b.to_string(),
                                                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                                                other => format!("{other:?}"),
                                            };
                                        (kv.key.clone(), value)
                                    })
                                    .collect();
                                sink.lock().unwrap().push(ReceivedSpan {
                                    name: span.name,
                                    trace_id: hex::encode(&span.trace_id),
                                    span_id: hex::encode(&span.span_id),
                                    parent_span_id: hex::encode(&span.parent_span_id),
                                    attributes,
                                });
                            }
                        }
                    }
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            }),
        );
    // The receiver answers on its own thread: `Telemetry::shutdown` blocks the test's thread
    // while it flushes, and a receiver on that thread could not answer the last export.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await
            })
    });
    (format!("http://{addr}"), spans, metrics)
}

#[tokio::test(flavor = "current_thread")]
async fn a_grant_is_one_trace_without_secrets_sqlite() {
    one_trace_per_grant(Backend::Sqlite).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_grant_is_one_trace_without_secrets_postgres() {
    one_trace_per_grant(Backend::Postgres).await;
}

async fn call(client: &crate::mcp_clients::Client, tool: &'static str, args: Value) -> Value {
    let result = client
        .call_tool(
            CallToolRequestParams::new(tool).with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    assert_ne!(result.is_error, Some(true), "{tool}: {:?}", result.content);
    result.structured_content.unwrap()
}

async fn one_trace_per_grant(backend: Backend) {
    let (endpoint, spans, metrics) = receiver().await;
    let env = vec![("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint.clone())];
    let telemetry = custodian::telemetry::Telemetry::from_env(&env, "custodian").unwrap();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(telemetry.layer());
    // Everything below runs on this thread (current-thread runtime), so this default sees it all.
    let _guard = tracing::subscriber::set_default(subscriber);

    let Some(idp) = TestIdp::start(600) else {
        return;
    };
    let pki = Pki::new();
    let (cert, key) = pki.gateway();
    let instruments = custodian::metrics::Metrics::new(&telemetry.meter("custodian"));
    let Some(t) = TestApp::builder(backend)
        .runner_tls(&pki.ca(), &cert, &key)
        .metrics(instruments)
        .start()
        .await
    else {
        return;
    };
    let acme = t.tenant_with_idp("acme", &idp.issuer).await;
    t.environment(&acme, "staging", &[]).await;
    let canary = "otel-canary-value-5d2e";
    custodian::secrets::set(
        t.db(),
        &t.app.master_key,
        &acme,
        "staging",
        "API_KEY",
        canary.as_bytes(),
        1,
    )
    .await
    .unwrap();
    let Some(runner) = TestRunner::start(&pki.ca(), &pki.runner("acme", "r1"), "acme", "r1").await
    else {
        return;
    };
    custodian::runners::add(t.db(), &acme, "r1", "default", &runner.url, 1)
        .await
        .unwrap();
    let token = t.token(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;

    let grant = call(
        &client,
        "request_grant",
        json!({"environment": "staging", "purpose": "trace me"}),
    )
    .await;
    let id = grant["grant_id"].as_str().unwrap().to_owned();
    idp.approve(grant["user_code"].as_str().unwrap(), Login::as_("alice"))
        .await;
    for _ in 0..20 {
        if call(
            &client,
            "grant_status",
            json!({"grant_id": id, "wait_seconds": 5}),
        )
        .await["state"]
            == "active"
        {
            break;
        }
    }
    for _ in 0..2 {
        let ran = call(
            &client,
            "run",
            json!({"grant_id": id, "command": "echo $API_KEY"}),
        )
        .await;
        assert_eq!(ran["redactions"]["API_KEY"], 1);
    }
    call(&client, "revoke_grant", json!({"grant_id": id})).await;
    client.cancel().await.unwrap();
    t.stop().await;
    telemetry.shutdown();
    // The runner flushes its spans when it stops (SIGTERM).
    runner.stop(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let spans = spans.lock().unwrap().clone();
    let of_grant: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.attributes.get("custodian.grant.id") == Some(&id))
        .collect();
    let names: Vec<&str> = of_grant.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "grant.request",
        "grant.device_authorization",
        "grant.approved",
        "grant.exec",
        "grant.revoked",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert_eq!(
        names.iter().filter(|n| **n == "grant.exec").count(),
        2,
        "{names:?}"
    );
    let root = of_grant.iter().find(|s| s.name == "grant.request").unwrap();
    assert_eq!(root.parent_span_id, "", "grant.request is a root");
    // One trace: every span of the grant shares the root's trace id, and hangs under the root.
    for span in &of_grant {
        assert_eq!(
            span.trace_id, root.trace_id,
            "{} is in another trace",
            span.name
        );
        if span.name != "grant.request" {
            assert_eq!(
                span.parent_span_id, root.span_id,
                "{} is not under grant.request",
                span.name
            );
        }
    }
    let device = spans
        .iter()
        .find(|s| s.name == "grant.device_authorization")
        .unwrap();
    assert_eq!(
        (device.trace_id.as_str(), device.parent_span_id.as_str()),
        (root.trace_id.as_str(), root.span_id.as_str())
    );
    let approved = of_grant
        .iter()
        .find(|s| s.name == "grant.approved")
        .unwrap();
    assert_eq!(approved.attributes["enduser.id"], "alice@example.com");
    assert_eq!(
        approved.attributes["custodian.approver.groups"],
        "platform,developers"
    );
    assert_eq!(approved.attributes["custodian.tenant"], "acme");
    assert_eq!(approved.attributes["custodian.environment"], "staging");
    assert_eq!(approved.attributes["custodian.agent.name"], "codex");
    let exec = of_grant.iter().find(|s| s.name == "grant.exec").unwrap();
    assert_eq!(exec.attributes["custodian.exit_code"], "0");
    assert_eq!(
        exec.attributes["custodian.runner"],
        "spiffe://custodian.local/tenant/acme/runner/r1"
    );
    assert!(exec.attributes["custodian.redactions"].contains("\"API_KEY\":1"));

    // Metrics went out over OTLP too.
    let names = metrics.lock().unwrap().clone();
    for expected in [
        "custodian.grants",
        "custodian.grant.approval_latency",
        "custodian.exec.duration",
        "custodian.redactions",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // Nothing secret anywhere in what was exported.
    let everything = format!("{spans:?}");
    let mut forbidden = vec![canary.to_owned(), token.clone(), token[21..].to_owned()];
    forbidden.extend(idp.issued().await);
    for secret in forbidden {
        assert!(
            !everything.contains(&secret),
            "a secret was exported in a span"
        );
    }
}
