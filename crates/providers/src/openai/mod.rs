mod stream;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::{HttpRequestFactory, ReqwestService};
use async_openai::traits::RequestOptionsBuilder;
use async_openai::types::chat::{self, ChatCompletionMessageToolCalls, CreateChatCompletionResponse};
use futures::StreamExt;
use serde_json::{Map, Value, json};
use tower::Service;

pub use self::stream::events;
use crate::classify::{classify_http_failure, declared_limits, transport_failure, truncate};
use crate::{
    ChatMessage, ChatRequest, ChatResponse, DeclaredLimits, FinishReason, ProviderError, Role, StreamSink, ToolCall,
    ToolChoice, Usage,
};

tokio::task_local! {
    /// The rate limits the transport read from the response's headers, for the call that is
    /// waiting for it: async-openai hands back the parsed body only.
    static DECLARED: std::cell::Cell<Option<DeclaredLimits>>;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Where and how to reach an OpenAI-compatible chat endpoint.
#[derive(Clone)]
pub struct OpenAiSettings {
    /// Names the provider in results, telemetry and breaker keys.
    pub name: String,
    /// Up to and including the version segment, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub api_key: String,
    /// Per attempt: from sending the request to the last byte of the reply.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Whether the server ends a stream with its usage when asked (`stream_options`); servers
    /// that refuse the option are not sent it.
    pub stream_usage: bool,
}

impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &if self.api_key.is_empty() { "(unset)" } else { "(set)" })
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("stream_usage", &self.stream_usage)
            .finish()
    }
}

/// A chat provider for any OpenAI-compatible endpoint, through async-openai.
#[derive(Clone)]
pub struct OpenAiCompatible {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_openai::Client<OpenAIConfig>,
    /// Streams are read here, chunk by chunk, rather than through async-openai, whose stream
    /// hides a failure's status and headers.
    http: reqwest::Client,
    base_url: String,
    stream_usage: bool,
    name: String,
    request_timeout: Duration,
    /// Masked in every error message, should the upstream echo it.
    api_key: String,
}

impl fmt::Debug for OpenAiCompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiCompatible").field("name", &self.inner.name).finish_non_exhaustive()
    }
}

impl OpenAiCompatible {
    pub fn new(settings: OpenAiSettings) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.connect_timeout)
            .build()
            .map_err(|err| ProviderError::InvalidRequest { message: format!("cannot build the HTTP client: {err}") })?;
        let config = OpenAIConfig::new()
            .with_api_base(settings.base_url.trim_end_matches('/'))
            .with_api_key(settings.api_key.clone());
        // Our own transport replaces async-openai's default executor, which retries 429 and 5xx
        // by itself: retries must have one owner (the engine), and the classifier needs the
        // status, headers and body of a failure, which the default path drops (Retry-After).
        let transport = SurfaceFailures { inner: ReqwestService::new(http.clone()), timeout: settings.request_timeout };
        let client = async_openai::Client::build(http.clone(), config).with_http_service(transport);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                http,
                base_url: settings.base_url.trim_end_matches('/').to_owned(),
                stream_usage: settings.stream_usage,
                name: settings.name,
                request_timeout: settings.request_timeout,
                api_key: settings.api_key,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    async fn complete(self, request: ChatRequest) -> Result<ChatResponse, ProviderError> {
        if let Some(sink) = &request.stream {
            return self.stream(&request, sink).await;
        }
        let inner = &self.inner;
        let trace_id = request.trace_id.clone();
        let body = request_body(&request)?;
        let started = Instant::now();
        let chat = inner.client.chat();
        // A trace id that is not a valid header value is simply not forwarded.
        let chat = match chat.header("x-request-id", trace_id.as_str()) {
            Ok(with_header) => with_header,
            Err(_) => inner.client.chat(),
        };
        let (reply, declared) = DECLARED
            .scope(std::cell::Cell::new(None), async {
                // The body as built, not re-typed: every parameter is sent only when set.
                let reply = chat.create_byot::<Value, CreateChatCompletionResponse>(body).await;
                (reply, DECLARED.with(std::cell::Cell::get))
            })
            .await;
        let reply = reply.map_err(|err| from_openai_error(err, inner.request_timeout).scrubbed(&[&inner.api_key]))?;
        let mut response = from_openai_reply(reply, &inner.name, started.elapsed())?;
        response.declared_limits = declared;
        Ok(response)
    }
}

