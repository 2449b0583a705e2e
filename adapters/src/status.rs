use std::collections::BTreeSet;

use pipeline_core::telemetry::{TelemetryError, TelemetryStore};
use serde::Serialize;

use crate::{MigrationPlan, Mode, ShadowLog};

/// The components this crate has shims for.
pub const COMPONENTS: [&str; 6] = ["classifier", "enhancer", "extractor", "prioritizer", "summarizer", "validator"];

/// Where one component stands, from its mode and its calls in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentStatus {
    pub component: String,
    pub mode: Mode,
    /// Engine calls made for the component (in shadow mode, the shadow calls).
    pub calls: u64,
    pub shadow_comparisons: u64,
    pub agreement_rate: Option<f64>,
    pub engine_error_rate: Option<f64>,
    /// Spend per engine call, caches included.
    pub new_cost_per_call: Option<f64>,
    /// What one model request costs for this component: the old path made at least one per
    /// call, so this is the old cost per call at best.
    pub old_cost_per_call: Option<f64>,
    /// In shadow mode, agreement and call count meet the plan's cut-over rule.
    pub ready_to_cut_over: bool,
}

/// One status per component: the six shimmed ones, and any other the plan or the telemetry of
/// the window names.
pub async fn migration_status(
    store: &TelemetryStore,
    plan: &MigrationPlan,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<ComponentStatus>, TelemetryError> {
    let report = store.report(from_ms, to_ms).await?;
    let shadows = ShadowLog::new(store.clone()).figures(from_ms, to_ms).await?;
    let names: BTreeSet<String> = COMPONENTS
        .iter()
        .map(|name| (*name).to_owned())
        .chain(plan.components.keys().cloned())
        .chain(shadows.keys().cloned())
        .collect();
    Ok(names
        .into_iter()
        .map(|component| {
            let figures = report.components.get(&component);
            let shadow = shadows.get(&component).copied();
            let calls = figures.map_or(0, |figures| figures.calls);
            let comparisons = shadow.map_or(0, |shadow| shadow.comparisons);
            let agreement_rate = shadow.and_then(|shadow| shadow.agreement_rate());
            let mode = plan.mode(&component);
            let ready_to_cut_over = mode == Mode::Shadow
                && comparisons >= plan.cutover.min_calls
                && agreement_rate.is_some_and(|rate| rate >= plan.cutover.min_agreement);
            ComponentStatus {
                mode,
                calls,
                shadow_comparisons: comparisons,
                agreement_rate,
                engine_error_rate: figures.filter(|f| f.calls > 0).map(|f| f.error_rate),
                new_cost_per_call: figures.filter(|f| f.calls > 0).map(|f| f.cost_usd / f.calls as f64),
                old_cost_per_call: figures
                    .filter(|f| f.upstream_requests > 0)
                    .map(|f| f.cost_usd / f.upstream_requests as f64),
                ready_to_cut_over,
                component,
            }
        })
        .collect())
}
