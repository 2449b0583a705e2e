//! The store on both backends: SQLite always, PostgreSQL when `AIPIPE_TEST_POSTGRES_URL` names
//! a server (`.ci/run` starts one and always sets it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use telemetry::{BreakerState, CallRecord, CallStatus, ErrorClass, Source, TelemetryStore};
use testkit::fresh_postgres;

#[allow(clippy::too_many_arguments)]
fn row(
    ts_ms: i64,
    component: &str,
    latency_ms: f64,
    status: CallStatus,
    source: Source,
    attempts: i64,
    cost_usd: f64,
    saved_cost_usd: f64,
    breaker_state: Option<BreakerState>,
) -> CallRecord {
    CallRecord {
        ts_ms,
        step: "classifier".into(),
        component: component.into(),
        workspace: "ws-1".into(),
        trace_id: format!("trace-{ts_ms}"),
        model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        input_tokens: 100 * attempts,
        output_tokens: 10 * attempts,
        latency_ms,
        cost_usd,
        saved_cost_usd,
        saved_tokens: if saved_cost_usd > 0.0 { 110 } else { 0 },
        source,
        cache_hit: source.is_cache(),
        confidence: if source == Source::Semantic { 0.95 } else { 1.0 },
        similarity: (source == Source::Semantic).then_some(0.95),
        status,
        error_class: (status == CallStatus::Error).then_some(ErrorClass::ServerError),
        error_message: (status == CallStatus::Error).then(|| "upstream server error 503".into()),
        attempts,
        rate_limit_wait_ms: if attempts > 1 { 250.0 } else { 0.0 },
        breaker_state,
        // A route decision that went past a failed candidate, on the rows that retried.
        route: (attempts > 1).then(|| telemetry::RouteRecord {
            strategy: telemetry::RouteStrategy::Ordered,
            downgraded: false,
            chosen: Some("gpt-4o-mini".into()),
            excluded: vec![("gpt-4o".into(), telemetry::RouteExclusion::Failed)],
        }),
        // Streamed rows carry their time to first token; the others none.
        streamed: attempts > 1,
        ttft_ms: (attempts > 1).then_some(12.5),
        audit: None,
    }
}

fn known_rows() -> Vec<CallRecord> {
    use BreakerState::{Closed, Open};
    use CallStatus::{Error, Ok};
    vec![
        row(0, "a", 100.0, Ok, Source::Upstream, 1, 0.010, 0.0, Some(Closed)),
        row(1_000, "a", 1.0, Ok, Source::Exact, 0, 0.0, 0.010, None),
        row(2_000, "a", 2.0, Ok, Source::Semantic, 0, 0.0, 0.010, None),
        row(3_000, "b", 300.0, Error, Source::None, 3, 0.0, 0.0, Some(Open)),
        row(4_000, "b", 1.0, Ok, Source::FallbackRule, 0, 0.0, 0.0, Some(Open)),
        row(5_000, "b", 5.0, Ok, Source::Coalesced, 0, 0.0, 0.020, None),
        row(9_000, "b", 200.0, Ok, Source::Upstream, 1, 0.020, 0.0, Some(Closed)),
        row(10_000, "a", 50.0, Ok, Source::Upstream, 2, 0.030, 0.0, Some(Closed)),
        // The engine's own audit of a semantic hit: a request and a cost, but no caller's call.
        CallRecord {
            audit: Some(telemetry::Audit::Disagree),
            ..row(11_000, "a", 40.0, Ok, Source::Upstream, 1, 0.005, 0.0, Some(Closed))
        },
        // Outside the window.
        row(100_000, "a", 9_999.0, Error, Source::None, 1, 1.0, 0.0, Some(Open)),
    ]
}

