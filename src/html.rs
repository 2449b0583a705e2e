//! The replay's report as one self-contained HTML file: the before/after tables, SVG charts
//! (calls and cost over the log's time, hit rate by component) and the semantic pairs served.
//! No scripts and nothing fetched: it opens from disk in any browser. The page is
//! `report.html`, a minijinja template whose auto-escaping keeps text from the log text;
//! this module only works out what goes in it.

use anyhow::Context;
use minijinja::value::Serde;
use minijinja::{Environment, context};
use serde::Serialize;

use crate::replay::{Figures, ReplayReport, TimeBucket};
use crate::report::{computing, wrong_answers};

const TEMPLATE: &str = include_str!("report.html");
const BEFORE_COLOUR: &str = "#c0504d";
const AFTER_COLOUR: &str = "#2e75b6";
/// Pairs listed in the page; the JSON output has them all.
const MAX_PAIRS: usize = 500;
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 240.0;
const MARGIN: f64 = 50.0;

pub fn render(report: &ReplayReport) -> anyhow::Result<String> {
    let mut environment = Environment::new();
    // Named `.html`, the template escapes every value it prints.
    environment.add_template("report.html", TEMPLATE).context("the report template does not parse")?;
    let components: Vec<[String; 11]> = report
        .components
        .iter()
        .map(|component| {
            let (b, a) = (&component.before, &component.after);
            [
                component.component.clone(),
                component.replayed.to_string(),
                b.calls.to_string(),
                a.calls.to_string(),
                format!("{:.6}", b.cost_usd),
                format!("{:.6}", a.cost_usd),
                format!("{:.0}", b.p99_ms),
                format!("{:.0}", a.p99_ms),
                percent(b.error_rate),
                percent(a.error_rate),
                percent(a.hit_rate),
            ]
        })
        .collect();
    let pairs: Vec<_> = report
        .semantic_pairs
        .iter()
        .take(MAX_PAIRS)
        .map(|pair| {
            context! {
                similarity => format!("{:.3}", pair.similarity),
                text => &pair.text,
                served_answer_of => &pair.served_answer_of,
                source => pair.source.label(),
            }
        })
        .collect();
    let charts = [
        line_chart(
            "AI calls over time",
            &report.timeline,
            |b| (b.before_calls as f64, b.after_calls as f64),
            0,
            "calls",
        ),
        line_chart("Cost over time (USD)", &report.timeline, |b| (b.before_cost_usd, b.after_cost_usd), 6, "USD"),
    ];
    let bars = hit_rate_bars(report);
    let audits = report.audits.as_ref().map(|audits| {
        let cuts: Vec<_> = audits
            .cuts
            .iter()
            .map(|cut| {
                context! {
                    step => &cut.step,
                    workspace => cut.workspace.clone().unwrap_or_else(|| "(all)".to_owned()),
                    cut => match cut.cut {
                        pipeline_core::semantic_cache::audit::Cut::At(at) => format!("{at:.2}"),
                        pipeline_core::semantic_cache::audit::Cut::Never => "serves nothing".to_owned(),
                    },
                    prior => format!("{:.2}", cut.prior.value()),
                    verdicts => format!("{:.0}", cut.audits),
                    wrong => format!("{} (95%: up to {})", percent(cut.wrong_rate.estimate), percent(cut.wrong_rate.upper)),
                }
            })
            .collect();
        context! {
            audits => audits.audits,
            disagreements => audits.disagreements,
            cost => format!("{:.6}", audits.cost_usd),
            cuts => cuts,
        }
    });
    let page = environment.get_template("report.html").and_then(|template| {
        template.render(context! {
            log => &report.log,
            replayed => report.replayed,
            skipped => report.skipped_lines,
            seconds => format!("{:.2}", report.seconds),
            computing => computing(report),
            figures => Serde(figure_rows(&report.before, &report.after)),
            before_colour => BEFORE_COLOUR,
            after_colour => AFTER_COLOUR,
            width => WIDTH,
            height => HEIGHT,
            margin => MARGIN,
            charts => Serde(charts),
            bars_height => 22.0 * report.components.len() as f64 + 10.0,
            bars => Serde(bars),
            components => Serde(components),
            pairs => pairs,
            pairs_total => report.semantic_pairs.len(),
            audits => audits,
        })
    });
    page.context("the report could not be rendered")
}

/// A row of the before/after table: a label and the two sides, formatted.
#[derive(Debug, Serialize)]
struct FigureRow {
    label: &'static str,
    before: String,
    after: String,
}

