use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior};
use providers::{ChatMessage, Extras, Image, ResponseFormat, Role, Tool, ToolCall, ToolChoice};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::RawStep;
use crate::{CallContext, PipelineError, SetupError, StepKind, StepSpec};

/// The only `semantic_field` a chat step takes: its last user message is compared.
pub(crate) const CHAT_SEMANTIC_FIELD: &str = "messages";

/// The sampling of one call: the step's, or within the step's bounds, a chat caller's own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sampling {
    pub(crate) temperature: f32,
    pub(crate) max_output_tokens: u32,
}

/// What the model is sent for one call.
#[derive(Debug)]
pub(crate) struct Rendered {
    pub(crate) messages: Vec<ChatMessage>,
    pub(crate) sampling: Sampling,
    pub(crate) request: ChatOptions,
}

/// What a chat caller asks of the model besides its messages and sampling: tools, a reply
/// format, and OpenAI's other parameters. A structured step sets none of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ChatOptions {
    pub(crate) tools: Vec<Tool>,
    pub(crate) tool_choice: Option<ToolChoice>,
    pub(crate) parallel_tool_calls: Option<bool>,
    pub(crate) extras: Extras,
    /// The caller's reply format; `None`: the step's.
    #[serde(serialize_with = "format_in_key")]
    pub(crate) response_format: Option<ResponseFormat>,
}

/// A reply format as the cache key sees it.
fn format_in_key<S: serde::Serializer>(format: &Option<ResponseFormat>, serializer: S) -> Result<S::Ok, S::Error> {
    let keyed = format.as_ref().map(|format| match format {
        ResponseFormat::Text => serde_json::json!("text"),
        ResponseFormat::JsonObject => serde_json::json!("json_object"),
        ResponseFormat::JsonSchema { name, schema, strict } => {
            serde_json::json!({"name": name, "schema": schema, "strict": strict})
        }
    });
    keyed.serialize(serializer)
}

impl ChatOptions {
    /// A `json_schema` reply format with `strict`: the answer is checked against it.
    pub(crate) fn strict_schema(&self) -> Option<&Value> {
        match &self.response_format {
            Some(ResponseFormat::JsonSchema { schema, strict: true, .. }) => Some(schema),
            _ => None,
        }
    }
}

/// A chat step's input: the conversation as the caller has it, its sampling, and OpenAI's
/// other request parameters (see the README's API surface).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatInput {
    messages: Vec<ChatInputMessage>,
    temperature: Option<f32>,
    max_tokens: Option<u32>,
    #[serde(default)]
    tools: Vec<Tool>,
    tool_choice: Option<ToolChoice>,
    parallel_tool_calls: Option<bool>,
    response_format: Option<Value>,
    top_p: Option<f32>,
    #[serde(default)]
    stop: Vec<String>,
    seed: Option<i64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: BTreeMap<String, i8>,
    user: Option<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatInputMessage {
    role: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    images: Vec<Image>,
    #[serde(default)]
    tool_calls: Vec<ToolCall>,
    tool_call_id: Option<String>,
}

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

    /// The messages and sampling of one call.
    pub(crate) fn render(
        &self,
        spec: &StepSpec,
        input: &Value,
        context: &CallContext,
    ) -> Result<Rendered, PipelineError> {
        match spec.kind {
            StepKind::Structured => Ok(Rendered {
                messages: self.render_templates(spec, input, context)?,
                sampling: Sampling { temperature: spec.temperature, max_output_tokens: spec.max_output_tokens },
                request: ChatOptions::default(),
            }),
            StepKind::Chat => render_chat(spec, input),
        }
    }

    /// The system and user messages from the step's templates. The system message ends with
    /// the output contract, so that no template has to repeat the schema.
    fn render_templates(
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

/// A chat step sends the caller's conversation after the step's own system message, if it
/// has one; the caller may lower the output budget and choose the temperature.
fn render_chat(spec: &StepSpec, input: &Value) -> Result<Rendered, PipelineError> {
    let invalid = |reason: String| PipelineError::InvalidInput { step: spec.step.clone(), reason };
    let chat = ChatInput::deserialize(input).map_err(|err| {
        invalid(format!(
            "a chat step takes {{\"messages\": [{{\"role\", \"content\"}}], \"temperature\"?, \"max_tokens\"?, \
             \"tools\"?, ...}} (see the README's API surface): {err}"
        ))
    })?;
    if chat.messages.is_empty() {
        return Err(invalid("`messages` is empty: send at least one message".into()));
    }
    let mut messages = Vec::with_capacity(chat.messages.len() + 1);
    if !spec.system.trim().is_empty() {
        messages.push(ChatMessage::system(spec.system.trim()));
    }
    for (index, message) in chat.messages.into_iter().enumerate() {
        let role = match message.role.as_str() {
            // OpenAI's newer name for the system role.
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(invalid(format!(
                    "messages[{index}].role is `{other}`: use system, developer, user, assistant or tool"
                )));
            }
        };
        if role == Role::Tool && message.tool_call_id.is_none() {
            return Err(invalid(format!(
                "messages[{index}] is a tool result without `tool_call_id`: name the call it answers"
            )));
        }
        if !message.images.is_empty() && role != Role::User {
            return Err(invalid(format!("messages[{index}] has images: only user messages may")));
        }
        messages.push(ChatMessage {
            role,
            content: message.content,
            images: message.images,
            tool_calls: message.tool_calls,
            tool_call_id: message.tool_call_id,
        });
    }
    let temperature = chat.temperature.unwrap_or(spec.temperature);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(format!("temperature {temperature} is outside 0.0..=2.0")));
    }
    let max_output_tokens = match chat.max_tokens {
        Some(0) => return Err(invalid("max_tokens must be at least 1".into())),
        Some(asked) if asked > spec.max_output_tokens => {
            return Err(invalid(format!(
                "max_tokens {asked} is over the step's limit of {}: ask for less or raise `steps.{}.max_output_tokens`",
                spec.max_output_tokens, spec.step
            )));
        }
        Some(asked) => asked,
        None => spec.max_output_tokens,
    };
    let response_format = chat.response_format.as_ref().map(response_format).transpose().map_err(invalid)?;
    let request = ChatOptions {
        tools: chat.tools,
        tool_choice: chat.tool_choice,
        parallel_tool_calls: chat.parallel_tool_calls,
        extras: Extras {
            top_p: chat.top_p,
            stop: chat.stop,
            seed: chat.seed,
            presence_penalty: chat.presence_penalty,
            frequency_penalty: chat.frequency_penalty,
            logit_bias: chat.logit_bias,
            user: chat.user,
            metadata: chat.metadata,
        },
        response_format,
    };
    Ok(Rendered { messages, sampling: Sampling { temperature, max_output_tokens }, request })
}

