//! Keeping calls alive and bounded when the upstream is not.
//!
//! Every guard here spends from one [`Deadline`] per call and reads tokio's clock (so that a
//! replay under `tokio::time::pause` drives them on the log's time), and none of them knows
//! what a provider is: the engine classifies each upstream outcome once (an [`Outcome`]) and hands
//! that verdict to the breaker, the Retry-After pause and the retry policy alike.
//!
//! - [`Guards`]: the pause, the limits and the breaker in their fixed order, as one
//!   [`Guards::admit`] whose [`Admission`] is settled once with the request's outcome.
//! - [`RateLimits`]: requests and tokens per workspace and per provider/model (token buckets
//!   that a call settles with its real usage), a provider/model held to the limits its upstream
//!   declares; a call waits for capacity up to a short `max_wait`, then is refused with the
//!   time to retry. With [`SharedGuards`], the limits are held in Redis for every replica
//!   together (each replica falls back to its share while Redis is away), and an opened
//!   breaker is published so that the other replicas skip the upstream too.
//! - [`Breakers`]: a failsafe circuit breaker per provider/model that admits one half-open probe
//!   at a time and reports its state.
//! - [`Pauses`]: a Retry-After from the upstream holds back every call to that provider/model
//!   (up to `max_wait`, then it is refused with the time the pause ends).
//! - [`RetryPolicy`]: exponential backoff with jitter (backon), never sooner than Retry-After,
//!   within a retry budget (tower's) so that an outage does not multiply traffic.

mod breaker;
mod deadline;
mod error;
mod guards;
mod limit;
mod pause;
mod remote;
mod retry;

pub use breaker::{BreakerPermit, BreakerSettings, BreakerState, BreakerStatus, Breakers};
pub use deadline::{Deadline, DeadlineExceeded};
pub use error::{Refusal, Scope};
pub use guards::{Admission, GuardSettings, GuardWait, Guards, Outlook, Refused, SharedGuards, WaitedOn};
pub use limit::{Declared, Headroom, LimitSettings, Quota, RateLimits, TokenReservation, Window};
pub use pause::{PausePermit, PauseStatus, Pauses};
pub use retry::{GiveUp, Retries, RetryPolicy, RetrySettings};

use std::time::Duration;

/// The engine's verdict on one upstream attempt, which is all the guards need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The upstream is unwell (5xx, timeout, connection): the breaker counts it. `retry_after`
    /// is what the upstream asked for, if it did.
    Fault {
        retry_after: Option<Duration>,
    },
    /// The upstream is up but told us to slow down (a 429 rate limit): its Retry-After holds
    /// back every call, but the breaker does not count it. Backpressure is not ill health, and
    /// a breaker opened by one burst of 429s would refuse every workspace for its whole open
    /// period (a replay of a generated day refused 5,400 calls that way).
    Throttled {
        retry_after: Option<Duration>,
    },
    /// The request's fault or the account's (400, 401, quota): says nothing of the upstream's
    /// health, so the breaker ignores it.
    NotCounted,
}
