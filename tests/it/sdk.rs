//! `aipipe serve` driven by the official openai Python SDK (`tests/sdk/openai_client.py`), in
//! front of a scripted upstream that writes its answers piece by piece with a pause between
//! pieces: once speaking OpenAI's chat completions, once Anthropic's Messages API (the gateway
//! translating its events into OpenAI chunks).
//!
//! Skipped when the SDK is missing, except under CI (`.ci/run` installs it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use pipeline_core::telemetry::{ErrorClass, TelemetryStore};
use serde_json::{Value, json};
use testkit::{Dialect, GatewayProcess, Reply, ScriptedUpstream, Streamed};

const KEY: &str = "sk-aipipe-sdk-test";
/// Between two events of a streamed upstream answer.
const GAP: Duration = Duration::from_millis(150);

const ANSWER: [&str; 6] = ["Paris ", "is ", "the ", "capital ", "of ", "France, on the Seine."];

fn sdk_available() -> bool {
    let found = Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|status| status.success());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "CI is set but the openai Python SDK is missing: pip install openai");
        eprintln!("the openai Python SDK is not installed: the SDK tests are skipped");
    }
    found
}

/// The text of the last user message, in either dialect.
fn last_user_text(request: &Value) -> String {
    let messages = request["messages"].as_array().cloned().unwrap_or_default();
    let Some(last) = messages.iter().rev().find(|message| message["role"] == "user") else { return String::new() };
    match &last["content"] {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks.iter().filter_map(|block| block["text"].as_str()).collect(),
        _ => String::new(),
    }
}

/// Whether the request carries a tool's result (OpenAI's `tool` message, Anthropic's
/// `tool_result` block).
fn carries_tool_result(request: &Value) -> bool {
    request["messages"].as_array().is_some_and(|messages| {
        messages.iter().any(|message| {
            message["role"] == "tool"
                || message["content"]
                    .as_array()
                    .is_some_and(|blocks| blocks.iter().any(|block| block["type"] == "tool_result"))
        })
    })
}

/// What the scripted model answers, by what it is asked.
fn script(request: &Value) -> Reply {
    if carries_tool_result(request) {
        return Reply::Streamed(Streamed::text(&["It is ", "3 degrees ", "in Oslo."], GAP));
    }
    if request["tools"].as_array().is_some_and(|tools| !tools.is_empty()) {
        return Reply::Streamed(Streamed::tool_call("call_weather_1", "get_weather", r#"{"city": "Oslo"}"#, GAP));
    }
    match last_user_text(request).as_str() {
        "Where is the answer in JSON?" => Reply::completion(r#"{"city": "Paris", "river": "Seine"}"#),
        "Where is the wrong JSON?" => Reply::completion(r#"{"town": 1}"#),
        "Fail half-way." => Reply::Streamed(Streamed::text(&ANSWER, GAP).failing_after(2)),
        "Talk slowly." => {
            Reply::Streamed(Streamed::text(&["one ", "two ", "three ", "four ", "five ", "six."], GAP * 3))
        }
        _ => Reply::Streamed(Streamed::text(&ANSWER, GAP)),
    }
}

struct Setup {
    gateway: GatewayProcess,
    upstream: ScriptedUpstream,
    dir: tempfile::TempDir,
}

async fn start(dialect: Dialect) -> Setup {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(script);
    let dir = tempfile::tempdir().unwrap();
    let route = match dialect {
        Dialect::OpenAi => String::new(),
        Dialect::Anthropic => format!(
            "[providers.claude]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"ANTHROPIC_TEST_KEY\"\n\
             request_timeout_ms = 10000\nconnect_timeout_ms = 1000\n\
             [models.\"claude-haiku-4-5\"]\nprovider = \"claude\"\ninput_per_million_usd = 1.0\n\
             output_per_million_usd = 5.0\ncontext_window = 200000\n\
             [steps.chat.route]\ncandidates = [\"claude-haiku-4-5\"]\n",
            upstream.base_url()
        ),
    };
    let config = format!(
        "[semantic]\nenabled = false\n[telemetry]\ndatabase_url = \"sqlite://{}\"\n\
         [gateway.api_keys]\nteam-a = \"SDK_TEST_KEY\"\n{route}",
        dir.path().join("telemetry.db").display()
    );
    let env = [("SDK_TEST_KEY", KEY), ("OPENAI_API_KEY", "sk-upstream"), ("ANTHROPIC_TEST_KEY", "sk-ant-test")];
    // The OpenAI dialect is the primary provider's; under Anthropic, the primary is never asked.
    let gateway =
        GatewayProcess::start(Path::new(env!("CARGO_BIN_EXE_aipipe")), dir.path(), &upstream.base_url(), &config, &env)
            .unwrap();
    Setup { gateway, upstream, dir }
}

fn script_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_client.py")
}

/// Runs one scenario of the SDK driver (off the async workers: the upstream lives on them).
async fn sdk(base_url: &str, scenario: &str, request: Value) -> Value {
    let base_url = base_url.to_owned();
    let scenario = scenario.to_owned();
    tokio::task::spawn_blocking(move || {
        let output = Command::new("python3")
            .arg(script_path())
            .args([scenario.as_str(), &request.to_string()])
            .env("OPENAI_BASE_URL", &base_url)
            .env("OPENAI_API_KEY", KEY)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{scenario}: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_str(stdout.trim()).unwrap_or_else(|err| panic!("{scenario}: {err}: {stdout}"))
    })
    .await
    .unwrap()
}

fn ask(question: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}]})
}

