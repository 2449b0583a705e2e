use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use tokio::time::Instant;

use crate::{Deadline, Refusal, Scope};

/// A rate with a burst allowance: `burst` at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_minute: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Quota {
    fn governor(self) -> governor::Quota {
        governor::Quota::per_minute(self.per_minute).allow_burst(self.burst)
    }

    fn per_second(self) -> f64 {
        f64::from(self.per_minute.get()) / 60.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    pub workspace_requests: Quota,
    pub workspace_tokens: Quota,
    pub model_requests: Quota,
    pub model_tokens: Quota,
}

/// Governor's clock on tokio's time, like every other wait in this crate: under
/// `tokio::time::pause` (a recorded replay, which runs on the log's time) request limits see
/// that time too.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        self.origin.elapsed().into()
    }
}

type KeyedRequests<C> =
    governor::RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Requests and tokens per minute, per workspace and per provider/model. Requests are counted
/// by governor. Tokens are not: a call's tokens are known only after it, and governor cannot
/// give back what an estimate over-reserved, so they go through [`TokenBudgets`], which can.
pub struct RateLimits<C: Clock = TokioClock> {
    clock: C,
    workspace_requests: KeyedRequests<C>,
    model_requests: KeyedRequests<C>,
    tokens: Arc<TokenBudgets>,
}

impl<C: Clock> std::fmt::Debug for RateLimits<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits").finish_non_exhaustive()
    }
}

impl RateLimits<TokioClock> {
    pub fn new(settings: LimitSettings) -> Self {
        Self::with_clock(settings, TokioClock::default())
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// Another governor clock, such as its `FakeRelativeClock` in tests.
    pub fn with_clock(settings: LimitSettings, clock: C) -> Self {
        Self {
            workspace_requests: governor::RateLimiter::dashmap_with_clock(
                settings.workspace_requests.governor(),
                clock.clone(),
            ),
            model_requests: governor::RateLimiter::dashmap_with_clock(
                settings.model_requests.governor(),
                clock.clone(),
            ),
            tokens: Arc::new(TokenBudgets::new(settings.workspace_tokens, settings.model_tokens)),
            clock,
        }
    }

    /// Takes one request and `tokens` estimated tokens from the workspace's and the model's
    /// limits, waiting for capacity while the deadline allows. Returns the time spent waiting
    /// and the reservation to settle once the real usage is known.
    pub async fn acquire(
        &self,
        workspace: &str,
        model_key: &str,
        tokens: u64,
        deadline: &Deadline,
    ) -> Result<(Duration, TokenReservation), Refusal> {
        let mut waited =
            self.take_request(&self.workspace_requests, workspace, Scope::WorkspaceRequests, deadline).await?;
        waited += self.take_request(&self.model_requests, model_key, Scope::ModelRequests, deadline).await?;
        let reservation = TokenReservation {
            budgets: self.tokens.clone(),
            workspace: workspace.to_owned(),
            model_key: model_key.to_owned(),
            reserved: tokens,
            taken: Vec::new(),
        };
        let (reservation, token_wait) = self.tokens.take(reservation, tokens, deadline).await?;
        Ok((waited + token_wait, reservation))
    }

    async fn take_request(
        &self,
        limiter: &KeyedRequests<C>,
        key: &str,
        scope: Scope,
        deadline: &Deadline,
    ) -> Result<Duration, Refusal> {
        let key = key.to_owned();
        let mut waited = Duration::ZERO;
        loop {
            let wait = match limiter.check_key(&key) {
                Ok(()) => return Ok(waited),
                Err(not_until) => not_until.wait_time_from(self.clock.now()),
            };
            if !deadline.allows(wait) {
                return Err(Refusal::RateLimited { scope, retry_after: wait });
            }
            tokio::time::sleep(wait).await;
            waited += wait;
        }
    }
}

/// Token buckets per key that can run into debt: a call reserves its estimate up front and
/// settles with its real usage afterwards, so the budget follows what the upstream counted.
#[derive(Debug)]
struct TokenBudgets {
    workspace: Quota,
    model: Quota,
    buckets: Mutex<HashMap<(Scope, String), Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    updated: Instant,
}

impl TokenBudgets {
    fn new(workspace: Quota, model: Quota) -> Self {
        Self { workspace, model, buckets: Mutex::default() }
    }

    fn quota(&self, scope: Scope) -> Quota {
        if scope == Scope::WorkspaceTokens { self.workspace } else { self.model }
    }

    /// Takes `tokens` now, or says how long until the bucket holds them. A call larger than
    /// the burst waits for a full bucket and runs it into debt, rather than never running.
    fn try_take(&self, scope: Scope, key: &str, tokens: u64) -> Result<(), Duration> {
        let quota = self.quota(scope);
        let burst = f64::from(quota.burst.get());
        let wanted = (tokens as f64).min(burst);
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.entry((scope, key.to_owned())).or_insert(Bucket { level: burst, updated: now });
        let refill = now.saturating_duration_since(bucket.updated).as_secs_f64() * quota.per_second();
        bucket.level = (bucket.level + refill).min(burst);
        bucket.updated = now;
        if bucket.level >= wanted {
            bucket.level -= tokens as f64;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((wanted - bucket.level) / quota.per_second()))
        }
    }

    fn adjust(&self, scope: Scope, key: &str, delta: f64) {
        let burst = f64::from(self.quota(scope).burst.get());
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = buckets.get_mut(&(scope, key.to_owned())) {
            bucket.level = (bucket.level + delta).min(burst);
        }
    }

