//! Fields from free text. Synchronous; `None` for any failure.

use std::collections::BTreeMap;

use super::{Endpoint, chat_blocking};

#[derive(Debug, Clone)]
pub struct FieldExtractor {
    endpoint: Endpoint,
}

impl FieldExtractor {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    /// Each asked field, with its value or `None` if the text does not say. Blocking.
    pub fn extract(&self, text: &str, fields: &[&str]) -> Option<BTreeMap<String, Option<String>>> {
        let prompt = format!("Fields: {}\nText: {text}\nReply as JSON: field -> value or null.", fields.join(", "));
        let reply = chat_blocking(&self.endpoint, "You extract fields.", &prompt, 300).ok()?;
        let values: BTreeMap<String, Option<String>> = serde_json::from_str(reply.trim()).ok()?;
        Some(fields.iter().map(|field| (field.to_string(), values.get(*field).cloned().flatten())).collect())
    }
}
