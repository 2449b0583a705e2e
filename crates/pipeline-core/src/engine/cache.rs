//! The cache stages: the exact cache (identical calls) and the semantic cache (calls that
//! mean the same), looked up before the upstream and filled after it.

use std::time::SystemTime;

use providers::{ChatMessage, FinishReason, Role, ToolCall, Usage};
use semantic_cache::{CacheKey, ExactCache, Lookup, Query, ServeBar};
use serde_json::Value;

use super::served::{Served, Spend};
use super::spans::{Stage, staged};
use super::{Call, Engine};
use crate::prompt::{ChatOptions, Sampling, semantic_text};
use crate::{CachePolicy, CallContext, StepSpec, StepType};

/// What the cache keeps of an answer: enough to serve it again and to know what it saved.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct CachedAnswer {
    pub(super) output: Value,
    pub(super) model: String,
    pub(super) provider: String,
    pub(super) cost_usd: f64,
    /// Input plus output tokens the answer took (0 in snapshots from before it was kept).
    #[serde(default)]
    pub(super) tokens: u64,
    #[serde(default)]
    pub(super) finish_reason: FinishReason,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) tool_calls: Vec<ToolCall>,
    /// The answer's tokens as its model counted them (`None` in entries from before they were
    /// kept): what a caller served from the cache is told the answer took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Usage>,
}

/// A call's request as the semantic cache sees it.
pub(super) struct SemanticRequest {
    pub(super) namespace: String,
    pub(super) query: Query,
    pub(super) bar: ServeBar,
}

impl Engine {
    pub(super) async fn exact_lookup(&self, key: &CacheKey, policy: CachePolicy, at: SystemTime) -> Option<Served> {
        let cache = self.inner.cache.as_ref()?;
        let max_age = policy.readable_age()?;
        let young_enough = |stored_at: SystemTime| {
            max_age.is_none_or(|max_age| at.duration_since(stored_at).unwrap_or_default() <= max_age)
        };
        {
            let _stage = Stage::open("cache.lookup");
            if let Some(entry) = cache.get(key, at) {
                return young_enough(entry.stored_at).then(|| Served::exact_hit(entry.value.clone()));
            }
        }
        // Another replica may have stored it; its answer warms this replica's cache.
        let shared = self.inner.shared.as_ref()?;
        let (answer, stored_at) = staged("cache.shared_lookup", shared.answer(key)).await?;
        cache.insert(*key, answer.clone(), stored_at);
        young_enough(stored_at).then(|| Served::exact_hit(answer))
    }

    /// The semantic side of a call: the step's free-text field, embedded, in a namespace made
    /// of everything else that must match exactly. `None` when the step or call has no such
    /// field, or embedding fails (logged: the call then goes on without the semantic cache).
    pub(super) async fn semantic_request(
        &self,
        spec: &StepSpec,
        model: &str,
        call: &Call<'_>,
    ) -> Option<SemanticRequest> {
        let cache = self.inner.semantic.as_ref()?;
        if !call.options.cache.writes() {
            return None;
        }
        let (text, rest) = self.semantic_text(spec, call.input)?;
        let namespace = CacheKey::builder()
            .text("workspace", &call.context.workspace)
            .text("step", spec.step.as_str())
            .text("contract", &spec.fingerprint)
            .text("model", model)
            .json("other_fields", &rest)
            .build()
            .to_string();
        let bar = self.serve_bar(spec, &call.context.workspace);
        if let Some(query) = cache.prepare_remembered(&text) {
            return Some(SemanticRequest { namespace, query, bar });
        }
        let cache = cache.clone();
        // Embedding is a few milliseconds of CPU: off the async workers.
        let prepared = staged("cache.embed", tokio::task::spawn_blocking(move || cache.prepare(&text)))
            .await
            .map_err(|err| err.to_string())
            .and_then(|prepared| prepared.map_err(|err| err.to_string()));
        match prepared {
            Ok(query) => Some(SemanticRequest { namespace, query, bar }),
            Err(error) => {
                tracing::warn!(%error, "semantic cache skipped for this call");
                None
            }
        }
    }

