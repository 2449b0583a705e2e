//! Two `aipipe serve` replicas sharing one Redis and one PostgreSQL, the way a team runs them
//! behind a load balancer: what one stores the other serves, a limit holds for both together,
//! Redis going away degrades them instead of stopping them, and a replica killed under load
//! takes nothing of the other's with it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeline_core::telemetry::TelemetryStore;
use serde_json::json;
use testkit::{GatewayProcess, RedisServer, Reply, ScriptedUpstream, fresh_postgres};

const KEY: &str = "sk-aipipe-test-replicas";
/// The workspace limit, scaled down: 100 requests per 3 s stands for 100 per minute, so that
/// "a minute at twice the rate" takes 3 s. A burst of 3 keeps the bucket from starting with a
/// minute's worth (each replica's share of it, while Redis is away, is 2).
const LIMIT_WINDOW: Duration = Duration::from_secs(3);
const LIMIT: u32 = 100;

struct Replica {
    process: GatewayProcess,
    log: PathBuf,
    http: reqwest::Client,
}

impl Replica {
    fn start(dir: &Path, upstream: &ScriptedUpstream, redis: &str, postgres: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let per_minute = u64::from(LIMIT) * 60 / LIMIT_WINDOW.as_secs();
        // Audits off: an audit of B's semantic hit would be an upstream request of its own,
        // while this test counts the requests that sharing saves (the audits' tests are theirs).
        let config = format!(
            "[state]\nredis_url = \"{redis}\"\nreplicas = 2\nretry_ms = 300\n\
             [telemetry]\ndatabase_url = \"{postgres}\"\n\
             [limits]\nmax_wait_ms = 0\nworkspace_requests_per_minute = {per_minute}\nworkspace_request_burst = 3\n\
             [semantic]\nmax_wrong_rate = 0\n\
             [steps.chat]\nsemantic_field = \"messages\"\n\
             [gateway]\ntrust_loopback = true\n[gateway.api_keys]\nteam-a = \"REPLICA_TEST_KEY\"\n"
        );
        let log = dir.join("serve.log");
        let env = [("REPLICA_TEST_KEY", KEY), ("OPENAI_API_KEY", "sk-upstream"), ("RUST_LOG", "warn")];
        let binary = Path::new(env!("CARGO_BIN_EXE_aipipe"));
        let process = GatewayProcess::start_logging(binary, dir, &upstream.base_url(), &config, &env, &log).unwrap();
        Self { process, log, http: reqwest::Client::new() }
    }

    async fn ask(&self, question: &str, cache: &str) -> reqwest::Response {
        self.try_ask(question, cache).await.unwrap()
    }

