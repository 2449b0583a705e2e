//! Answer caches.
//!
//! [`ExactCache`] serves a stored answer for a request whose canonical form hashes to the same
//! [`CacheKey`]. Callers decide what goes into the key ([`CacheKey::builder`]); the cache knows
//! nothing of steps, models or workspaces, only that different keys never share an entry.

mod exact;
mod key;

pub use exact::{CachedEntry, ExactCache};
pub use key::{CacheKey, CacheKeyBuilder, canonical_json};
