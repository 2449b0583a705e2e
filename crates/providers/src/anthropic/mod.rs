//! Anthropic's Messages API, natively: no translating proxy in front.
//!
//! What differs from OpenAI's chat completions, and how each difference is bridged:
//! - one top-level `system` (every system message, joined by a newline);
//! - `max_tokens` is required (the request's output budget, else a configured default);
//! - `temperature` runs from 0 to 1, not 2: higher values are sent as 1;
//! - `stop_reason` has its own words ([`finish_reason`]);
//! - input tokens are split three ways (plain, written to and read from the prompt cache): the
//!   [`Usage`] counts them all as input and keeps the cached ones apart, priced apart;
//! - there is no JSON mode: a structured step's schema reaches the model through the prompt,
//!   and its reply is checked as any other's;
//! - failures come as `{"type": "error", "error": {"type", "message"}}`, classified by the one
//!   classifier ([`crate::classify_http_failure`]) like every other provider's.

mod stream;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::Service;

pub use self::stream::events;
use crate::classify::{classify_http_failure, declared_limits, transport_failure, truncate};
use crate::{
    ChatMessage, ChatRequest, ChatResponse, FinishReason, ProviderError, Role, StreamEvent, ToolCall, ToolChoice, Usage,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The API version every request names; the Messages API's only one so far.
pub const API_VERSION: &str = "2023-06-01";

/// Where and how to reach Anthropic's Messages API.
#[derive(Clone)]
pub struct AnthropicSettings {
    /// Names the provider in results, telemetry and breaker keys.
    pub name: String,
    /// Up to and including the version segment, e.g. `https://api.anthropic.com/v1`.
    pub base_url: String,
    pub api_key: String,
    /// `max_tokens` for a request that sets no output budget: the API requires one.
    pub default_max_tokens: u32,
    /// Per attempt: from sending the request to the last byte of the reply.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl fmt::Debug for AnthropicSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicSettings")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &if self.api_key.is_empty() { "(unset)" } else { "(set)" })
            .field("default_max_tokens", &self.default_max_tokens)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// A chat provider for Anthropic's Messages API, on reqwest.
#[derive(Clone)]
pub struct Anthropic {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    settings: AnthropicSettings,
}

impl fmt::Debug for Anthropic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Anthropic").field("name", &self.inner.settings.name).finish_non_exhaustive()
    }
}

impl Anthropic {
    pub fn new(settings: AnthropicSettings) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .build()
            .map_err(|err| ProviderError::InvalidRequest { message: format!("cannot build the HTTP client: {err}") })?;
        Ok(Self { inner: Arc::new(Inner { http, settings }) })
    }

    pub fn name(&self) -> &str {
        &self.inner.settings.name
    }

    /// Sends `body` and hands back the response if it is a success; any other status is
    /// classified while its headers and body are at hand.
    async fn send(&self, body: &MessagesRequest<'_>, trace_id: &str) -> Result<reqwest::Response, ProviderError> {
        let settings = &self.inner.settings;
        let url = format!("{}/messages", settings.base_url.trim_end_matches('/'));
        let payload = serde_json::to_vec(body)
            .map_err(|err| ProviderError::InvalidRequest { message: format!("cannot encode the request: {err}") })?;
        let mut request = self
            .inner
            .http
            .post(url)
            .header("x-api-key", &settings.api_key)
            .header("anthropic-version", API_VERSION)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(payload);
        // A trace id that is not a valid header value is simply not forwarded.
        if reqwest::header::HeaderValue::from_str(trace_id).is_ok() {
            request = request.header("x-request-id", trace_id);
        }
        let response = request.send().await.map_err(|err| self.transport(&err))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(|err| self.transport(&err))?;
        Err(self.scrub(classify_http_failure(status.as_u16(), &headers, &body, SystemTime::now())))
    }

    fn transport(&self, err: &reqwest::Error) -> ProviderError {
        self.scrub(transport_failure(err, self.inner.settings.request_timeout))
    }

    fn scrub(&self, err: ProviderError) -> ProviderError {
        err.scrubbed(&[&self.inner.settings.api_key])
    }

    async fn complete(self, request: ChatRequest) -> Result<ChatResponse, ProviderError> {
        if let Some(sink) = &request.stream {
            let started = Instant::now();
            let events = self.stream(&request).await?;
            return crate::stream::forward(events, sink, &self.inner.settings.name, started).await;
        }
        let body = MessagesRequest::from_chat(&request, self.inner.settings.default_max_tokens, false)?;
        let started = Instant::now();
        let response = self.send(&body, &request.trace_id).await?;
        let declared = declared_limits(response.headers());
        let bytes = response.bytes().await.map_err(|err| self.transport(&err))?;
        let reply: MessagesResponse = serde_json::from_slice(&bytes).map_err(|err| ProviderError::MalformedReply {
            message: format!("{err}; the body was: {}", truncate(&String::from_utf8_lossy(&bytes))),
        })?;
        let mut response = reply.into_chat(&self.inner.settings.name, started.elapsed())?;
        response.declared_limits = declared;
        Ok(response)
    }

    /// The reply as it is written: Anthropic's stream events, parsed (unknown event and delta
    /// types are skipped; an `error` event mid-stream ends it with that error, classified).
    /// [`StreamedReply`] folds them into a [`ChatResponse`].
    pub async fn stream(
        &self,
        request: &ChatRequest,
    ) -> Result<impl Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static, ProviderError> {
        let body = MessagesRequest::from_chat(request, self.inner.settings.default_max_tokens, true)?;
        let response = self.send(&body, &request.trace_id).await?;
        let timeout = self.inner.settings.request_timeout;
        let secrets = self.inner.settings.api_key.clone();
        let bytes = futures::StreamExt::map(response.bytes_stream(), move |chunk| {
            chunk.map_err(|err| transport_failure(&err, timeout).scrubbed(&[&secrets]))
        });
        Ok(events(bytes))
    }
}

