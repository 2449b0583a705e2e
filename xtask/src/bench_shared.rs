//! `cargo xtask bench shared`: what sharing state through Redis costs, against a Redis server
//! of its own on loopback (Debian's `redis-server`), on the shipped defaults with `[state]`
//! set. In the same run: one embedding (the bound a semantic lookup cannot beat), an exact hit
//! from this replica's own cache, and one replica against two.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use pipeline_core::{CallContext, CallOptions, Engine, Source, StepType};
use semantic_cache::{ConceptNormalizer, Embedder, Lookup, ModelPaths, SemanticCache};
use serde::Serialize;
use shared_state::{BucketAsk, FeedEntry, FeedPosition, SharedBuckets, SharedFeed, Store, StoreSettings};
use testkit::RedisServer;

use crate::bench::{PROMPTS, percentile_us};

/// Exact lookups and limiter decisions measured, after as many to warm up.
const SAMPLES: usize = 5_000;
/// Semantic lookups measured per index size (each embeds a text once).
const SEMANTIC_QUERIES: usize = 500;
const SEMANTIC_SIZES: [usize; 2] = [10_000, 100_000];

#[derive(Debug, Serialize)]
struct SharedFigure {
    name: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hit_rate: Option<f64>,
    /// A semantic lookup's p50 over one embedding's p50, in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    p50_over_embed_one: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests_per_second: Option<f64>,
    /// Two replicas' requests per second over one's, in the same run.
    #[serde(skip_serializing_if = "Option::is_none")]
    over_one_replica: Option<f64>,
}

impl SharedFigure {
    fn latency(name: &'static str, mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self {
            name,
            entries: None,
            p50_us: Some(percentile_us(&samples, 0.50)),
            p99_us: Some(percentile_us(&samples, 0.99)),
            hit_rate: None,
            p50_over_embed_one: None,
            requests_per_second: None,
            over_one_replica: None,
        }
    }

    fn throughput(name: &'static str, requests_per_second: f64, over_one_replica: Option<f64>) -> Self {
        Self {
            requests_per_second: Some(requests_per_second),
            over_one_replica,
            p50_us: None,
            p99_us: None,
            ..Self::latency(name, Vec::new())
        }
    }
}

