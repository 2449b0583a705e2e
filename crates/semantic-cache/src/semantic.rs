use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use hnsw_rs::prelude::{DistDot, Hnsw};
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::learned::{ServeBar, Side, Verifier, decide, score};
use crate::verify::{Prepared, Rejection, guards};
use crate::{CacheError, ConceptNormalizer, Embedder};

/// HNSW graph degree and build/search breadth (figures: docs/benchmarks.md).
const MAX_CONNECTIONS: usize = 16;
const EF_CONSTRUCTION: usize = 100;
const CANDIDATES: usize = 8;
/// The least search breadth: the search asks for twice the candidates (dead points are
/// skipped after it), and HNSW returns at most `ef` of them.
pub const MIN_EF_SEARCH: usize = 2 * CANDIDATES;
const MAX_LAYERS: usize = 16;
/// What a new namespace's graph reserves: most namespaces stay small, and there may be as many
/// of them as entries.
const NEW_GRAPH_CAPACITY: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SemanticSettings {
    pub ttl: Duration,
    pub max_entries: u64,
    /// Cosine at or above which a candidate that passes the guards is served, when the learned
    /// verifier does not apply (it was trained for another model).
    pub threshold: f32,
    /// The learned verifier's probability at or above which a candidate is served.
    pub min_confidence: f32,
    /// HNSW search breadth: higher finds the true nearest entry more often, and costs time
    /// (recall and latency per value: docs/benchmarks.md). At least [`MIN_EF_SEARCH`].
    pub ef_search: usize,
}

/// A request text, normalised and embedded once, for a lookup and then an insert.
#[derive(Debug, Clone)]
pub struct Query {
    text: String,
    prepared: Prepared,
    vector: Arc<[f32]>,
}

impl Query {
    pub fn normalized(&self) -> &str {
        &self.prepared.normalized
    }

    /// The request text as given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Its embedding, unit length.
    pub fn vector(&self) -> &[f32] {
        &self.vector
    }
}

/// A cached answer served for a similar request.
#[derive(Debug, Clone, PartialEq)]
pub struct SemanticHit<V> {
    pub value: V,
    pub similarity: f32,
    /// How sure the decision is that the answer fits: the learned verifier's probability, or
    /// the cosine under the plain decision.
    pub confidence: f32,
    /// The request the answer was made for, so a person can judge the match.
    pub matched_text: String,
    pub stored_at: SystemTime,
}

/// What a lookup found: the served hit, or the best candidate and why it was not served.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup<V> {
    Hit(SemanticHit<V>),
    Miss {
        best: Option<(f32, Rejection)>,
        /// The most similar candidate that only the bar stopped (every guard passed), with its
        /// score as the hit's confidence: had the bar been lower, it would have been served.
        /// What the model answers instead says whether it should have been.
        nearest: Option<SemanticHit<V>>,
    },
}

/// What a lookup's score (a hit's confidence) measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    /// The learned verifier's probability that the two requests mean the same.
    Confidence,
    /// The two requests' cosine (no verifier for the model).
    Cosine,
}

impl ScoreKind {
    /// The bar that serves scores at or above `cut`, the other field as `bar` has it.
    pub fn bar_at(self, bar: ServeBar, cut: f32) -> ServeBar {
        match self {
            Self::Confidence => ServeBar { min_confidence: cut, ..bar },
            Self::Cosine => ServeBar { threshold: cut, ..bar },
        }
    }

    /// The cut `bar` sets on this kind of score.
    pub fn cut_of(self, bar: ServeBar) -> f32 {
        match self {
            Self::Confidence => bar.min_confidence,
            Self::Cosine => bar.threshold,
        }
    }
}

