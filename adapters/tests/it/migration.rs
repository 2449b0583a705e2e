//! The shims against the legacy API, in each mode, over real HTTP: the legacy components and
//! the engine both talk to the scripted upstream, which tells them apart by what they send.
use adapters::legacy::{self, Endpoint};
use adapters::{Adapter, MigrationPlan, Mode, Modes, migration_status};
use serde_json::Value;
use testkit::{Harness, Reply, ScriptedUpstream};

/// Code written against the legacy API. Only the `use` line differs from the code the
/// application had before the migration: it now names the shims.
mod callers {
    use std::collections::BTreeMap;

    use adapters::legacy::prioritizer::{Level, PriorityOptions};
    pub use adapters::shims::classifier::Classifier;
    pub use adapters::shims::enhancer::Enhancer;
    pub use adapters::shims::extractor::FieldExtractor;
    pub use adapters::shims::prioritizer::Prioritizer;
    pub use adapters::shims::summarizer::Summarizer;
    pub use adapters::shims::validator::ContentValidator;

    pub struct Components {
        pub classifier: Classifier,
        pub enhancer: Enhancer,
        pub prioritizer: Prioritizer,
        pub summarizer: Summarizer,
        pub validator: ContentValidator,
        pub extractor: FieldExtractor,
    }

    /// What the application did with its components, and what it expected back.
    pub async fn daily_work(c: &Components) {
        let label = c.classifier.classify("I was charged twice", &["billing", "bug"]).await.unwrap();
        assert_eq!(label, "billing");
        let better = c.enhancer.enhance("teh text".to_owned()).await;
        assert_eq!(better, "The text, improved.");
        let options = PriorityOptions { context: Some("release week".into()) };
        let priority = c.prioritizer.prioritize("Checkout returns 500", &options).await.unwrap();
        assert_eq!((priority.level, priority.score), (Level::High, 80));
        let summary = c.summarizer.summarize("A long report about revenue.", 20).await.unwrap();
        assert_eq!(summary, "Revenue grew in the quarter.");

        // The synchronous components, from a plain thread as before.
        let (validator, extractor) = (c.validator.clone(), c.extractor.clone());
        let (verdict, fields) = tokio::task::spawn_blocking(move || {
            (validator.validate("Buy now!!!", &["no shouting"]), extractor.extract("Ada, ada@x.io", &["name", "phone"]))
        })
        .await
        .unwrap();
        assert!(verdict.unwrap().valid);
        let expected: BTreeMap<String, Option<String>> =
            [("name".to_owned(), Some("Ada".to_owned())), ("phone".to_owned(), None)].into_iter().collect();
        assert_eq!(fields, Some(expected));
    }
}

/// The engine's requests ask for JSON; the legacy ones never did.
fn from_engine(request: &Value) -> bool {
    request.get("response_format").is_some()
}

fn system_prompt(request: &Value) -> String {
    request["messages"][0]["content"].as_str().unwrap_or_default().to_owned()
}

fn user_prompt(request: &Value) -> String {
    request["messages"][1]["content"].as_str().unwrap_or_default().to_owned()
}

