use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shared_state::{BucketAsk, SharedBuckets, Take};
use tokio::time::Instant;

use crate::{Deadline, Refusal, Scope};

/// A rate with a burst allowance: `burst` at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_minute: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Quota {
    fn per_second(self) -> f64 {
        f64::from(self.per_minute.get()) / 60.0
    }

    /// One replica's share of a limit that `replicas` replicas hold together. The burst is
    /// rounded up: a bucket that holds less than two calls wastes what refills while it is
    /// full, and the rate, not the burst, is what the sum must keep to.
    fn share(self, replicas: NonZeroU32) -> Self {
        let per_minute = NonZeroU32::new(self.per_minute.get() / replicas.get()).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(self.burst.get().div_ceil(replicas.get())).unwrap_or(NonZeroU32::MIN);
        Self { per_minute, burst }
    }

    /// The tighter of two quotas, rate and burst each.
    fn min(self, other: Self) -> Self {
        Self { per_minute: self.per_minute.min(other.per_minute), burst: self.burst.min(other.burst) }
    }
}

/// Which limits a call meets. Every quota is optional: a workspace's limits are an operator's
/// choice for fairness between tenants; a provider/model is held to what the upstream declares
/// in its responses ([`Declared`]), and to these numbers too where they are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    pub workspace_requests: Option<Quota>,
    pub workspace_tokens: Option<Quota>,
    pub model_requests: Option<Quota>,
    pub model_tokens: Option<Quota>,
}

/// What an upstream declared about one of its limits in a response (OpenAI's
/// `x-ratelimit-*-requests` / `-tokens` headers, Anthropic's `anthropic-ratelimit-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// How many it allows per minute.
    pub limit: u64,
    /// How many are left now.
    pub remaining: u64,
}

/// The limits an upstream declared for a provider/model in its latest response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Declared {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

/// Requests and tokens per minute, per workspace and per provider/model, as token buckets on
/// tokio's clock (so that a replay under `tokio::time::pause` sees the log's time). Tokens are
/// reserved before a call and settled with its real usage afterwards ([`TokenReservation`]).
///
/// With [`RateLimits::shared`], the configured limits are buckets in Redis that every replica
/// spends from; while Redis cannot be reached, each replica holds its share of them locally
/// (the limit divided by the replicas), and goes back to Redis once it answers. What an
/// upstream declares stays per replica: its count of what is left already sums every replica.
#[derive(Debug)]
pub struct RateLimits {
    settings: LimitSettings,
    buckets: Arc<Buckets>,
    shared: Option<SharedLimits>,
}

#[derive(Debug, Clone)]
struct SharedLimits {
    buckets: SharedBuckets,
    replicas: NonZeroU32,
}

impl RateLimits {
    pub fn new(settings: LimitSettings) -> Self {
        Self { settings, buckets: Arc::default(), shared: None }
    }

