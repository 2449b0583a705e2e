use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use failsafe::StateMachine;
use failsafe::backoff::Constant;
use failsafe::failure_policy::ConsecutiveFailures;
use tokio::time::Instant;

use crate::{Outcome, Refusal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive upstream faults that open a breaker.
    pub failures_to_open: u32,
    /// How long an open breaker refuses calls before it lets one probe through.
    pub open_for: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    Closed,
    Open,
    /// One probe is allowed through; its outcome closes or reopens the breaker.
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// One breaker's state, for telemetry and a status API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerStatus {
    /// `provider/model`.
    pub key: String,
    pub state: BreakerState,
    pub since: SystemTime,
    /// How many times it has opened since the process started.
    pub times_opened: u64,
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    state: BreakerState,
    since: SystemTime,
    since_instant: Instant,
    times_opened: u64,
}

/// failsafe tells its instrument about every transition; this keeps the latest, with when.
#[derive(Debug, Clone)]
struct Tracker(Arc<Mutex<Tracked>>);

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, Tracked> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, state: BreakerState) {
        let mut tracked = self.lock();
        if state == BreakerState::Open {
            tracked.times_opened += 1;
        }
        if tracked.state != state || state == BreakerState::Open {
            tracked.state = state;
            tracked.since = SystemTime::now();
            tracked.since_instant = Instant::now();
        }
    }
}

impl failsafe::Instrument for Tracker {
    fn on_call_rejected(&self) {}

    fn on_open(&self) {
        tracing::warn!("circuit breaker opened");
        self.set(BreakerState::Open);
    }

    fn on_half_open(&self) {
        self.set(BreakerState::HalfOpen);
    }

    fn on_closed(&self) {
        self.set(BreakerState::Closed);
    }
}

#[derive(Debug)]
struct Breaker {
    key: String,
    machine: StateMachine<ConsecutiveFailures<Constant>, Tracker>,
    tracker: Tracker,
    /// failsafe lets every call through while half-open; this admits one probe at a time.
    probing: AtomicBool,
}

/// A circuit breaker per provider/model (failsafe's consecutive-failures policy), created on
/// first use.
#[derive(Debug)]
pub struct Breakers {
    settings: BreakerSettings,
    breakers: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    pub fn new(settings: BreakerSettings) -> Self {
        Self { settings, breakers: Mutex::default() }
    }

    /// How long an open breaker refuses calls.
    pub fn open_for(&self) -> Duration {
        self.settings.open_for
    }

    fn breaker(&self, key: &str) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(breaker) = breakers.get(key) {
            return breaker.clone();
        }
        let tracker = Tracker(Arc::new(Mutex::new(Tracked {
            state: BreakerState::Closed,
            since: SystemTime::now(),
            since_instant: Instant::now(),
            times_opened: 0,
        })));
        // failsafe counts the failures and keeps the state, but it reads the wall clock itself;
        // the open period is timed in `admit` on tokio's clock instead, which a recorded replay
        // runs on the log's time. With no backoff of its own, failsafe goes half-open as soon
        // as `admit` asks it after that period.
        let policy = failsafe::failure_policy::consecutive_failures(
            self.settings.failures_to_open,
            failsafe::backoff::constant(Duration::ZERO),
        );
        let machine = failsafe::Config::new().failure_policy(policy).instrument(tracker.clone()).build();
        let breaker = Arc::new(Breaker { key: key.to_owned(), machine, tracker, probing: AtomicBool::new(false) });
        breakers.insert(key.to_owned(), breaker.clone());
        breaker
    }

    /// Asks to send one request to `key` (`provider/model`). Refused while the breaker is open,
    /// and while half-open if another call is already probing.
    pub fn admit(&self, key: &str) -> Result<BreakerPermit, Refusal> {
        let breaker = self.breaker(key);
        let tracked = *breaker.tracker.lock();
        if tracked.state == BreakerState::Open {
            let retry_after =
                (tracked.since_instant + self.settings.open_for).saturating_duration_since(Instant::now());
            if !retry_after.is_zero() {
                return Err(Refusal::CircuitOpen { key: key.to_owned(), retry_after });
            }
        }
        if !breaker.machine.is_call_permitted() {
            return Err(Refusal::CircuitOpen { key: key.to_owned(), retry_after: Duration::ZERO });
        }
        let tracked = *breaker.tracker.lock();
        let probe = tracked.state == BreakerState::HalfOpen;
        if probe && breaker.probing.swap(true, Ordering::AcqRel) {
            // A probe is out; the others learn its verdict from the breaker's next state.
            return Err(Refusal::CircuitOpen { key: key.to_owned(), retry_after: Duration::ZERO });
        }
        Ok(BreakerPermit { breaker, probe })
    }

    /// Whether a request to `key` would be refused now: open and within its open period, or
    /// half-open with its probe out. Asks without creating a breaker for a key never used.
    pub fn refuses(&self, key: &str) -> bool {
        let breaker = self.breakers.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned();
        let Some(breaker) = breaker else { return false };
        let tracked = *breaker.tracker.lock();
        match tracked.state {
            BreakerState::Closed => false,
            BreakerState::Open => Instant::now() < tracked.since_instant + self.settings.open_for,
            BreakerState::HalfOpen => breaker.probing.load(Ordering::Acquire),
        }
    }

    pub fn state(&self, key: &str) -> BreakerState {
        self.breaker(key).tracker.lock().state
    }

    /// Every breaker used so far, sorted by key.
    pub fn statuses(&self) -> Vec<BreakerStatus> {
        let breakers: Vec<Arc<Breaker>> =
            self.breakers.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        let mut statuses: Vec<BreakerStatus> = breakers
            .iter()
            .map(|breaker| {
                let tracked = *breaker.tracker.lock();
                BreakerStatus {
                    key: breaker.key.clone(),
                    state: tracked.state,
                    since: tracked.since,
                    times_opened: tracked.times_opened,
                }
            })
            .collect();
        statuses.sort_by(|a, b| a.key.cmp(&b.key));
        statuses
    }
}

