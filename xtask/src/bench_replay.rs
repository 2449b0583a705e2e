//! `cargo xtask bench replay`: how fast `aipipe replay` (the release binary, as a user runs
//! it) gets through a generated 50,000-call log, with the embedded defaults (semantic cache on)
//! and, to show where the time goes, with the semantic cache off.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;

use xtask::gen_log::{GenLogArgs, gen_log};

const CALLS: usize = 50_000;

#[derive(Debug, Serialize)]
struct ReplayFigure {
    name: &'static str,
    calls: u64,
    seconds: f64,
    calls_per_second: f64,
}

pub fn bench_replay(json: bool, root: &Path, data: &Path) -> anyhow::Result<()> {
    let aipipe = crate::release_binary(root)?;
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("generated-50k.jsonl");
    gen_log(&GenLogArgs::with_defaults(&log, CALLS)?, data)?;
    let mut figures = Vec::new();
    for (name, semantic) in [("replay", true), ("replay_exact_cache_only", false)] {
        let db = dir.path().join(format!("{name}.db"));
        let started = Instant::now();
        let output = Command::new(&aipipe)
            .arg("replay")
            .arg(&log)
            .arg("--db")
            .arg(&db)
            .arg("--json")
            .env("AIPIPE_SEMANTIC__ENABLED", semantic.to_string())
            .env_remove("AIPIPE_CONFIG")
            .output()
            .with_context(|| format!("cannot run `{}`", aipipe.display()))?;
        let seconds = started.elapsed().as_secs_f64();
        if !output.status.success() {
            bail!("aipipe replay failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).context("aipipe replay --json")?;
        let calls = report["replayed"].as_u64().context("no `replayed` in the replay's JSON")?;
        figures.push(ReplayFigure { name, calls, seconds, calls_per_second: calls as f64 / seconds });
    }
    crate::record::record(root, "replay", &figures)?;
    for figure in &figures {
        if json {
            println!("{}", serde_json::to_string(figure)?);
        } else {
            println!(
                "{:<24} {:>6} calls in {:>6.1} s   {:>7.0} calls/s",
                figure.name, figure.calls, figure.seconds, figure.calls_per_second
            );
        }
    }
    Ok(())
}