    /// The served hit, or, on a miss, the nearest candidate that only the cut stopped (which
    /// the model's answer will label).
    pub(super) fn semantic_lookup(
        &self,
        similar: &SemanticRequest,
        policy: CachePolicy,
        at: SystemTime,
    ) -> Lookup<CachedAnswer> {
        let (Some(cache), Some(max_age)) = (self.inner.semantic.as_ref(), policy.readable_age()) else {
            return Lookup::Miss { best: None, nearest: None };
        };
        let _stage = Stage::open("cache.semantic");
        let found = cache.lookup(&similar.namespace, &similar.query, Some(similar.bar), max_age, at);
        match &found {
            Lookup::Hit(hit) => tracing::debug!(
                similarity = hit.similarity,
                confidence = hit.confidence,
                matched = %hit.matched_text,
                "semantic hit"
            ),
            Lookup::Miss { best: Some((similarity, rejection)), .. } => {
                tracing::debug!(similarity, rejected_by = rejection.label(), "semantic miss");
            }
            Lookup::Miss { best: None, .. } => {}
        }
        found
    }

    /// Keeps a fresh upstream answer in both caches, as the call's policy allows, and shares
    /// it with the other replicas.
    pub(super) async fn store_answer(
        &self,
        key: CacheKey,
        similar: Option<SemanticRequest>,
        policy: CachePolicy,
        served: &Served,
        spend: Spend,
        at: SystemTime,
    ) {
        if !policy.writes() || !worth_serving_again(served) {
            return;
        }
        let answer = CachedAnswer {
            output: served.output.clone(),
            model: served.model.clone(),
            provider: served.provider.clone(),
            cost_usd: spend.cost_usd,
            tokens: spend.tokens(),
            usage: Some(spend.usage),
            finish_reason: served.finish_reason,
            tool_calls: served.tool_calls.clone(),
        };
        if let Some(shared) = &self.inner.shared {
            let model = self.inner.semantic.as_ref().map(|cache| cache.embedder().model_id());
            let shared_similar =
                similar.as_ref().zip(model).map(|(similar, model)| (similar.namespace.as_str(), &similar.query, model));
            let ttl = self.inner.cache.as_ref().map(ExactCache::ttl);
            staged("cache.share", shared.store(key, &answer, shared_similar, at, ttl)).await;
        }
        if let (Some(cache), Some(similar)) = (&self.inner.semantic, similar) {
            cache.insert(&similar.namespace, similar.query, answer.clone(), at);
        }
        if let Some(cache) = &self.inner.cache {
            cache.insert(key, answer, at);
        }
    }

    /// The step's free-text field and the rest of the input, if the semantic cache may
    /// compare this text.
    fn semantic_text(&self, spec: &StepSpec, input: &Value) -> Option<(String, Value)> {
        let (text, rest) = semantic_text(spec, input)?;
        if text.chars().count() > self.inner.config.semantic.max_text_chars {
            tracing::debug!("text longer than semantic.max_text_chars: exact cache only");
            return None;
        }
        Some((text, rest))
    }

    /// Embeds the texts that these calls will look up in the semantic cache, over all of the
    /// embedder's sessions, so that the calls find their vectors ready. It blocks: run it on a
    /// thread of its own, ahead of the calls (a replay does). Returns how many texts it saw.
    pub fn embed_ahead<'a>(
        &self,
        calls: impl IntoIterator<Item = (&'a StepType, &'a Value)>,
    ) -> Result<usize, semantic_cache::CacheError> {
        let Some(cache) = &self.inner.semantic else { return Ok(0) };
        let texts: Vec<String> = calls
            .into_iter()
            .filter_map(|(step, input)| self.inner.config.step(step).and_then(|spec| self.semantic_text(spec, input)))
            .map(|(text, _)| text)
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        cache.warm(&texts)?;
        Ok(texts.len())
    }
}

