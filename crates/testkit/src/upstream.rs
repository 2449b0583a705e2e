//! A scripted upstream that speaks both OpenAI's chat completions (`POST /v1/chat/completions`)
//! and Anthropic's Messages API (`POST /v1/messages`). It listens on `127.0.0.1:0`, answers
//! from a queue of scripted [`Reply`]s (then from a responder function) in the dialect of the
//! path it was asked on, and counts what it received, so a test can prove that a request did
//! or did not reach the upstream, and one script runs against every provider.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt as _;
use serde_json::{Value, json};

/// What the upstream answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A chat completion with this content. Usage `None` derives it from the text lengths;
    /// `cached` of the input tokens were read from the provider's prompt cache.
    Completion { content: String, usage: Option<(u32, u32)>, cached: u32 },
    /// A chat completion cut off at the request's `max_tokens` (`finish_reason: "length"`).
    Truncated(String),
    /// A failure, in the words and shape the dialect's real service uses.
    Failure(Failure),
    /// Any status with a body and extra headers, sent as they are.
    Status { status: u16, body: String, headers: Vec<(String, String)> },
    /// A `text/event-stream` body, sent chunk by chunk as given (a chunk may end mid-event).
    EventStream(Vec<String>),
    /// A 200 whose body is not a chat completion.
    Malformed(String),
    /// Never answers: the client must give up by itself.
    Stall,
    /// Waits, then answers.
    Delayed(Duration, Box<Reply>),
    /// An error with this status whose message repeats the `Authorization` header the request
    /// carried, as some upstreams do ("Incorrect API key provided: sk-...").
    EchoKey(u16),
    /// An answer written piece by piece: streamed in the dialect's events when the request
    /// asks for a stream (with `gap` between events), else one whole completion.
    Streamed(Streamed),
}

/// An answer as a model writes it, for [`Reply::Streamed`].
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    /// The text, in the pieces the stream carries.
    pub pieces: Vec<String>,
    /// Tool calls: id, function name, arguments (sent in two halves when streamed).
    pub tool_calls: Vec<(String, String, String)>,
    /// Between one event and the next.
    pub gap: Duration,
    /// The stream fails after this many text pieces, with the dialect's mid-stream error
    /// (OpenAI's error object, Anthropic's `overloaded_error` event).
    pub fail_after: Option<usize>,
    /// The model stopped at the output budget.
    pub truncated: bool,
    /// Input and output tokens; `None` derives them from the text lengths.
    pub usage: Option<(u32, u32)>,
    /// After its last event (`[DONE]`, `message_stop`) the connection stays open, as HTTP
    /// keep-alive servers leave it: a client must end at that event, not at the body's end.
    pub hold_open: bool,
}

impl Streamed {
    pub fn text(pieces: &[&str], gap: Duration) -> Self {
        Self { pieces: pieces.iter().map(|piece| (*piece).to_owned()).collect(), gap, ..Self::default() }
    }

    pub fn tool_call(id: &str, name: &str, arguments: &str, gap: Duration) -> Self {
        Self { tool_calls: vec![(id.into(), name.into(), arguments.into())], gap, ..Self::default() }
    }

    #[must_use]
    pub fn failing_after(mut self, pieces: usize) -> Self {
        self.fail_after = Some(pieces);
        self
    }

    #[must_use]
    pub fn held_open(mut self) -> Self {
        self.hold_open = true;
        self
    }

    fn content(&self) -> String {
        self.pieces.concat()
    }
}

/// A failure as each dialect says it.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// 429 with Retry-After (whole seconds, and OpenAI's `retry-after-ms`).
    RateLimited {
        wait: Duration,
    },
    /// 429 for an exhausted quota or spend limit: waiting does not help.
    QuotaExhausted,
    /// A 5xx.
    Server(u16),
    /// The service is overloaded: Anthropic's 529 `overloaded_error`, OpenAI's 503.
    Overloaded,
    BadRequest(String),
    /// The prompt does not fit the model's context window.
    ContextLength,
    Unauthorized,
}

impl Failure {
    fn status(&self) -> u16 {
        match self {
            Self::RateLimited { .. } | Self::QuotaExhausted => 429,
            Self::Server(status) => *status,
            Self::Overloaded => 529,
            Self::BadRequest(_) | Self::ContextLength => 400,
            Self::Unauthorized => 401,
        }
    }
}

