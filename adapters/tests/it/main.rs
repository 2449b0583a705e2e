//! The adapters' integration tests, in one binary: the shims' conversions and migrating
//! components through the engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod conversions;
mod migration;
