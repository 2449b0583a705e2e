//! Telemetry of the engine: the rows on SQLite and PostgreSQL, a database writer that cannot
//! keep up, `/metrics` as Prometheus text, anomaly alerts to a webhook.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pipeline_core::telemetry::{self, AlertSettings, BreakerState, CallStatus, ErrorClass, Metrics};
use pipeline_core::{CallOptions, Source};
use serde_json::Value;
use sqlx::{Connection, Executor};
use testkit::{CLASSIFIED, Harness, HarnessBuilder, Reply, fresh_postgres};

/// An upstream answer, an exact-cache hit, a rule-based fallback and an error, and the row of
/// each with every field.
async fn rows_for_every_kind_of_answer(harness: HarnessBuilder) {
    let h = harness.start().await;
    h.upstream.push(Reply::completion_with_usage(CLASSIFIED, 120, 15));
    h.upstream.push(Reply::server_error(503));
    h.upstream.push(Reply::bad_request("unsupported parameter"));
    let upstream = h.classify("ws-a", "charged twice", CallOptions::default()).await.unwrap();
    let cached = h.classify("ws-a", "charged twice", CallOptions::default()).await.unwrap();
    let fallback = h.classify("ws-a", "app crashes", CallOptions::default()).await.unwrap();
    let failed = h.classify("ws-a", "refund", CallOptions::default()).await.unwrap_err();
    assert_eq!(
        (upstream.source, cached.source, fallback.source),
        (Source::Upstream, Source::ExactCache, Source::FallbackRule)
    );

    let rows = h.rows().await;
    assert_eq!(rows.len(), 4, "one row per call");
    let cost = (120.0 * 0.15 + 15.0 * 0.60) / 1e6;
    for (row, trace) in rows.iter().zip([&upstream.trace_id, &cached.trace_id, &fallback.trace_id]) {
        assert_eq!(row.trace_id, trace.as_str());
    }
    for row in &rows {
        assert_eq!(
            (row.step.as_str(), row.component.as_str(), row.workspace.as_str()),
            ("classifier", "ticket-router", "ws-a")
        );
        assert_eq!(row.ts_ms, 1_780_000_000_000);
        assert!(row.latency_ms > 0.0);
    }
    let [up, hit, stand_in, error] = &rows[..] else { unreachable!() };
    assert_eq!(
        (up.source, up.model.as_str(), up.provider.as_str()),
        (telemetry::Source::Upstream, "gpt-4o-mini", "scripted")
    );
    assert_eq!((up.input_tokens, up.output_tokens, up.attempts), (120, 15, 1));
    assert!((up.cost_usd - cost).abs() < 1e-12);
    assert_eq!((up.status, up.confidence, up.breaker_state), (CallStatus::Ok, 1.0, Some(BreakerState::Closed)));
    assert_eq!((up.cache_hit, up.saved_tokens, up.similarity), (false, 0, None));

    assert_eq!((hit.source, hit.cache_hit, hit.attempts, hit.cost_usd), (telemetry::Source::Exact, true, 0, 0.0));
    assert!((hit.saved_cost_usd - cost).abs() < 1e-12);
    assert_eq!((hit.saved_tokens, hit.breaker_state), (135, None));

    assert_eq!(
        (stand_in.source, stand_in.status, stand_in.attempts),
        (telemetry::Source::FallbackRule, CallStatus::Ok, 1)
    );
    assert_eq!((stand_in.confidence, stand_in.error_class), (0.2, Some(ErrorClass::ServerError)));
    assert_eq!((stand_in.model.as_str(), stand_in.provider.as_str()), ("rule", "aipipe"));

    assert_eq!((error.status, error.source), (CallStatus::Error, telemetry::Source::None));
    assert_eq!(error.error_class, Some(failed.class()));
    assert!(error.error_message.as_deref().unwrap().contains("unsupported parameter"));
    assert_eq!(error.rate_limit_wait_ms, 0.0);
}

#[tokio::test]
async fn sqlite_rows_for_every_kind_of_answer() {
    rows_for_every_kind_of_answer(Harness::builder("[retry]\nmax_attempts = 1")).await;
}

