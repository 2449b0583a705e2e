//! `GET /status` opened in headless Chromium (Debian's package) after some traffic: the page
//! a browser renders shows the figures the telemetry store reports for the same window.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use pipeline_core::telemetry::TelemetryStore;
use serde_json::json;
use testkit::{GatewayProcess, Reply, ScriptedUpstream};

const KEY: &str = "sk-aipipe-test-status";

/// Debian's Chromium, or `None` outside CI when it is missing.
#[allow(clippy::panic)]
fn chromium() -> Option<&'static str> {
    if Command::new("chromium").arg("--version").output().is_ok_and(|output| output.status.success()) {
        return Some("chromium");
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but chromium is not installed: `.ci/run` installs Debian's chromium");
    }
    eprintln!("chromium is not installed: this test is skipped");
    None
}

/// Chromium headless, as a person's browser would load the page, with what it was told to do
/// (`--dump-dom` prints the rendered page).
fn browse(chromium: &str, profile: &Path, action: &[&str], url: &str) -> String {
    let output = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(action)
        .arg(url)
        .output()
        .unwrap();
    assert!(output.status.success(), "chromium: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// The text of the element with `id`.
fn text_of<'a>(page: &'a str, id: &str) -> &'a str {
    let start = page.find(&format!("id=\"{id}\">")).unwrap_or_else(|| panic!("no #{id} in the page")) + id.len() + 6;
    &page[start..start + page[start..].find('<').unwrap()]
}

fn attribute(page: &str, name: &str) -> i64 {
    let start = page.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
    page[start..start + page[start..].find('"').unwrap()].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_browser_shows_what_the_telemetry_store_reports() {
    let Some(chromium) = chromium() else { return };
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|request| {
        let question = request["messages"][0]["content"].as_str().unwrap_or_default();
        if question.contains("broken") {
            Reply::bad_request("this request cannot be answered")
        } else {
            Reply::completion_with_usage(format!("answer to {question}"), 200, 40)
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("telemetry.db");
    let config = format!(
        "[semantic]\nenabled = false\n[telemetry]\ndatabase_url = \"sqlite://{}\"\n\
         [gateway]\ntrust_loopback = true\n[gateway.api_keys]\nteam-a = \"STATUS_TEST_KEY\"\n",
        database.display()
    );
    let env = [("STATUS_TEST_KEY", KEY), ("OPENAI_API_KEY", "sk-upstream")];
    let binary = Path::new(env!("CARGO_BIN_EXE_aipipe"));
    let gateway = GatewayProcess::start(binary, dir.path(), &upstream.base_url(), &config, &env).unwrap();
    let http = reqwest::Client::new();
    // Four questions asked upstream, two asked again (exact hits), one the upstream refuses.
    let questions = ["refund?", "invoice?", "refund?", "shipping?", "invoice?", "warranty?", "broken request"];
    for question in questions {
        let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": question}]});
        gateway.chat(&http, KEY, &body).send().await.unwrap();
    }
    // Rows are written off the call path: wait until all are in.
    let store = TelemetryStore::connect(&format!("sqlite://{}", database.display())).await.unwrap();
    let started = Instant::now();
    while store.count().await.unwrap() < questions.len() as i64 {
        assert!(started.elapsed() < Duration::from_secs(10), "the rows were never written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let url = format!("{}/status", gateway.base_url.trim_end_matches("/v1"));
    let profile = dir.path().join("chromium");
    let page = browse(chromium, &profile, &["--dump-dom"], &url);
    let report = store.report(attribute(&page, "data-from-ms"), attribute(&page, "data-to-ms")).await.unwrap();
    let overall = &report.overall;
    assert_eq!(overall.calls, questions.len() as u64);
    assert_eq!(text_of(&page, "calls"), overall.calls.to_string());
    assert_eq!(text_of(&page, "hit-rate"), format!("{:.1}%", overall.cache_hit_rate * 100.0));
    assert_eq!(text_of(&page, "hit-rate"), "28.6%", "2 exact hits of 7 calls");
    assert_eq!(text_of(&page, "error-rate"), format!("{:.1}%", overall.error_rate * 100.0));
    assert_eq!(text_of(&page, "cost"), format!("{:.6}", overall.cost_usd));
    assert_eq!(text_of(&page, "saved-cost"), format!("{:.6}", overall.saved_cost_usd));
    assert!(overall.saved_cost_usd > 0.0);
    assert_eq!(text_of(&page, "p50"), format!("{:.0}", overall.p50_latency_ms));
    assert_eq!(text_of(&page, "p99"), format!("{:.0}", overall.p99_latency_ms));
    assert_eq!(text_of(&page, "upstream-requests"), overall.upstream_requests.to_string());
    // The breaker of the model asked, and the chart's bars by source.
    assert!(page.contains("openai/gpt-4o-mini") && page.contains("class=\"closed\""), "{page}");
    assert!(page.contains("<rect") && page.contains("exact"), "{page}");

    // What a person sees: a screenshot (described in the README).
    let screenshot = dir.path().join("status.png");
    browse(chromium, &profile, &[&format!("--screenshot={}", screenshot.display()), "--window-size=1100,1300"], &url);
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    if let Ok(keep) = std::env::var("STATUS_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
}