/// How big the index is, beyond its live entries: what memory it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Namespaces with a graph (each has at least one live entry).
    pub namespaces: usize,
    /// Points in the graphs, live and dead (hnsw_rs cannot delete a point: an evicted entry
    /// stays in its graph until the graph is rebuilt).
    pub points: usize,
    /// Graphs rebuilt from their live entries so far.
    pub rebuilds: u64,
    /// Graphs queued for a rebuild or being rebuilt now.
    pub rebuilding: usize,
}

struct Entry<V> {
    namespace: Arc<str>,
    text: String,
    prepared: Prepared,
    vector: Arc<[f32]>,
    value: V,
    stored_at: SystemTime,
}

type Graph = Hnsw<'static, f32, DistDot>;

/// One namespace's index. Its live entries' vectors are kept here by id, so that its graph can
/// be rebuilt without the entries' cache, and so that it is known when the last one has gone.
struct Space {
    graph: RwLock<Graph>,
    /// Live entries, by id.
    members: Mutex<HashMap<u64, Arc<[f32]>>>,
    /// Points in the current graph, live and dead.
    points: AtomicUsize,
    /// While the graph is rebuilt off the request path: the ids inserted meanwhile, which the
    /// new graph takes too before it replaces the old one.
    rebuilding: Mutex<Option<Vec<u64>>>,
}

impl Space {
    fn new() -> Self {
        Self {
            graph: RwLock::new(new_graph(NEW_GRAPH_CAPACITY)),
            members: Mutex::default(),
            points: AtomicUsize::new(0),
            rebuilding: Mutex::new(None),
        }
    }

    fn live(&self) -> usize {
        lock(&self.members).len()
    }

    /// Once dead points outnumber the live ones. A graph of `n` live points is rebuilt after
    /// at least `n` evictions, so rebuilding costs at most one more graph insert per eviction,
    /// and a namespace's graph never holds more than twice its live entries (plus one).
    fn mostly_dead(&self) -> bool {
        let points = self.points.load(Ordering::Relaxed);
        let live = self.live();
        points > 2 * live
    }
}

fn new_graph(capacity: usize) -> Graph {
    Hnsw::new(MAX_CONNECTIONS, capacity.max(1), MAX_LAYERS, EF_CONSTRUCTION, DistDot {})
}

type Spaces = Arc<RwLock<HashMap<Arc<str>, Arc<Space>>>>;

/// A cache of answers found by meaning. Each namespace (for the engine: workspace, step,
/// model and the input's other fields) has its own index, so a hit can only ever come from
/// the same namespace.
///
/// Memory is bounded by `max_entries`: a namespace's index goes with its last entry, and a
/// graph whose evicted points outnumber its live ones is rebuilt from them on a thread of its
/// own (hnsw_rs cannot delete), while lookups go on in the old one.
pub struct SemanticCache<V: Clone + Send + Sync + 'static> {
    embedder: Arc<Embedder>,
    normalizer: ConceptNormalizer,
    settings: SemanticSettings,
    /// `None`: the loaded model is not the one the shipped verifier was trained for.
    verifier: Option<Verifier>,
    entries: moka::sync::Cache<u64, Arc<Entry<V>>>,
    spaces: Spaces,
    next_id: AtomicU64,
    ef_search: AtomicUsize,
    /// Graphs to rebuild, for the maintenance thread.
    rebuilds: Rebuilds,
}

impl<V: Clone + Send + Sync + 'static> std::fmt::Debug for SemanticCache<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemanticCache")
            .field("settings", &self.settings)
            .field("entries", &self.entries.entry_count())
            .finish_non_exhaustive()
    }
}

