//! The replay's report as one self-contained HTML file: the before/after tables, SVG charts
//! (calls and cost over the log's time, hit rate by component) and the semantic pairs served.
//! No scripts and nothing fetched: it opens from disk in any browser.

use std::fmt::Write;

use crate::replay::{Figures, ReplayReport, TimeBucket};

const BEFORE_COLOUR: &str = "#c0504d";
const AFTER_COLOUR: &str = "#2e75b6";
/// Pairs listed in the page; the JSON output has them all.
const MAX_PAIRS: usize = 500;

pub fn render(report: &ReplayReport) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>aipipe replay: {log}</title>\n\
         <style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border-bottom:1px solid #ddd;padding:4px 10px;\
         text-align:right}}td:first-child,th:first-child{{text-align:left}}.pairs td{{text-align:left;\
         vertical-align:top}}svg{{display:block;margin:1em 0}}.legend span{{margin-right:1.5em}}</style>\
         </head><body>\n<h1>aipipe replay</h1>\n<p>{log}: {replayed} calls replayed, {skipped} lines skipped, \
         {seconds:.2} s.</p>\n",
        log = escape(&report.log),
        replayed = report.replayed,
        skipped = report.skipped_lines,
        seconds = report.seconds,
    );
    page.push_str("<h2>Before and after</h2>\n");
    page.push_str(&figures_table(&report.before, &report.after));
    let _ = writeln!(
        page,
        "<p class=\"legend\"><span style=\"color:{BEFORE_COLOUR}\">&#9632; before (as logged)</span>\
         <span style=\"color:{AFTER_COLOUR}\">&#9632; after (through aipipe)</span></p>"
    );
    page.push_str("<h2>AI calls over time</h2>\n");
    page.push_str(&line_chart(&report.timeline, |b| (b.before_calls as f64, b.after_calls as f64), 0, "calls"));
    page.push_str("<h2>Cost over time (USD)</h2>\n");
    page.push_str(&line_chart(&report.timeline, |b| (b.before_cost_usd, b.after_cost_usd), 6, "USD"));
    page.push_str("<h2>Cache hit rate by component (after)</h2>\n");
    page.push_str(&hit_rate_bars(report));
    page.push_str(
        "<h2>By component</h2>\n<table><tr><th>component</th><th>calls</th><th>AI calls before</th>\
                   <th>after</th><th>cost before</th><th>after</th><th>p99 ms before</th><th>after</th>\
                   <th>errors before</th><th>after</th><th>hit rate</th></tr>\n",
    );
    for component in &report.components {
        let (b, a) = (&component.before, &component.after);
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.6}</td><td>{:.6}</td><td>{:.0}</td>\
             <td>{:.0}</td><td>{:.1}%</td><td>{:.1}%</td><td>{:.1}%</td></tr>",
            escape(&component.component),
            component.replayed,
            b.calls,
            a.calls,
            b.cost_usd,
            a.cost_usd,
            b.p99_ms,
            a.p99_ms,
            b.error_rate * 100.0,
            a.error_rate * 100.0,
            a.hit_rate * 100.0
        );
    }
    page.push_str("</table>\n");
    let _ = writeln!(
        page,
        "<h2>Answers served for a similar request ({})</h2>\n<p>Each row: the text of a call, the earlier \
         text whose answer it got, and how similar the two were. Judge whether they mean the same.</p>",
        report.semantic_pairs.len()
    );
    page.push_str(
        "<table class=\"pairs\"><tr><th>similarity</th><th>call</th><th>served the answer of</th>\
                   <th>source</th></tr>\n",
    );
    for pair in report.semantic_pairs.iter().take(MAX_PAIRS) {
        let _ = writeln!(
            page,
            "<tr><td>{:.3}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            pair.similarity,
            escape(&pair.text),
            escape(&pair.served_answer_of),
            pair.source
        );
    }
    page.push_str("</table>\n");
    if report.semantic_pairs.len() > MAX_PAIRS {
        let _ = writeln!(page, "<p>The first {MAX_PAIRS} shown; `--json` lists them all.</p>");
    }
    page.push_str("</body></html>\n");
    page
}

