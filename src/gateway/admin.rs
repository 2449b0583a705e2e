//! Who may read the operator's surfaces: `/metrics`, `/status` and the detail of `/readyz`
//! (which shared parts are down, where, and why). The bare `/readyz` and `/healthz` answers stay
//! public: load balancers read them.
//!
//! With an admin key (`gateway.admin_key_env`), a client must send it (the password of HTTP
//! Basic, which a browser asks for, or a bearer token) on either listener. Without one, the
//! admin listener (`gateway.admin_listen`) is open, being placed where only operators reach it,
//! and the API's listener serves them to loopback clients only if `gateway.trust_loopback` is
//! set: behind a reverse proxy or a sidecar on the same host, every request comes from loopback.

use std::net::SocketAddr;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Listener {
    /// The OpenAI-compatible API's.
    Api,
    /// `gateway.admin_listen`'s, for operators and Prometheus.
    Admin,
}

/// The admin key's digest, if one is set, and whether loopback clients are trusted without it.
#[derive(Debug)]
pub(super) struct AdminAccess {
    key: Option<[u8; 32]>,
    trust_loopback: bool,
}

impl AdminAccess {
    /// The admin key from the environment variable `variable` names (`None`: no key).
    pub(super) fn from_env(variable: Option<&str>, trust_loopback: bool) -> anyhow::Result<Self> {
        let Some(variable) = variable else { return Ok(Self { key: None, trust_loopback }) };
        let key = std::env::var(variable).ok().filter(|key| !key.trim().is_empty()).ok_or_else(|| {
            anyhow::anyhow!(
                "gateway.admin_key_env: the environment variable `{variable}` is not set: set it to the key that \
                 opens /status and /metrics, or leave the setting empty"
            )
        })?;
        if trust_loopback {
            tracing::warn!("gateway.trust_loopback is ignored: with an admin key, every client sends it");
        }
        Ok(Self { key: Some(Sha256::digest(key.as_bytes()).into()), trust_loopback: false })
    }

    /// Whether the API's listener serves the admin surfaces to anyone at all.
    pub(super) fn closed_on_api(&self) -> bool {
        self.key.is_none() && !self.trust_loopback
    }

    pub(super) fn allows(&self, listener: Listener, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Denied> {
        if let Some(key) = self.key {
            let sent = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(credential);
            let matches = sent.is_some_and(|sent| <[u8; 32]>::from(Sha256::digest(sent.as_bytes())) == key);
            return if matches { Ok(()) } else { Err(Denied::NeedsKey) };
        }
        match listener {
            Listener::Admin => Ok(()),
            Listener::Api if self.trust_loopback && peer.ip().is_loopback() => Ok(()),
            Listener::Api => Err(Denied::Closed),
        }
    }
}

/// Why a client may not read an admin surface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Denied {
    /// No admin key is set and the request is not one this listener trusts.
    Closed,
    NeedsKey,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        match self {
            Self::Closed => {
                let refusal = "this is an operator's page: set gateway.admin_key_env to open it with an admin key, \
                               gateway.admin_listen to serve it on a listener of its own, or gateway.trust_loopback \
                               to serve it to loopback clients";
                (StatusCode::FORBIDDEN, refusal).into_response()
            }
            Self::NeedsKey => {
                let mut refusal = (StatusCode::UNAUTHORIZED, "send the admin key").into_response();
                refusal
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"aipipe admin\""));
                refusal
            }
        }
    }
}

/// The key in `Basic base64(user:KEY)` (any user) or `Bearer KEY`.
fn credential(value: &str) -> Option<String> {
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        return decoded.split_once(':').map(|(_, key)| key.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_key_comes_as_a_basic_password_or_a_bearer_token() {
        let basic = base64::engine::general_purpose::STANDARD.encode("admin:s3cret");
        assert_eq!(credential(&format!("Basic {basic}")).as_deref(), Some("s3cret"));
        assert_eq!(credential("bearer s3cret").as_deref(), Some("s3cret"));
        assert_eq!(credential("Digest x"), None);
    }

    #[test]
    fn who_may_read_the_admin_surfaces() {
        let loopback: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        let none = HeaderMap::new();
        // No key, loopback not trusted: closed on the API's listener, to loopback too (a proxy
        // on the same host is loopback); open on the admin listener.
        let closed = AdminAccess { key: None, trust_loopback: false };
        assert_eq!(closed.allows(Listener::Api, loopback, &none), Err(Denied::Closed));
        assert!(closed.allows(Listener::Admin, remote, &none).is_ok());
        let trusting = AdminAccess { key: None, trust_loopback: true };
        assert!(trusting.allows(Listener::Api, loopback, &none).is_ok());
        assert!(trusting.allows(Listener::Api, "[::1]:5000".parse().unwrap(), &none).is_ok());
        assert_eq!(trusting.allows(Listener::Api, remote, &none), Err(Denied::Closed));
        // A key: every client sends it, on either listener, loopback or not.
        let keyed = AdminAccess { key: Some(Sha256::digest(b"s3cret").into()), trust_loopback: false };
        assert_eq!(keyed.allows(Listener::Api, loopback, &none), Err(Denied::NeedsKey));
        assert_eq!(keyed.allows(Listener::Admin, loopback, &none), Err(Denied::NeedsKey));
        let mut sent = HeaderMap::new();
        sent.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(keyed.allows(Listener::Api, remote, &sent).is_ok());
        assert_eq!(Denied::NeedsKey.into_response().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Denied::Closed.into_response().status(), StatusCode::FORBIDDEN);
    }
}