#[tokio::test]
async fn postgres_rows_for_every_kind_of_answer() {
    let Some(url) = fresh_postgres().await else { return };
    rows_for_every_kind_of_answer(Harness::builder("[retry]\nmax_attempts = 1").database(url)).await;
}

#[tokio::test]
async fn calls_never_wait_for_a_database_that_cannot_keep_up() {
    let h = Harness::start("[cache]\nmax_entries = 20000").await;
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    // Another connection holds the database's write lock: the writer cannot write a row.
    let url = format!("sqlite://{}", h.dir.path().join("telemetry.db").display());
    let mut blocker = sqlx::SqliteConnection::connect(&url).await.unwrap();
    blocker.execute("BEGIN EXCLUSIVE").await.unwrap();

    for n in 0..10_000 {
        // One upstream call, then the exact cache: the provider is not what this is about.
        let result = h.classify("ws-a", "the same ticket", CallOptions::default()).await.unwrap();
        assert_eq!(result.source, if n == 0 { Source::Upstream } else { Source::ExactCache });
    }
    let recorder = h.engine.recorder();
    assert_eq!(recorder.written(), 0, "all 10,000 calls returned while no row could be written");

    blocker.execute("COMMIT").await.unwrap();
    h.engine.shutdown().await.unwrap();
    assert_eq!((recorder.written(), recorder.dropped()), (10_000, 0));
    assert_eq!(h.store.count().await.unwrap(), 10_000);
}

#[tokio::test]
async fn metrics_render_as_prometheus_text() {
    let h = Harness::start("[retry]\nmax_attempts = 1").await;
    h.upstream.push(Reply::completion_with_usage(CLASSIFIED, 100, 10));
    h.upstream.push(Reply::server_error(503));
    h.classify("ws-a", "one", CallOptions::default()).await.unwrap();
    h.classify("ws-a", "one", CallOptions::default()).await.unwrap();
    h.classify("ws-a", "two", CallOptions::default()).await.unwrap();

    assert!(Metrics::CONTENT_TYPE.starts_with("text/plain; version=0.0.4"), "{}", Metrics::CONTENT_TYPE);
    let text = h.engine.metrics().render();
    let samples = parse_prometheus(&text);

    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|(sample, sample_labels, _)| {
                sample == name && labels.iter().all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|(_, _, value)| value)
            .sum()
    };
    assert_eq!(value("aipipe_requests_total", &[("source", "upstream"), ("status", "ok")]), 1.0);
    assert_eq!(value("aipipe_requests_total", &[("source", "exact")]), 1.0);
    assert_eq!(value("aipipe_requests_total", &[("source", "fallback_rule")]), 1.0);
    assert_eq!(value("aipipe_tokens_total", &[("direction", "input")]), 100.0);
    assert_eq!(value("aipipe_tokens_total", &[("direction", "output")]), 10.0);
    assert!((value("aipipe_cost_usd_total", &[]) - (100.0 * 0.15 + 10.0 * 0.60) / 1e6).abs() < 1e-12);
    assert_eq!(value("aipipe_cache_hits_total", &[("cache", "exact")]), 1.0);
    assert_eq!(value("aipipe_cache_misses_total", &[]), 2.0);
    assert!(value("aipipe_cache_saved_cost_usd_total", &[]) > 0.0);
    assert_eq!(value("aipipe_cache_saved_tokens_total", &[]), 110.0);
    assert_eq!(value("aipipe_request_duration_seconds_count", &[]), 3.0);
    assert_eq!(value("aipipe_breaker_state", &[("provider", "scripted"), ("model", "gpt-4o-mini")]), 0.0);
    assert_eq!(value("aipipe_telemetry_rows_dropped_total", &[]), 0.0);
    assert!(text.contains("# TYPE aipipe_request_duration_seconds histogram"), "{text}");
    assert_eq!(value("aipipe_request_duration_seconds_bucket", &[("le", "+Inf")]), 3.0);
}

/// A metric name, its labels and its value.
type Sample = (String, Vec<(String, String)>, f64);

