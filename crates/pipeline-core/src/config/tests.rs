use std::path::Path;
use std::time::Duration;

use super::*;

#[test]
fn defaults_are_valid_and_declare_the_built_in_steps() {
    let config = Config::defaults().unwrap();
    for step in StepType::BUILT_IN {
        let spec = config.step(&step).unwrap_or_else(|| panic!("{step} missing"));
        assert_eq!(spec.model, "gpt-4o-mini");
    }
    assert_eq!(config.cache.ttl, Duration::from_secs(3600));
    assert!(config.prices.price("gpt-4o-mini").is_some());
}

#[test]
fn the_default_min_confidence_is_the_shipped_verifiers_calibrated_cut() {
    let config = Config::defaults().unwrap();
    assert_eq!(
        config.semantic.min_confidence,
        semantic_cache::Verifier::shipped().min_confidence,
        "run `cargo xtask calibrate`: it writes both"
    );
}

#[test]
fn a_file_adds_steps_and_overrides_keys() {
    let config = Config::from_toml(
        r#"
        [cache]
        ttl_secs = 60
        [steps.translator]
        system = "You translate."
        prompt = "Translate to {{ input.language }}: {{ input.text }}"
        output_schema = '{"type": "object", "required": ["translation"]}'
        model = "gpt-4o"
        "#,
    )
    .unwrap();
    assert_eq!(config.cache.ttl, Duration::from_secs(60));
    assert_eq!(config.cache.max_entries, 10_000);
    let translator = config.step(&StepType::new("translator").unwrap()).unwrap();
    assert_eq!(translator.model, "gpt-4o");
    assert_eq!(translator.max_output_tokens, 512);
}

