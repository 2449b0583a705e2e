use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("embedding model at `{}` is not usable: {reason}", path.display())]
    ModelMissing { path: PathBuf, reason: String },
    #[error("ONNX Runtime at `{}` is not usable: {reason}", path.display())]
    RuntimeMissing { path: PathBuf, reason: String },
    #[error("embedding failed: {0}")]
    Embedding(String),
    #[error("cache snapshot `{}`: {reason}", path.display())]
    Snapshot { path: PathBuf, reason: String },
}

impl CacheError {
    /// A failed embedding of one text may work on the next; missing files will not appear.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Embedding(_))
    }

    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::ModelMissing { .. } => "model_missing",
            Self::RuntimeMissing { .. } => "runtime_missing",
            Self::Embedding(_) => "embedding",
            Self::Snapshot { .. } => "snapshot",
        }
    }
}
