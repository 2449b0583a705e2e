//! `cargo xtask bench gateway`: what `aipipe serve` adds to a call, against a loopback
//! upstream that answers at once (and declares generous rate limits, as OpenAI does). The same
//! load generator calls the upstream directly, the gateway on the shipped defaults, and the
//! same gateway with its limits off, in the same run, on this machine (load generator,
//! upstream and gateways share its cores).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use testkit::GatewayProcess;

use crate::bench::percentile_us;

/// Sequential requests per latency round; rounds alternate direct and gateway so that drift
/// in the machine's speed falls on both alike.
const LATENCY_ROUND: usize = 1_000;
const LATENCY_ROUNDS: usize = 5;
/// Closed-loop load: this many requests in flight at all times, for this long.
const CONCURRENCY: usize = 16;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(5);
const API_KEY_VARIABLE: &str = "GATEWAY_BENCH_KEY";
const API_KEY: &str = "sk-aipipe-bench";

/// The upstream's whole answer: fixed, so that it costs next to nothing to produce.
const UPSTREAM_REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":2,"total_tokens":26}}"#;

#[derive(Debug, Serialize)]
struct GatewayFigure {
    name: &'static str,
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    added_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    added_p99_us: Option<f64>,
    /// Requests per second of this gateway over the same gateway with `[limits] enabled =
    /// false`, measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    share_of_limits_off: Option<f64>,
}

pub fn bench_gateway(json: bool, root: &Path) -> anyhow::Result<()> {
    let aipipe = crate::release_binary(root)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let figures = runtime.block_on(async {
        let upstream = start_upstream().await?;
        let dir = tempfile::tempdir()?;
        let limits_off = tempfile::tempdir()?;
        let upstream_url = format!("http://{upstream}/v1");
        let gateway = start_gateway(&aipipe, dir.path(), &upstream_url, "")?;
        let unlimited = start_gateway(&aipipe, limits_off.path(), &upstream_url, "[limits]\nenabled = false\n")?;
        let direct_url = format!("http://{upstream}/v1/chat/completions");
        let gateway_url = format!("{}/chat/completions", gateway.base_url);
        let unlimited_url = format!("{}/chat/completions", unlimited.base_url);
        let client = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build()?;
        let counter = Arc::new(AtomicUsize::new(0));

        for url in [&direct_url, &gateway_url, &unlimited_url] {
            sequential(&client, url, LATENCY_ROUND, &counter).await?;
        }
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        for _ in 0..LATENCY_ROUNDS {
            direct.extend(sequential(&client, &direct_url, LATENCY_ROUND, &counter).await?);
            through.extend(sequential(&client, &gateway_url, LATENCY_ROUND, &counter).await?);
        }
        let direct_rps = closed_loop(&client, &direct_url, &counter).await?;
        // Alternated, so that drift in the machine's speed falls on both alike.
        let (mut gateway_rps, mut unlimited_rps) = (0.0, 0.0);
        for _ in 0..2 {
            gateway_rps += closed_loop(&client, &gateway_url, &counter).await? / 2.0;
            unlimited_rps += closed_loop(&client, &unlimited_url, &counter).await? / 2.0;
        }
        drop((gateway, unlimited));
        direct.sort();
        through.sort();
        let (direct_p50, direct_p99) = (percentile_us(&direct, 0.50), percentile_us(&direct, 0.99));
        let (gateway_p50, gateway_p99) = (percentile_us(&through, 0.50), percentile_us(&through, 0.99));
        anyhow::Ok(vec![
            GatewayFigure {
                name: "direct",
                requests_per_second: direct_rps,
                p50_us: direct_p50,
                p99_us: direct_p99,
                added_p50_us: None,
                added_p99_us: None,
                share_of_limits_off: None,
            },
            GatewayFigure {
                name: "gateway",
                requests_per_second: gateway_rps,
                p50_us: gateway_p50,
                p99_us: gateway_p99,
                added_p50_us: Some(gateway_p50 - direct_p50),
                added_p99_us: Some(gateway_p99 - direct_p99),
                share_of_limits_off: Some(gateway_rps / unlimited_rps),
            },
        ])
    })?;
    crate::record::record(root, "gateway", &figures)?;
    for figure in &figures {
        if json {
            println!("{}", serde_json::to_string(figure)?);
        } else {
            let added = match (figure.added_p50_us, figure.added_p99_us, figure.share_of_limits_off) {
                (Some(p50), Some(p99), Some(share)) => {
                    format!("   added p50 {p50:.0} us, p99 {p99:.0} us; {:.0}% of limits off", share * 100.0)
                }
                _ => String::new(),
            };
            println!(
                "{:<8} {:>7.0} requests/s   p50 {:>6.0} us   p99 {:>6.0} us{added}",
                figure.name, figure.requests_per_second, figure.p50_us, figure.p99_us
            );
        }
    }
    Ok(())
}

/// An OpenAI-compatible endpoint that answers every completion at once with the same reply,
/// declaring generous rate limits in its headers as OpenAI does.
async fn start_upstream() -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            (
                [
                    (axum::http::header::CONTENT_TYPE.as_str(), "application/json"),
                    ("x-ratelimit-limit-requests", "10000000"),
                    ("x-ratelimit-remaining-requests", "9999999"),
                    ("x-ratelimit-limit-tokens", "1000000000"),
                    ("x-ratelimit-remaining-tokens", "999999000"),
                ],
                UPSTREAM_REPLY,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("xtask: the bench upstream stopped: {err}");
        }
    });
    Ok(address)
}

/// `aipipe serve` on the shipped defaults, plus `extra` config; each request is new, so every
/// call misses the cache and goes upstream. The only things set: where telemetry goes and the
/// workspace's key.
fn start_gateway(aipipe: &Path, dir: &Path, upstream: &str, extra: &str) -> anyhow::Result<GatewayProcess> {
    let config = format!(
        "[telemetry]\ndatabase_url = \"sqlite://{}\"\n[gateway.api_keys]\nbench = \"{API_KEY_VARIABLE}\"\n{extra}",
        dir.join("telemetry.db").display()
    );
    let env = [(API_KEY_VARIABLE, API_KEY), ("OPENAI_API_KEY", "sk-bench-upstream")];
    GatewayProcess::start(aipipe, dir, upstream, &config, &env)
        .with_context(|| format!("cannot start `{} serve`", aipipe.display()))
}

/// One chat completion with a question no earlier request asked.
async fn call(client: &reqwest::Client, url: &str, counter: &AtomicUsize) -> anyhow::Result<()> {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"What is the capital of France? (request {n})"}}]}}"#
    );
    let response = client
        .post(url)
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let text = response.bytes().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

async fn sequential(
    client: &reqwest::Client,
    url: &str,
    requests: usize,
    counter: &AtomicUsize,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        call(client, url, counter).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// Requests per second with `CONCURRENCY` requests always in flight.
async fn closed_loop(client: &reqwest::Client, url: &str, counter: &Arc<AtomicUsize>) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, url, counter, stop) = (client.clone(), url.to_owned(), counter.clone(), stop.clone());
            tokio::spawn(async move {
                let mut done = 0_u64;
                while !stop.load(Ordering::Relaxed) {
                    call(&client, &url, &counter).await?;
                    done += 1;
                }
                anyhow::Ok(done)
            })
        })
        .collect();
    tokio::time::sleep(THROUGHPUT_WINDOW).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        total += worker.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}
