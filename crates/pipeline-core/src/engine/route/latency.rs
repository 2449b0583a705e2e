//! Each candidate's latency as `fastest` sees it: a peak EWMA (a slower sample counts at
//! once, a faster one only gradually, so a candidate that starts to struggle loses traffic at
//! the first slow answer) that fades while the candidate goes unasked (so that one which was
//! slow is tried again after a while), and its calls in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Latencies {
    half_life: Duration,
    candidates: Mutex<HashMap<String, Arc<Candidate>>>,
}

#[derive(Debug, Default)]
struct Candidate {
    estimate: Mutex<Option<Estimate>>,
    in_flight: AtomicU32,
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    seconds: f64,
    at: Instant,
}

impl Estimate {
    /// The estimate now: halved for every half-life since it was last measured.
    fn faded(&self, half_life: Duration, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.at).as_secs_f64();
        self.seconds * 0.5_f64.powf(idle / half_life.as_secs_f64())
    }
}

/// A call in flight to a candidate; counted until dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    candidate: Arc<Candidate>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.candidate.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Latencies {
    pub(crate) fn new(half_life: Duration) -> Self {
        Self { half_life, candidates: Mutex::default() }
    }

    fn candidate(&self, name: &str) -> Arc<Candidate> {
        let mut candidates = self.candidates.lock().unwrap_or_else(PoisonError::into_inner);
        candidates.entry(name.to_owned()).or_default().clone()
    }

    /// The candidate's latency estimate in seconds (`None`: never measured) and its calls in
    /// flight.
    pub(crate) fn state(&self, name: &str) -> (Option<f64>, u32) {
        let candidate = self.candidate(name);
        let estimate = *candidate.estimate.lock().unwrap_or_else(PoisonError::into_inner);
        let latency = estimate.map(|estimate| estimate.faded(self.half_life, Instant::now()));
        (latency, candidate.in_flight.load(Ordering::Acquire))
    }

    /// Counts a call in flight to `name` until the returned guard is dropped.
    pub(crate) fn start(&self, name: &str) -> InFlight {
        let candidate = self.candidate(name);
        candidate.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight { candidate }
    }

    /// One measured request to `name`.
    pub(crate) fn observe(&self, name: &str, took: Duration) {
        let candidate = self.candidate(name);
        let now = Instant::now();
        let sample = took.as_secs_f64();
        let mut estimate = candidate.estimate.lock().unwrap_or_else(PoisonError::into_inner);
        let seconds = match *estimate {
            None => sample,
            Some(previous) => {
                let current = previous.faded(self.half_life, now);
                if sample >= current {
                    sample
                } else {
                    // Weighs the new sample by how long the estimate went without one.
                    let idle = now.saturating_duration_since(previous.at).as_secs_f64();
                    let keep = (-idle / self.half_life.as_secs_f64()).exp().clamp(0.0, 0.9);
                    current * keep + sample * (1.0 - keep)
                }
            }
        };
        *estimate = Some(Estimate { seconds, at: now });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slow_counts_at_once_fast_gradually_and_idle_fades() {
        let latencies = Latencies::new(Duration::from_secs(10));
        assert_eq!(latencies.state("a"), (None, 0));
        latencies.observe("a", Duration::from_millis(100));
        latencies.observe("a", Duration::from_millis(500));
        assert_eq!(latencies.state("a").0, Some(0.5));
        latencies.observe("a", Duration::from_millis(100));
        let after_fast = latencies.state("a").0.unwrap();
        assert!(after_fast < 0.5 && after_fast > 0.1, "{after_fast}");
        tokio::time::advance(Duration::from_secs(10)).await;
        let faded = latencies.state("a").0.unwrap();
        assert!((faded - after_fast / 2.0).abs() < 1e-9, "{faded}");
        let flight = latencies.start("a");
        assert_eq!(latencies.state("a").1, 1);
        drop(flight);
        assert_eq!(latencies.state("a").1, 0);
    }
}
