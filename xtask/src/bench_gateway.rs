//! `cargo xtask bench gateway`: what `aipipe serve` adds to a call, against a loopback
//! upstream that answers at once (and declares generous rate limits, as OpenAI does). The same
//! load generator calls the upstream directly, the gateway on the shipped defaults, and the
//! same gateway with its limits off, the same gateway exporting traces over OTLP to a local
//! collector, and the same gateway with the chat step's semantic cache on (every request a
//! miss: embedded, looked up and stored), in the same run, on this machine (load generator,
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
/// Closed-loop windows per gateway. On two shared cores one window can be 20% off the next
/// one of the same gateway, so a share is the median of its rounds' ratios, not the ratio of
/// two windows; with 5 rounds the median itself still moved by 10% from run to run.
const THROUGHPUT_ROUNDS: usize = 9;
/// Streamed requests per time-to-first-token round, alternating as above.
const STREAM_ROUND: usize = 100;
/// The streaming upstream sends its first piece at once and the rest after this pause, so that
/// the first token and the whole answer are far apart, as they are with a real model.
const STREAM_TAIL: Duration = Duration::from_millis(10);
/// The one default `gateway_semantic` changes: the chat step compares its opening question.
const SEMANTIC_CHAT: &str = "[steps.chat]\nsemantic_field = \"messages\"\n";
const API_KEY_VARIABLE: &str = "GATEWAY_BENCH_KEY";
const API_KEY: &str = "sk-aipipe-bench";

/// The upstream's whole answer: fixed, so that it costs next to nothing to produce.
const UPSTREAM_REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":2,"total_tokens":26}}"#;

#[derive(Debug, Serialize)]
struct GatewayFigure {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests_per_second: Option<f64>,
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
    /// Requests per second of this gateway exporting traces over OTLP over the same gateway
    /// without, measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    share_of_export_off: Option<f64>,
    /// Requests per second of the chat step with the semantic cache on (every request a miss)
    /// over the shipped gateway, measured in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    share_of_semantic_off: Option<f64>,
    /// The gateway process's CPU time (all its threads) per request over its closed-loop
    /// windows: steadier than requests per second on a shared machine, and what sets them
    /// when the cores are the bound. Linux only.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_us_per_request: Option<f64>,
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
        // The shipped defaults but for a collector to export traces to (one that takes them
        // and answers at once, as a local collector agent does).
        let exporting_dir = tempfile::tempdir()?;
        let collector = start_collector().await?;
        let exporting = start_gateway_with(
            &aipipe,
            exporting_dir.path(),
            &upstream_url,
            &format!("otlp_endpoint = \"http://{collector}\"\n"),
            "",
        )?;
        // The chat step with the semantic cache on (it ships off for chat: a default changed,
        // to measure what a semantic step adds). Every request is a question no earlier one
        // asked, whose number the guards tell apart: each misses, so each is embedded, looked
        // up and stored on the request path.
        let semantic_dir = tempfile::tempdir()?;
        let semantic = start_gateway(&aipipe, semantic_dir.path(), &upstream_url, SEMANTIC_CHAT)?;
        let semantic_url = format!("{}/chat/completions", semantic.base_url);
        let exporting_url = format!("{}/chat/completions", exporting.base_url);
        let direct_url = format!("http://{upstream}/v1/chat/completions");
        let gateway_url = format!("{}/chat/completions", gateway.base_url);
        let unlimited_url = format!("{}/chat/completions", unlimited.base_url);
        let client = reqwest::Client::builder().pool_max_idle_per_host(CONCURRENCY).build()?;
        let counter = Arc::new(AtomicUsize::new(0));

