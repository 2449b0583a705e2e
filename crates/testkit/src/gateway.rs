//! `aipipe serve` as a process, the way a user starts it: a config file, keys in the
//! environment, a free port read from its first line.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};

/// A running `aipipe serve`, killed when dropped.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Child,
    /// Where its OpenAI-compatible API is, ending in `/v1`.
    pub base_url: String,
    /// Where its admin surfaces are (`/metrics`, `/status`), when the config gives them a
    /// listener of their own (`gateway.admin_listen`).
    pub admin_url: Option<String>,
}

impl GatewayProcess {
    /// Starts `binary serve` on a free loopback port, in front of `upstream` (a base URL ending
    /// in `/v1`), with `config` (TOML) written to `dir/aipipe.toml` and `env` set, and waits
    /// until it listens.
    pub fn start(
        binary: &Path,
        dir: &Path,
        upstream: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> std::io::Result<Self> {
        Self::launch(binary, dir, upstream, config, env, None)
    }

    /// The same, with its stderr (its log) written to `stderr`.
    pub fn start_logging(
        binary: &Path,
        dir: &Path,
        upstream: &str,
        config: &str,
        env: &[(&str, &str)],
        stderr: &Path,
    ) -> std::io::Result<Self> {
        Self::launch(binary, dir, upstream, config, env, Some(stderr))
    }

    fn launch(
        binary: &Path,
        dir: &Path,
        upstream: &str,
        config: &str,
        env: &[(&str, &str)],
        stderr: Option<&Path>,
    ) -> std::io::Result<Self> {
        let config_path = dir.join("aipipe.toml");
        std::fs::write(&config_path, config)?;
        let mut command = Command::new(binary);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--base-url", upstream, "--config"])
            .arg(&config_path)
            .env_remove("AIPIPE_CONFIG")
            .stdout(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        if let Some(stderr) = stderr {
            command.stderr(std::fs::File::create(stderr)?);
        }
        let mut child = command.spawn()?;
        let (mut first_line, mut second_line) = (String::new(), String::new());
        if let Some(stdout) = child.stdout.take() {
            let mut stdout = BufReader::new(stdout);
            stdout.read_line(&mut first_line)?;
            // Printed with the first line, when there is an admin listener.
            if config.lines().any(|line| line.trim_start().starts_with("admin_listen")) {
                stdout.read_line(&mut second_line)?;
            }
        }
        let admin_url = second_line.trim().strip_prefix("aipipe serve: admin on ").map(str::to_owned);
        match first_line.trim().strip_prefix("aipipe serve: listening on ") {
            Some(base_url) => Ok(Self { base_url: base_url.to_owned(), admin_url, child }),
            None => {
                let _ = child.kill();
                let status = child.wait()?;
                Err(std::io::Error::other(format!("aipipe serve did not start ({status}): {first_line:?}")))
            }
        }
    }

    /// A chat completion request of `body` to it, as `key`'s workspace (headers can be added).
    pub fn chat(&self, http: &reqwest::Client, key: &str, body: &serde_json::Value) -> reqwest::RequestBuilder {
        http.post(format!("{}/chat/completions", self.base_url))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(body.to_string())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Asks it to stop as an orchestrator would (SIGTERM): it drains, then exits.
    pub fn terminate(&self) -> std::io::Result<()> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        if status.success() { Ok(()) } else { Err(std::io::Error::other(format!("kill -TERM: {status}"))) }
    }

    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
