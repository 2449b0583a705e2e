//! `aipipe serve` in front of a real local model: llama.cpp's server with SmolLM2-135M-Instruct
//! (both from PyPI), as a team that runs its own model would have it.
use std::path::Path;

use serde_json::{Value, json};
use testkit::{GatewayProcess, LlamaServer};

const KEY: &str = "sk-aipipe-local-model";

/// `aipipe serve` in front of the local model, its telemetry in `dir`.
/// A model on two shared CPU cores, beside the rest of the suite, may take far longer than a
/// hosted one: the provider's timeout and the call's deadline are a local model's, not the
/// shipped 20 and 30 s.
fn gateway_to(llama: &LlamaServer, dir: &Path) -> GatewayProcess {
    let config = format!(
        "[semantic]\nenabled = false\n[telemetry]\ndatabase_url = \"sqlite://{}\"\n[gateway.api_keys]\nlocal = \"LOCAL_KEY\"\n\
         [provider]\nrequest_timeout_ms = 120000\n[engine]\ndefault_deadline_ms = 150000\n\
         [models.smollm2]\ninput_per_million_usd = 0.0\noutput_per_million_usd = 0.0\ncontext_window = 8192\n",
        dir.join("telemetry.db").display()
    );
    GatewayProcess::start(
        Path::new(env!("CARGO_BIN_EXE_aipipe")),
        dir,
        &llama.base_url,
        &config,
        &[("LOCAL_KEY", KEY), ("OPENAI_API_KEY", "not-needed")],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_local_model_meets_the_structured_steps() {
    let Some(llama) = LlamaServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_to(&llama, dir.path());
    let http = reqwest::Client::new();
    let cases = [
        ("classifier", json!({"text": "The app crashes when I upload a photo", "labels": ["billing", "bug", "other"]})),
        ("validator", json!({"text": "Company: TBD. Contact: John. Need: ???"})),
        (
            "extractor",
            json!({"text": "Hi, I am Ada Lovelace, reach me at ada@example.com", "fields": ["name", "email"]}),
        ),
    ];
    for (step, input) in cases {
        let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": input.to_string()}]});
        let response = http
            .post(format!("{}/chat/completions", gateway.base_url))
            .bearer_auth(KEY)
            .header("x-aipipe-step", step)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{step}");
        // `upstream`: the model's own answer, which the engine served only because it is valid
        // against the step's schema (a contract violation would have been a stand-in).
        assert_eq!(response.headers()["x-aipipe-source"], "upstream", "{step}");
        let body: Value = response.json().await.unwrap();
        let output: Value = serde_json::from_str(
            body["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no answer: {body}")),
        )
        .unwrap();
        match step {
            "classifier" => assert!(output["label"].is_string() && output["confidence"].is_number(), "{output}"),
            "validator" => assert!(output["valid"].is_boolean() && output["issues"].is_array(), "{output}"),
            _ => assert!(output["fields"].is_object(), "{output}"),
        }
    }
}

/// A chat answer from the local model through the gateway, whole and streamed: the stream
/// arrives in several chunks, ends with `[DONE]`, and carries the server's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_answer_streams_from_a_small_local_model() {
    let Some(llama) = LlamaServer::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_to(&llama, dir.path());
    let http = reqwest::Client::new();
    let ask = |question: &str, stream: bool| {
        let mut body = json!({"model": "smollm2", "max_tokens": 48, "temperature": 0.0,
            "messages": [{"role": "user", "content": question}]});
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        http.post(format!("{}/chat/completions", gateway.base_url)).bearer_auth(KEY).json(&body).send()
    };

    let whole: Value = ask("Name three colours.", false).await.unwrap().json().await.unwrap();
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("no answer: {whole}"));
    assert!(!text.trim().is_empty(), "{whole}");
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{whole}");

    let response = ask("Name three animals.", true).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let events: Vec<&str> = body.lines().filter_map(|line| line.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<Value> =
        events[..events.len() - 1].iter().map(|event| serde_json::from_str(event).unwrap()).collect();
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .filter(|p| !p.is_empty())
        .collect();
    assert!(pieces.len() >= 3, "the model's tokens arrive as they are written: {body}");
    let usage = chunks.iter().find_map(|chunk| chunk["usage"].as_object()).expect("a usage chunk");
    assert!(usage["completion_tokens"].as_u64().unwrap() > 0, "{body}");
}