impl Reply {
    pub fn completion(content: impl Into<String>) -> Self {
        Self::Completion { content: content.into(), usage: None, cached: 0 }
    }

    pub fn completion_with_usage(content: impl Into<String>, input_tokens: u32, output_tokens: u32) -> Self {
        Self::Completion { content: content.into(), usage: Some((input_tokens, output_tokens)), cached: 0 }
    }

    /// `input_tokens` in all, `cached` of them read from the provider's prompt cache.
    pub fn completion_with_cache(
        content: impl Into<String>,
        input_tokens: u32,
        cached: u32,
        output_tokens: u32,
    ) -> Self {
        Self::Completion { content: content.into(), usage: Some((input_tokens, output_tokens)), cached }
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::rate_limited_for(Duration::from_secs(retry_after_secs))
    }

    /// A 429 whose Retry-After (in milliseconds too, where the dialect has it) is `wait`.
    pub fn rate_limited_for(wait: Duration) -> Self {
        Self::Failure(Failure::RateLimited { wait })
    }

    pub fn quota_exhausted() -> Self {
        Self::Failure(Failure::QuotaExhausted)
    }

    pub fn server_error(status: u16) -> Self {
        Self::Failure(Failure::Server(status))
    }

    pub fn overloaded() -> Self {
        Self::Failure(Failure::Overloaded)
    }

    pub fn bad_request(message: &str) -> Self {
        Self::Failure(Failure::BadRequest(message.to_owned()))
    }

    pub fn context_length_exceeded() -> Self {
        Self::Failure(Failure::ContextLength)
    }

    pub fn unauthorized() -> Self {
        Self::Failure(Failure::Unauthorized)
    }

    pub fn malformed() -> Self {
        Self::Malformed("{\"id\": \"chatcmpl-broken\", \"choices\": [".into())
    }

    pub fn slow(delay: Duration, then: Reply) -> Self {
        Self::Delayed(delay, Box::new(then))
    }

    /// The HTTP status this reply ends in (504 for a stall, as a proxy would say).
    pub fn status(&self) -> u16 {
        match self {
            Self::Completion { .. }
            | Self::Truncated(_)
            | Self::Malformed(_)
            | Self::EventStream(_)
            | Self::Streamed(_) => 200,
            Self::Failure(failure) => failure.status(),
            Self::Status { status, .. } => *status,
            Self::Stall => 504,
            Self::Delayed(_, then) => then.status(),
            Self::EchoKey(status) => *status,
        }
    }
}

/// The two API shapes the upstream speaks, chosen by the path it is asked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `POST /v1/chat/completions`.
    OpenAi,
    /// `POST /v1/messages`.
    Anthropic,
}

fn openai_error(message: &str, kind: &str, code: &str) -> String {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } }).to_string()
}

fn anthropic_error(kind: &str, message: &str) -> String {
    json!({ "type": "error", "error": { "type": kind, "message": message } }).to_string()
}

