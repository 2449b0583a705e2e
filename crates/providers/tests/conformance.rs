//! One conformance suite, every provider: the same cases, generated per provider, each
//! against a scripted upstream speaking that provider's API over real HTTP. Whatever the API,
//! a reply reads the same and every failure lands in the class the engine relies on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use providers::{
    Anthropic, ChatMessage, ChatRequest, ErrorClass, FinishReason, LimitWindow, OpenAiCompatible, ProviderError,
    ProviderService, ResponseFormat,
};
use serde_json::Value;
use testkit::{Reply, ScriptedUpstream};
use tower::ServiceExt;

/// A provider under test, and where its API puts what the cases check in a request.
struct Subject {
    make: fn(&ScriptedUpstream, Duration) -> ProviderService,
    /// The key it was given, which no error may repeat.
    api_key: &'static str,
    /// The request's output budget as sent.
    max_tokens: fn(&Value) -> Option<u64>,
    /// The system prompt as sent.
    system: fn(&Value) -> Option<String>,
}

const OPENAI: Subject = Subject {
    make: |upstream, timeout| ProviderService::new(upstream.provider(timeout)),
    api_key: "sk-test",
    max_tokens: |sent| sent["max_completion_tokens"].as_u64(),
    system: |sent| {
        sent["messages"][0]["content"].as_str().filter(|_| sent["messages"][0]["role"] == "system").map(str::to_owned)
    },
};

const ANTHROPIC: Subject = Subject {
    make: |upstream, timeout| ProviderService::new(upstream.anthropic_provider(timeout)),
    api_key: "sk-ant-test",
    max_tokens: |sent| sent["max_tokens"].as_u64(),
    system: |sent| sent["system"].as_str().map(str::to_owned),
};

fn request() -> ChatRequest {
    ChatRequest {
        model: "some-model".into(),
        messages: vec![ChatMessage::system("Answer in JSON."), ChatMessage::user("Classify: hello")],
        temperature: Some(0.0),
        max_output_tokens: Some(50),
        response_format: ResponseFormat::JsonObject,
        trace_id: "trace-1".into(),
        ..ChatRequest::default()
    }
}

const LONG: Duration = Duration::from_secs(5);

/// The error `reply` ends in, and how many requests reached the upstream.
async fn failure(subject: &Subject, reply: Reply, timeout: Duration) -> (ProviderError, u64) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(reply);
    let err = (subject.make)(&upstream, timeout).oneshot(request()).await.unwrap_err();
    (err, upstream.requests())
}

async fn a_reply_reads_the_same(subject: Subject) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(Reply::completion_with_usage(r#"{"label":"greeting"}"#, 12, 5));
    let reply = (subject.make)(&upstream, LONG).oneshot(request()).await.unwrap();
    assert_eq!(reply.content, r#"{"label":"greeting"}"#);
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (12, 5));
    assert_eq!(reply.finish_reason, FinishReason::Stop);
    assert_eq!(reply.model, "some-model");
    let sent = &upstream.received()[0];
    assert_eq!(sent["model"], "some-model");
    assert_eq!((subject.system)(sent).as_deref(), Some("Answer in JSON."));
    assert_eq!((subject.max_tokens)(sent), Some(50));
    let user = sent["messages"].as_array().unwrap().iter().find(|m| m["role"] == "user").unwrap();
    assert_eq!(user["content"], "Classify: hello");
}

async fn cached_input_is_counted_and_kept_apart(subject: Subject) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(Reply::completion_with_cache("ok", 1000, 800, 5));
    let reply = (subject.make)(&upstream, LONG).oneshot(request()).await.unwrap();
    assert_eq!(reply.usage.input_tokens, 1000);
    assert_eq!(reply.usage.cached_input_tokens, 800);
    assert_eq!(reply.usage.uncached_input_tokens(), 200);
}

async fn a_truncated_answer_says_length(subject: Subject) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(Reply::Truncated("{\"label\": \"gre".into()));
    let reply = (subject.make)(&upstream, LONG).oneshot(request()).await.unwrap();
    assert_eq!(reply.finish_reason, FinishReason::Length);
    assert_eq!(reply.content, "{\"label\": \"gre");
}

