//! `cargo xtask soak`: `aipipe serve` under a steady load while its upstream goes through every
//! fault it meets in production, for minutes, on the shipped defaults. What it reports is what
//! a user would ask of a gateway left running: was every request answered or refused in words
//! a client can act on, did every one leave a telemetry row, and did memory and open files stay
//! flat.

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
/// How long each phase of the upstream's cycle lasts.
const PHASE: Duration = Duration::from_secs(20);
/// Let the gateway warm up before its memory and open files are first read, when the run is
/// too short for a whole cycle.
const WARM_UP: Duration = Duration::from_secs(5);

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
    /// Memory and open files are read at the end of every cycle of the upstream's phases, where
    /// the connection pools hold what the same phases left (a stall fills them, idle
    /// connections close 90 s later): start is the end of the first cycle, end the last.
    rss_start_kib: u64,
    rss_end_kib: u64,
    fds_start: u64,
    fds_end: u64,
    /// Readings taken, one per cycle.
    readings: usize,
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
             rows; RSS {} -> {} KiB, open files {} -> {} ({})",
            figure.requests_sent,
            figure.minutes,
            figure.rate_per_second,
            figure.answered,
            figure.refused_typed,
            figure.untyped,
            figure.telemetry_rows,
            figure.rss_start_kib,
            figure.rss_end_kib,
            figure.fds_start,
            figure.fds_end,
            figure.statuses
        );
    }
    Ok(())
}

async fn run(aipipe: &Path, options: &SoakOptions) -> anyhow::Result<SoakFigure> {
    let upstream = start_upstream().await?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("telemetry.db");
    // The shipped defaults, but for the telemetry file's place and the one workspace's key.
    let config = format!(
        "[telemetry]\ndatabase_url = \"sqlite://{}\"\n[gateway.api_keys]\nsoak = \"{API_KEY_VARIABLE}\"\n",
        db.display()
    );
    let env = [(API_KEY_VARIABLE, API_KEY), ("OPENAI_API_KEY", "sk-soak-upstream")];
    let mut gateway = GatewayProcess::start(aipipe, dir.path(), &format!("http://{upstream}/v1"), &config, &env)
        .context("cannot start aipipe serve")?;
    let url = format!("{}/chat/completions", gateway.base_url);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let counter = Arc::new(AtomicU64::new(0));
    let outcomes: Arc<std::sync::Mutex<BTreeMap<String, u64>>> = Arc::default();
    let total = Duration::from_secs_f64(options.minutes * 60.0);
    let interval = Duration::from_secs_f64(1.0 / f64::from(options.rate));
    let started = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = tokio::task::JoinSet::new();
    let cycle = PHASE * CYCLE.len() as u32;
    let mut warm_reading = None;
    let mut cycle_readings = Vec::new();
    while started.elapsed() < total {
        ticker.tick().await;
        if warm_reading.is_none() && started.elapsed() >= WARM_UP {
            warm_reading = Some(process_reading(gateway.pid()));
        }
        if started.elapsed() >= cycle * (cycle_readings.len() as u32 + 1) {
            cycle_readings.push(process_reading(gateway.pid()));
        }
        let (client, url, counter, outcomes) = (client.clone(), url.clone(), counter.clone(), outcomes.clone());
        tasks.spawn(async move {
            let outcome = call(&client, &url, counter.fetch_add(1, Ordering::Relaxed)).await;
            *outcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(outcome).or_default() += 1;
        });
    }
    while tasks.join_next().await.is_some() {}
    let end_reading = process_reading(gateway.pid());
    gateway.terminate()?;
    let status = tokio::task::spawn_blocking(move || gateway.wait()).await??;
    anyhow::ensure!(status.success(), "aipipe serve exited with {status}");
    let rows = {
        let store = pipeline_core::telemetry::TelemetryStore::connect(&db.display().to_string()).await?;
        store.count().await?
    };
    let outcomes = outcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let count = |prefix: &str| outcomes.iter().filter(|(key, _)| key.starts_with(prefix)).map(|(_, n)| n).sum();
    let ((rss_start_kib, fds_start), (rss_end_kib, fds_end)) = match cycle_readings.as_slice() {
        [first, .., last] => (*first, *last),
        _ => (warm_reading.unwrap_or(end_reading), end_reading),
    };
    Ok(SoakFigure {
        name: "soak",
        minutes: options.minutes,
        rate_per_second: options.rate,
        requests_sent: counter.load(Ordering::Relaxed),
        answered: count("answered"),
        refused_typed: count("typed"),
        untyped: count("untyped"),
        telemetry_rows: rows,
        rss_start_kib,
        rss_end_kib,
        fds_start,
        fds_end,
        readings: cycle_readings.len(),
        statuses: outcomes.iter().map(|(key, n)| format!("{key}: {n}")).collect::<Vec<_>>().join(", "),
    })
}

/// One chat completion with a question no earlier request asked, and how it ended: `answered
/// 200`, `typed 429` (an OpenAI error object), or `untyped ...`.
async fn call(client: &reqwest::Client, url: &str, n: u64) -> String {
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": format!("Question {n}: what changed in release {n}?")}],
    });
    let sent = client.post(url).header("authorization", format!("Bearer {API_KEY}")).json(&body).send().await;
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
        axum::routing::post(move || async move {
            let phase = CYCLE[(started.elapsed().as_secs() / PHASE.as_secs()) as usize % CYCLE.len()];
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
            let body = r#"{"id":"chatcmpl-soak","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"It got faster."},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":4,"total_tokens":24}}"#;
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