/// The status, body and headers `failure` gets in `dialect`, as the real service words it.
fn render_failure(failure: &Failure, dialect: Dialect) -> (u16, String, Vec<(String, String)>) {
    let status = failure.status();
    let mut headers = Vec::new();
    let body = match (dialect, failure) {
        (Dialect::OpenAi, Failure::RateLimited { wait }) => {
            headers.push(("retry-after".into(), wait.as_secs_f64().ceil().max(1.0).to_string()));
            headers.push(("retry-after-ms".into(), wait.as_millis().to_string()));
            openai_error("Rate limit reached for requests", "requests", "rate_limit_exceeded")
        }
        (Dialect::Anthropic, Failure::RateLimited { wait }) => {
            headers.push(("retry-after".into(), wait.as_secs_f64().ceil().max(1.0).to_string()));
            anthropic_error("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit")
        }
        (Dialect::OpenAi, Failure::QuotaExhausted) => {
            openai_error("You exceeded your current quota", "insufficient_quota", "insufficient_quota")
        }
        (Dialect::Anthropic, Failure::QuotaExhausted) => anthropic_error(
            "rate_limit_error",
            "You have reached your specified workspace API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.",
        ),
        (Dialect::OpenAi, Failure::Server(_)) => {
            openai_error("The server had an error", "server_error", "server_error")
        }
        (Dialect::Anthropic, Failure::Server(_)) => anthropic_error("api_error", "Internal server error"),
        (Dialect::OpenAi, Failure::Overloaded) => {
            return (503, openai_error("The engine is currently overloaded", "server_error", "overloaded"), headers);
        }
        (Dialect::Anthropic, Failure::Overloaded) => anthropic_error("overloaded_error", "Overloaded"),
        (Dialect::OpenAi, Failure::BadRequest(message)) => {
            openai_error(message, "invalid_request_error", "invalid_request")
        }
        (Dialect::Anthropic, Failure::BadRequest(message)) => anthropic_error("invalid_request_error", message),
        (Dialect::OpenAi, Failure::ContextLength) => openai_error(
            "This model's maximum context length is 8192 tokens. However, your messages resulted in 9100 tokens.",
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (Dialect::Anthropic, Failure::ContextLength) => {
            anthropic_error("invalid_request_error", "prompt is too long: 210034 tokens > 200000 maximum")
        }
        (Dialect::OpenAi, Failure::Unauthorized) => {
            openai_error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        }
        (Dialect::Anthropic, Failure::Unauthorized) => anthropic_error("authentication_error", "invalid x-api-key"),
    };
    (status, body, headers)
}

type Responder = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

/// A request limit the upstream enforces and declares, as OpenAI does: a bucket of `limit` a
/// minute, each answer saying what is left.
#[derive(Debug, Clone, Copy)]
struct Limit {
    per_minute: u32,
    level: f64,
    updated: Instant,
}

struct Shared {
    limit: Mutex<Option<Limit>>,
    script: Mutex<VecDeque<Reply>>,
    responder: Mutex<Responder>,
    requests: AtomicU64,
    received: Mutex<Vec<Value>>,
    exchanges: Mutex<Vec<Exchange>>,
}

/// One request as the upstream saw it: when it arrived, when the answer left (`None` while
/// it is still being answered, or if it never was) and its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    pub arrived: Instant,
    pub answered: Option<Instant>,
    pub status: u16,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has failed already; the data is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running scripted upstream. Dropping it stops the server.
pub struct ScriptedUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ScriptedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedUpstream").field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl ScriptedUpstream {
    /// Starts on a free loopback port. Until scripted, every request gets a 500 saying so.
    pub async fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            limit: Mutex::new(None),
            script: Mutex::new(VecDeque::new()),
            responder: Mutex::new(Arc::new(|_: &Value| Reply::Status {
                status: 500,
                body: openai_error(
                    "scripted upstream: no reply scripted for this request",
                    "server_error",
                    "unscripted",
                ),
                headers: Vec::new(),
            })),
            requests: AtomicU64::new(0),
            received: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/messages", post(messages))
            .route("/v1/models", get(models))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                eprintln!("scripted upstream stopped: {err}");
            }
        });
        Ok(Self { addr, shared, server })
    }

    /// The base URL an OpenAI client takes, ending in `/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues a reply for the next request that finds the queue non-empty.
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.script).push_back(reply);
    }

    /// Answers every request that finds the queue empty; sees the request body.
    pub fn respond_with(&self, responder: impl Fn(&Value) -> Reply + Send + Sync + 'static) {
        *lock(&self.shared.responder) = Arc::new(responder);
    }

    /// From now on, allows `per_minute` requests a minute (all of them at once, then refilled
    /// evenly), answers any beyond with a 429 and its Retry-After, and declares the limit and
    /// what is left in `x-ratelimit-*-requests` headers on every answer.
    pub fn enforce_limit(&self, per_minute: u32) {
        *lock(&self.shared.limit) = Some(Limit { per_minute, level: f64::from(per_minute), updated: Instant::now() });
    }

    /// Requests received so far, whatever they were answered with.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The JSON bodies received so far (`null` for a body that was not JSON).
    pub fn received(&self) -> Vec<Value> {
        lock(&self.shared.received).clone()
    }

    /// Every request so far with its timing and status, in arrival order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.shared.exchanges).clone()
    }
}

impl Drop for ScriptedUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn chat_completions(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    exchange(&shared, Dialect::OpenAi, &headers, &body).await
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    exchange(&shared, Dialect::Anthropic, &headers, &body).await
}

