//! `aipipe serve`, the process, called over HTTP the way the OpenAI SDKs call it, in front of
//! a scripted upstream.
use std::path::Path;
use std::time::Duration;

use pipeline_core::telemetry::TelemetryStore;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::{Value, json};
use testkit::{GatewayProcess, Reply, ScriptedUpstream};

const KEY_A: &str = "sk-aipipe-test-workspace-a";
const KEY_B: &str = "sk-aipipe-test-workspace-b";
const ADMIN: &str = "sk-aipipe-test-admin";

/// `aipipe serve` for two workspaces, with an HTTP client.
struct Gateway {
    process: GatewayProcess,
    base_url: String,
    http: reqwest::Client,
}

impl Gateway {
    fn start(dir: &Path, upstream: &ScriptedUpstream, extra_config: &str) -> Self {
        let config = format!(
            "[semantic]\nenabled = false\n[telemetry]\ndatabase_url = \"sqlite://{}\"\n\
             [gateway.api_keys]\nteam-a = \"GATEWAY_TEST_KEY_A\"\nteam-b = \"GATEWAY_TEST_KEY_B\"\n{extra_config}",
            dir.join("telemetry.db").display()
        );
        let env = [
            ("GATEWAY_TEST_KEY_A", KEY_A),
            ("GATEWAY_TEST_KEY_B", KEY_B),
            ("OPENAI_API_KEY", "sk-upstream"),
            ("AIPIPE_GATEWAY__ADMIN_KEY_ENV", "GATEWAY_TEST_ADMIN"),
            ("GATEWAY_TEST_ADMIN", ADMIN),
        ];
        let process =
            GatewayProcess::start(Path::new(env!("CARGO_BIN_EXE_aipipe")), dir, &upstream.base_url(), &config, &env)
                .unwrap();
        let base_url = process.base_url.clone();
        Self { process, base_url, http: reqwest::Client::new() }
    }

    /// An admin surface (`/metrics`, `/status`, `/readyz`), with the admin key.
    async fn admin_get(&self, path: &str) -> reqwest::Response {
        let root = self.base_url.trim_end_matches("/v1");
        self.http.get(format!("{root}{path}")).header(AUTHORIZATION, format!("Bearer {ADMIN}")).send().await.unwrap()
    }

    async fn post(&self, key: Option<&str>, headers: &[(&str, &str)], body: &Value) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/chat/completions", self.base_url))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
        if let Some(key) = key {
            request = request.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    fn terminate(&self) {
        self.process.terminate().unwrap();
    }
}

async fn json_body(response: reqwest::Response) -> Value {
    serde_json::from_str(&response.text().await.unwrap()).unwrap()
}

fn chat(content: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": content}]})
}

fn assert_openai_error(body: &Value, code: &str) {
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body}");
    assert!(error["message"].as_str().is_some_and(|message| !message.is_empty()), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_clients_get_openai_answers() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|request| {
        let question = request["messages"][1]["content"].as_str().unwrap_or_default();
        Reply::completion_with_usage(format!("echo: {question}"), 12, 3)
    });
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(dir.path(), &upstream, "");

    // Non-streaming: the caller's messages reach the upstream as they are, without JSON mode.
    // Traces are not exported here, yet a caller's W3C trace still names the call's row.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
    let headers = [("x-aipipe-component", "docs-bot"), ("traceparent", traceparent.as_str())];
    let response = gateway.post(Some(KEY_A), &headers, &chat("Capital of France?")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-aipipe-source"], "upstream");
    assert_eq!(response.headers()["x-aipipe-trace-id"], caller_trace);
    let body = json_body(response).await;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["message"]["content"], "echo: Capital of France?");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"], json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}));
    let sent = &upstream.received()[0];
    assert_eq!(sent["messages"], chat("Capital of France?")["messages"]);
    assert!(sent.get("response_format").is_none(), "{sent}");

    // The same question again: the exact cache, for that workspace only.
    let again = gateway.post(Some(KEY_A), &[], &chat("Capital of France?")).await;
    assert_eq!(again.headers()["x-aipipe-source"], "exact");
    // The answer's usage as its model counted it; this call itself cost nothing.
    assert_eq!(again.headers()["x-aipipe-cost-usd"], "0.00000000");
    assert_eq!(json_body(again).await["usage"]["total_tokens"], 15);
    let other_workspace = gateway.post(Some(KEY_B), &[], &chat("Capital of France?")).await;
    assert_eq!(other_workspace.headers()["x-aipipe-source"], "upstream");
    assert_eq!(upstream.requests(), 2);

