//! `aipipe serve`: an OpenAI-compatible HTTP gateway in front of the engine, so that a
//! component in any language reaches it with an unchanged OpenAI SDK.
//!
//! A request's bearer key chooses its workspace; headers choose the step, the component and
//! the cache policy. A chat step sends the caller's messages as they are; a structured step
//! takes its input as a JSON object in the last user message and answers with its output
//! object as the message text. Every answer says how it was served in `x-aipipe-source`.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pipeline_core::providers::ErrorClass;
use pipeline_core::resilience::Refusal;
use pipeline_core::{
    CachePolicy, CallContext, CallOptions, Config, Engine, PipelineError, PipelineResult, Source, StepKind, StepType,
    TraceId,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::openai::{CompletionRequest, Unsupported};

/// Where `aipipe serve` listens and what it talks to.
#[derive(Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Replaces `provider.base_url` from the config.
    pub base_url: Option<String>,
}

#[derive(Debug)]
struct Gateway {
    engine: Engine,
    /// SHA-256 of each API key -> its workspace: keys are compared as digests, never stored.
    workspaces: HashMap<[u8; 32], String>,
    default_step: StepType,
    default_component: String,
    /// The models `/v1/models` lists: every model the config names.
    models: Vec<String>,
    draining: AtomicBool,
}

pub async fn serve(mut config: Config, options: ServeOptions) -> anyhow::Result<()> {
    if let Some(base_url) = options.base_url {
        config.provider.base_url = base_url;
    }
    let workspaces = api_keys(&config)?;
    let settings = config.gateway.clone();
    let models = listed_models(&config);
    let engine = Engine::builder(config).build().await?;
    let gateway = Arc::new(Gateway {
        engine: engine.clone(),
        workspaces,
        default_step: settings.default_step,
        default_component: settings.default_component,
        models,
        draining: AtomicBool::new(false),
    });
    let app = router(gateway.clone(), settings.max_body_bytes);
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}: is the address free?", options.listen))?;
    let address = listener.local_addr().context("the listener has no address")?;
    // The first line on stdout says where to connect: scripts and tests read it (`--listen
    // 127.0.0.1:0` picks a free port).
    #[allow(clippy::print_stdout)]
    {
        println!("aipipe serve: listening on http://{address}/v1");
    }

    let (stop, stopped) = tokio::sync::watch::channel(());
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let mut stopped = stopped;
        let _ = stopped.changed().await;
    });
    let mut server = tokio::spawn(server.into_future());
    tokio::select! {
        result = &mut server => {
            result.context("the server task failed")?.context("the server failed")?;
        }
        () = shutdown_signal() => {
            tracing::info!("shutting down: draining calls in flight");
            gateway.draining.store(true, Ordering::SeqCst);
            let _ = stop.send(());
            match tokio::time::timeout(settings.drain_timeout, &mut server).await {
                Ok(result) => result.context("the server task failed")?.context("the server failed")?,
                Err(_) => {
                    tracing::warn!(after = ?settings.drain_timeout, "calls still in flight after the drain timeout: abandoned");
                    server.abort();
                }
            }
        }
    }
    engine.shutdown().await.context("telemetry could not be flushed on shutdown")?;
    Ok(())
}

fn router(gateway: Arc<Gateway>, max_body_bytes: usize) -> Router {
    let metrics = gateway.engine.metrics().router();
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such route")
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(gateway)
        .merge(metrics)
}

/// Each configured workspace's key, read from its environment variable.
fn api_keys(config: &Config) -> anyhow::Result<HashMap<[u8; 32], String>> {
    if config.gateway.api_keys.is_empty() {
        anyhow::bail!(
            "no API keys: add `[gateway.api_keys]` with `WORKSPACE = \"ENV_VARIABLE\"` to the config and set the \
             variable to that workspace's key"
        );
    }
    let mut workspaces = HashMap::new();
    for (workspace, variable) in &config.gateway.api_keys {
        let key = std::env::var(variable).ok().filter(|key| !key.trim().is_empty()).with_context(|| {
            format!("gateway.api_keys.{workspace}: the environment variable `{variable}` is not set: set it to the key")
        })?;
        if let Some(other) = workspaces.insert(digest(&key), workspace.clone()) {
            anyhow::bail!(
                "gateway.api_keys: workspaces `{other}` and `{workspace}` have the same key: give each its own"
            );
        }
    }
    Ok(workspaces)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn listed_models(config: &Config) -> Vec<String> {
    let mut models: Vec<String> = std::iter::once(config.engine.default_model.clone())
        .chain(config.steps().flat_map(|spec| {
            std::iter::once(spec.model.clone()).chain(spec.fallbacks.iter().map(|target| target.model.clone()))
        }))
        .chain(config.prices.models().map(str::to_owned))
        .collect();
    models.sort();
    models.dedup();
    models
}

async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else {
        "ready".into_response()
    }
}