impl Service<ChatRequest> for Anthropic {
    type Response = ChatResponse;
    type Error = ProviderError;
    type Future = BoxFuture<Result<ChatResponse, ProviderError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ChatRequest) -> Self::Future {
        Box::pin(self.clone().complete(request))
    }
}

/// A Messages API request body.
#[derive(Debug, Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "String::is_empty")]
    system: String,
    messages: Vec<Message>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

/// A message: plain text, or content blocks (images, tool calls, tool results).
#[derive(Debug, Serialize)]
struct Message {
    role: &'static str,
    content: Value,
}

impl<'a> MessagesRequest<'a> {
    fn from_chat(request: &'a ChatRequest, default_max_tokens: u32, stream: bool) -> Result<Self, ProviderError> {
        let system = request
            .messages
            .iter()
            .filter(|message| message.role == Role::System)
            .map(|message| message.content.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let mut messages: Vec<Message> = Vec::with_capacity(request.messages.len());
        for message in &request.messages {
            let (role, content) = match message.role {
                Role::System => continue,
                Role::User => ("user", user_content(message)),
                Role::Assistant => ("assistant", assistant_content(message)?),
                Role::Tool => ("user", tool_result(message)?),
            };
            // Tool results answering one turn's calls go back in one user message.
            match messages.last_mut() {
                Some(last) if message.role == Role::Tool && last.role == "user" && is_tool_results(&last.content) => {
                    if let (Value::Array(blocks), Value::Array(more)) = (&mut last.content, content) {
                        blocks.extend(more);
                    }
                }
                _ => messages.push(Message { role, content }),
            }
        }
        if messages.is_empty() {
            return Err(ProviderError::InvalidRequest {
                message: "Anthropic's Messages API needs at least one user or assistant message besides the system \
                          prompt"
                    .into(),
            });
        }
        let tools = request
            .tools
            .iter()
            .map(|tool| {
                let mut spec = json!({
                    "name": tool.name,
                    "input_schema": tool.parameters.clone().unwrap_or_else(|| json!({"type": "object"})),
                });
                if let Some(description) = &tool.description {
                    spec["description"] = json!(description);
                }
                spec
            })
            .collect();
        let mut tool_choice = request.tool_choice.as_ref().map(|choice| match choice {
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Function(name) => json!({"type": "tool", "name": name}),
        });
        if request.parallel_tool_calls == Some(false) && !request.tools.is_empty() {
            tool_choice.get_or_insert_with(|| json!({"type": "auto"}))["disable_parallel_tool_use"] = json!(true);
        }
        Ok(Self {
            model: &request.model,
            system,
            messages,
            max_tokens: request.max_output_tokens.unwrap_or(default_max_tokens),
            temperature: request.temperature.map(|t| t.clamp(0.0, 1.0)),
            top_p: request.extras.top_p,
            stop_sequences: &request.extras.stop,
            tools,
            tool_choice,
            metadata: request.extras.user.as_ref().map(|user| json!({"user_id": user})),
            stream,
        })
    }
}

fn user_content(message: &ChatMessage) -> Value {
    if message.images.is_empty() {
        return json!(message.content);
    }
    let mut blocks = vec![json!({"type": "text", "text": message.content})];
    blocks.extend(message.images.iter().map(|image| {
        // A data URL carries the image itself; anything else is fetched by Anthropic.
        let source = match image.url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")) {
            Some((media_type, data)) => json!({"type": "base64", "media_type": media_type, "data": data}),
            None => json!({"type": "url", "url": image.url}),
        };
        json!({"type": "image", "source": source})
    }));
    Value::Array(blocks)
}

