//! Verified serving: the semantic cache's hits checked against the model on the user's own
//! traffic (docs/ARCHITECTURE.md, "Verified serving"). The cuts and their statistics are
//! `semantic_cache::audit`'s; this stage decides what to audit, runs the audits, compares
//! the answers by the step's rule and reports what the cuts did.
//!
//! - A **paid audit**: a share of hits is asked of the model again, on a task of its own
//!   after the caller has the cached answer, as a call of its own (the same limits, budgets
//!   and guards; one telemetry row with its verdict in `audit`; no cache read or written).
//! - A **free audit**: a miss whose nearest candidate only the cut stopped was answered by
//!   the model anyway; its answer, compared with the candidate's, labels that score for free.

use std::sync::PoisonError;

use rand::Rng;
use semantic_cache::audit::{AuditSettings, Cut, Settled, Verdict, bin};
use semantic_cache::{ScoreKind, SemanticHit, ServeBar};
use serde_json::Value;
use telemetry::{Alert, Watched};

use super::cache::CachedAnswer;
use super::{Call, Engine};
use crate::{AnswerMatch, CachePolicy, CallContext, CallOptions, StepSpec, StepType};

/// A semantic hit under audit: what it served, and how it scored.
#[derive(Debug, Clone)]
pub(super) struct AuditOf {
    pub(super) served: Value,
    pub(super) score: f32,
    pub(super) similarity: f32,
}

/// Whether a paid audit ran, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Paid,
    Free,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Paid => "paid",
            Self::Free => "free",
        }
    }
}

/// How an engine runs its paid audits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuditMode {
    /// On a task of their own, after the caller has its answer.
    #[default]
    Background,
    /// Before the hit returns, under the audited call's own trace id: a replay, whose recorded
    /// provider then answers the audit with what the model answered that very call in the log.
    Inline,
    /// Never: the cuts learn from free audits only.
    Off,
}

impl Engine {
    /// The step's audit rules; `None` when audits are off for it (a bound of 0).
    fn audit_settings(&self, spec: &StepSpec) -> Option<AuditSettings> {
        let config = &self.inner.config.semantic.audit;
        (spec.semantic_max_wrong_rate > 0.0).then_some(AuditSettings {
            max_wrong_rate: spec.semantic_max_wrong_rate,
            audit_rate: config.audit_rate,
            floor: config.floor,
        })
    }

    fn score_kind(&self) -> ScoreKind {
        self.inner.semantic.as_ref().map_or(ScoreKind::Cosine, |cache| cache.score_kind())
    }

    /// The offline cut: the step's configured bar, on the scale the cache scores.
    fn prior(&self, spec: &StepSpec) -> Cut {
        Cut::At(self.score_kind().cut_of(spec.serve_bar()))
    }

    /// The bar a lookup in `workspace`'s `spec` serves at: the cut its audits set, or the
    /// configured one while audits are off.
    pub(super) fn serve_bar(&self, spec: &StepSpec, workspace: &str) -> ServeBar {
        let bar = spec.serve_bar();
        let Some(settings) = self.audit_settings(spec) else { return bar };
        let cut = self.inner.cuts.cut(spec.step.as_str(), workspace, self.prior(spec), &settings);
        self.score_kind().bar_at(bar, cut.value())
    }

    /// Whether this one is audited, drawn (on the engine's seeded generator) with its scope's
    /// audit probability.
    fn drawn_for_audit(&self, spec: &StepSpec, workspace: &str, settings: &AuditSettings) -> bool {
        let probability = self.inner.cuts.audit_probability(spec.step.as_str(), workspace, settings);
        let drawn: f64 = self.inner.rng.lock().unwrap_or_else(PoisonError::into_inner).random();
        drawn < probability
    }

