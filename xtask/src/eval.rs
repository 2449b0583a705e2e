//! `cargo xtask eval-cache`: the semantic cache's own decision, exactly as served, over
//! labelled sentence pairs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use semantic_cache::verify::{Prepared, verify};
use semantic_cache::{ConceptNormalizer, Embedder, ModelPaths};
use serde::Serialize;

/// A pair with a verdict: 1 = the cache should serve one for the other, 0 = it must not.
struct Pair {
    a: String,
    b: String,
    same: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Scores {
    pub hit_rate: f64,
    pub precision: f64,
    pub recall: f64,
    pub fpr: f64,
}

impl Scores {
    fn of(decisions: impl Iterator<Item = (bool, bool)>) -> Self {
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
    threshold: f32,
    cosine: Scores,
    shipped: Scores,
}

#[derive(Debug, Serialize)]
struct FileReport {
    file: String,
    pairs: usize,
    threshold: f32,
    #[serde(flatten)]
    shipped: Scores,
    sweep: Vec<SweepRow>,
}

pub struct EvalOptions {
    pub files: Vec<PathBuf>,
    pub json: bool,
    pub limit: Option<usize>,
    pub threshold: f32,
    /// Print every pair's similarity and decision.
    pub each: bool,
}

pub fn eval_cache(options: &EvalOptions) -> anyhow::Result<()> {
    let embedder = Embedder::load(&ModelPaths::installed(), 0)?;
    let normalizer = ConceptNormalizer::default();
    for file in &options.files {
        let started = Instant::now();
        let pairs = read_pairs(file, options.limit)?;
        let scored = score(&pairs, &embedder, &normalizer)?;
        let decide = |threshold: f32, guarded: bool| {
            scored.iter().map(move |(pair, a, b, similarity)| {
                let served =
                    if guarded { verify(a, b, *similarity, threshold).is_ok() } else { *similarity >= threshold };
                (served, pair.same)
            })
        };
        if options.each {
            for (pair, a, b, similarity) in &scored {
                let decision = match verify(a, b, *similarity, options.threshold) {
                    Ok(()) => "served".to_owned(),
                    Err(rejection) => format!("not served: {}", rejection.label()),
                };
                let label = if pair.same { "same" } else { "different" };
                println!("{similarity:.3}  {decision:<28} ({label})  {:?} / {:?}", pair.a, pair.b);
            }
        }
        let sweep = (0..=9)
            .map(|step| {
                let threshold = 0.80 + 0.02 * step as f32;
                SweepRow {
                    threshold,
                    cosine: Scores::of(decide(threshold, false)),
                    shipped: Scores::of(decide(threshold, true)),
                }
            })
            .collect();
        let report = FileReport {
            file: file.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default(),
            pairs: pairs.len(),
            threshold: options.threshold,
            shipped: Scores::of(decide(options.threshold, true)),
            sweep,
        };
        if options.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", table(&report, started.elapsed().as_secs_f64()));
        }
    }
    Ok(())
}

fn table(report: &FileReport, seconds: f64) -> String {
    let mut out = String::new();
    let s = &report.shipped;
    let _ = writeln!(out, "{}: {} pairs ({seconds:.1} s)", report.file, report.pairs);
    let _ = writeln!(
        out,
        "  shipped decision at {:.2}: hit {:.1}%  precision {:.3}  recall {:.3}  fpr {:.3}",
        report.threshold,
        s.hit_rate * 100.0,
        s.precision,
        s.recall,
        s.fpr
    );
    let _ = writeln!(
        out,
        "  {:>9} | {:>28} | {:>28}",
        "threshold", "cosine only: prec  recall fpr", "shipped: prec  recall fpr"
    );
    for row in &report.sweep {
        let _ = writeln!(
            out,
            "  {:>9.2} | {:>14.3} {:>6.3} {:>6.3} | {:>14.3} {:>6.3} {:>6.3}",
            row.threshold,
            row.cosine.precision,
            row.cosine.recall,
            row.cosine.fpr,
            row.shipped.precision,
            row.shipped.recall,
            row.shipped.fpr
        );
    }
    out
}

type Scored<'a> = (&'a Pair, Prepared, Prepared, f32);

fn score<'a>(
    pairs: &'a [Pair],
    embedder: &Embedder,
    normalizer: &ConceptNormalizer,
) -> anyhow::Result<Vec<Scored<'a>>> {
    let mut prepared: HashMap<&str, Prepared> = HashMap::new();
    for pair in pairs {
        for text in [&pair.a, &pair.b] {
            prepared.entry(text.as_str()).or_insert_with(|| Prepared::new(text, normalizer));
        }
    }
    let mut texts: Vec<&str> = prepared.keys().copied().collect();
    texts.sort_unstable();
    let normalized: Vec<&str> = texts.iter().map(|text| prepared[text].normalized.as_str()).collect();
    let embedded = embed_cached(embedder, &normalized)?;
    let vectors: HashMap<&str, Vec<f32>> = texts.into_iter().zip(embedded).collect();
    Ok(pairs
        .iter()
        .map(|pair| {
            let similarity = dot(&vectors[pair.a.as_str()], &vectors[pair.b.as_str()]);
            (pair, prepared[pair.a.as_str()].clone(), prepared[pair.b.as_str()].clone(), similarity)
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
fn read_pairs(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Pair>> {
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
