//! `cargo xtask eval-cache`: the semantic cache's own decision, exactly as served, over
//! labelled sentence pairs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use anyhow::{Context, bail};
use semantic_cache::learned::{Side, decide};
use semantic_cache::verify::{Prepared, Rejection};
use semantic_cache::{ConceptNormalizer, Embedder, ModelPaths};
use semantic_cache::{ServeBar, Verifier};
use serde::Serialize;

/// A pair with a verdict: 1 = the cache should serve one for the other, 0 = it must not.
pub(crate) struct Pair {
    pub(crate) a: String,
    pub(crate) b: String,
    pub(crate) same: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Scores {
    pub hit_rate: f64,
    pub precision: f64,
    pub recall: f64,
    pub fpr: f64,
}

impl Scores {
    /// From (served, same) decisions.
    pub(crate) fn of(decisions: impl Iterator<Item = (bool, bool)>) -> Self {
        let (mut tp, mut fp, mut fn_, mut tn) = (0u64, 0u64, 0u64, 0u64);
        for (served, same) in decisions {
            match (served, same) {
                (true, true) => tp += 1,
                (true, false) => fp += 1,
                (false, true) => fn_ += 1,
                (false, false) => tn += 1,
            }
        }
        let ratio = |num: u64, den: u64| if den == 0 { 0.0 } else { num as f64 / den as f64 };
        Self {
            hit_rate: ratio(tp + fp, tp + fp + fn_ + tn),
            precision: ratio(tp, tp + fp),
            recall: ratio(tp, tp + fn_),
            fpr: ratio(fp, fp + tn),
        }
    }
}

#[derive(Debug, Serialize)]
struct SweepRow {
    /// A cosine threshold (plain decision) or a probability cut (learned verifier).
    at: f32,
    #[serde(flatten)]
    scores: Scores,
}

/// The served decision per lookup, as a cache meets it: an index holding every pair's first
/// sentence, each second sentence asked once. A lookup tries up to 8 candidates and serves the
/// first that passes, so it may serve another question than the pair's, which a per-pair
/// figure never counts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LookupScores {
    pub lookups: usize,
    /// Lookups that served an answer.
    pub hit_rate: f64,
    /// Of the answers served, those whose question the file says is the same as the one asked.
    pub precision: f64,
    /// 1 - precision: the share of served answers that answer another question.
    pub wrong_rate: f64,
    /// The same among the hits that were not the very text asked: what the semantic cache adds
    /// to an exact one.
    pub wrong_rate_paraphrases: f64,
    /// Of the lookups whose pair is the same question, those served that pair's answer.
    pub recall: f64,
    /// Served answers to a question other than the pair's first (wrong unless the file says
    /// that one is the same too, or it is the very text asked).
    pub served_another: usize,
    /// Served answers stored for the very text asked (it is also another pair's first
    /// sentence): right by definition, and what an exact cache would have served.
    pub served_identical: usize,
}

#[derive(Debug, Serialize)]
struct FileReport {
    file: String,
    pairs: usize,
    /// "learned" (the verifier applies to this model) or "cosine".
    decision: &'static str,
    threshold: f32,
    min_confidence: f32,
    #[serde(flatten)]
    shipped: Scores,
    /// 1 - precision, per pair, beside `per_lookup.wrong_rate`.
    wrong_rate: f64,
    per_lookup: LookupScores,
    /// Cosine alone, at thresholds 0.80 to 0.98.
    cosine_sweep: Vec<SweepRow>,
    /// The shipped decision with its bar moved: probability cuts for the learned verifier,
    /// cosine thresholds for the plain decision.
    shipped_sweep: Vec<SweepRow>,
    /// The least cosine (0.01 grid) at which the pairs at or above it are same-meaning pairs
    /// with at least [`ANSWER_PRECISION`] precision, cosine alone: the conservative cut an
    /// audit compares free-text answers at (`semantic.answer_min_cosine` is the highest over
    /// the dev files). `None`: no cut reaches it with [`MIN_SERVED`] pairs above it.
    answer_min_cosine: Option<f32>,
}

/// How sure an audit must be that two free-text answers agree.
const ANSWER_PRECISION: f64 = 0.95;
/// Pairs a cut must keep for its precision to mean anything.
const MIN_SERVED: usize = 30;

