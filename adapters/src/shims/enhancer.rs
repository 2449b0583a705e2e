use pipeline_core::{PipelineError, PipelineResult, StepType};
use serde_json::{Value, json};

use super::text_field;
use crate::legacy::enhancer as legacy;
use crate::{Adapter, Comparison, Conversion};

/// `legacy::enhancer::Enhancer`, through the engine's `enhancer` step. Like the old one, it
/// never fails: on any engine failure the text comes back unchanged.
#[derive(Debug, Clone)]
pub struct Enhancer {
    legacy: legacy::Enhancer,
    adapter: Adapter,
}

/// The conversions both ways between the legacy types and the engine's.
#[derive(Debug)]
pub struct Conversions;

/// The old method could not fail; the conversion's failure is "no better text".
#[derive(Debug)]
pub struct NoEnhancement;

impl Conversions {
    pub fn to_input(text: &str) -> Value {
        json!({ "text": text })
    }
}

impl Conversion for Conversions {
    const COMPONENT: &'static str = "enhancer";
    const COMPARISON: Comparison = Comparison::Text { min_similarity: 0.6 };
    type Output = String;
    type Error = NoEnhancement;

    fn step() -> StepType {
        StepType::ENHANCER
    }

    fn from_pipeline(result: Result<PipelineResult, PipelineError>) -> Result<String, NoEnhancement> {
        result.ok().and_then(|result| text_field(&result, "enhanced")).ok_or(NoEnhancement)
    }

    fn comparable(output: &String) -> Value {
        json!(output)
    }
}

impl Enhancer {
    pub fn new(legacy: legacy::Enhancer, adapter: Adapter) -> Self {
        Self { legacy, adapter }
    }

    pub async fn enhance(&self, text: String) -> String {
        let legacy = async { Ok(self.legacy.enhance(text.clone()).await) };
        self.adapter.serve::<Conversions, _>(Conversions::to_input(&text), legacy).await.unwrap_or(text)
    }
}
