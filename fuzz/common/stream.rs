//! What the stream parsers' fuzz targets share: a body cut where the first byte says, parsed
//! by `parse`, folded into a reply. Events or a classified error, never a panic, and nothing
//! read after an error.

use std::pin::Pin;

use futures::Stream;
use pipeline_core::providers::{ProviderError, StreamEvent, StreamedReply};

type Chunks = futures::stream::Iter<std::vec::IntoIter<Result<Vec<u8>, ProviderError>>>;
type Events = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

pub fn check(data: &[u8], parse: fn(Chunks) -> Events) {
    // The first byte says where the network cut the body.
    let Some((&cut, body)) = data.split_first() else { return };
    let size = usize::from(cut).max(1);
    let chunks: Vec<Result<Vec<u8>, ProviderError>> = body.chunks(size).map(|chunk| Ok(chunk.to_vec())).collect();
    let events: Vec<_> = futures::executor::block_on(futures::StreamExt::collect(parse(futures::stream::iter(chunks))));
    if let Some(position) = events.iter().position(Result::is_err) {
        assert_eq!(position, events.len() - 1, "nothing is read after an error");
    }
    let mut reply = StreamedReply::default();
    for event in events.iter().flatten() {
        let _ = reply.push(event);
    }
    let _ = reply.finish("fuzz", std::time::Duration::ZERO);
}