fn tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

/// The arrival time of the first and the last chunk that carried content or a tool call.
fn first_and_last(seen: &Value) -> (f64, f64) {
    let times: Vec<f64> = seen["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|chunk| {
            chunk["content"].as_str().is_some_and(|text| !text.is_empty()) || chunk["tool_calls"] != json!([])
        })
        .map(|chunk| chunk["at"].as_f64().unwrap())
        .collect();
    (times[0], times[times.len() - 1])
}

async fn streaming_through(dialect: Dialect) {
    if !sdk_available() {
        return;
    }
    let Setup { mut gateway, upstream, dir } = start(dialect).await;
    let base_url = gateway.base_url.clone();
    let question = ask("What is the capital of France?");

    // A streamed answer: several chunks, the first long before the upstream's last.
    let mut streamed = question.clone();
    streamed["stream_options"] = json!({"include_usage": true});
    let seen = sdk(&base_url, "stream", streamed.clone()).await;
    assert_eq!(seen["content"], ANSWER.concat(), "{seen}");
    assert!(seen["content_chunks"].as_u64().unwrap() >= 4, "{seen}");
    let (first, last) = first_and_last(&seen);
    assert!(last - first >= 3.0 * GAP.as_secs_f64(), "the first chunk came at {first:.3} s, the last at {last:.3} s");
    assert_eq!(seen["finish"], "stop");
    // include_usage: a usage chunk, with the upstream's counts.
    assert!(seen["usage"]["prompt_tokens"].as_u64().unwrap() > 0, "{seen}");
    let upstream_calls = upstream.requests();

    // The same question again: a cached answer, still a stream of several chunks.
    let again = sdk(&base_url, "stream", streamed).await;
    assert_eq!(again["source"], "exact", "{again}");
    assert_eq!(again["content"], ANSWER.concat());
    assert!(again["content_chunks"].as_u64().unwrap() >= 2, "{again}");
    // The answer's usage as its model counted it; what this call cost is the cost header's.
    assert_eq!(again["usage"], seen["usage"], "{again}");
    assert_eq!(again["cost_usd"], "0.00000000", "a cached answer costs nothing");
    assert_eq!(upstream.requests(), upstream_calls);

    // A tool call round trip: the call streamed as deltas, the tool's result sent back, the
    // final answer; the first turn again is an exact hit.
    let mut first_turn = ask("What is the weather in Oslo?");
    first_turn["tools"] = tools();
    let called = sdk(&base_url, "stream", first_turn.clone()).await;
    assert_eq!(called["finish"], "tool_calls", "{called}");
    let call = &called["tool_calls"][0];
    assert_eq!(call["name"], "get_weather");
    assert_eq!(serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).unwrap(), json!({"city": "Oslo"}));
    let mut second_turn = first_turn.clone();
    let messages = second_turn["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": [{"id": call["id"], "type": "function",
        "function": {"name": "get_weather", "arguments": call["arguments"]}}]}));
    messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "3 degrees, cloudy"}));
    let answered = sdk(&base_url, "complete", second_turn).await;
    assert_eq!(answered["content"], "It is 3 degrees in Oslo.", "{answered}");
    let repeat = sdk(&base_url, "complete", first_turn).await;
    assert_eq!(repeat["source"], "exact", "{repeat}");
    assert_eq!(repeat["tool_calls"][0]["name"], "get_weather");
    if dialect == Dialect::Anthropic {
        let tool_result = upstream.received().into_iter().find(carries_tool_result).unwrap();
        assert!(tool_result["tools"][0]["input_schema"].is_object(), "{tool_result}");
    }

    // A strict JSON schema: an answer that meets it passes, one that does not is an error.
    let schema = json!({"type": "json_schema", "json_schema": {"name": "place", "strict": true, "schema":
        {"type": "object", "properties": {"city": {"type": "string"}, "river": {"type": "string"}},
         "required": ["city", "river"], "additionalProperties": false}}});
    let mut structured = ask("Where is the answer in JSON?");
    structured["response_format"] = schema.clone();
    let valid = sdk(&base_url, "complete", structured).await;
    assert_eq!(serde_json::from_str::<Value>(valid["content"].as_str().unwrap()).unwrap()["city"], "Paris");
    let mut wrong = ask("Where is the wrong JSON?");
    wrong["response_format"] = schema;
    let refused = sdk(&base_url, "failure", wrong).await;
    assert_eq!(refused["status"], 502, "{refused}");
    assert_eq!(refused["body"]["code"], "contract_violation", "{refused}");

    // The upstream fails after two pieces: the SDK raises, having seen those pieces.
    let failed = sdk(&base_url, "mid_stream_error", ask("Fail half-way.")).await;
    assert_eq!(failed["error"], "APIError", "{failed}");
    let pieces = failed["chunks"].as_array().unwrap().iter().filter(|chunk| chunk["content"] != json!(null)).count();
    assert!(pieces >= 2, "{failed}");

    // A client that hangs up after the first piece: the upstream request is dropped, nothing
    // is cached, so the question goes upstream again.
    sdk(&base_url, "disconnect", ask("Talk slowly.")).await;
    let before = upstream.requests();
    let after_hangup = sdk(&base_url, "complete", ask("Talk slowly.")).await;
    assert_eq!(after_hangup["source"], "upstream", "{after_hangup}");
    assert_eq!(upstream.requests(), before + 1);

    // A parameter the provider cannot honour is refused by name; one it can is passed on.
    let mut seeded = ask("Any seed?");
    seeded["seed"] = json!(42);
    seeded["top_p"] = json!(0.5);
    match dialect {
        Dialect::Anthropic => {
            let refused = sdk(&base_url, "failure", seeded).await;
            assert_eq!(refused["status"], 400, "{refused}");
            assert_eq!(refused["body"]["param"], "seed", "{refused}");
        }
        Dialect::OpenAi => {
            sdk(&base_url, "complete", seeded).await;
            let sent = upstream.received().into_iter().find(|request| request["seed"] == 42).unwrap();
            assert_eq!(sent["top_p"], 0.5);
        }
    }

    if dialect == Dialect::OpenAi {
        let streamed_requests: Vec<Value> =
            upstream.received().into_iter().filter(|request| request["stream"] == true).collect();
        assert!(!streamed_requests.is_empty());
        assert!(
            streamed_requests.iter().all(|request| request["stream_options"]["include_usage"] == true),
            "usage is always asked of the upstream"
        );
    }

    gateway.terminate().unwrap();
    let status = tokio::task::spawn_blocking(move || gateway.wait().unwrap()).await.unwrap();
    assert!(status.success());
    let store = TelemetryStore::connect(&dir.path().join("telemetry.db").display().to_string()).await.unwrap();
    let rows = store.records().await.unwrap();
    let with_class = |class: ErrorClass| rows.iter().filter(|row| row.error_class == Some(class)).count();
    assert_eq!(with_class(ErrorClass::StreamInterrupted), 1, "{rows:#?}");
    assert_eq!(with_class(ErrorClass::ClientClosed), 1, "one row for the call whose client hung up");
    let streamed_rows: Vec<_> = rows.iter().filter(|row| row.streamed).collect();
    assert!(streamed_rows.len() >= 5, "{}", streamed_rows.len());
    assert!(streamed_rows.iter().all(|row| row.ttft_ms.is_some()), "every streamed call has its time to first token");
    let live =
        rows.iter().find(|row| row.streamed && row.source == pipeline_core::telemetry::Source::Upstream).unwrap();
    let ttft = live.ttft_ms.unwrap();
    assert!(ttft < live.latency_ms - 2.0 * GAP.as_secs_f64() * 1000.0, "ttft {ttft} ms of {} ms", live.latency_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_calls_tools_and_schemas_through_an_openai_upstream() {
    streaming_through(Dialect::OpenAi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_streams_calls_tools_and_schemas_through_an_anthropic_upstream() {
    streaming_through(Dialect::Anthropic).await;
}

/// `/v1/embeddings`, answered by the semantic cache's model on this machine: what the SDK
/// asks for by default (base64, which it decodes) and floats give the same vectors, and they
/// carry meaning (a paraphrase is nearer than an unrelated text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_gets_embeddings_from_the_local_model() {
    if !sdk_available() {
        return;
    }
    let upstream = ScriptedUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Two requests a minute for the workspace: embeddings are held to its limits like calls.
    let config = format!(
        "[telemetry]\ndatabase_url = \"sqlite://{}\"\n[limits]\nmax_wait_ms = 0\nworkspace_requests_per_minute = 2\n\
         workspace_request_burst = 2\n[gateway.api_keys]\nteam-a = \"SDK_TEST_KEY\"\n",
        dir.path().join("telemetry.db").display()
    );
    let env = [("SDK_TEST_KEY", KEY), ("OPENAI_API_KEY", "sk-upstream")];
    let mut gateway =
        GatewayProcess::start(Path::new(env!("CARGO_BIN_EXE_aipipe")), dir.path(), &upstream.base_url(), &config, &env)
            .unwrap();
    let texts = ["How do I reset my password?", "I forgot my password, how can I change it?", "The invoice is wrong."];
    let request = json!({"model": pipeline_core::semantic_cache::DEFAULT_MODEL, "input": texts});
    let seen = sdk(&gateway.base_url, "embeddings", request).await;
    assert_eq!(seen["model"], pipeline_core::semantic_cache::DEFAULT_MODEL);
    let vectors: Vec<Vec<f64>> = serde_json::from_value(seen["floats"].clone()).unwrap();
    let decoded: Vec<Vec<f64>> = serde_json::from_value(seen["decoded"].clone()).unwrap();
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].len(), 384);
    for (floats, decoded) in vectors.iter().zip(&decoded) {
        assert!(floats.iter().zip(decoded).all(|(a, b)| (a - b).abs() < 1e-6), "base64 and floats agree");
    }
    let cosine = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    assert!(cosine(&vectors[0], &vectors[1]) > cosine(&vectors[0], &vectors[2]) + 0.2);
    assert!(seen["usage"]["prompt_tokens"].as_u64().unwrap() >= 20, "{}", seen["usage"]);
    assert_eq!(upstream.requests(), 0, "no text left the machine");

    // The SDK's two requests took the workspace's two a minute; the next waits its turn.
    let http = reqwest::Client::new();
    let embed = |input: Value| {
        http.post(format!("{}/embeddings", gateway.base_url))
            .header("authorization", format!("Bearer {KEY}"))
            .json(&json!({"model": pipeline_core::semantic_cache::DEFAULT_MODEL, "input": input}))
            .send()
    };
    let limited = embed(json!("one more")).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    // More texts than a request may carry are refused before any is embedded.
    let too_many = embed(json!(vec!["a text"; 257])).await.unwrap();
    assert_eq!(too_many.status(), 400);
    gateway.terminate().unwrap();
    assert!(gateway.wait().unwrap().success());
    let store = TelemetryStore::connect(dir.path().join("telemetry.db").to_str().unwrap()).await.unwrap();
    let rows = store.records().await.unwrap();
    let embeddings: Vec<_> = rows.iter().filter(|row| row.step == "embeddings").collect();
    assert_eq!(embeddings.len(), 3, "a row per embeddings request the engine saw: {rows:#?}");
    assert!(embeddings[..2].iter().all(|row| row.input_tokens >= 10 && row.provider == "local"));
    assert_eq!(embeddings[2].error_class, Some(ErrorClass::RateLimitedLocally));
}
