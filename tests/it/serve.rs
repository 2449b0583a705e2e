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
        let env = [("GATEWAY_TEST_KEY_A", KEY_A), ("GATEWAY_TEST_KEY_B", KEY_B), ("OPENAI_API_KEY", "sk-upstream")];
        let process =
            GatewayProcess::start(Path::new(env!("CARGO_BIN_EXE_aipipe")), dir, &upstream.base_url(), &config, &env)
                .unwrap();
        let base_url = process.base_url.clone();
        Self { process, base_url, http: reqwest::Client::new() }
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
    let response = gateway.post(Some(KEY_A), &[("x-aipipe-component", "docs-bot")], &chat("Capital of France?")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-aipipe-source"], "upstream");
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
    assert_eq!(json_body(again).await["usage"]["total_tokens"], 0);
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
    let metrics = gateway.http.get(format!("{root}/metrics")).send().await.unwrap();
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
    let unsupported = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "tools": []});
    let response = gateway.post(Some(KEY_A), &[], &unsupported).await;
    assert_eq!(response.status(), 400);
    let body = json_body(response).await;
    assert_openai_error(&body, "invalid_request");
    assert_eq!(body["error"]["param"], "tools");
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
async fn an_answer_cut_off_at_max_tokens_says_so_when_served_again_too() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| Reply::Truncated("The capital of France is".into()));
    let dir = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(dir.path(), &upstream, "");
    let mut request = chat("Capital of France?");
    request["max_tokens"] = json!(5);

    let first = json_body(gateway.post(Some(KEY_A), &[], &request).await).await;
    assert_eq!(first["choices"][0]["finish_reason"], "length", "{first}");
    let cached = gateway.post(Some(KEY_A), &[], &request).await;
    assert_eq!(cached.headers()["x-aipipe-source"], "exact");
    assert_eq!(json_body(cached).await["choices"][0]["finish_reason"], "length");
    request["stream"] = json!(true);
    let text = gateway.post(Some(KEY_A), &[], &request).await.text().await.unwrap();
    assert!(text.contains(r#""finish_reason":"length""#), "{text}");
    assert_eq!(upstream.requests(), 1);
}