fn assistant_content(message: &ChatMessage) -> Result<Value, ProviderError> {
    if message.tool_calls.is_empty() {
        return Ok(json!(message.content));
    }
    let mut blocks = Vec::with_capacity(message.tool_calls.len() + 1);
    if !message.content.is_empty() {
        blocks.push(json!({"type": "text", "text": message.content}));
    }
    for call in &message.tool_calls {
        let input: Value = serde_json::from_str(&call.arguments).map_err(|err| ProviderError::InvalidRequest {
            message: format!(
                "tool call `{}` has arguments that are not JSON ({err}): Anthropic needs an object",
                call.id
            ),
        })?;
        blocks.push(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input}));
    }
    Ok(Value::Array(blocks))
}

fn tool_result(message: &ChatMessage) -> Result<Value, ProviderError> {
    let id = message.tool_call_id.as_deref().ok_or_else(|| ProviderError::InvalidRequest {
        message: "a tool message needs the `tool_call_id` of the call it answers".into(),
    })?;
    Ok(json!([{"type": "tool_result", "tool_use_id": id, "content": message.content}]))
}

fn is_tool_results(content: &Value) -> bool {
    content.as_array().is_some_and(|blocks| blocks.iter().all(|block| block["type"] == "tool_result"))
}

/// A Messages API reply; fields it does not use are ignored, unknown block types skipped.
#[derive(Debug, Deserialize)]
struct MessagesResponse {
    model: String,
    content: Vec<ContentBlock>,
    stop_reason: Option<String>,
    usage: AnthropicUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

/// Anthropic's usage: `input_tokens` counts only what the prompt cache neither wrote nor read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl AnthropicUsage {
    /// In our terms: every prompt token counts as input, the cached ones also apart.
    pub(crate) fn into_usage(self) -> Usage {
        let written = self.cache_creation_input_tokens.unwrap_or(0);
        let read = self.cache_read_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: self.input_tokens.unwrap_or(0).saturating_add(written).saturating_add(read),
            output_tokens: self.output_tokens.unwrap_or(0),
            cached_input_tokens: read,
            cache_write_tokens: written,
        }
    }

    /// This usage updated by a later report (a stream's `message_delta`, cumulative): what
    /// it states replaces what was known.
    pub(crate) fn updated_by(self, later: Self) -> Self {
        Self {
            input_tokens: later.input_tokens.or(self.input_tokens),
            output_tokens: later.output_tokens.or(self.output_tokens),
            cache_creation_input_tokens: later.cache_creation_input_tokens.or(self.cache_creation_input_tokens),
            cache_read_input_tokens: later.cache_read_input_tokens.or(self.cache_read_input_tokens),
        }
    }
}

/// Anthropic's `stop_reason` in OpenAI's words.
pub(crate) fn finish_reason(stop_reason: Option<&str>) -> FinishReason {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        // end_turn, stop_sequence, pause_turn, and any reason added later.
        _ => FinishReason::Stop,
    }
}

