//! The local sentence-embedding model and the ONNX Runtime library, found on disk.
//!
//! Nothing here downloads anything: `aipipe setup` puts the files in place (from registry
//! packages, checked against pinned hashes), and a missing file is an error that says so.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use fastembed::{InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel};

use sha2::{Digest, Sha256};

use crate::CacheError;

/// The folder name of the default model under the model home.
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";
/// The ONNX Runtime library the setup step installs; ort 2.0.0-rc.15 needs 1.24 or newer.
pub const ONNXRUNTIME_LIBRARY: &str = "libonnxruntime.so.1.24.4";

const SETUP_HINT: &str = "run `aipipe setup` (`cargo run -- setup`) to install the model and ONNX Runtime, or point \
                          `semantic.model_dir` / `semantic.onnxruntime_path` at your own";

/// Where the model folder and the ONNX Runtime library are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPaths {
    pub model_dir: PathBuf,
    pub onnxruntime: PathBuf,
}

impl ModelPaths {
    /// `$AIPIPE_HOME`, else `$XDG_CACHE_HOME/aipipe`, else `$HOME/.cache/aipipe`, else `.aipipe`.
    pub fn home() -> PathBuf {
        let var = |name| std::env::var_os(name).filter(|value| !value.is_empty()).map(PathBuf::from);
        var("AIPIPE_HOME")
            .or_else(|| var("XDG_CACHE_HOME").map(|cache| cache.join("aipipe")))
            .or_else(|| var("HOME").map(|home| home.join(".cache").join("aipipe")))
            .unwrap_or_else(|| PathBuf::from(".aipipe"))
    }

    /// The files `aipipe setup` installs, under [`ModelPaths::home`].
    pub fn installed() -> Self {
        Self::under(&Self::home())
    }

    pub fn under(home: &Path) -> Self {
        Self {
            model_dir: home.join("models").join(DEFAULT_MODEL),
            onnxruntime: home.join("onnxruntime").join(ONNXRUNTIME_LIBRARY),
        }
    }
}

/// How many recent texts keep their vector (about 1.6 KB each at 384 dimensions): a text asked
/// again after its cache entry expired, or from another workspace, is not embedded twice.
pub const RECENT_EMBEDDINGS: u64 = 20_000;

/// Sentence embeddings from a local ONNX model: mean-pooled and L2-normalised, so that a dot
/// product is the cosine similarity.
pub struct Embedder {
    // fastembed's `embed` takes `&mut self`, so each session serves one text at a time. Several
    // single-threaded sessions beat one multi-threaded session here: a short text is too small
    // for intra-op threads to help (measured: 1.39 ms on one thread, 1.30 ms on two), while
    // sessions let concurrent calls embed in parallel.
    sessions: Vec<Mutex<TextEmbedding>>,
    next_session: AtomicUsize,
    recent: Option<moka::sync::Cache<String, Arc<[f32]>>>,
    dimensions: usize,
    model_id: String,
    /// Texts the model ran on, and the time those runs took (summed over the sessions).
    runs: AtomicU64,
    busy_nanos: AtomicU64,
}

/// What the model has done so far: how many texts it embedded and how long that took, one
/// text at a time on one session (concurrent sessions add up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddingWork {
    pub texts: u64,
    pub busy: std::time::Duration,
}

