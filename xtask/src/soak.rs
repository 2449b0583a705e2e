//! `cargo xtask soak`: `aipipe serve` under a steady load while its upstream goes through every
//! fault it meets in production, for minutes, on the shipped defaults (but for the Redis it
//! shares state through, and an admin key to read its readiness). On top of the steady load,
//! three episodes of a hostile or unlucky day, each at a fixed share of the run: a flood of
//! requests with bad keys (100 a second), 10,000 calls that each open a semantic namespace of
//! their own (a classifier asked with a label set no call used before), and Redis stopped, then
//! started again empty. What it reports is what a user would ask of a gateway left running: was
//! every request answered or refused in words a client can act on, did every authenticated
//! one leave a telemetry row (and no bad key one), did memory and open files stay flat after
//! the first minute, and did the gateway use Redis again once it was back.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use testkit::GatewayProcess;

const API_KEY_VARIABLE: &str = "GATEWAY_SOAK_KEY";
const API_KEY: &str = "sk-aipipe-soak";
const ADMIN_KEY_VARIABLE: &str = "GATEWAY_SOAK_ADMIN";
const ADMIN_KEY: &str = "sk-aipipe-soak-admin";
/// Requests a second with keys no workspace has, during their episode.
const BAD_KEYS_PER_SECOND: u32 = 100;
/// Calls that each open a semantic namespace of their own, per episode.
const NAMESPACES: u64 = 10_000;
/// The first 90 s fill what is bounded: the semantic cache (10,000 entries) twice over, each
/// answer in the exact cache (10,000) too, and the embedder's memory of recent texts (20,000
/// vectors, 32 MB), so that memory is compared once all of them are full.
const WARM_UP: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(90));
const WARM_UP_NAMESPACES: u64 = semantic_cache::RECENT_EMBEDDINGS;
/// Each later episode's share of the run, start to end: bad keys, then as many namespaces again
/// (each evicting one of the first), then Redis down.
const BAD_KEYS_WINDOW: (f64, f64) = (0.15, 0.35);
const NAMESPACES_WINDOW: (f64, f64) = (0.35, 0.65);
const REDIS_DOWN_WINDOW: (f64, f64) = (0.70, 0.80);
/// Memory is compared from this far into the run (the caches, pools and arenas fill first).
const SETTLED: Duration = Duration::from_secs(60);
/// How long each phase of the upstream's cycle lasts.
const PHASE: Duration = Duration::from_secs(20);

pub struct SoakOptions {
    pub minutes: f64,
    pub rate: u32,
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct SoakFigure {
    name: &'static str,
    minutes: f64,
    rate_per_second: u32,
    requests_sent: u64,
    /// Answered 2xx (by the upstream, a cache or a stand-in).
    answered: u64,
    /// Refused with an error in OpenAI's shape and a status a client can act on.
    refused_typed: u64,
    /// Anything else: a connection dropped, a body that is not an error object.
    untyped: u64,
    telemetry_rows: i64,
    /// Requests with the workspace's key (chat and classifier calls): each must leave a row.
    authenticated_requests: u64,
    /// Requests with keys no workspace has: counted in a metric, never written.
    bad_key_requests: u64,
    /// `aipipe_requests_unauthenticated_total` at the end.
    bad_keys_counted: u64,
    /// Rows lost to a full queue or a failed write (`aipipe_telemetry_rows_dropped_total`).
    rows_dropped: u64,
    /// Every authenticated request left exactly one row, and no other request did.
    rows_match: bool,
    /// Classifier calls with a label set of their own (each a semantic namespace), in the
    /// warm-up and in their episode.
    namespaces_sent: u64,
    /// Semantic entries (`aipipe_cache_entries{cache="semantic"}`) at the end: at most
    /// `semantic.max_entries`.
    semantic_entries_end: u64,
    /// Memory and open files are read at the end of every cycle of the upstream's phases, where
    /// the connection pools hold what the same phases left (a stall fills them, idle
    /// connections close 90 s later): start is the first reading at least a minute in, end the
    /// last.
    rss_start_kib: u64,
    rss_end_kib: u64,
    /// `rss_end_kib / rss_start_kib - 1`.
    rss_growth: f64,
    fds_start: u64,
    fds_end: u64,
    /// Readings taken, one per cycle, and the RSS of each (KiB).
    readings: usize,
    rss_readings_kib: String,
    /// From Redis started again to the gateway's readiness naming no part down; `None`: never.
    redis_back_after_s: Option<f64>,
    /// A shared part still down at the end of the run.
    degraded_at_end: bool,
    /// Responses by status, e.g. `200: 9000, 429: 400`.
    statuses: String,
}

/// What the upstream does in each phase, in turn.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Answers,
    RateLimited,
    Outage,
    Stall,
    Malformed,
}

