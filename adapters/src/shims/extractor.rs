use std::collections::BTreeMap;

use pipeline_core::{PipelineError, PipelineResult, StepType};
use serde_json::{Value, json};

use crate::legacy::extractor as legacy;
use crate::{Adapter, Comparison, Conversion};

/// `legacy::extractor::FieldExtractor`, through the engine's `extractor` step. Blocking.
#[derive(Debug, Clone)]
pub struct FieldExtractor {
    legacy: legacy::FieldExtractor,
    adapter: Adapter,
}

pub type Fields = BTreeMap<String, Option<String>>;

/// The conversions both ways between the legacy types and the engine's.
#[derive(Debug)]
pub struct Conversions;

/// The old method said `None` for every failure.
#[derive(Debug)]
pub struct NoFields;

impl Conversions {
    pub fn to_input(text: &str, fields: &[&str]) -> Value {
        json!({ "text": text, "fields": fields })
    }
}

impl Conversion for Conversions {
    const COMPONENT: &'static str = "extractor";
    const COMPARISON: Comparison = Comparison::Exact;
    type Output = Fields;
    type Error = NoFields;

    fn step() -> StepType {
        StepType::EXTRACTOR
    }

    /// Each field the engine returned, its value as text (`None` for null), as the old method
    /// gave them.
    fn from_pipeline(result: Result<PipelineResult, PipelineError>) -> Result<Fields, NoFields> {
        let result = result.map_err(|_| NoFields)?;
        let fields = result.output["fields"].as_object().ok_or(NoFields)?;
        Ok(fields
            .iter()
            .map(|(field, value)| {
                let value = match value {
                    Value::Null => None,
                    Value::String(text) => Some(text.clone()),
                    other => Some(other.to_string()),
                };
                (field.clone(), value)
            })
            .collect())
    }

    fn comparable(output: &Fields) -> Value {
        json!(output)
    }
}

impl FieldExtractor {
    pub fn new(legacy: legacy::FieldExtractor, adapter: Adapter) -> Self {
        Self { legacy, adapter }
    }

    pub fn extract(&self, text: &str, fields: &[&str]) -> Option<Fields> {
        let extracted = self.adapter.serve_blocking::<Conversions, _>(Conversions::to_input(text, fields), || {
            self.legacy.extract(text, fields).ok_or(NoFields)
        });
        // Keep exactly the asked fields, whichever path answered.
        extracted
            .ok()
            .map(|found| fields.iter().map(|field| (field.to_string(), found.get(*field).cloned().flatten())).collect())
    }
}
