//! The semantic cache inside the engine, with the real local model (`aipipe setup` installs it)
//! and a scripted upstream over HTTP.
use std::time::Duration;

use pipeline_core::telemetry::{self, ErrorClass, Recorder, RecorderSettings, TelemetryStore};
use pipeline_core::{CallContext, CallOptions, Config, Engine, PipelineResult, Source, StepType};
use serde_json::json;
use testkit::Reply;
use testkit::{CLASSIFIED, Harness};

trait Ask {
    async fn ask(&self, workspace: &str, text: &str) -> PipelineResult;
}

impl Ask for Harness {
    async fn ask(&self, workspace: &str, text: &str) -> PipelineResult {
        self.classify(workspace, text, CallOptions::default()).await.unwrap()
    }
}

async fn started(config: &str) -> Harness {
    let h = Harness::start_semantic(config).await;
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    h
}

#[tokio::test]
async fn a_paraphrase_is_served_from_the_semantic_cache() {
    let h = started("").await;
    let first = h.ask("ws-a", "I was charged twice").await;
    assert_eq!(first.source, Source::Upstream);
    let second = h.ask("ws-a", "I was charged two times").await;
    assert_eq!(second.source, Source::SemanticCache);
    assert_eq!(second.output, first.output);
    // The learned verifier's probability that the two are the same request.
    let bar = f64::from(Config::defaults().unwrap().semantic.min_confidence);
    assert!(second.confidence >= bar && second.confidence < 1.0, "{}", second.confidence);
    assert_eq!((second.attempts, second.cost_usd), (0, 0.0));
    assert!(second.saved_cost_usd > 0.0);
    assert_eq!(h.upstream.requests(), 1);

    let rows = h.rows().await;
    assert_eq!(rows[1].source, telemetry::Source::Semantic);
    assert!(rows[1].cache_hit);
    assert!((rows[1].confidence - second.confidence).abs() < 1e-6);
}

/// The seed's example: a request for generated content, asked again in other words. Its
/// confidence (0.70) is below the default bar, which is calibrated for 0.90 precision on Quora
/// questions, where one changed word usually means another question; a step whose answers fit
/// a wider range of requests chooses the bar calibrated for 0.80 precision.
#[tokio::test]
async fn the_seeds_kpi_pair_is_served_by_a_step_that_takes_the_looser_calibrated_bar() {
    let (cached, asked) =
        ("Create a list of KPIs for B2B SaaS startup", "Generate KPI for business-to-business software company");
    let looser = semantic_cache::Verifier::shipped().cut_for(0.80).expect("a cut for 0.80 precision");
    let h = started(&format!("[steps.classifier]\nsemantic_min_confidence = {looser}\n")).await;
    assert_eq!(h.ask("ws-a", cached).await.source, Source::Upstream);
    let result = h.ask("ws-a", asked).await;
    assert_eq!(result.source, Source::SemanticCache, "confidence {}", result.confidence);
    assert!(result.confidence >= f64::from(looser));
    assert_eq!(h.upstream.requests(), 1);

    let strict = started("").await;
    strict.ask("ws-a", cached).await;
    assert_eq!(strict.ask("ws-a", asked).await.source, Source::Upstream, "not at the default bar");
}

#[tokio::test]
async fn negations_numbers_and_swapped_roles_are_not_served() {
    let h = started("").await;
    for (cached, asked) in [
        ("Cancel my subscription", "Don't cancel my subscription"),
        ("Flights from Paris to Rome", "Flights from Rome to Paris"),
        ("Is 5 mg a safe dose?", "Is 50 mg a safe dose?"),
    ] {
        assert_eq!(h.ask("ws-a", cached).await.source, Source::Upstream);
        let result = h.ask("ws-a", asked).await;
        assert_eq!(result.source, Source::Upstream, "`{asked}` must not get the answer for `{cached}`");
    }
    assert_eq!(h.upstream.requests(), 6);
}

#[tokio::test]
async fn texts_longer_than_the_models_window_are_matched_exactly_only() {
    let h = started("").await;
    let preamble = "Our customer wrote a long message about the invoice for the March period, the \
        delivery of the replacement parts, the support ticket that was closed without an answer, the \
        phone call with the account manager, the promised discount on the next renewal, and the \
        feedback survey that they filled in twice because the first submission failed. ";
    let long = |ending: &str| format!("{}{ending}", preamble.repeat(2));
    assert!(long("").chars().count() > 500);
    assert_eq!(h.ask("ws-a", &long("They want a refund.")).await.source, Source::Upstream);
    // The model would see only the identical beginning of both: no semantic match.
    assert_eq!(h.ask("ws-a", &long("They want to upgrade.")).await.source, Source::Upstream);
    assert_eq!(h.ask("ws-a", &long("They want a refund.")).await.source, Source::ExactCache);
    assert_eq!(h.upstream.requests(), 2);
}

