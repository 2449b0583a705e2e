//! Answer caches.
//!
//! [`ExactCache`] serves a stored answer for a request whose canonical form hashes to the same
//! [`CacheKey`]. [`SemanticCache`] serves one for a request that means the same: the text is
//! normalised ([`ConceptNormalizer`]), embedded by a local ONNX model ([`Embedder`]), searched
//! in an HNSW index per namespace, and a candidate is served only if it passes the guards of
//! [`verify`] and convinces the [`learned`] verifier (or, for a model the verifier was not
//! trained for, clears a cosine threshold). Neither cache knows what a step, a model or a
//! workspace is: callers put those into keys and namespaces.

pub mod audit;
mod error;
mod exact;
mod forest;
mod key;
pub mod learned;
mod model;
mod normalize;
mod semantic;
pub mod verify;

pub use error::CacheError;
pub use exact::{CachedEntry, ExactCache};
pub use forest::{Forest, Node, Tree};
pub use key::{CacheKey, CacheKeyBuilder, canonical_json};
pub use learned::{ServeBar, Verifier};
pub use model::{
    DEFAULT_MODEL, Embedder, EmbeddingWork, ModelPaths, ONNXRUNTIME_LIBRARY, RECENT_EMBEDDINGS, normalise,
};
pub use normalize::{ConceptNormalizer, DEFAULT_EQUIVALENCES, tokens};
pub use semantic::{IndexStats, Lookup, MIN_EF_SEARCH, Query, ScoreKind, SemanticCache, SemanticHit, SemanticSettings};