async fn a_rate_limit_carries_its_retry_after_and_is_sent_once(subject: Subject) {
    let (err, sent) = failure(&subject, Reply::rate_limited(2), LONG).await;
    assert_eq!(err.class(), ErrorClass::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    assert!(err.is_retryable());
    // No client library retries behind the engine's back.
    assert_eq!(sent, 1);
}

async fn an_exhausted_quota_is_never_retried(subject: Subject) {
    let (err, _) = failure(&subject, Reply::quota_exhausted(), LONG).await;
    assert_eq!(err.class(), ErrorClass::QuotaExhausted);
    assert!(!err.is_retryable() && !err.class().falls_through());
}

async fn server_errors_and_overload_are_upstream_faults(subject: Subject) {
    let (err, sent) = failure(&subject, Reply::server_error(503), LONG).await;
    assert_eq!(err.class(), ErrorClass::ServerError);
    assert_eq!(err.status(), Some(503));
    assert_eq!(sent, 1);
    let (err, _) = failure(&subject, Reply::overloaded(), LONG).await;
    assert_eq!(err.class(), ErrorClass::ServerError);
    assert!(err.class().is_upstream_fault() && err.is_retryable());
}

async fn a_bad_request_is_the_callers_and_says_why(subject: Subject) {
    let (err, _) = failure(&subject, Reply::bad_request("messages is required"), LONG).await;
    assert_eq!(err.class(), ErrorClass::BadRequest);
    assert!(err.to_string().contains("messages is required"), "{err}");
    assert!(!err.class().falls_through() && !err.class().is_upstream_fault());
}

async fn a_prompt_over_the_context_window_is_told_apart(subject: Subject) {
    let (err, _) = failure(&subject, Reply::context_length_exceeded(), LONG).await;
    assert_eq!(err.class(), ErrorClass::ContextLength, "{err}");
    assert!(err.class().falls_through() && !err.is_retryable());
}

async fn refused_credentials_are_unauthorized(subject: Subject) {
    let (err, _) = failure(&subject, Reply::unauthorized(), LONG).await;
    assert_eq!(err.class(), ErrorClass::Unauthorized);
    assert!(!err.class().falls_through());
}

async fn an_echoed_key_is_masked(subject: Subject) {
    for status in [401, 500] {
        let (err, _) = failure(&subject, Reply::EchoKey(status), LONG).await;
        let text = format!("{err} {err:?}");
        assert!(!text.contains(subject.api_key), "{text}");
        assert!(text.contains(providers::MASK), "{text}");
    }
}

async fn a_malformed_body_is_a_malformed_reply(subject: Subject) {
    let (err, _) = failure(&subject, Reply::malformed(), LONG).await;
    assert_eq!(err.class(), ErrorClass::MalformedReply);
    assert!(err.class().is_upstream_fault());
}

async fn a_stall_and_a_slow_answer_time_out(subject: Subject) {
    let (err, _) = failure(&subject, Reply::Stall, Duration::from_millis(300)).await;
    assert_eq!(err.class(), ErrorClass::Timeout);
    let slow = Reply::slow(Duration::from_millis(600), Reply::completion("{}"));
    let (err, _) = failure(&subject, slow, Duration::from_millis(200)).await;
    assert_eq!(err.class(), ErrorClass::Timeout);
}

async fn declared_limits_are_read(subject: Subject) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.enforce_limit(600);
    upstream.push(Reply::completion("ok"));
    let reply = (subject.make)(&upstream, LONG).oneshot(request()).await.unwrap();
    let declared = reply.declared_limits.expect("the upstream declared its limits");
    assert_eq!(declared.requests, Some(LimitWindow { limit: 600, remaining: 599 }));
}

async fn an_unreachable_upstream_is_a_connection_error(subject: Subject) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    let provider = (subject.make)(&upstream, Duration::from_secs(2));
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = provider.oneshot(request()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Connection, "{err}");
    // The upstream's address is the operator's, never a caller's to read.
    assert!(!err.to_string().contains("127.0.0.1") && !err.to_string().contains("http://"), "{err}");
}

