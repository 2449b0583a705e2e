//! Routing across models and providers, end to end: one scripted upstream per provider (some
//! speaking Anthropic's API), real HTTP, the engine built from config alone.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pipeline_core::telemetry::{ErrorClass, RouteExclusion, RouteStrategy, TelemetryStore};
use pipeline_core::{CachePolicy, CallContext, CallOptions, Config, Engine, PipelineError, Source, StepType};
use serde_json::json;
use testkit::{CLASSIFIED, Reply, ScriptedUpstream};

/// An engine over `n` scripted upstreams, provider `p0` .. `pN`, each in the config as an
/// endpoint; `routes` is TOML over that (models, routes, budgets).
struct Fleet {
    upstreams: Vec<ScriptedUpstream>,
    engine: Engine,
    store: TelemetryStore,
    _dir: tempfile::TempDir,
}

const QUICK: &str = "[semantic]\nenabled = false\n[retry]\nmax_attempts = 1\n[routing]\nseed = 42\n";

impl Fleet {
    async fn start(n: usize, anthropic: &[usize], routes: &str) -> Self {
        let mut upstreams = Vec::new();
        let mut providers = String::new();
        for index in 0..n {
            let upstream = ScriptedUpstream::start().await.unwrap();
            let kind = if anthropic.contains(&index) { "anthropic" } else { "openai" };
            providers.push_str(&format!(
                "[providers.p{index}]\nkind = '{kind}'\nbase_url = '{}'\napi_key_env = 'ROUTING_TEST_KEY'\n\
                 request_timeout_ms = 5000\nconnect_timeout_ms = 1000\n",
                upstream.base_url()
            ));
            upstreams.push(upstream);
        }
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("telemetry.db").display().to_string();
        let config = format!(
            "{QUICK}[provider]\nbase_url = '{}'\n[telemetry]\ndatabase_url = 'sqlite://{db}'\n{providers}{routes}",
            upstreams[0].base_url()
        );
        let engine = Engine::builder(Config::from_toml(&config).unwrap()).build().await.unwrap();
        let store = TelemetryStore::connect(&db).await.unwrap();
        Self { upstreams, engine, store, _dir: dir }
    }

    async fn classify(&self, text: &str, options: CallOptions) -> Result<pipeline_core::PipelineResult, PipelineError> {
        let options = CallOptions { cache: CachePolicy::Skip, ..options };
        self.engine
            .execute(
                StepType::CLASSIFIER,
                json!({"text": text, "labels": ["billing", "bug", "other"]}),
                CallContext::new("ws", "router-test"),
                options,
            )
            .await
    }

    fn requests(&self) -> Vec<u64> {
        self.upstreams.iter().map(ScriptedUpstream::requests).collect()
    }
}

/// A registry entry on provider `p{provider}`.
fn model(name: &str, provider: usize, input: f64, output: f64, window: u32, tier: u8) -> String {
    format!(
        "[models.{name}]\nprovider = 'p{provider}'\nmodel = '{name}-upstream'\ninput_per_million_usd = {input}\n\
         output_per_million_usd = {output}\ncontext_window = {window}\ntier = {tier}\n"
    )
}

