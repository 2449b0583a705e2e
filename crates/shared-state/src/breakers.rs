use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::{SharedError, Store};

/// Open breakers with their expiry, so that the other replicas skip a dead upstream too:
/// one hash, a field per provider/model, holding until when (ms since the epoch).
#[derive(Debug, Clone)]
pub struct SharedBreakers {
    store: Store,
}

impl SharedBreakers {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn publish_open(&self, key: &str, until: SystemTime) -> Result<(), SharedError> {
        let hash = self.store.key("breakers", "open");
        self.store.query(redis::cmd("HSET").arg(&hash).arg(key).arg(epoch_ms(until))).await
    }

    /// Every breaker some replica holds open now, with when it ends; fields past their end
    /// are removed.
    pub async fn open(&self) -> Result<HashMap<String, SystemTime>, SharedError> {
        let hash = self.store.key("breakers", "open");
        let fields: HashMap<String, u64> = self.store.query(redis::cmd("HGETALL").arg(&hash)).await?;
        let now = epoch_ms(SystemTime::now());
        let (open, ended): (HashMap<_, _>, HashMap<_, _>) = fields.into_iter().partition(|(_, until)| *until > now);
        if !ended.is_empty() {
            let mut delete = redis::cmd("HDEL");
            delete.arg(&hash);
            for key in ended.keys() {
                delete.arg(key);
            }
            self.store.query::<i64>(&delete).await?;
        }
        Ok(open.into_iter().map(|(key, until)| (key, SystemTime::UNIX_EPOCH + Duration::from_millis(until))).collect())
    }
}

pub(crate) fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64)
}