impl<V: Clone + Send + Sync + 'static> SemanticCache<V> {
    pub fn new(embedder: Arc<Embedder>, normalizer: ConceptNormalizer, settings: SemanticSettings) -> Self {
        let spaces: Spaces = Arc::default();
        let rebuilds = Rebuilds::start();
        let (departed, queue) = (spaces.clone(), rebuilds.clone());
        let entries = moka::sync::Cache::builder()
            .max_capacity(settings.max_entries)
            .eviction_policy(EvictionPolicy::lru())
            .time_to_live(settings.ttl)
            .eviction_listener(move |id, entry: Arc<Entry<V>>, cause| {
                // Ids are never reused, so nothing is ever replaced; anything else leaves.
                if cause != RemovalCause::Replaced {
                    depart(&departed, &queue, &entry.namespace, *id);
                }
            })
            .build();
        let ef_search = AtomicUsize::new(settings.ef_search.max(MIN_EF_SEARCH));
        let verifier = Verifier::for_model(embedder.model_id());
        if verifier.is_none() {
            tracing::warn!(
                model_id = embedder.model_id(),
                threshold = settings.threshold,
                "the learned verifier was trained for another model: semantic hits are decided by cosine \
                 threshold and guards alone"
            );
        }
        Self {
            embedder,
            normalizer,
            settings,
            verifier,
            entries,
            spaces,
            next_id: AtomicU64::new(0),
            ef_search,
            rebuilds,
        }
    }

    /// Changes the search breadth of later lookups (at least [`MIN_EF_SEARCH`]): a recall
    /// versus latency dial that needs no rebuild.
    pub fn set_ef_search(&self, ef_search: usize) {
        self.ef_search.store(ef_search.max(MIN_EF_SEARCH), Ordering::Relaxed);
    }

    /// What a hit's confidence is in this cache: the learned verifier's probability, or the
    /// cosine when no verifier applies to its model. A cut on it is a [`ServeBar`] field.
    pub fn score_kind(&self) -> ScoreKind {
        if self.verifier.is_some() { ScoreKind::Confidence } else { ScoreKind::Cosine }
    }

    pub fn settings(&self) -> &SemanticSettings {
        &self.settings
    }

    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Normalises and embeds a request text.
    pub fn prepare(&self, text: &str) -> Result<Query, CacheError> {
        let prepared = Prepared::new(text, &self.normalizer);
        let vector = self.embedder.embed_one(&prepared.normalized)?;
        Ok(Query { text: text.to_owned(), prepared, vector: vector.into() })
    }

    /// [`SemanticCache::prepare`] for a text embedded lately: no model run, so callers on an
    /// async worker need not move to a blocking thread. `None` when the model must run.
    pub fn prepare_remembered(&self, text: &str) -> Option<Query> {
        let prepared = Prepared::new(text, &self.normalizer);
        let vector = self.embedder.remembered(&prepared.normalized)?;
        Some(Query { text: text.to_owned(), prepared, vector: vector.into() })
    }

    /// Embeds texts ahead of the calls that will ask for them, over all of the embedder's
    /// sessions; those calls then find their vectors among the embedder's recent ones.
    pub fn warm(&self, texts: &[&str]) -> Result<(), CacheError> {
        let normalized: Vec<String> =
            texts.iter().map(|text| Prepared::new(text, &self.normalizer).normalized).collect();
        let mut seen = std::collections::HashSet::new();
        let normalized: Vec<&str> = normalized.iter().map(String::as_str).filter(|text| seen.insert(*text)).collect();
        self.embedder.embed(&normalized).map(drop)
    }

    /// A text whose embedding is already known (snapshots, benchmarks): normalised, not
    /// embedded again. The vector must come from the same model, unit length.
    pub fn prepare_embedded(&self, text: &str, vector: Vec<f32>) -> Query {
        Query { text: text.to_owned(), prepared: Prepared::new(text, &self.normalizer), vector: vector.into() }
    }

    /// The served decision: the most similar live entry of `namespace`, younger than the TTL
    /// (and `max_age`) at `now`, that clears `bar` (the configured one when `None`): the
    /// learned verifier's confidence, or for another model the cosine threshold and guards.
    pub fn lookup(
        &self,
        namespace: &str,
        query: &Query,
        bar: Option<ServeBar>,
        max_age: Option<Duration>,
        now: SystemTime,
    ) -> Lookup<V> {
        let bar = bar
            .unwrap_or(ServeBar { threshold: self.settings.threshold, min_confidence: self.settings.min_confidence });
        let mut best = None;
        let mut nearest = None;
        let asked = Side { prepared: &query.prepared, vector: &query.vector };
        for (entry, similarity) in self.candidates(namespace, query, max_age, now) {
            let cached = Side { prepared: &entry.prepared, vector: &entry.vector };
            match decide(self.verifier.as_ref(), asked, cached, similarity, bar) {
                Ok(confidence) => return Lookup::Hit(hit(&entry, similarity, confidence)),
                Err(rejection) => {
                    if best.is_none() {
                        best = Some((similarity, rejection));
                    }
                    if nearest.is_none()
                        && matches!(rejection, Rejection::LowConfidence | Rejection::BelowThreshold)
                        && let Some(score) = score(self.verifier.as_ref(), asked, cached, similarity)
                    {
                        nearest = Some(hit(&entry, similarity, score));
                    }
                }
            }
        }
        Lookup::Miss { best, nearest }
    }

    /// The most similar entry at or above `min_similarity` that passes the guards: a lower
    /// bar than [`SemanticCache::lookup`], for a fallback served at lower confidence.
    pub fn find_similar(
        &self,
        namespace: &str,
        query: &Query,
        min_similarity: f32,
        now: SystemTime,
    ) -> Option<SemanticHit<V>> {
        self.candidates(namespace, query, None, now)
            .into_iter()
            .filter(|(_, similarity)| *similarity >= min_similarity)
            .find(|(entry, _)| guards(&query.prepared, &entry.prepared).is_ok())
            .map(|(entry, similarity)| hit(&entry, similarity, similarity))
    }

    pub fn insert(&self, namespace: &str, query: Query, value: V, now: SystemTime) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let space = self.join(namespace, id, &query.vector);
        {
            // Noted as inserted meanwhile in the same read section that inserts it: a rebuild
            // swaps graphs under the write lock, so this point is either in the graph it
            // replaces and in its list, or goes into the new graph.
            let graph = read(&space.graph);
            graph.insert_slice((&query.vector[..], id as usize));
            space.points.fetch_add(1, Ordering::Relaxed);
            if let Some(meanwhile) = lock(&space.rebuilding).as_mut() {
                meanwhile.push(id);
            }
        }
        let entry = Arc::new(Entry {
            namespace: space_name(&self.spaces, namespace),
            text: query.text,
            prepared: query.prepared,
            vector: query.vector,
            value,
            stored_at: now,
        });
        self.entries.insert(id, entry);
    }

    /// Live entries (approximate: evictions are applied in batches).
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The size of the index beyond its entries, once pending evictions are applied.
    pub fn index_stats(&self) -> IndexStats {
        self.entries.run_pending_tasks();
        let spaces = read(&self.spaces);
        IndexStats {
            namespaces: spaces.len(),
            points: spaces.values().map(|space| space.points.load(Ordering::Relaxed)).sum(),
            rebuilds: self.rebuilds.done.load(Ordering::Relaxed),
            rebuilding: *lock(&self.rebuilds.waiting.0),
        }
    }

    /// Waits until the graphs queued for a rebuild are rebuilt (tests and benchmarks).
    pub fn settle_rebuilds(&self) {
        self.entries.run_pending_tasks();
        self.rebuilds.settle();
    }

    /// Adds an entry's id and vector to its namespace's members, making the namespace if it
    /// is new, while the namespaces are locked: a namespace whose last entry departs is only
    /// dropped under the write lock, so it cannot go between finding it and joining it.
    fn join(&self, namespace: &str, id: u64, vector: &Arc<[f32]>) -> Arc<Space> {
        {
            let spaces = read(&self.spaces);
            if let Some(space) = spaces.get(namespace) {
                lock(&space.members).insert(id, vector.clone());
                return space.clone();
            }
        }
        let mut spaces = self.spaces.write().unwrap_or_else(PoisonError::into_inner);
        let space = spaces.entry(Arc::from(namespace)).or_insert_with(|| Arc::new(Space::new())).clone();
        lock(&space.members).insert(id, vector.clone());
        space
    }

    fn candidates(
        &self,
        namespace: &str,
        query: &Query,
        max_age: Option<Duration>,
        now: SystemTime,
    ) -> Vec<(Arc<Entry<V>>, f32)> {
        let Some(space) = read(&self.spaces).get(namespace).cloned() else {
            return Vec::new();
        };
        // Dead points are skipped after the search rather than filtered inside it: hnsw_rs's
        // filtered search measured 3x slower, and a graph is rebuilt before the dead outnumber
        // the live, so twice the candidates still leaves enough live ones.
        let ef_search = self.ef_search.load(Ordering::Relaxed);
        let neighbours = read(&space.graph).search(&query.vector, 2 * CANDIDATES, ef_search);
        let mut found = Vec::with_capacity(CANDIDATES);
        for neighbour in neighbours {
            if found.len() == CANDIDATES {
                break;
            }
            let id = neighbour.d_id as u64;
            let Some(entry) = self.entries.get(&id) else { continue };
            let age = now.duration_since(entry.stored_at).unwrap_or_default();
            if age >= self.settings.ttl {
                self.entries.invalidate(&id);
                continue;
            }
            if max_age.is_some_and(|max_age| age > max_age) {
                continue;
            }
            // DistDot is 1 - dot product, and the vectors are unit length.
            found.push((entry, 1.0 - neighbour.distance));
        }
        found.sort_by(|a, b| b.1.total_cmp(&a.1));
        found
    }
}