fn figures_table(before: &Figures, after: &Figures) -> String {
    let mttr = |figures: &Figures| figures.mttr_s.map_or("-".to_owned(), |seconds| format!("{seconds:.1} s"));
    let rows = [
        ("AI calls", before.calls.to_string(), after.calls.to_string()),
        ("cost (USD)", format!("{:.6}", before.cost_usd), format!("{:.6}", after.cost_usd)),
        ("p50 latency (ms)", format!("{:.0}", before.p50_ms), format!("{:.0}", after.p50_ms)),
        ("p99 latency (ms)", format!("{:.0}", before.p99_ms), format!("{:.0}", after.p99_ms)),
        ("error rate", format!("{:.1}%", before.error_rate * 100.0), format!("{:.1}%", after.error_rate * 100.0)),
        ("cache hit rate", format!("{:.1}%", before.hit_rate * 100.0), format!("{:.1}%", after.hit_rate * 100.0)),
        ("mean time to recovery", mttr(before), mttr(after)),
    ];
    let mut table = String::from("<table><tr><th></th><th>before</th><th>after</th></tr>\n");
    for (label, old, new) in rows {
        let _ = writeln!(table, "<tr><td>{label}</td><td>{old}</td><td>{new}</td></tr>");
    }
    table.push_str("</table>\n");
    table
}

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 240.0;
const MARGIN: f64 = 50.0;

/// Two polylines, before and after, over the timeline's buckets; the peak is labelled with
/// `decimals` digits.
fn line_chart(
    buckets: &[TimeBucket],
    values: impl Fn(&TimeBucket) -> (f64, f64),
    decimals: usize,
    unit: &str,
) -> String {
    let mut svg = format!(
        "<svg width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">\n"
    );
    let top = buckets.iter().map(|bucket| values(bucket).0.max(values(bucket).1)).fold(0.0, f64::max);
    let top = if top > 0.0 { top } else { 1.0 };
    let span = buckets.last().map_or(1.0, |bucket| bucket.start_s.max(1.0));
    let x = |seconds: f64| MARGIN + (seconds / span) * (WIDTH - 2.0 * MARGIN);
    let y = |value: f64| HEIGHT - MARGIN + 20.0 - (value / top) * (HEIGHT - MARGIN - 10.0);
    let _ = writeln!(
        svg,
        "<line x1=\"{MARGIN}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"#888\"/>\
         <line x1=\"{MARGIN}\" y1=\"10\" x2=\"{MARGIN}\" y2=\"{bottom}\" stroke=\"#888\"/>\
         <text x=\"{label_x}\" y=\"12\" font-size=\"11\">{top:.decimals$} {unit} per {slice}</text>\
         <text x=\"4\" y=\"{bottom}\" font-size=\"11\">0</text>\
         <text x=\"{right}\" y=\"{label}\" font-size=\"11\" text-anchor=\"end\">{hours:.1} h of log time</text>",
        bottom = y(0.0),
        label_x = MARGIN + 6.0,
        slice = slice_name(buckets),
        right = WIDTH - MARGIN,
        label = y(0.0) + 16.0,
        hours = span / 3600.0,
    );
    for (colour, pick) in [(BEFORE_COLOUR, true), (AFTER_COLOUR, false)] {
        let points: Vec<String> = buckets
            .iter()
            .map(|bucket| {
                let (old, new) = values(bucket);
                format!("{:.1},{:.1}", x(bucket.start_s), y(if pick { old } else { new }))
            })
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>",
            points.join(" ")
        );
    }
    svg.push_str("</svg>\n");
    svg
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

fn hit_rate_bars(report: &ReplayReport) -> String {
    const ROW: f64 = 22.0;
    const LABEL: f64 = 220.0;
    let height = ROW * report.components.len() as f64 + 10.0;
    let mut svg = format!(
        "<svg width=\"{WIDTH}\" height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" \
         xmlns=\"http://www.w3.org/2000/svg\" role=\"img\">\n"
    );
    for (index, component) in report.components.iter().enumerate() {
        let top = index as f64 * ROW + 5.0;
        let rate = component.after.hit_rate;
        let length = rate * (WIDTH - LABEL - 80.0);
        let _ = writeln!(
            svg,
            "<text x=\"{x}\" y=\"{text_y}\" font-size=\"12\" text-anchor=\"end\">{name}</text>\
             <rect x=\"{LABEL}\" y=\"{top}\" width=\"{length:.1}\" height=\"{bar}\" fill=\"{AFTER_COLOUR}\"/>\
             <text x=\"{value_x:.1}\" y=\"{text_y}\" font-size=\"12\">{percent:.1}%</text>",
            x = LABEL - 8.0,
            text_y = top + 13.0,
            name = escape(&component.component),
            bar = ROW - 6.0,
            value_x = LABEL + length + 6.0,
            percent = rate * 100.0,
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn text_from_the_log_cannot_become_markup() {
        assert_eq!(
            escape("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
    }
}
