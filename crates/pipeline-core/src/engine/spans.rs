//! The spans of a call, when traces are exported: the call's own (`aipipe.call`) and one per
//! stage under it, measured as plain values and handed to the engine's [`SpanSink`] as the
//! call ends. Nothing here touches a wire format or a lock: a stage costs two clock reads and
//! a push into the call's own list, which is what keeps export within reach of the engine's
//! cost without it (see docs/benchmarks.md, "Traces over OTLP").
//!
//! The list lives in a task-local for the length of one `Engine::execute`, so that a stage
//! deep in the call path opens a span without every function between passing it along. The
//! stages of one call run one after another on its task, so the innermost open span is the
//! parent of the next one.

use std::cell::RefCell;
use std::time::SystemTime;

use resilience::GuardWait;
use telemetry::{
    AttributeValue, CallRecord, CallStatus, FinishedSpan, ParentSpan, SpanId, SpanKind, SpanSink, W3cTraceId,
};

use crate::TraceParent;

tokio::task_local! {
    /// Scoped around every call, so that a call's future has one shape whether it records or
    /// not; `None` when it does not.
    static CALL_SPANS: RefCell<Option<Recording>>;
}

/// `record` with the running call's recording, if it records.
fn with_recording<T>(record: impl FnOnce(&mut Recording) -> T) -> Option<T> {
    CALL_SPANS.try_with(|recording| recording.borrow_mut().as_mut().map(record)).ok().flatten()
}

/// The spans of one call so far.
pub(super) struct Recording {
    trace_id: W3cTraceId,
    call: SpanId,
    parent: Option<ParentSpan>,
    started: SystemTime,
    call_attributes: Vec<(&'static str, AttributeValue)>,
    finished: Vec<FinishedSpan>,
    /// The spans open now, innermost last; the call's own first.
    open: Vec<SpanId>,
}

impl Recording {
    /// A recording for a call in trace `trace_id`, if `sink` exports the trace: the caller's
    /// decision when it continues a trace, else the sink's sampler's.
    pub(super) fn start(sink: &dyn SpanSink, trace_id: &str, parent: Option<TraceParent>) -> Option<Self> {
        let (trace_id, sampled) = match parent {
            Some(parent) => (parent.trace_id, parent.sampled),
            None => {
                let trace_id = W3cTraceId::of(trace_id);
                (trace_id, sink.samples(trace_id, None))
            }
        };
        sampled.then(|| {
            let call = SpanId::random();
            Self {
                trace_id,
                call,
                parent: parent.map(|parent| parent.span),
                started: SystemTime::now(),
                call_attributes: Vec::with_capacity(16),
                finished: Vec::with_capacity(8),
                open: vec![call],
            }
        })
    }

    /// Runs `call` with `recording` (if any) as its task's.
    pub(super) fn scope<F: Future>(recording: Option<Self>, call: F) -> impl Future<Output = F::Output> {
        CALL_SPANS.scope(RefCell::new(recording), call)
    }

    fn parent(&self) -> ParentSpan {
        ParentSpan { id: self.open.last().copied().unwrap_or(self.call), remote: false }
    }

