//! Every benchmark writes its latest figures into docs/benchmarks.md, between markers of its
//! own, with the command, the date and the machine, so that the file never lags the code's
//! last measured run. The prose around the markers (what the figures mean, older runs kept
//! for comparison) is written by hand.

use std::fmt::Write;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::Value;

const FILE: &str = "docs/benchmarks.md";

/// Replaces the `bench`'s block in docs/benchmarks.md (appending one if the file has none)
/// with a table of `figures`: one row per figure, one column per field.
pub fn record<F: Serialize>(root: &Path, bench: &str, figures: &[F]) -> anyhow::Result<()> {
    record_run(root, bench, &format!("cargo xtask bench {bench}"), figures)
}

/// The same for a command other than `cargo xtask bench NAME`, under the block `key`.
pub fn record_run<F: Serialize>(root: &Path, key: &str, command: &str, figures: &[F]) -> anyhow::Result<()> {
    let bench = key;
    let rows: Vec<Value> = figures.iter().map(serde_json::to_value).collect::<Result<_, _>>()?;
    let begin = format!("<!-- bench {bench}: begin -->");
    let end = format!("<!-- bench {bench}: end -->");
    let block = format!("{begin}\n{}{end}", block(command, &rows));
    let path = root.join(FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let updated = match (text.find(&begin), text.find(&end)) {
        (Some(start), Some(stop)) if start < stop => format!("{}{block}{}", &text[..start], &text[stop + end.len()..]),
        _ => format!("{}\n\n## Latest run: bench {bench}\n\n{block}\n", text.trim_end()),
    };
    std::fs::write(&path, updated).with_context(|| format!("cannot write `{}`", path.display()))?;
    eprintln!("xtask: figures written to {FILE} (bench {bench})");
    Ok(())
}

fn block(command: &str, rows: &[Value]) -> String {
    let mut columns: Vec<&str> = Vec::new();
    for row in rows {
        for key in row.as_object().into_iter().flat_map(|fields| fields.keys()) {
            if !columns.contains(&key.as_str()) {
                columns.push(key);
            }
        }
    }
    // serde_json's objects are sorted by key; a row reads better led by its name.
    if let Some(position) = columns.iter().position(|column| *column == "name") {
        let name = columns.remove(position);
        columns.insert(0, name);
    }
    let mut text = format!(
        "Latest `{command}`, {}, on {} (written by the command):\n\n| {} |\n|{}\n",
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"),
        machine(),
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
    for row in rows {
        let cells: Vec<String> = columns.iter().map(|column| cell(&row[*column])).collect();
        let _ = writeln!(text, "| {} |", cells.join(" | "));
    }
    text
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        Value::Number(number) => match (number.as_u64(), number.as_f64()) {
            (Some(whole), _) => whole.to_string(),
            (None, Some(real)) if real.abs() >= 100.0 => format!("{real:.0}"),
            (None, Some(real)) => format!("{real:.3}"),
            _ => number.to_string(),
        },
        other => other.to_string(),
    }
}

/// CPU model, cores and memory, from /proc (Linux); what is unknown is left out.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| {
        info.lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
    });
    let cores = std::thread::available_parallelism().map(|cores| format!("{cores} cores")).ok();
    let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let kib: f64 = info.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
        Some(format!("{:.0} GiB", kib / 1024.0 / 1024.0))
    });
    let parts: Vec<String> = [cpu, cores, memory].into_iter().flatten().collect();
    if parts.is_empty() { "an unknown machine".to_owned() } else { parts.join(", ") }
}
