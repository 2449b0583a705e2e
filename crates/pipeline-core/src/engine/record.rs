//! The telemetry record every call leaves, whatever its outcome: the engine's types mapped
//! into telemetry's words.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use telemetry::{BreakerState, CallRecord, CallStatus, ErrorClass, Source};

use super::served::{Served, Spent};
use super::spans;
use super::{Call, Engine};
use crate::{CallContext, PipelineError, StepType, TraceId};

/// The step label of a name the config does not declare: metric labels come from configured
/// names only, so that a caller cannot grow them without bound.
const UNKNOWN_STEP: &str = "unknown";

/// Longest error text kept in a telemetry row.
const MAX_ERROR_MESSAGE_CHARS: usize = 500;

impl Engine {
    pub(super) fn record(
        &self,
        call: &Call<'_>,
        at: SystemTime,
        latency: Duration,
        time_to_first_token: Option<Duration>,
        spent: &Spent,
        outcome: &Result<Served, PipelineError>,
    ) {
        let served = outcome.as_ref().ok();
        let (model, provider, source, confidence) = match served {
            Some(served) => (served.model.clone(), served.provider.clone(), served.source.into(), served.confidence),
            None => (
                spent.model.clone().unwrap_or_default(),
                spent.provider.clone().unwrap_or_else(|| self.inner.primary.clone()),
                telemetry::Source::None,
                0.0,
            ),
        };
        let (status, error_class, error_message) = match outcome {
            Ok(served) => (CallStatus::Ok, served.degraded_by, None),
            Err(err) => {
                tracing::info!(error = %err, class = err.metric_label(), "call failed");
                (CallStatus::Error, Some(err.class()), Some(error_text(err)))
            }
        };
        // An audit's row says the audited hit's confidence and similarity beside its verdict.
        let (confidence, similarity) = match call.audit {
            Some(audit) => (f64::from(audit.score), Some(f64::from(audit.similarity))),
            None => (
                confidence,
                served.and_then(|served| served.similar.as_ref()).map(|similar| f64::from(similar.similarity)),
            ),
        };
        let record = CallRecord {
            ts_ms: unix_ms(at),
            step: self.step_label(Some(call.step)),
            component: component(call.context),
            workspace: call.context.workspace.clone(),
            trace_id: call.trace_id.to_string(),
            model,
            provider,
            input_tokens: i64::from(spent.usage.input_tokens),
            output_tokens: i64::from(spent.usage.output_tokens),
            latency_ms: latency.as_secs_f64() * 1000.0,
            cost_usd: spent.cost_usd,
            saved_cost_usd: served.map_or(0.0, |served| served.saved_cost_usd),
            saved_tokens: served.map_or(0, |served| served.saved_tokens as i64),
            source,
            cache_hit: source.is_cache(),
            confidence,
            similarity,
            status,
            error_class,
            error_message,
            attempts: i64::from(spent.attempts),
            rate_limit_wait_ms: spent.rate_limit_wait.as_secs_f64() * 1000.0,
            breaker_state: spent.breaker_state.map(breaker_state),
            route: spent.route.clone(),
            streamed: call.options.stream.is_some(),
            ttft_ms: time_to_first_token.map(|ttft| ttft.as_secs_f64() * 1000.0),
            audit: call.audit.map(|_| spent.audit.map_or(telemetry::Audit::Unjudged, super::audit::audit_label)),
        };
        let finish_reason = served.map(|served| served.finish_reason.as_str());
        spans::end_call(self.inner.spans.as_deref(), &record, finish_reason);
        self.inner.recorder.record(record);
    }
}

impl Engine {
    /// One row for a request refused before it became a call (the gateway's: no key, a body
    /// it cannot read, a parameter it cannot honour), so that every request leaves a trace. No
    /// body is kept: only the class and the message, with secrets masked.
    pub fn record_refused(&self, step: Option<&StepType>, context: &CallContext, class: ErrorClass, message: &str) {
        let message: String = providers::scrub(message, &[]).chars().take(MAX_ERROR_MESSAGE_CHARS).collect();
        self.inner.recorder.record(CallRecord {
            error_class: Some(class),
            error_message: Some(message),
            ..bare_record(self.step_label(step), context, self.now())
        });
    }

    fn step_label(&self, step: Option<&StepType>) -> String {
        match step.filter(|step| self.inner.config.step(step).is_some()) {
            Some(step) => step.to_string(),
            None => UNKNOWN_STEP.to_owned(),
        }
    }
}

/// The row of a request that reached no model: a failed one, nothing spent, at `at`; its
/// writer sets what it knows beyond that.
pub(super) fn bare_record(step: String, context: &CallContext, at: SystemTime) -> CallRecord {
    let trace_id = context.trace_id.clone().unwrap_or_else(TraceId::random);
    CallRecord {
        ts_ms: unix_ms(at),
        step,
        component: component(context),
        workspace: context.workspace.clone(),
        trace_id: trace_id.to_string(),
        model: String::new(),
        provider: String::new(),
        input_tokens: 0,
        output_tokens: 0,
        latency_ms: 0.0,
        cost_usd: 0.0,
        saved_cost_usd: 0.0,
        saved_tokens: 0,
        source: Source::None,
        cache_hit: false,
        confidence: 0.0,
        similarity: None,
        status: CallStatus::Error,
        error_class: None,
        error_message: None,
        attempts: 0,
        rate_limit_wait_ms: 0.0,
        breaker_state: None,
        route: None,
        streamed: false,
        ttft_ms: None,
        audit: None,
    }
}

/// An error as a row keeps it: its first [`MAX_ERROR_MESSAGE_CHARS`] characters.
pub(super) fn error_text(err: &PipelineError) -> String {
    err.to_string().chars().take(MAX_ERROR_MESSAGE_CHARS).collect()
}

pub(super) fn component(context: &CallContext) -> String {
    if context.component.is_empty() { "unspecified".to_owned() } else { context.component.clone() }
}

pub(super) fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map(|since| since.as_millis() as i64).unwrap_or(0)
}

fn breaker_state(state: resilience::BreakerState) -> BreakerState {
    match state {
        resilience::BreakerState::Closed => BreakerState::Closed,
        resilience::BreakerState::HalfOpen => BreakerState::HalfOpen,
        resilience::BreakerState::Open => BreakerState::Open,
    }
}
