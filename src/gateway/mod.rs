//! `aipipe serve`: an OpenAI-compatible HTTP gateway in front of the engine, so that a
//! component in any language reaches it with an unchanged OpenAI SDK.
//!
//! A request's bearer key chooses its workspace (`auth`); headers choose the step, the
//! component and the cache policy (`options`). A chat step sends the caller's messages as they
//! are; a structured step takes its input as a JSON object in the last user message and
//! answers with its output object as the message text (`response`). Failures answer in
//! OpenAI's error shape (`error`). Every answer says how it was served in `x-aipipe-source`.

mod auth;
mod embeddings;
mod error;
mod options;
mod response;
mod settings;
mod status;
mod trace;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pipeline_core::providers::StreamSink;
use pipeline_core::telemetry::Metrics;
use pipeline_core::{CallContext, CallOptions, Config, Engine, PipelineResult, StepKind, StepType, TraceId};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::Instrument;

use self::auth::ApiKeys;
use self::error::ApiError;
use self::options::{call_options, header_text};
use self::response::{ChunkWriter, completion, describe_source, live_stream, whole_stream};
pub use self::settings::{GatewaySettings, RawGateway};
use aipipe::openai::CompletionRequest;

/// Where `aipipe serve` listens and what it talks to.
#[derive(Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    /// Replaces `provider.base_url` from the config.
    pub base_url: Option<String>,
    /// Where calls' spans go, when traces are exported.
    pub spans: Option<Arc<dyn pipeline_core::telemetry::SpanSink>>,
}

#[derive(Debug)]
struct Gateway {
    engine: Engine,
    keys: ApiKeys,
    default_step: StepType,
    default_component: String,
    /// The models `/v1/models` lists: every model the config names.
    models: Vec<String>,
    draining: AtomicBool,
    status_access: status::StatusAccess,
}

pub async fn serve(mut config: Config, settings: GatewaySettings, options: ServeOptions) -> anyhow::Result<()> {
    if let Some(base_url) = options.base_url {
        config.provider.base_url = base_url;
    }
    let keys = ApiKeys::from_env(&settings.api_keys)?;
    let status_access = status::StatusAccess::from_env(settings.status_admin_key_env.as_deref())?;
    let models = listed_models(&config);
    let mut engine = Engine::builder(config);
    if let Some(spans) = options.spans {
        engine = engine.spans(spans);
    }
    let engine = engine.build().await?;
    let gateway = Arc::new(Gateway {
        engine: engine.clone(),
        keys,
        default_step: settings.default_step,
        default_component: settings.default_component,
        models,
        draining: AtomicBool::new(false),
        status_access,
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
    // The status page reads who asks: loopback clients only, without an admin key.
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
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

/// The models a request can reach: the default model and every candidate of a step's route.
fn listed_models(config: &Config) -> Vec<String> {
    let mut models: Vec<String> = std::iter::once(config.engine.default_model.clone())
        .chain(config.steps().flat_map(|spec| spec.route.candidates.iter().map(|candidate| candidate.name.clone())))
        .collect();
    models.sort();
    models.dedup();
    models
}

fn router(gateway: Arc<Gateway>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions).fallback(post_only))
        .route("/v1/embeddings", post(embeddings::embeddings).fallback(post_only))
        .route("/v1/models", get(list_models))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/status", get(status::status))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such route")
        })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(gateway)
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let metrics = gateway.engine.metrics();
    for part in gateway.engine.shared_state() {
        metrics.set_shared_state_up(part.part, part.up);
    }
    metrics.set_trace_spans_dropped(crate::traces::spans_dropped());
    let (exact, semantic) = gateway.engine.cache_entries();
    for (cache, entries) in [("exact", exact), ("semantic", semantic)] {
        if let Some(entries) = entries {
            metrics.set_cache_entries(cache, entries);
        }
    }
    ([(header::CONTENT_TYPE, Metrics::CONTENT_TYPE)], metrics.render()).into_response()
}

/// Ready while not draining. A shared part that is down does not make a replica unready (it
/// answers on its own), but it is named, so that an operator sees the degradation.
async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    if gateway.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let mut body = String::from("ready");
    for part in gateway.engine.shared_state().into_iter().filter(|part| !part.up) {
        let since = part.down_since.and_then(|since| since.elapsed().ok()).unwrap_or_default();
        body.push_str(&format!(
            "\ndegraded: {} at {} unreachable for {} s ({}): caches miss and limits are held at this replica's share",
            part.part,
            part.address,
            since.as_secs(),
            part.reason.unwrap_or_default()
        ));
    }
    body.into_response()
}

async fn list_models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if let Err(error) = gateway.keys.workspace(&headers) {
        return gateway.refuse(&headers, error);
    }
    let data: Vec<Value> = gateway
        .models
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "aipipe"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat_completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // The caller's trace continues here (W3C `traceparent`); the call's span is a child.
    let mut span = trace::RequestSpan::start(gateway.engine.span_sink(), &headers, "/v1/chat/completions");
    let response = match complete(&gateway, &headers, body, &mut span).await {
        Ok(response) => response,
        Err(error) => gateway.refuse_in(&headers, error, Some(&mut span)),
    };
    span.end(response.status());
    response
}

