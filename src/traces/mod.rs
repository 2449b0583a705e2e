//! What the process tells about itself: its log on stderr, and, when a collector is named,
//! its calls' spans as OpenTelemetry traces over OTLP/HTTP (protobuf).
//!
//! The engine measures a call's spans as plain values (`pipeline_core`'s `engine/spans.rs`)
//! and hands them to the [`OtlpSpans`] sink here as the call ends; encoding them (`otlp`)
//! happens on the export thread. Spans made through `tracing` and `tracing-opentelemetry`, as
//! before, cost the gateway a fifth of its throughput on two cores (docs/benchmarks.md,
//! "Traces over OTLP"); `tracing` still gives the log its context. OpenTelemetry's SDK still
//! decides what is sampled (`OTEL_TRACES_SAMPLER`) and what the resource says
//! (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`).
//!
//! Export never holds up a call: a finished span goes into a bounded queue that a thread
//! drains in batches to the exporter; when the queue is full the span is dropped and counted
//! ([`spans_dropped`], `aipipe_trace_spans_dropped_total`), and a collector that is down costs
//! an error in the log, never a call.

mod otlp;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::{SpanContext, TraceContextExt as _, TraceFlags, TraceState};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SamplingDecision, ShouldSample};
use pipeline_core::TelemetrySettings;
use pipeline_core::telemetry::{AttributeValue, FinishedSpan, SpanSink, W3cTraceId};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Spans exported in one request at most.
const BATCH: usize = 512;
/// How long a shutdown waits for the last spans to be exported.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Finished spans lost to a full export queue or a failed export, since the process started.
pub fn spans_dropped() -> u64 {
    SPANS_DROPPED.load(Ordering::Relaxed)
}

/// The log format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    Text,
    Json,
}

/// The calls' spans, when a collector is named; [`Traces::shutdown`] sends what is queued.
#[derive(Debug)]
pub struct Traces {
    spans: Option<Arc<OtlpSpans>>,
}

impl Traces {
    /// Where an engine sends its calls' spans (none: traces are not exported).
    pub fn sink(&self) -> Option<Arc<dyn SpanSink>> {
        self.spans.clone().map(|spans| spans as Arc<dyn SpanSink>)
    }

    /// Exports the spans still queued (waiting at most a few seconds).
    pub fn shutdown(self) {
        if let Some(spans) = self.spans
            && let Err(error) = spans.flush(SHUTDOWN_WAIT)
        {
            eprintln!("aipipe: the last traces were not exported: {error}");
        }
    }
}

/// The log, and traces to the collector `telemetry` or the `OTEL_EXPORTER_OTLP_*` variables
/// name (none without `telemetry`: a command that runs no calls exports nothing).
pub fn init(style: LogStyle, telemetry: Option<&TelemetrySettings>) -> anyhow::Result<Traces> {
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let log = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let log = match style {
        LogStyle::Text => log.with_filter(log_filter).boxed(),
        LogStyle::Json => log.json().with_filter(log_filter).boxed(),
    };
    let spans = telemetry.filter(|telemetry| wanted(telemetry)).map(OtlpSpans::start).transpose()?;
    tracing_subscriber::registry().with(log).try_init().context("the log was already set up")?;
    Ok(Traces { spans: spans.map(Arc::new) })
}

