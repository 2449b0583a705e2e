//! OpenAI's stream parser (`chat.completion.chunk` events, `[DONE]`), on any bytes cut anywhere.
#![no_main]

#[path = "../common/stream.rs"]
mod stream;

use libfuzzer_sys::fuzz_target;
use pipeline_core::providers::openai_events;

fuzz_target!(|data: &[u8]| stream::check(data, |chunks| Box::pin(openai_events(chunks))));
