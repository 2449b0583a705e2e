//! `[gateway]`: the gateway's own table of the config, read beside the engine's.

use std::collections::BTreeMap;
use std::time::Duration;

use pipeline_core::{Config, ConfigSource, SetupError, StepType};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("defaults.toml");

/// The table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    default_step: String,
    default_component: String,
    max_body_bytes: usize,
    drain_timeout_ms: u64,
    admin_key_env: String,
    /// The earlier name of `admin_key_env`, when it opened `/status` only.
    #[serde(default)]
    status_admin_key_env: Option<String>,
    admin_listen: String,
    trust_loopback: bool,
    #[serde(default)]
    api_keys: BTreeMap<String, String>,
}

/// `aipipe serve`: the OpenAI-compatible HTTP gateway in front of the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySettings {
    /// The step a request runs when it names none; always a declared step.
    pub default_step: StepType,
    pub default_component: String,
    pub max_body_bytes: usize,
    /// On shutdown, how long in-flight calls may take to finish.
    pub drain_timeout: Duration,
    /// Workspace -> the environment variable that holds its API key.
    pub api_keys: BTreeMap<String, String>,
    /// The environment variable that holds the admin key, which opens `/status`, `/metrics`
    /// and the detail of `/readyz` to a client that sends it.
    pub admin_key_env: Option<String>,
    /// A listener of their own for `/metrics`, `/status`, `/readyz` and `/healthz`; `None`:
    /// the API's listener serves them.
    pub admin_listen: Option<std::net::SocketAddr>,
    /// Without an admin key, whether the API's listener serves the admin surfaces to loopback
    /// clients.
    pub trust_loopback: bool,
}

impl RawGateway {
    /// Reads `[gateway]` over its defaults. Every command reads it, so that one config file
    /// serves them all; only `serve` validates it.
    pub fn read(source: &mut ConfigSource) -> Result<Self, SetupError> {
        source.section("gateway", DEFAULTS)
    }

    pub fn validate(self, config: &Config) -> Result<GatewaySettings, SetupError> {
        let invalid = |key: &str, message: String| SetupError::Invalid { key: format!("gateway.{key}"), message };
        let default_step =
            StepType::new(&self.default_step).ok().filter(|step| config.step(step).is_some()).ok_or_else(|| {
                invalid(
                    "default_step",
                    format!("no step `{}`: declare it under [steps.{}]", self.default_step, self.default_step),
                )
            })?;
        if self.default_component.trim().is_empty() {
            return Err(invalid("default_component", "must not be empty".into()));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes", "must be greater than zero".into()));
        }
        if self.drain_timeout_ms == 0 {
            return Err(invalid("drain_timeout_ms", "must be greater than zero".into()));
        }
        for (workspace, variable) in &self.api_keys {
            if workspace.trim().is_empty() || variable.trim().is_empty() {
                return Err(invalid(&format!("api_keys.{workspace}"), "must not be empty".into()));
            }
        }
        let named = |variable: String| Some(variable).filter(|variable| !variable.trim().is_empty());
        let admin_key_env = match (named(self.admin_key_env), self.status_admin_key_env.and_then(named)) {
            (Some(variable), _) => Some(variable),
            (None, Some(variable)) => {
                tracing::warn!("gateway.status_admin_key_env is now gateway.admin_key_env (it opens /metrics too)");
                Some(variable)
            }
            (None, None) => None,
        };
        let admin_listen = match self.admin_listen.trim() {
            "" => None,
            address => Some(address.parse().map_err(|err| {
                invalid("admin_listen", format!("`{address}` is not an address to listen on (HOST:PORT): {err}"))
            })?),
        };
        Ok(GatewaySettings {
            default_step,
            default_component: self.default_component,
            max_body_bytes: self.max_body_bytes,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            api_keys: self.api_keys,
            admin_key_env,
            admin_listen,
            trust_loopback: self.trust_loopback,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Result<GatewaySettings, SetupError> {
        let mut source = ConfigSource::from_toml(toml);
        let raw = RawGateway::read(&mut source)?;
        raw.validate(&source.engine()?)
    }

    #[test]
    fn the_gateways_table_has_defaults_and_errors_name_its_keys() {
        let defaults = settings("").unwrap();
        assert_eq!(defaults.default_step, StepType::CHAT);
        assert!(defaults.api_keys.is_empty());
        let keys = settings("[gateway.api_keys]\nteam-a = 'KEY_A'").unwrap();
        assert_eq!(keys.api_keys["team-a"], "KEY_A");
        let step = settings("[gateway]\ndefault_step = 'nope'").unwrap_err().to_string();
        assert!(step.contains("gateway.default_step"), "{step}");
        let typo = settings("[gateway]\nmax_body = 5").unwrap_err().to_string();
        assert!(typo.contains("gateway") && typo.contains("max_body"), "{typo}");
        let zero = settings("[gateway]\ndrain_timeout_ms = 0").unwrap_err().to_string();
        assert!(zero.contains("gateway.drain_timeout_ms"), "{zero}");
        let listen = settings("[gateway]\nadmin_listen = 'localhost'").unwrap_err().to_string();
        assert!(listen.contains("gateway.admin_listen"), "{listen}");
        assert_eq!(settings("[gateway]\nadmin_listen = '127.0.0.1:9464'").unwrap().admin_listen.unwrap().port(), 9464);
        let renamed = settings("[gateway]\nstatus_admin_key_env = 'ADMIN'").unwrap();
        assert_eq!(renamed.admin_key_env.as_deref(), Some("ADMIN"));
        assert!(!defaults.trust_loopback);
    }
}
