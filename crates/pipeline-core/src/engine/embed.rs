//! The local embedding model as a service of its own (the gateway's `/v1/embeddings`): the
//! model the semantic cache already runs, so that no text leaves the machine for a vector.

use crate::{Engine, PipelineError};

/// Unit-length vectors of some texts, in their order.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// The model's name (its directory under the model home).
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model read, by its own tokenizer.
    pub input_tokens: u64,
}

impl Engine {
    /// The name the embedding model answers to, when the semantic cache has one loaded.
    pub fn embedding_model(&self) -> Option<String> {
        self.inner.semantic.as_ref()?;
        let directory = self.inner.config.semantic.model.model_dir.file_name()?;
        Some(directory.to_string_lossy().into_owned())
    }

    /// Embeds `texts` on the semantic cache's model, off the async workers.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Embeddings, PipelineError> {
        let (Some(cache), Some(model)) = (self.inner.semantic.clone(), self.embedding_model()) else {
            return Err(PipelineError::Unsupported {
                param: "model".into(),
                reason: "no embedding model is loaded: embeddings come from the semantic cache's model; set \
                         semantic.enabled = true"
                    .into(),
            });
        };
        let embedded = tokio::task::spawn_blocking(move || {
            let embedder = cache.embedder();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let vectors = embedder.embed(&refs)?;
            let mut input_tokens = 0;
            for text in &texts {
                input_tokens += embedder.count_tokens(text)? as u64;
            }
            Ok::<_, semantic_cache::CacheError>((vectors, input_tokens))
        })
        .await
        .map_err(|err| PipelineError::Embedding { reason: format!("the embedding task failed: {err}") })?;
        let (vectors, input_tokens) = embedded.map_err(|err| PipelineError::Embedding { reason: err.to_string() })?;
        Ok(Embeddings { model, vectors, input_tokens })
    }
}
