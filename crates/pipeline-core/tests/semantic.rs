//! The semantic cache inside the engine, with the real local model (`aipipe setup` installs it)
//! and a scripted upstream over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use pipeline_core::providers::{OpenAiCompatible, OpenAiSettings};
use pipeline_core::semantic_cache::{Embedder, ModelPaths};
use pipeline_core::telemetry::{Recorder, RecorderSettings, TelemetryStore};
use pipeline_core::{CallContext, CallOptions, Config, Engine, ManualClock, PipelineResult, Source, StepType};
use scripted_upstream::{Reply, ScriptedUpstream};
use serde_json::json;

/// One model load for the whole file: it is the slow part.
fn embedder() -> Arc<Embedder> {
    static EMBEDDER: OnceLock<Arc<Embedder>> = OnceLock::new();
    EMBEDDER
        .get_or_init(|| {
            Arc::new(Embedder::load(&ModelPaths::installed(), 1).unwrap_or_else(|err| {
                panic!("{err}\n(the semantic tests need the local model: run `cargo run -- setup`)")
            }))
        })
        .clone()
}

struct Harness {
    upstream: ScriptedUpstream,
    engine: Engine,
    store: TelemetryStore,
    clock: Arc<ManualClock>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with("").await
    }

    async fn start_with(extra_config: &str) -> Self {
        let upstream = ScriptedUpstream::start().await.unwrap();
        upstream.respond_with(|_| Reply::completion(r#"{"label": "billing", "confidence": 0.9}"#));
        let store = TelemetryStore::connect("sqlite::memory:").await.unwrap();
        let provider = OpenAiCompatible::new(OpenAiSettings {
            name: "scripted".into(),
            base_url: upstream.base_url(),
            api_key: "sk-test".into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)));
        let config = format!("[semantic]\nttl_secs = 600\n{extra_config}");
        let engine = Engine::builder(Config::from_toml(&config).unwrap())
            .provider("scripted", provider)
            .recorder(Recorder::spawn(store.clone(), RecorderSettings::default()))
            .embedder(embedder())
            .clock(clock.clone())
            .build()
            .await
            .unwrap();
        Self { upstream, engine, store, clock }
    }

    async fn classify(&self, workspace: &str, text: &str) -> PipelineResult {
        let input = json!({"text": text, "labels": ["billing", "account", "other"]});
        self.engine
            .execute(StepType::CLASSIFIER, input, CallContext::new(workspace, "support-inbox"), CallOptions::default())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_paraphrase_is_served_from_the_semantic_cache() {
    let h = Harness::start().await;
    let first = h.classify("ws-a", "I was charged twice").await;
    assert_eq!(first.source, Source::Upstream);
    let second = h.classify("ws-a", "I was charged two times").await;
    assert_eq!(second.source, Source::SemanticCache);
    assert_eq!(second.output, first.output);
    assert!(second.confidence > 0.93 && second.confidence < 1.0, "{}", second.confidence);
    assert_eq!((second.attempts, second.cost_usd), (0, 0.0));
    assert!(second.saved_cost_usd > 0.0);
    assert_eq!(h.upstream.requests(), 1);

    h.engine.flush().await.unwrap();
    let rows = h.store.records().await.unwrap();
    assert_eq!(rows[1].source, "semantic_cache");
    assert!(rows[1].cache_hit);
    assert!((rows[1].confidence - second.confidence).abs() < 1e-6);
}

#[tokio::test]
async fn negations_numbers_and_swapped_roles_are_not_served() {
    let h = Harness::start().await;
    for (cached, asked) in [
        ("Cancel my subscription", "Don't cancel my subscription"),
        ("Flights from Paris to Rome", "Flights from Rome to Paris"),
        ("Is 5 mg a safe dose?", "Is 50 mg a safe dose?"),
    ] {
        assert_eq!(h.classify("ws-a", cached).await.source, Source::Upstream);
        let result = h.classify("ws-a", asked).await;
        assert_eq!(result.source, Source::Upstream, "`{asked}` must not get the answer for `{cached}`");
    }
    assert_eq!(h.upstream.requests(), 6);
}

#[tokio::test]
async fn another_workspace_or_other_fields_never_share_an_entry() {
    let h = Harness::start().await;
    h.classify("ws-a", "I was charged twice").await;
    assert_eq!(h.classify("ws-b", "I was charged two times").await.source, Source::Upstream);
    // Same text, different label set: the other fields must match exactly.
    let other_labels = json!({"text": "I was charged two times", "labels": ["refund", "other"]});
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
    let h = Harness::start().await;
    h.classify("ws-a", "I was charged twice").await;
    h.clock.advance(Duration::from_secs(601));
    assert_eq!(h.classify("ws-a", "I was charged two times").await.source, Source::Upstream);
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
    let before = Harness::start_with(&snapshot).await;
    before.classify("ws-a", "I was charged twice").await;
    before.engine.shutdown().await.unwrap();
    drop(before);

    let after = Harness::start_with(&snapshot).await;
    let result = after.classify("ws-a", "I was charged two times").await;
    assert_eq!(result.source, Source::SemanticCache);
    assert_eq!(after.upstream.requests(), 0, "the restarted engine answered from the snapshot");
}

#[tokio::test]
async fn a_corrupt_snapshot_means_an_empty_cache_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("semantic.jsonl");
    std::fs::write(&path, "{\"format\": \"aipipe-semantic-cache\", \"version\": 1, \"dimensions\": 384}\n{garbage\n")
        .unwrap();
    let h = Harness::start_with(&format!("snapshot_path = '{}'", path.display())).await;
    assert_eq!(h.classify("ws-a", "I was charged twice").await.source, Source::Upstream);
    // Shutting down replaces the corrupt file with a good one.
    h.engine.shutdown().await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
}
