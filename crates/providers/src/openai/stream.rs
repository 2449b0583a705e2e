//! OpenAI's streamed chat completion (`chat.completion.chunk` events, then `[DONE]`), parsed
//! from the bytes of a `text/event-stream` body into the providers' [`StreamEvent`]s.
//!
//! Servers that speak the API differ in what a chunk carries (llama.cpp's and vLLM's leave
//! out fields OpenAI sends), so a chunk is read for what the gateway needs and nothing else is
//! required. The usage comes in a last chunk with no choices when `stream_options.include_usage`
//! was asked for.

use std::time::SystemTime;

use futures::{Stream, StreamExt};
use serde::Deserialize;

use crate::classify::{classify_http_failure, truncate};
use crate::{FinishReason, ProviderError, StreamEvent, Usage};

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    model: String,
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// A failure reported inside the stream, after the 200.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Choice {
    #[serde(default)]
    delta: ChoiceDelta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct ChoiceDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallDelta>,
}

#[derive(Debug, Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    index: usize,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u32>,
}

/// OpenAI's `finish_reason` in the providers' terms.
pub(crate) fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "length" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// The events in a stream of body bytes. Unreadable chunk data ends the stream with a
/// [`ProviderError::MalformedReply`]; an error object in the stream ends it with that error,
/// classified as the server error it is; nothing is read after either.
pub fn events<S, B, E>(bytes: S) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]> + Send + 'static,
    E: Into<ProviderError> + Send + 'static,
{
    let events = crate::stream::event_data(bytes)
        .scan(Progress::default(), |progress, data| {
            let events = match data {
                _ if progress.done => None,
                Ok(data) => Some(progress.read(&data)),
                Err(err) => {
                    progress.done = true;
                    Some(vec![Err(err)])
                }
            };
            futures::future::ready(events)
        })
        .flat_map(futures::stream::iter);
    crate::stream::until_last(events)
}

/// What the stream said so far that later chunks build on.
#[derive(Debug, Default)]
struct Progress {
    started: bool,
    /// The stream's own tool call indices already begun.
    tool_calls: Vec<usize>,
    usage: Usage,
    /// `[DONE]` or an error: nothing after it is read.
    done: bool,
}

