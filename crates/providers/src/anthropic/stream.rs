//! Anthropic's stream events, parsed from the bytes of a `text/event-stream` body.
//!
//! The stream is `message_start`, then per content block `content_block_start`, its deltas and
//! `content_block_stop`, then `message_delta` (the stop reason and the usage so far, which is
//! cumulative: the last one counts) and `message_stop`. A `ping` may come anywhere, and an
//! `error` event may end the stream mid-way (an overloaded upstream). New event and delta types
//! appear over time: they are skipped, not errors.

use std::time::SystemTime;

use futures::{Stream, StreamExt};
use serde::Deserialize;

use super::{AnthropicUsage, finish_reason};
use crate::classify::{classify_http_failure, truncate};
use crate::{FinishReason, ProviderError, StreamEvent};

/// The wire shape of an event's data; every event's data names its own type.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Wire {
    MessageStart {
        message: WireMessage,
    },
    ContentBlockStart {
        index: usize,
        content_block: WireBlock,
    },
    ContentBlockDelta {
        index: usize,
        delta: WireDelta,
    },
    ContentBlockStop {},
    MessageDelta {
        delta: WireStop,
        #[serde(default)]
        usage: AnthropicUsage,
    },
    MessageStop {},
    Ping {},
    Error {
        error: WireError,
    },
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    model: String,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// thinking_delta, signature_delta, citations_delta, and those to come.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct WireStop {
    stop_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireError {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// The events in a stream of body bytes. Malformed event data ends the stream with a
/// [`ProviderError::MalformedReply`]; an `error` event ends it with that error as the one
/// classifier reads it (an `overloaded_error` is an upstream fault, as a 529 would be).
pub fn events<S, B, E>(bytes: S) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]> + Send + 'static,
    E: Into<ProviderError> + Send + 'static,
{
    let events = crate::stream::event_data(bytes)
        .map(|data| data.and_then(|data| parse(&data)))
        .scan(Progress::default(), |progress, parsed| futures::future::ready(progress.next(parsed)))
        .filter_map(futures::future::ready);
    crate::stream::until_last(events)
}

/// What the stream said so far that later events build on.
#[derive(Debug, Default)]
struct Progress {
    /// Usage is reported in parts (the input at the start, the output in each delta).
    usage: AnthropicUsage,
    failed: bool,
}

impl Progress {
    /// `None` ends the stream (nothing after an error is worth reading); `Some(None)` skips an
    /// event that carries nothing the gateway needs.
    #[allow(clippy::option_option)]
    fn next(
        &mut self,
        parsed: Result<Option<Parsed>, ProviderError>,
    ) -> Option<Option<Result<StreamEvent, ProviderError>>> {
        if self.failed {
            return None;
        }
        let event = match parsed {
            Err(err) => {
                self.failed = true;
                return Some(Some(Err(err)));
            }
            Ok(None) => return Some(None),
            Ok(Some(Parsed::Event(event))) => event,
            Ok(Some(Parsed::Start { model, usage })) => {
                self.usage = usage;
                StreamEvent::Start { model, usage: usage.into_usage() }
            }
            Ok(Some(Parsed::Delta { finish_reason, usage })) => {
                self.usage = self.usage.updated_by(usage);
                StreamEvent::Delta { finish_reason, usage: self.usage.into_usage() }
            }
        };
        Some(Some(Ok(event)))
    }
}

/// One event's data, before the usage reported so far is folded in.
enum Parsed {
    Event(StreamEvent),
    Start { model: String, usage: AnthropicUsage },
    Delta { finish_reason: Option<FinishReason>, usage: AnthropicUsage },
}

/// One event's data; `None` for an event this parser does not need.
fn parse(data: &str) -> Result<Option<Parsed>, ProviderError> {
    let wire: Wire = serde_json::from_str(data).map_err(|err| ProviderError::MalformedReply {
        message: format!("unreadable stream event ({err}): {}", truncate(data)),
    })?;
    let event = match wire {
        Wire::MessageStart { message } => {
            return Ok(Some(Parsed::Start { model: message.model, usage: message.usage }));
        }
        Wire::MessageDelta { delta, usage } => {
            let finish_reason = delta.stop_reason.as_deref().map(|reason| finish_reason(Some(reason)));
            return Ok(Some(Parsed::Delta { finish_reason, usage }));
        }
        Wire::ContentBlockStart { index, content_block: WireBlock::Text { text } } => {
            (!text.is_empty()).then_some(StreamEvent::Text { index, text })
        }
        Wire::ContentBlockStart { index, content_block: WireBlock::ToolUse { id, name } } => {
            Some(StreamEvent::ToolCallStart { index, id, name })
        }
        Wire::ContentBlockDelta { index, delta: WireDelta::TextDelta { text } } => {
            Some(StreamEvent::Text { index, text })
        }
        Wire::ContentBlockDelta { index, delta: WireDelta::InputJsonDelta { partial_json } } => {
            Some(StreamEvent::ToolCallArguments { index, partial_json })
        }
        Wire::MessageStop {} => Some(StreamEvent::Stop),
        Wire::Ping {} => Some(StreamEvent::Ping),
        Wire::Error { error } => return Err(stream_error(&error)),
        Wire::ContentBlockStart { content_block: WireBlock::Other, .. }
        | Wire::ContentBlockDelta { delta: WireDelta::Other, .. }
        | Wire::ContentBlockStop {}
        | Wire::Unknown => None,
    };
    Ok(event.map(Parsed::Event))
}

