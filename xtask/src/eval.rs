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
    let texts: Vec<&str> = prepared.keys().copied().collect();
    let mut vectors: HashMap<&str, Vec<f32>> = HashMap::with_capacity(texts.len());
    for chunk in texts.chunks(512) {
        let normalized: Vec<&str> = chunk.iter().map(|text| prepared[text].normalized.as_str()).collect();
        for (text, vector) in chunk.iter().zip(embedder.embed(&normalized)?) {
            vectors.insert(text, vector);
        }
    }
    Ok(pairs
        .iter()
        .map(|pair| {
            let similarity = dot(&vectors[pair.a.as_str()], &vectors[pair.b.as_str()]);
            (pair, prepared[pair.a.as_str()].clone(), prepared[pair.b.as_str()].clone(), similarity)
        })
        .collect())
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