impl OpenAiCompatible {
    /// The reply streamed from the upstream, each piece forwarded to `sink` as it arrives.
    async fn stream(&self, request: &ChatRequest, sink: &StreamSink) -> Result<ChatResponse, ProviderError> {
        let inner = &self.inner;
        let mut body = request_body(request)?;
        body["stream"] = json!(true);
        if inner.stream_usage {
            // Always asked, whether or not the caller wants it: cost and telemetry need it.
            body["stream_options"] = json!({"include_usage": true});
        }
        let started = Instant::now();
        let mut post = inner.http.post(format!("{}/chat/completions", inner.base_url)).json(&body);
        if !inner.api_key.is_empty() {
            post = post.bearer_auth(&inner.api_key);
        }
        if reqwest::header::HeaderValue::from_str(&request.trace_id).is_ok() {
            post = post.header("x-request-id", &request.trace_id);
        }
        let scrub = |err: ProviderError| err.scrubbed(&[&inner.api_key]);
        let response = post.send().await.map_err(|err| scrub(transport_failure(&err, inner.request_timeout)))?;
        let status = response.status();
        let declared = declared_limits(response.headers());
        if !status.is_success() {
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(|err| scrub(transport_failure(&err, inner.request_timeout)))?;
            return Err(scrub(classify_http_failure(status.as_u16(), &headers, &body, SystemTime::now())));
        }
        let (timeout, secret) = (inner.request_timeout, inner.api_key.clone());
        let bytes = response
            .bytes_stream()
            .map(move |chunk| chunk.map_err(|err| transport_failure(&err, timeout).scrubbed(&[&secret])));
        let mut reply = crate::stream::forward(events(bytes), sink, &inner.name, started).await.map_err(scrub)?;
        reply.declared_limits = declared;
        Ok(reply)
    }
}

impl Service<ChatRequest> for OpenAiCompatible {
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

/// The request in OpenAI's words: only what is set is sent, so that servers which lack a
/// parameter are not sent it unasked.
fn request_body(request: &ChatRequest) -> Result<Value, ProviderError> {
    if request.messages.is_empty() {
        return Err(ProviderError::InvalidRequest { message: "a chat request needs at least one message".into() });
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(request.model));
    body.insert("messages".into(), request.messages.iter().map(message).collect());
    let mut set = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            body.insert(key.into(), value);
        }
    };
    set("temperature", request.temperature.map(|t| json!(t)));
    set("max_completion_tokens", request.max_output_tokens.map(|t| json!(t)));
    set(
        "response_format",
        match &request.response_format {
            crate::ResponseFormat::Text => None,
            crate::ResponseFormat::JsonObject => Some(json!({"type": "json_object"})),
            crate::ResponseFormat::JsonSchema { name, schema, strict } => {
                Some(json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}))
            }
        },
    );
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(|tool| {
            let mut function = json!({"name": tool.name});
            if let Some(description) = &tool.description {
                function["description"] = json!(description);
            }
            if let Some(parameters) = &tool.parameters {
                function["parameters"] = parameters.clone();
            }
            if let Some(strict) = tool.strict {
                function["strict"] = json!(strict);
            }
            json!({"type": "function", "function": function})
        })
        .collect();
    set("tools", (!tools.is_empty()).then_some(Value::Array(tools)));
    set(
        "tool_choice",
        request.tool_choice.as_ref().map(|choice| match choice {
            ToolChoice::None => json!("none"),
            ToolChoice::Auto => json!("auto"),
            ToolChoice::Required => json!("required"),
            ToolChoice::Function(name) => json!({"type": "function", "function": {"name": name}}),
        }),
    );
    set("parallel_tool_calls", request.parallel_tool_calls.map(|parallel| json!(parallel)));
    let extras = &request.extras;
    set("top_p", extras.top_p.map(|p| json!(p)));
    set("stop", (!extras.stop.is_empty()).then(|| json!(extras.stop)));
    set("seed", extras.seed.map(|seed| json!(seed)));
    set("presence_penalty", extras.presence_penalty.map(|p| json!(p)));
    set("frequency_penalty", extras.frequency_penalty.map(|p| json!(p)));
    set("logit_bias", (!extras.logit_bias.is_empty()).then(|| json!(extras.logit_bias)));
    set("user", extras.user.as_ref().map(|user| json!(user)));
    set("metadata", (!extras.metadata.is_empty()).then(|| json!(extras.metadata)));
    Ok(Value::Object(body))
}

