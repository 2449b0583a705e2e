use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use serde::Deserialize;

/// How a component's calls are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The old code only.
    Legacy,
    /// The old code serves the caller; the engine answers the same call alongside, and the two
    /// answers are compared and recorded.
    Shadow,
    /// The engine only.
    Pipeline,
    /// The engine, and the old code if the engine fails.
    PipelineWithLegacyFallback,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Shadow => "shadow",
            Self::Pipeline => "pipeline",
            Self::PipelineWithLegacyFallback => "pipeline-with-legacy-fallback",
        }
    }
}

/// When a component in shadow mode may be cut over.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CutoverRule {
    pub min_agreement: f64,
    pub min_calls: u64,
}

impl Default for CutoverRule {
    fn default() -> Self {
        Self { min_agreement: 0.98, min_calls: 200 }
    }
}

/// The migration file: a default mode, one line per component that differs, the cut-over rule.
///
/// ```toml
/// default = "legacy"
/// [components]
/// classifier = "shadow"
/// summarizer = "pipeline"
/// [cutover]
/// min_agreement = 0.98
/// min_calls = 200
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationPlan {
    pub default: Mode,
    #[serde(default)]
    pub components: BTreeMap<String, Mode>,
    #[serde(default)]
    pub cutover: CutoverRule,
}

impl Default for MigrationPlan {
    fn default() -> Self {
        Self { default: Mode::Legacy, components: BTreeMap::new(), cutover: CutoverRule::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cannot read the migration plan `{path}`: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("migration plan `{path}`: {message} (modes: legacy, shadow, pipeline, pipeline-with-legacy-fallback)")]
    Invalid { path: String, message: String },
}

impl MigrationPlan {
    pub fn parse(text: &str, origin: &str) -> Result<Self, PlanError> {
        toml::from_str(text).map_err(|err| PlanError::Invalid { path: origin.to_owned(), message: err.to_string() })
    }

    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read { path: origin.clone(), source })?;
        Self::parse(&text, &origin)
    }

    pub fn mode(&self, component: &str) -> Mode {
        self.components.get(component).copied().unwrap_or(self.default)
    }
}

/// The live plan, shared by every shim: replacing it (from an edited file) changes how the next
/// call of each component is served, without a rebuild or a restart.
#[derive(Debug, Clone, Default)]
pub struct Modes {
    plan: Arc<RwLock<MigrationPlan>>,
}

impl Modes {
    pub fn new(plan: MigrationPlan) -> Self {
        Self { plan: Arc::new(RwLock::new(plan)) }
    }

    pub fn mode(&self, component: &str) -> Mode {
        self.plan.read().unwrap_or_else(PoisonError::into_inner).mode(component)
    }

    pub fn plan(&self) -> MigrationPlan {
        self.plan.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn replace(&self, plan: MigrationPlan) {
        *self.plan.write().unwrap_or_else(PoisonError::into_inner) = plan;
    }

    /// Reads the plan again; a broken file leaves the current plan in place.
    pub fn reload(&self, path: &Path) -> Result<(), PlanError> {
        let plan = MigrationPlan::load(path)?;
        self.replace(plan);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_name_modes_per_component_and_reject_typos() {
        let plan = MigrationPlan::parse(
            "default = \"legacy\"\n[components]\nclassifier = \"shadow\"\nextractor = \"pipeline-with-legacy-fallback\"",
            "test",
        )
        .unwrap();
        assert_eq!(plan.mode("classifier"), Mode::Shadow);
        assert_eq!(plan.mode("extractor"), Mode::PipelineWithLegacyFallback);
        assert_eq!(plan.mode("validator"), Mode::Legacy);
        let typo = MigrationPlan::parse("default = \"legacy\"\n[components]\nclassifier = \"shadows\"", "plan.toml");
        let message = typo.unwrap_err().to_string();
        assert!(message.contains("plan.toml") && message.contains("shadows"), "{message}");
        let unknown = MigrationPlan::parse("default = \"legacy\"\nmode = \"x\"", "plan.toml").unwrap_err();
        assert!(unknown.to_string().contains("mode"), "{unknown}");
    }
}
