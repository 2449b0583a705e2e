//! The local sentence-embedding model and the ONNX Runtime library, found on disk.
//!
//! Nothing here downloads anything: `aipipe setup` puts the files in place (from registry
//! packages, checked against pinned hashes), and a missing file is an error that says so.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

use fastembed::{InitOptionsUserDefined, Pooling, TextEmbedding, TokenizerFiles, UserDefinedEmbeddingModel};

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

/// Sentence embeddings from a local ONNX model: mean-pooled and L2-normalised, so that a dot
/// product is the cosine similarity.
pub struct Embedder {
    // fastembed's `embed` takes `&mut self`; one session serves calls one batch at a time.
    model: Mutex<TextEmbedding>,
    dimensions: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder").field("dimensions", &self.dimensions).finish_non_exhaustive()
    }
}

impl Embedder {
    /// Loads ONNX Runtime from `paths.onnxruntime` and the model from `paths.model_dir`.
    /// `threads` caps ONNX Runtime's intra-op threads (0: one per core).
    pub fn load(paths: &ModelPaths, threads: usize) -> Result<Self, CacheError> {
        load_onnxruntime(&paths.onnxruntime)?;
        let read = |file: &str| {
            let path = paths.model_dir.join(file);
            std::fs::read(&path)
                .map_err(|err| CacheError::ModelMissing { path: path.clone(), reason: format!("{err}; {SETUP_HINT}") })
        };
        let tokenizer = TokenizerFiles {
            tokenizer_file: read("tokenizer.json")?,
            config_file: read("config.json")?,
            special_tokens_map_file: read("special_tokens_map.json")?,
            tokenizer_config_file: read("tokenizer_config.json")?,
        };
        // fastembed pools user-defined models by the CLS token unless told; this model was
        // trained with mean pooling, and CLS vectors of it are much worse.
        let model = UserDefinedEmbeddingModel::new(read("model.onnx")?, tokenizer).with_pooling(Pooling::Mean);
        let mut options = InitOptionsUserDefined::new();
        if threads > 0 {
            options.intra_threads = Some(threads);
        }
        let mut model = TextEmbedding::try_new_from_user_defined(model, options).map_err(|err| {
            CacheError::ModelMissing { path: paths.model_dir.clone(), reason: format!("cannot load the model: {err}") }
        })?;
        let probe = model.embed(["dimension probe"], None).map_err(|err| CacheError::Embedding(err.to_string()))?;
        let dimensions = probe.first().map(Vec::len).unwrap_or(0);
        Ok(Self { model: Mutex::new(model), dimensions })
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Unit-length vectors, in the order of `texts`.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, CacheError> {
        // A batch is padded to its longest text; embedding in length order keeps the padding,
        // and so the wasted work, small.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let sorted: Vec<&str> = order.iter().map(|&i| texts[i]).collect();
        let embedded = {
            let mut model = self.model.lock().unwrap_or_else(PoisonError::into_inner);
            model.embed(&sorted, Some(64)).map_err(|err| CacheError::Embedding(err.to_string()))?
        };
        let mut vectors = vec![Vec::new(); texts.len()];
        for (slot, mut vector) in order.into_iter().zip(embedded) {
            normalise(&mut vector);
            vectors[slot] = vector;
        }
        Ok(vectors)
    }

    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, CacheError> {
        self.embed(&[text])?.pop().ok_or_else(|| CacheError::Embedding("the model returned no vector".into()))
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
