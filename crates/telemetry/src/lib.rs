//! Telemetry: one [`CallRecord`] per AI call, whatever served it.
//!
//! Records go through a [`Recorder`]: a bounded queue drained by a background task that writes
//! batches through sqlx, so the call path never waits on the database. Overflow is counted and
//! logged, never silent. Costs come from a [`PriceTable`].

mod error;
mod price;
mod record;
mod recorder;
mod store;

pub use error::TelemetryError;
pub use price::{ModelPrice, PriceTable};
pub use record::{CallRecord, CallStatus};
pub use recorder::{Recorder, RecorderSettings};
pub use store::TelemetryStore;