/// The namespace's name as the index holds it, so that its entries share one copy.
fn space_name(spaces: &Spaces, namespace: &str) -> Arc<str> {
    read(spaces).get_key_value(namespace).map_or_else(|| Arc::from(namespace), |(name, _)| name.clone())
}

/// An entry has left the cache (evicted, expired, invalidated): out of its namespace's
/// members; the namespace goes with its last entry, and a graph mostly dead is queued for a
/// rebuild.
fn depart(spaces: &Spaces, rebuilds: &Rebuilds, namespace: &Arc<str>, id: u64) {
    let Some(space) = read(spaces).get(&**namespace).cloned() else { return };
    let now_empty = {
        let mut members = lock(&space.members);
        members.remove(&id);
        members.is_empty()
    };
    if now_empty {
        let mut spaces = spaces.write().unwrap_or_else(PoisonError::into_inner);
        // Joined again meanwhile, or already replaced: keep it.
        if spaces.get(&**namespace).is_some_and(|current| Arc::ptr_eq(current, &space)) && space.live() == 0 {
            spaces.remove(&**namespace);
        }
        return;
    }
    if space.mostly_dead() {
        rebuilds.queue(&space);
    }
}

/// The maintenance thread that rebuilds graphs, and how many it rebuilt.
#[derive(Clone)]
struct Rebuilds {
    queue: std::sync::mpsc::Sender<std::sync::Weak<Space>>,
    done: Arc<AtomicU64>,
    /// Graphs queued and not yet rebuilt.
    waiting: Arc<(Mutex<usize>, std::sync::Condvar)>,
}

