use std::borrow::Cow;
use std::sync::Arc;

use providers::ResponseFormat;
use serde_json::Value;

/// How many schema violations a message lists; the first few are enough to repair a reply.
const MAX_VIOLATIONS: usize = 5;

/// What a step's reply must be.
#[derive(Debug, Clone)]
pub(crate) enum ReplyContract {
    /// One JSON object valid against the step's schema, asked for in JSON mode.
    Json(OutputContract),
    /// Any text: a chat step passes the model's reply on as it is.
    Text,
}

impl ReplyContract {
    /// What to ask a provider for: the step's schema for a structured step (strict where it
    /// allows), free text for a chat step.
    pub(crate) fn response_format(&self, step: &str, schema: &Value) -> ResponseFormat {
        match self {
            Self::Json(_) => ResponseFormat::JsonSchema {
                name: step.to_owned(),
                schema: schema.clone(),
                strict: within_strict_subset(schema),
            },
            Self::Text => ResponseFormat::Text,
        }
    }

    /// The reply as the call's output, or what is wrong with it; `input` is the call's, whose
    /// lists bound the reply's choices (`Value::Null`: no call, as for a fallback answer).
    pub(crate) fn check(&self, reply: &str, input: &Value) -> Result<Value, String> {
        match self {
            Self::Json(contract) => {
                let mut output = contract.check(reply)?;
                contract.check_choices(input, &mut output)?;
                Ok(output)
            }
            Self::Text => Ok(Value::String(reply.to_owned())),
        }
    }

    /// The step's reply format for one call: its schema, each bound property an `enum` of the
    /// call's own list, so that a provider with structured outputs cannot answer outside it.
    pub(crate) fn response_format_for<'a>(&self, format: &'a ResponseFormat, input: &Value) -> Cow<'a, ResponseFormat> {
        let Self::Json(contract) = self else { return Cow::Borrowed(format) };
        let ResponseFormat::JsonSchema { name, schema, strict } = format else { return Cow::Borrowed(format) };
        let mut bound = schema.clone();
        let mut changed = false;
        for (property, field) in &contract.choices {
            let (Some(choices), Some(slot)) =
                (choices_in(input, field), bound.pointer_mut(&format!("/properties/{property}")))
            else {
                continue;
            };
            if let Some(slot) = slot.as_object_mut() {
                slot.insert("enum".into(), Value::from(choices));
                changed = true;
            }
        }
        if !changed {
            return Cow::Borrowed(format);
        }
        Cow::Owned(ResponseFormat::JsonSchema { name: name.clone(), schema: bound, strict: *strict })
    }
}

/// The strings of `input[field]`, if it is a list of them.
fn choices_in<'a>(input: &'a Value, field: &str) -> Option<Vec<&'a str>> {
    let items = input.get(field)?.as_array()?;
    let choices: Option<Vec<&str>> = items.iter().map(Value::as_str).collect();
    choices.filter(|choices| !choices.is_empty())
}

/// A step's output contract: the reply must be one JSON object valid against the schema, and
/// each bound property one of the values the call's input lists for it.
#[derive(Clone)]
pub(crate) struct OutputContract {
    validator: Arc<jsonschema::Validator>,
    /// Reply property -> the input field that lists its allowed values (a classifier's
    /// `label` is one of `input.labels`).
    choices: Vec<(String, String)>,
}

impl std::fmt::Debug for OutputContract {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputContract").finish_non_exhaustive()
    }
}