const CYCLE: [Phase; 5] = [Phase::Answers, Phase::RateLimited, Phase::Outage, Phase::Stall, Phase::Malformed];

pub fn soak(root: &Path, options: &SoakOptions) -> anyhow::Result<()> {
    anyhow::ensure!(options.minutes > 0.0 && options.rate > 0, "--minutes and --rate must be positive");
    let aipipe = crate::release_binary(root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let figure = runtime.block_on(run(&aipipe, options))?;
    crate::record::record_run(root, "soak", &format!("cargo xtask soak --minutes {}", options.minutes), &[&figure])?;
    if options.json {
        println!("{}", serde_json::to_string(&figure)?);
    } else {
        println!(
            "{} requests in {} min at {}/s: {} answered, {} refused with a typed error, {} untyped; {} telemetry \
             rows for {} authenticated requests ({}), {} bad keys counted of {} sent; {} namespaces sent, {} \
             semantic entries at the end; RSS {} -> {} KiB ({:+.1}%), open files {} -> {}; Redis back in use {} \
             after it restarted{} ({})",
            figure.requests_sent,
            figure.minutes,
            figure.rate_per_second,
            figure.answered,
            figure.refused_typed,
            figure.untyped,
            figure.telemetry_rows,
            figure.authenticated_requests,
            if figure.rows_match { "one each" } else { "NOT one each" },
            figure.bad_keys_counted,
            figure.bad_key_requests,
            figure.namespaces_sent,
            figure.semantic_entries_end,
            figure.rss_start_kib,
            figure.rss_end_kib,
            figure.rss_growth * 100.0,
            figure.fds_start,
            figure.fds_end,
            figure.redis_back_after_s.map_or_else(|| "never".to_owned(), |secs| format!("{secs:.1} s")),
            if figure.degraded_at_end { "; STILL DEGRADED at the end" } else { "" },
            figure.statuses
        );
    }
    Ok(())
}

async fn run(aipipe: &Path, options: &SoakOptions) -> anyhow::Result<SoakFigure> {
    let upstream = start_upstream().await?;
    let mut redis = testkit::RedisServer::start().context("the soak needs Debian's redis-server")?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("telemetry.db");
    // The shipped defaults, but for the telemetry file's place, the one workspace's key, the
    // Redis replicas share state through, the admin key that reads readiness and metrics, and
    // the classifier on a model of its own: its answers are stored as the namespaces need,
    // not refused by the breaker the chat traffic's outages open for theirs.
    let config = format!(
        "[telemetry]\ndatabase_url = \"sqlite://{}\"\n[state]\nredis_url = \"{}\"\n\
         [steps.classifier]\nmodel = \"gpt-4.1-nano\"\n\
         [gateway]\nadmin_key_env = \"{ADMIN_KEY_VARIABLE}\"\n[gateway.api_keys]\nsoak = \"{API_KEY_VARIABLE}\"\n",
        db.display(),
        redis.url()
    );
    let env = [(API_KEY_VARIABLE, API_KEY), (ADMIN_KEY_VARIABLE, ADMIN_KEY), ("OPENAI_API_KEY", "sk-soak-upstream")];
    let mut gateway = GatewayProcess::start(aipipe, dir.path(), &format!("http://{upstream}/v1"), &config, &env)
        .context("cannot start aipipe serve")?;
    let root = gateway.base_url.trim_end_matches("/v1").to_owned();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let load = Load {
        client: client.clone(),
        url: Arc::from(format!("{}/chat/completions", gateway.base_url)),
        sent: Arc::default(),
        authenticated: Arc::default(),
        bad_keys: Arc::default(),
        namespaces: Arc::default(),
        outcomes: Arc::default(),
    };
    let total = Duration::from_secs_f64(options.minutes * 60.0);
    let window = |(from, to): (f64, f64)| (total.mul_f64(from), total.mul_f64(to));
    let (bad_keys_window, namespaces_window, redis_window) =
        (window(BAD_KEYS_WINDOW), window(NAMESPACES_WINDOW), window(REDIS_DOWN_WINDOW));
    let warm_up = (WARM_UP.0, WARM_UP.1.min(total.mul_f64(BAD_KEYS_WINDOW.0)));
    let every = |window: (Duration, Duration), count: u64| (window.1 - window.0).div_f64(count as f64);
    let started = Instant::now();
    let episodes = {
        let load = load.clone();
        tokio::spawn(async move {
            let (opening, bad_keys, namespaces) = (load.clone(), load.clone(), load);
            tokio::join!(
                paced(started, warm_up, every(warm_up, WARM_UP_NAMESPACES), Some(WARM_UP_NAMESPACES), move |n| {
                    opening.clone().classify(n)
                }),
                paced(
                    started,
                    bad_keys_window,
                    Duration::from_secs_f64(1.0 / f64::from(BAD_KEYS_PER_SECOND)),
                    None,
                    move |_| bad_keys.clone().chat(false)
                ),
                paced(started, namespaces_window, every(namespaces_window, NAMESPACES), Some(NAMESPACES), move |n| {
                    namespaces.clone().classify(WARM_UP_NAMESPACES + n)
                }),
            );
        })
    };
    // The steady load, at its rate.
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(options.rate)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let cycle = PHASE * CYCLE.len() as u32;
    let mut cycle_readings: Vec<(Duration, (u64, u64))> = Vec::new();
    let (mut redis_stopped, mut redis_restarted) = (false, None);
    let (mut redis_back, mut last_asked) = (None, None);
    while started.elapsed() < total {
        ticker.tick().await;
        let now = started.elapsed();
        if now >= cycle * (cycle_readings.len() as u32 + 1) {
            cycle_readings.push((now, process_reading(gateway.pid())));
        }
        if !redis_stopped && now >= redis_window.0 {
            redis.stop();
            redis_stopped = true;
        }
        if redis_stopped && redis_restarted.is_none() && now >= redis_window.1 {
            redis.restart();
            redis_restarted = Some(Instant::now());
        }
        // Readiness asked a few times a second once Redis is back, not on every tick.
        if let (Some(restarted), None) = (redis_restarted, redis_back)
            && last_asked.is_none_or(|asked: Instant| asked.elapsed() >= Duration::from_millis(250))
        {
            last_asked = Some(Instant::now());
            if ready_and_whole(&client, &root).await {
                redis_back = Some(restarted.elapsed());
            }
        }
        tasks.spawn(load.clone().chat(true));
    }
    episodes.await?;
    while tasks.join_next().await.is_some() {}
    let end_reading = process_reading(gateway.pid());
    if redis_back.is_none() && ready_and_whole(&client, &root).await {
        redis_back = redis_restarted.map(|restarted| restarted.elapsed());
    }
    let degraded_at_end = !ready_and_whole(&client, &root).await;
    let metrics = admin_get(&client, &root, "/metrics").await.unwrap_or_default();
    gateway.terminate()?;
    let status = tokio::task::spawn_blocking(move || gateway.wait()).await??;
    anyhow::ensure!(status.success(), "aipipe serve exited with {status}");
    let rows = {
        let store = pipeline_core::telemetry::TelemetryStore::connect(&db.display().to_string()).await?;
        store.count().await?
    };
    let outcomes = load.outcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let count = |prefix: &str| outcomes.iter().filter(|(key, _)| key.starts_with(prefix)).map(|(_, n)| n).sum();
    let settled: Vec<(u64, u64)> =
        cycle_readings.iter().filter(|(at, _)| *at >= SETTLED).map(|(_, reading)| *reading).collect();
    let ((rss_start_kib, fds_start), (rss_end_kib, fds_end)) = match settled.as_slice() {
        [first, .., last] => (*first, *last),
        [only] => (*only, end_reading),
        [] => (cycle_readings.first().map_or(end_reading, |(_, reading)| *reading), end_reading),
    };
    let authenticated_requests = load.authenticated.load(Ordering::Relaxed);
    let rows_dropped = metric(&metrics, "aipipe_telemetry_rows_dropped_total").unwrap_or(0);
    Ok(SoakFigure {
        name: "soak",
        minutes: options.minutes,
        rate_per_second: options.rate,
        requests_sent: load.sent.load(Ordering::Relaxed),
        answered: count("answered"),
        refused_typed: count("typed"),
        untyped: count("untyped"),
        telemetry_rows: rows,
        authenticated_requests,
        bad_key_requests: load.bad_keys.load(Ordering::Relaxed),
        bad_keys_counted: metric(&metrics, "aipipe_requests_unauthenticated_total").unwrap_or(0),
        rows_dropped,
        rows_match: u64::try_from(rows).is_ok_and(|rows| rows == authenticated_requests),
        namespaces_sent: load.namespaces.load(Ordering::Relaxed),
        semantic_entries_end: metric(&metrics, "aipipe_cache_entries{cache=\"semantic\"}").unwrap_or(0),
        rss_start_kib,
        rss_end_kib,
        rss_growth: rss_end_kib as f64 / rss_start_kib.max(1) as f64 - 1.0,
        fds_start,
        fds_end,
        readings: cycle_readings.len(),
        rss_readings_kib: cycle_readings
            .iter()
            .map(|(at, (rss, _))| format!("{:.0} s: {rss}", at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        redis_back_after_s: redis_back.map(|back| back.as_secs_f64()),
        degraded_at_end,
        statuses: outcomes.iter().map(|(key, n)| format!("{key}: {n}")).collect::<Vec<_>>().join(", "),
    })
}

/// The requests sent, and what came of them.
#[derive(Clone)]
struct Load {
    client: reqwest::Client,
    url: Arc<str>,
    sent: Arc<AtomicU64>,
    authenticated: Arc<AtomicU64>,
    bad_keys: Arc<AtomicU64>,
    namespaces: Arc<AtomicU64>,
    outcomes: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

impl Load {
    /// A chat request with a question no earlier one asked, with the workspace's key or a key
    /// no workspace has.
    async fn chat(self, authenticated: bool) {
        let n = self.sent.fetch_add(1, Ordering::Relaxed);
        let key = if authenticated { API_KEY.to_owned() } else { format!("sk-not-a-key-{n}") };
        let counter = if authenticated { &self.authenticated } else { &self.bad_keys };
        counter.fetch_add(1, Ordering::Relaxed);
        let outcome = call(&self.client, &self.url, n, &key).await;
        self.tally(outcome);
    }

    /// A classifier call with label set `n`, a namespace of its own.
    async fn classify(self, n: u64) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.authenticated.fetch_add(1, Ordering::Relaxed);
        self.namespaces.fetch_add(1, Ordering::Relaxed);
        let outcome = classify(&self.client, &self.url, n).await;
        self.tally(outcome);
    }

    fn tally(&self, outcome: String) {
        *self.outcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(outcome).or_default() += 1;
    }
}

/// Runs `send(n)` every `interval` within `window` of the run (at most `limit` times), each on
/// a task of its own, and waits for them all.
async fn paced<F, Fut>(started: Instant, window: (Duration, Duration), interval: Duration, limit: Option<u64>, send: F)
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::time::sleep(window.0.saturating_sub(started.elapsed())).await;
    let mut ticker = tokio::time::interval(interval.max(Duration::from_micros(100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = tokio::task::JoinSet::new();
    let mut n = 0;
    while started.elapsed() < window.1 && limit.is_none_or(|limit| n < limit) {
        ticker.tick().await;
        sent.spawn(send(n));
        n += 1;
    }
    while sent.join_next().await.is_some() {}
}

/// An admin surface's body, with the admin key.
async fn admin_get(client: &reqwest::Client, root: &str, path: &str) -> Option<String> {
    let response =
        client.get(format!("{root}{path}")).header("authorization", format!("Bearer {ADMIN_KEY}")).send().await.ok()?;
    response.text().await.ok()
}

/// Ready, with no shared part named down (the admin's view of `/readyz`).
async fn ready_and_whole(client: &reqwest::Client, root: &str) -> bool {
    admin_get(client, root, "/readyz").await.is_some_and(|body| body.starts_with("ready") && !body.contains("degraded"))
}

/// A sample's value in Prometheus text (`name` with its labels, if any, as written).
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map(|value| value as u64)
}

/// A classifier call whose label set no other call has: the semantic cache keys its
/// namespace by the input's other fields, so each opens one. The upstream always answers
/// these (a structured request), so that each is stored.
async fn classify(client: &reqwest::Client, url: &str, n: u64) -> String {
    let input = serde_json::json!({"text": format!("Ticket {n}: I was charged twice"), "labels": ["billing", format!("other-{n}")]});
    let body =
        serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": input.to_string()}]});
    let sent = client
        .post(url)
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("x-aipipe-step", "classifier")
        .json(&body)
        .send()
        .await;
    outcome(sent).await
}

/// One chat completion with a question no earlier request asked, with `key`, and how it
/// ended: `answered 200`, `typed 429` (an OpenAI error object), or `untyped ...`.
async fn call(client: &reqwest::Client, url: &str, n: u64, key: &str) -> String {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": format!("Question {n}: what changed in release {n}?")}],
    });
    let sent = client.post(url).header("authorization", format!("Bearer {key}")).json(&body).send().await;
    outcome(sent).await
}

async fn outcome(sent: Result<reqwest::Response, reqwest::Error>) -> String {
    let response = match sent {
        Ok(response) => response,
        Err(err) => return format!("untyped {}", if err.is_timeout() { "timeout" } else { "connection" }),
    };
    let status = response.status().as_u16();
    let value: Option<serde_json::Value> = response.json().await.ok();
    match value {
        Some(value) if (200..300).contains(&status) && value["choices"].is_array() => format!("answered {status}"),
        Some(value) if value["error"]["code"].is_string() && value["error"]["message"].is_string() => {
            format!("typed {status}")
        }
        _ => format!("untyped {status}"),
    }
}

/// The gateway's resident memory (KiB) and open file descriptors, from /proc.
fn process_reading(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count() as u64);
    (rss, fds)
}

/// An OpenAI-compatible upstream that goes through [`CYCLE`], a phase every [`PHASE`]. When it
/// answers, it declares generous rate limits in its headers, as OpenAI does.
async fn start_upstream() -> anyhow::Result<std::net::SocketAddr> {
    let started = Instant::now();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            // A structured step's request (asked for a JSON schema) is always answered: the
            // namespaces episode needs its answers stored.
            let structured = serde_json::from_slice::<serde_json::Value>(&body)
                .is_ok_and(|request| request.get("response_format").is_some());
            let phase = if structured {
                Phase::Answers
            } else {
                CYCLE[(started.elapsed().as_secs() / PHASE.as_secs()) as usize % CYCLE.len()]
            };
            answer(phase).await
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("xtask: the soak upstream stopped: {err}");
        }
    });
    Ok(address)
}

