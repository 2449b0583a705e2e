use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, ScriptInvocation};

use crate::SharedError;

/// How to reach one shared part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// `redis://host:port/db` (or `rediss://`); may carry a password, never printed.
    pub url: String,
    /// The config key the URL came from, for errors.
    pub url_key: &'static str,
    /// Every call's bound: past it the call fails open.
    pub timeout: Duration,
    /// After a failure the part is left alone this long, then one call probes it.
    pub retry_after: Duration,
    /// Prepended to every key, so that several deployments can share one server.
    pub key_prefix: String,
}

/// One shared Redis: every command bounded by a timeout and behind a breaker of its own, so
/// that a dead or slow server costs a call at most one timeout, and then nothing until its
/// next probe. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    part: &'static str,
    manager: ConnectionManager,
    settings: StoreSettings,
    /// Where it is, without the password: for logs and status.
    address: String,
    health: Mutex<Health>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("part", &self.inner.part).field("address", &self.inner.address).finish()
    }
}

#[derive(Debug, Clone)]
enum Health {
    Up,
    Down { since: SystemTime, next_probe: Instant, probing: bool, reason: String },
}

/// A shared part's health, for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartStatus {
    /// `redis` or `semantic_store`.
    pub part: &'static str,
    /// Host and port, never the password.
    pub address: String,
    pub up: bool,
    /// Since when it is down, and why.
    pub down_since: Option<SystemTime>,
    pub reason: Option<String>,
}

impl Store {
    /// Opens a connection lazily: a server that is down now is not an error (calls fail open
    /// until it is up). Must run inside a tokio runtime.
    pub fn connect(part: &'static str, settings: StoreSettings) -> Result<Self, SharedError> {
        let bad_url =
            |reason: String| SharedError::BadUrl { key: settings.url_key, url: masked(&settings.url), reason };
        let client = redis::Client::open(settings.url.as_str()).map_err(|err| bad_url(err.to_string()))?;
        let address = client.get_connection_info().addr().to_string();
        // The manager reconnects by itself; its own retries are kept short because our
        // breaker decides when to try again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(settings.retry_after);
        let manager =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|err| bad_url(err.to_string()))?;
        Ok(Self { inner: Arc::new(Inner { part, manager, settings, address, health: Mutex::new(Health::Up) }) })
    }

    /// `prefix:name:rest`.
    pub fn key(&self, name: &str, rest: &str) -> String {
        format!("{}:{name}:{rest}", self.inner.settings.key_prefix)
    }

    pub fn part(&self) -> &'static str {
        self.inner.part
    }

    pub fn status(&self) -> PartStatus {
        let (up, down_since, reason) = match &*self.health() {
            Health::Up => (true, None, None),
            Health::Down { since, reason, .. } => (false, Some(*since), Some(reason.clone())),
        };
        PartStatus { part: self.inner.part, address: self.inner.address.clone(), up, down_since, reason }
    }

    pub fn is_up(&self) -> bool {
        matches!(*self.health(), Health::Up)
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, SharedError> {
        let permit = self.permit()?;
        let mut connection = self.inner.manager.clone();
        let sent = tokio::time::timeout(self.inner.settings.timeout, cmd.query_async::<T>(&mut connection)).await;
        permit.settle(sent)
    }

    /// Runs one Lua script (by its hash, loading it once if the server does not know it).
    pub async fn invoke<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T, SharedError> {
        let permit = self.permit()?;
        let mut connection = self.inner.manager.clone();
        let sent =
            tokio::time::timeout(self.inner.settings.timeout, invocation.invoke_async::<T>(&mut connection)).await;
        permit.settle(sent)
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.inner.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Up: go. Down: refused until the next probe is due, then one call probes.
    fn permit(&self) -> Result<Permit<'_>, SharedError> {
        let mut health = self.health();
        match &mut *health {
            Health::Up => Ok(Permit { store: self, probe: false }),
            Health::Down { next_probe, probing, .. } => {
                let now = Instant::now();
                if *probing || now < *next_probe {
                    let retry_in = next_probe.saturating_duration_since(now);
                    return Err(SharedError::Down { part: self.inner.part, retry_in });
                }
                *probing = true;
                Ok(Permit { store: self, probe: true })
            }
        }
    }

    fn settle<T>(&self, sent: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Result<T, SharedError> {
        let part = self.inner.part;
        let error = match sent {
            Ok(Ok(value)) => {
                self.mark_up();
                return Ok(value);
            }
            // The server answered: it is up, the reply was wrong.
            Ok(Err(err)) if err.kind() == redis::ErrorKind::UnexpectedReturnType => {
                self.mark_up();
                return Err(SharedError::Reply { part, reason: err.to_string() });
            }
            Ok(Err(err)) => SharedError::Redis { part, reason: err.to_string() },
            Err(_) => SharedError::Timeout { part, timeout: self.inner.settings.timeout },
        };
        self.mark_down(&error);
        Err(error)
    }

    fn mark_up(&self) {
        let mut health = self.health();
        if let Health::Down { since, .. } = &*health {
            let down_for = since.elapsed().unwrap_or_default();
            tracing::warn!(part = self.inner.part, address = %self.inner.address, down_for_ms = down_for.as_millis() as u64, "shared state is back: using it again");
            *health = Health::Up;
        }
    }

    fn mark_down(&self, error: &SharedError) {
        let mut health = self.health();
        let next_probe = Instant::now() + self.inner.settings.retry_after;
        match &mut *health {
            Health::Up => {
                tracing::warn!(part = self.inner.part, address = %self.inner.address, %error, "shared state unreachable: caches miss and limits fall back to this replica's share until it is back");
                *health =
                    Health::Down { since: SystemTime::now(), next_probe, probing: false, reason: error.to_string() };
            }
            Health::Down { next_probe: next, probing, reason, .. } => {
                *next = next_probe;
                *probing = false;
                *reason = error.to_string();
            }
        }
    }
}

/// Leave to send one call. A probe whose call is dropped before it settles (its caller went
/// away, a deadline or a `select!` cancelled it) gives the probe back on drop: otherwise the
/// part would stay down for good, every later call refused as "a probe is under way".
struct Permit<'a> {
    store: &'a Store,
    probe: bool,
}

