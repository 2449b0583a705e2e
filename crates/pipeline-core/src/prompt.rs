use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior};
use providers::ChatMessage;
use serde::Serialize;
use serde_json::Value;

use crate::config::{RawStep, SetupError};
use crate::{CallContext, PipelineError, StepSpec};

/// Every step's templates, compiled once at config load.
#[derive(Debug, Clone)]
pub(crate) struct Prompts {
    templates: Arc<Environment<'static>>,
}

#[derive(Serialize)]
struct TemplateContext<'a> {
    input: &'a Value,
    context: ContextView<'a>,
    step: &'a str,
}

#[derive(Serialize)]
struct ContextView<'a> {
    workspace: &'a str,
    component: &'a str,
    metadata: &'a BTreeMap<String, Value>,
}

impl Prompts {
    pub(crate) fn compile(steps: &BTreeMap<String, RawStep>) -> Result<Self, SetupError> {
        let mut templates = Environment::new();
        // Printing or iterating a missing input field is an error naming it, not an empty
        // string in the prompt; `{% if input.x %}` still works for optional fields.
        templates.set_undefined_behavior(UndefinedBehavior::SemiStrict);
        for (name, step) in steps {
            for (part, source) in [("system", &step.system), ("prompt", &step.prompt)] {
                templates
                    .add_template_owned(template_name(name, part), source.trim().to_owned())
                    .map_err(|err| SetupError::invalid(format!("steps.{name}.{part}"), describe(&err)))?;
            }
        }
        Ok(Self { templates: Arc::new(templates) })
    }

    /// The system and user messages for one call. The system message ends with the output
    /// contract, so that no template has to repeat the schema.
    pub(crate) fn render(
        &self,
        spec: &StepSpec,
        input: &Value,
        context: &CallContext,
    ) -> Result<Vec<ChatMessage>, PipelineError> {
        let name = spec.step.as_str();
        let view = TemplateContext {
            input,
            context: ContextView {
                workspace: &context.workspace,
                component: &context.component,
                metadata: &context.metadata,
            },
            step: name,
        };
        let render = |part: &str| -> Result<String, PipelineError> {
            self.templates
                .get_template(&template_name(name, part))
                .and_then(|template| template.render(minijinja::Value::from(Serde(&view))))
                .map_err(|err| PipelineError::InvalidInput { step: spec.step.clone(), reason: describe(&err) })
        };
        let system = format!(
            "{}\n\nReply with one JSON object, and nothing else, that satisfies this JSON schema:\n{}",
            render("system")?,
            spec.output_schema
        );
        Ok(vec![ChatMessage::system(system), ChatMessage::user(render("prompt")?)])
    }
}

fn template_name(step: &str, part: &str) -> String {
    format!("{step}.{part}")
}

/// minijinja's message plus where in the template it happened.
fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    if let Some(detail) = err.detail()
        && !text.contains(detail)
    {
        text = format!("{text}: {detail}");
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{CallContext, Config, PipelineError, StepType};

    #[test]
    fn renders_input_context_and_contract() {
        let config = Config::from_toml(
            "[steps.classifier]\nprompt = 'For {{ context.component }}: {{ input.text }} ({{ input.labels | join(\"/\") }})'",
        )
        .unwrap();
        let spec = config.step(&StepType::CLASSIFIER).unwrap();
        let context = CallContext::new("ws", "ticket-router");
        let messages = config
            .prompts
            .render(spec, &json!({"text": "refund please", "labels": ["billing", "bug"]}), &context)
            .unwrap();
        assert_eq!(messages[1].content, "For ticket-router: refund please (billing/bug)");
        assert!(messages[0].content.contains("\"label\""), "{}", messages[0].content);
    }

    #[test]
    fn a_missing_field_is_named() {
        let config = Config::defaults().unwrap();
        let spec = config.step(&StepType::CLASSIFIER).unwrap();
        let err = config.prompts.render(spec, &json!({"labels": ["a"]}), &CallContext::new("ws", "c")).unwrap_err();
        assert!(matches!(err, PipelineError::InvalidInput { .. }));
        assert!(err.to_string().contains("classifier.prompt"), "{err}");
    }

    #[test]
    fn optional_fields_may_be_absent() {
        let config = Config::defaults().unwrap();
        let spec = config.step(&StepType::VALIDATOR).unwrap();
        let messages = config.prompts.render(spec, &json!({"text": "hello"}), &CallContext::new("ws", "c")).unwrap();
        assert!(messages[1].content.contains("placeholder"), "{}", messages[1].content);
    }
}
