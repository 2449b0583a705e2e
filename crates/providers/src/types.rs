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
    /// Cut by the provider's content filter.
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ContentFilter => "content_filter",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self { role: Role::System, content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: Role::User, content: content.into() }
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self { role: Role::Assistant, content: content.into() }
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
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: Option<f32>,
    pub max_output_tokens: Option<u32>,
    pub response_format: ResponseFormat,
    /// The caller's trace id. Sent upstream as `x-request-id`, and the key under which the
    /// recorded provider finds its answer.
    pub trace_id: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
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

#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    pub content: String,
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
}
