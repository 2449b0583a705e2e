//! `/metrics` as a real Prometheus reads it: `promtool check metrics` accepts the text, a
//! Prometheus server (Debian's package) scrapes the gateway, and a counter, a histogram and
//! every query of the shipped Grafana dashboard come back through its HTTP API.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::{GatewayProcess, Reply, ScriptedUpstream, Streamed};

const KEY: &str = "sk-aipipe-test-prometheus";

/// `prometheus` and `promtool` (Debian's package), or `None` outside CI when missing.
#[allow(clippy::panic)]
fn installed() -> bool {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but promtool is not installed: `.ci/run` installs Debian's prometheus");
    }
    eprintln!("prometheus is not installed: this test is skipped");
    false
}

struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    /// A server scraping `target` (`host:port`) every second, storing in `dir`.
    fn start(dir: &Path, target: &str) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: aipipe\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Self { child, url: format!("http://127.0.0.1:{port}") }
    }

    /// The result vector of an instant query (the query must succeed).
    async fn query(&self, http: &reqwest::Client, promql: &str) -> Vec<Value> {
        let response = http.get(format!("{}/api/v1/query", self.url)).query(&[("query", promql)]).send().await;
        let body: Value = response.unwrap().json().await.unwrap();
        assert_eq!(body["status"], "success", "{promql}: {body}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// A query's single value, once Prometheus has scraped enough for it to have one.
    async fn value(&self, http: &reqwest::Client, promql: &str) -> f64 {
        let started = Instant::now();
        loop {
            if let Ok(response) =
                http.get(format!("{}/api/v1/query", self.url)).query(&[("query", promql)]).send().await
                && let Ok(body) = response.json::<Value>().await
                && let Some(value) = body["data"]["result"][0]["value"][1].as_str()
            {
                return value.parse().unwrap();
            }
            assert!(started.elapsed() < Duration::from_secs(60), "Prometheus never answered `{promql}`");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway_and_the_dashboard_queries_run() {
    if !installed() {
        return;
    }
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|request| {
        if request["stream"] == true {
            Reply::Streamed(Streamed::text(&["Par", "is."], Duration::from_millis(5)))
        } else {
            Reply::completion_with_usage("Paris.", 20, 3)
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[semantic]\nenabled = false\n[telemetry]\ndatabase_url = \"sqlite://{}\"\n\
         [gateway]\nadmin_listen = \"127.0.0.1:0\"\n[gateway.api_keys]\nteam-a = \"PROMETHEUS_TEST_KEY\"\n",
        dir.path().join("telemetry.db").display()
    );
    let env = [("PROMETHEUS_TEST_KEY", KEY), ("OPENAI_API_KEY", "sk-upstream")];
    let binary = Path::new(env!("CARGO_BIN_EXE_aipipe"));
    let gateway = GatewayProcess::start(binary, dir.path(), &upstream.base_url(), &config, &env).unwrap();
    let http = reqwest::Client::new();
    // Three calls to the upstream (one streamed), two exact hits.
    for (question, stream) in
        [("Capital of France?", false), ("Capital of France?", false), ("Capital of Italy?", true)]
    {
        let body = json!({"model": "gpt-4o-mini", "stream": stream,
            "messages": [{"role": "user", "content": question}]});
        let response = gateway.chat(&http, KEY, &body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap();
    }
    // On the admin listener, as a Prometheus scrape config names it; not on the API's.
    let root = gateway.admin_url.clone().expect("an admin listener");
    let api_root = gateway.base_url.trim_end_matches("/v1");
    assert_eq!(http.get(format!("{api_root}/metrics")).send().await.unwrap().status(), 404);

    // promtool's lint: names, units, help texts, histogram buckets.
    let metrics = http.get(format!("{root}/metrics")).send().await.unwrap().text().await.unwrap();
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(checked.status.success(), "promtool: {}\n{metrics}", String::from_utf8_lossy(&checked.stdout));

    // A real scrape, then a counter and a histogram back through the query API.
    let prometheus = Prometheus::start(dir.path(), root.trim_start_matches("http://"));
    let calls = prometheus.value(&http, "sum(aipipe_requests_total)").await;
    assert_eq!(calls, 3.0);
    let exact = prometheus.value(&http, "sum(aipipe_requests_total{source=\"exact\"})").await;
    assert_eq!(exact, 1.0);
    let observed = prometheus.value(&http, "sum(aipipe_request_duration_seconds_count)").await;
    assert_eq!(observed, 3.0);
    let under_30s = prometheus.value(&http, "sum(aipipe_request_duration_seconds_bucket{le=\"30\"})").await;
    assert_eq!(under_30s, 3.0);
    let streamed = prometheus.value(&http, "sum(aipipe_time_to_first_token_seconds_count)").await;
    assert_eq!(streamed, 1.0);

    // Every query of the shipped dashboard is one Prometheus accepts.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string("docs/grafana-dashboard.json").unwrap()).unwrap();
    let queries: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap())
        .map(|target| target["expr"].as_str().unwrap())
        .collect();
    assert!(queries.len() >= 10);
    for query in queries {
        prometheus.query(&http, query).await;
    }
}
