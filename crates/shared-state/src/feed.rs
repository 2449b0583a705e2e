use std::time::{Duration, SystemTime};

use redis::streams::{StreamId, StreamReadReply};

use crate::breakers::epoch_ms;
use crate::{SharedError, Store};

/// One semantic cache entry as every replica receives it: written once, read by all.
#[derive(Debug, Clone, PartialEq)]
pub struct FeedEntry {
    /// The replica that wrote it (it has the entry already).
    pub origin: u64,
    /// The embedding model's id: vectors of another model cannot be compared.
    pub model: String,
    pub namespace: String,
    pub text: String,
    pub vector: Vec<f32>,
    /// The answer, serialised by the cache's owner.
    pub answer: Vec<u8>,
    pub stored_at: SystemTime,
}

/// Where a reader of the feed is: entries after this one are new to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPosition(String);

impl FeedPosition {
    pub fn start() -> Self {
        Self("0-0".into())
    }
}

/// The semantic cache's shared store: a Redis stream of entries, capped near the cache's
/// size. Each replica keeps its own in-process index and follows the stream into it, so a
/// lookup never leaves the process.
#[derive(Debug, Clone)]
pub struct SharedFeed {
    store: Store,
    max_len: u64,
}

impl SharedFeed {
    pub fn new(store: Store, max_len: u64) -> Self {
        Self { store, max_len: max_len.max(1) }
    }

    pub async fn publish(&self, entry: &FeedEntry) -> Result<(), SharedError> {
        let vector: Vec<u8> = entry.vector.iter().flat_map(|value| value.to_le_bytes()).collect();
        let mut add = redis::cmd("XADD");
        add.arg(self.stream()).arg("MAXLEN").arg("~").arg(self.max_len).arg("*");
        add.arg("o").arg(entry.origin).arg("m").arg(&entry.model).arg("n").arg(&entry.namespace);
        add.arg("t").arg(&entry.text).arg("v").arg(vector).arg("a").arg(&entry.answer);
        add.arg("s").arg(epoch_ms(entry.stored_at));
        self.store.query::<String>(&add).await.map(drop)
    }

    /// Up to `count` entries after `position`, and the position after them. An entry this
    /// version cannot read is skipped (and logged), not fatal to the feed.
    pub async fn read_after(
        &self,
        position: &FeedPosition,
        count: usize,
    ) -> Result<(Vec<FeedEntry>, FeedPosition), SharedError> {
        let read =
            redis::cmd("XREAD").arg("COUNT").arg(count).arg("STREAMS").arg(self.stream()).arg(&position.0).clone();
        let reply: Option<StreamReadReply> = self.store.query(&read).await?;
        let mut next = position.clone();
        let mut entries = Vec::new();
        for id in reply.into_iter().flat_map(|reply| reply.keys).flat_map(|key| key.ids) {
            next = FeedPosition(id.id.clone());
            match entry(&id) {
                Some(entry) => entries.push(entry),
                None => tracing::warn!(id = %id.id, "semantic feed entry skipped: a field is missing or malformed"),
            }
        }
        Ok((entries, next))
    }

    /// How many entries the stream holds.
    pub async fn stored_entries(&self) -> Result<u64, SharedError> {
        self.store.query(redis::cmd("XLEN").arg(self.stream())).await
    }

    pub fn is_up(&self) -> bool {
        self.store.is_up()
    }

    fn stream(&self) -> String {
        self.store.key("semantic", "entries")
    }
}

fn entry(id: &StreamId) -> Option<FeedEntry> {
    let vector: Vec<u8> = id.get("v")?;
    if !vector.len().is_multiple_of(4) {
        return None;
    }
    let vector =
        vector.chunks_exact(4).map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])).collect();
    Some(FeedEntry {
        origin: id.get("o")?,
        model: id.get("m")?,
        namespace: id.get("n")?,
        text: id.get("t")?,
        vector,
        answer: id.get("a")?,
        stored_at: SystemTime::UNIX_EPOCH + Duration::from_millis(id.get("s")?),
    })
}