    /// Holds the configured limits in buckets that `replicas` replicas share.
    /// Whether the limits are held in the store the replicas share (each acquire is a round
    /// trip to it).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    pub fn shared(mut self, buckets: SharedBuckets, replicas: NonZeroU32) -> Self {
        self.shared = Some(SharedLimits { buckets, replicas });
        self
    }

    /// Takes one request and `tokens` estimated tokens from the workspace's and the
    /// provider/model's limits, waiting for capacity up to `max_wait` (and never past the
    /// deadline). Returns the time spent waiting and the reservation to settle once the real
    /// usage is known.
    pub async fn acquire(
        &self,
        workspace: &str,
        model_key: &str,
        tokens: u64,
        max_wait: Duration,
        deadline: &Deadline,
    ) -> Result<(Duration, TokenReservation), Refusal> {
        let mut reservation = TokenReservation {
            buckets: self.buckets.clone(),
            taken: Vec::new(),
            reserved: tokens,
            requests: Vec::new(),
            shared: None,
        };
        let mut waited = Duration::ZERO;
        let asks = [
            (Scope::WorkspaceRequests, workspace, self.settings.workspace_requests, 1),
            (Scope::ModelRequests, model_key, self.settings.model_requests, 1),
            (Scope::WorkspaceTokens, workspace, self.settings.workspace_tokens, tokens),
            (Scope::ModelTokens, model_key, self.settings.model_tokens, tokens),
        ];
        // The shared buckets first, all or nothing, while Redis answers.
        let mut local_share = None;
        if let Some(shared) = &self.shared {
            match shared.acquire(&asks, max_wait, deadline).await {
                Ok((shared_wait, taken)) => {
                    waited += shared_wait;
                    reservation.shared = Some(taken);
                }
                Err(SharedRefusal::Refused(refusal)) => return Err(refusal),
                Err(SharedRefusal::Unavailable) => local_share = Some(shared.replicas),
            }
        }
        for (scope, key, configured, amount) in asks {
            // Without shared state the configured limit holds here; with it, only this
            // replica's share while Redis is away; the upstream's declared limits always.
            let local = match (&self.shared, local_share) {
                (None, _) => configured,
                (Some(_), Some(replicas)) => configured.map(|quota| quota.share(replicas)),
                (Some(_), None) => None,
            };
            let only_declared = self.shared.is_some() && local_share.is_none();
            loop {
                let wait = match self.buckets.try_take(scope, key, local, amount, only_declared) {
                    Taken::Yes => break,
                    Taken::Unlimited => break,
                    Taken::After(wait) => wait,
                };
                let allowed = max_wait.saturating_sub(waited);
                if wait > allowed || !deadline.allows(wait) {
                    // Dropping the reservation gives back what it took so far.
                    return Err(Refusal::RateLimited { scope, retry_after: wait });
                }
                tokio::time::sleep(wait).await;
                waited += wait;
            }
            let taken = (scope, key.to_owned(), amount);
            if scope.is_requests() { reservation.requests.push(taken) } else { reservation.taken.push(taken) }
        }
        Ok((waited, reservation))
    }

    /// How long until `workspace` could send one request of `tokens` to `model_key`, without
    /// taking anything: what a router weighs before it picks a model.
    pub fn wait_for(&self, workspace: &str, model_key: &str, tokens: u64) -> Duration {
        [
            (Scope::WorkspaceRequests, workspace, self.settings.workspace_requests, 1),
            (Scope::ModelRequests, model_key, self.settings.model_requests, 1),
            (Scope::WorkspaceTokens, workspace, self.settings.workspace_tokens, tokens),
            (Scope::ModelTokens, model_key, self.settings.model_tokens, tokens),
        ]
        .into_iter()
        // The shared buckets cannot be asked without a round trip: a router weighs the local
        // ones (declared limits, and this replica's share while Redis is away).
        .map(|(scope, key, configured, amount)| {
            let local = if self.shared.is_some() { None } else { configured };
            self.buckets.wait_for(scope, key, local, amount)
        })
        .max()
        .unwrap_or_default()
    }

    /// What the upstream declared for `model_key` in a response: from now on the
    /// provider/model's buckets hold no more than it allows, nor than it has left.
    pub fn declare(&self, model_key: &str, declared: Declared) {
        for (scope, window, configured) in [
            (Scope::ModelRequests, declared.requests, self.settings.model_requests),
            (Scope::ModelTokens, declared.tokens, self.settings.model_tokens),
        ] {
            if let Some(window) = window {
                self.buckets.declare(scope, model_key, window, configured);
            }
        }
    }

    /// Each limited workspace's and provider/model's headroom now, for a status page.
    pub fn headroom(&self) -> Vec<Headroom> {
        self.buckets.headroom()
    }
}

/// How much of one limit is left now.
#[derive(Debug, Clone, PartialEq)]
pub struct Headroom {
    pub scope: Scope,
    pub key: String,
    /// Requests or tokens that could go now (negative: in debt after a large call).
    pub available: f64,
    pub per_minute: u32,
    /// Whether the upstream declared this limit (else the config set it).
    pub declared: bool,
}

enum Taken {
    Yes,
    /// No limit applies to this scope and key.
    Unlimited,
    After(Duration),
}

#[derive(Debug, Default)]
struct Buckets {
    buckets: Mutex<HashMap<(Scope, String), Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    quota: Quota,
    level: f64,
    updated: Instant,
    declared: bool,
}

impl Bucket {
    fn full(quota: Quota, declared: bool) -> Self {
        Self { quota, level: f64::from(quota.burst.get()), updated: Instant::now(), declared }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.updated).as_secs_f64() * self.quota.per_second();
        self.level = (self.level + refill).min(f64::from(self.quota.burst.get()));
        self.updated = now;
    }
}

