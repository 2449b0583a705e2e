//! `cargo xtask gen-log`: a seed-like call log built from real text (`../shared/data`): arena
//! prompts and Quora questions as the calls' texts, spread over components and workspaces
//! through a day, with 429 bursts, timeouts and an outage. Repeats are word for word, or the
//! other question of a Quora pair from the test split (never what the verifier was trained on):
//! a duplicate (label 1), which the semantic cache should serve, or a near miss (label 0, most
//! words shared), which it must not. Every line says what its text means (`meaning`), so that a
//! replay counts the wrong answers it served. The log is written where asked, never into the
//! repository: the data's terms do not allow copying it there.

use std::collections::HashMap;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};

#[derive(Debug, Clone, clap::Args)]
pub struct GenLogArgs {
    /// Where the log goes.
    #[arg(long, default_value = "target/generated-log.jsonl")]
    pub out: PathBuf,
    /// Calls in the log, spread over one day.
    #[arg(long, default_value_t = 5_000)]
    pub calls: usize,
    /// Share of calls that repeat an earlier request of the last hour: half word for word,
    /// half as the other question of its Quora pair (a duplicate or a near miss).
    #[arg(long, default_value_t = 0.18)]
    pub repeat_rate: f64,
    /// Share of calls answered 429 with Retry-After, arriving in bursts.
    #[arg(long, default_value_t = 0.06)]
    pub rate_limited: f64,
    /// Share of calls that time out.
    #[arg(long, default_value_t = 0.007)]
    pub timeouts: f64,
    /// Minutes of a provider outage (every call answered 503), in the afternoon.
    #[arg(long, default_value_t = 12)]
    pub outage_minutes: u64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

impl GenLogArgs {
    /// The command line's defaults, for `calls` calls written to `out`.
    pub fn with_defaults(out: &Path, calls: usize) -> anyhow::Result<Self> {
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: GenLogArgs,
        }
        let calls = calls.to_string();
        let out = out.to_string_lossy();
        let command = <Command as clap::Parser>::try_parse_from(["gen-log", "--calls", &calls, "--out", &out])?;
        Ok(command.args)
    }
}

/// The application's components: (component, step).
const COMPONENTS: &[(&str, &str)] = &[
    ("ticket-classifier", "classifier"),
    ("lead-validator", "validator"),
    ("content-enhancer", "enhancer"),
    ("task-prioritizer", "prioritizer"),
    ("report-summarizer", "summarizer"),
    ("contact-extractor", "extractor"),
    ("faq-router", "classifier"),
    ("copy-checker", "validator"),
];
const WORKSPACES: &[&str] = &["acme-corp", "globex", "initech"];
const LABELS: &[&str] = &["billing", "bug", "feature_request", "account", "other"];
const DAY_START_MS: i64 = 1_783_065_600_000; // 2026-07-03T00:00:00Z

/// xorshift64*: deterministic for a seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Texts {
    prompts: Vec<String>,
    questions: Vec<String>,
    /// Quora pairs labelled as the same question.
    duplicates: Vec<(String, String)>,
    /// Quora pairs labelled as different questions that share most of their words: what a
    /// semantic cache must not confuse.
    near_misses: Vec<(String, String)>,
}

/// Pairs of words in common, over all the words of both (lower case, letters and digits).
fn word_overlap(a: &str, b: &str) -> f64 {
    let words = |text: &str| -> std::collections::BTreeSet<String> {
        text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
    };
    let (a, b) = (words(a), words(b));
    let union = a.union(&b).count();
    if union == 0 { 0.0 } else { a.intersection(&b).count() as f64 / union as f64 }
}

/// A label-0 pair sharing at least this share of its words is a near miss.
const NEAR_MISS_OVERLAP: f64 = 0.5;

/// The other question of a fresh call's Quora pair, and whether it asks the same.
#[derive(Debug, Clone)]
struct Twin {
    text: String,
    same: bool,
}

/// What each text means: texts with the same id ask the same thing.
#[derive(Default)]
struct Meanings(HashMap<String, String>);

impl Meanings {
    fn of(&mut self, text: &str) -> String {
        let next = format!("m{}", self.0.len());
        self.0.entry(text.to_owned()).or_insert(next).clone()
    }

    /// The meaning a twin would have, unless its text already stands for something that
    /// contradicts its label (the same question used apart with another meaning).
    fn of_twin(&mut self, original: &str, twin: &Twin) -> Option<String> {
        let original = self.of(original);
        match self.0.get(&twin.text) {
            Some(meaning) if (meaning == &original) == twin.same => Some(meaning.clone()),
            Some(_) => None,
            None if twin.same => Some(self.0.entry(twin.text.clone()).or_insert(original).clone()),
            None => Some(self.of(&twin.text)),
        }
    }
}

