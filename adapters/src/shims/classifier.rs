use pipeline_core::{PipelineError, PipelineResult, StepType};
use serde_json::{Value, json};

use super::text_field;
use crate::legacy::classifier::{self as legacy, ClassifierError};
use crate::{Adapter, Comparison, Conversion};

/// `legacy::classifier::Classifier`, through the engine's `classifier` step.
#[derive(Debug, Clone)]
pub struct Classifier {
    legacy: legacy::Classifier,
    adapter: Adapter,
}

/// The conversions both ways between the legacy types and the engine's.
#[derive(Debug)]
pub struct Conversions;

impl Conversions {
    pub fn to_input(text: &str, labels: &[&str]) -> Value {
        json!({ "text": text, "labels": labels })
    }
}

impl Conversion for Conversions {
    const COMPONENT: &'static str = "classifier";
    const COMPARISON: Comparison = Comparison::Exact;
    type Output = String;
    type Error = ClassifierError;

    fn step() -> StepType {
        StepType::CLASSIFIER
    }

    fn from_pipeline(result: Result<PipelineResult, PipelineError>) -> Result<String, ClassifierError> {
        let result = result.map_err(|err| ClassifierError::Unavailable(err.to_string()))?;
        let label =
            text_field(&result, "label").ok_or_else(|| ClassifierError::UnknownLabel(result.output.to_string()))?;
        Ok(label.to_lowercase())
    }

    fn comparable(output: &String) -> Value {
        json!(output)
    }
}

impl Classifier {
    pub fn new(legacy: legacy::Classifier, adapter: Adapter) -> Self {
        Self { legacy, adapter }
    }

    pub async fn classify(&self, text: &str, labels: &[&str]) -> Result<String, ClassifierError> {
        let result = self
            .adapter
            .serve::<Conversions, _>(Conversions::to_input(text, labels), self.legacy.classify(text, labels))
            .await?;
        // The old contract: one of the labels, or an error saying what came back.
        if labels.iter().any(|label| label.eq_ignore_ascii_case(&result)) {
            Ok(result)
        } else {
            Err(ClassifierError::UnknownLabel(result))
        }
    }
}