async fn list_models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Result<Response, ApiError> {
    gateway.workspace(&headers)?;
    let data: Vec<Value> = gateway
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "aipipe"}))
        .collect();
    Ok(axum::Json(json!({"object": "list", "data": data})).into_response())
}

async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let workspace = gateway.workspace(&headers)?;
    let body = body.map_err(|rejection| {
        ApiError::new(rejection.status(), "invalid_request_error", "invalid_body", rejection.body_text())
    })?;
    let request: CompletionRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::invalid(None, format!("the body is not a chat completion request: {err}")))?;
    if let Some(unsupported) = request.unsupported_field() {
        return Err(unsupported.into());
    }
    let step = match header_text(&headers, "x-aipipe-step")? {
        Some(name) => StepType::new(name).map_err(|err| ApiError::invalid(None, format!("x-aipipe-step: {err}")))?,
        None => gateway.default_step.clone(),
    };
    let kind = gateway.engine.config().step(&step).map(|spec| spec.kind);
    let input = match kind {
        // An unknown step: the engine's error lists the known ones.
        None | Some(StepKind::Chat) => request.chat_input()?,
        Some(StepKind::Structured) => request.structured_input(&step)?,
    };
    let component = header_text(&headers, "x-aipipe-component")?.unwrap_or(&gateway.default_component).to_owned();
    let mut context = CallContext::new(workspace, component);
    if let Some(trace_id) = header_text(&headers, "x-aipipe-trace-id")? {
        context.trace_id = Some(TraceId::from(trace_id));
    }
    let options = call_options(&headers, &request)?;
    let result = gateway.engine.execute(step, input, context, options).await.map_err(ApiError::from)?;
    let content = match (&result.output, kind) {
        (Value::String(text), Some(StepKind::Chat)) => text.clone(),
        (output, _) => output.to_string(),
    };
    let include_usage = request.stream_options.as_ref().is_some_and(|options| options.include_usage);
    let mut response = if request.stream {
        streamed(&result, &content, include_usage)
    } else {
        axum::Json(completion(&result, &content)).into_response()
    };
    describe_source(response.headers_mut(), &result);
    Ok(response)
}

impl Gateway {
    fn workspace(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("You didn't provide an API key: send `Authorization: Bearer KEY`.")
            })?;
        self.workspaces.get(&digest(key)).cloned().ok_or_else(|| {
            ApiError::unauthorized("Incorrect API key provided: use a key from the gateway's `[gateway.api_keys]`.")
        })
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(|text| Some(text.trim()).filter(|text| !text.is_empty()))
            .map_err(|_| ApiError::invalid(None, format!("header `{name}` is not visible ASCII"))),
    }
}

fn call_options(headers: &HeaderMap, request: &CompletionRequest) -> Result<CallOptions, ApiError> {
    let mut options =
        CallOptions { model: request.model.clone().filter(|model| !model.is_empty()), ..Default::default() };
    if let Some(policy) = header_text(headers, "x-aipipe-cache")? {
        options.cache = match policy {
            "use" => CachePolicy::Use,
            "skip" => CachePolicy::Skip,
            "refresh" => CachePolicy::Refresh,
            other => {
                return Err(ApiError::invalid(
                    None,
                    format!("x-aipipe-cache is `{other}`: use `use`, `skip` or `refresh`"),
                ));
            }
        };
    }
    if let Some(millis) = header_text(headers, "x-aipipe-deadline-ms")? {
        let millis: u64 = millis.parse().ok().filter(|millis| *millis > 0).ok_or_else(|| {
            ApiError::invalid(
                None,
                format!("x-aipipe-deadline-ms is `{millis}`: use a positive number of milliseconds"),
            )
        })?;
        options.deadline = Some(Duration::from_millis(millis));
    }
    if let Some(allow) = header_text(headers, "x-aipipe-allow-fallback")? {
        options.allow_stand_in = match allow {
            "true" => true,
            "false" => false,
            other => {
                return Err(ApiError::invalid(
                    None,
                    format!("x-aipipe-allow-fallback is `{other}`: use true or false"),
                ));
            }
        };
    }
    Ok(options)
}

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

