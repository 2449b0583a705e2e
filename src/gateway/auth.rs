//! Which workspace a request belongs to: its bearer key, compared as a SHA-256 digest with
//! the keys the config names.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context;
use axum::http::{HeaderMap, header};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// SHA-256 of each API key -> its workspace: keys are compared as digests, never stored.
#[derive(Debug)]
pub struct ApiKeys {
    workspaces: HashMap<[u8; 32], String>,
}

impl ApiKeys {
    /// Each configured workspace's key, read from the environment variable the config names.
    pub fn from_env(api_keys: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        if api_keys.is_empty() {
            anyhow::bail!(
                "no API keys: add `[gateway.api_keys]` with `WORKSPACE = \"ENV_VARIABLE\"` to the config and set the \
                 variable to that workspace's key"
            );
        }
        let mut workspaces = HashMap::new();
        for (workspace, variable) in api_keys {
            let key = std::env::var(variable).ok().filter(|key| !key.trim().is_empty()).with_context(|| {
                format!(
                    "gateway.api_keys.{workspace}: the environment variable `{variable}` is not set: set it to the key"
                )
            })?;
            if let Some(other) = workspaces.insert(digest(&key), workspace.clone()) {
                anyhow::bail!(
                    "gateway.api_keys: workspaces `{other}` and `{workspace}` have the same key: give each its own"
                );
            }
        }
        Ok(Self { workspaces })
    }

    /// The workspace whose key the request carries.
    pub fn workspace(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
            .ok_or_else(|| {
                ApiError::unauthorized("You didn't provide an API key: send `Authorization: Bearer KEY`.")
            })?;
        self.workspaces.get(&digest(key)).cloned().ok_or_else(|| {
            ApiError::unauthorized("Incorrect API key provided: use a key from the gateway's `[gateway.api_keys]`.")
        })
    }
}

/// The token of an `Authorization: Bearer TOKEN` header; the scheme's case does not matter
/// (RFC 9110).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn the_scheme_is_case_insensitive() {
        for header in ["Bearer sk-1", "bearer sk-1", "BEARER   sk-1 ", " Bearer\tsk-1"] {
            assert_eq!(bearer_token(header), Some("sk-1"), "{header:?}");
        }
        for header in ["Basic sk-1", "Bearer", "Bearer   ", "sk-1"] {
            assert_eq!(bearer_token(header), None, "{header:?}");
        }
    }
}
