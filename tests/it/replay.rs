//! `aipipe replay` as a user runs it: hand-built logs (broken lines, outages, pauses) and a log from
//! `cargo xtask gen-log`, each checked against figures worked out independently of the engine.
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn line(trace: &str, ts: &str, workspace: &str, text: &str, outcome: &str, latency_ms: u32) -> String {
    format!(
        r#"{{"ts":"{ts}","trace_id":"{trace}","component":"ticket-router","step":"classifier","workspace":"{workspace}","model":"gpt-4o-mini","input":{{"text":"{text}","labels":["billing","bug"]}},{outcome},"latency_ms":{latency_ms}}}"#
    )
}

const OK_SMALL: &str =
    r#""response":"{\"label\":\"billing\",\"confidence\":0.9}","usage":{"input_tokens":100,"output_tokens":10}"#;
const OK_LARGE: &str =
    r#""response":"{\"label\":\"bug\",\"confidence\":0.8}","usage":{"input_tokens":200,"output_tokens":20}"#;
const RATE_LIMITED: &str =
    r#""error":{"class":"rate_limited","status":429,"retry_after_ms":2000,"message":"slow down"}"#;

fn replay(log: &[u8], dir: &Path, extra: &[&str]) -> Output {
    let log_path = dir.join("calls.jsonl");
    std::fs::write(&log_path, log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_aipipe"))
        .arg("replay")
        .arg(&log_path)
        .arg("--db")
        .arg(dir.join("replay.db"))
        .args(extra)
        .env_remove("AIPIPE_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn broken_lines_are_named_and_the_rest_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = Vec::new();
    for text in [
        line("t1", "2026-07-03T09:00:00Z", "ws-a", "charged twice", OK_SMALL, 1000),
        line("t2", "2026-07-03T09:01:00Z", "ws-a", "charged twice", OK_SMALL, 1200),
        "{\"ts\": \"2026-07-03T09:02:00Z\", \"component\": ".to_owned(),
        line("t4", "2026-07-03T09:03:00Z", "ws-b", "charged twice", OK_SMALL, 900),
        line("t5", "2026-07-03T09:04:00Z", "ws-a", "app crashes", RATE_LIMITED, 50),
    ] {
        log.extend_from_slice(text.as_bytes());
        log.push(b'\n');
    }
    log.extend_from_slice(b"\xff\xfe not utf-8\n");
    log.extend_from_slice(br#"{"ts":"2026-07-03T09:06:00Z","trace_id":"t7","component":"c","step":"classifier","workspace":"w","model":"m","input":{},"latency_ms":5}"#);
    log.push(b'\n');
    log.extend_from_slice(line("t8", "2026-07-03T09:07:00Z", "ws-a", "app crashes", OK_LARGE, 3000).as_bytes());
    log.push(b'\n');

    let out = replay(&log, dir.path(), &["--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("calls.jsonl:3: skipped"), "{stderr}");
    assert!(stderr.contains("calls.jsonl:6: skipped: not valid UTF-8"), "{stderr}");
    assert!(stderr.contains("calls.jsonl:7: skipped: has neither `response` nor `error`"), "{stderr}");

    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["skipped_lines"], 3);
    assert_eq!(report["replayed"], 5);
    assert_eq!(report["telemetry_rows"], 5, "one telemetry row per replayed call");

    // By hand, gpt-4o-mini at $0.15 / $0.60 per million tokens:
    // a small answer costs (100 * 0.15 + 10 * 0.60) / 1e6 = 21e-6, a large one 42e-6.
    let before = &report["before"];
    assert_eq!(before["calls"], 5);
    assert_close(&before["cost_usd"], 3.0 * 21e-6 + 42e-6);
    assert_close(&before["error_rate"], 0.2);
    assert_close(&before["hit_rate"], 0.0);
    assert_close(&before["p99_ms"], 3000.0);

    // After: t2 repeats t1 in the same workspace and is served from the cache; t4 is another
    // workspace; t5 is rate limited as logged, and the classifier's rule-based fallback
    // answers it ("unclassified"): no longer an error, but degraded, not answered; t8 goes
    // upstream.
    let after = &report["after"];
    assert_eq!(after["calls"], 4);
    assert_close(&after["cost_usd"], 2.0 * 21e-6 + 42e-6);
    assert_close(&after["error_rate"], 0.0);
    assert_eq!(after["degraded"], 1);
    assert_close(&after["degraded_rate"], 0.2);
    assert_close(&after["hit_rate"], 0.2);
    let p99 = after["p99_ms"].as_f64().unwrap();
    assert!((3000.0..3100.0).contains(&p99), "the logged 3000 ms plus engine overhead: {p99}");

    // Recovery: as logged, the upstream could not answer t5 at 09:04 and the next call a model
    // answered was t8 at 09:07; after, a stand-in answered t5, which does not make the upstream
    // any better: the same 180 s.
    assert_close(&before["mttr_s"], 180.0);
    assert_close(&after["mttr_s"], 180.0);
    let components = report["components"].as_array().unwrap();
    assert_eq!(components.len(), 1);
    assert_eq!(components[0]["component"], "ticket-router");
    assert_eq!(components[0]["before"], report["before"]);
    assert_eq!(components[0]["after"]["calls"], 4);
    let timeline = report["timeline"].as_array().unwrap();
    let calls = |side: &str| timeline.iter().map(|bucket| bucket[side].as_u64().unwrap()).sum::<u64>();
    assert_eq!((calls("before_calls"), calls("after_calls")), (5, 4));
    let html = std::fs::read_to_string(report["html"].as_str().unwrap()).unwrap();
    assert_eq!(html.matches("<svg").count(), 3, "calls, cost and hit-rate charts");
    assert!(html.contains("ticket-router"));
}

#[test]
fn openai_request_response_logs_replay_as_chat_calls() {
    let dir = tempfile::tempdir().unwrap();
    let call = |ts: &str, question: &str, outcome: &str| {
        format!(
            r#"{{"timestamp":"{ts}","latency_ms":700,"metadata":{{"component":"docs-bot","workspace":"w"}},"request":{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{question}"}}]}},{outcome}}}"#
        )
    };
    let answer = r#""response":{"choices":[{"message":{"role":"assistant","content":"Paris."}}],"usage":{"prompt_tokens":1000,"completion_tokens":100}}"#;
    let failed = r#""error":{"status":503,"message":"overloaded"}"#;
    let log = [
        call("2026-07-03T09:00:00Z", "Capital of France?", answer),
        call("2026-07-03T09:00:30Z", "Capital of France?", answer),
        call("2026-07-03T09:01:00Z", "Capital of Spain?", failed),
        call("2026-07-03T09:02:00Z", "Capital of Italy?", answer),
    ]
    .join("\n");
    let out = replay(log.as_bytes(), dir.path(), &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["replayed"], 4);
    // (1000 * 0.15 + 100 * 0.60) / 1e6 = 210e-6 per answer.
    assert_close(&report["before"]["cost_usd"], 3.0 * 210e-6);
    assert_close(&report["after"]["cost_usd"], 2.0 * 210e-6);
    assert_eq!(report["after"]["calls"], 3, "the repeated question is served from the cache");
    // A chat step has no rule-based answer: the 503 stays an error, and recovery took a minute.
    assert_close(&report["after"]["error_rate"], 0.25);
    assert_close(&report["after"]["mttr_s"], 60.0);
    assert_eq!(report["components"][0]["component"], "docs-bot");
}

#[test]
fn the_table_is_the_default_output() {
    let dir = tempfile::tempdir().unwrap();
    let log = line("t1", "2026-07-03T09:00:00Z", "ws-a", "charged twice", OK_SMALL, 1000) + "\n";
    let out = replay(log.as_bytes(), dir.path(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for row in ["AI calls", "cost (USD)", "p99 latency (ms)", "error rate", "cache hit rate"] {
        assert!(stdout.contains(row), "{row} missing from:\n{stdout}");
    }
}

#[test]
fn a_missing_log_or_bad_config_is_an_error_that_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aipipe"))
        .args(["replay", "/nonexistent/log.jsonl", "--db"])
        .arg(dir.path().join("x.db"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open the log `/nonexistent/log.jsonl`"));

    let config = dir.path().join("aipipe.toml");
    std::fs::write(&config, "[cache]\nttl = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aipipe"))
        .arg("--config")
        .arg(&config)
        .args(["replay", "whatever.jsonl"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("ttl") && stderr.contains("cache"), "{stderr}");
}

fn assert_close(value: &Value, expected: f64) {
    let actual = value.as_f64().unwrap_or_else(|| panic!("not a number: {value}"));
    assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
}

#[test]
fn process_variables_are_not_config_keys_but_typos_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let log = line("t1", "2026-07-03T09:00:00Z", "ws-a", "charged twice", OK_SMALL, 1000) + "\n";
    let log_path = dir.path().join("calls.jsonl");
    std::fs::write(&log_path, log).unwrap();
    let run = |var: &str, value: &str| {
        Command::new(env!("CARGO_BIN_EXE_aipipe"))
            .arg("replay")
            .arg(&log_path)
            .arg("--db")
            .arg(dir.path().join("r.db"))
            .env(var, value)
            .output()
            .unwrap()
    };
    // AIPIPE_HOME says where the model is; it must not be read as a config key.
    let home = pipeline_core::semantic_cache::ModelPaths::home();
    let out = run("AIPIPE_HOME", home.to_str().unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Nor is the tests' PostgreSQL server (a cold CI run caught that one).
    let out = run("AIPIPE_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:1/postgres");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run("AIPIPE_CACHE__TTL_SECONDS", "5");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cache.ttl_seconds"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_endpoint_answers_instead_of_the_log() {
    let upstream = testkit::ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|_| testkit::Reply::completion_with_usage(r#"{"label": "bug", "confidence": 0.7}"#, 300, 30));
    let dir = tempfile::tempdir().unwrap();
    let log = [
        line("t1", "2026-07-03T09:00:00Z", "ws-a", "charged twice", OK_SMALL, 1000),
        line("t2", "2026-07-03T09:01:00Z", "ws-a", "charged twice", OK_SMALL, 1000),
        line("t3", "2026-07-03T09:02:00Z", "ws-a", "app crashes", RATE_LIMITED, 50),
    ]
    .join("\n");
    let log_path = dir.path().join("calls.jsonl");
    std::fs::write(&log_path, log).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aipipe"))
        .arg("replay")
        .arg(&log_path)
        .arg("--db")
        .arg(dir.path().join("replay.db"))
        .args(["--json", "--base-url", &upstream.base_url()])
        .env("OPENAI_API_KEY", "sk-test")
        .env_remove("AIPIPE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The live upstream answers all three (the logged 429 does not happen live); the repeat
    // is served from the cache.
    assert_eq!(upstream.requests(), 2);
    assert_eq!(report["after"]["calls"], 2);
    assert_close(&report["after"]["error_rate"], 0.0);
    // (300 * 0.15 + 30 * 0.60) / 1e6 = 63e-6 per live answer.
    assert_close(&report["after"]["cost_usd"], 2.0 * 63e-6);
}

#[test]
fn breakers_and_retry_after_pauses_run_on_the_logs_clock() {
    const OUTAGE: &str = r#""error":{"class":"server_error","status":503,"message":"upstream down"}"#;
    let at = |seconds: u32| format!("2026-07-03T09:{:02}:{:02}Z", seconds / 60, seconds % 60);
    let mut log = String::new();
    // Five 503s open the breaker at 09:00:40 for `breaker.open_for_ms` (60 s); the three calls
    // logged inside that minute never reach the provider; the one after it is the probe.
    let calls = [
        (0, OUTAGE, 300),
        (10, OUTAGE, 300),
        (20, OUTAGE, 300),
        (30, OUTAGE, 300),
        (40, OUTAGE, 300),
        (50, OUTAGE, 300),
        (60, OUTAGE, 300),
        (80, OUTAGE, 300),
        (105, OK_SMALL, 400),
        (120, OK_SMALL, 400),
        // A 429 asks for 2 s; the call logged 1 s later waits the second that is left.
        (180, RATE_LIMITED, 50),
        (181, OK_SMALL, 100),
    ];
    for (index, (seconds, outcome, latency_ms)) in calls.into_iter().enumerate() {
        // Each text has its own number: the number guard keeps the caches out of it.
        let text = format!("order {} was charged twice", 100 + index);
        log.push_str(&line(&format!("t{index}"), &at(seconds), "ws-a", &text, outcome, latency_ms));
        log.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = replay(log.as_bytes(), dir.path(), &["--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "a replay does not wait in real time");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["before"]["calls"], 12);
    assert_close(&report["before"]["p99_ms"], 400.0);
    // On the shipped defaults a call waits for a pause at most `limits.max_wait_ms` (500 ms):
    // the one logged 1 s into the 2 s pause is refused at once, and the classifier's rule
    // stands in for it; it never reaches the provider either.
    assert_eq!(report["after"]["calls"], 8, "three calls refused by the open breaker, one by the pause: {report}");
    // Every call the upstream could not answer (eight in the outage, the 429, the paused one)
    // got the classifier's rule instead: degraded, not failed.
    assert_eq!(report["after"]["degraded"], 10, "{report}");
    assert_close(&report["after"]["error_rate"], 0.0);

    // A caller that may wait 2 s waits the second that is left, then goes.
    let patient = Command::new(env!("CARGO_BIN_EXE_aipipe"))
        .arg("replay")
        .arg(dir.path().join("calls.jsonl"))
        .arg("--db")
        .arg(dir.path().join("patient.db"))
        .arg("--json")
        .env("AIPIPE_LIMITS__MAX_WAIT_MS", "2000")
        .env_remove("AIPIPE_CONFIG")
        .output()
        .unwrap();
    assert!(patient.status.success(), "{}", String::from_utf8_lossy(&patient.stderr));
    let report: Value = serde_json::from_slice(&patient.stdout).unwrap();
    assert_eq!(report["after"]["calls"], 9, "three calls refused by the open breaker: {report}");
    let after_p99 = report["after"]["p99_ms"].as_f64().unwrap();
    assert!((1100.0..1300.0).contains(&after_p99), "1 s of pause plus the logged 100 ms: {after_p99}");
}

#[test]
fn a_generated_log_replays_to_the_figures_worked_out_from_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("generated.jsonl");
    // `cargo xtask gen-log --calls 2000`, on a small hand-written stand-in for ../shared/data.
    let args = xtask::gen_log::GenLogArgs::with_defaults(&log_path, 2000).unwrap();
    xtask::gen_log::gen_log(&args, &root.join("tests/fixtures/gen-data")).unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let calls: Vec<Value> = log.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(calls.len(), 2000);

    // With the semantic cache and the breaker off, every figure follows from the log by the
    // exact cache's rules: a call is served from the cache when the same workspace, step and
    // input got an upstream answer less than `cache.ttl_secs` (3,600 s) before; everything else
    // reaches the provider and gets what the log says; a failure is then answered by the rule
    // of the classifier, validator and prioritizer, and is an error for the other steps.
    let price = |call: &Value| {
        let tokens = |field: &str| call["usage"][field].as_f64().unwrap_or(0.0);
        (tokens("input_tokens") * 0.15 + tokens("output_tokens") * 0.60) / 1e6
    };
    let mut stored: Vec<(&Value, &Value, &Value, i64)> = Vec::new();
    let (mut before_cost, mut before_errors) = (0.0, 0);
    let (mut after_calls, mut after_cost, mut after_errors, mut hits) = (0, 0.0, 0, 0);
    for call in &calls {
        let at = call["ts"].as_str().unwrap().parse::<jiff::Timestamp>().unwrap().as_millisecond();
        let failed = call.get("error").is_some();
        before_cost += price(call);
        before_errors += usize::from(failed);
        let key = (&call["workspace"], &call["step"], &call["input"]);
        let cached = stored.iter().rev().find(|(w, s, i, _)| (*w, *s, *i) == key).map(|entry| entry.3);
        if cached.is_some_and(|stored_at| at - stored_at < 3_600_000) {
            hits += 1;
            continue;
        }
        after_calls += 1;
        after_cost += price(call);
        if failed {
            let has_rule = ["classifier", "validator", "prioritizer"].contains(&call["step"].as_str().unwrap());
            after_errors += usize::from(!has_rule);
        } else {
            stored.push((key.0, key.1, key.2, at));
        }
    }
    assert!(hits > 200 && before_errors > 50 && after_errors > 0, "a log that exercises the figures");

    let out = Command::new(env!("CARGO_BIN_EXE_aipipe"))
        .arg("replay")
        .arg(&log_path)
        .arg("--db")
        .arg(dir.path().join("replay.db"))
        .arg("--json")
        .env("AIPIPE_SEMANTIC__ENABLED", "false")
        .env("AIPIPE_BREAKER__ENABLED", "false")
        .env_remove("AIPIPE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["replayed"], 2000);
    assert_eq!(report["telemetry_rows"], 2000);
    assert_eq!(report["before"]["calls"], 2000);
    assert_close(&report["before"]["cost_usd"], before_cost);
    assert_close(&report["before"]["error_rate"], before_errors as f64 / 2000.0);
    assert_eq!(report["after"]["calls"], after_calls);
    assert_close(&report["after"]["cost_usd"], after_cost);
    assert_close(&report["after"]["error_rate"], after_errors as f64 / 2000.0);
    assert_close(&report["after"]["hit_rate"], hits as f64 / 2000.0);
}

/// The rows of a before/after table: from its header (`before`, `after`, `change`) through
/// `recovery (mean)`, trailing spaces trimmed.
fn table_rows(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    let start = lines.iter().position(|line| line.trim_start().starts_with("before")).expect("a table header");
    let end = lines.iter().position(|line| line.starts_with("recovery (mean)")).expect("a recovery row");
    lines[start..=end].iter().map(|line| (*line).to_owned()).collect()
}

#[test]
fn the_readme_quotes_the_sample_replay_as_it_runs_today() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_aipipe"))
            .arg("replay")
            .arg(root.join("examples/sample-log.jsonl"))
            .arg("--db")
            .arg(dir.path().join("replay.db"))
            .args(extra)
            .env_remove("AIPIPE_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let quoted = readme.split("```text\n").nth(1).and_then(|block| block.split("```").next()).unwrap();
    assert_eq!(
        table_rows(quoted),
        table_rows(&run(&[])),
        "README.md's table is not what `aipipe replay examples/sample-log.jsonl` prints: update the README"
    );
    // The JSON says the same, in the fields the README names.
    let report: Value = serde_json::from_str(&run(&["--json"])).unwrap();
    let after = &report["after"];
    for field in ["wrong_answers_served", "wrong_answers_estimated", "degraded", "degraded_rate", "p99_ms"] {
        assert!(after.get(field).is_some(), "`after.{field}` missing from --json: {after}");
    }
    let calls_row = table_rows(quoted).into_iter().find(|row| row.starts_with("AI calls")).unwrap();
    let numbers: Vec<&str> = calls_row.split_whitespace().collect();
    assert_eq!(
        (numbers[2], numbers[3]),
        (report["before"]["calls"].to_string().as_str(), after["calls"].to_string().as_str())
    );
}

#[test]
fn a_generated_log_knows_which_semantic_hits_were_wrong() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("generated.jsonl");
    // Repeats of the stand-in data's pairs: duplicates, and near misses that share most words.
    let mut args = xtask::gen_log::GenLogArgs::with_defaults(&log_path, 1500).unwrap();
    args.repeat_rate = 0.4;
    xtask::gen_log::gen_log(&args, &root.join("tests/fixtures/gen-data")).unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let calls: Vec<Value> = log.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    let meaning_of: std::collections::HashMap<&str, &str> = calls
        .iter()
        .filter_map(|call| {
            let text = call["input"]["text"].as_str().or(call["input"]["task"].as_str())?;
            Some((text, call["meaning"].as_str().unwrap()))
        })
        .collect();

    let out = Command::new(env!("CARGO_BIN_EXE_aipipe"))
        .arg("replay")
        .arg(&log_path)
        .arg("--db")
        .arg(dir.path().join("replay.db"))
        .arg("--json")
        .env_remove("AIPIPE_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let after = &report["after"];
    assert_eq!(after["wrong_answers_estimated"], false, "every line says what it means: {after}");
    // Worked out from the pairs the replay lists and the log's own meanings.
    let hits: Vec<&Value> =
        report["semantic_pairs"].as_array().unwrap().iter().filter(|pair| pair["source"] == "semantic").collect();
    assert!(!hits.is_empty(), "the stand-in data's duplicates are served: {after}");
    let wrong = hits
        .iter()
        .filter(|pair| {
            meaning_of[pair["text"].as_str().unwrap()] != meaning_of[pair["served_answer_of"].as_str().unwrap()]
        })
        .count();
    assert_eq!(after["semantic_hits"], hits.len());
    assert_close(&after["wrong_answers_served"], wrong as f64);
    assert_close(&after["semantic_precision"], 1.0 - wrong as f64 / hits.len() as f64);
}

#[test]
fn a_replay_run_again_onto_the_same_database_replaces_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let log: String = (0..5)
        .map(|n| {
            line(&format!("t{n}"), &format!("2026-07-03T09:0{n}:00Z"), "ws-a", &format!("ticket {n}"), OK_SMALL, 500)
                + "\n"
        })
        .collect();
    for run in 0..2 {
        let out = replay(log.as_bytes(), dir.path(), &["--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["telemetry_rows"], 5, "run {run}");
        if run == 1 {
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("replaced 5 rows"),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let rows = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = pipeline_core::telemetry::TelemetryStore::connect(dir.path().join("replay.db").to_str().unwrap())
            .await
            .unwrap();
        store.count().await.unwrap()
    });
    assert_eq!(rows, 5, "no second copy");
}

/// A replay under another routing policy: each model's calls, cost and latency before and after,
/// the calls answered by a model the log never asked marked estimated, and their cost at that
/// model's price.
#[test]
fn a_replay_under_another_routing_policy_reports_cost_per_model() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::read(root.join("examples/sample-log.jsonl")).unwrap();
    let routes = root.join("examples/routes-two-models.toml");
    let out = replay(&log, dir.path(), &["--json", "--config", routes.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let models: Vec<&Value> = report["models"].as_array().unwrap().iter().collect();
    let model = |name: &str| {
        *models.iter().find(|model| model["model"] == name).unwrap_or_else(|| panic!("{name}: {models:?}"))
    };
    // The log never called the cheap model: every answer it gave is estimated (its other
    // calls failed as logged, or a stand-in answered).
    let nano = model("gpt-4.1-nano");
    assert_eq!(nano["before"]["calls"], 0);
    let (calls, estimated) = (nano["after"]["calls"].as_u64().unwrap(), nano["after"]["estimated"].as_u64().unwrap());
    assert!(estimated > 0 && estimated + nano["after"]["errors"].as_u64().unwrap() <= calls, "{nano}");
    // The log's gpt-4o-mini calls all moved to one of the policy's two models.
    assert_eq!(model("gpt-4o-mini")["after"]["calls"], 0);
    assert!(model("gpt-4o")["after"]["calls"].as_u64().unwrap() > 0);
    let after_cost: f64 = models.iter().map(|model| model["after"]["cost_usd"].as_f64().unwrap()).sum();
    assert!((after_cost - report["after"]["cost_usd"].as_f64().unwrap()).abs() < 1e-9);

    // The table says the same, per model.
    let table = replay(&log, dir.path(), &["--config", routes.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("by model") && text.contains("gpt-4.1-nano"), "{text}");
}

/// A paraphrase whose logged answer is another label than the one its cached twin had: the
/// replay knows the hit was wrong from the log itself, and with `--audits` the audit of that
/// hit (answered with the call's logged answer) disagrees, and the cut says so.
#[test]
fn a_logged_answer_is_the_truth_a_semantic_hit_and_its_audit_are_held_to() {
    let dir = tempfile::tempdir().unwrap();
    let log = [
        line("t1", "2026-03-02T09:00:00Z", "ws", "I was charged twice", OK_SMALL, 400),
        // The same request in other words, which the model labelled otherwise that day.
        line("t2", "2026-03-02T09:05:00Z", "ws", "I was charged two times", OK_LARGE, 400),
    ]
    .join("\n");
    let out = replay(log.as_bytes(), dir.path(), &["--json", "--audits"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let after = &report["after"];
    assert_eq!(after["semantic_hits"], 1, "{after}");
    assert_eq!(after["wrong_answers_served"], 1.0, "{after}");
    assert_eq!(after["wrong_answers_estimated"], false, "{after}");
    let audits = &report["audits"];
    assert_eq!((audits["audits"].as_u64(), audits["disagreements"].as_u64()), (Some(1), Some(1)), "{audits}");
    assert!(audits["cost_usd"].as_f64().unwrap() > 0.0, "{audits}");
    let step =
        audits["cuts"].as_array().unwrap().iter().find(|cut| cut["step"] == "classifier" && cut["workspace"].is_null());
    let step = step.unwrap_or_else(|| panic!("no classifier cut: {audits}"));
    // One disagreement in one audit proves the offline cut wrong for this traffic.
    assert_eq!(step["cut"], "never", "{step}");
    assert_eq!(report["telemetry_rows"], 3, "two calls and the audit");
    let html = std::fs::read_to_string(dir.path().join("replay.html")).unwrap();
    assert!(html.contains("Audits of semantic hits") && html.contains("serves nothing"), "{html}");
}
