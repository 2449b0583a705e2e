use std::collections::HashMap;
use std::sync::LazyLock;

use crate::{SharedError, Store};

/// Counts that replicas add to together and read whole: one hash per group (a step), a field
/// per counter (a scope, a verdict and a score bin, as the caller names it). Every replica's
/// verdicts land in the same counts, so every replica computes the same cut from them.
#[derive(Debug, Clone)]
pub struct SharedCounts {
    store: Store,
}

impl SharedCounts {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Adds one to each of `fields` of `group`, in one round trip.
    pub async fn add(&self, group: &str, fields: &[String]) -> Result<(), SharedError> {
        static ADD: LazyLock<redis::Script> =
            LazyLock::new(|| redis::Script::new("for i = 1, #ARGV do redis.call('HINCRBY', KEYS[1], ARGV[i], 1) end"));
        let hash = self.store.key("counts", group);
        let mut invocation = ADD.key(&hash);
        for field in fields {
            invocation.arg(field);
        }
        self.store.invoke::<()>(&invocation).await
    }

    /// Every counter of `group`.
    pub async fn all(&self, group: &str) -> Result<HashMap<String, u64>, SharedError> {
        let hash = self.store.key("counts", group);
        self.store.query(redis::cmd("HGETALL").arg(&hash)).await
    }
}
