//! A scripted, OpenAI-compatible upstream. It listens on `127.0.0.1:0`, answers
//! `POST /v1/chat/completions` from a queue of scripted [`Reply`]s (then from a responder
//! function), and counts what it received, so a test can prove that a request did or did not
//! reach the upstream.

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
use serde_json::{Value, json};

/// What the upstream answers to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A chat completion with this content. Usage `None` derives it from the text lengths.
    Completion { content: String, usage: Option<(u32, u32)> },
    /// A chat completion cut off at the request's `max_tokens` (`finish_reason: "length"`).
    Truncated(String),
    /// Any status with a body and extra headers (429 with Retry-After, 500, 503, 400...).
    Status { status: u16, body: String, headers: Vec<(String, String)> },
    /// A 200 whose body is not a chat completion.
    Malformed(String),
    /// Never answers: the client must give up by itself.
    Stall,
    /// Waits, then answers.
    Delayed(Duration, Box<Reply>),
    /// An error with this status whose message repeats the `Authorization` header the request
    /// carried, as some upstreams do ("Incorrect API key provided: sk-...").
    EchoKey(u16),
}

impl Reply {
    pub fn completion(content: impl Into<String>) -> Self {
        Self::Completion { content: content.into(), usage: None }
    }

    pub fn completion_with_usage(content: impl Into<String>, input_tokens: u32, output_tokens: u32) -> Self {
        Self::Completion { content: content.into(), usage: Some((input_tokens, output_tokens)) }
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::Status {
            status: 429,
            body: openai_error("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            headers: vec![("retry-after".into(), retry_after_secs.to_string())],
        }
    }

    /// A 429 whose Retry-After (in milliseconds too) is `wait`.
    pub fn rate_limited_for(wait: Duration) -> Self {
        Self::Status {
            status: 429,
            body: openai_error("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            headers: vec![
                ("retry-after".into(), wait.as_secs().max(1).to_string()),
                ("retry-after-ms".into(), wait.as_millis().to_string()),
            ],
        }
    }

    pub fn quota_exhausted() -> Self {
        Self::Status {
            status: 429,
            body: openai_error("You exceeded your current quota", "insufficient_quota", "insufficient_quota"),
            headers: Vec::new(),
        }
    }

    pub fn server_error(status: u16) -> Self {
        Self::Status {
            status,
            body: openai_error("The server had an error", "server_error", "server_error"),
            headers: Vec::new(),
        }
    }

    pub fn bad_request(message: &str) -> Self {
        Self::Status {
            status: 400,
            body: openai_error(message, "invalid_request_error", "invalid_request"),
            headers: Vec::new(),
        }
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
            Self::Completion { .. } | Self::Truncated(_) | Self::Malformed(_) => 200,
            Self::Status { status, .. } => *status,
            Self::Stall => 504,
            Self::Delayed(_, then) => then.status(),
            Self::EchoKey(status) => *status,
        }
    }
}

fn openai_error(message: &str, kind: &str, code: &str) -> String {
    json!({ "error": { "message": message, "type": kind, "param": null, "code": code } }).to_string()
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
    let arrived = Instant::now();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let sequence = shared.requests.fetch_add(1, Ordering::SeqCst) + 1;
    lock(&shared.received).push(request.clone());
    let admitted = admit(&shared);
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
            let key = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()).unwrap_or("");
            let key = key.trim_start_matches("Bearer ");
            Reply::Status {
                status,
                body: openai_error(
                    &format!("Incorrect API key provided: {key}."),
                    "invalid_request_error",
                    "invalid_api_key",
                ),
                headers: Vec::new(),
            }
        }
        other => other,
    };
    let index = {
        let mut exchanges = lock(&shared.exchanges);
        exchanges.push(Exchange { arrived, answered: None, status: reply.status() });
        exchanges.len() - 1
    };
    let mut response = answer(reply, &request, sequence).await;
    if let Some(Ok((limit, remaining))) = admitted {
        for (name, value) in [("x-ratelimit-limit-requests", limit), ("x-ratelimit-remaining-requests", remaining)] {
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

async fn answer(mut reply: Reply, request: &Value, sequence: u64) -> Response {
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
            Reply::Completion { content, usage } => {
                return completion(request, &content, usage, "stop", sequence);
            }
            Reply::Truncated(content) => {
                return completion(request, &content, None, "length", sequence);
            }
            Reply::Malformed(body) => {
                return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            }
            // Resolved with the request's headers before it gets here.
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
    request: &Value,
    content: &str,
    usage: Option<(u32, u32)>,
    finish_reason: &str,
    sequence: u64,
) -> Response {
    let (input_tokens, output_tokens) = usage.unwrap_or_else(|| {
        let prompt_chars: usize = request["messages"]
            .as_array()
            .map(|messages| messages.iter().filter_map(|m| m["content"].as_str()).map(str::len).sum())
            .unwrap_or(0);
        (approx_tokens(prompt_chars), approx_tokens(content.len()))
    });
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let body = json!({
        "id": format!("chatcmpl-scripted-{sequence}"),
        "object": "chat.completion",
        "created": created,
        "model": request["model"].as_str().unwrap_or("scripted-model"),
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content },
            "finish_reason": finish_reason
        }],
        "usage": {
            "prompt_tokens": input_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens
        }
    });
    axum::Json(body).into_response()
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
