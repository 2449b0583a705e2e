use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Deadline, Outcome, Refusal};

/// Tests wait as long as their deadlines allow.
#[cfg(test)]
const FOREVER: Duration = Duration::from_secs(3600);

/// Retry-After, honoured for everyone: when the upstream answers one call with "wait 2 s",
/// every call to that provider/model waits, not only the one that was told. When the pause
/// ends, one request goes first; the rest follow once it is back without a new pause, so a
/// crowd of waiters does not hit the upstream in the same millisecond.
#[derive(Debug, Default)]
pub struct Pauses {
    pauses: Mutex<HashMap<String, Arc<Pause>>>,
}

#[derive(Debug, Default)]
struct Pause {
    state: Mutex<PauseState>,
    changed: Notify,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum PauseState {
    #[default]
    Clear,
    Until(Instant),
    /// The first request after a pause is out.
    Probing,
}

impl Pause {
    fn lock(&self) -> MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A provider/model the upstream asked to wait, and for how much longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PauseStatus {
    /// `provider/model`.
    pub key: String,
    pub resumes_in: Duration,
}

impl Pauses {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every provider/model held back by a Retry-After now, sorted by key.
    pub fn paused(&self) -> Vec<PauseStatus> {
        let now = Instant::now();
        let pauses: Vec<(String, Arc<Pause>)> = self
            .pauses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(key, pause)| (key.clone(), pause.clone()))
            .collect();
        let mut paused: Vec<PauseStatus> = pauses
            .into_iter()
            .filter_map(|(key, pause)| match *pause.lock() {
                PauseState::Until(until) if until > now => Some(PauseStatus { key, resumes_in: until - now }),
                _ => None,
            })
            .collect();
        paused.sort_by(|a, b| a.key.cmp(&b.key));
        paused
    }

    /// How long until requests to `key` may go again; zero when they may now (or when a
    /// probe is out: its verdict comes soon).
    pub fn resumes_in(&self, key: &str) -> Duration {
        let pause = self.pauses.lock().unwrap_or_else(PoisonError::into_inner).get(key).cloned();
        match pause.map(|pause| *pause.lock()) {
            Some(PauseState::Until(until)) => until.saturating_duration_since(Instant::now()),
            _ => Duration::ZERO,
        }
    }

    fn pause(&self, key: &str) -> Arc<Pause> {
        let mut pauses = self.pauses.lock().unwrap_or_else(PoisonError::into_inner);
        pauses.entry(key.to_owned()).or_default().clone()
    }