impl MessagesResponse {
    fn into_chat(self, provider: &str, latency: Duration) -> Result<ChatResponse, ProviderError> {
        let finish_reason = finish_reason(self.stop_reason.as_deref());
        let mut content = String::new();
        let mut texts = 0;
        let mut tool_calls = Vec::new();
        for block in self.content {
            match block {
                ContentBlock::Text { text } => {
                    texts += 1;
                    content.push_str(&text);
                }
                ContentBlock::ToolUse { id, name, input } => {
                    tool_calls.push(ToolCall { id, name, arguments: input.to_string() });
                }
                ContentBlock::Other => {}
            }
        }
        if texts == 0
            && tool_calls.is_empty()
            && !matches!(finish_reason, FinishReason::ContentFilter | FinishReason::ToolCalls)
        {
            return Err(ProviderError::MalformedReply { message: "the reply has no text content".into() });
        }
        Ok(ChatResponse {
            content,
            tool_calls,
            model: self.model,
            provider: provider.to_owned(),
            usage: self.usage.into_usage(),
            finish_reason,
            latency,
            declared_limits: None,
            time_to_first_token: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ResponseFormat;

    fn request(messages: Vec<ChatMessage>) -> ChatRequest {
        ChatRequest {
            model: "claude-haiku-4-5".into(),
            messages,
            temperature: Some(1.4),
            response_format: ResponseFormat::Text,
            trace_id: "t".into(),
            ..ChatRequest::default()
        }
    }

    #[test]
    fn system_messages_are_hoisted_and_max_tokens_always_sent() {
        let chat = request(vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hi"),
            ChatMessage::system("Answer in French."),
        ]);
        let body = serde_json::to_value(MessagesRequest::from_chat(&chat, 2048, false).unwrap()).unwrap();
        assert_eq!(body["system"], "Be brief.\nAnswer in French.");
        assert_eq!(body["messages"], serde_json::json!([{"role": "user", "content": "Hi"}]));
        assert_eq!(body["max_tokens"], 2048);
        assert_eq!(body["temperature"], 1.0);
        assert!(body.get("stream").is_none());
    }

    #[test]
    fn a_system_prompt_alone_is_not_a_request() {
        let err = MessagesRequest::from_chat(&request(vec![ChatMessage::system("x")]), 10, false).unwrap_err();
        assert!(err.to_string().contains("at least one user"), "{err}");
    }

    #[test]
    fn stop_reasons_in_openai_words() {
        assert_eq!(finish_reason(Some("end_turn")), FinishReason::Stop);
        assert_eq!(finish_reason(Some("stop_sequence")), FinishReason::Stop);
        assert_eq!(finish_reason(Some("max_tokens")), FinishReason::Length);
        assert_eq!(finish_reason(Some("tool_use")), FinishReason::ToolCalls);
        assert_eq!(finish_reason(Some("refusal")), FinishReason::ContentFilter);
        assert_eq!(finish_reason(Some("a_reason_from_next_year")), FinishReason::Stop);
    }

    #[test]
    fn usage_counts_cached_input_as_input_and_apart() {
        let usage: AnthropicUsage = serde_json::from_str(
            r#"{"input_tokens": 10, "cache_creation_input_tokens": 200, "cache_read_input_tokens": 3000, "output_tokens": 7}"#,
        )
        .unwrap();
        let usage = usage.into_usage();
        assert_eq!(usage.input_tokens, 3210);
        assert_eq!(usage.cached_input_tokens, 3000);
        assert_eq!(usage.cache_write_tokens, 200);
        assert_eq!(usage.uncached_input_tokens(), 10);
        assert_eq!(usage.output_tokens, 7);
    }

    #[test]
    fn replies_join_text_blocks_and_skip_others() {
        let reply: MessagesResponse = serde_json::from_str(
            r#"{"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001",
                "content": [{"type": "thinking", "thinking": "..."}, {"type": "text", "text": "Hello"},
                            {"type": "text", "text": " world"}],
                "stop_reason": "end_turn", "usage": {"input_tokens": 3, "output_tokens": 2}}"#,
        )
        .unwrap();
        let chat = reply.into_chat("anthropic", Duration::ZERO).unwrap();
        assert_eq!(chat.content, "Hello world");
        assert_eq!(chat.usage, Usage::new(3, 2));
    }
}
