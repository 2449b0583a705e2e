//! `cargo xtask calibrate`: trains the semantic cache's learned verifier on the labelled dev
//! pairs (never the test pairs) and writes `crates/semantic-cache/verifier.json`.
//!
//! The probability cut is chosen on out-of-fold predictions (each dev pair scored by a forest
//! that did not see it), as the lowest cut at which the served pairs still reach the target
//! precision; the shipped forest is then trained on all dev pairs.

use std::path::Path;

use anyhow::Context;
use semantic_cache::learned::{Cut, Verifier, feature_names, features, settled_before_the_forest};
use semantic_cache::{ConceptNormalizer, Embedder, ModelPaths};
use serde::Serialize;

use crate::boost::{BoostParams, train};
use crate::eval::{Scores, read_pairs, score};

/// Candidates below this cosine are never served (and not trained on): at 0.80 plain cosine
/// serves wrong answers a third of the time on the dev pairs, and the recall the verifier buys
/// comes from far above it.
const FLOOR: f32 = 0.80;
const FOLDS: u64 = 5;
/// Precision targets whose cuts the file lists beside the shipped one.
const OTHER_TARGETS: &[f64] = &[0.80, 0.85, 0.90];
const DEV_FILES: &[&str] = &["qqp-dev.jsonl", "mrpc-dev.jsonl", "stsb-dev.jsonl"];

pub struct CalibrateOptions {
    /// Precision the cut must reach on held-out dev pairs.
    pub target_precision: f64,
    pub json: bool,
}

/// One dev pair the decision has to make.
struct Row {
    file: usize,
    same: bool,
    /// Identical after normalisation: always served, nothing to learn.
    identical: bool,
    /// At or above the floor and through the guards: the forest decides.
    features: Option<Vec<f32>>,
    fold: u64,
}

#[derive(Debug, Serialize)]
struct FileFigures {
    file: String,
    pairs: usize,
    precision: f64,
    recall: f64,
}

pub fn calibrate(root: &Path, data: &Path, options: &CalibrateOptions) -> anyhow::Result<()> {
    let embedder = Embedder::load(&ModelPaths::installed(), 0)?;
    let normalizer = ConceptNormalizer::default();
    let mut rows = Vec::new();
    for (file, name) in DEV_FILES.iter().enumerate() {
        let path = data.join("pairs").join(name);
        let pairs = read_pairs(&path, None)?;
        for scored in score(&pairs, &embedder, &normalizer)? {
            let (a, b) = scored.sides();
            let settled = settled_before_the_forest(a.prepared, b.prepared, scored.cosine, FLOOR);
            rows.push(Row {
                file,
                same: scored.pair.same,
                identical: matches!(settled, Some(Ok(_))),
                features: settled.is_none().then(|| features(a, b, scored.cosine)),
                fold: fnv(&scored.pair.a, &scored.pair.b) % FOLDS,
            });
        }
    }
    let trainable: Vec<&Row> = rows.iter().filter(|row| row.features.is_some()).collect();
    eprintln!("calibrate: {} dev pairs, {} candidates to learn from", rows.len(), trainable.len());
    let params = BoostParams::default();
    let names = feature_names(embedder.dimensions());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();

    // The five fold forests and the shipped one train side by side, one thread each.
    let (folds, shipped) = std::thread::scope(|scope| {
        let folds: Vec<_> = (0..FOLDS)
            .map(|fold| {
                let trainable = &trainable;
                let names = &names;
                scope.spawn(move || {
                    let (x, labels) = examples(trainable.iter().copied().filter(|row| row.fold != fold));
                    train(&x, &labels, names, params)
                })
            })
            .collect();
        let (x, labels) = examples(trainable.iter().copied());
        let shipped = train(&x, &labels, &names, params);
        (folds.into_iter().map(|fold| fold.join()).collect::<Result<Vec<_>, _>>(), shipped)
    });
    let folds = folds.map_err(|_| anyhow::anyhow!("a training thread panicked"))?;
    let held_out: Vec<Option<f32>> = rows
        .iter()
        .map(|row| row.features.as_ref().map(|features| folds[row.fold as usize].probability(features)))
        .collect();
    let cut_at = |target: f64| {
        lowest_cut_at_precision(&rows, &held_out, target)
            // Three decimals, as people read and write it in the config; rounded up, never below.
            .map(|cut| (cut * 1000.0).ceil() / 1000.0)
            .with_context(|| format!("no cut reaches precision {target} on the dev pairs"))
    };
    let min_confidence = cut_at(options.target_precision)?;
    let cuts = OTHER_TARGETS
        .iter()
        .map(|&precision| {
            let min_confidence = cut_at(precision)?;
            let (scores, _) = figures_at(&rows, &held_out, min_confidence, None);
            Ok(Cut { precision, min_confidence, recall: scores.recall })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let figures: Vec<FileFigures> = DEV_FILES
        .iter()
        .enumerate()
        .map(|(file, name)| {
            let (scores, pairs) = figures_at(&rows, &held_out, min_confidence, Some(file));
            FileFigures { file: (*name).to_owned(), pairs, precision: scores.precision, recall: scores.recall }
        })
        .collect();

    let verifier = Verifier {
        model_id: embedder.model_id().to_owned(),
        floor: FLOOR,
        min_confidence,
        cuts,
        trained_on: serde_json::json!({
            "files": DEV_FILES,
            "candidates": trainable.len(),
            "rounds": params.rounds,
            "depth": params.depth,
            "learning_rate": params.learning_rate,
            "target_precision": options.target_precision,
            "held_out": figures,
        }),
        forest: shipped,
    };
    let path = root.join("crates").join("semantic-cache").join("verifier.json");
    std::fs::write(&path, serde_json::to_string(&verifier)? + "\n")
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    for figure in &figures {
        if options.json {
            println!(
                "{}",
                serde_json::json!({"file": figure.file, "min_confidence": min_confidence, "pairs": figure.pairs, "precision": figure.precision, "recall": figure.recall})
            );
        } else {
            println!(
                "{}: {} pairs, held-out precision {:.3} recall {:.3} at min_confidence {min_confidence:.3}",
                figure.file, figure.pairs, figure.precision, figure.recall
            );
        }
    }
    let defaults = root.join("crates").join("pipeline-core").join("defaults.toml");
    set_default_min_confidence(&defaults, min_confidence)?;
    eprintln!(
        "calibrate: wrote {} and semantic.min_confidence = {min_confidence:.3} in {}",
        path.display(),
        defaults.display()
    );
    Ok(())
}

/// The shipped default follows the verifier it was calibrated with (a test checks they agree).
/// Only the value changes: the file's comments and layout stay as they are.
fn set_default_min_confidence(defaults: &Path, min_confidence: f32) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(defaults).with_context(|| format!("cannot read `{}`", defaults.display()))?;
    let mut document: toml_edit::DocumentMut =
        text.parse().with_context(|| format!("`{}` is not TOML", defaults.display()))?;
    let value = document
        .get_mut("semantic")
        .and_then(|semantic| semantic.get_mut("min_confidence"))
        .and_then(toml_edit::Item::as_value_mut)
        .with_context(|| format!("`{}` has no semantic.min_confidence", defaults.display()))?;
    let decor = value.decor().clone();
    // Three decimals, as the cut is reported.
    *value = toml_edit::Value::from((f64::from(min_confidence) * 1000.0).round() / 1000.0);
    *value.decor_mut() = decor;
    std::fs::write(defaults, document.to_string()).with_context(|| format!("cannot write `{}`", defaults.display()))
}

fn examples<'a>(rows: impl Iterator<Item = &'a Row>) -> (Vec<Vec<f32>>, Vec<bool>) {
    rows.filter_map(|row| row.features.clone().map(|features| (features, row.same))).unzip()
}