/// See [`FileReport::answer_min_cosine`].
fn answer_min_cosine(scored: &[Scored<'_>]) -> Option<f32> {
    (80..100).map(|cut| cut as f32 / 100.0).find(|&cut| {
        let above: Vec<bool> = scored.iter().filter(|s| s.cosine >= cut).map(|s| s.pair.same).collect();
        above.len() >= MIN_SERVED
            && above.iter().filter(|same| **same).count() as f64 / above.len() as f64 >= ANSWER_PRECISION
    })
}

pub struct EvalOptions {
    pub files: Vec<PathBuf>,
    pub json: bool,
    pub limit: Option<usize>,
    pub bar: ServeBar,
    /// Print every pair's similarity and decision.
    pub each: bool,
}

pub fn eval_cache(options: &EvalOptions) -> anyhow::Result<()> {
    let embedder = std::sync::Arc::new(Embedder::load(&ModelPaths::installed(), 0)?);
    let normalizer = ConceptNormalizer::default();
    let verifier = Verifier::for_model(embedder.model_id());
    if verifier.is_none() {
        eprintln!("eval-cache: the learned verifier was trained for another model; evaluating the plain decision");
    }
    let bar = options.bar;
    for file in &options.files {
        let started = Instant::now();
        let pairs = read_pairs(file, options.limit)?;
        let scored = score(&pairs, &embedder, &normalizer)?;
        let shipped = |bar: ServeBar| {
            let verifier = verifier.as_ref();
            scored.iter().map(move |scored| (scored.decide(verifier, bar).is_ok(), scored.pair.same))
        };
        if options.each {
            for scored in &scored {
                let (pair, cosine) = (scored.pair, scored.cosine);
                let decision = match scored.decide(verifier.as_ref(), bar) {
                    Ok(confidence) => format!("served at {confidence:.3}"),
                    Err(rejection) => format!("not served: {}", rejection.label()),
                };
                let label = if pair.same { "same" } else { "different" };
                println!("{cosine:.3}  {decision:<28} ({label})  {:?} / {:?}", pair.a, pair.b);
            }
        }
        let cosine_sweep = (0..=9)
            .map(|step| {
                let at = 0.80 + 0.02 * step as f32;
                SweepRow { at, scores: Scores::of(scored.iter().map(|scored| (scored.cosine >= at, scored.pair.same))) }
            })
            .collect();
        let shipped_sweep = (0..=9)
            .map(|step| {
                let (at, moved) = match verifier {
                    Some(_) => {
                        (0.50 + 0.05 * step as f32, ServeBar { min_confidence: 0.50 + 0.05 * step as f32, ..bar })
                    }
                    None => (0.80 + 0.02 * step as f32, ServeBar { threshold: 0.80 + 0.02 * step as f32, ..bar }),
                };
                SweepRow { at, scores: Scores::of(shipped(moved)) }
            })
            .collect();
        let shipped_scores = Scores::of(shipped(bar));
        let report = FileReport {
            file: file.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
            pairs: pairs.len(),
            decision: if verifier.is_some() { "learned" } else { "cosine" },
            threshold: bar.threshold,
            min_confidence: bar.min_confidence,
            shipped: shipped_scores,
            wrong_rate: 1.0 - shipped_scores.precision,
            per_lookup: per_lookup(&scored, embedder.clone(), bar)?,
            cosine_sweep,
            shipped_sweep,
            answer_min_cosine: answer_min_cosine(&scored),
        };
        if options.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", table(&report, started.elapsed().as_secs_f64()));
        }
    }
    Ok(())
}

