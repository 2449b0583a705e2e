//! Configuration: embedded defaults, then a TOML file, then `AIPIPE_*` environment variables;
//! validated once into types that the engine uses without further checks.
//!
//! `raw` mirrors the TOML, `settings` validates each section into its type, `step` does the
//! same for step types, and `validate` holds the checks they share.

mod models;
mod raw;
mod settings;
mod step;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use figment::providers::{Env, Format, Toml};
use figment::{Figment, Provider};
use serde::de::DeserializeOwned;
use telemetry::PriceTable;

pub use self::models::{BudgetSettings, ModelRegistry, ModelSpec, OnBudget, RouteSpec, RoutingSettings};
pub(crate) use self::raw::RawStep;
use self::raw::{ENGINE_SECTIONS, RawConfig};
pub use self::settings::{
    AuditConfig, CacheSettings, EngineSettings, FallbackSettings, ProviderKind, ProviderSettings, ResilienceSettings,
    SemanticSettings, StateSettings, TelemetrySettings,
};
pub use self::step::{AnswerMatch, StepSpec};
use crate::prompt::Prompts;
use crate::{SetupError, StepKind, StepType};

const DEFAULTS: &str = include_str!("../../defaults.toml");

/// `AIPIPE_*` variables that are not config keys: the config file (`AIPIPE_CONFIG`), the model
/// home (`AIPIPE_HOME`), the evaluation data (`AIPIPE_DATA`) and the tests' PostgreSQL server
/// (`AIPIPE_TEST_POSTGRES_URL`). Any other `AIPIPE_` variable is a key, and an unknown one is an
/// error.
const PROCESS_VARIABLES: &[&str] = &["config", "home", "data", "test_postgres_url"];

/// Where a config is read from: the embedded defaults, then a TOML file, then `AIPIPE_*`
/// environment variables (`AIPIPE_SECTION__KEY`). The engine reads its own tables
/// ([`ConfigSource::engine`]); a table that another part of aipipe owns, such as the
/// gateway's `[gateway]`, is read by its owner through [`ConfigSource::section`], which also
/// tells the engine that the table is not a typo.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    figment: Figment,
    claimed: Vec<String>,
}

impl ConfigSource {
    /// The embedded defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, SetupError> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SetupError::MissingFile { path: path.to_owned() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("AIPIPE_").split("__").ignore(PROCESS_VARIABLES));
        Ok(Self { figment, claimed: Vec::new() })
    }

    /// The embedded defaults with `toml` on top, ignoring the environment.
    pub fn from_toml(toml: &str) -> Self {
        Self { figment: Figment::from(Toml::string(DEFAULTS)).merge(Toml::string(toml)), claimed: Vec::new() }
    }

    /// The table `name`, which its owner reads with its own embedded `defaults` (a TOML text
    /// holding that table) beneath what the file and the environment set.
    pub fn section<T: DeserializeOwned>(&mut self, name: &str, defaults: &str) -> Result<T, SetupError> {
        self.figment = std::mem::take(&mut self.figment).join(Toml::string(defaults));
        self.claimed.push(name.to_owned());
        self.figment.extract_inner(name).map_err(|err| figment_error(&err))
    }

    /// The engine's config. Every top-level table must be the engine's or claimed.
    pub fn engine(&self) -> Result<Config, SetupError> {
        self.refuse_unknown_tables()?;
        let raw: RawConfig = self.figment.extract().map_err(|err| figment_error(&err))?;
        Config::validate(raw)
    }

    fn refuse_unknown_tables(&self) -> Result<(), SetupError> {
        let data = self.figment.data().map_err(|err| figment_error(&err))?;
        for key in data.values().flat_map(|table| table.keys()) {
            if ENGINE_SECTIONS.contains(&key.as_str()) || self.claimed.contains(key) {
                continue;
            }
            if key == "prices" {
                return Err(SetupError::invalid(
                    "prices",
                    "prices now live in the model registry: move each [prices.\"NAME\"] to [models.\"NAME\"] \
                     (same keys, plus provider, context_window and tier)",
                ));
            }
            let origin = self.figment.find_metadata(key).map(origin).unwrap_or_default();
            return Err(SetupError::invalid(
                key.clone(),
                format!(
                    "unknown table{origin}: the tables are {}{}",
                    ENGINE_SECTIONS.join(", "),
                    self.claimed.iter().map(|name| format!(", {name}")).collect::<String>()
                ),
            ));
        }
        Ok(())
    }
}

