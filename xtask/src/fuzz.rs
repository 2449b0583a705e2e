//! `cargo xtask fuzz`: every libFuzzer target in `fuzz/`, each for a bounded time.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// The targets in `fuzz/fuzz_targets`, each a parser that reads outside input.
const TARGETS: &[&str] =
    &["log_line", "config", "chat_request", "output_contract", "anthropic_stream", "openai_stream"];

pub fn fuzz(root: &Path, seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let installed = Command::new("cargo").args(["+nightly", "fuzz", "--version"]).current_dir(root).output();
    if !installed.is_ok_and(|output| output.status.success()) {
        bail!("cargo-fuzz is not installed for the nightly toolchain: `cargo install cargo-fuzz`");
    }
    let targets: Vec<&str> = match only {
        Some(target) if TARGETS.contains(&target) => vec![target],
        Some(target) => bail!("no fuzz target `{target}`: the targets are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    for target in targets {
        let corpus = root.join("fuzz").join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("cannot create `{}`", corpus.display()))?;
        let seeds = root.join("fuzz").join("seeds").join(target);
        eprintln!("xtask: fuzzing `{target}` for {seconds} s");
        let mut command = Command::new("cargo");
        // No AddressSanitizer: every crate of ours forbids `unsafe`, so it would only watch
        // the dependencies' unsafe code, at the price of 2.5 of the stage's 9 minutes of build
        // and four to five times fewer executions in the same seconds (measured on
        // `log_line` and `chat_request`).
        command.args(["+nightly", "fuzz", "run", "--sanitizer", "none", target]).arg(&corpus);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        // A crash makes libFuzzer exit non-zero and leaves the input under fuzz/artifacts.
        let status = command
            .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=4096", "-timeout=10"])
            .current_dir(root)
            .status()
            .with_context(|| format!("cannot run cargo fuzz for `{target}`"))?;
        if !status.success() {
            bail!(
                "fuzz target `{target}` failed ({status}): the input is under fuzz/artifacts/{target}/; add it to a \
                 regression test and fix the parser"
            );
        }
    }
    Ok(())
}
