use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tower::Service;

use crate::{ChatRequest, ChatResponse, FinishReason, ProviderError, Usage};

#[derive(Debug, Clone, PartialEq)]
pub struct RecordedReply {
    pub content: String,
    pub model: String,
    pub usage: Usage,
}

/// One logged upstream call: what it answered (or how it failed) and how long it took.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    pub trace_id: String,
    pub outcome: Result<RecordedReply, ProviderError>,
    pub latency: Duration,
}

/// A provider that answers from a call log instead of the network, for replay.
///
/// Calls are found by the request's trace id, so the answer does not depend on how the
/// engine renders the prompt. Asking twice for the same trace id (a repair attempt) gets the
/// same answer again, as the upstream would most likely have given.
#[derive(Debug, Clone, Default)]
pub struct RecordedProvider {
    calls: Arc<HashMap<String, RecordedCall>>,
    served: Arc<AtomicU64>,
}

impl RecordedProvider {
    /// Later calls with a trace id already seen replace earlier ones; callers that care
    /// (the replay command) reject duplicate ids before they get here.
    pub fn new(calls: impl IntoIterator<Item = RecordedCall>) -> Self {
        let calls = calls.into_iter().map(|call| (call.trace_id.clone(), call)).collect();
        Self { calls: Arc::new(calls), served: Arc::default() }
    }

    /// How many requests reached this provider: the "AI calls made" of a replay.
    pub fn requests_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn answer(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        self.served.fetch_add(1, Ordering::Relaxed);
        let call = self
            .calls
            .get(&request.trace_id)
            .ok_or_else(|| ProviderError::NotRecorded { trace_id: request.trace_id.clone() })?;
        let reply = call.outcome.clone()?;
        Ok(ChatResponse {
            content: reply.content,
            model: reply.model,
            provider: "recorded".into(),
            usage: reply.usage,
            // Call logs do not keep why a reply ended.
            finish_reason: FinishReason::Stop,
            latency: call.latency,
            declared_limits: None,
        })
    }
}

impl Service<ChatRequest> for RecordedProvider {
    type Response = ChatResponse;
    type Error = ProviderError;
    type Future = Ready<Result<ChatResponse, ProviderError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: ChatRequest) -> Self::Future {
        ready(self.answer(&request))
    }
}
