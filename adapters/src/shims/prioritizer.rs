use pipeline_core::{PipelineError, PipelineResult, StepType};
use serde_json::{Value, json};

use super::text_field;
use crate::legacy::prioritizer::{self as legacy, BoxError, Level, Priority, PriorityOptions};
use crate::{Adapter, Comparison, Conversion};

/// `legacy::prioritizer::Prioritizer`, through the engine's `prioritizer` step.
#[derive(Debug, Clone)]
pub struct Prioritizer {
    legacy: legacy::Prioritizer,
    adapter: Adapter,
}

/// The conversions both ways between the legacy types and the engine's.
#[derive(Debug)]
pub struct Conversions;

impl Conversions {
    pub fn to_input(task: &str, options: &PriorityOptions) -> Value {
        let mut input = json!({ "task": task });
        if let Some(context) = &options.context {
            input["context"] = json!(context);
        }
        input
    }
}

impl Conversion for Conversions {
    const COMPONENT: &'static str = "prioritizer";
    const COMPARISON: Comparison = Comparison::Exact;
    type Output = Priority;
    type Error = BoxError;

    fn step() -> StepType {
        StepType::PRIORITIZER
    }

    fn from_pipeline(result: Result<PipelineResult, PipelineError>) -> Result<Priority, BoxError> {
        let result = result?;
        let level = match text_field(&result, "priority").as_deref() {
            Some("low") => Level::Low,
            Some("medium") => Level::Medium,
            Some("high") => Level::High,
            Some("critical") => Level::Critical,
            other => return Err(format!("unexpected priority {other:?}").into()),
        };
        let score = result.output["score"].as_f64().ok_or("no score")?;
        Ok(Priority { level, score: score.round().clamp(0.0, 100.0) as u8 })
    }

    /// Agreement is on the level: scores of the same level differ by judgement, not by meaning.
    fn comparable(output: &Priority) -> Value {
        json!(format!("{:?}", output.level))
    }
}

impl Prioritizer {
    pub fn new(legacy: legacy::Prioritizer, adapter: Adapter) -> Self {
        Self { legacy, adapter }
    }

    pub async fn prioritize(&self, task: &str, options: &PriorityOptions) -> Result<Priority, BoxError> {
        let legacy = self.legacy.prioritize(task, options);
        self.adapter.serve::<Conversions, _>(Conversions::to_input(task, options), legacy).await
    }
}
