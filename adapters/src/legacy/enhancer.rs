//! Polished texts. Never fails: on any problem it hands the text back unchanged.

use super::{Endpoint, chat};

#[derive(Debug, Clone)]
pub struct Enhancer {
    endpoint: Endpoint,
}

impl Enhancer {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    pub async fn enhance(&self, text: String) -> String {
        match chat(&self.endpoint, "You improve texts.", &format!("Improve this text:\n{text}"), 800).await {
            Ok(better) if !better.trim().is_empty() => better.trim().to_owned(),
            _ => text,
        }
    }
}