        for url in [&direct_url, &gateway_url, &unlimited_url, &exporting_url, &semantic_url] {
            sequential(&client, url, LATENCY_ROUND, &counter).await?;
        }
        let (mut direct, mut through, mut exported, mut embedded) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..LATENCY_ROUNDS {
            direct.extend(sequential(&client, &direct_url, LATENCY_ROUND, &counter).await?);
            through.extend(sequential(&client, &gateway_url, LATENCY_ROUND, &counter).await?);
            exported.extend(sequential(&client, &exporting_url, LATENCY_ROUND, &counter).await?);
            embedded.extend(sequential(&client, &semantic_url, LATENCY_ROUND, &counter).await?);
        }
        // Time to first token of streamed answers: through the gateway minus direct.
        let (mut direct_ttft, mut gateway_ttft) = (Vec::new(), Vec::new());
        for _ in 0..LATENCY_ROUNDS {
            direct_ttft.extend(streamed(&client, &direct_url, &counter).await?);
            gateway_ttft.extend(streamed(&client, &gateway_url, &counter).await?);
        }
        direct_ttft.sort();
        gateway_ttft.sort();
        let direct_rps = closed_loop(&client, std::slice::from_ref(&direct_url), &counter).await?;
        let cpu_before = [process_cpu(gateway.pid()), process_cpu(exporting.pid()), process_cpu(semantic.pid())];
        let [gateway_rps, unlimited_rps, exporting_rps, semantic_rps] = closed_loop_rounds(
            &client,
            [
                std::slice::from_ref(&gateway_url),
                std::slice::from_ref(&unlimited_url),
                std::slice::from_ref(&exporting_url),
                std::slice::from_ref(&semantic_url),
            ],
            &counter,
        )
        .await?;
        let cpu_after = [process_cpu(gateway.pid()), process_cpu(exporting.pid()), process_cpu(semantic.pid())];
        let per_request = |index: usize, rps: &[f64]| {
            let requests: f64 = rps.iter().map(|rps| rps * THROUGHPUT_WINDOW.as_secs_f64()).sum();
            let spent = cpu_after[index]?.checked_sub(cpu_before[index]?)?;
            Some(spent.as_secs_f64() * 1e6 / requests)
        };
        let (gateway_cpu, exporting_cpu) = (per_request(0, &gateway_rps), per_request(1, &exporting_rps));
        let semantic_cpu = per_request(2, &semantic_rps);
        let share_of_limits_off = median_ratio(&gateway_rps, &unlimited_rps);
        let share_of_export_off = median_ratio(&exporting_rps, &gateway_rps);
        let share_of_semantic_off = median_ratio(&semantic_rps, &gateway_rps);
        let (gateway_rps, exporting_rps, semantic_rps) =
            (median(gateway_rps), median(exporting_rps), median(semantic_rps));
        drop((gateway, unlimited, exporting, semantic));
        direct.sort();
        through.sort();
        exported.sort();
        embedded.sort();
        let (exported_p50, exported_p99) = (percentile_us(&exported, 0.50), percentile_us(&exported, 0.99));
        let (embedded_p50, embedded_p99) = (percentile_us(&embedded, 0.50), percentile_us(&embedded, 0.99));
        let (direct_p50, direct_p99) = (percentile_us(&direct, 0.50), percentile_us(&direct, 0.99));
        let (gateway_p50, gateway_p99) = (percentile_us(&through, 0.50), percentile_us(&through, 0.99));
        anyhow::Ok(vec![
            GatewayFigure {
                name: "direct",
                requests_per_second: Some(direct_rps),
                p50_us: direct_p50,
                p99_us: direct_p99,
                added_p50_us: None,
                added_p99_us: None,
                share_of_limits_off: None,
                share_of_export_off: None,
                share_of_semantic_off: None,
                cpu_us_per_request: None,
            },
            GatewayFigure {
                name: "gateway",
                requests_per_second: Some(gateway_rps),
                p50_us: gateway_p50,
                p99_us: gateway_p99,
                added_p50_us: Some(gateway_p50 - direct_p50),
                added_p99_us: Some(gateway_p99 - direct_p99),
                share_of_limits_off: Some(share_of_limits_off),
                share_of_export_off: None,
                share_of_semantic_off: None,
                cpu_us_per_request: gateway_cpu,
            },
            GatewayFigure {
                name: "gateway_otlp",
                requests_per_second: Some(exporting_rps),
                p50_us: exported_p50,
                p99_us: exported_p99,
                added_p50_us: Some(exported_p50 - direct_p50),
                added_p99_us: Some(exported_p99 - direct_p99),
                share_of_limits_off: None,
                share_of_export_off: Some(share_of_export_off),
                share_of_semantic_off: None,
                cpu_us_per_request: exporting_cpu,
            },
            GatewayFigure {
                name: "gateway_semantic",
                requests_per_second: Some(semantic_rps),
                p50_us: embedded_p50,
                p99_us: embedded_p99,
                added_p50_us: Some(embedded_p50 - direct_p50),
                added_p99_us: Some(embedded_p99 - direct_p99),
                share_of_limits_off: None,
                share_of_export_off: None,
                share_of_semantic_off: Some(share_of_semantic_off),
                cpu_us_per_request: semantic_cpu,
            },
            GatewayFigure {
                name: "stream_ttft_added_us",
                requests_per_second: None,
                p50_us: percentile_us(&gateway_ttft, 0.50) - percentile_us(&direct_ttft, 0.50),
                p99_us: percentile_us(&gateway_ttft, 0.99) - percentile_us(&direct_ttft, 0.99),
                added_p50_us: None,
                added_p99_us: None,
                share_of_limits_off: None,
                share_of_export_off: None,
                share_of_semantic_off: None,
                cpu_us_per_request: None,
            },
        ])
    })?;
    crate::record::record(root, "gateway", &figures)?;
    for figure in &figures {
        if json {
            println!("{}", serde_json::to_string(figure)?);
        } else {
            let added = match (figure.added_p50_us, figure.added_p99_us) {
                (Some(p50), Some(p99)) => {
                    format!("   added p50 {p50:.0} us, p99 {p99:.0} us")
                        + &figure
                            .share_of_limits_off
                            .map(|share| format!("; {:.0}% of limits off", share * 100.0))
                            .unwrap_or_default()
                        + &figure
                            .share_of_export_off
                            .map(|share| format!("; {:.0}% of export off", share * 100.0))
                            .unwrap_or_default()
                        + &figure
                            .share_of_semantic_off
                            .map(|share| format!("; {:.0}% of the semantic cache off", share * 100.0))
                            .unwrap_or_default()
                        + &figure
                            .cpu_us_per_request
                            .map(|cpu| format!("; {cpu:.0} us of CPU per request"))
                            .unwrap_or_default()
                }
                _ => String::new(),
            };
            match figure.requests_per_second {
                Some(rps) => println!(
                    "{:<16} {:>7.0} requests/s   p50 {:>6.0} us   p99 {:>6.0} us{added}",
                    figure.name, rps, figure.p50_us, figure.p99_us
                ),
                None => println!(
                    "{}: time to first token through the gateway minus direct, p50 {:.0} us, p99 {:.0} us",
                    figure.name, figure.p50_us, figure.p99_us
                ),
            }
        }
    }
    Ok(())
}

