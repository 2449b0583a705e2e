//! OpenAI's chat completion request, as `aipipe serve` receives it and as gateways log it, and
//! its translation into an engine call's input.

use std::collections::BTreeMap;

use pipeline_core::StepType;
use serde::Deserialize;
use serde_json::{Value, json};

/// Request fields that do not change the answer: accepted, not forwarded.
const IGNORED_FIELDS: [&str; 2] = ["store", "service_tier"];

/// OpenAI's chat completion request, as far as the engine honours it. Every other field that
/// would change the answer (`logprobs`, `audio`, `n` > 1, ...) is refused by name rather than
/// dropped; the README lists the surface parameter by parameter.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<RequestMessage>,
    pub temperature: Option<f32>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    pub top_p: Option<f32>,
    pub stop: Option<Value>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<BTreeMap<String, i64>>,
    pub user: Option<String>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub n: Option<u32>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    pub content: Option<MessageContent>,
    /// An assistant message's tool calls.
    pub tool_calls: Option<Vec<Value>>,
    /// A tool message: the call it answers.
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<Value>,
}

/// Why a request cannot become an engine call, and the request parameter at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub param: Option<String>,
    pub message: String,
}

impl Unsupported {
    fn new(param: Option<&str>, message: String) -> Self {
        Self { param: param.map(str::to_owned), message }
    }

    fn param(param: &str, message: impl Into<String>) -> Self {
        Self::new(Some(param), message.into())
    }
}

impl CompletionRequest {
    /// The first field that would change the answer but that the engine cannot honour.
    pub fn unsupported_field(&self) -> Option<Unsupported> {
        if self.n.is_some_and(|n| n != 1) {
            return Some(Unsupported::param("n", "`n` must be 1: aipipe answers with one choice"));
        }
        let field = self.other.keys().find(|field| !IGNORED_FIELDS.contains(&field.as_str()))?;
        Some(Unsupported::new(
            Some(field),
            format!("`{field}` is not supported by aipipe: leave it out of the request"),
        ))
    }

    /// Whether the request asks for anything only a chat step can honour.
    fn chat_only(&self) -> Option<&'static str> {
        if self.tools.as_ref().is_some_and(|tools| !tools.is_empty()) {
            return Some("tools");
        }
        if self.messages.iter().any(|message| message.tool_calls.is_some() || message.role == "tool") {
            return Some("messages");
        }
        None
    }

    /// A chat step's input: the messages (text parts joined, images, tool calls and tool
    /// results kept), the caller's sampling, tools, reply format and other parameters.
    pub fn chat_input(&self) -> Result<Value, Unsupported> {
        let mut messages = Vec::with_capacity(self.messages.len());
        for (index, message) in self.messages.iter().enumerate() {
            messages.push(message.chat_input(index)?);
        }
        let mut input = json!({"messages": messages});
        let mut set = |key: &str, value: Option<Value>| {
            if let Some(value) = value {
                input[key] = value;
            }
        };
        set("temperature", self.temperature.map(|t| json!(t)));
        set("max_tokens", self.max_completion_tokens.or(self.max_tokens).map(|t| json!(t)));
        if let Some(tools) = &self.tools {
            set("tools", Some(Value::Array(tools.iter().enumerate().map(tool).collect::<Result<_, _>>()?)));
        }
        set("tool_choice", self.tool_choice.as_ref().map(tool_choice).transpose()?);
        set("parallel_tool_calls", self.parallel_tool_calls.map(|parallel| json!(parallel)));
        set("response_format", self.response_format.clone());
        set("top_p", self.top_p.map(|p| json!(p)));
        set("stop", self.stop.as_ref().map(stop).transpose()?);
        set("seed", self.seed.map(|seed| json!(seed)));
        set("presence_penalty", self.presence_penalty.map(|p| json!(p)));
        set("frequency_penalty", self.frequency_penalty.map(|p| json!(p)));
        if let Some(bias) = &self.logit_bias {
            if let Some((token, value)) = bias.iter().find(|(_, value)| !(-100..=100).contains(*value)) {
                return Err(Unsupported::param(
                    "logit_bias",
                    format!("logit_bias[{token}] is {value}: use -100 to 100"),
                ));
            }
            set("logit_bias", Some(json!(bias)));
        }
        set("user", self.user.as_ref().map(|user| json!(user)));
        set("metadata", self.metadata.as_ref().map(|metadata| json!(metadata)));
        Ok(input)
    }

    /// A structured step's input: the JSON object in the last user message. The step's
    /// templates make the prompt, so the other messages and the sampling have no say.
    pub fn structured_input(&self, step: &StepType) -> Result<Value, Unsupported> {
        if let Some(param) = self.chat_only() {
            return Err(Unsupported::param(
                param,
                format!("the `{step}` step answers with its own output object: tools are for chat steps"),
            ));
        }
        let (index, message) = self
            .messages
            .iter()
            .enumerate()
            .rev()
            .find(|(_, message)| message.role == "user")
            .ok_or_else(|| Unsupported::param("messages", format!("the `{step}` step needs a user message")))?;
        match serde_json::from_str::<Value>(&message.text(index)?) {
            Ok(input @ Value::Object(_)) => Ok(input),
            _ => Err(Unsupported::param(
                "messages",
                format!(
                    "the `{step}` step takes its input as a JSON object in the last user message (messages[{index}])"
                ),
            )),
        }
    }
}