/// Every pair's first sentence in one index (the served cache, at `bar`), each second sentence
/// looked up in it once.
fn per_lookup(
    scored: &[Scored<'_>],
    embedder: std::sync::Arc<Embedder>,
    bar: ServeBar,
) -> anyhow::Result<LookupScores> {
    use semantic_cache::{Lookup, SemanticCache};
    let settings = crate::bench::shipped_settings(2 * scored.len() as u64 + 16)?;
    let cache: SemanticCache<String> = SemanticCache::new(embedder, ConceptNormalizer::default(), settings);
    let now = std::time::SystemTime::now();
    let mut stored = std::collections::HashSet::new();
    for pair in scored {
        if stored.insert(pair.pair.a.as_str()) {
            let query = cache.prepare_embedded(&pair.pair.a, pair.a_vector.to_vec());
            cache.insert("eval", query, pair.pair.a.clone(), now);
        }
    }
    // Which (first, second) sentences the file says are the same question.
    let same: std::collections::HashSet<(&str, &str)> =
        scored.iter().filter(|pair| pair.pair.same).map(|pair| (pair.pair.a.as_str(), pair.pair.b.as_str())).collect();
    let (mut hits, mut right, mut found, mut another, mut identical) = (0_usize, 0_usize, 0_usize, 0_usize, 0_usize);
    for pair in scored {
        let query = cache.prepare_embedded(&pair.pair.b, pair.b_vector.to_vec());
        let Lookup::Hit(hit) = cache.lookup("eval", &query, Some(bar), None, now) else { continue };
        hits += 1;
        if hit.value == pair.pair.b {
            identical += 1;
            right += 1;
        } else if same.contains(&(hit.value.as_str(), pair.pair.b.as_str())) {
            right += 1;
        }
        if hit.value == pair.pair.a {
            found += usize::from(pair.pair.same);
        } else {
            another += 1;
        }
    }
    let ratio = |num: usize, den: usize| if den == 0 { 0.0 } else { num as f64 / den as f64 };
    let precision = ratio(right, hits);
    Ok(LookupScores {
        lookups: scored.len(),
        hit_rate: ratio(hits, scored.len()),
        precision,
        wrong_rate: if hits == 0 { 0.0 } else { 1.0 - precision },
        wrong_rate_paraphrases: ratio(hits - right, hits - identical),
        recall: ratio(found, scored.iter().filter(|pair| pair.pair.same).count()),
        served_another: another,
        served_identical: identical,
    })
}

fn table(report: &FileReport, seconds: f64) -> String {
    let mut out = String::new();
    let s = &report.shipped;
    let _ = writeln!(out, "{}: {} pairs ({seconds:.1} s)", report.file, report.pairs);
    let bar = match report.decision {
        "learned" => format!("learned verifier at min_confidence {:.3}", report.min_confidence),
        _ => format!("cosine threshold {:.2} and guards", report.threshold),
    };
    let _ = writeln!(
        out,
        "  shipped decision ({bar}): hit {:.1}%  precision {:.3}  recall {:.3}  fpr {:.3}",
        s.hit_rate * 100.0,
        s.precision,
        s.recall,
        s.fpr
    );
    match report.answer_min_cosine {
        Some(cut) => {
            let _ = writeln!(
                out,
                "  answers agree at cosine {cut:.2}: pairs at or above it are {:.0}% same-meaning (semantic.answer_min_cosine)",
                ANSWER_PRECISION * 100.0
            );
        }
        None => {
            let _ = writeln!(out, "  no cosine cut reaches {:.0}% same-meaning pairs", ANSWER_PRECISION * 100.0);
        }
    }
    let l = &report.per_lookup;
    let _ = writeln!(
        out,
        "  per lookup (every first sentence in one index, each second asked): hit {:.1}%  precision {:.3}  \
         recall {:.3}  wrong answers {:.1}% of hits (per pair {:.1}%; {:.1}% of the hits that were not the very \
         text asked), {} served another question ({} the very text asked)",
        l.hit_rate * 100.0,
        l.precision,
        l.recall,
        l.wrong_rate * 100.0,
        report.wrong_rate * 100.0,
        l.wrong_rate_paraphrases * 100.0,
        l.served_another,
        l.served_identical
    );
    let heading = if report.decision == "learned" { "min_confidence" } else { "threshold" };
    let _ = writeln!(
        out,
        "  {:>9} | {:>22} || {:>14} | {:>22}",
        "cosine", "prec  recall   fpr", heading, "prec  recall   fpr"
    );
    for (cosine, shipped) in report.cosine_sweep.iter().zip(&report.shipped_sweep) {
        let _ = writeln!(
            out,
            "  {:>9.2} | {:>6.3} {:>7.3} {:>7.3} || {:>14.2} | {:>6.3} {:>7.3} {:>7.3}",
            cosine.at,
            cosine.scores.precision,
            cosine.scores.recall,
            cosine.scores.fpr,
            shipped.at,
            shipped.scores.precision,
            shipped.scores.recall,
            shipped.scores.fpr
        );
    }
    out
}

/// A pair as the cache sees it: both texts prepared and embedded, and their cosine.
pub(crate) struct Scored<'a> {
    pub(crate) pair: &'a Pair,
    pub(crate) a: Rc<Prepared>,
    pub(crate) b: Rc<Prepared>,
    pub(crate) a_vector: Rc<[f32]>,
    pub(crate) b_vector: Rc<[f32]>,
    pub(crate) cosine: f32,
}