async fn answer(phase: Phase) -> Response {
    let json = |status: StatusCode, body: String| (status, [(header::CONTENT_TYPE, "application/json")], body);
    match phase {
        Phase::Answers => {
            // A classifier's answer, which a chat step passes on as text.
            let body = r#"{"id":"chatcmpl-soak","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"{\"label\": \"billing\", \"confidence\": 0.9}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":4,"total_tokens":24}}"#;
            let mut response = json(StatusCode::OK, body.to_owned()).into_response();
            for (name, value) in [
                ("x-ratelimit-limit-requests", "30000"),
                ("x-ratelimit-remaining-requests", "29999"),
                ("x-ratelimit-limit-tokens", "150000000"),
                ("x-ratelimit-remaining-tokens", "149999000"),
            ] {
                response.headers_mut().insert(name, HeaderValue::from_static(value));
            }
            response
        }
        Phase::RateLimited => {
            let mut response = json(
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#
                    .to_owned(),
            )
            .into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            response
        }
        Phase::Outage => json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"error":{"message":"The server is overloaded","type":"server_error","code":null}}"#.to_owned(),
        )
        .into_response(),
        Phase::Stall => {
            // Longer than the provider's request timeout: the gateway gives up first.
            tokio::time::sleep(Duration::from_secs(120)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Phase::Malformed => {
            json(StatusCode::OK, r#"{"id": "chatcmpl-broken", "choices": ["#.to_owned()).into_response()
        }
    }
}