impl Rebuilds {
    /// The thread ends when the cache (every sender) is gone.
    fn start() -> Self {
        let (queue, queued) = std::sync::mpsc::channel::<std::sync::Weak<Space>>();
        let done = Arc::new(AtomicU64::new(0));
        let waiting: Arc<(Mutex<usize>, std::sync::Condvar)> = Arc::default();
        let (counted, left) = (done.clone(), waiting.clone());
        let spawned = std::thread::Builder::new().name("semantic-index".into()).spawn(move || {
            for space in queued {
                if let Some(space) = space.upgrade() {
                    rebuild(&space);
                    counted.fetch_add(1, Ordering::Relaxed);
                }
                let (count, changed) = &*left;
                *lock(count) -= 1;
                changed.notify_all();
            }
        });
        if let Err(err) = spawned {
            // Without it, graphs are never rebuilt: dead points stay until their namespace goes.
            tracing::error!(error = %err, "the semantic index's maintenance thread did not start");
        }
        Self { queue, done, waiting }
    }

    /// Queues `space` unless a rebuild of it is under way or queued.
    fn queue(&self, space: &Arc<Space>) {
        {
            let mut rebuilding = lock(&space.rebuilding);
            if rebuilding.is_some() {
                return;
            }
            *rebuilding = Some(Vec::new());
        }
        *lock(&self.waiting.0) += 1;
        if self.queue.send(Arc::downgrade(space)).is_err() {
            *lock(&space.rebuilding) = None;
            *lock(&self.waiting.0) -= 1;
        }
    }

