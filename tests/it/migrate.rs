//! `aipipe migrate status`: after a shadow period with scripted disagreements, and on a
//! database with known comparisons.
use std::path::Path;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use adapters::legacy::Endpoint;
use adapters::legacy::classifier::Classifier as LegacyClassifier;
use adapters::shims::classifier::Classifier;
use adapters::{Adapter, MigrationPlan, Modes};
use adapters::{ShadowComparison, ShadowLog};
use pipeline_core::telemetry::{self, CallRecord, CallStatus, TelemetryStore};
use serde_json::Value;
use testkit::{Harness, Reply};

fn migrate_status(plan: &Path, db: &Path, json: bool) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_aipipe"));
    command.args(["migrate", "status", "--plan"]).arg(plan).arg("--db").arg(db);
    if json {
        command.arg("--json");
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_period_with_disagreements_shows_its_agreement_rate() {
    // Rows at today's time: `migrate status` looks at the last hours of the wall clock.
    let h = Harness::builder("").wall_clock().start().await;
    let (upstream, engine, store, dir) = (&h.upstream, &h.engine, &h.store, &h.dir);
    // The old classifier answers a bare label; the engine a JSON object, and for tickets that
    // mention a refund, another label than the old code.
    upstream.respond_with(|request| {
        let prompt = request["messages"][1]["content"].as_str().unwrap_or_default().to_owned();
        if request.get("response_format").is_none() {
            return Reply::completion("billing");
        }
        let label = if prompt.contains("refund") { "other" } else { "billing" };
        Reply::completion(format!(r#"{{"label": "{label}", "confidence": 0.8}}"#))
    });
    let db = dir.path().join("telemetry.db");
    let plan_text = "default = \"legacy\"\n[components]\nclassifier = \"shadow\"\n[cutover]\nmin_agreement = 0.98\nmin_calls = 10\n";
    let plan = dir.path().join("migration.toml");
    std::fs::write(&plan, plan_text).unwrap();
    let adapter = Adapter::new(engine.clone(), Modes::new(MigrationPlan::load(&plan).unwrap()), "acme");
    let endpoint = Endpoint { base_url: upstream.base_url(), api_key: "sk-old".into(), model: "gpt-4o-mini".into() };
    let classifier = Classifier::new(LegacyClassifier::new(endpoint), adapter.clone());

    for n in 0..20 {
        let text =
            if n % 4 == 0 { format!("ticket {n}: I want a refund") } else { format!("ticket {n}: charged twice") };
        assert_eq!(classifier.classify(&text, &["billing", "other"]).await.unwrap(), "billing", "the legacy answer");
    }
    adapter.settle_shadows().await;
    engine.shutdown().await.unwrap();

    // The engine's own calls are in telemetry, one row per shadow call, and each comparison
    // keeps both answers and the verdict.
    let rows = store.records().await.unwrap();
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|row| row.component == "classifier" && row.source == telemetry::Source::Upstream));
    let comparisons = ShadowLog::new(store.clone()).comparisons(0, i64::MAX).await.unwrap();
    assert_eq!(comparisons.len(), 20);
    let disagreements: Vec<_> = comparisons.iter().filter(|c| !c.agreed).collect();
    assert_eq!(disagreements.len(), 5);
    for disagreement in &disagreements {
        assert_eq!(disagreement.legacy_answer.as_deref(), Some("\"billing\""));
        assert_eq!(disagreement.engine_answer.as_deref(), Some("\"other\""));
        assert!(rows.iter().any(|row| row.trace_id == disagreement.trace_id), "linked to the engine's row");
    }
    store.close().await;

    let out = migrate_status(&plan, &db, false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|line| line.starts_with("classifier")).unwrap();
    // Tickets 0, 4, 8, 12 and 16 disagree: 15 of 20 agree.
    for expected in ["shadow", "20", "75.0%", "not yet"] {
        assert!(line.contains(expected), "`{expected}` missing from: {line}");
    }
}

fn call(ts_ms: i64, component: &str, cost_usd: f64) -> CallRecord {
    CallRecord {
        ts_ms,
        step: component.into(),
        component: component.into(),
        workspace: "acme".into(),
        trace_id: format!("t-{ts_ms}"),
        model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        input_tokens: 100,
        output_tokens: 10,
        latency_ms: 500.0,
        cost_usd,
        saved_cost_usd: 0.0,
        saved_tokens: 0,
        source: if cost_usd > 0.0 { telemetry::Source::Upstream } else { telemetry::Source::Exact },
        cache_hit: cost_usd == 0.0,
        confidence: 1.0,
        similarity: None,
        status: CallStatus::Ok,
        error_class: None,
        error_message: None,
        attempts: i64::from(cost_usd > 0.0),
        rate_limit_wait_ms: 0.0,
        breaker_state: None,
        route: None,
        streamed: false,
        ttft_ms: None,
        audit: None,
    }
}

#[tokio::test]
async fn status_prints_agreement_costs_and_the_cut_over_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let store = TelemetryStore::connect(db.to_str().unwrap()).await.unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
    // 250 shadow calls of the classifier, 245 agreeing; half of its engine calls were cache hits.
    let calls: Vec<_> =
        (0..250).map(|n| call(now - 1000 - n, "classifier", if n % 2 == 0 { 0.0002 } else { 0.0 })).collect();
    store.insert_batch(&calls).await.unwrap();
    let shadows = ShadowLog::new(store.clone());
    for n in 0..250 {
        shadows
            .insert(&ShadowComparison {
                ts_ms: now - 1000 - n,
                component: "classifier".into(),
                step: "classifier".into(),
                trace_id: format!("t-{n}"),
                agreed: n >= 5,
                similarity: if n >= 5 { 1.0 } else { 0.0 },
                legacy_ok: true,
                engine_ok: true,
                legacy_answer: Some("\"billing\"".into()),
                engine_answer: Some(if n >= 5 { "\"billing\"" } else { "\"bug\"" }.into()),
                legacy_latency_ms: 900.0,
                engine_latency_ms: 400.0,
            })
            .await
            .unwrap();
    }
    store.close().await;
    let plan = dir.path().join("migration.toml");
    std::fs::write(&plan, "default = \"legacy\"\n[components]\nclassifier = \"shadow\"\n").unwrap();

    let run = |json: bool| migrate_status(&plan, &db, json);
    let table = run(false);
    let stdout = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let classifier = stdout.lines().find(|line| line.starts_with("classifier")).unwrap();
    for expected in ["shadow", "250", "98.0%", "0.0%", "$0.000200", "$0.000100", "ready"] {
        assert!(classifier.contains(expected), "`{expected}` missing from: {classifier}");
    }
    assert!(stdout.lines().any(|line| line.starts_with("validator") && line.contains("legacy")), "{stdout}");

    let json = run(true);
    let rows: Vec<Value> =
        String::from_utf8_lossy(&json.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let classifier = rows.iter().find(|row| row["component"] == "classifier").unwrap();
    assert_eq!(classifier["shadow_comparisons"], 250);
    assert!((classifier["agreement_rate"].as_f64().unwrap() - 0.98).abs() < 1e-9);
    assert_eq!(classifier["ready_to_cut_over"], true);

    // A plan with a typo says which file and what.
    std::fs::write(&plan, "default = \"legacy\"\n[components]\nclassifier = \"shadowed\"\n").unwrap();
    let broken = run(false);
    assert!(!broken.status.success());
    assert!(String::from_utf8_lossy(&broken.stderr).contains("migration.toml"));
}