/// A tool, from OpenAI's `{"type": "function", "function": {...}}` to the engine's shape.
fn tool((index, spec): (usize, &Value)) -> Result<Value, Unsupported> {
    let function = match (spec.get("type").and_then(Value::as_str), spec.get("function")) {
        (Some("function"), Some(function)) => function,
        _ => {
            return Err(Unsupported::param(
                "tools",
                format!(
                    "tools[{index}] is not a function tool: only `{{\"type\": \"function\", \"function\": ...}}` is supported"
                ),
            ));
        }
    };
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .ok_or_else(|| Unsupported::param("tools", format!("tools[{index}].function.name is missing")))?;
    let mut tool = json!({"name": name});
    for field in ["description", "parameters", "strict"] {
        if let Some(value) = function.get(field).filter(|value| !value.is_null()) {
            tool[field] = value.clone();
        }
    }
    Ok(tool)
}

fn tool_choice(choice: &Value) -> Result<Value, Unsupported> {
    match choice {
        Value::String(mode) if ["none", "auto", "required"].contains(&mode.as_str()) => Ok(json!(mode)),
        Value::Object(_) if choice["type"] == "function" => match choice["function"]["name"].as_str() {
            Some(name) => Ok(json!({"function": name})),
            None => Err(Unsupported::param("tool_choice", "tool_choice.function.name is missing")),
        },
        _ => Err(Unsupported::param(
            "tool_choice",
            "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )),
    }
}

fn stop(stop: &Value) -> Result<Value, Unsupported> {
    match stop {
        Value::String(text) => Ok(json!([text])),
        Value::Array(items) if items.iter().all(Value::is_string) && items.len() <= 4 => Ok(stop.clone()),
        _ => Err(Unsupported::param("stop", "stop must be a string or up to 4 strings")),
    }
}

impl RequestMessage {
    /// The message in the engine's chat input shape.
    fn chat_input(&self, index: usize) -> Result<Value, Unsupported> {
        let mut message = json!({"role": self.role});
        let (text, images) = self.parts(index)?;
        message["content"] = json!(text);
        if !images.is_empty() {
            message["images"] = Value::Array(images);
        }
        if let Some(calls) = &self.tool_calls {
            let calls = calls
                .iter()
                .enumerate()
                .map(|(call_index, call)| {
                    let function = &call["function"];
                    match (call["id"].as_str(), function["name"].as_str()) {
                        (Some(id), Some(name)) => Ok(json!({
                            "id": id,
                            "name": name,
                            "arguments": function["arguments"].as_str().unwrap_or("{}"),
                        })),
                        _ => Err(Unsupported::param(
                            "messages",
                            format!("messages[{index}].tool_calls[{call_index}] needs an id and a function name"),
                        )),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            message["tool_calls"] = Value::Array(calls);
        }
        if let Some(id) = &self.tool_call_id {
            message["tool_call_id"] = json!(id);
        }
        if self.content.is_none() && self.tool_calls.is_none() {
            return Err(Unsupported::param("messages", format!("messages[{index}] has no content")));
        }
        Ok(message)
    }

    /// The text (text parts joined) and the image parts.
    fn parts(&self, index: usize) -> Result<(String, Vec<Value>), Unsupported> {
        match &self.content {
            None => Ok((String::new(), Vec::new())),
            Some(MessageContent::Text(text)) => Ok((text.clone(), Vec::new())),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                let mut images = Vec::new();
                for (part_index, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text, &part.image_url) {
                        ("text", Some(part_text), _) => text.push_str(part_text),
                        ("image_url", _, Some(image)) => {
                            let (url, detail) = match image {
                                Value::String(url) => (Some(url.as_str()), None),
                                _ => (image["url"].as_str(), image["detail"].as_str()),
                            };
                            let url = url.ok_or_else(|| {
                                Unsupported::param(
                                    "messages",
                                    format!("messages[{index}].content[{part_index}].image_url.url is missing"),
                                )
                            })?;
                            let mut image = json!({"url": url});
                            if let Some(detail) = detail {
                                image["detail"] = json!(detail);
                            }
                            images.push(image);
                        }
                        (kind, _, _) => {
                            return Err(Unsupported::param(
                                "messages",
                                format!(
                                    "messages[{index}].content[{part_index}] is of type `{kind}`: only text and \
                                     image_url parts are supported"
                                ),
                            ));
                        }
                    }
                }
                Ok((text, images))
            }
        }
    }

    /// The message's text; images are refused (a structured step reads text only).
    fn text(&self, index: usize) -> Result<String, Unsupported> {
        let (text, images) = self.parts(index)?;
        if !images.is_empty() {
            return Err(Unsupported::param(
                "messages",
                format!("messages[{index}] has an image: a structured step takes text only"),
            ));
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(body: Value) -> CompletionRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn chat_input_keeps_messages_and_sampling() {
        let request = request(json!({"model": "m", "max_completion_tokens": 20, "temperature": 0.5, "user": "u7",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]}));
        assert_eq!(request.unsupported_field(), None);
        assert_eq!(
            request.chat_input().unwrap(),
            json!({"messages": [{"role": "user", "content": "Hi there"}], "temperature": 0.5, "max_tokens": 20,
                "user": "u7"})
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_named() {
        let many = request(json!({"messages": [], "n": 2, "user": "u"}));
        assert_eq!(many.unsupported_field().unwrap().param.as_deref(), Some("n"));
        let logprobs = request(json!({"messages": [], "logprobs": true}));
        assert_eq!(logprobs.unsupported_field().unwrap().param.as_deref(), Some("logprobs"));
        let audio = request(json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}));
        assert!(audio.chat_input().unwrap_err().message.contains("messages[0].content[0]"));
        let prose = request(json!({"messages": [{"role": "user", "content": "classify this"}]}));
        assert!(prose.structured_input(&StepType::CLASSIFIER).unwrap_err().message.contains("JSON object"));
        let tools = request(json!({"messages": [{"role": "user", "content": "{}"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}));
        assert_eq!(tools.structured_input(&StepType::CLASSIFIER).unwrap_err().param.as_deref(), Some("tools"));
        let custom = request(json!({"messages": [], "tools": [{"type": "custom", "custom": {"name": "f"}}]}));
        assert_eq!(custom.chat_input().unwrap_err().param.as_deref(), Some("tools"));
    }

    #[test]
    fn tools_images_and_tool_results_become_the_engine_input() {
        let request = request(json!({"messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR", "detail": "low"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}],
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "lookup"}}, "stop": "END", "seed": 7}));
        let input = request.chat_input().unwrap();
        assert_eq!(input["messages"][0]["images"][0]["detail"], "low");
        assert_eq!(input["messages"][1]["tool_calls"][0]["name"], "lookup");
        assert_eq!(input["messages"][2]["tool_call_id"], "call_1");
        assert_eq!(input["tools"][0], json!({"name": "lookup", "parameters": {"type": "object"}}));
        assert_eq!(input["tool_choice"], json!({"function": "lookup"}));
        assert_eq!(input["stop"], json!(["END"]));
        assert_eq!(input["seed"], 7);
    }
}