async fn exchange(shared: &Shared, dialect: Dialect, headers: &HeaderMap, body: &Bytes) -> Response {
    let arrived = Instant::now();
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let sequence = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
    lock(&shared.received).push(request.clone());
    let admitted = admit(shared);
    let reply = match admitted {
        Some(Err(wait)) => Reply::rate_limited_for(wait),
        _ => match lock(&shared.script).pop_front() {
            Some(reply) => reply,
            None => {
                let responder = lock(&shared.responder).clone();
                responder(&request)
            }
        },
    };
    let reply = match reply {
        Reply::EchoKey(status) => {
            let sent = |name| headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
            let key = sent(header::AUTHORIZATION.as_str()).or(sent("x-api-key")).unwrap_or("");
            let message = format!("Incorrect API key provided: {}.", key.trim_start_matches("Bearer "));
            let body = match dialect {
                Dialect::OpenAi => openai_error(&message, "invalid_request_error", "invalid_api_key"),
                Dialect::Anthropic => anthropic_error("authentication_error", &message),
            };
            Reply::Status { status, body, headers: Vec::new() }
        }
        Reply::Failure(failure) => {
            let (status, body, headers) = render_failure(&failure, dialect);
            Reply::Status { status, body, headers }
        }
        other => other,
    };
    let index = {
        let mut exchanges = lock(&shared.exchanges);
        exchanges.push(Exchange { arrived, answered: None, status: reply.status() });
        exchanges.len() - 1
    };
    let mut response = answer(reply, dialect, &request, sequence).await;
    if let Some(Ok((limit, remaining))) = admitted {
        let names = match dialect {
            Dialect::OpenAi => ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests"],
            Dialect::Anthropic => ["anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining"],
        };
        for (name, value) in names.into_iter().zip([limit, remaining]) {
            response.headers_mut().insert(name, HeaderValue::from(value));
        }
    }
    if let Some(exchange) = lock(&shared.exchanges).get_mut(index) {
        exchange.answered = Some(Instant::now());
    }
    response
}

/// Takes one request from the enforced limit, if there is one: `Ok` with the limit and what is
/// left, or `Err` with the time until one is free.
fn admit(shared: &Shared) -> Option<Result<(u32, u32), Duration>> {
    let mut limit = lock(&shared.limit);
    let limit = limit.as_mut()?;
    let now = Instant::now();
    let rate = f64::from(limit.per_minute) / 60.0;
    limit.level =
        (limit.level + now.duration_since(limit.updated).as_secs_f64() * rate).min(f64::from(limit.per_minute));
    limit.updated = now;
    if limit.level >= 1.0 {
        limit.level -= 1.0;
        Some(Ok((limit.per_minute, limit.level.floor() as u32)))
    } else {
        Some(Err(Duration::from_secs_f64((1.0 - limit.level) / rate)))
    }
}

async fn answer(mut reply: Reply, dialect: Dialect, request: &Value, sequence: u64) -> Response {
    loop {
        match reply {
            Reply::Delayed(delay, then) => {
                tokio::time::sleep(delay).await;
                reply = *then;
            }
            Reply::Stall => {
                // Long enough that any client deadline in a test passes first.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                return StatusCode::GATEWAY_TIMEOUT.into_response();
            }
            // A real service streams whatever it answers when the request asks it to.
            Reply::Completion { content, usage, .. } if request["stream"] == true => {
                reply = Reply::Streamed(Streamed { pieces: in_pieces(&content), usage, ..Streamed::default() });
            }
            Reply::Truncated(content) if request["stream"] == true => {
                reply =
                    Reply::Streamed(Streamed { pieces: in_pieces(&content), truncated: true, ..Streamed::default() });
            }
            Reply::Completion { content, usage, cached } => {
                return completion(dialect, request, &content, usage, cached, false, sequence);
            }
            Reply::Truncated(content) => {
                return completion(dialect, request, &content, None, 0, true, sequence);
            }
            Reply::EventStream(chunks) => {
                let chunks = chunks.into_iter().map(|chunk| Ok::<_, std::convert::Infallible>(Bytes::from(chunk)));
                let body = axum::body::Body::from_stream(futures::stream::iter(chunks));
                return ([(header::CONTENT_TYPE, "text/event-stream")], body).into_response();
            }
            Reply::Streamed(streamed) if request["stream"] == true => {
                return stream(dialect, request, &streamed, sequence);
            }
            Reply::Streamed(streamed) => return whole(dialect, request, &streamed, sequence),
            Reply::Malformed(body) => {
                return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
            // Resolved with the request before it gets here.
            Reply::Failure(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            Reply::EchoKey(status) => {
                return StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED).into_response();
            }
            Reply::Status { status, body, headers } => {
                let mut response =
                    (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body).into_response();
                response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                for (name, value) in headers {
                    if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
                        response.headers_mut().insert(name, value);
                    }
                }
                return response;
            }
        }
    }
}

