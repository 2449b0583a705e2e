//! Anthropic's stream parser (Messages API events), on any bytes cut anywhere.
#![no_main]

#[path = "../common/stream.rs"]
mod stream;

use libfuzzer_sys::fuzz_target;
use pipeline_core::providers::anthropic_events;

fuzz_target!(|data: &[u8]| stream::check(data, |chunks| Box::pin(anthropic_events(chunks))));