#[tokio::test]
async fn cheapest_takes_the_cheapest_candidate_that_meets_the_tier() {
    let routes = [
        model("small", 0, 0.1, 0.4, 128_000, 1),
        model("middle", 1, 0.4, 1.6, 128_000, 2),
        model("strong", 2, 2.5, 10.0, 128_000, 3),
        "[steps.classifier.route]\nstrategy = 'cheapest'\ncandidates = ['strong', 'middle', 'small']\nmin_tier = 2\n"
            .to_owned(),
    ]
    .concat();
    let fleet = Fleet::start(3, &[], &routes).await;
    for upstream in &fleet.upstreams {
        upstream.respond_with(|_| Reply::completion_with_usage(CLASSIFIED, 100, 10));
    }
    for n in 0..5 {
        let result = fleet.classify(&format!("ticket {n}"), CallOptions::default()).await.unwrap();
        assert_eq!(result.source, Source::Upstream);
        let route = result.route.unwrap();
        assert_eq!(route.strategy, RouteStrategy::Cheapest);
        assert_eq!(route.chosen.as_deref(), Some("middle"));
        assert_eq!(route.excluded, vec![("small".to_owned(), RouteExclusion::Tier)]);
        assert_eq!(result.model, "middle-upstream");
    }
    assert_eq!(fleet.requests(), vec![0, 5, 0]);
    // Priced at the chosen model's price.
    let rows = {
        fleet.engine.flush().await.unwrap();
        fleet.store.records().await.unwrap()
    };
    assert!((rows[0].cost_usd - (100.0 * 0.4 + 10.0 * 1.6) / 1e6).abs() < 1e-12);
    assert_eq!(rows[0].route.as_ref().unwrap().chosen.as_deref(), Some("middle"));
    let metrics = fleet.engine.metrics().render();
    assert!(
        metrics.contains(r#"aipipe_route_decisions_total{model="middle",outcome="chosen",step="classifier"} 5"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"aipipe_route_decisions_total{model="small",outcome="tier",step="classifier"} 5"#));

    // A call's own route: the cheapest of all, whatever the tier the step asks.
    let own = CallOptions { route: Some("cheapest: small, strong".parse().unwrap()), ..CallOptions::default() };
    let result = fleet.classify("ticket own", own).await.unwrap();
    assert_eq!(result.route.unwrap().chosen.as_deref(), Some("strong"), "the step's min_tier still holds");
    let unknown = CallOptions { route: Some("ordered: nope".parse().unwrap()), ..CallOptions::default() };
    let err = fleet.classify("ticket unknown", unknown).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidRequest, "{err}");
}

#[tokio::test]
async fn fastest_moves_traffic_to_the_faster_upstream_and_back_when_it_slows() {
    let routes = [
        model("a", 0, 0.15, 0.6, 128_000, 1),
        model("b", 1, 0.15, 0.6, 128_000, 1),
        "[steps.classifier.route]\nstrategy = 'fastest'\ncandidates = ['a', 'b']\n".to_owned(),
    ]
    .concat();
    let fleet = Fleet::start(2, &[], &routes).await;
    let delays = [Arc::new(AtomicU64::new(5)), Arc::new(AtomicU64::new(60))];
    for (upstream, delay) in fleet.upstreams.iter().zip(&delays) {
        let delay = delay.clone();
        upstream.respond_with(move |_| {
            Reply::slow(Duration::from_millis(delay.load(Ordering::SeqCst)), Reply::completion(CLASSIFIED))
        });
    }
    let mut chosen = Vec::new();
    for n in 0..200 {
        let result = fleet.classify(&format!("fast {n}"), CallOptions::default()).await.unwrap();
        chosen.push(result.route.unwrap().chosen.unwrap());
    }
    let to_a = chosen.iter().filter(|name| *name == "a").count();
    assert!(to_a >= 180, "{to_a} of 200 calls went to the faster upstream");

    // `a` slows down: traffic moves to `b`.
    delays[0].store(200, Ordering::SeqCst);
    let mut chosen = Vec::new();
    for n in 0..50 {
        let result = fleet.classify(&format!("slow {n}"), CallOptions::default()).await.unwrap();
        chosen.push(result.route.unwrap().chosen.unwrap());
    }
    let to_b = chosen.iter().filter(|name| *name == "b").count();
    assert!(to_b >= 45, "{to_b} of 50 calls went to `b` after `a` slowed");
}

#[tokio::test]
async fn an_open_breaker_takes_a_candidate_out_and_its_probe_brings_it_back() {
    let routes = [
        model("a", 0, 0.15, 0.6, 128_000, 1),
        model("b", 1, 0.15, 0.6, 128_000, 1),
        "[steps.classifier.route]\ncandidates = ['a', 'b']\n[breaker]\nfailures_to_open = 2\nopen_for_ms = 300\n"
            .to_owned(),
    ]
    .concat();
    let fleet = Fleet::start(2, &[], &routes).await;
    fleet.upstreams[0].respond_with(|_| Reply::server_error(503));
    fleet.upstreams[1].respond_with(|_| Reply::completion(CLASSIFIED));
    // Two failures open `a`'s breaker; each call still gets `b`'s answer.
    for n in 0..2 {
        let result = fleet.classify(&format!("down {n}"), CallOptions::default()).await.unwrap();
        assert_eq!(result.source, Source::FallbackModel);
        assert_eq!(result.route.unwrap().excluded, vec![("a".to_owned(), RouteExclusion::Failed)]);
    }
    assert_eq!(fleet.requests(), vec![2, 2]);
    // Open: `a` is left out before any request.
    let result = fleet.classify("open", CallOptions::default()).await.unwrap();
    assert_eq!(result.route.unwrap().excluded, vec![("a".to_owned(), RouteExclusion::BreakerOpen)]);
    assert_eq!(fleet.requests(), vec![2, 3]);
    // After the open period one call probes `a`; it answers, and `a` is back.
    fleet.upstreams[0].respond_with(|_| Reply::completion(CLASSIFIED));
    tokio::time::sleep(Duration::from_millis(350)).await;
    for n in 0..3 {
        let result = fleet.classify(&format!("back {n}"), CallOptions::default()).await.unwrap();
        assert_eq!(result.source, Source::Upstream);
        assert_eq!(result.route.unwrap().chosen.as_deref(), Some("a"));
    }
    assert_eq!(fleet.requests(), vec![5, 3]);
}

#[tokio::test]
async fn a_context_length_error_moves_the_call_to_a_larger_window_only() {
    let routes = [
        model("mid-window", 0, 0.15, 0.6, 32_000, 1),
        model("small-window", 1, 0.15, 0.6, 16_000, 1),
        model("large-window", 2, 0.15, 0.6, 200_000, 1),
        "[steps.classifier.route]\ncandidates = ['mid-window', 'small-window', 'large-window']\n".to_owned(),
    ]
    .concat();
    let fleet = Fleet::start(3, &[2], &routes).await;
    fleet.upstreams[0].respond_with(|_| Reply::context_length_exceeded());
    fleet.upstreams[1].respond_with(|_| Reply::completion(CLASSIFIED));
    fleet.upstreams[2].respond_with(|_| Reply::completion(CLASSIFIED));
    let result = fleet.classify("a long document", CallOptions::default()).await.unwrap();
    assert_eq!(result.source, Source::FallbackModel);
    let route = result.route.unwrap();
    assert_eq!(route.chosen.as_deref(), Some("large-window"));
    assert!(route.excluded.contains(&("small-window".to_owned(), RouteExclusion::ContextWindow)), "{route:?}");
    assert!(route.excluded.contains(&("mid-window".to_owned(), RouteExclusion::Failed)));
    assert_eq!(fleet.requests(), vec![1, 0, 1]);
    // The larger model speaks Anthropic's API: it got the system prompt on top.
    assert!(fleet.upstreams[2].received()[0]["system"].as_str().unwrap().contains("classify"));
}

#[tokio::test]
async fn calls_fall_through_on_upstream_faults_only() {
    let routes = [
        model("a", 0, 0.15, 0.6, 128_000, 1),
        model("b", 1, 0.15, 0.6, 128_000, 1),
        "[steps.classifier.route]\ncandidates = ['a', 'b']\n".to_owned(),
    ]
    .concat();
    let fleet = Fleet::start(2, &[], &routes).await;
    fleet.upstreams[1].respond_with(|_| Reply::completion(CLASSIFIED));
    for (reply, falls) in [
        (Reply::bad_request("unsupported parameter"), false),
        (Reply::unauthorized(), false),
        (Reply::overloaded(), true),
        (Reply::quota_exhausted(), true),
        // Last: its Retry-After pauses `a`, which later calls would skip.
        (Reply::rate_limited(30), true),
    ] {
        let before = fleet.requests()[1];
        fleet.upstreams[0].push(reply.clone());
        let result = fleet
            .classify(&format!("{reply:?}"), CallOptions { allow_stand_in: false, ..CallOptions::default() })
            .await;
        assert_eq!(result.is_ok(), falls, "{reply:?}: {result:?}");
        assert_eq!(fleet.requests()[1] - before, u64::from(falls), "{reply:?}");
    }
}

#[tokio::test]
async fn budgets_downgrade_past_the_soft_share_and_refuse_at_the_limit() {
    let routes = [
        model("strong", 0, 10.0, 30.0, 128_000, 3),
        model("cheap", 1, 1.0, 1.0, 128_000, 1),
        "[steps.classifier.route]\ncandidates = ['strong', 'cheap']\nmin_tier = 3\n\
         [budgets]\nworkspace_daily_usd = 0.1\nsoft_share = 0.5\non_budget = 'downgrade'\n"
            .to_owned(),
    ]
    .concat();
    let fleet = Fleet::start(2, &[], &routes).await;
    // Each strong answer costs 1000 * 10 + 1000 * 30 per million: $0.04.
    fleet.upstreams[0].respond_with(|_| Reply::completion_with_usage(CLASSIFIED, 1000, 1000));
    fleet.upstreams[1].respond_with(|_| Reply::completion_with_usage(CLASSIFIED, 10_000, 10_000));
    for n in 0..2 {
        let result = fleet.classify(&format!("before {n}"), CallOptions::default()).await.unwrap();
        assert_eq!(result.route.unwrap().chosen.as_deref(), Some("strong"));
    }
    // $0.08 of $0.10 spent: past the soft share, the cheapest candidate, whatever its tier.
    let result = fleet.classify("downgraded", CallOptions::default()).await.unwrap();
    let route = result.route.unwrap();
    assert!(route.downgraded);
    assert_eq!(route.chosen.as_deref(), Some("cheap"));
    // $0.10 spent: a call that costs anything is refused, in its own words.
    let err = fleet.classify("refused", CallOptions::default()).await.unwrap_err();
    assert!(matches!(err, PipelineError::BudgetExhausted { .. }), "{err}");
    assert_eq!(err.class(), ErrorClass::BudgetExhausted);
    assert!(err.to_string().contains("workspace `ws`"), "{err}");
    assert_eq!(fleet.requests(), vec![2, 1]);
}

#[tokio::test]
async fn a_fallback_target_over_budget_is_skipped() {
    let routes = [
        model("local", 0, 0.0, 0.0, 32_000, 1),
        model("paid", 1, 10.0, 30.0, 128_000, 3),
        "[steps.classifier]\ndaily_budget_usd = 0.01\n[steps.classifier.route]\ncandidates = ['local', 'paid']\n"
            .to_owned(),
    ]
    .concat();
    let fleet = Fleet::start(2, &[], &routes).await;
    fleet.upstreams[0].respond_with(|_| Reply::server_error(500));
    fleet.upstreams[1].respond_with(|_| Reply::completion_with_usage(CLASSIFIED, 1000, 1000));
    let options = || CallOptions { allow_stand_in: false, ..CallOptions::default() };
    // Within budget, the paid fallback answers what the free model could not ($0.04).
    let result = fleet.classify("first", options()).await.unwrap();
    assert_eq!(result.source, Source::FallbackModel);
    // Over the step's budget now: the free model is still asked, the paid one skipped.
    let err = fleet.classify("second", options()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::ServerError, "{err}");
    assert_eq!(fleet.requests(), vec![2, 1]);
    fleet.engine.flush().await.unwrap();
    let rows = fleet.store.records().await.unwrap();
    let route = rows[1].route.as_ref().unwrap();
    assert!(route.excluded.contains(&("paid".to_owned(), RouteExclusion::Budget)), "{route:?}");
}

#[tokio::test]
async fn a_call_over_the_window_only_with_its_default_output_budget_is_told_so() {
    let routes =
        [model("small-window", 0, 0.1, 0.4, 8_000, 1), "[steps.chat]\nmodel = 'small-window'\n".to_owned()].concat();
    let fleet = Fleet::start(1, &[], &routes).await;
    fleet.upstreams[0].respond_with(|_| Reply::completion("fine"));
    let chat = |content: String, max_tokens: Option<u32>| {
        let mut input = json!({"messages": [{"role": "user", "content": content}]});
        if let Some(max_tokens) = max_tokens {
            input["max_tokens"] = json!(max_tokens);
        }
        fleet.engine.execute(StepType::CHAT, input, CallContext::new("ws", "c"), CallOptions::default())
    };
    // About 5,000 prompt tokens: they fit 8,000, the chat step's default 4,096 output tokens beside them do not.
    let err = chat("word ".repeat(4_000), None).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("max_tokens of at most 3000"), "{message}");
    assert!(!message.contains("shorten the input"), "{message}");
    assert!(chat("word ".repeat(4_000), Some(1_000)).await.is_ok());
    // A prompt over the window itself is the input's fault.
    let err = chat("word ".repeat(8_000), Some(10)).await.unwrap_err();
    assert!(err.to_string().contains("shorten the input"), "{err}");
}