/// An error event, classified as the status Anthropic gives the same error type would be.
fn stream_error(error: &WireError) -> ProviderError {
    let status = match error.kind.as_str() {
        "overloaded_error" => 529,
        "rate_limit_error" => 429,
        "api_error" => 500,
        "timeout_error" => 504,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        _ => 400,
    };
    let body = serde_json::json!({ "type": "error", "error": { "type": error.kind, "message": error.message } });
    classify_http_failure(status, &reqwest::header::HeaderMap::new(), body.to_string().as_bytes(), SystemTime::now())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{ErrorClass, StreamedReply};

    const STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-haiku-4-5\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"hm\"}}\n\n\
event: some_future_event\n\
data: {\"type\":\"some_future_event\",\"detail\":1}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" world\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":12}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    /// The stream's bytes in pieces of `size`, as a network would cut them.
    fn chunks(text: &str, size: usize) -> impl Stream<Item = Result<Vec<u8>, ProviderError>> + Send + 'static {
        let pieces: Vec<Result<Vec<u8>, ProviderError>> =
            text.as_bytes().chunks(size).map(|piece| Ok(piece.to_vec())).collect();
        futures::stream::iter(pieces)
    }

    async fn collect(text: &str, size: usize) -> Vec<Result<StreamEvent, ProviderError>> {
        events(chunks(text, size)).collect().await
    }

    #[tokio::test]
    async fn a_whole_stream_folds_into_one_reply_however_it_is_cut() {
        for size in [1, 7, 64, STREAM.len()] {
            let events = collect(STREAM, size).await;
            let mut reply = StreamedReply::default();
            for event in &events {
                let _ = reply.push(event.as_ref().unwrap());
            }
            assert!(events.iter().any(|event| matches!(event, Ok(StreamEvent::Ping))));
            let reply = reply.finish("anthropic", Duration::ZERO).unwrap();
            assert_eq!(reply.content, "Hello world", "cut every {size} bytes");
            assert_eq!(reply.finish_reason, FinishReason::Stop);
            // The last message_delta's usage counts; the input from message_start stays.
            assert_eq!(reply.usage.output_tokens, 15);
            assert_eq!(reply.usage.input_tokens, 125);
            assert_eq!(reply.usage.cached_input_tokens, 100);
        }
    }

    #[tokio::test]
    async fn an_error_event_ends_the_stream_classified() {
        let cut = STREAM.find("event: content_block_stop").unwrap();
        let text = format!(
            "{}event: error\ndata: {{\"type\": \"error\", \"error\": {{\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}}}\n\n{}",
            &STREAM[..cut],
            &STREAM[cut..]
        );
        let events = collect(&text, 13).await;
        let last = events.last().unwrap().as_ref().unwrap_err();
        assert_eq!(last.class(), ErrorClass::ServerError);
        assert!(last.class().is_upstream_fault());
        assert_eq!(events.iter().filter(|event| event.is_err()).count(), 1, "nothing is read after the error");
    }

    #[tokio::test]
    async fn a_stream_cut_short_is_malformed() {
        let cut = STREAM.find("event: message_stop").unwrap();
        let mut reply = StreamedReply::default();
        for event in collect(&STREAM[..cut], 50).await {
            let _ = reply.push(&event.unwrap());
        }
        let err = reply.finish("anthropic", Duration::ZERO).unwrap_err();
        assert_eq!(err.class(), ErrorClass::MalformedReply);
    }

    #[tokio::test]
    async fn garbage_data_is_a_malformed_reply_not_a_panic() {
        let events = collect("event: message_start\ndata: {not json\n\n", 5).await;
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].as_ref().unwrap_err().class(), ErrorClass::MalformedReply);
    }

    #[tokio::test]
    async fn tool_calls_stream_their_arguments() {
        let text = "event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"get_weather\",\"input\":{}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":9}}\n\n";
        let events: Vec<StreamEvent> = collect(text, 9).await.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            events[0],
            StreamEvent::ToolCallStart { index: 1, id: "toolu_1".into(), name: "get_weather".into() }
        );
        assert_eq!(events[1], StreamEvent::ToolCallArguments { index: 1, partial_json: "{\"city\": ".into() });
        assert!(matches!(events[2], StreamEvent::Delta { finish_reason: Some(FinishReason::ToolCalls), .. }));
    }
}