impl OutputContract {
    pub(crate) fn compile(schema: &Value) -> Result<Self, String> {
        // Replies are requested in JSON-object mode, so a schema for anything else could never
        // be met.
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err("the schema must describe an object (`\"type\": \"object\"`)".into());
        }
        let validator = jsonschema::validator_for(schema).map_err(|err| format!("not a valid JSON schema: {err}"))?;
        Ok(Self { validator: Arc::new(validator), choices: Vec::new() })
    }

    /// The same, each property in `choices` bound to the list an input field gives.
    pub(crate) fn with_choices(self, choices: Vec<(String, String)>) -> Self {
        Self { choices, ..self }
    }

    /// Each bound property of a valid reply is one of the input's values for it; a value that
    /// differs from one only in case or surrounding spaces is that value (`Billing` for
    /// `billing`). An input without the list binds nothing.
    fn check_choices(&self, input: &Value, output: &mut Value) -> Result<(), String> {
        for (property, field) in &self.choices {
            let Some(choices) = choices_in(input, field) else { continue };
            let Some(given) = output.get(property).and_then(Value::as_str) else { continue };
            if choices.contains(&given) {
                continue;
            }
            let Some(meant) = choices.iter().find(|choice| choice.trim().eq_ignore_ascii_case(given.trim())) else {
                return Err(format!(
                    "at /{property}: `{}` is not one of the given {field}: answer with exactly one of {}",
                    given.chars().take(80).collect::<String>(),
                    choices.iter().map(|choice| format!("`{choice}`")).collect::<Vec<_>>().join(", ")
                ));
            };
            output[property.as_str()] = Value::from(*meant);
        }
        Ok(())
    }

    /// The reply parsed and validated, or what is wrong with it, in words a model can act on.
    pub(crate) fn check(&self, reply: &str) -> Result<Value, String> {
        let value = extract_json(reply).map_err(|err| format!("the reply is not a JSON object ({err})"))?;
        let violations: Vec<String> = self
            .validator
            .iter_errors(&value)
            .take(MAX_VIOLATIONS)
            .map(|err| {
                let at = err.instance_path().to_string();
                if at.is_empty() { err.to_string() } else { format!("at {at}: {err}") }
            })
            .collect();
        if violations.is_empty() { Ok(value) } else { Err(violations.join("; ")) }
    }
}

/// Keywords OpenAI's strict structured outputs accept.
const STRICT_KEYWORDS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "anyOf",
    "description",
    "title",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "pattern",
    "format",
    "minItems",
    "maxItems",
    "$defs",
    "$ref",
];

/// Whether OpenAI can guarantee a reply valid against `schema` (`strict: true`): every object
/// lists all its properties as required and allows no others, and only keywords of its subset
/// are used. Outside it, the schema is still sent, without the guarantee.
pub(crate) fn within_strict_subset(schema: &Value) -> bool {
    let Some(map) = schema.as_object() else { return false };
    if map.keys().any(|keyword| !STRICT_KEYWORDS.contains(&keyword.as_str())) {
        return false;
    }
    let is_object = map.get("type").and_then(Value::as_str) == Some("object");
    let properties_ok = match map.get("properties").and_then(Value::as_object) {
        Some(properties) => {
            let required: Vec<&str> =
                map.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
            properties.keys().all(|name| required.contains(&name.as_str()))
                && map.get("additionalProperties") == Some(&Value::Bool(false))
                && properties.values().all(within_strict_subset)
        }
        // An object without properties is free-form, which the strict subset cannot say.
        None => !is_object,
    };
    let nested_ok = map.get("items").is_none_or(within_strict_subset)
        && map.get("anyOf").and_then(Value::as_array).is_none_or(|options| options.iter().all(within_strict_subset));
    properties_ok && nested_ok
}

