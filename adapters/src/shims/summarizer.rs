use pipeline_core::{PipelineError, PipelineResult, StepType};
use serde_json::{Value, json};

use super::text_field;
use crate::legacy::summarizer as legacy;
use crate::{Adapter, Comparison, Conversion};

/// `legacy::summarizer::Summarizer`, through the engine's `summarizer` step.
#[derive(Debug, Clone)]
pub struct Summarizer {
    legacy: legacy::Summarizer,
    adapter: Adapter,
}

/// The conversions both ways between the legacy types and the engine's.
#[derive(Debug)]
pub struct Conversions;

impl Conversions {
    pub fn to_input(text: &str, max_words: usize) -> Value {
        json!({ "text": text, "max_words": max_words })
    }
}

impl Conversion for Conversions {
    const COMPONENT: &'static str = "summarizer";
    const COMPARISON: Comparison = Comparison::Text { min_similarity: 0.5 };
    type Output = String;
    type Error = String;

    fn step() -> StepType {
        StepType::SUMMARIZER
    }

    fn from_pipeline(result: Result<PipelineResult, PipelineError>) -> Result<String, String> {
        let result = result.map_err(|err| format!("summarizer failed: {err}"))?;
        text_field(&result, "summary").ok_or_else(|| format!("summarizer failed: no summary in {}", result.output))
    }

    fn comparable(output: &String) -> Value {
        json!(output)
    }
}

impl Summarizer {
    pub fn new(legacy: legacy::Summarizer, adapter: Adapter) -> Self {
        Self { legacy, adapter }
    }

    pub async fn summarize(&self, text: &str, max_words: usize) -> Result<String, String> {
        let legacy = self.legacy.summarize(text, max_words);
        self.adapter.serve::<Conversions, _>(Conversions::to_input(text, max_words), legacy).await
    }
}