/// The engine's config, validated: every value in range, every template compiled, every step
/// complete.
#[derive(Debug, Clone)]
pub struct Config {
    pub engine: EngineSettings,
    pub provider: ProviderSettings,
    /// Endpoints besides the primary one, by name.
    pub providers: BTreeMap<String, ProviderSettings>,
    pub resilience: ResilienceSettings,
    pub fallback: FallbackSettings,
    pub cache: CacheSettings,
    pub semantic: SemanticSettings,
    /// What several replicas share through Redis.
    pub state: StateSettings,
    pub telemetry: TelemetrySettings,
    /// `None`: no anomaly alerts.
    pub alerts: Option<telemetry::AlertSettings>,
    /// Every model a route can pick.
    pub models: ModelRegistry,
    /// The registry's prices, by model name as routes and replies give it.
    pub prices: PriceTable,
    pub routing: RoutingSettings,
    pub budgets: BudgetSettings,
    steps: BTreeMap<StepType, Arc<StepSpec>>,
    pub(crate) prompts: Prompts,
}

impl Config {
    /// Embedded defaults, then `file` if given, then `AIPIPE_*` environment variables; only
    /// the engine's tables (see [`ConfigSource`] for a config shared with other parts).
    pub fn load(file: Option<&Path>) -> Result<Self, SetupError> {
        ConfigSource::load(file)?.engine()
    }

    /// The embedded defaults alone, ignoring the environment.
    pub fn defaults() -> Result<Self, SetupError> {
        ConfigSource::from_toml("").engine()
    }

    /// The embedded defaults with `toml` on top, ignoring the environment.
    pub fn from_toml(toml: &str) -> Result<Self, SetupError> {
        ConfigSource::from_toml(toml).engine()
    }

    pub fn step(&self, step: &StepType) -> Option<&StepSpec> {
        self.steps.get(step).map(Arc::as_ref)
    }

    pub fn steps(&self) -> impl Iterator<Item = &StepSpec> {
        self.steps.values().map(Arc::as_ref)
    }

    fn validate(raw: RawConfig) -> Result<Self, SetupError> {
        let engine = EngineSettings::validate(raw.engine)?;
        let provider = ProviderSettings::primary(raw.provider)?;
        let providers = raw
            .providers
            .into_iter()
            .map(|(name, endpoint)| Ok((name.clone(), ProviderSettings::named(&name, endpoint)?)))
            .collect::<Result<BTreeMap<_, _>, SetupError>>()?;
        let resilience = ResilienceSettings::validate(&raw.limits, &raw.breaker, &raw.retry)?;
        let semantic = SemanticSettings::validate(raw.semantic)?;
        let prompts = Prompts::compile(&raw.steps)?;
        let models = ModelRegistry::validate(raw.models, &provider.name, &providers)?;
        let mut steps = BTreeMap::new();
        for (name, step) in raw.steps {
            let spec = StepSpec::validate(&name, step, &engine, &semantic, &provider.name, &providers, &models)?;
            steps.insert(spec.step.clone(), Arc::new(spec));
        }
        if let Some(judge) = &semantic.audit.answer_judge {
            judge_step(steps.get(judge).map(Arc::as_ref), judge)?;
        }
        Ok(Self {
            fallback: FallbackSettings::validate(&raw.fallback)?,
            cache: CacheSettings::validate(&raw.cache)?,
            state: StateSettings::validate(&raw.state)?,
            telemetry: TelemetrySettings::validate(raw.telemetry)?,
            alerts: settings::alerts(&raw.alerts)?,
            prices: models.prices(),
            models,
            routing: RoutingSettings::validate(&raw.routing)?,
            budgets: BudgetSettings::validate(raw.budgets)?,
            engine,
            provider,
            providers,
            resilience,
            semantic,
            steps,
            prompts,
        })
    }
}

/// `semantic.answer_judge_step` names a structured step whose reply has a boolean `same`.
fn judge_step(spec: Option<&StepSpec>, name: &StepType) -> Result<(), SetupError> {
    let key = "semantic.answer_judge_step";
    let Some(spec) = spec else {
        return Err(SetupError::invalid(
            key,
            format!("no step `{name}`: declare [steps.{name}] (docs: README, Verified savings)"),
        ));
    };
    let same = &spec.output_schema["properties"]["same"];
    if spec.kind != StepKind::Structured || same["type"] != "boolean" {
        return Err(SetupError::invalid(
            key,
            format!("step `{name}` must be structured, its output_schema with a boolean property `same`"),
        ));
    }
    Ok(())
}

/// figment's own message leads with its profile name (`default.cache.ttl`), which means
/// nothing to our users; this says which key, what is wrong, and where it was set.
fn figment_error(err: &figment::Error) -> SetupError {
    let key = if err.path.is_empty() { "(top level)".to_owned() } else { err.path.join(".") };
    let origin = err.metadata.as_ref().map(origin).unwrap_or_default();
    SetupError::invalid(key, format!("{}{origin}", err.kind))
}

fn origin(metadata: &figment::Metadata) -> String {
    match &metadata.source {
        Some(source) => format!(" (set in {source})"),
        None => format!(" (set by {})", metadata.name),
    }
}

#[cfg(test)]
mod tests;
