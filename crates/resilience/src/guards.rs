use std::num::NonZeroU32;
use std::time::Duration;

use shared_state::{SharedBreakers, SharedBuckets, Store};
use tokio::time::Instant;

use crate::remote::RemoteBreakers;
use crate::{
    BreakerPermit, BreakerSettings, BreakerState, BreakerStatus, Breakers, Deadline, Declared, Headroom, LimitSettings,
    Outcome, PausePermit, PauseStatus, Pauses, RateLimits, Refusal, TokenReservation,
};

/// Which guards an upstream request passes; `None` or `false` turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    pub limits: Option<LimitSettings>,
    pub breaker: Option<BreakerSettings>,
    pub pause_on_retry_after: bool,
    /// The longest a call waits for capacity or for a Retry-After pause to end; past that it
    /// is refused at once, with the time it could go.
    pub max_wait: Duration,
}

/// Every guard an upstream request passes, in one fixed order: the Retry-After pause, the
/// rate limits, the circuit breaker. [`Guards::admit`] waits for each within the call's
/// deadline; the [`Admission`] it returns is settled once, with the request's [`Outcome`], and
/// that one verdict reaches every guard.
#[derive(Debug)]
pub struct Guards {
    pauses: Option<Pauses>,
    limits: Option<RateLimits>,
    breakers: Option<Breakers>,
    /// Breakers other replicas opened, with the time each is open for here.
    remote: Option<(RemoteBreakers, Duration)>,
    max_wait: Duration,
}

/// What the guards of one replica share with the others.
#[derive(Debug, Clone)]
pub struct SharedGuards {
    pub store: Store,
    /// How many replicas share the limits: while `store` is away, each holds this share.
    pub replicas: NonZeroU32,
}

/// What the guards would do with a request to a provider/model now, asked without taking
/// anything: what a router weighs before it picks one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outlook {
    /// Its breaker refuses requests now.
    pub breaker_open: bool,
    /// How long a request would wait for a Retry-After pause to end or for capacity.
    pub wait: Duration,
}

/// A guard kept a request from being sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub refusal: Refusal,
    /// How long the guards held it, the one that refused included.
    pub waited: Duration,
    /// The breaker's state, when it was the breaker that refused.
    pub breaker_state: Option<BreakerState>,
    /// The guards that held it, the one that refused included.
    pub waits: Vec<GuardWait>,
}

/// One guard holding a request before it was sent: what a trace shows as a child span of the
/// upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardWait {
    pub guard: WaitedOn,
    /// On tokio's clock.
    pub started: Instant,
    pub took: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitedOn {
    /// A provider/model's Retry-After pause.
    Pause,
    /// The rate limits: a sleep for a local bucket, or a round trip to the shared ones.
    Limit,
}

impl WaitedOn {
    /// The span's name in a trace.
    pub fn span_name(self) -> &'static str {
        match self {
            Self::Pause => "limit.pause",
            Self::Limit => "limit.acquire",
        }
    }
}

/// Permission to send one request to a provider/model, from every guard. Settle it with
/// [`Admission::finish`]; dropped unsettled (the request was never sent), it gives back what
/// it took and counts for nothing.
#[derive(Debug)]
#[must_use = "an admission is settled with the request's outcome"]
pub struct Admission {
    pause: Option<PausePermit>,
    reservation: Option<TokenReservation>,
    breaker: Option<BreakerPermit>,
    /// Where to publish the breaker, should this request open it.
    remote: Option<(RemoteBreakers, String, Duration)>,
    waited: Duration,
    waits: Vec<GuardWait>,
}

impl Guards {
    pub fn new(settings: GuardSettings) -> Self {
        Self {
            pauses: settings.pause_on_retry_after.then(Pauses::new),
            limits: settings.limits.map(RateLimits::new),
            breakers: settings.breaker.map(Breakers::new),
            remote: None,
            max_wait: settings.max_wait,
        }
    }

    /// Limits held in Redis for every replica together, and breakers published to them.
    pub fn shared(mut self, shared: SharedGuards) -> Self {
        self.limits =
            self.limits.map(|limits| limits.shared(SharedBuckets::new(shared.store.clone()), shared.replicas));
        if let Some(open_for) = self.breakers.as_ref().map(Breakers::open_for) {
            self.remote = Some((RemoteBreakers::follow(SharedBreakers::new(shared.store)), open_for));
        }
        self
    }