fn completion(result: &PipelineResult, content: &str) -> Value {
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
fn streamed(result: &PipelineResult, content: &str, include_usage: bool) -> Response {
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

fn describe_source(headers: &mut HeaderMap, result: &PipelineResult) {
    let source = match result.source {
        Source::Upstream => "upstream",
        Source::ExactCache => "exact",
        Source::SemanticCache => "semantic",
        Source::Coalesced => "coalesced",
        _ => "fallback",
    };
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set("x-aipipe-source", source.to_owned());
    set("x-aipipe-source-detail", result.source.label().to_owned());
    set("x-aipipe-confidence", format!("{:.3}", result.confidence));
    set("x-aipipe-trace-id", result.trace_id.to_string());
    set("x-aipipe-cost-usd", format!("{:.8}", result.cost_usd));
}

/// An error in OpenAI's shape, with the status an OpenAI SDK expects for it.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    param: Option<String>,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code, param: None, message: message.into(), retry_after: None }
    }

    fn invalid(param: Option<&str>, message: String) -> Self {
        Self {
            param: param.map(str::to_owned),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", message)
        }
    }

    fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key", message)
    }

    fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }
}

impl From<Unsupported> for ApiError {
    fn from(unsupported: Unsupported) -> Self {
        Self { param: unsupported.param, ..Self::invalid(None, unsupported.message) }
    }
}

impl From<PipelineError> for ApiError {
    fn from(err: PipelineError) -> Self {
        let message = err.to_string();
        let (status, kind, code, retry_after) = match &err {
            PipelineError::UnknownStep { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "unknown_step", None)
            }
            PipelineError::InvalidContext { .. } | PipelineError::InvalidInput { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request", None)
            }
            PipelineError::PromptTooLarge { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "context_length_exceeded", None)
            }
            PipelineError::CostLimitExceeded { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", "cost_limit_exceeded", None)
            }
            PipelineError::Refused { source: source @ Refusal::RateLimited { .. }, .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "requests", "rate_limit_exceeded", Some(source.retry_after()))
            }
            PipelineError::Refused { source, .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "server_error", "upstream_unavailable", Some(source.retry_after()))
            }
            PipelineError::Upstream { source, .. } => match source.class() {
                ErrorClass::RateLimited => {
                    (StatusCode::TOO_MANY_REQUESTS, "requests", "rate_limit_exceeded", source.retry_after())
                }
                ErrorClass::QuotaExhausted => {
                    (StatusCode::TOO_MANY_REQUESTS, "insufficient_quota", "insufficient_quota", None)
                }
                ErrorClass::BadRequest => (StatusCode::BAD_REQUEST, "invalid_request_error", "upstream_rejected", None),
                ErrorClass::Timeout => (StatusCode::GATEWAY_TIMEOUT, "server_error", "upstream_timeout", None),
                // The gateway's own upstream key is wrong: not the caller's fault.
                ErrorClass::Unauthorized => (StatusCode::BAD_GATEWAY, "server_error", "upstream_unauthorized", None),
                _ => (StatusCode::BAD_GATEWAY, "server_error", "upstream_error", source.retry_after()),
            },
            PipelineError::ContractViolation { .. } => {
                (StatusCode::BAD_GATEWAY, "server_error", "contract_violation", None)
            }
            PipelineError::DeadlineExceeded { .. } => (StatusCode::GATEWAY_TIMEOUT, "server_error", "timeout", None),
        };
        Self::new(status, kind, code, message).retry_after(retry_after)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(after) = self.retry_after {
            let headers = response.headers_mut();
            // Whole seconds, rounded up, for clients that read only `Retry-After`; the exact
            // wait for those that read OpenAI's `retry-after-ms`.
            let seconds = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            headers.insert(HeaderName::from_static("retry-after-ms"), HeaderValue::from(after.as_millis() as u64));
        }
        response
    }
}

async fn shutdown_signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
