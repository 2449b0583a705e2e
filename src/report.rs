//! The replay's before/after table for a terminal.

use std::fmt::Write;

use pipeline_core::Source;

use crate::replay::{Figures, ReplayReport};

pub fn table(report: &ReplayReport) -> String {
    let mut out = String::new();
    let (b, a) = (&report.before, &report.after);
    let _ = writeln!(
        out,
        "aipipe replay of {}: {} calls replayed, {} lines skipped, {:.2} s",
        report.log, report.replayed, report.skipped_lines, report.seconds
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "{:<18} {:>14} {:>14} {:>9}", "", "before", "after", "change");
    let rows: [Row; 7] = [
        ("AI calls", |f| f.calls as f64, Format::Count),
        ("cost (USD)", |f| f.cost_usd, Format::Usd),
        ("p50 latency (ms)", |f| f.p50_ms, Format::Millis),
        ("p99 latency (ms)", |f| f.p99_ms, Format::Millis),
        ("error rate", |f| f.error_rate, Format::Percent),
        ("degraded", |f| f.degraded_rate, Format::Percent),
        ("cache hit rate", |f| f.hit_rate, Format::Percent),
    ];
    for (label, field, format) in rows {
        let (before, after) = (field(b), field(a));
        let change = match format {
            Format::Percent => format!("{:+.1} pt", (after - before) * 100.0),
            _ if before == 0.0 => "-".to_owned(),
            _ => format!("{:+.1}%", (after - before) / before * 100.0),
        };
        let _ = writeln!(out, "{label:<18} {:>14} {:>14} {change:>9}", format.show(before), format.show(after));
    }
    let _ = writeln!(out, "{:<18} {:>14} {:>14}", "wrong answers", wrong_answers(b), wrong_answers(a));
    let mttr = |figures: &Figures| figures.mttr_s.map_or("-".to_owned(), |seconds| format!("{seconds:.1} s"));
    let _ = writeln!(out, "{:<18} {:>14} {:>14}", "recovery (mean)", mttr(b), mttr(a));
    if let Some(audits) = &report.audits {
        let _ = writeln!(
            out,
            "{:<18} {:>14} {:>14}   {} disagreed, {:.6} USD (not in the cost above)",
            "audits", "-", audits.audits, audits.disagreements, audits.cost_usd
        );
        for cut in audits.cuts.iter().filter(|cut| cut.workspace.is_none()) {
            let at = match cut.cut {
                pipeline_core::semantic_cache::audit::Cut::At(at) => format!("{at:.2}"),
                pipeline_core::semantic_cache::audit::Cut::Never => "none served".to_owned(),
            };
            let _ = writeln!(
                out,
                "  cut of {:<11} {at:>14} (offline {:.2}; {:.0} verdicts, wrong at the cut {:.1}%, 95% up to {:.1}%)",
                cut.step,
                cut.prior.value(),
                cut.audits,
                cut.wrong_rate.estimate * 100.0,
                cut.wrong_rate.upper * 100.0
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Latencies are on the log's clock, waits included; the engine's own computing is apart: {}.",
        computing(report)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>13} {:>22} {:>15} {:>6}",
        "by component", "calls", "AI calls", "cost (USD)", "errors", "hits"
    );
    for component in &report.components {
        let (b, a) = (&component.before, &component.after);
        let _ = writeln!(
            out,
            "{:<24} {:>6} {:>13} {:>22} {:>15} {:>5.1}%",
            truncate(&component.component, 24),
            component.replayed,
            format!("{} -> {}", b.calls, a.calls),
            format!("{:.6} -> {:.6}", b.cost_usd, a.cost_usd),
            format!("{:.1}% -> {:.1}%", b.error_rate * 100.0, a.error_rate * 100.0),
            a.hit_rate * 100.0
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>15} {:>22} {:>15} {:>9} {:>10}",
        "by model", "AI calls", "cost (USD)", "p50 (ms)", "errors", "estimated"
    );
    for model in &report.models {
        let (b, a) = (&model.before, &model.after);
        let _ = writeln!(
            out,
            "{:<24} {:>15} {:>22} {:>15} {:>9} {:>10}",
            truncate(&model.model, 24),
            format!("{} -> {}", b.calls, a.calls),
            format!("{:.6} -> {:.6}", b.cost_usd, a.cost_usd),
            format!("{:.0} -> {:.0}", b.p50_ms, a.p50_ms),
            format!("{} -> {}", b.errors, a.errors),
            a.estimated
        );
    }
    let _ = writeln!(out);
    let semantic = report.semantic_pairs.iter().filter(|pair| pair.source == Source::SemanticCache).count();
    let _ = writeln!(
        out,
        "{semantic} calls served a similar request's answer (semantic cache), {} more as fallbacks; \
         the pairs are listed in the HTML report and --json.",
        report.semantic_pairs.len() - semantic
    );
    let _ = writeln!(out, "telemetry: {} rows written to {}", report.telemetry_rows, report.db);
    if let Some(html) = &report.html {
        let _ = writeln!(out, "report: {html} (open it in a browser)");
    }
    out
}

/// The engine's own computing per call, which the replay's clock does not count.
pub fn computing(report: &ReplayReport) -> String {
    let embedding = report
        .embedding_ms_per_text
        .map(|ms| format!("; embedding a text takes {ms:.1} ms on one core"))
        .unwrap_or_default();
    format!("p50 {:.2} ms, p99 {:.2} ms per call{embedding}", report.engine_ms_p50, report.engine_ms_p99)
}

/// Semantic hits that served the answer of a request that means something else: `n of hits`
/// where the log says what each call means, else the expected number (`est.`).
pub fn wrong_answers(figures: &Figures) -> String {
    match (figures.semantic_hits, figures.wrong_answers_estimated) {
        (0, _) => "0".to_owned(),
        (hits, false) => format!("{:.0} of {hits}", figures.wrong_answers_served),
        (_, true) => format!("{:.2} (est.)", figures.wrong_answers_served),
    }
}

fn truncate(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(chars - 1).collect();
    short.push('~');
    short
}

/// A table row: its label, the figure it shows and how to print it.
type Row = (&'static str, fn(&Figures) -> f64, Format);

#[derive(Clone, Copy)]
enum Format {
    Count,
    Usd,
    Millis,
    Percent,
}

impl Format {
    fn show(self, value: f64) -> String {
        match self {
            Self::Count => format!("{value:.0}"),
            Self::Usd => format!("{value:.6}"),
            Self::Millis => format!("{value:.0}"),
            Self::Percent => format!("{:.1}%", value * 100.0),
        }
    }
}