    /// Waits, within the deadline, until `workspace` may send one request of about
    /// `estimated_tokens` tokens to `key` (`provider/model`).
    pub async fn admit(
        &self,
        workspace: &str,
        key: &str,
        estimated_tokens: u64,
        deadline: &Deadline,
    ) -> Result<Admission, Refused> {
        let mut waited = Duration::ZERO;
        // A guard that lets the request through at once leaves no wait: recording one costs
        // more than the check, and a trace is for the waits. A refusal always leaves its
        // guard's, being what someone reading the trace looks for.
        let mut waits = Vec::new();
        let mut held = |guard, started: Instant| {
            let took = started.elapsed();
            waits.push(GuardWait { guard, started, took });
            took
        };
        let pause = match &self.pauses {
            Some(pauses) => {
                let asked = Instant::now();
                let paused = !pauses.resumes_in(key).is_zero();
                match pauses.admit(key, self.max_wait, deadline).await {
                    Ok((permit, pause_wait)) => {
                        if paused {
                            held(WaitedOn::Pause, asked);
                        }
                        waited += pause_wait;
                        Some(permit)
                    }
                    Err(refusal) => {
                        // A guard that refuses may have waited first (for capacity, for a
                        // probe's verdict): that time counts too, on tokio's clock.
                        let waited = waited + held(WaitedOn::Pause, asked);
                        return Err(Refused { refusal, waited, breaker_state: None, waits });
                    }
                }
            }
            None => None,
        };
        let reservation = match &self.limits {
            Some(limits) => {
                let asked = Instant::now();
                match limits.acquire(workspace, key, estimated_tokens, self.max_wait, deadline).await {
                    Ok((limit_wait, reservation)) => {
                        if !limit_wait.is_zero() || limits.is_shared() {
                            held(WaitedOn::Limit, asked);
                        }
                        waited += limit_wait;
                        Some(reservation)
                    }
                    Err(refusal) => {
                        let waited = waited + held(WaitedOn::Limit, asked);
                        return Err(Refused { refusal, waited, breaker_state: None, waits });
                    }
                }
            }
            None => None,
        };
        if let Some(retry_after) = self.remote.as_ref().and_then(|(remote, _)| remote.open_for(key)) {
            let refusal = Refusal::CircuitOpen { key: key.to_owned(), retry_after };
            return Err(Refused { refusal, waited, breaker_state: Some(BreakerState::Open), waits });
        }
        let breaker = match &self.breakers {
            Some(breakers) => match breakers.admit(key) {
                Ok(permit) => Some(permit),
                Err(refusal) => {
                    return Err(Refused { refusal, waited, breaker_state: Some(breakers.state(key)), waits });
                }
            },
            None => None,
        };
        let remote = self.remote.as_ref().map(|(remote, open_for)| (remote.clone(), key.to_owned(), *open_for));
        Ok(Admission { pause, reservation, breaker, remote, waited, waits })
    }

    /// What a request of about `estimated_tokens` from `workspace` to `key` would meet now.
    pub fn outlook(&self, workspace: &str, key: &str, estimated_tokens: u64) -> Outlook {
        let paused = self.pauses.as_ref().map_or(Duration::ZERO, |pauses| pauses.resumes_in(key));
        let limited =
            self.limits.as_ref().map_or(Duration::ZERO, |limits| limits.wait_for(workspace, key, estimated_tokens));
        Outlook {
            breaker_open: self.breakers.as_ref().is_some_and(|breakers| breakers.refuses(key))
                || self.remote.as_ref().is_some_and(|(remote, _)| remote.open_for(key).is_some()),
            wait: paused.max(limited),
        }
    }

    /// The state of every circuit breaker used so far (empty when breakers are off).
    pub fn breakers(&self) -> Vec<BreakerStatus> {
        self.breakers.as_ref().map(Breakers::statuses).unwrap_or_default()
    }

    /// The longest a call waits for capacity or a pause.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Every provider/model a Retry-After holds back now.
    pub fn paused(&self) -> Vec<PauseStatus> {
        self.pauses.as_ref().map(Pauses::paused).unwrap_or_default()
    }

    /// The limits the upstream declared for `key` in a response: the provider/model's
    /// limiter holds to them (see [`RateLimits::declare`]).
    pub fn declare(&self, key: &str, declared: Declared) {
        if let Some(limits) = &self.limits {
            limits.declare(key, declared);
        }
    }

    /// Each limit's headroom now (empty when limits are off).
    pub fn headroom(&self) -> Vec<Headroom> {
        self.limits.as_ref().map(RateLimits::headroom).unwrap_or_default()
    }
}

impl Admission {
    /// How long the guards held the request before admitting it.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The guards that held the request, in the order it met them (none if it went at once).
    pub fn waits(&self) -> &[GuardWait] {
        &self.waits
    }