/// Permission to send one request. Record what came of it; dropped unrecorded (the caller
/// gave up), it counts for nothing.
#[derive(Debug)]
pub struct BreakerPermit {
    breaker: Arc<Breaker>,
    probe: bool,
}

impl BreakerPermit {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Tells the breaker how the request went, and returns the state it is in afterwards.
    pub fn record(self, outcome: Outcome) -> BreakerState {
        match outcome {
            Outcome::Success => self.breaker.machine.on_success(),
            Outcome::Fault { .. } => self.breaker.machine.on_error(),
            Outcome::Throttled { .. } | Outcome::NotCounted => {}
        }
        self.breaker.tracker.lock().state
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAULT: Outcome = Outcome::Fault { retry_after: None };

    fn breakers(open_for: Duration) -> Breakers {
        Breakers::new(BreakerSettings { failures_to_open: 5, open_for })
    }

    #[test]
    fn opens_after_consecutive_faults_only() {
        let breakers = breakers(Duration::from_secs(60));
        for _ in 0..4 {
            breakers.admit("p/m").unwrap().record(FAULT);
        }
        // A success resets the count; requests that were the caller's fault do not count.
        breakers.admit("p/m").unwrap().record(Outcome::Success);
        for _ in 0..10 {
            breakers.admit("p/m").unwrap().record(Outcome::NotCounted);
        }
        for _ in 0..4 {
            breakers.admit("p/m").unwrap().record(FAULT);
        }
        assert_eq!(breakers.state("p/m"), BreakerState::Closed);
        assert_eq!(breakers.admit("p/m").unwrap().record(FAULT), BreakerState::Open);
        let refused = breakers.admit("p/m").unwrap_err();
        assert!(matches!(refused, Refusal::CircuitOpen { retry_after, .. } if retry_after > Duration::from_secs(59)));
        // Other models have their own breaker.
        assert!(breakers.admit("p/other").is_ok());
        let statuses = breakers.statuses();
        assert_eq!(statuses[0].key, "p/m");
        assert_eq!((statuses[0].state, statuses[0].times_opened), (BreakerState::Open, 1));
    }

    #[test]
    fn a_burst_of_429s_does_not_open_it() {
        let breakers = breakers(Duration::from_secs(60));
        for _ in 0..20 {
            let throttled = Outcome::Throttled { retry_after: Some(Duration::from_secs(2)) };
            assert_eq!(breakers.admit("p/m").unwrap().record(throttled), BreakerState::Closed);
        }
    }

    #[test]
    fn half_open_admits_one_probe_at_a_time() {
        let breakers = breakers(Duration::from_millis(20));
        for _ in 0..5 {
            breakers.admit("p/m").unwrap().record(FAULT);
        }
        std::thread::sleep(Duration::from_millis(30));
        let probe = breakers.admit("p/m").unwrap();
        assert!(probe.is_probe());
        assert_eq!(breakers.state("p/m"), BreakerState::HalfOpen);
        assert!(breakers.admit("p/m").is_err(), "a second call while the probe is out");
        // A failed probe reopens it.
        assert_eq!(probe.record(FAULT), BreakerState::Open);
        assert!(breakers.admit("p/m").is_err());
        std::thread::sleep(Duration::from_millis(30));
        let probe = breakers.admit("p/m").unwrap();
        assert_eq!(probe.record(Outcome::Success), BreakerState::Closed);
        assert!(breakers.admit("p/m").is_ok_and(|permit| !permit.is_probe()));
        assert_eq!(breakers.statuses()[0].times_opened, 2);
    }

    #[test]
    fn an_abandoned_probe_frees_the_slot() {
        let breakers = breakers(Duration::from_millis(10));
        for _ in 0..5 {
            breakers.admit("p/m").unwrap().record(FAULT);
        }
        std::thread::sleep(Duration::from_millis(20));
        drop(breakers.admit("p/m").unwrap());
        assert!(breakers.admit("p/m").unwrap().is_probe());
    }
}
