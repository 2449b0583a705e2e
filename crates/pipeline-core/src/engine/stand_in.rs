//! When no model could answer: a cached answer to a similar request, then the step's
//! rule-based answer. A stand-in is never cached and never labelled as an upstream answer.

use std::time::SystemTime;

use super::Engine;
use super::cache::SemanticRequest;
use super::served::Served;
use crate::{PipelineError, StepSpec};

impl Engine {
    pub(super) fn stand_in(
        &self,
        spec: &StepSpec,
        similar: Option<&SemanticRequest>,
        cause: &PipelineError,
        at: SystemTime,
    ) -> Option<Served> {
        let settings = &self.inner.config.fallback;
        let cause = cause.class();
        if let (Some(cache), Some(similar)) = (&self.inner.semantic, similar)
            && let Some(hit) =
                cache.find_similar(&similar.namespace, &similar.query, settings.similar_min_similarity, at)
        {
            tracing::info!(similarity = hit.similarity, matched = %hit.matched_text, "similar answer stands in");
            return Some(Served::similar_stand_in(hit, settings.similar_confidence, cause));
        }
        let output = spec.fallback_answer.clone()?;
        Some(Served::rule_stand_in(output, settings.rule_confidence, cause))
    }
}