fn completion(
    dialect: Dialect,
    request: &Value,
    content: &str,
    usage: Option<(u32, u32)>,
    cached: u32,
    truncated: bool,
    sequence: u64,
) -> Response {
    let (input_tokens, output_tokens) =
        usage.unwrap_or_else(|| (approx_tokens(prompt_chars(request)), approx_tokens(content.len())));
    let model = request["model"].as_str().unwrap_or("scripted-model");
    let body = match dialect {
        Dialect::OpenAi => {
            let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            json!({
                "id": format!("chatcmpl-scripted-{sequence}"),
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": content },
                    "finish_reason": if truncated { "length" } else { "stop" }
                }],
                "usage": {
                    "prompt_tokens": input_tokens,
                    "completion_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens,
                    "prompt_tokens_details": { "cached_tokens": cached }
                }
            })
        }
        // Anthropic counts cached input apart: `input_tokens` is only what was not cached.
        Dialect::Anthropic => json!({
            "id": format!("msg_scripted_{sequence}"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{ "type": "text", "text": content }],
            "stop_reason": if truncated { "max_tokens" } else { "end_turn" },
            "stop_sequence": null,
            "usage": {
                "input_tokens": input_tokens.saturating_sub(cached),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": cached,
                "output_tokens": output_tokens
            }
        }),
    };
    axum::Json(body).into_response()
}

/// A text in the pieces a stream would carry it in: a word each.
fn in_pieces(content: &str) -> Vec<String> {
    content.split_inclusive(' ').map(str::to_owned).collect()
}

/// A [`Streamed`] answer sent whole, tool calls included.
fn whole(dialect: Dialect, request: &Value, streamed: &Streamed, sequence: u64) -> Response {
    let content = streamed.content();
    let response = completion(dialect, request, &content, None, 0, streamed.truncated, sequence);
    if streamed.tool_calls.is_empty() {
        return response;
    }
    let calls = &streamed.tool_calls;
    let (input_tokens, output_tokens) = (approx_tokens(prompt_chars(request)), approx_tokens(content.len() + 20));
    let model = request["model"].as_str().unwrap_or("scripted-model");
    let body = match dialect {
        Dialect::OpenAi => {
            let calls: Vec<Value> = calls
                .iter()
                .map(|(id, name, arguments)| {
                    json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
                })
                .collect();
            json!({
                "id": format!("chatcmpl-scripted-{sequence}"), "object": "chat.completion", "created": 0,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant",
                    "content": if content.is_empty() { Value::Null } else { json!(content) }, "tool_calls": calls},
                    "finish_reason": "tool_calls"}],
                "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                    "total_tokens": input_tokens + output_tokens}
            })
        }
        Dialect::Anthropic => {
            let mut blocks = Vec::new();
            if !content.is_empty() {
                blocks.push(json!({"type": "text", "text": content}));
            }
            for (id, name, arguments) in calls {
                let input: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
                blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
            }
            json!({
                "id": format!("msg_scripted_{sequence}"), "type": "message", "role": "assistant", "model": model,
                "content": blocks, "stop_reason": "tool_use", "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}
            })
        }
    };
    axum::Json(body).into_response()
}

