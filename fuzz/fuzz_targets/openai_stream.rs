//! OpenAI's stream parser (chat.completion.chunk events, `[DONE]`), on any bytes cut anywhere: events or a classified error, never a
//! panic, and nothing after an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipeline_core::providers::{ProviderError, StreamedReply, openai_events};

fuzz_target!(|data: &[u8]| {
    // The first byte says where the network cut the body.
    let Some((&cut, body)) = data.split_first() else { return };
    let size = usize::from(cut).max(1);
    let chunks: Vec<Result<Vec<u8>, ProviderError>> = body.chunks(size).map(|chunk| Ok(chunk.to_vec())).collect();
    let events: Vec<_> = futures::executor::block_on(futures::StreamExt::collect(openai_events(futures::stream::iter(chunks))));
    if let Some(position) = events.iter().position(Result::is_err) {
        assert_eq!(position, events.len() - 1, "nothing is read after an error");
    }
    let mut reply = StreamedReply::default();
    for event in events.iter().flatten() {
        reply.push(event);
    }
    let _ = reply.finish("fuzz", std::time::Duration::ZERO);
});