fn message(message: &ChatMessage) -> Value {
    match message.role {
        Role::System => json!({"role": "system", "content": message.content}),
        Role::User if message.images.is_empty() => json!({"role": "user", "content": message.content}),
        Role::User => {
            let mut parts = vec![json!({"type": "text", "text": message.content})];
            parts.extend(message.images.iter().map(|image| {
                let mut url = json!({"url": image.url});
                if let Some(detail) = &image.detail {
                    url["detail"] = json!(detail);
                }
                json!({"type": "image_url", "image_url": url})
            }));
            json!({"role": "user", "content": parts})
        }
        Role::Assistant if message.tool_calls.is_empty() => json!({"role": "assistant", "content": message.content}),
        Role::Assistant => {
            let calls: Vec<Value> = message
                .tool_calls
                .iter()
                .map(|call| {
                    json!({"id": call.id, "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments}})
                })
                .collect();
            let content = if message.content.is_empty() { Value::Null } else { json!(message.content) };
            json!({"role": "assistant", "content": content, "tool_calls": calls})
        }
        Role::Tool => json!({"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}),
    }
}

fn from_openai_reply(
    reply: CreateChatCompletionResponse,
    provider: &str,
    latency: Duration,
) -> Result<ChatResponse, ProviderError> {
    let usage = match reply.usage {
        Some(usage) => Usage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
            cached_input_tokens: usage.prompt_tokens_details.and_then(|details| details.cached_tokens).unwrap_or(0),
            cache_write_tokens: 0,
        },
        None => {
            tracing::warn!(provider, model = %reply.model, "reply carries no usage; tokens and cost count as zero");
            Usage::default()
        }
    };
    let Some(choice) = reply.choices.into_iter().next() else {
        return Err(ProviderError::MalformedReply { message: "the reply has no choices".into() });
    };
    let finish_reason = match choice.finish_reason {
        Some(chat::FinishReason::Length) => FinishReason::Length,
        Some(chat::FinishReason::ContentFilter) => FinishReason::ContentFilter,
        Some(chat::FinishReason::ToolCalls | chat::FinishReason::FunctionCall) => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    };
    let tool_calls: Vec<ToolCall> = choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .filter_map(|call| match call {
            ChatCompletionMessageToolCalls::Function(call) => {
                Some(ToolCall { id: call.id, name: call.function.name, arguments: call.function.arguments })
            }
            ChatCompletionMessageToolCalls::Custom(_) => None,
        })
        .collect();
    let content = match (choice.message.content, choice.message.refusal) {
        (Some(content), _) => content,
        (None, _) if !tool_calls.is_empty() => String::new(),
        (None, Some(refusal)) => {
            return Err(ProviderError::MalformedReply {
                message: format!("the model refused: {}", truncate(&refusal)),
            });
        }
        (None, None) => {
            return Err(ProviderError::MalformedReply { message: "the reply has no content".into() });
        }
    };
    Ok(ChatResponse {
        content,
        tool_calls,
        model: reply.model,
        provider: provider.to_owned(),
        usage,
        finish_reason,
        latency,
        declared_limits: None,
        time_to_first_token: None,
    })
}

fn from_openai_error(err: OpenAIError, timeout: Duration) -> ProviderError {
    match err {
        OpenAIError::Boxed(boxed) => match boxed.downcast::<ProviderError>() {
            Ok(classified) => *classified,
            Err(other) => match other.downcast::<OpenAIError>() {
                Ok(inner) => from_openai_error(*inner, timeout),
                Err(other) => ProviderError::Connection { message: other.to_string() },
            },
        },
        OpenAIError::Reqwest(err) => transport_failure(&err, timeout),
        OpenAIError::ApiError(response) => {
            let body = serde_json::json!({ "error": response.api_error }).to_string();
            classify_http_failure(
                response.status_code.as_u16(),
                &reqwest::header::HeaderMap::new(),
                body.as_bytes(),
                SystemTime::now(),
            )
        }
        OpenAIError::JSONDeserialize(err, content) => {
            ProviderError::MalformedReply { message: format!("{err}; the body was: {}", truncate(&content)) }
        }
        OpenAIError::StreamError(err) => ProviderError::MalformedReply { message: err.to_string() },
        other => ProviderError::InvalidRequest { message: other.to_string() },
    }
}

/// The HTTP transport under async-openai: sends the request and turns every non-2xx answer
/// into a classified [`ProviderError`] while its status, headers and body are still at hand.
#[derive(Clone)]
struct SurfaceFailures {
    inner: ReqwestService,
    timeout: Duration,
}

impl Service<HttpRequestFactory> for SurfaceFailures {
    type Response = reqwest::Response;
    type Error = tower::BoxError;
    type Future = BoxFuture<Result<reqwest::Response, tower::BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let sent = self.inner.call(request);
        let timeout = self.timeout;
        Box::pin(async move {
            let response = sent.await.map_err(|err| boxed(from_openai_error(err, timeout)))?;
            let status = response.status();
            // Outside a call's scope (none here today) the limits are simply not kept.
            let _ = DECLARED.try_with(|declared| declared.set(declared_limits(response.headers())));
            if status.is_success() {
                return Ok(response);
            }
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(|err| boxed(transport_failure(&err, timeout)))?;
            Err(boxed(classify_http_failure(status.as_u16(), &headers, &body, SystemTime::now())))
        })
    }
}

fn boxed(err: ProviderError) -> tower::BoxError {
    Box::new(err)
}