fn read_jsonl(path: &Path, mut keep: impl FnMut(Value)) -> anyhow::Result<()> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open `{}`", path.display()))?;
    for line in BufReader::new(file).lines() {
        if let Ok(value) = serde_json::from_str(&line?) {
            keep(value);
        }
    }
    Ok(())
}

fn texts(data: &Path) -> anyhow::Result<Texts> {
    let mut texts =
        Texts { prompts: Vec::new(), questions: Vec::new(), duplicates: Vec::new(), near_misses: Vec::new() };
    for file in ["arena-hard-v0.1.jsonl", "arena-hard-v2.0.jsonl"] {
        read_jsonl(&data.join("prompts").join(file), |value| {
            if let Some(prompt) = value["prompt"].as_str() {
                // Long prompts stay long, within the engine's default prompt limit.
                texts.prompts.push(prompt.chars().take(6_000).collect());
            }
        })?;
    }
    // The test split: the learned verifier was trained on the dev split only.
    read_jsonl(&data.join("pairs").join("qqp-test.jsonl"), |value| {
        let (Some(a), Some(b)) = (value["a"].as_str(), value["b"].as_str()) else { return };
        if value["label"] == 1 {
            texts.duplicates.push((a.to_owned(), b.to_owned()));
        } else if word_overlap(a, b) >= NEAR_MISS_OVERLAP {
            texts.near_misses.push((a.to_owned(), b.to_owned()));
        } else {
            texts.questions.push(a.to_owned());
        }
    })?;
    anyhow::ensure!(
        !texts.prompts.is_empty()
            && !texts.questions.is_empty()
            && !texts.duplicates.is_empty()
            && !texts.near_misses.is_empty(),
        "the data folder `{}` lacks prompts/ or pairs/qqp-test.jsonl (with duplicates and near misses)",
        data.display()
    );
    Ok(texts)
}

/// A step's input for a text, and a reply that satisfies the step's schema. What an audit
/// compares (the classifier's label, the validator's verdict, the prioritizer's priority)
/// follows the text's meaning, as a model's answer would: calls that mean the same get the
/// same one, and calls that mean other things mostly others, so that a replay can hold a hit
/// to the call's own logged answer. The rest varies at random.
fn call_for(step: &str, text: &str, meaning: &str, rng_pick: usize) -> (Value, String) {
    let words: Vec<&str> = text.split_whitespace().collect();
    let by_meaning = meaning
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
        as usize;
    match step {
        "classifier" => (
            json!({"text": text, "labels": LABELS}),
            json!({"label": LABELS[by_meaning % LABELS.len()], "confidence": 0.8}).to_string(),
        ),
        "validator" => (json!({"text": text}), {
            let issues: Vec<&str> = if by_meaning.is_multiple_of(4) { vec!["unclear request"] } else { Vec::new() };
            json!({"valid": issues.is_empty(), "issues": issues}).to_string()
        }),
        "enhancer" => (
            json!({"text": text}),
            json!({"enhanced": format!("{text} (clarified)"), "changes": ["clarified"]}).to_string(),
        ),
        "prioritizer" => (json!({"task": text}), {
            let priority = ["low", "medium", "high", "critical"][by_meaning % 4];
            json!({"priority": priority, "score": rng_pick % 100, "reason": "impact"}).to_string()
        }),
        "summarizer" => (
            json!({"text": text}),
            json!({"summary": words.iter().take(15).copied().collect::<Vec<_>>().join(" ")}).to_string(),
        ),
        _ => (
            json!({"text": text, "fields": ["name", "email"]}),
            json!({"fields": {"name": null, "email": null}}).to_string(),
        ),
    }
}

