//! Project automation, run as `cargo xtask <command>`.
// Printing reports on stdout is what these tasks are for.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use xtask::gen_log;

mod bench;
mod bench_gateway;
mod bench_replay;
mod bench_shared;
mod boost;
mod calibrate;
mod eval;
mod fuzz;
mod record;
mod soak;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "aipipe's project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// What CI runs: formatting check, clippy with warnings as errors, the whole test suite.
    Ci,
    /// Benchmarks, on this machine; each writes its figures into docs/benchmarks.md. `cache`: lookups of both caches at 1k, 10k and 100k
    /// entries, embedding throughput, memory per entry. `engine`: the engine's own overhead
    /// per call, with an in-process provider that answers at once. `gateway`: requests per
    /// second and added latency of `aipipe serve` against a loopback upstream, versus that
    /// upstream called directly by the same load generator. `replay`: `aipipe replay` of a
    /// generated 50,000-call log, with and without the semantic cache. `shared`: state shared
    /// through Redis (exact and semantic lookups, limiter decisions, one replica against two);
    /// needs Debian's `redis-server`.
    Bench {
        #[arg(value_enum)]
        what: BenchTarget,
        /// Print one JSON object per figure.
        #[arg(long)]
        json: bool,
    },
    /// Writes a seed-like call log from the real text in ../shared/data (never into the
    /// repository), for `aipipe replay`.
    GenLog(gen_log::GenLogArgs),
    /// Trains the semantic cache's learned verifier on the dev pairs and writes
    /// crates/semantic-cache/verifier.json (reruns itself from a release build).
    Calibrate {
        /// Precision the probability cut must reach on held-out dev pairs.
        #[arg(long, default_value_t = 0.90)]
        target_precision: f64,
        /// Print one JSON object per dev file.
        #[arg(long)]
        json: bool,
    },
    /// Runs every fuzz target (`fuzz/`: the call-log reader, the config loader, the gateway's
    /// request parser, the output-contract parser) for this many seconds each, with cargo-fuzz
    /// on the nightly toolchain; a crash stops it and names the input that caused it.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// One target instead of all.
        #[arg(long)]
        target: Option<String>,
    },
    /// Drives `aipipe serve` (release build) at a fixed rate against an upstream that cycles
    /// through faults (answers, a 429 storm, a 503 outage, stalls, malformed replies), and
    /// reports what was sent, answered and refused, the telemetry rows, and the gateway's
    /// memory and open files at the start and the end.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Requests per second.
        #[arg(long, default_value_t = 40)]
        rate: u32,
        /// Print one JSON object per figure.
        #[arg(long)]
        json: bool,
    },
    /// Runs the semantic cache's served decision over labelled pairs and reports precision,
    /// recall and false-positive rate per file, with a threshold sweep.
    EvalCache {
        /// JSON-lines pair files; default: the test files in ../shared/data/pairs.
        files: Vec<PathBuf>,
        /// Use the dev files (for tuning) instead of the test files (for reporting).
        #[arg(long)]
        dev: bool,
        /// At most this many pairs per file.
        #[arg(long)]
        limit: Option<usize>,
        /// Print one JSON object per file.
        #[arg(long)]
        json: bool,
        /// Evaluate at this cosine threshold (the plain decision's) instead of the shipped one.
        #[arg(long)]
        threshold: Option<f32>,
        /// Evaluate at this probability cut (the learned verifier's) instead of the shipped one.
        #[arg(long)]
        min_confidence: Option<f32>,
        /// Also print every pair with its similarity and the decision (for small files).
        #[arg(long, conflicts_with = "json")]
        each: bool,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Ci => ci(),
        Task::Bench { what, json } if cfg!(debug_assertions) => {
            let what = clap::ValueEnum::to_possible_value(&what).map(|value| value.get_name().to_owned());
            release_rerun(&["bench", what.unwrap_or_default().as_str()], json)
        }
        Task::Bench { what: BenchTarget::Cache, json } => {
            workspace_root().and_then(|root| bench::bench_cache(json, &root))
        }
        Task::Bench { what: BenchTarget::Engine, json } => {
            workspace_root().and_then(|root| bench::bench_engine(json, &root))
        }
        Task::Bench { what: BenchTarget::Gateway, json } => {
            workspace_root().and_then(|root| bench_gateway::bench_gateway(json, &root))
        }
        Task::Bench { what: BenchTarget::Shared, json } => {
            workspace_root().and_then(|root| bench_shared::bench_shared(json, &root))
        }
        Task::Bench { what: BenchTarget::Replay, json } => workspace_root()
            .and_then(|root| data_folder().and_then(|data| bench_replay::bench_replay(json, &root, &data))),
        Task::Calibrate { target_precision, json } if cfg!(debug_assertions) => {
            let target = target_precision.to_string();
            release_rerun(&["calibrate", "--target-precision", target.as_str()], json)
        }
        Task::Calibrate { target_precision, json } => workspace_root().and_then(|root| {
            data_folder().and_then(|data| {
                calibrate::calibrate(&root, &data, &calibrate::CalibrateOptions { target_precision, json })
            })
        }),
        Task::GenLog(args) => data_folder().and_then(|data| gen_log::gen_log(&args, &data)),
        Task::Fuzz { seconds, target } => {
            workspace_root().and_then(|root| fuzz::fuzz(&root, seconds, target.as_deref()))
        }
        Task::Soak { minutes, rate, json } => {
            workspace_root().and_then(|root| soak::soak(&root, &soak::SoakOptions { minutes, rate, json }))
        }
        Task::EvalCache { files, dev, limit, json, threshold, min_confidence, each } => {
            eval_cache(files, dev, limit, json, threshold, min_confidence, each)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum BenchTarget {
    Cache,
    Engine,
    Gateway,
    Replay,
    Shared,
}

/// Figures from a debug build would measure the compiler's settings, not the code, and training
/// would crawl: benchmarks and calibration always run from a release build of this same command.
fn release_rerun(task: &[&str], json: bool) -> anyhow::Result<()> {
    let root = workspace_root()?;
    let mut args = vec!["run", "--release", "--locked", "--quiet", "--package", "xtask", "--"];
    args.extend(task);
    if json {
        args.push("--json");
    }
    cargo(&root, &args)
}

fn eval_cache(
    files: Vec<PathBuf>,
    dev: bool,
    limit: Option<usize>,
    json: bool,
    threshold: Option<f32>,
    min_confidence: Option<f32>,
    each: bool,
) -> anyhow::Result<()> {
    let files = if files.is_empty() {
        let folder = data_folder()?.join("pairs");
        let split = if dev { "dev" } else { "test" };
        ["qqp", "stsb", "mrpc"].iter().map(|set| folder.join(format!("{set}-{split}.jsonl"))).collect()
    } else {
        files
    };
    let semantic = pipeline_core::Config::defaults()?.semantic;
    let bar = semantic_cache::ServeBar {
        threshold: threshold.unwrap_or(semantic.threshold),
        min_confidence: min_confidence.unwrap_or(semantic.min_confidence),
    };
    eval::eval_cache(&eval::EvalOptions { files, json, limit, bar, each })
}

/// The labelled data lives beside the repository (`../shared/data`), never inside it;
/// `AIPIPE_DATA` points elsewhere.
fn data_folder() -> anyhow::Result<PathBuf> {
    let folder = match std::env::var_os("AIPIPE_DATA") {
        Some(folder) => PathBuf::from(folder),
        None => workspace_root()?.join("..").join("shared").join("data"),
    };
    if !folder.is_dir() {
        bail!("no data folder at `{}`: set AIPIPE_DATA to the folder holding pairs/", folder.display());
    }
    Ok(folder)
}

fn ci() -> anyhow::Result<()> {
    let root = workspace_root()?;
    cargo(&root, &["fmt", "--all", "--", "--check"]).context("formatting differs: run `cargo fmt --all`")?;
    // The semantic-cache tests use the real local model; installing it is a no-op when present.
    cargo(&root, &["run", "--locked", "--quiet", "--", "setup"])?;
    cargo(&root, &["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"])?;
    if nextest_available(&root) {
        // nextest does not run doc tests. They go first so that the suite's own summary is
        // the last thing a run prints.
        cargo(&root, &["test", "--workspace", "--locked", "--doc"])?;
        cargo(&root, &["nextest", "run", "--workspace", "--locked", "--no-fail-fast"])?;
    } else {
        eprintln!("xtask: cargo-nextest not found; running the suite with cargo test");
        cargo(&root, &["test", "--workspace", "--locked", "--no-fail-fast"])?;
    }
    Ok(())
}

pub(crate) fn cargo(root: &PathBuf, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(cargo_bin())
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn nextest_available(root: &PathBuf) -> bool {
    Command::new(cargo_bin())
        .args(["nextest", "--version"])
        .current_dir(root)
        .output()
        .is_ok_and(|output| output.status.success())
}

fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The `aipipe` binary, built in release mode: what a user runs.
fn release_binary(root: &std::path::Path) -> anyhow::Result<PathBuf> {
    cargo(&root.to_path_buf(), &["build", "--release", "--locked", "--quiet", "--bin", "aipipe"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let binary = target.join("release").join("aipipe");
    if !binary.is_file() {
        bail!("no release binary at `{}` after building it", binary.display());
    }
    Ok(binary)
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map(PathBuf::from).context("xtask must live one folder below the workspace root")
}