/// Two calls share an answer only if everything the model sees and everything that shapes
/// its reply are the same: workspace, step contract, model and the rendered prompt (which
/// stands for the input, the template and any metadata the template reads).
pub(super) fn cache_key(
    spec: &StepSpec,
    model: &str,
    context: &CallContext,
    messages: &[ChatMessage],
    sampling: Sampling,
    request: &ChatOptions,
) -> CacheKey {
    let mut key = CacheKey::builder()
        .text("workspace", &context.workspace)
        .text("step", spec.step.as_str())
        .text("contract", &spec.fingerprint)
        .text("model", model)
        .text("sampling", &format!("{}/{}", sampling.temperature, sampling.max_output_tokens));
    for message in messages {
        let role = match message.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        key = key.text(role, &normalise_prompt(&message.content));
        if !message.images.is_empty() || !message.tool_calls.is_empty() || message.tool_call_id.is_some() {
            key = key
                .json("message_parts", &serde_json::json!([message.images, message.tool_calls, message.tool_call_id]));
        }
    }
    // Tools, the reply format and every other parameter change the answer; who asks (`user`)
    // and the caller's labels (`metadata`) do not.
    if *request != ChatOptions::default() {
        let mut shaping = request.clone();
        shaping.extras.user = None;
        shaping.extras.metadata.clear();
        if shaping != ChatOptions::default() {
            key = key.json("request", &serde_json::to_value(&shaping).unwrap_or_default());
        }
    }
    key.build()
}

/// Only a whole answer is served again: one cut at the output budget or by a content filter
/// is not (the next caller may have a larger budget; the filter may pass it next time), nor a
/// tool call whose arguments are not JSON (the caller could not run it).
fn worth_serving_again(served: &Served) -> bool {
    matches!(served.finish_reason, FinishReason::Stop | FinishReason::ToolCalls)
        && served.tool_calls.iter().all(|call| serde_json::from_str::<Value>(&call.arguments).is_ok())
}

/// Trailing spaces and surrounding blank lines carry no meaning for a model; inner spacing
/// and case may (code, names), so they are kept.
fn normalise_prompt(text: &str) -> String {
    text.trim().lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_normalisation_keeps_inner_spacing() {
        assert_eq!(normalise_prompt("\n  a  b   \n\tc \n\n"), "a  b\n\tc");
    }

    fn served(finish_reason: FinishReason, arguments: &str) -> Served {
        let answer = super::super::served::Answer {
            output: Value::String(String::new()),
            tool_calls: vec![ToolCall { id: "c1".into(), name: "f".into(), arguments: arguments.into() }],
            finish_reason,
        };
        Served::upstream(answer, crate::Source::Upstream, "m".into(), "p".into())
    }

    #[test]
    fn only_whole_answers_with_runnable_tool_calls_are_kept() {
        assert!(worth_serving_again(&served(FinishReason::ToolCalls, r#"{"city": "Oslo"}"#)));
        assert!(!worth_serving_again(&served(FinishReason::ToolCalls, r#"{"city": "Os"#)));
        assert!(!worth_serving_again(&served(FinishReason::Length, "{}")));
        assert!(!worth_serving_again(&served(FinishReason::ContentFilter, "{}")));
    }

    #[test]
    fn tools_and_parameters_are_part_of_the_key() {
        let config = crate::Config::defaults().unwrap();
        let spec = config.step(&StepType::CHAT).unwrap();
        let context = CallContext::new("ws", "c");
        let messages = [ChatMessage::user("hi")];
        let sampling = Sampling { temperature: 0.0, max_output_tokens: 10 };
        let key = |request: &ChatOptions| cache_key(spec, "m", &context, &messages, sampling, request);
        let plain = ChatOptions::default();
        let mut with_tool = ChatOptions::default();
        with_tool.tools.push(providers::Tool { name: "f".into(), description: None, parameters: None, strict: None });
        let mut seeded = ChatOptions::default();
        seeded.extras.seed = Some(1);
        let mut labelled = ChatOptions::default();
        labelled.extras.user = Some("u-17".into());
        labelled.extras.metadata.insert("ticket".into(), "42".into());
        assert_eq!(key(&plain), key(&labelled), "who asks shapes no answer");
        assert_ne!(key(&plain), key(&with_tool));
        assert_ne!(key(&plain), key(&seeded));
        assert_ne!(key(&with_tool), key(&seeded));
        assert_eq!(key(&seeded), key(&seeded.clone()));
        let schema = |schema: serde_json::Value| ChatOptions {
            response_format: Some(providers::ResponseFormat::JsonSchema { name: "s".into(), schema, strict: true }),
            ..ChatOptions::default()
        };
        let city = schema(serde_json::json!({"type": "object", "required": ["city"]}));
        let river = schema(serde_json::json!({"type": "object", "required": ["river"]}));
        assert_ne!(key(&city), key(&river));
        assert_ne!(key(&plain), key(&city));
    }
}
