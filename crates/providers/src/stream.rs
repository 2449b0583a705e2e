//! Streamed replies, whatever the provider: its events ([`StreamEvent`]) folded into the whole
//! reply ([`StreamedReply`]) while each piece of content or of a tool call is forwarded to the
//! caller's [`StreamSink`] as it arrives.
//!
//! The whole reply is still what the provider answers with, so the engine validates, prices,
//! records and caches a streamed reply as any other, once it has ended cleanly.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use eventsource_stream::{EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::{ChatResponse, FinishReason, ProviderError, ToolCall, Usage};

/// One event of a streamed reply, in the terms the gateway needs (each provider's parser maps
/// its own wire events into these).
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The reply began; the usage known so far (the whole input).
    Start { model: String, usage: Usage },
    /// More text of content block `index`.
    Text { index: usize, text: String },
    /// A tool call began in block `index`.
    ToolCallStart { index: usize, id: String, name: String },
    /// More of a tool call's arguments, as a JSON fragment.
    ToolCallArguments { index: usize, partial_json: String },
    /// Why the model stopped, and the whole reply's usage so far.
    Delta { finish_reason: Option<FinishReason>, usage: Usage },
    /// The reply is complete.
    Stop,
    /// Keep-alive; carries nothing.
    Ping,
}

/// A piece of a reply as the caller receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    Text(String),
    /// A piece of tool call `index` (0-based, in the reply's order): its id and name come with
    /// its first piece, its arguments in fragments of JSON text.
    ToolCall {
        index: usize,
        id: Option<String>,
        name: Option<String>,
        arguments: String,
    },
}

/// Where a streamed reply's pieces go. Cloned into the provider's request; the receiving end
/// is the caller's (the gateway's response body). When the receiver is gone, the provider
/// stops reading the upstream and fails with [`ProviderError::ClientClosed`].
#[derive(Clone)]
pub struct StreamSink {
    sender: mpsc::Sender<Delta>,
    first_sent: Arc<OnceLock<Instant>>,
}

impl fmt::Debug for StreamSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSink").field("forwarded", &self.forwarded()).finish_non_exhaustive()
    }
}

/// Two sinks are the same when they feed the same receiver.
impl PartialEq for StreamSink {
    fn eq(&self, other: &Self) -> bool {
        self.sender.same_channel(&other.sender)
    }
}

impl StreamSink {
    /// A sink and its receiving end; `capacity` pieces may wait for a slow reader before the
    /// provider waits too (and so reads the upstream no faster than the caller).
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Delta>) {
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        (Self { sender, first_sent: Arc::new(OnceLock::new()) }, receiver)
    }

    /// Forwards one piece.
    pub async fn send(&self, delta: Delta) -> Result<(), ProviderError> {
        self.first_sent.get_or_init(Instant::now);
        self.sender.send(delta).await.map_err(|_| ProviderError::ClientClosed)
    }

    /// Whether any piece has gone to the caller: after that, a failure cannot be hidden by a
    /// retry or another model, whose answer would not continue what the caller has.
    pub fn forwarded(&self) -> bool {
        self.first_sent.get().is_some()
    }

    /// When the first piece went out.
    pub fn first_sent_at(&self) -> Option<Instant> {
        self.first_sent.get().copied()
    }

    /// Whether the caller has gone.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Resolves when the caller has gone.
    pub async fn closed(&self) {
        self.sender.closed().await;
    }
}

/// A streamed reply, put together event by event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamedReply {
    model: String,
    text: String,
    /// In the reply's order, with the stream's index of each (a content block index for
    /// Anthropic, the tool call's own index for OpenAI).
    tool_calls: Vec<(usize, ToolCall)>,
    usage: Usage,
    finish_reason: Option<FinishReason>,
    stopped: bool,
}