pub fn gen_log(args: &GenLogArgs, data: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(args.calls > 0, "--calls must be at least 1");
    for (name, rate) in
        [("--repeat-rate", args.repeat_rate), ("--rate-limited", args.rate_limited), ("--timeouts", args.timeouts)]
    {
        anyhow::ensure!((0.0..=1.0).contains(&rate), "{name} {rate}: give a share between 0 and 1");
    }
    let texts = texts(data)?;
    let mut rng = Rng(args.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let spacing_ms = 86_400_000 / args.calls as i64;
    let outage_start = DAY_START_MS + 14 * 3_600_000;
    let outage_end = outage_start + args.outage_minutes as i64 * 60_000;
    // Calls of the last hour that a repeat may take up: (component, workspace, text, twin).
    let mut recent: Vec<(usize, usize, String, Option<Twin>, i64)> = Vec::new();
    let mut meanings = Meanings::default();
    let mut burst_left = 0usize;
    let (mut repeats, mut paraphrases, mut near_misses, mut failures) = (0usize, 0usize, 0usize, 0usize);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.out).with_context(|| format!("cannot write `{}`", args.out.display()))?,
    );
    for n in 0..args.calls {
        let ts = DAY_START_MS + n as i64 * spacing_ms + rng.below(spacing_ms.max(1) as usize) as i64;
        recent.retain(|(.., at)| ts - at < 3_600_000);
        let (component, workspace, text, meaning) = if !recent.is_empty() && rng.unit() < args.repeat_rate {
            repeats += 1;
            let (component, workspace, text, twin, _) = recent[rng.below(recent.len())].clone();
            let twin_meaning = twin
                .as_ref()
                .filter(|_| rng.unit() < 0.5)
                .and_then(|twin| meanings.of_twin(&text, twin).map(|meaning| (twin.text.clone(), twin.same, meaning)));
            match twin_meaning {
                Some((twin, same, meaning)) => {
                    if same {
                        paraphrases += 1;
                    } else {
                        near_misses += 1;
                    }
                    (component, workspace, twin, meaning)
                }
                None => {
                    let meaning = meanings.of(&text);
                    (component, workspace, text, meaning)
                }
            }
        } else {
            let component = rng.below(COMPONENTS.len());
            let workspace = rng.below(WORKSPACES.len());
            let step = COMPONENTS[component].1;
            let pick = |pairs: &[(String, String)], rng: &mut Rng, same: bool| {
                let (a, b) = pairs[rng.below(pairs.len())].clone();
                (a, Some(Twin { text: b, same }))
            };
            let (text, twin) = match step {
                "enhancer" | "summarizer" | "extractor" => {
                    (texts.prompts[rng.below(texts.prompts.len())].clone(), None)
                }
                _ => match rng.below(10) {
                    0..4 => pick(&texts.duplicates, &mut rng, true),
                    4..7 => pick(&texts.near_misses, &mut rng, false),
                    _ => (texts.questions[rng.below(texts.questions.len())].clone(), None),
                },
            };
            let meaning = meanings.of(&text);
            recent.push((component, workspace, text.clone(), twin, ts));
            (component, workspace, text, meaning)
        };
        let (name, step) = COMPONENTS[component];
        let (input, reply) = call_for(step, &text, &meaning, rng.below(1_000));
        let prompt_tokens = 60 + text.len() / 4;
        let mut line = json!({
            "ts": jiff::Timestamp::from_millisecond(ts)?.to_string(),
            "trace_id": format!("gen-{n:06}"),
            "component": name,
            "step": step,
            "workspace": WORKSPACES[workspace],
            "model": "gpt-4o-mini",
            "input": input,
            "meaning": meaning,
        });
        if burst_left == 0 && rng.unit() < args.rate_limited / 4.0 {
            // 429s come in bursts of about four.
            burst_left = 2 + rng.below(5);
        }
        let failure = if (outage_start..outage_end).contains(&ts) {
            Some((json!({"class": "server_error", "status": 503, "message": "The server is overloaded"}), 300))
        } else if burst_left > 0 {
            burst_left -= 1;
            Some((
                json!({"class": "rate_limited", "status": 429, "retry_after_ms": 2000, "message": "Rate limit reached"}),
                40,
            ))
        } else if rng.unit() < args.timeouts {
            Some((json!({"class": "timeout", "message": "no answer within 20 s"}), 20_000))
        } else {
            None
        };
        match failure {
            Some((error, latency_ms)) => {
                failures += 1;
                line["error"] = error;
                line["latency_ms"] = json!(latency_ms);
            }
            None => {
                // Mostly under a second, with a long tail.
                let latency_ms =
                    350.0 + 900.0 * rng.unit() + if rng.unit() < 0.03 { 6_000.0 * rng.unit() } else { 0.0 };
                line["usage"] = json!({"input_tokens": prompt_tokens, "output_tokens": reply.len() / 4});
                line["response"] = json!(reply);
                line["latency_ms"] = json!(latency_ms.round());
            }
        }
        writeln!(out, "{line}")?;
    }
    out.flush()?;
    eprintln!(
        "xtask: {} calls to `{}`: {repeats} repeats ({:.1}%: {paraphrases} paraphrases, {near_misses} near misses, \
         the rest word for word), {failures} failures ({:.1}%)",
        args.calls,
        args.out.display(),
        100.0 * repeats as f64 / args.calls as f64,
        100.0 * failures as f64 / args.calls as f64
    );
    Ok(())
}
