//! The "before": six components as an application grew them, each with its own signature, its
//! own prompt, its own reply format and its own idea of error handling, each calling the model
//! directly. They are kept as they were: they are what the shims must stay compatible with,
//! and what serves callers in `legacy` and `shadow` mode.

pub mod classifier;
pub mod enhancer;
pub mod extractor;
pub mod prioritizer;
pub mod summarizer;
pub mod validator;

use std::time::Duration;

use serde_json::{Value, json};

/// Where a legacy component sends its requests: every one had its own copy of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Ends in `/v1`.
    pub base_url: String,
    pub api_key: String,
    pub model: String,
}

/// A failed request, as the legacy code saw it: a status if there was one, and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpFailure {
    pub status: Option<u16>,
    pub message: String,
}

fn body(endpoint: &Endpoint, system: &str, user: &str, max_tokens: u32) -> Value {
    json!({
        "model": endpoint.model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
    })
}

fn content(reply: &Value) -> Result<String, HttpFailure> {
    reply["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| HttpFailure { status: None, message: format!("no content in reply: {reply}") })
}

/// One chat request, async, the way the async components made it.
async fn chat(endpoint: &Endpoint, system: &str, user: &str, max_tokens: u32) -> Result<String, HttpFailure> {
    let failure = |message: String| HttpFailure { status: None, message };
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", endpoint.base_url))
        .bearer_auth(&endpoint.api_key)
        .timeout(Duration::from_secs(30))
        .header("content-type", "application/json")
        .body(body(endpoint, system, user, max_tokens).to_string())
        .send()
        .await
        .map_err(|err| failure(err.to_string()))?;
    let status = response.status();
    let text = response.text().await.map_err(|err| failure(err.to_string()))?;
    if !status.is_success() {
        return Err(HttpFailure { status: Some(status.as_u16()), message: text });
    }
    content(&serde_json::from_str(&text).map_err(|err| failure(err.to_string()))?)
}

/// The same, blocking, for the components that were written synchronously.
fn chat_blocking(endpoint: &Endpoint, system: &str, user: &str, max_tokens: u32) -> Result<String, HttpFailure> {
    let failure = |message: String| HttpFailure { status: None, message };
    let response = reqwest::blocking::Client::new()
        .post(format!("{}/chat/completions", endpoint.base_url))
        .bearer_auth(&endpoint.api_key)
        .timeout(Duration::from_secs(30))
        .header("content-type", "application/json")
        .body(body(endpoint, system, user, max_tokens).to_string())
        .send()
        .map_err(|err| failure(err.to_string()))?;
    let status = response.status();
    let text = response.text().map_err(|err| failure(err.to_string()))?;
    if !status.is_success() {
        return Err(HttpFailure { status: Some(status.as_u16()), message: text });
    }
    content(&serde_json::from_str(&text).map_err(|err| failure(err.to_string()))?)
}
