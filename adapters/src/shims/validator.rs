use pipeline_core::{PipelineError, PipelineResult, StepType};
use serde_json::{Value, json};

use crate::legacy::validator::{self as legacy, ValidationError, Verdict};
use crate::{Adapter, Comparison, Conversion};

/// `legacy::validator::ContentValidator`, through the engine's `validator` step. Blocking, like
/// the old one: call it from a plain thread.
#[derive(Debug, Clone)]
pub struct ContentValidator {
    legacy: legacy::ContentValidator,
    adapter: Adapter,
}

/// The conversions both ways between the legacy types and the engine's.
#[derive(Debug)]
pub struct Conversions;

impl Conversions {
    pub fn to_input(text: &str, rules: &[&str]) -> Value {
        json!({ "text": text, "rules": rules })
    }
}

impl Conversion for Conversions {
    const COMPONENT: &'static str = "validator";
    const COMPARISON: Comparison = Comparison::Exact;
    type Output = Verdict;
    type Error = ValidationError;

    fn step() -> StepType {
        StepType::VALIDATOR
    }

    fn from_pipeline(result: Result<PipelineResult, PipelineError>) -> Result<Verdict, ValidationError> {
        let result = result.map_err(|err| ValidationError::Unavailable(err.to_string()))?;
        let valid =
            result.output["valid"].as_bool().ok_or_else(|| ValidationError::BadReply(result.output.to_string()))?;
        let issues = result.output["issues"]
            .as_array()
            .map(|issues| issues.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            .unwrap_or_default();
        Ok(Verdict { valid, issues })
    }

    /// Agreement is on the verdict; the wording of the issues may differ.
    fn comparable(output: &Verdict) -> Value {
        json!(output.valid)
    }
}

impl ContentValidator {
    pub fn new(legacy: legacy::ContentValidator, adapter: Adapter) -> Self {
        Self { legacy, adapter }
    }

    pub fn validate(&self, text: &str, rules: &[&str]) -> Result<Verdict, ValidationError> {
        self.adapter
            .serve_blocking::<Conversions, _>(Conversions::to_input(text, rules), || self.legacy.validate(text, rules))
    }
}
