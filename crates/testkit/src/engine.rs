//! The engine under test: real HTTP to a scripted OpenAI-compatible upstream, a real SQLite
//! telemetry file (or the PostgreSQL database a test names), a manual clock for cache ages.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use pipeline_core::providers::{Anthropic, AnthropicSettings, OpenAiCompatible, OpenAiSettings};
use pipeline_core::semantic_cache::{Embedder, ModelPaths};
use pipeline_core::telemetry::{AlertSettings, CallRecord, Recorder, RecorderSettings, TelemetryStore};
use pipeline_core::{
    CallContext, CallOptions, Clock, Config, Engine, ManualClock, PipelineError, PipelineResult, StepType, SystemClock,
};
use serde_json::json;

use crate::ScriptedUpstream;

/// A classifier reply that passes the built-in step's contract.
pub const CLASSIFIED: &str = r#"{"label": "billing", "confidence": 0.92}"#;

/// Where the manual clock starts: a fixed day, so that rows and cache ages are reproducible.
pub const START: Duration = Duration::from_secs(1_780_000_000);

/// An engine wired to a scripted upstream, with its telemetry store at hand.
#[derive(Debug)]
pub struct Harness {
    pub upstream: ScriptedUpstream,
    pub engine: Engine,
    pub store: TelemetryStore,
    /// The engine's clock, unless the harness was built on the wall clock.
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
}

/// How a [`Harness`] is put together; every part has a default.
#[derive(Debug)]
#[must_use]
pub struct HarnessBuilder {
    config: String,
    embedder: Option<Arc<Embedder>>,
    database_url: Option<String>,
    alerts: Option<AlertSettings>,
    wall_clock: bool,
}

impl Harness {
    /// `config` is TOML over the defaults; the semantic cache is off unless asked for.
    pub fn builder(config: &str) -> HarnessBuilder {
        HarnessBuilder {
            config: config.to_owned(),
            embedder: None,
            database_url: None,
            alerts: None,
            wall_clock: false,
        }
    }

    /// The exact path only: the semantic cache off.
    pub async fn start(config: &str) -> Self {
        Self::builder(config).start().await
    }

    /// With the semantic cache and the real local model (`aipipe setup` installs it), serving
    /// at the configured bar without audits (which would add upstream calls after hits: the
    /// audits' own tests turn them on). `config` starts inside the `[semantic]` table.
    pub async fn start_semantic(config: &str) -> Self {
        Self::builder(&format!("[semantic]\nttl_secs = 600\nmax_wrong_rate = 0\n{config}")).semantic().start().await
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
    #[allow(clippy::expect_used)]
    pub async fn rows(&self) -> Vec<CallRecord> {
        self.engine.flush().await.expect("telemetry flushed");
        self.store.records().await.expect("telemetry rows read")
    }
}

impl HarnessBuilder {
    /// The semantic cache on, with the real local model.
    pub fn semantic(mut self) -> Self {
        self.embedder = Some(embedder());
        self
    }

    /// Telemetry into this database instead of a SQLite file in the harness's folder.
    pub fn database(mut self, url: String) -> Self {
        self.database_url = Some(url);
        self
    }

    pub fn alerts(mut self, alerts: AlertSettings) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// The engine on the wall clock (rows at today's time), not the manual one.
    pub fn wall_clock(mut self) -> Self {
        self.wall_clock = true;
        self
    }

    #[allow(clippy::expect_used)]
    pub async fn start(self) -> Harness {
        let upstream = ScriptedUpstream::start().await.expect("the scripted upstream starts");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let url = self.database_url.unwrap_or_else(|| dir.path().join("telemetry.db").display().to_string());
        let store = TelemetryStore::connect(&url).await.expect("the telemetry store opens");
        let config = match self.embedder {
            Some(_) => self.config,
            None => format!("[semantic]\nenabled = false\n{}", self.config),
        };
        let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH + START));
        let engine_clock: Arc<dyn Clock> = if self.wall_clock { Arc::new(SystemClock) } else { clock.clone() };
        let mut builder = Engine::builder(Config::from_toml(&config).expect("the test config is valid"))
            .provider("scripted", upstream.provider(Duration::from_secs(5)))
            .recorder(Recorder::spawn_with_alerts(store.clone(), RecorderSettings::default(), self.alerts))
            .clock(engine_clock);
        if let Some(embedder) = self.embedder {
            builder = builder.embedder(embedder);
        }
        let engine = builder.build().await.expect("the engine builds");
        Harness { upstream, engine, store, clock, dir }
    }
}

impl ScriptedUpstream {
    /// An OpenAI-compatible provider named `scripted` that talks to this upstream over HTTP.
    #[allow(clippy::expect_used)]
    pub fn provider(&self, request_timeout: Duration) -> OpenAiCompatible {
        OpenAiCompatible::new(OpenAiSettings {
            name: "scripted".into(),
            base_url: self.base_url(),
            api_key: "sk-test".into(),
            request_timeout,
            connect_timeout: Duration::from_secs(1),
            stream_usage: true,
        })
        .expect("an HTTP client")
    }

    /// An Anthropic Messages API provider named `scripted-anthropic` that talks to this
    /// upstream over HTTP.
    #[allow(clippy::expect_used)]
    pub fn anthropic_provider(&self, request_timeout: Duration) -> Anthropic {
        Anthropic::new(AnthropicSettings {
            name: "scripted-anthropic".into(),
            base_url: self.base_url(),
            api_key: "sk-ant-test".into(),
            default_max_tokens: 1024,
            request_timeout,
            connect_timeout: Duration::from_secs(1),
        })
        .expect("an HTTP client")
    }
}

/// One model load per test process: it is the slow part.
#[allow(clippy::panic)]
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
