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
use async_openai::types::chat::{
    self, ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, CreateChatCompletionRequest, CreateChatCompletionResponse, ResponseFormat,
    ResponseFormatJsonSchema,
};

use tower::Service;

use crate::classify::{classify_http_failure, declared_limits, transport_failure, truncate};
use crate::{ChatMessage, ChatRequest, ChatResponse, DeclaredLimits, FinishReason, ProviderError, Role, Usage};

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
}

impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &if self.api_key.is_empty() { "(unset)" } else { "(set)" })
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
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
        let client = async_openai::Client::build(http, config).with_http_service(transport);
        Ok(Self {
            inner: Arc::new(Inner {
                client,
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
        let inner = &self.inner;
        let trace_id = request.trace_id.clone();
        let body = to_openai_request(request)?;
        let started = Instant::now();
        let chat = inner.client.chat();
        // A trace id that is not a valid header value is simply not forwarded.
        let chat = match chat.header("x-request-id", trace_id.as_str()) {
            Ok(with_header) => with_header,
            Err(_) => inner.client.chat(),
        };
        let (reply, declared) = DECLARED
            .scope(std::cell::Cell::new(None), async {
                let reply = chat.create(body).await;
                (reply, DECLARED.with(std::cell::Cell::get))
            })
            .await;
        let reply = reply.map_err(|err| from_openai_error(err, inner.request_timeout).scrubbed(&[&inner.api_key]))?;
        let mut response = from_openai_reply(reply, &inner.name, started.elapsed())?;
        response.declared_limits = declared;
        Ok(response)
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

fn to_openai_request(request: ChatRequest) -> Result<CreateChatCompletionRequest, ProviderError> {
    let messages = request
        .messages
        .into_iter()
        .map(|ChatMessage { role, content }| match role {
            Role::System => ChatCompletionRequestMessage::from(ChatCompletionRequestSystemMessage::from(content)),
            Role::User => ChatCompletionRequestUserMessage::from(content).into(),
            Role::Assistant => ChatCompletionRequestAssistantMessage::from(content).into(),
        })
        .collect::<Vec<_>>();
    if messages.is_empty() {
        return Err(ProviderError::InvalidRequest { message: "a chat request needs at least one message".into() });
    }
    Ok(CreateChatCompletionRequest {
        model: request.model,
        messages,
        temperature: request.temperature,
        max_completion_tokens: request.max_output_tokens,
        response_format: match request.response_format {
            crate::ResponseFormat::Text => None,
            crate::ResponseFormat::JsonObject => Some(ResponseFormat::JsonObject),
            crate::ResponseFormat::JsonSchema { name, schema, strict } => Some(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema { description: None, name, schema, strict: Some(strict) },
            }),
        },
        ..Default::default()
    })
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
    let content = match (choice.message.content, choice.message.refusal) {
        (Some(content), _) => content,
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
        model: reply.model,
        provider: provider.to_owned(),
        usage,
        finish_reason,
        latency,
        declared_limits: None,
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
