//! A step type, as the config declares it and as the engine uses it.

use std::collections::BTreeMap;

use providers::ResponseFormat;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::models::{ModelRegistry, RouteSpec, step_budget};
use super::raw::{AuditBy, RawStep};
use super::settings::{EngineSettings, ProviderSettings, SemanticSettings};
use super::validate::{cosine, non_empty, positive, probability, wrong_rate};
use crate::contract::{OutputContract, ReplyContract};
use crate::prompt::CHAT_SEMANTIC_FIELD;
use crate::{SetupError, StepKind, StepType};

/// One step type, validated: its templates compile and its output schema is a JSON schema.
#[derive(Debug, Clone)]
pub struct StepSpec {
    pub step: StepType,
    pub kind: StepKind,
    pub system: String,
    /// The user-message template; empty for a chat step.
    pub prompt: String,
    /// `Value::Null` for a chat step, whose reply is free text.
    pub output_schema: Value,
    pub model: String,
    pub temperature: f32,
    pub max_output_tokens: u32,
    pub max_prompt_chars: usize,
    /// The input field whose text the semantic cache compares; `None` keeps the step to exact
    /// matches only. Every other input field must match exactly. For a chat step it can only
    /// be `messages`: an opening question (after system messages only) is compared; a later
    /// turn is matched exactly or not at all.
    pub semantic_field: Option<String>,
    pub semantic_threshold: f32,
    pub semantic_min_confidence: f32,
    /// The bound on the share of this step's semantic hits that serve an answer the model
    /// would not have given (`semantic.max_wrong_rate` unless the step sets its own).
    pub semantic_max_wrong_rate: f64,
    /// How an audit compares the model's answer with the one a hit served.
    pub answer_match: AnswerMatch,
    /// How the step picks its model: its `route`, else its model and then its fallbacks.
    pub route: RouteSpec,
    /// Spend per workspace per UTC day on this step, in US dollars.
    pub daily_budget_usd: Option<f64>,
    /// The rule-based reply when no model can answer; valid against the output schema (a
    /// string for a chat step).
    pub fallback_answer: Option<Value>,
    /// Reply property -> the input field listing the values it may take (the classifier's
    /// `label` is one of `input.labels`): the contract, the repair and the reply format the
    /// provider is asked for all hold it to the call's own list.
    pub output_choices: BTreeMap<String, String>,
    pub(crate) contract: ReplyContract,
    /// What a provider that supports structured outputs is asked for.
    pub(crate) response_format: ResponseFormat,
    /// Changes whenever anything that shapes the answer changes (templates, schema, sampling),
    /// so that editing a prompt retires its cached answers.
    pub(crate) fingerprint: String,
}

/// When two answers of a step are the same answer, for an audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerMatch {
    /// These properties of the reply are equal (strings compared trimmed and case-blind, as
    /// `output_choices` are); empty: every property.
    Fields(Vec<String>),
    /// The answers mean the same: their embeddings' cosine is at least
    /// `semantic.answer_min_cosine` (for a structured reply, its text values joined).
    Meaning,
}

impl AnswerMatch {
    /// Whether two replies of the step are the same answer by their fields: the named fields
    /// (every one when none are named) hold the same values, strings compared trimmed and
    /// case-blind (`Billing` is the label `billing`), anything else as JSON. `None` for a step
    /// compared by meaning, which takes its embeddings.
    pub fn fields_agree(&self, a: &Value, b: &Value) -> Option<bool> {
        let Self::Fields(names) = self else { return None };
        if names.is_empty() {
            return Some(same_value(a, b));
        }
        Some(
            names
                .iter()
                .all(|name| same_value(a.get(name).unwrap_or(&Value::Null), b.get(name).unwrap_or(&Value::Null))),
        )
    }
}

fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.trim().to_lowercase() == b.trim().to_lowercase(),
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_value(a, b)),
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(key, value)| b.get(key).is_some_and(|other| same_value(value, other)))
        }
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => a == b,
    }
}

impl StepSpec {
    /// A reply checked against the step's output contract: its output, or what is wrong with
    /// it in words a model can act on.
    pub fn check_reply(&self, reply: &str) -> Result<Value, String> {
        self.contract.check(reply, &Value::Null)
    }

    /// The same for one call: its input's lists bound the reply's choices.
    pub fn check_reply_for(&self, input: &Value, reply: &str) -> Result<Value, String> {
        self.contract.check(reply, input)
    }

