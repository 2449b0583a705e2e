//! What the `aipipe` command reads from outside, as a library: the call log a replay reads
//! (docs/log-format.md) and OpenAI's chat completion request as the gateway and the log reader
//! take it. Public so that the fuzz targets (`fuzz/`) drive exactly the parsers the command
//! runs.

pub mod log;
pub mod openai;