fn figure_rows(before: &Figures, after: &Figures) -> Vec<FigureRow> {
    let mttr = |figures: &Figures| figures.mttr_s.map_or("-".to_owned(), |seconds| format!("{seconds:.1} s"));
    let row = |label, before, after| FigureRow { label, before, after };
    vec![
        row("AI calls", before.calls.to_string(), after.calls.to_string()),
        row("cost (USD)", format!("{:.6}", before.cost_usd), format!("{:.6}", after.cost_usd)),
        row("p50 latency (ms)", format!("{:.0}", before.p50_ms), format!("{:.0}", after.p50_ms)),
        row("p99 latency (ms)", format!("{:.0}", before.p99_ms), format!("{:.0}", after.p99_ms)),
        row("error rate", percent(before.error_rate), percent(after.error_rate)),
        row("degraded (a stand-in answered)", percent(before.degraded_rate), percent(after.degraded_rate)),
        row("cache hit rate", percent(before.hit_rate), percent(after.hit_rate)),
        row("wrong answers served", wrong_answers(before), wrong_answers(after)),
        row("mean time to recovery", mttr(before), mttr(after)),
    ]
}

fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// Two polylines, before and after, over the timeline's buckets.
#[derive(Debug, Serialize)]
struct LineChart {
    title: &'static str,
    /// The peak, with its unit (`decimals` digits).
    peak: String,
    slice: String,
    hours: String,
    bottom: f64,
    right: f64,
    before: String,
    after: String,
}

fn line_chart(
    title: &'static str,
    buckets: &[TimeBucket],
    values: impl Fn(&TimeBucket) -> (f64, f64),
    decimals: usize,
    unit: &str,
) -> LineChart {
    let top = buckets.iter().map(|bucket| values(bucket).0.max(values(bucket).1)).fold(0.0, f64::max);
    let top = if top > 0.0 { top } else { 1.0 };
    let span = buckets.last().map_or(1.0, |bucket| bucket.start_s.max(1.0));
    let x = |seconds: f64| MARGIN + (seconds / span) * (WIDTH - 2.0 * MARGIN);
    let y = |value: f64| HEIGHT - MARGIN + 20.0 - (value / top) * (HEIGHT - MARGIN - 10.0);
    let points = |pick_before: bool| {
        let points: Vec<String> = buckets
            .iter()
            .map(|bucket| {
                let (old, new) = values(bucket);
                format!("{:.1},{:.1}", x(bucket.start_s), y(if pick_before { old } else { new }))
            })
            .collect();
        points.join(" ")
    };
    LineChart {
        title,
        peak: format!("{top:.decimals$} {unit}"),
        slice: slice_name(buckets),
        hours: format!("{:.1}", span / 3600.0),
        bottom: y(0.0),
        right: WIDTH - MARGIN,
        before: points(true),
        after: points(false),
    }
}

/// How long one bucket of the timeline is, in words.
fn slice_name(buckets: &[TimeBucket]) -> String {
    match buckets {
        [first, second, ..] => match second.start_s - first.start_s {
            seconds if seconds >= 3600.0 => format!("{:.0} h", seconds / 3600.0),
            seconds if seconds >= 60.0 => format!("{:.0} min", seconds / 60.0),
            seconds => format!("{seconds:.0} s"),
        },
        _ => "slice".to_owned(),
    }
}

/// One component's bar in the hit-rate chart.
#[derive(Debug, Serialize)]
struct Bar {
    name: String,
    percent: String,
    label_x: f64,
    x: f64,
    top: f64,
    text_y: f64,
    length: String,
    thickness: f64,
    value_x: String,
}

fn hit_rate_bars(report: &ReplayReport) -> Vec<Bar> {
    const ROW: f64 = 22.0;
    const LABEL: f64 = 220.0;
    report
        .components
        .iter()
        .enumerate()
        .map(|(index, component)| {
            let top = index as f64 * ROW + 5.0;
            let rate = component.after.hit_rate;
            let length = rate * (WIDTH - LABEL - 80.0);
            Bar {
                name: component.component.clone(),
                percent: percent(rate),
                label_x: LABEL - 8.0,
                x: LABEL,
                top,
                text_y: top + 13.0,
                length: format!("{length:.1}"),
                thickness: ROW - 6.0,
                value_x: format!("{:.1}", LABEL + length + 6.0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use minijinja::{Environment, context};

    #[test]
    fn text_from_the_log_cannot_become_markup() {
        let mut environment = Environment::new();
        environment.add_template("report.html", super::TEMPLATE).unwrap();
        let page = environment
            .get_template("report.html")
            .unwrap()
            .render(context! { log => "<script>alert('x') & \"y\"</script>", pairs => Vec::<i32>::new() })
            .unwrap();
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&#x27;x&#x27;) &amp; &quot;y&quot;&lt;&#x2f;script&gt;"), "{page}");
    }
}
