//! `aipipe serve` exporting traces over OTLP/HTTP to a receiver built on the OTLP protobuf
//! definitions: one call's span tree, its GenAI attributes, the caller's `traceparent`
//! honoured, and the trace id the telemetry row's.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use pipeline_core::telemetry::{TelemetryStore, W3cTraceId};
use prost::Message as _;
use reqwest::header::CONTENT_TYPE;
use serde_json::json;
use testkit::{GatewayProcess, Reply, ScriptedUpstream};

const KEY: &str = "sk-aipipe-test-otlp";
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Every span the receiver got, as the collector would store them.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

impl Received {
    async fn start(&self) -> String {
        let spans = self.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let spans = spans.clone();
                async move {
                    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                    for resource in request.resource_spans {
                        let service = resource.resource.iter().flat_map(|resource| &resource.attributes).any(|kv| {
                            kv.key == "service.name"
                                && matches!(&kv.value.as_ref().and_then(|v| v.value.clone()), Some(AnyValue::StringValue(name)) if name == "aipipe")
                        });
                        assert!(service, "the resource names the service");
                        for scope in resource.scope_spans {
                            spans.0.lock().unwrap().extend(scope.spans);
                        }
                    }
                    ([(CONTENT_TYPE, "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{address}")
    }

    /// The spans of trace `trace_id` once its call's span has arrived.
    async fn trace(&self, trace_id: &str) -> Vec<Span> {
        let started = Instant::now();
        loop {
            let spans: Vec<Span> =
                self.0.lock().unwrap().iter().filter(|span| hex(&span.trace_id) == trace_id).cloned().collect();
            if spans.iter().any(|span| span.name == "gateway.request") {
                return spans;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "no trace {trace_id} exported");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(text) => text.clone(),
                AnyValue::IntValue(number) => number.to_string(),
                AnyValue::DoubleValue(number) => number.to_string(),
                AnyValue::BoolValue(flag) => flag.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    spans
        .iter()
        .find(|span| span.name == name)
        .unwrap_or_else(|| panic!("no span `{name}` in {:?}", spans.iter().map(|span| &span.name).collect::<Vec<_>>()))
}

fn children<'a>(spans: &'a [Span], parent: &Span) -> Vec<&'a str> {
    spans.iter().filter(|span| span.parent_span_id == parent.span_id).map(|span| span.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_exports_its_span_tree_in_the_callers_trace_with_the_rows_trace_id() {
    let received = Received::default();
    let collector = received.start().await;
    let upstream = ScriptedUpstream::start().await.unwrap();
    // One 429 with a Retry-After of 300 ms, for the call that asks about a storm; else answers.
    let throttled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    upstream.respond_with(move |request| {
        let storm = request["messages"][0]["content"].as_str().is_some_and(|text| text.contains("storm"));
        if storm && !throttled.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Reply::rate_limited_for(Duration::from_millis(300))
        } else {
            Reply::completion_with_usage("Paris.", 12, 3)
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("telemetry.db");
    let config = format!(
        "[semantic]\nenabled = false\n[telemetry]\ndatabase_url = \"sqlite://{}\"\notlp_endpoint = \"{collector}\"\n\
         [gateway.api_keys]\nteam-a = \"OTLP_TEST_KEY\"\n",
        database.display()
    );
    let env = [("OTLP_TEST_KEY", KEY), ("OPENAI_API_KEY", "sk-upstream")];
    let binary = Path::new(env!("CARGO_BIN_EXE_aipipe"));
    let mut gateway = GatewayProcess::start(binary, dir.path(), &upstream.base_url(), &config, &env).unwrap();
    let http = reqwest::Client::new();
    let ask = |question: &str, traceparent: Option<String>| {
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}]});
        let mut request = gateway.chat(&http, KEY, &body);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        request.send()
    };

    // 1. A caller in a trace of its own: the gateway's span is a child of the caller's.
    let response = ask("Capital of France?", Some(format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"))).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-aipipe-trace-id"], CALLER_TRACE, "the call's id is the trace's");
    let spans = received.trace(CALLER_TRACE).await;
    let request = named(&spans, "gateway.request");
    assert_eq!(hex(&request.parent_span_id), CALLER_SPAN);
    let call = named(&spans, "aipipe.call");
    assert_eq!(call.parent_span_id, request.span_id);
    // The stages are the call's children; an upstream attempt holds its guards' waits, and
    // none waited here.
    let stages = children(&spans, call);
    for stage in ["cache.lookup", "upstream.attempt"] {
        assert!(stages.contains(&stage), "{stage} is not a child of the call: {stages:?}");
    }
    let attempt = named(&spans, "upstream.attempt");
    assert!(children(&spans, attempt).is_empty(), "{:?}", children(&spans, attempt));
    assert_eq!(attempt.kind, 3, "a client span: a request to the model's provider");
    assert_eq!(request.kind, 2, "a server span");
    // OpenTelemetry's GenAI attributes, and aipipe's own.
    let attempt = attributes(attempt);
    assert_eq!(attempt["gen_ai.system"], "openai");
    assert_eq!(attempt["gen_ai.operation.name"], "chat");
    assert_eq!(attempt["gen_ai.request.model"], "gpt-4o-mini");
    assert_eq!(attempt["gen_ai.response.model"], "gpt-4o-mini");
    assert_eq!(attempt["gen_ai.usage.input_tokens"], "12");
    assert_eq!(attempt["gen_ai.usage.output_tokens"], "3");
    assert_eq!(attempt["gen_ai.response.finish_reasons"], "stop");
    let call = attributes(call);
    assert_eq!(call["aipipe.source"], "upstream");
    assert_eq!(call["aipipe.workspace"], "team-a");
    assert_eq!(call["aipipe.step"], "chat");
    assert!(call.contains_key("aipipe.confidence"), "{call:?}");
    assert_eq!(call["gen_ai.usage.input_tokens"], "12");

    // 2. A caller without a trace: the exported trace's id is the row's.
    let response = ask("Capital of Italy?", None).await.unwrap();
    let trace_id = response.headers()["x-aipipe-trace-id"].to_str().unwrap().to_owned();
    let spans = received.trace(&trace_id).await;
    assert!(named(&spans, "gateway.request").parent_span_id.is_empty(), "a root span");
    let call = attributes(named(&spans, "aipipe.call"));
    assert!(!call.contains_key("aipipe.trace_id"), "the row's id is the trace's: no attribute repeats it");

    // 3. A caller's id of its own: its trace is derived from it, and the call's span names it.
    let mut request = gateway.chat(
        &http,
        KEY,
        &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Capital of Peru?"}]}),
    );
    request = request.header("x-aipipe-trace-id", "order-1234");
    assert_eq!(request.send().await.unwrap().status(), 200);
    let derived = W3cTraceId::of("order-1234").to_string();
    let spans = received.trace(&derived).await;
    assert_eq!(attributes(named(&spans, "aipipe.call"))["aipipe.trace_id"], "order-1234");

    // 4. A caller whose trace is not sampled: nothing of it is exported. Spans leave in the
    //    order they end, so once the next call's trace has arrived, this one would have.
    const UNSAMPLED: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    let response = ask("Capital of Chile?", Some(format!("00-{UNSAMPLED}-{CALLER_SPAN}-00"))).await.unwrap();
    assert_eq!(response.status(), 200);
    let after = ask("Capital of Japan?", None).await.unwrap();
    received.trace(after.headers()["x-aipipe-trace-id"].to_str().unwrap()).await;
    assert!(
        received.0.lock().unwrap().iter().all(|span| hex(&span.trace_id) != UNSAMPLED),
        "an unsampled trace was exported"
    );

    // 5. A call that meets a Retry-After pause: its attempt's wait is a child span.
    let (storm, during) = tokio::join!(ask("A storm is coming?", None), async {
        // Sent once the 429 has gone back to the gateway, well within its 300 ms pause.
        let started = Instant::now();
        while !upstream.exchanges().iter().any(|exchange| exchange.status == 429 && exchange.answered.is_some()) {
            assert!(started.elapsed() < Duration::from_secs(10), "the 429 was never sent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        ask("Capital of Spain?", None).await
    });
    assert_eq!(storm.unwrap().status(), 200);
    let during = during.unwrap();
    assert_eq!(during.status(), 200);
    let paused_trace = during.headers()["x-aipipe-trace-id"].to_str().unwrap().to_owned();
    let spans = received.trace(&paused_trace).await;
    let attempt = named(&spans, "upstream.attempt");
    assert_eq!(children(&spans, attempt), ["limit.pause"]);
    let pause = named(&spans, "limit.pause");
    let waited_ns = pause.end_time_unix_nano - pause.start_time_unix_nano;
    assert!(waited_ns > 100_000_000, "the pause span lasted {waited_ns} ns");

    // 6. A request refused before the engine: its row and its request span share a trace.
    let refused = http
        .post(format!("{}/chat/completions", gateway.base_url))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);

    gateway.terminate().unwrap();
    assert!(gateway.wait().unwrap().success());
    let store = TelemetryStore::connect(&format!("sqlite://{}", database.display())).await.unwrap();
    let records = store.records().await.unwrap();
    let refused_trace = records.last().unwrap().trace_id.clone();
    let spans = received.trace(&refused_trace).await;
    let request = attributes(named(&spans, "gateway.request"));
    assert_eq!(request["http.response.status_code"], "400");
    assert!(spans.iter().all(|span| span.name == "gateway.request"), "no call was made");
    let rows: Vec<String> = records.into_iter().map(|record| record.trace_id).collect();
    assert_eq!(rows.len(), 8);
    assert_eq!(rows[..2], [CALLER_TRACE.to_owned(), trace_id]);
    assert!(rows.contains(&paused_trace));
}