pub fn bench_shared(json: bool, root: &Path) -> anyhow::Result<()> {
    let Some(redis) = RedisServer::start() else {
        bail!("bench shared needs Redis: install Debian's `redis-server` (apt-get install redis-server)");
    };
    let aipipe = crate::release_binary(root)?;
    let embedder = Arc::new(Embedder::load(&ModelPaths::installed(), 0)?.remembering(0));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut figures = Vec::new();

    let samples = (0..200)
        .map(|i| {
            let started = Instant::now();
            embedder.embed_one(PROMPTS[i % PROMPTS.len()]).map(|_| started.elapsed())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let embed_one = SharedFigure::latency("embed_one", samples);
    figures.push(embed_one);

    runtime.block_on(async {
        figures.extend(exact_lookups(&redis).await?);
        figures.push(limiter_decisions(&redis).await?);
        match crate::bench::real_sentences(&embedder, SEMANTIC_SIZES[1])? {
            Some(sentences) => {
                // The bound for these lookups: one embedding of the very questions they ask.
                let samples = (0..SEMANTIC_QUERIES)
                    .map(|n| {
                        let started = Instant::now();
                        embedder.embed_one(&sentences[query_index(n)].0).map(|_| started.elapsed())
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let questions = SharedFigure::latency("embed_one_question", samples);
                let question_p50 = questions.p50_us.unwrap_or(f64::NAN);
                figures.push(questions);
                for size in SEMANTIC_SIZES {
                    for mut figure in semantic_lookups(&redis, &embedder, &sentences[..size], size).await? {
                        figure.p50_over_embed_one = figure.p50_us.map(|p50| p50 / question_p50);
                        figures.push(figure);
                    }
                }
            }
            None => eprintln!("xtask: no data folder: the semantic figures are skipped"),
        }
        figures.extend(replicas_throughput(&aipipe, &redis).await?);
        anyhow::Ok(())
    })?;
    crate::record::record(root, "shared", &figures)?;
    for figure in &figures {
        if json {
            println!("{}", serde_json::to_string(figure)?);
        } else {
            println!("{}", serde_json::to_string(figure)?.replace(['{', '}', '"'], "").replace(',', "  "));
        }
    }
    Ok(())
}

/// `[state]` on the shipped defaults but for the URL (and a prefix of the figure's own).
fn state_config(redis: &RedisServer, prefix: &str) -> String {
    format!("[state]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n", redis.url())
}

async fn classify(engine: &Engine, text: &str) -> anyhow::Result<(Duration, Source)> {
    let input = serde_json::json!({"text": text, "labels": ["billing", "bug", "other"]});
    let started = Instant::now();
    let result =
        engine.execute(StepType::CLASSIFIER, input, CallContext::new("bench", "bench"), CallOptions::default()).await?;
    Ok((started.elapsed(), result.source))
}

/// One replica stores answers; another, whose own cache is empty, finds them in Redis (and
/// then in its own cache, the comparison).
async fn exact_lookups(redis: &RedisServer) -> anyhow::Result<Vec<SharedFigure>> {
    let config = format!("[semantic]\nenabled = false\n{}", state_config(redis, "bench-exact"));
    let writer = crate::bench::bench_engine_with(&config).await?;
    let reader = crate::bench::bench_engine_with(&config).await?;
    let texts: Vec<String> =
        (0..2 * SAMPLES).map(|n| format!("{} (shared, case {n})", PROMPTS[n % PROMPTS.len()])).collect();
    for text in &texts {
        classify(&writer, text).await?;
    }
    let (mut shared, mut local) = (Vec::with_capacity(SAMPLES), Vec::with_capacity(SAMPLES));
    for (n, text) in texts.iter().enumerate() {
        let (took, source) = classify(&reader, text).await?;
        if source != Source::ExactCache {
            bail!("the reader did not find `{text}` in Redis ({source:?}): is Redis up?");
        }
        if n >= SAMPLES {
            shared.push(took);
        }
    }
    for text in &texts[SAMPLES..] {
        local.push(classify(&reader, text).await?.0);
    }
    writer.shutdown().await?;
    reader.shutdown().await?;
    Ok(vec![SharedFigure::latency("exact_hit_through_redis", shared), SharedFigure::latency("exact_hit_local", local)])
}

/// A call's limiter decision: its workspace's and its model's requests and tokens, in one
/// script, with limits generous enough that every decision takes.
async fn limiter_decisions(redis: &RedisServer) -> anyhow::Result<SharedFigure> {
    let shipped = pipeline_core::Config::from_toml(&state_config(redis, "bench-limits"))?;
    let settings: StoreSettings = shipped.state.redis.context("[state] redis_url is set")?;
    let buckets = SharedBuckets::new(Store::connect("redis", settings)?);
    let ask = |bucket: &str, amount: f64| BucketAsk {
        bucket: bucket.to_owned(),
        per_minute: 4_000_000_000,
        burst: 1_000_000_000,
        amount,
    };
    let asks = [
        ask("workspace_requests:bench", 1.0),
        ask("model_requests:openai/gpt-4o-mini", 1.0),
        ask("workspace_tokens:bench", 600.0),
        ask("model_tokens:openai/gpt-4o-mini", 600.0),
    ];
    let mut samples = Vec::with_capacity(SAMPLES);
    for n in 0..2 * SAMPLES {
        let started = Instant::now();
        let taken = buckets.take(&asks).await?;
        let took = started.elapsed();
        if taken != shared_state::Take::Taken {
            bail!("a limiter decision with room to spare was refused: {taken:?}");
        }
        if n >= SAMPLES {
            samples.push(took);
        }
    }
    Ok(SharedFigure::latency("limiter_decision_through_redis", samples))
}

/// `size` entries in the shared store, followed into a fresh replica's index, then asked
/// through that replica's engine with stored questions (each embedded anew, then searched and
/// verified): the whole call a replica makes for an entry another replica stored. Beside it,
/// the lookup alone (embedding, search, verifier) on an index read from the same stream.
///
/// One default changes: `semantic.max_entries`, 10,000 as shipped, is raised to hold the
/// largest index measured (a 100k figure needs room for 100k entries).
async fn semantic_lookups(
    redis: &RedisServer,
    embedder: &Arc<Embedder>,
    sentences: &[(String, Vec<f32>)],
    size: usize,
) -> anyhow::Result<Vec<SharedFigure>> {
    let prefix = format!("bench-semantic-{size}");
    let config = format!("[semantic]\nmax_entries = {}\n{}", 2 * size, state_config(redis, &prefix));
    // The namespace and answer of a classifier call, as the writer's engine shares them.
    let writer = semantic_engine(&config, embedder).await?;
    classify(&writer, "a question whose entry shows the namespace").await?;
    let settings = pipeline_core::Config::from_toml(&config)?.state.semantic.context("[state] is set")?;
    let feed = SharedFeed::new(Store::connect("semantic_store", settings)?, 2 * size as u64);
    let (mut entries, _) = feed.read_after(&FeedPosition::start(), 1).await?;
    let template = entries.pop().context("the writer's entry is not in the feed")?;
    writer.shutdown().await?;
    for (text, vector) in sentences {
        let entry = FeedEntry {
            origin: 0,
            text: text.clone(),
            vector: vector.clone(),
            stored_at: SystemTime::now(),
            ..template.clone()
        };
        feed.publish(&entry).await?;
    }
    let reader = semantic_engine(&config, embedder).await?;
    let started = Instant::now();
    while reader.cache_entries().1.unwrap_or(0) < size as u64 {
        if started.elapsed() > Duration::from_secs(1800) {
            bail!("the replica followed only {:?} of {size} entries in 30 min", reader.cache_entries().1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("xtask: a replica followed {size} shared entries in {:.1} s", started.elapsed().as_secs_f64());
    let mut samples = Vec::with_capacity(SEMANTIC_QUERIES);
    let mut hits = 0;
    for n in 0..SEMANTIC_QUERIES {
        let (text, _) = &sentences[query_index(n)];
        let (took, source) = classify(&reader, text).await?;
        hits += usize::from(source == Source::SemanticCache);
        samples.push(took);
    }
    reader.shutdown().await?;
    let small = size == SEMANTIC_SIZES[0];
    let mut call =
        SharedFigure::latency(if small { "semantic_hit_call_10k" } else { "semantic_hit_call_100k" }, samples);
    call.entries = Some(size);
    call.hit_rate = Some(hits as f64 / SEMANTIC_QUERIES as f64);

    // The lookup alone, on an index read from the stream as a replica reads it.
    let cache = SemanticCache::new(
        embedder.clone(),
        ConceptNormalizer::default(),
        crate::bench::shipped_settings(2 * size as u64)?,
    );
    let mut position = FeedPosition::start();
    loop {
        let (entries, next) = feed.read_after(&position, 1000).await?;
        if entries.is_empty() {
            break;
        }
        position = next;
        for entry in entries {
            let query = cache.prepare_embedded(&entry.text, entry.vector);
            cache.insert(&entry.namespace, query, entry.answer, entry.stored_at);
        }
    }
    let (mut samples, mut hits) = (Vec::with_capacity(SEMANTIC_QUERIES), 0);
    for n in 0..SEMANTIC_QUERIES {
        let (text, _) = &sentences[query_index(n)];
        let started = Instant::now();
        let query = cache.prepare(text)?;
        let found = cache.lookup(&template.namespace, &query, None, None, SystemTime::now());
        samples.push(started.elapsed());
        hits += usize::from(matches!(found, Lookup::Hit(_)));
    }
    let mut lookup = SharedFigure::latency(if small { "semantic_lookup_10k" } else { "semantic_lookup_100k" }, samples);
    lookup.entries = Some(size);
    lookup.hit_rate = Some(hits as f64 / SEMANTIC_QUERIES as f64);
    Ok(vec![lookup, call])
}

/// The stored question the `n`th semantic query asks again: the same questions at every size
/// (all among the first 10k entries), so that sizes differ only in the index.
fn query_index(n: usize) -> usize {
    (n * 7919) % SEMANTIC_SIZES[0]
}

async fn semantic_engine(config: &str, embedder: &Arc<Embedder>) -> anyhow::Result<Engine> {
    crate::bench::bench_engine_built(config, Some(embedder.clone())).await
}

/// Closed-loop requests per second through one replica and through two (load spread over
/// both), each with Redis, against the same loopback upstream.
async fn replicas_throughput(aipipe: &Path, redis: &RedisServer) -> anyhow::Result<Vec<SharedFigure>> {
    use crate::bench_gateway::{closed_loop, closed_loop_rounds, median, median_ratio, start_gateway, start_upstream};
    let upstream = format!("http://{}/v1", start_upstream().await?);
    let dirs = [tempfile::tempdir()?, tempfile::tempdir()?, tempfile::tempdir()?];
    let one = start_gateway(aipipe, dirs[0].path(), &upstream, &state_config(redis, "bench-one"))?;
    let two = format!("{}replicas = 2\n", state_config(redis, "bench-two"));
    let pair = [
        start_gateway(aipipe, dirs[1].path(), &upstream, &two)?,
        start_gateway(aipipe, dirs[2].path(), &upstream, &two)?,
    ];
    let client = reqwest::Client::builder().pool_max_idle_per_host(32).build()?;
    let counter = Arc::new(AtomicUsize::new(0));
    let one_url = [format!("{}/chat/completions", one.base_url)];
    let pair_urls: Vec<String> = pair.iter().map(|gateway| format!("{}/chat/completions", gateway.base_url)).collect();
    closed_loop(&client, &one_url, &counter).await?;
    let [one_rps, pair_rps] = closed_loop_rounds(&client, [&one_url, &pair_urls], &counter).await?;
    let over_one = median_ratio(&pair_rps, &one_rps);
    Ok(vec![
        SharedFigure::throughput("one_replica", median(one_rps), None),
        SharedFigure::throughput("two_replicas", median(pair_rps), Some(over_one)),
    ])
}
