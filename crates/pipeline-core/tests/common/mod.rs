//! The engine under test: real HTTP to a scripted OpenAI-compatible upstream, a real SQLite
//! telemetry file, a manual clock for cache ages.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use pipeline_core::providers::{OpenAiCompatible, OpenAiSettings};
use pipeline_core::semantic_cache::{Embedder, ModelPaths};
use pipeline_core::telemetry::{AlertSettings, CallRecord, Recorder, RecorderSettings, TelemetryStore};
use pipeline_core::{CallContext, CallOptions, Config, Engine, ManualClock, PipelineError, PipelineResult, StepType};
use scripted_upstream::ScriptedUpstream;
use serde_json::json;

/// Where the engine under test records: a SQLite file in a temporary folder unless told.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub database_url: Option<String>,
    pub alerts: Option<AlertSettings>,
}

pub const CLASSIFIED: &str = r#"{"label": "billing", "confidence": 0.92}"#;

pub struct Harness {
    pub upstream: ScriptedUpstream,
    pub engine: Engine,
    pub store: TelemetryStore,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
}

impl Harness {
    /// The exact path only: the semantic cache off. `config` is TOML over the defaults.
    pub async fn start(config: &str) -> Self {
        Self::start_with(config, Telemetry::default()).await
    }

    /// With the semantic cache and the real local model (`aipipe setup` installs it). `config`
    /// starts inside the `[semantic]` table.
    pub async fn start_semantic(config: &str) -> Self {
        Self::build(&format!("[semantic]\nttl_secs = 600\n{config}"), Some(embedder()), Telemetry::default()).await
    }

    /// The exact path, with the telemetry set up as given.
    pub async fn start_with(config: &str, telemetry: Telemetry) -> Self {
        Self::build(&format!("[semantic]\nenabled = false\n{config}"), None, telemetry).await
    }

    async fn build(config: &str, embedder: Option<Arc<Embedder>>, telemetry: Telemetry) -> Self {
        let upstream = ScriptedUpstream::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let url = telemetry.database_url.unwrap_or_else(|| dir.path().join("telemetry.db").display().to_string());
        let store = TelemetryStore::connect(&url).await.unwrap();
        let provider = OpenAiCompatible::new(OpenAiSettings {
            name: "scripted".into(),
            base_url: upstream.base_url(),
            api_key: "sk-test".into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        })
        .unwrap();
        let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000)));
        let mut builder = Engine::builder(Config::from_toml(config).unwrap())
            .provider("scripted", provider)
            .recorder(Recorder::spawn_with_alerts(store.clone(), RecorderSettings::default(), telemetry.alerts))
            .clock(clock.clone());
        if let Some(embedder) = embedder {
            builder = builder.embedder(embedder);
        }
        let engine = builder.build().await.unwrap();
        Self { upstream, engine, store, clock, dir }
    }

    pub async fn classify(
        &self,
        workspace: &str,
        text: &str,
        options: CallOptions,
    ) -> Result<PipelineResult, PipelineError> {
        let context = CallContext::new(workspace, "ticket-router").with_metadata("ticket", 42);
        self.engine
            .execute(
                StepType::CLASSIFIER,
                json!({"text": text, "labels": ["billing", "bug", "other"]}),
                context,
                options,
            )
            .await
    }

    /// Every telemetry row so far, once the writer has caught up.
    pub async fn rows(&self) -> Vec<CallRecord> {
        self.engine.flush().await.unwrap();
        self.store.records().await.unwrap()
    }
}

/// One model load per test binary: it is the slow part.
pub fn embedder() -> Arc<Embedder> {
    static EMBEDDER: OnceLock<Arc<Embedder>> = OnceLock::new();
    EMBEDDER
        .get_or_init(|| {
            Arc::new(Embedder::load(&ModelPaths::installed(), 1).unwrap_or_else(|err| {
                panic!("{err}\n(the semantic tests need the local model: run `cargo run -- setup`)")
            }))
        })
        .clone()
}
