use std::fmt::Debug;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// Where the engine reads "now" for cache freshness and telemetry timestamps. A replay runs it
/// on the log's time, so that TTLs and reports follow the log, not the wall clock.
pub trait Clock: Send + Sync + Debug {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall-clock time as tokio's clock tells it: a start plus how far tokio's clock has moved
/// since. Under `tokio::time::pause` (a recorded replay) it follows the paused clock, so that
/// cache freshness and telemetry timestamps agree with the guards, which read tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct TokioSystemClock {
    start: SystemTime,
    origin: tokio::time::Instant,
}

impl TokioSystemClock {
    /// Reads `start` now.
    pub fn starting_at(start: SystemTime) -> Self {
        Self { start, origin: tokio::time::Instant::now() }
    }

    /// The instant on tokio's clock at which this clock reads `at` (its start, for an earlier time).
    pub fn instant_at(&self, at: SystemTime) -> tokio::time::Instant {
        self.origin + at.duration_since(self.start).unwrap_or_default()
    }
}

impl Clock for TokioSystemClock {
    fn now(&self) -> SystemTime {
        self.start + self.origin.elapsed()
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<SystemTime>,
}

impl ManualClock {
    pub fn new(start: SystemTime) -> Self {
        Self { now: Mutex::new(start) }
    }

    pub fn set(&self, now: SystemTime) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }

    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