#[tokio::test]
async fn a_model_the_registry_does_not_list_is_refused_unless_star_prices_it() {
    async fn chat(fleet: &Fleet, model: String) -> Result<pipeline_core::PipelineResult, PipelineError> {
        let input = json!({"messages": [{"role": "user", "content": format!("hello from {model}")}]});
        let options = CallOptions { model: Some(model), ..CallOptions::default() };
        fleet.engine.execute(StepType::CHAT, input, CallContext::new("ws", "c"), options).await
    }
    let fleet = Fleet::start(1, &[], "").await;
    fleet.upstreams[0].respond_with(|_| Reply::completion_with_usage("fine", 1_000, 1_000));
    let err = chat(&fleet, "made-up-model".into()).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::InvalidRequest);
    assert!(err.to_string().contains("[models.\"made-up-model\"]"), "{err}");
    assert_eq!(fleet.requests(), vec![0], "a model with no price is never asked");
    // A dated name of a listed model is that model, at its price.
    let dated = chat(&fleet, "gpt-4o-mini-2024-07-18".into()).await.unwrap();
    assert!((dated.cost_usd - (1_000.0 * 0.15 + 1_000.0 * 0.60) / 1e6).abs() < 1e-12, "{}", dated.cost_usd);
    assert_eq!(fleet.upstreams[0].received()[0]["model"], "gpt-4o-mini-2024-07-18");

    // With [models."*"], any name goes at its price; the guards know them all as one.
    let star = "[models.\"*\"]\ninput_per_million_usd = 1.0\noutput_per_million_usd = 2.0\n";
    let fleet = Fleet::start(1, &[], star).await;
    fleet.upstreams[0].respond_with(|_| Reply::completion_with_usage("fine", 1_000, 1_000));
    for n in 0..50 {
        let result = chat(&fleet, format!("made-up-model-{n}")).await.unwrap();
        assert!((result.cost_usd - 0.003).abs() < 1e-12, "{}", result.cost_usd);
    }
    let breakers: Vec<String> = fleet.engine.breakers().into_iter().map(|breaker| breaker.key).collect();
    assert_eq!(breakers.len(), 1, "{breakers:?}");
    assert!(Config::from_toml("[steps.chat.route]\ncandidates = ['*']\n[models.\"*\"]\ninput_per_million_usd = 1.0\noutput_per_million_usd = 1.0").is_err());
}