impl Scored<'_> {
    pub(crate) fn sides(&self) -> (Side<'_>, Side<'_>) {
        (Side { prepared: &self.a, vector: &self.a_vector }, Side { prepared: &self.b, vector: &self.b_vector })
    }

    /// The cache's own decision for this pair at `bar`.
    pub(crate) fn decide(&self, verifier: Option<&Verifier>, bar: ServeBar) -> Result<f32, Rejection> {
        let (a, b) = self.sides();
        decide(verifier, a, b, self.cosine, bar)
    }
}

pub(crate) fn score<'a>(
    pairs: &'a [Pair],
    embedder: &Embedder,
    normalizer: &ConceptNormalizer,
) -> anyhow::Result<Vec<Scored<'a>>> {
    let mut prepared: HashMap<&str, Rc<Prepared>> = HashMap::new();
    for pair in pairs {
        for text in [&pair.a, &pair.b] {
            prepared.entry(text.as_str()).or_insert_with(|| Rc::new(Prepared::new(text, normalizer)));
        }
    }
    let mut texts: Vec<&str> = prepared.keys().copied().collect();
    texts.sort_unstable();
    let normalized: Vec<&str> = texts.iter().map(|text| prepared[text].normalized.as_str()).collect();
    let embedded = embed_cached(embedder, &normalized)?;
    let vectors: HashMap<&str, Rc<[f32]>> =
        texts.into_iter().zip(embedded).map(|(text, vector)| (text, Rc::from(vector))).collect();
    Ok(pairs
        .iter()
        .map(|pair| {
            let (a_vector, b_vector) = (vectors[pair.a.as_str()].clone(), vectors[pair.b.as_str()].clone());
            Scored {
                pair,
                a: prepared[pair.a.as_str()].clone(),
                b: prepared[pair.b.as_str()].clone(),
                cosine: dot(&a_vector, &b_vector),
                a_vector,
                b_vector,
            }
        })
        .collect())
}

/// Embeddings of these exact texts by this model from an earlier run, else fresh ones (then kept in
/// `target/eval-embeddings`): evaluating and calibrating re-read the same 150,000 sentences.
pub(crate) fn embed_cached(embedder: &Embedder, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(embedder.model_id().as_bytes());
    for text in texts {
        hasher.update((text.len() as u64).to_le_bytes());
        hasher.update(text.as_bytes());
    }
    let folder = crate::workspace_root()?.join("target").join("eval-embeddings");
    let path = folder.join(format!("{}.f32", hex::encode(&hasher.finalize()[..12])));
    let dimensions = embedder.dimensions();
    if let Ok(bytes) = std::fs::read(&path)
        && bytes.len() == texts.len() * dimensions * 4
    {
        let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        return Ok(floats.chunks(dimensions).map(<[f32]>::to_vec).collect());
    }
    let mut vectors = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(1024) {
        vectors.extend(embedder.embed(chunk)?);
    }
    std::fs::create_dir_all(&folder)?;
    let bytes: Vec<u8> = vectors.iter().flatten().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&path, bytes)?;
    Ok(vectors)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// JSON lines with `a`, `b` and `label` (1 same, 0 different) or `score` (0-5: >= 4 same,
/// <= 2 different, between: left out).
pub(crate) fn read_pairs(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Pair>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), index + 1))?;
        let (Some(a), Some(b)) = (value["a"].as_str(), value["b"].as_str()) else {
            bail!("{}:{}: needs string fields `a` and `b`", path.display(), index + 1);
        };
        let same = match (value["label"].as_i64(), value["score"].as_f64()) {
            (Some(label), _) => label == 1,
            (None, Some(score)) if score >= 4.0 => true,
            (None, Some(score)) if score <= 2.0 => false,
            (None, Some(_)) => continue,
            (None, None) => bail!("{}:{}: needs `label` (0/1) or `score` (0-5)", path.display(), index + 1),
        };
        pairs.push(Pair { a: a.to_owned(), b: b.to_owned(), same });
        if limit.is_some_and(|limit| pairs.len() >= limit) {
            break;
        }
    }
    Ok(pairs)
}
