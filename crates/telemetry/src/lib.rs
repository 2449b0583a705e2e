//! Telemetry: one [`CallRecord`] per AI call, whatever served it.
//!
//! Records go through a [`Recorder`]: a bounded queue drained by a background task that writes
//! batches through sqlx, so the call path never waits on the database. Overflow is counted and
//! logged, never silent. The same records feed the Prometheus [`Metrics`]. Costs come from a
//! [`PriceTable`].

mod anomaly;
mod error;
mod metrics;
mod price;
mod record;
mod recorder;
mod report;
mod span;
mod store;

pub use anomaly::{Alert, AlertSettings, AnomalyDetector, Watched};
pub use error::TelemetryError;
pub use metrics::Metrics;
pub use price::{ModelPrice, PriceTable, PricedTokens};
pub use record::{
    Audit, BreakerState, CallRecord, CallStatus, ErrorClass, Health, RouteExclusion, RouteRecord, RouteStrategy,
    Source, mean_recovery_secs,
};
pub use recorder::{Recorder, RecorderSettings};
pub use report::{Figures, Minute, Report, percentile};
pub use span::{AttributeValue, FinishedSpan, ParentSpan, SpanId, SpanKind, SpanSink, W3cTraceId};
pub use store::TelemetryStore;