/// Every line of a Prometheus text exposition: comments (`# HELP`, `# TYPE`) or a sample
/// `name{label="value",...} number`. Panics on anything else, and on a sample whose metric has
/// no `# TYPE` before it.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut typed = Vec::<String>::new();
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(kind == "HELP" || kind == "TYPE", "unknown comment: {line}");
            assert!(valid_name(name), "bad metric name: {line}");
            if kind == "TYPE" {
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&parts.next().unwrap()),
                    "{line}"
                );
                typed.push(name.to_owned());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels: {line}"));
                let labels = body
                    .split(',')
                    .filter(|pair| !pair.is_empty())
                    .map(|pair| {
                        let (key, quoted) = pair.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
                        assert!(valid_name(key) && quoted.len() >= 2, "bad label: {line}");
                        assert!(quoted.starts_with('"') && quoted.ends_with('"'), "unquoted label: {line}");
                        (key.to_owned(), quoted[1..quoted.len() - 1].to_owned())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, Vec::new()),
        };
        assert!(valid_name(name), "bad sample name: {line}");
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix)).unwrap_or(name);
        assert!(typed.iter().any(|t| t == name || t == family), "sample before its # TYPE: {line}");
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[tokio::test]
async fn a_latency_spike_and_an_error_spike_raise_one_alert_each() {
    // The webhook receiver.
    let received = Arc::new(Mutex::new(Vec::<Value>::new()));
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/alerts",
        axum::routing::post(move |axum::Json(alert): axum::Json<Value>| {
            let sink = sink.clone();
            async move { sink.lock().unwrap().push(alert) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let webhook_url = format!("http://{}/alerts", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let alerts = AlertSettings { webhook_url: Some(webhook_url), ..AlertSettings::default() };
    let h = Harness::builder("[retry]\nmax_attempts = 1").alerts(alerts).start().await;
    let no_stand_in = CallOptions { allow_stand_in: false, ..CallOptions::default() };
    let mut n = 0;
    let mut minute = |reply: Reply, calls: usize| {
        h.upstream.respond_with(move |_| reply.clone());
        let calls: Vec<String> = (0..calls)
            .map(|_| {
                n += 1;
                format!("ticket {n}")
            })
            .collect();
        let (h, options) = (&h, no_stand_in.clone());
        async move {
            for text in calls {
                // Errors are part of the traffic here.
                let _ = h.classify("ws-a", &text, options.clone()).await;
            }
            h.clock.advance(Duration::from_secs(60));
        }
    };
    let alerts_so_far = |received: &Arc<Mutex<Vec<Value>>>| received.lock().unwrap().len();

    for _ in 0..8 {
        minute(Reply::completion(CLASSIFIED), 6).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alerts_so_far(&received), 0, "steady state: no alert");

    // Two slow minutes: one episode, one alert.
    for _ in 0..2 {
        minute(Reply::slow(Duration::from_millis(300), Reply::completion(CLASSIFIED)), 4).await;
    }
    minute(Reply::completion(CLASSIFIED), 6).await;
    // A minute where half the calls fail.
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    for text in ["good 1", "good 2", "good 3"] {
        h.classify("ws-a", text, no_stand_in.clone()).await.unwrap();
    }
    h.upstream.respond_with(|_| Reply::bad_request("schema"));
    for text in ["bad 1", "bad 2", "bad 3"] {
        h.classify("ws-a", text, no_stand_in.clone()).await.unwrap_err();
    }
    h.clock.advance(Duration::from_secs(60));
    minute(Reply::completion(CLASSIFIED), 1).await;

    let mut waited = 0;
    while alerts_so_far(&received) < 2 && waited < 50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received = received.lock().unwrap().clone();
    let metrics: Vec<&str> = received.iter().map(|alert| alert["metric"].as_str().unwrap()).collect();
    assert_eq!(metrics, ["latency_ms", "error_rate"], "{received:?}");
    for alert in &received {
        assert_eq!(alert["step"], "classifier");
        assert!(alert["observed"].as_f64().unwrap() > alert["baseline"].as_f64().unwrap());
    }
    assert!(received[0]["observed"].as_f64().unwrap() >= 300.0);
    assert!((received[1]["observed"].as_f64().unwrap() - 0.5).abs() < 1e-9);
}
