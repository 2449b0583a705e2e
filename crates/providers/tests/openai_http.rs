//! The OpenAI-compatible provider against a real HTTP server: every failure lands in the
//! class the rest of the engine relies on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use providers::{ChatMessage, ChatRequest, ErrorClass, OpenAiCompatible, OpenAiSettings, ProviderError};
use testkit::{Reply, ScriptedUpstream};
use tower::ServiceExt;

fn provider(upstream: &ScriptedUpstream, timeout: Duration) -> OpenAiCompatible {
    upstream.provider(timeout)
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "gpt-4o-mini".into(),
        messages: vec![ChatMessage::system("Answer in JSON."), ChatMessage::user("Classify: hello")],
        temperature: Some(0.0),
        max_output_tokens: Some(50),
        response_format: providers::ResponseFormat::JsonObject,
        trace_id: "trace-1".into(),
    }
}

#[tokio::test]
async fn completion_round_trip() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(Reply::completion_with_usage(r#"{"label":"greeting"}"#, 12, 5));
    let reply = provider(&upstream, Duration::from_secs(5)).oneshot(request()).await.unwrap();
    assert_eq!(reply.content, r#"{"label":"greeting"}"#);
    assert_eq!((reply.usage.input_tokens, reply.usage.output_tokens), (12, 5));
    assert_eq!(reply.provider, "scripted");
    let sent = &upstream.received()[0];
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["response_format"]["type"], "json_object");
    assert_eq!(sent["messages"][1]["content"], "Classify: hello");
}

async fn failure(reply: Reply, timeout: Duration) -> (ProviderError, u64) {
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.push(reply);
    let err = provider(&upstream, timeout).oneshot(request()).await.unwrap_err();
    (err, upstream.requests())
}

#[tokio::test]
async fn every_failure_is_classified_and_never_retried_by_the_client() {
    let long = Duration::from_secs(5);
    let (err, sent) = failure(Reply::rate_limited(2), long).await;
    assert_eq!(err.class(), ErrorClass::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    // async-openai's own retry layer would have sent this four times.
    assert_eq!(sent, 1);

    let (err, _) = failure(Reply::quota_exhausted(), long).await;
    assert_eq!(err.class(), ErrorClass::QuotaExhausted);

    let (err, sent) = failure(Reply::server_error(503), long).await;
    assert_eq!(err.class(), ErrorClass::ServerError);
    assert_eq!(err.status(), Some(503));
    assert_eq!(sent, 1);

    let (err, _) = failure(Reply::bad_request("messages is required"), long).await;
    assert_eq!(err.class(), ErrorClass::BadRequest);
    assert!(err.to_string().contains("messages is required"), "{err}");

    let (err, _) = failure(Reply::malformed(), long).await;
    assert_eq!(err.class(), ErrorClass::MalformedReply);

    let (err, _) = failure(Reply::Stall, Duration::from_millis(300)).await;
    assert_eq!(err.class(), ErrorClass::Timeout);

    let (err, _) =
        failure(Reply::slow(Duration::from_millis(600), Reply::completion("{}")), Duration::from_millis(200)).await;
    assert_eq!(err.class(), ErrorClass::Timeout);
}

#[tokio::test]
async fn unreachable_upstream_is_a_connection_error() {
    let upstream = ScriptedUpstream::start().await.unwrap();
    let settings_url = upstream.base_url();
    drop(upstream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let provider = OpenAiCompatible::new(OpenAiSettings {
        name: "gone".into(),
        base_url: settings_url,
        api_key: String::new(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
    })
    .unwrap();
    let err = provider.oneshot(request()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Connection, "{err}");
}
