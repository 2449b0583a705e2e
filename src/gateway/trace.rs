//! W3C trace context: a request's `traceparent` continues the caller's trace, and the call's
//! telemetry row carries the trace's id.

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pipeline_core::TraceId;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The server span of one request, a child of the caller's span if it sent `traceparent`.
pub(super) fn request_span(headers: &HeaderMap, route: &'static str) -> tracing::Span {
    let span = tracing::info_span!(
        "gateway.request",
        "otel.kind" = "server",
        "http.request.method" = "POST",
        "http.route" = route,
    );
    // Without an OpenTelemetry layer the span is disabled and there is nothing to continue.
    if !span.is_disabled() {
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// The id of the trace the current span belongs to, when traces are exported; else the
/// caller's, from its `traceparent`; else none (the engine makes one).
pub(super) fn current_trace_id(headers: &HeaderMap) -> Option<TraceId> {
    let exported = tracing::Span::current().context().span().span_context().trace_id();
    let id = if exported == opentelemetry::trace::TraceId::INVALID {
        TraceContextPropagator::new().extract(&Headers(headers)).span().span_context().trace_id()
    } else {
        exported
    };
    (id != opentelemetry::trace::TraceId::INVALID).then(|| TraceId::from(id.to_string()))
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}