/// The model, as both paths see it. The engine's answers follow the steps' schemas; the
/// legacy ones follow each component's old format. Texts with "disagree" get another class
/// from the engine.
fn model(request: &Value) -> Reply {
    let system = system_prompt(request);
    if !from_engine(request) {
        let reply = match system.as_str() {
            "You classify texts." => "billing",
            "You improve texts." => "The text, improved.",
            "You prioritise work." => "high 80",
            "You summarise." => "Revenue grew in the quarter.",
            "You validate content." => "VALID",
            "You extract fields." => r#"{"name": "Ada", "phone": null}"#,
            other => panic!("unexpected legacy request: {other}"),
        };
        return Reply::completion(reply);
    }
    let reply = if system.contains("classify") {
        let label = if user_prompt(request).contains("disagree") { "bug" } else { "billing" };
        format!(r#"{{"label": "{label}", "confidence": 0.9}}"#)
    } else if system.contains("improve") {
        r#"{"enhanced": "The text, improved."}"#.to_owned()
    } else if system.contains("prioritise") {
        r#"{"priority": "high", "score": 80, "reason": "customers cannot pay"}"#.to_owned()
    } else if system.contains("summaries") {
        r#"{"summary": "Revenue grew in the quarter."}"#.to_owned()
    } else if system.contains("validator") {
        r#"{"valid": true, "issues": []}"#.to_owned()
    } else if system.contains("extract") {
        r#"{"fields": {"name": "Ada", "phone": null}}"#.to_owned()
    } else {
        panic!("unexpected engine request: {system}")
    };
    Reply::completion(reply)
}

struct Setup {
    harness: Harness,
    adapter: Adapter,
    components: callers::Components,
}

async fn setup(plan: MigrationPlan) -> Setup {
    let harness = Harness::start("[retry]\nmax_attempts = 1").await;
    harness.upstream.respond_with(model);
    let adapter = Adapter::new(harness.engine.clone(), Modes::new(plan), "acme");
    let endpoint =
        Endpoint { base_url: harness.upstream.base_url(), api_key: "sk-legacy".into(), model: "gpt-4o-mini".into() };
    let components = callers::Components {
        classifier: callers::Classifier::new(legacy::classifier::Classifier::new(endpoint.clone()), adapter.clone()),
        enhancer: callers::Enhancer::new(legacy::enhancer::Enhancer::new(endpoint.clone()), adapter.clone()),
        prioritizer: callers::Prioritizer::new(
            legacy::prioritizer::Prioritizer::new(endpoint.clone()),
            adapter.clone(),
        ),
        summarizer: callers::Summarizer::new(legacy::summarizer::Summarizer::new(endpoint.clone()), adapter.clone()),
        validator: callers::ContentValidator::new(
            legacy::validator::ContentValidator::new(endpoint.clone()),
            adapter.clone(),
        ),
        extractor: callers::FieldExtractor::new(legacy::extractor::FieldExtractor::new(endpoint), adapter.clone()),
    };
    Setup { harness, adapter, components }
}

fn plan(default: Mode) -> MigrationPlan {
    MigrationPlan { default, ..MigrationPlan::default() }
}

/// (legacy requests, engine requests) the upstream received.
fn requests(upstream: &ScriptedUpstream) -> (usize, usize) {
    let received = upstream.received();
    let engine = received.iter().filter(|request| from_engine(request)).count();
    (received.len() - engine, engine)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_the_legacy_api_work_unchanged_in_every_mode() {
    for (mode, expected) in [
        (Mode::Legacy, (6, 0)),
        (Mode::Shadow, (6, 6)),
        (Mode::Pipeline, (0, 6)),
        (Mode::PipelineWithLegacyFallback, (0, 6)),
    ] {
        let s = setup(plan(mode)).await;
        callers::daily_work(&s.components).await;
        s.adapter.settle_shadows().await;
        assert_eq!(requests(&s.harness.upstream), expected, "{mode:?}: (legacy, engine) requests");
    }

    // With the engine failing, the fallback mode still answers, through the old code.
    let s = setup(plan(Mode::PipelineWithLegacyFallback)).await;
    s.harness.upstream.respond_with(|request| {
        if from_engine(request) { Reply::bad_request("engine refused") } else { model(request) }
    });
    callers::daily_work(&s.components).await;
    assert_eq!(requests(&s.harness.upstream), (6, 6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_serves_the_legacy_answer_and_records_agreement() {
    let mut shadow = plan(Mode::Legacy);
    shadow.components.insert("classifier".into(), Mode::Shadow);
    shadow.cutover.min_calls = 10;
    shadow.cutover.min_agreement = 0.6;
    let s = setup(shadow).await;
    for n in 0..10 {
        let text = if n % 3 == 0 { format!("ticket {n}: disagree") } else { format!("ticket {n}") };
        // The caller always gets the legacy answer, whatever the engine says.
        assert_eq!(s.components.classifier.classify(&text, &["billing", "bug"]).await.unwrap(), "billing");
    }
    s.adapter.settle_shadows().await;
    s.adapter.engine().flush().await.unwrap();

    let status = migration_status(&s.harness.store, &s.adapter.modes().plan(), 0, i64::MAX).await.unwrap();
    let classifier = status.iter().find(|row| row.component == "classifier").unwrap();
    assert_eq!((classifier.mode, classifier.shadow_comparisons, classifier.calls), (Mode::Shadow, 10, 10));
    // Tickets 0, 3, 6 and 9 disagree.
    assert!((classifier.agreement_rate.unwrap() - 0.6).abs() < 1e-9);
    assert_eq!(classifier.engine_error_rate, Some(0.0));
    assert!(classifier.ready_to_cut_over, "0.6 agreement over 10 calls meets this plan's rule");
    let validator = status.iter().find(|row| row.component == "validator").unwrap();
    assert_eq!((validator.mode, validator.calls, validator.agreement_rate), (Mode::Legacy, 0, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_one_component_in_the_plan_file_changes_only_its_path() {
    let s = setup(plan(Mode::Legacy)).await;
    let c = &s.components;
    c.classifier.classify("first", &["billing", "bug"]).await.unwrap();
    c.summarizer.summarize("first", 20).await.unwrap();
    assert_eq!(requests(&s.harness.upstream), (2, 0));

    let file = s.harness.dir.path().join("migration.toml");
    std::fs::write(&file, "default = \"legacy\"\n[components]\nclassifier = \"pipeline\"\n").unwrap();
    s.adapter.modes().reload(&file).unwrap();
    c.classifier.classify("second", &["billing", "bug"]).await.unwrap();
    c.summarizer.summarize("second", 20).await.unwrap();
    assert_eq!(requests(&s.harness.upstream), (3, 1), "the classifier moved to the engine; the summarizer did not");

    // A broken edit keeps the plan that works, and says where the problem is.
    std::fs::write(&file, "default = \"legacy\"\n[components]\nclassifier = \"pipline\"\n").unwrap();
    let err = s.adapter.modes().reload(&file).unwrap_err().to_string();
    assert!(err.contains("migration.toml") && err.contains("pipline"), "{err}");
    assert_eq!(s.adapter.modes().mode("classifier"), Mode::Pipeline);
}