/// Whether a collector is named: the config, else the standard variables (and not
/// `OTEL_SDK_DISABLED=true`).
fn wanted(telemetry: &TelemetrySettings) -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|value| value.trim().eq_ignore_ascii_case("true"));
    !disabled
        && (telemetry.otlp_endpoint.is_some()
            || set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The resource every span is exported under: the service's name (`OTEL_SERVICE_NAME`, else
/// aipipe) and what `OTEL_RESOURCE_ATTRIBUTES` adds, as OpenTelemetry's SDK reads them.
fn resource() -> Vec<(String, AttributeValue)> {
    let service = std::env::var("OTEL_SERVICE_NAME").ok().filter(|name| !name.trim().is_empty());
    let resource = Resource::builder().with_service_name(service.unwrap_or_else(|| "aipipe".to_owned())).build();
    resource
        .iter()
        .map(|(key, value)| {
            let value = match value {
                opentelemetry::Value::Bool(flag) => AttributeValue::Bool(*flag),
                opentelemetry::Value::I64(number) => AttributeValue::Int(*number),
                opentelemetry::Value::F64(number) => AttributeValue::Float(*number),
                other => AttributeValue::from(other.to_string()),
            };
            (key.to_string(), value)
        })
        .collect()
}

/// The delay between exports: `OTEL_BSP_SCHEDULE_DELAY` (milliseconds, as OpenTelemetry's SDKs
/// read it) when set, else the config's.
fn export_delay(variable: Option<&str>, configured: Duration) -> anyhow::Result<Duration> {
    match variable.map(str::trim) {
        None | Some("") => Ok(configured),
        Some(value) => match value.parse::<u64>() {
            Ok(millis) if millis > 0 => Ok(Duration::from_millis(millis)),
            _ => anyhow::bail!(
                "OTEL_BSP_SCHEDULE_DELAY: `{value}` is not a positive whole number of milliseconds \
                 (unset it to use telemetry.otlp_export_delay_ms)"
            ),
        },
    }
}

enum Message {
    Span(FinishedSpan),
    Flush(oneshot::Sender<()>),
}

/// The calls' spans into a bounded queue, exported in batches from a thread of its own. The
/// export is woken when a batch is full, a flush is asked or the delay has passed, never per
/// span, as OpenTelemetry's batch processor is.
pub struct OtlpSpans {
    queue: mpsc::Sender<Message>,
    batch_ready: Arc<Notify>,
    /// Spans queued that make a batch: [`BATCH`], or the whole queue when it is smaller (else
    /// a small queue would fill, and drop spans, between two timed exports).
    batch: usize,
    /// OpenTelemetry's sampler as `OTEL_TRACES_SAMPLER` names it (parent-based, always on,
    /// unless set).
    sampler: Box<dyn ShouldSample>,
}

impl std::fmt::Debug for OtlpSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpSpans").field("batch", &self.batch).finish_non_exhaustive()
    }
}

impl OtlpSpans {
    /// The export runs on a thread of its own, as OpenTelemetry's batch processor does: turning
    /// a batch into protobuf takes long enough (about a millisecond for 512 spans) that on
    /// the runtime's workers it held up the requests queued behind it, and the gateway's p99
    /// showed it.
    fn start(telemetry: &TelemetrySettings) -> anyhow::Result<Self> {
        let destination =
            otlp::Destination::resolve(telemetry.otlp_endpoint.as_deref(), |name| std::env::var(name).ok())?;
        let client = reqwest::Client::builder()
            .timeout(destination.timeout)
            .build()
            .context("cannot build the HTTP client that exports traces")?;
        let encoder = otlp::Encoder::new(&resource(), "aipipe", env!("CARGO_PKG_VERSION"));
        let delay =
            export_delay(std::env::var("OTEL_BSP_SCHEDULE_DELAY").ok().as_deref(), telemetry.otlp_export_delay)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime that exports traces")?;
        let capacity = telemetry.otlp_queue_capacity.max(1);
        let (queue, received) = mpsc::channel(capacity);
        let batch_ready = Arc::new(Notify::new());
        let woken = batch_ready.clone();
        std::thread::Builder::new()
            .name("otlp-export".to_owned())
            .spawn(move || runtime.block_on(export(Exporter { client, destination, encoder }, received, woken, delay)))
            .context("cannot start the thread that exports traces")?;
        let sampler = opentelemetry_sdk::trace::Config::default().sampler;
        Ok(Self { queue, batch_ready, batch: BATCH.min(capacity), sampler })
    }