/// OpenAI's `response_format` object.
fn response_format(format: &Value) -> Result<ResponseFormat, String> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let spec = format.get("json_schema").ok_or("response_format.json_schema is missing")?;
            let name = spec.get("name").and_then(Value::as_str).ok_or("response_format.json_schema.name is missing")?;
            let schema = spec.get("schema").cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
            if !schema.is_object() {
                return Err("response_format.json_schema.schema must be a JSON schema object".into());
            }
            let strict = spec.get("strict").and_then(Value::as_bool).unwrap_or(false);
            Ok(ResponseFormat::JsonSchema { name: name.to_owned(), schema, strict })
        }
        _ => Err("response_format.type must be text, json_object or json_schema".into()),
    }
}

/// The text the semantic cache compares for this call, and the rest of the input, which must
/// match exactly. `None` when the step or the call has no such text.
pub(crate) fn semantic_text(spec: &StepSpec, input: &Value) -> Option<(String, Value)> {
    let field = spec.semantic_field.as_deref()?;
    let mut rest = input.clone();
    match spec.kind {
        StepKind::Structured => {
            let text = input.get(field)?.as_str()?.to_owned();
            rest.as_object_mut()?.remove(field);
            Some((text, rest))
        }
        StepKind::Chat => {
            // A request with tools, or one that carries a tool's result, is an agent's step:
            // its answer depends on the tools and on results that similar wording does not
            // share, so only an identical request may be answered from the cache.
            if input.get("tools").and_then(Value::as_array).is_some_and(|tools| !tools.is_empty()) {
                return None;
            }
            // Only a conversation's opening question is matched by meaning: a later turn's
            // answer depends on the whole conversation, which a paraphrase does not share, so
            // only an identical conversation may answer it (and each would make a namespace of
            // its own, which memory would pay for and no hit would repay).
            let messages = rest.get_mut(CHAT_SEMANTIC_FIELD)?.as_array_mut()?;
            let (last, before) = messages.split_last_mut()?;
            if last["role"] != "user" || before.iter().any(|message| !is_instruction(message)) {
                return None;
            }
            let text = last.get_mut("content")?.take();
            // Who asks and the caller's own labels shape no answer: they must not split the
            // namespace either.
            if let Some(fields) = rest.as_object_mut() {
                fields.remove("user");
                fields.remove("metadata");
            }
            Some((text.as_str()?.to_owned(), rest))
        }
    }
}

