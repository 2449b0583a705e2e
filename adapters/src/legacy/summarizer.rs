//! Summaries: errors are plain strings.

use super::{Endpoint, chat};

#[derive(Debug, Clone)]
pub struct Summarizer {
    endpoint: Endpoint,
}

impl Summarizer {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    pub async fn summarize(&self, text: &str, max_words: usize) -> Result<String, String> {
        let prompt = format!("Summarise in at most {max_words} words:\n{text}");
        let summary = chat(&self.endpoint, "You summarise.", &prompt, 400)
            .await
            .map_err(|failure| format!("summarizer failed: {}", failure.message))?;
        Ok(summary.trim().to_owned())
    }
}
