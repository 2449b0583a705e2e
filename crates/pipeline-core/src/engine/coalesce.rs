//! Identical calls in flight share one upstream request: the first leads, the others follow
//! and receive its outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use resilience::Deadline;
use semantic_cache::CacheKey;
use tokio::sync::watch;

use super::served::{Served, Spend};
use super::spans::staged;
use crate::{CallOptions, PipelineError};

/// Identical calls share a flight only if they also agree on stand-ins: a call that refuses
/// them must not receive one through another call.
type FlightKey = (CacheKey, bool);

/// What a call in flight hands the identical calls that waited for it: its outcome and what
/// it paid.
type Flight = Result<(Served, Spend), PipelineError>;

/// Calls on their way upstream, by cache key, for identical calls to wait on.
#[derive(Debug, Default)]
pub(super) struct Flights {
    in_flight: Mutex<HashMap<FlightKey, watch::Receiver<Option<Flight>>>>,
}

/// Whether this call asks the upstream itself or waits for an identical one that does.
pub(super) enum Turn {
    Lead(Leader),
    Follow(watch::Receiver<Option<Flight>>),
    Alone,
}

/// The call that asks the upstream for a key; on drop (done or cancelled) it stops being
/// the one others wait for.
pub(super) struct Leader {
    flights: Arc<Flights>,
    key: FlightKey,
    sender: watch::Sender<Option<Flight>>,
}

impl Flights {
    pub(super) fn take_turn(self: &Arc<Self>, key: CacheKey, options: &CallOptions) -> Turn {
        // A call that refuses cached answers wants its own.
        if options.cache.readable_age().is_none() {
            return Turn::Alone;
        }
        // A streamed call is not one to wait for, nor to wait on: its caller may go away
        // mid-answer (cancelling it for everyone), and waiting for another call's end would
        // hold back its first token.
        if options.stream.is_some() {
            return Turn::Alone;
        }
        let key = (key, options.allow_stand_in);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(receiver) = in_flight.get(&key) {
            return Turn::Follow(receiver.clone());
        }
        let (sender, receiver) = watch::channel(None);
        in_flight.insert(key, receiver);
        Turn::Lead(Leader { flights: self.clone(), key, sender })
    }
}

impl Leader {
    pub(super) fn publish(self, outcome: &Result<Served, PipelineError>, spend: Spend) {
        let flight = outcome.as_ref().map(|served| (served.clone(), spend)).map_err(Clone::clone);
        self.sender.send_replace(Some(flight));
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.flights.in_flight.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// Waits, within the deadline, for the identical call in flight. `None` if it was cancelled
/// before it had an outcome.
pub(super) async fn follow(
    mut receiver: watch::Receiver<Option<Flight>>,
    deadline: &Deadline,
) -> Option<Result<Served, PipelineError>> {
    let waited = staged("coalesce.wait", deadline.run(receiver.wait_for(Option::is_some))).await;
    match waited {
        Err(exceeded) => Some(Err(PipelineError::DeadlineExceeded { budget: exceeded.budget, attempts: 0 })),
        Ok(Err(_leader_gone)) => None,
        Ok(Ok(flight)) => flight.clone().map(|outcome| outcome.map(|(served, spend)| served.for_follower(spend))),
    }
}