/// The CPU time process `pid` has used so far, all threads (Linux's `/proc`; `None`
/// elsewhere).
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's name, which may hold spaces: state is the 1st field, utime the 12th
    // and stime the 13th, in clock ticks of 1/100 s on Linux.
    let (_, fields) = stat.rsplit_once(") ")?;
    let mut fields = fields.split(' ').skip(11);
    let ticks = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Closed-loop requests per second of each setup (the URLs of one gateway, or of replicas
/// behind a balancer), one window each per round for [`THROUGHPUT_ROUNDS`] rounds. Within a
/// round the setups run back to back, in reverse order every other round so that neither side
/// of a ratio always goes first: compare them with [`median_ratio`], round by round.
pub(crate) async fn closed_loop_rounds<const SETUPS: usize>(
    client: &reqwest::Client,
    setups: [&[String]; SETUPS],
    counter: &Arc<AtomicUsize>,
) -> anyhow::Result<[Vec<f64>; SETUPS]> {
    let mut figures: [Vec<f64>; SETUPS] = std::array::from_fn(|_| Vec::with_capacity(THROUGHPUT_ROUNDS));
    for round in 0..THROUGHPUT_ROUNDS {
        let mut order: Vec<usize> = (0..SETUPS).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for setup in order {
            figures[setup].push(closed_loop(client, setups[setup], counter).await?);
        }
    }
    Ok(figures)
}

/// The median of `figures` (nearest rank, as every percentile here).
pub(crate) fn median(mut figures: Vec<f64>) -> f64 {
    figures.sort_by(f64::total_cmp);
    pipeline_core::telemetry::percentile(&figures, 0.5)
}

/// The median over rounds of `numerators[i] / denominators[i]`.
pub(crate) fn median_ratio(numerators: &[f64], denominators: &[f64]) -> f64 {
    median(numerators.iter().zip(denominators).map(|(numerator, denominator)| numerator / denominator).collect())
}

/// An OpenAI-compatible endpoint that answers every completion at once with the same reply,
/// declaring generous rate limits in its headers as OpenAI does; a streamed request gets its
/// first piece at once and the rest after [`STREAM_TAIL`].
pub(crate) async fn start_upstream() -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|body: axum::body::Bytes| async move {
            let limits = [
                ("x-ratelimit-limit-requests", "10000000"),
                ("x-ratelimit-remaining-requests", "9999999"),
                ("x-ratelimit-limit-tokens", "1000000000"),
                ("x-ratelimit-remaining-tokens", "999999000"),
            ];
            let streams =
                serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|request| request["stream"] == true);
            let (content_type, body) = if streams {
                let pieces = futures::StreamExt::then(
                    futures::stream::iter(STREAM_EVENTS.iter().enumerate()),
                    |(index, event)| async move {
                        if index == 2 {
                            tokio::time::sleep(STREAM_TAIL).await;
                        }
                        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from_static(event.as_bytes()))
                    },
                );
                ("text/event-stream", axum::body::Body::from_stream(pieces))
            } else {
                ("application/json", axum::body::Body::from(UPSTREAM_REPLY))
            };
            let mut response = axum::response::Response::new(body);
            let headers = response.headers_mut();
            headers.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static(content_type));
            for (name, value) in limits {
                headers.insert(name, axum::http::HeaderValue::from_static(value));
            }
            response
        }),
    );
    serve_locally(app, "upstream").await
}

