//! What aipipe's tests (and benchmarks) share, as a dev-dependency only: a scripted
//! OpenAI-compatible upstream ([`ScriptedUpstream`]), a PostgreSQL database per test
//! ([`fresh_postgres`]), the engine wired to both ([`Harness`]), and `aipipe serve` as a process
//! ([`GatewayProcess`]), a Redis server per test ([`RedisServer`]), and llama.cpp's server with a small model ([`LlamaServer`]).

mod engine;
mod gateway;
mod llama;
mod postgres;
mod redis;
mod upstream;

pub use engine::{CLASSIFIED, Harness, HarnessBuilder, START, embedder};
pub use gateway::GatewayProcess;
pub use llama::LlamaServer;
pub use postgres::fresh_postgres;
pub use redis::RedisServer;
pub use upstream::{Dialect, Exchange, Failure, Reply, ScriptedUpstream, Streamed};