    /// After a hit served `call`: with the scope's audit probability, the same call is asked
    /// of the model, on a task of its own (or, `AuditMode::Inline`, before the hit returns).
    /// Skipped (and logged) when the audits in flight are at their bound.
    pub(super) async fn audit_hit(&self, spec: &StepSpec, call: &Call<'_>, hit: &SemanticHit<CachedAnswer>) {
        let mode = self.inner.audit_mode;
        if call.audit.is_some() || mode == AuditMode::Off {
            return;
        }
        let Some(settings) = self.audit_settings(spec) else { return };
        if !self.drawn_for_audit(spec, &call.context.workspace, &settings) {
            return;
        }
        let Ok(permit) = self.inner.audits_in_flight.clone().try_acquire_owned() else {
            tracing::debug!(step = %spec.step, "audit skipped: semantic.max_audits_in_flight are running");
            return;
        };
        let audit = AuditOf { served: hit.value.output.clone(), score: hit.confidence, similarity: hit.similarity };
        let engine = self.clone();
        let step = call.step.clone();
        let input = call.input.clone();
        // A row of its own; the caller's component, so that its cost is theirs to see. In the
        // background, a trace of its own too.
        let trace_id = (mode == AuditMode::Inline).then(|| call.trace_id.clone());
        let context = CallContext { trace_id, trace_parent: None, ..call.context.clone() };
        let options = CallOptions {
            cache: CachePolicy::Skip,
            deadline: call.options.deadline,
            model: call.options.model.clone(),
            route: call.options.route.clone(),
            max_cost_usd: call.options.max_cost_usd,
            // Only the model's own answer says whether the hit was right.
            allow_stand_in: false,
            stream: None,
        };
        let audited = async move {
            let _permit = permit;
            let outcome = audit_call(engine, step, input, context, options, audit).await;
            if let Err(error) = outcome {
                tracing::debug!(%error, "audit call failed: no verdict");
            }
        };
        match mode {
            AuditMode::Inline => audited.await,
            _ => {
                tokio::spawn(audited);
            }
        }
    }

    /// In an audit call, once the route's preferred model answered: the verdict on the hit,
    /// if the comparison could be made.
    pub(super) async fn judge_audit(
        &self,
        spec: &StepSpec,
        call: &Call<'_>,
        audit: &AuditOf,
        answer: &Value,
    ) -> Option<Verdict> {
        let verdict = Verdict::of(self.same_answer(spec, &call.context.workspace, answer, &audit.served).await?);
        self.observe(spec, &call.context.workspace, audit.score, verdict, Kind::Paid);
        Some(verdict)
    }

    /// After the model answered a call that missed: its nearest candidate, stopped only by
    /// the cut and at least at the floor, is labelled by comparing the two answers.
    pub(super) fn label_near_miss(
        &self,
        spec: &StepSpec,
        context: &CallContext,
        nearest: SemanticHit<CachedAnswer>,
        answer: &Value,
    ) {
        let Some(settings) = self.audit_settings(spec) else { return };
        if nearest.confidence < settings.floor {
            return;
        }
        match spec.answer_match {
            // Cheap: decided here, before the call returns.
            AnswerMatch::Fields(_) => {
                let verdict = Verdict::of(spec.answer_match.fields_agree(answer, &nearest.value.output) == Some(true));
                self.observe(spec, &context.workspace, nearest.confidence, verdict, Kind::Free);
            }
            // Two embeddings, or a judge's call: off the caller's path. A judge costs a call,
            // so its near misses are sampled as hits are.
            AnswerMatch::Meaning => {
                if self.inner.config.semantic.audit.answer_judge.is_some()
                    && !self.drawn_for_audit(spec, &context.workspace, &settings)
                {
                    return;
                }
                let (engine, step, workspace, answer) =
                    (self.clone(), spec.step.clone(), context.workspace.clone(), answer.clone());
                tokio::spawn(async move {
                    let Some(spec) = engine.inner.config.step(&step) else { return };
                    if let Some(same) = engine.same_answer(spec, &workspace, &answer, &nearest.value.output).await {
                        engine.observe(spec, &workspace, nearest.confidence, Verdict::of(same), Kind::Free);
                    }
                });
            }
        }
    }

    /// Whether the model's answer and the served one are the same answer, by the step's rule;
    /// `None` when that cannot be told (a judge that did not answer, answers that could not be
    /// embedded): no verdict rather than a wrong one.
    async fn same_answer(&self, spec: &StepSpec, workspace: &str, answer: &Value, served: &Value) -> Option<bool> {
        match spec.answer_match {
            AnswerMatch::Fields(_) => spec.answer_match.fields_agree(answer, served),
            AnswerMatch::Meaning => {
                let (a, b) = (text_of(answer), text_of(served));
                if a.trim() == b.trim() {
                    return Some(true);
                }
                match &self.inner.config.semantic.audit.answer_judge {
                    Some(judge) => self.ask_judge(judge, workspace, a, b).await,
                    None => self.same_meaning(a, b).await,
                }
            }
        }
    }