/// A system (or developer) message: instructions, not a turn of the conversation.
fn is_instruction(message: &Value) -> bool {
    matches!(message["role"].as_str(), Some("system" | "developer"))
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
            .unwrap()
            .messages;
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
        let messages =
            config.prompts.render(spec, &json!({"text": "hello"}), &CallContext::new("ws", "c")).unwrap().messages;
        assert!(messages[1].content.contains("placeholder"), "{}", messages[1].content);
    }

    #[test]
    fn chat_messages_pass_through_with_the_callers_sampling() {
        let config = Config::from_toml("[steps.chat]\nsystem = 'Be brief.'").unwrap();
        let spec = config.step(&StepType::CHAT).unwrap();
        let input = json!({"messages": [{"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "Hi"}], "temperature": 0.2, "max_tokens": 50});
        let rendered = config.prompts.render(spec, &input, &CallContext::new("ws", "c")).unwrap();
        let roles: Vec<_> = rendered.messages.iter().map(|message| message.role).collect();
        assert_eq!(roles, [providers::Role::System, providers::Role::System, providers::Role::User]);
        assert_eq!(rendered.messages[0].content, "Be brief.");
        assert_eq!(rendered.messages[2].content, "Hi");
        assert_eq!(rendered.sampling.temperature, 0.2);
        assert_eq!(rendered.sampling.max_output_tokens, 50);
    }

    #[test]
    fn bad_chat_input_is_named() {
        let config = Config::defaults().unwrap();
        let spec = config.step(&StepType::CHAT).unwrap();
        let context = CallContext::new("ws", "c");
        for (input, expected) in [
            (json!({"messages": []}), "empty"),
            (json!({"messages": [{"role": "robot", "content": "x"}]}), "messages[0].role"),
            (json!({"messages": [{"role": "tool", "content": "x"}]}), "tool_call_id"),
            (json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1_000_000}), "max_output_tokens"),
            (json!({"messages": [{"role": "user", "content": "x"}], "top_k": 3}), "top_k"),
        ] {
            let err = config.prompts.render(spec, &input, &context).unwrap_err().to_string();
            assert!(err.contains(expected), "{input}: {err}");
        }
    }

    #[test]
    fn an_agents_step_is_not_matched_by_meaning() {
        let config = Config::from_toml("[steps.chat]\nsemantic_field = 'messages'").unwrap();
        let spec = config.step(&StepType::CHAT).unwrap();
        let with_tools = json!({"messages": [{"role": "user", "content": "weather in Oslo?"}],
            "tools": [{"name": "get_weather"}]});
        assert!(super::semantic_text(spec, &with_tools).is_none());
        let tool_result = json!({"messages": [{"role": "user", "content": "weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "get_weather", "arguments": "{}"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "3 degrees"}]});
        assert!(super::semantic_text(spec, &tool_result).is_none());
        let plain = json!({"messages": [{"role": "user", "content": "weather in Oslo?"}], "tools": []});
        assert!(super::semantic_text(spec, &plain).is_some());
    }

    #[test]
    fn a_chat_caller_sets_tools_format_and_parameters() {
        let config = Config::defaults().unwrap();
        let spec = config.step(&StepType::CHAT).unwrap();
        let input = json!({"messages": [{"role": "user", "content": "hi", "images": [{"url": "https://x/y.png"}]}],
            "tools": [{"name": "f", "parameters": {"type": "object"}}], "tool_choice": {"function": "f"},
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "strict": true,
                "schema": {"type": "object"}}},
            "top_p": 0.5, "stop": ["END"], "seed": 3, "logit_bias": {"50256": -100}, "user": "u1"});
        let rendered = config.prompts.render(spec, &input, &CallContext::new("ws", "c")).unwrap();
        assert_eq!(rendered.messages.last().unwrap().images[0].url, "https://x/y.png");
        let request = rendered.request;
        assert_eq!(request.tools[0].name, "f");
        assert_eq!(request.tool_choice, Some(providers::ToolChoice::Function("f".into())));
        assert!(request.strict_schema().is_some());
        assert_eq!((request.extras.top_p, request.extras.seed), (Some(0.5), Some(3)));
        assert_eq!(request.extras.logit_bias["50256"], -100);
        let bad_format = json!({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}});
        let err = config.prompts.render(spec, &bad_format, &CallContext::new("ws", "c")).unwrap_err();
        assert!(err.to_string().contains("response_format.type"), "{err}");
    }

    #[test]
    fn a_chat_step_compares_the_opening_question_only() {
        let config = Config::from_toml("[steps.chat]\nsemantic_field = 'messages'").unwrap();
        let spec = config.step(&StepType::CHAT).unwrap();
        let opening = json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"}], "user": "u-17", "metadata": {"ticket": "42"}});
        let (text, rest) = super::semantic_text(spec, &opening).unwrap();
        assert_eq!(text, "first");
        assert_eq!(rest["messages"][0]["content"], "Be brief.");
        assert!(rest["messages"][1]["content"].is_null());
        assert!(rest.get("user").is_none() && rest.get("metadata").is_none(), "{rest}");
        // A later turn depends on the conversation: exact matches only.
        let later = json!({"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "second"}]});
        assert!(super::semantic_text(spec, &later).is_none());
    }
}
