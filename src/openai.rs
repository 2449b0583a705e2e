//! OpenAI's chat completion request, as `aipipe serve` receives it and as gateways log it, and
//! its translation into an engine call's input.

use pipeline_core::StepType;
use serde::Deserialize;
use serde_json::{Value, json};

/// Request fields that do not change the answer: accepted, not forwarded.
const IGNORED_FIELDS: [&str; 3] = ["user", "metadata", "store"];

/// The part of OpenAI's chat completion request the engine understands. Anything else that
/// would change the answer (tools, `n`, `top_p`, ...) is refused by name rather than dropped.
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
}

impl CompletionRequest {
    /// The first field that would change the answer but that the engine cannot honour.
    pub fn unsupported_field(&self) -> Option<Unsupported> {
        let field = self.other.keys().find(|field| !IGNORED_FIELDS.contains(&field.as_str()))?;
        Some(Unsupported::new(
            Some(field),
            format!("`{field}` is not supported by aipipe: leave it out of the request"),
        ))
    }

    /// A chat step's input: the messages with their text, and the caller's sampling.
    pub fn chat_input(&self) -> Result<Value, Unsupported> {
        let mut messages = Vec::with_capacity(self.messages.len());
        for (index, message) in self.messages.iter().enumerate() {
            messages.push(json!({"role": message.role, "content": message.text(index)?}));
        }
        let mut input = json!({"messages": messages});
        if let Some(temperature) = self.temperature {
            input["temperature"] = json!(temperature);
        }
        if let Some(max_tokens) = self.max_completion_tokens.or(self.max_tokens) {
            input["max_tokens"] = json!(max_tokens);
        }
        Ok(input)
    }

    /// A structured step's input: the JSON object in the last user message. The step's
    /// templates make the prompt, so the other messages and the sampling have no say.
    pub fn structured_input(&self, step: &StepType) -> Result<Value, Unsupported> {
        let (index, message) = self
            .messages
            .iter()
            .enumerate()
            .rev()
            .find(|(_, message)| message.role == "user")
            .ok_or_else(|| Unsupported::new(Some("messages"), format!("the `{step}` step needs a user message")))?;
        match serde_json::from_str::<Value>(&message.text(index)?) {
            Ok(input @ Value::Object(_)) => Ok(input),
            _ => Err(Unsupported::new(
                Some("messages"),
                format!(
                    "the `{step}` step takes its input as a JSON object in the last user message (messages[{index}])"
                ),
            )),
        }
    }
}

impl RequestMessage {
    /// The message's text; content parts other than text are refused.
    fn text(&self, index: usize) -> Result<String, Unsupported> {
        match &self.content {
            Some(MessageContent::Text(text)) => Ok(text.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (part_index, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(part_text)) => text.push_str(part_text),
                        (kind, _) => {
                            return Err(Unsupported::new(
                                Some("messages"),
                                format!(
                                    "messages[{index}].content[{part_index}] is of type `{kind}`: only text is supported"
                                ),
                            ));
                        }
                    }
                }
                Ok(text)
            }
            None => Err(Unsupported::new(
                Some("messages"),
                format!("messages[{index}] has no content: tool calls are not supported by aipipe"),
            )),
        }
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
            json!({"messages": [{"role": "user", "content": "Hi there"}], "temperature": 0.5, "max_tokens": 20})
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_named() {
        let tools = request(json!({"messages": [], "tools": [], "user": "u"}));
        assert_eq!(tools.unsupported_field().unwrap().param.as_deref(), Some("tools"));
        let image = request(json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}));
        assert!(image.chat_input().unwrap_err().message.contains("messages[0].content[0]"));
        let tool_call = request(json!({"messages": [{"role": "assistant", "content": null}]}));
        assert!(tool_call.chat_input().unwrap_err().message.contains("tool calls"));
        let prose = request(json!({"messages": [{"role": "user", "content": "classify this"}]}));
        assert!(prose.structured_input(&StepType::CLASSIFIER).unwrap_err().message.contains("JSON object"));
    }
}