    fn settle(&self) {
        let (count, changed) = &*self.waiting;
        let mut count = lock(count);
        while *count > 0 {
            count = changed.wait(count).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A new graph of the space's live entries, built while lookups and inserts go on in the old
/// one; then, under the write lock, the points inserted meanwhile, and the swap.
fn rebuild(space: &Space) {
    // Every point inserted from here on is also listed in `rebuilding` (set when queued).
    let snapshot: HashMap<u64, Arc<[f32]>> = lock(&space.members).clone();
    let graph = new_graph(snapshot.len() * 2);
    for (id, vector) in &snapshot {
        graph.insert_slice((&vector[..], *id as usize));
    }
    let mut current = space.graph.write().unwrap_or_else(PoisonError::into_inner);
    let meanwhile = lock(&space.rebuilding).take().unwrap_or_default();
    let mut points = snapshot.len();
    {
        let members = lock(&space.members);
        for id in meanwhile.into_iter().filter(|id| !snapshot.contains_key(id)) {
            if let Some(vector) = members.get(&id) {
                graph.insert_slice((&vector[..], id as usize));
                points += 1;
            }
        }
    }
    let old = std::mem::replace(&mut *current, graph);
    space.points.store(points, Ordering::Relaxed);
    drop(current);
    // Taking a graph apart takes a while (its points hold each other): not under the lock.
    drop(old);
    tracing::debug!(live = points, "rebuilt a semantic index");
}

const SNAPSHOT_FORMAT: &str = "aipipe-semantic-cache";
const SNAPSHOT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct SnapshotHeader {
    format: String,
    version: u32,
    dimensions: usize,
    /// [`Embedder::model_id`]; snapshots written before it was recorded have none.
    #[serde(default)]
    model_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SnapshotEntry<V> {
    namespace: String,
    text: String,
    vector: Vec<f32>,
    value: V,
    stored_at_ms: u64,
}

impl<V: Clone + Send + Sync + Serialize + DeserializeOwned + 'static> SemanticCache<V> {
    /// Writes every live entry, with its vector, to `path` (through a temporary file, so a
    /// crash mid-write leaves the previous snapshot whole). Returns how many were written.
    pub fn save(&self, path: &Path) -> Result<usize, CacheError> {
        let failed = |reason: String| CacheError::Snapshot { path: path.to_owned(), reason };
        if let Some(folder) = path.parent().filter(|folder| !folder.as_os_str().is_empty()) {
            std::fs::create_dir_all(folder).map_err(|err| failed(err.to_string()))?;
        }
        let partial = path.with_extension("partial");
        let file = std::fs::File::create(&partial).map_err(|err| failed(err.to_string()))?;
        let mut out = BufWriter::new(file);
        let header = SnapshotHeader {
            format: SNAPSHOT_FORMAT.into(),
            version: SNAPSHOT_VERSION,
            dimensions: self.embedder.dimensions(),
            model_id: Some(self.embedder.model_id().to_owned()),
        };
        let mut write_line = |line: Result<String, serde_json::Error>| -> Result<(), CacheError> {
            let line = line.map_err(|err| failed(err.to_string()))?;
            writeln!(out, "{line}").map_err(|err| failed(err.to_string()))
        };
        write_line(serde_json::to_string(&header))?;
        let mut written = 0;
        for (_, entry) in &self.entries {
            let stored_at_ms =
                entry.stored_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            write_line(serde_json::to_string(&SnapshotEntry {
                namespace: entry.namespace.to_string(),
                text: entry.text.clone(),
                vector: entry.vector.to_vec(),
                value: entry.value.clone(),
                stored_at_ms,
            }))?;
            written += 1;
        }
        out.flush().map_err(|err| failed(err.to_string()))?;
        drop(out);
        std::fs::rename(&partial, path).map_err(|err| failed(err.to_string()))?;
        Ok(written)
    }

    /// Loads the entries of a snapshot that are still fresh at `now`, without re-embedding.
    /// A missing snapshot loads nothing; an unreadable or corrupt one loads nothing and is
    /// reported as an error for the caller to log: the cache then starts empty.
    pub fn load(&self, path: &Path, now: SystemTime) -> Result<usize, CacheError> {
        let failed = |reason: String| CacheError::Snapshot { path: path.to_owned(), reason };
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(failed(err.to_string())),
        };
        let mut lines = std::io::BufReader::new(file).lines();
        let header: SnapshotHeader = match lines.next() {
            Some(Ok(line)) => serde_json::from_str(&line).map_err(|err| failed(format!("line 1: {err}")))?,
            Some(Err(err)) => return Err(failed(err.to_string())),
            None => return Err(failed("empty file".into())),
        };
        if header.format != SNAPSHOT_FORMAT || header.version != SNAPSHOT_VERSION {
            return Err(failed(format!("format {} v{} is not one this version reads", header.format, header.version)));
        }
        if header.dimensions != self.embedder.dimensions() {
            return Err(failed(format!(
                "vectors have {} dimensions, the model makes {}: was it written with another model?",
                header.dimensions,
                self.embedder.dimensions()
            )));
        }
        if let Some(model_id) = &header.model_id
            && model_id != self.embedder.model_id()
        {
            return Err(failed(format!(
                "written with model {model_id}, the loaded model is {}: its vectors cannot be compared",
                self.embedder.model_id()
            )));
        }
        // Read everything before inserting anything: a corrupt snapshot loads nothing.
        let mut entries = Vec::new();
        for (index, line) in lines.enumerate() {
            let line = line.map_err(|err| failed(err.to_string()))?;
            let entry: SnapshotEntry<V> =
                serde_json::from_str(&line).map_err(|err| failed(format!("line {}: {err}", index + 2)))?;
            if entry.vector.len() != header.dimensions {
                return Err(failed(format!("line {}: a vector of {} dimensions", index + 2, entry.vector.len())));
            }
            entries.push(entry);
        }
        let mut loaded = 0;
        for entry in entries {
            let stored_at = SystemTime::UNIX_EPOCH + Duration::from_millis(entry.stored_at_ms);
            if now.duration_since(stored_at).unwrap_or_default() >= self.settings.ttl {
                continue;
            }
            let query = self.prepare_embedded(&entry.text, entry.vector);
            self.insert(&entry.namespace, query, entry.value, stored_at);
            loaded += 1;
        }
        Ok(loaded)
    }
}

fn hit<V: Clone>(entry: &Entry<V>, similarity: f32, confidence: f32) -> SemanticHit<V> {
    SemanticHit {
        value: entry.value.clone(),
        similarity,
        confidence,
        matched_text: entry.text.clone(),
        stored_at: entry.stored_at,
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
