//! The engine's answer as OpenAI's chat completion: whole, or as server-sent events.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::Response;
use pipeline_core::PipelineResult;
use serde_json::{Value, json};

fn completion_id(result: &PipelineResult) -> String {
    format!("chatcmpl-{}", result.trace_id)
}

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or_default()
}

fn usage(result: &PipelineResult) -> Value {
    json!({
        "prompt_tokens": result.input_tokens,
        "completion_tokens": result.output_tokens,
        "total_tokens": result.input_tokens + result.output_tokens,
    })
}

pub(super) fn completion(result: &PipelineResult, content: &str) -> Value {
    json!({
        "id": completion_id(result),
        "object": "chat.completion",
        "created": unix_seconds(),
        "model": result.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "logprobs": null,
            "finish_reason": result.finish_reason.as_str(),
        }],
        "usage": usage(result),
    })
}

/// The answer as server-sent events, the way OpenAI streams: the role, the content, the
/// finish reason, the usage if asked for, then `[DONE]`. The engine has the whole answer by
/// then (it is validated and cached whole), so it goes out in one content chunk.
pub(super) fn streamed(result: &PipelineResult, content: &str, include_usage: bool) -> Response {
    let (id, created) = (completion_id(result), unix_seconds());
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": result.model, "choices": choices,
        });
        if include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        format!("data: {chunk}\n\n")
    };
    let delta =
        |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]);
    let mut events = chunk(delta(json!({"role": "assistant", "content": ""}), Value::Null), None);
    events.push_str(&chunk(delta(json!({"content": content}), Value::Null), None));
    events.push_str(&chunk(delta(json!({}), json!(result.finish_reason.as_str())), None));
    if include_usage {
        events.push_str(&chunk(json!([]), Some(usage(result))));
    }
    events.push_str("data: [DONE]\n\n");
    let mut response = Response::new(Body::from(events));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// How the answer was served, in the words of the telemetry rows and metric labels.
pub(super) fn describe_source(headers: &mut HeaderMap, result: &PipelineResult) {
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set("x-aipipe-source", result.source.label().to_owned());
    set("x-aipipe-confidence", format!("{:.3}", result.confidence));
    set("x-aipipe-trace-id", result.trace_id.to_string());
    set("x-aipipe-cost-usd", format!("{:.8}", result.cost_usd));
}