/// Served at `cut`: identical texts always, candidates whose held-out probability reaches it.
fn served(row: &Row, confidence: Option<f32>, cut: f32) -> bool {
    row.identical || confidence.is_some_and(|confidence| confidence >= cut)
}

/// The decisions at `cut` for one dev file's pairs (all files' when `None`), and how many.
fn figures_at(rows: &[Row], held_out: &[Option<f32>], cut: f32, file: Option<usize>) -> (Scores, usize) {
    let decisions: Vec<(bool, bool)> = rows
        .iter()
        .zip(held_out)
        .filter(|(row, _)| file.is_none_or(|file| file == row.file))
        .map(|(row, confidence)| (served(row, *confidence, cut), row.same))
        .collect();
    (Scores::of(decisions.iter().copied()), decisions.len())
}

/// The lowest held-out probability at which everything served, over all dev files, is still at
/// least `target` precise: the most recall the target allows.
fn lowest_cut_at_precision(rows: &[Row], held_out: &[Option<f32>], target: f64) -> Option<f32> {
    let mut scored: Vec<(f32, bool)> =
        rows.iter().zip(held_out).filter_map(|(row, p)| p.filter(|_| !row.identical).map(|p| (p, row.same))).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = rows
        .iter()
        .filter(|row| row.identical)
        .fold((0u64, 0u64), |(tp, fp), row| if row.same { (tp + 1, fp) } else { (tp, fp + 1) });
    let mut cut = None;
    for (index, (p, same)) in scored.iter().enumerate() {
        if *same {
            tp += 1;
        } else {
            fp += 1;
        }
        // Only where a cut can fall: between distinct probabilities.
        let boundary = scored.get(index + 1).is_none_or(|next| next.0 < *p);
        if boundary && tp as f64 / (tp + fp) as f64 >= target {
            cut = Some(*p);
        }
    }
    cut
}

/// A stable hash of a pair, for folds that do not change between runs or machines.
fn fnv(a: &str, b: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.bytes().chain([0]).chain(b.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}