    /// Waits until requests to `key` may be sent, unless that takes longer than `max_wait` or
    /// past the deadline. Returns the permit and how long the call waited.
    pub async fn admit(
        &self,
        key: &str,
        max_wait: Duration,
        deadline: &Deadline,
    ) -> Result<(PausePermit, Duration), Refusal> {
        let pause = self.pause(key);
        let mut waited = Duration::ZERO;
        // The latest a caller is still held: a pause longer than that is refused at once, with
        // the time it ends, so the caller hears "retry after N" instead of waiting.
        let held_until = deadline.at().min(Instant::now() + max_wait);
        loop {
            let changed = pause.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let resume_at = {
                let mut state = pause.lock();
                match *state {
                    PauseState::Clear => None,
                    PauseState::Until(until) if until <= now => {
                        *state = PauseState::Probing;
                        return Ok((PausePermit { pause: pause.clone(), probe: true }, waited));
                    }
                    PauseState::Until(until) => Some(until),
                    PauseState::Probing => Some(held_until),
                }
            };
            let Some(resume_at) = resume_at else {
                return Ok((PausePermit { pause: pause.clone(), probe: false }, waited));
            };
            if resume_at >= held_until {
                // Waiting on a pause that outlasts what the caller may wait helps no one:
                // refuse now, so the caller can retry when it ends or take a fallback.
                let state = *pause.lock();
                if let PauseState::Until(until) = state {
                    return Err(Refusal::Paused { key: key.to_owned(), retry_after: until - now });
                }
                // A probe is out: wait for its verdict as long as the caller may.
                tokio::select! {
                    () = &mut changed => {
                        waited += now.elapsed();
                        continue;
                    }
                    () = tokio::time::sleep_until(held_until) => {
                        return Err(Refusal::Paused { key: key.to_owned(), retry_after: Duration::ZERO });
                    }
                }
            }
            tokio::select! {
                () = &mut changed => {}
                () = tokio::time::sleep_until(resume_at) => {}
            }
            waited += now.elapsed();
        }
    }
}

/// Permission to send one request. Record what came of it so that a Retry-After pauses the
/// others; dropped unrecorded, it only hands the first-after-pause turn on.
#[derive(Debug)]
pub struct PausePermit {
    pause: Arc<Pause>,
    probe: bool,
}

impl PausePermit {
    pub fn record(self, outcome: Outcome) {
        if let Outcome::Fault { retry_after: Some(wait) } | Outcome::Throttled { retry_after: Some(wait) } = outcome {
            let until = Instant::now() + wait;
            let mut state = self.pause.lock();
            *state = match *state {
                PauseState::Until(current) if current > until => PauseState::Until(current),
                _ => PauseState::Until(until),
            };
            tracing::info!(wait_secs = wait.as_secs_f64(), "upstream asked for a pause");
        }
        // Drop hands the turn on and wakes the waiters.
    }
}

impl Drop for PausePermit {
    fn drop(&mut self) {
        if self.probe {
            let mut state = self.pause.lock();
            if *state == PauseState::Probing {
                *state = PauseState::Clear;
            }
        }
        self.pause.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAUSE_2S: Outcome = Outcome::Fault { retry_after: Some(Duration::from_secs(2)) };

    #[tokio::test(start_paused = true)]
    async fn a_retry_after_holds_back_every_call_then_lets_one_go_first() {
        let pauses = Arc::new(Pauses::new());
        let deadline = Deadline::after(Duration::from_secs(10));
        let (permit, waited) = pauses.admit("p/m", FOREVER, &deadline).await.unwrap();
        assert_eq!(waited, Duration::ZERO);
        let told_at = Instant::now();
        permit.record(PAUSE_2S);
        assert_eq!(pauses.paused(), [PauseStatus { key: "p/m".into(), resumes_in: Duration::from_secs(2) }]);

        let mut waiters = Vec::new();
        for _ in 0..5 {
            let pauses = pauses.clone();
            waiters.push(tokio::spawn(async move {
                let deadline = Deadline::after(Duration::from_secs(10));
                let (permit, _) = pauses.admit("p/m", FOREVER, &deadline).await.unwrap();
                let admitted_at = Instant::now();
                // Each request takes 100 ms upstream.
                tokio::time::sleep(Duration::from_millis(100)).await;
                permit.record(Outcome::Success);
                admitted_at
            }));
        }
        let mut admitted = Vec::new();
        for waiter in waiters {
            admitted.push(waiter.await.unwrap());
        }
        admitted.sort();
        assert!(admitted.iter().all(|at| *at >= told_at + Duration::from_secs(2)), "{admitted:?}");
        // The first went alone; the other four once it came back.
        assert_eq!(admitted[1] - admitted[0], Duration::from_millis(100));
        assert!(admitted[1..].iter().all(|at| *at == admitted[1]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_past_the_deadline_is_refused_at_once() {
        let pauses = Pauses::new();
        let (permit, _) = pauses.admit("p/m", FOREVER, &Deadline::after(Duration::from_secs(1))).await.unwrap();
        permit.record(Outcome::Fault { retry_after: Some(Duration::from_secs(30)) });
        let started = Instant::now();
        let refused = pauses.admit("p/m", FOREVER, &Deadline::after(Duration::from_secs(5))).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(refused.retry_after(), Duration::from_secs(30));
        // Another model is not paused.
        assert!(pauses.admit("p/other", FOREVER, &Deadline::after(Duration::from_secs(1))).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_a_caller_may_wait_is_refused_with_its_end() {
        let pauses = Pauses::new();
        let deadline = Deadline::after(Duration::from_secs(60));
        let (permit, _) = pauses.admit("p/m", FOREVER, &deadline).await.unwrap();
        permit.record(PAUSE_2S);
        let refused = pauses.admit("p/m", Duration::from_millis(500), &deadline).await.unwrap_err();
        assert_eq!(refused.retry_after(), Duration::from_secs(2));
        tokio::time::advance(Duration::from_millis(1600)).await;
        // 400 ms left: within the 500 ms it may wait.
        let (_, waited) = pauses.admit("p/m", Duration::from_millis(500), &deadline).await.unwrap();
        assert_eq!(waited, Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_told_to_wait_again_extends_the_pause() {
        let pauses = Pauses::new();
        let deadline = Deadline::after(Duration::from_secs(60));
        let (permit, _) = pauses.admit("p/m", FOREVER, &deadline).await.unwrap();
        permit.record(PAUSE_2S);
        let (probe, waited) = pauses.admit("p/m", FOREVER, &deadline).await.unwrap();
        assert_eq!(waited, Duration::from_secs(2));
        probe.record(PAUSE_2S);
        let (_, waited) = pauses.admit("p/m", FOREVER, &deadline).await.unwrap();
        assert_eq!(waited, Duration::from_secs(2));
    }
}
