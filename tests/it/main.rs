//! The `aipipe` binary's integration tests, in one binary: the commands as a user runs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod local_model;
mod migrate;
mod otlp;
mod prometheus;
mod replay;
mod replicas;
mod sdk;
mod serve;
mod status;
