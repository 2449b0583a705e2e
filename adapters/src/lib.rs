//! Migrating components one at a time.
//!
//! [`legacy`] holds the components as they were: each with its own signature and its own
//! direct call to the model. [`shims`] holds one type per component with exactly the same
//! methods, which converts each call into an engine request and the engine's result back into
//! the old return and error types. Which path serves a component is its [`Mode`], read from a
//! [`MigrationPlan`] that can be replaced at run time ([`Modes::reload`]). In shadow mode the
//! old path serves the caller while the engine answers alongside; the two answers are compared
//! per step ([`Comparison`]) and recorded in a [`ShadowLog`] beside the telemetry.

mod compare;
pub mod legacy;
mod modes;
mod shadow;
pub mod shims;
mod status;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

pub use compare::Comparison;
pub use modes::{CutoverRule, MigrationPlan, Mode, Modes, PlanError};
use pipeline_core::{CallContext, CallOptions, Engine, PipelineError, PipelineResult, StepType, TraceId};
use serde_json::Value;
pub use shadow::{ShadowComparison, ShadowFigures, ShadowLog};
pub use status::{ComponentStatus, migration_status};
use tokio::sync::Notify;

/// One component's conversions between its legacy types and the engine's.
pub trait Conversion {
    /// The component's name: its key in the migration plan and in telemetry.
    const COMPONENT: &'static str;
    const COMPARISON: Comparison;
    type Output: Send + 'static;
    type Error: Send + 'static;

    fn step() -> StepType;

    /// The engine's answer or failure, as the legacy method would have returned it.
    fn from_pipeline(result: Result<PipelineResult, PipelineError>) -> Result<Self::Output, Self::Error>;

    /// What shadow mode compares of an answer.
    fn comparable(output: &Self::Output) -> Value;
}

/// What every shim shares: the engine, the live migration plan, the workspace its calls
/// belong to, and the runtime that synchronous shims block on.
#[derive(Debug, Clone)]
pub struct Adapter {
    engine: Engine,
    modes: Modes,
    workspace: String,
    runtime: tokio::runtime::Handle,
    shadows: ShadowLog,
    shadows_pending: Arc<(AtomicUsize, Notify)>,
}

impl Adapter {
    /// Must be called within a Tokio runtime: synchronous shims block on it from their own
    /// threads.
    pub fn new(engine: Engine, modes: Modes, workspace: impl Into<String>) -> Self {
        // The comparisons go to the database the engine's own rows go to.
        let shadows = ShadowLog::new(engine.recorder().store().clone());
        Self {
            engine,
            modes,
            workspace: workspace.into(),
            runtime: tokio::runtime::Handle::current(),
            shadows,
            shadows_pending: Arc::default(),
        }
    }