impl Progress {
    fn read(&mut self, data: &str) -> Vec<Result<StreamEvent, ProviderError>> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return vec![Ok(StreamEvent::Stop)];
        }
        let chunk: Chunk = match serde_json::from_str(data) {
            Ok(chunk) => chunk,
            Err(err) => {
                self.done = true;
                return vec![Err(ProviderError::MalformedReply {
                    message: format!("unreadable stream chunk ({err}): {}", truncate(data)),
                })];
            }
        };
        if let Some(error) = chunk.error {
            self.done = true;
            let body = serde_json::json!({ "error": error }).to_string();
            return vec![Err(classify_http_failure(
                500,
                &reqwest::header::HeaderMap::new(),
                body.as_bytes(),
                SystemTime::now(),
            ))];
        }
        let mut events = Vec::new();
        if !self.started {
            self.started = true;
            events.push(Ok(StreamEvent::Start { model: chunk.model.clone(), usage: Usage::default() }));
        }
        let mut finish = None;
        for choice in chunk.choices.into_iter().take(1) {
            if let Some(text) = choice.delta.content.filter(|text| !text.is_empty()) {
                events.push(Ok(StreamEvent::Text { index: 0, text }));
            }
            for call in choice.delta.tool_calls {
                let function = call.function.unwrap_or(FunctionDelta { name: None, arguments: None });
                if !self.tool_calls.contains(&call.index) {
                    self.tool_calls.push(call.index);
                    events.push(Ok(StreamEvent::ToolCallStart {
                        index: call.index,
                        id: call.id.unwrap_or_default(),
                        name: function.name.unwrap_or_default(),
                    }));
                }
                if let Some(partial_json) = function.arguments.filter(|arguments| !arguments.is_empty()) {
                    events.push(Ok(StreamEvent::ToolCallArguments { index: call.index, partial_json }));
                }
            }
            finish = choice.finish_reason.as_deref().map(finish_reason);
        }
        let reports_usage = chunk.usage.is_some();
        if let Some(usage) = chunk.usage {
            self.usage = Usage {
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
                cached_input_tokens: usage.prompt_tokens_details.and_then(|details| details.cached_tokens).unwrap_or(0),
                cache_write_tokens: 0,
            };
        }
        if finish.is_some() || reports_usage {
            events.push(Ok(StreamEvent::Delta { finish_reason: finish, usage: self.usage }));
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{ErrorClass, StreamedReply};

    const STREAM: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n\
: a comment line, as proxies send to keep the connection open\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"},\"finish_reason\":null}]}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"id\":\"c1\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,\"total_tokens\":14,\"prompt_tokens_details\":{\"cached_tokens\":8}}}\n\n\
data: [DONE]\n\n";

    fn chunks(text: &str, size: usize) -> impl Stream<Item = Result<Vec<u8>, ProviderError>> + Send + 'static {
        let pieces: Vec<Result<Vec<u8>, ProviderError>> =
            text.as_bytes().chunks(size).map(|piece| Ok(piece.to_vec())).collect();
        futures::stream::iter(pieces)
    }

    async fn fold(text: &str, size: usize) -> Result<crate::ChatResponse, ProviderError> {
        let mut reply = StreamedReply::default();
        let mut events = std::pin::pin!(events(chunks(text, size)));
        while let Some(event) = events.next().await {
            let _ = reply.push(&event?);
        }
        reply.finish("openai", Duration::ZERO)
    }

    #[tokio::test]
    async fn a_whole_stream_folds_into_one_reply_however_it_is_cut() {
        for size in [1, 5, 64, STREAM.len()] {
            let reply = fold(STREAM, size).await.unwrap();
            assert_eq!(reply.content, "Hello world", "cut every {size} bytes");
            assert_eq!(reply.model, "gpt-4o-mini-2024-07-18");
            assert_eq!(reply.usage.input_tokens, 12);
            assert_eq!(reply.usage.cached_input_tokens, 8);
            assert_eq!(reply.finish_reason, FinishReason::Stop);
        }
    }

    #[tokio::test]
    async fn tool_call_deltas_assemble_by_index() {
        let text = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\"}}]}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Oslo\\\"}\"}}]}}]}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n\
data: [DONE]\n\n";
        let reply = fold(text, 7).await.unwrap();
        assert_eq!(reply.tool_calls.len(), 1);
        assert_eq!(reply.tool_calls[0].id, "call_1");
        assert_eq!(reply.tool_calls[0].arguments, "{\"city\":\"Oslo\"}");
        assert_eq!(reply.finish_reason, FinishReason::ToolCalls);
    }

    #[tokio::test]
    async fn an_error_in_the_stream_ends_it_classified() {
        let cut = STREAM
            .find("data: {\"id\":\"c1\",\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},")
            .unwrap();
        let text = format!(
            "{}data: {{\"error\": {{\"message\": \"The server had an error\", \"type\": \"server_error\"}}}}\n\n{}",
            &STREAM[..cut],
            &STREAM[cut..]
        );
        let all: Vec<_> = events(chunks(&text, 11)).collect().await;
        let last = all.last().unwrap().as_ref().unwrap_err();
        assert_eq!(last.class(), ErrorClass::ServerError);
        assert_eq!(all.iter().filter(|event| event.is_err()).count(), 1, "nothing is read after the error");
    }

    #[tokio::test]
    async fn a_stream_without_done_is_cut_short() {
        let cut = STREAM.find("data: [DONE]").unwrap();
        assert_eq!(fold(&STREAM[..cut], 50).await.unwrap_err().class(), ErrorClass::MalformedReply);
        assert_eq!(fold("data: {not json\n\n", 3).await.unwrap_err().class(), ErrorClass::MalformedReply);
    }
}