/// Models often wrap JSON in a Markdown fence or a sentence even in JSON mode; the object
/// inside is still the answer, and it is validated like any other.
fn extract_json(reply: &str) -> Result<Value, serde_json::Error> {
    let trimmed = reply.trim();
    let direct = serde_json::from_str::<Value>(trimmed);
    if direct.is_ok() {
        return direct;
    }
    match (trimmed.find('{'), trimmed.rfind('}')) {
        (Some(start), Some(end)) if start < end => serde_json::from_str(&trimmed[start..=end]).or(direct),
        _ => direct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contract() -> OutputContract {
        OutputContract::compile(&json!({
            "type": "object",
            "required": ["label", "confidence"],
            "properties": {"label": {"type": "string"}, "confidence": {"type": "number", "maximum": 1}}
        }))
        .unwrap()
    }

    #[test]
    fn valid_replies_parse() {
        assert_eq!(contract().check(r#"{"label":"bug","confidence":0.9}"#).unwrap()["label"], "bug");
        let fenced = "Here you go:\n```json\n{\"label\": \"bug\", \"confidence\": 1}\n```";
        assert_eq!(contract().check(fenced).unwrap()["confidence"], 1);
    }

    #[test]
    fn violations_are_described() {
        let missing = contract().check(r#"{"label":"bug"}"#).unwrap_err();
        assert!(missing.contains("confidence"), "{missing}");
        let wrong = contract().check(r#"{"label":"bug","confidence":7}"#).unwrap_err();
        assert!(wrong.contains("/confidence"), "{wrong}");
        let prose = contract().check("I think it is a bug.").unwrap_err();
        assert!(prose.contains("not a JSON object"), "{prose}");
        let array = contract().check("[1, 2]").unwrap_err();
        assert!(array.contains("object"), "{array}");
    }

    #[test]
    fn text_replies_pass_as_they_are() {
        assert_eq!(ReplyContract::Text.check(" not JSON ", &Value::Null).unwrap(), json!(" not JSON "));
        assert_eq!(ReplyContract::Text.response_format("chat", &Value::Null), ResponseFormat::Text);
        assert!(ReplyContract::Json(contract()).check("prose", &Value::Null).is_err());
    }

    #[test]
    fn a_bound_property_is_one_of_the_inputs_values() {
        let bound = ReplyContract::Json(contract().with_choices(vec![("label".into(), "labels".into())]));
        let input = json!({"text": "I was charged twice", "labels": ["billing", "bug", "feature_request"]});
        assert_eq!(bound.check(r#"{"label":"billing","confidence":0.9}"#, &input).unwrap()["label"], "billing");
        assert_eq!(bound.check(r#"{"label":" Billing ","confidence":0.9}"#, &input).unwrap()["label"], "billing");
        let outside = bound.check(r#"{"label":"ok","confidence":1}"#, &input).unwrap_err();
        assert!(outside.contains("/label") && outside.contains("`feature_request`"), "{outside}");
        let listed = bound.check(r#"{"label":"Billing, bug, feature_request","confidence":1}"#, &input);
        assert!(listed.is_err());
        // Without the list in the input (a fallback answer checked at load), nothing is bound.
        assert!(bound.check(r#"{"label":"unclassified","confidence":0}"#, &Value::Null).is_ok());
        // The format asked of the provider names the call's labels.
        let format = bound
            .response_format("classifier", &json!({"type": "object", "properties": {"label": {"type": "string"}}}));
        let ResponseFormat::JsonSchema { schema, .. } = bound.response_format_for(&format, &input).into_owned() else {
            panic!("a schema")
        };
        assert_eq!(schema["properties"]["label"]["enum"], json!(["billing", "bug", "feature_request"]));
    }

    #[test]
    fn the_strict_subset() {
        let strict = json!({"type": "object", "required": ["a", "b"], "additionalProperties": false, "properties": {
            "a": {"type": "string", "pattern": "^x$"},
            "b": {"type": "array", "items": {"type": "number", "minimum": 0}}}});
        assert!(within_strict_subset(&strict));
        let optional = json!({"type": "object", "required": ["a"], "additionalProperties": false, "properties": {
            "a": {"type": "string"}, "b": {"type": "string"}}});
        assert!(!within_strict_subset(&optional), "b is not required");
        let open = json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}});
        assert!(!within_strict_subset(&open), "additional properties allowed");
        let keyword = json!({"type": "object", "required": ["a"], "additionalProperties": false, "properties": {
            "a": {"type": "string", "minLength": 1}}});
        assert!(!within_strict_subset(&keyword), "minLength is not in the subset");
        let free_form = json!({"type": "object", "required": ["f"], "additionalProperties": false, "properties": {
            "f": {"type": "object"}}});
        assert!(!within_strict_subset(&free_form));
    }

    #[test]
    fn only_object_schemas() {
        assert!(OutputContract::compile(&json!({"type": "string"})).is_err());
        assert!(OutputContract::compile(&json!({"type": "object", "properties": {"a": {"type": "nope"}}})).is_err());
    }
}
