//! W3C trace context: a request's `traceparent` continues the caller's trace, the gateway's
//! request span is the parent of the call's, and the call's telemetry row carries the trace's
//! id.

use std::sync::Arc;
use std::time::SystemTime;

use axum::http::{HeaderMap, StatusCode};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use pipeline_core::telemetry::{FinishedSpan, ParentSpan, SpanId, SpanKind, SpanSink, W3cTraceId};
use pipeline_core::{CallContext, TraceId, TraceParent};

/// The caller's span, from its `traceparent`.
#[derive(Debug, Clone, Copy)]
struct Caller {
    trace_id: W3cTraceId,
    span: SpanId,
    sampled: bool,
}

fn caller(headers: &HeaderMap) -> Option<Caller> {
    let context = TraceContextPropagator::new().extract(&Headers(headers));
    let span = context.span();
    let span = span.span_context();
    if !span.is_valid() {
        return None;
    }
    Some(Caller {
        trace_id: W3cTraceId::from_bytes(span.trace_id().to_bytes())?,
        span: SpanId::from_bytes(span.span_id().to_bytes())?,
        sampled: span.is_sampled(),
    })
}

/// The id of the caller's W3C trace, if it sent one: the call's id, so that a row and its
/// trace share it.
pub(super) fn caller_trace_id(headers: &HeaderMap) -> Option<TraceId> {
    caller(headers).map(|caller| TraceId::from(caller.trace_id.to_string()))
}

/// The server span of one request, when traces are exported: a child of the caller's span if
/// it sent `traceparent`, and the parent of the call's.
pub(super) struct RequestSpan(Option<Open>);

struct Open {
    sink: Arc<dyn SpanSink>,
    id: SpanId,
    caller: Option<Caller>,
    route: &'static str,
    start: SystemTime,
    /// The trace and whether it is exported, once known (from the call's id, or at the end).
    trace: Option<(W3cTraceId, bool)>,
    /// The call's id once it is given or made, so that a row recorded later (a request refused
    /// after its call's context was made) carries the same.
    call_id: Option<TraceId>,
}

impl RequestSpan {
    pub(super) fn start(sink: Option<&Arc<dyn SpanSink>>, headers: &HeaderMap, route: &'static str) -> Self {
        Self(sink.map(|sink| Open {
            sink: sink.clone(),
            id: SpanId::random(),
            caller: caller(headers),
            route,
            start: SystemTime::now(),
            trace: None,
            call_id: None,
        }))
    }

    /// Puts the call in this span's trace: its id (made here when the caller gave none) and
    /// this span as its parent.
    pub(super) fn adopt(&mut self, context: &mut CallContext) {
        let Some(open) = &mut self.0 else { return };
        let call_id = context.trace_id.get_or_insert_with(|| open.call_id.clone().unwrap_or_else(TraceId::random));
        open.call_id = Some(call_id.clone());
        let (trace_id, sampled) = open.decide(Some(call_id));
        context.trace_parent = Some(TraceParent { trace_id, span: ParentSpan { id: open.id, remote: false }, sampled });
    }

    pub(super) fn end(self, status: StatusCode) {
        let Some(mut open) = self.0 else { return };
        let (trace_id, sampled) = open.decide(None);
        if !sampled {
            return;
        }
        open.sink.export(vec![FinishedSpan {
            trace_id,
            id: open.id,
            parent: open.caller.map(|caller| ParentSpan { id: caller.span, remote: true }),
            name: "gateway.request",
            kind: SpanKind::Server,
            start: open.start,
            end: SystemTime::now(),
            attributes: vec![
                ("http.request.method", "POST".into()),
                ("http.route", open.route.into()),
                ("http.response.status_code", i64::from(status.as_u16()).into()),
            ],
            // As OpenTelemetry's HTTP conventions have it for a server: a 4xx is the caller's.
            failed: status.is_server_error(),
        }]);
    }
}

impl Open {
    /// The trace: the caller's W3C trace, else the call's id's; exported as the caller's
    /// flag, else the sampler, decides.
    fn decide(&mut self, call_id: Option<&TraceId>) -> (W3cTraceId, bool) {
        *self.trace.get_or_insert_with(|| {
            let trace_id = match (self.caller, call_id) {
                (Some(caller), _) => caller.trace_id,
                (None, Some(call_id)) => W3cTraceId::of(call_id.as_str()),
                (None, None) => W3cTraceId::of(TraceId::random().as_str()),
            };
            (trace_id, self.sink.samples(trace_id, self.caller.map(|caller| caller.sampled)))
        })
    }
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