async fn a_stream_ends_at_its_last_event_on_a_connection_left_open(subject: Subject) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(Reply::Streamed(testkit::Streamed::text(&["Hello", " world"], Duration::ZERO).held_open()));
    let (sink, mut pieces) = providers::StreamSink::channel(16);
    let reading = tokio::spawn(async move { while pieces.recv().await.is_some() {} });
    let asked = ChatRequest { stream: Some(sink), ..request() };
    // Within its request timeout: a call that waited for the connection to close would time
    // out here, the whole answer already received.
    let reply = (subject.make)(&upstream, Duration::from_secs(3)).oneshot(asked).await.unwrap();
    assert_eq!(reply.content, "Hello world");
    assert_eq!(reply.finish_reason, FinishReason::Stop);
    reading.await.unwrap();
}

/// Every case, once per provider.
macro_rules! conformance {
    ($($provider:ident => $subject:expr),+ $(,)?) => {$(
        mod $provider {
            use super::*;
            conformance!(@cases $subject;
                a_reply_reads_the_same,
                cached_input_is_counted_and_kept_apart,
                a_truncated_answer_says_length,
                a_rate_limit_carries_its_retry_after_and_is_sent_once,
                an_exhausted_quota_is_never_retried,
                server_errors_and_overload_are_upstream_faults,
                a_bad_request_is_the_callers_and_says_why,
                a_prompt_over_the_context_window_is_told_apart,
                refused_credentials_are_unauthorized,
                an_echoed_key_is_masked,
                a_malformed_body_is_a_malformed_reply,
                a_stall_and_a_slow_answer_time_out,
                declared_limits_are_read,
                an_unreachable_upstream_is_a_connection_error,
                a_stream_ends_at_its_last_event_on_a_connection_left_open,
            );
        }
    )+};
    (@cases $subject:expr; $($case:ident),+ $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            super::$case($subject).await;
        }
    )+};
}

conformance! {
    openai_compatible => OPENAI,
    anthropic => ANTHROPIC,
}

/// What only the OpenAI-compatible provider does: the step's schema as structured outputs.
#[tokio::test]
async fn openai_compatible_asks_for_the_reply_format() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(Reply::completion("{}"));
    let provider: OpenAiCompatible = upstream.provider(LONG);
    provider.oneshot(request()).await.unwrap();
    assert_eq!(upstream.received()[0]["response_format"]["type"], "json_object");
}

/// What only the Anthropic provider does: a streamed reply, parsed event by event over HTTP,
/// folds into the same answer.
#[tokio::test]
async fn anthropic_streams_parse_over_http() {
    use futures::StreamExt;
    let upstream = ScriptedUpstream::start().await.unwrap();
    let events = [
        r#"{"type":"message_start","message":{"model":"claude-haiku-4-5","usage":{"input_tokens":9,"output_tokens":1}}}"#,
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"{\"label\":"}}"#,
        r#"{"type":"ping"}"#,
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" \"greeting\"}"}}"#,
        r#"{"type":"content_block_stop","index":0}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":6}}"#,
        r#"{"type":"message_stop"}"#,
    ];
    let body: String = events
        .iter()
        .map(|data| {
            let name = serde_json::from_str::<Value>(data).unwrap()["type"].as_str().unwrap().to_owned();
            format!("event: {name}\ndata: {data}\n\n")
        })
        .collect();
    // Cut mid-event, as a network may.
    let chunks = body.as_bytes().chunks(37).map(|chunk| String::from_utf8_lossy(chunk).into_owned()).collect();
    upstream.push(Reply::EventStream(chunks));
    let provider: Anthropic = upstream.anthropic_provider(LONG);
    let stream = provider.stream(&request()).await.unwrap();
    let mut reply = providers::StreamedReply::default();
    let events: Vec<_> = stream.collect().await;
    for event in &events {
        reply.push(event.as_ref().unwrap());
    }
    let reply = reply.finish("anthropic", Duration::ZERO).unwrap();
    assert_eq!(reply.content, r#"{"label": "greeting"}"#);
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (9, 6));
    assert_eq!(upstream.received()[0]["stream"], true);
}
