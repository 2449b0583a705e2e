//! Sorted support tickets: positional strings in, the label as a bare `String` out.

use super::{Endpoint, chat};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClassifierError {
    #[error("model unavailable: {0}")]
    Unavailable(String),
    #[error("model answered `{0}`, which is not one of the labels")]
    UnknownLabel(String),
}

#[derive(Debug, Clone)]
pub struct Classifier {
    endpoint: Endpoint,
}

impl Classifier {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    /// One of `labels`, as the model chose it.
    pub async fn classify(&self, text: &str, labels: &[&str]) -> Result<String, ClassifierError> {
        let prompt = format!("Labels: {}\nAnswer with the label only.\n\n{text}", labels.join(", "));
        let reply = chat(&self.endpoint, "You classify texts.", &prompt, 20)
            .await
            .map_err(|failure| ClassifierError::Unavailable(failure.message))?;
        let label = reply.trim().trim_matches('.').to_lowercase();
        if labels.iter().any(|known| known.eq_ignore_ascii_case(&label)) {
            Ok(label)
        } else {
            Err(ClassifierError::UnknownLabel(label))
        }
    }
}
