use std::time::Duration;

use crate::{SharedError, Store};

/// Answers by exact cache key, with Redis's own expiry: what one replica stored, every
/// replica can serve.
#[derive(Debug, Clone)]
pub struct SharedAnswers {
    store: Store,
}

impl SharedAnswers {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SharedError> {
        self.store.query(redis::cmd("GET").arg(self.store.key("exact", key))).await
    }

    /// Stores `value` for `ttl` (at least a millisecond).
    pub async fn put(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), SharedError> {
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        self.store.query(redis::cmd("SET").arg(self.store.key("exact", key)).arg(value).arg("PX").arg(ttl_ms)).await
    }
}