    /// The configured judge step, asked as a call of its own (its model, its budget, its row);
    /// the same pair asked twice is an exact-cache hit.
    async fn ask_judge(&self, judge: &StepType, workspace: &str, first: String, second: String) -> Option<bool> {
        let context = CallContext::new(workspace, "aipipe-audit-judge");
        let options = CallOptions { allow_stand_in: false, ..CallOptions::default() };
        let input = serde_json::json!({"first": first, "second": second});
        match judge_call(self.clone(), judge.clone(), input, context, options).await {
            Ok(result) => result.output["same"].as_bool(),
            Err(error) => {
                tracing::warn!(%error, "the answer judge did not answer: no verdict");
                None
            }
        }
    }

    /// The answers' embeddings on the cache's model, off the async workers.
    async fn same_meaning(&self, a: String, b: String) -> Option<bool> {
        let cache = self.inner.semantic.clone()?;
        let min_cosine = self.inner.config.semantic.audit.answer_min_cosine;
        let embedded = tokio::task::spawn_blocking(move || cache.embedder().embed(&[a.as_str(), b.as_str()])).await;
        match embedded {
            Ok(Ok(vectors)) if vectors.len() == 2 => {
                let cosine: f32 = vectors[0].iter().zip(&vectors[1]).map(|(x, y)| x * y).sum();
                Some(cosine >= min_cosine)
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "an audit could not embed the answers: no verdict");
                None
            }
            _ => None,
        }
    }

    /// One verdict into the step's and the workspace's cuts; what it moved is logged, shown in
    /// the metrics, and a cut the audits proved wrong raises an alert.
    fn observe(&self, spec: &StepSpec, workspace: &str, score: f32, verdict: Verdict, kind: Kind) {
        let Some(settings) = self.audit_settings(spec) else { return };
        let step = spec.step.as_str();
        let metrics = self.inner.recorder.metrics();
        metrics.count_audit(step, audit_label(verdict), kind.label());
        let settled = self.inner.cuts.observe(step, workspace, self.prior(spec), score, verdict, &settings);
        if let Some(counts) = self.inner.shared.as_ref().and_then(|shared| shared.verdicts()).cloned() {
            // The other replicas learn from it at their next read; a lost add loses one verdict.
            let fields = [STEP_WIDE, workspace].map(|scope| count_field(verdict, bin(score), scope));
            let step = step.to_owned();
            tokio::spawn(async move {
                if let Err(error) = counts.add(&step, &fields).await {
                    tracing::debug!(%error, "verdict not shared");
                }
            });
        }
        for (settled, scope) in settled.into_iter().zip([None, Some(workspace)]) {
            match settled {
                Settled::Unchanged => {}
                Settled::Loosened { from, to } | Settled::Withdrawn { from, to } => {
                    tracing::info!(step, workspace = scope, from = from.value(), to = to.value(), "semantic cut moved");
                }
                Settled::Tightened { from, to, wrong_rate } => {
                    tracing::warn!(
                        step,
                        workspace = scope,
                        from = from.value(),
                        to = to.value(),
                        wrong_rate = wrong_rate.estimate,
                        "semantic hits wrong more often than semantic.max_wrong_rate: cut tightened"
                    );
                    self.inner.recorder.raise_alert(Alert {
                        step: step.to_owned(),
                        metric: Watched::SemanticWrongRate,
                        baseline: settings.max_wrong_rate,
                        observed: wrong_rate.lower,
                        z_score: 0.0,
                        minute_ts_ms: super::record::unix_ms(self.inner.clock.now()),
                    });
                }
            }
        }
        if let Some(view) = self.inner.cuts.step_view(step) {
            metrics.set_semantic_cut(
                step,
                f64::from(view.cut.value()),
                view.wrong_rate.estimate,
                view.wrong_rate.upper,
            );
        }
    }

    /// Waits until no paid audit is running (those started meanwhile included).
    pub async fn audits_settled(&self) {
        let all = u32::try_from(self.inner.config.semantic.audit.max_in_flight).unwrap_or(u32::MAX);
        // Closed only if the engine is gone, when nothing runs either.
        let _ = self.inner.audits_in_flight.acquire_many(all).await;
    }

    /// Every scope's cut and what its audits say, for `/status` and reports.
    pub fn semantic_cuts(&self) -> Vec<semantic_cache::audit::ScopeView> {
        self.inner.cuts.views()
    }

    /// The cut a lookup in `workspace`'s `step` serves at now, on the cache's score.
    pub fn semantic_cut(&self, step: &StepType, workspace: &str) -> Option<Cut> {
        let spec = self.inner.config.step(step)?;
        let settings = self.audit_settings(spec)?;
        Some(self.inner.cuts.cut(spec.step.as_str(), workspace, self.prior(spec), &settings))
    }
}