impl Buckets {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Scope, String), Bucket>> {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `amount` now, or says how long until the bucket holds it. An amount larger than
    /// the burst waits for a full bucket and runs it into debt, rather than never going.
    /// With `only_declared`, a bucket kept for a configured limit (this replica's share while
    /// the shared state was away) is passed over.
    fn try_take(&self, scope: Scope, key: &str, configured: Option<Quota>, amount: u64, only_declared: bool) -> Taken {
        let mut buckets = self.lock();
        let bucket = match buckets.get_mut(&(scope, key.to_owned())) {
            Some(bucket) if only_declared && !bucket.declared => return Taken::Unlimited,
            Some(bucket) => bucket,
            None => match configured {
                Some(quota) => buckets.entry((scope, key.to_owned())).or_insert(Bucket::full(quota, false)),
                None => return Taken::Unlimited,
            },
        };
        bucket.refill();
        let wanted = (amount as f64).min(f64::from(bucket.quota.burst.get()));
        if bucket.level >= wanted {
            bucket.level -= amount as f64;
            Taken::Yes
        } else {
            Taken::After(Duration::from_secs_f64((wanted - bucket.level) / bucket.quota.per_second()))
        }
    }

    /// How long until the bucket holds `amount`, taking nothing.
    fn wait_for(&self, scope: Scope, key: &str, configured: Option<Quota>, amount: u64) -> Duration {
        let mut buckets = self.lock();
        let mut fresh;
        let bucket = match buckets.get_mut(&(scope, key.to_owned())) {
            Some(bucket) => bucket,
            None => match configured {
                Some(quota) => {
                    fresh = Bucket::full(quota, false);
                    &mut fresh
                }
                None => return Duration::ZERO,
            },
        };
        bucket.refill();
        let wanted = (amount as f64).min(f64::from(bucket.quota.burst.get()));
        if bucket.level >= wanted {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((wanted - bucket.level) / bucket.quota.per_second())
        }
    }

    fn adjust(&self, scope: Scope, key: &str, delta: f64) {
        if let Some(bucket) = self.lock().get_mut(&(scope, key.to_owned())) {
            bucket.refill();
            bucket.level = (bucket.level + delta).min(f64::from(bucket.quota.burst.get()));
        }
    }

    fn declare(&self, scope: Scope, key: &str, window: Window, configured: Option<Quota>) {
        let Some(limit) = NonZeroU32::new(u32::try_from(window.limit).unwrap_or(u32::MAX)) else { return };
        // Upstreams count per minute, with the whole minute's allowance usable at once.
        let declared = Quota { per_minute: limit, burst: limit };
        let quota = configured.map_or(declared, |configured| configured.min(declared));
        let mut buckets = self.lock();
        let bucket = buckets.entry((scope, key.to_owned())).or_insert(Bucket::full(quota, true));
        bucket.refill();
        bucket.quota = quota;
        bucket.declared = true;
        // What it has left is the truth, but requests sent since it answered have taken some
        // more: never hold more than either says.
        bucket.level = bucket.level.min(window.remaining as f64).min(f64::from(quota.burst.get()));
    }

    fn headroom(&self) -> Vec<Headroom> {
        let mut buckets = self.lock();
        let mut headroom: Vec<Headroom> = buckets
            .iter_mut()
            .map(|((scope, key), bucket)| {
                bucket.refill();
                Headroom {
                    scope: *scope,
                    key: key.clone(),
                    available: bucket.level,
                    per_minute: bucket.quota.per_minute.get(),
                    declared: bucket.declared,
                }
            })
            .collect();
        headroom.sort_by(|a, b| (a.scope.label(), &a.key).cmp(&(b.scope.label(), &b.key)));
        headroom
    }
}

/// What a call took from the limits before it was sent. Settle it with the real usage;
/// dropped unsettled (the request was never sent), it gives everything back.
#[derive(Debug)]
pub struct TokenReservation {
    buckets: Arc<Buckets>,
    /// Token buckets taken from so far: scope, key, tokens.
    taken: Vec<(Scope, String, u64)>,
    reserved: u64,
    /// Request buckets taken from: a request once sent stays counted.
    requests: Vec<(Scope, String, u64)>,
    /// What the shared buckets gave.
    shared: Option<SharedTaken>,
}

/// What a call took from the shared buckets: its requests and its estimated tokens.
#[derive(Debug)]
struct SharedTaken {
    buckets: SharedBuckets,
    asks: Vec<(Scope, BucketAsk)>,
}

impl SharedTaken {
    /// Gives back what `change` says, off the call's path (a dead Redis costs nobody a wait).
    fn give_back(self, change: impl Fn(Scope, f64) -> f64) {
        let asks: Vec<BucketAsk> = self
            .asks
            .into_iter()
            .map(|(scope, ask)| BucketAsk { amount: change(scope, ask.amount), ..ask })
            .filter(|ask| ask.amount != 0.0)
            .collect();
        if asks.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let buckets = self.buckets;
            runtime.spawn(async move {
                if let Err(error) = buckets.adjust(&asks).await {
                    tracing::debug!(%error, "shared limit not adjusted");
                }
            });
        }
    }
}