fn close(actual: f64, expected: f64) {
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

async fn check(store: &TelemetryStore) {
    let rows = known_rows();
    store.insert_batch(&rows).await.unwrap();
    assert_eq!(store.records().await.unwrap(), rows, "every field survives the round trip");

    let report = store.report(0, 60_000).await.unwrap();
    // By hand, rows 1-8. Latencies sorted: 1 1 2 5 50 100 200 300; p50 = 4th, p99 = 8th.
    let all = &report.overall;
    assert_eq!((all.calls, all.upstream_requests, all.saved_calls), (8, 8, 3));
    assert_eq!((all.audits, all.audit_disagreements), (1, 1));
    close(all.audit_cost_usd, 0.005);
    close(all.cost_usd, 0.065);
    close(all.saved_cost_usd, 0.04);
    close(all.p50_latency_ms, 5.0);
    close(all.p99_latency_ms, 300.0);
    close(all.error_rate, 1.0 / 8.0);
    close(all.cache_hit_rate, 2.0 / 8.0);
    close(all.fallback_rate, 1.0 / 8.0);
    // The upstream could not answer the call at 3 s (a 503); a model answered again at 5 s
    // (the coalesced call).
    close(all.mttr_secs.unwrap(), 2.0);

    let a = &report.components["a"];
    assert_eq!((a.calls, a.upstream_requests, a.saved_calls), (4, 4, 2));
    close(a.cost_usd, 0.045);
    close(a.p50_latency_ms, 2.0);
    close(a.p99_latency_ms, 100.0);
    close(a.error_rate, 0.0);
    close(a.cache_hit_rate, 0.5);
    assert_eq!(a.mttr_secs, None);
    let b = &report.components["b"];
    assert_eq!((b.calls, b.upstream_requests, b.saved_calls), (4, 4, 1));
    close(b.p50_latency_ms, 5.0);
    close(b.error_rate, 0.25);
    close(b.fallback_rate, 0.25);
    close(b.mttr_secs.unwrap(), 2.0);
    assert_eq!(report.components.len(), 2);

    // The live page's figures come from the database's aggregates, and agree with the rows'.
    let overview = store.overview(0, 60_000).await.unwrap();
    assert_eq!((overview.calls, overview.upstream_requests, overview.saved_calls), (8, 8, 3));
    assert_eq!((overview.audits, overview.audit_disagreements), (1, 1));
    for (aggregated, from_rows) in [
        (overview.audit_cost_usd, all.audit_cost_usd),
        (overview.cost_usd, all.cost_usd),
        (overview.saved_cost_usd, all.saved_cost_usd),
        (overview.p50_latency_ms, all.p50_latency_ms),
        (overview.p99_latency_ms, all.p99_latency_ms),
        (overview.error_rate, all.error_rate),
        (overview.cache_hit_rate, all.cache_hit_rate),
        (overview.fallback_rate, all.fallback_rate),
    ] {
        close(aggregated, from_rows);
    }
    assert_eq!(overview.mttr_secs, None);
    let empty = store.overview(200_000, 260_000).await.unwrap();
    assert_eq!((empty.calls, empty.p99_latency_ms), (0, 0.0));
    let minutes = store.calls_per_minute(0, 120_000).await.unwrap();
    assert_eq!(minutes.len(), 2);
    assert_eq!(minutes[0].by_source.values().sum::<u64>(), 8);
    assert_eq!(minutes[0].by_source[&Source::Upstream], 3);
    assert_eq!(minutes[1].by_source[&Source::None], 1);

    // Retention: what is older than the cut goes, the rest stays.
    assert_eq!(store.delete_before(5_000).await.unwrap(), 5);
    let left: Vec<i64> = store.records().await.unwrap().iter().map(|row| row.ts_ms).collect();
    assert_eq!(left, [5_000, 9_000, 10_000, 11_000, 100_000]);
    assert_eq!(store.delete_before(0).await.unwrap(), 0);
}

#[tokio::test]
async fn sqlite_keeps_every_field_and_reports_exact_figures() {
    let dir = tempfile::tempdir().unwrap();
    let store = TelemetryStore::connect(dir.path().join("t.db").to_str().unwrap()).await.unwrap();
    check(&store).await;
}

#[tokio::test]
async fn postgres_keeps_every_field_and_reports_exact_figures() {
    let Some(url) = fresh_postgres().await else { return };
    let store = TelemetryStore::connect(&url).await.unwrap();
    check(&store).await;
    // Connecting again finds the schema in place.
    TelemetryStore::connect(&url).await.unwrap();
}