impl StreamedReply {
    /// Folds one event in; what the caller should receive of it, if anything.
    pub fn push(&mut self, event: &StreamEvent) -> Option<Delta> {
        match event {
            StreamEvent::Start { model, usage } => {
                self.model.clone_from(model);
                self.usage = *usage;
                None
            }
            StreamEvent::Text { text, .. } => {
                self.text.push_str(text);
                (!text.is_empty()).then(|| Delta::Text(text.clone()))
            }
            StreamEvent::ToolCallStart { index, id, name } => {
                let ordinal = self.tool_call(*index);
                let call = &mut self.tool_calls[ordinal].1;
                call.id.clone_from(id);
                call.name.clone_from(name);
                Some(Delta::ToolCall {
                    index: ordinal,
                    id: Some(id.clone()),
                    name: Some(name.clone()),
                    arguments: String::new(),
                })
            }
            StreamEvent::ToolCallArguments { index, partial_json } => {
                let ordinal = self.tool_call(*index);
                self.tool_calls[ordinal].1.arguments.push_str(partial_json);
                (!partial_json.is_empty()).then(|| Delta::ToolCall {
                    index: ordinal,
                    id: None,
                    name: None,
                    arguments: partial_json.clone(),
                })
            }
            StreamEvent::Delta { finish_reason, usage } => {
                self.finish_reason = finish_reason.or(self.finish_reason);
                self.usage = *usage;
                None
            }
            StreamEvent::Stop => {
                self.stopped = true;
                None
            }
            StreamEvent::Ping => None,
        }
    }

    /// The position of the tool call with the stream's `index`, begun if new.
    fn tool_call(&mut self, index: usize) -> usize {
        match self.tool_calls.iter().position(|(seen, _)| *seen == index) {
            Some(ordinal) => ordinal,
            None => {
                self.tool_calls
                    .push((index, ToolCall { id: String::new(), name: String::new(), arguments: String::new() }));
                self.tool_calls.len() - 1
            }
        }
    }

    /// The whole reply, once the stream said it was complete; a stream cut short is a
    /// malformed reply, not a short answer.
    pub fn finish(self, provider: &str, latency: Duration) -> Result<ChatResponse, ProviderError> {
        if !self.stopped {
            return Err(ProviderError::MalformedReply {
                message: "the stream ended before the reply was complete".into(),
            });
        }
        let tool_calls: Vec<ToolCall> = self.tool_calls.into_iter().map(|(_, call)| call).collect();
        let finish_reason = match self.finish_reason {
            Some(reason) => reason,
            None if !tool_calls.is_empty() => FinishReason::ToolCalls,
            None => FinishReason::Stop,
        };
        Ok(ChatResponse {
            content: self.text,
            tool_calls,
            model: self.model,
            provider: provider.to_owned(),
            usage: self.usage,
            finish_reason,
            latency,
            declared_limits: None,
            time_to_first_token: None,
        })
    }
}

/// The data of each server-sent event in a stream of body bytes; a body that cannot be read as
/// events is a [`ProviderError::MalformedReply`], a transport failure the provider's own error.
pub(crate) fn event_data<S, B, E>(bytes: S) -> impl Stream<Item = Result<String, ProviderError>> + Send + 'static
where
    S: Stream<Item = Result<B, E>> + Send + 'static,
    B: AsRef<[u8]> + Send + 'static,
    E: Into<ProviderError> + Send + 'static,
{
    bytes.eventsource().map(|event| match event {
        Ok(event) => Ok(event.data),
        Err(EventStreamError::Transport(err)) => Err(err.into()),
        Err(EventStreamError::Utf8(err)) => {
            Err(ProviderError::MalformedReply { message: format!("the event stream is not UTF-8: {err}") })
        }
        Err(EventStreamError::Parser(err)) => {
            Err(ProviderError::MalformedReply { message: format!("not an event stream: {err}") })
        }
    })
}