enum SharedRefusal {
    Refused(Refusal),
    /// Redis could not be asked: the replica holds its share locally.
    Unavailable,
}

impl SharedLimits {
    async fn acquire(
        &self,
        asks: &[(Scope, &str, Option<Quota>, u64); 4],
        max_wait: Duration,
        deadline: &Deadline,
    ) -> Result<(Duration, SharedTaken), SharedRefusal> {
        let asks: Vec<(Scope, BucketAsk)> = asks
            .iter()
            .filter_map(|&(scope, key, configured, amount)| {
                let quota = configured?;
                let bucket = format!("{}:{key}", scope.label());
                let ask = BucketAsk {
                    bucket,
                    per_minute: quota.per_minute.get(),
                    burst: quota.burst.get(),
                    amount: amount as f64,
                };
                Some((scope, ask))
            })
            .collect();
        let plain: Vec<BucketAsk> = asks.iter().map(|(_, ask)| ask.clone()).collect();
        let mut waited = Duration::ZERO;
        loop {
            match self.buckets.take(&plain).await {
                Ok(Take::Taken) => return Ok((waited, SharedTaken { buckets: self.buckets.clone(), asks })),
                Ok(Take::After { after, tightest }) => {
                    let scope = asks.get(tightest).map_or(Scope::WorkspaceRequests, |(scope, _)| *scope);
                    if after > max_wait.saturating_sub(waited) || !deadline.allows(after) {
                        return Err(SharedRefusal::Refused(Refusal::RateLimited { scope, retry_after: after }));
                    }
                    tokio::time::sleep(after).await;
                    waited += after;
                }
                Err(_) => return Err(SharedRefusal::Unavailable),
            }
        }
    }
}

