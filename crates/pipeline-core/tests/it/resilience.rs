//! Resilience under injected faults, over real HTTP to the scripted upstream: Retry-After
//! storms, an outage with its breaker, a stalled upstream, requests the upstream rejects,
//! identical calls at once.
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_core::resilience::BreakerState;
use pipeline_core::telemetry::{self, ErrorClass};
use pipeline_core::{CallOptions, PipelineError, PipelineResult, Source};
use testkit::{CLASSIFIED, Harness};
use testkit::{Exchange, Reply};

fn within(deadline: Duration) -> CallOptions {
    CallOptions { deadline: Some(deadline), ..CallOptions::default() }
}

/// Runs `calls` classifications at once, each with its own text, and returns each outcome
/// with how long it took.
async fn crowd(
    h: &Arc<Harness>,
    calls: usize,
    options: CallOptions,
) -> Vec<(Result<PipelineResult, PipelineError>, Duration, Instant)> {
    let mut tasks = Vec::new();
    for n in 0..calls {
        let (h, options) = (h.clone(), options.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let outcome = h.classify("ws-a", &format!("ticket number {n} about a refund"), options).await;
            (outcome, started.elapsed(), Instant::now())
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

#[tokio::test]
async fn a_429_storm_pauses_every_call_for_its_retry_after_then_lets_one_probe_go_first() {
    // Callers that may wait out a pause (the shipped 500 ms would refuse them at once).
    let h = Arc::new(Harness::start("[limits]\nmax_wait_ms = 8000").await);
    // The first two requests are told to come back in 2 s; then the upstream answers.
    h.upstream.push(Reply::rate_limited(2));
    h.upstream.push(Reply::rate_limited(2));
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));

    let deadline = Duration::from_secs(8);
    let first = {
        let h = h.clone();
        tokio::spawn(async move { h.classify("ws-a", "the first one", within(deadline)).await })
    };
    // A crowd arrives while the provider/model is paused. It waits until the engine has the
    // first 429: requests sent while that answer was still on the wire could not have known.
    while h.engine.paused().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcomes = crowd(&h, 20, within(deadline)).await;
    let first = first.await.unwrap();

    let mut exchanges = h.upstream.exchanges();
    exchanges.sort_by_key(|exchange| exchange.arrived);
    let told: Vec<&Exchange> = exchanges.iter().filter(|exchange| exchange.status == 429).collect();
    assert_eq!(told.len(), 2, "{exchanges:?}");
    for told in &told {
        let answered = told.answered.unwrap();
        let too_soon: Vec<&Exchange> = exchanges
            .iter()
            .filter(|other| other.arrived > answered && other.arrived < answered + Duration::from_secs(2))
            .collect();
        assert!(too_soon.is_empty(), "requests within 2 s of a 429: {too_soon:?}");
    }
    // When the last pause ends, one request goes first; the crowd follows once it is answered.
    let last_told = told[1].arrived;
    let mut after = exchanges.iter().filter(|exchange| exchange.arrived > last_told);
    let probe = after.next().unwrap();
    let probe_answered = probe.answered.unwrap();
    assert!(after.all(|other| other.arrived >= probe_answered), "a crowd went with the probe: {exchanges:?}");

    assert_eq!(first.unwrap().source, Source::Upstream);
    // Every call of the crowd was held until the first pause was over, however late into it
    // it arrived (so what it waited is the rest of the pause, not the whole of it).
    let first_pause_over = told[0].answered.unwrap() + Duration::from_secs(2);
    for (outcome, took, ended) in &outcomes {
        assert!(*took < deadline + Duration::from_millis(500), "a call took {took:?}");
        let result = outcome.as_ref().unwrap();
        assert_eq!(result.source, Source::Upstream);
        assert!(result.rate_limit_wait > Duration::ZERO, "a call of the crowd did not wait");
        assert!(*ended >= first_pause_over, "a call of the crowd was answered before the pause ended");
    }
    let rows = h.rows().await;
    assert_eq!(rows.len(), 21, "one telemetry row per call");
    assert!(rows.iter().filter(|row| row.rate_limit_wait_ms > 0.0).count() >= 20);
}

#[tokio::test]
async fn a_retry_after_past_the_deadline_ends_the_call_at_once_with_a_stand_in_or_a_typed_error() {
    let h = Harness::start("").await;
    h.upstream.respond_with(|_| Reply::rate_limited(30));
    let started = Instant::now();
    let stand_in = h.classify("ws-a", "refund please", within(Duration::from_secs(5))).await.unwrap();
    assert_eq!(stand_in.source, Source::FallbackRule);
    assert_eq!(stand_in.output["label"], "unclassified");
    assert_eq!(stand_in.degraded_by, Some(ErrorClass::RateLimited));
    assert!(stand_in.confidence < 0.5);

    let strict = CallOptions { allow_stand_in: false, ..within(Duration::from_secs(5)) };
    let err = h.classify("ws-a", "another refund", strict).await.unwrap_err();
    assert!(matches!(&err, PipelineError::Refused { attempts: 0, .. }), "{err:?}");
    assert_eq!(err.metric_label(), "upstream_paused");
    assert!(err.to_string().contains("resumes in"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1), "nobody waited for a pause they could not outlast");
    assert_eq!(h.upstream.requests(), 1);

    let rows = h.rows().await;
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].source, rows[0].error_class), (telemetry::Source::FallbackRule, Some(ErrorClass::RateLimited)));
    assert_eq!(rows[1].error_class, Some(ErrorClass::UpstreamPaused));
}