/// The events up to and including the last one a reply has (`Stop`, or an error), without
/// reading the body any further: a server may keep the connection open after it.
pub(crate) fn until_last<S>(events: S) -> impl Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static
where
    S: Stream<Item = Result<StreamEvent, ProviderError>> + Send + 'static,
{
    futures::stream::unfold((Box::pin(events), false), |(mut events, ended)| async move {
        if ended {
            return None;
        }
        let event = events.next().await?;
        let last = matches!(event, Ok(StreamEvent::Stop) | Err(_));
        Some((event, (events, last)))
    })
}

/// Reads a provider's events to their end, forwarding every piece to `sink`, and answers with
/// the whole reply. Stops reading, and fails with [`ProviderError::ClientClosed`], as soon as
/// the caller has gone: the upstream request is dropped with the stream.
pub(crate) async fn forward<S>(
    events: S,
    sink: &StreamSink,
    provider: &str,
    started: Instant,
) -> Result<ChatResponse, ProviderError>
where
    S: Stream<Item = Result<StreamEvent, ProviderError>>,
{
    let mut events = std::pin::pin!(events);
    let mut reply = StreamedReply::default();
    loop {
        let next = tokio::select! {
            biased;
            () = sink.closed() => return Err(ProviderError::ClientClosed),
            next = events.next() => next,
        };
        match next {
            None => break,
            Some(Err(err)) => return Err(err),
            Some(Ok(event)) => {
                if let Some(delta) = reply.push(&event) {
                    sink.send(delta).await?;
                }
                // The reply is whole at its last event (`[DONE]`, `message_stop`): a server
                // that keeps the connection open after it must not hold the call until its
                // timeout.
                if event == StreamEvent::Stop {
                    break;
                }
            }
        }
    }
    let mut response = reply.finish(provider, started.elapsed())?;
    if response.usage == Usage::default() {
        tracing::warn!(provider, model = %response.model, "the stream carried no usage; tokens and cost count as zero");
    }
    response.time_to_first_token = sink.first_sent_at().map(|first| first.saturating_duration_since(started));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tool_calls_are_numbered_in_order_whatever_the_stream_calls_them() {
        let mut reply = StreamedReply::default();
        let deltas: Vec<Option<Delta>> = [
            StreamEvent::Text { index: 0, text: "Let me look.".into() },
            StreamEvent::ToolCallStart { index: 3, id: "a".into(), name: "weather".into() },
            StreamEvent::ToolCallArguments { index: 3, partial_json: "{\"city\":".into() },
            StreamEvent::ToolCallStart { index: 5, id: "b".into(), name: "time".into() },
            StreamEvent::ToolCallArguments { index: 3, partial_json: "\"Oslo\"}".into() },
            StreamEvent::Delta { finish_reason: Some(FinishReason::ToolCalls), usage: Usage::new(5, 9) },
            StreamEvent::Stop,
        ]
        .iter()
        .map(|event| reply.push(event))
        .collect();
        assert_eq!(deltas[0], Some(Delta::Text("Let me look.".into())));
        assert!(matches!(&deltas[3], Some(Delta::ToolCall { index: 1, name: Some(name), .. }) if name == "time"));
        assert!(matches!(&deltas[4], Some(Delta::ToolCall { index: 0, id: None, .. })));
        let reply = reply.finish("p", Duration::ZERO).unwrap();
        assert_eq!(reply.tool_calls[0].arguments, "{\"city\":\"Oslo\"}");
        assert_eq!(reply.tool_calls[1].name, "time");
        assert_eq!(reply.finish_reason, FinishReason::ToolCalls);
    }

    #[tokio::test]
    async fn a_caller_gone_stops_the_reading() {
        let (sink, receiver) = StreamSink::channel(4);
        drop(receiver);
        let endless = futures::stream::repeat_with(|| Ok(StreamEvent::Text { index: 0, text: "x".into() }));
        let err = forward(endless, &sink, "p", Instant::now()).await.unwrap_err();
        assert_eq!(err, ProviderError::ClientClosed);
    }
}
