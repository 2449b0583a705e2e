//! One shim per legacy component: the same type name and methods as in [`crate::legacy`], so
//! that callers change one `use` line. Each shim's conversions are explicit: `to_input` (the
//! legacy arguments as the step's input) and a [`Conversion`](crate::Conversion) (the engine's
//! result as the legacy return and error types).

pub mod classifier;
pub mod enhancer;
pub mod extractor;
pub mod prioritizer;
pub mod summarizer;
pub mod validator;

use pipeline_core::PipelineResult;
use serde_json::Value;

/// A string field of the engine's output.
fn text_field(result: &PipelineResult, field: &str) -> Option<String> {
    result.output.get(field).and_then(Value::as_str).map(str::to_owned)
}