    pub fn modes(&self) -> &Modes {
        &self.modes
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Waits until every shadow comparison started so far is recorded.
    pub async fn settle_shadows(&self) {
        let (pending, done) = &*self.shadows_pending;
        loop {
            let notified = done.notified();
            if pending.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Serves one call of an async legacy method; `legacy` is the old code's call, not yet
    /// started (it only runs when the mode needs it).
    pub async fn serve<C, L>(&self, input: Value, legacy: L) -> Result<C::Output, C::Error>
    where
        C: Conversion,
        L: Future<Output = Result<C::Output, C::Error>>,
    {
        match self.modes.mode(C::COMPONENT) {
            Mode::Legacy => legacy.await,
            Mode::Pipeline => C::from_pipeline(self.ask::<C>(input, TraceId::random()).await),
            Mode::PipelineWithLegacyFallback => match C::from_pipeline(self.ask::<C>(input, TraceId::random()).await) {
                Ok(output) => Ok(output),
                Err(_) => {
                    tracing::warn!(component = C::COMPONENT, "engine failed; the legacy path answers");
                    legacy.await
                }
            },
            Mode::Shadow => {
                let shadow = self.start_shadow::<C>(input);
                let started = Instant::now();
                let served = legacy.await;
                self.finish_shadow::<C>(shadow, &served, started.elapsed());
                served
            }
        }
    }

    /// The same for a synchronous legacy method, from a thread that is not a runtime worker
    /// (where the old blocking code ran).
    pub fn serve_blocking<C, L>(&self, input: Value, legacy: L) -> Result<C::Output, C::Error>
    where
        C: Conversion,
        L: FnOnce() -> Result<C::Output, C::Error>,
    {
        let ask = |input| self.runtime.block_on(self.ask::<C>(input, TraceId::random()));
        match self.modes.mode(C::COMPONENT) {
            Mode::Legacy => legacy(),
            Mode::Pipeline => C::from_pipeline(ask(input)),
            Mode::PipelineWithLegacyFallback => C::from_pipeline(ask(input)).or_else(|_| {
                tracing::warn!(component = C::COMPONENT, "engine failed; the legacy path answers");
                legacy()
            }),
            Mode::Shadow => {
                let shadow = self.start_shadow::<C>(input);
                let started = Instant::now();
                let served = legacy();
                self.finish_shadow::<C>(shadow, &served, started.elapsed());
                served
            }
        }
    }

    async fn ask<C: Conversion>(&self, input: Value, trace_id: TraceId) -> Result<PipelineResult, PipelineError> {
        let context = CallContext::new(self.workspace.clone(), C::COMPONENT).with_trace_id(trace_id);
        // Legacy callers cannot see a confidence: a stand-in answer would pass for the model's.
        let options = CallOptions { allow_stand_in: false, ..CallOptions::default() };
        self.engine.execute(C::step(), input, context, options).await
    }

    /// Starts the engine's side of a shadow call, on the runtime, so that the caller never
    /// waits for it.
    fn start_shadow<C: Conversion>(&self, input: Value) -> Shadow {
        let trace_id = TraceId::random();
        let adapter = self.clone();
        let id = trace_id.clone();
        let engine_side = self.runtime.spawn(async move {
            let started = Instant::now();
            let result = adapter.ask::<C>(input, id).await;
            (result, started.elapsed())
        });
        Shadow { trace_id, engine_side }
    }

    /// Compares and records once the engine has answered, off the caller's path.
    fn finish_shadow<C: Conversion>(
        &self,
        shadow: Shadow,
        served: &Result<C::Output, C::Error>,
        legacy_took: Duration,
    ) {
        let legacy_view = served.as_ref().ok().map(C::comparable);
        let (pending, _) = &*self.shadows_pending;
        pending.fetch_add(1, Ordering::AcqRel);
        let adapter = self.clone();
        self.runtime.spawn(async move {
            let record = match shadow.engine_side.await {
                Ok((result, engine_took)) => {
                    let engine_ok = result.is_ok();
                    let engine_view = C::from_pipeline(result).ok().map(|output| C::comparable(&output));
                    let (similarity, agreed) = match (&legacy_view, &engine_view) {
                        (Some(legacy), Some(engine)) => C::COMPARISON.judge(legacy, engine),
                        // Both failing is agreement too: the caller saw an error either way.
                        (None, None) => (1.0, true),
                        _ => (0.0, false),
                    };
                    Some(ShadowComparison {
                        ts_ms: adapter.engine.now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64),
                        component: C::COMPONENT.to_owned(),
                        step: C::step().to_string(),
                        trace_id: shadow.trace_id.to_string(),
                        agreed,
                        similarity,
                        legacy_ok: legacy_view.is_some(),
                        engine_ok,
                        legacy_answer: legacy_view.as_ref().map(Value::to_string),
                        engine_answer: engine_view.as_ref().map(Value::to_string),
                        legacy_latency_ms: legacy_took.as_secs_f64() * 1000.0,
                        engine_latency_ms: engine_took.as_secs_f64() * 1000.0,
                    })
                }
                Err(err) => {
                    tracing::error!(component = C::COMPONENT, error = %err, "shadow call did not finish");
                    None
                }
            };
            if let Some(record) = record
                && let Err(err) = adapter.shadows.insert(&record).await
            {
                tracing::error!(component = C::COMPONENT, error = %err, "shadow comparison not recorded");
            }
            let (pending, done) = &*adapter.shadows_pending;
            pending.fetch_sub(1, Ordering::AcqRel);
            done.notify_waiters();
        });
    }
}

struct Shadow {
    trace_id: TraceId,
    engine_side: tokio::task::JoinHandle<(Result<PipelineResult, PipelineError>, Duration)>,
}
