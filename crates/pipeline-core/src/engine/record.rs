//! The telemetry record every call leaves, whatever its outcome: the engine's types mapped
//! into telemetry's words.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use telemetry::{BreakerState, CallRecord, CallStatus};

use super::served::{Served, Spent};
use super::{Call, Engine};
use crate::PipelineError;

/// Longest error text kept in a telemetry row.
const MAX_ERROR_MESSAGE_CHARS: usize = 500;

impl Engine {
    pub(super) fn record(
        &self,
        call: &Call<'_>,
        at: SystemTime,
        latency: Duration,
        spent: &Spent,
        outcome: &Result<Served, PipelineError>,
    ) {
        let span = tracing::Span::current();
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
        span.record("source", telemetry::Source::label(source));
        let (status, error_class, error_message) = match outcome {
            Ok(served) => (CallStatus::Ok, served.degraded_by, None),
            Err(err) => {
                tracing::info!(error = %err, class = err.metric_label(), "call failed");
                let message: String = err.to_string().chars().take(MAX_ERROR_MESSAGE_CHARS).collect();
                (CallStatus::Error, Some(err.class()), Some(message))
            }
        };
        span.record("status", status.label());
        let component = if call.context.component.is_empty() { "unspecified" } else { &call.context.component };
        self.inner.recorder.record(CallRecord {
            ts_ms: at.duration_since(UNIX_EPOCH).map(|since| since.as_millis() as i64).unwrap_or(0),
            step: call.step.to_string(),
            component: component.to_owned(),
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
            similarity: served.and_then(|served| served.similar.as_ref()).map(|similar| f64::from(similar.similarity)),
            status,
            error_class,
            error_message,
            attempts: i64::from(spent.attempts),
            rate_limit_wait_ms: spent.rate_limit_wait.as_secs_f64() * 1000.0,
            breaker_state: spent.breaker_state.map(breaker_state),
        });
    }
}

fn breaker_state(state: resilience::BreakerState) -> BreakerState {
    match state {
        resilience::BreakerState::Closed => BreakerState::Closed,
        resilience::BreakerState::HalfOpen => BreakerState::HalfOpen,
        resilience::BreakerState::Open => BreakerState::Open,
    }
}