    /// Tells every guard how the request went: the breaker counts a fault, a Retry-After
    /// pauses the provider/model, and the token reservation is settled with `used_tokens`
    /// (`None` when the usage is unknown, as for a request cut off that may still be billed:
    /// the estimate stands). Returns the breaker's state afterwards, if breakers are on.
    pub fn finish(self, outcome: Outcome, used_tokens: Option<u64>) -> Option<BreakerState> {
        let state = self.breaker.map(|permit| permit.record(outcome));
        if let (Some(BreakerState::Open), Some((remote, key, open_for))) = (state, &self.remote) {
            remote.publish(key, *open_for);
        }
        if let Some(permit) = self.pause {
            permit.record(outcome);
        }
        if let Some(reservation) = self.reservation {
            reservation.settle(used_tokens);
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::Quota;

    fn quota(per_minute: u32, burst: u32) -> Quota {
        Quota { per_minute: NonZeroU32::new(per_minute).unwrap(), burst: NonZeroU32::new(burst).unwrap() }
    }

    fn guards() -> Guards {
        Guards::new(GuardSettings {
            limits: Some(LimitSettings {
                workspace_requests: Some(quota(600, 100)),
                workspace_tokens: Some(quota(60_000, 1000)),
                model_requests: Some(quota(600, 100)),
                model_tokens: Some(quota(60_000, 10_000)),
            }),
            breaker: Some(BreakerSettings { failures_to_open: 2, open_for: Duration::from_secs(60) }),
            pause_on_retry_after: true,
            max_wait: Duration::from_secs(10),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn one_outcome_settles_every_guard() {
        let guards = guards();
        let deadline = Deadline::after(Duration::from_secs(10));
        let fault = Outcome::Fault { retry_after: Some(Duration::from_secs(2)) };
        let admitted = guards.admit("ws", "p/m", 1000, &deadline).await.unwrap();
        assert!(admitted.waits().is_empty(), "let through at once: no wait to show");
        assert_eq!(admitted.finish(fault, Some(0)), Some(BreakerState::Closed));
        // The pause holds the next request back for the Retry-After...
        let asked = Instant::now();
        let admitted = guards.admit("ws", "p/m", 1000, &deadline).await.unwrap();
        assert_eq!(admitted.waited(), Duration::from_secs(2));
        let pause = GuardWait { guard: WaitedOn::Pause, started: asked, took: Duration::from_secs(2) };
        assert_eq!(admitted.waits(), [pause]);
        // ...and the second fault in a row opens the breaker.
        assert_eq!(admitted.finish(fault, Some(0)), Some(BreakerState::Open));
        tokio::time::advance(Duration::from_secs(2)).await;
        let refused = guards.admit("ws", "p/m", 10, &deadline).await.unwrap_err();
        assert!(matches!(refused.refusal, Refusal::CircuitOpen { .. }), "{refused:?}");
        assert_eq!(refused.breaker_state, Some(BreakerState::Open));
        assert_eq!(guards.breakers().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsettled_admission_gives_its_tokens_back() {
        let guards = guards();
        let deadline = Deadline::after(Duration::from_millis(10));
        drop(guards.admit("ws", "p/m", 1000, &deadline).await.unwrap());
        // The workspace's whole token burst is there again.
        let admitted = guards.admit("ws", "p/m", 1000, &deadline).await.unwrap();
        let refused = guards.admit("ws", "p/m", 1000, &deadline).await.unwrap_err();
        assert!(matches!(refused.refusal, Refusal::RateLimited { .. }), "{refused:?}");
        assert_eq!(refused.breaker_state, None);
        let guards_waited: Vec<WaitedOn> = refused.waits.iter().map(|wait| wait.guard).collect();
        assert_eq!(guards_waited, [WaitedOn::Limit], "a refusal always shows its guard");
        let _ = admitted.finish(Outcome::Success, Some(1000));
    }

    #[tokio::test]
    async fn without_guards_everything_is_admitted_at_once() {
        let guards = Guards::new(GuardSettings {
            limits: None,
            breaker: None,
            pause_on_retry_after: false,
            max_wait: Duration::ZERO,
        });
        let admitted = guards.admit("ws", "p/m", u64::MAX, &Deadline::after(Duration::from_millis(1))).await.unwrap();
        assert_eq!(admitted.waited(), Duration::ZERO);
        assert_eq!(admitted.finish(Outcome::Fault { retry_after: None }, None), None);
        assert!(guards.breakers().is_empty());
    }
}