    /// What a similar request must clear for this step's cached answer to serve it.
    pub fn serve_bar(&self) -> semantic_cache::ServeBar {
        semantic_cache::ServeBar { threshold: self.semantic_threshold, min_confidence: self.semantic_min_confidence }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn validate(
        name: &str,
        raw: RawStep,
        engine: &EngineSettings,
        semantic: &SemanticSettings,
        primary_provider: &str,
        providers: &BTreeMap<String, ProviderSettings>,
        registry: &ModelRegistry,
    ) -> Result<Self, SetupError> {
        let key = |field: &str| format!("steps.{name}.{field}");
        let step = StepType::new(name).map_err(|err| SetupError::invalid(format!("steps.{name}"), err.to_string()))?;
        let (output_schema, contract) = match raw.kind {
            StepKind::Structured => {
                if raw.prompt.trim().is_empty() {
                    return Err(SetupError::invalid(key("prompt"), "a structured step needs a prompt template"));
                }
                if raw.output_schema.trim().is_empty() {
                    return Err(SetupError::invalid(
                        key("output_schema"),
                        "a structured step needs the JSON schema of its reply (or `kind = \"chat\"` for free text)",
                    ));
                }
                let schema: Value = serde_json::from_str(&raw.output_schema)
                    .map_err(|err| SetupError::invalid(key("output_schema"), format!("not JSON: {err}")))?;
                let contract =
                    OutputContract::compile(&schema).map_err(|err| SetupError::invalid(key("output_schema"), err))?;
                let choices = output_choices(name, &raw.output_choices, &schema)?;
                (schema, ReplyContract::Json(contract.with_choices(choices)))
            }
            StepKind::Chat => {
                if !raw.output_choices.values().all(|field| field.trim().is_empty()) {
                    return Err(SetupError::invalid(
                        key("output_choices"),
                        "a chat step's reply is free text, with no properties to bind: remove it",
                    ));
                }
                for (field, value) in [("prompt", &raw.prompt), ("output_schema", &raw.output_schema)] {
                    if !value.trim().is_empty() {
                        return Err(SetupError::invalid(
                            key(field),
                            "a chat step sends the caller's messages and passes free text back: remove it",
                        ));
                    }
                }
                (Value::Null, ReplyContract::Text)
            }
        };
        if !(0.0..=2.0).contains(&raw.temperature) {
            return Err(SetupError::invalid(key("temperature"), format!("{} is outside 0.0..=2.0", raw.temperature)));
        }
        let max_output_tokens = positive(&key("max_output_tokens"), raw.max_output_tokens)?;
        let max_prompt_chars =
            positive(&key("max_prompt_chars"), raw.max_prompt_chars.unwrap_or(engine.max_prompt_chars))?;
        let semantic_field = match raw.semantic_field {
            Some(field) if raw.kind == StepKind::Chat && field != CHAT_SEMANTIC_FIELD => {
                return Err(SetupError::invalid(
                    key("semantic_field"),
                    format!("a chat step compares its last user message: use `{CHAT_SEMANTIC_FIELD}` or leave it out"),
                ));
            }
            Some(field) => Some(non_empty(&key("semantic_field"), field)?),
            None => None,
        };
        let semantic_threshold = match raw.semantic_threshold {
            Some(threshold) => cosine(&key("semantic_threshold"), threshold)?,
            None => semantic.threshold,
        };
        let semantic_min_confidence = match raw.semantic_min_confidence {
            Some(min_confidence) => probability(&key("semantic_min_confidence"), f64::from(min_confidence))? as f32,
            None => semantic.min_confidence,
        };
        let semantic_max_wrong_rate = match raw.semantic_max_wrong_rate {
            Some(rate) => wrong_rate(&key("semantic_max_wrong_rate"), rate)?,
            None => semantic.audit.max_wrong_rate,
        };
        let answer_match = answer_match(name, raw.kind, raw.audit_by, raw.audit_fields, &output_schema)?;
        for (index, target) in raw.fallbacks.iter().enumerate() {
            let key = format!("steps.{name}.fallbacks[{index}]");
            if let Some(provider) = &target.provider
                && provider != primary_provider
                && !providers.contains_key(provider)
            {
                return Err(SetupError::invalid(
                    format!("{key}.provider"),
                    format!("no provider `{provider}`: declare it under [providers.{provider}]"),
                ));
            }
        }
        let (model, route) = match raw.route {
            Some(route) => {
                if raw.model.is_some() || !raw.fallbacks.is_empty() {
                    return Err(SetupError::invalid(
                        key("route"),
                        "a step with a route picks among its candidates: remove `model` and `fallbacks`",
                    ));
                }
                let route = RouteSpec::configured(name, &route, registry)?;
                (route.candidates[0].name.clone(), route)
            }
            None => {
                let model = match raw.model {
                    Some(model) => non_empty(&key("model"), model)?,
                    None => engine.default_model.clone(),
                };
                let route = RouteSpec::from_model(name, &model, &raw.fallbacks, registry)?;
                (model, route)
            }
        };
        let daily_budget_usd = step_budget(name, raw.daily_budget_usd)?;
        let fallback_answer = match raw.fallback_answer {
            // An empty answer turns off a default one.
            Some(answer) if answer.trim().is_empty() => None,
            Some(answer) => Some(
                contract
                    .check(&answer, &Value::Null)
                    .map_err(|violations| SetupError::invalid(key("fallback_answer"), violations))?,
            ),
            None => None,
        };
        let fingerprint = {
            let mut hasher = Sha256::new();
            for part in [
                raw.kind.label().as_bytes(),
                raw.system.as_bytes(),
                raw.prompt.as_bytes(),
                semantic_cache::canonical_json(&output_schema).as_bytes(),
                &raw.temperature.to_le_bytes(),
                &max_output_tokens.to_le_bytes(),
                format!("{:?}", raw.output_choices).as_bytes(),
            ] {
                hasher.update((part.len() as u64).to_le_bytes());
                hasher.update(part);
            }
            hex::encode(&hasher.finalize()[..8])
        };
        let response_format = contract.response_format(step.as_str(), &output_schema);
        Ok(Self {
            response_format,
            step,
            kind: raw.kind,
            system: raw.system,
            prompt: raw.prompt,
            output_schema,
            model,
            temperature: raw.temperature,
            max_output_tokens,
            max_prompt_chars,
            semantic_field,
            semantic_threshold,
            semantic_min_confidence,
            semantic_max_wrong_rate,
            answer_match,
            route,
            daily_budget_usd,
            fallback_answer,
            output_choices: raw.output_choices.into_iter().filter(|(_, field)| !field.trim().is_empty()).collect(),
            contract,
            fingerprint,
        })
    }
}

/// `steps.NAME.audit_by` and `audit_fields`: a chat step's reply can only be compared by its
/// meaning; a structured step's by its fields (the default) or its meaning, and the fields
/// named must be properties of its reply.
fn answer_match(
    step: &str,
    kind: StepKind,
    by: Option<AuditBy>,
    fields: Vec<String>,
    schema: &Value,
) -> Result<AnswerMatch, SetupError> {
    let key = |field: &str| format!("steps.{step}.{field}");
    let by = by.unwrap_or(match kind {
        StepKind::Structured => AuditBy::Fields,
        StepKind::Chat => AuditBy::Meaning,
    });
    match by {
        AuditBy::Meaning if !fields.is_empty() => Err(SetupError::invalid(
            key("audit_fields"),
            "answers compared by meaning have no fields to compare: remove it, or set audit_by = \"fields\"",
        )),
        AuditBy::Meaning => Ok(AnswerMatch::Meaning),
        AuditBy::Fields if kind == StepKind::Chat => Err(SetupError::invalid(
            key("audit_by"),
            "a chat step's reply is free text, with no fields: use \"meaning\"",
        )),
        AuditBy::Fields => {
            let properties = schema.get("properties").and_then(Value::as_object);
            for field in &fields {
                if !properties.is_some_and(|properties| properties.contains_key(field)) {
                    let known =
                        properties.map(|p| p.keys().cloned().collect::<Vec<_>>().join(", ")).unwrap_or_default();
                    return Err(SetupError::invalid(
                        key("audit_fields"),
                        format!("`{field}` is not a property of the step's output_schema (it has: {known})"),
                    ));
                }
            }
            Ok(AnswerMatch::Fields(fields))
        }
    }
}

/// `steps.NAME.output_choices`: each a property of the reply's schema that may hold a string,
/// bound to a non-empty input field name (an empty one unbinds a default).
fn output_choices(
    step: &str,
    raw: &BTreeMap<String, String>,
    schema: &Value,
) -> Result<Vec<(String, String)>, SetupError> {
    let mut choices = Vec::new();
    for (property, field) in raw {
        let key = format!("steps.{step}.output_choices.{property}");
        if field.trim().is_empty() {
            continue;
        }
        let Some(declared) = schema.pointer(&format!("/properties/{property}")) else {
            return Err(SetupError::invalid(key, format!("the output schema has no property `{property}`")));
        };
        let takes_text = match declared.get("type") {
            None => true,
            Some(Value::String(kind)) => kind == "string",
            Some(Value::Array(kinds)) => kinds.iter().any(|kind| kind == "string"),
            Some(_) => false,
        };
        if !takes_text {
            return Err(SetupError::invalid(
                key,
                format!("`{property}` is not a string in the output schema: only a text answer is one of a list"),
            ));
        }
        choices.push((property.clone(), field.trim().to_owned()));
    }
    Ok(choices)
}
