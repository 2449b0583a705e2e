//! The local embedding model as a service of its own (the gateway's `/v1/embeddings`): the
//! model the semantic cache already runs, so that no text leaves the machine for a vector.
//! Each request is held to its workspace's limits, as a call is, and leaves one row.

use std::time::Duration;

use resilience::{Deadline, Outcome};
use telemetry::{CallRecord, CallStatus, Source};
use tokio::time::Instant;

use super::upstream::CHARS_PER_TOKEN;
use crate::{CallContext, Engine, PipelineError, StepType};

/// The step word of an embeddings request's row and metrics: a fixed name, no caller's.
pub const EMBEDDINGS_STEP: &str = "embeddings";

/// The provider word of the local model's rows and guard key.
const LOCAL_PROVIDER: &str = "local";

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

    /// Embeds `texts` on the semantic cache's model, off the async workers, for `context`'s
    /// workspace: its request and token limits apply (the tokens estimated from the texts'
    /// length, settled with the model's count), and the request leaves one row.
    pub async fn embed(&self, texts: Vec<String>, context: &CallContext) -> Result<Embeddings, PipelineError> {
        let started = Instant::now();
        let at = self.inner.clock.now();
        let model = self.embedding_model();
        let outcome = self.embed_within_limits(texts, context, model.as_deref()).await;
        let latency = started.elapsed();
        self.record_embeddings(context, model.as_deref(), at, latency, &outcome);
        outcome
    }

    async fn embed_within_limits(
        &self,
        texts: Vec<String>,
        context: &CallContext,
        model: Option<&str>,
    ) -> Result<Embeddings, PipelineError> {
        let (Some(cache), Some(model)) = (self.inner.semantic.clone(), model) else {
            return Err(PipelineError::Unsupported {
                param: "model".into(),
                reason: "no embedding model is loaded: embeddings come from the semantic cache's model; set \
                         semantic.enabled = true"
                    .into(),
            });
        };
        let step =
            StepType::new(EMBEDDINGS_STEP).map_err(|err| PipelineError::InvalidOptions { reason: err.to_string() })?;
        let chars: usize = texts.iter().map(|text| text.chars().count()).sum();
        let estimated_tokens = chars.div_ceil(CHARS_PER_TOKEN) as u64;
        let deadline = Deadline::after(self.inner.config.engine.default_deadline);
        let key = format!("{LOCAL_PROVIDER}/{model}");
        let admission = self
            .inner
            .guards
            .admit(&context.workspace, &key, estimated_tokens, &deadline)
            .await
            .map_err(|refused| PipelineError::Refused { step, attempts: 0, source: refused.refusal })?;
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
        .map_err(|err| PipelineError::Embedding { reason: format!("the embedding task failed: {err}") })
        .and_then(|embedded| embedded.map_err(|err| PipelineError::Embedding { reason: err.to_string() }));
        // A local model's failure is no upstream's: it opens no breaker.
        let used = embedded.as_ref().ok().map(|(_, tokens)| *tokens);
        let _ = admission.finish(if used.is_some() { Outcome::Success } else { Outcome::NotCounted }, used);
        let (vectors, input_tokens) = embedded?;
        Ok(Embeddings { model: model.to_owned(), vectors, input_tokens })
    }

    fn record_embeddings(
        &self,
        context: &CallContext,
        model: Option<&str>,
        at: std::time::SystemTime,
        latency: Duration,
        outcome: &Result<Embeddings, PipelineError>,
    ) {
        let (status, error_class, error_message) = match outcome {
            Ok(_) => (CallStatus::Ok, None, None),
            Err(err) => (CallStatus::Error, Some(err.class()), Some(super::record::error_text(err))),
        };
        self.inner.recorder.record(CallRecord {
            model: model.unwrap_or_default().to_owned(),
            provider: LOCAL_PROVIDER.to_owned(),
            input_tokens: outcome.as_ref().map_or(0, |embedded| embedded.input_tokens as i64),
            latency_ms: latency.as_secs_f64() * 1000.0,
            source: if outcome.is_ok() { Source::Upstream } else { Source::None },
            confidence: if outcome.is_ok() { 1.0 } else { 0.0 },
            status,
            error_class,
            error_message,
            attempts: i64::from(outcome.is_ok()),
            ..super::record::bare_record(EMBEDDINGS_STEP.to_owned(), context, at)
        });
    }
}