#[tokio::test]
async fn another_workspace_or_other_fields_never_share_an_entry() {
    let h = started("").await;
    h.ask("ws-a", "I was charged twice").await;
    assert_eq!(h.ask("ws-b", "I was charged two times").await.source, Source::Upstream);
    // Same text, different label set: the other fields must match exactly.
    let other_labels = json!({"text": "I was charged two times", "labels": ["billing", "refund", "other"]});
    let result = h
        .engine
        .execute(StepType::CLASSIFIER, other_labels, CallContext::new("ws-a", "c"), CallOptions::default())
        .await
        .unwrap();
    assert_eq!(result.source, Source::Upstream);
    assert_eq!(h.upstream.requests(), 3);
}

#[tokio::test]
async fn an_expired_entry_is_not_served() {
    let h = started("").await;
    h.ask("ws-a", "I was charged twice").await;
    h.clock.advance(Duration::from_secs(601));
    assert_eq!(h.ask("ws-a", "I was charged two times").await.source, Source::Upstream);
    assert_eq!(h.upstream.requests(), 2);
}

#[tokio::test]
async fn a_missing_model_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[semantic]\nmodel_dir = '{}'\nonnxruntime_path = '{}'",
        dir.path().join("model").display(),
        dir.path().join("libonnxruntime.so").display()
    );
    let err = Engine::builder(Config::from_toml(&toml).unwrap())
        .recorder(Recorder::spawn(
            TelemetryStore::connect("sqlite::memory:").await.unwrap(),
            RecorderSettings::default(),
        ))
        .build()
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("aipipe setup"), "{err}");
}

#[tokio::test]
async fn the_cache_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = format!("snapshot_path = '{}'", dir.path().join("semantic.jsonl").display());
    let before = started(&snapshot).await;
    before.ask("ws-a", "I was charged twice").await;
    before.engine.shutdown().await.unwrap();
    drop(before);

    let after = started(&snapshot).await;
    let result = after.ask("ws-a", "I was charged two times").await;
    assert_eq!(result.source, Source::SemanticCache);
    assert_eq!(after.upstream.requests(), 0, "the restarted engine answered from the snapshot");
}

#[tokio::test]
async fn a_snapshot_of_another_model_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("semantic.jsonl");
    let snapshot = format!("snapshot_path = '{}'", path.display());
    let before = started(&snapshot).await;
    before.ask("ws-a", "I was charged twice").await;
    before.engine.shutdown().await.unwrap();
    drop(before);
    let text = std::fs::read_to_string(&path).unwrap();
    let (header, entries) = text.split_once('\n').unwrap();
    let mut header: serde_json::Value = serde_json::from_str(header).unwrap();
    assert!(header["model_id"].is_string(), "{header}");
    header["model_id"] = "0123456789abcdef".into();
    std::fs::write(&path, format!("{header}\n{entries}")).unwrap();

    let after = started(&snapshot).await;
    let result = after.ask("ws-a", "I was charged two times").await;
    assert_eq!(result.source, Source::Upstream, "vectors of another model are not comparable");
}

#[tokio::test]
async fn a_corrupt_snapshot_means_an_empty_cache_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("semantic.jsonl");
    std::fs::write(&path, "{\"format\": \"aipipe-semantic-cache\", \"version\": 1, \"dimensions\": 384}\n{garbage\n")
        .unwrap();
    let h = started(&format!("snapshot_path = '{}'", path.display())).await;
    assert_eq!(h.ask("ws-a", "I was charged twice").await.source, Source::Upstream);
    // Shutting down replaces the corrupt file with a good one.
    h.engine.shutdown().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[tokio::test]
async fn while_rate_limited_a_similar_answer_stands_in_then_the_rule_based_one() {
    let h = started("").await;
    let paid_for = h.ask("ws-a", "I was charged twice for my order").await;
    h.upstream.respond_with(|_| Reply::rate_limited(30));
    let within_5s = || CallOptions { deadline: Some(Duration::from_secs(5)), ..CallOptions::default() };

    // Similar (0.89 here), below the semantic cache's bar: not a hit, but the best stand-in.
    let similar = h.classify("ws-a", "I was charged twice for my purchase", within_5s()).await.unwrap();
    assert_eq!(similar.source, Source::FallbackSimilar);
    assert_eq!(similar.confidence, 0.7);
    assert_eq!(similar.output, paid_for.output);
    assert_eq!(similar.degraded_by, Some(ErrorClass::RateLimited));

    let unrelated = h.classify("ws-a", "The app crashes when I upload a photo", within_5s()).await.unwrap();
    assert_eq!(unrelated.source, Source::FallbackRule);
    assert_eq!(unrelated.output["label"], "unclassified");
    assert_eq!(h.upstream.requests(), 2, "the second stand-in did not even try: the pause outlasts its deadline");

    let rows = h.rows().await;
    let sources: Vec<_> = rows.iter().map(|row| (row.source.label(), row.confidence)).collect();
    assert_eq!(sources, [("upstream", 1.0), ("fallback_similar", 0.7), ("fallback_rule", 0.2)]);
}
