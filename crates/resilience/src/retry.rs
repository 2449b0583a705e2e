use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tower::retry::budget::{Budget, TpsBudget};

use crate::Deadline;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetrySettings {
    /// Attempts per call and model, the first included; 1 turns retries off.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Retries may add at most this share of the first attempts (over the last 10 s) ...
    pub budget_ratio: f32,
    /// ... plus this many retries a second, so that quiet traffic can still retry.
    pub budget_min_per_second: u32,
}

/// The one owner of retries: exponential backoff with jitter (backon), never sooner than the
/// upstream's Retry-After, never past the call's deadline, and within a retry budget
/// (tower's) so that during an outage the retries cannot multiply the traffic.
#[derive(Debug)]
pub struct RetryPolicy {
    settings: RetrySettings,
    backoff: ExponentialBuilder,
    budget: TpsBudget,
}

impl RetryPolicy {
    pub fn new(settings: RetrySettings) -> Self {
        let backoff = ExponentialBuilder::new()
            .with_min_delay(settings.initial_backoff)
            .with_max_delay(settings.max_backoff)
            .with_max_times(settings.max_attempts.saturating_sub(1) as usize)
            .with_jitter();
        let budget = TpsBudget::new(Duration::from_secs(10), settings.budget_min_per_second, settings.budget_ratio);
        Self { settings, backoff, budget }
    }

    pub fn settings(&self) -> &RetrySettings {
        &self.settings
    }

    /// Starts the retries of one call's request: its first attempt pays into the budget.
    pub fn start(&self) -> Retries<'_> {
        self.budget.deposit();
        Retries { policy: self, backoff: self.backoff.build() }
    }
}

/// The retry state of one request.
#[derive(Debug)]
pub struct Retries<'a> {
    policy: &'a RetryPolicy,
    backoff: ExponentialBackoff,
}

/// Why a failed attempt is not retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    AttemptsExhausted,
    /// The wait (backoff or Retry-After) would end past the deadline.
    Deadline,
    /// Too many retries lately, across all calls.
    Budget,
}

impl Retries<'_> {
    /// How long to wait before the next attempt, given what the upstream asked for.
    pub fn next_delay(&mut self, retry_after: Option<Duration>, deadline: &Deadline) -> Result<Duration, GiveUp> {
        let backoff = self.backoff.next().ok_or(GiveUp::AttemptsExhausted)?;
        let delay = backoff.max(retry_after.unwrap_or_default());
        if !deadline.allows(delay) {
            return Err(GiveUp::Deadline);
        }
        if !self.policy.budget.withdraw() {
            tracing::warn!("retry budget spent: not retrying, so that retries do not multiply an outage's traffic");
            return Err(GiveUp::Budget);
        }
        Ok(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32, budget_ratio: f32, budget_min_per_second: u32) -> RetryPolicy {
        RetryPolicy::new(RetrySettings {
            max_attempts,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            budget_ratio,
            budget_min_per_second,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn backs_off_exponentially_but_never_sooner_than_retry_after() {
        let policy = policy(4, 1.0, 100);
        let deadline = Deadline::after(Duration::from_secs(60));
        let mut retries = policy.start();
        let first = retries.next_delay(None, &deadline).unwrap();
        assert!(first >= Duration::from_millis(100) && first < Duration::from_millis(200), "{first:?}");
        let told = retries.next_delay(Some(Duration::from_secs(3)), &deadline).unwrap();
        assert_eq!(told, Duration::from_secs(3));
        assert!(retries.next_delay(None, &deadline).is_ok());
        assert_eq!(retries.next_delay(None, &deadline), Err(GiveUp::AttemptsExhausted));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_the_deadline_is_not_taken() {
        let policy = policy(3, 1.0, 100);
        let mut retries = policy.start();
        let deadline = Deadline::after(Duration::from_secs(1));
        assert_eq!(retries.next_delay(Some(Duration::from_secs(2)), &deadline), Err(GiveUp::Deadline));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_across_calls() {
        // No free retries; each retry costs the deposits of 5 first attempts (ratio 0.2).
        let policy = policy(3, 0.2, 0);
        let deadline = Deadline::after(Duration::from_secs(60));
        let mut granted = 0;
        for _ in 0..50 {
            if policy.start().next_delay(None, &deadline).is_ok() {
                granted += 1;
            }
        }
        assert!((8..=10).contains(&granted), "{granted} retries for 50 requests");
    }
}