fn error_of(toml: &str) -> String {
    Config::from_toml(toml).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key() {
    let unknown = error_of("[cache]\nttl_second = 5");
    assert!(unknown.contains("ttl_second") && unknown.contains("cache"), "{unknown}");
    let wrong_type = error_of("[cache]\nttl_secs = \"an hour\"");
    assert!(wrong_type.contains("cache.ttl_secs"), "{wrong_type}");
    let zero = error_of("[cache]\nmax_entries = 0");
    assert!(zero.contains("cache.max_entries"), "{zero}");
    let schema = error_of("[steps.classifier]\noutput_schema = '{not json'");
    assert!(schema.contains("steps.classifier.output_schema"), "{schema}");
    let template = error_of("[steps.classifier]\nprompt = '{% if %}'");
    assert!(template.contains("steps.classifier.prompt"), "{template}");
    let url = error_of("[provider]\nbase_url = 'localhost:8080'");
    assert!(url.contains("provider.base_url"), "{url}");
    let name = error_of("[steps.Bad]\nsystem = 's'\nprompt = 'p'\noutput_schema = '{\"type\":\"object\"}'");
    assert!(name.contains("steps.Bad"), "{name}");
}

#[test]
fn resilience_settings_are_checked_and_named() {
    let defaults = Config::defaults().unwrap();
    // No limits of our own by default: a provider/model is held to what its upstream declares,
    // a workspace to nothing unless an operator says.
    let limits = defaults.resilience.limits.unwrap();
    assert_eq!((limits.workspace_requests, limits.model_requests, limits.model_tokens), (None, None, None));
    assert_eq!(defaults.resilience.max_wait, Duration::from_millis(500));
    let set = Config::from_toml(
        "[limits]
workspace_requests_per_minute = 1200",
    )
    .unwrap()
    .resilience
    .limits
    .unwrap();
    let quota = set.workspace_requests.unwrap();
    assert_eq!((quota.per_minute.get(), quota.burst.get()), (1200, 60), "a burst of three seconds' worth");
    assert_eq!(defaults.resilience.breaker.unwrap().failures_to_open, 5);
    let classifier = defaults.step(&StepType::CLASSIFIER).unwrap();
    assert_eq!(classifier.fallback_answer.as_ref().unwrap()["label"], "unclassified");

    let off = Config::from_toml("[limits]\nenabled = false\n[breaker]\nenabled = false").unwrap();
    assert!(off.resilience.limits.is_none() && off.resilience.breaker.is_none());
    let no_rule = Config::from_toml("[steps.classifier]\nfallback_answer = ''").unwrap();
    assert!(no_rule.step(&StepType::CLASSIFIER).unwrap().fallback_answer.is_none());

    let burst = error_of("[limits]\nworkspace_request_burst = -1");
    assert!(burst.contains("limits.workspace_request_burst"), "{burst}");
    let backoff = error_of("[retry]\ninitial_backoff_ms = 5000\nmax_backoff_ms = 100");
    assert!(backoff.contains("retry.max_backoff_ms"), "{backoff}");
    let confidence = error_of("[fallback]\nsimilar_confidence = 1.5");
    assert!(confidence.contains("fallback.similar_confidence"), "{confidence}");
    let answer = error_of("[steps.classifier]\nfallback_answer = '{\"label\": 3}'");
    assert!(answer.contains("steps.classifier.fallback_answer"), "{answer}");
    let provider = error_of("[steps.classifier]\nfallbacks = [{ provider = 'backup', model = 'm' }]");
    assert!(provider.contains("steps.classifier.fallbacks[0].provider") && provider.contains("[providers.backup]"));
    let backup = "[providers.backup]\nbase_url = 'http://localhost:9/v1'\napi_key_env = 'K'\nrequest_timeout_ms = 1\n\
         connect_timeout_ms = 1\n";
    let declared = Config::from_toml(&format!(
        "{backup}[steps.classifier]\nfallbacks = [{{ provider = 'backup', model = 'gpt-4o' }}]"
    ))
    .unwrap();
    let route = &declared.step(&StepType::CLASSIFIER).unwrap().route;
    assert_eq!(route.candidates[1].provider, "backup");
    assert_eq!((route.candidates[1].name.as_str(), route.candidates[1].upstream.as_str()), ("backup/gpt-4o", "gpt-4o"));
    let unpriced =
        error_of(&format!("{backup}[steps.classifier]\nfallbacks = [{{ provider = 'backup', model = 'm' }}]"));
    assert!(
        unpriced.contains("steps.classifier.fallbacks[0].model") && unpriced.contains("[models.\"m\"]"),
        "{unpriced}"
    );
}

#[test]
fn routes_pick_from_the_registry_and_say_what_is_wrong() {
    let config = Config::from_toml(
        "[steps.classifier.route]\nstrategy = 'cheapest'\ncandidates = ['gpt-4o', 'gpt-4.1-nano']\nmin_tier = 1\n\
         weights = { 'gpt-4o' = 2 }\n[budgets]\nworkspace_daily_usd = 5\n[budgets.workspaces]\nbig = 50.0",
    )
    .unwrap();
    let route = &config.step(&StepType::CLASSIFIER).unwrap().route;
    assert_eq!(route.strategy, telemetry::RouteStrategy::Cheapest);
    assert!(route.configured);
    assert_eq!(route.weights, vec![2.0, 1.0]);
    assert_eq!(config.budgets.workspace_limit("small"), Some(5.0));
    assert_eq!(config.budgets.workspace_limit("big"), Some(50.0));
    assert_eq!(config.models.get("gpt-4o-mini").unwrap().price.cached_input_per_million_usd, Some(0.075));

    for (toml, key) in [
        ("[steps.classifier.route]\nstrategy = 'random'\ncandidates = ['gpt-4o']", "steps.classifier.route.strategy"),
        ("[steps.classifier.route]\ncandidates = ['nope']", "steps.classifier.route.candidates[0]"),
        ("[steps.classifier.route]\ncandidates = []", "steps.classifier.route.candidates"),
        ("[steps.classifier.route]\ncandidates = ['gpt-4o-mini']\nmin_tier = 3", "steps.classifier.route.min_tier"),
        (
            "[steps.classifier]\nmodel = 'gpt-4o'\n[steps.classifier.route]\ncandidates = ['gpt-4o']",
            "steps.classifier.route",
        ),
        ("[models.x]\ninput_per_million_usd = -1\noutput_per_million_usd = 1", "models.\"x\".input_per_million_usd"),
        (
            "[models.x]\nprovider = 'nowhere'\ninput_per_million_usd = 1\noutput_per_million_usd = 1",
            "models.\"x\".provider",
        ),
        ("[models.x]\noutput_per_million_usd = 1", "models.x"),
        ("[budgets]\non_budget = 'pray'", "budgets.on_budget"),
        ("[budgets]\nsoft_share = 0", "budgets.soft_share"),
        ("[prices.'gpt-4o']\ninput_per_million_usd = 1\noutput_per_million_usd = 1", "prices"),
        ("[provider]\nkind = 'gemini'", "provider.kind"),
    ] {
        let err = error_of(toml);
        assert!(err.contains(key), "`{toml}` should name `{key}`: {err}");
    }
}

#[test]
fn a_missing_file_says_so() {
    let err = Config::load(Some(Path::new("/nonexistent/aipipe.toml"))).unwrap_err();
    assert!(matches!(err, SetupError::MissingFile { .. }), "{err}");
}

#[test]
fn editing_a_prompt_changes_the_fingerprint() {
    let base = Config::defaults().unwrap();
    let edited =
        Config::from_toml("[steps.classifier]\nprompt = 'Labels: {{ input.labels }} Text: {{ input.text }}'").unwrap();
    let fingerprint = |config: &Config| config.step(&StepType::CLASSIFIER).unwrap().fingerprint.clone();
    assert_ne!(fingerprint(&base), fingerprint(&edited));
    assert_eq!(
        base.step(&StepType::VALIDATOR).unwrap().fingerprint,
        edited.step(&StepType::VALIDATOR).unwrap().fingerprint
    );
}

#[test]
fn a_table_the_engine_does_not_read_is_an_error_unless_its_owner_claims_it() {
    let typo = error_of("[cahce]\nttl_secs = 5");
    assert!(typo.contains("`cahce`") && typo.contains("unknown table"), "{typo}");

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Owned {
        port: u16,
        name: String,
    }
    const OWNED_DEFAULTS: &str = "[owned]\nport = 1\nname = 'default'";
    let mut source = ConfigSource::from_toml("[owned]\nport = 9");
    assert!(source.engine().is_err(), "unclaimed, it is unknown");
    let owned: Owned = source.section("owned", OWNED_DEFAULTS).unwrap();
    assert_eq!((owned.port, owned.name.as_str()), (9, "default"));
    source.engine().unwrap();

    let mut misspelt = ConfigSource::from_toml("[owned]\nprot = 9");
    let err = misspelt.section::<Owned>("owned", OWNED_DEFAULTS).unwrap_err().to_string();
    assert!(err.contains("owned") && err.contains("prot"), "{err}");
}

#[test]
fn a_probability_is_not_a_similarity() {
    let cosine = error_of("[semantic]\nthreshold = 0");
    assert!(cosine.contains("semantic.threshold") && cosine.contains("cosine"), "{cosine}");
    let probability = error_of("[semantic]\nmin_confidence = 1.2");
    assert!(probability.contains("semantic.min_confidence") && probability.contains("probability"), "{probability}");
    // A probability of 0 is a bar (serve whatever passes the guards); a cosine of 0 is none.
    assert_eq!(Config::from_toml("[semantic]\nmin_confidence = 0").unwrap().semantic.min_confidence, 0.0);
}

#[test]
fn shared_state_is_off_by_default_and_its_errors_name_the_key() {
    let config = Config::defaults().unwrap();
    assert!(!config.state.is_shared());
    assert_eq!(config.state.replicas.get(), 1);

    let config = Config::from_toml("[state]\nredis_url = \"redis://:pw@cache:6379/0\"\nreplicas = 3").unwrap();
    let redis = config.state.redis.as_ref().unwrap();
    // The semantic store is the same Redis unless named.
    assert_eq!(config.state.semantic.as_ref(), Some(redis));
    assert_eq!((redis.timeout, config.state.replicas.get()), (Duration::from_millis(200), 3));

    let config = Config::from_toml("[state]\nredis_url = \"redis://a/\"\nsemantic_url = \"redis://b/\"").unwrap();
    assert_eq!(config.state.semantic.unwrap().url, "redis://b/");

    for (toml, key) in [
        ("[state]\nredis_url = \"postgres://db/x\"", "state.redis_url"),
        ("[state]\nsemantic_url = \"http://x\"", "state.semantic_url"),
        ("[state]\nreplicas = 0", "state.replicas"),
        ("[state]\ntimeout_ms = 0", "state.timeout_ms"),
        ("[state]\nkey_prefix = \" \"", "state.key_prefix"),
    ] {
        match Config::from_toml(toml) {
            Err(SetupError::Invalid { key: named, .. }) => assert_eq!(named, key, "{toml}"),
            other => panic!("{toml}: {other:?}"),
        }
    }
    assert!(Config::from_toml("[state]\nredis = \"x\"").is_err(), "unknown keys are refused");
}

#[test]
fn audits_compare_what_each_step_names_and_bad_rules_name_their_key() {
    let config = Config::defaults().unwrap();
    let rule = |step: StepType| config.step(&step).unwrap().answer_match.clone();
    assert_eq!(rule(StepType::CLASSIFIER), AnswerMatch::Fields(vec!["label".into()]));
    assert_eq!(rule(StepType::new("summarizer").unwrap()), AnswerMatch::Meaning);
    assert_eq!(rule(StepType::new("extractor").unwrap()), AnswerMatch::Fields(Vec::new()));
    assert_eq!(rule(StepType::CHAT), AnswerMatch::Meaning);
    assert_eq!(config.step(&StepType::CLASSIFIER).unwrap().semantic_max_wrong_rate, 0.02);

    let error = error_of("[steps.classifier]\naudit_fields = [\"colour\"]");
    assert!(error.contains("steps.classifier.audit_fields") && error.contains("confidence"), "{error}");
    let error = error_of("[steps.chat]\naudit_by = \"fields\"");
    assert!(error.contains("steps.chat.audit_by"), "{error}");
    let error = error_of("[steps.summarizer]\naudit_fields = [\"summary\"]");
    assert!(error.contains("steps.summarizer.audit_fields"), "{error}");
    let error = error_of("[semantic]\nmax_wrong_rate = 0.7");
    assert!(error.contains("semantic.max_wrong_rate") && error.contains("0.02"), "{error}");
    let error = error_of("[steps.classifier]\nsemantic_max_wrong_rate = -0.1");
    assert!(error.contains("steps.classifier.semantic_max_wrong_rate"), "{error}");
}

#[test]
fn fields_agree_on_what_the_step_names_case_blind() {
    use serde_json::json;
    let label = AnswerMatch::Fields(vec!["label".into()]);
    let a = json!({"label": "Billing", "confidence": 0.9});
    assert_eq!(label.fields_agree(&a, &json!({"label": " billing", "confidence": 0.4})), Some(true));
    assert_eq!(label.fields_agree(&a, &json!({"label": "bug", "confidence": 0.9})), Some(false));
    assert_eq!(label.fields_agree(&json!({}), &json!({"label": "bug"})), Some(false));
    let all = AnswerMatch::Fields(Vec::new());
    assert_eq!(all.fields_agree(&a, &json!({"label": "billing", "confidence": 0.4})), Some(false));
    assert_eq!(all.fields_agree(&a, &json!({"label": "billing", "confidence": 0.9})), Some(true));
    let extracted = |fields| json!({"fields": fields});
    assert_eq!(
        all.fields_agree(&extracted(json!({"city": "Oslo"})), &extracted(json!({"city": "Oslo", "zip": 1}))),
        Some(false)
    );
    assert_eq!(AnswerMatch::Meaning.fields_agree(&a, &a), None);
}

#[test]
fn the_answer_judge_must_be_a_structured_step_that_says_same() {
    let error = error_of("[semantic]\nanswer_judge_step = \"judge\"");
    assert!(error.contains("semantic.answer_judge_step") && error.contains("[steps.judge]"), "{error}");
    let error = error_of("[semantic]\nanswer_judge_step = \"classifier\"");
    assert!(error.contains("semantic.answer_judge_step") && error.contains("`same`"), "{error}");
}