async fn complete(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    span: &mut trace::RequestSpan,
) -> Result<Response, ApiError> {
    let workspace = gateway.keys.workspace(headers)?;
    let body = body.map_err(|rejection| ApiError::unreadable_body(rejection.status(), rejection.body_text()))?;
    let request: CompletionRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::invalid(None, format!("the body is not a chat completion request: {err}")))?;
    if let Some(unsupported) = request.unsupported_field() {
        return Err(unsupported.into());
    }
    let step = gateway.step(headers)?;
    let kind = gateway.engine.config().step(&step).map(|spec| spec.kind);
    let input = match kind {
        // An unknown step: the engine's error lists the known ones.
        None | Some(StepKind::Chat) => request.chat_input()?,
        Some(StepKind::Structured) => request.structured_input(&step)?,
    };
    let mut context = CallContext { workspace, ..gateway.context(headers)? };
    span.adopt(&mut context);
    let options = call_options(headers, &request)?;
    let content_of = move |result: &PipelineResult| match (&result.output, kind) {
        (Value::String(text), Some(StepKind::Chat)) => text.clone(),
        (output, _) => output.to_string(),
    };
    if !request.stream {
        // On a task of its own, so that a client that hangs up does not cancel the call half-way:
        // it still leaves its row, and its answer is kept for the next caller.
        let result = gateway.engine.execute(step, input, context, options).await.map_err(ApiError::from)?;
        let mut response = axum::Json(completion(&result, &content_of(&result))).into_response();
        describe_source(response.headers_mut(), &result);
        return Ok(response);
    }
    // The stream's chunks carry the call's id from the first one on.
    let trace_id = context.trace_id.get_or_insert_with(TraceId::random).clone();
    let include_usage = request.stream_options.as_ref().is_some_and(|options| options.include_usage);
    let model = request.model.as_deref().unwrap_or(options::ANY_MODEL);
    let writer = ChunkWriter::new(trace_id.as_str(), model, include_usage);
    let (sink, mut pieces) = StreamSink::channel(STREAM_BUFFER);
    let options = CallOptions { stream: Some(sink), ..options };
    let engine = gateway.engine.clone();
    // The call runs on its own task: it finishes (and leaves its row) even when the caller
    // goes away mid-answer.
    let mut call = tokio::spawn(async move { engine.execute(step, input, context, options).await }.in_current_span());
    // Until the first piece, a failure is still an HTTP error with its status; after it, an
    // error event in the stream.
    let first = tokio::select! {
        biased;
        first = pieces.recv() => first,
        ended = &mut call => return whole(&writer, ended, &content_of),
    };
    match first {
        Some(first) => {
            let mut response = live_stream(writer, &first, pieces, call);
            if let Ok(value) = axum::http::HeaderValue::from_str(trace_id.as_str()) {
                response.headers_mut().insert("x-aipipe-trace-id", value);
            }
            Ok(response)
        }
        None => whole(&writer, call.await, &content_of),
    }
}

/// Pieces of a streamed answer that may wait for a slow reader before the upstream is read
/// no faster than the reader takes them.
const STREAM_BUFFER: usize = 64;

/// A streamed call whose answer came whole (or that failed before it began).
fn whole(
    writer: &ChunkWriter,
    ended: Result<Result<PipelineResult, pipeline_core::PipelineError>, tokio::task::JoinError>,
    content_of: &impl Fn(&PipelineResult) -> String,
) -> Result<Response, ApiError> {
    let result = ended.map_err(|join| ApiError::internal(&format!("the call's task failed: {join}")))?;
    let result = result.map_err(ApiError::from)?;
    Ok(whole_stream(writer, &result, &content_of(&result)))
}

/// Any method but POST on the chat endpoint: OpenAI's error shape, with the method allowed.
async fn post_only() -> Response {
    let mut response =
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed", "use POST")
            .into_response();
    response.headers_mut().insert(header::ALLOW, axum::http::HeaderValue::from_static("POST"));
    response
}

impl Gateway {
    /// The step the request names, or the default one.
    fn step(&self, headers: &HeaderMap) -> Result<StepType, ApiError> {
        match header_text(headers, "x-aipipe-step")? {
            Some(name) => StepType::new(name).map_err(|err| ApiError::invalid(None, format!("x-aipipe-step: {err}"))),
            None => Ok(self.default_step.clone()),
        }
    }

    /// The call's context from the headers (component, trace id); the workspace is the key's.
    /// The trace id is the caller's `x-aipipe-trace-id`, else its W3C trace's (`traceparent`),
    /// so that a row and its trace share one id.
    fn context(&self, headers: &HeaderMap) -> Result<CallContext, ApiError> {
        let component = header_text(headers, "x-aipipe-component")?.unwrap_or(&self.default_component).to_owned();
        let mut context = CallContext::new("", component);
        context.trace_id = match header_text(headers, "x-aipipe-trace-id")? {
            Some(trace_id) => Some(TraceId::from(trace_id)),
            None => trace::caller_trace_id(headers),
        };
        Ok(context)
    }

    /// Answers a request that failed; one refused before the engine leaves its own row (the
    /// engine records the failures of the calls it made).
    fn refuse(&self, headers: &HeaderMap, error: ApiError) -> Response {
        self.refuse_in(headers, error, None)
    }

    /// The same, the row in the trace of the request's span (when traces are exported).
    fn refuse_in(&self, headers: &HeaderMap, error: ApiError, span: Option<&mut trace::RequestSpan>) -> Response {
        if let Some(class) = error.refused {
            let workspace = self.keys.workspace(headers).unwrap_or_else(|_| "unknown".to_owned());
            let context = self.context(headers).unwrap_or_else(|_| CallContext::new("", &self.default_component));
            let step = self.step(headers).ok();
            let mut context = CallContext { workspace, ..context };
            if let Some(span) = span {
                span.adopt(&mut context);
            }
            self.engine.record_refused(step.as_ref(), &context, class, error.message());
        }
        error.into_response()
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
