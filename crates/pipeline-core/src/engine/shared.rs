//! State shared with the other replicas: the exact cache in Redis, read after this replica's
//! own and written with it; the semantic cache's entries as a Redis stream, written once and
//! followed by every replica into its own index. Every call fails open: Redis away means a
//! miss here, never a failed call.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use semantic_cache::{CacheKey, SemanticCache};
use shared_state::{FeedEntry, FeedPosition, PartStatus, SharedAnswers, SharedCounts, SharedFeed, Store};

use super::cache::CachedAnswer;
use crate::{SetupError, StateSettings};

/// How often a replica reads the entries the others stored, when it has caught up.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);
/// Entries read at once from the feed.
const FEED_BATCH: usize = 1000;

#[derive(Debug)]
pub(super) struct Shared {
    answers: Option<SharedAnswers>,
    /// The audits' verdicts, counted by every replica together.
    verdicts: Option<SharedCounts>,
    feed: Option<SharedFeed>,
    stores: Vec<Store>,
    /// This replica, so that it skips its own entries in the feed.
    origin: u64,
}

/// An answer as the shared exact cache keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer {
    answer: CachedAnswer,
    stored_at_ms: u64,
}

impl Shared {
    /// The stores `settings` names (none: `None`). Connects lazily: Redis down at start is
    /// not an error, the replica starts degraded.
    pub(super) fn connect(settings: &StateSettings, semantic_max_entries: u64) -> Result<Option<Self>, SetupError> {
        let redis = settings.redis.clone().map(|redis| Store::connect("redis", redis)).transpose()?;
        let semantic = match (&settings.semantic, &redis) {
            (Some(semantic), Some(redis)) if Some(semantic) == settings.redis.as_ref() => Some(redis.clone()),
            (Some(semantic), _) => Some(Store::connect("semantic_store", semantic.clone())?),
            (None, _) => None,
        };
        if redis.is_none() && semantic.is_none() {
            return Ok(None);
        }
        let mut stores: Vec<Store> = redis.iter().cloned().collect();
        if let Some(semantic) = &semantic
            && !stores.iter().any(|store| store.part() == semantic.part())
        {
            stores.push(semantic.clone());
        }
        Ok(Some(Self {
            answers: redis.clone().map(SharedAnswers::new),
            verdicts: redis.clone().map(SharedCounts::new),
            feed: semantic.map(|store| SharedFeed::new(store, semantic_max_entries)),
            stores,
            origin: rand::random(),
        }))
    }

    /// The Redis that the guards share (limits, breakers).
    pub(super) fn redis(&self) -> Option<Store> {
        self.stores.iter().find(|store| store.part() == "redis").cloned()
    }

    pub(super) fn status(&self) -> Vec<PartStatus> {
        self.stores.iter().map(Store::status).collect()
    }

    /// The shared exact cache's answer for `key`, if it has a readable one.
    pub(super) async fn answer(&self, key: &CacheKey) -> Option<(CachedAnswer, SystemTime)> {
        let answers = self.answers.as_ref()?;
        let bytes = answers.get(&key.to_string()).await.ok()??;
        match serde_json::from_slice::<StoredAnswer>(&bytes) {
            Ok(stored) => Some((stored.answer, SystemTime::UNIX_EPOCH + Duration::from_millis(stored.stored_at_ms))),
            Err(error) => {
                // Another version's answer: a miss, and the next store replaces it.
                tracing::debug!(%error, "shared answer unreadable");
                None
            }
        }
    }

    /// Keeps an answer for every replica: in the exact cache for what is left of `ttl`, and
    /// in the semantic feed. Awaited before the call returns, so that an answer a caller has
    /// is one every replica can serve (bounded by the store's timeout).
    pub(super) async fn store(
        &self,
        key: CacheKey,
        answer: &CachedAnswer,
        similar: Option<(&str, &semantic_cache::Query, &str)>,
        at: SystemTime,
        exact_ttl: Option<Duration>,
    ) {
        let stored_at_ms = at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64);
        let exact = async {
            let (Some(answers), Some(ttl)) = (&self.answers, exact_ttl) else { return };
            let Ok(bytes) = serde_json::to_vec(&StoredAnswer { answer: answer.clone(), stored_at_ms }) else { return };
            if let Err(error) = answers.put(&key.to_string(), &bytes, ttl).await {
                tracing::debug!(%error, "answer not shared");
            }
        };
        let semantic = async {
            let (Some(feed), Some((namespace, query, model))) = (&self.feed, similar) else { return };
            let Ok(answer) = serde_json::to_vec(answer) else { return };
            let entry = FeedEntry {
                origin: self.origin,
                model: model.to_owned(),
                namespace: namespace.to_owned(),
                text: query.text().to_owned(),
                vector: query.vector().to_vec(),
                answer,
                stored_at: at,
            };
            if let Err(error) = feed.publish(&entry).await {
                tracing::debug!(%error, "semantic entry not shared");
            }
        };
        tokio::join!(exact, semantic);
    }

    /// The counts the audits' verdicts go to, when replicas share them.
    pub(super) fn verdicts(&self) -> Option<&SharedCounts> {
        self.verdicts.as_ref()
    }

    /// Follows the feed into `cache` from its start, for as long as the cache lives.
    pub(super) fn follow(&self, cache: &Arc<SemanticCache<CachedAnswer>>) {
        let Some(feed) = self.feed.clone() else { return };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(follow(feed, Arc::downgrade(cache), self.origin));
        }
    }
}

async fn follow(feed: SharedFeed, cache: Weak<SemanticCache<CachedAnswer>>, origin: u64) {
    let mut position = FeedPosition::start();
    let mut loaded = 0_u64;
    loop {
        let read = feed.read_after(&position, FEED_BATCH).await;
        let Some(cache) = cache.upgrade() else { return };
        let caught_up = match read {
            Ok((entries, next)) => {
                let full = entries.len() == FEED_BATCH;
                position = next;
                let added = tokio::task::spawn_blocking(move || ingest(&cache, entries, origin)).await.unwrap_or(0);
                loaded += added as u64;
                if !full && loaded > 0 && added > 0 {
                    tracing::debug!(entries = loaded, "semantic entries followed from the shared store");
                }
                !full
            }
            // The store logs its own outage; the feed resumes from where it was.
            Err(_) => true,
        };
        if caught_up {
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    }
}

/// Puts other replicas' entries into this one's index; those of another model, or expired,
/// are passed over.
fn ingest(cache: &SemanticCache<CachedAnswer>, entries: Vec<FeedEntry>, origin: u64) -> usize {
    let now = SystemTime::now();
    let ttl = cache.settings().ttl;
    let (model, dimensions) = (cache.embedder().model_id().to_owned(), cache.embedder().dimensions());
    let mut added = 0;
    for entry in entries {
        let fresh = now.duration_since(entry.stored_at).unwrap_or_default() < ttl;
        if entry.origin == origin || entry.model != model || entry.vector.len() != dimensions || !fresh {
            continue;
        }
        let Ok(answer) = serde_json::from_slice::<CachedAnswer>(&entry.answer) else { continue };
        let query = cache.prepare_embedded(&entry.text, entry.vector);
        cache.insert(&entry.namespace, query, answer, entry.stored_at);
        added += 1;
    }
    added
}