    // Streaming, with usage: server-sent events that rebuild the same answer, then [DONE].
    let mut streaming = chat("Capital of Italy?");
    streaming["stream"] = json!(true);
    streaming["stream_options"] = json!({"include_usage": true});
    let response = gateway.post(Some(KEY_A), &[], &streaming).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()[CONTENT_TYPE], "text/event-stream");
    let text = response.text().await.unwrap();
    let events: Vec<&str> = text.lines().filter_map(|line| line.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|event| serde_json::from_str(event).unwrap()).collect();
    assert!(chunks.iter().all(|chunk| chunk["object"] == "chat.completion.chunk"));
    let content: String = chunks.iter().filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "echo: Capital of Italy?");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().any(|chunk| chunk["choices"][0]["finish_reason"] == "stop"));
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 15);
    // The same, streamed from the cache: the same usage, not zeros.
    let cached = gateway.post(Some(KEY_A), &[], &streaming).await.text().await.unwrap();
    let last_chunk = cached.lines().filter_map(|line| line.strip_prefix("data: ")).rev().nth(1).unwrap();
    assert_eq!(serde_json::from_str::<Value>(last_chunk).unwrap()["usage"]["total_tokens"], 15, "{cached}");

    // A structured step through the same endpoint: its input in the last user message.
    upstream.respond_with(|_| Reply::completion(r#"{"label": "billing", "confidence": 0.9}"#));
    let classify = json!({"model": "gpt-4o-mini", "messages": [{"role": "user",
        "content": r#"{"text": "I was charged twice", "labels": ["billing", "bug"]}"#}]});
    let response = gateway.post(Some(KEY_A), &[("x-aipipe-step", "classifier")], &classify).await;
    assert_eq!(response.status(), 200);
    let content = json_body(response).await["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert_eq!(serde_json::from_str::<Value>(&content).unwrap()["label"], "billing");

    // Models, health, readiness and metrics.
    let models = gateway
        .http
        .get(format!("{}/models", gateway.base_url))
        .header(AUTHORIZATION, format!("Bearer {KEY_B}"))
        .send()
        .await
        .unwrap();
    let models = json_body(models).await;
    assert_eq!(models["object"], "list");
    assert!(models["data"].as_array().unwrap().iter().any(|model| model["id"] == "gpt-4o-mini"), "{models}");
    let root = gateway.base_url.trim_end_matches("/v1");
    for path in ["/healthz", "/readyz"] {
        assert_eq!(gateway.http.get(format!("{root}{path}")).send().await.unwrap().status(), 200, "{path}");
    }
    // Metrics are the operator's: without the admin key, refused.
    let refused = gateway.http.get(format!("{root}/metrics")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let metrics = gateway.admin_get("/metrics").await;
    let content_type = metrics.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("aipipe_requests_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_and_bad_requests_get_openai_errors() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| Reply::completion("fine"));
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(dir.path(), &upstream, "");

    for key in [None, Some("sk-wrong")] {
        let response = gateway.post(key, &[], &chat("hello")).await;
        assert_eq!(response.status(), 401, "{key:?}");
        assert_openai_error(&json_body(response).await, "invalid_api_key");
    }
    let unsupported =
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "logprobs": true});
    let response = gateway.post(Some(KEY_A), &[], &unsupported).await;
    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert_openai_error(&body, "invalid_request");
    assert_eq!(body["error"]["param"], "logprobs");
    let not_json = gateway
        .http
        .post(format!("{}/chat/completions", gateway.base_url))
        .header(AUTHORIZATION, format!("Bearer {KEY_A}"))
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    assert_openai_error(&json_body(not_json).await, "invalid_request");
    let unknown_step = gateway.post(Some(KEY_A), &[("x-aipipe-step", "translator")], &chat("hi")).await;
    assert_eq!(unknown_step.status(), 400);
    assert_openai_error(&json_body(unknown_step).await, "unknown_step");
    assert_eq!(upstream.requests(), 0, "nothing wrong reaches the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_caller_gets_429_with_retry_after() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| Reply::completion("fine"));
    let dir = tempfile::tempdir().unwrap();
    let limits = "[limits]\nworkspace_requests_per_minute = 1\nworkspace_request_burst = 1\n";
    let gateway = Gateway::start(dir.path(), &upstream, limits);

    let first = gateway.post(Some(KEY_A), &[], &chat("one")).await;
    assert_eq!(first.status(), 200);
    let second = gateway.post(Some(KEY_A), &[("x-aipipe-deadline-ms", "300")], &chat("two")).await;
    assert_eq!(second.status(), 429);
    let retry_after: u64 = second.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert_openai_error(&json_body(second).await, "rate_limit_exceeded");
    // The limit is per workspace: another one is not held back.
    assert_eq!(gateway.post(Some(KEY_B), &[], &chat("three")).await.status(), 200);

    // The upstream's own 429 comes back as a 429 too, once the engine's retries give up.
    upstream.respond_with(|_| Reply::rate_limited(30));
    let response = gateway.post(Some(KEY_B), &[("x-aipipe-deadline-ms", "500")], &chat("four")).await;
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    assert_openai_error(&json_body(response).await, "rate_limit_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_calls_in_flight_and_flushes_telemetry() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| Reply::slow(Duration::from_millis(800), Reply::completion("late but whole")));
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = Gateway::start(dir.path(), &upstream, "");

    let in_flight = {
        let (http, url) = (gateway.http.clone(), format!("{}/chat/completions", gateway.base_url));
        tokio::spawn(async move {
            http.post(url).header(AUTHORIZATION, format!("Bearer {KEY_A}")).body(chat("slow").to_string()).send().await
        })
    };
    while upstream.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway.terminate();
    let response = in_flight.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(json_body(response).await["choices"][0]["message"]["content"], "late but whole");
    let status = tokio::task::spawn_blocking(move || gateway.process.wait().unwrap()).await.unwrap();
    assert!(status.success(), "{status:?}");
    let store = TelemetryStore::connect(dir.path().join("telemetry.db").to_str().unwrap()).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 1, "the drained call's row was written before exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_mid_call_still_leaves_its_row_its_charge_and_its_answer() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    // 5,000 output tokens of gpt-4o-mini cost $0.003: the whole of team-a's daily budget.
    upstream.respond_with(|_| Reply::slow(Duration::from_millis(600), Reply::completion_with_usage("Paris", 20, 5000)));
    let dir = tempfile::tempdir().unwrap();
    let budget = "[budgets]\non_budget = \"reject\"\n[budgets.workspaces]\nteam-a = 0.003\n";
    let gateway = Gateway::start(dir.path(), &upstream, budget);

    // The client gives up while the upstream is still writing the answer.
    let hung_up = gateway
        .http
        .post(format!("{}/chat/completions", gateway.base_url))
        .header(AUTHORIZATION, format!("Bearer {KEY_A}"))
        .header(CONTENT_TYPE, "application/json")
        .body(chat("Capital of France?").to_string())
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(hung_up.is_err_and(|err| err.is_timeout()));
    // The answer it paid for is kept: the next caller gets it from the cache.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let again = gateway.post(Some(KEY_A), &[], &chat("Capital of France?")).await;
    assert_eq!(again.headers()["x-aipipe-source"], "exact");
    // And it was charged: the workspace's budget is spent.
    let spent = gateway.post(Some(KEY_A), &[], &chat("Capital of Spain?")).await;
    assert_eq!(spent.status(), 429);
    assert_openai_error(&json_body(spent).await, "budget_exhausted");
    assert_eq!(upstream.requests(), 1);
    gateway.terminate();
    let mut gateway = gateway;
    assert!(gateway.process.wait().unwrap().success());
    let store = TelemetryStore::connect(dir.path().join("telemetry.db").to_str().unwrap()).await.unwrap();
    let rows = store.records().await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    // The abandoned call's row, with what it cost.
    assert_eq!(rows[0].source, pipeline_core::telemetry::Source::Upstream);
    assert_eq!((rows[0].input_tokens, rows[0].output_tokens), (20, 5000));
    assert!(rows[0].cost_usd > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_off_at_max_tokens_says_so_and_is_not_served_again() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| Reply::Truncated("The capital of France is".into()));
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(dir.path(), &upstream, "");
    let mut request = chat("Capital of France?");
    request["max_tokens"] = json!(5);

    let first = json_body(gateway.post(Some(KEY_A), &[], &request).await).await;
    assert_eq!(first["choices"][0]["finish_reason"], "length", "{first}");
    // A cut answer is not kept: the next caller may have a larger budget.
    let again = gateway.post(Some(KEY_A), &[], &request).await;
    assert_eq!(again.headers()["x-aipipe-source"], "upstream");
    assert_eq!(json_body(again).await["choices"][0]["finish_reason"], "length");
    request["stream"] = json!(true);
    let text = gateway.post(Some(KEY_A), &[], &request).await.text().await.unwrap();
    assert!(text.contains(r#""finish_reason":"length""#), "{text}");
    assert_eq!(upstream.requests(), 3);
}

/// Every row of the gateway's telemetry file, as text.
async fn rows_as_text(dir: &Path) -> Vec<String> {
    let store = TelemetryStore::connect(dir.join("telemetry.db").to_str().unwrap()).await.unwrap();
    let rows = store.records().await.unwrap();
    store.close().await;
    rows.iter().map(|row| format!("{row:?}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_the_engine_leave_a_trace_and_labels_stay_bounded() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| Reply::completion("fine"));
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(dir.path(), &upstream, "[gateway]\nmax_body_bytes = 2000\n");

    // The scheme of the Authorization header is case-insensitive.
    let lower = gateway
        .http
        .post(format!("{}/chat/completions", gateway.base_url))
        .header(AUTHORIZATION, format!("bearer {KEY_A}"))
        .header(CONTENT_TYPE, "application/json")
        .body(chat("hello").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);

    // Refused before the engine: no key, a wrong key, not JSON, a parameter it cannot honour,
    // a header it cannot read, a body over the limit.
    assert_eq!(gateway.post(None, &[], &chat("hello")).await.status(), 401);
    assert_eq!(gateway.post(Some("sk-wrong"), &[], &chat("hello")).await.status(), 401);
    let unsupported = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "n": 3});
    assert_eq!(gateway.post(Some(KEY_A), &[], &unsupported).await.status(), 400);
    assert_eq!(gateway.post(Some(KEY_A), &[("x-aipipe-cache", "sometimes")], &chat("hi")).await.status(), 400);
    let huge = chat(&"x".repeat(5000));
    assert_eq!(gateway.post(Some(KEY_A), &[], &huge).await.status(), 413);
    // Refused by the engine: a step no config declares.
    assert_eq!(gateway.post(Some(KEY_A), &[("x-aipipe-step", "nope")], &chat("hi")).await.status(), 400);

    // A wrong method or path says what to use, in OpenAI's shape, whatever the route.
    let get = gateway.http.get(format!("{}/chat/completions", gateway.base_url)).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST");
    assert_openai_error(&json_body(get).await, "method_not_allowed");
    let delete = gateway
        .http
        .delete(format!("{}/models", gateway.base_url))
        .header(AUTHORIZATION, format!("Bearer {KEY_A}"))
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 405);
    assert_eq!(delete.headers()["allow"], "GET");
    assert_openai_error(&json_body(delete).await, "method_not_allowed");
    let nowhere = gateway
        .http
        .post(format!("{}/completions", gateway.base_url))
        .header(AUTHORIZATION, format!("Bearer {KEY_A}"))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    assert_openai_error(&json_body(nowhere).await, "not_found");

    // /v1/models lists what the gateway can reach, not every priced model.
    let models = gateway
        .http
        .get(format!("{}/models", gateway.base_url))
        .header(AUTHORIZATION, format!("Bearer {KEY_A}"))
        .send()
        .await
        .unwrap();
    let models = json_body(models).await;
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gpt-4o-mini"], "{models}");

    let metrics = gateway.admin_get("/metrics").await.text().await.unwrap();
    assert!(!metrics.contains("nope"), "a caller's step name is no label: {metrics}");
    assert!(metrics.contains(r#"step="unknown""#), "{metrics}");
    // Requests without a workspace's key are counted, never written: a flood of bad keys
    // must not crowd out real rows.
    assert!(metrics.contains("aipipe_requests_unauthenticated_total 3"), "{metrics}");
    gateway.terminate();
    let mut gateway = gateway;
    assert!(gateway.process.wait().unwrap().success());
    let rows = rows_as_text(dir.path()).await;
    assert_eq!(rows.len(), 7, "one row per request with a workspace's key, refused or not: {rows:#?}");
    assert!(rows.iter().all(|row| row.contains("workspace: \"team-a\"")), "{rows:#?}");
    for (class, count) in [("Unauthenticated", 0), ("InvalidRequest", 4), ("RequestTooLarge", 1), ("UnknownStep", 1)] {
        assert_eq!(
            rows.iter().filter(|row| row.contains(&format!("error_class: Some({class})"))).count(),
            count,
            "{class}"
        );
    }
    assert!(rows.iter().all(|row| !row.contains("xxxxxxxxxx")), "no body is kept");
    assert_eq!(upstream.requests(), 1, "nothing refused reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_echoes_its_key_leaks_it_nowhere() {
    const UPSTREAM_KEY: &str = "upstream-key-not-shaped-like-one-7f3a";
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(Reply::EchoKey(401));
    upstream.push(Reply::EchoKey(500));
    upstream.respond_with(|_| Reply::EchoKey(500));
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("semantic.snapshot");
    let db = dir.path().join("telemetry.db");
    let config = format!(
        "[telemetry]\ndatabase_url = \"sqlite://{}\"\n[semantic]\nsnapshot_path = \"{}\"\n\
         [gateway.api_keys]\nteam-a = \"GATEWAY_TEST_KEY_A\"\n",
        db.display(),
        snapshot.display()
    );
    let stderr = dir.path().join("stderr.log");
    let process = testkit::GatewayProcess::start_logging(
        Path::new(env!("CARGO_BIN_EXE_aipipe")),
        dir.path(),
        &upstream.base_url(),
        &config,
        &[("GATEWAY_TEST_KEY_A", KEY_A), ("OPENAI_API_KEY", UPSTREAM_KEY), ("RUST_LOG", "trace")],
        &stderr,
    )
    .unwrap();
    let gateway = Gateway { base_url: process.base_url.clone(), process, http: reqwest::Client::new() };
    let mut bodies = Vec::new();
    for (step, deadline) in [("chat", "3000"), ("chat", "3000"), ("classifier", "3000")] {
        let body = if step == "chat" { chat("hi") } else { chat(r#"{"text": "refund", "labels": ["a"]}"#) };
        let response =
            gateway.post(Some(KEY_A), &[("x-aipipe-step", step), ("x-aipipe-deadline-ms", deadline)], &body).await;
        let head = format!("{} {:?}", response.status(), response.headers());
        bodies.push(format!("{head} {}", response.text().await.unwrap()));
    }
    let metrics = gateway.admin_get("/metrics").await.text().await.unwrap();
    assert!(upstream.received().len() >= 3, "the upstream was asked");
    gateway.terminate();
    let mut gateway = gateway;
    assert!(gateway.process.wait().unwrap().success());

    assert!(bodies.iter().any(|body| body.contains("Incorrect API key provided")), "{bodies:?}");
    let sinks = [
        ("response bodies", bodies.join("\n")),
        ("stderr at trace level", std::fs::read_to_string(&stderr).unwrap()),
        ("telemetry rows", rows_as_text(dir.path()).await.join("\n")),
        ("metrics", metrics),
        ("semantic snapshot", String::from_utf8_lossy(&std::fs::read(&snapshot).unwrap_or_default()).into_owned()),
    ];
    for (sink, text) in &sinks {
        assert!(!text.is_empty() || *sink == "semantic snapshot", "{sink} is empty");
        assert!(!text.contains(UPSTREAM_KEY), "the upstream key reached the {sink}");
        assert!(!text.contains(KEY_A), "the workspace key reached the {sink}");
    }
    assert!(sinks[2].1.contains("[secret]"), "the rows say something was masked: {}", sinks[2].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_declaring_600_a_minute_is_kept_under_and_callers_over_it_hear_429_at_once() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| Reply::completion("fine"));
    upstream.enforce_limit(600);
    let dir = tempfile::tempdir().unwrap();
    // The shipped defaults: no limits of the gateway's own, max_wait 500 ms.
    let gateway = std::sync::Arc::new(Gateway::start(dir.path(), &upstream, ""));
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0..50 {
                let started = std::time::Instant::now();
                let response = gateway.post(Some(KEY_A), &[], &chat(&format!("question {worker}-{n}"))).await;
                let status = response.status().as_u16();
                let retry_after = response.headers().get("retry-after").is_some();
                outcomes.push((status, retry_after, started.elapsed()));
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }
    let answered = outcomes.iter().filter(|(status, ..)| *status == 200).count();
    let refused: Vec<_> = outcomes.iter().filter(|(status, ..)| *status == 429).collect();
    assert_eq!(answered + refused.len(), 800, "every request answered or refused as rate limited");
    assert!((600..700).contains(&answered), "the minute's 600 and what refilled meanwhile: {answered}");
    assert!(refused.iter().all(|(_, retry_after, _)| *retry_after), "a 429 says when to come back");
    assert!(
        refused.iter().all(|(.., took)| *took < std::time::Duration::from_millis(900)),
        "refused within max_wait (500 ms): {:?}",
        refused.iter().map(|(.., took)| took).max()
    );
    let upstream_429s = upstream.exchanges().iter().filter(|exchange| exchange.status == 429).count();
    assert_eq!(upstream_429s, 0, "the gateway stayed under what the upstream declared");
}

/// The classifier step routed to a Claude model through the native Anthropic provider, called
/// with the same OpenAI client request as ever: the answer comes back in OpenAI's shape, and the
/// upstream saw Anthropic's (the system prompt on top, `max_tokens`, its own key header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_routed_to_anthropic_answers_an_unchanged_openai_call() {
    let openai = ScriptedUpstream::start().await.unwrap();
    let anthropic = ScriptedUpstream::start().await.unwrap();
    anthropic.respond_with(|_| Reply::completion_with_cache(r#"{"label": "billing", "confidence": 0.9}"#, 420, 400, 9));
    let dir = tempfile::tempdir().unwrap();
    let routes = format!(
        "[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"ANTHROPIC_TEST_KEY\"\n\
         request_timeout_ms = 5000\nconnect_timeout_ms = 1000\n\
         [models.\"claude-haiku-4-5\"]\nprovider = \"claude\"\ninput_per_million_usd = 1.0\n\
         cached_input_per_million_usd = 0.1\noutput_per_million_usd = 5.0\ncontext_window = 200000\ntier = 2\n\
         [steps.classifier.route]\ncandidates = [\"claude-haiku-4-5\"]\n",
        anthropic.base_url()
    );
    let config = format!(
        "[semantic]\nenabled = false\n[telemetry]\ndatabase_url = \"sqlite://{}\"\n\
         [gateway.api_keys]\nteam-a = \"GATEWAY_TEST_KEY_A\"\n{routes}",
        dir.path().join("telemetry.db").display()
    );
    let env = [("GATEWAY_TEST_KEY_A", KEY_A), ("OPENAI_API_KEY", "sk-upstream"), ("ANTHROPIC_TEST_KEY", "sk-ant-test")];
    let mut process =
        GatewayProcess::start(Path::new(env!("CARGO_BIN_EXE_aipipe")), dir.path(), &openai.base_url(), &config, &env)
            .unwrap();
    let input = json!({"text": "I was charged twice", "labels": ["billing", "bug", "other"]});
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": input.to_string()}]});
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", process.base_url))
        .bearer_auth(KEY_A)
        .header("x-aipipe-step", "classifier")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-aipipe-source"], "upstream");
    let answer: Value = response.json().await.unwrap();
    let output: Value = serde_json::from_str(answer["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(output["label"], "billing");
    assert_eq!(answer["usage"]["prompt_tokens"], 420);
    assert_eq!(openai.requests(), 0, "the OpenAI upstream saw nothing");
    let sent = &anthropic.received()[0];
    assert_eq!(sent["model"], "claude-haiku-4-5");
    assert!(sent["system"].as_str().unwrap().contains("You classify texts"), "{sent}");
    assert!(sent["messages"].as_array().unwrap().iter().all(|m| m["role"] != "system"), "{sent}");
    assert_eq!(sent["max_tokens"], 100);
    process.terminate().unwrap();
    // Drained and flushed before its telemetry is read.
    let status = tokio::task::spawn_blocking(move || process.wait().unwrap()).await.unwrap();
    assert!(status.success());

    // Priced as the model's price sheet says: 20 plain and 400 cached input tokens, 9 output.
    let store = TelemetryStore::connect(&dir.path().join("telemetry.db").display().to_string()).await.unwrap();
    let row = store.records().await.unwrap().pop().unwrap();
    assert_eq!((row.provider.as_str(), row.model.as_str()), ("claude", "claude-haiku-4-5"));
    assert!((row.cost_usd - (20.0 * 1.0 + 400.0 * 0.1 + 9.0 * 5.0) / 1e6).abs() < 1e-12, "{}", row.cost_usd);
    assert_eq!(row.route.unwrap().chosen.as_deref(), Some("claude-haiku-4-5"));
}
