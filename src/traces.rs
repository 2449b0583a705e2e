//! What the process tells about itself: its log on stderr, and, when a collector is named,
//! its spans as OpenTelemetry traces over OTLP/HTTP (protobuf).
//!
//! Export never holds up a call: a finished span goes into a bounded queue that a task drains
//! in batches to the exporter; when the queue is full the span is dropped and counted
//! ([`spans_dropped`], `aipipe_trace_spans_dropped_total`), and a collector that is down costs
//! an error in the log, never a call.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor};
use pipeline_core::TelemetrySettings;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

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

/// Ends the export when the process ends: [`Traces::shutdown`] sends what is queued.
#[derive(Debug)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// Exports the spans still queued (waiting at most a few seconds).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_WAIT)
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
    let provider = telemetry.filter(|telemetry| wanted(telemetry)).map(provider).transpose()?;
    // The spans of a call are at INFO in aipipe's own crates, whatever the log shows.
    let traced = Targets::new()
        .with_target("aipipe", LevelFilter::INFO)
        .with_target("pipeline_core", LevelFilter::INFO)
        .with_target("resilience", LevelFilter::INFO);
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("aipipe"))
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            // Busy and idle time per span cost a clock read on every poll of a call's future,
            // and making each span OpenTelemetry's current context on every poll is work that
            // nothing here reads: spans find their parents through tracing.
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(traced)
    });
    tracing_subscriber::registry().with(log).with(otel).try_init().context("the log was already set up")?;
    Ok(Traces { provider })
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

fn provider(telemetry: &TelemetrySettings) -> anyhow::Result<SdkTracerProvider> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(Protocol::HttpBinary);
    if let Some(endpoint) = &telemetry.otlp_endpoint {
        // As OTEL_EXPORTER_OTLP_ENDPOINT is read: the collector's base URL, the signal's path
        // added.
        let endpoint = endpoint.trim_end_matches('/');
        let traces =
            if endpoint.ends_with("/v1/traces") { endpoint.to_owned() } else { format!("{endpoint}/v1/traces") };
        builder = builder.with_endpoint(traces);
    }
    let mut exporter = builder.build().context("telemetry.otlp_endpoint: the OTLP exporter cannot be built")?;
    let service = std::env::var("OTEL_SERVICE_NAME").ok().filter(|name| !name.trim().is_empty());
    let resource = Resource::builder().with_service_name(service.unwrap_or_else(|| "aipipe".to_owned())).build();
    exporter.set_resource(&resource);
    let delay = export_delay(std::env::var("OTEL_BSP_SCHEDULE_DELAY").ok().as_deref(), telemetry.otlp_export_delay)?;
    let processor = QueueProcessor::spawn(exporter, telemetry.otlp_queue_capacity, delay)?;
    Ok(SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build())
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
    Span(Box<SpanData>),
    Flush(oneshot::Sender<()>),
}

/// Finished spans into a bounded queue, exported in batches from a thread of its own. The export
/// is woken when a batch is full, a flush is asked or the delay has passed, never per span, as
/// OpenTelemetry's batch processor is.
#[derive(Debug)]
struct QueueProcessor {
    queue: mpsc::Sender<Message>,
    batch_ready: Arc<Notify>,
    /// Spans queued that make a batch: [`BATCH`], or the whole queue when it is smaller (else
    /// a small queue would fill, and drop spans, between two timed exports).
    batch: usize,
}

impl QueueProcessor {
    /// The export runs on a thread of its own, as OpenTelemetry's batch processor does: turning
    /// a batch into protobuf takes long enough (about a millisecond for 512 spans) that on
    /// the runtime's workers it held up the requests queued behind it, and the gateway's p99
    /// showed it.
    fn spawn(exporter: opentelemetry_otlp::SpanExporter, capacity: usize, delay: Duration) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime that exports traces")?;
        let capacity = capacity.max(1);
        let (queue, received) = mpsc::channel(capacity);
        let batch_ready = Arc::new(Notify::new());
        let woken = batch_ready.clone();
        std::thread::Builder::new()
            .name("otlp-export".to_owned())
            .spawn(move || runtime.block_on(export(exporter, received, woken, delay)))
            .context("cannot start the thread that exports traces")?;
        Ok(Self { queue, batch_ready, batch: BATCH.min(capacity) })
    }

    /// Waits (blocking, off the runtime's workers: at shutdown) until what is queued now is
    /// exported.
    fn flush(&self, timeout: Duration) -> OTelSdkResult {
        let (done, exported) = oneshot::channel();
        self.queue.try_send(Message::Flush(done)).map_err(|_| OTelSdkError::InternalFailure("queue full".into()))?;
        self.batch_ready.notify_one();
        let waited = std::thread::spawn(move || exported.blocking_recv());
        let started = std::time::Instant::now();
        while !waited.is_finished() {
            if started.elapsed() > timeout {
                return Err(OTelSdkError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.queue.try_send(Message::Span(Box::new(span))).is_err() {
            SPANS_DROPPED.fetch_add(1, Ordering::Relaxed);
        } else if self.queue.max_capacity() - self.queue.capacity() >= self.batch {
            // Stores one permit when the task is not waiting: repeated calls cost an atomic.
            self.batch_ready.notify_one();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush(SHUTDOWN_WAIT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush(timeout)
    }
}

async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
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
        let mut spans = Vec::with_capacity(queued);
        let mut flushed = Vec::new();
        let mut open = true;
        for _ in 0..queued.max(1) {
            match received.try_recv() {
                Ok(Message::Span(span)) => spans.push(*span),
                Ok(Message::Flush(done)) => flushed.push(done),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        while !spans.is_empty() {
            let rest = spans.split_off(spans.len().min(BATCH));
            let batch = std::mem::replace(&mut spans, rest);
            let count = batch.len() as u64;
            if let Err(error) = exporter.export(batch).await {
                SPANS_DROPPED.fetch_add(count, Ordering::Relaxed);
                tracing::warn!(%error, spans = count, "traces not exported");
            }
        }
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
