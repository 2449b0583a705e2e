//! The engine's integration tests, in one binary (each test binary is linked on its own, and
//! linking dominates a build on two cores): real HTTP to a scripted upstream, real SQLite and
//! PostgreSQL, the real embedding model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod audit;
mod engine_http;
mod index;
mod resilience;
mod routing;
mod semantic;
mod shared;
mod telemetry;