/// A [`Streamed`] answer as the dialect streams it, one event every `gap`.
fn stream(dialect: Dialect, request: &Value, streamed: &Streamed, sequence: u64) -> Response {
    let model = request["model"].as_str().unwrap_or("scripted-model").to_owned();
    let content = streamed.content();
    let (input_tokens, output_tokens) =
        streamed.usage.unwrap_or_else(|| (approx_tokens(prompt_chars(request)), approx_tokens(content.len()) + 1));
    let halves = |arguments: &str| {
        let middle = (0..=arguments.len() / 2).rev().find(|at| arguments.is_char_boundary(*at)).unwrap_or(0);
        (arguments[..middle].to_owned(), arguments[middle..].to_owned())
    };
    let mut events: Vec<String> = Vec::new();
    let mut failed = false;
    match dialect {
        Dialect::OpenAi => {
            let chunk = |delta: Value, finish: Value| {
                let body = json!({"id": format!("chatcmpl-scripted-{sequence}"), "object": "chat.completion.chunk",
                    "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
                format!("data: {body}\n\n")
            };
            events.push(chunk(json!({"role": "assistant", "content": ""}), Value::Null));
            for (index, piece) in streamed.pieces.iter().enumerate() {
                if streamed.fail_after == Some(index) {
                    events.push(
                        "data: {\"error\": {\"message\": \"The server had an error while processing your request.\", \
                         \"type\": \"server_error\", \"code\": null}}\n\n"
                            .to_owned(),
                    );
                    failed = true;
                    break;
                }
                events.push(chunk(json!({"content": piece}), Value::Null));
            }
            if !failed {
                for (index, (id, name, arguments)) in streamed.tool_calls.iter().enumerate() {
                    let (first, second) = halves(arguments);
                    events.push(chunk(
                        json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}),
                        Value::Null,
                    ));
                    for half in [first, second] {
                        events.push(chunk(
                            json!({"tool_calls": [{"index": index, "function": {"arguments": half}}]}),
                            Value::Null,
                        ));
                    }
                }
                let finish = if !streamed.tool_calls.is_empty() {
                    "tool_calls"
                } else if streamed.truncated {
                    "length"
                } else {
                    "stop"
                };
                events.push(chunk(json!({}), json!(finish)));
                if request["stream_options"]["include_usage"] == true {
                    let body = json!({"id": format!("chatcmpl-scripted-{sequence}"), "object": "chat.completion.chunk",
                        "created": 0, "model": model, "choices": [],
                        "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                            "total_tokens": input_tokens + output_tokens}});
                    events.push(format!("data: {body}\n\n"));
                }
                events.push("data: [DONE]\n\n".to_owned());
            }
        }
        Dialect::Anthropic => {
            let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
            events.push(event(
                "message_start",
                json!({"type": "message_start", "message": {"id": format!("msg_scripted_{sequence}"), "type": "message",
                    "role": "assistant", "model": model, "content": [], "stop_reason": null,
                    "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
            ));
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            events.push(event("ping", json!({"type": "ping"})));
            for (index, piece) in streamed.pieces.iter().enumerate() {
                if streamed.fail_after == Some(index) {
                    events.push(event(
                        "error",
                        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
                    ));
                    failed = true;
                    break;
                }
                events.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
            if !failed {
                events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
                for (offset, (id, name, arguments)) in streamed.tool_calls.iter().enumerate() {
                    let index = offset + 1;
                    events.push(event(
                        "content_block_start",
                        json!({"type": "content_block_start", "index": index,
                            "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
                    ));
                    let (first, second) = halves(arguments);
                    for half in [first, second] {
                        events.push(event(
                            "content_block_delta",
                            json!({"type": "content_block_delta", "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": half}}),
                        ));
                    }
                    events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
                }
                let stop_reason = if !streamed.tool_calls.is_empty() {
                    "tool_use"
                } else if streamed.truncated {
                    "max_tokens"
                } else {
                    "end_turn"
                };
                events.push(event(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                        "usage": {"output_tokens": output_tokens}}),
                ));
                events.push(event("message_stop", json!({"type": "message_stop"})));
            }
        }
    }
    let gap = streamed.gap;
    let body = futures::stream::unfold((events.into_iter(), true), move |(mut events, first)| async move {
        let event = events.next()?;
        if !first && !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(event)), (events, false)))
    });
    // A held stream never ends after its last event: the connection stays open.
    let held = streamed.hold_open.then(futures::stream::pending::<Result<Bytes, std::convert::Infallible>>);
    let body = body.chain(futures::stream::iter(held).flatten());
    ([(header::CONTENT_TYPE, "text/event-stream")], axum::body::Body::from_stream(body)).into_response()
}

/// The characters of a request's prompt in either dialect: messages with string or block
/// content, and Anthropic's top-level `system`.
fn prompt_chars(request: &Value) -> usize {
    fn text(content: &Value) -> usize {
        match content {
            Value::String(text) => text.len(),
            Value::Array(blocks) => blocks.iter().filter_map(|block| block["text"].as_str()).map(str::len).sum(),
            _ => 0,
        }
    }
    let messages: usize =
        request["messages"].as_array().map(|messages| messages.iter().map(|m| text(&m["content"])).sum()).unwrap_or(0);
    messages + text(&request["system"])
}

/// About four characters a token, as OpenAI's tokenizers average on English.
fn approx_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX).max(1)
}

async fn models() -> Response {
    axum::Json(
        json!({ "object": "list", "data": [{ "id": "scripted-model", "object": "model", "owned_by": "scripted" }] }),
    )
    .into_response()
}
