use std::collections::HashMap;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
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
///
/// Asked for another model than the log's (a replay under another routing policy), it answers
/// with what the log holds, as that model, and an estimated latency: the logged one scaled by
/// the ratio of the two models' median latencies over the log's answered calls, or the logged
/// one as it is when the log never called the other model. A logged failure stays a failure:
/// the log holds no answer to give.
#[derive(Debug, Clone, Default)]
pub struct RecordedProvider {
    calls: Arc<HashMap<String, RecordedCall>>,
    /// Median latency of each model's answered calls in the log.
    medians: Arc<HashMap<String, Duration>>,
    served: Arc<AtomicU64>,
    /// The model each trace id was last asked for.
    asked: Arc<Mutex<HashMap<String, String>>>,
}

impl RecordedProvider {
    /// Later calls with a trace id already seen replace earlier ones; callers that care
    /// (the replay command) reject duplicate ids before they get here.
    pub fn new(calls: impl IntoIterator<Item = RecordedCall>) -> Self {
        let calls: HashMap<String, RecordedCall> =
            calls.into_iter().map(|call| (call.trace_id.clone(), call)).collect();
        let mut latencies: HashMap<String, Vec<Duration>> = HashMap::new();
        for call in calls.values() {
            if let Ok(reply) = &call.outcome {
                latencies.entry(reply.model.clone()).or_default().push(call.latency);
            }
        }
        let medians = latencies
            .into_iter()
            .map(|(model, mut latencies)| {
                latencies.sort();
                (model, latencies[latencies.len() / 2])
            })
            .collect();
        Self { calls: Arc::new(calls), medians: Arc::new(medians), served: Arc::default(), asked: Arc::default() }
    }

    /// How many requests reached this provider: the "AI calls made" of a replay.
    pub fn requests_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// The model the call with this trace id was last asked of, if it reached this provider.
    pub fn model_asked(&self, trace_id: &str) -> Option<String> {
        self.asked.lock().unwrap_or_else(PoisonError::into_inner).get(trace_id).cloned()
    }

    /// The median latency of `model`'s answered calls in the log; a dated name (as replies
    /// carry) counts as the name it extends.
    fn median(&self, model: &str) -> Option<Duration> {
        self.medians.get(model).copied().or_else(|| {
            self.medians.iter().filter(|(logged, _)| is_same_model(logged, model)).map(|(_, median)| *median).next()
        })
    }

    fn answer(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        self.served.fetch_add(1, Ordering::Relaxed);
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(request.trace_id.clone(), request.model.clone());
        let call = self
            .calls
            .get(&request.trace_id)
            .ok_or_else(|| ProviderError::NotRecorded { trace_id: request.trace_id.clone() })?;
        let reply = call.outcome.clone()?;
        if is_same_model(&reply.model, &request.model) {
            return Ok(ChatResponse {
                tool_calls: Vec::new(),
                time_to_first_token: None,
                content: reply.content,
                model: reply.model,
                provider: "recorded".into(),
                usage: reply.usage,
                // Call logs do not keep why a reply ended.
                finish_reason: FinishReason::Stop,
                latency: call.latency,
                declared_limits: None,
            });
        }
        let latency = match (self.median(&request.model), self.median(&reply.model)) {
            (Some(asked), Some(logged)) if !logged.is_zero() => {
                call.latency.mul_f64(asked.as_secs_f64() / logged.as_secs_f64())
            }
            _ => call.latency,
        };
        Ok(ChatResponse {
            tool_calls: Vec::new(),
            time_to_first_token: None,
            content: reply.content,
            model: request.model.clone(),
            provider: "recorded".into(),
            usage: reply.usage,
            finish_reason: FinishReason::Stop,
            latency,
            declared_limits: None,
        })
    }
}

/// Whether two model names are one model: equal, or one a dated variant of the other
/// (`gpt-4o-mini-2024-07-18` of `gpt-4o-mini`).
pub fn is_same_model(a: &str, b: &str) -> bool {
    let extends = |long: &str, short: &str| {
        long.strip_prefix(short)
            .is_some_and(|rest| rest.starts_with('-') && rest[1..].starts_with(|c: char| c.is_ascii_digit()))
    };
    a == b || extends(a, b) || extends(b, a)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatMessage, ResponseFormat};

    fn call(trace_id: &str, model: &str, latency_ms: u64) -> RecordedCall {
        RecordedCall {
            trace_id: trace_id.into(),
            outcome: Ok(RecordedReply { content: "{}".into(), model: model.into(), usage: Usage::new(10, 2) }),
            latency: Duration::from_millis(latency_ms),
        }
    }

    fn ask(provider: &RecordedProvider, trace_id: &str, model: &str) -> ChatResponse {
        provider
            .answer(&ChatRequest {
                model: model.into(),
                messages: vec![ChatMessage::user("x")],
                response_format: ResponseFormat::Text,
                trace_id: trace_id.into(),
                ..ChatRequest::default()
            })
            .unwrap()
    }

    #[test]
    fn another_model_answers_with_the_log_at_its_own_median_pace() {
        let provider = RecordedProvider::new([
            call("a", "gpt-4o-2024-08-06", 1000),
            call("b", "gpt-4o-2024-08-06", 1200),
            call("c", "gpt-4o-mini", 400),
            call("d", "gpt-4o-mini", 500),
        ]);
        let same = ask(&provider, "a", "gpt-4o");
        assert_eq!((same.model.as_str(), same.latency), ("gpt-4o-2024-08-06", Duration::from_millis(1000)));
        // gpt-4o-mini's median (500 ms) over gpt-4o's (1200 ms).
        let other = ask(&provider, "b", "gpt-4o-mini");
        assert_eq!(other.model, "gpt-4o-mini");
        assert_eq!(other.latency, Duration::from_millis(500));
        // A model the log never called: the logged latency as it is.
        assert_eq!(ask(&provider, "c", "claude-haiku-4-5").latency, Duration::from_millis(400));
        assert_eq!(provider.model_asked("c").as_deref(), Some("claude-haiku-4-5"));
        assert!(is_same_model("gpt-4o-mini-2024-07-18", "gpt-4o-mini") && !is_same_model("gpt-4o-mini", "gpt-4o"));
    }
}