    /// `None` when the replica cannot be reached (it was killed).
    async fn try_ask(&self, question: &str, cache: &str) -> Option<reqwest::Response> {
        let body = json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "You answer support questions."},
            {"role": "user", "content": question}]});
        self.process.chat(&self.http, KEY, &body).header("x-aipipe-cache", cache).send().await.ok()
    }

    /// The source that answered, and the trace id, of an answered question.
    async fn answered(&self, question: &str) -> (String, String) {
        let response = self.ask(question, "use").await;
        assert_eq!(response.status(), 200, "{question}: {}", response.text().await.unwrap());
        let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
        (header("x-aipipe-source"), header("x-aipipe-trace-id"))
    }

    async fn ready(&self) -> String {
        let root = self.process.base_url.trim_end_matches("/v1");
        self.http.get(format!("{root}/readyz")).send().await.unwrap().text().await.unwrap()
    }

    async fn metrics(&self) -> String {
        let root = self.process.base_url.trim_end_matches("/v1");
        self.http.get(format!("{root}/metrics")).send().await.unwrap().text().await.unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Twice the limit's rate for one scaled minute, alternating between the replicas, with the
/// cache skipped so that every request meets the limit. Returns the requests each replica let
/// through of those sent within the window (a request that a busy machine sent late is not
/// counted against the minute).
async fn drive_at_twice_the_limit(replicas: [&Arc<Replica>; 2]) -> [u32; 2] {
    let requests = 2 * LIMIT;
    let gap = LIMIT_WINDOW / requests;
    let started = tokio::time::Instant::now();
    let mut sent = Vec::new();
    for index in 0..requests {
        tokio::time::sleep_until(started + gap * index).await;
        let replica = replicas[index as usize % 2].clone();
        sent.push(tokio::spawn(async move {
            let sent_at = started.elapsed();
            let status = replica.ask(&format!("limit probe {index}"), "skip").await.status().as_u16();
            assert!(status == 200 || status == 429, "unexpected status {status}");
            (sent_at, status == 200)
        }));
    }
    let (mut through, mut late) = ([0, 0], 0);
    for (index, answer) in sent.into_iter().enumerate() {
        let (sent_at, passed) = answer.await.unwrap();
        if sent_at < LIMIT_WINDOW {
            through[index % 2] += u32::from(passed);
        } else {
            late += 1;
        }
    }
    eprintln!("{requests} requests in {LIMIT_WINDOW:?} ({late} sent late): {through:?} went through A and B");
    through
}

/// Until both replicas use Redis again: each call probes it once its retry time has passed.
async fn until_both_use_redis(a: &Replica, b: &Replica) {
    let started = Instant::now();
    for round in 0.. {
        a.answered(&format!("warm-up call {round} through A")).await;
        b.answered(&format!("warm-up call {round} through B")).await;
        if !a.ready().await.contains("degraded") && !b.ready().await.contains("degraded") {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the replicas did not go back to Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_caches_and_limits_and_survive_redis_and_each_other() {
    let Some(mut redis) = RedisServer::start() else { return };
    let Some(postgres) = fresh_postgres().await else { return };
    let upstream = ScriptedUpstream::start().await.unwrap();
    upstream.respond_with(|request| {
        let question = request["messages"][1]["content"].as_str().unwrap_or_default();
        Reply::completion_with_usage(format!("answer to: {question}"), 20, 5)
    });
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(Replica::start(&dir.path().join("a"), &upstream, &redis.url(), &postgres));
    let b = Arc::new(Replica::start(&dir.path().join("b"), &upstream, &redis.url(), &postgres));

    // 1. What A answered, B serves: the same question from the shared exact cache, a
    //    paraphrase from the semantic entries B followed into its own index.
    assert_eq!(a.answered("I was charged twice").await.0, "upstream");
    let asked = upstream.requests();
    assert_eq!(b.answered("I was charged twice").await.0, "exact");
    // B follows the entries A stored (every 100 ms): once it holds A's, the paraphrase hits.
    let started = Instant::now();
    while !b.metrics().await.contains("aipipe_cache_entries{cache=\"semantic\"} 1") {
        assert!(started.elapsed() < Duration::from_secs(10), "B never followed A's semantic entry");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.answered("I was charged two times").await.0, "semantic");
    assert_eq!(upstream.requests(), asked, "B asked the upstream for what A had answered");

    // 2. The workspace's limit holds for the two together.
    let through = drive_at_twice_the_limit([&a, &b]).await;
    let total = through[0] + through[1];
    assert!(total.abs_diff(LIMIT) <= 5, "{total} went through ({through:?}) for a limit of {LIMIT}");

    // 3. Redis gone: both answer (misses), each holds half the limit, and says so.
    redis.stop();
    tokio::time::sleep(LIMIT_WINDOW).await;
    assert_eq!(a.answered("Where is my parcel?").await.0, "upstream");
    assert_eq!(b.answered("Where is my parcel?").await.0, "upstream", "no shared cache while Redis is down");
    let through = drive_at_twice_the_limit([&a, &b]).await;
    for (replica, through) in ["A", "B"].into_iter().zip(through) {
        assert!(through.abs_diff(LIMIT / 2) <= 5, "replica {replica} let {through} through alone, not about half");
    }
    for replica in [&a, &b] {
        assert!(replica.ready().await.contains("degraded: redis"), "{}", replica.ready().await);
        assert!(replica.metrics().await.contains("aipipe_shared_state_up{part=\"redis\"} 0"));
        assert!(replica.log().contains("shared state unreachable"), "{}", replica.log());
    }

    // 4. Redis back: both use it again, without a restart.
    redis.restart();
    until_both_use_redis(&a, &b).await;
    assert_eq!(a.answered("How do I reset my password?").await.0, "upstream");
    assert_eq!(b.answered("How do I reset my password?").await.0, "exact");
    assert!(a.log().contains("shared state is back"), "{}", a.log());
    tokio::time::sleep(LIMIT_WINDOW).await;
    let through = drive_at_twice_the_limit([&a, &b]).await;
    let total = through[0] + through[1];
    assert!(total.abs_diff(LIMIT) <= 5, "after Redis came back, {total} went through ({through:?})");

    // 5. A killed (-9) under load: what A stored before is still served through B, and every
    //    call B answered has its telemetry row.
    tokio::time::sleep(LIMIT_WINDOW).await;
    let load = |replica: Arc<Replica>, name: &'static str| {
        tokio::spawn(async move {
            let mut answered = Vec::new();
            for index in 0..40 {
                let question = format!("order {index} via {name}: when does it ship?");
                let Some(response) = replica.try_ask(&question, "use").await else { break };
                if response.status() == 200 {
                    let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
                    answered.push((question, header("x-aipipe-trace-id"), header("x-aipipe-source")));
                }
            }
            answered
        })
    };
    let on_a = load(a.clone(), "A");
    let on_b = load(b.clone(), "B");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a_pid = a.process.pid();
    assert!(std::process::Command::new("kill").args(["-9", &a_pid.to_string()]).status().unwrap().success());
    // A's load ends at its first call that cannot connect.
    let answered_by_a = on_a.await.unwrap();
    let answered_by_b = on_b.await.unwrap();
    assert!(!answered_by_b.is_empty());
    let asked = upstream.requests();
    // Only an upstream answer is stored: the workspace's limit turned some calls into
    // stand-ins, which never are.
    let stored_by_a: Vec<&String> =
        answered_by_a.iter().filter(|(_, _, source)| source == "upstream").map(|(question, _, _)| question).collect();
    assert!(!stored_by_a.is_empty());
    for question in stored_by_a {
        assert_eq!(b.answered(question).await.0, "exact", "{question} was stored through A before the kill");
    }
    assert_eq!(upstream.requests(), asked);

    let mut b = Arc::into_inner(b).expect("no load task holds B any more");
    b.process.terminate().unwrap();
    assert!(b.process.wait().unwrap().success());
    let store = TelemetryStore::connect(&postgres).await.unwrap();
    let traces: std::collections::HashSet<String> =
        store.records().await.unwrap().into_iter().map(|record| record.trace_id).collect();
    for (question, trace, _) in &answered_by_b {
        assert!(traces.contains(trace), "no telemetry row for {question} answered by B");
    }
}
