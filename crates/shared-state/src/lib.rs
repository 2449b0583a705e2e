//! State that several replicas share through Redis, so that no single process is the point
//! of failure and a cache or a limit means the same through every replica.
//!
//! - [`Store`]: one Redis, every command bounded by a timeout and behind a breaker of its own;
//!   callers fail open on any [`SharedError`].
//! - [`SharedAnswers`]: exact-cache answers, with Redis's expiry.
//! - [`SharedFeed`]: semantic cache entries as a stream that each replica follows into its own
//!   in-process index.
//! - [`SharedBuckets`]: token buckets on the server's clock, one Lua script per decision.
//! - [`SharedBreakers`]: open breakers with their expiry.
//!
//! It knows nothing of what it stores: the engine and the guards give it bytes, keys and
//! numbers.

mod answers;
mod breakers;
mod buckets;
mod counts;
mod error;
mod feed;
mod store;

pub use answers::SharedAnswers;
pub use breakers::SharedBreakers;
pub use buckets::{BucketAsk, SharedBuckets, Take};
pub use counts::SharedCounts;
pub use error::SharedError;
pub use feed::{FeedEntry, FeedPosition, SharedFeed};
pub use store::{PartStatus, Store, StoreSettings};
