//! Project automation, run as `cargo xtask <command>`.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Ci => ci(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn ci() -> anyhow::Result<()> {
    let root = workspace_root()?;
    cargo(&root, &["fmt", "--all", "--", "--check"]).context("formatting differs: run `cargo fmt --all`")?;
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

fn cargo(root: &PathBuf, args: &[&str]) -> anyhow::Result<()> {
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

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().map(PathBuf::from).context("xtask must live one folder below the workspace root")
}
