//! Breakers that other replicas opened: each replica keeps its own breakers (its own view of
//! the upstream), and publishes one when it opens, with its expiry, so that the others skip a
//! dead upstream within a poll instead of each learning it from its own failures.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use shared_state::SharedBreakers;

/// How often a replica reads the breakers the others opened.
const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub(crate) struct RemoteBreakers {
    shared: SharedBreakers,
    open: Arc<Mutex<HashMap<String, SystemTime>>>,
}

impl RemoteBreakers {
    /// Starts following the shared breakers; the follower ends with the last clone of this.
    pub(crate) fn follow(shared: SharedBreakers) -> Self {
        let open = Arc::new(Mutex::new(HashMap::new()));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(poll(shared.clone(), Arc::downgrade(&open)));
        }
        Self { shared, open }
    }

    /// How long another replica holds `key`'s breaker open from now, if it does.
    pub(crate) fn open_for(&self, key: &str) -> Option<Duration> {
        let until = *self.open.lock().unwrap_or_else(PoisonError::into_inner).get(key)?;
        until.duration_since(SystemTime::now()).ok().filter(|left| !left.is_zero())
    }

    /// Tells the other replicas that `key`'s breaker opened here for `open_for`.
    pub(crate) fn publish(&self, key: &str, open_for: Duration) {
        let (shared, key) = (self.shared.clone(), key.to_owned());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = shared.publish_open(&key, SystemTime::now() + open_for).await {
                    tracing::debug!(%error, "open breaker not published");
                }
            });
        }
    }
}

async fn poll(shared: SharedBreakers, open: Weak<Mutex<HashMap<String, SystemTime>>>) {
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(open) = open.upgrade() else { return };
        // While Redis is away the last view stands; its entries end by their own expiry.
        if let Ok(now_open) = shared.open().await {
            *open.lock().unwrap_or_else(PoisonError::into_inner) = now_open;
        }
    }
}
