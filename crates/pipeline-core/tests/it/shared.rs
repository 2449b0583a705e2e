//! Engines that share state through a real Redis, as replicas do.

use std::time::{Duration, Instant};

use pipeline_core::{CallOptions, Source};
use testkit::{CLASSIFIED, Harness, RedisServer, Reply};

fn shared(redis: &RedisServer, extra: &str) -> String {
    format!("[state]\nredis_url = \"{}\"\nreplicas = 2\n{extra}", redis.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_one_replica_opens_keeps_the_other_off_the_dead_upstream_within_a_second() {
    let Some(redis) = RedisServer::start() else { return };
    let config = shared(&redis, "[breaker]\nfailures_to_open = 2\nopen_for_ms = 30000\n[retry]\nmax_attempts = 1");
    let a = Harness::start(&config).await;
    let b = Harness::start(&config).await;
    a.upstream.respond_with(|_| Reply::server_error(503));
    b.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    for n in 0..2 {
        let result = a.classify("ws", &format!("outage call {n}"), CallOptions::default()).await.unwrap();
        assert_eq!(result.source, Source::FallbackRule);
    }
    let opened = Instant::now();
    // B has seen no fault of its own, yet within a second it stops sending.
    loop {
        let asked = b.upstream.requests();
        let result =
            b.classify("ws", &format!("call at {:?}", opened.elapsed()), CallOptions::default()).await.unwrap();
        if result.source == Source::FallbackRule {
            assert_eq!(b.upstream.requests(), asked, "B sent a request to the upstream A found dead");
            break;
        }
        assert!(opened.elapsed() < Duration::from_secs(1), "B still sends to the dead upstream after a second");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = b.rows().await;
    assert_eq!(rows.last().unwrap().error_class, Some(pipeline_core::telemetry::ErrorClass::CircuitOpen));
    // B's own breaker never opened: it is A's view, shared, with its expiry.
    assert!(b.engine.breakers().iter().all(|breaker| breaker.times_opened == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_reserved_in_the_shared_limit_are_settled_with_the_real_usage() {
    let Some(redis) = RedisServer::start() else { return };
    // 1,000 tokens a minute for the workspace, no waiting: a call's estimate (its prompt and
    // the classifier's 300 output tokens) is taken first, and what it did not use comes back.
    let config =
        shared(&redis, "[limits]\nmax_wait_ms = 0\nworkspace_tokens_per_minute = 1000\nworkspace_token_burst = 1000");
    let a = Harness::start(&config).await;
    let b = Harness::start(&config).await;
    for h in [&a, &b] {
        h.upstream.respond_with(|_| Reply::completion_with_usage(CLASSIFIED, 40, 10));
    }
    // Estimates of about 400 tokens: without settling, the third call would find the bucket
    // short; settled at the 50 used, calls go on through either engine.
    for n in 0..6 {
        let h = if n % 2 == 0 { &a } else { &b };
        let result = h.classify("ws", &format!("ticket {n}"), CallOptions::default()).await.unwrap();
        assert_eq!(result.source, Source::Upstream, "call {n}: {:?}", result.degraded_by);
        // Settling happens off the call's path.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_cancelled_mid_flight_leaves_no_stuck_degradation() {
    let Some(redis) = RedisServer::start() else { return };
    let retry = Duration::from_millis(400);
    let config = shared(&redis, &format!("timeout_ms = 150\nretry_ms = {}", retry.as_millis()));
    let h = Harness::start(&config).await;
    h.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    let up = |h: &Harness| h.engine.shared_state().iter().all(|part| part.up);
    h.classify("ws", "first ticket", CallOptions::default()).await.unwrap();
    assert!(up(&h));
    // A server that hangs: the next call's lookup times out and marks Redis down.
    redis.pause();
    h.classify("ws", "second ticket", CallOptions::default()).await.unwrap();
    assert!(!up(&h), "a lookup that timed out marks Redis down");
    // When the probe is due, the call that makes it is cancelled while Redis still hangs.
    tokio::time::sleep(retry + Duration::from_millis(50)).await;
    let cancelled =
        tokio::time::timeout(Duration::from_millis(50), h.classify("ws", "third ticket", CallOptions::default())).await;
    assert!(cancelled.is_err(), "the probing call was meant to be cancelled mid-flight");
    redis.resume();
    // Redis is back: within the retry period a call probes it and the replica uses it again.
    let back = Instant::now();
    let mut n = 0;
    while !up(&h) {
        assert!(back.elapsed() < retry, "Redis is back but the replica still calls it down after {:?}", back.elapsed());
        h.classify("ws", &format!("ticket {n} after the cancelled probe"), CallOptions::default()).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The audits' verdicts are counted by the replicas together: a verdict reached on A is in
/// B's counts within a few of B's reads, so that both set their cuts from the same evidence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_verdict_on_one_replica_reaches_the_others_counts() {
    let Some(redis) = RedisServer::start() else { return };
    // Each replica with its own semantic index (the shared feed is not what is tested here).
    let config = shared(&redis, "[semantic]\nttl_secs = 600\n");
    let a = Harness::builder(&config).semantic().start().await;
    let b = Harness::builder(&config).semantic().start().await;
    a.upstream.respond_with(|_| Reply::completion(CLASSIFIED));
    assert_eq!(a.classify("ws", "I was charged twice", CallOptions::default()).await.unwrap().source, Source::Upstream);
    let hit = a.classify("ws", "I was charged two times", CallOptions::default()).await.unwrap();
    assert_eq!(hit.source, Source::SemanticCache);
    a.engine.audits_settled().await;
    let verdicts = |h: &Harness| {
        h.engine
            .semantic_cuts()
            .into_iter()
            .find(|scope| scope.step == "classifier" && scope.workspace.is_none())
            .map_or(0.0, |scope| scope.audits)
    };
    assert_eq!(verdicts(&a), 1.0, "A's own audit agreed");
    let started = Instant::now();
    while verdicts(&b) < 1.0 {
        assert!(started.elapsed() < Duration::from_secs(5), "B never read A's verdict");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(verdicts(&b), 1.0);
    assert_eq!(b.upstream.requests(), 0, "B learned without a call of its own");
}
