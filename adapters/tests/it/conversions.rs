//! Each shim's conversions, both ways: the legacy arguments as the step's input, and the
//! engine's results and failures as the legacy return and error types. (That the inputs fit
//! the steps' real templates, tests/migration.rs shows in pipeline mode.)
use std::time::Duration;

use adapters::Conversion;
use adapters::legacy::classifier::ClassifierError;
use adapters::legacy::prioritizer::{Level, Priority, PriorityOptions};
use adapters::legacy::validator::{ValidationError, Verdict};
use adapters::shims::{classifier, enhancer, extractor, prioritizer, summarizer, validator};
use pipeline_core::providers::{FinishReason, ProviderError};
use pipeline_core::{PipelineError, PipelineResult, Source, StepType, TraceId};
use serde_json::{Value, json};

fn answered(output: Value) -> Result<PipelineResult, PipelineError> {
    Ok(PipelineResult {
        output,
        source: Source::Upstream,
        confidence: 1.0,
        model: "gpt-4o-mini".into(),
        provider: "openai".into(),
        input_tokens: 10,
        output_tokens: 5,
        answer_usage: pipeline_core::providers::Usage::new(10, 5),
        cost_usd: 0.0,
        saved_cost_usd: 0.0,
        latency: Duration::from_millis(5),
        trace_id: TraceId::random(),
        attempts: 1,
        rate_limit_wait: Duration::ZERO,
        degraded_by: None,
        similar_to: None,
        finish_reason: FinishReason::Stop,
        route: None,
        tool_calls: Vec::new(),
        time_to_first_token: None,
    })
}

fn failed() -> Result<PipelineResult, PipelineError> {
    Err(PipelineError::Upstream {
        step: StepType::CLASSIFIER,
        attempts: 1,
        source: ProviderError::ServerError { status: 503, message: "down".into(), retry_after: None },
    })
}

#[test]
fn classifier() {
    assert_eq!(classifier::Conversions::to_input("hi", &["a", "b"]), json!({"text": "hi", "labels": ["a", "b"]}));
    let label = classifier::Conversions::from_pipeline(answered(json!({"label": "Billing", "confidence": 0.9})));
    assert_eq!(label.unwrap(), "billing");
    assert!(
        matches!(classifier::Conversions::from_pipeline(failed()), Err(ClassifierError::Unavailable(m)) if m.contains("503"))
    );
    assert!(matches!(
        classifier::Conversions::from_pipeline(answered(json!({"confidence": 1}))),
        Err(ClassifierError::UnknownLabel(_))
    ));
}

#[test]
fn enhancer() {
    assert_eq!(enhancer::Conversions::to_input("teh"), json!({"text": "teh"}));
    assert_eq!(enhancer::Conversions::from_pipeline(answered(json!({"enhanced": "the"}))).unwrap(), "the");
    assert!(enhancer::Conversions::from_pipeline(failed()).is_err());
}

#[test]
fn prioritizer() {
    let options = PriorityOptions { context: Some("release week".into()) };
    assert_eq!(
        prioritizer::Conversions::to_input("fix it", &options),
        json!({"task": "fix it", "context": "release week"})
    );
    assert_eq!(prioritizer::Conversions::to_input("fix it", &PriorityOptions::default()), json!({"task": "fix it"}));
    let priority = prioritizer::Conversions::from_pipeline(answered(
        json!({"priority": "critical", "score": 97.6, "reason": "r"}),
    ));
    assert_eq!(priority.unwrap(), Priority { level: Level::Critical, score: 98 });
    assert!(prioritizer::Conversions::from_pipeline(failed()).unwrap_err().to_string().contains("503"));
    assert_eq!(prioritizer::Conversions::comparable(&Priority { level: Level::High, score: 1 }), json!("High"));
}

#[test]
fn summarizer() {
    assert_eq!(summarizer::Conversions::to_input("long", 20), json!({"text": "long", "max_words": 20}));
    assert_eq!(summarizer::Conversions::from_pipeline(answered(json!({"summary": "short"}))).unwrap(), "short");
    assert!(summarizer::Conversions::from_pipeline(failed()).unwrap_err().starts_with("summarizer failed"));
}

#[test]
fn validator() {
    assert_eq!(validator::Conversions::to_input("t", &["r1"]), json!({"text": "t", "rules": ["r1"]}));
    let verdict = validator::Conversions::from_pipeline(answered(json!({"valid": false, "issues": ["shouting"]})));
    assert_eq!(verdict.unwrap(), Verdict { valid: false, issues: vec!["shouting".into()] });
    assert!(matches!(validator::Conversions::from_pipeline(failed()), Err(ValidationError::Unavailable(_))));
    assert!(matches!(
        validator::Conversions::from_pipeline(answered(json!({"issues": []}))),
        Err(ValidationError::BadReply(_))
    ));
}

#[test]
fn extractor() {
    assert_eq!(extractor::Conversions::to_input("t", &["name"]), json!({"text": "t", "fields": ["name"]}));
    let fields =
        extractor::Conversions::from_pipeline(answered(json!({"fields": {"name": "Ada", "age": 36, "phone": null}})));
    let fields = fields.unwrap();
    assert_eq!(fields["name"].as_deref(), Some("Ada"));
    assert_eq!(fields["age"].as_deref(), Some("36"));
    assert_eq!(fields["phone"], None);
    assert!(extractor::Conversions::from_pipeline(failed()).is_err());
}
