use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the model stopped writing, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A natural end (also what a reply without a reason counts as).
    #[default]
    Stop,
    /// Cut off at the request's `max_tokens`.
    Length,
    /// Cut by the provider's content filter, or the model refused.
    ContentFilter,
    /// The model asked to call tools.
    ToolCalls,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
            Self::ToolCalls => "tool_calls",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    #[default]
    User,
    Assistant,
    /// A tool's result, answering one of the assistant's tool calls.
    Tool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// The text; a message made of parts has its text parts joined.
    pub content: String,
    /// Images sent with the text (a user message's `image_url` parts), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Image>,
    /// The tool calls an assistant message made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Which tool call a tool message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), ..Self::default() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// An image part of a message: a URL, or the image itself as a `data:` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub url: String,
    /// OpenAI's `detail` (`low`, `high`, `auto`), where the caller gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Whether and which tool the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    /// This function, by name.
    Function(String),
}

/// One tool call of a reply: the function and its arguments, as the JSON text the model wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Sampling and bookkeeping parameters a caller may set beyond the temperature and output
/// budget. Each is sent only when set, and only to a provider that can honour it
/// ([`Capabilities::refuses`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Extras {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f32>,
    /// Token id (as text) to bias, -100..=100.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub logit_bias: std::collections::BTreeMap<String, i8>,
    /// The end user, for the provider's abuse detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// What a provider's API can be asked for. OpenAI-compatible servers differ (vLLM, Ollama and
/// llama.cpp's server each lack something), so each provider's config says what its server
/// does; the engine asks only for that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `response_format: json_schema`: decoding held to the step's schema.
    pub structured_outputs: bool,
    /// `response_format: json_object`.
    pub json_mode: bool,
    /// Tool (function) calls.
    pub tools: bool,
    /// A streamed reply ends with its usage (`stream_options.include_usage`).
    pub stream_usage: bool,
    /// Image parts in user messages.
    pub images: bool,
    /// `seed`, `presence_penalty`, `frequency_penalty` and `logit_bias`: OpenAI's sampling
    /// controls beyond temperature and `top_p`, which not every API has.
    pub sampling_controls: bool,
}

impl Capabilities {
    /// OpenAI's own API.
    pub const OPENAI: Self = Self {
        structured_outputs: true,
        json_mode: true,
        tools: true,
        stream_usage: true,
        images: true,
        sampling_controls: true,
    };
    /// Anthropic's Messages API: tools, images and streamed usage; no JSON mode (the prompt
    /// asks), no seed, penalties or logit bias.
    pub const ANTHROPIC: Self = Self {
        structured_outputs: false,
        json_mode: false,
        tools: true,
        stream_usage: true,
        images: true,
        sampling_controls: false,
    };

    /// The first request parameter this provider cannot honour, by its OpenAI name.
    pub fn refuses(&self, request: &ChatRequest) -> Option<&'static str> {
        let extras = &request.extras;
        if !self.tools && (!request.tools.is_empty() || request.messages.iter().any(|m| !m.tool_calls.is_empty())) {
            return Some("tools");
        }
        if !self.images && request.messages.iter().any(|message| !message.images.is_empty()) {
            return Some("messages");
        }
        if !self.sampling_controls {
            let asked = [
                ("seed", extras.seed.is_some()),
                ("presence_penalty", extras.presence_penalty.is_some()),
                ("frequency_penalty", extras.frequency_penalty.is_some()),
                ("logit_bias", !extras.logit_bias.is_empty()),
            ];
            if let Some((name, _)) = asked.into_iter().find(|(_, asked)| *asked) {
                return Some(name);
            }
        }
        None
    }

    /// How a reply in `format` can be asked of this provider: the schema where it takes
    /// structured outputs, else JSON mode where it has it, else by the prompt alone.
    pub fn format_for(&self, format: &ResponseFormat) -> ResponseFormat {
        match format {
            ResponseFormat::JsonSchema { .. } if self.structured_outputs => format.clone(),
            ResponseFormat::JsonSchema { .. } | ResponseFormat::JsonObject if self.json_mode => {
                ResponseFormat::JsonObject
            }
            ResponseFormat::JsonSchema { .. } | ResponseFormat::JsonObject | ResponseFormat::Text => {
                ResponseFormat::Text
            }
        }
    }
}

