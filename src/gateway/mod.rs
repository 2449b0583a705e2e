//! `aipipe serve`: an OpenAI-compatible HTTP gateway in front of the engine, so that a
//! component in any language reaches it with an unchanged OpenAI SDK.
//!
//! A request's bearer key chooses its workspace (`auth`); headers choose the step, the
//! component and the cache policy (`options`). A chat step sends the caller's messages as they
//! are; a structured step takes its input as a JSON object in the last user message and
//! answers with its output object as the message text (`response`). Failures answer in
//! OpenAI's error shape (`error`). Every answer says how it was served in `x-aipipe-source`.

mod admin;
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
use axum::Extension;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
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
    admin: admin::AdminAccess,
}

pub async fn serve(mut config: Config, settings: GatewaySettings, options: ServeOptions) -> anyhow::Result<()> {
    if let Some(base_url) = options.base_url {
        config.provider.base_url = base_url;
    }
    let keys = ApiKeys::from_env(&settings.api_keys)?;
    let admin = admin::AdminAccess::from_env(settings.admin_key_env.as_deref(), settings.trust_loopback)?;
    if settings.admin_listen.is_none() && admin.closed_on_api() {
        tracing::info!(
            "/metrics and /status are closed: set gateway.admin_key_env, gateway.admin_listen or \
             gateway.trust_loopback to read them"
        );
    }
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
        admin,
    });
    let own_admin_listener = settings.admin_listen.is_some();
    let app = router(gateway.clone(), settings.max_body_bytes, !own_admin_listener);
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}: is the address free?", options.listen))?;
    let address = listener.local_addr().context("the listener has no address")?;
    let admin_listener = match settings.admin_listen {
        Some(admin_address) => Some(
            TcpListener::bind(admin_address)
                .await
                .with_context(|| format!("gateway.admin_listen: cannot listen on {admin_address}: is it free?"))?,
        ),
        None => None,
    };
    // The first line on stdout says where to connect: scripts and tests read it (`--listen
    // 127.0.0.1:0` picks a free port); the second, where the admin surfaces are, if apart.
    // One write: a reader may stop reading after what it needs.
    let mut greeting = format!("aipipe serve: listening on http://{address}/v1");
    if let Some(admin_address) = admin_listener.as_ref().and_then(|listener| listener.local_addr().ok()) {
        greeting.push_str(&format!("\naipipe serve: admin on http://{admin_address}"));
    }
    #[allow(clippy::print_stdout)]
    {
        println!("{greeting}");
    }

    let (stop, stopped) = tokio::sync::watch::channel(());
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.changed().await;
        }
    };
    if let Some(admin_listener) = admin_listener {
        let admin_app = admin_routes(Router::new(), admin::Listener::Admin)
            .fallback(|| async { StatusCode::NOT_FOUND })
            .with_state(gateway.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let admin_server = axum::serve(admin_listener, admin_app).with_graceful_shutdown(until_stopped());
        tokio::spawn(async move {
            if let Err(err) = admin_server.await {
                tracing::error!(error = %err, "the admin listener failed");
            }
        });
    }
    // The admin surfaces read who asks (loopback clients, when trusted).
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, app).with_graceful_shutdown(until_stopped());
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

/// The API's routes, and the admin surfaces too unless they have a listener of their own.
fn router(gateway: Arc<Gateway>, max_body_bytes: usize, with_admin: bool) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions).fallback(post_only))
        .route("/v1/embeddings", post(embeddings::embeddings).fallback(post_only))
        .route("/v1/models", get(list_models).fallback(get_only));
    let api = if with_admin {
        admin_routes(api, admin::Listener::Api)
    } else {
        // Load balancers still probe the API's own port.
        api.route("/healthz", get(|| async { "ok" }).fallback(get_only))
            .route("/readyz", get(ready).fallback(get_only))
            .layer(Extension(admin::Listener::Api))
    };
    api.fallback(no_such_route).layer(DefaultBodyLimit::max(max_body_bytes)).with_state(gateway)
}

/// `/metrics`, `/status`, `/readyz` and `/healthz`, which know the listener they are on.
fn admin_routes(routes: Router<Arc<Gateway>>, listener: admin::Listener) -> Router<Arc<Gateway>> {
    routes
        .route("/metrics", get(metrics).fallback(get_only))
        .route("/healthz", get(|| async { "ok" }).fallback(get_only))
        .route("/readyz", get(ready).fallback(get_only))
        .route("/status", get(status::status).fallback(get_only))
        .layer(Extension(listener))
}

async fn metrics(
    State(gateway): State<Arc<Gateway>>,
    Extension(listener): Extension<admin::Listener>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(denied) = gateway.admin.allows(listener, peer, &headers) {
        return denied.into_response();
    }
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
/// answers on its own), but it is named, with where it is and why, to whoever may read the
/// admin surfaces, so that an operator sees the degradation; anyone else gets the bare answer.
async fn ready(
    State(gateway): State<Arc<Gateway>>,
    Extension(listener): Extension<admin::Listener>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if gateway.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let mut body = String::from("ready");
    if gateway.admin.allows(listener, peer, &headers).is_err() {
        return body.into_response();
    }
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
        // On a task of its own, so that a client that hangs up does not cancel the call half-way
        // (axum drops the handler): the answer the upstream is already writing is still paid
        // for, so the call still leaves its row and its charge, and its answer is kept for the
        // next caller.
        let engine = gateway.engine.clone();
        let call = tokio::spawn(async move { engine.execute(step, input, context, options).await }.in_current_span());
        let result = call
            .await
            .map_err(|join| ApiError::internal(&format!("the call's task failed: {join}")))?
            .map_err(ApiError::from)?;
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

/// Any method but POST on a POST endpoint: OpenAI's error shape, with the method allowed.
async fn post_only(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    method_not_allowed(&gateway, &headers, "POST")
}

/// Any method but GET (and HEAD) on a GET endpoint.
async fn get_only(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    method_not_allowed(&gateway, &headers, "GET")
}

/// A wrong method leaves its row like any request refused before the engine.
fn method_not_allowed(gateway: &Gateway, headers: &HeaderMap, allowed: &'static str) -> Response {
    let error = ApiError::refused_route(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("use {allowed}"));
    let mut response = gateway.refuse(headers, error);
    response.headers_mut().insert(header::ALLOW, axum::http::HeaderValue::from_static(allowed));
    response
}

async fn no_such_route(State(gateway): State<Arc<Gateway>>, uri: axum::http::Uri, headers: HeaderMap) -> Response {
    let message = format!(
        "no route {}: the gateway serves /v1/chat/completions, /v1/embeddings and /v1/models",
        uri.path().chars().take(200).collect::<String>()
    );
    gateway.refuse(&headers, ApiError::refused_route(StatusCode::NOT_FOUND, "not_found", message))
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
    ///
    /// Only a request whose key names a workspace leaves a row: one without is counted
    /// (`aipipe_requests_unauthenticated_total`), so that a flood of bad keys can neither crowd
    /// real rows out of the recorder's queue nor grow the database.
    fn refuse_in(&self, headers: &HeaderMap, error: ApiError, span: Option<&mut trace::RequestSpan>) -> Response {
        if let Some(class) = error.refused {
            let Ok(workspace) = self.keys.workspace(headers) else {
                self.engine.metrics().count_unauthenticated();
                return error.into_response();
            };
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
