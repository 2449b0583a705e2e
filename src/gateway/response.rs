//! The engine's answer as OpenAI's chat completion: whole, or as server-sent events, either
//! forwarded piece by piece as the upstream writes them or, for an answer that came whole (a
//! cache, a stand-in, a checked contract), cut into pieces the way a stream would carry it.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::Response;
use pipeline_core::providers::{Delta, ToolCall};
use pipeline_core::{PipelineError, PipelineResult};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::error::ApiError;

/// About how many characters a piece of a cached answer carries when it is streamed.
const CACHED_PIECE_CHARS: usize = 16;

fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_secs()).unwrap_or_default()
}

/// The answer's usage as its model counted it, whether this call paid for it or a cache did
/// (what this call cost is `x-aipipe-cost-usd`, 0 for a cache hit), streamed or not.
fn usage(result: &PipelineResult) -> Value {
    let usage = result.answer_usage;
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    })
}

fn tool_calls(calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .map(|call| {
            json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}})
        })
        .collect()
}

pub(super) fn completion(result: &PipelineResult, content: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": content});
    if !result.tool_calls.is_empty() {
        if content.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = tool_calls(&result.tool_calls);
    }
    json!({
        "id": format!("chatcmpl-{}", result.trace_id),
        "object": "chat.completion",
        "created": unix_seconds(),
        "model": result.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": result.finish_reason.as_str()}],
        "usage": usage(result),
    })
}

/// Writes one stream's events, OpenAI's way: every chunk with the same id and creation time,
/// `usage: null` on each when the caller asked for usage, which comes in a last chunk of its
/// own.
#[derive(Debug, Clone)]
pub(super) struct ChunkWriter {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChunkWriter {
    pub(super) fn new(trace_id: &str, model: &str, include_usage: bool) -> Self {
        Self { id: format!("chatcmpl-{trace_id}"), created: unix_seconds(), model: model.to_owned(), include_usage }
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> String {
        let mut chunk = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
        });
        chunk["choices"] = choices;
        if self.include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        format!("data: {chunk}\n\n")
    }

    fn delta(&self, delta: Value, finish_reason: Value) -> String {
        let mut choice = json!({"index": 0, "logprobs": null});
        choice["delta"] = delta;
        choice["finish_reason"] = finish_reason;
        self.chunk(Value::Array(vec![choice]), None)
    }

    fn role(&self) -> String {
        self.delta(json!({"role": "assistant", "content": ""}), Value::Null)
    }

    fn piece(&self, piece: &Delta) -> String {
        match piece {
            Delta::Text(text) => self.delta(json!({"content": text}), Value::Null),
            Delta::ToolCall { index, id, name, arguments } => {
                let mut call = json!({"index": index, "function": {"arguments": arguments}});
                if let Some(id) = id {
                    call["id"] = json!(id);
                    call["type"] = json!("function");
                }
                if let Some(name) = name {
                    call["function"]["name"] = json!(name);
                }
                self.delta(json!({"tool_calls": [call]}), Value::Null)
            }
        }
    }

    /// The end of an answer: its finish reason, the usage if asked, `[DONE]`.
    fn end(&self, result: &PipelineResult) -> String {
        let writer = Self { model: result.model.clone(), ..self.clone() };
        let mut events = writer.delta(json!({}), json!(result.finish_reason.as_str()));
        if self.include_usage {
            events.push_str(&writer.chunk(json!([]), Some(usage(result))));
        }
        events.push_str("data: [DONE]\n\n");
        events
    }

    /// The error event that ends a stream which failed after it began: OpenAI's SDKs raise it.
    fn error(error: &ApiError) -> String {
        format!("data: {}\n\n", error.body())
    }

    /// An answer that came whole, as a stream: the role, the text in pieces, each tool call
    /// (its name, then its arguments), the end.
    fn whole(&self, result: &PipelineResult, content: &str) -> String {
        let mut events = self.role();
        for piece in pieces(content) {
            events.push_str(&self.piece(&Delta::Text(piece.to_owned())));
        }
        for (index, call) in result.tool_calls.iter().enumerate() {
            let (id, name) = (Some(call.id.clone()), Some(call.name.clone()));
            events.push_str(&self.piece(&Delta::ToolCall { index, id, name, arguments: String::new() }));
            let arguments = call.arguments.clone();
            events.push_str(&self.piece(&Delta::ToolCall { index, id: None, name: None, arguments }));
        }
        events.push_str(&self.end(result));
        events
    }
}

/// `text` cut after whitespace into pieces of about [`CACHED_PIECE_CHARS`] characters.
fn pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut chars = 0;
    for (at, c) in text.char_indices() {
        chars += 1;
        if chars >= CACHED_PIECE_CHARS && c.is_whitespace() {
            let end = at + c.len_utf8();
            pieces.push(&text[start..end]);
            start = end;
            chars = 0;
        }
    }
    if start < text.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

fn event_stream(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies in front (nginx) must pass each event on as it comes.
    headers.insert(HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no"));
    response
}

/// An answer that came whole, streamed.
pub(super) fn whole_stream(writer: &ChunkWriter, result: &PipelineResult, content: &str) -> Response {
    let writer = ChunkWriter { model: result.model.clone(), ..writer.clone() };
    let mut response = event_stream(Body::from(writer.whole(result, content)));
    describe_source(response.headers_mut(), result);
    response
}

/// An answer forwarded as the upstream writes it: `first` and every piece after it, then the
/// end once the call is over (or the error event, if it failed after it began). The response
/// body owns the pieces' receiver: when the caller goes away, the body is dropped, and the
/// provider, seeing nobody to send to, drops its upstream request.
pub(super) fn live_stream(
    writer: ChunkWriter,
    first: &Delta,
    pieces: mpsc::Receiver<Delta>,
    call: JoinHandle<Result<PipelineResult, PipelineError>>,
) -> Response {
    let opening = futures::stream::iter([Ok::<_, Infallible>(writer.role()), Ok(writer.piece(first))]);
    let rest = futures::stream::unfold(Some((writer, pieces, call)), |state| async move {
        let (writer, mut pieces, call) = state?;
        if let Some(piece) = pieces.recv().await {
            let event = writer.piece(&piece);
            return Some((Ok(event), Some((writer, pieces, call))));
        }
        let end = match call.await {
            Ok(Ok(result)) => writer.end(&result),
            Ok(Err(err)) => ChunkWriter::error(&ApiError::from(err)),
            Err(join) => ChunkWriter::error(&ApiError::internal(&format!("the call's task failed: {join}"))),
        };
        Some((Ok(end), None))
    });
    event_stream(Body::from_stream(futures::StreamExt::chain(opening, rest)))
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

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn a_cached_answer_is_cut_after_whitespace_and_nothing_is_lost() {
        let text = "The quick brown fox jumps over the lazy dog, and then the dog wakes up and chases the fox.";
        let cut = pieces(text);
        assert!(cut.len() >= 3, "{cut:?}");
        assert_eq!(cut.concat(), text);
        assert_eq!(pieces("short"), ["short"]);
        assert!(pieces("").is_empty());
        let unicode = "é".repeat(60);
        assert_eq!(pieces(&unicode).concat(), unicode);
    }
}
