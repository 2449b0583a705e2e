//! Checked content against rules. Synchronous, and retried by hand.

use std::time::Duration;

use super::{Endpoint, chat_blocking};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub valid: bool,
    pub issues: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("validation service unavailable after retries: {0}")]
    Unavailable(String),
    #[error("validation reply not understood: {0}")]
    BadReply(String),
}

#[derive(Debug, Clone)]
pub struct ContentValidator {
    endpoint: Endpoint,
}

impl ContentValidator {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    /// Blocking: call it from a plain thread.
    pub fn validate(&self, text: &str, rules: &[&str]) -> Result<Verdict, ValidationError> {
        let prompt = format!(
            "Rules:\n{}\nText:\n{text}\nReply VALID, or INVALID: issue; issue",
            rules.iter().map(|rule| format!("- {rule}")).collect::<Vec<_>>().join("\n")
        );
        let mut last = String::new();
        for _ in 0..2 {
            match chat_blocking(&self.endpoint, "You validate content.", &prompt, 200) {
                Ok(reply) => return parse(&reply),
                Err(failure) => last = failure.message,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(ValidationError::Unavailable(last))
    }
}

fn parse(reply: &str) -> Result<Verdict, ValidationError> {
    let reply = reply.trim();
    if reply.eq_ignore_ascii_case("valid") {
        return Ok(Verdict { valid: true, issues: Vec::new() });
    }
    let issues = reply
        .strip_prefix("INVALID:")
        .ok_or_else(|| ValidationError::BadReply(reply.to_owned()))?
        .split(';')
        .map(str::trim)
        .filter(|issue| !issue.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Verdict { valid: false, issues })
}
