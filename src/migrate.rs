//! `aipipe migrate status`: the migration table of docs/migration.md.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use adapters::{MigrationPlan, migration_status};
use anyhow::Context;
use pipeline_core::telemetry::TelemetryStore;

pub async fn status(plan: &Path, db: &str, hours: f64, json: bool) -> anyhow::Result<String> {
    let window = Duration::try_from_secs_f64(hours * 3600.0)
        .ok()
        .filter(|window| !window.is_zero())
        .with_context(|| format!("--hours {hours}: give a positive number of hours"))?;
    let plan = MigrationPlan::load(plan)?;
    let store = TelemetryStore::connect(db).await.with_context(|| format!("cannot read telemetry from `{db}`"))?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let from = now.saturating_sub(window);
    let rows = migration_status(&store, &plan, from.as_millis() as i64, now.as_millis() as i64 + 1).await?;
    store.close().await;
    let mut out = String::new();
    if json {
        for row in &rows {
            writeln!(out, "{}", serde_json::to_string(row)?)?;
        }
        return Ok(out);
    }
    let percent = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |value| format!("{:.1}%", value * 100.0));
    let dollars = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |value| format!("${value:.6}"));
    writeln!(
        out,
        "{:<12} {:<30} {:>7} {:>9} {:>10} {:>12} {:>12} {:>12}  cut over?",
        "component", "mode", "calls", "compared", "agreement", "engine err", "old $/call", "new $/call"
    )?;
    for row in &rows {
        let ready = if row.ready_to_cut_over {
            "ready"
        } else if row.mode == adapters::Mode::Shadow {
            "not yet"
        } else {
            "-"
        };
        writeln!(
            out,
            "{:<12} {:<30} {:>7} {:>9} {:>10} {:>12} {:>12} {:>12}  {ready}",
            row.component,
            row.mode.label(),
            row.calls,
            row.shadow_comparisons,
            percent(row.agreement_rate),
            percent(row.engine_error_rate),
            dollars(row.old_cost_per_call),
            dollars(row.new_cost_per_call),
        )?;
    }
    writeln!(
        out,
        "\ncut-over rule: agreement >= {:.1}% over >= {} shadow calls",
        plan.cutover.min_agreement * 100.0,
        plan.cutover.min_calls
    )?;
    Ok(out)
}