impl Permit<'_> {
    fn settle<T>(mut self, sent: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Result<T, SharedError> {
        self.probe = false;
        self.store.settle(sent)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.probe {
            return;
        }
        if let Health::Down { probing, .. } = &mut *self.store.health() {
            // The probe is still due: the next call makes it.
            *probing = false;
        }
    }
}

/// A URL without its password.
fn masked(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_never_shows() {
        assert_eq!(masked("redis://:s3cret@cache:6379/0"), "redis://***@cache:6379/0");
        assert_eq!(masked("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[tokio::test]
    async fn a_dead_server_costs_one_timeout_then_nothing_until_the_probe() {
        // Nothing listens on port 1.
        let store = Store::connect(
            "redis",
            StoreSettings {
                url: "redis://127.0.0.1:1/".into(),
                url_key: "redis_url",
                timeout: Duration::from_millis(100),
                retry_after: Duration::from_millis(300),
                key_prefix: "t".into(),
            },
        )
        .unwrap();
        let first = store.query::<Option<String>>(redis::cmd("GET").arg("k")).await.unwrap_err();
        assert!(matches!(first, SharedError::Redis { .. } | SharedError::Timeout { .. }), "{first:?}");
        assert!(!store.is_up());
        let started = Instant::now();
        let second = store.query::<Option<String>>(redis::cmd("GET").arg("k")).await.unwrap_err();
        assert!(matches!(second, SharedError::Down { .. }), "{second:?}");
        assert!(started.elapsed() < Duration::from_millis(50));
        // The probe, cancelled before it settles, is given back: the next call probes.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let probe = store.permit().unwrap();
        assert!(matches!(store.permit(), Err(SharedError::Down { .. })), "one probe at a time");
        drop(probe);
        assert!(store.permit().is_ok(), "a cancelled probe left the part refusing every call");
        let bad = Store::connect("redis", StoreSettings { url: "http://x".into(), ..store.inner.settings.clone() });
        assert!(matches!(bad, Err(SharedError::BadUrl { key: "redis_url", .. })));
    }
}