#[tokio::test]
async fn an_outage_opens_the_breaker_and_one_probe_at_a_time_closes_it() {
    let h = Arc::new(Harness::start("[breaker]\nopen_for_ms = 2000\n[retry]\nmax_attempts = 1").await);
    let outage_starts = Instant::now();
    let recovers_at = outage_starts + Duration::from_secs(10);
    // Each failure takes 200 ms, so that calls overlap a half-open probe.
    h.upstream.respond_with(move |_| {
        if Instant::now() < recovers_at {
            Reply::slow(Duration::from_millis(200), Reply::server_error(503))
        } else {
            Reply::completion(CLASSIFIED)
        }
    });
    let key = "scripted/gpt-4o-mini";
    let state = |h: &Harness| h.engine.breakers().iter().find(|b| b.key == key).map(|b| b.state);

    // Five failures in a row open it; four do not.
    for n in 0..5 {
        assert_ne!(state(&h), Some(BreakerState::Open), "open after only {n} failures");
        let result = h.classify("ws-a", &format!("outage call {n}"), CallOptions::default()).await.unwrap();
        assert_eq!(result.source, Source::FallbackRule);
    }
    assert_eq!(state(&h), Some(BreakerState::Open));
    let opened_at = Instant::now();
    assert_eq!(h.upstream.requests(), 5);

    // Traffic goes on, a call every 50 ms, until the upstream has answered again for a while.
    let mut calls = Vec::new();
    let mut n = 0;
    while Instant::now() < recovers_at + Duration::from_secs(4) {
        let h = h.clone();
        n += 1;
        calls.push(tokio::spawn(async move {
            let outcome = h.classify("ws-a", &format!("call {n} during the outage"), CallOptions::default()).await;
            (outcome.unwrap(), Instant::now())
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut finished = Vec::new();
    for call in calls {
        finished.push(call.await.unwrap());
    }

    // While open, the upstream saw nothing: after the breaker opened, requests come one at a
    // time (a probe), never overlapping, at least 2 s after the previous probe failed.
    let exchanges = h.upstream.exchanges();
    let after_open: Vec<&Exchange> = exchanges.iter().filter(|e| e.arrived >= opened_at).collect();
    let probes: Vec<&&Exchange> = after_open.iter().filter(|e| e.arrived < recovers_at).collect();
    assert!(!probes.is_empty());
    let mut previous_failure = opened_at;
    for probe in &probes {
        assert!(probe.arrived >= previous_failure + Duration::from_millis(1990), "probe too early: {probe:?}");
        previous_failure = probe.answered.unwrap();
    }
    let first_success = after_open.iter().find(|e| e.status == 200).expect("the upstream answered again");
    let until_closed: Vec<&&Exchange> = after_open.iter().take_while(|e| e.arrived <= first_success.arrived).collect();
    for pair in until_closed.windows(2) {
        assert!(pair[1].arrived >= pair[0].answered.unwrap(), "a request overlapped a probe: {pair:?}");
    }

    // The first successful probe closes it, within the open period plus a second of the
    // upstream's recovery: that is the recovery time.
    let recovered = finished
        .iter()
        .filter(|(result, _)| result.source == Source::Upstream)
        .map(|(_, at)| *at)
        .min()
        .expect("calls succeed again");
    let mttr = recovered.saturating_duration_since(recovers_at);
    eprintln!("MTTR after the upstream recovered: {:.2} s", mttr.as_secs_f64());
    assert!(mttr <= Duration::from_secs(3), "recovery took {mttr:?}");
    assert_eq!(state(&h), Some(BreakerState::Closed));
    let late: Vec<_> = finished.iter().filter(|(_, at)| *at > recovered + Duration::from_millis(500)).collect();
    assert!(!late.is_empty() && late.iter().all(|(result, _)| result.source == Source::Upstream));

    // Open or half-open, the calls were answered at once by the rule-based fallback, and the
    // rows say which state the breaker was in.
    let rows = h.rows().await;
    assert_eq!(rows.len(), 5 + finished.len(), "one row per call");
    assert!(rows.iter().any(|row| row.breaker_state == Some(telemetry::BreakerState::Open)));
    assert!(rows.iter().filter(|row| row.error_class == Some(ErrorClass::CircuitOpen)).count() > 10);
}

#[tokio::test]
async fn a_stalled_upstream_ends_calls_at_their_deadline_and_opens_the_breaker() {
    let h = Harness::start("[retry]\nmax_attempts = 1").await;
    h.upstream.respond_with(|_| Reply::Stall);
    let deadline = Duration::from_millis(400);
    for n in 0..5 {
        let started = Instant::now();
        let result = h.classify("ws-a", &format!("stalled {n}"), within(deadline)).await.unwrap();
        let took = started.elapsed();
        assert!(took >= deadline && took < deadline + Duration::from_millis(300), "{took:?}");
        assert_eq!((result.source, result.degraded_by), (Source::FallbackRule, Some(ErrorClass::DeadlineExceeded)));
    }
    let breakers = h.engine.breakers();
    assert_eq!(breakers[0].state, BreakerState::Open, "timeouts count against the breaker");

    // Without a stand-in: a typed error, at once now that the breaker is open.
    let strict = CallOptions { allow_stand_in: false, ..within(deadline) };
    let started = Instant::now();
    let err = h.classify("ws-a", "stalled again", strict).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(err.metric_label(), "circuit_open");
    assert_eq!(h.upstream.requests(), 5);
}

#[tokio::test]
async fn bad_requests_never_open_the_breaker() {
    let h = Harness::start("").await;
    h.upstream.respond_with(|_| Reply::bad_request("max_tokens is too large for this model"));
    for n in 0..10 {
        let err = h.classify("ws-a", &format!("bad {n}"), CallOptions::default()).await.unwrap_err();
        assert_eq!(err.metric_label(), "bad_request", "a 400 gets no stand-in and no retry");
    }
    assert_eq!(h.upstream.requests(), 10);
    assert_eq!(h.engine.breakers()[0].state, BreakerState::Closed);
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    assert_eq!(h.classify("ws-a", "good", CallOptions::default()).await.unwrap().source, Source::Upstream);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff() {
    let h = Harness::start("[retry]\ninitial_backoff_ms = 50").await;
    h.upstream.push(Reply::server_error(502));
    h.upstream.push(Reply::server_error(500));
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    let result = h.classify("ws-a", "flaky", CallOptions::default()).await.unwrap();
    assert_eq!((result.source, result.attempts), (Source::Upstream, 3));
    let exchanges = h.upstream.exchanges();
    let gaps: Vec<Duration> = exchanges.windows(2).map(|pair| pair[1].arrived - pair[0].answered.unwrap()).collect();
    assert!(gaps[0] >= Duration::from_millis(50) && gaps[1] >= Duration::from_millis(100), "{gaps:?}");
    assert_eq!(h.rows().await[0].attempts, 3);
}

#[tokio::test]
async fn a_fallback_model_answers_when_the_step_model_cannot() {
    let h = Harness::start("[retry]\nmax_attempts = 1\n[steps.classifier]\nfallbacks = [{ model = \"gpt-4.1-mini\" }]")
        .await;
    h.upstream.respond_with(|request| {
        if request["model"] == "gpt-4o-mini" { Reply::server_error(503) } else { Reply::completion(CLASSIFIED) }
    });
    let result = h.classify("ws-a", "refund", CallOptions::default()).await.unwrap();
    assert_eq!((result.source, result.model.as_str(), result.attempts), (Source::FallbackModel, "gpt-4.1-mini", 2));
    assert_eq!(result.confidence, 1.0, "another model's answer is still a model's answer");
    // Not cached under the step model's key: the next call asks the step's model again.
    h.classify("ws-a", "refund", CallOptions::default()).await.unwrap();
    assert_eq!(h.upstream.requests(), 4);
}

#[tokio::test]
async fn identical_calls_at_once_make_one_upstream_request() {
    let h = Arc::new(Harness::start("").await);
    h.upstream.respond_with(|_| Reply::slow(Duration::from_millis(300), Reply::completion(CLASSIFIED)));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move { h.classify("ws-a", "same question", CallOptions::default()).await }));
    }
    let mut sources = Vec::new();
    for task in tasks {
        sources.push(task.await.unwrap().unwrap().source);
    }
    assert_eq!(h.upstream.requests(), 1);
    assert_eq!(sources.iter().filter(|source| **source == Source::Upstream).count(), 1);
    assert_eq!(sources.iter().filter(|source| matches!(source, Source::Coalesced | Source::ExactCache)).count(), 99);
    let rows = h.rows().await;
    assert_eq!(rows.len(), 100);
    let coalesced = rows.iter().filter(|row| row.source == telemetry::Source::Coalesced).collect::<Vec<_>>();
    assert!(coalesced.len() > 50, "{} coalesced", coalesced.len());
    assert!(coalesced.iter().all(|row| row.attempts == 0 && row.cost_usd == 0.0 && row.saved_cost_usd > 0.0));
}

#[tokio::test]
async fn a_follower_with_time_left_outlives_its_leaders_deadline() {
    let h = Arc::new(Harness::start("").await);
    h.upstream.respond_with(|_| Reply::slow(Duration::from_millis(400), Reply::completion(CLASSIFIED)));
    let hasty = {
        let h = h.clone();
        tokio::spawn(async move { h.classify("ws-a", "same question", within(Duration::from_millis(150))).await })
    };
    while h.upstream.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let patient = h.classify("ws-a", "same question", within(Duration::from_secs(5))).await.unwrap();
    // The hasty call's deadline passed: its stand-in answered it, and only it.
    let hasty = hasty.await.unwrap().unwrap();
    assert_eq!((hasty.source, hasty.degraded_by), (Source::FallbackRule, Some(ErrorClass::DeadlineExceeded)));
    assert!(
        matches!(patient.source, Source::Upstream | Source::ExactCache),
        "the patient call got {:?}, not an answer of its own",
        patient.source
    );
}

#[tokio::test]
async fn rate_limits_hold_a_workspace_to_its_budget() {
    let h = Arc::new(Harness::start("[limits]\nworkspace_requests_per_minute = 60\nworkspace_request_burst = 3").await);
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    let strict = CallOptions { allow_stand_in: false, ..within(Duration::from_millis(300)) };
    let outcomes = crowd(&h, 5, strict).await;
    let refused: Vec<_> = outcomes.iter().filter_map(|(outcome, _, _)| outcome.as_ref().err()).collect();
    assert_eq!(refused.len(), 2, "a burst of 3, then one a second");
    assert!(refused.iter().all(|err| err.metric_label() == "rate_limited_locally"));
    assert!(refused[0].to_string().contains("workspace's requests-per-minute"), "{}", refused[0]);
    assert_eq!(h.upstream.requests(), 3);
    // Another workspace is not held back by this one.
    let other = h.engine.execute(
        pipeline_core::StepType::CLASSIFIER,
        serde_json::json!({"text": "hello", "labels": ["billing"]}),
        pipeline_core::CallContext::new("ws-b", "c"),
        CallOptions::default(),
    );
    assert_eq!(other.await.unwrap().source, Source::Upstream);
}

#[tokio::test]
async fn a_call_that_refuses_stand_ins_never_gets_one_through_another_call() {
    let h = Arc::new(Harness::start("[retry]\nmax_attempts = 1").await);
    h.upstream.respond_with(|_| Reply::slow(Duration::from_millis(300), Reply::server_error(503)));
    let lenient = {
        let h = h.clone();
        tokio::spawn(async move { h.classify("ws-a", "same text", CallOptions::default()).await })
    };
    while h.upstream.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let strict = CallOptions { allow_stand_in: false, ..CallOptions::default() };
    let err = h.classify("ws-a", "same text", strict).await.unwrap_err();
    assert_eq!(err.metric_label(), "server_error");
    assert_eq!(lenient.await.unwrap().unwrap().source, Source::FallbackRule);
    assert_eq!(h.upstream.requests(), 2, "the strict call made its own request");
}

#[tokio::test]
async fn a_malformed_reply_is_an_upstream_fault_retried_once() {
    let h = Harness::start("[breaker]\nfailures_to_open = 4\nopen_for_ms = 60000").await;
    h.upstream.respond_with(|_| Reply::malformed());
    let strict = CallOptions { allow_stand_in: false, ..CallOptions::default() };
    let first = h.classify("ws-a", "one", strict.clone()).await.unwrap_err();
    assert_eq!(first.metric_label(), "malformed_reply");
    assert_eq!(first.attempts(), 2, "the reply and one retry, whatever the policy's three");
    h.classify("ws-a", "two", strict.clone()).await.unwrap_err();
    // Four malformed replies in a row opened the breaker: the next call is refused at once.
    let refused = h.classify("ws-a", "three", strict).await.unwrap_err();
    assert_eq!(refused.metric_label(), "circuit_open");
    assert_eq!(h.upstream.requests(), 4);
}