    /// Waits (blocking, off the runtime's workers: at shutdown) until what is queued now is
    /// exported.
    fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        let (done, exported) = oneshot::channel();
        self.queue.try_send(Message::Flush(done)).map_err(|_| anyhow::anyhow!("the export queue is full"))?;
        self.batch_ready.notify_one();
        let waited = std::thread::spawn(move || exported.blocking_recv());
        let started = std::time::Instant::now();
        while !waited.is_finished() {
            if started.elapsed() > timeout {
                anyhow::bail!("the collector did not take them within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl SpanSink for OtlpSpans {
    fn samples(&self, trace_id: W3cTraceId, parent_sampled: Option<bool>) -> bool {
        let trace_id = opentelemetry::trace::TraceId::from_bytes(trace_id.to_bytes());
        // The caller's span, as the sampler sees a remote parent: only its flag matters.
        let parent = parent_sampled.map(|sampled| {
            let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
            let span = opentelemetry::trace::SpanId::from_bytes(1_u64.to_be_bytes());
            opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                span,
                flags,
                true,
                TraceState::default(),
            ))
        });
        let kind = opentelemetry::trace::SpanKind::Server;
        let decision = self.sampler.should_sample(parent.as_ref(), trace_id, "aipipe.call", &kind, &[], &[]).decision;
        decision == SamplingDecision::RecordAndSample
    }

    fn export(&self, spans: Vec<FinishedSpan>) {
        for span in spans {
            if self.queue.try_send(Message::Span(span)).is_err() {
                SPANS_DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.queue.max_capacity() - self.queue.capacity() >= self.batch {
            // Stores one permit when the thread is not waiting: repeated calls cost an atomic.
            self.batch_ready.notify_one();
        }
    }
}

/// Where the export thread sends its batches, and the batch it is encoding.
struct Exporter {
    client: reqwest::Client,
    destination: otlp::Destination,
    encoder: otlp::Encoder,
}

impl Exporter {
    /// Sends the spans encoded so far; a failure drops them, counted, and is logged without
    /// the headers (they may hold a collector's key).
    async fn send(&mut self, spans: u64) {
        if self.encoder.is_empty() {
            return;
        }
        let body = self.encoder.finish();
        let sent = self
            .client
            .post(self.destination.url.clone())
            .headers(self.destination.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body)
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => format!("the collector answered {}", response.status()),
            Err(error) => error.without_url().to_string(),
        };
        SPANS_DROPPED.fetch_add(spans, Ordering::Relaxed);
        tracing::warn!(error = %failure, spans, url = %self.destination.url, "traces not exported");
    }
}

async fn export(
    mut exporter: Exporter,
    mut received: mpsc::Receiver<Message>,
    batch_ready: Arc<Notify>,
    delay: Duration,
) {
    loop {
        tokio::select! {
            () = batch_ready.notified() => {}
            () = tokio::time::sleep(delay) => {}
        }
        // What is queued now, and no more: spans that keep arriving wait for the next round
        // rather than keeping this one from ending.
        let queued = received.len();
        let mut encoded = 0;
        let mut flushed = Vec::new();
        let mut open = true;
        for _ in 0..queued.max(1) {
            match received.try_recv() {
                Ok(Message::Span(span)) => {
                    exporter.encoder.push(&span);
                    encoded += 1;
                    if encoded == BATCH as u64 {
                        exporter.send(encoded).await;
                        encoded = 0;
                    }
                }
                Ok(Message::Flush(done)) => flushed.push(done),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        exporter.send(encoded).await;
        for done in flushed {
            let _ = done.send(());
        }
        if !open {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_delay_variable_overrides_the_config_and_a_bad_one_is_named() {
        let configured = Duration::from_millis(1_000);
        assert_eq!(export_delay(None, configured).unwrap(), configured);
        assert_eq!(export_delay(Some(" "), configured).unwrap(), configured);
        assert_eq!(export_delay(Some("250"), configured).unwrap(), Duration::from_millis(250));
        for bad in ["0", "1s", "-5"] {
            let error = export_delay(Some(bad), configured).unwrap_err().to_string();
            assert!(error.starts_with("OTEL_BSP_SCHEDULE_DELAY: `"), "{error}");
            assert!(error.contains(bad), "{error}");
        }
    }
}