impl EmbeddingWork {
    /// What one text takes on one core: what a call waits when it embeds its own text.
    pub fn per_text(&self) -> Option<std::time::Duration> {
        (self.texts > 0).then(|| self.busy / u32::try_from(self.texts).unwrap_or(u32::MAX))
    }
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("model_id", &self.model_id)
            .field("dimensions", &self.dimensions)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads ONNX Runtime from `paths.onnxruntime` and the model from `paths.model_dir`, in
    /// `sessions` single-threaded ONNX Runtime sessions (0: one per core).
    pub fn load(paths: &ModelPaths, sessions: usize) -> Result<Self, CacheError> {
        load_onnxruntime(&paths.onnxruntime)?;
        let read = |file: &str| {
            let path = paths.model_dir.join(file);
            std::fs::read(&path)
                .map_err(|err| CacheError::ModelMissing { path: path.clone(), reason: format!("{err}; {SETUP_HINT}") })
        };
        let onnx = read("model.onnx")?;
        let model_id = hex::encode(&Sha256::digest(&onnx)[..8]);
        let tokenizer = TokenizerFiles {
            tokenizer_file: read("tokenizer.json")?,
            config_file: read("config.json")?,
            special_tokens_map_file: read("special_tokens_map.json")?,
            tokenizer_config_file: read("tokenizer_config.json")?,
        };
        let count = match sessions {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let mut loaded = Vec::with_capacity(count);
        for _ in 0..count {
            // fastembed pools user-defined models by the CLS token unless told; this model was
            // trained with mean pooling, and CLS vectors of it are much worse.
            let model = UserDefinedEmbeddingModel::new(onnx.clone(), tokenizer.clone()).with_pooling(Pooling::Mean);
            let mut options = InitOptionsUserDefined::new();
            options.intra_threads = Some(1);
            let session =
                TextEmbedding::try_new_from_user_defined(model, options).map_err(|err| CacheError::ModelMissing {
                    path: paths.model_dir.clone(),
                    reason: format!("cannot load the model: {err}"),
                })?;
            loaded.push(Mutex::new(session));
        }
        let mut embedder = Self {
            sessions: loaded,
            next_session: AtomicUsize::new(0),
            recent: None,
            dimensions: 0,
            model_id,
            runs: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
        };
        embedder.dimensions = embedder.run_model("dimension probe")?.len();
        embedder.runs.store(0, Ordering::Relaxed);
        embedder.busy_nanos.store(0, Ordering::Relaxed);
        Ok(embedder.remembering(RECENT_EMBEDDINGS))
    }

    /// Keeps the vectors of the last `texts` texts (0: none, as latency benchmarks need).
    pub fn remembering(mut self, texts: u64) -> Self {
        self.recent = (texts > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(texts)
                // TinyLFU would turn away a text seen once, which is most of them; a text
                // embedded ahead of its call must still be there when the call comes.
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build()
        });
        self
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The first 16 hex digits of the model file's SHA-256: vectors of different models must
    /// never be compared (snapshots and stored embeddings check it).
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Unit-length vectors, in the order of `texts`, spread over the sessions. Each text is
    /// embedded alone: the dynamically quantised model scales activations per input tensor, so
    /// a text batched with others would get a slightly different vector than the same text
    /// embedded when its call comes.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, CacheError> {
        if self.sessions.len() < 2 || texts.len() < 2 {
            return texts.iter().map(|text| self.embed_one(text)).collect();
        }
        let next = AtomicUsize::new(0);
        let mut done: Vec<(usize, Result<Vec<f32>, CacheError>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..self.sessions.len())
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let index = next.fetch_add(1, Ordering::Relaxed);
                            let Some(text) = texts.get(index) else { return done };
                            done.push((index, self.embed_one(text)));
                        }
                    })
                })
                .collect();
            workers.into_iter().flat_map(|worker| worker.join().unwrap_or_default()).collect()
        });
        if done.len() != texts.len() {
            return Err(CacheError::Embedding("an embedding worker stopped early".into()));
        }
        done.sort_unstable_by_key(|(index, _)| *index);
        done.into_iter().map(|(_, vector)| vector).collect()
    }

    /// How many tokens the model reads of `text` (its special tokens included, cut at the
    /// model's maximum length as embedding cuts it).
    pub fn count_tokens(&self, text: &str) -> Result<usize, CacheError> {
        let session = self.sessions[0].lock().unwrap_or_else(PoisonError::into_inner);
        let encoding =
            session.tokenizer.encode(text, true).map_err(|err| CacheError::Embedding(format!("tokenizer: {err}")))?;
        Ok(encoding.get_ids().len())
    }

    /// Texts embedded and the time the model took for them, since it was loaded.
    pub fn work(&self) -> EmbeddingWork {
        EmbeddingWork {
            texts: self.runs.load(Ordering::Relaxed),
            busy: std::time::Duration::from_nanos(self.busy_nanos.load(Ordering::Relaxed)),
        }
    }

    /// The vector of a text embedded lately, without running the model.
    pub fn remembered(&self, text: &str) -> Option<Vec<f32>> {
        self.recent.as_ref()?.get(text).map(|vector| vector.to_vec())
    }

    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, CacheError> {
        let Some(recent) = &self.recent else { return self.run_model(text) };
        if let Some(vector) = recent.get(text) {
            return Ok(vector.to_vec());
        }
        let vector = self.run_model(text)?;
        recent.insert(text.to_owned(), Arc::from(vector.as_slice()));
        Ok(vector)
    }

    fn run_model(&self, text: &str) -> Result<Vec<f32>, CacheError> {
        let sessions = self.sessions.len();
        let first = self.next_session.fetch_add(1, Ordering::Relaxed) % sessions;
        // A free session if there is one, else wait for the one in turn.
        let mut session = (0..sessions)
            .find_map(|offset| self.sessions[(first + offset) % sessions].try_lock().ok())
            .unwrap_or_else(|| self.sessions[first].lock().unwrap_or_else(PoisonError::into_inner));
        let started = std::time::Instant::now();
        let mut vector = session
            .embed([text], None)
            .map_err(|err| CacheError::Embedding(err.to_string()))?
            .pop()
            .ok_or_else(|| CacheError::Embedding("the model returned no vector".into()))?;
        drop(session);
        self.busy_nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.runs.fetch_add(1, Ordering::Relaxed);
        normalise(&mut vector);
        Ok(vector)
    }
}

/// Scales to unit length; a zero vector stays zero.
pub fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

/// ONNX Runtime is loaded once per process. Only success is remembered: a failed attempt
/// (a wrong path) must not stop a later one with the right path.
fn load_onnxruntime(path: &Path) -> Result<(), CacheError> {
    static LOADED: OnceLock<PathBuf> = OnceLock::new();
    if LOADED.get().is_some() {
        return Ok(());
    }
    let missing = |reason: String| CacheError::RuntimeMissing { path: path.to_owned(), reason };
    if !path.is_file() {
        return Err(missing(format!("no such file; {SETUP_HINT}")));
    }
    ort::init_from(path).map_err(|err| missing(format!("{err}; {SETUP_HINT}")))?;
    let _ = LOADED.set(path.to_owned());
    Ok(())
}
