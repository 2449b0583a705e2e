use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::CacheKey;

/// A stored answer and when it was stored, on the caller's clock.
#[derive(Debug, Clone)]
pub struct CachedEntry<V> {
    pub value: V,
    pub stored_at: SystemTime,
}

impl<V> CachedEntry<V> {
    /// How old the entry is at `now`; zero if `now` is before it was stored.
    pub fn age(&self, now: SystemTime) -> Duration {
        now.duration_since(self.stored_at).unwrap_or_default()
    }
}

/// An exact-match answer cache with a TTL and an LRU-like size bound (moka's TinyLFU).
///
/// Freshness is judged on the caller's clock (`now` in [`ExactCache::get`]), so that a replay
/// of yesterday's log sees yesterday's TTLs; moka's own wall-clock TTL only bounds memory.
#[derive(Clone)]
pub struct ExactCache<V: Clone + Send + Sync + 'static> {
    entries: moka::sync::Cache<CacheKey, Arc<CachedEntry<V>>>,
    ttl: Duration,
}

impl<V: Clone + Send + Sync + 'static> std::fmt::Debug for ExactCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactCache").field("entries", &self.entries.entry_count()).field("ttl", &self.ttl).finish()
    }
}

impl<V: Clone + Send + Sync + 'static> ExactCache<V> {
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        let entries = moka::sync::Cache::builder().max_capacity(max_entries).time_to_live(ttl).build();
        Self { entries, ttl }
    }

    /// The entry for `key` if it is younger than the TTL at `now`. An expired entry is removed.
    pub fn get(&self, key: &CacheKey, now: SystemTime) -> Option<Arc<CachedEntry<V>>> {
        let entry = self.entries.get(key)?;
        if entry.age(now) >= self.ttl {
            self.entries.invalidate(key);
            return None;
        }
        Some(entry)
    }

    pub fn insert(&self, key: CacheKey, value: V, stored_at: SystemTime) {
        self.entries.insert(key, Arc::new(CachedEntry { value, stored_at }));
    }

    pub fn remove(&self, key: &CacheKey) {
        self.entries.invalidate(key);
    }

    /// Approximate: moka applies writes and evictions in batches.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u32) -> CacheKey {
        CacheKey::builder().text("n", &n.to_string()).build()
    }

    #[test]
    fn expires_on_the_callers_clock() {
        let cache = ExactCache::new(100, Duration::from_secs(60));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        cache.insert(key(1), "answer", t0);
        assert!(cache.get(&key(1), t0 + Duration::from_secs(59)).is_some());
        assert!(cache.get(&key(1), t0 + Duration::from_secs(60)).is_none());
        // Gone for good, even when asked with an earlier clock.
        assert!(cache.get(&key(1), t0).is_none());
    }

    #[test]
    fn size_is_bounded() {
        let cache = ExactCache::new(50, Duration::from_secs(3600));
        let now = SystemTime::now();
        for n in 0..500 {
            cache.insert(key(n), n, now);
        }
        assert!(cache.len() <= 50, "{} entries", cache.len());
    }
}
