//! Identical calls in flight share one upstream request: the first leads, the others follow
//! and receive its outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use resilience::Deadline;
use semantic_cache::CacheKey;
use telemetry::ErrorClass;
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
        // Out of the flights first: a follower that must ask again (`Followed::Again`) then
        // finds no finished flight to follow, and takes a turn of its own.
        self.leave();
        let flight = outcome.as_ref().map(|served| (served.clone(), spend)).map_err(Clone::clone);
        self.sender.send_replace(Some(flight));
    }

    /// Stops being the flight others wait for, unless another leader already took the key.
    fn leave(&self) {
        let mut in_flight = self.flights.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        if in_flight.get(&self.key).is_some_and(|receiver| receiver.same_channel(&self.sender.subscribe())) {
            in_flight.remove(&self.key);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        self.leave();
    }
}

/// What a follower comes to.
pub(super) enum Followed {
    /// The leader's outcome, which is this call's too.
    Outcome(Result<Served, PipelineError>),
    /// The leader was cancelled, or failed for a reason of its own call (its deadline, its
    /// cost ceiling) that this call may not share: this call takes a turn of its own.
    Again,
}

/// Waits, within the deadline, for the identical call in flight.
pub(super) async fn follow(mut receiver: watch::Receiver<Option<Flight>>, deadline: &Deadline) -> Followed {
    let waited = staged("coalesce.wait", deadline.run(receiver.wait_for(Option::is_some))).await;
    let flight = match waited {
        Err(exceeded) => {
            return Followed::Outcome(Err(PipelineError::DeadlineExceeded { budget: exceeded.budget, attempts: 0 }));
        }
        Ok(Err(_leader_gone)) => return Followed::Again,
        Ok(Ok(flight)) => flight.clone(),
    };
    let leaders_own = |class: ErrorClass| matches!(class, ErrorClass::DeadlineExceeded | ErrorClass::CostLimit);
    match flight {
        // The leader's failure, or the stand-in that answered for it, came of its own options.
        Some(Err(err)) if leaders_own(err.class()) && !deadline.is_past() => Followed::Again,
        Some(Ok((served, _))) if served.degraded_by.is_some_and(leaders_own) && !deadline.is_past() => Followed::Again,
        Some(outcome) => Followed::Outcome(outcome.map(|(served, spend)| served.for_follower(spend))),
        // `wait_for` returned a flight that is set.
        None => Followed::Again,
    }
}
