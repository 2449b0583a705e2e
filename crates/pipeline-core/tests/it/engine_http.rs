//! The engine end to end: real HTTP to a scripted OpenAI-compatible upstream, a real SQLite
//! telemetry file.
use std::time::Duration;

use pipeline_core::providers;
use pipeline_core::telemetry::CallStatus;
use pipeline_core::telemetry::{self, ErrorClass};
use pipeline_core::{CachePolicy, CallContext, CallOptions, PipelineError, Source, StepType};
use serde_json::{Value, json};
use testkit::Reply;
use testkit::{CLASSIFIED, Harness};

fn last_user_message(request: &Value) -> String {
    let messages = request["messages"].as_array().unwrap();
    messages.last().unwrap()["content"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn exact_cache_serves_repeats_within_a_workspace_only() {
    let h = Harness::start("").await;
    h.upstream.respond_with(|_| Reply::completion_with_usage(CLASSIFIED, 120, 15));

    let first = h.classify("ws-a", "I was charged twice", CallOptions::default()).await.unwrap();
    assert_eq!(first.source, Source::Upstream);
    assert_eq!(first.output, json!({"label": "billing", "confidence": 0.92}));
    assert_eq!((first.input_tokens, first.output_tokens, first.attempts), (120, 15, 1));
    let expected_cost = (120.0 * 0.15 + 15.0 * 0.60) / 1e6;
    assert!((first.cost_usd - expected_cost).abs() < 1e-12, "{}", first.cost_usd);
    assert_eq!(h.upstream.requests(), 1);

    // The same call again: the exact cache answers and the upstream sees nothing.
    let again = h.classify("ws-a", "I was charged twice", CallOptions::default()).await.unwrap();
    assert_eq!(again.source, Source::ExactCache);
    assert_eq!(again.output, first.output);
    assert_eq!((again.cost_usd, again.attempts, again.input_tokens), (0.0, 0, 0));
    assert!((again.saved_cost_usd - expected_cost).abs() < 1e-12);
    assert_eq!(h.upstream.requests(), 1);

    // Another workspace never gets the first one's answer.
    let other = h.classify("ws-b", "I was charged twice", CallOptions::default()).await.unwrap();
    assert_eq!(other.source, Source::Upstream);
    assert_eq!(h.upstream.requests(), 2);

    let rows = h.rows().await;
    assert_eq!(rows.len(), 3, "one row per call");
    for (row, result) in rows.iter().zip([&first, &again, &other]) {
        assert_eq!(row.trace_id, result.trace_id.as_str());
        assert_eq!(row.step, "classifier");
        assert_eq!(row.component, "ticket-router");
        assert_eq!(row.model, "gpt-4o-mini");
        assert_eq!(row.provider, "scripted");
        assert_eq!(row.status, CallStatus::Ok);
        assert_eq!(row.error_class, None);
        assert_eq!(row.confidence, 1.0);
        assert_eq!(row.ts_ms, 1_780_000_000_000);
        assert!(row.latency_ms > 0.0);
        assert_eq!(row.attempts, i64::from(result.attempts));
        assert_eq!(row.source, result.source.into());
    }
    assert_eq!(rows.iter().map(|r| r.workspace.as_str()).collect::<Vec<_>>(), ["ws-a", "ws-a", "ws-b"]);
    assert_eq!((rows[0].input_tokens, rows[0].output_tokens), (120, 15));
    assert!((rows[0].cost_usd - expected_cost).abs() < 1e-12);
    assert!(!rows[0].cache_hit && rows[1].cache_hit && !rows[2].cache_hit);
    assert_eq!((rows[1].input_tokens, rows[1].cost_usd), (0, 0.0));
    assert!((rows[1].saved_cost_usd - expected_cost).abs() < 1e-12);
}

#[tokio::test]
async fn a_reply_that_breaks_the_contract_gets_one_repair_then_a_typed_error() {
    let h = Harness::start("").await;
    h.upstream.push(Reply::completion_with_usage(r#"{"label": "billing"}"#, 100, 5));
    h.upstream.push(Reply::completion_with_usage("Sure! It is about billing.", 130, 8));

    let strict = CallOptions { allow_stand_in: false, ..CallOptions::default() };
    let err = h.classify("ws-a", "refund", strict).await.unwrap_err();
    match &err {
        PipelineError::ContractViolation { step, attempts, violations } => {
            assert_eq!(step, &StepType::CLASSIFIER);
            assert_eq!(*attempts, 2);
            assert!(violations.contains("not a JSON object"), "{violations}");
        }
        other => panic!("expected a contract violation, got {other:?}"),
    }
    assert_eq!(err.metric_label(), "contract_violation");
    assert_eq!(h.upstream.requests(), 2, "one repair attempt, no more");
    let repair = last_user_message(&h.upstream.received()[1]);
    assert!(repair.contains("confidence"), "the repair names what was wrong: {repair}");

    // Nothing invalid was cached: the next identical call goes upstream again.
    h.upstream.push(Reply::completion(CLASSIFIED));
    let ok = h.classify("ws-a", "refund", CallOptions::default()).await.unwrap();
    assert_eq!(ok.source, Source::Upstream);

    let rows = h.rows().await;
    assert_eq!(rows.len(), 2);
    let failed = &rows[0];
    assert_eq!(failed.status, CallStatus::Error);
    assert_eq!(failed.error_class, Some(ErrorClass::ContractViolation));
    assert_eq!(failed.attempts, 2);
    assert_eq!((failed.input_tokens, failed.output_tokens), (230, 13), "a failed call still reports its spend");
    assert!(failed.cost_usd > 0.0);
    assert_eq!(failed.source, telemetry::Source::None);
}

#[tokio::test]
async fn a_model_that_cannot_meet_the_contract_gets_the_steps_stand_in() {
    let h = Harness::start("").await;
    h.upstream.respond_with(|_| Reply::completion("I am a small model and I like labels."));
    let result = h.classify("ws-a", "refund", CallOptions::default()).await.unwrap();
    assert_eq!((result.source, result.degraded_by), (Source::FallbackRule, Some(ErrorClass::ContractViolation)));
    assert_eq!(result.output["label"], "unclassified");
    assert!(result.confidence < 0.5);
    assert_eq!(h.upstream.requests(), 2, "the reply and one repair");
    // The step asked for its schema, as structured outputs.
    let request = &h.upstream.received()[0];
    assert_eq!(request["response_format"]["type"], "json_schema", "{request}");
    assert_eq!(request["response_format"]["json_schema"]["strict"], true, "{request}");
    assert_eq!(request["response_format"]["json_schema"]["schema"]["required"][0], "label", "{request}");
}

#[tokio::test]
async fn a_repaired_reply_is_served() {
    let h = Harness::start("").await;
    h.upstream.push(Reply::completion(r#"{"label": "billing", "confidence": 7}"#));
    h.upstream.push(Reply::completion(CLASSIFIED));
    let result = h.classify("ws-a", "refund", CallOptions::default()).await.unwrap();
    assert_eq!(result.attempts, 2);
    assert_eq!(result.output["confidence"], 0.92);
    let repair = last_user_message(&h.upstream.received()[1]);
    assert!(repair.contains("/confidence"), "{repair}");
}

#[tokio::test]
async fn upstream_failures_are_typed_and_recorded() {
    // One attempt, no pause, no stand-in answer: the failures as the classifier sees them.
    let h = Harness::start("[retry]\nmax_attempts = 1\npause_on_retry_after = false").await;
    let options = || CallOptions { allow_stand_in: false, ..CallOptions::default() };
    h.upstream.push(Reply::rate_limited(2));
    let err = h.classify("ws-a", "one", options()).await.unwrap_err();
    let PipelineError::Upstream { source, attempts, .. } = &err else { panic!("{err:?}") };
    assert_eq!(source.class(), providers::ErrorClass::RateLimited);
    assert_eq!(source.retry_after(), Some(Duration::from_secs(2)));
    assert_eq!(*attempts, 1);
    assert!(err.is_retryable());

    h.upstream.push(Reply::server_error(503));
    let err = h.classify("ws-a", "two", options()).await.unwrap_err();
    assert_eq!(err.metric_label(), "server_error");

    h.upstream.push(Reply::malformed());
    let err = h.classify("ws-a", "three", options()).await.unwrap_err();
    assert_eq!(err.metric_label(), "malformed_reply");

    let rows = h.rows().await;
    let classes: Vec<_> = rows.iter().map(|row| row.error_class.unwrap().label()).collect();
    assert_eq!(classes, ["rate_limited", "server_error", "malformed_reply"]);
    assert!(rows.iter().all(|row| row.status == CallStatus::Error && row.attempts == 1));
    assert!(rows[0].error_message.as_deref().unwrap().contains("retry after 2.0 s"));
}

#[tokio::test]
async fn a_stalled_upstream_ends_at_the_deadline() {
    let h = Harness::start("").await;
    h.upstream.push(Reply::Stall);
    let options =
        CallOptions { deadline: Some(Duration::from_millis(300)), allow_stand_in: false, ..CallOptions::default() };
    let started = std::time::Instant::now();
    let err = h.classify("ws-a", "hello?", options).await.unwrap_err();
    assert!(matches!(err, PipelineError::DeadlineExceeded { attempts: 1, .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    let rows = h.rows().await;
    assert_eq!(rows[0].error_class, Some(ErrorClass::DeadlineExceeded));
    assert!(rows[0].latency_ms >= 300.0, "{}", rows[0].latency_ms);
}

#[tokio::test]
async fn cache_policies_and_ttl() {
    let h = Harness::start("[cache]\nttl_secs = 60").await;
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    let ask = |policy| h.classify("ws-a", "same", CallOptions { cache: policy, ..CallOptions::default() });

    assert_eq!(ask(CachePolicy::Skip).await.unwrap().source, Source::Upstream);
    assert_eq!(ask(CachePolicy::Use).await.unwrap().source, Source::Upstream, "skip stored nothing");
    assert_eq!(ask(CachePolicy::Use).await.unwrap().source, Source::ExactCache);
    assert_eq!(ask(CachePolicy::Refresh).await.unwrap().source, Source::Upstream);
    h.clock.advance(Duration::from_secs(30));
    assert_eq!(ask(CachePolicy::MaxAge(Duration::from_secs(10))).await.unwrap().source, Source::Upstream);
    assert_eq!(ask(CachePolicy::MaxAge(Duration::from_secs(10))).await.unwrap().source, Source::ExactCache);
    h.clock.advance(Duration::from_secs(61));
    assert_eq!(ask(CachePolicy::Use).await.unwrap().source, Source::Upstream, "expired after the TTL");
    assert_eq!(h.upstream.requests(), 5);
}

#[tokio::test]
async fn bad_calls_are_refused_before_the_upstream_and_still_recorded() {
    let h = Harness::start("[steps.classifier]\nmax_prompt_chars = 2000").await;
    let err = h.classify("ws-a", &"x".repeat(5_000), CallOptions::default()).await.unwrap_err();
    assert!(matches!(err, PipelineError::PromptTooLarge { limit: 2000, .. }), "{err:?}");
    assert!(err.to_string().contains("steps.classifier.max_prompt_chars"), "{err}");

    let err = h
        .engine
        .execute(StepType::new("translator").unwrap(), json!({}), CallContext::new("ws-a", "c"), CallOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("[steps.translator]"), "{err}");

    let err = h
        .engine
        .execute(StepType::CLASSIFIER, json!({"labels": ["a"]}), CallContext::new("ws-a", "c"), CallOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, PipelineError::InvalidInput { .. }), "{err:?}");

    let err = h.classify("", "no workspace", CallOptions::default()).await.unwrap_err();
    assert!(matches!(err, PipelineError::InvalidContext { .. }), "{err:?}");

    let tight = CallOptions { max_cost_usd: Some(0.000_001), ..CallOptions::default() };
    let err = h.classify("ws-a", "short", tight).await.unwrap_err();
    assert!(err.to_string().contains("exceeds the call's max_cost_usd"), "{err}");

    assert_eq!(h.upstream.requests(), 0);
    let rows = h.rows().await;
    let classes: Vec<_> = rows.iter().map(|row| row.error_class.unwrap().label()).collect();
    assert_eq!(classes, ["prompt_too_large", "unknown_step", "invalid_input", "invalid_context", "cost_limit"]);
}

#[tokio::test]
async fn the_model_hint_reaches_the_upstream_and_splits_the_cache() {
    let h = Harness::start("").await;
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    h.classify("ws-a", "same", CallOptions::default()).await.unwrap();
    let hinted = CallOptions { model: Some("gpt-4o".into()), ..CallOptions::default() };
    let result = h.classify("ws-a", "same", hinted).await.unwrap();
    assert_eq!(result.source, Source::Upstream);
    assert_eq!(result.model, "gpt-4o");
    assert_eq!(h.upstream.received()[1]["model"], "gpt-4o");
    assert_eq!(h.upstream.received()[1]["max_completion_tokens"], 100);
}

#[tokio::test]
async fn a_label_outside_the_given_ones_is_repaired_then_stood_in_for_and_never_cached() {
    let h = Harness::start("").await;
    // As a small model answers: a label of its own, or the list itself.
    h.upstream.push(Reply::completion(r#"{"label": "ok", "confidence": 1.0}"#));
    h.upstream.push(Reply::completion(r#"{"label": "Billing, bug, other", "confidence": 1.0}"#));
    let result = h.classify("ws", "I was charged twice", CallOptions::default()).await.unwrap();
    assert_eq!((result.source, result.degraded_by), (Source::FallbackRule, Some(ErrorClass::ContractViolation)));
    assert_eq!(result.output["label"], "unclassified");
    let sent = h.upstream.received();
    assert_eq!(sent.len(), 2, "the answer and one repair");
    // The provider was asked for the call's own labels, and the repair named them.
    assert_eq!(
        sent[0]["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"],
        json!(["billing", "bug", "other"])
    );
    let repair = last_user_message(&sent[1]);
    assert!(repair.contains("`ok` is not one of the given labels") && repair.contains("`other`"), "{repair}");
    // Nothing was kept: the same call asks again, and a right answer (in another case) is the label given.
    h.upstream.push(Reply::completion(r#"{"label": "BILLING", "confidence": 0.9}"#));
    let again = h.classify("ws", "I was charged twice", CallOptions::default()).await.unwrap();
    assert_eq!((again.source, again.output["label"].as_str()), (Source::Upstream, Some("billing")));
    assert_eq!(h.upstream.requests(), 3);
}