/// The shape a reply must have.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object (OpenAI's `json_object` mode).
    JsonObject,
    /// A JSON object valid against `schema` (OpenAI's structured outputs; llama.cpp's server
    /// and vLLM constrain decoding to it). `strict` asks OpenAI to guarantee it, which it can
    /// only for schemas within its strict subset.
    JsonSchema { name: String, schema: serde_json::Value, strict: bool },
}

/// One chat completion, as the engine asks for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_output_tokens: Option<u32>,
    pub response_format: ResponseFormat,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub parallel_tool_calls: Option<bool>,
    pub extras: Extras,
    /// The caller's trace id. Sent upstream as `x-request-id`, and the key under which the
    /// recorded provider finds its answer.
    pub trace_id: String,
    /// Where the reply goes as it is written, for a caller that streams: the provider then
    /// streams from the upstream and forwards each piece as it arrives. The whole reply is
    /// still the call's response.
    pub stream: Option<crate::StreamSink>,
}

/// Tokens a reply took. `input_tokens` counts every prompt token, those read from or written
/// to the provider's prompt cache included; those are also counted apart, because they are
/// priced apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Of `input_tokens`, read from the prompt cache (OpenAI's `cached_tokens`, Anthropic's
    /// `cache_read_input_tokens`).
    #[serde(default)]
    pub cached_input_tokens: u32,
    /// Of `input_tokens`, written to the prompt cache (Anthropic's `cache_creation_input_tokens`).
    #[serde(default)]
    pub cache_write_tokens: u32,
}

impl Usage {
    pub fn new(input_tokens: u32, output_tokens: u32) -> Self {
        Self { input_tokens, output_tokens, ..Self::default() }
    }

    /// Input tokens priced at the plain input price.
    pub fn uncached_input_tokens(&self) -> u32 {
        self.input_tokens.saturating_sub(self.cached_input_tokens).saturating_sub(self.cache_write_tokens)
    }

    /// Both replies' tokens together.
    #[must_use]
    pub fn plus(self, other: Self) -> Self {
        Self {
            input_tokens: self.input_tokens.saturating_add(other.input_tokens),
            output_tokens: self.output_tokens.saturating_add(other.output_tokens),
            cached_input_tokens: self.cached_input_tokens.saturating_add(other.cached_input_tokens),
            cache_write_tokens: self.cache_write_tokens.saturating_add(other.cache_write_tokens),
        }
    }
}

/// What an upstream said about one of its rate limits in a response's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitWindow {
    /// How many it allows per minute.
    pub limit: u64,
    /// How many are left now.
    pub remaining: u64,
}

/// The rate limits an upstream declared in a response, where it did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeclaredLimits {
    pub requests: Option<LimitWindow>,
    pub tokens: Option<LimitWindow>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    /// The tools the model called, in order.
    pub tool_calls: Vec<ToolCall>,
    /// The model that answered, as the provider reports it (may be a dated variant).
    pub model: String,
    pub provider: String,
    pub usage: Usage,
    pub finish_reason: FinishReason,
    /// How long the upstream took. Measured for live providers; as logged for the recorded one,
    /// which answers at once but must report the latency the call really had.
    pub latency: Duration,
    /// The rate limits the upstream declared in its headers, if it did.
    pub declared_limits: Option<DeclaredLimits>,
    /// For a streamed reply: from sending the request to the first piece of content or of a
    /// tool call.
    pub time_to_first_token: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_names_the_first_parameter_it_cannot_honour() {
        let mut request = ChatRequest { messages: vec![ChatMessage::user("hi")], ..ChatRequest::default() };
        assert_eq!(Capabilities::ANTHROPIC.refuses(&request), None);
        request.extras.top_p = Some(0.9);
        assert_eq!(Capabilities::ANTHROPIC.refuses(&request), None, "Anthropic takes top_p");
        request.extras.seed = Some(7);
        assert_eq!(Capabilities::ANTHROPIC.refuses(&request), Some("seed"));
        assert_eq!(Capabilities::OPENAI.refuses(&request), None);
        request.messages[0].images.push(Image { url: "https://x/y.png".into(), detail: None });
        let text_only = Capabilities { images: false, ..Capabilities::OPENAI };
        assert_eq!(text_only.refuses(&request), Some("messages"));
    }
}