    fn close(&mut self, open: OpenStage) {
        // The innermost one, unless a stage outlived one opened after it.
        if let Some(at) = self.open.iter().rposition(|id| *id == open.id) {
            self.open.remove(at);
        }
        let trace_id = self.trace_id;
        self.finished.push(FinishedSpan {
            trace_id,
            id: open.id,
            parent: Some(open.parent),
            name: open.name,
            kind: open.kind,
            start: open.start,
            end: SystemTime::now(),
            attributes: open.attributes,
            failed: open.failed,
        });
    }
}

/// Adds attributes to the call's own span (when it records).
pub(super) fn annotate_call(annotate: impl FnOnce(&mut Vec<(&'static str, AttributeValue)>)) {
    with_recording(|recording| annotate(&mut recording.call_attributes));
}

/// Ends the call's span, from its telemetry record, and hands every span of the call to
/// `sink`. Does nothing for a call that does not record.
pub(super) fn end_call(sink: Option<&dyn SpanSink>, record: &CallRecord, finish_reason: Option<&'static str>) {
    let Some(sink) = sink else { return };
    let spans = with_recording(|recording| {
        let mut attributes = std::mem::take(&mut recording.call_attributes);
        // The row's id only when it is not the trace's (a caller's id of its own).
        if W3cTraceId::parse_hex(&record.trace_id) != Some(recording.trace_id) {
            attributes.push(("aipipe.trace_id", record.trace_id.clone().into()));
        }
        attributes.extend([
            ("aipipe.step", AttributeValue::from(record.step.clone())),
            ("aipipe.workspace", record.workspace.clone().into()),
            ("aipipe.component", record.component.clone().into()),
            ("aipipe.source", record.source.label().into()),
            ("aipipe.confidence", record.confidence.into()),
            ("aipipe.status", record.status.label().into()),
            ("aipipe.attempts", record.attempts.into()),
            ("gen_ai.operation.name", "chat".into()),
            ("gen_ai.response.model", record.model.clone().into()),
            ("gen_ai.usage.input_tokens", record.input_tokens.into()),
            ("gen_ai.usage.output_tokens", record.output_tokens.into()),
        ]);
        if let Some(reason) = finish_reason {
            attributes.push(("gen_ai.response.finish_reasons", reason.into()));
        }
        if let Some(class) = record.error_class.filter(|_| record.status == CallStatus::Error) {
            attributes.push(("error.type", class.label().into()));
        }
        let call = FinishedSpan {
            trace_id: recording.trace_id,
            id: recording.call,
            parent: recording.parent,
            name: "aipipe.call",
            kind: SpanKind::Internal,
            start: recording.started,
            end: SystemTime::now(),
            attributes,
            failed: record.status == CallStatus::Error,
        };
        let mut spans = std::mem::take(&mut recording.finished);
        spans.push(call);
        spans
    });
    if let Some(spans) = spans {
        sink.export(spans);
    }
}

/// A stage's span, open until dropped (so that a stage left by `?` or cancelled still ends).
/// Does nothing when the call does not record.
pub(super) struct Stage(Option<OpenStage>);

struct OpenStage {
    id: SpanId,
    parent: ParentSpan,
    name: &'static str,
    kind: SpanKind,
    start: SystemTime,
    attributes: Vec<(&'static str, AttributeValue)>,
    failed: bool,
}

impl Stage {
    pub(super) fn open(name: &'static str) -> Self {
        Self::open_as(name, SpanKind::Internal)
    }

    /// A stage that is a request to another service (`SpanKind::Client`).
    pub(super) fn open_as(name: &'static str, kind: SpanKind) -> Self {
        let opened = with_recording(|recording| {
            let id = SpanId::random();
            let parent = recording.parent();
            recording.open.push(id);
            OpenStage { id, parent, name, kind, start: SystemTime::now(), attributes: Vec::new(), failed: false }
        });
        Self(opened)
    }

    /// Adds attributes; `annotate` runs only when the call records, so what it computes costs
    /// nothing otherwise.
    pub(super) fn annotate(&mut self, annotate: impl FnOnce(&mut Vec<(&'static str, AttributeValue)>)) {
        if let Some(open) = &mut self.0 {
            annotate(&mut open.attributes);
        }
    }

    /// The stage failed, for the reason `error_type` (a metric label).
    pub(super) fn fail(&mut self, error_type: &'static str) {
        if let Some(open) = &mut self.0 {
            open.failed = true;
            open.attributes.push(("error.type", error_type.into()));
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(open) = self.0.take() {
            with_recording(|recording| recording.close(open));
        }
    }
}

/// A stage's span around `work`.
pub(super) async fn staged<F: Future>(name: &'static str, work: F) -> F::Output {
    let _stage = Stage::open(name);
    work.await
}

/// The guards' waits, as spans under the innermost open one (an upstream attempt).
pub(super) fn guard_waits(waits: &[GuardWait]) {
    if waits.is_empty() {
        return;
    }
    with_recording(|recording| {
        // The guards time their waits on tokio's clock; a span needs the wall clock.
        let (now, wall) = (tokio::time::Instant::now(), SystemTime::now());
        let (parent, trace_id) = (recording.parent(), recording.trace_id);
        for wait in waits {
            let start = wall.checked_sub(now.saturating_duration_since(wait.started)).unwrap_or(wall);
            recording.finished.push(FinishedSpan {
                trace_id,
                id: SpanId::random(),
                parent: Some(parent),
                name: wait.guard.span_name(),
                kind: SpanKind::Internal,
                start,
                end: start + wait.took,
                attributes: Vec::new(),
                failed: false,
            });
        }
    });
}