    async fn take(
        &self,
        mut reservation: TokenReservation,
        tokens: u64,
        deadline: &Deadline,
    ) -> Result<(TokenReservation, Duration), Refusal> {
        let mut waited = Duration::ZERO;
        for scope in [Scope::WorkspaceTokens, Scope::ModelTokens] {
            let key = if scope == Scope::WorkspaceTokens { &reservation.workspace } else { &reservation.model_key };
            loop {
                match self.try_take(scope, key, tokens) {
                    Ok(()) => break,
                    Err(wait) if deadline.allows(wait) => {
                        tokio::time::sleep(wait).await;
                        waited += wait;
                    }
                    // Dropping the reservation gives back what the workspace bucket already took.
                    Err(wait) => return Err(Refusal::RateLimited { scope, retry_after: wait }),
                }
            }
            reservation.taken.push(scope);
        }
        Ok((reservation, waited))
    }
}

/// Tokens a call reserved before it was sent. Settle it with the real usage; dropped
/// unsettled (the request was never sent), it gives the tokens back.
#[derive(Debug)]
pub struct TokenReservation {
    budgets: Arc<TokenBudgets>,
    workspace: String,
    model_key: String,
    reserved: u64,
    /// The buckets this reservation took from, so far.
    taken: Vec<Scope>,
}

impl TokenReservation {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// The call used `used` tokens: the difference with the estimate goes back to (or is
    /// charged to) both buckets. `None` when the usage is unknown (a timeout may still have
    /// been billed): the estimate stands.
    pub fn settle(mut self, used: Option<u64>) {
        let delta = used.map_or(0.0, |used| self.reserved as f64 - used as f64);
        self.give_back(delta);
    }

    fn give_back(&mut self, delta: f64) {
        for scope in std::mem::take(&mut self.taken) {
            let key = if scope == Scope::WorkspaceTokens { &self.workspace } else { &self.model_key };
            self.budgets.adjust(scope, key, delta);
        }
    }
}

impl Drop for TokenReservation {
    fn drop(&mut self) {
        self.give_back(self.reserved as f64);
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn quota(per_minute: u32, burst: u32) -> Quota {
        Quota { per_minute: NonZeroU32::new(per_minute).unwrap(), burst: NonZeroU32::new(burst).unwrap() }
    }

    fn settings() -> LimitSettings {
        LimitSettings {
            workspace_requests: quota(600, 100),
            workspace_tokens: quota(6000, 1000),
            model_requests: quota(600, 100),
            model_tokens: quota(60_000, 10_000),
        }
    }

    #[tokio::test]
    async fn requests_beyond_the_burst_wait_or_are_refused_with_a_retry_time() {
        let clock = FakeRelativeClock::default();
        let limits =
            RateLimits::with_clock(LimitSettings { workspace_requests: quota(60, 2), ..settings() }, clock.clone());
        let short = Deadline::after(Duration::from_millis(100));
        limits.acquire("ws", "openai/m", 10, &short).await.unwrap();
        limits.acquire("ws", "openai/m", 10, &short).await.unwrap();
        let refused = limits.acquire("ws", "openai/m", 10, &short).await.unwrap_err();
        match refused {
            Refusal::RateLimited { scope: Scope::WorkspaceRequests, retry_after } => {
                assert!(retry_after > Duration::from_millis(900) && retry_after <= Duration::from_secs(1));
            }
            other => panic!("unexpected {other:?}"),
        }
        // Another workspace has its own budget.
        limits.acquire("other", "openai/m", 10, &short).await.unwrap();
        clock.advance(Duration::from_secs(1));
        limits.acquire("ws", "openai/m", 10, &short).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_follow_the_real_usage() {
        let limits = RateLimits::new(settings());
        let deadline = Deadline::after(Duration::from_millis(10));
        // The estimate takes the whole workspace burst...
        let (_, reservation) = limits.acquire("ws", "m", 1000, &deadline).await.unwrap();
        assert!(matches!(
            limits.acquire("ws", "m", 100, &deadline).await,
            Err(Refusal::RateLimited { scope: Scope::WorkspaceTokens, .. })
        ));
        // ...but the call used 200: 800 come back.
        reservation.settle(Some(200));
        let (_, second) = limits.acquire("ws", "m", 800, &deadline).await.unwrap();
        second.settle(Some(800));
        // Refill is 100 tokens a second: 50 tokens take half a second.
        let refused = limits.acquire("ws", "m", 50, &deadline).await.unwrap_err();
        assert!((refused.retry_after().as_secs_f64() - 0.5).abs() < 0.01, "{refused:?}");
        let patient = Deadline::after(Duration::from_secs(1));
        let (waited, _) = limits.acquire("ws", "m", 50, &patient).await.unwrap();
        assert!(waited >= Duration::from_millis(490), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_larger_than_the_burst_waits_for_a_full_bucket() {
        let limits = RateLimits::new(settings());
        let deadline = Deadline::after(Duration::from_secs(30));
        let (_, reservation) = limits.acquire("ws", "m", 5000, &deadline).await.unwrap();
        // It ran, and left the bucket in debt: the next call waits for the real usage to refill.
        reservation.settle(Some(5000));
        let refused = limits.acquire("ws", "m", 10, &Deadline::after(Duration::from_secs(1))).await.unwrap_err();
        assert!(refused.retry_after() > Duration::from_secs(40), "{refused:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_call_gives_its_workspace_tokens_back() {
        let mut tight = settings();
        tight.model_tokens = quota(60, 100);
        let limits = RateLimits::new(tight);
        let deadline = Deadline::after(Duration::from_millis(10));
        let (_, first) = limits.acquire("ws", "m", 100, &deadline).await.unwrap();
        first.settle(Some(100));
        assert!(limits.acquire("ws", "m", 100, &deadline).await.is_err());
        // The workspace bucket holds 900 - not 800 - for another model.
        let (_, other) = limits.acquire("ws", "other-model", 900, &deadline).await.unwrap();
        other.settle(Some(900));
    }
}