/// An audit as a call of its own. Boxed as a `Send` future: an audit is a call, whose path
/// leads back to `audit_hit`, and the compiler can only see that a cycle is `Send` where it is
/// cut by a type that says so.
type AuditCall =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<crate::PipelineResult, crate::PipelineError>> + Send>>;

fn audit_call(
    engine: Engine,
    step: StepType,
    input: Value,
    context: CallContext,
    options: CallOptions,
    audit: AuditOf,
) -> AuditCall {
    Box::pin(async move { engine.execute_call(step, input, context, options, Some(audit)).await })
}

/// A judge's call, boxed for the same reason as [`audit_call`].
fn judge_call(engine: Engine, step: StepType, input: Value, context: CallContext, options: CallOptions) -> AuditCall {
    Box::pin(async move { engine.execute_call(step, input, context, options, None).await })
}

/// The scope of a step's own cut in the shared counts (a workspace's is its name).
const STEP_WIDE: &str = "*";
/// How often a replica reads the verdicts every replica counted.
const READ_VERDICTS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A shared counter's name: verdict, bin, scope (last: a workspace's name may hold a colon).
fn count_field(verdict: Verdict, bin: usize, scope: &str) -> String {
    format!("{}:{bin}:{scope}", if verdict == Verdict::Agree { 'a' } else { 'd' })
}

/// Every replica's verdicts, read once a second into this replica's cuts, for as long as the
/// engine lives: the replicas then hold the same counts and set the same cuts.
pub(super) async fn follow_verdicts(engine: std::sync::Weak<super::Inner>) {
    loop {
        tokio::time::sleep(READ_VERDICTS_EVERY).await;
        let Some(inner) = engine.upgrade() else { return };
        let engine = Engine { inner };
        let Some(counts) = engine.inner.shared.as_ref().and_then(|shared| shared.verdicts()).cloned() else { return };
        for spec in engine.inner.config.steps().filter(|spec| spec.semantic_field.is_some()) {
            let Some(settings) = engine.audit_settings(spec) else { continue };
            // Redis away: this replica keeps its own counts until it is back.
            let Ok(fields) = counts.all(spec.step.as_str()).await else { break };
            let mut scopes: std::collections::HashMap<&str, Vec<(usize, Verdict, f64)>> = Default::default();
            for (field, count) in &fields {
                let mut parts = field.splitn(3, ':');
                let (Some(verdict), Some(bin), Some(scope)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                let verdict = if verdict == "a" { Verdict::Agree } else { Verdict::Disagree };
                let Ok(bin) = bin.parse() else { continue };
                scopes.entry(scope).or_default().push((bin, verdict, *count as f64));
            }
            for (scope, counts) in scopes {
                let key = semantic_cache::audit::ScopeKey {
                    step: spec.step.to_string(),
                    workspace: (scope != STEP_WIDE).then(|| scope.to_owned()),
                };
                let ledger = semantic_cache::audit::Ledger::from_counts(counts);
                engine.inner.cuts.adopt(key, ledger, engine.prior(spec), &settings);
            }
        }
    }
}

/// Where the cuts are saved: beside the semantic cache's snapshot.
pub(super) fn cuts_path(snapshot: &std::path::Path) -> std::path::PathBuf {
    let mut name = snapshot.file_name().map(std::ffi::OsStr::to_os_string).unwrap_or_default();
    name.push(".cuts.json");
    snapshot.with_file_name(name)
}

pub(super) fn audit_label(verdict: Verdict) -> telemetry::Audit {
    match verdict {
        Verdict::Agree => telemetry::Audit::Agree,
        Verdict::Disagree => telemetry::Audit::Disagree,
    }
}

/// An answer's text: a chat answer's string, or a structured reply's string values joined.
fn text_of(answer: &Value) -> String {
    fn collect(value: &Value, into: &mut Vec<String>) {
        match value {
            Value::String(text) => into.push(text.clone()),
            Value::Array(items) => items.iter().for_each(|item| collect(item, into)),
            Value::Object(fields) => fields.values().for_each(|field| collect(field, into)),
            Value::Number(_) | Value::Bool(_) | Value::Null => into.push(value.to_string()),
        }
    }
    let mut parts = Vec::new();
    collect(answer, &mut parts);
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn an_answers_text_is_its_strings_in_order() {
        assert_eq!(text_of(&json!("plain")), "plain");
        assert_eq!(text_of(&json!({"summary": "short", "changes": ["a", "b"]})), "a\nb\nshort");
    }
}