impl TokenReservation {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// The call used `used` tokens: the difference with the estimate goes back to (or is
    /// charged to) the token buckets. `None` when the usage is unknown (a timeout may still
    /// have been billed): the estimate stands.
    pub fn settle(mut self, used: Option<u64>) {
        self.requests.clear();
        if let Some(shared) = self.shared.take() {
            // Requests sent stay counted; the estimate of tokens gives way to the real usage.
            shared.give_back(|scope, reserved| match (scope.is_requests(), used) {
                (true, _) | (false, None) => 0.0,
                (false, Some(used)) => reserved - used as f64,
            });
        }
        let taken = std::mem::take(&mut self.taken);
        for (scope, key, reserved) in taken {
            let delta = used.map_or(0.0, |used| reserved as f64 - used as f64);
            self.buckets.adjust(scope, &key, delta);
        }
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.give_back(|_, taken| taken);
        }
        for (scope, key, amount) in self.taken.drain(..).chain(self.requests.drain(..)) {
            self.buckets.adjust(scope, &key, amount as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(per_minute: u32, burst: u32) -> Quota {
        Quota { per_minute: NonZeroU32::new(per_minute).unwrap(), burst: NonZeroU32::new(burst).unwrap() }
    }

    fn settings() -> LimitSettings {
        LimitSettings {
            workspace_requests: Some(quota(600, 100)),
            workspace_tokens: Some(quota(6000, 1000)),
            model_requests: Some(quota(600, 100)),
            model_tokens: Some(quota(60_000, 10_000)),
        }
    }

    const WAIT: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_the_burst_wait_or_are_refused_with_a_retry_time() {
        let limits = RateLimits::new(LimitSettings { workspace_requests: Some(quota(60, 2)), ..settings() });
        let short = Deadline::after(Duration::from_secs(10));
        let max_wait = Duration::from_millis(100);
        limits.acquire("ws", "openai/m", 10, max_wait, &short).await.unwrap().1.settle(Some(10));
        limits.acquire("ws", "openai/m", 10, max_wait, &short).await.unwrap().1.settle(Some(10));
        let refused = limits.acquire("ws", "openai/m", 10, max_wait, &short).await.unwrap_err();
        match refused {
            Refusal::RateLimited { scope: Scope::WorkspaceRequests, retry_after } => {
                assert!(retry_after > Duration::from_millis(900) && retry_after <= Duration::from_secs(1));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Another workspace has its own budget; a patient call waits its second.
        limits.acquire("other", "openai/m", 10, max_wait, &short).await.unwrap();
        let (waited, _) = limits.acquire("ws", "openai/m", 10, WAIT, &short).await.unwrap();
        assert!(waited > Duration::from_millis(900), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_follow_the_real_usage() {
        let limits = RateLimits::new(settings());
        let deadline = Deadline::after(Duration::from_secs(10));
        let no_wait = Duration::ZERO;
        // The estimate takes the whole workspace burst...
        let (_, reservation) = limits.acquire("ws", "m", 1000, no_wait, &deadline).await.unwrap();
        assert!(matches!(
            limits.acquire("ws", "m", 100, no_wait, &deadline).await,
            Err(Refusal::RateLimited { scope: Scope::WorkspaceTokens, .. })
        ));
        // ...but the call used 200: 800 come back.
        reservation.settle(Some(200));
        let (_, second) = limits.acquire("ws", "m", 800, no_wait, &deadline).await.unwrap();
        second.settle(Some(800));
        // Refill is 100 tokens a second: 50 tokens take half a second.
        let refused = limits.acquire("ws", "m", 50, no_wait, &deadline).await.unwrap_err();
        assert!((refused.retry_after().as_secs_f64() - 0.5).abs() < 0.01, "{refused:?}");
        let (waited, _) = limits.acquire("ws", "m", 50, Duration::from_secs(1), &deadline).await.unwrap();
        assert!(waited >= Duration::from_millis(490), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_larger_than_the_burst_waits_for_a_full_bucket() {
        let limits = RateLimits::new(settings());
        let deadline = Deadline::after(Duration::from_secs(30));
        let (_, reservation) = limits.acquire("ws", "m", 5000, WAIT, &deadline).await.unwrap();
        // It ran, and left the bucket in debt: the next call waits for the real usage to refill.
        reservation.settle(Some(5000));
        let refused = limits.acquire("ws", "m", 10, WAIT, &Deadline::after(Duration::from_secs(1))).await.unwrap_err();
        assert!(refused.retry_after() > Duration::from_secs(40), "{refused:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_call_gives_back_what_it_took() {
        let limits = RateLimits::new(LimitSettings { model_tokens: Some(quota(60, 100)), ..settings() });
        let deadline = Deadline::after(Duration::from_secs(10));
        let (_, first) = limits.acquire("ws", "m", 100, Duration::ZERO, &deadline).await.unwrap();
        first.settle(Some(100));
        assert!(limits.acquire("ws", "m", 100, Duration::ZERO, &deadline).await.is_err());
        // The workspace bucket holds 900 - not 800 - for another model, and its requests
        // bucket did not count the refused call.
        let (_, other) = limits.acquire("ws", "other-model", 900, Duration::ZERO, &deadline).await.unwrap();
        other.settle(Some(900));
        let requests = limits.headroom().into_iter().find(|h| h.scope == Scope::WorkspaceRequests).unwrap();
        assert_eq!(requests.available, 98.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_model_is_held_to_what_the_upstream_declares() {
        // No limits of our own: only what the upstream says.
        let limits = RateLimits::new(LimitSettings {
            workspace_requests: None,
            workspace_tokens: None,
            model_requests: None,
            model_tokens: None,
        });
        let deadline = Deadline::after(Duration::from_secs(60));
        let max_wait = Duration::from_millis(50);
        for _ in 0..1000 {
            limits.acquire("ws", "p/m", 10, max_wait, &deadline).await.unwrap().1.settle(Some(10));
        }
        // 600 a minute, 3 left.
        limits.declare("p/m", Declared { requests: Some(Window { limit: 600, remaining: 3 }), tokens: None });
        for _ in 0..3 {
            limits.acquire("ws", "p/m", 10, max_wait, &deadline).await.unwrap().1.settle(Some(10));
        }
        let refused = limits.acquire("ws", "p/m", 10, max_wait, &deadline).await.unwrap_err();
        assert!(matches!(refused, Refusal::RateLimited { scope: Scope::ModelRequests, .. }), "{refused:?}");
        // 10 a second come back.
        assert!((refused.retry_after().as_secs_f64() - 0.1).abs() < 1e-3, "{refused:?}");
        let headroom = limits.headroom();
        assert_eq!((headroom.len(), headroom[0].per_minute, headroom[0].declared), (1, 600, true));
        // A configured number caps what is declared.
        let capped = RateLimits::new(LimitSettings { model_requests: Some(quota(60, 5)), ..limits.settings });
        capped.declare("p/m", Declared { requests: Some(Window { limit: 600, remaining: 600 }), tokens: None });
        assert_eq!(capped.headroom()[0].per_minute, 60);
        assert_eq!(capped.headroom()[0].available, 5.0);
    }
}
