use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The moment by which a call must have ended, whatever it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
    budget: Duration,
}

/// The deadline passed before the work ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadlineExceeded {
    pub budget: Duration,
}

impl Deadline {
    pub fn after(budget: Duration) -> Self {
        Self { at: Instant::now() + budget, budget }
    }

    /// The whole budget this deadline was made with.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// The instant itself, for `tokio::time::sleep_until` and friends.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// Whether waiting `wait` from now would still end before the deadline.
    pub fn allows(&self, wait: Duration) -> bool {
        wait < self.remaining()
    }

    pub fn is_past(&self) -> bool {
        self.remaining().is_zero()
    }

    /// Runs `work` until it ends or the deadline passes, whichever comes first.
    pub async fn run<F: Future>(&self, work: F) -> Result<F::Output, DeadlineExceeded> {
        tokio::time::timeout_at(self.at, work).await.map_err(|_| DeadlineExceeded { budget: self.budget })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_past_the_deadline_is_cut() {
        let deadline = Deadline::after(Duration::from_secs(2));
        let quick = deadline.run(async { 7 }).await;
        assert_eq!(quick, Ok(7));
        let slow = deadline.run(tokio::time::sleep(Duration::from_secs(5))).await;
        assert_eq!(slow, Err(DeadlineExceeded { budget: Duration::from_secs(2) }));
        assert!(deadline.is_past());
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_counts_down() {
        let deadline = Deadline::after(Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(deadline.remaining(), Duration::from_secs(6));
    }
}