/// An OTLP/HTTP collector that takes every export and answers at once.
async fn start_collector() -> anyhow::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(|_body: axum::body::Bytes| async {
            ([("content-type", "application/x-protobuf")], Vec::new())
        }),
    );
    serve_locally(app, "collector").await
}

/// `app` on a free loopback port, served until the process ends.
async fn serve_locally(app: axum::Router, what: &'static str) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("xtask: the bench {what} stopped: {err}");
        }
    });
    Ok(address)
}

/// `aipipe serve` on the shipped defaults, plus `extra` config; each request is new, so every
/// call misses the cache and goes upstream. The only things set: where telemetry goes and the
/// workspace's key.
pub(crate) fn start_gateway(aipipe: &Path, dir: &Path, upstream: &str, extra: &str) -> anyhow::Result<GatewayProcess> {
    start_gateway_with(aipipe, dir, upstream, "", extra)
}

/// The same, with `telemetry` lines in its `[telemetry]` table.
fn start_gateway_with(
    aipipe: &Path,
    dir: &Path,
    upstream: &str,
    telemetry: &str,
    extra: &str,
) -> anyhow::Result<GatewayProcess> {
    let config = format!(
        "[telemetry]\ndatabase_url = \"sqlite://{}\"\n{telemetry}[gateway.api_keys]\nbench = \"{API_KEY_VARIABLE}\"\n{extra}",
        dir.join("telemetry.db").display()
    );
    let env = [(API_KEY_VARIABLE, API_KEY), ("OPENAI_API_KEY", "sk-bench-upstream")];
    GatewayProcess::start(aipipe, dir, upstream, &config, &env)
        .with_context(|| format!("cannot start `{} serve`", aipipe.display()))
}

/// A chat completion request with a question no earlier request asked, whole or streamed.
fn ask(client: &reqwest::Client, url: &str, counter: &AtomicUsize, stream: bool) -> reqwest::RequestBuilder {
    let n = counter.fetch_add(1, Ordering::Relaxed);
    let body = format!(
        r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"What is the capital of France? (request {n})"}}]}}"#
    );
    client
        .post(url)
        .header("authorization", format!("Bearer {API_KEY}"))
        .header("content-type", "application/json")
        .body(body)
}

/// One chat completion with a question no earlier request asked.
async fn call(client: &reqwest::Client, url: &str, counter: &AtomicUsize) -> anyhow::Result<()> {
    let response = ask(client, url, counter, false).send().await?;
    let status = response.status();
    let text = response.bytes().await?;
    if !status.is_success() {
        bail!("{url} answered {status}: {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

/// The events of the streamed answer: the role, the first piece, then (after the tail) the
/// rest, the finish, the usage and `[DONE]`.
const STREAM_EVENTS: [&str; 6] = [
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Paris\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\".\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":24,\"completion_tokens\":2,\"total_tokens\":26}}\n\n",
    "data: [DONE]\n\n",
];

/// Streamed calls, one after another: for each, the time until its first piece of content
/// arrived (the rest is read to the end before the next call).
async fn streamed(client: &reqwest::Client, url: &str, counter: &AtomicUsize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(STREAM_ROUND);
    for _ in 0..STREAM_ROUND {
        let request = ask(client, url, counter, true);
        let started = Instant::now();
        let mut response = request.send().await?;
        if !response.status().is_success() {
            bail!("{url} answered {} to a streamed request", response.status());
        }
        let mut seen = Vec::new();
        let mut first = None;
        while let Some(chunk) = response.chunk().await? {
            seen.extend_from_slice(&chunk);
            if first.is_none() && seen.windows(5).any(|window| window == b"Paris") {
                first = Some(started.elapsed());
            }
        }
        samples.push(first.with_context(|| format!("{url} streamed no content"))?);
    }
    Ok(samples)
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

/// Requests per second with `CONCURRENCY` requests always in flight, spread evenly over `urls`
/// (several replicas behind a round-robin balancer).
pub(crate) async fn closed_loop(
    client: &reqwest::Client,
    urls: &[String],
    counter: &Arc<AtomicUsize>,
) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|worker| {
            let url = urls[worker % urls.len()].clone();
            let (client, counter, stop) = (client.clone(), counter.clone(), stop.clone());
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
